"""Crash safety (issue #10, point 5): the real daemon (``twistd -n federation-invite``, SQLite) is
killed with SIGKILL while it is accepting a few hundred invites from a fake origin over loopback;
after a restart every invite that got a 200 is in the store exactly once, holding the event we
were answered, and sending everything again stores each invite once and answers the same event.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any
from urllib.parse import quote

import treq
from twisted.internet import reactor, ssl
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from federation_invite.core.events import compute_event_id
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
from federation_invite.core.signing import hash_and_sign_event
from federation_invite.core.xmatrix import sign_request
from federation_invite.service import build_site_root
from federation_invite.web.keys import KeyServerResource
from federation_invite.web.tree import build_matrix_tree

from .figures import report
from .support import make_key
from .test_daemon import BIN, _WallClock, free_port

INVITES = 300
KILL_AFTER = 100
IN_FLIGHT = 16


class CrashTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.port = free_port()
        self.server_name = f"localhost:{self.port}"
        self.remote_key = make_key("r1")
        certificate = ssl.KeyPair.generate().selfSignedCert(1, CN="127.0.0.1")
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
                "[inbound]\nlocal_users = 'any'\n"
                "[outbound]\nverify_tls = false\nip_allowlist = ['127.0.0.1/32']\n"
                "[ratelimit]\norigin_per_second = 100000.0\norigin_burst = 100000\n"
                "origin_concurrent = 64\norigin_sleep_ms = 0\n"
                "invitee_per_second = 100000.0\ninvitee_burst = 100000\n"
            )
        self.daemon: subprocess.Popen[bytes] | None = None
        self.addCleanup(self.kill_daemon)
        self.pool = HTTPConnectionPool(reactor)
        self.pool.maxPersistentPerHost = IN_FLIGHT
        self.addCleanup(self.pool.closeCachedConnections)

    def log_text(self) -> str:
        with open(os.path.join(self.dir, "twistd.log"), "rb") as handle:
            return handle.read().decode(errors="replace")

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
        for _ in range(400):
            try:
                response = await treq.get(
                    self.url("/_matrix/federation/v1/version"), persistent=False
                )
                await response.content()
                return
            except Exception:
                if self.daemon.poll() is not None:
                    self.fail(f"daemon exited: {self.log_text()}")
                await deferLater(reactor, 0.05)
        self.fail(f"daemon did not start: {self.log_text()}")

    def kill_daemon(self) -> None:
        daemon, self.daemon = self.daemon, None
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(10)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def build_invites(self) -> list[tuple[str, str, bytes, str]]:
        """``(event_id, path, body, X-Matrix header)`` for INVITES distinct invites."""
        room_version = KNOWN_ROOM_VERSIONS["10"]
        now_ms = int(reactor.seconds() * 1000)  # type: ignore[attr-defined]
        invites = []
        for n in range(INVITES):
            event = hash_and_sign_event(
                room_version,
                {
                    "type": "m.room.member",
                    "state_key": f"@u{n}:{self.server_name}",
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
            invites.append((event_id, path, json.dumps(body).encode(), header))
        return invites

    async def send_all(
        self, invites: list[tuple[str, str, bytes, str]], kill_after: int | None
    ) -> dict[str, dict[str, Any]]:
        """Send with IN_FLIGHT at once; SIGKILL the daemon after ``kill_after`` 200s.

        Returns the co-signed event of every invite answered 200.
        """
        accepted: dict[str, dict[str, Any]] = {}
        queue = list(invites)

        async def worker() -> None:
            while queue:
                event_id, path, data, header = queue.pop(0)
                try:
                    response = await treq.put(
                        self.url(path),
                        data=data,
                        headers={"Authorization": [header], "Content-Type": ["application/json"]},
                        pool=self.pool,
                    )
                    content = await response.content()
                except Exception:
                    if kill_after is None:
                        raise
                    return  # the daemon is gone
                if response.code != 200:
                    raise AssertionError(f"{event_id}: {response.code} {content!r}")
                accepted[event_id] = json.loads(content)["event"]
                if kill_after is not None and len(accepted) == kill_after:
                    self.kill_daemon()

        results = await DeferredList(
            [ensureDeferred(worker()) for _ in range(IN_FLIGHT)], consumeErrors=True
        )
        for ok, failure in results:
            if not ok:
                failure.raiseException()
        return accepted

    def stored(self) -> list[dict[str, Any]]:
        result = subprocess.run(
            [
                os.path.join(BIN, "federation-invite"),
                *("invites", "list", "--json", "--limit", "1000", "-c", self.config),
            ],
            capture_output=True,
            check=True,
            cwd=self.dir,
        )
        rows: list[dict[str, Any]] = json.loads(result.stdout)
        return rows

    def test_sigkill_while_accepting(self) -> None:
        """SIGKILL after 100 of 300 invites were answered 200 (16 in flight): after a restart each
        answered invite is stored exactly once with the answered event; resending all 300 stores
        each once and answers the same co-signed events."""

        async def go() -> None:
            invites = self.build_invites()
            await self.start_daemon()
            accepted = await self.send_all(invites, KILL_AFTER)
            self.assertGreaterEqual(len(accepted), KILL_AFTER)
            self.assertLess(len(accepted), INVITES, "the kill happened mid-load")
            await self.start_daemon()
            rows = self.stored()
            ids = [row["event_id"] for row in rows]
            self.assertEqual(len(ids), len(set(ids)), "no invite stored twice")
            by_id = {row["event_id"]: row for row in rows}
            for event_id, event in accepted.items():
                self.assertIn(event_id, by_id, "an invite answered 200 was lost")
                self.assertEqual(by_id[event_id]["event"], event)
            sent = {event_id for event_id, *_ in invites}
            self.assertLessEqual(set(ids), sent)
            # In flight at the kill: stored or not, never half; the sender retries.
            again = await self.send_all(invites, None)
            self.assertEqual(set(again), sent)
            for event_id, event in accepted.items():
                self.assertEqual(again[event_id], event, "the same answer after the crash")
            rows = self.stored()
            self.assertEqual(sorted(row["event_id"] for row in rows), sorted(sent))
            self.kill_daemon()
            report(
                "crash",
                invites_sent=len(invites),
                answered_200_before_sigkill=len(accepted),
                sigkills=1,
                stored_after_restart=len(ids),
                answered_invites_lost=len(set(accepted) - set(ids)),
                stored_twice=len(ids) - len(set(ids)),
            )

        return ensureDeferred(go())  # type: ignore[return-value]
