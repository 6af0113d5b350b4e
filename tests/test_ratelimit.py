"""Token buckets under floods of distinct keys (memory bounded, cost per request bounded)
and under a wall clock stepping backwards."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from federation_invite import ratelimit
from federation_invite.core.errors import MatrixError
from federation_invite.ratelimit import ConcurrencyLimiter, RateLimiter


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
        """Past the README's threshold of 10,000 keys, keys whose buckets have refilled are
        dropped."""
        clock = Clock()
        limiter = RateLimiter(clock, 1.0, 1, what="requests")
        passes = self.counted(limiter)
        for i in range(10_000):
            limiter.acquire(f"old{i}")
        self.assertEqual(len(limiter._buckets), 10_000)
        self.assertEqual(passes, [])
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


class ClockStepTests(SynchronousTestCase):
    """``reactor.seconds()`` is wall time: NTP or an operator may step it backwards."""

    def test_step_back_takes_no_tokens(self) -> None:
        """After the clock steps back an hour, a key's remaining tokens are still granted,
        and its bucket refills at the normal rate from there."""
        clock = Clock()
        limiter = RateLimiter(clock, 1.0, 3, what="requests")
        limiter.acquire("origin")
        limiter.acquire("origin")
        clock.rightNow -= 3600
        self.assertEqual(limiter.acquire("origin"), 0.0)
        with self.assertRaises(MatrixError) as caught:
            limiter.acquire("origin")
        self.assertEqual(caught.exception.extra["retry_after_ms"], 1001)
        clock.advance(1)
        self.assertEqual(limiter.acquire("origin"), 0.0)

    def test_step_back_refuses_a_spent_key_only_until_it_refills(self) -> None:
        """A key that spent its burst just before the clock stepped back an hour is refused
        for one token's refill, not for the hour."""
        clock = Clock()
        limiter = RateLimiter(clock, 1.0, 2, what="requests")
        limiter.acquire("origin")
        limiter.acquire("origin")
        clock.rightNow -= 3600
        with self.assertRaises(MatrixError) as caught:
            limiter.acquire("origin")
        self.assertEqual(caught.exception.extra["retry_after_ms"], 1001)
        clock.advance(1)
        self.assertEqual(limiter.acquire("origin"), 0.0)

    def test_buckets_from_before_a_step_back_are_forgotten(self) -> None:
        """Buckets last used before the clock stepped back refill from the next pass on, so a
        later pass forgets them (not only once the clock is back where it was)."""
        self.patch(ratelimit, "_PRUNE_ABOVE", 2)
        clock = Clock()
        limiter = RateLimiter(clock, 1.0, 1, what="requests")
        limiter.acquire("a")
        limiter.acquire("b")
        clock.rightNow -= 3600
        limiter.acquire("c")  # a pass: nothing has refilled yet
        self.assertEqual(set(limiter._buckets), {"a", "b", "c"})
        clock.advance(5)
        for key in "defg":
            limiter.acquire(key)  # the table past twice what the last pass left: a pass
        self.assertEqual(set(limiter._buckets), {"d", "e", "f", "g"})


class ValidationTests(SynchronousTestCase):
    """Limits that could never grant a request, or would wait a negative time, are refused."""

    def test_rate_limiter_arguments(self) -> None:
        """rate must be > 0 and burst >= 1; sleep_after and sleep_seconds >= 0, each alone."""
        clock = Clock()
        for rate, burst in [(0, 1), (-1, 1), (-0.5, 1), (1, 0), (1, -1), (0, 0)]:
            with self.assertRaises(ValueError):
                RateLimiter(clock, rate, burst, what="requests")
        for sleep_after, sleep_seconds in [(-1, 0.0), (None, -0.5), (1, -0.5), (-1, 1.0)]:
            with self.assertRaises(ValueError):
                RateLimiter(
                    clock,
                    1.0,
                    1,
                    what="requests",
                    sleep_after=sleep_after,
                    sleep_seconds=sleep_seconds,
                )
        limiter = RateLimiter(clock, 0.001, 1, what="requests", sleep_after=0, sleep_seconds=0.0)
        self.assertEqual(limiter.acquire("origin"), 0.0)

    def test_concurrency_limiter_argument(self) -> None:
        """limit must be >= 1."""
        for limit in (0, -1):
            with self.assertRaises(ValueError):
                ConcurrencyLimiter(limit, what="requests")
        limiter = ConcurrencyLimiter(1, what="requests")
        limiter.acquire("origin")
        self.assertEqual(limiter.active("origin"), 1)


class ConcurrencyTests(SynchronousTestCase):
    """``ConcurrencyLimiter``: requests of one key in progress at once."""

    def test_release_frees_one_slot_and_forgets_an_idle_key(self) -> None:
        """With several requests in progress, a release frees one slot only (the others still
        count against the limit); past the limit, 429 M_LIMIT_EXCEEDED with retry_after_ms
        1000; once none is in progress the key is forgotten (no entry left per origin seen)."""
        limiter = ConcurrencyLimiter(2, what="requests")
        limiter.acquire("origin")
        limiter.acquire("origin")
        limiter.release("origin")
        self.assertEqual(limiter.active("origin"), 1)
        limiter.acquire("origin")
        with self.assertRaises(MatrixError) as caught:
            limiter.acquire("origin")
        self.assertEqual(
            (
                caught.exception.http_status,
                caught.exception.errcode,
                caught.exception.extra["retry_after_ms"],
            ),
            (429, "M_LIMIT_EXCEEDED", 1000),
        )
        self.assertEqual(limiter.active("origin"), 2)
        limiter.release("origin")
        limiter.release("origin")
        self.assertEqual((limiter.active("origin"), limiter._active), (0, {}))


class RefundTests(SynchronousTestCase):
    """``refund``: a token given back for a request that cost nothing."""

    def test_refund_gives_one_token_back(self) -> None:
        clock = Clock()
        limiter = RateLimiter(clock, 0.001, 2, what="invites for this user")
        limiter.acquire("@bob:example.org")
        limiter.acquire("@bob:example.org")
        limiter.refund("@bob:example.org")
        limiter.acquire("@bob:example.org")
        with self.assertRaises(MatrixError) as caught:
            limiter.acquire("@bob:example.org")
        self.assertEqual(
            (caught.exception.http_status, caught.exception.errcode), (429, "M_LIMIT_EXCEEDED")
        )

    def test_refund_is_capped_at_the_burst(self) -> None:
        """Refunds beyond what was taken (or after the bucket refilled) add nothing."""
        clock = Clock()
        limiter = RateLimiter(clock, 1.0, 2, what="requests")
        limiter.acquire("origin")
        clock.advance(0.5)
        limiter.refund("origin")
        limiter.refund("origin")
        self.assertEqual(limiter._buckets, {})  # full again: forgotten
        for _ in range(2):
            limiter.acquire("origin")
        with self.assertRaises(MatrixError):
            limiter.acquire("origin")

    def test_refund_of_a_forgotten_key_is_harmless(self) -> None:
        """A key pruned meanwhile (or never seen) is not added back."""
        self.patch(ratelimit, "_PRUNE_ABOVE", 1)
        clock = Clock()
        limiter = RateLimiter(clock, 1.0, 1, what="requests")
        limiter.acquire("a")
        clock.advance(5)
        limiter.acquire("b")  # a pass: "a" has refilled and is forgotten
        self.assertNotIn("a", limiter._buckets)
        limiter.refund("a")
        limiter.refund("never")
        self.assertEqual(set(limiter._buckets), {"b"})
