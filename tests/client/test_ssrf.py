"""SSRF and key abuse (hostile-input issue, point 6): redirects into internal networks, enormous
key answers, far-future key validity."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from zope.interface import implementer

from federation_invite.client import (
    BlocklistingReactor,
    FederationClient,
    IPRangeFilter,
    ServerResolver,
)
from federation_invite.client.testing import FakePeersAgent
from federation_invite.config import DEFAULT_IP_BLOCKLIST
from federation_invite.keyring import Keyring

from ..support import MemoryKeyStore, make_clock, make_key
from ._fakes import CannedResource, FakeHostnameResolver, FakeSRVResolver

PUBLIC = "93.184.216.34"


class _Redirect(Resource):
    isLeaf = True

    def __init__(self, location: bytes) -> None:
        super().__init__()
        self.location = location

    def render(self, request: Any) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"Location", self.location)
        return b""


@implementer(IAgent)
class _Split:
    """Serves some hosts from in-memory resources and sends the rest to a real agent."""

    def __init__(self, fake: FakePeersAgent, hosts: set[str], real: Any) -> None:
        self.fake, self.hosts, self.real = fake, hosts, real

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        host = uri.split(b"/")[2].decode()
        agent = self.fake if host in self.hosts else self.real
        response: Deferred[Any] = agent.request(method, uri, headers, bodyProducer)
        return response


class WellKnownRedirectTests(SynchronousTestCase):
    def test_redirect_into_internal_network_refused(self) -> None:
        """A .well-known redirect to a name resolving to 192.168.x is never connected to;
        discovery falls through to the server's own SRV/8448 route."""
        reactor = MemoryReactorClock()
        hosts = FakeHostnameResolver(
            {"internal.example": ["192.168.1.10"], "example.org": [PUBLIC]}
        )
        reactor.installNameResolver(hosts)
        real = Agent(BlocklistingReactor(reactor, IPRangeFilter(DEFAULT_IP_BLOCKLIST, ())))
        fake = FakePeersAgent(
            {"example.org": _Redirect(b"https://internal.example/.well-known/matrix/server")}
        )
        resolver = ServerResolver(reactor, _Split(fake, {"example.org"}, real), FakeSRVResolver())
        delegated = resolver.get_well_known("example.org")
        self.assertEqual(self.successResultOf(delegated), None)
        self.assertEqual(reactor.tcpClients, [])
        self.assertIn("internal.example", hosts.lookups)
        server = self.successResultOf(resolver.resolve_server("example.org"))
        self.assertEqual(
            self.successResultOf(resolver.resolve_targets(server)), [("example.org", 8448)]
        )


class KeyAbuseTests(SynchronousTestCase):
    def keyring(self, resource: Resource) -> tuple[Keyring, Any]:
        clock = make_clock()
        peers = FakePeersAgent({"huge.example": resource})
        client = FederationClient(
            clock, "us.example", make_key("us"), agent=peers, max_response_bytes=65536
        )
        return Keyring(clock, MemoryKeyStore(), client), clock

    def test_enormous_key_answer_refused(self) -> None:
        """A key server answering megabytes is cut off at the response cap and yields no key."""
        resource = CannedResource(
            200, b'{"server_name": "huge.example", "pad": "' + b"x" * 2_000_000 + b'"}'
        )
        keyring, _ = self.keyring(resource)
        keys = self.successResultOf(keyring.get_server_keys("huge.example", ["ed25519:a"], 0))
        self.assertEqual(keys, {})
        self.assertEqual(keyring.fetch_failures, 1)

    def test_far_future_validity_capped(self) -> None:
        """A key published as valid for centuries is kept as valid for seven days at most."""
        from federation_invite.core.keys import key_id_of
        from federation_invite.core.signing import SEVEN_DAYS_MS
        from federation_invite.service import build_site_root
        from federation_invite.web.keys import KeyServerResource
        from federation_invite.web.tree import build_matrix_tree

        clock = make_clock()
        key = make_key("far")
        resource = KeyServerResource(clock, "far.example", [key], validity_ms=10**15)
        peers = FakePeersAgent({"far.example": build_site_root(build_matrix_tree(resource))})
        client = FederationClient(clock, "us.example", make_key("us"), agent=peers)
        keyring = Keyring(clock, MemoryKeyStore(), client)
        now_ms = int(clock.seconds() * 1000)
        found = self.successResultOf(
            keyring.get_server_keys("far.example", [key_id_of(key)], now_ms)
        )
        self.assertEqual(found[key_id_of(key)].valid_until_ts, now_ms + SEVEN_DAYS_MS)


class PoolKeyTests(SynchronousTestCase):
    def test_servers_differing_by_port_80_never_share_connections(self) -> None:
        """Twisted keys pooled connections on (scheme, host, port) with 80 as the default port:
        our inner URIs give every effective server name its own key."""
        from twisted.web.client import URI

        from federation_invite.client.agent import pool_authority

        keys = set()
        for name in ("example.org", "example.org:80", "1.2.3.4", "1.2.3.4:80", "[::1]:80", "[::1]"):
            uri = URI.fromBytes(b"matrix-federation://" + pool_authority(name) + b"/x")
            keys.add((uri.scheme, uri.host, uri.port))
        self.assertEqual(len(keys), 6)
