"""Server discovery: from a Matrix server name to where and how to connect.

server-server-api.md, "Resolving server names", in the spec's order: IP
literal; hostname with explicit port; ``https://<host>/.well-known/matrix/server``
(delegation, cached); SRV ``_matrix-fed._tcp`` then the deprecated
``_matrix._tcp``; finally the host on port 8448. Each step also fixes the
``Host`` header and the name the TLS certificate must match, which after
delegation is the delegated name and never an SRV target.

Resolution happens in two halves, because the second is only needed when a new
connection is opened: ``resolve_server`` (which may fetch ``.well-known``)
answers a ``ResolvedServer``; ``resolve_targets`` turns it into the
``(host, port)`` pairs to try, looking up SRV records where the spec says so (at
most ``MAX_SRV_TARGETS`` of them, the first in RFC 2782 order).
A and AAAA lookups are left to the connection endpoint, whose resolver applies
the outbound IP blocklist.

An SRV answer whose only target is "." ends resolution with
``ServiceUnavailableError``: RFC 2782 says the service is "decidedly not
available at this domain", so neither the deprecated SRV name nor port 8448 is
tried. Nor are they when DNS fails to answer (a timeout, SERVFAIL, REFUSED):
the spec takes those steps when a record "was not found", so the last answer
is used, or, with none, resolution ends with ``SrvLookupError``, as in Synapse.
"""

from __future__ import annotations

import email.utils
import errno
import itertools
import random as _random
import re
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol, TypeVar
from urllib.parse import urljoin

import attrs
from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolver
from twisted.names import client as names_client
from twisted.names import dns
from twisted.names.error import (
    DNSNameError,
    DNSNotImplementedError,
    DomainError,
)
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from .._backoff import doubling_wait
from .._clock import in_window
from .._version import __version__
from ..core.canonical import parse_json
from ..core.ids import parse_server_name
from ..logs import Logger
from ._body import discard_body, read_body

__all__ = [
    "DEFAULT_PORT",
    "MAX_SRV_TARGETS",
    "ResolvedServer",
    "ServerResolver",
    "ServiceUnavailableError",
    "SrvLookupError",
]

_log = Logger()

#: The port used when neither the server name nor an SRV record gives one.
DEFAULT_PORT = 8448

#: Largest ``.well-known/matrix/server`` body we read.
WELL_KNOWN_MAX_BYTES = 50 * 1024
#: How long a whole ``.well-known`` fetch (redirects included) may take.
WELL_KNOWN_TIMEOUT = 30.0
#: Redirects followed before giving up (the spec asks us to avoid loops).
WELL_KNOWN_REDIRECT_LIMIT = 5
#: The statuses whose ``Location`` is followed (RFC 9110 section 15.4).
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
#: The spec's "sensible default" cache period when the response says nothing.
WELL_KNOWN_DEFAULT_TTL = 24 * 3600.0
#: Bounds on the cache period a response may ask for (the spec recommends 48 h at most).
WELL_KNOWN_MIN_TTL = 5 * 60.0
WELL_KNOWN_MAX_TTL = 48 * 3600.0
#: Failed or invalid answers are cached for this long, doubling per consecutive
#: failure up to ``WELL_KNOWN_ERROR_MAX_TTL`` ("errors are recommended to be
#: cached for up to an hour, and servers are encouraged to exponentially back off").
WELL_KNOWN_ERROR_TTL = 5 * 60.0
WELL_KNOWN_ERROR_MAX_TTL = 3600.0
#: After a temporary failure (no connection, no answer in time, 5xx, a body too
#: large) to fetch anew a delegation that has expired, the delegation is kept
#: and fetched again after this long (Synapse's ``WELL_KNOWN_DOWN_CACHE_PERIOD``),
#: for at most its TTL again after it expired; then it is dropped as any failure.
WELL_KNOWN_DOWN_TTL = 2 * 60.0
#: Hostnames whose ``.well-known`` answer is remembered at once; also the
#: number of hostnames whose consecutive failures are counted (the most
#: recently failed ones: hostnames are peer-chosen, so this must be bounded),
#: and of delegations kept for temporary failures (the most recently fetched).
WELL_KNOWN_CACHE_SIZE = 10_000

#: RFC 9111 section 1.2.2 delta-seconds: ASCII digits only (``str.isdigit``
#: also accepts "²", which ``float`` then refuses).
_DELTA_SECONDS = re.compile(r"[0-9]+")

#: Retry delays for one SRV query: up to 15 s in all.
_DNS_TIMEOUT = (1, 3, 11)
#: An SRV query still unanswered after this long (a resolver ignoring its
#: timeouts) is given up on, as a DNS timeout.
SRV_QUERY_TIMEOUT = 20.0
#: SRV answers are kept for their TTL (the shortest in the answer), at most this
#: long; negative ones (NXDOMAIN, or no SRV record) for their SOA's negative TTL
#: (RFC 2308 section 5), at most ``SRV_NEGATIVE_MAX_TTL``; without an SOA, not at all.
SRV_MAX_TTL = 24 * 3600.0
SRV_NEGATIVE_MAX_TTL = 3600.0
#: Most SRV targets tried for one connection: the first in RFC 2782 order. An answer may
#: list about 1000 (one DNS message over TCP as resolvers send it, its names compressed:
#: Twisted decodes no more than 1000 compression pointers in one message; about 1500 at
#: most with no name compressed), each an A/AAAA lookup and a connection attempt; real
#: servers list a handful.
MAX_SRV_TARGETS = 32
#: Most records of one SRV answer remembered (``_bound_srv``): each answer is kept up to
#: ``SRV_MAX_TTL``, for up to ``SRV_CACHE_SIZE`` peer-chosen names, at some 300 to 500
#: bytes a record.
SRV_MAX_RECORDS = 2 * MAX_SRV_TARGETS
#: SRV names whose answers are remembered at once (names are peer-chosen); also
#: of the last answers with records kept for DNS failures (the most recently answered).
SRV_CACHE_SIZE = 10_000

