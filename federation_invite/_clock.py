"""Time windows on the reactor's clock, which is wall time.

``reactor.seconds()`` is ``time.time()``: NTP or an operator can step it
backwards. A back-off, a cached answer or a time of last use recorded "after"
now has then run for an unknown time. Every such window here is judged by
``in_window``: recorded after now, it is over (the back-off lifted, the
answer stale), rather than kept for as long as the step.
"""

from __future__ import annotations

__all__ = ["in_window"]


def in_window(start: float, now: float, end: float) -> bool:
    """Whether ``now`` lies in ``[start, end)`` (see the module doc for why the start counts)."""
    return start <= now < end
