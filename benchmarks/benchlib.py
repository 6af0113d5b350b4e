"""Shared pieces of the benchmarks: invites, certificates, processes, CPU accounting, wrk.

Not part of the test run. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

from signedjson.key import generate_signing_key
from signedjson.types import SigningKey
from unpaddedbase64 import encode_base64

from federation_invite.core.canonical import encode_canonical_json
from federation_invite.core.events import compute_event_id
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
from federation_invite.core.signing import hash_and_sign_event
from federation_invite.core.xmatrix import sign_request
from federation_invite.tlscert import write_self_signed_certificate

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
ROOM_VERSION = KNOWN_ROOM_VERSIONS["10"]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def origin_key_seed(key: SigningKey) -> str:
    return encode_base64(key.encode())


def make_origin_key() -> SigningKey:
    key: SigningKey = generate_signing_key("bench")
    return key


def build_invite(
    key: SigningKey,
    origin: str,
    destination: str,
    index: int,
    invitees: int,
    *,
    room_state_entries: int = 0,
    pad_bytes: int = 0,
) -> tuple[str, str, bytes]:
    """One distinct, correctly signed v2 invite request: (path, Authorization, body)."""
    now_ms = int(time.time() * 1000)
    content: dict[str, Any] = {"membership": "invite", "displayname": f"User {index}"}
    if pad_bytes:
        content["pad"] = "x" * pad_bytes
    event = hash_and_sign_event(
        ROOM_VERSION,
        {
            "type": "m.room.member",
            "state_key": f"@u{index % invitees}:{destination}",
            "sender": f"@alice{index}:{origin}",
            "content": content,
            "room_id": f"!room{index}:{origin}",
            "origin_server_ts": now_ms,
            "depth": 10,
            "prev_events": ["$" + encode_base64(index.to_bytes(32, "big"), urlsafe=True)],
            "auth_events": ["$" + encode_base64((index + 1).to_bytes(32, "big"), urlsafe=True)],
            "origin": origin,
            "unsigned": {"age": 1},
        },
        origin,
        key,
    )
    state = [
        {
            "type": "m.room.member",
            "state_key": f"@m{i}:{origin}",
            "sender": f"@m{i}:{origin}",
            "content": {"membership": "join", "displayname": f"Member {i}"},
        }
        for i in range(room_state_entries)
    ]
    body = {"room_version": ROOM_VERSION.identifier, "event": event, "invite_room_state": state}
    event_id = compute_event_id(ROOM_VERSION, event)
    path = f"/_matrix/federation/v2/invite/{quote(event['room_id'], safe='')}/{quote(event_id, safe='')}"
    header = sign_request(key, origin, destination, "PUT", path, body)
    return path, header, encode_canonical_json(body)


def write_requests(path: str, requests: Sequence[tuple[str, str, bytes]]) -> None:
    """The request file the wrk script replays: path TAB header TAB body, one per line."""
    with open(path, "wb") as handle:
        for uri, header, body in requests:
            handle.write(uri.encode() + b"\t" + header.encode() + b"\t" + body + b"\n")


def make_certificate(directory: str) -> tuple[str, str]:
    key_path = os.path.join(directory, "tls.key")
    cert_path = os.path.join(directory, "tls.crt")
    if not os.path.exists(cert_path):
        write_self_signed_certificate("localhost", key_path, cert_path)
    return key_path, cert_path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def io_counts(pid: int) -> dict[str, int]:
    """The process's I/O counters (all its threads), from /proc: ``syscr`` and ``syscw``
    (read- and write-like system calls: reads, writes, sends, receives), ``wchar``
    (bytes handed to them to write). Unlike CPU time, counts do not drift with the VM."""
    counts: dict[str, int] = {}
    with open(f"/proc/{pid}/io") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            counts[name] = int(value)
    return counts


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


@contextmanager
def process(
    args: Sequence[str], *, cwd: str, log_name: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess, killed (by its PID) on exit."""
    log = open(os.path.join(cwd, log_name), "wb")
    proc = subprocess.Popen(list(args), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def start_wrk(
    port: int, requests_file: str, *, duration: float, connections: int, threads: int = 1
) -> subprocess.Popen[str]:
    """Start wrk replaying the request file over HTTPS keep-alive (see ``finish_wrk``)."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    script = os.path.join(HERE, "replay.lua")
    return subprocess.Popen(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "-s",
            script,
            f"https://127.0.0.1:{port}/",
            "--",
            requests_file,
            str(threads),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_wrk(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Wait for a wrk started by ``start_wrk``; parse what it reports."""
    output, errors = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{output}\n{errors}")
    report: dict[str, Any] = {"raw": output}
    match = re.search(r"^RESULT (.*)$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk gave no RESULT line:\n{output}\n{errors}")
    report.update(json.loads(match.group(1)))
    return report


def run_wrk(
    port: int, requests_file: str, *, duration: float, connections: int, threads: int = 1
) -> dict[str, Any]:
    """Replay the request file with wrk; parse what it reports, with wrk's own CPU."""
    before = os.times()
    report = finish_wrk(
        start_wrk(port, requests_file, duration=duration, connections=connections, threads=threads)
    )
    after = os.times()
    report["wrk_cpu"] = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return report


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


class RssSampler:
    """Samples a process's RSS every ``every`` seconds in a thread, while in a ``with``."""

    def __init__(self, pid: int, every: float) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = 0.0

    def _run(self) -> None:
        while True:
            try:
                self.samples.append((time.time() - self._started, rss_bytes(self.pid)))
            except OSError:
                return
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> RssSampler:
        self._started = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time() - self._started, rss_bytes(self.pid)))