_USER_AGENT = f"federation-invite/{__version__}".encode("ascii")


@attrs.frozen
class ResolvedServer:
    """Where and how to reach one server name (server-server-api, "Resolving server names")."""

    #: The server name asked about.
    server_name: str
    #: The name routing depends on: the delegated server name after ``.well-known``,
    #: else ``server_name``. Connections are pooled per this name.
    effective_name: str
    #: The hostname or IP address (IPv6 without brackets) to connect to, or to
    #: look SRV records up for when ``port`` is None.
    host: str
    #: The port to connect to; None means "look up SRV records, else 8448".
    port: int | None
    #: The ``Host`` header every request to this server carries.
    host_header: str
    #: The name (DNS name or IP address) the server's certificate must be valid for.
    tls_name: str


def _system_srv_resolver(reactor: Any) -> IResolver:
    """A DNS resolver using the system's name servers and our reactor.

    (``twisted.names.client.createResolver`` would use the global reactor.)
    Answers are cached by ``ServerResolver`` itself: twisted.names'
    ``CacheResolver`` is filled only by a DNS server, never by a client's lookups.
    Concurrent queries for one name share one request (``client.Resolver``).
    It re-reads resolv.conf when it changes (checked every 60 s, on a timer
    that ``_stop_system_srv_resolver`` cancels), as a long-running daemon needs.
    """
    resolver: IResolver = _QuietResolver(resolv="/etc/resolv.conf", reactor=reactor)
    return resolver


class _QuietDatagramProtocol(dns.DNSDatagramProtocol):
    """A DNS query's UDP protocol that does not log its start and stop."""

    noisy = False


class _QuietResolver(names_client.Resolver):
    """twisted.names' client ``Resolver``, its UDP protocols not noisy.

    Each query has its own protocol, on a fresh random source port (RFC 5452), which logged
    ``Starting protocol <...>`` and ``Stopping protocol <...>``: two lines naming nothing
    but an object address, for every query of a name any peer chooses. (Its TCP factory
    is quiet already.)
    """

    def _connectedProtocol(self, interface: str = "") -> dns.DNSDatagramProtocol:
        # Twisted's (26.10), with our protocol: a random source port, another on a port
        # in use, none when out of descriptors or after 1000 tries.
        failures = 0
        protocol = _QuietDatagramProtocol(self, reactor=self._reactor)
        while True:
            try:
                self._reactor.listenUDP(dns.randomSource(), protocol, interface=interface)
            except error.CannotListenError as exc:
                failures += 1
                if getattr(exc.socketError, "errno", None) == errno.EMFILE or failures >= 1000:
                    raise
            else:
                return protocol


def _stop_system_srv_resolver(resolver: IResolver) -> None:
    """Cancel the timer with which a ``_system_srv_resolver`` re-reads resolv.conf.

    ``client.Resolver`` schedules it every 60 s for as long as it lives, and
    has no method to stop it: left, it outlives the client on the reactor.
    Lookups still work after, with the name servers last read.
    """
    parse_call = getattr(resolver, "_parseCall", None)
    if parse_call is not None and parse_call.active():
        parse_call.cancel()


class ServiceUnavailableError(ConnectionError):
    """The SRV records of a host say it offers no federation: its only target is ".".

    RFC 2782: 'A Target of "." means that the service is decidedly not
    available at this domain.' A ``ConnectionError``, as the agent's other
    reasons for connecting nowhere are, so the client reports it as an
    unreachable destination (``TransportError``) and backs off as for any
    other failure. ``hostname`` is the host (after delegation) whose SRV
    records were looked up, ``service_name`` the name that answered ".".
    """

    def __init__(self, hostname: str, service_name: str) -> None:
        self.hostname = hostname
        self.service_name = service_name
        super().__init__(
            f"no federation service at {hostname}: its SRV record {service_name} "
            f'has the target "." (RFC 2782: decidedly not available)'
        )


class SrvLookupError(ConnectionError):
    """DNS gave no answer for an SRV name (no reply in time, SERVFAIL, REFUSED, ...) and
    none is cached.

    Not "no record": the spec's next steps (the deprecated SRV name, then port
    8448) are for an SRV record that "was not found", which DNS did not say.
    Like Synapse, the request then fails; a ``ConnectionError``, so the client
    reports an unreachable destination (``TransportError``) and backs off.
    ``service_name`` is the SRV name looked up.
    """

    def __init__(self, service_name: str, reason: str) -> None:
        self.service_name = service_name
        super().__init__(f"SRV lookup for {service_name} failed: {reason}")


