"""Rate limits: token buckets per key (origin, invitee) and a concurrency cap per key.

A refusal is a ``MatrixError`` 429 ``M_LIMIT_EXCEEDED`` with ``retry_after_ms``
(client-server API "Rate limiting"), which the web edge also turns into a
``Retry-After`` header.

A bucket may also *slow* a key before refusing it, the way Synapse's federation
rate limiter sleeps before it rejects: once more than ``sleep_after`` of the
burst is in use, ``acquire`` still grants the token but answers with a delay
the caller waits before doing the work. So a flood is first slowed, then
refused, and never queued without bound (each slowed request holds a token).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from .core.errors import Codes, MatrixError

__all__ = ["ConcurrencyLimiter", "RateLimiter"]

#: Above this many tracked keys, buckets that have refilled completely are
#: forgotten, so a flood of distinct keys cannot grow memory without bound.
#: After each such pass the next waits until the table has doubled past what
#: was left: with keys that refill slowly (an invitee's, 20 s by default) a pass
#: frees little, and one pass per acquire would cost milliseconds each.
_PRUNE_ABOVE = 10_000


class RateLimiter:
    """A token bucket per key: ``burst`` requests at once, refilled at ``rate`` per second.

    With ``sleep_after`` set and ``sleep_seconds`` > 0, a request that finds
    more than ``sleep_after`` tokens of the burst in use is granted but told to
    wait ``sleep_seconds`` first.
    """

    def __init__(
        self,
        clock: IReactorTime,
        rate: float,
        burst: int,
        *,
        what: str,
        sleep_after: int | None = None,
        sleep_seconds: float = 0.0,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        if sleep_seconds < 0 or (sleep_after is not None and sleep_after < 0):
            raise ValueError("sleep_after and sleep_seconds must be >= 0")
        self._clock = clock
        self._rate = rate
        self._burst = float(burst)
        self._what = what
        self._sleep_after = sleep_after
        self._sleep_seconds = sleep_seconds
        #: key -> (tokens, time of last update in seconds)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._prune_above = _PRUNE_ABOVE

    def _refill(self, tokens: float, then: float, now: float) -> float:
        # The clock is wall time, which can step backwards (NTP, an operator): a
        # step back counts as no time passed, not as a debt as long as the step.
        return min(self._burst, tokens + max(0.0, now - then) * self._rate)

    def _tokens(self, key: str, now: float) -> float:
        tokens, then = self._buckets.get(key, (self._burst, now))
        return self._refill(tokens, then, now)

    def acquire(self, key: str) -> float:
        """Take one token for ``key`` or raise 429 ``M_LIMIT_EXCEEDED``.

        Returns the seconds the caller should wait before serving the request:
        0.0, or ``sleep_seconds`` when the key is past its ``sleep_after``.
        """
        now = self._clock.seconds()
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            retry_after_ms = int((1.0 - tokens) / self._rate * 1000) + 1
            raise MatrixError(
                429,
                Codes.LIMIT_EXCEEDED,
                f"Too many {self._what}; retry later",
                retry_after_ms=retry_after_ms,
            )
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self._prune_above:
            self._prune(now)
            self._prune_above = max(_PRUNE_ABOVE, 2 * len(self._buckets))
        in_use = self._burst - (tokens - 1.0)
        if self._sleep_after is not None and self._sleep_seconds and in_use > self._sleep_after:
            return self._sleep_seconds
        return 0.0

    def refund(self, key: str) -> None:
        """Give back the token an ``acquire`` for ``key`` took, for a request that
        turned out to cost nothing (a repeat, or one that failed before doing its work).

        Capped at the burst; a key forgotten meanwhile (its bucket had refilled
        and was pruned) stays forgotten.
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            return
        now = self._clock.seconds()
        tokens = self._refill(bucket[0], bucket[1], now) + 1.0
        if tokens >= self._burst:
            del self._buckets[key]  # full: as if never used
        else:
            self._buckets[key] = (tokens, now)

    def _prune(self, now: float) -> None:
        for key, (tokens, then) in list(self._buckets.items()):
            if self._refill(tokens, then, now) >= self._burst:
                del self._buckets[key]
            elif then > now:
                # Last used before the clock stepped back: refill from now, as
                # acquire would, so the bucket is forgotten once it has refilled.
                self._buckets[key] = (tokens, now)


class ConcurrencyLimiter:
    """At most ``limit`` requests per key in progress; pair each ``acquire`` with ``release``."""

    def __init__(self, limit: int, *, what: str) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._limit = limit
        self._what = what
        self._active: dict[str, int] = {}

    def acquire(self, key: str) -> None:
        """Count one more request for ``key`` or raise 429 ``M_LIMIT_EXCEEDED``."""
        active = self._active.get(key, 0)
        if active >= self._limit:
            raise MatrixError(
                429,
                Codes.LIMIT_EXCEEDED,
                f"Too many concurrent {self._what}",
                retry_after_ms=1000,
            )
        self._active[key] = active + 1

    def release(self, key: str) -> None:
        active = self._active.get(key, 0) - 1
        if active > 0:
            self._active[key] = active
        else:
            self._active.pop(key, None)

    def active(self, key: str) -> int:
        return self._active.get(key, 0)
