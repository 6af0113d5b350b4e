"""``FederationClient``: signed JSON requests to other Matrix servers.

Every request is signed with ``X-Matrix`` over the exact path and query sent,
carries a canonical JSON body when it has one, is bounded in time and in
response size, and ends in one of three ways: the parsed JSON answer, a
``RemoteError`` (the peer said no, or said something unusable) or a
``TransportError`` (no answer). A destination that keeps failing is left alone
for a while (``BackoffError``) instead of being retried on every call, except
by requests a user asked for (``put_json(..., ignore_backoff=True)``). The
back-off is per destination as written: another spelling of a server's name
(``example.org.``, which TLS checks against the certificate of ``example.org``
and fails; another case or port spelling, which a proxy routing by SNI or
``Host`` may not know) can fail where the server's own succeeds, and anyone can
make us ask for one (a forged request's origin), so none backs the server off.
"""

from __future__ import annotations

import errno
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import attrs
from OpenSSL import SSL
from signedjson.types import SigningKey
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer

from .._backoff import doubling_wait, is_failure_status, make_room
from .._clock import in_window
from .._version import __version__
from ..core.canonical import encode_canonical_json, parse_json
from ..core.ids import parse_server_name
from ..core.xmatrix import sign_request
from ..logs import Logger
from ._body import BodyTooLarge, read_body
from ._resolver import ThreadedResolver
from .agent import (
    BytesProducer,
    FederationAgent,
    ResponseHeadRefused,
    make_connection_pool,
    well_known_agent,
)
from .discovery import ServerResolver, _ResolverClosed
from .errors import (
    BackoffError,
    BlockedAddressError,
    CancelledBeforeSending,
    RemoteError,
    TransportError,
)
from .iprange import DEFAULT_IP_BLOCKLIST, IPRangeFilter
from .tls import FederationTLSPolicy

__all__ = ["FederationClient"]

_log = Logger()

_USER_AGENT = f"federation-invite/{__version__}".encode("ascii")
#: Longest error message from a peer that we keep.
_MAX_MESSAGE = 500


@attrs.define
class _Backoff:
    failures: int
    retry_at: float
    #: When the last failure was recorded.
    since: float = 0.0

    def waiting(self, now: float) -> bool:
        return in_window(self.since, now, self.retry_at)


@attrs.define(eq=False)
class _Lane:
    """The requests in flight to one destination (key requests, or the others), and those
    waiting for their turn, in order (``FederationClient._take_turn``)."""

    in_flight: int = 0
    #: Each waiting request's turn -> its deadline (``reactor.seconds()``).
    waiting: OrderedDict[Deferred[None], float] = attrs.Factory(OrderedDict)
    #: Turns ended with requests waiting, to be handed on at the reactor's next turn
    #: (``_end_turn``), and the call doing it.
    ended: int = 0
    handing_on: Any = None


@attrs.define(eq=False)
class _Progress:
    """How far one request got: whether it waited for a turn, and when it was sent."""

    waited: bool = False
    sent_at: float | None = None


