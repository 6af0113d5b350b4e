"""An ``IAgent`` that reaches Matrix servers by server name.

``FederationAgent.request(method, b"https://<server name><path>", ...)`` treats
the URI's authority as a Matrix server name, not an HTTPS origin: it resolves
it with ``ServerResolver``, sets the ``Host`` header the spec prescribes,
connects to the resolved targets in order through the IP blocklist, and checks
the certificate against the discovered TLS name. Connections are pooled (with
keep-alive) per effective server name in an ``HTTPConnectionPool``, which keeps
at most ``MAX_IDLE_CONNECTIONS`` idle over all servers; a request that a pooled
connection's close failed before any byte of an answer is sent once more on a new
connection (``_ReusedConnection``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError, ConnectionClosed, DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
    _RetryingHTTP11ClientProtocol,
)
from twisted.web.error import SchemeNotSupported
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
from ._resolver import _Lookup
from .discovery import ResolvedServer, ServerResolver, _is_ip_literal, _ResolverClosed
from .errors import BlockedAddressError
from .iprange import BlocklistingReactor, IPRangeFilter, _ReactorResolver

__all__ = [
    "MAX_IDLE_CONNECTIONS",
    "BytesProducer",
    "FederationAgent",
    "ResponseHeadRefused",
    "ResponseHeadTooLarge",
    "make_connection_pool",
    "well_known_agent",
]

_log = Logger()

#: Seconds allowed for one TCP connection attempt (all of a host's addresses).
CONNECT_TIMEOUT = 30.0


#: Largest response head (status line and header lines) read from a peer, and
#: most header lines in it. twisted.web's client parser bounds neither (only the
#: body is capped, by ``read_body``), so without them a peer streaming header
#: lines could grow our memory until the request's timeout.
MAX_RESPONSE_HEAD_BYTES = 65_536
MAX_RESPONSE_HEADER_LINES = 100


#: Most interim (1xx) heads before a response's final head. twisted.web skips each,
#: logging an info line ("Ignoring unexpected 100 response"); servers send one or two
#: (100 Continue, 103 Early Hints), and we never ask for any.
MAX_INTERIM_HEADS = 4

#: The status lines we read: "HTTP/1.x", a space, a 3-digit code, then a space (and a
#: reason phrase, maybe empty) or the line's end (RFC 9112 section 4; twisted.web accepts
#: a missing phrase). Every line of this form is read by twisted.web as this code, so the
#: limiter and twisted.web always agree on which heads are interim, hence on where the
#: final head ends; twisted.web also reads other spellings of a code (``int(codeBytes)``:
#: ``0100``, ``+100``, ``1_00``, whitespace around it, any version it can split), which
#: are refused rather than second-guessed.
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})(?: |\r?\n)")
#: The bytes of a status line that decide whether it has that form (the longest match,
#: "HTTP/1.1 200\r\n"); only these are kept of the line being read.
_STATUS_PREFIX_BYTES = 14


class ResponseHeadRefused(Exception):
    """A peer's response head was refused: past our limits, or a status line we do not read."""


class ResponseHeadTooLarge(ResponseHeadRefused):
    """A peer's response head (status line and headers) went past our limits."""


