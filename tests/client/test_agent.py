"""Tests for federation_invite.client.agent: where connections go, with what TLS name, and what is refused."""

from __future__ import annotations

from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.client import (
    BlockedAddressError,
    FederationAgent,
    FederationClient,
    FederationTLSPolicy,
    IPRangeFilter,
    ServerResolver,
    TransportError,
)
from federation_invite.client.testing import FakePeersAgent
from federation_invite.config import DEFAULT_IP_BLOCKLIST

from ._fakes import CannedResource, FakeHostnameResolver, FakeSRVResolver

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

    def test_not_a_federation_uri(self) -> None:
        """Only https:// (or matrix-federation://) URIs naming a server are accepted."""
        self.failureResultOf(self.agent.request(b"GET", b"http://example.org/x"), ValueError)
        self.failureResultOf(self.agent.request(b"GET", b"example.org/x"), ValueError)


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
