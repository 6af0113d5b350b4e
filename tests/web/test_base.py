"""Tests for the web edge's plumbing: JSON errors, 404/405, async rendering."""

from __future__ import annotations

import datetime
import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from federation_invite.core.errors import Codes, MatrixError
from federation_invite.service import build_site_root
from federation_invite.web._base import MatrixResource, render_async, write_json
from federation_invite.web.tree import PathNode


class Sync(MatrixResource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return write_json(request, 200, {"ok": True})

    def render_POST(self, request: Request) -> bytes:
        raise MatrixError(403, Codes.FORBIDDEN, "no")

    def render_DELETE(self, request: Request) -> bytes:
        raise RuntimeError("secret internal detail")


class Async(MatrixResource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: Deferred[Any] = Deferred()
        self.cancelled = False

    def render_PUT(self, request: Request) -> int:
        async def work() -> tuple[int, Any]:
            try:
                value = await self.pending
            except BaseException:
                self.cancelled = True
                raise
            if isinstance(value, Exception):
                raise value
            return 200, value

        return render_async(request, work)


class Stubborn(MatrixResource):
    """Work that goes on when cancelled, as the invite handler does once it has stored."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: Deferred[Any] = Deferred()
        self.later: Deferred[Any] = Deferred()
        self.cancelled = False

    def render_PUT(self, request: Request) -> int:
        async def work() -> tuple[int, Any]:
            try:
                await self.pending
            except CancelledError:
                self.cancelled = True
            value = await self.later
            if isinstance(value, Exception):
                raise value
            return 200, value

        return render_async(request, work)


def make_client(resource: MatrixResource) -> StubTreq:
    matrix = PathNode()
    matrix.putChild(b"thing", resource)
    return StubTreq(build_site_root(matrix))


class WebBaseTests(SynchronousTestCase):
    def request(self, client: StubTreq, method: str, path: str) -> tuple[int, Any, Any]:
        response = self.successResultOf(client.request(method, "https://test" + path))
        body = self.successResultOf(response.content())
        return response.code, json.loads(body), response.headers

    def test_json_success(self) -> None:
        """A handler's JSON is served with status 200 and a JSON content type."""
        code, body, headers = self.request(make_client(Sync()), "GET", "/_matrix/thing")
        self.assertEqual((code, body), (200, {"ok": True}))
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])

    def test_matrix_error_rendered(self) -> None:
        """A MatrixError becomes its status and {errcode, error}."""
        code, body, _ = self.request(make_client(Sync()), "POST", "/_matrix/thing")
        self.assertEqual((code, body), (403, {"errcode": "M_FORBIDDEN", "error": "no"}))

    def test_unexpected_error_is_opaque_500(self) -> None:
        """An unexpected exception is logged and answered 500 M_UNKNOWN without its text."""
        code, body, _ = self.request(make_client(Sync()), "DELETE", "/_matrix/thing")
        self.assertEqual((code, body["errcode"]), (500, "M_UNKNOWN"))
        self.assertNotIn("secret", json.dumps(body))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unknown_paths_404_json(self) -> None:
        """Unknown paths, at any depth, and bare path nodes answer 404 M_UNRECOGNIZED."""
        client = make_client(Sync())
        for path in ("/", "/nope", "/_matrix", "/_matrix/other", "/_matrix/other/deeper/x"):
            code, body, _ = self.request(client, "GET", path)
            self.assertEqual((code, body["errcode"]), (404, "M_UNRECOGNIZED"), path)

    def test_wrong_method_405_json(self) -> None:
        """A known path with an unsupported method answers 405 M_UNRECOGNIZED and Allow, its
        message naming the method's first 16 characters (the client's: no more echoed)."""
        code, body, headers = self.request(make_client(Sync()), "PATCH", "/_matrix/thing")
        self.assertEqual(
            (code, body),
            (405, {"errcode": "M_UNRECOGNIZED", "error": "Method PATCH not allowed here"}),
        )
        self.assertEqual(headers.getRawHeaders("allow"), ["DELETE, GET, HEAD, POST"])
        request = DummyRequest([b""])
        request.method = b"ABCDEFGHIJKLMNOP" * 64
        body = json.loads(Sync().render(request))
        self.assertEqual(
            (request.responseCode, body),
            (
                405,
                {"errcode": "M_UNRECOGNIZED", "error": "Method ABCDEFGHIJKLMNOP not allowed here"},
            ),
        )

    def test_head_uses_get(self) -> None:
        """HEAD is served by render_GET (with no body)."""
        client = make_client(Sync())
        response = self.successResultOf(client.head("https://test/_matrix/thing"))
        self.assertEqual(response.code, 200)

    def test_async_result(self) -> None:
        """An async handler's result is written when it arrives."""
        resource = Async()
        client = make_client(resource)
        pending = client.put("https://test/_matrix/thing", data=b"{}")
        self.assertNoResult(pending)
        resource.pending.callback({"done": 1})
        client.flush()
        response = self.successResultOf(pending)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(self.successResultOf(response.content())), {"done": 1})

    def test_async_matrix_error(self) -> None:
        """An async MatrixError is rendered like a synchronous one, with Retry-After for 429."""
        resource = Async()
        client = make_client(resource)
        pending = client.put("https://test/_matrix/thing", data=b"{}")
        resource.pending.callback(
            MatrixError(429, Codes.LIMIT_EXCEEDED, "slow", retry_after_ms=1500)
        )
        client.flush()
        response = self.successResultOf(pending)
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["2"])
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(
            body, {"errcode": "M_LIMIT_EXCEEDED", "error": "slow", "retry_after_ms": 1500}
        )

    def test_async_unexpected_error(self) -> None:
        """An async unexpected error becomes an opaque logged 500."""
        resource = Async()
        client = make_client(resource)
        pending = client.put("https://test/_matrix/thing", data=b"{}")
        resource.pending.callback(ValueError("hidden"))
        client.flush()
        response = self.successResultOf(pending)
        self.assertEqual(response.code, 500)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_unencodable_answer_is_a_500(self) -> None:
        """An answer that cannot be encoded still gets a response: a logged, opaque 500."""
        resource = Async()
        client = make_client(resource)
        pending = client.put("https://test/_matrix/thing", data=b"{}")
        resource.pending.callback({"x": float("nan")})
        client.flush()
        response = self.successResultOf(pending)
        self.assertEqual(response.code, 500)
        self.assertEqual(
            json.loads(self.successResultOf(response.content()))["errcode"], "M_UNKNOWN"
        )
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def assertAnsweredAs500(self, error: MatrixError) -> None:
        """``error``, raised by async work and by a synchronous ``render_*``, is answered
        both times with a 500 M_UNKNOWN JSON without Retry-After."""

        class Refusing(MatrixResource):
            isLeaf = True

            def render_GET(self, request: Request) -> bytes:
                raise error

        resource = Async()
        client = make_client(resource)
        pending = client.put("https://test/_matrix/thing", data=b"{}")
        resource.pending.callback(error)
        client.flush()
        answers = [
            self.successResultOf(pending),
            self.successResultOf(make_client(Refusing()).get("https://test/_matrix/thing")),
        ]
        for response in answers:
            self.assertEqual(response.code, 500, error)
            self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
            self.assertIsNone(response.headers.getRawHeaders("retry-after"), error)
            self.assertEqual(
                json.loads(self.successResultOf(response.content())),
                {"errcode": "M_UNKNOWN", "error": "Internal server error"},
            )

    def test_unencodable_matrix_error_is_a_500(self) -> None:
        """A MatrixError whose body cannot be encoded (a date or a set extra), raised by async
        work or a synchronous render_*, is answered with a logged 500 M_UNKNOWN JSON, not left
        unanswered or given Twisted's HTML page."""
        self.assertAnsweredAs500(
            MatrixError(403, Codes.FORBIDDEN, "Not now", until=datetime.date(2030, 1, 1))
        )
        self.assertAnsweredAs500(MatrixError(400, Codes.BAD_JSON, "x", bad={1}))
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 4)

    def test_matrix_error_with_bad_status_or_retry_after_is_a_500(self) -> None:
        """A MatrixError whose status is no int in 100-599 or whose retry_after_ms int()
        refuses, from async work or a synchronous render_*: a logged 500 M_UNKNOWN JSON
        without Retry-After, not left unanswered."""
        errors = [
            MatrixError("403", Codes.FORBIDDEN, "Not now"),  # type: ignore[arg-type]
            MatrixError(99, Codes.FORBIDDEN, "Not now"),
            MatrixError(600, Codes.FORBIDDEN, "Not now"),
            MatrixError(False, Codes.FORBIDDEN, "Not now"),
            MatrixError(429, Codes.LIMIT_EXCEEDED, "slow", retry_after_ms=None),
            MatrixError(429, Codes.LIMIT_EXCEEDED, "slow", retry_after_ms="soon"),
        ]
        for error in errors:
            self.assertAnsweredAs500(error)
        self.assertEqual(len(self.flushLoggedErrors(TypeError, ValueError)), 2 * len(errors))

    def test_client_gone_cancels_work(self) -> None:
        """When the client disconnects, the work is cancelled and nothing is written."""
        resource = Async()
        request = DummyRequest([b""])
        request.method = b"PUT"
        resource.render(request)
        request.processingFailed(ConnectionLost())
        self.assertTrue(resource.cancelled)
        self.assertEqual(request.written, [])

    def gone_mid_work(self) -> tuple[Stubborn, DummyRequest]:
        resource = Stubborn()
        request = DummyRequest([b""])
        request.method = b"PUT"
        request.path = b"/_matrix/thing"
        resource.render(request)
        request.processingFailed(ConnectionLost())
        self.assertTrue(resource.cancelled)
        return resource, request

    def assertUntouched(self, request: DummyRequest) -> None:
        self.assertEqual(request.written, [])
        self.assertIsNone(request.responseCode)
        self.assertIsNone(request.responseHeaders.getRawHeaders(b"content-type"))

    def test_result_after_client_gone_dropped(self) -> None:
        """Work that finishes after the client went away sets no status, header or body."""
        resource, request = self.gone_mid_work()
        resource.later.callback({"done": 1})
        self.assertUntouched(request)

    def test_refusal_after_client_gone_dropped(self) -> None:
        """A MatrixError after the client went away is not rendered (its work logs it)."""
        resource, request = self.gone_mid_work()
        resource.later.callback(MatrixError(500, Codes.UNKNOWN, "store failed"))
        self.assertUntouched(request)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_unexpected_error_after_client_gone_logged(self) -> None:
        """An unexpected error after the client went away is still logged, and sets no
        status, header or body."""
        resource, request = self.gone_mid_work()
        resource.later.callback(ValueError("late bug"))
        self.assertUntouched(request)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_unexpected_error_path_escaped(self) -> None:
        """The unexpected error's line shows control bytes of the request line escaped (the
        fields keep them) and braces as they are."""
        request = DummyRequest([b""])
        request.method = b"DELETE"
        request.path = b"/_matrix/thing{0}\x1b[2J\x7f"
        with capturedLogs() as events:
            Sync().render(request)
        (event,) = events
        self.assertEqual(
            formatEvent(event), "Unexpected error serving DELETE /_matrix/thing{0}\\x1b[2J\\x7f"
        )
        self.assertEqual(event["path"], "/_matrix/thing{0}\x1b[2J\x7f")
        self.assertEqual(request.responseCode, 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unexpected_error_path_cut_to_200_characters(self) -> None:
        """The unexpected error's line names the path's first 200 characters: a long request
        line is not copied into the log whole."""
        request = DummyRequest([b""])
        request.method = b"DELETE"
        request.path = b"/_matrix/thing/" + b"x" * 10_000
        with capturedLogs() as events:
            Sync().render(request)
        (event,) = events
        path = "/_matrix/thing/" + "x" * 185
        self.assertEqual(event["path"], path)
        self.assertEqual(formatEvent(event), f"Unexpected error serving DELETE {path}")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
