"""The one error type every layer raises and the web edge renders.

A ``MatrixError`` is raised where the fact is known (a core check, a policy, the
store) and turned into ``{"errcode": ..., "error": ...}`` once, at the edge.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Codes", "MatrixError"]


class Codes:
    """The Matrix errcodes this package produces (client-server/server-server specs)."""

    UNRECOGNIZED = "M_UNRECOGNIZED"
    NOT_JSON = "M_NOT_JSON"
    BAD_JSON = "M_BAD_JSON"
    TOO_LARGE = "M_TOO_LARGE"
    UNAUTHORIZED = "M_UNAUTHORIZED"
    FORBIDDEN = "M_FORBIDDEN"
    MISSING_PARAM = "M_MISSING_PARAM"
    INVALID_PARAM = "M_INVALID_PARAM"
    INCOMPATIBLE_ROOM_VERSION = "M_INCOMPATIBLE_ROOM_VERSION"
    UNSUPPORTED_ROOM_VERSION = "M_UNSUPPORTED_ROOM_VERSION"
    NOT_FOUND = "M_NOT_FOUND"
    INVITE_BLOCKED = "M_INVITE_BLOCKED"
    LIMIT_EXCEEDED = "M_LIMIT_EXCEEDED"
    UNKNOWN = "M_UNKNOWN"


class MatrixError(Exception):
    """A refusal with an HTTP status, a Matrix ``errcode`` and a human message.

    Extra keyword arguments become extra fields of the JSON body, as the spec
    asks for some errors (``room_version`` on ``M_INCOMPATIBLE_ROOM_VERSION``,
    ``retry_after_ms`` on ``M_LIMIT_EXCEEDED``).
    """

    def __init__(self, http_status: int, errcode: str, message: str, **extra: Any) -> None:
        super().__init__(http_status, errcode, message)
        self.http_status = http_status
        self.errcode = errcode
        self.message = message
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        """The error body as the spec shapes it: ``errcode``, ``error``, then extras."""
        body: dict[str, Any] = {"errcode": self.errcode, "error": self.message}
        for key, value in self.extra.items():
            body.setdefault(key, value)
        return body

    def __str__(self) -> str:
        return f"{self.http_status} {self.errcode}: {self.message}"

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.extra.items())
        return f"MatrixError({self.http_status}, {self.errcode!r}, {self.message!r}{extra})"