class _ResolverClosed(ConnectionError):
    """A resolution step in flight (a ``.well-known`` fetch, an SRV query) abandoned by
    ``ServerResolver.close``: a ``ConnectionError``, so the client reports a
    ``TransportError``. ``what`` is the URI fetched or the SRV name looked up."""

    def __init__(self, what: str) -> None:
        super().__init__(f"resolving {what} abandoned: the resolver was closed")


class _WellKnownInvalid(Exception):
    """The ``.well-known`` answer says there is no valid delegation; discovery falls
    through to SRV. Any other failure to fetch it (no connection, no answer in
    time, ``_WellKnownUnavailable``) is temporary."""


class _WellKnownUnavailable(Exception):
    """The ``.well-known`` host answered with a 5xx status: try again later."""


@attrs.frozen
class _WellKnownEntry:
    delegated: str | None
    fetched_at: float
    expires_at: float

    def fresh(self, now: float) -> bool:
        return in_window(self.fetched_at, now, self.expires_at)


@attrs.frozen
class _Delegation:
    """A delegation last fetched at ``confirmed_at``, which temporary failures to fetch it
    anew may keep until ``keep_until`` (its TTL twice over from then)."""

    delegated: str
    confirmed_at: float
    keep_until: float

    def keeps(self, now: float) -> bool:
        """Whether a temporary failure to fetch the delegation anew may keep it."""
        return in_window(self.confirmed_at, now, self.keep_until)


@attrs.frozen
class _SrvEntry:
    records: list[dns.Record_SRV]
    fetched_at: float
    expires_at: float

    def fresh(self, now: float) -> bool:
        return in_window(self.fetched_at, now, self.expires_at)


def _unbracket(host: str) -> str:
    return host[1:-1] if host.startswith("[") else host


def _is_ip_literal(host: str) -> bool:
    return isIPAddress(host) or isIPv6Address(_unbracket(host))


