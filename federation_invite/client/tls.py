"""TLS for outbound federation: verify certificates against the name the spec prescribes.

server-server-api.md, "Resolving server names": the peer must present a valid
certificate for the hostname (or IP literal) that discovery settles on, which
is the delegated name after ``.well-known`` and never an SRV target.
Verification is on by default; ``verify=False`` exists for test deployments
and is logged loudly by whoever turns it on.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

__all__ = ["FederationTLSPolicy"]

#: Creators are cached per name; past this many names the cache starts afresh.
_MAX_CACHED_CREATORS = 1000


@implementer(IPolicyForHTTPS)
class FederationTLSPolicy:
    """Builds the TLS connection creator for one peer name.

    With ``verify`` (the default) the certificate chain is checked against
    ``trust_root`` (an ``IOpenSSLTrustRoot`` such as a ``Certificate``; the
    platform's trust store when None) and the leaf against
    the name by ``service_identity`` (a DNS name, or an IP address SAN for IP
    literals), as ``optionsForClientTLS`` does. Without it, any certificate is
    accepted, but SNI is still sent so that name-based virtual hosts work.
    """

    def __init__(self, *, verify: bool = True, trust_root: Any = None):
        self.verify = verify
        self._trust_root = trust_root
        self._creators: dict[str, IOpenSSLClientConnectionCreator] = {}
        self._unverified_options: CertificateOptions | None = None

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """The creator for a connection whose certificate must match ``hostname``.

        ``hostname`` is ASCII: a DNS name or an IP literal, with or without
        the brackets of an IPv6 server name.
        """
        name = hostname.decode("ascii")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        creator = self._creators.get(name)
        if creator is None:
            if len(self._creators) >= _MAX_CACHED_CREATORS:
                self._creators.clear()
            creator = self._make_creator(name)
            self._creators[name] = creator
        return creator

    def _make_creator(self, name: str) -> IOpenSSLClientConnectionCreator:
        if self.verify:
            creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
                name, trustRoot=self._trust_root
            )
            return creator
        if self._unverified_options is None:
            self._unverified_options = CertificateOptions(verify=False)
        return _UnverifiedCreator(name, self._unverified_options)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    """A client connection creator that accepts any certificate but still sends SNI."""

    def __init__(self, name: str, options: CertificateOptions) -> None:
        self._options = options
        # RFC 6066 section 3: SNI carries DNS names only, never IP literals.
        is_dns_name = not (isIPAddress(name) or isIPv6Address(name))
        self._server_name = name.encode("idna") if is_dns_name else None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection: SSL.Connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection
