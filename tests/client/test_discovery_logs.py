"""Tests for the log lines of the system SRV resolver's DNS queries (federation_invite.client
.discovery's ``_QuietResolver``): a name any peer chooses costs no twisted.names noise."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.names import dns
from twisted.names.error import DomainError
from twisted.trial.unittest import TestCase

from federation_invite.client import discovery


class _NoSuchName(DatagramProtocol):
    """A DNS server on UDP answering every query NXDOMAIN."""

    noisy = False

    def datagramReceived(self, data: bytes, address: Any) -> None:
        query = dns.Message()
        query.fromStr(data)
        answer = dns.Message(id=query.id, answer=1, rCode=dns.ENAME)
        answer.queries = query.queries
        assert self.transport is not None
        self.transport.write(answer.toStr(), address)


class QuietResolverTests(TestCase):
    """The system SRV resolver's UDP queries log no protocol start and stop (real UDP ports)."""

    def test_system_resolver_is_quiet(self) -> None:
        """``_system_srv_resolver`` builds the quiet resolver."""
        resolver = discovery._system_srv_resolver(MemoryReactorClock())
        self.addCleanup(discovery._stop_system_srv_resolver, resolver)
        self.assertIsInstance(resolver, discovery._QuietResolver)

    async def test_query_logs_no_protocol_start_or_stop(self) -> None:
        """An SRV lookup answered NXDOMAIN over UDP: no ``Starting protocol <...>`` nor
        ``Stopping protocol <...>`` line (two per query before)."""
        server = reactor.listenUDP(0, _NoSuchName(), interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        resolver = discovery._QuietResolver(
            servers=[("127.0.0.1", server.getHost().port)], reactor=reactor
        )
        with capturedLogs() as events:
            lookup = resolver.lookupService("_matrix-fed._tcp.example.invalid", timeout=(5,))
            failure = None
            try:
                await lookup
            except DomainError as exc:
                failure = exc
            # The query's port is closed in a later turn of the reactor.
            await deferLater(reactor, 0.05, lambda: None)
        self.assertIsInstance(failure, DomainError)
        lines = [formatEvent(event) for event in events]
        self.assertTrue(any(" starting on " in line for line in lines), lines)
        self.assertEqual(
            [line for line in lines if "Starting protocol" in line or "Stopping protocol" in line],
            [],
        )
