"""The two servers of the interop suite: a real Synapse and our daemon, as subprocesses.

Both listen on loopback only, federation over TLS with self-signed certificates
made here. Each server is started once, on first use, and shared by the test
classes that ask for it; every process is stopped at exit (SIGTERM, then
SIGKILL) and is also killed by the kernel if this process dies first
(``PR_SET_PDEATHSIG``), so no server outlives the run.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import attrs
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from signedjson.key import generate_signing_key, write_signing_keys
from twisted.internet import reactor, ssl
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from federation_invite.core.keys import decode_verify_key
from federation_invite.core.signing import ServerVerifyKey, verify_json

#: Set by ``.ci/interop``: without it the interop suite skips itself, so that
#: the unit test command never starts Synapse.
ENABLE_VARIABLE = "FEDERATION_INVITE_INTEROP"
#: The Python of the virtualenv holding the pinned Synapse.
SYNAPSE_PYTHON_VARIABLE = "FEDERATION_INVITE_SYNAPSE_PYTHON"
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_SYNAPSE_PYTHON = os.path.join(CHECKOUT, ".interop-venv", "bin", "python")
#: Our console scripts, beside the Python running the tests.
BIN = os.path.dirname(sys.executable)

SKIP_UNLESS_ENABLED = (
    None
    if os.environ.get(ENABLE_VARIABLE)
    else f"interop suite: run .ci/interop (or set {ENABLE_VARIABLE}=1 with Synapse installed)"
)

STARTUP_SECONDS = 60.0
REQUEST_SECONDS = 60.0


def unavailable(reason: str) -> Exception:
    """Synapse cannot be had: the suite was asked for, so that is a loud failure, never a skip."""
    message = f"INTEROP: Synapse unavailable: {reason}"
    print(message, file=sys.stderr)
    return AssertionError(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- TLS: one self-signed certificate per server; the test client trusts exactly those.


#: Every certificate made here: the only ones the test client trusts.
TRUSTED_PEMS: list[bytes] = []


@attrs.frozen
class Certificate:
    key_path: str
    cert_path: str
    pem: bytes


def make_certificate(directory: str) -> Certificate:
    """A self-signed certificate for ``localhost`` and ``127.0.0.1``, valid for a day.

    Each one gets its own subject (the directory's name as the organisation): OpenSSL
    finds a trusted issuer by subject, so two roots named alike would shadow each other.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, os.path.basename(directory)),
            x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path = os.path.join(directory, "tls.key")
    cert_path = os.path.join(directory, "tls.crt")
    with open(key_path, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    with open(cert_path, "wb") as handle:
        handle.write(pem)
    TRUSTED_PEMS.append(pem)
    return Certificate(key_path, cert_path, pem)


@implementer(IPolicyForHTTPS)
class _TrustOnlyOurs:
    """Verify servers against the certificates made by ``make_certificate`` only."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        root = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(p) for p in TRUSTED_PEMS])
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=root)


def tls_agent() -> Agent:
    """An HTTPS agent trusting our test certificates (names checked), without connection reuse."""
    return Agent(
        reactor,
        contextFactory=_TrustOnlyOurs(),
        pool=HTTPConnectionPool(reactor, persistent=False),
    )


async def request_json(
    method: str,
    url: str,
    body: Any = None,
    *,
    token: str | None = None,
    agent: Agent | None = None,
    timeout: float = REQUEST_SECONDS,
) -> tuple[int, Any]:
    """One HTTP request with a JSON body; the status and the decoded answer (or its text)."""
    headers = {"Content-Type": ["application/json"]}
    if token is not None:
        headers["Authorization"] = [f"Bearer {token}"]
    kwargs: dict[str, Any] = {"headers": headers, "timeout": timeout}
    if agent is not None:
        kwargs["agent"] = agent
    else:
        kwargs["persistent"] = False
    if body is not None:
        kwargs["data"] = json.dumps(body).encode()
    response = await treq.request(method, url, **kwargs)
    content = await response.content()
    try:
        return response.code, json.loads(content)
    except ValueError:
        return response.code, content.decode("utf-8", "replace")


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


# -- processes


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGKILL this child when the test process dies, however it dies."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


_RUNNING: list[ManagedProcess] = []


class ManagedProcess:
    """A server subprocess with its log file, stopped at exit whatever happens."""

    def __init__(self, name: str, argv: list[str], cwd: str) -> None:
        self.name = name
        self.log_path = os.path.join(cwd, f"{name}.log")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        _RUNNING.append(self)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, size: int = 6000) -> str:
        with open(self.log_path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            return handle.read().decode("utf-8", "replace")

    def stop(self, grace: float = 15.0) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self in _RUNNING:
            _RUNNING.remove(self)


@atexit.register
def _stop_all() -> None:
    for process in list(_RUNNING):
        process.stop()


async def wait_until_up(process: ManagedProcess, url: str, agent: Agent | None = None) -> None:
    """Poll ``url`` until it answers 200; fail with the log if the process dies or it never does."""
    deadline = time.monotonic() + STARTUP_SECONDS
    last: object = None
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited at start:\n{process.log_tail()}")
        try:
            code, last = await request_json("GET", url, agent=agent, timeout=5)
            if code == 200:
                return
        except Exception as exc:
            last = exc
        await sleep(0.2)
    process.stop()
    raise RuntimeError(
        f"{process.name} not up after {STARTUP_SECONDS}s ({last!r}):\n{process.log_tail()}"
    )


async def fetch_server_keys(
    server_name: str, agent: Agent, now_ms: int
) -> dict[tuple[str, str], ServerVerifyKey]:
    """A server's published keys, from ``/_matrix/key/v2/server``, checked to be self-signed."""
    code, body = await request_json(
        "GET", f"https://{server_name}/_matrix/key/v2/server", agent=agent
    )
    if code != 200 or body.get("server_name") != server_name:
        raise AssertionError(f"keys of {server_name}: {code} {body!r}")
    keys = {
        (server_name, key_id): ServerVerifyKey(
            server_name,
            key_id,
            decode_verify_key(key_id, entry["key"]),
            body["valid_until_ts"],
        )
        for key_id, entry in body["verify_keys"].items()
    }
    for key in keys.values():
        # server-server-api, "Publishing Keys": signed by each of its verify keys.
        verify_json(body, server_name, key)
    if body["valid_until_ts"] <= now_ms:
        raise AssertionError(f"keys of {server_name} already expired: {body!r}")
    return keys


# -- Synapse


@attrs.frozen
class SynapseUser:
    user_id: str
    token: str


def _relaxed(per_second: float = 1000.0, burst_count: int = 10000) -> dict[str, Any]:
    return {"per_second": per_second, "burst_count": burst_count}


class SynapseServer:
    """A loopback Synapse: SQLite, TLS federation listener, plain HTTP client listener."""

    def __init__(self, directory: str, python: str) -> None:
        self.directory = directory
        self.python = python
        self.federation_port = free_port()
        self.client_port = free_port()
        self.server_name = f"localhost:{self.federation_port}"
        self.client_url = f"http://127.0.0.1:{self.client_port}"
        self.certificate = make_certificate(directory)
        self.shared_secret = secrets.token_hex(16)
        self.process: ManagedProcess | None = None
        self.version = ""
        self._users: dict[str, SynapseUser] = {}

    def config(self) -> dict[str, Any]:
        """homeserver.yaml, written as JSON (YAML's subset); option names of Synapse 1.163."""
        d = self.directory
        return {
            "server_name": self.server_name,
            "pid_file": os.path.join(d, "homeserver.pid"),
            "listeners": [
                {
                    "port": self.federation_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": True,
                    "x_forwarded": False,
                    "resources": [{"names": ["federation", "keys"], "compress": False}],
                },
                {
                    "port": self.client_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                },
            ],
            "tls_certificate_path": self.certificate.cert_path,
            "tls_private_key_path": self.certificate.key_path,
            "database": {
                "name": "sqlite3",
                "args": {"database": os.path.join(d, "homeserver.db")},
            },
            "media_store_path": os.path.join(d, "media_store"),
            "signing_key_path": os.path.join(d, "signing.key"),
            "registration_shared_secret": self.shared_secret,
            "macaroon_secret_key": secrets.token_hex(16),
            "form_secret": secrets.token_hex(16),
            "report_stats": False,
            "enable_metrics": False,
            "url_preview_enabled": False,
            "presence": {"enabled": False},
            # Keys come from the servers themselves; loopback only, for the test only.
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "federation_verify_certificates": False,
            "ip_range_whitelist": ["127.0.0.1"],
            # Tests invite in bursts: no throttling anywhere.
            "rc_message": _relaxed(),
            "rc_registration": _relaxed(),
            "rc_room_creation": _relaxed(),
            "rc_login": {
                "address": _relaxed(),
                "account": _relaxed(),
                "failed_attempts": _relaxed(),
            },
            "rc_joins": {"local": _relaxed(), "remote": _relaxed()},
            "rc_joins_per_room": _relaxed(),
            "rc_invites": {
                "per_room": _relaxed(),
                "per_user": _relaxed(),
                "per_issuer": _relaxed(),
            },
            "rc_federation": {
                "window_size": 1000,
                "sleep_limit": 1000,
                "sleep_delay": 1,
                "reject_limit": 1000,
                "concurrent": 100,
            },
        }

    async def start(self) -> None:
        if not os.path.exists(self.python):
            raise unavailable(
                f"no Python at {self.python} (run .ci/interop, or set {SYNAPSE_PYTHON_VARIABLE})"
            )
        result = subprocess.run(
            [
                self.python,
                "-c",
                "import synapse, importlib.metadata as m; print(m.version('matrix-synapse'))",
            ],
            capture_output=True,
            cwd=self.directory,
        )
        if result.returncode != 0:
            raise unavailable(f"{self.python} cannot import synapse: {result.stderr.decode()}")
        self.version = result.stdout.decode().strip()
        with open(os.path.join(self.directory, "signing.key"), "w") as handle:
            write_signing_keys(handle, [generate_signing_key("a_" + secrets.token_hex(2))])
        config_path = os.path.join(self.directory, "homeserver.yaml")
        with open(config_path, "w") as handle:
            json.dump(self.config(), handle, indent=2)
        self.process = ManagedProcess(
            "synapse",
            [self.python, "-m", "synapse.app.homeserver", "-c", config_path],
            self.directory,
        )
        try:
            await wait_until_up(self.process, f"{self.client_url}/health")
        except RuntimeError as exc:
            raise unavailable(str(exc)) from None

    def log_tail(self) -> str:
        return self.process.log_tail() if self.process is not None else ""

    async def client(
        self, method: str, path: str, user: SynapseUser | None = None, body: Any = None
    ) -> tuple[int, Any]:
        return await request_json(
            method,
            self.client_url + path,
            body,
            token=user.token if user is not None else None,
        )

    async def register(self, localpart: str) -> SynapseUser:
        """A user made through the shared-secret admin API (``/_synapse/admin/v1/register``)."""
        code, body = await self.client("GET", "/_synapse/admin/v1/register")
        if code != 200:
            raise AssertionError(f"register nonce: {code} {body!r}")
        password = secrets.token_hex(8)
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([body["nonce"].encode(), localpart.encode(), password.encode()]))
        mac.update(b"\x00notadmin")
        code, answer = await self.client(
            "POST",
            "/_synapse/admin/v1/register",
            body={
                "nonce": body["nonce"],
                "username": localpart,
                "password": password,
                "admin": False,
                "mac": mac.hexdigest(),
            },
        )
        if code != 200:
            raise AssertionError(f"register {localpart}: {code} {answer!r}")
        return SynapseUser(answer["user_id"], answer["access_token"])

    async def user(self, localpart: str) -> SynapseUser:
        """The Synapse user ``localpart``, registered on first use."""
        if localpart not in self._users:
            self._users[localpart] = await self.register(localpart)
        return self._users[localpart]

    async def room_versions(self, user: SynapseUser) -> set[str]:
        """The room versions this Synapse can create, from the client capabilities."""
        code, body = await self.client("GET", "/_matrix/client/v3/capabilities", user)
        if code != 200:
            raise AssertionError(f"capabilities: {code} {body!r}")
        return set(body["capabilities"]["m.room_versions"]["available"])

    async def create_room(self, user: SynapseUser, room_version: str) -> str:
        code, body = await self.client(
            "POST",
            "/_matrix/client/v3/createRoom",
            user,
            {"room_version": room_version, "preset": "private_chat"},
        )
        if code != 200:
            raise AssertionError(f"createRoom v{room_version}: {code} {body!r}")
        room_id: str = body["room_id"]
        return room_id

    async def invite(self, user: SynapseUser, room_id: str, invitee: str) -> tuple[int, Any]:
        return await self.client(
            "POST",
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/invite",
            user,
            {"user_id": invitee},
        )

    async def member_state(self, user: SynapseUser, room_id: str, member: str) -> Any:
        """The room's ``m.room.member`` state event for ``member``, as Synapse's client sees it, or None."""
        code, body = await self.client(
            "GET", f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state", user
        )
        if code != 200:
            raise AssertionError(f"room state of {room_id}: {code} {body!r}")
        for event in body:
            if event["type"] == "m.room.member" and event["state_key"] == member:
                return event
        return None

    async def sync_token(self, user: SynapseUser) -> str:
        """A ``next_batch`` to sync from: what ``user`` has seen so far."""
        code, body = await self.client("GET", "/_matrix/client/v3/sync?timeout=0", user)
        if code != 200:
            raise AssertionError(f"sync: {code} {body!r}")
        token: str = body["next_batch"]
        return token

    async def sync_invite(
        self, user: SynapseUser, since: str, room_id: str, seconds: float = 20.0
    ) -> Any:
        """The room's entry in ``rooms.invite`` of ``user``'s incremental ``/sync``; None if it never comes.

        Incremental (from ``since``, long-polling): Synapse caches an initial sync's
        answer for a while, so repeating one would not show a new invite.
        """
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            code, body = await self.client(
                "GET", f"/_matrix/client/v3/sync?timeout=2000&since={quote(since)}", user
            )
            if code != 200:
                raise AssertionError(f"sync: {code} {body!r}")
            invite = body.get("rooms", {}).get("invite", {}).get(room_id)
            if invite is not None:
                return invite
            since = body["next_batch"]
        return None


