"""Tests for federation_invite.client.iprange: the outbound IP blocklist."""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IReactorPluggableNameResolver, IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from federation_invite.client.iprange import (
    BlocklistingReactor,
    BlocklistingResolver,
    IPRangeFilter,
)
from federation_invite.config import DEFAULT_IP_BLOCKLIST

from ._fakes import FakeHostnameResolver


class _Receiver:
    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.began = False
        self.complete = False

    def resolutionBegan(self, resolution: Any) -> None:
        self.began = True

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self.complete = True


@implementer(IReactorTime)
class _ReactorWithoutPluggableResolver:
    """A reactor that does not provide IReactorPluggableNameResolver."""

    def seconds(self) -> float:
        return 0.0


class IPRangeFilterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.filter = IPRangeFilter(DEFAULT_IP_BLOCKLIST)

    def test_blocks_non_public_ranges(self) -> None:
        """Loopback, private, link-local, CGNAT, multicast, documentation and ULA are refused."""
        for address in [
            "127.0.0.1",
            "127.255.0.9",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "192.0.2.10",
            "198.51.100.1",
            "203.0.113.7",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
        ]:
            self.assertTrue(self.filter.is_blocked(address), address)

    def test_default_ranges_each_blocked(self) -> None:
        """Every range of the default blocklist blocks its addresses, also those the test
        above names none of (IETF protocol assignments, the 6to4 relay anycast,
        benchmarking, reserved class E, IPv4-mapped, NAT64, discard-only, TEREDO/ORCHID,
        6to4, site-local): none can be dropped from DEFAULT_IP_BLOCKLIST unnoticed. Just
        past the end of the ranges whose size this pins, addresses pass."""
        for network, addresses in {
            "192.0.0.0/24": ["192.0.0.8", "192.0.0.255"],
            "192.88.99.0/24": ["192.88.99.1"],
            "198.18.0.0/15": ["198.18.0.1", "198.19.255.254"],
            "240.0.0.0/4": ["240.0.0.1", "254.255.255.255"],
            "::ffff:0:0/96": ["::ffff:8.8.8.8"],
            "64:ff9b::/96": ["64:ff9b::808:808"],
            "64:ff9b:1::/48": ["64:ff9b:1::1"],
            "100::/64": ["100::1"],
            "2001::/23": ["2001::1", "2001:1ff:ffff::1"],
            "2002::/16": ["2002:808:808::1"],
            "fec0::/10": ["fec0::1", "feff::1"],
        }.items():
            self.assertIn(network, DEFAULT_IP_BLOCKLIST)
            for address in addresses:
                self.assertTrue(self.filter.is_blocked(address), f"{address} ({network})")
        for address in ["198.20.0.1", "2001:200::1", "2003::1"]:
            self.assertFalse(self.filter.is_blocked(address), address)

    def test_allows_public_addresses(self) -> None:
        """Ordinary public IPv4 and IPv6 addresses pass."""
        for address in ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "2a01:4f8::1"]:
            self.assertFalse(self.filter.is_blocked(address), address)

    def test_brackets_and_zone_ids(self) -> None:
        """A bracketed literal and a zoned link-local address are judged by their address."""
        self.assertTrue(self.filter.is_blocked("[::1]"))
        self.assertTrue(self.filter.is_blocked("fe80::1%eth0"))
        self.assertFalse(self.filter.is_blocked("[2606:4700:4700::1111]"))

    def test_ipv4_mapped_ipv6(self) -> None:
        """::ffff:a.b.c.d is judged as the IPv4 address it reaches, for the allowlist too."""
        self.assertTrue(IPRangeFilter(["10.0.0.0/8"]).is_blocked("::ffff:10.0.0.1"))
        self.assertFalse(IPRangeFilter(["10.0.0.0/8"]).is_blocked("::ffff:8.8.8.8"))
        opened = IPRangeFilter(DEFAULT_IP_BLOCKLIST, ["127.0.0.1/32"])
        self.assertFalse(opened.is_blocked("::ffff:127.0.0.1"))

    def test_not_an_address_is_blocked(self) -> None:
        """Anything that is not an IP address fails closed."""
        for text in ["", "example.org", "1.2.3", "::g", "[::1"]:
            self.assertTrue(self.filter.is_blocked(text), text)

    def test_one_bracket_is_not_an_address(self) -> None:
        """Only a literal with both brackets is unbracketed: "[8.8.8.88" or "8.8.8.8]" (a
        public address with one bracket) is no address, and fails closed."""
        for text in ["[8.8.8.88", "8.8.8.8]", "[2606:4700:4700::1111"]:
            self.assertTrue(IPRangeFilter([]).is_blocked(text), text)

    def test_ranges_with_host_bits(self) -> None:
        """A configured range with host bits set (10.1.2.3/8) is taken as its network
        (10.0.0.0/8), in the blocklist and in the allowlist, not refused."""
        self.assertTrue(IPRangeFilter(["10.1.2.3/8"]).is_blocked("10.200.0.1"))
        self.assertFalse(IPRangeFilter(["10.1.2.3/8"]).is_blocked("11.0.0.1"))
        opened = IPRangeFilter(DEFAULT_IP_BLOCKLIST, ["127.0.0.1/8"])
        self.assertFalse(opened.is_blocked("127.9.9.9"))

    def test_allowlist_punches_a_hole(self) -> None:
        """An allowlisted range is let through; the rest of the blocked range stays blocked."""
        opened = IPRangeFilter(DEFAULT_IP_BLOCKLIST, ["127.0.0.1/32", "fd00::/8"])
        self.assertFalse(opened.is_blocked("127.0.0.1"))
        self.assertTrue(opened.is_blocked("127.0.0.2"))
        self.assertFalse(opened.is_blocked("fd00::5"))
        self.assertTrue(opened.is_blocked("fc00::5"))

    def test_empty_blocklist(self) -> None:
        """With no blocklist every valid address passes."""
        self.assertFalse(IPRangeFilter([]).is_blocked("127.0.0.1"))


