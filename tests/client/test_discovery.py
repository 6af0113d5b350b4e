"""Tests for federation_invite.client.discovery: server-server-api.md "Resolving server names"."""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any
from unittest import mock

import attrs
from signedjson.key import generate_signing_key
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError, DomainError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from zope.interface import implementer

from federation_invite import __version__
from federation_invite.client import (
    BackoffError,
    FederationAgent,
    FederationClient,
    FederationTLSPolicy,
    IPRangeFilter,
    TransportError,
    discovery,
)
from federation_invite.client.discovery import (
    WELL_KNOWN_DEFAULT_TTL,
    WELL_KNOWN_DOWN_TTL,
    WELL_KNOWN_ERROR_MAX_TTL,
    WELL_KNOWN_ERROR_TTL,
    WELL_KNOWN_MAX_BYTES,
    WELL_KNOWN_MAX_TTL,
    WELL_KNOWN_MIN_TTL,
    WELL_KNOWN_TIMEOUT,
    ResolvedServer,
    ServerResolver,
    ServiceUnavailableError,
    SrvLookupError,
    cache_period,
)
from federation_invite.client.testing import FakePeersAgent
from federation_invite.config import DEFAULT_IP_BLOCKLIST
from federation_invite.keyring import Keyring
from federation_invite.outbound import InviteSender, InviteTransportError, build_test_invite
from federation_invite.signer import LocalSigner

from ..support import MemoryStore, local_verify_key
from ._fakes import CannedResource, FakeHostnameResolver, FakeSRVResolver

WELL_KNOWN_PATH = b"/.well-known/matrix/server"
ORIGIN_URI = b"https://example.org" + WELL_KNOWN_PATH


def _srv(owner: bytes, priority: int, weight: int, port: int, target: bytes) -> dns.RRHeader:
    """An SRV answer with the names' bytes as given (``FakeSRVResolver.records`` IDNA-encodes)."""
    return dns.RRHeader(
        name=owner, type=dns.SRV, payload=dns.Record_SRV(priority, weight, port, target)
    )


class _FixedRandom(random.Random):
    """Draws ``uniform(a, b)`` as ``a + (b - a) * fraction``, for a chosen fraction."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


class _CountingRandom(random.Random):
    """Counts the weighted draws (``uniform``)."""

    def __init__(self) -> None:
        super().__init__(3)
        self.draws = 0

    def uniform(self, a: float, b: float) -> float:
        self.draws += 1
        return super().uniform(a, b)


class _RedirectResource(Resource):
    isLeaf = True

    def __init__(self, location: bytes, code: int = 302) -> None:
        super().__init__()
        self.location = location
        self.code = code

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"Location", self.location)
        return b""


@implementer(IPushProducer)
@attrs.define(eq=False)
class _BodyTransport:
    """What a body protocol gets as its transport; records being stopped."""

    stopped: bool = False

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


@implementer(IResponse)
@attrs.define(eq=False)
class _RecordedResponse:
    """A response whose body is delivered at once to whoever asks, recording its fate."""

    code: int
    headers: Headers
    body: bytes
    version: tuple[bytes, int, int] = (b"HTTP", 1, 1)
    phrase: bytes = b""
    length: Any = UNKNOWN_LENGTH
    request: Any = None
    previousResponse: Any = None
    transport: _BodyTransport = attrs.Factory(_BodyTransport)
    #: The body was delivered to the end (connectionLost with ResponseDone).
    read: bool = False

    def deliverBody(self, protocol: Protocol) -> None:
        protocol.makeConnection(self.transport)  # type: ignore[arg-type]
        if self.body:
            protocol.dataReceived(self.body)
        self.read = True
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    @property
    def released(self) -> bool:
        """Its body was read to the end, or its connection dropped."""
        return self.read or self.transport.stopped


@implementer(IAgent)
class _RecordingAgent:
    """Answers each URI from ``answers`` (code, headers, body); keeps every response given."""

    def __init__(self, answers: dict[bytes, tuple[int, dict[bytes, bytes], bytes]]) -> None:
        self.answers = answers
        self.responses: list[tuple[bytes, _RecordedResponse]] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        code, raw_headers, body = self.answers[uri]
        response = _RecordedResponse(
            code, Headers({name: [value] for name, value in raw_headers.items()}), body
        )
        self.responses.append((uri, response))
        return succeed(response)


class _Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.peers = FakePeersAgent()
        self.srv = FakeSRVResolver()
        self.resolver = ServerResolver(self.clock, self.peers, self.srv, random=random.Random(4))

    def well_known(
        self, hostname: str, body: Any, code: int = 200, **headers: bytes
    ) -> CannedResource:
        """Serve ``body`` as https://hostname/.well-known/matrix/server."""
        raw_headers = {name.replace("_", "-").encode(): value for name, value in headers.items()}
        resource = CannedResource(code, body, raw_headers)
        self.peers.add_peer(hostname, resource)
        return resource

    def resolve(self, server_name: str) -> tuple[ResolvedServer, list[tuple[str, int]]]:
        server = self.successResultOf(self.resolver.resolve_server(server_name))
        targets = self.successResultOf(self.resolver.resolve_targets(server))
        return server, targets

    def assertRoute(
        self,
        server_name: str,
        targets: list[tuple[str, int]],
        host_header: str,
        tls_name: str,
    ) -> ResolvedServer:
        server, got_targets = self.resolve(server_name)
        self.assertEqual(got_targets, targets)
        self.assertEqual(server.host_header, host_header)
        self.assertEqual(server.tls_name, tls_name)
        self.assertEqual(server.server_name, server_name)
        return server


class LiteralAndPortTests(_Base):
    def test_ipv4_literal_without_port(self) -> None:
        """Step 1: an IPv4 literal is used on 8448; Host is the server name; no lookups."""
        self.assertRoute("1.2.3.4", [("1.2.3.4", 8448)], "1.2.3.4", "1.2.3.4")
        self.assertEqual(self.peers.requests, [])
        self.assertEqual(self.srv.lookups, [])

    def test_ipv4_literal_with_port(self) -> None:
        """Step 1: the literal's port is used, and kept in the Host header."""
        self.assertRoute("1.2.3.4:8080", [("1.2.3.4", 8080)], "1.2.3.4:8080", "1.2.3.4")
        self.assertEqual(self.peers.requests, [])

    def test_ipv6_literal(self) -> None:
        """Step 1: an IPv6 literal connects unbracketed; Host keeps the brackets."""
        self.assertRoute("[2001:db8::1]", [("2001:db8::1", 8448)], "[2001:db8::1]", "2001:db8::1")
        self.assertRoute(
            "[2001:db8::1]:8443", [("2001:db8::1", 8443)], "[2001:db8::1]:8443", "2001:db8::1"
        )
        self.assertEqual(self.srv.lookups, [])

    def test_hostname_with_port(self) -> None:
        """Step 2: explicit port, no .well-known or SRV; Host is name:port, TLS the hostname."""
        self.srv.records["_matrix-fed._tcp.example.org"] = [(0, 0, 443, "other.example")]
        self.assertRoute(
            "example.org:1234", [("example.org", 1234)], "example.org:1234", "example.org"
        )
        self.assertEqual(self.peers.requests, [])
        self.assertEqual(self.srv.lookups, [])

    def test_invalid_server_name(self) -> None:
        """A name outside the grammar fails with ValueError before any lookup."""
        self.failureResultOf(self.resolver.resolve_server("bad name"), ValueError)
        self.failureResultOf(self.resolver.resolve_server("example.org:0"), ValueError)
        self.assertEqual(self.peers.requests, [])


class WellKnownDelegationTests(_Base):
    def test_fetches_well_known_url(self) -> None:
        """Step 3: GET https://<hostname>/.well-known/matrix/server, saying who asks
        (User-Agent, for the site's operators)."""
        resource = self.well_known("example.org", {"m.server": "delegated.example:443"})
        self.resolve("example.org")
        self.assertEqual(self.peers.requests[0][1], b"https://example.org" + WELL_KNOWN_PATH)
        self.assertEqual(resource.requests[0]["method"], b"GET")
        self.assertEqual(
            resource.requests[0]["headers"].getRawHeaders(b"user-agent"),
            [f"federation-invite/{__version__}".encode()],
        )

    def test_delegated_host_and_port(self) -> None:
        """Step 3.2: delegated host:port; Host is "<delegated>:<port>", TLS the delegated host."""
        self.well_known("example.org", {"m.server": "matrix.example.net:8443"})
        server = self.assertRoute(
            "example.org",
            [("matrix.example.net", 8443)],
            "matrix.example.net:8443",
            "matrix.example.net",
        )
        self.assertEqual(server.effective_name, "matrix.example.net:8443")
        self.assertEqual(self.srv.lookups, [])

    def test_delegated_host_srv(self) -> None:
        """Step 3.3: delegated host without port uses _matrix-fed._tcp SRV; Host and TLS stay the delegated host."""
        self.well_known("example.org", {"m.server": "matrix.example.net"})
        self.srv.records["_matrix-fed._tcp.matrix.example.net"] = [
            (10, 0, 4443, "srv-target.example")
        ]
        server = self.assertRoute(
            "example.org",
            [("srv-target.example", 4443)],
            "matrix.example.net",
            "matrix.example.net",
        )
        # Connections are pooled per effective name: a changed delegation uses new ones.
        self.assertEqual(server.effective_name, "matrix.example.net")
        self.assertEqual(self.srv.lookups, ["_matrix-fed._tcp.matrix.example.net"])

    def test_delegated_host_deprecated_srv(self) -> None:
        """Step 3.4: without _matrix-fed, the deprecated _matrix._tcp SRV of the delegated host."""
        self.well_known("example.org", {"m.server": "matrix.example.net"})
        self.srv.records["_matrix._tcp.matrix.example.net"] = [(10, 0, 5555, "old-srv.example")]
        self.assertRoute(
            "example.org", [("old-srv.example", 5555)], "matrix.example.net", "matrix.example.net"
        )
        self.assertEqual(
            self.srv.lookups,
            ["_matrix-fed._tcp.matrix.example.net", "_matrix._tcp.matrix.example.net"],
        )

    def test_delegated_host_no_srv(self) -> None:
        """Step 3.5: no SRV at all: the delegated host on 8448."""
        self.well_known("example.org", {"m.server": "matrix.example.net"})
        self.assertRoute(
            "example.org",
            [("matrix.example.net", 8448)],
            "matrix.example.net",
            "matrix.example.net",
        )

    def test_delegated_ip_literal(self) -> None:
        """Step 3.1: a delegated IP literal is used directly; Host is the IP (with port if given)."""
        self.well_known("a.example", {"m.server": "5.6.7.8"})
        self.well_known("b.example", {"m.server": "5.6.7.8:1234"})
        self.well_known("c.example", {"m.server": "[2001:db8::2]:1234"})
        routes = [
            self.assertRoute("a.example", [("5.6.7.8", 8448)], "5.6.7.8", "5.6.7.8"),
            self.assertRoute("b.example", [("5.6.7.8", 1234)], "5.6.7.8:1234", "5.6.7.8"),
            self.assertRoute(
                "c.example", [("2001:db8::2", 1234)], "[2001:db8::2]:1234", "2001:db8::2"
            ),
        ]
        self.assertEqual(self.srv.lookups, [])
        self.assertEqual(
            [server.effective_name for server in routes],
            ["5.6.7.8", "5.6.7.8:1234", "[2001:db8::2]:1234"],
        )

    def test_redirect_followed(self) -> None:
        """30x redirects are followed to the document."""
        self.peers.add_peer(
            "example.org", _RedirectResource(b"https://www.example.org" + WELL_KNOWN_PATH)
        )
        self.well_known("www.example.org", {"m.server": "matrix.example.net:443"})
        self.assertRoute(
            "example.org",
            [("matrix.example.net", 443)],
            "matrix.example.net:443",
            "matrix.example.net",
        )

    def test_redirect_loop_falls_through(self) -> None:
        """A redirect loop is abandoned (bounded) and discovery continues with SRV/8448."""
        self.peers.add_peer(
            "example.org", _RedirectResource(b"https://example.org" + WELL_KNOWN_PATH, 301)
        )
        self.assertRoute("example.org", [("example.org", 8448)], "example.org", "example.org")
        self.assertLessEqual(len(self.peers.requests), 6)

    def test_redirect_to_http_refused(self) -> None:
        """A redirect to plain http is not followed; discovery falls through."""
        self.peers.add_peer(
            "example.org", _RedirectResource(b"http://insecure.example" + WELL_KNOWN_PATH)
        )
        self.well_known("insecure.example", {"m.server": "evil.example:1"})
        self.assertRoute("example.org", [("example.org", 8448)], "example.org", "example.org")
        self.assertEqual(len(self.peers.requests), 1)