class ServerResolver:
    """Resolves Matrix server names, caching ``.well-known`` and SRV answers.

    ``reactor`` gives the time and timeouts; ``well_known_agent`` fetches
    ``.well-known`` documents (it should itself apply the IP blocklist and TLS
    verification; redirects, only to ``https``, are followed here);
    ``srv_resolver`` is a ``twisted.names`` ``IResolver`` (default: the
    system's, created on first use and stopped by ``close``); ``random`` orders
    SRV records of equal priority by weight. ``lookups_waited`` counts the address
    lookups that had to wait for a thread of our resolver (``ThreadedResolver.waits``):
    a ``.well-known`` fetch timing out while it grew may never have reached the site,
    and is not taken as its answer (``_refresh_well_known``).
    """

    def __init__(
        self,
        reactor: Any,
        well_known_agent: IAgent,
        srv_resolver: IResolver | None = None,
        *,
        random: _random.Random | None = None,
        lookups_waited: Callable[[], int] | None = None,
    ) -> None:
        self._reactor = reactor
        self._well_known_agent = well_known_agent
        self._lookups_waited = lookups_waited or (lambda: 0)
        self._srv_resolver = srv_resolver
        #: The system resolver created here (not given), which ``close`` stops.
        self._own_srv_resolver: IResolver | None = None
        self._random = random or _random.Random()
        self._cache: dict[str, _WellKnownEntry] = {}
        #: Hostname -> its last delegation fetched, least recently fetched first. Apart
        #: from ``_cache``, whose expired entries go first when it is full (a delegation
        #: is kept after it expired) and which any failing hostname a peer names fills.
        self._delegations: OrderedDict[str, _Delegation] = OrderedDict()
        #: Consecutive failures per hostname, least recently failed first.
        self._failures: OrderedDict[str, int] = OrderedDict()
        self._inflight: dict[str, Deferred[str | None]] = {}
        #: SRV query name -> its last answer (kept while fresh; a negative one is used
        #: stale if DNS fails).
        self._srv_cache: dict[str, _SrvEntry] = {}
        #: SRV query name -> its last answer with records, however old, least recently
        #: answered first: what DNS failures fall back on. Apart from ``_srv_cache``, whose
        #: expired entries go first when it is full and which any name a peer names fills.
        self._srv_kept: OrderedDict[str, list[dns.Record_SRV]] = OrderedDict()
        #: SRV query name -> the callers waiting for its query in flight.
        self._srv_waiters: dict[str, list[Deferred[list[dns.Record_SRV]]]] = {}
        #: SRV query name -> its query in flight (which ``close`` cancels).
        self._srv_queries: dict[str, Deferred[list[dns.Record_SRV]]] = {}
        #: Set while ``close`` cancels the steps in flight (which fail at once): a failure
        #: then is their cancellation, not an answer (nothing is cached or counted from it).
        self._closing = False

    # -- public boundary

    def resolve_server(self, server_name: str) -> Deferred[ResolvedServer]:
        """Steps 1-3 of the spec's process: literal, explicit port, ``.well-known``.

        Fails with ``ValueError`` if ``server_name`` is not a valid server name.
        """
        return Deferred.fromCoroutine(self._resolve_server(server_name))

    def resolve_targets(self, server: ResolvedServer) -> Deferred[list[tuple[str, int]]]:
        """The ``(host, port)`` pairs to try, in order (SRV steps and the 8448 fallback), at
        most ``MAX_SRV_TARGETS``.

        Fails with ``ServiceUnavailableError`` when SRV says there is no service,
        ``SrvLookupError`` when DNS does not answer and no earlier answer is kept.
        """
        return Deferred.fromCoroutine(self._resolve_targets(server))

    def get_well_known(self, hostname: str) -> Deferred[str | None]:
        """The server name ``hostname`` delegates to, or None; cached. Fails only when
        ``close`` abandons the fetch (a ``ConnectionError``)."""
        return Deferred.fromCoroutine(self._get_well_known(hostname))

    def close(self) -> None:
        """Abandon the ``.well-known`` fetches and SRV queries in flight, and stop the timer
        of the system resolver created here (its re-read of resolv.conf).

        Each abandoned step is cancelled (its request or query, its timeout timer and
        connection with it); its callers fail with a ``ConnectionError`` (the client's
        ``TransportError``), and nothing is cached or counted from it. (A twisted.names
        resolver, the system's included, keeps the timer of a cancelled query's current
        try, up to 11 s: it cannot cancel it.)
        An ``srv_resolver`` given is its owner's to close. Resolution still
        works after (the resolver keeps the name servers it last read).
        """
        self._closing = True
        try:
            for name in list(self._srv_queries):
                self._srv_queries.pop(name).cancel()
            for hostname in list(self._inflight):
                fetch = self._inflight.pop(hostname)
                fetch.cancel()
                fetch.addErrback(lambda _: None)  # given to its waiters (_get_well_known)
        finally:
            self._closing = False
        if self._own_srv_resolver is not None:
            _stop_system_srv_resolver(self._own_srv_resolver)

    # -- steps 1 to 3

    async def _resolve_server(self, server_name: str) -> ResolvedServer:
        host, port = parse_server_name(server_name)
        if _is_ip_literal(host):
            # Step 1: the IP literal itself; Host is the server name as given.
            ip = _unbracket(host)
            return ResolvedServer(
                server_name, server_name, ip, port or DEFAULT_PORT, server_name, ip
            )
        if port is not None:
            # Step 2: Host is the whole server name, the certificate is for the hostname.
            return ResolvedServer(server_name, server_name, host, port, server_name, host)
        delegated = await self._get_well_known(host)
        if delegated is None:
            # Steps 4 to 6: SRV or 8448 for the hostname, Host and certificate the hostname.
            return ResolvedServer(server_name, server_name, host, None, host, host)
        d_host, d_port = parse_server_name(delegated)
        if _is_ip_literal(d_host):
            # Step 3.1: Host is the IP literal, with the port if one was given.
            ip = _unbracket(d_host)
            return ResolvedServer(server_name, delegated, ip, d_port or DEFAULT_PORT, delegated, ip)
        if d_port is not None:
            # Step 3.2: Host is "<delegated_hostname>:<delegated_port>".
            return ResolvedServer(server_name, delegated, d_host, d_port, delegated, d_host)
        # Steps 3.3 to 3.5: SRV or 8448 for the delegated hostname.
        return ResolvedServer(server_name, delegated, d_host, None, d_host, d_host)

    # -- SRV, steps 3.3-3.5 and 4-6

    async def _resolve_targets(self, server: ResolvedServer) -> list[tuple[str, int]]:
        if server.port is not None:
            return [(server.host, server.port)]
        for service in ("_matrix-fed._tcp.", "_matrix._tcp."):
            targets = await self._lookup_srv(server.host, service + server.host)
            if targets:
                return targets
        return [(server.host, DEFAULT_PORT)]

    async def _lookup_srv(self, host: str, name: str) -> list[tuple[str, int]]:
        """The targets the SRV records of ``name`` give, in order; [] if none.

        Raises ``ServiceUnavailableError`` when the records' only target is
        ".": a record was found, so the spec's next steps (the deprecated SRV
        name, then 8448), which apply when none was, are not taken; the same
        holds for a "." under the deprecated name, as in Synapse. Answers are
        remembered as ``_srv_answer`` says; the order is drawn anew each time.
        """
        records = await self._srv_answer(name)
        targets = self._order_srv(records)
        # Usually one record, as RFC 2782 intends; several that are all "."
        # (or "." beside only records we cannot use) say no less clearly that
        # nothing is there.
        if not targets and any(_is_root(record.target.name) for record in records):
            raise ServiceUnavailableError(host, name)
        return targets

    async def _srv_answer(self, name: str) -> list[dns.Record_SRV]:
        """The SRV records of ``name`` ([] for none): from the cache while fresh, else DNS.

        A positive answer is kept for its shortest TTL (at most ``SRV_MAX_TTL``;
        0 means not at all); a negative one (NXDOMAIN, or no SRV record) for its
        SOA's negative TTL, at most ``SRV_NEGATIVE_MAX_TTL``, and not at all
        without an SOA. Any other failure (no reply in time, SERVFAIL, REFUSED,
        ...) says nothing of the records: the last answer is used however old,
        and kept, as Synapse does (for the ``SRV_CACHE_SIZE`` names last answered with
        records, whatever else the cache dropped), and DNS is asked again next time;
        with none, ``SrvLookupError`` (but NOTIMP, as in Synapse, counts as no record).
        """
        cached = self._srv_cache.get(name)
        if cached is not None and cached.fresh(self._reactor.seconds()):
            return cached.records
        # One query per name at a time, shielded from its callers: each awaits
        # a Deferred of its own, so one giving up (a request cancelled or timed
        # out) neither cancels the query under the others (twisted.names'
        # client.Resolver shares one query among a name's callers, and would
        # fail them all with CancelledError) nor loses its answer for the cache.
        waiter: Deferred[list[dns.Record_SRV]] = Deferred()
        waiters = self._srv_waiters.get(name)
        if waiters is not None:
            waiters.append(waiter)
        else:
            self._srv_waiters[name] = [waiter]
            query = Deferred.fromCoroutine(self._query_srv(name))
            self._srv_queries[name] = query
            query.addBoth(self._srv_answered, name)
        return await waiter

    def _srv_answered(self, result: list[dns.Record_SRV] | Failure, name: str) -> None:
        self._srv_queries.pop(name, None)
        if isinstance(result, Failure) and self._closing:  # cancelled by close()
            result = Failure(_ResolverClosed(name))
        for waiter in self._srv_waiters.pop(name):
            if waiter.called:
                continue  # cancelled by its caller
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _query_srv(self, name: str) -> list[dns.Record_SRV]:
        """Ask DNS for ``name``'s SRV records, remember the answer (see ``_srv_answer``)."""
        now = self._reactor.seconds()
        resolver = self._srv_resolver
        if resolver is None:
            resolver = self._srv_resolver = _system_srv_resolver(self._reactor)
            self._own_srv_resolver = resolver
        lookup = resolver.lookupService(name, _DNS_TIMEOUT)
        # No caller can cancel the query (each awaits a Deferred of its own, _srv_answer;
        # only close() cancels it): bound it, should the resolver never answer.
        lookup.addTimeout(SRV_QUERY_TIMEOUT, self._reactor)
        try:
            # (answers, authority, additional), each a list of RRHeader
            # (IResolver's annotation says otherwise).
            result: Any = await lookup
        except (DNSNameError, dns.AuthoritativeDomainError) as exc:
            # NXDOMAIN: the usual answer. twisted.names' client gives the
            # response as the error's argument; its authority holds the SOA.
            message = exc.args[0] if exc.args else None
            authority = message.authority if isinstance(message, dns.Message) else []
            self._remember_srv(name, [], _negative_ttl(authority), now)
            return []
        except Exception as exc:
            if self._closing:
                raise  # cancelled by close(): nothing to remember or log
            # twisted.names' DomainError is also SERVFAIL's, REFUSED's, ...
            reason = _describe_dns_failure(exc)
            _log.info("SRV lookup for {name} failed: {error}", name=name, error=reason)
            kept = self._srv_kept.get(name)
            if kept is not None:
                return kept
            cached = self._srv_cache.get(name)
            if cached is not None:  # a negative answer
                return cached.records
            if isinstance(exc, DNSNotImplementedError):
                # A resolver that cannot do SRV queries at all (Tor's DNSPort,
                # for .onion names) never will: Synapse goes on without them.
                return []
            raise SrvLookupError(name, reason) from exc
        records = _bound_srv(_srv_records(name.encode("ascii"), result[0]))
        if records:
            ttl = min(min(answer.ttl for answer in result[0]), SRV_MAX_TTL)
        else:
            ttl = _negative_ttl(result[1])
        self._remember_srv(name, records, ttl, now)
        return records

    def _remember_srv(
        self, name: str, records: list[dns.Record_SRV], ttl: float, now: float
    ) -> None:
        if ttl <= 0 or not records:
            self._srv_kept.pop(name, None)
        else:
            _put_recent(self._srv_kept, name, records, SRV_CACHE_SIZE)
        if ttl <= 0:
            self._srv_cache.pop(name, None)
            return
        _put_bounded(self._srv_cache, name, _SrvEntry(records, now, now + ttl), now, SRV_CACHE_SIZE)

    def _order_srv(self, records: list[dns.Record_SRV]) -> list[tuple[str, int]]:
        """The first ``MAX_SRV_TARGETS`` targets in RFC 2782 order: ascending priority,
        weighted random order within a priority.

        Within a priority, as RFC 2782 describes: the records not yet ordered, those of
        weight 0 first (otherwise in the answer's order), a number drawn in [0, sum of
        their weights], and the first record whose running sum of weights reaches it comes
        next (the first one when all weigh 0). One sort by priority, then at most
        ``MAX_SRV_TARGETS`` draws, each a running sum and a bisection in C: linear in the
        number of records, however many an answer lists.
        """
        usable = []
        for record in records:
            target = _srv_target(record)
            if target:
                usable.append((record.priority, record.weight, target, record.port))
        # Stable: by priority, then weight 0 before the others, else as answered.
        usable.sort(key=lambda entry: (entry[0], entry[1] != 0))
        ordered: list[tuple[str, int]] = []
        for _, grouped in itertools.groupby(usable, key=lambda entry: entry[0]):
            group = list(grouped)
            weights = [entry[1] for entry in group]
            total = sum(weights)
            while group and len(ordered) < MAX_SRV_TARGETS:
                index = 0
                if total > 0:
                    point = self._random.uniform(0, total)
                    running = list(itertools.accumulate(weights))
                    index = min(bisect_left(running, point), len(group) - 1)
                chosen = group.pop(index)
                total -= weights.pop(index)
                ordered.append((chosen[2], chosen[3]))
            if len(ordered) >= MAX_SRV_TARGETS:
                break
        return ordered

    # -- .well-known, step 3

    async def _get_well_known(self, hostname: str) -> str | None:
        entry = self._cache.get(hostname)
        if entry is not None and entry.fresh(self._reactor.seconds()):
            return entry.delegated
        fetch = self._inflight.get(hostname)
        if fetch is None:
            # One fetch per hostname at a time; it cannot fail (errors become
            # "no delegation", or keep for a while one that expired: see
            # _refresh_well_known; a bug there is logged and answered as no
            # delegation, not cached) and runs to its own timeout even if the
            # callers that asked for it give up, so that the answer is cached;
            # only close() abandons it, failing its callers.
            fetch = Deferred.fromCoroutine(self._refresh_well_known(hostname))
            fetch.addErrback(self._refresh_failed, hostname)
            if not fetch.called:
                self._inflight[hostname] = fetch
                fetch.addBoth(self._forget_inflight, hostname)
        waiter: Deferred[str | None] = Deferred()

        def deliver(result: str | Failure | None) -> str | Failure | None:
            if waiter.called:
                pass
            elif isinstance(result, Failure):  # abandoned by close()
                uri = "https://" + hostname + "/.well-known/matrix/server"
                waiter.errback(_ResolverClosed(uri))
            else:
                waiter.callback(result)
            return result

        fetch.addBoth(deliver)
        return await waiter

    def _refresh_failed(self, failure: Failure, hostname: str) -> Failure | None:
        """A bug in ``_refresh_well_known``: logged, answered as no delegation (not cached).
        Its cancellation by ``close`` is passed on."""
        if self._closing:
            return failure
        _log.failure(
            "Unexpected error refreshing .well-known for {hostname}", failure, hostname=hostname
        )
        return None

    def _forget_inflight(self, result: str | Failure | None, hostname: str) -> str | Failure | None:
        self._inflight.pop(hostname, None)
        return result

    async def _refresh_well_known(self, hostname: str) -> str | None:
        now = self._reactor.seconds()
        previous = self._delegations.get(hostname)
        lookups_waited = self._lookups_waited()
        timed_out = False

        def time_out(result: Any, timeout: float) -> Any:
            nonlocal timed_out
            timed_out = True
            if isinstance(result, Failure) and result.check(defer.CancelledError):
                raise defer.TimeoutError(timeout, "Deferred")
            return result

        fetch = Deferred.fromCoroutine(self._fetch_well_known(hostname))
        fetch.addTimeout(WELL_KNOWN_TIMEOUT, self._reactor, time_out)
        try:
            delegated, ttl = await fetch
        except Exception as exc:
            if self._closing:
                # Cancelled by close() (as CancelledError, or twisted.web's
                # ResponseNeverReceived holding one): nothing to cache or count.
                raise
            if timed_out and self._lookups_waited() != lookups_waited:
                # Timed out while our own address lookups waited for a resolver thread
                # (busy with lookups that hang): the site may never have been asked. Not
                # its answer: nothing cached or counted, a delegation held kept as it is;
                # the next request fetches again.
                kept = previous.delegated if previous is not None else None
                _log.info(
                    "Cannot fetch .well-known for {hostname}: timed out while address"
                    " lookups were waiting for a resolver thread; {outcome}, fetching again"
                    " at the next request",
                    hostname=hostname,
                    outcome=f"using its delegation to {kept}" if kept else "not delegated now",
                )
                return kept
            if (
                previous is not None
                and previous.keeps(now)
                and not isinstance(exc, _WellKnownInvalid)
            ):
                # The site is down, not the delegation gone: keep it (as Synapse
                # does within its grace period) rather than send the traffic to
                # the undelegated host.
                retry_at = min(now + WELL_KNOWN_DOWN_TTL, previous.keep_until)
                _log.info(
                    "Cannot fetch .well-known for {hostname} ({error}); keeping its"
                    " delegation to {delegated}, retrying in {ttl:.0f} s",
                    hostname=hostname,
                    error=exc,
                    delegated=previous.delegated,
                    ttl=retry_at - now,
                )
                self._store(hostname, _WellKnownEntry(previous.delegated, now, retry_at))
                return previous.delegated
            self._delegations.pop(hostname, None)
            failures = self._count_failure(hostname)
            ttl = doubling_wait(WELL_KNOWN_ERROR_TTL, WELL_KNOWN_ERROR_MAX_TTL, failures)
            _log.info(
                "No usable .well-known for {hostname} ({error}); retrying in {ttl:.0f} s",
                hostname=hostname,
                error=exc,
                ttl=ttl,
            )
            self._store(hostname, _WellKnownEntry(None, now, now + ttl))
            return None
        self._failures.pop(hostname, None)
        self._store(hostname, _WellKnownEntry(delegated, now, now + ttl))
        delegation = _Delegation(delegated, now, now + 2 * ttl)
        _put_recent(self._delegations, hostname, delegation, WELL_KNOWN_CACHE_SIZE)
        return delegated

    def _count_failure(self, hostname: str) -> int:
        """Count one more consecutive failure for ``hostname``; the count.

        Only the ``WELL_KNOWN_CACHE_SIZE`` most recently failed hostnames are
        counted: one dropped starts its back-off again from the shortest wait.
        """
        failures = self._failures.get(hostname, 0) + 1
        _put_recent(self._failures, hostname, failures, WELL_KNOWN_CACHE_SIZE)
        return failures

    def _store(self, hostname: str, entry: _WellKnownEntry) -> None:
        _put_bounded(self._cache, hostname, entry, self._reactor.seconds(), WELL_KNOWN_CACHE_SIZE)

    async def _fetch_well_known(self, hostname: str) -> tuple[str, float]:
        """Fetch and validate ``.well-known/matrix/server``; answer the delegated name and TTL."""
        uri = "https://" + hostname + "/.well-known/matrix/server"
        headers = Headers({b"User-Agent": [_USER_AGENT]})
        for _ in range(WELL_KNOWN_REDIRECT_LIMIT + 1):
            response = await self._well_known_agent.request(
                b"GET", uri.encode("ascii"), headers, None
            )
            if response.code == 200:
                break
            # Every answer is read or dropped: one left unread holds its
            # connection until garbage collection.
            discard_body(response)
            if 500 <= response.code < 600:
                raise _WellKnownUnavailable(f"status {response.code}")
            if response.code not in _REDIRECT_CODES:
                raise _WellKnownInvalid(f"status {response.code}")
            uri = _redirect_target(uri, response.headers)
        else:
            raise _WellKnownInvalid(f"more than {WELL_KNOWN_REDIRECT_LIMIT} redirects")
        body = await read_body(response, WELL_KNOWN_MAX_BYTES)
        # The spec: parse as JSON whatever the Content-Type says.
        try:
            document = parse_json(body)
        except Exception:
            raise _WellKnownInvalid("body is not JSON") from None
        if not isinstance(document, dict):
            raise _WellKnownInvalid("body is not a JSON object")
        delegated = document.get("m.server")
        if not isinstance(delegated, str):
            raise _WellKnownInvalid("no m.server string")
        try:
            parse_server_name(delegated)
        except ValueError as exc:
            raise _WellKnownInvalid(f"m.server is not a server name: {exc}") from None
        return delegated, cache_period(response.headers, self._reactor.seconds())


