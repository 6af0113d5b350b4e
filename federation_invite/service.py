"""The composition root: the only place concrete classes are wired together.

The twistd plugin, the CLI and the embedding API all come through here.
"""

from __future__ import annotations

from typing import Any

from signedjson.types import SigningKey
from twisted.application import service, strports
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from .config import Config
from .signingkey import load_or_create_signing_key
from .web._base import MatrixResource
from .web.keys import KeyServerResource
from .web.tree import build_matrix_tree

__all__ = ["build_site_root", "make_service"]

log = Logger(namespace="federation_invite.service")


def build_site_root(matrix: Resource) -> Resource:
    """A site root that serves ``/_matrix`` and answers everything else with JSON 404."""
    root = MatrixResource()
    root.putChild(b"_matrix", matrix)
    return root


def _load_key(config: Config) -> SigningKey:
    key, created = load_or_create_signing_key(config.signing_key_path)
    log.info(
        "{action} signing key {key_id} at {path}",
        action="Generated a new" if created else "Loaded",
        key_id=f"{key.alg}:{key.version}",
        path=config.signing_key_path,
    )
    return key


def make_service(config: Config, reactor: Any) -> service.MultiService:
    """The daemon: our key loaded (or generated), the resource tree, one listener per endpoint."""
    top = service.MultiService()
    key = _load_key(config)
    clock: IReactorTime = reactor
    key_server = KeyServerResource(
        clock,
        config.server_name,
        [key],
        config.get("keys.old_verify_keys"),
        validity_ms=config.get("keys.validity_period") * 1000,
    )
    site = Site(build_site_root(build_matrix_tree(key_server)))
    site.displayTracebacks = False
    for description in config.listen:
        strports.service(description, site, reactor=reactor).setServiceParent(top)
    log.info(
        "federation-invite for {server_name} listening on {listen}; database {database}; "
        "configuration {source}",
        server_name=config.server_name,
        listen=", ".join(config.listen),
        database=config.database,
        source=config.path or "built-in defaults (no --config given)",
    )
    return top