class FederationClient:
    """Sends signed JSON requests to other servers and returns their JSON answers.

    ``reactor`` is used for connections and time (tests pass a ``Clock`` and
    an ``agent``); ``server_name`` and ``signing_key`` sign every request.
    Without ``agent``, requests go through a ``FederationAgent``: server
    discovery, TLS verified unless ``verify_tls`` is False (test deployments
    only; logged as a warning), addresses in ``ip_blocklist`` and not in
    ``ip_allowlist`` refused, SRV lookups through ``srv_resolver`` (a
    ``twisted.names`` resolver; the system's by default), A/AAAA lookups through
    the reactor's resolver, Twisted's ``getaddrinfo`` one (the default) in threads of
    the client's own (``ThreadedResolver``: lookups that hang cannot fill the
    reactor's pool).

    ``agent`` replaces all of that with any ``IAgent``, which receives
    ``https://<destination><path>`` URIs; that is how tests talk to in-memory
    peers (see ``federation_invite.client.testing.FakePeersAgent``, or pass a
    ``treq.testing.RequestTraversalAgent(resource)`` for a single peer).
    ``verify_tls``, the IP lists and ``srv_resolver`` are then unused.

    ``timeout`` bounds each request from start to last body byte, a wait for its turn
    included; ``max_response_bytes`` bounds the response body.

    ``concurrent_per_destination`` (8): requests in flight at once to one destination
    (as connected to: ``via`` when given), each holding a connection; more wait for their
    turn, in order, within their ``timeout``. Key requests (paths under ``/_matrix/key/``:
    the keyring's fetches and notary queries) have as many turns again of their own, so
    that a key fetch never waits behind a burst of invites to the same server. A request
    whose timeout comes while it waits fails as not sent (``TransportError.not_sent``), and
    one that timed out once sent with less than half its time left is not counted in the
    back-off either (``TransportError.waited``): it did not have its time. One cancelled
    while it waits fails with ``CancelledBeforeSending``, a ``CancelledError``.
    """

    #: Seconds a destination is left alone after its first consecutive failure;
    #: the wait doubles with each further failure (of a request started after the
    #: last one) up to ``BACKOFF_MAX``.
    BACKOFF_INITIAL = 60.0
    BACKOFF_MAX = 3600.0
    #: Failing destinations remembered at once.
    BACKOFF_TABLE_SIZE = 10_000

    def __init__(
        self,
        reactor: Any,
        server_name: str,
        signing_key: SigningKey,
        *,
        verify_tls: bool = True,
        ip_blocklist: Sequence[str] = DEFAULT_IP_BLOCKLIST,
        ip_allowlist: Sequence[str] = (),
        timeout: float = 60.0,
        max_response_bytes: int = 1_048_576,
        srv_resolver: Any = None,
        agent: IAgent | None = None,
        concurrent_per_destination: int = 8,
    ) -> None:
        parse_server_name(server_name)
        if isinstance(concurrent_per_destination, bool) or not (
            isinstance(concurrent_per_destination, int) and concurrent_per_destination >= 1
        ):
            raise ValueError(
                f"concurrent_per_destination must be an integer of at least 1: "
                f"{concurrent_per_destination!r}"
            )
        self._concurrent = concurrent_per_destination
        #: (destination, key request?) -> its requests in flight and waiting; only while any.
        self._lanes: dict[tuple[str, bool], _Lane] = {}
        self._reactor = reactor
        self._server_name = server_name
        self._signing_key = signing_key
        self._timeout = timeout
        self._max_response_bytes = max_response_bytes
        #: Back-offs by destination as written (module doc).
        self._backoff: dict[str, _Backoff] = {}
        self._pool: HTTPConnectionPool | None = None
        self._resolver: ServerResolver | None = None
        #: A/AAAA lookups, in threads of our own (``_resolver`` module).
        self._name_resolver: ThreadedResolver | None = None
        if agent is None:
            if not verify_tls:
                _log.warn(
                    "TLS certificate verification is OFF for outbound federation requests: "
                    "any server can impersonate any other. Use this only in test deployments."
                )
            ip_filter = IPRangeFilter(ip_blocklist, ip_allowlist)
            tls_policy = FederationTLSPolicy(verify=verify_tls)
            self._pool = make_connection_pool(reactor)
            names = self._name_resolver = ThreadedResolver(reactor)
            well_known = well_known_agent(
                reactor, tls_policy, ip_filter, self._pool, name_resolver=names
            )
            resolver = self._resolver = ServerResolver(
                reactor, well_known, srv_resolver, lookups_waited=self._lookups_waited
            )
            agent = FederationAgent(
                reactor,
                resolver,
                tls_policy,
                ip_filter=ip_filter,
                name_resolver=names,
                pool=self._pool,
            )
        self._agent = agent

    # -- public API

    def get_json(
        self,
        destination: str,
        path: str,
        *,
        args: Mapping[str, Any] | None = None,
        signed: bool = True,
        ignore_backoff: bool = False,
    ) -> Deferred[Any]:
        """GET ``path`` (already percent-encoded) with query ``args``; the JSON answer.

        ``ignore_backoff``: as for ``put_json``.
        """
        return Deferred.fromCoroutine(
            self._request(
                "GET", destination, path, args, None, signed, ignore_backoff=ignore_backoff
            )
        )

    def put_json(
        self,
        destination: str,
        path: str,
        body: Any,
        *,
        via: str | None = None,
        ignore_backoff: bool = False,
    ) -> Deferred[Any]:
        """PUT the JSON ``body`` (None: no body) to ``path``, signed; the JSON answer.

        ``via``: a server name to connect to (its discovery, its TLS certificate)
        instead of ``destination``'s; the request is still addressed and signed
        to ``destination`` (the X-Matrix ``destination``), which is who must
        answer it. Transport errors and back-off then concern ``via``.

        ``ignore_backoff=True``: the request is sent even while the server is
        backed off, and its outcome still counts in the back-off (a request a
        user asked for, such as an invite: Synapse sends those with
        ``ignore_backoff``). Unlike ``post_json``'s ``backoff=False``, which
        leaves the back-off out altogether.
        """
        return Deferred.fromCoroutine(
            self._request(
                "PUT", destination, path, None, body, True, via, ignore_backoff=ignore_backoff
            )
        )

    def post_json(
        self,
        destination: str,
        path: str,
        body: Any,
        *,
        signed: bool = True,
        backoff: bool = True,
    ) -> Deferred[Any]:
        """POST the JSON ``body`` (None: no body) to ``path``; the JSON answer.

        ``backoff=False``: the request is neither refused by ``destination``'s
        back-off nor counted in it (a notary query: a notary slow about the server
        asked for, which anyone can name, is not a dead notary).
        """
        return Deferred.fromCoroutine(
            self._request("POST", destination, path, None, body, signed, backoff=backoff)
        )

    def close(self) -> Deferred[None]:
        """Close idle pooled connections, abandon the ``.well-known`` fetches and SRV
        queries in flight (``ServerResolver.close``) and the address lookups waiting for a
        resolver thread (``ThreadedResolver.close``): the requests waiting for them fail
        with ``TransportError``, marked ``abandoned``, without backing their destination
        off, here or in a keyring using this client; stop the system DNS resolver's timer
        (for shutdown and tests on real sockets). The client still works after."""
        if self._resolver is not None:
            self._resolver.close()
        if self._name_resolver is not None:
            self._name_resolver.close()
        if self._pool is None:
            return succeed(None)
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed

    # -- one request

    async def _request(
        self,
        method: str,
        destination: str,
        path: str,
        args: Mapping[str, Any] | None,
        body: Any,
        signed: bool,
        via: str | None = None,
        *,
        backoff: bool = True,
        ignore_backoff: bool = False,
    ) -> Any:
        """One request. ``backoff=False``: neither refused by the back-off nor
        counted in it; ``ignore_backoff=True``: not refused by it, but counted."""
        for name in (destination, via):
            if name is None:
                continue
            try:
                parse_server_name(name)
            except ValueError as exc:
                raise TransportError(name, f"not a valid server name: {exc}") from None
        _check_path(path)
        uri = path
        if args:
            # Percent-encode everything but unreserved characters, spaces as %20.
            uri += "?" + urlencode(args, doseq=True, quote_via=quote)
        headers = Headers({b"User-Agent": [_USER_AGENT], b"Accept": [b"application/json"]})
        producer = None
        if body is not None:
            producer = BytesProducer(encode_canonical_json(body))
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
        if signed:
            # server-server-api, "Request Authentication": uri is the path and
            # query exactly as sent; content only when there is a body.
            authorization = sign_request(
                self._signing_key, self._server_name, destination, method, uri, body
            )
            headers.setRawHeaders(b"Authorization", [authorization.encode("ascii")])
        # From here on, destination is whom we connect to.
        if via is not None:
            destination = via
        if backoff and not ignore_backoff:
            self._check_backoff(destination)
        started = self._reactor.seconds()
        lookups_waited = self._lookups_waited()

        url = ("https://" + destination + uri).encode("ascii")
        progress = _Progress()
        lane = (destination, path.startswith("/_matrix/key/"))
        attempt = Deferred.fromCoroutine(
            self._attempt(
                method.encode("ascii"), destination, url, headers, producer, lane, progress
            )
        )
        timed_out = False

        def time_out() -> None:
            nonlocal timed_out
            timed_out = True
            attempt.cancel()

        timer = self._reactor.callLater(self._timeout, time_out)
        try:
            result = await attempt
        except RemoteError as exc:
            if backoff and is_failure_status(exc.status):
                self._record_failure(destination, started)
            elif backoff:
                self._record_success(destination)
            _log.info(
                "{method} {path} to {destination} failed: {error}",
                method=method,
                path=path,
                destination=destination,
                error=exc,
            )
            raise
        except Exception as exc:
            # Cancelling a request in flight surfaces as CancelledError, as
            # twisted.web's ResponseNeverReceived([CancelledError]) or, while the
            # connection is being made, as ConnectingCancelledError, depending on
            # the stage; what matters is who cancelled.
            # Not the server's fault: our resolver's threads were all busy (with lookups
            # that hang, which anyone can cause), so this request may never have reached it.
            resolver_busy = False
            # Nor when connecting failed for want of our own file descriptors or memory.
            local = _local_resource_error(exc)
            # Nor when it timed out having waited for its turn: not sent, or sent with less
            # than half its time left (with more, the server had long enough to answer).
            waited = (
                timed_out
                and progress.waited
                and (progress.sent_at is None or progress.sent_at - started > self._timeout / 2)
            )
            if local is not None:
                reason = f"not sent: {local}"
            elif waited and progress.sent_at is None:
                reason = (
                    f"not sent: timed out after {self._timeout:g} s waiting for a turn (at most"
                    f" {self._concurrent} requests in flight to a server at once)"
                )
            elif waited and progress.sent_at is not None:
                reason = (
                    f"timed out after {self._timeout:g} s, {progress.sent_at - started:.1f} s of"
                    f" them waiting for a turn (at most {self._concurrent} requests in flight to"
                    " a server at once)"
                )
            elif timed_out:
                reason = f"timed out after {self._timeout:g} s"
                if self._lookups_waited() != lookups_waited:
                    resolver_busy = True
                    reason += " (address lookups were waiting for a resolver thread)"
            elif _is_cancellation(exc) and progress.sent_at is None:
                raise CancelledBeforeSending() from exc  # while it waited for its turn
            elif _is_cancellation(exc):
                raise CancelledError() from exc
            else:
                reason = describe_failure(exc)
            # Nor when close() abandoned the request's .well-known fetch, SRV query or
            # address lookup (waiting for a resolver thread).
            abandoned = _abandoned_by_close(exc)
            error = TransportError(
                destination,
                reason,
                resolver_busy=resolver_busy,
                abandoned=abandoned,
                not_sent=local is not None or (waited and progress.sent_at is None),
                waited=waited,
            )
            if backoff and not resolver_busy and not abandoned and local is None and not waited:
                self._record_failure(destination, started)
            _log.info("{error}", error=error)
            raise error from exc
        finally:
            if timer.active():
                timer.cancel()
        if backoff:
            self._record_success(destination)
        return result

    async def _attempt(
        self,
        method: bytes,
        destination: str,
        url: bytes,
        headers: Headers,
        producer: IBodyProducer | None,
        lane: tuple[str, bool],
        progress: _Progress,
    ) -> Any:
        turn = self._take_turn(lane, self._reactor.seconds() + self._timeout)
        if turn is not None:
            progress.waited = True
            await turn  # cancelled (a timeout, the caller): out of the queue, no turn taken
        progress.sent_at = self._reactor.seconds()
        try:
            response = await self._agent.request(method, url, headers, producer)
            try:
                raw = await read_body(response, self._max_response_bytes)
            except BodyTooLarge as exc:
                raise RemoteError(destination, response.code, None, str(exc)) from None
            return _interpret(destination, response.code, response.phrase, raw)
        finally:
            self._end_turn(lane)

    # -- turns: at most ``concurrent_per_destination`` requests in flight per lane

    def _take_turn(self, key: tuple[str, bool], deadline: float) -> Deferred[None] | None:
        """None when the request may go at once (a turn taken); else a Deferred that fires
        when its turn comes (the turn then its own), cancelling which leaves the queue."""
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        if lane.in_flight < self._concurrent and not lane.waiting:
            lane.in_flight += 1
            return None

        def leave(turn: Deferred[None]) -> None:
            lane.waiting.pop(turn, None)

        turn: Deferred[None] = Deferred(leave)
        lane.waiting[turn] = deadline
        return turn

    def _end_turn(self, key: tuple[str, bool]) -> None:
        """A request's turn is over: free it (the lane forgotten once idle), or with requests
        waiting, hand it to the first at the reactor's next turn (``_hand_on``): the timers
        due now run first, so requests whose timeout has come leave the queue unsent instead
        of being sent with no time left, and a request failing at once when its turn comes
        hands it on in the same loop, not in nested calls."""
        lane = self._lanes[key]
        if not lane.waiting:
            lane.in_flight -= 1
            if not lane.in_flight:
                del self._lanes[key]
            return
        lane.ended += 1
        if lane.handing_on is None:
            lane.handing_on = self._reactor.callLater(0, self._hand_on, key, lane)

    def _hand_on(self, key: tuple[str, bool], lane: _Lane) -> None:
        """Hand the turns ended meanwhile to the requests waiting first (``_end_turn``).

        One with less than a second left (a tenth of the timeout, if less) is passed over
        and left out of the queue: it could hardly connect, let alone be answered, in that
        time, and fails as not sent when its timeout comes."""
        least = min(1.0, self._timeout / 10)
        while lane.ended:
            lane.ended -= 1
            now = self._reactor.seconds()
            while lane.waiting:
                turn, deadline = lane.waiting.popitem(last=False)
                if deadline - now >= least:
                    turn.callback(None)  # the request goes (and may end its turn at once)
                    break
            else:
                lane.in_flight -= 1
        lane.handing_on = None
        if not lane.in_flight and not lane.waiting and self._lanes.get(key) is lane:
            del self._lanes[key]

    def _lookups_waited(self) -> int:
        """Address lookups that had to wait for a resolver thread so far: if more did by a
        request's timeout than at its start, lookups waited meanwhile (its own among them,
        if it made one then)."""
        return 0 if self._name_resolver is None else self._name_resolver.waits

    # -- back-off

    def _check_backoff(self, destination: str) -> None:
        state = self._backoff.get(destination)
        now = self._reactor.seconds()
        if state is not None and state.waiting(now):
            raise BackoffError(destination, state.retry_at, state.failures, now)

    def _record_failure(self, destination: str, started: float) -> None:
        """Back ``destination`` off after a failure of a request ``started`` then.

        Requests in flight together that fail together (one outage) count once: a
        failure escalates the back-off only if the last one recorded happened before
        this request started, as Synapse's ``RetryDestinationLimiter`` does.
        """
        now = self._reactor.seconds()
        state = self._backoff.get(destination)
        if state is not None and started <= state.since <= now:
            return
        if state is None:
            make_room(
                self._backoff,
                destination,
                self.BACKOFF_TABLE_SIZE,
                over=lambda other: not other.waiting(now),
                ends=lambda other: other.retry_at,
            )
            state = self._backoff[destination] = _Backoff(0, now)
        state.failures += 1
        wait = doubling_wait(self.BACKOFF_INITIAL, self.BACKOFF_MAX, state.failures)
        state.since, state.retry_at = now, now + wait

    def _record_success(self, destination: str) -> None:
        self._backoff.pop(destination, None)