# -- our daemon


class Daemon:
    """``twistd -n federation-invite -c config.toml`` on a loopback TLS port, as a user runs it."""

    def __init__(self, directory: str, settings: Mapping[str, Mapping[str, Any]]) -> None:
        self.directory = directory
        self.port = free_port()
        self.server_name = f"localhost:{self.port}"
        self.certificate = make_certificate(directory)
        self.config_path = os.path.join(directory, "config.toml")
        cert = self.certificate
        lines = [
            f"server_name = {json.dumps(self.server_name)}",
            f"data_dir = {json.dumps(os.path.join(directory, 'data'))}",
            "listen = ["
            + json.dumps(
                f"ssl:{self.port}:interface=127.0.0.1"
                f":privateKey={cert.key_path}:certKey={cert.cert_path}"
            )
            + "]",
        ]
        for section, values in settings.items():
            lines.append(f"[{section}]")
            # JSON scalars and arrays of strings are TOML too.
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        with open(self.config_path, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        self.process: ManagedProcess | None = None

    async def start(self, agent: Agent) -> None:
        self.process = ManagedProcess(
            "daemon",
            [
                os.path.join(BIN, "twistd"),
                "-n",
                "--pidfile=",
                "federation-invite",
                "-c",
                self.config_path,
            ],
            self.directory,
        )
        await wait_until_up(
            self.process, f"https://{self.server_name}/_matrix/federation/v1/version", agent
        )

    def log_tail(self) -> str:
        return self.process.log_tail() if self.process is not None else ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``federation-invite ARGS -c config.toml``; blocking (the servers are other processes)."""
        return subprocess.run(
            [os.path.join(BIN, "federation-invite"), *args, "-c", self.config_path],
            capture_output=True,
            text=True,
            cwd=self.directory,
            timeout=REQUEST_SECONDS * 2,
        )

    def cli_ok(self, *args: str) -> str:
        result = self.cli(*args)
        if result.returncode != 0:
            raise AssertionError(
                f"federation-invite {' '.join(args)}: exit {result.returncode}\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result.stdout

    def invites(self, room_id: str) -> list[dict[str, Any]]:
        """What our store holds for the room, through ``invites list --json``."""
        records: list[dict[str, Any]] = json.loads(
            self.cli_ok("invites", "list", "--room", room_id, "--json")
        )
        return records


# -- sharing: each server starts once, on first use, and stops at exit.

_WORKDIR: str | None = None
_SYNAPSE: SynapseServer | None = None
_SYNAPSE_FAILURE: Exception | None = None
_DAEMONS: dict[str, Daemon] = {}
_DAEMON_FAILURES: dict[str, Exception] = {}


def _workdir(name: str) -> str:
    global _WORKDIR
    if _WORKDIR is None:
        # trial runs in _trial_temp: the logs stay there after the run.
        _WORKDIR = os.path.abspath("interop-servers")
    path = os.path.join(_WORKDIR, name)
    os.makedirs(path, exist_ok=True)
    return path


async def shared_synapse() -> SynapseServer:
    """The one Synapse of the run; a start that failed fails (or skips) every later test at once."""
    global _SYNAPSE, _SYNAPSE_FAILURE
    if _SYNAPSE_FAILURE is not None:
        raise _SYNAPSE_FAILURE
    if _SYNAPSE is None:
        python = os.environ.get(SYNAPSE_PYTHON_VARIABLE) or DEFAULT_SYNAPSE_PYTHON
        server = SynapseServer(_workdir("synapse"), python)
        started = time.monotonic()
        try:
            await server.start()
        except Exception as exc:
            _SYNAPSE_FAILURE = exc
            raise
        print(
            f"INTEROP: Synapse {server.version} ({server.server_name}) up in "
            f"{time.monotonic() - started:.1f}s",
            file=sys.stderr,
        )
        _SYNAPSE = server
    return _SYNAPSE


async def shared_daemon(
    name: str,
    agent: Agent,
    settings: Mapping[str, Mapping[str, Any]],
    local_users: tuple[str, ...] = (),
) -> Daemon:
    """Our daemon called ``name``, configured with ``settings``, its local users added."""
    if name in _DAEMON_FAILURES:
        raise _DAEMON_FAILURES[name]
    daemon = _DAEMONS.get(name)
    if daemon is None:
        daemon = Daemon(_workdir(name), settings)
        try:
            for localpart in local_users:
                daemon.cli_ok("users", "add", f"@{localpart}:{daemon.server_name}")
            await daemon.start(agent)
        except Exception as exc:
            _DAEMON_FAILURES[name] = exc
            raise
        _DAEMONS[name] = daemon
    return daemon
