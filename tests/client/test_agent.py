"""Tests for federation_invite.client.agent: where connections go, with what TLS name, and what is refused."""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet import reactor as global_reactor
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.interfaces import (
    IHostnameResolver,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Cooperator, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import (
    URI,
    Agent,
    FileBodyProducer,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from federation_invite.client import (
    BackoffError,
    BlockedAddressError,
    FederationAgent,
    FederationClient,
    FederationTLSPolicy,
    IPRangeFilter,
    ServerResolver,
    TransportError,
)
from federation_invite.client._body import read_body
from federation_invite.client.agent import (
    CONNECT_TIMEOUT,
    MAX_IDLE_CONNECTIONS,
    MAX_INTERIM_HEADS,
    HeadLimitingEndpoint,
    ResponseHeadRefused,
    ResponseHeadTooLarge,
    make_connection_pool,
    well_known_agent,
)
from federation_invite.client.testing import FakePeersAgent
from federation_invite.config import DEFAULT_IP_BLOCKLIST

from ._fakes import CannedResource, FakeHostnameResolver, FakeSRVResolver, make_certificate

real_reactor: Any = global_reactor

PUBLIC_1 = "93.184.216.34"
PUBLIC_2 = "93.184.216.35"


class RecordingPolicy:
    """A TLS policy that records which name each connection's certificate must match."""

    def __init__(self) -> None:
        self.names: list[tuple[bytes, int]] = []
        self._inner = FederationTLSPolicy()

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        self.names.append((hostname, port))
        return self._inner.creatorForNetloc(hostname, port)


class _TCPTransport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


@implementer(IHostnameResolver)
class _HeldResolver:
    """Address lookups that never end; ``lookups`` lists the names asked for,
    ``cancelled`` those whose lookup was cancelled (``IHostResolution.cancel``)."""

    def __init__(self) -> None:
        self.lookups: list[str] = []
        self.cancelled: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        self.lookups.append(hostName)
        resolution = _HeldResolution(hostName, self.cancelled)
        resolutionReceiver.resolutionBegan(resolution)
        return resolution


class _HeldResolution:
    def __init__(self, name: str, cancelled: list[str]) -> None:
        self.name = name
        self._cancelled = cancelled

    def cancel(self) -> None:
        self._cancelled.append(self.name)


class AgentRoutingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.hosts = FakeHostnameResolver(
            {
                "example.org": [PUBLIC_1],
                "srv-target.example": [PUBLIC_2],
                "matrix.example.net": [PUBLIC_2],
                "backup.example": [PUBLIC_1],
                "evil.example": ["10.0.0.1"],
                "internal.example": ["192.168.1.1"],
            }
        )
        self.srv = FakeSRVResolver()
        self.well_known = FakePeersAgent()
        self.policy = RecordingPolicy()
        self.agent = FederationAgent(
            self.reactor,
            ServerResolver(self.reactor, self.well_known, self.srv),
            self.policy,
            ip_filter=IPRangeFilter(DEFAULT_IP_BLOCKLIST),
            name_resolver=self.hosts,
        )

    def request(self, server_name: str) -> Any:
        return self.agent.request(b"GET", b"https://" + server_name.encode() + b"/_matrix/x?y=1")

    def connections(self) -> list[tuple[str, int]]:
        return [(client[0], client[1]) for client in self.reactor.tcpClients]

    def test_ip_literal(self) -> None:
        """An IPv4 literal with port connects there, certificate checked for the IP."""
        self.assertNoResult(self.request("8.8.8.8:8443"))
        self.assertEqual(self.connections(), [("8.8.8.8", 8443)])
        self.assertEqual(self.policy.names, [(b"8.8.8.8", 8443)])

    def test_ipv6_literal(self) -> None:
        """An IPv6 literal connects on 8448, certificate checked for the bare address."""
        self.assertNoResult(self.request("[2606:4700::1]"))
        self.assertEqual(self.connections(), [("2606:4700::1", 8448)])
        self.assertEqual(self.policy.names, [(b"2606:4700::1", 8448)])

    def test_explicit_port(self) -> None:
        """A hostname with port resolves A/AAAA and connects on that port, TLS for the hostname."""
        self.assertNoResult(self.request("example.org:8448"))
        self.assertEqual(self.connections(), [(PUBLIC_1, 8448)])
        self.assertEqual(self.policy.names, [(b"example.org", 8448)])
        self.assertEqual(self.well_known.requests, [])

    def test_srv_target_keeps_tls_name(self) -> None:
        """An SRV target is connected to, but the certificate must be for the server name."""
        self.srv.records["_matrix-fed._tcp.example.org"] = [(0, 0, 4443, "srv-target.example")]
        self.assertNoResult(self.request("example.org"))
        self.assertEqual(self.connections(), [(PUBLIC_2, 4443)])
        self.assertEqual(self.policy.names, [(b"example.org", 4443)])

    def test_delegation(self) -> None:
        """After .well-known delegation the delegated host is resolved and is the TLS name."""
        self.well_known.add_peer(
            "example.org", CannedResource(200, {"m.server": "matrix.example.net"})
        )
        self.assertNoResult(self.request("example.org"))
        self.assertEqual(self.connections(), [(PUBLIC_2, 8448)])
        self.assertEqual(self.policy.names, [(b"matrix.example.net", 8448)])

    def test_next_srv_target_after_failure(self) -> None:
        """When one SRV target refuses, the next is tried with the same TLS name."""
        self.srv.records["_matrix-fed._tcp.example.org"] = [
            (0, 0, 1111, "srv-target.example"),
            (5, 0, 2222, "backup.example"),
        ]
        self.assertNoResult(self.request("example.org"))
        self.reactor.tcpClients[0][2].clientConnectionFailed(
            None, Failure(ConnectionRefusedError())
        )
        self.reactor.advance(1)  # HostnameEndpoint notices the failure on its next tick
        self.assertEqual(self.connections(), [(PUBLIC_2, 1111), (PUBLIC_1, 2222)])
        self.assertEqual(self.policy.names, [(b"example.org", 1111), (b"example.org", 2222)])

    def test_each_target_connect_bounded(self) -> None:
        """Each target's connection attempt is bounded by CONNECT_TIMEOUT (not by the
        request's timeout only), so that a black-holed first SRV target leaves the
        request time for the next ones."""
        self.srv.records["_matrix-fed._tcp.example.org"] = [
            (0, 0, 1111, "srv-target.example"),
            (5, 0, 2222, "backup.example"),
        ]
        self.assertNoResult(self.request("example.org"))
        # The first target black-holed: its attempt timed out (TCP gave up after its timeout).
        self.reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(TimeoutError()))
        self.reactor.advance(1)
        self.assertEqual(self.connections(), [(PUBLIC_2, 1111), (PUBLIC_1, 2222)])
        self.assertEqual([client[3] for client in self.reactor.tcpClients], [CONNECT_TIMEOUT] * 2)

    def test_all_targets_fail(self) -> None:
        """When every target fails, the last error is reported."""
        self.assertNoResult(requesting := self.request("example.org:8448"))
        self.reactor.tcpClients[0][2].clientConnectionFailed(
            None, Failure(ConnectionRefusedError())
        )
        self.reactor.advance(1)  # HostnameEndpoint notices the failure on its next tick
        self.failureResultOf(requesting, ConnectionRefusedError)

    def test_cancel_while_connecting(self) -> None:
        """Cancelling a request while connecting stops the attempt and tries no other target."""
        self.srv.records["_matrix-fed._tcp.example.org"] = [
            (0, 0, 1111, "srv-target.example"),
            (5, 0, 2222, "backup.example"),
        ]
        requesting = self.request("example.org")
        connector = self.reactor.connectors[0]
        requesting.cancel()
        self.failureResultOf(requesting)
        self.assertTrue(connector.stoppedConnecting)
        self.reactor.advance(1)
        self.assertEqual(self.connections(), [(PUBLIC_2, 1111)])

    def test_cancel_while_looking_up(self) -> None:
        """Cancelling a request (its timeout) while a target's address lookup is in progress
        tries no other target: HostnameEndpoint reports that cancellation as a failed lookup
        (DNSLookupError), which must not lead to the next target's lookup, each of which may
        hang too, for a request nobody waits for."""
        self.srv.records["_matrix-fed._tcp.example.org"] = [
            (0, 0, 1111, "srv-target.example"),
            (5, 0, 2222, "backup.example"),
        ]
        held = _HeldResolver()
        self.agent._name_resolver = held
        requesting = self.request("example.org")
        self.assertEqual(held.lookups, ["srv-target.example"])
        requesting.cancel()
        self.failureResultOf(requesting)
        self.reactor.advance(1)
        self.assertEqual(held.lookups, ["srv-target.example"])
        self.assertEqual(self.connections(), [])

    def test_lookup_of_cancelled_request_cancelled(self) -> None:
        """A request cancelled (or timed out) while its address lookup is in progress
        cancels that lookup (Twisted's HostnameEndpoint never does), so that a lookup still
        waiting for a resolver thread is not made for nobody; one that ended is not."""
        held = _HeldResolver()
        self.agent._name_resolver = held
        requesting = self.request("srv-target.example:8448")
        self.assertEqual((held.lookups, held.cancelled), (["srv-target.example"], []))
        requesting.cancel()
        self.failureResultOf(requesting)
        self.assertEqual(held.cancelled, ["srv-target.example"])
        self.agent._name_resolver = self.hosts
        requesting = self.request("srv-target.example:8448")
        self.assertEqual(self.connections(), [(PUBLIC_2, 8448)])
        requesting.cancel()
        self.failureResultOf(requesting)

    def test_lookup_of_cancelled_well_known_fetch_cancelled(self) -> None:
        """The same for a .well-known fetch cancelled (its timeout) while its address lookup
        is in progress."""
        held = _HeldResolver()
        agent = well_known_agent(
            self.reactor,
            self.policy,
            IPRangeFilter(DEFAULT_IP_BLOCKLIST),
            make_connection_pool(self.reactor),
            name_resolver=held,
        )
        fetching = agent.request(b"GET", b"https://example.org/.well-known/matrix/server")
        self.assertEqual((held.lookups, held.cancelled), (["example.org"], []))
        fetching.cancel()
        self.failureResultOf(fetching)
        self.assertEqual(held.cancelled, ["example.org"])

    def test_blocked_ip_literal(self) -> None:
        """A blocked IP literal is never connected to."""
        for name in ["127.0.0.1:8448", "10.0.0.1", "169.254.1.1:80", "[::1]:8448", "[fc00::1]"]:
            failure = self.failureResultOf(self.request(name), BlockedAddressError)
            self.assertIn("blocked", str(failure.value))
        self.assertEqual(self.connections(), [])

    def test_name_resolving_to_private_address(self) -> None:
        """A public-looking name whose A record is private is refused after resolution."""
        failure = self.failureResultOf(self.request("evil.example:8448"), BlockedAddressError)
        self.assertEqual(failure.value.addresses, ["10.0.0.1"])
        self.assertEqual(self.connections(), [])

    def test_srv_target_resolving_to_private_address(self) -> None:
        """An SRV target resolving to a private address is skipped for the next one."""
        self.srv.records["_matrix-fed._tcp.example.org"] = [
            (0, 0, 1111, "internal.example"),
            (5, 0, 2222, "backup.example"),
        ]
        self.assertNoResult(self.request("example.org"))
        self.assertEqual(self.connections(), [(PUBLIC_1, 2222)])

    def test_blocked_ip_literal_srv_target_skipped(self) -> None:
        """An SRV target that is a blocked IP literal (RFC 2782 wants a name, but DNS serves
        it) is skipped for the next one, as one resolving to a blocked address is."""
        self.srv.records["_matrix-fed._tcp.example.org"] = [
            (0, 0, 1111, "10.0.0.1"),
            (5, 0, 2222, "backup.example"),
        ]
        self.assertNoResult(self.request("example.org"))
        self.assertEqual(self.connections(), [(PUBLIC_1, 2222)])
        self.assertEqual(self.hosts.lookups, ["backup.example"])

    def test_srv_targets_capped(self) -> None:
        """Of an SRV answer of 40 targets, each resolving only to blocked addresses, the first
        32 are tried (32 lookups), and the request logs one line, not one per target or per
        address (those go to the debug level)."""
        self.srv.records["_matrix-fed._tcp.example.org"] = [
            (0, 1, 8448, f"t{n}.example") for n in range(40)
        ]
        for n in range(40):
            self.hosts.hosts[f"t{n}.example"] = ["10.0.0.1", "10.0.0.2"]
        with capturedLogs() as events:
            failure = self.failureResultOf(self.request("example.org"), BlockedAddressError)
        self.assertEqual(failure.value.addresses, ["10.0.0.1", "10.0.0.2"])
        self.assertEqual(len(self.hosts.lookups), 32)
        self.assertEqual(self.connections(), [])
        [line] = [
            formatEvent(e)
            for e in events
            if e["log_level"] >= LogLevel.info and "discovery" not in e["log_namespace"]
        ]
        blocked = "resolves only to blocked addresses (10.0.0.1, 10.0.0.2)"
        self.assertTrue(line.startswith("Cannot connect to example.org: all 32 targets failed: t"))
        self.assertEqual(line.count(blocked), 3)
        self.assertTrue(line.endswith(f"{blocked}); and 29 more"), line)

    def test_failed_targets_logged_once_on_success(self) -> None:
        """A target that fails before one that connects is logged in one line, with the
        target connected to; the blocked addresses dropped from it too."""
        self.srv.records["_matrix-fed._tcp.example.org"] = [
            (0, 0, 1111, "internal.example"),
            (5, 0, 2222, "mixed.example"),
        ]
        self.hosts.hosts["mixed.example"] = ["10.1.1.1", PUBLIC_1]
        with capturedLogs() as events:
            self.assertNoResult(self.request("example.org"))
            protocol = self.reactor.tcpClients[0][2].buildProtocol(None)
            protocol.makeConnection(_TCPTransport())
            self.reactor.advance(0)
        self.assertEqual(self.connections(), [(PUBLIC_1, 2222)])
        self.assertEqual(
            [
                formatEvent(e)
                for e in events
                if e["log_level"] >= LogLevel.info and "discovery" not in e["log_namespace"]
            ],
            [
                "Connected to example.org through mixed.example:2222 (blocked addresses"
                " dropped: 10.1.1.1) after 1 target failed: internal.example:1111"
                " (internal.example resolves only to blocked addresses (192.168.1.1))"
            ],
        )

    def test_not_a_federation_uri(self) -> None:
        """Only https:// (or matrix-federation://) URIs naming a server are accepted."""
        self.failureResultOf(self.agent.request(b"GET", b"http://example.org/x"), ValueError)
        self.failureResultOf(self.agent.request(b"GET", b"example.org/x"), ValueError)

    def test_matrix_federation_uri(self) -> None:
        """A matrix-federation:// URI (Synapse's scheme) is routed as an https:// one is."""
        self.assertNoResult(self.agent.request(b"GET", b"matrix-federation://8.8.8.8:8443/x"))
        self.assertEqual(self.connections(), [("8.8.8.8", 8443)])
        self.assertEqual(self.policy.names, [(b"8.8.8.8", 8443)])


class ClientBlocklistTests(SynchronousTestCase):
    """The default FederationClient, on a memory reactor whose DNS is fake."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.installNameResolver(
            FakeHostnameResolver({"evil.example": ["10.0.0.1"], "good.example": [PUBLIC_1]})
        )
        self.key = generate_signing_key("k")

    def client(self, allowlist: list[str] = ()) -> FederationClient:  # type: ignore[assignment]
        return FederationClient(
            self.reactor,
            "local.example",
            self.key,
            ip_allowlist=allowlist,
            srv_resolver=FakeSRVResolver(),
            timeout=10,
        )

    def test_blocked_literals(self) -> None:
        """127.0.0.1, 10.0.0.1, 169.254.x, [::1] and fc00::/7 are refused with a TransportError."""
        client = self.client()
        for name in ["127.0.0.1:8448", "10.0.0.1", "169.254.3.4", "[::1]:8448", "[fd00::5]"]:
            error = self.failureResultOf(client.get_json(name, "/x"), TransportError).value
            self.assertEqual(error.destination, name)
            self.assertTrue(
                error.reason.startswith("refused by the outbound IP blocklist"), error.reason
            )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_name_resolving_to_private(self) -> None:
        """A name resolving to 10.0.0.1 is refused, .well-known fetch included, with nothing connected."""
        client = self.client()
        for name in ["evil.example:8448", "evil.example"]:
            error = self.failureResultOf(client.get_json(name, "/x"), TransportError).value
            self.assertEqual(
                error.reason,
                "refused by the outbound IP blocklist: "
                "evil.example resolves only to blocked addresses (10.0.0.1)",
            )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_allowlist_punches_hole(self) -> None:
        """With 10.0.0.0/8 allowlisted the connection is attempted (and here times out)."""
        client = self.client(["10.0.0.0/8"])
        requesting = client.get_json("evil.example:8448", "/x")
        self.assertEqual([(c[0], c[1]) for c in self.reactor.tcpClients], [("10.0.0.1", 8448)])
        self.reactor.advance(10)
        error = self.failureResultOf(requesting, TransportError).value
        self.assertEqual(error.reason, "timed out after 10 s")

    def test_public_name_connects(self) -> None:
        """A public name goes through: well-known first (port 443), then 8448."""
        client = self.client()
        self.assertNoResult(client.get_json("good.example", "/x"))
        self.assertEqual([(c[0], c[1]) for c in self.reactor.tcpClients], [(PUBLIC_1, 443)])


class _HeadServer(Protocol):
    """A TLS peer answering each request with ``test.answer(number)`` (bytes), numbering
    the requests of all its connections from 0."""

    def __init__(self, test: ResponseHeadLimitTests) -> None:
        self._test = test
        self._connections = test.connections
        self._received = b""

    def connectionMade(self) -> None:
        self._connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        while b"\r\n\r\n" in self._received:
            _, self._received = self._received.split(b"\r\n\r\n", 1)
            transport: Any = self.transport
            transport.write(self._test.answer(self._test.answered))
            self._test.answered += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connections.remove(self)


def _head(header_lines: int, line_bytes: int = 20, body: bytes | None = b"{}") -> bytes:
    """A 200 answer with ``header_lines`` header lines of ``line_bytes`` each (with CRLF),
    then, unless ``body`` is None, a body of that length (the last header line says so)."""
    lines = [b"HTTP/1.1 200 OK\r\n"]
    filler = b"X-Pad: " + b"a" * (line_bytes - 9) + b"\r\n"
    if body is None:
        lines += [filler] * header_lines
        return b"".join(lines)
    lines += [filler] * (header_lines - 1)
    lines.append(b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return b"".join(lines)


class _LoopbackClientMixin:
    """A real FederationClient for a TLS server on loopback (``self.connections``: the
    server's protocols, aborted when the test ends, after the client is closed)."""

    connections: list[Any]

    def client(self) -> FederationClient:
        client = FederationClient(
            real_reactor,
            "local.example",
            generate_signing_key("k"),
            verify_tls=False,
            ip_allowlist=["127.0.0.1/32"],
            timeout=5.0,
        )
        self.addCleanup(self._close, client)  # type: ignore[attr-defined]
        return client

    async def _close(self, client: FederationClient) -> None:
        await client.close()
        for connection in list(self.connections):
            connection.transport.abortConnection()
        await deferLater(real_reactor, 0.01, lambda: None)


class ResponseHeadLimitTests(_LoopbackClientMixin, TestCase):
    """Response heads from peers are bounded: 64 KiB and 100 header lines per response."""

    timeout = 20

    def setUp(self) -> None:
        cert_pem, key_pem = make_certificate(["matrix.test"], ["127.0.0.1"])
        self.options = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()
        self.connections: list[Any] = []
        self.answer: Callable[[int], bytes] = lambda number: _head(1)
        self.answered = 0
        factory = Factory.forProtocol(lambda: _HeadServer(self))
        port = real_reactor.listenSSL(0, factory, self.options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.destination = f"127.0.0.1:{port.getHost().port}"

    async def transport_error(self, client: FederationClient) -> TransportError:
        with self.assertRaises(TransportError) as caught:
            await client.get_json(self.destination, "/x")
        # The connection is dropped, not returned to the pool.
        await deferLater(real_reactor, 0.05, lambda: None)
        self.assertEqual(self.connections, [])
        assert client._pool is not None
        self.assertEqual([c for cs in client._pool._connections.values() for c in cs], [])
        return caught.exception

    async def test_endless_headers(self) -> None:
        """A peer streaming header lines without end is cut off past 64 KiB, long before the
        request's timeout, with a TransportError."""
        self.answer = lambda number: _head(300, line_bytes=1000, body=None)
        client = self.client()
        error = await self.transport_error(client)
        self.assertEqual(error.reason, "response head over 65536 bytes")

    async def test_too_many_header_lines(self) -> None:
        """100 header lines are read; 101 are refused, however short."""
        self.answer = lambda number: _head(100 if number == 0 else 101)
        client = self.client()
        self.assertEqual(await client.get_json(self.destination, "/x"), {})
        # The second answer is one line too long (twisted.web retries it once, on a new
        # connection, as it does any idempotent request a pooled connection failed).
        error = await self.transport_error(client)
        self.assertEqual(error.reason, "response head over 100 header lines")

    async def test_limit_is_per_response(self) -> None:
        """A pooled connection serving several responses counts each head afresh: three
        answers of 60 KiB of headers each arrive on one connection."""
        self.answer = lambda number: _head(60, line_bytes=1024)
        client = self.client()
        for _ in range(3):
            self.assertEqual(await client.get_json(self.destination, "/x"), {})
        self.assertEqual(len(self.connections), 1)

    async def test_interim_heads_count(self) -> None:
        """1xx interim heads (which twisted.web skips) count toward the final head's budget."""
        interim = b"HTTP/1.1 102 Processing\r\n" + (b"X-Pad: " + b"a" * 1000 + b"\r\n") * 17
        self.answer = lambda number: (interim + b"\r\n") * MAX_INTERIM_HEADS + _head(1)
        client = self.client()
        error = await self.transport_error(client)
        self.assertEqual(error.reason, "response head over 65536 bytes")

    async def test_odd_interim_status_line(self) -> None:
        """A 100 spelled "0100", which twisted.web skips as interim, cannot switch the limit
        off for the head after it: the status line is refused (StatusLineTests)."""
        self.answer = lambda number: b"HTTP/1.1 0100 Continue\r\n\r\n" + _head(300)
        client = self.client()
        error = await self.transport_error(client)
        self.assertEqual(error.reason, "malformed status line: b'HTTP/1.1 0100 '")

    async def test_well_known_agent(self) -> None:
        """The agent fetching .well-known documents has the same limits."""
        for answer, refused in (
            (_head(300, line_bytes=1000, body=None), ResponseHeadTooLarge),
            (b"HTTP/1.1 +100 Continue\r\n\r\n" + _head(300), ResponseHeadRefused),
        ):
            with self.subTest(answer=answer[:30]):
                await self.well_known_refused(answer, refused)

    async def well_known_refused(self, answer: bytes, refused: type[Exception]) -> None:
        self.answer = lambda number: answer
        pool = make_connection_pool(real_reactor)
        agent = well_known_agent(
            real_reactor,
            FederationTLSPolicy(verify=False),
            IPRangeFilter(DEFAULT_IP_BLOCKLIST, ["127.0.0.1/32"]),
            pool,
        )
        self.addCleanup(pool.closeCachedConnections)
        with self.assertRaises(ResponseFailed) as caught:
            await agent.request(
                b"GET", f"https://{self.destination}/.well-known/matrix/server".encode()
            )
        [reason] = caught.exception.reasons
        self.assertIsInstance(reason.value, refused)
        await deferLater(real_reactor, 0.05, lambda: None)
        self.assertEqual(self.connections, [])


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    def __init__(self, peers: _MemoryPeers, host: bytes) -> None:
        self._peers = peers
        self._host = host

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        protocol = protocolFactory.buildProtocol(IPv4Address("TCP", PUBLIC_1, 443))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        self._peers.connections.append((self._host, protocol, transport))
        return succeed(protocol)


@implementer(IAgentEndpointFactory)
class _MemoryPeers:
    """Opens each connection on a ``StringTransport``; ``connections`` lists
    ``(host, protocol, transport)`` in the order they were opened."""

    def __init__(self) -> None:
        self.connections: list[tuple[bytes, Any, StringTransport]] = []

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return _MemoryEndpoint(self, uri.host)


_EMPTY_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class ConnectionPoolCapTests(SynchronousTestCase):
    """The pool keeps at most ``maxPersistentTotal`` idle connections over all hosts, closing
    the least recently returned ones first; Twisted's per-host limit and timeouts still hold."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = make_connection_pool(self.reactor)
        self.peers = _MemoryPeers()
        self.agent = Agent.usingEndpointFactory(self.reactor, self.peers, pool=self.pool)

    def start(self, host: str) -> tuple[Deferred[Any], StringTransport]:
        """Send a GET to ``host``; its response and the transport the request went out on
        (the one that newly holds unanswered bytes: ``answer`` clears them)."""
        waiting = [t for _, _, t in self.peers.connections if t.value()]
        response = self.agent.request(b"GET", b"http://" + host.encode("ascii") + b"/")
        [transport] = [t for _, _, t in self.peers.connections if t.value() and t not in waiting]
        return response, transport

    def answer(self, response: Deferred[Any], transport: StringTransport) -> None:
        [protocol] = [p for _, p, t in self.peers.connections if t is transport]
        transport.clear()
        protocol.dataReceived(_EMPTY_RESPONSE)
        self.assertEqual(self.successResultOf(response).code, 200)

    def idle(self, host: str) -> StringTransport:
        """One request to ``host`` answered, leaving its connection idle in the pool."""
        response, transport = self.start(host)
        self.answer(response, transport)
        return transport

    def idle_count(self) -> int:
        return sum(len(connections) for connections in self.pool._connections.values())

    def test_default_cap(self) -> None:
        """make_connection_pool's pool holds at most MAX_IDLE_CONNECTIONS idle connections:
        one more host closes the first host's connection."""
        # README.md, limits table: idle keep-alive connections "256 over all servers".
        self.assertEqual(MAX_IDLE_CONNECTIONS, 256)
        self.assertEqual(self.pool.maxPersistentTotal, MAX_IDLE_CONNECTIONS)
        transports = [self.idle(f"host{number}.example") for number in range(MAX_IDLE_CONNECTIONS)]
        self.assertEqual([t for t in transports if t.disconnecting], [])
        self.idle("one-more.example")
        self.assertEqual([t for t in transports if t.disconnecting], [transports[0]])
        self.assertEqual(self.idle_count(), MAX_IDLE_CONNECTIONS)

    def test_cap_closes_least_recently_returned(self) -> None:
        """Past the cap, exactly the idle connections returned longest ago are closed (of any
        host), and their timeouts cancelled; a connection reused meanwhile counts as new."""
        self.pool.maxPersistentTotal = 3
        a, b, c = (self.idle(host) for host in ("a.example", "b.example", "c.example"))
        self.assertIs(self.idle("a.example"), a)  # reused: now the most recently returned
        self.assertEqual(len(self.peers.connections), 3)
        timeouts = {t: self.pool._timeouts[p] for _, p, t in self.peers.connections}
        d = self.idle("d.example")
        self.assertEqual([t for t in (a, b, c, d) if t.disconnecting], [b])
        e = self.idle("e.example")
        self.assertEqual([t for t in (a, b, c, d, e) if t.disconnecting], [b, c])
        self.assertTrue(timeouts[b].cancelled)
        self.assertTrue(timeouts[c].cancelled)
        self.assertFalse(timeouts[a].cancelled)
        self.assertEqual(self.idle_count(), 3)
        self.assertEqual(len(self.pool._timeouts), 3)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 3)
        # The remaining ones time out as Twisted's bookkeeping says, and only they.
        self.reactor.advance(self.pool.cachedConnectionTimeout)
        self.assertTrue(all(t.disconnecting for t in (a, d, e)))
        self.assertEqual(self.idle_count(), 0)
        self.assertEqual(self.pool._timeouts, {})

    def test_reused_connection_counted_once(self) -> None:
        """A connection taken out of the pool and returned, again and again, is one idle
        connection, not one per return."""
        self.pool.maxPersistentTotal = 2
        a = self.idle("a.example")
        for _ in range(5):
            self.assertIs(self.idle("a.example"), a)
        b = self.idle("b.example")
        self.assertEqual([t for t in (a, b) if t.disconnecting], [])
        self.assertEqual(self.idle_count(), 2)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 2)

    def test_connection_in_use_not_counted(self) -> None:
        """A connection taken out of the pool is not idle: the cap neither counts nor closes it."""
        self.pool.maxPersistentTotal = 1
        a = self.idle("a.example")
        response, transport = self.start("a.example")
        self.assertIs(transport, a)
        b = self.idle("b.example")
        self.assertFalse(a.disconnecting)
        self.answer(response, a)
        self.assertEqual([t for t in (a, b) if t.disconnecting], [b])

    def test_per_host_limit(self) -> None:
        """At most maxPersistentPerHost idle connections per host: a further one returned
        closes that host's oldest, which the overall cap no longer counts."""
        self.pool.maxPersistentPerHost = 2
        self.pool.maxPersistentTotal = 3
        started = [self.start("a.example") for _ in range(3)]
        for response, transport in started:
            self.answer(response, transport)
        [first, second, third] = [transport for _, transport in started]
        self.assertEqual([t for t in (first, second, third) if t.disconnecting], [first])
        self.assertEqual(self.idle_count(), 2)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 2)
        b = self.idle("b.example")
        self.assertEqual([t for t in (second, third, b) if t.disconnecting], [])
        self.idle("c.example")
        self.assertEqual([t for t in (second, third, b) if t.disconnecting], [second])
        self.assertEqual(self.idle_count(), 3)

    def test_close_cached_connections_closes_all(self) -> None:
        """closeCachedConnections closes every idle connection and cancels every timeout;
        the cap counts afresh afterwards."""
        self.pool.maxPersistentTotal = 3
        transports = [self.idle(host) for host in ("a.example", "b.example", "c.example")]
        closed = self.pool.closeCachedConnections()
        self.assertTrue(all(t.disconnecting for t in transports))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        for _, protocol, _ in self.peers.connections:
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(closed))
        again = [self.idle(host) for host in ("d.example", "e.example", "f.example")]
        self.assertEqual([t for t in again if t.disconnecting], [])
        self.assertEqual(self.idle_count(), 3)

    def test_hosts_without_idle_connections_forgotten(self) -> None:
        """A host whose idle connections were all taken, closed or timed out leaves no entry
        behind: thousands of names contacted once cost nothing once their connections end."""
        self.pool.maxPersistentTotal = 1
        self.idle("a.example")
        self.idle("b.example")  # closes a's connection
        self.assertEqual(self.idle_count(), 1)
        self.assertEqual(len(self.pool._connections), 1)
        response, transport = self.start("b.example")  # takes b's connection
        self.assertEqual(self.pool._connections, {})
        self.answer(response, transport)
        self.reactor.advance(self.pool.cachedConnectionTimeout)
        self.assertEqual(self.pool._connections, {})
        self.assertEqual(self.pool._timeouts, {})


