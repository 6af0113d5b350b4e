"""A/AAAA lookups in threads of the client's own.

Twisted resolves host names with ``getaddrinfo`` in the reactor's thread pool (10
threads), where a call stays for as long as the system resolver waits on an
unanswering name server (with glibc's defaults up to 30 s; longer with more name
servers, attempts or search domains). A request's timeout fails the request but
cannot free the thread, and anyone can make us look up names whose DNS hangs (the
origin of a forged request, its ``.well-known`` delegation, its SRV targets): ten of
them used to hold every thread, so that no new connection to any server could be made
and healthy servers timed out, and were backed off.

``ThreadedResolver`` makes the lookups of the reactor's resolver when it is that one,
Twisted's ``GAIResolver`` (the default), calling its ``getaddrinfo`` (so ``/etc/hosts``,
``nsswitch.conf``, ``resolv.conf`` with its search domains and ``gai.conf``'s address
order all apply, as before) in daemon threads of its own, at most ``RESOLVER_THREADS``
at once, more than the lookups that requests can have waiting on hung DNS: each key
fetch (at most 64 of servers we hold no key of and 64 refreshes, ``keyring``) makes one
lookup at a time, and its last one may still hold its thread for a while once the fetch
has timed out; twice that leaves room for invites and notaries. Requests to one server
do not multiply them: lookups of the same name (and port, family, socket type) made
while one is waiting or running share its call, so a burst of invites to a server whose
DNS hangs holds one thread, not one per invite; and a lookup whose every requester gave
up (the request cancelled or timed out: the agent cancels its lookups,
``IHostResolution.cancel``, which Twisted's ``HostnameEndpoint`` never does) is dropped
before a thread takes it. A thread exists only while there are lookups to make (none
idles), so there is no pool to start or stop: ``close`` drops the lookups still waiting
for a thread (answered with no address, marked ``closed``: their requests are abandoned,
not failed by the server's DNS), and a thread blocked in ``getaddrinfo``, which nothing
can interrupt, ends when the call returns, without keeping the process from exiting. A
lookup that has to wait for a thread is counted (``waits``, ``waiting``): a request
timing out meanwhile may be our own resolver's fault, not the server's. Any other
resolver installed in the reactor (``installNameResolver``: an application's, a test's
fake) is used as it is.
"""

from __future__ import annotations

import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

from twisted.internet._resolver import GAIResolver
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from ..logs import Logger

__all__ = ["RESOLVER_THREADS", "ThreadedResolver"]

_log = Logger()

#: Most ``getaddrinfo`` calls in progress at once (see the module doc).
RESOLVER_THREADS = 256

_FAMILIES: dict[frozenset[type[IAddress]], int] = {
    frozenset([IPv4Address]): socket.AF_INET,
    frozenset([IPv6Address]): socket.AF_INET6,
    frozenset([IPv4Address, IPv6Address]): socket.AF_UNSPEC,
}
_SOCKET_TYPES = {"TCP": socket.SOCK_STREAM, "UDP": socket.SOCK_DGRAM}
_TRANSPORTS: dict[int, Literal["TCP", "UDP"]] = {
    socket.SOCK_STREAM: "TCP",
    socket.SOCK_DGRAM: "UDP",
}


#: What one ``getaddrinfo`` call is asked: host name, port, family, socket type.
_Key = tuple[str, int, int, int]


