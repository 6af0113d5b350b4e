"""Real TLS handshakes on loopback against certificates made in the test."""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from signedjson.key import generate_signing_key
from twisted.internet import reactor as global_reactor
from twisted.internet import ssl
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.server import Site
from zope.interface import implementer

from federation_invite.client import (
    FederationAgent,
    FederationClient,
    FederationTLSPolicy,
    IPRangeFilter,
    ServerResolver,
    TransportError,
    tls,
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


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    sans: list[x509.GeneralName] | None = None,
    ca: bool = False,
    not_before: datetime.timedelta = -datetime.timedelta(days=1),
    not_after: datetime.timedelta = datetime.timedelta(days=1),
    eku: list[x509.ObjectIdentifier] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate issued by ``issuer`` (self-signed when None), validity relative to now."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + not_before)
        .not_valid_after(now + not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def _dns(*names: str) -> list[x509.GeneralName]:
    return [x509.DNSName(name) for name in names]


def _ips(*addresses: str) -> list[x509.GeneralName]:
    return [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]


class PrivateCATests(TestCase):
    """Certificates issued by a private CA that the policy trusts: chain and name checks."""

    def setUp(self) -> None:
        self.ca = _issue("Test CA", None, ca=True, not_after=datetime.timedelta(days=30))
        self.key = generate_signing_key("k1")
        self.server_names: list[bytes | None] = []

    async def _close(self, closable: Any) -> None:
        await closable.close()
        # Let the server side see the connection go before the reactor is checked.
        await deferLater(reactor, 0.01, lambda: None)

    def serve(
        self,
        leaf: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
        chain: list[x509.Certificate] = [],  # noqa: B006
        interface: str = "127.0.0.1",
    ) -> tuple[CannedResource, int]:
        """A TLS listener presenting ``leaf`` (and ``chain``): its resource and port."""
        # Twisted passes these to pyOpenSSL, which takes cryptography objects too.
        objects: dict[str, Any] = {
            "privateKey": leaf[1],
            "certificate": leaf[0],
            "extraCertChain": chain,
        }
        options = ssl.CertificateOptions(**objects)
        options.getContext().set_tlsext_servername_callback(
            lambda connection: self.server_names.append(connection.get_servername())
        )
        resource = CannedResource(200, {"hello": "world"})
        port = reactor.listenSSL(0, Site(resource), options, interface=interface)
        self.addCleanup(port.stopListening)
        return resource, port.getHost().port

    def client(self) -> FederationClient:
        """A client trusting only the test CA; every name resolves to 127.0.0.1."""
        trust_root = ssl.Certificate.loadPEM(self.ca[0].public_bytes(serialization.Encoding.PEM))
        agent = FederationAgent(
            reactor,
            ServerResolver(reactor, FakePeersAgent(), FakeSRVResolver()),
            FederationTLSPolicy(trust_root=trust_root),
            ip_filter=IPRangeFilter(DEFAULT_IP_BLOCKLIST, ["127.0.0.1/32", "::1/128"]),
            name_resolver=_AllLoopback(),
        )
        self.addCleanup(self._close, agent)
        client = FederationClient(reactor, ORIGIN, self.key, timeout=5.0, agent=agent)
        self.addCleanup(self._close, client)
        return client

    async def assert_accepted(
        self,
        leaf: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
        host: str,
        chain: list[x509.Certificate] = [],  # noqa: B006
        interface: str = "127.0.0.1",
    ) -> None:
        """A request to ``host`` (the listener's port added) is answered."""
        resource, number = self.serve(leaf, chain, interface)
        result = await self.client().get_json(f"{host}:{number}", "/x")
        self.assertEqual(result, {"hello": "world"})
        self.assertEqual(len(resource.requests), 1)

    async def assert_refused(
        self,
        leaf: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
        host: str,
        chain: list[x509.Certificate] = [],  # noqa: B006
    ) -> None:
        """A request to ``host`` fails the TLS handshake: TransportError, nothing served."""
        resource, number = self.serve(leaf, chain)
        destination = f"{host}:{number}"
        with self.assertRaises(TransportError) as caught:
            await self.client().get_json(destination, "/x")
        self.assertEqual(caught.exception.destination, destination)
        self.assertTrue(
            caught.exception.reason.startswith("TLS handshake failed: "), caught.exception.reason
        )
        self.assertEqual(resource.requests, [])

    # -- names the certificate does not identify correctly (service_identity raised
    #    CertificateError, which Twisted's ClientTLSOptions logged and accepted)

    async def test_no_subject_alt_name(self) -> None:
        """A CA-issued certificate without SAN (its CN the name) is refused."""
        await self.assert_refused(_issue("matrix.test", self.ca), "matrix.test")

    async def test_ip_looking_dns_san_for_name(self) -> None:
        """A DNS SAN "10.0.0.1" (not a valid DNS-ID) does not let the certificate pass for a name."""
        await self.assert_refused(_issue("x", self.ca, sans=_dns("10.0.0.1")), "victim.test")

    async def test_ip_looking_dns_san_for_ip_literal(self) -> None:
        """An IP literal needs an iPAddress SAN: a DNS SAN "127.0.0.1" is refused."""
        await self.assert_refused(_issue("x", self.ca, sans=_dns("127.0.0.1")), "127.0.0.1")

    async def test_invalid_wildcard_beside_other_name(self) -> None:
        """A SAN list with another name and an invalid "*.*.x.test" is refused for a third name."""
        leaf = _issue("x", self.ca, sans=_dns("other.test", "*.*.x.test"))
        await self.assert_refused(leaf, "victim.test")

    async def test_invalid_wildcard_beside_matching_name(self) -> None:
        """One invalid SAN entry fails the certificate even for a name it lists."""
        leaf = _issue("x", self.ca, sans=_dns("matrix.test", "*.*.x.test"))
        await self.assert_refused(leaf, "matrix.test")

    async def test_wildcard_too_few_labels(self) -> None:
        """A "*.test" wildcard (too few labels) is refused for b.test."""
        await self.assert_refused(_issue("x", self.ca, sans=_dns("*.test")), "b.test")

    async def test_wildcard_too_few_labels_two_deep(self) -> None:
        """A "*.test" wildcard is refused for a.b.test."""
        await self.assert_refused(_issue("x", self.ca, sans=_dns("*.test")), "a.b.test")

    async def test_handshake_done_unchecked(self) -> None:
        """Were the leaf's name check ever skipped, the handshake would fail when done."""
        self.patch(
            tls._IdentityVerifier,
            "verify_callback",
            lambda verifier, connection, cert, errno, depth, ok: bool(ok),
        )
        await self.assert_refused(_issue("x", self.ca, sans=_dns("other.test")), "matrix.test")

    # -- the rest of the matrix: chain checks and name matching

    async def test_valid(self) -> None:
        """A certificate from the trusted CA for the name is accepted; SNI is the name."""
        await self.assert_accepted(_issue("x", self.ca, sans=_dns("matrix.test")), "matrix.test")
        self.assertEqual(self.server_names, [b"matrix.test"])

    async def test_expired(self) -> None:
        """An expired certificate is refused."""
        leaf = _issue(
            "x",
            self.ca,
            sans=_dns("matrix.test"),
            not_before=-datetime.timedelta(days=10),
            not_after=-datetime.timedelta(days=1),
        )
        await self.assert_refused(leaf, "matrix.test")

    async def test_not_yet_valid(self) -> None:
        """A certificate not valid yet is refused."""
        leaf = _issue(
            "x",
            self.ca,
            sans=_dns("matrix.test"),
            not_before=datetime.timedelta(days=1),
            not_after=datetime.timedelta(days=10),
        )
        await self.assert_refused(leaf, "matrix.test")

    async def test_self_signed(self) -> None:
        """A self-signed certificate for the name (not from the trusted CA) is refused."""
        await self.assert_refused(
            _issue("matrix.test", None, sans=_dns("matrix.test")), "matrix.test"
        )

    async def test_client_auth_only(self) -> None:
        """A certificate whose EKU is clientAuth only is refused."""
        leaf = _issue("x", self.ca, sans=_dns("matrix.test"), eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
        await self.assert_refused(leaf, "matrix.test")

    async def test_server_auth(self) -> None:
        """A certificate whose EKU is serverAuth is accepted."""
        leaf = _issue("x", self.ca, sans=_dns("matrix.test"), eku=[ExtendedKeyUsageOID.SERVER_AUTH])
        await self.assert_accepted(leaf, "matrix.test")

    async def test_intermediate(self) -> None:
        """A leaf issued by a CA intermediate (sent in the chain) is accepted."""
        intermediate = _issue("Intermediate", self.ca, ca=True)
        leaf = _issue("x", intermediate, sans=_dns("matrix.test"))
        await self.assert_accepted(leaf, "matrix.test", [intermediate[0]])

    async def test_non_ca_intermediate(self) -> None:
        """A leaf issued by an intermediate without the CA flag is refused."""
        intermediate = _issue("Intermediate", self.ca, ca=False)
        leaf = _issue("x", intermediate, sans=_dns("matrix.test"))
        await self.assert_refused(leaf, "matrix.test", [intermediate[0]])

    async def test_wildcard_one_label(self) -> None:
        """ "*.b.test" is accepted for a.b.test."""
        await self.assert_accepted(_issue("x", self.ca, sans=_dns("*.b.test")), "a.b.test")

    async def test_wildcard_not_bare_domain(self) -> None:
        """ "*.b.test" is refused for b.test itself."""
        await self.assert_refused(_issue("x", self.ca, sans=_dns("*.b.test")), "b.test")

    async def test_wildcard_not_two_labels(self) -> None:
        """ "*.b.test" is refused for x.a.b.test: a wildcard matches exactly one label."""
        await self.assert_refused(_issue("x", self.ca, sans=_dns("*.b.test")), "x.a.b.test")

    async def test_wrong_name(self) -> None:
        """A certificate for another name is refused."""
        await self.assert_refused(_issue("x", self.ca, sans=_dns("other.test")), "matrix.test")

    async def test_upper_case_server_name(self) -> None:
        """Names compare case-insensitively: an upper-case server name is accepted."""
        await self.assert_accepted(_issue("x", self.ca, sans=_dns("matrix.test")), "MATRIX.TEST")

    async def test_upper_case_san(self) -> None:
        """Names compare case-insensitively: an upper-case SAN is accepted."""
        await self.assert_accepted(_issue("x", self.ca, sans=_dns("MATRIX.TEST")), "matrix.test")

    async def test_idna_a_label(self) -> None:
        """An IDNA A-label server name matches the same A-label SAN, and is sent as SNI."""
        leaf = _issue("x", self.ca, sans=_dns("xn--bcher-kva.test"))
        await self.assert_accepted(leaf, "xn--bcher-kva.test")
        self.assertEqual(self.server_names, [b"xn--bcher-kva.test"])

    async def test_ip_literal(self) -> None:
        """An IPv4 literal with a matching iPAddress SAN is accepted, without SNI."""
        await self.assert_accepted(_issue("x", self.ca, sans=_ips("127.0.0.1")), "127.0.0.1")
        self.assertEqual(self.server_names, [None])

    async def test_ipv6_literal(self) -> None:
        """An IPv6 literal with a matching iPAddress SAN is accepted, without SNI."""
        await self.assert_accepted(_issue("x", self.ca, sans=_ips("::1")), "[::1]", interface="::1")
        self.assertEqual(self.server_names, [None])

    async def test_ip_literal_other_address(self) -> None:
        """An IP literal is refused when the iPAddress SAN is another address."""
        await self.assert_refused(_issue("x", self.ca, sans=_ips("127.0.0.2")), "127.0.0.1")

    async def test_name_with_only_ip_san(self) -> None:
        """A DNS name is refused when the certificate has only an iPAddress SAN."""
        await self.assert_refused(_issue("x", self.ca, sans=_ips("127.0.0.1")), "matrix.test")


@implementer(IHostnameResolver)
class _AllLoopback:
    """Resolves every name to 127.0.0.1 (IP literals to themselves)."""

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        return FakeHostnameResolver({hostName: ["127.0.0.1"]}).resolveHostName(
            resolutionReceiver, hostName, portNumber, addressTypes, transportSemantics
        )
