"""Token buckets under floods of distinct keys: memory bounded, cost per request bounded."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from federation_invite import ratelimit
from federation_invite.core.errors import MatrixError
from federation_invite.ratelimit import RateLimiter


class PruneTests(SynchronousTestCase):
    def counted(self, limiter: RateLimiter) -> list[int]:
        """Record the table's size at each pruning pass."""
        passes: list[int] = []
        original = limiter._prune

        def prune(now: float) -> None:
            passes.append(len(limiter._buckets))
            original(now)

        limiter._prune = prune  # type: ignore[method-assign]
        return passes

    def test_refilled_buckets_are_forgotten(self) -> None:
        """Past the threshold, keys whose buckets have refilled are dropped."""
        clock = Clock()
        limiter = RateLimiter(clock, 1.0, 1, what="requests")
        for i in range(ratelimit._PRUNE_ABOVE):
            limiter.acquire(f"old{i}")
        self.assertEqual(len(limiter._buckets), ratelimit._PRUNE_ABOVE)
        clock.advance(5)  # every bucket refilled
        limiter.acquire("new")  # past the threshold: a pass
        self.assertEqual(set(limiter._buckets), {"new"})

    def test_storm_of_slowly_refilling_keys_prunes_rarely(self) -> None:
        """40,000 distinct invitees at 1,000/s with the default invitee limits (one invite
        per 20 s, burst 10): a pass frees little, so passes must not follow every request
        (each would scan over 10,000 keys: milliseconds of CPU per invite)."""
        clock = Clock()
        limiter = RateLimiter(clock, 0.05, 10, what="invites for this user")
        passes = self.counted(limiter)
        for i in range(40_000):
            limiter.acquire(f"@u{i}:example.org")
            clock.advance(0.001)
        self.assertLessEqual(len(passes), 3)
        self.assertEqual(passes[0], ratelimit._PRUNE_ABOVE + 1)
        # Memory stays bounded: at most twice what was left at the last pass, and
        # keys refilled by then are gone.
        self.assertLessEqual(len(limiter._buckets), 2 * passes[-1] + 1)
        self.assertNotIn("@u0:example.org", limiter._buckets)

    def test_limited_key_survives_passes(self) -> None:
        """A key that used its burst is still limited after passes over a flood."""
        clock = Clock()
        limiter = RateLimiter(clock, 0.05, 2, what="invites for this user")
        limiter.acquire("@hot:example.org")
        limiter.acquire("@hot:example.org")
        for i in range(3 * ratelimit._PRUNE_ABOVE):
            limiter.acquire(f"@u{i}:example.org")
        clock.advance(1)
        with self.assertRaises(MatrixError) as caught:
            limiter.acquire("@hot:example.org")
        self.assertEqual(
            (caught.exception.http_status, caught.exception.errcode), (429, "M_LIMIT_EXCEEDED")
        )

    def test_threshold_returns_after_the_storm(self) -> None:
        """Once the flood's keys have refilled, the next pass drops them and the
        threshold falls back to its floor."""
        clock = Clock()
        limiter = RateLimiter(clock, 0.05, 10, what="invites for this user")
        for i in range(3 * ratelimit._PRUNE_ABOVE):
            limiter.acquire(f"@u{i}:example.org")
        self.assertGreater(limiter._prune_above, ratelimit._PRUNE_ABOVE)
        passes = self.counted(limiter)
        clock.advance(60)  # the flood's buckets have all refilled
        i = 0
        while not passes:
            limiter.acquire(f"@late{i}:example.org")
            clock.advance(0.01)  # 100 new invitees a second from now on
            i += 1
        self.assertEqual(limiter._prune_above, ratelimit._PRUNE_ABOVE)
        self.assertLessEqual(len(limiter._buckets), 2_001)  # the last 20 s of invitees
