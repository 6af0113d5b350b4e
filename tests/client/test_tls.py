"""Real TLS handshakes on loopback against a self-signed certificate made in the test."""

from __future__ import annotations

from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet import reactor as global_reactor
from twisted.internet import ssl
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from federation_invite.client import (
    FederationAgent,
    FederationClient,
    FederationTLSPolicy,
    IPRangeFilter,
    ServerResolver,
    TransportError,
)
from federation_invite.client.testing import FakePeersAgent
from federation_invite.config import DEFAULT_IP_BLOCKLIST
from federation_invite.core.keys import verify_key_of
from federation_invite.core.xmatrix import parse_xmatrix, verify_request

from ._fakes import CannedResource, FakeHostnameResolver, FakeSRVResolver, make_certificate

reactor: Any = global_reactor
ORIGIN = "local.example"
LOOPBACK = ["127.0.0.1/32"]


class LoopbackTLSTests(TestCase):
    def setUp(self) -> None:
        self.cert_pem, key_pem = make_certificate(["matrix.test"], ["127.0.0.1"])
        options = ssl.PrivateCertificate.loadPEM(self.cert_pem + key_pem).options()
        self.server_names: list[bytes | None] = []
        options.getContext().set_tlsext_servername_callback(
            lambda connection: self.server_names.append(connection.get_servername())
        )
        self.resource = CannedResource(200, {"hello": "world"})
        self.port = reactor.listenSSL(0, Site(self.resource), options, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.number = self.port.getHost().port
        self.key = generate_signing_key("k1")

    def client(self, **kwargs: Any) -> FederationClient:
        client = FederationClient(reactor, ORIGIN, self.key, timeout=5.0, **kwargs)
        self.addCleanup(self._close, client)
        return client

    def trusting_agent(self, hosts: dict[str, list[str]]) -> FederationAgent:
        """An agent that trusts the test certificate and resolves names with ``hosts``."""
        policy = FederationTLSPolicy(trust_root=ssl.Certificate.loadPEM(self.cert_pem))
        agent = FederationAgent(
            reactor,
            ServerResolver(reactor, FakePeersAgent(), FakeSRVResolver()),
            policy,
            ip_filter=IPRangeFilter(DEFAULT_IP_BLOCKLIST, LOOPBACK),
            name_resolver=FakeHostnameResolver(hosts),
        )
        self.addCleanup(self._close, agent)
        return agent

    async def _close(self, closable: Any) -> None:
        await closable.close()
        # Let the server side see the connection go before the reactor is checked.
        await deferLater(reactor, 0.01, lambda: None)

    async def test_refused_by_default(self) -> None:
        """A self-signed certificate fails verification: TransportError, no request served."""
        client = self.client(ip_allowlist=LOOPBACK)
        with self.assertRaises(TransportError) as caught:
            await client.get_json(f"127.0.0.1:{self.number}", "/x")
        self.assertTrue(
            caught.exception.reason.startswith("TLS handshake failed"), caught.exception.reason
        )
        self.assertEqual(caught.exception.destination, f"127.0.0.1:{self.number}")
        self.assertEqual(self.resource.requests, [])

    async def test_accepted_without_verification(self) -> None:
        """verify_tls=False (loopback allowlisted) completes the request; Host and uri are as signed."""
        client = self.client(verify_tls=False, ip_allowlist=LOOPBACK)
        destination = f"127.0.0.1:{self.number}"
        result = await client.put_json(destination, "/_matrix/x/%21a%3Ab", {"k": "v"})
        self.assertEqual(result, {"hello": "world"})
        [record] = self.resource.requests
        self.assertEqual(record["host"], destination.encode())
        self.assertEqual(record["uri"], b"/_matrix/x/%21a%3Ab")
        auth = parse_xmatrix(record["headers"].getRawHeaders(b"authorization")[0])
        verify_request(
            auth, verify_key_of(self.key), "PUT", "/_matrix/x/%21a%3Ab", {"k": "v"}, destination
        )

    async def test_blocked_without_allowlist(self) -> None:
        """Without the allowlist, loopback is refused before any connection."""
        client = self.client(verify_tls=False)
        with self.assertRaises(TransportError) as caught:
            await client.get_json(f"127.0.0.1:{self.number}", "/x")
        self.assertIn("blocklist", caught.exception.reason)
        self.assertEqual(self.resource.requests, [])

    async def test_keep_alive(self) -> None:
        """Consecutive requests to one server reuse the pooled connection."""
        client = self.client(verify_tls=False, ip_allowlist=LOOPBACK)
        for _ in range(3):
            await client.get_json(f"127.0.0.1:{self.number}", "/x")
        channels = {record["channel"] for record in self.resource.requests}
        self.assertEqual(len(self.resource.requests), 3)
        self.assertEqual(len(channels), 1)

    async def test_verified_hostname(self) -> None:
        """With the certificate trusted, a name it covers verifies; SNI and Host are that name."""
        agent = self.trusting_agent({"matrix.test": ["127.0.0.1"]})
        client = self.client(agent=agent)
        result = await client.get_json(f"matrix.test:{self.number}", "/x")
        self.assertEqual(result, {"hello": "world"})
        self.assertEqual(self.server_names, [b"matrix.test"])
        self.assertEqual(self.resource.requests[0]["host"], f"matrix.test:{self.number}".encode())

    async def test_verified_wrong_name(self) -> None:
        """A trusted certificate for another name is refused (service_identity check)."""
        agent = self.trusting_agent({"other.test": ["127.0.0.1"]})
        client = self.client(agent=agent)
        with self.assertRaises(TransportError) as caught:
            await client.get_json(f"other.test:{self.number}", "/x")
        self.assertTrue(
            caught.exception.reason.startswith("TLS handshake failed"), caught.exception.reason
        )
        self.assertEqual(self.resource.requests, [])

    async def test_verified_ip_literal(self) -> None:
        """An IP literal is verified against the certificate's IP address SAN, without SNI."""
        agent = self.trusting_agent({})
        client = self.client(agent=agent)
        result = await client.get_json(f"127.0.0.1:{self.number}", "/x")
        self.assertEqual(result, {"hello": "world"})
        self.assertNotIn(b"127.0.0.1", self.server_names)

    async def test_unverified_sends_sni(self) -> None:
        """With verification off, a hostname is still sent as SNI."""
        agent = FederationAgent(
            reactor,
            ServerResolver(reactor, FakePeersAgent(), FakeSRVResolver()),
            FederationTLSPolicy(verify=False),
            ip_filter=IPRangeFilter(DEFAULT_IP_BLOCKLIST, LOOPBACK),
            name_resolver=FakeHostnameResolver({"anything.test": ["127.0.0.1"]}),
        )
        self.addCleanup(self._close, agent)
        client = self.client(agent=agent)
        self.assertEqual(
            await client.get_json(f"anything.test:{self.number}", "/x"), {"hello": "world"}
        )
        self.assertEqual(self.server_names, [b"anything.test"])
