"""Fakes shared by the client tests: DNS (SRV and A/AAAA), peers and TLS certificates."""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Iterable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.abstract import isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer


class FakeSRVResolver:
    """A ``twisted.names`` resolver answering SRV queries from a table.

    ``records`` maps a query name to ``[(priority, weight, port, target), ...]``;
    names not in it answer NXDOMAIN; ``errors`` maps names to exceptions.

    While ``hold`` is set, lookups stay outstanding until ``release(name)``, and
    callers of one name share one query as ``twisted.names.client.Resolver``
    does: the first caller gets the query's Deferred (cancelling it fails every
    caller with CancelledError), later ones Deferreds fed from it.
    """

    def __init__(
        self,
        records: dict[str, list[tuple[int, int, int, str]]] | None = None,
        errors: dict[str, Exception] | None = None,
    ) -> None:
        self.records = records or {}
        self.errors = errors or {}
        #: Query names answered with these RRHeaders as they are.
        self.raw: dict[str, list[dns.RRHeader]] = {}
        self.lookups: list[str] = []
        self.hold = False
        #: Query name -> (the outstanding query, the callers sharing it).
        self.outstanding: dict[str, tuple[Deferred[Any], list[Deferred[Any]]]] = {}

    def lookupService(self, name: str, timeout: Any = None) -> Deferred[Any]:
        self.lookups.append(name)
        if not self.hold:
            return self._answer(name)
        if name in self.outstanding:
            shared: Deferred[Any] = Deferred()
            self.outstanding[name][1].append(shared)
            return shared
        query: Deferred[Any] = Deferred()
        sharing: list[Deferred[Any]] = []

        def share(result: Any) -> Any:
            del self.outstanding[name]
            for waiter in sharing:
                waiter.callback(result)
            return result

        query.addBoth(share)
        self.outstanding[name] = (query, sharing)
        return query

    def release(self, name: str) -> None:
        """Answer the outstanding query for ``name`` from the tables."""
        query, _ = self.outstanding[name]
        self._answer(name).chainDeferred(query)

    def _answer(self, name: str) -> Deferred[Any]:
        if name in self.errors:
            return fail(self.errors[name])
        if name in self.raw:
            return succeed((self.raw[name], [], []))
        if name not in self.records:
            return fail(DNSNameError(name))
        answers = [
            dns.RRHeader(
                name=name,
                type=dns.SRV,
                payload=dns.Record_SRV(priority, weight, port, target),
            )
            for priority, weight, port, target in self.records[name]
        ]
        return succeed((answers, [], []))


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class FakeHostnameResolver:
    """A synchronous A/AAAA resolver: ``hosts`` maps names to IP lists; literals resolve to themselves."""

    def __init__(self, hosts: dict[str, list[str]] | None = None) -> None:
        self.hosts = hosts or {}
        self.lookups: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.lookups.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        try:
            ipaddress.ip_address(hostName)
            addresses: Iterable[str] = [hostName]
        except ValueError:
            addresses = self.hosts.get(hostName, [])
        for address in addresses:
            if isIPv6Address(address):
                resolutionReceiver.addressResolved(IPv6Address("TCP", address, portNumber))
            else:
                resolutionReceiver.addressResolved(IPv4Address("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


class CannedResource(Resource):
    """A leaf resource that records each request and answers with canned data.

    ``code``, ``body`` (bytes, or a JSON value) and ``headers`` make the
    answer; ``hang`` answers never (NOT_DONE_YET); ``chunks`` writes the body
    in pieces without a Content-Length.
    """

    isLeaf = True

    def __init__(
        self,
        code: int = 200,
        body: Any = b"{}",
        headers: dict[bytes, bytes] | None = None,
        *,
        hang: bool = False,
        chunks: list[bytes] | None = None,
    ) -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.headers = headers or {}
        self.hang = hang
        self.chunks = chunks
        self.requests: list[dict[str, Any]] = []
        #: Requests left unanswered because of ``hang``.
        self.pending: list[Request] = []

    def render(self, request: Request) -> Any:
        self.requests.append(
            {
                "method": request.method,
                "uri": request.uri,
                "headers": request.requestHeaders,
                "body": request.content.read(),
                "host": request.getHeader(b"host"),
                "channel": id(request.channel),
            }
        )
        if self.hang:
            self.pending.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        if self.chunks is not None:
            for chunk in self.chunks:
                request.write(chunk)
            request.finish()
            return NOT_DONE_YET
        body = self.body
        if not isinstance(body, bytes):
            body = json.dumps(body).encode("utf-8")
            request.setHeader(b"Content-Type", b"application/json")
        return body


def make_certificate(
    dns_names: list[str],
    ips: list[str] = (),  # type: ignore[assignment]
) -> tuple[bytes, bytes]:
    """A self-signed certificate (PEM) and its EC key (PEM) for the given names."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns_names or ips)[0])])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem
