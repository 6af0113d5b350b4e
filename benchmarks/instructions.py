"""Instructions per request, counted by valgrind: a figure that does not drift with the VM.

On a shared VM a server's CPU time per request moves by 10-20% between runs minutes
apart. The number of instructions it executes does not: ``valgrind --tool=callgrind``
counts them (user space, every thread) the same to within 0.1% from run to run, whatever
else the machine is doing. This runs the calibration, durable calibration and daemon
sites in-process (``inproc.py``'s stacks: no TLS, no sockets, the real reactor and
SQLite) under callgrind at two request counts, and prints the difference per request,
so start-up, imports and warm-up cancel out.

    python benchmarks/instructions.py                  # all three sites, 100 and 400 requests
    python benchmarks/instructions.py --sites daemon --counts 200,600

Needs ``valgrind`` (``apt-get install valgrind``). Each site takes about a minute. What it
cannot show: time spent in the kernel (SQLite's writes and fsyncs, socket I/O) and what an
instruction costs, which differs between libsodium's tight loops and the interpreter
(see "Instructions and time" in ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import compileall
import gc
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from signedjson.key import decode_signing_key_base64

HERE = os.path.dirname(os.path.abspath(__file__))
_ORIGIN_SEED = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE"  # 32 bytes of 0x01
_OUR_SEED = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI"  # 32 bytes of 0x02
SITES = ("calibration", "durable", "daemon")
WARM_UP = 128


def build(path: str, count: int, invitees: int) -> None:
    """Pre-build ``count`` distinct signed invites (raw HTTP requests) and the keys, pickled."""
    from benchlib import build_invite
    from inproc import ORIGIN, SERVER_NAME, raw_request

    # Fixed keys: the same requests, byte for byte lengths, from run to run.
    origin_key = decode_signing_key_base64("ed25519", "bench", _ORIGIN_SEED)
    requests = [
        raw_request(*build_invite(origin_key, ORIGIN, SERVER_NAME, index, invitees))
        for index in range(count)
    ]
    with open(path, "wb") as handle:
        pickle.dump(
            {
                "origin_seed": _ORIGIN_SEED,
                "our_seed": _OUR_SEED,
                "invitees": invitees,
                "requests": requests,
            },
            handle,
        )


def child(site_name: str, count: int, path: str, without: str = "") -> None:
    """Run in valgrind: warm a site up, then drive ``count`` requests through it
    (the daemon with the ``ledger.py`` parts named in ``without`` taken out)."""
    from contextlib import ExitStack

    import inproc
    import ledger
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from federation_invite.service import settle_gc

    with open(path, "rb") as handle:
        data = pickle.load(handle)
    origin_key = decode_signing_key_base64("ed25519", "bench", data["origin_seed"])
    our_key = decode_signing_key_base64("ed25519", "us", data["our_seed"])
    requests = data["requests"]

    async def main() -> None:
        with tempfile.TemporaryDirectory() as work:
            log_file = open(os.path.join(work, "site.log"), "w")
            globalLogBeginner.beginLoggingTo(
                [textFileLogObserver(log_file)], redirectStandardIO=False
            )
            store: Any = None
            if site_name == "daemon":
                site, store = await inproc.daemon_site(work, our_key, origin_key, data["invitees"])
            elif site_name == "durable":
                site, store = await inproc.durable_site(work, our_key, origin_key)
            else:
                site = inproc.calibration_site(our_key, origin_key)
            await inproc.drive(site, requests[:WARM_UP])
            # Found before the freeze: gc.get_objects() does not list frozen objects.
            parts = ledger.knockouts(ledger.find_handler(), store) if without else {}
            if site_name == "daemon":
                settle_gc()  # as the daemon does once it listens
            else:
                gc.freeze()
            with ExitStack() as stack:
                for name in filter(None, without.split(",")):
                    stack.enter_context(parts[name]())
                _, _, statuses = await inproc.drive(site, requests[WARM_UP : WARM_UP + count])
            if store is not None:
                await store.close()
            if set(statuses) != {b"200"}:
                raise SystemExit(f"{site_name}: answers {statuses}")

    react(lambda _: ensureDeferred(main()))


def count_instructions(
    site_name: str, count: int, path: str, without: str = ""
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            site_name,
            str(count),
            path,
            without,
        ],
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def collected(process: subprocess.Popen[str]) -> int:
    _, stderr = process.communicate()
    match = re.search(r"Collected : ([\d,]+)", stderr)
    if process.returncode != 0 or match is None:
        raise SystemExit(f"valgrind run failed:\n{stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default=",".join(SITES), type=lambda text: text.split(","))
    parser.add_argument("--counts", default="100,400", type=lambda text: text.split(","))
    parser.add_argument("--invitees", type=int, default=50)
    parser.add_argument(
        "--ledger",
        nargs="?",
        const="all",
        metavar="PARTS",
        help="also count the daemon with each ledger.py part taken out (all, or a comma list)",
    )
    parser.add_argument(
        "--child", nargs=4, metavar=("SITE", "COUNT", "FILE", "WITHOUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2], args.child[3])
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    low, high = sorted(int(text) for text in args.counts)
    # Byte-compile first: the two runs start at once, and a module compiled by one
    # while the other loads it from its .pyc would count in one run only.
    for package in ("federation_invite", "twisted", "treq", "nacl", "signedjson", "attr", "attrs"):
        module = __import__(package)
        compileall.compile_dir(os.path.dirname(module.__file__), quiet=1)
    compileall.compile_dir(HERE, quiet=1, maxlevels=0)
    per_request: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "requests.pickle")
        build(path, WARM_UP + high, args.invitees)

        def count(site_name: str, without: str = "") -> float:
            # The two counts at once, one per core.
            runs = [count_instructions(site_name, n, path, without) for n in (low, high)]
            low_total, high_total = (collected(run) for run in runs)
            return (high_total - low_total) / (high - low)

        for site_name in args.sites:
            per_request[site_name] = count(site_name)
            print(
                f"{site_name:12} {per_request[site_name] / 1e6:7.3f} M instructions per request",
                flush=True,
            )
        if args.ledger:
            import ledger

            names = (
                list(ledger.knockouts(None, None))
                if args.ledger == "all"
                else args.ledger.split(",")
            )
            whole = per_request.get("daemon") or count("daemon")
            print(f"the daemon's parts (instructions per request each costs; of {whole:,.0f}):")
            for name in names:
                print(f"  {name:14} {whole - count('daemon', name):9,.0f}", flush=True)
    for top, bottom in (
        ("daemon", "calibration"),
        ("daemon", "durable"),
        ("durable", "calibration"),
    ):
        if top in per_request and bottom in per_request:
            print(
                f"ratio {top} / {bottom} (instructions): {per_request[top] / per_request[bottom]:.3f}"
            )


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