def _srv_records(name: bytes, answers: list[dns.RRHeader]) -> list[dns.Record_SRV]:
    """The SRV records for ``name`` in an answer section, following its CNAMEs.

    A resolver answering for an alias gives the CNAME chain, then the
    records owned by the chain's end (RFC 1034 section 3.6.2). Names are
    compared as bytes, ASCII case-insensitively (RFC 4343), so that an odd
    byte in some record cannot abort the lookup.
    """
    aliases: dict[bytes, bytes] = {}
    records: list[tuple[bytes, dns.Record_SRV]] = []
    for answer in answers:
        if isinstance(answer.payload, dns.Record_CNAME):
            aliases[_dns_key(answer.name.name)] = _dns_key(answer.payload.name.name)
        elif isinstance(answer.payload, dns.Record_SRV):
            records.append((_dns_key(answer.name.name), answer.payload))
    owner = _dns_key(name)
    owners = {owner}
    while owner in aliases and aliases[owner] not in owners:
        owner = aliases[owner]
        owners.add(owner)
    return [record for record_owner, record in records if record_owner in owners]


def _srv_target(record: dns.Record_SRV) -> str:
    """The host an SRV record points to, or "" for none we can use.

    A target that is not ASCII is not a hostname we could connect to (the other records
    may be); one of "." means the service is decidedly not available there (RFC 2782):
    beside other records, it is skipped (alone, it makes ``_lookup_srv`` fail).
    """
    try:
        return record.target.name.decode("ascii").rstrip(".")
    except UnicodeDecodeError:
        return ""