class _HeadLimitingProtocol(ProtocolWrapper):
    """Sits between the transport and twisted.web's HTTP client protocol and aborts the
    connection when one response's head goes past the limits.

    A head starts with the connection, and again with the first request written after
    the last head ended (twisted.web does not pipeline, and the pool reuses a
    connection only once its response is done); it ends at the first empty line, read
    as twisted.web reads lines (``\n``, a trailing ``\r`` dropped). Its first line is
    its status line, whatever it is, as for twisted.web: one not of the form
    ``_STATUS_LINE`` is refused. An interim 1xx head, which twisted.web skips, counts
    toward the final head's budget; more than ``MAX_INTERIM_HEADS`` are refused.
    """

    def __init__(self, factory: WrappingFactory[Any], wrapped: IProtocol) -> None:
        super().__init__(factory, wrapped)
        self.inner = wrapped
        self._in_head = True
        self._head_bytes = 0
        self._head_lines = 0
        self._interim_heads = 0
        #: The first bytes of the line being read (``_STATUS_PREFIX_BYTES``).
        self._line = b""
        #: The status code of the head being read; None before its status line.
        self._status: int | None = None
        self._exceeded: ResponseHeadRefused | None = None

    def write(self, data: bytes) -> None:
        self._next_head()
        super().write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self._next_head()
        super().writeSequence(data)

    def _next_head(self) -> None:
        if not self._in_head:
            self._in_head = True
            self._head_bytes = self._head_lines = self._interim_heads = 0
            self._line, self._status = b"", None

    def dataReceived(self, data: bytes) -> None:
        if self._exceeded is not None:
            return
        if self._in_head:
            self._exceeded = self._read_head(data)
            if self._exceeded is not None:
                transport: Any = self.transport
                transport.abortConnection()
                return
        self.wrappedProtocol.dataReceived(data)

    def _read_head(self, data: bytes) -> ResponseHeadRefused | None:
        """Count ``data``'s bytes and lines up to the head's end; why it is refused, if it is."""
        position = 0
        while self._in_head:
            newline = data.find(b"\n", position)
            stop = len(data) if newline == -1 else newline + 1
            self._head_bytes += stop - position
            if self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
                return ResponseHeadTooLarge(f"response head over {MAX_RESPONSE_HEAD_BYTES} bytes")
            if len(self._line) < _STATUS_PREFIX_BYTES:
                self._line += data[position:stop][: _STATUS_PREFIX_BYTES - len(self._line)]
            if newline == -1:
                return None
            line, self._line = self._line, b""
            position = stop
            if self._status is None:
                match = _STATUS_LINE.match(line)
                if match is None:
                    return ResponseHeadRefused(f"malformed status line: {line!r}")
                self._status = int(match[1])
                if _is_interim(self._status):
                    self._interim_heads += 1
                    if self._interim_heads > MAX_INTERIM_HEADS:
                        return ResponseHeadTooLarge(
                            f"more than {MAX_INTERIM_HEADS} interim (1xx) responses"
                        )
            elif line not in (b"\n", b"\r\n"):
                self._head_lines += 1
                if self._head_lines > MAX_RESPONSE_HEADER_LINES:
                    return ResponseHeadTooLarge(
                        f"response head over {MAX_RESPONSE_HEADER_LINES} header lines"
                    )
            elif _is_interim(self._status):
                self._status = None
            else:
                self._in_head = False
        return None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._exceeded is not None:
            reason = Failure(self._exceeded)
        super().connectionLost(reason)


def _is_interim(status: int) -> bool:
    """Whether twisted.web skips a head of this status (``HTTPClientParser.allHeadersReceived``)."""
    return 100 <= status < 200


class _HeadLimitingFactory(WrappingFactory):
    protocol = _HeadLimitingProtocol


