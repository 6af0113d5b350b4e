"""What the per-server back-offs share: the federation client's, the keyring's, .well-known's."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import TypeVar

__all__ = ["doubling_wait", "is_failure_status", "make_room"]

_Entry = TypeVar("_Entry")

#: ``doubling_wait``'s cap on doublings: 2 ** 64 times the first wait.
_MAX_DOUBLINGS = 64


def is_failure_status(status: int) -> bool:
    """Whether a server's HTTP error answer counts as a failure that backs it off.

    A 5xx: the server (or its proxy) is in trouble. A 401: it will not accept our
    requests for a while. A 429: it is rate-limiting us, so we limit ourselves. Any
    other answer proves it up and answering. As Synapse's ``RetryDestinationLimiter``
    (synapse/util/retryutils.py).
    """
    return status >= 500 or status in (401, 429)


def doubling_wait(initial: float, maximum: float, failures: int) -> float:
    """The wait after ``failures`` (1 or more) consecutive failures: ``initial``, doubled per
    further failure, at most ``maximum``. The doublings are capped (at more than any
    maximum needs), so that no count of failures overflows a float."""
    return min(maximum, initial * 2.0 ** min(failures - 1, _MAX_DOUBLINGS))


def make_room(
    table: dict[str, _Entry],
    name: str,
    size: int,
    *,
    over: Callable[[_Entry], bool],
    ends: Callable[[_Entry], float],
) -> None:
    """Before ``name`` is added to ``table`` (server name -> back-off) of at most ``size``.

    A new name in a full table: forget the back-offs that are ``over``, then, if that
    is not enough, those that ``ends`` soonest, down to three quarters of ``size``.
    Names are attacker-chosen, and one failure gives the shortest wait, so a flood of
    fresh names displaces each other rather than the long back-offs of servers that
    kept failing. Amortised, O(log n) per name added.
    """
    if name in table or len(table) < size:
        return
    for stale in [key for key, entry in table.items() if over(entry)]:
        del table[stale]
    excess = len(table) - size * 3 // 4
    if excess > 0:
        for soonest in heapq.nsmallest(excess, table, key=lambda key: ends(table[key])):
            del table[soonest]
