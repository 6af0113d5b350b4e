"""The web edge's plumbing: JSON responses, Matrix errors, and async rendering.

Every response body this package serves is JSON. Errors are rendered in one
place (``write_error``): a ``MatrixError`` becomes its status and
``{"errcode", "error"}``; anything else is logged and becomes 500 ``M_UNKNOWN``
without leaking the exception text. Unknown paths give 404 and known paths with
the wrong method 405, both ``M_UNRECOGNIZED``, instead of Twisted's HTML pages.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import canonicaljson
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..core.canonical import EncodedDict, EncodedList
from ..core.errors import Codes, MatrixError, error_answer
from ..logs import Logger

__all__ = ["MatrixResource", "NotFoundResource", "render_async", "write_error", "write_json"]

log = Logger(namespace="federation_invite.web")

JSON_CONTENT_TYPE = b"application/json"


def _encode(body: Any) -> bytes:
    if isinstance(body, (EncodedDict, EncodedList)):
        return body.canonical
    # Responses echo received events, which in room versions 1 to 5 may hold
    # floats; canonicaljson encodes them the way peers hashed them.
    encoded: bytes = canonicaljson.encode_canonical_json(body)
    return encoded


def _set_json_headers(request: Request, status: int) -> None:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON_CONTENT_TYPE)
    request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")


def write_json(request: Request, status: int, body: Any) -> bytes:
    """Set status and headers for a JSON body and return the encoded bytes."""
    encoded = _encode(body)
    _set_json_headers(request, status)
    return encoded


def write_error(request: Request, error: MatrixError) -> bytes:
    """The one place a refusal becomes an HTTP answer (``error_answer``'s, which the
    policy also checks a hook's error with). Raises, with nothing set on ``request``,
    if ``error`` has no answer (see ``error_answer``)."""
    answer = error_answer(error)
    _set_json_headers(request, answer.status)
    for name, value in answer.headers:
        request.setHeader(name, value)
    return answer.body


def _write_refusal(request: Request, error: MatrixError) -> bytes:
    """``write_error``, or a logged 500 ``M_UNKNOWN`` if ``error`` cannot be answered
    (a status that is no int in 100-599, a ``retry_after_ms`` that is no number, an
    extra field or message with no JSON form, say an embedder's ``date``): the client
    still gets an answer rather than none."""
    try:
        return write_error(request, error)
    except Exception:
        return _unexpected(request, Failure())


def _log_unexpected(request: Request, failure: Failure) -> None:
    # The request line may carry control bytes (Twisted 26's check lets DEL
    # through): ``logs.Logger`` escapes them in the text.
    log.failure(
        "Unexpected error serving {method} {path}",
        failure,
        method=request.method.decode("ascii", "replace"),
        path=request.path.decode("ascii", "replace")[:200],
    )


def _unexpected(request: Request, failure: Failure) -> bytes:
    _log_unexpected(request, failure)
    return write_error(request, MatrixError(500, Codes.UNKNOWN, "Internal server error"))


#: Resource class -> the methods it serves (classes do not change at run time).
_ALLOWED_METHODS: dict[type, list[str]] = {}


class MatrixResource(Resource):
    """A resource that answers unknown children and unsupported methods in JSON.

    Subclasses implement ``render_GET``/``render_PUT``/...; a resource with no
    ``render_*`` methods is a pure path node and answers 404 itself. HEAD is
    answered wherever GET is, with GET's headers and no body.
    """

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFoundResource()

    def allowed_methods(self) -> list[str]:
        """The methods this resource serves (HEAD wherever GET is); computed once per class."""
        cls = type(self)
        methods = _ALLOWED_METHODS.get(cls)
        if methods is None:
            found = {
                name[7:]
                for name in dir(cls)
                if name.startswith("render_")
                and getattr(cls, name) is not getattr(Resource, name, None)
            }
            if "GET" in found:
                found.add("HEAD")
            methods = _ALLOWED_METHODS[cls] = sorted(found)
        return methods

    def render(self, request: Request) -> bytes | int:
        body = self.dispatch(request)
        if request.method == b"HEAD" and isinstance(body, bytes):
            # GET's headers, its body's length included, and no body. Given
            # the body, Twisted would drop it too, but log a warning each time.
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return b""
        return body

    def dispatch(self, request: Request) -> bytes | int:
        """The answer to ``request``: its ``render_*`` method's, or a JSON 404 or 405."""
        method = request.method.decode("ascii", "replace")
        allowed = self.allowed_methods()
        if not allowed:
            return write_error(request, not_found())
        if method not in allowed:
            request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
            # HEAD is refused where GET is, with GET's answer (its Content-Length
            # included: RFC 9110 section 8.6), so its message names GET.
            shown = "GET" if method == "HEAD" else method[:16]
            return write_error(
                request, MatrixError(405, Codes.UNRECOGNIZED, f"Method {shown} not allowed here")
            )
        handler = getattr(self, f"render_{'GET' if method == 'HEAD' else method}")
        try:
            result: bytes | int = handler(request)
        except MatrixError as error:
            return _write_refusal(request, error)
        except Exception:
            return _unexpected(request, Failure())
        return result


def not_found() -> MatrixError:
    return MatrixError(404, Codes.UNRECOGNIZED, "Unrecognized request")


class NotFoundResource(MatrixResource):
    """Any path we do not serve: 404 ``M_UNRECOGNIZED`` for every method."""

    isLeaf = True

    def dispatch(self, request: Request) -> bytes:
        return write_error(request, not_found())


def render_async(
    request: Request,
    work: Callable[[], Coroutine[Any, Any, tuple[int, Any]]],
) -> int:
    """Run ``work`` (a coroutine giving ``(status, body)``) and answer when it finishes.

    If the client goes away first, the work is cancelled and nothing is written
    to the finished request (the pattern of Klein's ``KleinResource.render``).
    Work that must not stop halfway may finish regardless (``InviteHandler``
    does once an invite is handed to the store): its result is then dropped.
    """
    done = [False]

    def finished(_: object) -> None:
        done[0] = True

    def gone(failure: Failure) -> None:
        done[0] = True
        deferred.cancel()

    def respond(result: tuple[int, Any]) -> None:
        if done[0]:
            return
        status, body = result
        try:
            encoded = write_json(request, status, body)
        except Exception:
            # The answer cannot be encoded: still answer (an opaque, logged 500)
            # rather than leave the client waiting for a response never written.
            _finish(_unexpected(request, Failure()))
            return
        _finish(encoded)

    def fail(failure: Failure) -> None:
        if done[0]:
            # Nobody to answer (nothing is set on the finished request): only
            # the unexpected is logged, refusals by the work that made them.
            if not failure.check(CancelledError, MatrixError):
                _log_unexpected(request, failure)
            return
        if failure.check(MatrixError):
            error = failure.value
            assert isinstance(error, MatrixError)
            _finish(_write_refusal(request, error))
        else:
            _finish(_unexpected(request, failure))

    def _finish(body: bytes) -> None:
        if done[0]:
            return
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        request.write(body)
        request.finish()

    deferred: Deferred[tuple[int, Any]] = Deferred.fromCoroutine(work())
    deferred.addCallbacks(respond, fail).addErrback(
        lambda failure: log.failure("Error while writing a response", failure)
    )
    if not done[0] and not deferred.called:
        request.notifyFinish().addCallbacks(finished, gone)
    return NOT_DONE_YET
