"""Request authentication for every federation endpoint we serve (server-server-api,
"Request Authentication"), as one reusable piece.

| condition | answer |
|---|---|
| no ``X-Matrix`` Authorization header, or one we cannot parse | 401 ``M_UNAUTHORIZED`` |
| ``destination`` present and not our server name | 401 ``M_UNAUTHORIZED`` |
| ``origin`` not a valid server name, or ``key`` not an ed25519 key ID | 401 ``M_UNAUTHORIZED`` |
| origin denied by the server allow/deny globs (before any key fetch) | 403 ``M_FORBIDDEN`` |
| the ``origin``'s host ends in a dot (no key lookup: never verifiable) | 401 ``M_UNAUTHORIZED`` |
| origin's key needs a fetch past its pool's cap (``KeyFetchBusy``) | 429 ``M_LIMIT_EXCEEDED`` |
| origin's key needs a fetch, the service stopping (``KeyringClosed``) | 500 ``M_UNKNOWN`` |
| the origin's key cannot be obtained, or is not currently valid | 401 ``M_UNAUTHORIZED`` |
| the signature does not verify | 401 ``M_UNAUTHORIZED`` |

The signed object uses the request's raw path and query (``Request.uri``,
exactly as received) and ``content`` only when the request has a body. Keys
from ``old_verify_keys`` never authenticate requests: they are for events only.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from .core.errors import Codes, MatrixError
from .core.globs import GlobList
from .core.ids import host_ends_in_dot, is_valid_server_name
from .core.keys import is_valid_key_id
from .core.xmatrix import (
    XMatrixAuth,
    XMatrixError,
    check_destination,
    parse_xmatrix,
    verify_request,
)
from .keyring import Keyring

__all__ = ["RequestAuthenticator", "ServerAcl"]


@attrs.frozen
class ServerAcl:
    """The operator's inbound server allow/deny globs (matched case-insensitively)."""

    allow: GlobList = attrs.field(factory=lambda: GlobList.of(["*"], ignore_case=True))
    deny: GlobList = attrs.field(factory=lambda: GlobList.of([], ignore_case=True))

    @classmethod
    def of(cls, allow: tuple[str, ...] = ("*",), deny: tuple[str, ...] = ()) -> ServerAcl:
        return cls(GlobList.of(allow, ignore_case=True), GlobList.of(deny, ignore_case=True))

    def allows(self, server_name: str) -> bool:
        """True when ``server_name`` is on the allow list and not on the deny list.

        Matched as written and on the host alone (no port, no trailing dot, any
        case), so a denied server cannot return under another port.
        """
        return self.allow.matches_server(server_name) and not self.deny.matches_server(server_name)


def _unauthorized(message: str) -> MatrixError:
    return MatrixError(401, Codes.UNAUTHORIZED, message)


def _x_matrix_headers(request: IRequest) -> list[bytes]:
    values = request.requestHeaders.getRawHeaders(b"authorization") or []
    return [value for value in values if value[:8].lower() == b"x-matrix"]


class RequestAuthenticator:
    """Checks a request's ``X-Matrix`` signature; answers with the authenticated origin."""

    def __init__(
        self, clock: IReactorTime, server_name: str, keyring: Keyring, acl: ServerAcl | None = None
    ) -> None:
        self._clock = clock
        self._server_name = server_name
        self._keyring = keyring
        self._acl = acl or ServerAcl()

    def parse(self, request: IRequest) -> XMatrixAuth:
        """The cheap, key-free checks: header present and well-formed, destination, origin, ACL.

        Run before reading keys (and, by the web layer, before the body is
        parsed further) so that refused senders cost us nothing.
        """
        auth = self.parse_header(request)
        self.check_acl(auth)
        return auth

    def parse_header(self, request: IRequest) -> XMatrixAuth:
        """``parse`` but for the ACL: the header's claims, for a caller (the invite log) that
        wants the claimed origin of a request the ACL then refuses."""
        headers = _x_matrix_headers(request)
        if not headers:
            raise _unauthorized("Missing X-Matrix Authorization header")
        try:
            auths = [parse_xmatrix(header) for header in headers]
        except XMatrixError as exc:
            raise _unauthorized(f"Malformed X-Matrix header: {exc}") from None
        auth = auths[0]
        if any(other.origin != auth.origin for other in auths[1:]):
            raise _unauthorized("X-Matrix headers name different origins")
        try:
            check_destination(auth, self._server_name)
        except XMatrixError:
            raise _unauthorized(
                f"X-Matrix destination {str(auth.destination)[:255]!r} is not this server"
            ) from None
        if not is_valid_server_name(auth.origin):
            raise _unauthorized("X-Matrix origin is not a valid server name")
        if not is_valid_key_id(auth.key_id):
            raise _unauthorized("X-Matrix key is not an ed25519 key ID")
        return auth

    def check_acl(self, auth: XMatrixAuth) -> None:
        """Refuse (403 ``M_FORBIDDEN``) an origin the server ACL denies."""
        if not self._acl.allows(auth.origin):
            raise MatrixError(
                403, Codes.FORBIDDEN, "This server does not accept requests from yours"
            )

    async def authenticate(self, request: IRequest, content: Any = None) -> str:
        """Run every check in the module's table; return the authenticated origin."""
        auth = self.parse(request)
        return await self.verify(auth, request, content)

    async def verify(self, auth: XMatrixAuth, request: IRequest, content: Any = None) -> str:
        """The key-dependent half: obtain the origin's key and check the signature."""
        if host_ends_in_dot(auth.origin):
            # Valid by the grammar (``example.org.``, ``example.org.:8448``), but its key can
            # never be fetched (TLS checks the name against the certificate of the name
            # without the dot, and fails), as the keyring knows: refused as an unobtainable
            # key is, without a lookup.
            raise _unauthorized(
                f"X-Matrix origin {auth.origin[:255]!r}: its host ends in a dot, its key cannot"
                " be fetched"
            )
        now_ms = int(self._clock.seconds() * 1000)
        keys = await self._keyring.get_server_keys(auth.origin, [auth.key_id], now_ms)
        key = keys.get(auth.key_id)
        if key is None:
            raise _unauthorized(
                f"Could not obtain key {auth.key_id} of {auth.origin} to check the signature"
            )
        if key.expired_ts is not None:
            raise _unauthorized(f"Key {auth.key_id} of {auth.origin} is an old key (events only)")
        if key.valid_until_ts is None or key.valid_until_ts < now_ms:
            raise _unauthorized(f"Key {auth.key_id} of {auth.origin} has expired")
        method = request.method.decode("ascii", "replace")
        uri = request.uri.decode("utf-8", "replace")
        try:
            verify_request(auth, key.verify_key, method, uri, content, self._server_name)
        except XMatrixError:
            raise _unauthorized(
                f"Invalid X-Matrix signature by {auth.origin} with key {auth.key_id}"
            ) from None
        return auth.origin
