"""Crash safety (issue #10, point 5): the real daemon (``twistd -n federation-invite``, SQLite) is
killed with SIGKILL while it is accepting a few hundred invites from a fake origin over loopback;
after a restart every invite that got a 200 is in the store exactly once, holding the event we
were answered, and sending everything again stores each invite once and answers the same event.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.web.client import HTTPConnectionPool

from .daemon_harness import DaemonHarness
from .figures import report

INVITES = 300
KILL_AFTER = 100
IN_FLIGHT = 16


class CrashTests(DaemonHarness):
    timeout = 60
    extra_config = (
        "[inbound]\nlocal_users = 'any'\n"
        "[outbound]\nverify_tls = false\nip_allowlist = ['127.0.0.1/32']\n"
        "[ratelimit]\norigin_per_second = 100000.0\norigin_burst = 100000\n"
        "origin_concurrent = 64\norigin_sleep_ms = 0\n"
        "invitee_per_second = 100000.0\ninvitee_burst = 100000\n"
    )

    def setUp(self) -> None:
        super().setUp()
        self.pool = HTTPConnectionPool(reactor)
        self.pool.maxPersistentPerHost = IN_FLIGHT
        self.addCleanup(self.pool.closeCachedConnections)

    def build_invites(self) -> list[tuple[str, str, bytes, str]]:
        """``(event_id, path, body, X-Matrix header)`` for INVITES distinct invites."""
        invites = []
        for n in range(INVITES):
            event_id, path, body, header = self.signed_invite(n)
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
