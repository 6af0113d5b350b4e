"""The one error type every layer raises and the web edge renders.

A ``MatrixError`` is raised where the fact is known (a core check, a policy, the
store) and turned into ``{"errcode": ..., "error": ...}`` once, at the edge.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import canonicaljson

__all__ = ["Codes", "ErrorAnswer", "MatrixError", "error_answer"]


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


class ErrorAnswer(NamedTuple):
    """The HTTP answer to a ``MatrixError``: its status, the headers it adds to a JSON
    answer's (``Retry-After``), and its encoded body."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


def error_answer(error: MatrixError) -> ErrorAnswer:
    """The answer the web edge writes for ``error``, built before anything is written.

    Raises ``TypeError`` or ``ValueError`` if ``error`` has none: a status that is no
    ``int`` in 100-599, a ``retry_after_ms`` (on ``M_LIMIT_EXCEEDED``) that ``int()``
    refuses, or a body with no JSON form. The web edge then answers a logged 500
    ``M_UNKNOWN``, and the policy checks a hook's error with it when it is raised.
    """
    status = error.http_status
    if not isinstance(status, int) or isinstance(status, bool):
        raise TypeError(f"HTTP status {status!r} is not an int")
    if not 100 <= status <= 599:
        raise ValueError(f"HTTP status {status} is not in 100-599")
    headers: tuple[tuple[bytes, bytes], ...] = ()
    if error.errcode == Codes.LIMIT_EXCEEDED and "retry_after_ms" in error.extra:
        seconds = max(1, (int(error.extra["retry_after_ms"]) + 999) // 1000)
        headers = ((b"Retry-After", str(seconds).encode("ascii")),)
    body: bytes = canonicaljson.encode_canonical_json(error.to_json())
    return ErrorAnswer(status, headers, body)
