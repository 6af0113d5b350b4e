"""An ``IAgent`` that reaches Matrix servers by server name.

``FederationAgent.request(method, b"https://<server name><path>", ...)`` treats
the URI's authority as a Matrix server name, not an HTTPS origin: it resolves
it with ``ServerResolver``, sets the ``Host`` header the spec prescribes,
connects to the resolved targets in order through the IP blocklist, and checks
the certificate against the discovered TLS name. Connections are pooled (with
keep-alive) per effective server name in an ``HTTPConnectionPool``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer

from ..logs import Logger
from .discovery import ResolvedServer, ServerResolver, _is_ip_literal
from .errors import BlockedAddressError
from .iprange import BlocklistingReactor, IPRangeFilter

__all__ = ["FederationAgent", "make_connection_pool"]

_log = Logger()

#: Seconds allowed for one TCP connection attempt (all of a host's addresses).
CONNECT_TIMEOUT = 30.0


def make_connection_pool(reactor: Any) -> HTTPConnectionPool:
    """A keep-alive pool sized for federation: a few idle connections per server."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 5
    pool.cachedConnectionTimeout = 120
    return pool


@implementer(IAgent)
class FederationAgent:
    """Sends HTTP requests to Matrix servers named in ``https://<server name>/...`` URIs.

    ``reactor`` makes the connections; ``resolver`` does server discovery;
    ``tls_policy`` builds the TLS connection for the discovered name;
    ``ip_filter`` is checked on every address connected to (IP literals and
    every A/AAAA answer from ``name_resolver``, by default the reactor's).
    """

    def __init__(
        self,
        reactor: Any,
        resolver: ServerResolver,
        tls_policy: IPolicyForHTTPS,
        *,
        ip_filter: IPRangeFilter,
        name_resolver: IHostnameResolver | None = None,
        pool: HTTPConnectionPool | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._tls_policy = tls_policy
        self._ip_filter = ip_filter
        self._name_resolver = name_resolver
        self._pool = pool if pool is not None else make_connection_pool(reactor)
        self._connect_timeout = connect_timeout

    def close(self) -> Deferred[None]:
        """Close the idle connections of this agent's pool."""
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        """Resolve the URI's server name and send the request there (``IAgent``)."""
        return Deferred.fromCoroutine(self._request(method, uri, headers, bodyProducer))

    async def _request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None,
        body_producer: IBodyProducer | None,
    ) -> IResponse:
        scheme, separator, rest = uri.partition(b"://")
        if not separator or scheme.lower() not in (b"https", b"matrix-federation"):
            raise ValueError(f"not a federation URI: {uri[:100]!r}")
        netloc, slash, path = rest.partition(b"/")
        server = await self._resolver.resolve_server(netloc.decode("ascii"))
        headers = Headers() if headers is None else headers.copy()
        headers.setRawHeaders(b"Host", [server.host_header.encode("ascii")])
        agent = Agent.usingEndpointFactory(
            self._reactor, _ServerEndpointFactory(self, server), pool=self._pool
        )
        # The inner URI only keys the pool and carries the path; the endpoint
        # factory knows where to connect. Twisted keys pooled connections on
        # (scheme, host, port) with port 80 when none is given, so the host is
        # the effective server name in hex with a fixed port: "example.org" and
        # "example.org:80" (different servers) can never share a connection.
        inner = b"matrix-federation://" + pool_authority(server.effective_name) + slash + path
        response: IResponse = await agent.request(method, inner, headers, body_producer)
        return response

    async def _connect(self, server: ResolvedServer, factory: IProtocolFactory) -> IProtocol:
        """Connect to the first of the server's targets that answers, over TLS."""
        targets = await self._resolver.resolve_targets(server)
        last_error: Exception = ConnectionError(f"no targets for {server.server_name}")
        for host, port in targets:
            creator = self._tls_policy.creatorForNetloc(server.tls_name.encode("ascii"), port)
            if _is_ip_literal(host) and self._ip_filter.is_blocked(host):
                last_error = BlockedAddressError(host, [host])
                continue
            blocked: list[str] = []
            reactor = BlocklistingReactor(
                self._reactor, self._ip_filter, self._name_resolver, blocked.append
            )
            endpoint = wrapClientTLS(
                creator, HostnameEndpoint(reactor, host, port, timeout=self._connect_timeout)
            )
            try:
                protocol: IProtocol = await endpoint.connect(factory)
            except (CancelledError, ConnectingCancelledError):
                # The request was cancelled (or timed out): stop, do not try the next target.
                raise
            except Exception as exc:
                if blocked and isinstance(exc, DNSLookupError):
                    exc = BlockedAddressError(host, blocked)
                _log.info(
                    "Cannot connect to {host}:{port} for {server_name}: {error}",
                    host=host,
                    port=port,
                    server_name=server.server_name,
                    error=exc,
                )
                last_error = exc
                continue
            return protocol
        raise last_error


def pool_authority(effective_name: str) -> bytes:
    """The authority of the inner URI that keys the connection pool: one per server name."""
    return effective_name.encode("ascii").hex().encode("ascii") + b":1"


@implementer(IAgentEndpointFactory)
class _ServerEndpointFactory:
    def __init__(self, agent: FederationAgent, server: ResolvedServer) -> None:
        self._agent = agent
        self._server = server

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return _ServerEndpoint(self._agent, self._server)


@implementer(IStreamClientEndpoint)
class _ServerEndpoint:
    def __init__(self, agent: FederationAgent, server: ResolvedServer) -> None:
        self._agent = agent
        self._server = server

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._agent._connect(self._server, protocolFactory))
