"""The ``metrics.listen`` endpoint's tree: ``GET /metrics`` in Prometheus' text format.

Other paths and methods there are answered as on the federation listener, in
JSON (404 or 405 ``M_UNRECOGNIZED``). What is counted is ``metrics.InviteMetrics``'s
business; this module only serves it.
"""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Request

from ..metrics import InviteMetrics
from ._base import MatrixResource

__all__ = ["MetricsResource", "build_metrics_root"]


class MetricsResource(MatrixResource):
    """``GET /metrics``: the registry of an ``InviteMetrics`` in the text exposition format."""

    def __init__(self, metrics: InviteMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        content_type, body = self._metrics.exposition()
        request.setHeader(b"Content-Type", content_type)
        return body


def build_metrics_root(metrics: InviteMetrics) -> Resource:
    """A site root serving ``metrics`` at ``/metrics``; a ``RuntimeError`` when they are off
    (``InviteMetrics.check_enabled``)."""
    metrics.check_enabled()
    root = MatrixResource()
    root.putChild(b"metrics", MetricsResource(metrics))
    return root