class WellKnownInvalidTests(_Base):
    def assertFallsThrough(self, fetched: bool = True) -> None:
        self.srv.records["_matrix-fed._tcp.example.org"] = [(0, 0, 8443, "fed.example.org")]
        server = self.assertRoute(
            "example.org", [("fed.example.org", 8443)], "example.org", "example.org"
        )
        self.assertEqual(server.effective_name, "example.org")
        self.assertEqual(len(self.peers.requests), 1)
        self.assertEqual(self.peers.requests[0][1], b"https://example.org" + WELL_KNOWN_PATH)

    def test_not_json(self) -> None:
        """Step 3: a body that is not JSON falls through to step 4 (SRV for the hostname)."""
        self.well_known("example.org", b"<html>hello</html>")
        self.assertFallsThrough()

    def test_not_an_object(self) -> None:
        """A JSON array is invalid and falls through."""
        self.well_known("example.org", ["m.server"])
        self.assertFallsThrough()

    def test_missing_m_server(self) -> None:
        """An object without m.server falls through."""
        self.well_known("example.org", {"m.homeserver": "x"})
        self.assertFallsThrough()

    def test_m_server_not_a_string(self) -> None:
        """m.server that is not a string falls through."""
        self.well_known("example.org", {"m.server": 8448})
        self.assertFallsThrough()

    def test_m_server_not_a_server_name(self) -> None:
        """m.server outside the server-name grammar falls through."""
        self.well_known("example.org", {"m.server": "https://matrix.example.net/"})
        self.assertFallsThrough()

    def test_non_200(self) -> None:
        """A non-200 answer, even with a valid-looking body, falls through."""
        self.well_known("example.org", {"m.server": "x.example:1"}, code=404)
        self.assertFallsThrough()

    def test_other_2xx(self) -> None:
        """A 2xx other than 200 is non-200 too (the spec's "non-200 response"; Synapse
        refuses it as well): a 203 with a valid-looking body falls through."""
        self.well_known("example.org", {"m.server": "x.example:1"}, code=203)
        self.assertFallsThrough()

    def test_too_large(self) -> None:
        """A body over 50 KiB is not read and falls through."""
        padding = "x" * WELL_KNOWN_MAX_BYTES
        self.well_known("example.org", {"m.server": "x.example:1", "pad": padding})
        self.assertFallsThrough()

    def test_just_under_size_limit(self) -> None:
        """A body of exactly 50 KiB is still read and used."""
        document = b'{"m.server": "x.example:1", "pad": "'
        document += b"x" * (WELL_KNOWN_MAX_BYTES - len(document) - 2) + b'"}'
        self.assertEqual(len(document), WELL_KNOWN_MAX_BYTES)
        self.well_known("example.org", document)
        server, _ = self.resolve("example.org")
        self.assertEqual(server.effective_name, "x.example:1")

    def test_too_large_without_length(self) -> None:
        """A chunked body (no Content-Length) that grows past 50 KiB is cut off and falls through."""
        chunks = [b'{"m.server": "x.example:1", "p": "'] + [b"y" * 4096] * 13 + [b'"}']
        self.peers.add_peer("example.org", CannedResource(chunks=chunks))
        self.assertFallsThrough()

    def test_chunked_under_limit(self) -> None:
        """The same chunked body under 50 KiB is read and used."""
        chunks = [b'{"m.server": "x.example:1", "p": "'] + [b"y" * 4096] * 12 + [b'"}']
        self.peers.add_peer("example.org", CannedResource(chunks=chunks))
        server, _ = self.resolve("example.org")
        self.assertEqual(server.effective_name, "x.example:1")

    def test_unreachable(self) -> None:
        """A host with no reachable .well-known falls through to SRV."""
        self.assertFallsThrough()

    def test_timeout(self) -> None:
        """A .well-known fetch that hangs is abandoned after its timeout and falls through."""
        self.peers.add_peer("example.org", CannedResource(hang=True))
        self.srv.records["_matrix-fed._tcp.example.org"] = [(0, 0, 8443, "fed.example.org")]
        resolving = self.resolver.resolve_server("example.org")
        self.assertNoResult(resolving)
        self.clock.advance(WELL_KNOWN_TIMEOUT)
        server = self.successResultOf(resolving)
        self.assertEqual(server.host_header, "example.org")
        self.assertIsNone(server.port)


class WellKnownResponsesReleasedTests(SynchronousTestCase):
    """Every .well-known answer is read to the end or its connection dropped, never left
    holding the connection until garbage collection."""

    def resolve(self, answers: dict[bytes, tuple[int, dict[bytes, bytes], bytes]]) -> Any:
        """The delegation found for example.org, and (uri, code, released) per response."""
        clock = Clock()
        agent = _RecordingAgent(answers)
        resolver = ServerResolver(clock, agent, FakeSRVResolver())
        delegated = self.successResultOf(resolver.get_well_known("example.org"))
        return delegated, [(uri, r.code, r.released) for uri, r in agent.responses]

    def test_redirect_then_document(self) -> None:
        """The redirect's body is dropped, the document's read."""
        delegated, responses = self.resolve(
            {
                ORIGIN_URI: (302, {b"Location": b"/elsewhere"}, b"moved"),
                b"https://example.org/elsewhere": (200, {}, b'{"m.server": "m.example:1"}'),
            }
        )
        self.assertEqual(delegated, "m.example:1")
        self.assertEqual(
            responses, [(ORIGIN_URI, 302, True), (b"https://example.org/elsewhere", 200, True)]
        )

    def test_error_status(self) -> None:
        """A non-200, non-redirect answer's body is dropped."""
        for code in (404, 500, 300, 304):
            delegated, responses = self.resolve({ORIGIN_URI: (code, {}, b"not here")})
            self.assertIsNone(delegated)
            self.assertEqual(responses, [(ORIGIN_URI, code, True)])

    def test_redirect_loop(self) -> None:
        """Every answer of a redirect loop is dropped; the loop ends after 5 redirects."""
        delegated, responses = self.resolve(
            {ORIGIN_URI: (301, {b"Location": ORIGIN_URI}, b"again")}
        )
        self.assertIsNone(delegated)
        self.assertEqual(responses, [(ORIGIN_URI, 301, True)] * 6)

    def test_redirect_codes_followed(self) -> None:
        """301, 302, 303, 307 and 308 with a Location on another https host are followed
        (RFC 9110 section 15.4; the spec: "follow 30x redirects")."""
        target = b"https://www.example.net/.well-known/matrix/server"
        for code in (301, 302, 303, 307, 308):
            delegated, responses = self.resolve(
                {
                    ORIGIN_URI: (code, {b"Location": target}, b""),
                    target: (200, {}, b'{"m.server": "m.example:1"}'),
                }
            )
            self.assertEqual(delegated, "m.example:1", code)
            self.assertEqual(responses, [(ORIGIN_URI, code, True), (target, 200, True)], code)

    def test_other_3xx_not_followed(self) -> None:
        """300 (Multiple Choices) and 304 (Not Modified) are not redirects to follow, even
        with a Location: no delegation, one request."""
        target = b"https://www.example.net/.well-known/matrix/server"
        for code in (300, 304):
            delegated, responses = self.resolve(
                {
                    ORIGIN_URI: (code, {b"Location": target}, b""),
                    target: (200, {}, b'{"m.server": "m.example:1"}'),
                }
            )
            self.assertIsNone(delegated, code)
            self.assertEqual(responses, [(ORIGIN_URI, code, True)], code)

    def test_redirects_not_followed(self) -> None:
        """A redirect away from https, to an unreadable Location or to none is dropped."""
        for headers in (
            {b"Location": b"http://example.org/.well-known/matrix/server"},
            {b"Location": b"https://caf\xc3\xa9.example/"},
            {},
        ):
            delegated, responses = self.resolve({ORIGIN_URI: (307, headers, b"")})
            self.assertIsNone(delegated)
            self.assertEqual(responses, [(ORIGIN_URI, 307, True)])


