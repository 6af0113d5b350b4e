"""CPU per invite of the per-invitee rate limiter in an invite storm (not part of the test run).

A storm of invites for distinct local users, at a given rate, with the limiter's default
invitee settings (``ratelimit.invitee_per_second`` 0.05, ``ratelimit.invitee_burst`` 10):
every bucket takes 20 s to refill, so the limiter tracks ``rate x 20 s`` users at any time.

    python benchmarks/ratelimit_storm.py [invitees] [invitees per second]
"""

from __future__ import annotations

import sys
import time

from twisted.internet.task import Clock

from federation_invite.ratelimit import RateLimiter


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 40_000
    per_second = float(sys.argv[2]) if len(sys.argv) > 2 else 1_000.0
    clock = Clock()
    limiter = RateLimiter(clock, 0.05, 10, what="invites for this user")
    started = time.process_time()
    for index in range(count):
        limiter.acquire(f"@user{index}:example.org")
        clock.advance(1 / per_second)
    took = time.process_time() - started
    print(
        f"{count:,} distinct invitees at {per_second:,.0f}/s: {took / count * 1e6:.1f} us of CPU"
        f" per invite in the limiter; {len(limiter._buckets):,} buckets kept at the end"
    )


if __name__ == "__main__":
    main()
