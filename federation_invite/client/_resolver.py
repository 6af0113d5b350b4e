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
at once, more than
the lookups that requests can have waiting on hung DNS: each key fetch (at most 64 of
servers we hold no key of and 64 refreshes, ``keyring``) makes one lookup at a time,
and its last one may still hold its thread for a while once the fetch has timed out;
twice that leaves room for invites and notaries. A thread exists only while there are
lookups to make (none idles), so there is no pool to start or stop: ``close`` drops the
lookups still waiting for a thread, and a thread blocked in ``getaddrinfo``, which
nothing can interrupt, ends when the call returns, without keeping the process from
exiting. A lookup that has to wait for a thread is counted (``waits``, ``waiting``):
a request timing out meanwhile may be our own resolver's fault, not the server's. Any
other resolver installed in the reactor (``installNameResolver``: an application's, a
test's fake) is used as it is.
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


@implementer(IHostResolution)
class _Lookup:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        raise NotImplementedError("a getaddrinfo call cannot be cancelled")


@implementer(IHostnameResolver)
class ThreadedResolver:
    """The reactor's ``nameResolver``, but when that is Twisted's ``GAIResolver``, its
    ``getaddrinfo`` is called in at most ``max_threads`` threads of our own at once (not
    in the reactor's pool); further lookups wait for one, first come first served.

    Results are delivered on the reactor thread; a lookup that fails (``gaierror``, or
    anything else) answers no address, which ``HostnameEndpoint`` reports as a
    ``DNSLookupError``, as ``GAIResolver`` does.
    """

    def __init__(self, reactor: Any, *, max_threads: int = RESOLVER_THREADS) -> None:
        self._reactor = reactor
        self.max_threads = max_threads
        #: Lookups that had to wait for a thread, since this resolver was made.
        self.waits = 0
        self._lock = threading.Lock()
        #: Calls not yet taken by a thread: (call, where to deliver its result).
        self._queue: deque[tuple[Callable[[], Any], Callable[[bool, Any], None]]] = deque()
        #: Threads running (each takes calls from the queue until it is empty).
        self._threads = 0

    @property
    def waiting(self) -> int:
        """Lookups waiting for a thread now."""
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
        lookup = _Lookup(hostName)
        resolutionReceiver.resolutionBegan(lookup)

        def call() -> Any:
            return getaddrinfo(hostName, portNumber, family, socket_type)

        def deliver(succeeded: bool, result: Any) -> None:
            if not succeeded and not (
                isinstance(result, Failure) and result.check(socket.gaierror)
            ):
                _log.info(
                    "Looking up {host_name} failed: {error}",
                    host_name=hostName,
                    error=result.getErrorMessage() if isinstance(result, Failure) else result,
                )
            for entry in result if succeeded else ():
                address_family, kind, _, _, address = entry
                if address_family == socket.AF_INET:
                    resolutionReceiver.addressResolved(
                        IPv4Address(_TRANSPORTS.get(kind, "TCP"), address[0], address[1])
                    )
                elif address_family == socket.AF_INET6:
                    resolutionReceiver.addressResolved(
                        IPv6Address(_TRANSPORTS.get(kind, "TCP"), *address[:4])
                    )
            resolutionReceiver.resolutionComplete()

        self._submit(call, deliver)
        return lookup

    def close(self) -> None:
        """Answer the lookups still waiting for a thread with no address, now.

        Lookups in progress end when their ``getaddrinfo`` returns (nothing can stop
        it); their threads are daemon threads. Later lookups are made as before.
        """
        with self._lock:
            dropped = list(self._queue)
            self._queue.clear()
        for _, deliver in dropped:
            deliver(False, Failure(socket.gaierror(socket.EAI_AGAIN, "resolver closed")))

    # -- threads

    def _submit(self, call: Callable[[], Any], deliver: Callable[[bool, Any], None]) -> None:
        with self._lock:
            self._queue.append((call, deliver))
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
                call, deliver = self._queue.popleft()
            try:
                result: Any = call()
                succeeded = True
            except BaseException:
                result, succeeded = Failure(), False
                result.cleanFailure()
            self._reactor.callFromThread(deliver, succeeded, result)