def _bound_srv(records: list[dns.Record_SRV]) -> list[dns.Record_SRV]:
    """At most ``SRV_MAX_RECORDS`` of an answer's records, the ones ordering draws from.

    An answer of no more is kept as it is. Of a larger one, the records with a usable
    target, lowest priorities first (RFC 2782 order), each priority whole until
    ``MAX_SRV_TARGETS`` are kept, as long as it fits: the first ``MAX_SRV_TARGETS``
    in order are then drawn from them exactly as from the whole answer. Of a priority
    too large to fit, its heaviest records (ties in the answer's order), those most
    likely drawn first, are kept in the answer's order, the rest dropped: the order is
    then drawn from those alone. An answer with no usable target keeps one record, a
    "." if it has one: it still means no service (or, without a ".", no target).
    """
    if len(records) <= SRV_MAX_RECORDS:
        return records
    usable = [record for record in records if _srv_target(record)]
    if not usable:
        roots = (record for record in records if _is_root(record.target.name))
        return [next(roots, records[0])]
    usable.sort(key=lambda record: record.priority)  # stable: as answered within one
    kept: list[dns.Record_SRV] = []
    for _, grouped in itertools.groupby(usable, key=lambda record: record.priority):
        group = list(grouped)
        room = SRV_MAX_RECORDS - len(kept)
        if len(group) > room:
            heaviest = sorted(range(len(group)), key=lambda index: -group[index].weight)
            kept.extend(group[index] for index in sorted(heaviest[:room]))
            break
        kept.extend(group)
        if len(kept) >= MAX_SRV_TARGETS:
            break
    return kept


