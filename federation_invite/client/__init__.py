"""Outbound federation: server discovery, TLS, IP blocklist, signed JSON requests.

``FederationClient`` is what the rest of the package uses; the other names are
its parts, for callers that assemble their own (and for tests).
"""

from ._client import FederationClient
from .agent import FederationAgent, make_connection_pool
from .discovery import ResolvedServer, ServerResolver
from .errors import BackoffError, BlockedAddressError, RemoteError, TransportError
from .iprange import BlocklistingReactor, BlocklistingResolver, IPRangeFilter
from .tls import FederationTLSPolicy

__all__ = [
    "BackoffError",
    "BlockedAddressError",
    "BlocklistingReactor",
    "BlocklistingResolver",
    "FederationAgent",
    "FederationClient",
    "FederationTLSPolicy",
    "IPRangeFilter",
    "RemoteError",
    "ResolvedServer",
    "ServerResolver",
    "TransportError",
    "make_connection_pool",
]