@implementer(IStreamClientEndpoint)
class HeadLimitingEndpoint:
    """Wraps an endpoint so that its HTTP client connections bound each response head
    (``MAX_RESPONSE_HEAD_BYTES``, ``MAX_RESPONSE_HEADER_LINES``, ``MAX_INTERIM_HEADS``)
    and read only status lines of the usual form (``_STATUS_LINE``); a head past them, or
    any other status line, aborts the connection, failing the request with a
    ``ResponseHeadRefused`` (``ResponseHeadTooLarge`` for a limit) as its reason."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting: Deferred[Any] = self._endpoint.connect(_HeadLimitingFactory(protocolFactory))
        # The pool talks to the HTTP protocol itself, as wrapClientTLS's endpoint does.
        return connecting.addCallback(lambda wrapper: wrapper.inner)


@implementer(IHostnameResolver)
class _ConnectLookups:
    """The address lookups one connection attempt makes through ``resolver``: once the
    attempt fails (cancelled or timed out included), those still in progress are cancelled
    (``IHostResolution.cancel``), which Twisted's ``HostnameEndpoint`` never does, so that
    a lookup still waiting for a thread of ``ThreadedResolver`` is not made for nobody (a
    resolution that cannot be cancelled, as ``GAIResolver``'s, is left to end). An attempt
    failing for want of an address because ``ThreadedResolver.close`` answered its lookup
    fails with ``_ResolverClosed``: abandoned by ``close``, as discovery's steps are, not a
    DNS failure of the server's."""

    def __init__(self, resolver: IHostnameResolver) -> None:
        self._resolver = resolver
        self._lookups: list[IHostResolution] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        lookup = self._resolver.resolveHostName(
            resolutionReceiver, hostName, portNumber, addressTypes, transportSemantics
        )
        self._lookups.append(lookup)
        return lookup

    def connect(
        self, endpoint: IStreamClientEndpoint, factory: IProtocolFactory
    ) -> Deferred[IProtocol]:
        """``endpoint.connect(factory)``, whose failure cancels the lookups made for it
        (``endpoint``'s resolver is this one)."""
        connecting: Deferred[IProtocol] = endpoint.connect(factory)
        connecting.addErrback(self._cancel)
        return connecting

    def _cancel(self, failure: Failure) -> Failure:
        lookups, self._lookups = self._lookups, []
        for lookup in lookups:
            try:
                if lookup is not None:
                    lookup.cancel()
            except NotImplementedError:
                pass
        if failure.check(DNSLookupError):
            for lookup in lookups:
                if isinstance(lookup, _Lookup) and lookup.closed:
                    return Failure(_ResolverClosed(lookup.name))
        return failure


@implementer(IStreamClientEndpoint)
class _LookupCancellingEndpoint:
    """``endpoint``, whose connection attempt cancels its address lookups (made through
    ``lookups``) when it fails: ``_ConnectLookups``."""

    def __init__(self, endpoint: IStreamClientEndpoint, lookups: _ConnectLookups) -> None:
        self._endpoint = endpoint
        self._lookups = lookups

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._lookups.connect(self._endpoint, protocolFactory)


@implementer(IAgentEndpointFactory)
class _WellKnownEndpointFactory:
    def __init__(
        self,
        reactor: Any,
        ip_filter: IPRangeFilter,
        name_resolver: IHostnameResolver | None,
        tls_policy: IPolicyForHTTPS,
        connect_timeout: float,
    ) -> None:
        self._reactor = reactor
        self._ip_filter = ip_filter
        self._name_resolver = name_resolver or _ReactorResolver(reactor)
        self._tls_policy = tls_policy
        self._connect_timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme != b"https":
            raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
        creator = self._tls_policy.creatorForNetloc(uri.host, uri.port)
        lookups = _ConnectLookups(self._name_resolver)
        endpoint = HostnameEndpoint(
            BlocklistingReactor(self._reactor, self._ip_filter, lookups),
            uri.host.decode("ascii"),
            uri.port,
            timeout=self._connect_timeout,
        )
        return _LookupCancellingEndpoint(
            HeadLimitingEndpoint(wrapClientTLS(creator, endpoint)), lookups
        )


def well_known_agent(
    reactor: Any,
    tls_policy: IPolicyForHTTPS,
    ip_filter: IPRangeFilter,
    pool: HTTPConnectionPool,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    name_resolver: IHostnameResolver | None = None,
) -> IAgent:
    """The agent fetching ``https://<server name>/.well-known/matrix/server``: TLS with
    ``tls_policy``, addresses (from ``name_resolver``, by default the reactor's) checked
    by ``ip_filter``, response heads bounded as ``FederationAgent``'s are; a fetch
    cancelled (its timeout) cancels its address lookup (``_ConnectLookups``)."""
    factory = _WellKnownEndpointFactory(
        reactor, ip_filter, name_resolver, tls_policy, connect_timeout
    )
    return Agent.usingEndpointFactory(reactor, factory, pool=pool)


#: Most idle keep-alive connections kept over all servers. Any inbound request can name
#: a server for us to fetch keys from, so without it a flood of distinct names would keep
#: up to ``maxPersistentPerHost`` TLS connections (a file descriptor and some tens of KiB
#: each) per name for ``cachedConnectionTimeout``. 256 is a few times the servers a busy
#: deployment talks to at once and a quarter of the common 1024 descriptor limit.
MAX_IDLE_CONNECTIONS = 256


class _BoundedConnectionPool(HTTPConnectionPool):
    """An ``HTTPConnectionPool`` keeping at most ``maxPersistentTotal`` idle connections
    over all hosts: one more returned closes the one returned longest ago, of any host.

    Twisted's own bookkeeping (``_connections`` per key, ``_timeouts`` per connection) is
    kept; ``_idle`` follows ``_timeouts``' connections in the order they were returned,
    with their keys. The per-host limit of ``_putConnection`` takes connections out
    without a hook, so it is followed by dropping from ``_idle`` what left ``_timeouts``;
    ``getConnection`` is Twisted's, done here, and wraps a connection taken from the cache
    in a ``_ReusedConnection``. A key's emptied list is deleted (Twisted keeps one per key
    ever used).
    """

    maxPersistentTotal = MAX_IDLE_CONNECTIONS

    def __init__(self, reactor: Any, persistent: bool = True) -> None:
        super().__init__(reactor, persistent)
        self._idle: dict[Any, Any] = {}

    def getConnection(self, key: Any, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        """Twisted's, but a connection taken from the cache is wrapped in a
        ``_ReusedConnection`` (which sends a request again, once, on a new connection
        when the peer closed this one without answering), not Twisted's retrying wrapper."""
        connections = self._connections.get(key)
        while connections:
            connection = connections.pop(0)
            self._timeouts.pop(connection).cancel()
            del self._idle[connection]
            if not connections:
                del self._connections[key]
            if connection.state == "QUIESCENT":
                if self.retryAutomatically:
                    connection = _ReusedConnection(
                        connection, lambda: self._newConnection(key, endpoint)
                    )
                return succeed(connection)
        new: Deferred[Any] = self._newConnection(key, endpoint)
        return new

    def _putConnection(self, key: Any, connection: Any) -> None:
        cached = list(self._connections.get(key, ()))
        super()._putConnection(key, connection)
        self._forget_taken(key, cached)
        if connection not in self._timeouts:
            return  # not quiescent: Twisted refused it
        self._idle[connection] = key
        while len(self._idle) > self.maxPersistentTotal:
            oldest, oldest_key = next(iter(self._idle.items()))
            self._timeouts[oldest].cancel()
            self._removeConnection(oldest_key, oldest)

    def _removeConnection(self, key: Any, connection: Any) -> None:
        """Close an idle connection (its timeout fired, or the cap closes it)."""
        super()._removeConnection(key, connection)
        del self._idle[connection]
        if not self._connections[key]:
            del self._connections[key]

    def closeCachedConnections(self) -> Deferred[None]:
        closed: Deferred[None] = super().closeCachedConnections()
        self._idle = {}
        return closed

    def _forget_taken(self, key: Any, cached: list[Any]) -> None:
        """Drop from ``_idle`` those of ``key``'s ``cached`` connections Twisted took out."""
        for connection in cached:
            if connection not in self._timeouts:
                del self._idle[connection]
        if key in self._connections and not self._connections[key]:
            del self._connections[key]


@implementer(IBodyProducer)
class BytesProducer:
    """Writes a request body held in memory, at once; it can write it again, so a
    request with it may be sent again (``_ReusedConnection``)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _ReusedConnection(_RetryingHTTP11ClientProtocol):
    """A connection taken from the pool: a request on it that fails before any byte of an
    answer arrived because the connection was closed (the peer's idle close crossing the
    request) is sent again, once, on a new connection, whatever its method.

    Twisted's wrapper does so only for GET, HEAD, OPTIONS, DELETE and TRACE without a body
    (for any failure but a cancellation), which is kept as it is. Every request this client
    sends may be sent twice: an invite PUT is idempotent (RFC 9110 section 9.2.2; the
    receiver keys it by event ID), a key query POST only reads, and RFC 9112 section 9.3.1
    lets a client retry such a request; Synapse retries any request that failed so. Its body
    must be a ``BytesProducer``, which can write it again. The second try goes through the
    same endpoint (the same resolved server, its targets and the IP filter), under the same
    request Deferred, so the caller's timeout cancels it; it is made on a new connection,
    not wrapped, so a request is never sent a third time.
    """

    def _shouldRetry(
        self, method: bytes, exception: Exception, bodyProducer: IBodyProducer | None
    ) -> bool:
        if super()._shouldRetry(method, exception, bodyProducer):
            return True
        if bodyProducer is not None and not isinstance(bodyProducer, BytesProducer):
            return False
        if isinstance(exception, RequestNotSent):
            return True
        # ResponseNeverReceived: not a byte of the answer came (twisted.web says
        # ResponseFailed otherwise); the reasons tell a close from a refused head, a TLS
        # failure or a cancellation.
        if not isinstance(exception, ResponseNeverReceived | RequestTransmissionFailed):
            return False
        reasons = exception.reasons
        retry = bool(reasons) and all(reason.check(ConnectionClosed) for reason in reasons)
        if retry:
            _log.debug(
                "{method} sent again on a new connection: the pooled one was closed"
                " without an answer ({reason})",
                method=method.decode("ascii", "replace"),
                reason=reasons[0].value,
            )
        return retry


def make_connection_pool(reactor: Any) -> HTTPConnectionPool:
    """A keep-alive pool sized for federation: a few idle connections per server, and
    ``MAX_IDLE_CONNECTIONS`` over all servers (``maxPersistentTotal``)."""
    pool = _BoundedConnectionPool(reactor, persistent=True)
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

    async def _connect(
        self, server: ResolvedServer, factory: IProtocolFactory, attempt: _Attempt
    ) -> IProtocol:
        """Connect to the first of the server's targets that answers, over TLS; none once
        ``attempt`` is cancelled.

        Each target failing is logged at the debug level; the attempt logs one info line
        if any failed, or if addresses of the target connected to were blocked: a peer's
        SRV answer lists up to ``MAX_SRV_TARGETS`` targets, and a name any number of
        addresses.
        """
        targets = await self._resolver.resolve_targets(server)
        last_error: Exception = ConnectionError(f"no targets for {server.server_name}")
        failures: list[str] = []
        for host, port in targets:
            creator = self._tls_policy.creatorForNetloc(server.tls_name.encode("ascii"), port)
            if _is_ip_literal(host) and self._ip_filter.is_blocked(host):
                last_error = BlockedAddressError(host, [host])
                failures.append(f"{_target(host, port)} ({last_error})")
                continue
            blocked: list[str] = []
            lookups = _ConnectLookups(self._name_resolver or _ReactorResolver(self._reactor))
            reactor = BlocklistingReactor(self._reactor, self._ip_filter, lookups, blocked.append)
            endpoint = HeadLimitingEndpoint(
                wrapClientTLS(
                    creator, HostnameEndpoint(reactor, host, port, timeout=self._connect_timeout)
                )
            )
            try:
                # A failure (the request cancelled or timed out included) cancels the
                # target's address lookup, if it is still waiting for a resolver thread.
                protocol: IProtocol = await lookups.connect(endpoint, factory)
            except Exception as exc:
                if attempt.cancelled or isinstance(exc, CancelledError | ConnectingCancelledError):
                    # The request was cancelled (or timed out): stop, do not try the next
                    # target (HostnameEndpoint fails a lookup cancelled with DNSLookupError).
                    if failures:
                        _log.info(
                            "Cannot connect to {server_name}: {failed}; then the attempt was"
                            " cancelled",
                            server_name=server.server_name,
                            failed=_failed(failures),
                        )
                    if isinstance(exc, CancelledError | ConnectingCancelledError):
                        raise
                    raise CancelledError() from exc
                if isinstance(exc, _ResolverClosed):
                    # close() answered the target's address lookup, which waited for a
                    # resolver thread: the request is abandoned, no next target tried.
                    raise
                if blocked and isinstance(exc, DNSLookupError):
                    exc = BlockedAddressError(host, blocked)
                _log.debug(
                    "Cannot connect to {host}:{port} for {server_name}: {error}",
                    host=host,
                    port=port,
                    server_name=server.server_name,
                    error=exc,
                )
                dropped = ""
                if blocked and not isinstance(exc, BlockedAddressError):
                    dropped = f", blocked addresses dropped: {_addresses(blocked)}"
                failures.append(f"{_target(host, port)} ({exc}{dropped})")
                last_error = exc
                continue
            if failures or blocked:
                dropped = f" (blocked addresses dropped: {_addresses(blocked)})" if blocked else ""
                after = f" after {_failed(failures)}" if failures else ""
                _log.info(
                    "Connected to {server_name} through {target}{dropped}{after}",
                    server_name=server.server_name,
                    target=_target(host, port),
                    dropped=dropped,
                    after=after,
                )
            return protocol
        if failures:
            _log.info(
                "Cannot connect to {server_name}: {failed}",
                server_name=server.server_name,
                failed=_failed(failures, every=True),
            )
        raise last_error


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _failed(failures: list[str], every: bool = False) -> str:
    """How many targets failed, and the first three failures, for a log line."""
    count = len(failures)
    shown = "; ".join(failures[:3]) + (f"; and {count - 3} more" if count > 3 else "")
    if every and count > 1:
        return f"all {count} targets failed: {shown}"
    return f"{count} target{'s' if count > 1 else ''} failed: {shown}"


def _addresses(addresses: list[str]) -> str:
    shown = ", ".join(addresses[:4])
    return shown + (f" and {len(addresses) - 4} more" if len(addresses) > 4 else "")


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
        """``FederationAgent._connect``, cancelled for good: cancelling a coroutine's Deferred
        only cancels what it awaits, which the coroutine could take as a target failing and
        try the next (a Deferred cancelled but never fired leaves the request without an
        answer at its timeout)."""
        attempt = _Attempt()
        connecting = Deferred.fromCoroutine(
            self._agent._connect(self._server, protocolFactory, attempt)
        )

        def cancel(connected: Deferred[IProtocol]) -> None:
            attempt.cancelled = True
            connecting.cancel()

        connected: Deferred[IProtocol] = Deferred(cancel)

        def deliver(result: IProtocol | Failure) -> None:
            if connected.called:
                # Cancelled, and already failed with CancelledError: nobody takes a
                # connection made all the same.
                transport = getattr(result, "transport", None)
                if transport is not None:
                    transport.abortConnection()
                return
            if isinstance(result, Failure):
                connected.errback(result)
            else:
                connected.callback(result)

        connecting.addBoth(deliver)
        return connected


class _Attempt:
    """Whether the connection attempt was cancelled."""

    cancelled = False
