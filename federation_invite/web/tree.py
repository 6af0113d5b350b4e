"""The ``/_matrix`` resource subtree: what an embedder ``putChild``s into its ``Site``."""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from .._version import __version__
from ._base import MatrixResource, write_json

__all__ = ["PathNode", "VersionResource", "WellKnownServerResource", "build_matrix_tree"]


class PathNode(MatrixResource):
    """An intermediate path segment: serves nothing itself (404), only its children."""


class VersionResource(MatrixResource):
    """``GET /_matrix/federation/v1/version`` (server-server-api, "Server implementation").

    Not a leaf: a path below it (``/version/``, ``/version/x``) is one we do not serve (404).
    """

    def render_GET(self, request: Request) -> bytes:
        return write_json(
            request, 200, {"server": {"name": "federation-invite", "version": __version__}}
        )


class WellKnownServerResource(MatrixResource):
    """``GET /.well-known/matrix/server``: ``{"m.server": "host[:port]"}`` for delegation.

    Not a leaf: a path below it is one we do not serve (404).
    """

    def __init__(self, delegated: str) -> None:
        super().__init__()
        self._delegated = delegated

    def render_GET(self, request: Request) -> bytes:
        body = write_json(request, 200, {"m.server": self._delegated})
        # Peers cache this (24 h when no header says otherwise); an hour keeps a
        # changed delegation from lingering for a day.
        request.setHeader(b"Cache-Control", b"max-age=3600")
        return body


def _node(parent: Resource, *names: bytes) -> Resource:
    """Walk or create the path nodes ``names`` below ``parent``; return the last."""
    for name in names:
        child = parent.children.get(name)
        if child is None:
            child = PathNode()
            parent.putChild(name, child)
        parent = child
    return parent


def build_matrix_tree(
    key_server: Resource,
    extra: dict[tuple[bytes, ...], Any] | None = None,
) -> Resource:
    """The ``_matrix`` resource with the key server, the version endpoint and ``extra``.

    ``extra`` maps a path below ``_matrix`` (a tuple of segments, the last being
    the resource's own name) to a resource, so that services add their
    endpoints (invites, metrics) without this module knowing them.
    """
    root = PathNode()
    _node(root, b"key", b"v2").putChild(b"server", key_server)
    _node(root, b"federation", b"v1").putChild(b"version", VersionResource())
    for path, resource in (extra or {}).items():
        _node(root, *path[:-1]).putChild(path[-1], resource)
    return root
