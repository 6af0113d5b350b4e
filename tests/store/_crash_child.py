"""A worker that stores one invite, says so, and dies by SIGKILL without closing.

Run as ``python -m tests.store._crash_child URI EVENT_ID`` by the durability
test: whatever it acknowledged must be found by the next process.
"""

from __future__ import annotations

import os
import signal
import sys

from twisted.internet import defer, task

from federation_invite.store import open_store
from tests.store._support import make_invite


async def _main(reactor: object, uri: str, event_id: str) -> None:
    store = await open_store(uri, reactor=reactor)  # type: ignore[arg-type]
    _, created = await store.store_invite(make_invite(event_id))
    print(f"acknowledged {event_id} created={created}", flush=True)
    # No close(), no reactor shutdown, no atexit: the process just stops.
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(_main(reactor, *sys.argv[1:3])))