class _Fresh(Protocol):
    def fresh(self, now: float) -> bool: ...


_Entry = TypeVar("_Entry", bound=_Fresh)


def _put_bounded(cache: dict[str, _Entry], key: str, entry: _Entry, now: float, size: int) -> None:
    """``cache[key] = entry``, ``cache`` holding at most ``size`` entries (keys are
    peer-chosen): when full, the entries no longer fresh go first, then, if that is not
    enough, all of them."""
    if key not in cache and len(cache) >= size:
        for name in [name for name, old in cache.items() if not old.fresh(now)]:
            del cache[name]
        if len(cache) >= size:
            cache.clear()
    cache[key] = entry


_Value = TypeVar("_Value")


def _put_recent(recent: OrderedDict[str, _Value], key: str, value: _Value, size: int) -> None:
    """``recent[key] = value``, moved last; ``recent`` holding at most ``size`` entries
    (keys are peer-chosen), the least recently put dropped first."""
    recent[key] = value
    recent.move_to_end(key)
    while len(recent) > size:
        recent.popitem(last=False)


def _negative_ttl(authority: list[dns.RRHeader]) -> float:
    """How long a negative answer holds: its SOA's TTL or MINIMUM, the smaller
    (RFC 2308 section 5), at most ``SRV_NEGATIVE_MAX_TTL``; 0 without an SOA."""
    for record in authority:
        if isinstance(record.payload, dns.Record_SOA):
            return min(record.ttl, record.payload.minimum, SRV_NEGATIVE_MAX_TTL)
    return 0.0


