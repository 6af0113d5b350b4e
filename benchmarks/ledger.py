"""What each part of the daemon's invite path costs: the in-process daemon with one part at a time taken out.

Runs ``inproc.py``'s daemon site (no TLS, no sockets) once as it is and once
with each part replaced by its cheapest stand-in (the same answer, none of
the work), alternating, and prints the CPU each part costs per request: the
difference of the medians. The parts together are not the whole daemon's
cost beyond the calibration: what is left is routing, parsing and the
Deferred plumbing around them.

    python benchmarks/ledger.py [N] [--rounds R] [--parts log,store,...]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from benchlib import build_invite, make_origin_key
from inproc import (
    CONNECTIONS,
    ORIGIN,
    SERVER_NAME,
    calibration_site,
    daemon_site,
    drive,
    raw_request,
    react_to,
)
from signedjson.key import generate_signing_key
from twisted.internet.defer import Deferred, succeed
from twisted.logger import globalLogBeginner, textFileLogObserver

from federation_invite import inbound


@contextmanager
def patched(target: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


def knockouts(handler: Any, store: Any) -> dict[str, Callable[[], Any]]:
    """Each part's stand-in, as a context manager factory."""
    return {
        "log line": lambda: patched(inbound, "_log_outcome", lambda *a, **k: None),
        "store": lambda: patched(store, "store_invite", lambda record: succeed((record, True))),
        "event format": lambda: patched(inbound, "check_event_format", lambda *a, **k: None),
        "policy": lambda: patched(handler, "_policy", _Policy()),
        "metrics": lambda: patched(handler, "_metrics", _Metrics()),
        "rate limits": lambda: _together(
            patched(handler._origin_rate, "acquire", lambda key: 0.0),
            patched(handler._invitee_rate, "acquire", lambda key: 0.0),
        ),
        "room state": lambda: patched(
            handler, "_check_room_state", lambda *a: succeed(inbound._ROOM_STATE_OK)
        ),
        "membership": lambda: patched(
            handler, "_check_membership", lambda event, origin: event["state_key"]
        ),
    }


class _Policy:
    def check(self, invite: Any) -> Deferred[str]:
        return succeed("pending")


class _Metrics:
    def inbound(self, *args: Any) -> None:
        pass


def _together(*managers: Any) -> ExitStack:
    stack = ExitStack()
    for manager in managers:
        stack.enter_context(manager)
    return stack


def find_handler() -> Any:
    """The daemon site's one ``InviteHandler``."""
    (handler,) = (o for o in gc.get_objects() if isinstance(o, inbound.InviteHandler))
    return handler


async def main(args: argparse.Namespace) -> None:
    origin_key = make_origin_key()
    our_key = generate_signing_key("us")
    warm_count = CONNECTIONS * 10 + 2 * args.invitees
    with tempfile.TemporaryDirectory() as work:
        log_file = open(f"{work}/daemon.log", "w")
        globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
        daemon, store = await daemon_site(work, our_key, origin_key, args.invitees)
        calibration = calibration_site(our_key, origin_key)
        handler = find_handler()
        parts = knockouts(handler, store)
        chosen = args.parts or list(parts)
        # Each pass has fresh invites: one chunk for every pass of every round.
        passes = args.rounds * (2 + 2 * len(chosen))
        total = warm_count + passes * args.count
        invites = (
            raw_request(*build_invite(origin_key, ORIGIN, SERVER_NAME, index, args.invitees))
            for index in range(total)
        )
        requests = [next(invites) for _ in range(warm_count)]
        await drive(daemon, requests)
        await drive(calibration, requests[: CONNECTIONS * 10])
        gc.freeze()
        chunks = iter(lambda: [next(invites) for _ in range(args.count)], None)
        base: list[float] = []
        calib: list[float] = []
        without: dict[str, list[float]] = {name: [] for name in chosen}
        for _ in range(args.rounds):
            for name in chosen:
                cpu, _main, statuses = await drive(daemon, next(chunks))
                base.append(cpu / args.count * 1e6)
                with parts[name]():
                    cpu, _main, statuses = await drive(daemon, next(chunks))
                if set(statuses) != {b"200"}:
                    print(f"without {name}: answers {statuses}", file=sys.stderr)
                without[name].append(cpu / args.count * 1e6)
            cpu, _main, _ = await drive(calibration, next(chunks))
            calib.append(cpu / args.count * 1e6)
        await store.close()
    whole = statistics.median(base)
    calibration_cpu = statistics.median(calib)
    print(f"daemon       {whole:6.1f} us of CPU per request (median of {len(base)} passes)")
    print(f"calibration  {calibration_cpu:6.1f} us; the daemon adds {whole - calibration_cpu:.1f}")
    for name in chosen:
        cost = whole - statistics.median(without[name])
        print(f"  {name:14} {cost:6.1f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("count", type=int, nargs="?", default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--invitees", type=int, default=1000)
    parser.add_argument("--parts", type=lambda text: text.split(","), default=None)
    parsed = parser.parse_args()
    react_to(main, parsed)