def temp_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix)


#: The parts of a server's stack, by the shared object perf finds a sample in (``--where``).
WHERE_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernel", ("[kernel",)),
    ("interpreter", ("libpython", "python3")),
    ("libsodium", ("_sodium",)),
    ("SQLite", ("libsqlite3", "_sqlite3")),
    ("TLS", ("libssl", "libcrypto", "_cffi_backend", "_rust", "_openssl")),
    ("json C", ("_json",)),
    ("libc", ("libc.so", "libm.so", "ld-linux")),
)


def where_part(dso: str) -> str:
    """The part of ``WHERE_PARTS`` a shared object belongs to, or ``other``."""
    for part, prefixes in WHERE_PARTS:
        if any(dso.startswith(prefix) for prefix in prefixes):
            return part
    return "other"


class CpuWhere:
    """Samples processes with ``perf record -e cpu-clock`` while in a ``with``.

    ``shares()`` then says which fraction of their CPU time was spent in each
    part of the stack (``WHERE_PARTS``): the kernel (syscalls, the socket and
    file work they do), the interpreter, libsodium, SQLite, OpenSSL... Time, not
    instructions: what ``instructions.py`` cannot see (the kernel) and what it
    cannot weigh (an interpreter instruction against a libsodium one) is here.
    Sampling at 1999 Hz adds about 7% to the sampled processes' CPU (the
    calibration server: 344-347 us per request without, 368-370 us with).
    """

    def __init__(self, pids: Sequence[int], path: str) -> None:
        if shutil.which("perf") is None:
            raise SystemExit("--where needs perf: apt-get install linux-perf")
        self.pids = list(pids)
        self.path = path
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> CpuWhere:
        self._proc = subprocess.Popen(
            [
                *("perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-o", self.path),
                *("-p", ",".join(str(pid) for pid in self.pids)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.2)  # perf attaches to every thread of each process
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop recording (the caller reaps perf after its own CPU accounting)."""
        if self._proc is not None:
            self._proc.send_signal(2)  # SIGINT: perf writes its file and exits

    def shares(self) -> dict[str, float]:
        """Fraction of the sampled CPU time in each part (they sum to 1)."""
        if self._proc is not None:
            self._proc.wait()
        report = subprocess.run(
            ["perf", "report", "-i", self.path, "--stdio", "--sort", "dso", "-q"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        shares: dict[str, float] = {}
        for line in report.splitlines():
            match = re.match(r"\s*([\d.]+)%\s+(\S.*?)\s*$", line)
            if match:
                part = where_part(match.group(2))
                shares[part] = shares.get(part, 0.0) + float(match.group(1)) / 100
        total = sum(shares.values()) or 1.0
        return {part: share / total for part, share in shares.items()}
