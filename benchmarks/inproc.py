"""The daemon's stack and the calibration server's, in one process, without TLS or sockets.

Pushes the same pre-built invites, as raw HTTP/1.1 bytes, through each site's
``HTTPChannel`` over an in-memory transport (32 keep-alive channels, one
request in flight on each) with the real reactor running, so that the
daemon's SQLite writes go through its thread pool as in production. Prints
CPU microseconds per request (``time.process_time``: every thread) for
the calibration site and the daemon's site, and their ratio. Without the
TLS and socket costs both servers pay, what is left of the ratio is the
daemon's own overhead, with less noise than the end-to-end run.

    python benchmarks/inproc.py [N] [--profile FILE]   # cProfile of the daemon pass
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from benchlib import build_invite, make_origin_key
from servers import Calibration, Durable
from signedjson.key import generate_signing_key
from signedjson.types import SigningKey
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.server import Site
from unpaddedbase64 import encode_base64

from federation_invite.config import load_config
from federation_invite.core.keys import key_id_of, verify_key_of
from federation_invite.core.signing import ServerVerifyKey
from federation_invite.service import build_components
from federation_invite.store import ServerKeyRecord, open_store
from federation_invite.web.site import FederationSite

reactor: Any = _reactor
SERVER_NAME = "localhost:8448"
ORIGIN = "127.0.0.1:9999"
CONNECTIONS = 32


def raw_request(path: str, header: str, body: bytes) -> bytes:
    return (
        f"PUT {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\nAuthorization: {header}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def drive(site: Site, requests: Sequence[bytes]) -> tuple[float, float, dict[bytes, int]]:
    """Send ``requests`` over CONNECTIONS channels; (CPU seconds: all threads, this thread;
    status counts)."""
    waiting: list[Deferred[None] | None] = [None]
    outstanding = [0]
    statuses: dict[bytes, int] = {}
    base = site.requestFactory

    class Counted(base):  # type: ignore[misc, valid-type]
        def finish(self) -> None:
            super().finish()
            statuses[str(self.code).encode()] = statuses.get(str(self.code).encode(), 0) + 1
            outstanding[0] -= 1
            if outstanding[0] == 0 and waiting[0] is not None:
                done, waiting[0] = waiting[0], None
                reactor.callLater(0, done.callback, None)

    site.requestFactory = Counted
    channels = []
    for index in range(CONNECTIONS):
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000 + index))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000 + index))
        channel.makeConnection(transport)
        channels.append((channel, transport))
    cpu = time.process_time()
    main_cpu = time.thread_time()
    wall = time.perf_counter()
    for start in range(0, len(requests), CONNECTIONS):
        batch = requests[start : start + CONNECTIONS]
        outstanding[0] = len(batch)
        waiting[0] = Deferred()
        finished = waiting[0]
        for (channel, transport), data in zip(channels, batch, strict=False):
            transport.clear()
            channel.dataReceived(data)
        if outstanding[0]:
            await finished
    cpu = time.process_time() - cpu
    main_cpu = time.thread_time() - main_cpu
    wall = time.perf_counter() - wall
    for channel, _ in channels:
        channel.connectionLost(None)
    site.requestFactory = base
    return cpu, main_cpu, statuses


async def daemon_site(work: str, our_key: SigningKey, origin_key: SigningKey, invitees: int) -> Any:
    config = load_config(
        None,
        {
            "server_name": SERVER_NAME,
            "data_dir": work,
            "database": f"sqlite:///{work}/daemon.db",
            "ratelimit.origin_per_second": 1e9,
            "ratelimit.origin_burst": 1_000_000_000,
            "ratelimit.origin_concurrent": 100_000,
            "ratelimit.invitee_per_second": 1e9,
            "ratelimit.invitee_burst": 1_000_000_000,
        },
    )
    store = await open_store(config.database, reactor=reactor)
    for index in range(invitees):
        await store.add_local_user(f"@u{index}:{SERVER_NAME}")
    now = int(time.time() * 1000)
    await store.store_server_keys(
        [
            ServerKeyRecord(
                server_name=ORIGIN,
                key_id=key_id_of(origin_key),
                verify_key=encode_base64(origin_key.verify_key.encode()),
                valid_until_ts=now + 86_400_000,
                expired_ts=None,
                fetched_ts=now,
                source="bench",
            )
        ]
    )
    components = build_components(config, reactor, store, our_key)
    site = FederationSite(components.site_root(), reactor=reactor)
    return site, store


def calibration_site(our_key: SigningKey, origin_key: SigningKey, store: Any = None) -> Site:
    """The calibration server's site, or with ``store`` the durable calibration's."""
    keys = {
        (ORIGIN, key_id_of(origin_key)): ServerVerifyKey(
            ORIGIN, key_id_of(origin_key), verify_key_of(origin_key), 2**53 - 1
        )
    }
    resource = (
        Calibration(SERVER_NAME, our_key, keys)
        if store is None
        else Durable(SERVER_NAME, our_key, keys, store)
    )
    site = Site(resource)
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


async def durable_site(work: str, our_key: SigningKey, origin_key: SigningKey) -> Any:
    """The durable calibration's site and its store (SQLite in ``work``)."""
    store = await open_store(f"sqlite:///{work}/durable.db", reactor=reactor)
    return calibration_site(our_key, origin_key, store), store


