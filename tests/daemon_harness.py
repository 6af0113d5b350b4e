"""Running the real daemon (``twistd -n federation-invite``) in tests, as a user would.

``DaemonHarness`` gives a test a temporary directory, a fake remote server
(TLS on loopback, in the test process) publishing its key, a config file for
the daemon, and the means to start it, stop it (SIGTERM), kill it (SIGKILL),
read its log, run the operator CLI against it and send it signed invites.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any
from urllib.parse import quote

import treq
from twisted.internet import reactor, ssl
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from federation_invite.core.events import compute_event_id
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
from federation_invite.core.signing import hash_and_sign_event
from federation_invite.core.xmatrix import sign_request
from federation_invite.service import build_site_root
from federation_invite.tlscert import write_self_signed_certificate
from federation_invite.web.keys import KeyServerResource
from federation_invite.web.tree import build_matrix_tree

from .support import make_key

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class WallClock:
    """The reactor's time, as the key server's clock."""

    def seconds(self) -> float:
        return float(reactor.seconds())  # type: ignore[attr-defined]


class DaemonHarness(TestCase):
    """Base class: ``setUp`` prepares the directory, the remote peer and the config."""

    #: Extra TOML appended to the daemon's config file.
    extra_config = ""
    #: twistd's own options, before the plugin's name (e.g. ``--logger``).
    twistd_options: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.port = free_port()
        self.server_name = f"localhost:{self.port}"
        self.remote_key = make_key("r1")
        key_path, cert_path = (os.path.join(self.dir, name) for name in ("peer.key", "peer.crt"))
        write_self_signed_certificate("127.0.0.1", key_path, cert_path)
        with open(cert_path, "rb") as cert, open(key_path, "rb") as key:
            certificate = ssl.PrivateCertificate.loadPEM(cert.read() + key.read())
        resource = KeyServerResource(WallClock(), "unset", [self.remote_key])
        remote_port = reactor.listenSSL(  # type: ignore[attr-defined]
            0,
            Site(build_site_root(build_matrix_tree(resource))),
            certificate.options(),
            interface="127.0.0.1",
        )
        self.addCleanup(remote_port.stopListening)
        self.remote = f"127.0.0.1:{remote_port.getHost().port}"
        resource._server_name = self.remote
        self.config = os.path.join(self.dir, "config.toml")
        with open(self.config, "w") as handle:
            handle.write(
                f'server_name = "{self.server_name}"\n'
                f'data_dir = "{self.dir}/data"\n'
                f'listen = ["tcp:{self.port}:interface=127.0.0.1"]\n' + self.extra_config
            )
        self.daemon: subprocess.Popen[bytes] | None = None
        self.addCleanup(self.kill_daemon)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def read_log(self) -> str:
        with open(os.path.join(self.dir, "twistd.log"), "rb") as handle:
            return handle.read().decode(errors="replace")

    def cli(self, *args: str) -> str:
        """Run ``federation-invite ARGS -c config`` and return its output."""
        result = subprocess.run(
            [os.path.join(BIN, "federation-invite"), *args, "-c", self.config],
            capture_output=True,
            check=True,
            cwd=self.dir,
        )
        return result.stdout.decode()

    def stored(self) -> list[dict[str, Any]]:
        """Every invite in the daemon's store, through the operator CLI."""
        rows: list[dict[str, Any]] = json.loads(
            self.cli("invites", "list", "--json", "--limit", "1000")
        )
        return rows

    async def start_daemon(self) -> None:
        """Start the daemon and wait until it answers."""
        log = open(os.path.join(self.dir, "twistd.log"), "ab")
        self.addCleanup(log.close)
        self.daemon = subprocess.Popen(
            [
                os.path.join(BIN, "twistd"),
                "-n",
                "--pidfile=",
                *self.twistd_options,
                "federation-invite",
                "-c",
                self.config,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        for _ in range(400):
            try:
                response = await treq.get(
                    self.url("/_matrix/federation/v1/version"), persistent=False
                )
                await response.content()
                return
            except Exception:
                if self.daemon.poll() is not None:
                    self.fail(f"daemon exited: {self.read_log()}")
                await deferLater(reactor, 0.05, lambda: None)
        self.fail(f"daemon did not start: {self.read_log()}")

    async def stop_daemon(self) -> None:
        """SIGTERM, then wait with the reactor running (the daemon may still talk to our peer)."""
        daemon, self.daemon = self.daemon, None
        if daemon is None or daemon.poll() is not None:
            return
        daemon.send_signal(signal.SIGTERM)
        for _ in range(400):
            if daemon.poll() is not None:
                break
            await deferLater(reactor, 0.05, lambda: None)
        else:
            daemon.kill()
            self.fail(f"daemon did not stop on SIGTERM: {self.read_log()}")
        # twistd shuts down cleanly, then re-raises the signal so that supervisors
        # see why it stopped: the exit status is -SIGTERM.
        self.assertEqual(daemon.returncode, -signal.SIGTERM, self.read_log())
        self.assertIn("Server Shut Down.", self.read_log())

    def kill_daemon(self) -> None:
        """SIGKILL: no shutdown at all (a crash or a power cut, as far as the daemon knows)."""
        daemon, self.daemon = self.daemon, None
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(10)

    def signed_invite(
        self, n: int = 0, invitee: str | None = None
    ) -> tuple[str, str, dict[str, Any], str]:
        """A v10 invite from the remote peer: ``(event_id, path, body, X-Matrix header)``."""
        room_version = KNOWN_ROOM_VERSIONS["10"]
        now_ms = int(reactor.seconds() * 1000)  # type: ignore[attr-defined]
        event = hash_and_sign_event(
            room_version,
            {
                "type": "m.room.member",
                "state_key": invitee or f"@u{n}:{self.server_name}",
                "sender": f"@alice:{self.remote}",
                "content": {"membership": "invite"},
                "room_id": f"!room{n % 7}:{self.remote}",
                "origin_server_ts": now_ms,
                "depth": 5,
                "prev_events": ["$" + "A" * 43],
                "auth_events": ["$" + "B" * 43],
                "origin": self.remote,
            },
            self.remote,
            self.remote_key,
        )
        event_id = compute_event_id(room_version, event)
        path = (
            f"/_matrix/federation/v2/invite/{quote(event['room_id'], safe='')}/"
            f"{quote(event_id, safe='')}"
        )
        body = {"room_version": "10", "event": event, "invite_room_state": []}
        header = sign_request(self.remote_key, self.remote, self.server_name, "PUT", path, body)
        return event_id, path, body, header

    async def put(self, path: str, body: Any, header: str, **kwargs: Any) -> tuple[int, Any]:
        """PUT a signed invite; the status and the parsed answer."""
        response = await treq.put(
            self.url(path),
            data=json.dumps(body).encode(),
            headers={"Authorization": [header], "Content-Type": ["application/json"]},
            **kwargs,
        )
        return response.code, json.loads(await response.content())