def _check_path(path: str) -> None:
    """Refuse paths that cannot go on the wire as they are (a bug in the caller)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"request path must start with '/': {path!r}")
    for char in path:
        if not "!" <= char <= "~" or char in "?#":
            raise ValueError(
                f"request path must be percent-encoded ASCII without '?' or '#' "
                f"(pass the query as args): {path!r}"
            )


def _interpret(destination: str, status: int, phrase: bytes, raw: bytes) -> Any:
    """The parsed JSON of a 2xx answer; a ``RemoteError`` for anything else."""
    try:
        body = parse_json(raw)
    except Exception:
        reason = phrase.decode("latin-1")[:_MAX_MESSAGE]
        described = f"HTTP {status} {reason}".rstrip()
        raise RemoteError(
            destination, status, None, f"{described}: body is not JSON", raw
        ) from None
    if 200 <= status < 300:
        return body
    errcode: str | None = None
    message = f"HTTP {status} {phrase.decode('latin-1')[:_MAX_MESSAGE]}".rstrip()
    if isinstance(body, dict):
        if isinstance(body.get("errcode"), str):
            errcode = body["errcode"][:_MAX_MESSAGE]
        if isinstance(body.get("error"), str):
            message = body["error"][:_MAX_MESSAGE]
    raise RemoteError(destination, status, errcode, message, body)


def describe_failure(exc: BaseException) -> str:
    """A short human reason for a transport failure (DNS, TLS, refused, blocked, ...)."""
    reasons = getattr(exc, "reasons", None)
    if isinstance(reasons, list) and reasons:
        # twisted.web's ResponseFailed & co. wrap the real causes.
        inner: list[Any] = [r.value if isinstance(r, Failure) else r for r in reasons]
        for cause in inner:
            if _is_tls_error(cause):
                return f"TLS handshake failed: {_tls_detail(cause)}"
            if isinstance(cause, ResponseHeadRefused):
                return str(cause)
        return f"connection failed: {inner[0]}"
    if isinstance(exc, BlockedAddressError):
        return f"refused by the outbound IP blocklist: {exc}"
    if isinstance(exc, DNSLookupError):
        # Its str() already starts with "DNS lookup failed" (the class docstring)
        # and ends with a full stop: give only its details, after ours.
        details = " ".join(str(arg) for arg in exc.args)
        return f"DNS lookup failed: {details}" if details else "DNS lookup failed"
    if isinstance(exc, ConnectingCancelledError):
        return "connection attempt timed out"
    if _is_tls_error(exc):
        return f"TLS handshake failed: {_tls_detail(exc)}"
    if isinstance(exc, ConnectError | ConnectionError):
        return f"cannot connect: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is how a cancelled request failed (not a timeout: the caller checks)."""
    if isinstance(exc, CancelledError | ConnectingCancelledError):
        return True
    reasons = getattr(exc, "reasons", None)
    return isinstance(reasons, list) and any(
        isinstance(r, Failure) and r.check(CancelledError, ConnectingCancelledError)
        for r in reasons
    )