#: DNS response codes (RFC 1035 section 4.1.1) by name, for messages.
_RCODE_NAMES = {
    dns.EFORMAT: "FORMERR",
    dns.ESERVER: "SERVFAIL",
    dns.ENOTIMP: "NOTIMP",
    dns.EREFUSED: "REFUSED",
}


def _describe_dns_failure(exc: Exception) -> str:
    """A short reason for a failed lookup (twisted.names' own are message reprs)."""
    if isinstance(exc, defer.TimeoutError):  # DNSQueryTimeoutError, or ours
        return "no answer in time"
    message = exc.args[0] if isinstance(exc, DomainError) and exc.args else None
    if isinstance(message, dns.Message):
        rcode = _RCODE_NAMES.get(message.rCode, f"rcode {message.rCode}")
        return f"the DNS server answered {rcode}"
    return f"{type(exc).__name__}: {exc}"


def _dns_key(name: bytes) -> bytes:
    return name.lower().rstrip(b".")


def _is_root(name: bytes) -> bool:
    """Whether an SRV target is the root, "." (or b""; trailing dots ignored, as in _order_srv)."""
    return not name.rstrip(b".")


def _redirect_target(uri: str, headers: Headers) -> str:
    """Where a redirect from ``uri`` leads; only ``https`` is followed."""
    locations = headers.getRawHeaders(b"location")
    if not locations:
        raise _WellKnownInvalid("redirect without a Location")
    try:
        target = urljoin(uri, locations[0].decode("ascii"))
    except ValueError:  # UnicodeDecodeError, or a malformed URL
        raise _WellKnownInvalid("redirect to an invalid Location") from None
    if not target.lower().startswith("https://"):
        raise _WellKnownInvalid("redirect away from https")
    return target


def cache_period(headers: Headers, now: float) -> float:
    """Seconds to cache a valid ``.well-known`` answer, from its caching headers.

    ``Cache-Control: max-age`` first (ignored unless ASCII digits), then
    ``Expires`` (relative to the response's ``Date``, else ``now``), else 24
    hours; ``no-store`` and ``no-cache`` count as zero. The result is clamped
    to [5 min, 48 h]: even an uncacheable answer is kept a little, so a peer
    cannot make us fetch it for every request.
    """
    directives: dict[str, str] = {}
    for raw in headers.getRawHeaders(b"cache-control", []):
        for part in raw.decode("latin-1").split(","):
            name, _, value = part.strip().partition("=")
            directives[name.strip().lower()] = value.strip().strip('"')
    period: float | None = None
    if "no-store" in directives or "no-cache" in directives:
        period = 0.0
    elif _DELTA_SECONDS.fullmatch(directives.get("max-age", "")):
        period = float(directives["max-age"])
    else:
        expires = headers.getRawHeaders(b"expires")
        if expires:
            # RFC 9111 section 5.3: an invalid Expires means "already expired".
            expires_at = _http_date(expires[-1])
            date_values = headers.getRawHeaders(b"date")
            date = _http_date(date_values[-1]) if date_values else None
            period = 0.0 if expires_at is None else expires_at - (date or now)
    if period is None:
        period = WELL_KNOWN_DEFAULT_TTL
    return max(WELL_KNOWN_MIN_TTL, min(WELL_KNOWN_MAX_TTL, period))


def _http_date(value: bytes) -> float | None:
    """The time ``value`` names, or None when it is not a date (numbers too large included)."""
    try:
        return email.utils.parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
