"""Run the floor, the trivial responder, the calibration servers and the daemon in one go.

    python benchmarks/run.py [--duration 10] [--connections 32] [--invites 40000]
                             [--room-state 0] [--pad 0] [--only daemon]

Prints requests/s, latency percentiles, answers by status/errcode, CPU per request of each
server (from /proc), the load generator's own CPU, and the ratios the targets are stated in:
daemon CPU per invite / calibration CPU per request, and daemon / floor; also daemon /
durable calibration (the calibration's work plus the invite stored in SQLite and one log
line), which leaves only what validation, policy and routing cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import (
    BIN,
    HERE,
    WHERE_PARTS,
    CpuWhere,
    RssSampler,
    build_invite,
    cpu_seconds,
    cpu_split,
    finish_wrk,
    free_port,
    io_counts,
    machine_busy,
    make_certificate,
    make_origin_key,
    origin_key_seed,
    process,
    rss_bytes,
    run_wrk,
    start_wrk,
    temp_dir,
    wait_for_port,
    write_requests,
)
from floor import floor_microseconds
from signedjson.key import generate_signing_key

from federation_invite.core.canonical import encode_canonical_json

SERVERS = os.path.join(HERE, "servers.py")


def _build_chunk(
    args: tuple[str, str, str, int, int, int, int, int],
) -> list[tuple[str, str, bytes]]:
    from signedjson.key import decode_signing_key_base64

    seed, origin, destination, start, stop, invitees, room_state, pad = args
    key = decode_signing_key_base64("ed25519", "bench", seed)
    return [
        build_invite(
            key, origin, destination, i, invitees, room_state_entries=room_state, pad_bytes=pad
        )
        for i in range(start, stop)
    ]


def build_requests(
    seed: str, origin: str, destination: str, count: int, invitees: int, room_state: int, pad: int
) -> list[tuple[str, str, bytes]]:
    """Sign ``count`` distinct invites on every core."""
    chunk = max(1, count // (os.cpu_count() or 1) // 4)
    jobs = [
        (seed, origin, destination, start, min(count, start + chunk), invitees, room_state, pad)
        for start in range(0, count, chunk)
    ]
    with ProcessPoolExecutor() as pool:
        return [request for part in pool.map(_build_chunk, jobs) for request in part]


def measure(
    pid: int,
    port: int,
    requests_file: str,
    duration: float,
    connections: int,
    where: str | None = None,
) -> dict[str, Any]:
    sampler = CpuWhere([pid], where) if where else None
    cpu_before = cpu_seconds(pid)
    _, system_before = cpu_split(pid)
    io_before = io_counts(pid)
    with sampler or nullcontext():
        report = run_wrk(port, requests_file, duration=duration, connections=connections)
    report["server_cpu"] = cpu_seconds(pid) - cpu_before
    report["io"] = _io_per_request(io_before, io_counts(pid), report["requests"])
    _, system_after = cpu_split(pid)
    report["server_system_share"] = (system_after - system_before) / max(1e-9, report["server_cpu"])
    report["rss"] = rss_bytes(pid)
    ok = report["counts"].get("200", 0)
    report["ok"] = ok
    report["rate"] = report["requests"] / (report["duration_us"] / 1e6)
    report["cpu_per_request_us"] = report["server_cpu"] / max(1, report["requests"]) * 1e6
    report["wrk_cpu_per_request_us"] = report["wrk_cpu"] / max(1, report["requests"]) * 1e6
    if sampler is not None:
        report["where"] = _where(sampler, report["cpu_per_request_us"])
    return report


def _io_per_request(
    before: dict[str, int], after: dict[str, int], requests: int
) -> dict[str, float]:
    return {
        name: (after[name] - before[name]) / max(1, requests)
        for name in ("syscr", "syscw", "wchar")
    }


def _summed(counts: Sequence[dict[str, int]]) -> dict[str, int]:
    """Several processes' ``io_counts``, added up."""
    return {name: sum(each[name] for each in counts) for name in counts[0]}