@implementer(IHostResolution)
class _Lookup:
    """One receiver's lookup, answered by the ``_Call`` it joined; ``cancel`` takes the
    receiver off it (it is then never answered), and drops the call if it still waits for
    a thread and no other receiver waits for it. ``closed``: answered (with no address) by
    the resolver's ``close`` while it waited for a thread, not by ``getaddrinfo``."""

    def __init__(self, name: str, call: _Call, receiver: IResolutionReceiver) -> None:
        self.name = name
        self._call: _Call | None = call
        self.receiver = receiver
        self.closed = False

    def cancel(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.leave(self)

    def answered(self) -> None:
        """Its call answered it: cancelling it then does nothing."""
        self._call = None


class _Call:
    """One ``getaddrinfo`` call, and the lookups waiting for its result."""

    def __init__(self, resolver: ThreadedResolver, key: _Key, run: Callable[[], Any]) -> None:
        self.key = key
        self.run = run
        self.lookups: list[_Lookup] = []
        #: Set (under the resolver's lock) once a thread took it, or once it was dropped.
        self.taken = False
        self._resolver = resolver

    def leave(self, lookup: _Lookup) -> None:
        self.lookups.remove(lookup)
        if not self.lookups:
            self._resolver._drop(self)

    def deliver(self, succeeded: bool, result: Any) -> None:
        """Give the result to the lookups still waiting for it (on the reactor thread)."""
        self._resolver._done(self)
        lookups, self.lookups = self.lookups, []
        host_name = self.key[0]
        if not succeeded and not (isinstance(result, Failure) and result.check(socket.gaierror)):
            _log.info(
                "Looking up {host_name} failed: {error}",
                host_name=host_name,
                error=result.getErrorMessage() if isinstance(result, Failure) else result,
            )
        addresses: list[IAddress] = []
        for entry in result if succeeded else ():
            address_family, kind, _, _, address = entry
            if address_family == socket.AF_INET:
                addresses.append(IPv4Address(_TRANSPORTS.get(kind, "TCP"), address[0], address[1]))
            elif address_family == socket.AF_INET6:
                addresses.append(IPv6Address(_TRANSPORTS.get(kind, "TCP"), *address[:4]))
        for lookup in lookups:
            lookup.answered()
            for resolved in addresses:
                lookup.receiver.addressResolved(resolved)
            lookup.receiver.resolutionComplete()


@implementer(IHostnameResolver)
class ThreadedResolver:
    """The reactor's ``nameResolver``, but when that is Twisted's ``GAIResolver``, its
    ``getaddrinfo`` is called in at most ``max_threads`` threads of our own at once (not
    in the reactor's pool); further lookups wait for one, first come first served.

    Lookups of the same host name, port, address family and socket type share one call
    while it waits for a thread or runs: each gets its result. ``cancel`` on a lookup
    (``IHostResolution``) means its receiver no longer wants an answer (it gets none); a
    call all of whose lookups were cancelled before a thread took it is never made.

    Results are delivered on the reactor thread; a lookup that fails (``gaierror``, or
    anything else) answers no address, which ``HostnameEndpoint`` reports as a
    ``DNSLookupError``, as ``GAIResolver`` does.
    """

    def __init__(self, reactor: Any, *, max_threads: int = RESOLVER_THREADS) -> None:
        self._reactor = reactor
        self.max_threads = max_threads
        #: Lookups that had to wait for a thread, since this resolver was made (one joining
        #: a call that waits for a thread included).
        self.waits = 0
        self._lock = threading.Lock()
        #: Calls not yet taken by a thread, oldest first.
        self._queue: deque[_Call] = deque()
        #: Calls waiting for a thread or running, by what they ask (reactor thread only).
        self._calls: dict[_Key, _Call] = {}
        #: Threads running (each takes calls from the queue until it is empty).
        self._threads = 0

    @property
    def waiting(self) -> int:
        """Calls waiting for a thread now."""
        return len(self._queue)

    @property
    def threads(self) -> int:
        """Threads running now (each making a call, or about to end)."""
        return self._threads

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        installed: IHostnameResolver = self._reactor.nameResolver
        if not isinstance(installed, GAIResolver):
            return installed.resolveHostName(
                resolutionReceiver, hostName, portNumber, addressTypes, transportSemantics
            )
        # The function it was made with (the system's unless someone chose another).
        getaddrinfo: Callable[..., Sequence[tuple[Any, ...]]] = getattr(
            installed, "_getaddrinfo", socket.getaddrinfo
        )
        family = _FAMILIES[frozenset(addressTypes or (IPv4Address, IPv6Address))]
        socket_type = _SOCKET_TYPES[transportSemantics]
        key = (hostName, portNumber, family, socket_type)
        call = self._calls.get(key)
        if call is None:

            def run() -> Any:
                return getaddrinfo(hostName, portNumber, family, socket_type)

            call = self._calls[key] = _Call(self, key, run)
            lookup = _Lookup(hostName, call, resolutionReceiver)
            call.lookups.append(lookup)
            resolutionReceiver.resolutionBegan(lookup)
            self._submit(call)
        else:
            lookup = _Lookup(hostName, call, resolutionReceiver)
            call.lookups.append(lookup)
            resolutionReceiver.resolutionBegan(lookup)
            with self._lock:
                if not call.taken:
                    self.waits += 1
        return lookup

    def close(self) -> None:
        """Answer the lookups still waiting for a thread with no address, now, marked
        ``closed`` (the agent then reports their requests as abandoned, not as a DNS
        failure of the server's: they were never made).

        Lookups in progress end when their ``getaddrinfo`` returns (nothing can stop
        it); their threads are daemon threads. Later lookups are made as before.
        """
        with self._lock:
            dropped = list(self._queue)
            self._queue.clear()
            for call in dropped:
                call.taken = True
        for call in dropped:
            for lookup in call.lookups:
                lookup.closed = True
            call.deliver(False, Failure(socket.gaierror(socket.EAI_AGAIN, "resolver closed")))

    # -- calls (on the reactor thread)

    def _drop(self, call: _Call) -> None:
        """No lookup waits for ``call`` any more: unless a thread took it, it is not made."""
        with self._lock:
            if call.taken:
                return  # running: its result will go to nobody
            call.taken = True
            self._queue.remove(call)
        self._done(call)

    def _done(self, call: _Call) -> None:
        """``call`` is answered or dropped: a new lookup of its key makes a new call."""
        if self._calls.get(call.key) is call:
            del self._calls[call.key]

    # -- threads

    def _submit(self, call: _Call) -> None:
        with self._lock:
            self._queue.append(call)
            if self._threads >= self.max_threads:
                self.waits += 1
                return
            self._threads += 1
        try:
            threading.Thread(target=self._work, name="federation-invite-dns", daemon=True).start()
        except BaseException:
            with self._lock:
                self._threads -= 1
            raise

    def _work(self) -> None:
        """A thread's life: make the calls waiting, then end."""
        while True:
            with self._lock:
                if not self._queue or self._threads > self.max_threads:
                    self._threads -= 1
                    return
                call = self._queue.popleft()
                call.taken = True
            try:
                result: Any = call.run()
                succeeded = True
            except BaseException:
                result, succeeded = Failure(), False
                result.cleanFailure()
            self._reactor.callFromThread(call.deliver, succeeded, result)