class SrvTests(_Base):
    def assert_orders(
        self, name: str, cases: list[tuple[float, list[tuple[int, int, int, str]], list[str]]]
    ) -> None:
        """For each (draw, SRV records of ``name``, expected order): example.org's targets
        come in that order when every weighted draw is that fraction."""
        for fraction, records, order in cases:
            self.srv.records[name] = records
            self.resolver = ServerResolver(
                self.clock, self.peers, self.srv, random=_FixedRandom(fraction)
            )
            _, targets = self.resolve("example.org")
            self.assertEqual([host for host, _ in targets], order, (fraction, records))

    def test_matrix_fed_preferred(self) -> None:
        """Step 4 before 5: _matrix-fed._tcp wins over the deprecated _matrix._tcp."""
        self.srv.records["_matrix-fed._tcp.example.org"] = [(0, 0, 1111, "new.example")]
        self.srv.records["_matrix._tcp.example.org"] = [(0, 0, 2222, "old.example")]
        self.assertRoute("example.org", [("new.example", 1111)], "example.org", "example.org")
        self.assertEqual(self.srv.lookups, ["_matrix-fed._tcp.example.org"])

    def test_deprecated_matrix_srv(self) -> None:
        """Step 5: _matrix._tcp is used when _matrix-fed._tcp has no record."""
        self.srv.records["_matrix._tcp.example.org"] = [(0, 0, 2222, "old.example")]
        self.assertRoute("example.org", [("old.example", 2222)], "example.org", "example.org")

    def test_fallback_8448(self) -> None:
        """Step 6: no .well-known and no SRV: the hostname on 8448."""
        self.assertRoute("example.org", [("example.org", 8448)], "example.org", "example.org")
        self.assertEqual(
            self.srv.lookups, ["_matrix-fed._tcp.example.org", "_matrix._tcp.example.org"]
        )

    def test_priority_order(self) -> None:
        """RFC 2782: records are tried in ascending priority."""
        self.srv.records["_matrix-fed._tcp.example.org"] = [
            (20, 0, 3, "c.example"),
            (10, 0, 1, "a.example"),
            (15, 0, 2, "b.example."),
        ]
        _, targets = self.resolve("example.org")
        self.assertEqual(targets, [("a.example", 1), ("b.example", 2), ("c.example", 3)])

    def test_weights_within_priority(self) -> None:
        """Within a priority every record appears once, heavier weights first more often."""
        self.srv.records["_matrix-fed._tcp.example.org"] = [
            (10, 1, 1, "light.example"),
            (10, 99, 2, "heavy.example"),
        ]
        firsts = []
        for _ in range(50):
            _, targets = self.resolve("example.org")
            self.assertEqual(sorted(targets), [("heavy.example", 2), ("light.example", 1)])
            firsts.append(targets[0][0])
        self.assertGreater(firsts.count("heavy.example"), 40)

    def test_lone_dot_target_ends_resolution(self) -> None:
        """A lone "." target on _matrix-fed._tcp (RFC 2782: decidedly not available) fails
        resolution, without the deprecated SRV or 8448; nothing is remembered: DNS is asked again."""
        self.srv.raw["_matrix-fed._tcp.example.org"] = [
            _srv(b"_matrix-fed._tcp.example.org", 0, 0, 0, b".")
        ]
        self.srv.records["_matrix._tcp.example.org"] = [(0, 0, 2222, "old.example")]
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        error = self.failureResultOf(
            self.resolver.resolve_targets(server), ServiceUnavailableError
        ).value
        self.assertIsInstance(error, ConnectionError)
        self.assertEqual(
            (error.hostname, error.service_name), ("example.org", "_matrix-fed._tcp.example.org")
        )
        self.assertEqual(
            str(error),
            "no federation service at example.org: its SRV record _matrix-fed._tcp.example.org "
            'has the target "." (RFC 2782: decidedly not available)',
        )
        self.assertEqual(self.srv.lookups, ["_matrix-fed._tcp.example.org"])
        # The root name as it comes off the wire, and as b"", say the same.
        for root in [b"", b"."]:
            self.srv.raw["_matrix-fed._tcp.example.org"] = [
                _srv(b"_matrix-fed._tcp.example.org", 0, 0, 8448, root)
            ]
            self.failureResultOf(self.resolver.resolve_targets(server), ServiceUnavailableError)
        self.srv.raw["_matrix-fed._tcp.example.org"] = [
            _srv(b"_matrix-fed._tcp.example.org", 0, 0, 1111, b"new.example")
        ]
        self.assertEqual(
            self.successResultOf(self.resolver.resolve_targets(server)), [("new.example", 1111)]
        )

    def test_lone_dot_target_on_deprecated_srv(self) -> None:
        """With no _matrix-fed._tcp record, a lone "." on _matrix._tcp fails resolution too
        (as in Synapse): no 8448 fallback."""
        self.srv.raw["_matrix._tcp.example.org"] = [
            _srv(b"_matrix._tcp.example.org", 0, 0, 0, b".")
        ]
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        error = self.failureResultOf(
            self.resolver.resolve_targets(server), ServiceUnavailableError
        ).value
        self.assertEqual(error.service_name, "_matrix._tcp.example.org")
        self.assertEqual(
            self.srv.lookups, ["_matrix-fed._tcp.example.org", "_matrix._tcp.example.org"]
        )

    def test_lone_dot_target_after_delegation(self) -> None:
        """Step 3.3: a lone "." for the delegated hostname fails resolution; the error names it."""
        self.well_known("example.org", {"m.server": "matrix.example.net"})
        self.srv.raw["_matrix-fed._tcp.matrix.example.net"] = [
            _srv(b"_matrix-fed._tcp.matrix.example.net", 0, 0, 0, b".")
        ]
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        error = self.failureResultOf(
            self.resolver.resolve_targets(server), ServiceUnavailableError
        ).value
        self.assertEqual(error.hostname, "matrix.example.net")
        self.assertEqual(self.srv.lookups, ["_matrix-fed._tcp.matrix.example.net"])

    def test_only_dot_or_unusable_targets(self) -> None:
        """Several "." records, or "." beside only records we cannot use, also mean no service."""
        answers = [
            [
                _srv(b"_matrix-fed._tcp.example.org", 0, 0, 0, b"."),
                _srv(b"_matrix-fed._tcp.example.org", 10, 0, 0, b"."),
            ],
            [
                _srv(b"_matrix-fed._tcp.example.org", 0, 0, 0, b"."),
                _srv(b"_matrix-fed._tcp.example.org", 0, 0, 1, b"caf\xc3\xa9.example"),
            ],
        ]
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        for answer in answers:
            self.srv.raw["_matrix-fed._tcp.example.org"] = answer
            self.failureResultOf(self.resolver.resolve_targets(server), ServiceUnavailableError)

    def test_dot_target_beside_usable_records_skipped(self) -> None:
        """A "." among usable records (on either SRV name) is skipped; the others are used."""
        self.srv.raw["_matrix-fed._tcp.example.org"] = [
            _srv(b"_matrix-fed._tcp.example.org", 0, 0, 0, b"."),
            _srv(b"_matrix-fed._tcp.example.org", 10, 0, 1111, b"new.example"),
        ]
        _, targets = self.resolve("example.org")
        self.assertEqual(targets, [("new.example", 1111)])
        self.srv.raw["_matrix-fed._tcp.example.org"] = []
        self.srv.raw["_matrix._tcp.example.org"] = [
            _srv(b"_matrix._tcp.example.org", 10, 0, 2222, b"old.example"),
            _srv(b"_matrix._tcp.example.org", 0, 0, 0, b"."),
        ]
        _, targets = self.resolve("example.org")
        self.assertEqual(targets, [("old.example", 2222)])

    def test_undecodable_names_skipped(self) -> None:
        """An SRV record whose target (or owner) is not ASCII is skipped, not fatal."""
        self.srv.raw["_matrix-fed._tcp.example.org"] = [
            _srv(b"_matrix-fed._tcp.example.org", 0, 0, 1, b"caf\xc3\xa9.example"),
            _srv(b"_matrix-fed._tcp.\xff.example", 0, 0, 2, b"other.example"),
            _srv(b"_matrix-fed._tcp.example.org", 10, 0, 3, b"good.example"),
        ]
        _, targets = self.resolve("example.org")
        self.assertEqual(targets, [("good.example", 3)])

    def test_srv_through_cname(self) -> None:
        """SRV records owned by the end of the query name's CNAME chain are used (names
        compared case-insensitively); a CNAME loop ends the chain."""
        self.srv.raw["_matrix-fed._tcp.example.org"] = [
            dns.RRHeader(
                name="_matrix-fed._tcp.Example.org",
                type=dns.CNAME,
                payload=dns.Record_CNAME(b"alias.hosting.example"),
            ),
            dns.RRHeader(
                name="alias.hosting.example",
                type=dns.CNAME,
                payload=dns.Record_CNAME(b"srv.hosting.example."),
            ),
            _srv(b"SRV.hosting.example", 0, 0, 8443, b"fed.hosting.example"),
        ]
        _, targets = self.resolve("example.org")
        self.assertEqual(targets, [("fed.hosting.example", 8443)])
        self.srv.raw["_matrix-fed._tcp.example.org"] = [
            dns.RRHeader(name=name, type=dns.CNAME, payload=dns.Record_CNAME(alias.encode("ascii")))
            for name, alias in [
                ("_matrix-fed._tcp.example.org", "a.example"),
                ("a.example", "_matrix-fed._tcp.example.org"),
            ]
        ]
        _, targets = self.resolve("example.org")
        self.assertEqual(targets, [("example.org", 8448)])

    def test_other_record_types_ignored(self) -> None:
        """Answers of other types (e.g. a CNAME) or for other names are not SRV targets."""
        self.srv.raw["_matrix-fed._tcp.example.org"] = [
            dns.RRHeader(
                name="_matrix-fed._tcp.example.org",
                type=dns.CNAME,
                payload=dns.Record_CNAME(b"x.example"),
            ),
            dns.RRHeader(
                name="_matrix-fed._tcp.elsewhere.example",
                type=dns.SRV,
                payload=dns.Record_SRV(0, 0, 1, "elsewhere.example"),
            ),
        ]
        _, targets = self.resolve("example.org")
        self.assertEqual(targets, [("example.org", 8448)])

    def test_address_records_beside_srv_ignored(self) -> None:
        """A or AAAA records in the answer section, even owned by the queried name, are not
        SRV targets: only the SRV record is used."""
        name = "_matrix-fed._tcp.example.org"
        self.srv.raw[name] = [
            _srv(name.encode(), 0, 0, 8443, b"fed.example.org"),
            dns.RRHeader(name=name, type=dns.A, payload=dns.Record_A("192.0.2.1")),
            dns.RRHeader(name=name, type=dns.AAAA, payload=dns.Record_AAAA("2001:db8::1")),
            dns.RRHeader(name="fed.example.org", type=dns.A, payload=dns.Record_A("192.0.2.2")),
        ]
        _, targets = self.resolve("example.org")
        self.assertEqual(targets, [("fed.example.org", 8443)])

    def test_weighted_order_running_sum(self) -> None:
        """RFC 2782: within a priority, a number is drawn in [0, sum of weights] and the first
        record whose running sum of weights is greater than or equal to it comes next."""
        name = "_matrix-fed._tcp.example.org"
        cases = [
            # (fraction of the sum drawn, records, order)
            (0.5, [(0, 10, 2, "b.example"), (0, 0, 1, "a.example")], ["b.example", "a.example"]),
            (0.5, [(0, 0, 1, "a.example"), (0, 1, 2, "b.example")], ["b.example", "a.example"]),
            # A draw of 0 picks a weight-0 record placed first (its "very small chance").
            (0.0, [(0, 0, 1, "a.example"), (0, 1, 2, "b.example")], ["a.example", "b.example"]),
            (0.25, [(0, 1, 1, "a.example"), (0, 1, 2, "b.example")], ["a.example", "b.example"]),
            (0.5, [(0, 1, 1, "a.example"), (0, 1, 2, "b.example")], ["a.example", "b.example"]),
            (0.75, [(0, 1, 1, "a.example"), (0, 1, 2, "b.example")], ["b.example", "a.example"]),
        ]
        self.assert_orders(name, cases)

    def test_weight_zero_placed_first(self) -> None:
        """RFC 2782: weight-0 records are placed at the beginning of their priority before
        each draw, so a draw of 0 picks one even where the answer lists it last; records
        all of weight 0 come in the answer's order."""
        name = "_matrix-fed._tcp.example.org"
        cases = [
            (0.0, [(0, 10, 2, "b.example"), (0, 0, 1, "a.example")], ["a.example", "b.example"]),
            (0.1, [(0, 10, 2, "b.example"), (0, 0, 1, "a.example")], ["b.example", "a.example"]),
            (
                0.5,
                [(0, 0, 1, "c.example"), (0, 0, 2, "a.example"), (0, 0, 3, "b.example")],
                ["c.example", "a.example", "b.example"],
            ),
        ]
        self.assert_orders(name, cases)

    def test_at_most_32_targets(self) -> None:
        """Of an answer listing thousands of targets (more than one DNS message holds: about
        1000 compressed, 1500 uncompressed) the first MAX_SRV_TARGETS in RFC 2782 order are tried: lower priorities first,
        each record at most once, with at most that many weighted draws."""
        name = "_matrix-fed._tcp.example.org"
        self.assertEqual(discovery.MAX_SRV_TARGETS, 32)
        records = [(10, 1 + n % 5, 8448, f"t{n}.example") for n in range(3000)]
        records += [(5, 1, 8448, f"first{n}.example") for n in range(10)]
        random.Random(1).shuffle(records)
        self.srv.records[name] = records
        draws = _CountingRandom()
        self.resolver = ServerResolver(self.clock, self.peers, self.srv, random=draws)
        _, targets = self.resolve("example.org")
        self.assertEqual(len(targets), 32)
        self.assertEqual(len(set(targets)), 32)
        self.assertEqual(
            sorted(host for host, _ in targets[:10]), sorted(f"first{n}.example" for n in range(10))
        )
        self.assertTrue(all(host.startswith("t") for host, _ in targets[10:]))
        self.assertLessEqual(draws.draws, 32)

    def test_many_priorities(self) -> None:
        """Records of thousands of distinct priorities are ordered by priority (in one sort,
        not one pass over the answer per priority)."""
        name = "_matrix-fed._tcp.example.org"
        records = [(n, 0, n, f"t{n}.example") for n in range(3000)]
        random.Random(2).shuffle(records)
        self.srv.records[name] = records
        _, targets = self.resolve("example.org")
        self.assertEqual(targets, [(f"t{n}.example", n) for n in range(32)])

    def test_failure_without_a_response_described(self) -> None:
        """A DomainError carrying text, not a DNS response, is described by its type and
        text."""
        name = "_matrix-fed._tcp.example.org"
        error = DomainError("text")
        self.srv.errors[name] = error
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        failure = self.failureResultOf(self.resolver.resolve_targets(server), SrvLookupError)
        self.assertEqual(str(failure.value), f"SRV lookup for {name} failed: DomainError: text")
        self.assertIs(failure.value.__cause__, error)

    def test_dns_failure_is_not_no_record(self) -> None:
        """A DNS timeout, SERVFAIL, REFUSED, FORMERR or unknown rcode with nothing cached
        fails resolution (as in Synapse): the spec's next steps are for an SRV record that
        "was not found", which DNS did not say; neither _matrix._tcp nor 8448 is tried."""
        name = "_matrix-fed._tcp.example.org"
        self.srv.records["_matrix._tcp.example.org"] = [(0, 0, 2222, "old.example")]
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        for error, reason in [
            (dns.DNSQueryTimeoutError("x"), "no answer in time"),
            (_rcode_error(dns.ESERVER), "the DNS server answered SERVFAIL"),
            (_rcode_error(dns.EREFUSED), "the DNS server answered REFUSED"),
            (_rcode_error(dns.EFORMAT), "the DNS server answered FORMERR"),
            (_rcode_error(9), "the DNS server answered rcode 9"),
        ]:
            self.srv.errors[name] = error
            self.srv.lookups.clear()
            failure = self.failureResultOf(self.resolver.resolve_targets(server), ConnectionError)
            self.assertIsInstance(failure.value, SrvLookupError)
            self.assertEqual(str(failure.value), f"SRV lookup for {name} failed: {reason}")
            self.assertEqual(failure.value.service_name, name)
            self.assertIs(failure.value.__cause__, error)
            self.assertEqual(self.srv.lookups, [name])

    def test_deprecated_name_failure_is_not_no_record(self) -> None:
        """The same for the deprecated _matrix._tcp after NXDOMAIN for _matrix-fed._tcp."""
        self.srv.errors["_matrix._tcp.example.org"] = _rcode_error(dns.ESERVER)
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        failure = self.failureResultOf(self.resolver.resolve_targets(server), SrvLookupError)
        self.assertEqual(failure.value.service_name, "_matrix._tcp.example.org")

    def test_not_implemented_falls_through(self) -> None:
        """NOTIMP with nothing cached falls through, as in Synapse: a resolver that cannot
        do SRV queries at all (Tor's DNSPort, for .onion names) never will."""
        self.srv.errors["_matrix-fed._tcp.example.org"] = _rcode_error(dns.ENOTIMP)
        self.srv.errors["_matrix._tcp.example.org"] = _rcode_error(dns.ENOTIMP)
        _, targets = self.resolve("example.org")
        self.assertEqual(targets, [("example.org", 8448)])

    def held_lookups(self, count: int) -> list[Deferred[list[tuple[str, int]]]]:
        """``count`` resolutions of example.org's targets, its SRV query left pending."""
        self.srv.hold = True
        server = ResolvedServer(
            "example.org", "example.org", "example.org", None, "example.org", "example.org"
        )
        resolutions = [self.resolver.resolve_targets(server) for _ in range(count)]
        for resolution in resolutions:
            self.assertNoResult(resolution)
        return resolutions

    def test_cancelling_one_lookup_spares_the_others(self) -> None:
        """Cancelling one resolution while its SRV query is pending fails that one only:
        the query (which twisted.names' client shares among a name's callers) is not
        cancelled, the other caller gets the answer, and the answer is cached."""
        name = "_matrix-fed._tcp.example.org"
        self.srv.raw[name] = [_ttl(_srv(name.encode(), 0, 0, 8443, b"fed.example.org"), 300)]
        first, second = self.held_lookups(2)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertNoResult(second)
        self.srv.release(name)
        self.assertEqual(self.successResultOf(second), [("fed.example.org", 8443)])
        _, targets = self.resolve("example.org")
        self.assertEqual(targets, [("fed.example.org", 8443)])
        self.assertEqual(self.srv.lookups, [name])

    def test_abandoned_lookup_still_fills_the_cache(self) -> None:
        """When every caller has given up, the query runs on and its answer is cached."""
        name = "_matrix-fed._tcp.example.org"
        self.srv.raw[name] = [_ttl(_srv(name.encode(), 0, 0, 8443, b"fed.example.org"), 300)]
        [only] = self.held_lookups(1)
        only.cancel()
        self.failureResultOf(only, CancelledError)
        self.srv.release(name)
        self.srv.hold = False
        _, targets = self.resolve("example.org")
        self.assertEqual(targets, [("fed.example.org", 8443)])
        self.assertEqual(self.srv.lookups, [name])

    def test_shared_failure_reaches_the_callers_left(self) -> None:
        """A shared query that fails gives its failure to the callers still waiting."""
        name = "_matrix-fed._tcp.example.org"
        self.srv.errors[name] = _rcode_error(dns.ESERVER)
        first, second = self.held_lookups(2)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.srv.release(name)
        self.failureResultOf(second, SrvLookupError)

    def test_query_bounded(self) -> None:
        """A query no caller can cancel still ends: an SRV resolver that never answers
        is given up on after SRV_QUERY_TIMEOUT, as DNS failing to answer."""
        name = "_matrix-fed._tcp.example.org"
        first, second = self.held_lookups(2)
        self.clock.advance(discovery.SRV_QUERY_TIMEOUT - 1)
        self.assertNoResult(second)
        self.clock.advance(1)
        for resolution in (first, second):
            failure = self.failureResultOf(resolution, SrvLookupError)
            self.assertEqual(str(failure.value), f"SRV lookup for {name} failed: no answer in time")
        self.assertEqual(self.srv.outstanding, {})

    def test_answer_within_the_resolver_retries_used(self) -> None:
        """An answer after 15 s (the resolver's own retries take 1 + 3 + 11 s) is used: the
        bound on a query is above them."""
        name = "_matrix-fed._tcp.example.org"
        self.srv.records[name] = [(0, 0, 8443, "fed.example.org")]
        timeouts: list[Any] = []
        lookup = self.srv.lookupService

        def recording(name: str, timeout: Any = None) -> Deferred[Any]:
            timeouts.append(timeout)
            return lookup(name, timeout)

        self.srv.lookupService = recording  # type: ignore[method-assign]
        [only] = self.held_lookups(1)
        self.assertEqual(timeouts, [(1, 3, 11)])
        self.clock.advance(15)
        self.assertNoResult(only)
        self.srv.release(name)
        self.assertEqual(self.successResultOf(only), [("fed.example.org", 8443)])

    def test_system_resolver_created_lazily(self) -> None:
        """Without an injected SRV resolver, the system one is built on first SRV need, once."""
        made: list[Any] = []

        def fake_system(reactor: Any) -> FakeSRVResolver:
            made.append(reactor)
            return self.srv

        self.patch(discovery, "_system_srv_resolver", fake_system)
        resolver = ServerResolver(self.clock, self.peers)
        self.successResultOf(resolver.resolve_server("1.2.3.4"))
        self.assertEqual(made, [])
        for _ in range(2):
            server = self.successResultOf(resolver.resolve_server("example.org"))
            self.successResultOf(resolver.resolve_targets(server))
        self.assertEqual(made, [self.clock])

    def test_close_stops_the_system_resolver(self) -> None:
        """close() cancels the system resolver's re-read of resolv.conf (a timer every
        60 s, forever) once an SRV lookup created it; a later lookup still works."""
        from twisted.names import client as names_client

        # No packet sent: the query is answered NXDOMAIN at once.
        self.patch(
            names_client.Resolver,
            "lookupService",
            lambda resolver, name, timeout=None: fail(DNSNameError(name)),
        )
        resolver = ServerResolver(self.clock, self.peers)
        server = self.successResultOf(resolver.resolve_server("example.org"))
        self.assertEqual(
            self.successResultOf(resolver.resolve_targets(server)), [("example.org", 8448)]
        )
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        resolver.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        resolver.close()
        self.assertEqual(
            self.successResultOf(resolver.resolve_targets(server)), [("example.org", 8448)]
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_leaves_an_injected_resolver(self) -> None:
        """close() leaves an SRV resolver given to it alone: it is its owner's to close."""
        closed: list[bool] = []
        self.srv.close = lambda: closed.append(True)  # type: ignore[attr-defined]
        self.resolve("example.org")
        self.resolver.close()
        self.assertEqual(closed, [])

    def test_close_abandons_the_srv_lookups_in_flight(self) -> None:
        """close() abandons an SRV query in flight: its callers fail with a ConnectionError
        (the client's TransportError), the query and its SRV_QUERY_TIMEOUT timer are
        cancelled, and nothing is remembered from it: the next resolution asks DNS anew."""
        name = "_matrix-fed._tcp.example.org"
        self.srv.raw[name] = [_ttl(_srv(name.encode(), 0, 0, 8443, b"fed.example.org"), 300)]
        first, second = self.held_lookups(2)
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        self.resolver.close()
        for resolution in (first, second):
            failure = self.failureResultOf(resolution, ConnectionError)
            self.assertEqual(
                str(failure.value), f"resolving {name} abandoned: the resolver was closed"
            )
        self.assertEqual(self.srv.outstanding, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.srv.hold = False
        _, targets = self.resolve("example.org")
        self.assertEqual(targets, [("fed.example.org", 8443)])
        self.assertEqual(self.srv.lookups, [name, name])

    def test_close_abandons_the_well_known_fetches_in_flight(self) -> None:
        """close() abandons a .well-known fetch in flight: its callers fail with a
        ConnectionError (the client's TransportError), the request and its
        WELL_KNOWN_TIMEOUT timer are cancelled, and nothing is cached or counted from it:
        the next resolution fetches it anew."""
        hanging = CannedResource(hang=True)
        self.peers.add_peer("example.org", hanging)
        first = self.resolver.resolve_server("example.org")
        second = self.resolver.get_well_known("example.org")
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        self.resolver.close()
        for resolution in (first, second):
            failure = self.failureResultOf(resolution, ConnectionError)
            self.assertEqual(
                str(failure.value),
                "resolving https://example.org/.well-known/matrix/server abandoned:"
                " the resolver was closed",
            )
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(hanging.requests), 1)
        self.well_known("example.org", {"m.server": "matrix.example.org:8443"})
        self.assertRoute(
            "example.org",
            [("matrix.example.org", 8443)],
            "matrix.example.org:8443",
            "matrix.example.org",
        )
        self.assertEqual(self.resolver._failures, {})

    def test_system_resolver(self) -> None:
        """The system SRV resolver is a twisted.names IResolver built on our reactor."""
        from twisted.internet.interfaces import IResolver
        from twisted.internet.testing import MemoryReactorClock

        from federation_invite.client.discovery import _system_srv_resolver

        self.assertTrue(IResolver.providedBy(_system_srv_resolver(MemoryReactorClock())))


def _ttl(record: dns.RRHeader, ttl: int) -> dns.RRHeader:
    record.ttl = ttl
    return record


def _soa(zone: bytes, ttl: int, minimum: int) -> dns.RRHeader:
    """The SOA record a negative answer carries in its authority section (RFC 2308)."""
    return dns.RRHeader(
        name=zone, type=dns.SOA, ttl=ttl, payload=dns.Record_SOA(b"ns." + zone, minimum=minimum)
    )


def _rcode_error(rcode: int) -> Exception:
    """The error twisted.names' client.Resolver fails a lookup with for a response with
    this rcode (``filterAnswers``): a ``DomainError`` subclass holding the response."""
    return ResolverBase().exceptionForCode(rcode)(dns.Message(rCode=rcode))


class SrvCacheTests(_Base):
    """SRV answers are remembered for their TTL, negative ones for their SOA's (RFC 2308)."""

    NAME = "_matrix-fed._tcp.example.org"

    def targets(self) -> list[tuple[str, int]]:
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        return self.successResultOf(self.resolver.resolve_targets(server))

    def answer(self, ttl: int, target: bytes = b"new.example", port: int = 1111) -> None:
        self.srv.raw[self.NAME] = [_ttl(_srv(self.NAME.encode(), 0, 0, port, target), ttl)]

    def assert_asked_again_after(
        self, seconds: float, queries: int = 1, targets: list[tuple[str, int]] | None = None
    ) -> None:
        """The answer the resolution just made got (``queries`` SRV lookups) is kept
        ``seconds``: a resolution a second before (giving ``targets``, where given) asks DNS
        nothing, one at ``seconds`` asks it again."""
        self.clock.advance(seconds - 1)
        found = self.targets()
        if targets is not None:
            self.assertEqual(found, targets)
        self.assertEqual(len(self.srv.lookups), queries)
        self.clock.advance(1)
        self.targets()
        self.assertEqual(len(self.srv.lookups), 2 * queries)

    def test_positive_answer_kept_for_its_ttl(self) -> None:
        """An answer is used for its TTL without asking DNS again, then asked for anew."""
        self.answer(300)
        self.assertEqual(self.targets(), [("new.example", 1111)])
        self.answer(300, b"moved.example", 2222)
        self.clock.advance(299)
        self.assertEqual(self.targets(), [("new.example", 1111)])
        self.assertEqual(self.srv.lookups, [self.NAME])
        self.clock.advance(1)
        self.assertEqual(self.targets(), [("moved.example", 2222)])
        self.assertEqual(self.srv.lookups, [self.NAME, self.NAME])

    def test_shortest_ttl_of_the_answer_counts(self) -> None:
        """Several records (or a CNAME on the way) are kept for the shortest TTL among them."""
        self.srv.raw[self.NAME] = [
            _ttl(
                dns.RRHeader(
                    name=self.NAME, type=dns.CNAME, payload=dns.Record_CNAME(b"srv.example")
                ),
                60,
            ),
            _ttl(_srv(b"srv.example", 0, 0, 1, b"a.example"), 3600),
            _ttl(_srv(b"srv.example", 1, 0, 2, b"b.example"), 600),
        ]
        self.assertEqual(self.targets(), [("a.example", 1), ("b.example", 2)])
        self.assert_asked_again_after(60)

    def test_zero_ttl_not_kept(self) -> None:
        """A TTL of 0 means "do not cache" (RFC 1035 3.2.1): every resolution asks DNS."""
        self.answer(0)
        self.targets()
        self.targets()
        self.assertEqual(self.srv.lookups, [self.NAME, self.NAME])

    def test_zero_ttl_answer_not_kept_for_dns_failures(self) -> None:
        """An answer with TTL 0 is used but not kept: DNS then failing (SERVFAIL) has no
        earlier answer to fall back on, and the lookup fails."""
        self.answer(0)
        self.assertEqual(self.targets(), [("new.example", 1111)])
        self.srv.errors[self.NAME] = _rcode_error(dns.ESERVER)
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        self.failureResultOf(self.resolver.resolve_targets(server), SrvLookupError)
        self.assertEqual(self.srv.lookups, [self.NAME, self.NAME])

    def test_one_second_ttl_kept(self) -> None:
        """An answer with TTL 1 is kept for that second: half a second on, DNS is not asked."""
        self.answer(1)
        self.targets()
        self.clock.advance(0.5)
        self.assertEqual(self.targets(), [("new.example", 1111)])
        self.assertEqual(self.srv.lookups, [self.NAME])

    def test_long_ttl_capped(self) -> None:
        """A TTL beyond a day is kept for a day (a peer cannot pin its answer for weeks)."""
        self.answer(30 * 24 * 3600)
        self.targets()
        self.assert_asked_again_after(24 * 3600)

    def test_weights_reordered_from_the_cache(self) -> None:
        """Records of equal priority are ordered by weight anew at each resolution, the
        answer cached or not (RFC 2782 spreads the load over them)."""
        self.srv.raw[self.NAME] = [
            _ttl(_srv(self.NAME.encode(), 10, 50, 1, b"one.example"), 3600),
            _ttl(_srv(self.NAME.encode(), 10, 50, 2, b"two.example"), 3600),
        ]
        firsts = {self.targets()[0][0] for _ in range(40)}
        self.assertEqual(firsts, {"one.example", "two.example"})
        self.assertEqual(len(self.srv.lookups), 1)

    def test_lone_dot_answer_kept(self) -> None:
        """ "No service here" is an answer too: kept for its TTL."""
        self.answer(300, b".", 0)
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        for _ in range(2):
            self.failureResultOf(self.resolver.resolve_targets(server), ServiceUnavailableError)
        self.assertEqual(self.srv.lookups, [self.NAME])

    def test_negative_answer_kept_for_its_soa(self) -> None:
        """NXDOMAIN is kept for the smaller of its SOA's TTL and MINIMUM (RFC 2308 section 5),
        for both SRV names; so a server without SRV records costs no DNS query per send."""
        message = dns.Message(rCode=dns.ENAME)
        message.authority = [_soa(b"example.org", 900, 120)]
        for name in (self.NAME, "_matrix._tcp.example.org"):
            self.srv.errors[name] = DNSNameError(message)
        self.assertEqual(self.targets(), [("example.org", 8448)])
        self.assert_asked_again_after(120, queries=2, targets=[("example.org", 8448)])

    def test_negative_ttl_from_the_soa_after_other_records(self) -> None:
        """The negative TTL is the SOA's, wherever it stands in the authority section: NXDOMAIN
        with [NS, SOA (TTL 600, MINIMUM 300)] is kept 300 s (RFC 2308 section 5)."""
        message = dns.Message(rCode=dns.ENAME)
        message.authority = [
            dns.RRHeader(
                name=b"example.org", type=dns.NS, ttl=3600, payload=dns.Record_NS(b"ns.example.org")
            ),
            _soa(b"example.org", 600, 300),
        ]
        for name in (self.NAME, "_matrix._tcp.example.org"):
            self.srv.errors[name] = DNSNameError(message)
        self.assertEqual(self.targets(), [("example.org", 8448)])
        self.assert_asked_again_after(300, queries=2, targets=[("example.org", 8448)])

    def test_negative_ttl_is_the_soa_ttl_when_smaller(self) -> None:
        """The other side of RFC 2308 section 5's "smaller of": an SOA whose own TTL (60 s)
        is below its MINIMUM (300 s) keeps the negative answer 60 s."""
        message = dns.Message(rCode=dns.ENAME)
        message.authority = [_soa(b"example.org", 60, 300)]
        for name in (self.NAME, "_matrix._tcp.example.org"):
            self.srv.errors[name] = DNSNameError(message)
        self.targets()
        self.assert_asked_again_after(60, queries=2)

    def test_empty_answer_kept_for_its_soa(self) -> None:
        """NOERROR with no SRV record (NODATA) is negative too: kept for its SOA's time,
        capped at an hour."""
        self.srv.raw[self.NAME] = []
        self.srv.raw["_matrix._tcp.example.org"] = []
        authority = [_soa(b"example.org", 86400, 86400)]
        lookup = self.srv.lookupService

        def with_authority(name: str, timeout: Any = None) -> Deferred[Any]:
            return lookup(name, timeout).addCallback(lambda r: (r[0], authority, r[2]))

        self.srv.lookupService = with_authority  # type: ignore[method-assign]
        self.targets()
        self.assert_asked_again_after(3600, queries=2)

    def test_negative_answer_without_soa_not_kept(self) -> None:
        """A negative answer that says nothing of how long it holds is not remembered."""
        self.targets()
        self.targets()
        self.assertEqual(len(self.srv.lookups), 4)

    def test_stale_answer_used_when_dns_fails(self) -> None:
        """An expired answer is used when DNS then fails (a timeout), as Synapse does,
        and asked for again at the next resolution."""
        self.answer(60)
        self.targets()
        self.clock.advance(3600)
        self.srv.errors[self.NAME] = dns.DNSQueryTimeoutError("x")
        self.assertEqual(self.targets(), [("new.example", 1111)])
        del self.srv.errors[self.NAME]
        self.answer(60, b"moved.example", 2222)
        self.assertEqual(self.targets(), [("moved.example", 2222)])
        self.assertEqual(len(self.srv.lookups), 3)

    def test_expired_negative_answer_used_when_dns_fails(self) -> None:
        """An expired negative answer (NXDOMAIN with an SOA) is used when DNS then fails
        (SERVFAIL): the server has no SRV record as far as we know, so it is reached on
        8448, not failed with SrvLookupError while its DNS has a hiccup."""
        message = dns.Message(rCode=dns.ENAME)
        message.authority = [_soa(b"example.org", 60, 60)]
        for name in (self.NAME, "_matrix._tcp.example.org"):
            self.srv.errors[name] = DNSNameError(message)
        self.assertEqual(self.targets(), [("example.org", 8448)])
        self.clock.advance(60)
        for name in (self.NAME, "_matrix._tcp.example.org"):
            self.srv.errors[name] = _rcode_error(dns.ESERVER)
        self.assertEqual(self.targets(), [("example.org", 8448)])
        self.assertEqual(len(self.srv.lookups), 4)

    def test_dns_errors_keep_the_cached_answer(self) -> None:
        """SERVFAIL, REFUSED, FORMERR, NOTIMP or an unknown rcode (without an SOA) are not
        NXDOMAIN: the expired answer is used and kept (not replaced by "no record", which
        would send the request to 8448), and DNS is asked again at the next resolution."""
        for rcode in (dns.ESERVER, dns.EREFUSED, dns.EFORMAT, dns.ENOTIMP, 9):
            self.srv.errors.pop(self.NAME, None)
            self.answer(60)
            self.assertEqual(self.targets(), [("new.example", 1111)])
            self.clock.advance(3600)
            self.srv.errors[self.NAME] = _rcode_error(rcode)
            self.srv.lookups.clear()
            self.assertEqual(self.targets(), [("new.example", 1111)])
            self.assertEqual(self.targets(), [("new.example", 1111)])
            self.assertEqual(self.srv.lookups, [self.NAME, self.NAME])
        del self.srv.errors[self.NAME]
        self.answer(60, b"moved.example", 2222)
        self.assertEqual(self.targets(), [("moved.example", 2222)])

    def test_close_abandons_a_query_with_an_old_answer_kept(self) -> None:
        """close() abandons an SRV query in flight though an expired answer is kept for DNS
        failures: its caller fails as abandoned, it is not given the old records as if DNS
        had failed (a client being closed connecting to them)."""
        self.answer(60, b"old.example")
        self.assertEqual(self.targets(), [("old.example", 1111)])
        self.clock.advance(60)
        self.srv.hold = True
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        resolving = self.resolver.resolve_targets(server)
        self.assertNoResult(resolving)
        self.resolver.close()
        failure = self.failureResultOf(resolving, ConnectionError)
        self.assertEqual(
            str(failure.value), f"resolving {self.NAME} abandoned: the resolver was closed"
        )

    def test_authoritative_nxdomain_is_negative(self) -> None:
        """NXDOMAIN from an authority (AuthoritativeDomainError) is "no record" too."""
        for name in (self.NAME, "_matrix._tcp.example.org"):
            self.srv.errors[name] = dns.AuthoritativeDomainError(name)
        self.assertEqual(self.targets(), [("example.org", 8448)])

    def test_clock_stepped_back(self) -> None:
        """An answer recorded "after" now (the wall clock stepped back) is asked for again."""
        self.answer(3600)
        self.targets()
        self.clock.rightNow -= 10
        self.targets()
        self.assertEqual(len(self.srv.lookups), 2)

    def test_only_unexpected_failures_logged(self) -> None:
        """NXDOMAIN (the usual answer for a server without SRV records) is quiet; a DNS
        timeout is logged."""
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.targets()
        self.assertEqual([e for e in events if "SRV lookup" in e.get("log_format", "")], [])
        self.srv.errors[self.NAME] = dns.DNSQueryTimeoutError("x")
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        self.failureResultOf(self.resolver.resolve_targets(server), SrvLookupError)
        logged = [e for e in events if "SRV lookup" in e.get("log_format", "")]
        self.assertEqual(len(logged), 1)

    def test_cache_bounded(self) -> None:
        """Names are peer-chosen: at most SRV_CACHE_SIZE answers are kept (10,000, as the
        README says); expired ones go first, then all."""
        self.assertEqual(discovery.SRV_CACHE_SIZE, 10_000)
        self.patch(discovery, "SRV_CACHE_SIZE", 3)
        for index in range(5):
            name = f"_matrix-fed._tcp.h{index}.example"
            self.srv.raw[name] = [_ttl(_srv(name.encode(), 0, 0, 1, b"t.example"), 3600)]
            host = f"h{index}.example"
            server = ResolvedServer(host, host, host, None, host, host)
            self.successResultOf(self.resolver.resolve_targets(server))
            self.assertLessEqual(len(self.resolver._srv_cache), 3)

    def resolve_others(self, count: int, with_records: bool = True) -> None:
        """Resolve ``count`` other hosts (peer-chosen: many origins named), with SRV records
        or without (NXDOMAIN with an SOA, remembered)."""
        message = dns.Message(rCode=dns.ENAME)
        message.authority = [_soa(b"example", 900, 900)]
        for index in range(count):
            host = f"h{index}.example"
            name = "_matrix-fed._tcp." + host
            if with_records:
                self.srv.raw[name] = [_ttl(_srv(name.encode(), 0, 0, 1, b"t.example"), 3600)]
            else:
                self.srv.errors[name] = DNSNameError(message)
                self.srv.errors["_matrix._tcp." + host] = DNSNameError(message)
            server = ResolvedServer(host, host, host, None, host, host)
            self.successResultOf(self.resolver.resolve_targets(server))

    def test_stale_answer_used_after_eviction(self) -> None:
        """An expired answer a full cache dropped (other names, peer-chosen, looked up since)
        is still used when DNS then fails."""
        self.patch(discovery, "SRV_CACHE_SIZE", 2)
        self.answer(60)
        self.targets()
        self.clock.advance(3600)
        self.resolve_others(2, with_records=False)
        self.assertNotIn(self.NAME, self.resolver._srv_cache)
        self.srv.errors[self.NAME] = dns.DNSQueryTimeoutError("x")
        self.assertEqual(self.targets(), [("new.example", 1111)])

    def test_kept_answers_bounded(self) -> None:
        """The last answers kept for DNS failures are bounded too (SRV_CACHE_SIZE, the least
        recently answered dropped first)."""
        self.patch(discovery, "SRV_CACHE_SIZE", 2)
        self.answer(60)
        self.targets()
        self.resolve_others(2)
        self.clock.advance(3600)
        self.srv.errors[self.NAME] = dns.DNSQueryTimeoutError("x")
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        self.failureResultOf(self.resolver.resolve_targets(server), SrvLookupError)

    def test_large_answer_bounded_in_the_caches(self) -> None:
        """An answer listing hundreds of records (900 fit in one DNS message over TCP) keeps
        at most SRV_MAX_RECORDS of them, in the cache and among the answers kept for DNS
        failures: names are peer-chosen, each answer kept up to a day. The lowest priorities
        are kept whole, then the heaviest records of the next one, those beyond the
        MAX_SRV_TARGETS first in order not at all; the targets are ordered from what is kept,
        cached or not."""
        self.assertEqual(discovery.SRV_MAX_RECORDS, 64)
        owner = self.NAME.encode()
        answer = [_ttl(_srv(owner, 0, 1, 1, b"low%d.example" % n), 3600) for n in range(20)]
        answer += [
            _ttl(_srv(owner, 1, 1 + (n % 9 == 0), 2, b"mid%d.example" % n), 3600)
            for n in range(440)
        ]
        answer += [_ttl(_srv(owner, 2, 1, 3, b"high%d.example" % n), 3600) for n in range(440)]
        random.Random(5).shuffle(answer)
        self.srv.raw[self.NAME] = answer
        for _ in range(2):  # answered, then from the cache
            targets = self.targets()
            self.assertEqual(len(targets), 32)
            self.assertEqual(
                sorted(targets[:20]), sorted((f"low{n}.example", 1) for n in range(20))
            )
            self.assertTrue(all(port == 2 for _, port in targets[20:]), targets)
        self.assertEqual(len(self.srv.lookups), 1)
        records = self.resolver._srv_cache[self.NAME].records
        self.assertIs(self.resolver._srv_kept[self.NAME], records)
        self.assertEqual(len(records), 64)
        self.assertEqual(sum(record.priority == 0 for record in records), 20)
        # Of priority 1, the 44 heaviest (weight 2: 49 in all), in the answer's order.
        middle = [record for record in records if record.priority == 1]
        self.assertEqual(len(middle), 44)
        self.assertTrue(all(record.weight == 2 for record in middle))
        heavy = [h.payload for h in answer if h.payload.priority == 1 and h.payload.weight == 2]
        self.assertEqual(middle, heavy[:44])
        # A DNS failure then falls back on what was kept.
        self.clock.advance(3600)
        self.srv.errors[self.NAME] = dns.DNSQueryTimeoutError("x")
        self.assertEqual(len(self.targets()), 32)

    def test_large_answer_order_unchanged_where_kept_whole(self) -> None:
        """What the first MAX_SRV_TARGETS in order can be drawn from is kept whole when it
        fits within SRV_MAX_RECORDS: the order drawn is the same as from the whole answer (a
        "." and the records we cannot use are dropped, as ordering skips them)."""
        owner = self.NAME.encode()
        answer = [_srv(owner, 0, 0, 0, b".")]
        answer += [_srv(owner, 0, 0, 1, b"caf\xc3\xa9.example")]
        answer += [_srv(owner, 5, n % 4, 1, b"a%d.example" % n) for n in range(30)]
        answer += [_srv(owner, 7, n % 3, 2, b"b%d.example" % n) for n in range(30)]
        answer += [_srv(owner, 9, 1, 3, b"c%d.example" % n) for n in range(800)]
        random.Random(6).shuffle(answer)
        kept = discovery._bound_srv([header.payload for header in answer])
        self.assertEqual(len(kept), 60)
        expected = [h.payload for h in answer if h.payload.priority in (5, 7)]
        self.assertEqual(kept, sorted(expected, key=lambda record: record.priority))
        for seed in range(20):
            whole = ServerResolver(self.clock, self.peers, self.srv, random=random.Random(seed))
            bounded = ServerResolver(self.clock, self.peers, self.srv, random=random.Random(seed))
            self.assertEqual(
                bounded._order_srv(kept), whole._order_srv([h.payload for h in answer])
            )

    def test_large_answers_without_usable_targets(self) -> None:
        """An answer of hundreds of "." records (or of "." and targets we cannot use) keeps
        one ".": still no service; one of only targets we cannot use keeps one: still no
        target, the next step taken."""
        owner = self.NAME.encode()
        self.srv.raw[self.NAME] = [_ttl(_srv(owner, 0, 0, 1, b"\xff.x"), 60) for _ in range(450)]
        self.srv.raw[self.NAME] += [_ttl(_srv(owner, 0, 0, 0, b"."), 60) for _ in range(450)]
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        self.failureResultOf(self.resolver.resolve_targets(server), ServiceUnavailableError)
        self.assertEqual(len(self.resolver._srv_cache[self.NAME].records), 1)
        self.clock.advance(60)
        self.srv.raw[self.NAME] = [_ttl(_srv(owner, 0, 0, 1, b"\xff.x"), 60) for _ in range(900)]
        self.assertEqual(self.targets(), [("example.org", 8448)])
        self.assertEqual(len(self.resolver._srv_cache[self.NAME].records), 1)

    def test_negative_answer_drops_the_kept_answer(self) -> None:
        """NXDOMAIN after an answer says the records are gone: a later DNS failure does not
        bring the old answer back."""
        self.answer(60)
        self.targets()
        self.clock.advance(3600)
        del self.srv.raw[self.NAME]  # NXDOMAIN, without an SOA: not remembered
        self.assertEqual(self.targets(), [("example.org", 8448)])
        self.srv.errors[self.NAME] = dns.DNSQueryTimeoutError("x")
        server = self.successResultOf(self.resolver.resolve_server("example.org"))
        self.failureResultOf(self.resolver.resolve_targets(server), SrvLookupError)


class WellKnownCacheTests(_Base):
    def fetches(self) -> int:
        return len(self.peers.requests)

    def test_cached_per_max_age(self) -> None:
        """A valid answer is reused until Cache-Control max-age runs out, then fetched again."""
        self.well_known("example.org", {"m.server": "m.example:1"}, Cache_Control=b"max-age=3600")
        self.resolve("example.org")
        self.clock.advance(3599)
        self.resolve("example.org")
        self.assertEqual(self.fetches(), 1)
        self.clock.advance(1)
        self.resolve("example.org")
        self.assertEqual(self.fetches(), 2)

    def test_default_24_hours(self) -> None:
        """Without caching headers an answer is kept 24 hours."""
        self.well_known("example.org", {"m.server": "m.example:1"})
        self.resolve("example.org")
        self.clock.advance(WELL_KNOWN_DEFAULT_TTL - 1)
        self.resolve("example.org")
        self.assertEqual(self.fetches(), 1)
        self.clock.advance(1)
        self.resolve("example.org")
        self.assertEqual(self.fetches(), 2)

    def test_clock_stepping_back_does_not_keep_answers(self) -> None:
        """An answer fetched "after" now (the wall clock stepped back since) is fetched
        again, rather than kept as long as the step; a full cache drops it too."""
        resource = self.well_known("example.org", {"m.server": "old.example:1"})
        self.resolve("example.org")
        resource.body = {"m.server": "new.example:2"}
        self.clock.rightNow -= 3600
        server, _ = self.resolve("example.org")
        self.assertEqual(server.effective_name, "new.example:2")
        self.assertEqual(self.fetches(), 2)
        self.resolve("example.org")
        self.assertEqual(self.fetches(), 2)

    def test_expiry_follows_new_answer(self) -> None:
        """After expiry the new answer replaces the old delegation."""
        resource = self.well_known("example.org", {"m.server": "old.example:1"})
        self.resolve("example.org")
        resource.body = {"m.server": "new.example:2"}
        self.clock.advance(WELL_KNOWN_DEFAULT_TTL)
        server, _ = self.resolve("example.org")
        self.assertEqual(server.effective_name, "new.example:2")

    def test_errors_cached_with_backoff(self) -> None:
        """Failures are cached 5 min, doubling per failure up to 1 h; a success resets."""
        resource = self.well_known("example.org", b"nope", code=500)
        self.resolve("example.org")
        waits = []
        for _ in range(6):
            before = self.fetches()
            elapsed = 0
            while self.fetches() == before:
                self.clock.advance(60)
                elapsed += 60
                self.resolve("example.org")
            waits.append(elapsed)
        self.assertEqual(waits, [300, 600, 1200, 2400, 3600, 3600])
        resource.code, resource.body = 200, {"m.server": "m.example:1"}
        self.clock.advance(3600)
        server, _ = self.resolve("example.org")
        self.assertEqual(server.effective_name, "m.example:1")
        resource.code, resource.body = 404, b""
        self.clock.advance(WELL_KNOWN_DEFAULT_TTL)
        self.resolve("example.org")
        before = self.fetches()
        self.clock.advance(300)
        self.resolve("example.org")
        self.assertEqual(self.fetches(), before + 1)

    def test_failure_counts_bounded(self) -> None:
        """Failures are counted for the most recently failed hostnames only, at most the
        cache size of them; a recent one keeps its back-off, a dropped one starts over."""
        self.patch(discovery, "WELL_KNOWN_CACHE_SIZE", 3)
        names = [f"h{i}.example" for i in range(5)]
        for name in names:
            self.resolve(name)  # no such peer: the fetch fails
            self.clock.advance(WELL_KNOWN_ERROR_TTL)  # and its cached failure expires
        self.assertEqual(list(self.resolver._failures.items()), [(n, 1) for n in names[2:]])
        # The most recent hostname's second failure is cached twice as long.
        self.resolve("h4.example")
        self.assertEqual(self.fetches(), 6)
        self.clock.advance(2 * WELL_KNOWN_ERROR_TTL - 1)
        self.resolve("h4.example")
        self.assertEqual(self.fetches(), 6)
        self.clock.advance(1)
        self.resolve("h4.example")
        self.assertEqual(self.fetches(), 7)
        # A dropped hostname's failure is its first again; the least recent goes.
        self.resolve("h0.example")
        self.assertEqual(
            list(self.resolver._failures.items()),
            [("h3.example", 1), ("h4.example", 3), ("h0.example", 1)],
        )
        self.assertEqual(self.resolver._cache["h0.example"].expires_at, self.clock.seconds() + 300)

    def test_error_wait_stays_an_hour_however_many_failures(self) -> None:
        """After any number of consecutive failures (past 1,024, where 2 ** n overflowed a
        float) a failure is still cached for 1 h and the lookup still answers."""
        self.well_known("example.org", b"", code=404)
        for _ in range(1030):
            server, _ = self.resolve("example.org")
            self.clock.advance(WELL_KNOWN_ERROR_MAX_TTL)
        self.assertEqual(server.effective_name, "example.org")
        self.assertEqual(self.fetches(), 1030)
        self.resolve("example.org")
        self.assertEqual(
            self.resolver._cache["example.org"].expires_at,
            self.clock.seconds() + WELL_KNOWN_ERROR_MAX_TTL,
        )

    def test_unexpected_refresh_error_answers_the_lookups(self) -> None:
        """An unexpected error while refreshing .well-known (a bug) is logged and the lookups
        waiting for that fetch are answered as without a delegation, not left waiting."""
        resource = self.well_known("example.org", b"", code=404)
        resource.hang = True
        self.patch(self.resolver, "_count_failure", mock.Mock(side_effect=RuntimeError("bug")))
        lookups = [self.resolver.resolve_server("example.org") for _ in range(2)]
        [request] = resource.pending
        request.setResponseCode(404)
        request.finish()
        self.peers.flush()
        for lookup in lookups:
            self.assertEqual(self.successResultOf(lookup).effective_name, "example.org")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertNotIn("example.org", self.resolver._inflight)

    def test_malformed_max_age_keeps_delegation(self) -> None:
        """A valid delegation with a malformed max-age ("²") is used and kept 24 hours."""
        self.well_known("example.org", {"m.server": "m.example:1"}, Cache_Control=b"max-age=\xb2")
        server, _ = self.resolve("example.org")
        self.assertEqual(server.effective_name, "m.example:1")
        self.clock.advance(WELL_KNOWN_DEFAULT_TTL - 1)
        self.resolve("example.org")
        self.assertEqual(self.fetches(), 1)
        self.clock.advance(1)
        self.resolve("example.org")
        self.assertEqual(self.fetches(), 2)

    def test_overflowing_expires_keeps_delegation(self) -> None:
        """A valid delegation whose Expires has a huge year is used and kept 5 minutes (an
        invalid Expires: already expired), not dropped as a failed fetch."""
        huge = b"Mon, 01 Jan " + b"9" * 20 + b" 00:00:00 GMT"
        self.well_known("example.org", {"m.server": "m.example:1"}, Expires=huge)
        server, _ = self.resolve("example.org")
        self.assertEqual(server.effective_name, "m.example:1")
        self.clock.advance(WELL_KNOWN_MIN_TTL - 1)
        self.resolve("example.org")
        self.assertEqual(self.fetches(), 1)
        self.clock.advance(1)
        self.resolve("example.org")
        self.assertEqual(self.fetches(), 2)

    def test_concurrent_lookups_share_one_fetch(self) -> None:
        """Callers asking while a fetch is in flight share it; cancelling one spares the rest."""
        resource = self.well_known("example.org", {"m.server": "m.example:1"})
        resource.hang = True
        first = self.resolver.resolve_server("example.org")
        second = self.resolver.resolve_server("example.org")
        third = self.resolver.resolve_server("example.org")
        self.assertEqual(len(resource.requests), 1)
        first.cancel()
        self.failureResultOf(first)
        [request] = resource.pending
        request.write(b'{"m.server": "m.example:1"}')
        request.finish()
        self.peers.flush()
        self.assertEqual(self.successResultOf(second).effective_name, "m.example:1")
        self.assertEqual(self.successResultOf(third).effective_name, "m.example:1")
        self.resolve("example.org")
        self.assertEqual(len(resource.requests), 1)

    def test_cache_bounded(self) -> None:
        """The cache drops expired entries when full, and starts afresh if still full."""
        self.patch(discovery, "WELL_KNOWN_CACHE_SIZE", 2)
        self.well_known("a.example", {"m.server": "m.example:1"}, Cache_Control=b"max-age=300")
        self.well_known("b.example", {"m.server": "m.example:1"})
        self.resolve("a.example")
        self.resolve("b.example")
        self.clock.advance(300)
        self.resolve("c.example")
        self.assertEqual(sorted(self.resolver._cache), ["b.example", "c.example"])
        self.resolve("d.example")
        self.assertEqual(sorted(self.resolver._cache), ["d.example"])
        # An answer fetched before the clock stepped back counts as expired there.
        self.clock.rightNow -= 3600
        self.resolve("e.example")
        self.resolve("f.example")
        self.assertEqual(sorted(self.resolver._cache), ["e.example", "f.example"])

    def test_get_well_known(self) -> None:
        """get_well_known answers the delegated name, or None, and never fails."""
        self.well_known("example.org", {"m.server": "m.example:1"})
        self.assertEqual(
            self.successResultOf(self.resolver.get_well_known("example.org")), "m.example:1"
        )
        self.assertIsNone(self.successResultOf(self.resolver.get_well_known("nowhere.example")))


@implementer(IAgent)
class _SwitchableAgent:
    """Passes requests on to ``agent``, refusing them all while ``down``; records the
    time each request was made."""

    def __init__(self, agent: IAgent, clock: Clock) -> None:
        self.agent = agent
        self.clock = clock
        self.down = False
        self.requests: list[float] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        self.requests.append(self.clock.seconds())
        if self.down:
            return fail(ConnectionRefusedError("connection refused"))
        return self.agent.request(method, uri, headers, bodyProducer)


class WellKnownKeptTests(_Base):
    """A delegation outlives temporary failures to fetch it anew (no connection, no
    answer in time, 5xx, a body too large) for a while; a definite answer replaces it."""

    def start(self) -> None:
        """example.org delegates to m.example:1 for an hour; that hour is over."""
        self.agent = _SwitchableAgent(self.peers, self.clock)
        self.resolver = ServerResolver(self.clock, self.agent, self.srv)
        self.site = self.well_known(
            "example.org", {"m.server": "m.example:1"}, Cache_Control=b"max-age=3600"
        )
        self.assertEqual(self.delegation(), "m.example:1")
        self.clock.advance(3600)

    def break_site(self, kind: str) -> None:
        if kind == "refused":
            self.agent.down = True
        elif kind == "timeout":
            self.site.hang = True
        elif kind == "body too large":
            self.site.body = {"m.server": "m.example:1", "pad": "x" * WELL_KNOWN_MAX_BYTES}
        elif kind == "redirect to http":
            self.site.code = 302
            self.site.headers[b"Location"] = b"http://example.org" + WELL_KNOWN_PATH
        elif kind in ("not JSON", "not an object", "no m.server", "m.server invalid"):
            self.site.body = {
                "not JSON": b"<html></html>",
                "not an object": ["m.example:1"],
                "no m.server": {"m.homeserver": {"base_url": "https://m.example"}},
                "m.server invalid": {"m.server": "https://m.example/"},
            }[kind]
        else:
            self.site.code = int(kind)

    def mend_site(self, delegated: str) -> None:
        self.agent.down = self.site.hang = False
        self.site.code, self.site.headers = 200, {b"Cache-Control": b"max-age=3600"}
        self.site.body = {"m.server": delegated}

    def delegation(self) -> str:
        """The name example.org resolves to now (a hung fetch given up on first)."""
        resolving = self.resolver.resolve_server("example.org")
        if not resolving.called:
            self.clock.advance(WELL_KNOWN_TIMEOUT)
        return self.successResultOf(resolving).effective_name

    def next_fetch(self) -> tuple[float, str]:
        """Resolve every 10 s until .well-known is fetched: the time since the last
        fetch began, and the name example.org resolves to after this one."""
        before = len(self.agent.requests)
        while True:
            self.clock.advance(10)
            found = self.delegation()
            if len(self.agent.requests) > before:
                return self.agent.requests[-1] - self.agent.requests[-2], found

    def test_temporary_failure_keeps_delegation(self) -> None:
        """A temporary failure to fetch an expired delegation anew keeps it, fetched
        again after WELL_KNOWN_DOWN_TTL (not 5 min of no delegation); once the site
        answers again, its answer is used."""
        for kind in ("refused", "timeout", "500", "503", "body too large"):
            self.start()
            self.break_site(kind)
            self.assertEqual(self.delegation(), "m.example:1", kind)
            self.assertEqual(self.next_fetch(), (WELL_KNOWN_DOWN_TTL, "m.example:1"), kind)
            self.mend_site("m.example:2")
            self.assertEqual(self.next_fetch(), (WELL_KNOWN_DOWN_TTL, "m.example:2"), kind)
            self.assertEqual(self.next_fetch(), (3600, "m.example:2"), kind)

    def test_definite_failure_drops_delegation(self) -> None:
        """An answer saying there is no (valid) delegation replaces it at once: a
        non-5xx error status, a redirect not followed, an invalid document."""
        for kind in (
            "404",
            "403",
            "redirect to http",
            "not JSON",
            "not an object",
            "no m.server",
            "m.server invalid",
        ):
            self.start()
            self.break_site(kind)
            self.assertEqual(self.delegation(), "example.org", kind)
            self.assertEqual(self.next_fetch(), (WELL_KNOWN_ERROR_TTL, "example.org"), kind)

    def test_withdrawn_delegation_not_revived_by_a_later_outage(self) -> None:
        """A definite "no delegation" forgets the delegation held: a temporary failure at the
        next fetch, before the old delegation's keep-until time, does not revive it."""
        self.start()  # kept through outages until 2 h after it was confirmed; 1 h has passed
        self.break_site("404")
        self.assertEqual(self.delegation(), "example.org")
        self.clock.advance(WELL_KNOWN_ERROR_TTL)
        self.break_site("refused")
        self.assertEqual(self.delegation(), "example.org")
        self.assertEqual(len(self.agent.requests), 3)

    def test_temporary_failure_status_band(self) -> None:
        """Only a 5xx status (500 to 599) is a temporary failure that keeps an expired
        delegation; 499 and 600 are answers saying there is none, and drop it."""
        for kind, kept in (
            ("499", False),
            ("500", True),
            ("503", True),
            ("599", True),
            ("600", False),
        ):
            self.start()
            self.break_site(kind)
            self.assertEqual(self.delegation(), "m.example:1" if kept else "example.org", kind)

    def test_repeated_temporary_failures_drop_delegation(self) -> None:
        """Temporary failures keep a delegation for its TTL again after it expired, not
        longer: then it is dropped, and failures back off as usual from 5 min."""
        self.start()
        self.agent.down = True
        self.assertEqual(self.delegation(), "m.example:1")
        waits = []
        while True:
            wait, found = self.next_fetch()
            if found != "m.example:1":
                break
            waits.append(wait)
        self.assertEqual(waits, [WELL_KNOWN_DOWN_TTL] * 29)
        self.assertEqual(found, "example.org")
        self.assertEqual(self.agent.requests[-1] - self.agent.requests[0], 2 * 3600)
        self.assertEqual(self.next_fetch(), (WELL_KNOWN_ERROR_TTL, "example.org"))
        self.assertEqual(self.next_fetch(), (2 * WELL_KNOWN_ERROR_TTL, "example.org"))

    def test_outage_retry_cut_at_keep_until(self) -> None:
        """An outage keeps a delegation until twice its TTL after it was confirmed, not
        WELL_KNOWN_DOWN_TTL past that: a retry falling after it is brought forward to it."""
        self.start()  # confirmed with max-age=3600 an hour ago: kept for another hour
        self.clock.advance(3600 - 60)
        self.agent.down = True
        self.assertEqual(self.delegation(), "m.example:1")
        self.assertEqual(self.next_fetch(), (60, "example.org"))

    def test_delegation_kept_after_eviction(self) -> None:
        """A delegation whose expired entry a full cache dropped (other hostnames, peer-chosen,
        looked up since) is still kept on a temporary failure to fetch it anew."""
        self.patch(discovery, "WELL_KNOWN_CACHE_SIZE", 2)
        self.start()
        for name in ("a.example", "b.example", "c.example"):
            self.resolver.resolve_server(name)  # no such peer: a failure, cached
        self.assertNotIn("example.org", self.resolver._cache)
        self.agent.down = True
        self.assertEqual(self.delegation(), "m.example:1")
        self.assertEqual(self.next_fetch(), (WELL_KNOWN_DOWN_TTL, "m.example:1"))

    def test_kept_delegation_clock_stepped_back(self) -> None:
        """A delegation confirmed "after" now (the wall clock stepped back) is not kept."""
        self.start()
        self.agent.down = True
        self.clock.rightNow -= 2 * 3600
        self.assertEqual(self.delegation(), "example.org")


class WellKnownResolverBusyTests(_Base):
    """A .well-known fetch that timed out while our own address lookups waited for a
    resolver thread (``lookups_waited`` grew: our fault, not the site's) is not the site's
    answer: nothing is cached or counted from it, and a delegation held is kept."""

    mend_site = WellKnownKeptTests.mend_site
    delegation = WellKnownKeptTests.delegation

    def assert_fetched_again_at_once(self, delegated: str) -> None:
        """Once the site is mended, the next resolution fetches it (one request) and gets
        ``delegated``: nothing of the failure was kept."""
        self.mend_site(delegated)
        before = len(self.agent.requests)
        self.assertEqual(self.delegation(), delegated)
        self.assertEqual(len(self.agent.requests), before + 1)

    def start(self) -> None:
        """As ``WellKnownKeptTests.start``, lookups waiting for a thread counted in ``waits``:
        example.org delegates to m.example:1 for an hour; that hour is over."""
        self.waits = 0
        self.agent = _SwitchableAgent(self.peers, self.clock)
        self.resolver = ServerResolver(
            self.clock, self.agent, self.srv, lookups_waited=lambda: self.waits
        )
        self.site = self.well_known(
            "example.org", {"m.server": "m.example:1"}, Cache_Control=b"max-age=3600"
        )
        self.assertEqual(self.delegation(), "m.example:1")
        self.clock.advance(3600)

    def busy_timeout(self) -> Deferred[ResolvedServer]:
        """Resolve example.org while its fetch hangs and lookups wait for a thread."""
        self.site.hang = True
        resolving = self.resolver.resolve_server("example.org")
        self.waits += 1
        self.clock.advance(WELL_KNOWN_TIMEOUT)
        return resolving

    def test_busy_timeout_not_cached_as_no_delegation(self) -> None:
        """Without a delegation held, that request falls through to SRV, but "no
        delegation" is not cached: the next request fetches again and is delegated."""
        self.start()
        self.resolver = ServerResolver(
            self.clock, self.agent, self.srv, lookups_waited=lambda: self.waits
        )
        server = self.successResultOf(self.busy_timeout())
        self.assertEqual(server.effective_name, "example.org")
        self.assertNotIn("example.org", self.resolver._cache)
        self.assertNotIn("example.org", self.resolver._failures)
        self.assert_fetched_again_at_once("m.example:1")

    def test_busy_timeout_keeps_delegation(self) -> None:
        """With a delegation held (expired), that request uses it, which is kept as it was
        (not confirmed again, not dropped), and the next request fetches again at once."""
        self.start()
        held = self.resolver._delegations["example.org"]
        self.assertEqual(self.successResultOf(self.busy_timeout()).effective_name, "m.example:1")
        self.assertEqual(self.resolver._delegations["example.org"], held)
        self.assertNotIn("example.org", self.resolver._failures)
        self.assert_fetched_again_at_once("m.example:2")

    def test_busy_after_keep_window_keeps_delegation(self) -> None:
        """Past the time a site's failures may keep it, a delegation is still not dropped
        for our own resolver's fault: a later answer of the site decides."""
        self.start()
        self.clock.advance(2 * 3600)
        self.assertEqual(self.successResultOf(self.busy_timeout()).effective_name, "m.example:1")
        self.assertIn("example.org", self.resolver._delegations)

    def test_answer_while_lookups_waited_is_the_sites(self) -> None:
        """Only a fetch that timed out is suspect: a 404 that came back while lookups waited
        for a thread is the site's answer (drops the delegation held, cached and counted),
        or under a busy resolver every request would fetch a failing .well-known again."""
        self.start()
        self.site.hang = True
        resolving = self.resolver.resolve_server("example.org")
        self.waits += 1
        [request] = self.site.pending
        request.setResponseCode(404)
        request.finish()
        self.peers.flush()
        self.assertEqual(self.successResultOf(resolving).effective_name, "example.org")
        self.assertIn("example.org", self.resolver._cache)
        self.assertEqual(self.resolver._failures["example.org"], 1)

    def test_timeout_without_waiting_lookups_cached(self) -> None:
        """A timeout while no lookup waited for a thread is the site's: cached as before."""
        self.start()
        self.resolver = ServerResolver(
            self.clock, self.agent, self.srv, lookups_waited=lambda: self.waits
        )
        self.site.hang = True
        self.assertEqual(self.delegation(), "example.org")
        self.assertIn("example.org", self.resolver._cache)
        self.assertEqual(self.resolver._failures["example.org"], 1)


class CachePeriodTests(SynchronousTestCase):
    def period(self, now: float = 1_700_000_000.0, **headers: bytes) -> float:
        raw = Headers({name.replace("_", "-").encode(): [value] for name, value in headers.items()})
        return cache_period(raw, now)

    def test_max_age(self) -> None:
        """Cache-Control max-age sets the period, among other directives and quoted."""
        self.assertEqual(self.period(Cache_Control=b"public, max-age=7200"), 7200)
        self.assertEqual(self.period(Cache_Control=b'max-age="7200"'), 7200)

    def test_clamped(self) -> None:
        """Periods are clamped to [5 min, 48 h]."""
        self.assertEqual((WELL_KNOWN_MIN_TTL, WELL_KNOWN_MAX_TTL), (5 * 60, 48 * 3600))
        self.assertEqual(self.period(Cache_Control=b"max-age=10"), WELL_KNOWN_MIN_TTL)
        self.assertEqual(self.period(Cache_Control=b"max-age=999999999"), WELL_KNOWN_MAX_TTL)

    def test_directive_names_case_insensitive(self) -> None:
        """Cache-Control directive names are case-insensitive (RFC 9111 section 5.2)."""
        self.assertEqual(self.period(Cache_Control=b"Max-Age=7200"), 7200)
        self.assertEqual(self.period(Cache_Control=b"No-Store"), WELL_KNOWN_MIN_TTL)

    def test_no_store(self) -> None:
        """no-store and no-cache count as zero, so the minimum applies."""
        self.assertEqual(self.period(Cache_Control=b"no-store"), WELL_KNOWN_MIN_TTL)
        self.assertEqual(self.period(Cache_Control=b"no-cache, max-age=9000"), WELL_KNOWN_MIN_TTL)

    def test_expires(self) -> None:
        """Expires is used relative to the Date header, else to now."""
        self.assertEqual(
            self.period(
                Expires=b"Tue, 14 Nov 2023 12:00:00 GMT", Date=b"Tue, 14 Nov 2023 10:00:00 GMT"
            ),
            7200,
        )
        now = 1_699_956_000.0  # 2023-11-14 10:00:00 UTC
        self.assertEqual(self.period(now, Expires=b"Tue, 14 Nov 2023 13:00:00 GMT"), 10800)

    def test_max_age_beats_expires(self) -> None:
        """max-age takes precedence over Expires (RFC 9111 section 5.3)."""
        self.assertEqual(
            self.period(Cache_Control=b"max-age=3600", Expires=b"Tue, 14 Nov 2023 12:00:00 GMT"),
            3600,
        )

    def test_invalid_expires(self) -> None:
        """An unparseable Expires means already expired: the minimum applies."""
        self.assertEqual(self.period(Expires=b"0"), WELL_KNOWN_MIN_TTL)

    def test_overflowing_expires(self) -> None:
        """An Expires whose numbers overflow (a 19-digit year, or a 20-digit day, hour,
        second or zone) is invalid, so already expired: the minimum, not an error; such a
        Date is ignored (now is used)."""
        huge = b"9" * 20
        for expires in (
            b"Mon, 01 Jan " + b"9" * 19 + b" 00:00:00 GMT",
            b"Mon, " + huge + b" Jan 2024 00:00:00 GMT",
            b"Mon, 01 Jan 2024 " + huge + b":00:00 GMT",
            b"01 Jan 2024 00:00:" + huge + b" GMT",
            b"Mon, 01 Jan 2024 00:00:00 +" + huge,
        ):
            self.assertEqual(self.period(Expires=expires), WELL_KNOWN_MIN_TTL, expires)
        now = 1_699_956_000.0  # 2023-11-14 10:00:00 UTC
        self.assertEqual(
            self.period(now, Expires=b"Tue, 14 Nov 2023 13:00:00 GMT", Date=huge), 10800
        )

    def test_default(self) -> None:
        """No caching headers (or an unusable max-age): 24 hours."""
        self.assertEqual(self.period(), WELL_KNOWN_DEFAULT_TTL)
        self.assertEqual(self.period(Cache_Control=b"max-age=soon"), WELL_KNOWN_DEFAULT_TTL)

    def test_spec_periods(self) -> None:
        """The spec's periods in figures ("Resolving server names"): 24 hours without caching
        headers, at most the recommended 48 hours whatever the response asks for."""
        self.assertEqual(WELL_KNOWN_DEFAULT_TTL, 24 * 3600)
        self.assertEqual(self.period(), 24 * 3600)
        self.assertLessEqual(WELL_KNOWN_MAX_TTL, 48 * 3600)
        self.assertLessEqual(self.period(Cache_Control=b"max-age=31536000"), 48 * 3600)

    def test_max_age_ascii_digits_only(self) -> None:
        """A max-age with non-ASCII digits (Latin-1 superscripts, UTF-8 Arabic-Indic) is
        ignored like any malformed one: 24 hours, or what Expires says."""
        for value in (b"\xb2", b"1\xb9", b"\xb3600", "\u0663\u0666\u0660\u0660".encode()):
            self.assertEqual(
                self.period(Cache_Control=b"max-age=" + value), WELL_KNOWN_DEFAULT_TTL, value
            )
        self.assertEqual(
            self.period(
                Cache_Control=b"max-age=\xb2",
                Expires=b"Tue, 14 Nov 2023 12:00:00 GMT",
                Date=b"Tue, 14 Nov 2023 10:00:00 GMT",
            ),
            7200,
        )


class BoundedCacheHelperTests(SynchronousTestCase):
    """The helpers that keep discovery's caches of peer-chosen names bounded."""

    def test_put_recent_moves_a_key_put_again_last(self) -> None:
        """A key put again is the most recently put (a delegation confirmed again, one more
        failure counted): the least recently put other key is dropped first, not it."""
        recent: OrderedDict[str, int] = OrderedDict()
        discovery._put_recent(recent, "a", 1, 2)
        discovery._put_recent(recent, "b", 1, 2)
        discovery._put_recent(recent, "a", 2, 2)
        discovery._put_recent(recent, "c", 1, 2)
        self.assertEqual(recent, OrderedDict([("a", 2), ("c", 1)]))

    def test_put_bounded_replacing_a_key_evicts_nothing(self) -> None:
        """Replacing the entry of a key held evicts nothing, though the cache is full of
        fresh entries; a new key then clears it."""
        cache: dict[str, Any] = {}
        for key in ("a", "b"):
            discovery._put_bounded(cache, key, discovery._WellKnownEntry(None, 0, 100), 10, 2)
        replaced = discovery._WellKnownEntry("x.example", 10, 100)
        discovery._put_bounded(cache, "a", replaced, 10, 2)
        self.assertEqual(cache, {"a": replaced, "b": discovery._WellKnownEntry(None, 0, 100)})
        discovery._put_bounded(cache, "c", replaced, 10, 2)
        self.assertEqual(cache, {"c": replaced})


class UnavailableEndToEndTests(SynchronousTestCase):
    """A lone "." SRV target through the real agent: a normal unreachable destination."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.hosts = FakeHostnameResolver(
            {"example.org": ["93.184.216.34"], "fed.example.org": ["93.184.216.35"]}
        )
        self.srv = FakeSRVResolver()
        self.srv.raw["_matrix-fed._tcp.example.org"] = [
            _srv(b"_matrix-fed._tcp.example.org", 0, 0, 0, b".")
        ]
        agent = FederationAgent(
            self.reactor,
            ServerResolver(self.reactor, FakePeersAgent(), self.srv),
            FederationTLSPolicy(),
            ip_filter=IPRangeFilter(DEFAULT_IP_BLOCKLIST),
            name_resolver=self.hosts,
        )
        self.key = generate_signing_key("k")
        self.client = FederationClient(
            self.reactor, "local.example", self.key, agent=agent, timeout=10
        )

    def assert_put_unreachable(self, reason: str, cause: type[Exception]) -> None:
        """A PUT to example.org fails with TransportError(``reason``) caused by ``cause``,
        after only the SRV lookup: no host looked up, nothing connected."""
        sending = self.client.put_json("example.org", "/_matrix/federation/v2/invite/x/y", {})
        error = self.failureResultOf(sending, TransportError).value
        self.assertEqual(error.destination, "example.org")
        self.assertEqual(error.reason, reason)
        self.assertIsInstance(error.__cause__, cause)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.hosts.lookups, [])
        self.assertEqual(self.srv.lookups, ["_matrix-fed._tcp.example.org"])

    def test_client_send_fails_without_connecting(self) -> None:
        """The client's PUT fails with TransportError, nothing looked up or connected; the
        ordinary back-off follows, after which the (now fixed) DNS is asked again."""
        self.assert_put_unreachable(
            "cannot connect: no federation service at example.org: its SRV record "
            '_matrix-fed._tcp.example.org has the target "." (RFC 2782: decidedly not available)',
            ServiceUnavailableError,
        )

        self.failureResultOf(self.client.get_json("example.org", "/x"), BackoffError)
        self.reactor.advance(FederationClient.BACKOFF_INITIAL)
        self.srv.raw["_matrix-fed._tcp.example.org"] = [
            _srv(b"_matrix-fed._tcp.example.org", 0, 0, 8443, b"fed.example.org")
        ]
        self.assertNoResult(self.client.get_json("example.org", "/x"))
        self.assertEqual(
            [(client[0], client[1]) for client in self.reactor.tcpClients],
            [("93.184.216.35", 8443)],
        )

    def test_dns_failure_is_a_transport_error(self) -> None:
        """SERVFAIL for the SRV name with nothing cached: the client's PUT fails as
        unreachable (TransportError), nothing looked up or connected, the server backed off."""
        self.srv.errors["_matrix-fed._tcp.example.org"] = _rcode_error(dns.ESERVER)
        self.assert_put_unreachable(
            "cannot connect: SRV lookup for _matrix-fed._tcp.example.org failed: "
            "the DNS server answered SERVFAIL",
            SrvLookupError,
        )
        self.failureResultOf(self.client.get_json("example.org", "/x"), BackoffError)

    def test_invite_send_fails_as_transport_error(self) -> None:
        """InviteSender reports it as InviteTransportError (no answer), not a crash or refusal."""
        signer = LocalSigner("local.example", self.key)
        keyring = Keyring(
            self.reactor,
            MemoryStore(),
            self.client,
            local_keys=[local_verify_key("local.example", self.key)],
        )
        sender = InviteSender(signer, self.client, keyring)
        built = self.successResultOf(
            build_test_invite(
                signer, "10", "@alice:local.example", "@bob:example.org", 1_700_000_000_000
            )
        )
        event, state = built
        error = self.failureResultOf(
            sender.send_invite("10", event, state), InviteTransportError
        ).value
        self.assertEqual(error.destination, "example.org")
        self.assertIn('SRV record _matrix-fed._tcp.example.org has the target "."', error.reason)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_host_without_addresses_reason(self) -> None:
        """A name with no SRV record and no address fails as unreachable, its reason saying
        "DNS lookup failed" once, then Twisted's detail."""
        sending = self.client.put_json("nowhere.example", "/_matrix/federation/v2/invite/x/y", {})
        error = self.failureResultOf(sending, TransportError).value
        self.assertEqual(
            error.reason, "DNS lookup failed: no results for hostname lookup: nowhere.example"
        )
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.hosts.lookups, ["nowhere.example"])