def _where(sampler: CpuWhere, per_request_us: float) -> dict[str, float]:
    """Microseconds of CPU per request in each part of the stack (``--where``)."""
    return {part: share * per_request_us for part, share in sampler.shares().items()}


def with_database(uri: str, name: str) -> str:
    """``uri`` (``postgresql://user@host:port``, with or without a database and a
    query such as ``?sslmode=disable``) naming the database ``name`` instead."""
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name, fragment=""))


@contextmanager
def fresh_postgres(server: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on ``server`` (a ``postgresql://`` URI; a
    database named in it is ignored), dropped afterwards; yields its URI."""
    import psycopg2

    name = f"fi_bench_{os.getpid()}"
    admin = psycopg2.connect(with_database(server, "postgres"))
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
            cursor.execute(f"CREATE DATABASE {name}")
        try:
            yield with_database(server, name)
        finally:
            with admin.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        admin.close()


def postgres_pids(database: str) -> list[int]:
    """The PostgreSQL server processes working for ``database``: its backends and the
    shared background processes (WAL writer, checkpointer...)."""
    import psycopg2

    name = urllib.parse.urlsplit(database).path.lstrip("/")
    with (
        psycopg2.connect(with_database(database, "postgres")) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE (datname = %s AND pid <> pg_backend_pid())"
            " OR backend_type <> 'client backend'",
            (name,),
        )
        pids = [row[0] for row in cursor.fetchall()]
    connection.close()
    return pids


def _cpu_of(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass  # exited: its CPU is lost to the sum (backends live as long as the pool)
    return total


def measure_daemons(
    pids: Sequence[int],
    ports: Sequence[int],
    request_files: Sequence[str],
    duration: float,
    connections: int,
    *,
    rss_every: float = 0.0,
    postgres: Sequence[int] = (),
    where: str | None = None,
) -> dict[str, Any]:
    """One wrk per daemon (port), all at once; the aggregate and each process's CPU."""
    sampler = CpuWhere(pids, where) if where else None
    cpu_before = [cpu_seconds(pid) for pid in pids]
    io_before = [io_counts(pid) for pid in pids]
    system_before = sum(cpu_split(pid)[1] for pid in pids)
    postgres_before = _cpu_of(postgres)
    busy_before, total_before = machine_busy()
    children_before = os.times()
    with ExitStack() as stack:
        if sampler is not None:
            stack.enter_context(sampler)
        samplers = [
            stack.enter_context(RssSampler(pid, rss_every)) for pid in pids if rss_every > 0
        ]
        wrks = [
            start_wrk(port, path, duration=duration, connections=connections)
            for port, path in zip(ports, request_files, strict=True)
        ]
        parts = [finish_wrk(wrk) for wrk in wrks]
    children_after = os.times()
    busy_after, total_after = machine_busy()
    cpu_each = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
    report: dict[str, Any] = {"parts": parts, "daemon_cpu_each": cpu_each}
    report["io"] = _io_per_request(
        _summed(io_before),
        _summed([io_counts(pid) for pid in pids]),
        sum(part["requests"] for part in parts),
    )
    report["server_cpu"] = sum(cpu_each)
    report["server_system_share"] = (sum(cpu_split(pid)[1] for pid in pids) - system_before) / max(
        1e-9, report["server_cpu"]
    )
    report["postgres_cpu"] = _cpu_of(postgres) - postgres_before
    report["wrk_cpu"] = (children_after.children_user - children_before.children_user) + (
        children_after.children_system - children_before.children_system
    )
    report["machine_busy"] = (busy_after - busy_before) / max(1e-9, total_after - total_before)
    report["rss"] = rss_bytes(pids[0])
    report["rss_samples"] = [sampler.samples for sampler in samplers]
    report["requests"] = sum(part["requests"] for part in parts)
    report["duration_us"] = max(part["duration_us"] for part in parts)
    report["wall"] = report["duration_us"] / 1e6
    counts: dict[str, int] = {}
    for part in parts:
        for key, value in part["counts"].items():
            counts[key] = counts.get(key, 0) + value
    report["counts"] = counts
    report["wrapped"] = sum(part["wrapped"] for part in parts)
    # Percentiles of the slowest wrk (each wrk only knows its own histogram).
    for key in ("p50_us", "p90_us", "p99_us", "max_us"):
        report[key] = max(part[key] for part in parts)
    report["ok"] = counts.get("200", 0)
    report["rate"] = sum(part["requests"] / (part["duration_us"] / 1e6) for part in parts)
    report["cpu_per_request_us"] = report["server_cpu"] / max(1, report["requests"]) * 1e6
    report["wrk_cpu_per_request_us"] = report["wrk_cpu"] / max(1, report["requests"]) * 1e6
    if sampler is not None:
        report["where"] = _where(sampler, report["cpu_per_request_us"])
    return report


def show_rss(samples: list[tuple[float, int]], name: str) -> None:
    series = ", ".join(f"{t:.0f}s {rss / 2**20:.1f}" for t, rss in samples)
    print(f"{name} RSS (MiB) during the run: {series}")


def show(name: str, report: dict[str, Any]) -> None:
    print(
        f"{name:<12} {report['rate']:8.0f} req/s  p50 {report['p50_us'] / 1000:6.1f} ms  "
        f"p90 {report['p90_us'] / 1000:6.1f} ms  p99 {report['p99_us'] / 1000:6.1f} ms  "
        f"server CPU {report['cpu_per_request_us']:6.0f} us/req ({report['server_system_share']:.0%} sys)  "
        f"wrk CPU {report['wrk_cpu_per_request_us']:4.0f} us/req  "
        f"RSS {report['rss'] / 2**20:5.0f} MiB  answers {json.dumps(report['counts'], sort_keys=True)}"
        + (f"  (request file wrapped {report['wrapped']}x)" if report["wrapped"] else "")
    )
    if "io" in report:
        io = report["io"]
        print(
            f"{'':<12} system calls per request: {io['syscr']:.2f} reads, {io['syscw']:.2f} writes"
            f" ({io['wchar'] / 1024:.1f} KiB written)"
        )
    if "where" in report:
        print(f"{'':<12} where (us/req): {_parts_text(report['where'])}")


_PART_NAMES = [part for part, _ in WHERE_PARTS] + ["other"]


def _parts_text(parts: dict[str, float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    return ", ".join(f"{part} {parts.get(part, 0.0):{sign}.0f}" for part in _PART_NAMES)


def start_daemons(
    args: argparse.Namespace,
    stack: ExitStack,
    figures: dict[str, Any],
    work: str,
    database: str | None,
    server_name: str,
    daemon_port: int,
    key_path: str,
    cert_path: str,
    our_seed: str,
    requests: Sequence[tuple[str, str, bytes]],
    requests_file: str,
    warmup_file: str,
) -> tuple[list[Any], list[int], list[str], list[int]]:
    """Start ``args.workers`` daemons (one config but the port) and warm them up; their
    processes, ports, request files (one per daemon) and PostgreSQL server PIDs."""
    database = database or f"sqlite:///{work}/daemon.db"
    ports = [daemon_port] + [free_port() for _ in range(args.workers - 1)]
    with open(f"{work}/us.key", "w") as handle:
        handle.write(f"ed25519 us {our_seed}\n")
    os.chmod(f"{work}/us.key", 0o600)
    configs = []
    for index, port in enumerate(ports):
        config = os.path.join(work, f"daemon{index or ''}.toml")
        with open(config, "w") as handle:
            handle.write(
                f'server_name = "{server_name}"\ndata_dir = "{work}/data"\ndatabase = "{database}"\n'
                f'listen = ["ssl:{port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"]\n'
                f'signing_key = "{work}/us.key"\n'
                "[outbound]\nverify_tls = false\nip_allowlist = ['127.0.0.1/32']\n"
                "[ratelimit]\norigin_per_second = 1e9\norigin_burst = 1000000000\norigin_concurrent = 100000\n"
                "invitee_per_second = 1e9\ninvitee_burst = 1000000000\n"
            )
        configs.append(config)
    subprocess.run(
        [sys.executable, os.path.join(HERE, "seed_users.py"), configs[0], str(args.invitees)],
        check=True,
    )
    if args.workers == 1:
        request_files = [requests_file]
    else:
        request_files = []
        for index in range(args.workers):
            path = os.path.join(work, f"requests{index}.tsv")
            write_requests(path, requests[index :: args.workers])
            request_files.append(path)
    procs = []
    for index, config in enumerate(configs):
        procs.append(
            stack.enter_context(
                process(
                    [os.path.join(BIN, "twistd"), "-n", "--pidfile="]
                    + (["--logger", "nulllog.observer"] if args.no_log else [])
                    + (
                        [
                            "--profile",
                            os.path.abspath(args.cprofile),
                            "--profiler",
                            "cprofile",
                            "--savestats",
                        ]
                        if args.cprofile and index == 0
                        else []
                    )
                    + ["federation-invite", "-c", config],
                    cwd=work,
                    log_name=f"daemon{index or ''}.log",
                    env={
                        **os.environ,
                        "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    },
                )
            )
        )
    for port in ports:
        wait_for_port(port)
    for port in ports:
        warm = run_wrk(port, warmup_file, duration=2, connections=args.connections)
        if set(warm["counts"]) - {"200"}:
            print(f"warm-up answers: {warm['counts']}; see {work}/daemon*.log")
    figures["daemon_rss_after_warmup"] = rss_bytes(procs[0].pid)
    postgres = postgres_pids(database) if database.startswith("postgres") else []
    return procs, ports, request_files, postgres


def measure_started_daemons(
    args: argparse.Namespace,
    figures: dict[str, Any],
    work: str,
    started: tuple[list[Any], list[int], list[str], list[int]],
) -> None:
    """Measure the daemons ``start_daemons`` started (optionally under py-spy), show them."""
    procs, ports, request_files, postgres = started
    profiler = None
    if args.profile:
        profiler = subprocess.Popen(
            [
                "py-spy",
                "record",
                "-p",
                str(procs[0].pid),
                "-d",
                str(int(args.duration)),
                "-r",
                "250",
                "-f",
                "raw",
                "-o",
                os.path.abspath(args.profile),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    figures["daemon"] = measure_daemons(
        [proc.pid for proc in procs],
        ports,
        request_files,
        args.duration,
        args.connections // args.workers,
        rss_every=args.rss_every,
        postgres=postgres,
        where=os.path.join(work, "daemon.perf") if args.where else None,
    )
    if profiler is not None:
        profiler.wait()
    show("daemon" if args.workers == 1 else f"{args.workers} daemons", figures["daemon"])


def run_interleaved(
    args: argparse.Namespace,
    only: set[str],
    stack: ExitStack,
    figures: dict[str, Any],
    work: str,
    keys: tuple[str, ...],
    ports: dict[str, int],
    start_daemon: Any,
    requests: Sequence[tuple[str, str, bytes]],
    warmup_file: str,
) -> dict[str, Any]:
    """``--interleave``: the servers alive side by side, measured in alternating turns.

    Run one after the other for ``duration`` seconds each, the servers see the VM as it
    is at different times, and on a shared VM the CPU an instruction costs drifts by
    10-20% over a minute. Here each server is measured in ``SLICES`` turns of
    ``duration / SLICES`` seconds, the order of the servers reversed every other round,
    so the drift falls on all of them alike. Each round uses its own slice of the
    invites (the same slice for every server; each has its own database), so the
    daemon never sees a repeat. CPU per request is the servers' summed CPU over their
    summed requests.
    """
    turn = args.duration / args.interleave
    measured: dict[str, Any] = {}
    for name in ("calibration", "durable"):
        if name in only:
            extra = (os.path.join(work, "durable.db"),) if name == "durable" else ()
            argv = [sys.executable, SERVERS, name, str(ports[name]), *keys, *extra]
            proc = stack.enter_context(process(argv, cwd=work, log_name=f"{name}.log"))
            wait_for_port(ports[name])
            run_wrk(ports[name], warmup_file, duration=1, connections=args.connections)
            measured[name] = lambda path, pid=proc.pid, port=ports[name]: measure(
                pid, port, path, turn, args.connections
            )
    if "daemon" in only:
        procs, daemon_ports, _, _ = start_daemon()
        measured["daemon"] = lambda path: measure_daemons(
            [procs[0].pid], daemon_ports[:1], [path], turn, args.connections
        )
    totals = {name: {"cpu": 0.0, "requests": 0, "ok": 0, "wall": 0.0} for name in measured}
    worst_p99 = 0.0
    cycle_ratios: dict[str, list[float]] = {}
    size = len(requests) // args.interleave
    print(
        f"# interleaved: {args.interleave} turns of {turn:.1f} s each per server, {size} invites each"
    )
    for index in range(args.interleave):
        path = os.path.join(work, f"turn{index}.tsv")
        write_requests(path, requests[index * size : (index + 1) * size])
        names = list(measured) if index % 2 == 0 else list(reversed(measured))
        per_request: dict[str, float] = {}
        for name in names:
            report = measured[name](path)
            if report["wrapped"]:
                print(
                    f"# {name}: turn {index + 1} ran out of invites (wrapped); use more --invites"
                )
            total = totals[name]
            total["cpu"] += report["server_cpu"]
            total["requests"] += report["requests"]
            total["ok"] += report["ok"]
            total["wall"] += report["duration_us"] / 1e6
            if name == "daemon":
                worst_p99 = max(worst_p99, report["p99_us"] / 1000)
                if set(report["counts"]) - {"200"}:
                    print(f"# daemon answers in turn {index + 1}: {report['counts']}")
            per_request[name] = report["cpu_per_request_us"]
        shown = ", ".join(f"{name} {per_request[name]:.0f} us" for name in measured)
        ratios = []
        for top, bottom in (
            ("daemon", "calibration"),
            ("daemon", "durable"),
            ("durable", "calibration"),
        ):
            if top in per_request and bottom in per_request:
                ratio = per_request[top] / per_request[bottom]
                cycle_ratios.setdefault(f"{top}_over_{bottom}", []).append(ratio)
                ratios.append(f"{top}/{bottom} {ratio:.2f}")
        print(f"turn {index + 1:2}: {shown}; {', '.join(ratios)}")
    summary: dict[str, Any] = {}
    us = {name: total["cpu"] / max(1, total["requests"]) * 1e6 for name, total in totals.items()}
    for name, value in us.items():
        rate = totals[name]["requests"] / max(1e-9, totals[name]["wall"])
        print(f"{name:<12} {value:6.0f} us of CPU per request over all turns ({rate:.0f} req/s)")
        summary[f"{name}_us"] = value
    if "daemon" in totals:
        summary["daemon_rate"] = totals["daemon"]["ok"] / max(1e-9, totals["daemon"]["wall"])
        summary["daemon_p99_ms"] = worst_p99
        print(
            f"daemon accepted {totals['daemon']['ok']} of {totals['daemon']['requests']};"
            f" worst turn's p99 {worst_p99:.1f} ms (turns are short: read p99 from a plain run)"
        )
    for top, bottom, label in (
        ("daemon", "calibration", "  (target <= 1.25)"),
        ("daemon", "durable", ""),
        ("durable", "calibration", ""),
    ):
        if top in us and bottom in us:
            key = f"{top}_over_{bottom}"
            turns = sorted(cycle_ratios[key])
            summary[key] = us[top] / us[bottom]
            print(
                f"ratio {top} / {bottom} (summed over the turns): {us[top] / us[bottom]:.2f}{label}"
                f"  (turns {turns[0]:.2f}-{turns[-1]:.2f}, median {turns[len(turns) // 2]:.2f})"
            )
    if "floor_us" in figures and "daemon" in us:
        summary["floor_us"] = figures["floor_us"]
        summary["daemon_over_floor"] = us["daemon"] / figures["floor_us"]
        print(f"ratio daemon / floor: {summary['daemon_over_floor']:.2f}")
    print(f"# work directory (logs): {work}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--invites", type=int, default=40000, help="distinct signed invites to pre-build"
    )
    parser.add_argument("--invitees", type=int, default=1000)
    parser.add_argument(
        "--room-state", type=int, default=0, help="stripped invite_room_state entries"
    )
    parser.add_argument("--pad", type=int, default=0, help="bytes of padding in the event content")
    parser.add_argument(
        "--only",
        choices=["floor", "trivial", "calibration", "durable", "daemon"],
        action="append",
    )
    parser.add_argument(
        "--database", help="database URI for the daemon (default: SQLite in a temp dir)"
    )
    parser.add_argument(
        "--postgres",
        metavar="SERVER",
        help="run the daemon on a fresh PostgreSQL database created on SERVER"
        " (a postgresql:// URI; a database named in it is ignored) and dropped afterwards",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="daemon processes on as many ports, same config and database, one wrk each",
    )
    parser.add_argument(
        "--rss-every",
        type=float,
        default=0.0,
        help="sample the daemon's RSS every so many seconds during the run and print the series",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the whole run so many times (fresh servers each time) and print the"
        " median of each round's ratios, for a noisy machine",
    )
    parser.add_argument(
        "--cprofile",
        help="run the daemon's reactor thread under cProfile, stats saved to this file",
    )
    parser.add_argument(
        "--no-log",
        action="store_true",
        help="run the daemon with logging dropped (to measure its cost)",
    )
    parser.add_argument(
        "--profile",
        help="record the daemon with py-spy during the run into this folded-stacks file",
    )
    parser.add_argument(
        "--where",
        action="store_true",
        help="sample each server with perf (cpu-clock) during its run and print its CPU per"
        " request by part of the stack: kernel, interpreter, libsodium, SQLite, TLS...",
    )
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="SLICES",
        help="measure the calibration, durable calibration and daemon alive side by side, in"
        " SLICES turns of duration/SLICES seconds each, alternating, each turn on fresh"
        " invites; CPU per request from the sums (drift of the VM between turns cancels)",
    )
    args = parser.parse_args()
    only = set(args.only or ["floor", "trivial", "calibration", "durable", "daemon"])
    if args.interleave and (args.workers > 1 or args.where or args.profile or args.cprofile):
        parser.error("--interleave measures one daemon, without --where, --profile or --cprofile")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1 and not (args.database or args.postgres):
        parser.error("--workers > 1 needs a shared database: --postgres or --database")

    figures_by_round = []
    for round_number in range(args.rounds):
        if args.rounds > 1:
            print(f"# round {round_number + 1} of {args.rounds}")
        figures_by_round.append(run_once(args, only))
    if args.rounds > 1:
        summarise(figures_by_round)


def summarise(rounds: list[dict[str, Any]]) -> None:
    """Medians over the rounds: each ratio is taken within its round, then the median."""

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        middle = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[middle]
        return (ordered[middle - 1] + ordered[middle]) / 2

    print(f"# medians over {len(rounds)} rounds (each ratio within its own round)")
    for key, label in (
        ("daemon_us", "daemon CPU per accepted invite (us)"),
        ("calibration_us", "calibration CPU per request (us)"),
        ("durable_us", "durable calibration CPU per request (us)"),
        ("floor_us", "floor (us)"),
        ("daemon_rate", "daemon accepted invites/s"),
        ("daemon_p99_ms", "daemon p99 (ms)"),
        ("daemon_over_calibration", "ratio daemon / calibration (target <= 1.25)"),
        ("daemon_over_durable", "ratio daemon / durable calibration"),
        ("durable_over_calibration", "ratio durable / calibration"),
        ("daemon_over_floor", "ratio daemon / floor"),
    ):
        values = [figures[key] for figures in rounds if key in figures]
        if values:
            each = ", ".join(f"{value:.2f}" if value < 10 else f"{value:.0f}" for value in values)
            result = median(values)
            shown = f"{result:.2f}" if result < 10 else f"{result:.0f}"
            print(f"median {label}: {shown}  (rounds: {each})")


def run_once(args: argparse.Namespace, only: set[str]) -> dict[str, Any]:
    """One pass: floor, trivial, calibration, durable, daemon; the ratios of this pass."""
    summary: dict[str, Any] = {}
    work = temp_dir("fi-bench-")
    key_path, cert_path = make_certificate(work)
    origin_key = make_origin_key()
    origin_seed = origin_key_seed(origin_key)
    ours = generate_signing_key("us")
    our_seed = origin_key_seed(ours)
    origin_port, daemon_port, calibration_port, trivial_port, durable_port = (
        free_port() for _ in range(5)
    )
    origin = f"127.0.0.1:{origin_port}"
    server_name = f"localhost:{daemon_port}"
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(
        f"# {args.invites} invites, {args.connections} connections, {args.duration:.0f} s each, room state {args.room_state}, pad {args.pad} B"
    )

    started = time.time()
    requests = build_requests(
        origin_seed, origin, server_name, args.invites, args.invitees, args.room_state, args.pad
    )
    warmup = [
        build_invite(
            origin_key,
            origin,
            server_name,
            args.invites + i,
            args.invitees,
            room_state_entries=args.room_state,
            pad_bytes=args.pad,
        )
        # Every invitee at least once (up to 5,000 of them), as in a server's
        # steady state and as inproc.py does: the daemon's policy cache then
        # holds them. With more invitees than that, most measured invites are for
        # invitees not seen before, an invite storm's case.
        for i in range(max(200, min(args.invitees, 5000)))
    ]
    requests_file = os.path.join(work, "requests.tsv")
    warmup_file = os.path.join(work, "warmup.tsv")
    write_requests(requests_file, requests)
    write_requests(warmup_file, warmup)
    event_size = len(encode_canonical_json(json.loads(requests[0][2])["event"]))
    print(
        f"# built {len(requests)} signed invites in {time.time() - started:.1f} s ({os.path.getsize(requests_file) / 2**20:.0f} MiB);"
        f" each event {event_size} bytes of canonical JSON, body {len(requests[0][2])} bytes"
    )
    figures: dict[str, Any] = {}

    if "floor" in only:
        figures["floor_us"] = floor_microseconds(
            requests[:3000], server_name, ours, origin, origin_key
        )
        print(
            f"floor        {figures['floor_us']:.0f} us of CPU per invite (in-process, best of 3)"
        )

    with process(
        [
            sys.executable,
            SERVERS,
            "origin",
            str(origin_port),
            origin,
            origin_seed,
            cert_path,
            key_path,
        ],
        cwd=work,
        log_name="origin.log",
    ):
        wait_for_port(origin_port)

        def helper_server(name: str, port: int, *extra: str) -> None:
            """Start one of servers.py's servers, warm it up, measure it, show the figures."""
            argv = [sys.executable, SERVERS, name, str(port), *extra]
            with process(argv, cwd=work, log_name=f"{name}.log") as proc:
                wait_for_port(port)
                run_wrk(port, warmup_file, duration=1, connections=args.connections)
                figures[name] = measure(
                    proc.pid,
                    port,
                    requests_file,
                    args.duration,
                    args.connections,
                    where=os.path.join(work, f"{name}.perf") if args.where else None,
                )
                show(name, figures[name])

        keys = (server_name, our_seed, origin_seed, cert_path, key_path, str(origin_port))

        def start_daemons_in(
            stack: ExitStack, database: str | None
        ) -> tuple[list[Any], list[int], list[str], list[int]]:
            return start_daemons(
                args,
                stack,
                figures,
                work,
                database,
                server_name,
                daemon_port,
                key_path,
                cert_path,
                our_seed,
                requests,
                requests_file,
                warmup_file,
            )

        if args.interleave:
            with ExitStack() as stack:
                database = args.database
                if args.postgres:
                    database = stack.enter_context(fresh_postgres(args.postgres))
                return run_interleaved(
                    args,
                    only,
                    stack,
                    figures,
                    work,
                    keys,
                    {"calibration": calibration_port, "durable": durable_port},
                    lambda: start_daemons_in(stack, database),
                    requests,
                    warmup_file,
                )
        if "trivial" in only:
            helper_server("trivial", trivial_port, cert_path, key_path)
        if "calibration" in only:
            helper_server("calibration", calibration_port, *keys)
        if "durable" in only:
            helper_server("durable", durable_port, *keys, os.path.join(work, "durable.db"))
        if "daemon" in only:
            with ExitStack() as stack:
                database = args.database
                if args.postgres:
                    database = stack.enter_context(fresh_postgres(args.postgres))
                started = start_daemons_in(stack, database)
                measure_started_daemons(args, figures, work, started)

    daemon, calibration = figures.get("daemon"), figures.get("calibration")
    if daemon and daemon["ok"]:
        per_invite = daemon["server_cpu"] / daemon["ok"] * 1e6
        print(f"daemon CPU per accepted invite: {per_invite:.0f} us")
        summary["daemon_us"] = per_invite
        summary["daemon_rate"] = daemon["ok"] / daemon["wall"]
        summary["daemon_p99_ms"] = daemon["p99_us"] / 1000
        if calibration:
            summary["calibration_us"] = calibration["cpu_per_request_us"]
            summary["daemon_over_calibration"] = per_invite / calibration["cpu_per_request_us"]
            print(
                f"ratio daemon / calibration (CPU per request): {per_invite / calibration['cpu_per_request_us']:.2f}  (target <= 1.25)"
            )
        durable = figures.get("durable")
        if durable:
            summary["durable_us"] = durable["cpu_per_request_us"]
            summary["daemon_over_durable"] = per_invite / durable["cpu_per_request_us"]
            print(
                f"ratio daemon / durable calibration (which also stores and logs): {per_invite / durable['cpu_per_request_us']:.2f}"
            )
        if calibration and "where" in calibration:
            for name in ("durable", "daemon"):
                if name in figures and "where" in figures[name]:
                    beyond = {
                        part: figures[name]["where"].get(part, 0.0)
                        - calibration["where"].get(part, 0.0)
                        for part in _PART_NAMES
                    }
                    print(f"{name} beyond the calibration (us/req): {_parts_text(beyond, True)}")
        if "floor_us" in figures:
            summary["floor_us"] = figures["floor_us"]
            summary["daemon_over_floor"] = per_invite / figures["floor_us"]
            print(f"ratio daemon / floor: {per_invite / figures['floor_us']:.2f}")
        print(
            f"daemon RSS: {figures['daemon_rss_after_warmup'] / 2**20:.0f} MiB after warm-up, {daemon['rss'] / 2**20:.0f} MiB after the run"
        )
        for index, samples in enumerate(daemon["rss_samples"]):
            show_rss(samples, f"daemon {index}")
        wall = daemon["wall"]
        each = ", ".join(f"{cpu / wall:.2f}" for cpu in daemon["daemon_cpu_each"])
        print(
            f"cores used during the run: daemons {each}; wrk {daemon['wrk_cpu'] / wall:.2f};"
            + (f" PostgreSQL server {daemon['postgres_cpu'] / wall:.2f};" if args.postgres else "")
            + f" whole machine {daemon['machine_busy'] * (os.cpu_count() or 1):.2f}"
            f" of {os.cpu_count()}"
        )
        if args.postgres:
            print(
                f"PostgreSQL server CPU per accepted invite: {daemon['postgres_cpu'] / daemon['ok'] * 1e6:.0f} us"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    k: {kk: vv for kk, vv in v.items() if kk != "raw"} if isinstance(v, dict) else v
                    for k, v in figures.items()
                },
                handle,
                indent=2,
            )
    print(f"# work directory (logs): {work}")
    return summary


if __name__ == "__main__":
    main()
