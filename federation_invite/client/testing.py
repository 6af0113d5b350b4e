"""In-memory peers for tests: no sockets, no DNS, no TLS.

Hand a ``FakePeersAgent`` to ``FederationClient(..., agent=...)`` and each
request for ``https://<server name>/...`` is served by the Twisted resource
registered under that server name, through a real HTTP/1.1 client and server
(``treq.testing.RequestTraversalAgent``)::

    peers = FakePeersAgent({"remote.example": build_site_root(remote_tree)})
    client = FederationClient(clock, "local.example", key, agent=peers)
    d = client.put_json("remote.example", "/_matrix/federation/v2/invite/...", body)
    peers.flush()   # only needed when a resource answers later (NOT_DONE_YET)

or give it the reactor the resources answer through (``FakePeersAgent(peers,
reactor=reactor)``: in trial, the global reactor) and it moves their bytes
itself, every millisecond while a request's connection is open: a resource
answering later (another ``FederationInvite``, whose store answers from its
threads) then needs no ``flush()``.

A request for a server name with no registered resource fails as a refused
connection, which the client reports as a ``TransportError``. The same agent
can serve ``.well-known`` documents to a ``ServerResolver`` (register the
resource under the hostname).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import IResource
from zope.interface import implementer

__all__ = ["FakePeersAgent"]

#: How often a ``FakePeersAgent`` given a reactor moves bytes while a request is open.
_PUMP_SECONDS = 0.001


@implementer(IAgent)
class FakePeersAgent:
    """An ``IAgent`` that routes each request by the URI's authority to an in-memory resource;
    given ``reactor``, it moves the bytes of answers given later itself (module docstring)."""

    def __init__(
        self, peers: Mapping[str, IResource] | None = None, *, reactor: IReactorTime | None = None
    ) -> None:
        self._agents: dict[str, RequestTraversalAgent] = {}
        self._reactor = reactor
        self._pumping: IDelayedCall | None = None
        #: Every request seen: (method, uri, headers), in order.
        self.requests: list[tuple[bytes, bytes, Headers]] = []
        for server_name, resource in (peers or {}).items():
            self.add_peer(server_name, resource)

    def add_peer(self, server_name: str, resource: IResource) -> None:
        """Serve requests for ``server_name`` (exactly as it appears in URIs) from ``resource``."""
        self._agents[server_name] = RequestTraversalAgent(resource)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        headers = Headers() if headers is None else headers
        self.requests.append((method, uri, headers))
        authority = uri.partition(b"://")[2].partition(b"/")[0].decode("ascii")
        agent = self._agents.get(authority)
        if agent is None:
            return fail(ConnectionRefusedError(f"no fake peer named {authority}"))
        response: Deferred[IResponse] = agent.request(method, uri, headers, bodyProducer)
        self._pump_while_open()
        return response

    def flush(self) -> None:
        """Move pending bytes between clients and resources that answer asynchronously."""
        for agent in self._agents.values():
            agent.flush()

    def _pump_while_open(self) -> None:
        """With a reactor: ``flush`` every ``_PUMP_SECONDS`` while a connection is open (an
        answer still to come), and leave no timer once none is."""
        if self._reactor is None or self._pumping is not None or not self._open():
            return
        self._pumping = self._reactor.callLater(_PUMP_SECONDS, self._pump)

    def _pump(self) -> None:
        self._pumping = None
        self.flush()
        self._pump_while_open()

    def _open(self) -> bool:
        """Whether a request's in-memory connection is still open."""
        pumps: Any = (
            pump for agent in self._agents.values() for pump in getattr(agent, "_pumps", ())
        )
        return any(
            not (pump.clientIO.disconnected and pump.serverIO.disconnected) for pump in pumps
        )
