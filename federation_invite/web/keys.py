"""``GET /_matrix/key/v2/server``: publishing our signing keys (server-server-api,
"Publishing Keys").

The answer names our current verify key(s), the old ones with the time they
expired, a ``valid_until_ts`` of now plus the configured lifetime, and is
signed by every current key. No authentication is required. The deprecated
``/_matrix/key/v2/server/{keyId}`` form returns the same document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from signedjson.types import SigningKey
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

from ..core.keys import encode_verify_key, key_id_of, verify_key_of
from ..core.signing import sign_json
from ..keyring import OldKey
from ._base import MatrixResource, write_json

__all__ = ["KeyServerResource", "server_keys_document"]


def server_keys_document(
    server_name: str,
    signing_keys: Sequence[SigningKey],
    old_keys: Sequence[OldKey],
    now_ms: int,
    validity_ms: int,
) -> dict[str, Any]:
    """Our signed key document as of ``now_ms``."""
    document: dict[str, Any] = {
        "server_name": server_name,
        "verify_keys": {
            key_id_of(key): {"key": encode_verify_key(verify_key_of(key))} for key in signing_keys
        },
        "old_verify_keys": {
            old.key_id: {"key": old.key, "expired_ts": old.expired_ts} for old in old_keys
        },
        "valid_until_ts": now_ms + validity_ms,
    }
    for key in signing_keys:
        document = sign_json(document, server_name, key)
    return document


class KeyServerResource(MatrixResource):
    """Serves our key document; a child segment (a key ID) gets the same answer."""

    def __init__(
        self,
        clock: IReactorTime,
        server_name: str,
        signing_keys: Sequence[SigningKey],
        old_keys: Sequence[OldKey] = (),
        validity_ms: int = 86_400_000,
    ) -> None:
        super().__init__()
        self._clock = clock
        self._server_name = server_name
        self._signing_keys = tuple(signing_keys)
        self._old_keys = tuple(old_keys)
        self._validity_ms = validity_ms

    def getChild(self, path: bytes, request: Request) -> Resource:
        if not request.postpath:
            return self  # the deprecated /server/{keyId}
        return super().getChild(path, request)

    def document(self) -> dict[str, Any]:
        now_ms = int(self._clock.seconds() * 1000)
        return server_keys_document(
            self._server_name, self._signing_keys, self._old_keys, now_ms, self._validity_ms
        )

    def render_GET(self, request: Request) -> bytes:
        return write_json(request, 200, self.document())