#: Errors of ours, not the destination's, when connecting: errno -> what ran out.
_LOCAL_RESOURCE_ERRORS = {
    errno.EMFILE: "out of file descriptors",
    errno.ENFILE: "out of file descriptors",
    errno.ENOBUFS: "out of socket buffer memory",
    errno.ENOMEM: "out of memory",
}


def _local_resource_error(exc: BaseException) -> str | None:
    """What of ours ran out, if ``exc`` is a connection that failed for want of this
    process's or system's resources (a ``ConnectError`` or ``OSError`` with EMFILE, ENFILE,
    ENOBUFS or ENOMEM, as itself, its cause, or one of the reasons twisted.web's errors
    carry: Twisted's ``socket()`` failing is ``ConnectBindError(24, ...)``); else None."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        number: object = None
        if isinstance(current, ConnectError):
            number = current.osError
        elif isinstance(current, OSError):
            number = current.errno
        if isinstance(number, int) and number in _LOCAL_RESOURCE_ERRORS:
            return f"{_LOCAL_RESOURCE_ERRORS[number]} ({errno.errorcode[number]})"
        reasons = getattr(current, "reasons", None)
        if not isinstance(reasons, list):
            reasons = []
        linked = [r.value if isinstance(r, Failure) else r for r in reasons]
        linked += [current.__cause__, current.__context__]
        pending.extend(e for e in linked if isinstance(e, BaseException))
    return None


def _abandoned_by_close(exc: BaseException) -> bool:
    """Whether ``exc`` is a resolution step (discovery, an address lookup) abandoned by
    ``close`` (as itself, or as one of the reasons twisted.web's errors carry)."""
    if isinstance(exc, _ResolverClosed):
        return True
    reasons = getattr(exc, "reasons", None)
    return isinstance(reasons, list) and any(
        isinstance(r, Failure) and r.check(_ResolverClosed) for r in reasons
    )


def _is_tls_error(exc: object) -> bool:
    return isinstance(exc, SSL.Error) or type(exc).__name__ == "VerificationError"


def _tls_detail(exc: object) -> str:
    # pyOpenSSL errors carry [(library, function, reason), ...].
    args = getattr(exc, "args", ())
    if isinstance(exc, SSL.Error) and args and isinstance(args[0], list):
        reasons = [str(item[2]) for item in args[0] if isinstance(item, tuple) and len(item) == 3]
        if reasons:
            return "; ".join(reasons)[:_MAX_MESSAGE]
    return str(exc)[:_MAX_MESSAGE] or type(exc).__name__
