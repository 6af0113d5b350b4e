"""Outbound IP range filtering: never connect to internal addresses by accident.

Server names come from untrusted input (user IDs, events, ``.well-known``
answers, SRV records), so every address we are about to connect to is checked
against a blocklist of non-public ranges, with an allowlist to punch holes (for
tests on loopback or a private federation). The check happens on *resolved*
addresses, by wrapping the reactor's ``IHostnameResolver``: a public-looking
name that resolves to ``10.0.0.1`` is refused just like the literal.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from zope.interface import implementer, providedBy
from zope.interface.declarations import directlyProvides

from ..logs import Logger

__all__ = ["DEFAULT_IP_BLOCKLIST", "BlocklistingReactor", "BlocklistingResolver", "IPRangeFilter"]

#: Outbound ranges refused by default: loopback, RFC 1918, CGNAT, link-local,
#: benchmarking, documentation, multicast, reserved, and the IPv6 equivalents
#: (the same ground as Synapse's default ``ip_range_blacklist``).
DEFAULT_IP_BLOCKLIST: tuple[str, ...] = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/23",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
)

_log = Logger()

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _networks(ranges: Iterable[str]) -> tuple[_Network, ...]:
    return tuple(ipaddress.ip_network(text, strict=False) for text in ranges)


class IPRangeFilter:
    """Decides whether an IP address may be connected to.

    An address is blocked when it lies in a blocklisted range and in no
    allowlisted one. Anything that does not parse as an IP address is blocked:
    the filter fails closed.
    """

    def __init__(
        self, blocklist: Iterable[str] = DEFAULT_IP_BLOCKLIST, allowlist: Iterable[str] = ()
    ) -> None:
        self._blocklist = _networks(blocklist)
        self._allowlist = _networks(allowlist)

    def is_blocked(self, address: str) -> bool:
        """True when ``address`` (an IPv4 or IPv6 literal, brackets allowed) must not be used."""
        try:
            ip = _parse_ip(address)
        except ValueError:
            return True
        candidates: list[_Address] = [ip]
        # An IPv4-mapped IPv6 address (::ffff:10.0.0.1) reaches the IPv4 host,
        # so it is judged by the IPv4 rules as well as the IPv6 ones.
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        if any(_within(candidate, self._allowlist) for candidate in candidates):
            return False
        return any(_within(candidate, self._blocklist) for candidate in candidates)


def _parse_ip(address: str) -> _Address:
    text = address
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    # getaddrinfo reports link-local IPv6 addresses with a zone ("fe80::1%eth0");
    # the zone says which interface, not which address, so it is dropped.
    text = text.partition("%")[0]
    return ipaddress.ip_address(text)


def _within(ip: _Address, networks: Sequence[_Network]) -> bool:
    return any(ip.version == network.version and ip in network for network in networks)


@implementer(IResolutionReceiver)
class _FilteringReceiver:
    """Passes on resolved addresses that the filter allows and drops the rest: each one
    dropped is given to ``on_blocked``, or, without it, they are logged in one line once
    the resolution is complete (a name may have any number of addresses)."""

    def __init__(
        self,
        receiver: IResolutionReceiver,
        ip_filter: IPRangeFilter,
        host_name: str,
        on_blocked: Callable[[str], None] | None,
    ) -> None:
        self._receiver = receiver
        self._filter = ip_filter
        self._host_name = host_name
        self._on_blocked = on_blocked
        self._dropped = 0
        #: The first few addresses dropped, for the log line.
        self._shown: list[str] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self._receiver.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if not isinstance(host, str) or self._filter.is_blocked(host):
            if self._on_blocked is not None:
                self._on_blocked(str(host))
            else:
                self._dropped += 1
                if len(self._shown) < 4:
                    self._shown.append(str(host))
            return
        self._receiver.addressResolved(address)

    def resolutionComplete(self) -> None:
        if self._dropped:
            more = self._dropped - len(self._shown)
            _log.info(
                "Dropped blocked addresses of {host_name}: {addresses}{more}",
                host_name=self._host_name,
                addresses=", ".join(self._shown),
                more=f" and {more} more" if more else "",
            )
        self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class BlocklistingResolver:
    """An ``IHostnameResolver`` that hides the addresses ``ip_filter`` blocks.

    IP literals go through the wrapped resolver too (``HostnameEndpoint``
    resolves them like names), so they are filtered the same way. When every
    address is blocked the caller sees an empty answer, which
    ``HostnameEndpoint`` reports as a ``DNSLookupError``; ``on_blocked`` is told
    about each dropped address so that callers can say why (and log them: without it,
    the addresses dropped in a resolution are logged in one line).
    """

    def __init__(
        self,
        resolver: IHostnameResolver,
        ip_filter: IPRangeFilter,
        on_blocked: Callable[[str], None] | None = None,
    ) -> None:
        self._resolver = resolver
        self._filter = ip_filter
        self._on_blocked = on_blocked

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        receiver = _FilteringReceiver(resolutionReceiver, self._filter, hostName, self._on_blocked)
        return self._resolver.resolveHostName(
            receiver, hostName, portNumber, addressTypes, transportSemantics
        )


@implementer(IHostnameResolver)
class _ReactorResolver:
    """The reactor's own resolver, looked up when needed (it can be replaced later)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolver: IHostnameResolver = self._reactor.nameResolver
        return resolver.resolveHostName(
            resolutionReceiver, hostName, portNumber, addressTypes, transportSemantics
        )


class BlocklistingReactor:
    """A reactor proxy whose ``nameResolver`` is a ``BlocklistingResolver``.

    Hand it to ``HostnameEndpoint`` or ``Agent`` in place of the reactor:
    everything else is delegated to the wrapped reactor, and it provides the
    same interfaces plus ``IReactorPluggableNameResolver``. ``name_resolver``
    replaces the wrapped reactor's own resolver (tests use a fake one).
    """

    def __init__(
        self,
        reactor: Any,
        ip_filter: IPRangeFilter,
        name_resolver: IHostnameResolver | None = None,
        on_blocked: Callable[[str], None] | None = None,
    ) -> None:
        self._reactor = reactor
        if name_resolver is None:
            name_resolver = _ReactorResolver(reactor)
        self.nameResolver = BlocklistingResolver(name_resolver, ip_filter, on_blocked)
        directlyProvides(self, *providedBy(reactor), IReactorPluggableNameResolver)

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        raise NotImplementedError("BlocklistingReactor's resolver cannot be replaced")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)