class BlocklistingResolverTests(SynchronousTestCase):
    def test_drops_blocked_addresses(self) -> None:
        """A name resolving to private and public addresses yields only the public ones."""
        blocked: list[str] = []
        resolver = BlocklistingResolver(
            FakeHostnameResolver({"mixed.example": ["10.0.0.1", "93.184.216.34", "::1"]}),
            IPRangeFilter(DEFAULT_IP_BLOCKLIST),
            blocked.append,
        )
        receiver = _Receiver()
        resolver.resolveHostName(receiver, "mixed.example", 443)
        self.assertTrue(receiver.began)
        self.assertTrue(receiver.complete)
        self.assertEqual(receiver.addresses, ["93.184.216.34"])
        self.assertEqual(blocked, ["10.0.0.1", "::1"])

    def test_ip_literal_checked(self) -> None:
        """IP literals go through the filter like names."""
        resolver = BlocklistingResolver(FakeHostnameResolver(), IPRangeFilter(DEFAULT_IP_BLOCKLIST))
        receiver = _Receiver()
        resolver.resolveHostName(receiver, "127.0.0.1", 443)
        self.assertEqual(receiver.addresses, [])
        self.assertTrue(receiver.complete)


class BlocklistingReactorTests(SynchronousTestCase):
    def connect(self, allowlist: list[str]) -> tuple[MemoryReactorClock, Any]:
        reactor = MemoryReactorClock()
        reactor.installNameResolver(FakeHostnameResolver({"public-looking.example": ["127.0.0.1"]}))
        wrapped = BlocklistingReactor(reactor, IPRangeFilter(DEFAULT_IP_BLOCKLIST, allowlist))
        endpoint = HostnameEndpoint(wrapped, "public-looking.example", 8448)
        return reactor, endpoint.connect(Factory.forProtocol(Protocol))

    def test_name_resolving_to_loopback_refused(self) -> None:
        """A public-looking name that resolves to 127.0.0.1 never reaches connectTCP."""
        reactor, connecting = self.connect([])
        self.failureResultOf(connecting, DNSLookupError)
        self.assertEqual(reactor.tcpClients, [])

    def test_allowlisted_loopback_connects(self) -> None:
        """With 127.0.0.1 allowlisted the same name is connected to."""
        reactor, _ = self.connect(["127.0.0.1/32"])
        self.assertEqual([(c[0], c[1]) for c in reactor.tcpClients], [("127.0.0.1", 8448)])

    def test_proxies_the_reactor(self) -> None:
        """The wrapper provides the reactor's interfaces plus a pluggable name resolver."""
        reactor = MemoryReactorClock()
        wrapped = BlocklistingReactor(reactor, IPRangeFilter())
        self.assertTrue(IReactorTCP.providedBy(wrapped))
        self.assertTrue(IReactorPluggableNameResolver.providedBy(wrapped))
        self.assertEqual(wrapped.seconds(), reactor.seconds())
        self.assertRaises(NotImplementedError, wrapped.installNameResolver, FakeHostnameResolver())

    def test_pluggable_even_when_the_reactor_is_not(self) -> None:
        """The wrapper provides IReactorPluggableNameResolver even around a reactor that
        does not, so that HostnameEndpoint resolves through the filtering resolver, never
        through its own getaddrinfo fallback (which would skip the blocklist)."""
        wrapped = BlocklistingReactor(_ReactorWithoutPluggableResolver(), IPRangeFilter())
        self.assertTrue(IReactorPluggableNameResolver.providedBy(wrapped))
        self.assertTrue(IReactorTime.providedBy(wrapped))