@implementer(IAgentEndpointFactory)
class _HeadLimitingPeers:
    """``_MemoryPeers`` whose connections bound response heads as the agents' do: each
    connection's ``protocol`` is the limiter, which the tests feed."""

    def __init__(self, peers: _MemoryPeers) -> None:
        self._peers = peers

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return HeadLimitingEndpoint(self._peers.endpointForURI(uri))


#: Status lines twisted.web reads as 100 (``int(codeBytes)``, any version it can split),
#: so skips as interim, though they are not "HTTP/1.x" and a 3-digit code.
_ODD_INTERIM_STATUS_LINES = [
    b"HTTP/1.1 0100 Continue",
    b"HTTP/1.1 +100 Continue",
    b"HTTP/1.1 1_00 Continue",
    b"HTTP/1.1 \t100 Continue",
    b"HTTP/1.1 100\x0b Continue",
    b"HTTP/1.1 100\r",  # one CR is dropped with the LF, then int(b"100\r")
    b"HTTP/0000001.1 100 Continue",
    b"HTTP/01.1 100 Continue",
    b"http/1.1 100 Continue",
    b"XYZ/1.1 100 Continue",
    b"HTTP/1.1 00000000000000100 Continue",
]


class StatusLineTests(SynchronousTestCase):
    """The head limiter and twisted.web's parser always agree on where a response head
    ends: a status line that is not "HTTP/1.x", a space and a 3-digit code (then a space
    or the line's end) is refused, whatever twisted.web would make of it; at most
    ``MAX_INTERIM_HEADS`` interim (1xx) heads precede the final one. Each answer is fed
    at once and byte by byte."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.peers = _MemoryPeers()
        self.new_pool()

    def new_pool(self) -> None:
        """Start afresh with no connection to reuse (twisted.web retries a request that
        failed on a reused connection, once, on a new one)."""
        self.agent = Agent.usingEndpointFactory(
            self.reactor, _HeadLimitingPeers(self.peers), pool=make_connection_pool(self.reactor)
        )

    def answer(self, data: bytes, piece: int) -> Deferred[Any]:
        """Send a request, answer it with ``data`` in pieces of ``piece`` bytes (0: at
        once); the response's Deferred."""
        response = self.agent.request(b"GET", b"http://peer.example/")
        [(protocol, transport)] = [(p, t) for _, p, t in self.peers.connections if t.value()]
        transport.clear()
        pieces = [data] if not piece else [data[i : i + piece] for i in range(len(data))]
        for one in pieces:
            if transport.disconnected:
                break
            protocol.dataReceived(one)
        if transport.disconnected:
            protocol.connectionLost(Failure(ConnectionDone()))
        return response

    def refused(self, data: bytes, reason: str) -> None:
        for piece in (0, 1):
            self.new_pool()
            with capturedLogs() as events:
                response = self.answer(data, piece)
            failure = self.failureResultOf(response, ResponseFailed)
            [cause] = failure.value.reasons
            self.assertIsInstance(cause.value, ResponseHeadRefused)
            self.assertEqual(str(cause.value), reason)
            self.assertTrue(self.peers.connections[-1][2].disconnected)
            self.assertLessEqual(len(_ignored_interim(events)), MAX_INTERIM_HEADS)

    def accepted(self, data: bytes) -> None:
        for piece in (0, 1):
            self.assertEqual(self.successResultOf(self.answer(data, piece)).code, 200)

    def test_odd_interim_status_lines(self) -> None:
        """Each spelling of 100 that twisted.web skips as interim, followed by a final head
        of 200 header lines, is refused at its status line: the final head's limits hold."""
        for status_line in _ODD_INTERIM_STATUS_LINES:
            with self.subTest(status_line=status_line):
                self.refused(
                    status_line + b"\r\n\r\n" + _head(200),
                    _malformed(status_line),
                )

    def test_odd_final_status_lines(self) -> None:
        """So are other spellings of a final status, and an empty or short status line."""
        for status_line in (b"HTTP/1.1 0200 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1  200 OK"):
            with self.subTest(status_line=status_line):
                self.refused(
                    status_line + b"\r\n" + _head(1)[17:],
                    _malformed(status_line),
                )
        self.refused(b"\r\n" + _head(1), "malformed status line: b'\\r\\n'")
        self.refused(b"HTTP/1.1\r\n" + _head(1), "malformed status line: b'HTTP/1.1\\r\\n'")

    def test_usual_status_lines(self) -> None:
        """Status lines as servers write them are read: either version, without a reason
        phrase (with or without the space before it), with a long one, LF-only lines."""
        rest = _head(1)[len(b"HTTP/1.1 200 OK\r\n") :]
        for status_line in (
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.0 200 OK\r\n",
            b"HTTP/1.1 200\r\n",
            b"HTTP/1.1 200\n",
            b"HTTP/1.1 200 \r\n",
            b"HTTP/1.1 200 " + b"x" * 2000 + b"\r\n",
        ):
            with self.subTest(status_line=status_line):
                self.accepted(status_line + rest)
        self.accepted(b"HTTP/1.1 200 OK\nContent-Length: 2\n\n{}")

    def test_interim_heads(self) -> None:
        """Up to MAX_INTERIM_HEADS interim heads (each a twisted.web log line) are skipped;
        one more is refused at its status line, before twisted.web reads it."""
        # README.md, limits table: "at most 4 interim heads per response".
        self.assertEqual(MAX_INTERIM_HEADS, 4)
        interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        for piece in (0, 1):
            with capturedLogs() as events:
                response = self.answer(interim * (MAX_INTERIM_HEADS // 2) + _head(1), piece)
            self.assertEqual(self.successResultOf(response).code, 200)
            self.assertEqual(len(_ignored_interim(events)), MAX_INTERIM_HEADS)
        self.refused(
            interim * (MAX_INTERIM_HEADS // 2) + b"HTTP/1.1 102 Processing\r\n\r\n" + _head(1),
            f"more than {MAX_INTERIM_HEADS} interim (1xx) responses",
        )

    def test_interim_heads_counted_per_response(self) -> None:
        """The interim heads of one response do not count against the next one's on a
        kept-alive connection."""
        answer = b"HTTP/1.1 100 Continue\r\n\r\n" * MAX_INTERIM_HEADS + _head(1)
        for _ in range(3):
            response = self.successResultOf(self.answer(answer, 0))
            self.assertEqual(response.code, 200)
            self.assertEqual(self.successResultOf(read_body(response, 10)), b"{}")
        self.assertEqual(len(self.peers.connections), 1)


def _malformed(status_line: bytes) -> str:
    """The reason a status line is refused with: it names the line's first 14 bytes."""
    return f"malformed status line: {(status_line + CRLF)[:14]!r}"


CRLF = b"\r\n"


def _ignored_interim(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if "Ignoring unexpected" in (e.get("log_format") or "")]


#: A 200 answer carrying the JSON ``{}``.
_JSON_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
#: How a request failed by a connection closed without an answer is described.
_LOST = "connection failed: Connection to the other side was lost in a non-clean fashion."
REMOTE_NAME = "remote.example"
_INVITE_PATH = "/_matrix/federation/v2/invite/%21r%3Aremote.example/%24e"
_KEY_QUERY_PATH = "/_matrix/key/v2/query"


class StaleConnectionTests(SynchronousTestCase):
    """A request sent on a pooled keep-alive connection that the peer closes before any byte
    of an answer (its idle close crossing our request) is sent once more on a new connection,
    whatever its method (twisted.web alone does so only for GET and a few others without a
    body), and only that second try counts in the back-off. A request failing so on a new
    connection, or a second time, fails as before."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.peers = _MemoryPeers()
        self.pool = make_connection_pool(self.reactor)
        self.agent = Agent.usingEndpointFactory(
            self.reactor, _HeadLimitingPeers(self.peers), pool=self.pool
        )
        self.client = FederationClient(
            self.reactor, "local.example", generate_signing_key("k"), agent=self.agent, timeout=10
        )

    def sent(self, number: int) -> bytes:
        """What went out on connection ``number`` (in the order opened) since last asked."""
        transport = self.peers.connections[number][2]
        data = transport.value()
        transport.clear()
        return data

    def answer(self, number: int, data: bytes = _JSON_RESPONSE) -> None:
        self.peers.connections[number][1].dataReceived(data)

    def close(self, number: int) -> None:
        """The peer closes connection ``number`` at once (a reset: the close was not clean)."""
        self.peers.connections[number][1].connectionLost(Failure(ConnectionLost()))

    def reuse(self) -> None:
        """A GET answered on a new connection, which the pool then keeps idle."""
        getting = self.client.get_json(REMOTE_NAME, "/x")
        self.assertTrue(self.sent(len(self.peers.connections) - 1).startswith(b"GET /x "))
        self.answer(len(self.peers.connections) - 1)
        self.assertEqual(self.successResultOf(getting), {})
        self.assertEqual(sum(len(c) for c in self.pool._connections.values()), 1)

    def put(self) -> Deferred[Any]:
        return self.client.put_json(REMOTE_NAME, _INVITE_PATH, {"event": 1})

    def post(self) -> Deferred[Any]:
        return self.client.post_json(REMOTE_NAME, _KEY_QUERY_PATH, {"server_keys": {}})

    def resent(self, send: Callable[[], Deferred[Any]], method: bytes) -> None:
        """``send`` on a reused connection closed without an answer goes out again, the
        same bytes (head, signature and body), on a new connection, which answers."""
        self.reuse()
        sending = send()
        first = self.sent(0)
        self.assertTrue(first.startswith(method + b" "), first)
        self.close(0)
        self.assertNoResult(sending)
        self.assertEqual(len(self.peers.connections), 2)
        self.assertEqual(self.sent(1), first)
        self.answer(1)
        self.assertEqual(self.successResultOf(sending), {})
        self.assertEqual(self.client._backoff, {})
        # The new connection is pooled; the next request goes out on it.
        self.assertNoResult(self.client.get_json(REMOTE_NAME, "/x"))
        self.assertTrue(self.sent(1).startswith(b"GET /x "))
        self.assertEqual(len(self.peers.connections), 2)

    def test_put_resent_on_new_connection(self) -> None:
        """An invite PUT on a reused connection closed without an answer is sent again on
        a new connection and succeeds; no back-off."""
        self.resent(self.put, b"PUT")

    def test_post_resent_on_new_connection(self) -> None:
        """A key query POST on a reused connection closed without an answer is sent again
        on a new connection and succeeds; no back-off."""
        self.resent(self.post, b"POST")

    def test_get_resent_on_new_connection(self) -> None:
        """A GET, which twisted.web already sends again, is sent again once, as before."""
        self.resent(lambda: self.client.get_json(REMOTE_NAME, "/y"), b"GET")

    def test_request_not_sent_resent(self) -> None:
        """A reused connection found closed before the request was written (twisted.web's
        RequestNotSent) sends it on a new connection."""
        self.reuse()
        [[connection]] = self.pool._connections.values()
        taking = self.pool.getConnection

        def take(key: Any, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
            taken = taking(key, endpoint)
            connection._state = "CONNECTION_LOST"  # lost between being taken and used
            return taken

        self.patch(self.pool, "getConnection", take)
        sending = self.put()
        self.assertEqual(self.sent(0), b"")
        self.assertEqual(len(self.peers.connections), 2)
        self.assertTrue(self.sent(1).startswith(b"PUT "))
        self.answer(1)
        self.assertEqual(self.successResultOf(sending), {})
        self.assertEqual(self.client._backoff, {})

    def failed_again(self, send: Callable[[], Deferred[Any]]) -> None:
        """Sent again after a reused connection closed, and that new connection closed
        too: the usual TransportError, the server backed off, no third connection."""
        self.reuse()
        sending = send()
        self.close(0)
        self.assertEqual(len(self.peers.connections), 2)
        self.close(1)
        error = self.failureResultOf(sending, TransportError).value
        self.assertEqual(error.reason, _LOST)
        self.assertEqual(len(self.peers.connections), 2)
        self.failureResultOf(self.client.get_json(REMOTE_NAME, "/x"), BackoffError)
        self.assertEqual(len(self.peers.connections), 2)

    def test_put_fails_second_time(self) -> None:
        """A PUT sent again is not sent a third time."""
        self.failed_again(self.put)

    def test_post_fails_second_time(self) -> None:
        """A POST sent again is not sent a third time."""
        self.failed_again(self.post)

    def test_get_fails_second_time(self) -> None:
        """A GET sent again (by twisted.web) is not sent a third time: no double retry."""
        self.failed_again(lambda: self.client.get_json(REMOTE_NAME, "/y"))

    def test_new_connection_not_resent(self) -> None:
        """A request on a new connection closed without an answer fails at once, as
        before, and backs the server off: PUT, POST and GET alike."""
        for number, send in enumerate(
            [self.put, self.post, lambda: self.client.get_json(REMOTE_NAME, "/y")]
        ):
            self.client._backoff.clear()
            sending = send()
            self.assertEqual(len(self.peers.connections), number + 1)
            self.close(number)
            error = self.failureResultOf(sending, TransportError).value
            self.assertEqual(error.reason, _LOST)
            self.assertEqual(len(self.peers.connections), number + 1)
            self.failureResultOf(self.client.get_json(REMOTE_NAME, "/x"), BackoffError)

    def test_answer_begun_not_resent(self) -> None:
        """A reused connection closed after part of the answer arrived: the request was
        received, so it is not sent again."""
        self.reuse()
        sending = self.put()
        self.answer(0, b"HTTP/1.1 200 OK\r\n")
        self.close(0)
        error = self.failureResultOf(sending, TransportError).value
        self.assertEqual(error.reason, _LOST)
        self.assertEqual(len(self.peers.connections), 1)
        self.failureResultOf(self.client.get_json(REMOTE_NAME, "/x"), BackoffError)

    def test_refused_head_not_resent(self) -> None:
        """A reused connection aborted by the head limits is a refusal, not a close."""
        self.reuse()
        sending = self.put()
        self.answer(0, b"HTTP/1.1 0100 Continue\r\n\r\n")
        self.close(0)
        error = self.failureResultOf(sending, TransportError).value
        self.assertEqual(error.reason, "malformed status line: b'HTTP/1.1 0100 '")
        self.assertEqual(len(self.peers.connections), 1)

    def test_resent_within_timeout(self) -> None:
        """The second try has what is left of the request's timeout, no more."""
        self.reuse()
        sending = self.put()
        self.reactor.advance(4)
        self.close(0)
        self.assertEqual(len(self.peers.connections), 2)
        self.reactor.advance(5.9)
        self.assertNoResult(sending)
        self.reactor.advance(0.1)
        error = self.failureResultOf(sending, TransportError).value
        self.assertEqual(error.reason, "timed out after 10 s")
        self.assertTrue(self.peers.connections[1][2].disconnecting)
        self.assertEqual(len(self.peers.connections), 2)

    def test_cancelled_not_resent(self) -> None:
        """A request its caller cancels on a reused connection is not sent again."""
        self.reuse()
        sending = self.put()
        sending.cancel()
        self.failureResultOf(sending, CancelledError)
        self.close(0)
        self.assertEqual(len(self.peers.connections), 1)
        self.assertEqual(self.client._backoff, {})

    def test_body_that_cannot_be_resent(self) -> None:
        """A body producer other than the client's in-memory one may not write its body
        twice: such a request is not sent again."""
        self.reuse()
        body = FileBodyProducer(BytesIO(b"{}"), cooperator=Cooperator(scheduler=lambda f: f()))
        sending = self.agent.request(b"PUT", b"https://" + REMOTE_NAME.encode() + b"/x", None, body)
        self.close(0)
        failure = self.failureResultOf(sending, ResponseNeverReceived)
        self.assertTrue(failure.value.reasons[0].check(ConnectionLost))
        self.assertEqual(len(self.peers.connections), 1)


class _DroppingServer(Protocol):
    """A TLS peer logging each request (``b"conn<n> <request line>"``, connections numbered
    from 1) and answering it ``{}``, except that connection n drops (aborts) the request
    after its first ``test.answers[n - 1]`` unanswered, as a server closing an idle
    keep-alive connection when the request crosses the close."""

    def __init__(self, test: StaleConnectionLoopbackTests) -> None:
        self._test = test
        test.opened += 1
        self._number = test.opened
        self._answered = 0
        self._received = b""

    def connectionMade(self) -> None:
        self._test.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        while b"\r\n\r\n" in self._received:
            head, rest = self._received.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self._received = rest[length:]
            self._test.log.append(b"conn%d " % self._number + head.split(b"\r\n")[0])
            transport: Any = self.transport
            answers = self._test.answers
            if self._number <= len(answers) and self._answered == answers[self._number - 1]:
                transport.abortConnection()
                return
            self._answered += 1
            transport.write(_JSON_RESPONSE)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._test.connections.remove(self)


class StaleConnectionLoopbackTests(_LoopbackClientMixin, TestCase):
    """The stale keep-alive case end to end, through FederationClient's own agent (server
    discovery, IP filter, TLS) to a real TLS server: the PUT and the POST each go out on a
    kept-alive connection the server drops unanswered, are sent again on a new connection
    to the same address, and succeed; nothing is backed off."""

    timeout = 20

    def setUp(self) -> None:
        cert_pem, key_pem = make_certificate(["matrix.test"], ["127.0.0.1"])
        options = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()
        self.connections: list[Any] = []
        self.log: list[bytes] = []
        self.opened = 0
        self.answers: list[int] = []
        factory = Factory.forProtocol(lambda: _DroppingServer(self))
        port = real_reactor.listenSSL(0, factory, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.destination = f"127.0.0.1:{port.getHost().port}"

    async def test_put_and_post_resent(self) -> None:
        """Connection 1 answers a GET and drops the PUT, which connection 2 answers; it
        drops the POST, which connection 3 answers, then a GET."""
        self.answers = [1, 1]
        client = self.client()
        self.assertEqual(await client.get_json(self.destination, "/_matrix/key/v2/server"), {})
        invite = _INVITE_PATH
        self.assertEqual(await client.put_json(self.destination, invite, {"event": 1}), {})
        query = {"server_keys": {}}
        self.assertEqual(await client.post_json(self.destination, _KEY_QUERY_PATH, query), {})
        self.assertEqual(client._backoff, {})
        self.assertEqual(await client.get_json(self.destination, "/_matrix/key/v2/server"), {})
        put = f"PUT {invite} HTTP/1.1".encode()
        post = f"POST {_KEY_QUERY_PATH} HTTP/1.1".encode()
        get = b"GET /_matrix/key/v2/server HTTP/1.1"
        self.assertEqual(
            self.log,
            [
                b"conn1 " + get,
                b"conn1 " + put,
                b"conn2 " + put,
                b"conn2 " + post,
                b"conn3 " + post,
                b"conn3 " + get,
            ],
        )

    async def test_put_on_new_connection_fails(self) -> None:
        """A PUT the server drops on a new connection is not sent again: it fails and backs
        the server off, as before."""
        self.answers = [0]
        client = self.client()
        with self.assertRaises(TransportError) as caught:
            await client.put_json(self.destination, _INVITE_PATH, {"event": 1})
        self.assertTrue(caught.exception.reason.startswith("connection failed: "), caught.exception)
        self.assertEqual(self.log, [f"conn1 PUT {_INVITE_PATH} HTTP/1.1".encode()])
        with self.assertRaises(BackoffError):
            await client.get_json(self.destination, "/_matrix/key/v2/server")
