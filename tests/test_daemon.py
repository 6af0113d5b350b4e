"""The real daemon as a user runs it: ``twistd -n federation-invite`` in a subprocess.

A fake remote server (TLS on loopback, in this process) publishes its key; the
daemon fetches it, accepts and co-signs a signed invite for a local user,
``federation-invite invites list`` shows it, and it survives SIGTERM and a restart.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import treq
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from federation_invite.core.events import compute_event_id
from federation_invite.core.keys import decode_verify_key
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
from federation_invite.core.signing import (
    ServerVerifyKey,
    hash_and_sign_event,
    verify_event_signature,
)
from federation_invite.core.xmatrix import sign_request
from federation_invite.service import build_site_root
from federation_invite.web.keys import KeyServerResource
from federation_invite.web.tree import build_matrix_tree

from .support import make_key

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _WallClock:
    def seconds(self) -> float:
        return float(reactor.seconds())  # type: ignore[attr-defined]


class DaemonTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.port = free_port()
        self.server_name = f"localhost:{self.port}"
        self.remote_key = make_key("r1")
        # The remote peer: TLS with a self-signed certificate on loopback.
        key_pair = ssl.KeyPair.generate()
        certificate = key_pair.selfSignedCert(1, CN="127.0.0.1")
        resource = KeyServerResource(_WallClock(), "unset", [self.remote_key])
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
                f'listen = ["tcp:{self.port}:interface=127.0.0.1"]\n'
                "[outbound]\nverify_tls = false\nip_allowlist = ['127.0.0.1/32']\n"
            )
        self.daemon: subprocess.Popen[bytes] | None = None
        self.addCleanup(lambda: ensureDeferred(self.stop_daemon()))

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [os.path.join(BIN, "federation-invite"), *args, "-c", self.config],
            capture_output=True,
            check=True,
            cwd=self.dir,
        )
        return result.stdout.decode()

    async def start_daemon(self) -> None:
        log = open(os.path.join(self.dir, "twistd.log"), "ab")
        self.addCleanup(log.close)
        self.daemon = subprocess.Popen(
            [
                os.path.join(BIN, "twistd"),
                "-n",
                "--pidfile=",
                "federation-invite",
                "-c",
                self.config,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        for _ in range(200):
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

    def read_log(self) -> str:
        with open(os.path.join(self.dir, "twistd.log"), "rb") as handle:
            return handle.read().decode(errors="replace")

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

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def send_invite(self, event: dict[str, Any], event_id: str) -> tuple[int, Any]:
        from urllib.parse import quote

        path = f"/_matrix/federation/v2/invite/{quote(event['room_id'], safe='')}/{quote(event_id, safe='')}"
        body = {"room_version": "10", "event": event, "invite_room_state": []}
        header = sign_request(self.remote_key, self.remote, self.server_name, "PUT", path, body)
        response = await treq.put(
            self.url(path),
            data=json.dumps(body).encode(),
            headers={"Authorization": [header], "Content-Type": ["application/json"]},
            persistent=False,
        )
        return response.code, json.loads(await response.content())

    def test_invite_through_the_daemon_and_restart(self) -> Deferred[None]:
        """Keys published, a signed invite co-signed and stored, listed by the CLI, kept across restarts."""

        async def go() -> None:
            self.cli("users", "add", f"@bob:{self.server_name}")
            await self.start_daemon()
            response = await treq.get(self.url("/_matrix/key/v2/server"), persistent=False)
            keys = json.loads(await response.content())
            self.assertEqual(keys["server_name"], self.server_name)
            room_version = KNOWN_ROOM_VERSIONS["10"]
            now_ms = int(reactor.seconds() * 1000)  # type: ignore[attr-defined]
            event = hash_and_sign_event(
                room_version,
                {
                    "type": "m.room.member",
                    "state_key": f"@bob:{self.server_name}",
                    "sender": f"@alice:{self.remote}",
                    "content": {"membership": "invite"},
                    "room_id": f"!room:{self.remote}",
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
            code, answer = await self.send_invite(event, event_id)
            self.assertEqual(code, 200, (answer, self.read_log()))
            cosigned = answer["event"]
            ((key_id, entry),) = keys["verify_keys"].items()
            our_key = ServerVerifyKey(
                self.server_name, key_id, decode_verify_key(key_id, entry["key"]), 2**53 - 1
            )
            verify_event_signature(
                room_version, cosigned, self.server_name, {(self.server_name, key_id): our_key}
            )
            listed = json.loads(self.cli("invites", "list", "--json"))
            self.assertEqual(
                [(r["event_id"], r["status"]) for r in listed], [(event_id, "pending")]
            )
            self.assertEqual(listed[0]["event"], cosigned)

            await self.stop_daemon()
            await self.start_daemon()
            listed = json.loads(self.cli("invites", "list", "--json"))
            self.assertEqual([r["event_id"] for r in listed], [event_id])
            code, again = await self.send_invite(event, event_id)
            self.assertEqual((code, again), (200, answer))
            self.assertIn("Loaded signing key", self.read_log())

        return ensureDeferred(go())
