"""In-memory peers for tests: no sockets, no DNS, no TLS.

Hand a ``FakePeersAgent`` to ``FederationClient(..., agent=...)`` and each
request for ``https://<server name>/...`` is served by the Twisted resource
registered under that server name, through a real HTTP/1.1 client and server
(``treq.testing.RequestTraversalAgent``)::

    peers = FakePeersAgent({"remote.example": build_site_root(remote_tree)})
    client = FederationClient(clock, "local.example", key, agent=peers)
    d = client.put_json("remote.example", "/_matrix/federation/v2/invite/...", body)
    peers.flush()   # only needed when a resource answers later (NOT_DONE_YET)

A request for a server name with no registered resource fails as a refused
connection, which the client reports as a ``TransportError``. The same agent
can serve ``.well-known`` documents to a ``ServerResolver`` (register the
resource under the hostname).
"""

from __future__ import annotations

from collections.abc import Mapping

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import IResource
from zope.interface import implementer

__all__ = ["FakePeersAgent"]


@implementer(IAgent)
class FakePeersAgent:
    """An ``IAgent`` that routes each request by the URI's authority to an in-memory resource."""

    def __init__(self, peers: Mapping[str, IResource] | None = None) -> None:
        self._agents: dict[str, RequestTraversalAgent] = {}
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
        return response

    def flush(self) -> None:
        """Move pending bytes between clients and resources that answer asynchronously."""
        for agent in self._agents.values():
            agent.flush()