async def main(args: argparse.Namespace) -> None:
    origin_key = make_origin_key()
    our_key = generate_signing_key("us")
    # The daemon's warm-up covers every invitee (its policy cache) and the origin's key.
    warm_count = CONNECTIONS * 10 + 2 * args.invitees
    invites = [
        build_invite(origin_key, ORIGIN, SERVER_NAME, index, args.invitees)
        for index in range(args.count + warm_count)
    ]
    warm = [raw_request(*invite) for invite in invites[:warm_count]]
    measured = [raw_request(*invite) for invite in invites[warm_count:]]
    with tempfile.TemporaryDirectory() as work:
        log_file = open(os.path.join(work, "daemon.log"), "w")
        globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
        calibration = calibration_site(our_key, origin_key)
        durable, durable_store = await durable_site(work, our_key, origin_key)
        daemon, store = await daemon_site(work, our_key, origin_key, args.invitees)
        await drive(calibration, warm[: CONNECTIONS * 10])
        await drive(durable, warm[: CONNECTIONS * 10])
        await drive(daemon, warm[CONNECTIONS * 10 :])
        # As the daemon does once it listens (service.make_service's freeze_gc).
        gc.freeze()
        sites = tuple(
            (name, site)
            for name, site in (
                ("calibration", calibration),
                ("durable", durable),
                ("daemon", daemon),
            )
            if name in args.sites
        )
        results: dict[str, list[float]] = {name: [] for name, _ in sites}
        main: dict[str, list[float]] = {name: [] for name, _ in sites}
        profiler = cProfile.Profile() if args.profile else None
        size = len(measured) // (2 * args.rounds)
        # The durable calibration replays the calibration's invites (into its own database).
        chunks = iter(measured[i : i + size] for i in range(0, 2 * args.rounds * size, size))
        for _ in range(args.rounds):
            calibration_chunk: list[bytes] = []
            for name, site in sites:
                if name == "durable":
                    chunk = calibration_chunk
                else:
                    chunk = calibration_chunk = next(chunks)
                if profiler and name == args.profile_site:
                    profiler.enable()
                cpu, main_cpu, statuses = await drive(site, chunk)
                if profiler and name == args.profile_site:
                    profiler.disable()
                if set(statuses) != {b"200"}:
                    print(f"{name}: answers {statuses}; see the log", file=sys.stderr)
                results[name].append(cpu / len(chunk) * 1e6)
                main[name].append(main_cpu / len(chunk) * 1e6)
        await store.close()
        await durable_store.close()
        if profiler:
            profiler.dump_stats(args.profile)
    best = {name: min(values) for name, values in results.items()}
    for name, value in best.items():
        runs = ", ".join(f"{v:.0f}" for v in results[name])
        reactor_share = main[name][results[name].index(value)]
        print(
            f"{name:12} {value:6.0f} us of CPU per request, {reactor_share:.0f} us in the reactor"
            f" thread (best of {args.rounds}: {runs})"
        )
    for other in ("calibration", "durable"):
        if "daemon" in best and other in best:
            print(
                f"ratio daemon / {other} (no TLS, no sockets): {best['daemon'] / best[other]:.2f}"
            )


def react_to(main: Callable[[argparse.Namespace], Coroutine[Any, Any, None]], args: Any) -> None:
    """Run ``main(args)`` with the reactor running; print its traceback if it fails."""

    def run(_: Any) -> Deferred[None]:
        def show(failure: Any) -> Any:
            failure.printTraceback(file=sys.stderr)
            return failure

        return ensureDeferred(main(args)).addErrback(show)

    from twisted.internet.task import react

    react(run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("count", type=int, nargs="?", default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--invitees", type=int, default=1000)
    parser.add_argument("--profile", help="cProfile the daemon passes into this file")
    parser.add_argument(
        "--profile-site", default="daemon", choices=["calibration", "durable", "daemon"]
    )
    parser.add_argument(
        "--sites",
        default="calibration,durable,daemon",
        type=lambda text: text.split(","),
        help="which of calibration,durable,daemon to measure (default: all three)",
    )
    parsed = parser.parse_args()
    react_to(main, parsed)
