"""TLS for outbound federation: verify certificates against the name the spec prescribes.

server-server-api.md, "Resolving server names": the peer must present a valid
certificate for the hostname (or IP literal) that discovery settles on, which
is the delegated name after ``.well-known`` and never an SRV target.
Verification is on by default; ``verify=False`` exists for test deployments
and is logged loudly by whoever turns it on.

One OpenSSL context serves every peer (loading the trust store costs about
0.85 MiB per context, and peer names are chosen by whoever sends us requests);
each connection gets its own name check, which fails the handshake on any
error, not only on ``service_identity.VerificationError`` (Twisted's
``ClientTLSOptions`` logs and accepts the rest: a certificate without SAN, or
with one SAN entry ``service_identity`` cannot parse, passed for any name).
"""

from __future__ import annotations

import weakref
from typing import Any

from OpenSSL import SSL
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion, platformTrust
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from ..logs import Logger

__all__ = ["FederationTLSPolicy"]

_log = Logger()


class _PeerIdentityError(SSL.Error):
    """The peer's certificate does not identify the name we connected to."""


@implementer(IPolicyForHTTPS)
class FederationTLSPolicy:
    """Builds the TLS connection creator for one peer name.

    With ``verify`` (the default) the certificate chain is checked against
    ``trust_root`` (an ``IOpenSSLTrustRoot`` such as a ``Certificate``; the
    platform's trust store when None) and the leaf against the name by
    ``service_identity`` (a DNS-ID, or an iPAddress SAN for IP literals); a
    certificate it cannot check (no SAN, a malformed SAN entry) is refused.
    Without it, any certificate is accepted, but SNI is still sent so that
    name-based virtual hosts work. Either way every connection of the policy
    shares one OpenSSL context (TLS 1.2 or later, Twisted's default ciphers).
    """

    def __init__(self, *, verify: bool = True, trust_root: Any = None):
        self.verify = verify
        self._trust_root = trust_root
        self._context: SSL.Context | None = None
        #: Each live connection's verifier, for the context's info callback
        #: (Twisted keeps the TLS protocol in the connection's app data).
        self._verifiers: weakref.WeakKeyDictionary[SSL.Connection, _IdentityVerifier] = (
            weakref.WeakKeyDictionary()
        )

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """The creator for a connection whose certificate must match ``hostname``.

        ``hostname`` is ASCII: a DNS name or an IP literal, with or without
        the brackets of an IPv6 server name.
        """
        name = hostname.decode("ascii")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        return _ClientConnectionCreator(name, self._get_context(), self._verifiers, self.verify)

    def _get_context(self) -> SSL.Context:
        """The policy's one context, built on first use (loading the trust store takes time)."""
        if self._context is None:
            if self.verify:
                options = CertificateOptions(
                    trustRoot=self._trust_root if self._trust_root is not None else platformTrust(),
                    raiseMinimumTo=TLSVersion.TLSv1_2,
                )
            else:
                options = CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_2)
            # Nothing changes the context once built: per-connection settings
            # (SNI, the verify callback, the verifier) go on the connection.
            context = options.getContext()
            if self.verify:
                # Context-wide (Connection.set_info_callback needs pyOpenSSL 25.2).
                context.set_info_callback(self._info_callback)
            self._context = context
        return self._context

    def _info_callback(self, connection: SSL.Connection, where: int, ret: int) -> None:
        """The verifying context's info callback: hands over to the connection's verifier."""
        try:
            self._verifiers[connection].info_callback(connection, where, ret)
        except Exception:
            # Called from inside OpenSSL: an exception escaping here would be lost.
            _log.failure("in the TLS info callback")


@implementer(IOpenSSLClientConnectionCreator)
class _ClientConnectionCreator:
    """Creates connections on the shared context, with SNI and (if verifying) the name check."""

    def __init__(
        self,
        name: str,
        context: SSL.Context,
        verifiers: weakref.WeakKeyDictionary[SSL.Connection, _IdentityVerifier],
        verify: bool,
    ) -> None:
        self._name = name
        self._context = context
        self._verifiers = verifiers
        self._verify = verify
        self._is_ip_literal = isIPAddress(name) or isIPv6Address(name)
        # RFC 6066 section 3: SNI carries DNS names only, never IP literals.
        self._server_name: bytes | None = None
        if not self._is_ip_literal:
            try:
                self._server_name = name.encode("idna")
            except UnicodeError:
                # Not a valid DNS name: nothing to send; the name check refuses it.
                pass

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        if self._verify:
            verifier = _IdentityVerifier(self._name, self._is_ip_literal, tlsProtocol)
            connection.set_verify(
                SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verifier.verify_callback
            )
            self._verifiers[connection] = verifier
        return connection


class _IdentityVerifier:
    """Checks one connection's leaf certificate against the name, failing closed.

    The check runs in OpenSSL's verify callback for the leaf (depth 0), after
    the chain checks passed, so a mismatch stops the handshake before we send
    anything. Any exception fails the connection with ``failVerification``. At
    handshake done, a connection whose leaf was never checked is failed too.
    """

    def __init__(self, name: str, is_ip_literal: bool, tls_protocol: Any) -> None:
        self._name = name
        self._is_ip_literal = is_ip_literal
        # Weak: the protocol holds the connection, which holds these callbacks.
        self._protocol: weakref.ref[Any] = weakref.ref(tls_protocol)
        self._identity_verified = False

    def verify_callback(
        self, connection: SSL.Connection, cert: Any, errno: int, depth: int, ok: int
    ) -> bool:
        if not ok:
            # OpenSSL's chain verification failed (untrusted, expired, wrong
            # purpose, ...): keep its verdict and its error.
            return False
        if depth != 0:
            return True
        try:
            if self._is_ip_literal:
                verify_certificate_ip_address(cert.to_cryptography(), self._name)
            else:
                verify_certificate_hostname(cert.to_cryptography(), self._name)
        except Exception as exc:
            self._fail(f"certificate is not valid for {self._name}: {exc!r}")
            return False
        self._identity_verified = True
        return True

    def info_callback(self, connection: SSL.Connection, where: int, ret: int) -> None:
        if where & SSL.SSL_CB_HANDSHAKE_DONE and not self._identity_verified:
            self._fail(f"the certificate was not checked against {self._name}")

    def _fail(self, message: str) -> None:
        # Called from inside OpenSSL: an exception escaping here would be lost.
        try:
            protocol = self._protocol()
            if protocol is not None:
                protocol.failVerification(Failure(_PeerIdentityError(message)))
        except Exception:
            _log.failure("while failing TLS verification")
