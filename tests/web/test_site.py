"""Tests for federation_invite.web.site: the access log (invites are logged once, by their
handler), request targets, Content-Length, the local address asked once per connection, and the
drain on shutdown."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http as twisted_http
from twisted.web.server import Request, Site

import federation_invite
from federation_invite.core.errors import Codes, MatrixError
from federation_invite.tlscert import write_self_signed_certificate
from federation_invite.web import site as site_module
from federation_invite.web._base import MatrixResource, write_json
from federation_invite.web.site import (
    DrainResult,
    FederationSite,
    _count_requests,
    _LimitedChannel,
    _LimitedRequest,
    _raw_error_response,
)

from ..invites import THEM, _sign_request_lax, event_id_of
from ..test_hostile_slow import MAX_BODY, Connection, SiteTestCase, put_request

#: A chunked request whose chunk size is negative: ``int(b"-6", 16)`` took it, and stepping
#: over its body went backwards for ever.
NEGATIVE_CHUNK = b"PUT /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-6\r\n"

#: A request with a Content-Length too long for ``int()`` (Python's limit: 4300 digits).
HUGE_CONTENT_LENGTH = b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"1" * 5000 + b"\r\n\r\n"


class _TimeLimitExpired(Exception):
    """Raised in the test by ``time_limit`` when the code under test runs too long."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the code run within (every ``seconds`` seconds, until it ends) rather than
    hang the suite, for tests of loops that did not end."""

    def expired(signum: int, frame: object) -> None:
        raise _TimeLimitExpired(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class AccessLogTests(SiteTestCase):
    """The access log skips requests whose handler logged their outcome, and only those."""

    def setUp(self) -> None:
        super().setUp()
        self.logged: list[bytes] = []

        def record(site: Any, request: Request) -> None:
            if site is self.site:  # not the fake origin's key server
                self.logged.append(request.uri)

        self.patch(Site, "log", record)

    def signed_invite(self, *, bad_signature: bool = False) -> tuple[str, bytes]:
        room_version, event = self.s.invite()
        body = self.s.v2_body(room_version, event)
        path = self.s.path(2, event["room_id"], event_id_of(room_version, event))
        header = _sign_request_lax(self.s.their_key, THEM, "PUT", path, body)
        if bad_signature:
            header = header.replace('sig="', 'sig="AAAA')
        return path, put_request(path, json.dumps(body).encode(), header)

    def test_accepted_and_refused_invites_not_in_access_log(self) -> None:
        """An accepted invite and one refused by authentication have only the handler's line."""
        for bad in (False, True):
            _, data = self.signed_invite(bad_signature=bad)
            connection = self.connect()
            connection.send(data)
            ((status, _, _),) = connection.responses()
            self.assertEqual(status, 401 if bad else 200)
        self.assertEqual(self.logged, [])

    def test_other_requests_in_access_log(self) -> None:
        """An invite refused by the endpoint before the handler (bad JSON) has only its invite
        line too; other paths keep their access-log line."""
        path, _ = self.signed_invite()
        connection = self.connect()
        with capturedLogs() as events:
            connection.send(
                put_request(path, b"not json", 'X-Matrix origin="a",key="ed25519:a",sig="a"')
            )
        connection.send(b"GET /_matrix/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual([status for status, _, _ in connection.responses()], [400, 404])
        self.assertEqual([event.get("errcode") for event in events], ["M_NOT_JSON"])
        self.assertEqual(self.logged, [b"/_matrix/nothing"])


class AccessLogLengthTests(SiteTestCase):
    """A peer does not choose the length of an access-log line: each field it sends (method,
    target, Referer, User-Agent) is cut to 200 bytes, then escaped as Twisted escapes it."""

    def access_lines(self, request: bytes) -> list[str]:
        """The access-log lines ``request`` (answered 404) writes."""
        self.site.logFile = sink = io.StringIO()
        self.site._logDateTime = "[-]"
        connection = self.connect()
        connection.send(request)
        ((status, _, _),) = connection.responses()
        self.assertEqual(status, 404)
        return sink.getvalue().splitlines()

    def test_peer_fields_cut(self) -> None:
        """A 7000-byte User-Agent of 0xff bytes, a 4000-byte Referer of quotes and path (Twisted
        takes 16 KB of them in all): the first 200 bytes of each, escaped (was a 35 KB line)."""
        path = b"/_matrix/nothing/" + b"a" * 4000
        referer, agent = b'"' * 4000, b"\xff" * 7000
        lines = self.access_lines(
            b"GET %s HTTP/1.1\r\nHost: x\r\nReferer: %s\r\nUser-Agent: %s\r\n\r\n"
            % (path, referer, agent)
        )
        cut_path, cut_referer, cut_agent = path[:200].decode(), '\\"' * 200, "\\xff" * 200
        self.assertEqual(
            lines,
            [
                f'"203.0.113.9" - - [-] "GET {cut_path} HTTP/1.1" 404 59 '
                f'"{cut_referer}" "{cut_agent}"'
            ],
        )

    def test_method_cut(self) -> None:
        """A 10000-byte method (any token is one): its first 200 bytes."""
        lines = self.access_lines(b"M" * 10000 + b" /_matrix/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(
            lines,
            ['"203.0.113.9" - - [-] "' + "M" * 200 + ' /_matrix/nothing HTTP/1.1" 404 59 "-" "-"'],
        )

    def test_short_fields_whole(self) -> None:
        """Fields of 200 bytes or fewer are written whole, as Twisted's combined format would."""
        lines = self.access_lines(
            b"GET /_matrix/nothing?" + b"q" * 183 + b" HTTP/1.1\r\nHost: x\r\n"
            b"Referer: https://r.example/\r\nUser-Agent: UA\x1b/1\r\n\r\n"
        )
        self.assertEqual(
            lines,
            [
                '"203.0.113.9" - - [-] "GET /_matrix/nothing?' + "q" * 183 + ' HTTP/1.1" 404 59 '
                '"https://r.example/" "UA\\x1b/1"'
            ],
        )


class RequestTargetTests(SiteTestCase):
    """Request targets other than a path (RFC 9112, section 3.2) get JSON answers too."""

    def assertNotFound(self, request: bytes) -> Any:
        """``request`` gets a JSON 404 ``M_UNRECOGNIZED``; the connection stays usable."""
        connection = self.connect()
        connection.send(request)
        connection.send(b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: us.example\r\n\r\n")
        (status, headers, body), (next_status, _, _) = connection.responses()
        self.assertEqual(status, 404, request)
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(headers[b"cache-control"], b"no-cache, no-store, must-revalidate")
        self.assertNotIn(b"allow", headers)
        self.assertEqual(body, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})
        self.assertEqual(next_status, 200)
        self.assertFalse(connection.closing)

    def test_asterisk_form(self) -> None:
        """``OPTIONS *`` and ``GET *``: 404 ``M_UNRECOGNIZED`` as for any path we do not serve
        (we serve OPTIONS nowhere), not Twisted's empty 200 or 405."""
        for method in (b"OPTIONS", b"GET", b"PUT"):
            self.assertNotFound(method + b" * HTTP/1.1\r\nHost: us.example\r\n\r\n")

    def test_asterisk_form_head(self) -> None:
        """``HEAD *``: the 404's headers (its body's length) and no body."""
        connection = self.connect()
        connection.send(b"HEAD * HTTP/1.1\r\nHost: us.example\r\n\r\n")
        head, _, rest = connection.transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 404 "), head)
        self.assertIn(b"\r\nContent-Type: application/json\r\n", head + b"\r\n")
        self.assertIn(b"\r\nContent-Length: 59\r\n", head + b"\r\n")
        self.assertEqual(rest, b"")

    def test_authority_form_and_other_absolute_forms(self) -> None:
        """``CONNECT host:443`` (authority-form), absolute-form targets of other schemes, and
        ``http`` URIs with no host or with user information (which RFC 9110 has a recipient
        reject): JSON 404 ``M_UNRECOGNIZED``, their paths not served."""
        self.assertNotFound(b"CONNECT us.example:443 HTTP/1.1\r\nHost: us.example:443\r\n\r\n")
        for target in (
            b"ftp://us.example/_matrix/federation/v1/version",
            b"httpx://us.example/_matrix/federation/v1/version",
            b"http:/_matrix/federation/v1/version",
            b"http:///_matrix/federation/v1/version",
            b"http://user@us.example/_matrix/federation/v1/version",
            b"us.example/_matrix/federation/v1/version",
        ):
            self.assertNotFound(b"GET %s HTTP/1.1\r\nHost: us.example\r\n\r\n" % target)

    def record_requests(self) -> list[tuple[bytes, bytes, Any, list[bytes]]]:
        """Each request's ``uri``, ``path``, ``args``, and ``prepath + postpath`` (after routing)."""
        seen: list[tuple[bytes, bytes, Any, list[bytes]]] = []
        original = _LimitedRequest.process

        def process(request: _LimitedRequest) -> Any:
            result = original(request)
            assert request.prepath is not None and request.postpath is not None
            seen.append(
                (request.uri, request.path, request.args, request.prepath + request.postpath)
            )
            return result

        self.patch(_LimitedRequest, "process", process)
        return seen

    def test_absolute_form_routed_by_path_and_query(self) -> None:
        """An ``http``/``https`` absolute-form target (which a server must accept, RFC 9112
        section 3.2.2) is served as its path and query are, whatever the scheme's case and the
        authority (no virtual hosting): ``uri``, ``path``, ``args``, ``prepath``/``postpath``
        all as for the origin-form; an empty path is ``/``."""
        seen = self.record_requests()
        version = b"/_matrix/federation/v1/version"
        # target, status, uri (origin-form), args
        cases: list[tuple[bytes, int, bytes, dict[bytes, list[bytes]]]] = [
            (b"http://us.example" + version, 200, version, {}),
            (
                b"HTTPS://Other.Example:8448" + version + b"?a=1&a=%7E",
                200,
                version + b"?a=1&a=%7E",
                {b"a": [b"1", b"~"]},
            ),
            (b"hTTp://[2001:db8::1]" + version + b"?", 200, version + b"?", {}),
            (b"https://us.example/_matrix/key/v2/server", 200, b"/_matrix/key/v2/server", {}),
            (b"http://us.example", 404, b"/", {}),
            (b"http://us.example?x=1", 404, b"/?x=1", {b"x": [b"1"]}),
        ]
        connection = self.connect()
        for target, _, _, _ in cases:
            connection.send(b"GET %s HTTP/1.1\r\nHost: us.example\r\n\r\n" % target)
        self.assertEqual(
            [status for status, _, _ in connection.responses()],
            [status for _, status, _, _ in cases],
        )
        self.assertFalse(connection.closing)
        self.assertEqual(len(seen), len(cases))
        for (target, _, uri, args), seen_request in zip(cases, seen, strict=True):
            path = uri.partition(b"?")[0]
            self.assertEqual(seen_request, (uri, path, args, path[1:].split(b"/")), target)

    def test_absolute_form_invite_authenticated_as_origin_form(self) -> None:
        """A signed invite sent with an absolute-form target is authenticated against its path
        and query (what the X-Matrix ``uri`` covers, as for the origin-form) and accepted; one
        signed over the whole absolute URI does not verify: 401 ``M_UNAUTHORIZED``."""
        seen = self.record_requests()
        for depth, sign_absolute, status in ((1, False, 200), (2, True, 401)):
            room_version, event = self.s.invite(extra={"depth": depth})
            body = self.s.v2_body(room_version, event)
            path = self.s.path(2, event["room_id"], event_id_of(room_version, event))
            absolute = "https://us.example:8448" + path
            header = _sign_request_lax(
                self.s.their_key, THEM, "PUT", absolute if sign_absolute else path, body
            )
            connection = self.connect()
            connection.send(put_request(absolute, json.dumps(body).encode(), header))
            ((code, _, answer),) = connection.responses()
            self.assertEqual(code, status, answer)
            self.assertEqual(seen[-1][:2], (path.encode(), path.encode()))
            if status == 200:
                self.assertEqual(answer["event"]["state_key"], event["state_key"])
            else:
                self.assertEqual(answer["errcode"], "M_UNAUTHORIZED")
                self.assertIn("Invalid X-Matrix signature", answer["error"])
        self.assertEqual(len(self.s.store.invites), 1)

    def test_target_bytes_outside_visible_ascii_refused(self) -> None:
        """A request target with DEL, 0x80, 0xb0 (which Twisted's own check lets through), 0xff,
        a tab or NUL: JSON 400 ``M_UNKNOWN``, the connection closed, nothing served; the same
        bytes percent-encoded are served."""
        version = b"/_matrix/federation/v1/version"
        for byte in (b"\x7f", b"\x80", b"\xb0", b"\xff", b"\t", b"\x00"):
            for target in (version + b"?a=" + byte, b"/_matrix/federation/v1/ver" + byte + b"sion"):
                connection = self.connect()
                connection.send(b"GET %s HTTP/1.1\r\nHost: us.example\r\n\r\n" % target)
                self.assertOnlyAnswer(connection, 400, "M_UNKNOWN")
                ((_, _, body),) = connection.responses()
                self.assertEqual(body["error"], "Malformed HTTP request")
                self.assertFalse(connection.protocol._handlingRequest, target)
        connection = self.connect()
        connection.send(b"GET %s?a=%%7F%%80%%B0%%FF%%09%%00 HTTP/1.1\r\nHost: x\r\n\r\n" % version)
        connection.send(self.valid_request())
        self.assertEqual([status for status, _, _ in connection.responses()], [200, 200])
        self.assertFalse(connection.closing)

    def test_lowest_and_highest_visible_ascii_in_target_served(self) -> None:
        """'!' (0x21) and '~' (0x7e) are visible ASCII, allowed in a request target (RFC 9112,
        section 3.2; RFC 3986): a path we do not serve is answered 404 ``M_UNRECOGNIZED``, not
        400, and the connection kept."""
        connection = self.connect()
        connection.send(b"GET /_matrix/x!y~z HTTP/1.1\r\nHost: us.example\r\n\r\n")
        connection.send(self.valid_request())
        (status, _, body), (next_status, _, _) = connection.responses()
        self.assertEqual((status, body["errcode"]), (404, "M_UNRECOGNIZED"))
        self.assertEqual(next_status, 200)
        self.assertFalse(connection.closing)


class HeaderSizeTests(SiteTestCase):
    """Twisted's 16 KiB limit (``totalHeadersSize``) counts the request line and every header
    line together, as the README's hostile-input table says; no line needs to be long."""

    def send_with_header_lines(self, count: int) -> Connection:
        """Helper: a GET of an unknown path with ``count`` header lines of 2,000 bytes."""
        connection = self.connect()
        lines = b"".join(b"X-H%d: %s\r\n" % (index, b"a" * 1990) for index in range(count))
        connection.send(b"GET /x HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
        return connection

    def test_many_short_header_lines_refused_together(self) -> None:
        """Ten header lines of 2 KB each (20 KB in all, none over 16 KiB): 400 M_UNKNOWN, the
        connection closed; seven (14 KB) are read and the request served (404)."""
        self.assertOnlyAnswer(self.send_with_header_lines(10), 400, "M_UNKNOWN")
        connection = self.send_with_header_lines(7)
        ((code, _, body),) = connection.responses()
        self.assertEqual((code, body["errcode"]), (404, "M_UNRECOGNIZED"))
        self.assertFalse(connection.closing)

    def test_request_line_counts_toward_the_limit(self) -> None:
        """A 10,000-byte request target with a 7,000-byte header line, each under 16 KiB:
        400 M_UNKNOWN; with a 5,000-byte one (15 KB in all) the request is served (404)."""
        for header_bytes, status, errcode in (
            (7_000, 400, "M_UNKNOWN"),
            (5_000, 404, "M_UNRECOGNIZED"),
        ):
            connection = self.connect()
            connection.send(
                b"GET /"
                + b"a" * 10_000
                + b" HTTP/1.1\r\nHost: x\r\nX-H: "
                + b"a" * header_bytes
                + b"\r\n\r\n"
            )
            ((code, _, body),) = connection.responses()
            self.assertEqual((code, body["errcode"]), (status, errcode))
            self.assertEqual(connection.closing, status == 400)


class LineLengthTests(SiteTestCase):
    """A line over Twisted's 16 KiB line limit: the request line is answered 414 (RFC 9112
    section 3: a request-target longer than the server parses), a header line 400."""

    def test_request_line_over_16_kib_refused_414(self) -> None:
        """A request line of 17,000 bytes, whole or still arriving (no line end yet), first
        on its connection or after an answered request: JSON 414 ``M_TOO_LARGE``, closed."""
        version = b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: x\r\n\r\n"
        long_line = b"GET /" + b"a" * 17_000 + b" HTTP/1.1"
        for earlier in (b"", version):
            for data in (long_line + b"\r\nHost: x\r\n\r\n", long_line[:16_500]):
                connection = self.connect()
                connection.send(earlier + data)
                *answered, (status, headers, body) = connection.responses()
                self.assertEqual([code for code, _, _ in answered], [200] * bool(earlier))
                self.assertEqual((status, body["errcode"]), (414, "M_TOO_LARGE"), data[-20:])
                self.assertEqual(body["error"], "Request line too long")
                self.assertIn(b"HTTP/1.1 414 URI Too Long\r\n", connection.transport.value())
                self.assertEqual(headers[b"content-type"], b"application/json")
                self.assertTrue(connection.closing)

    def test_header_line_over_16_kib_refused_400(self) -> None:
        """A header line of 17,000 bytes, whole or still arriving: JSON 400 ``M_UNKNOWN``."""
        head = b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17_000
        for data in (head + b"\r\n\r\n", head):
            connection = self.connect()
            connection.send(data)
            self.assertOnlyAnswer(connection, 400, "M_UNKNOWN")


class ContentLengthTests(SiteTestCase):
    """A Content-Length is 1 to 18 ASCII digits, once; anything else is answered JSON 400."""

    def test_content_length_over_18_digits_refused(self) -> None:
        """A Content-Length of 19 digits or more (of 5000, Twisted's ``int()`` raised out of
        ``dataReceived``: no answer, the connection dropped), in any case, padded or folded,
        first or after an answered request: JSON 400 ``M_UNKNOWN``, the connection closed."""
        version = b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: x\r\n\r\n"
        for field in (
            b"Content-Length: " + b"1" * 5000,
            b"content-length:" + b"1" * 19,
            b"CONTENT-LENGTH: \t" + b"0" * 18 + b"1 ",
            b"Content-Length:\r\n " + b"9" * 19,  # obs-fold: Twisted joins the lines
        ):
            for earlier in (b"", version):
                connection = self.connect()
                connection.send(earlier + b"PUT /x HTTP/1.1\r\nHost: x\r\n" + field + b"\r\n\r\n")
                *answered, (status, headers, body) = connection.responses()
                self.assertEqual([code for code, _, _ in answered], [200] * bool(earlier))
                self.assertEqual((status, body["errcode"]), (400, "M_UNKNOWN"), field[:30])
                self.assertEqual(body["error"], "Malformed HTTP request")
                self.assertEqual(headers[b"content-type"], b"application/json")
                self.assertTrue(connection.closing)

    def test_content_length_of_18_digits_read(self) -> None:
        """18 digits are read as a length: over the body cap, 413 ``M_TOO_LARGE``."""
        connection = self.connect()
        connection.send(b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 18 + b"\r\n\r\n")
        self.assertOnlyAnswer(connection, 413, "M_TOO_LARGE")

    def test_valid_content_length_in_any_case_and_padded_accepted(self) -> None:
        """A valid Content-Length spelled in another case, with spaces and tabs around its
        value: the invite is read and accepted, as with the usual spelling."""
        head, _, body = self.valid_request().partition(b"\r\n\r\n")
        lines = [
            b"content-LENGTH:\t  %d \t" % len(body)
            if line.lower().startswith(b"content-length:")
            else line
            for line in head.split(b"\r\n")
        ]
        connection = self.connect()
        connection.send(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.assertEqual([status for status, _, _ in connection.responses()], [200])
        self.assertEqual(len(self.s.store.invites), 1)

    def test_repeated_or_conflicting_content_length_refused(self) -> None:
        """Content-Length twice (with the same value or not), or beside ``Transfer-Encoding:
        chunked`` (RFC 9112 section 6.3; Twisted's own check): JSON 400 ``M_UNKNOWN``."""
        for fields in (
            b"Content-Length: 3\r\nContent-Length: 4\r\n",
            b"Content-Length: 3\r\nContent-Length: 3\r\n",
            b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        ):
            connection = self.connect()
            connection.send(b"PUT /x HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\nabc")
            self.assertOnlyAnswer(connection, 400, "M_UNKNOWN")


class TransferEncodingTests(SiteTestCase):
    """A Transfer-Encoding is one ``chunked`` coding (RFC 9112 section 6.3: chunked is the
    last coding, and the only one we accept), on one field line; else JSON 400, closed."""

    VERSION = b"/_matrix/federation/v1/version"

    def test_other_than_one_chunked_refused(self) -> None:
        """``chunked`` then ``identity`` on two lines (RFC 9110 section 5.3 combines them),
        the reverse, ``identity`` alone (with or without a Content-Length), ``chunked``
        twice: JSON 400 ``M_UNKNOWN``, the connection closed, the request pipelined behind
        it never answered."""
        for fields in (
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: Identity\r\nContent-Length: 0\r\n",
            b"Content-Length: 0\r\nTransfer-Encoding: identity\r\n",
            b"Transfer-Encoding: identity\r\n",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: chunked, identity\r\n",
        ):
            connection = self.connect()
            connection.send(
                b"POST %s HTTP/1.1\r\nHost: x\r\n%s\r\n0\r\n\r\n" % (self.VERSION, fields)
                + b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % self.VERSION
            )
            self.assertOnlyAnswer(connection, 400, "M_UNKNOWN")

    def test_one_chunked_read(self) -> None:
        """One ``Transfer-Encoding: chunked`` line, in any case and padded: the body is read,
        the request answered (405), and the next request on the connection served."""
        for value in (b"chunked", b"\tCHUNKED "):
            connection = self.connect()
            connection.send(
                b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:%s\r\n\r\n"
                b"3\r\nabc\r\n0\r\n\r\n"
                % (self.VERSION, value)
                + b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % self.VERSION
            )
            self.assertEqual([code for code, _, _ in connection.responses()], [405, 200])
            self.assertFalse(connection.closing)


#: A multipart/form-data body whose part is named with RFC 2231 syntax (``name*=``):
#: Twisted's form parser takes the name for a string, and raised AttributeError.
RFC_2231_MULTIPART = (
    b"--XyZ\r\nContent-Disposition: form-data; name*=utf-8''abc\r\n\r\nx\r\n--XyZ--\r\n"
)


def post_request(path: bytes, content_type: bytes, body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: us.example\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
        % (path, content_type, len(body))
    ) + body


class _RecordingResource(MatrixResource):
    """Serves POST (and PUT) with 200, recording what each request's ``args`` held."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.args: list[dict[bytes, list[bytes]]] = []

    def render_POST(self, request: Request) -> bytes:
        self.args.append(dict(request.args or {}))
        return write_json(request, 200, {})


class FormBodyTests(SiteTestCase):
    """A POST body with a form content type is left alone, as any body is (nothing we serve
    reads form arguments): Twisted parses it before any resource runs unless told not to."""

    def setUp(self) -> None:
        super().setUp()

        def parsed(*args: object, **kwargs: object) -> None:
            self.fail("a request body was parsed as a form")

        # Twisted's form parsers: multipart, and urlencoded (the query string's too,
        # but the requests here have none).
        self.patch(twisted_http, "_getMultiPartArgs", parsed)
        self.patch(twisted_http, "parse_qs", parsed)

    def test_rfc_2231_multipart_answered_in_json(self) -> None:
        """A multipart POST naming its part ``name*=utf-8''abc`` (which crashed Twisted's
        parser: no answer, a traceback logged) gets our JSON 405 on the invite endpoint and
        404 elsewhere, and nothing is logged but the access-log line."""
        for path, status in ((b"/_matrix/federation/v2/invite/a/b", 405), (b"/nothing", 404)):
            connection = self.connect()
            with capturedLogs() as events:
                connection.send(
                    post_request(path, b"multipart/form-data; boundary=XyZ", RFC_2231_MULTIPART)
                )
            ((code, headers, body),) = connection.responses()
            self.assertEqual((code, body["errcode"]), (status, "M_UNRECOGNIZED"), path)
            self.assertEqual(headers[b"content-type"], b"application/json")
            self.assertFalse(connection.closing, "the connection stays usable")
            self.assertEqual(
                [event for event in events if event.get("log_failure") is not None], []
            )

    def test_form_bodies_not_parsed(self) -> None:
        """urlencoded and multipart POST bodies reach the resource unparsed: ``args`` empty,
        the body intact in ``content``."""
        resource = _RecordingResource()
        site = FederationSite(resource, reactor=self.clock, max_body_bytes=MAX_BODY)
        connection = self.connect(site)
        connection.send(post_request(b"/form", b"application/x-www-form-urlencoded", b"a=b&c=d"))
        connection.send(
            post_request(b"/form", b"multipart/form-data; boundary=XyZ", RFC_2231_MULTIPART)
        )
        self.assertEqual([status for status, _, _ in connection.responses()], [200, 200])
        self.assertEqual(resource.args, [{}, {}])


class RequestReceivedFailureTests(SiteTestCase):
    """An exception escaping Twisted's ``requestReceived`` (a parser bug, say) is answered
    with a JSON 400 and one log line, rather than a dropped connection and a traceback."""

    def test_exception_in_request_received_answered_400(self) -> None:
        """``process`` (called last by ``requestReceived``) raising: JSON 400 ``M_UNKNOWN``,
        the connection closed, and one error line naming the exception, without traceback."""

        def broken(request: Request) -> None:
            raise RuntimeError("a bug in the parser")

        self.patch(Request, "process", broken)
        connection = self.connect()
        with capturedLogs() as events:
            connection.send(b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertOnlyAnswer(connection, 400, "M_UNKNOWN")
        self.assertEqual(
            [(event["log_level"], event.get("log_failure")) for event in events],
            [(LogLevel.error, None)],
        )
        text = formatEvent(events[0])
        self.assertIn("RuntimeError: a bug in the parser", text)
        self.assertIn("GET /_matrix/federation/v1/version", text)
        self.assertNotIn("\n", text)

    def test_exception_in_head_request_received_answered_without_body(self) -> None:
        """The same for HEAD: the 400's status line and headers, and no body."""

        def broken(request: Request) -> None:
            raise RuntimeError("a bug in the parser")

        self.patch(Request, "process", broken)
        connection = self.connect()
        with capturedLogs():
            connection.send(b"HEAD /_matrix/federation/v1/version HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, rest = connection.transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
        self.assertEqual(rest, b"")
        self.assertTrue(connection.closing)

    def test_exception_after_answer_begun_aborts(self) -> None:
        """Raised once part of an answer was written: nothing more is written (no second
        status line), the connection is aborted, and the error is logged."""

        def broken(request: Request) -> None:
            request.write(b"partial")
            raise RuntimeError("a bug after writing")

        self.patch(Request, "process", broken)
        connection = self.connect()
        with capturedLogs() as events:
            connection.send(b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(connection.transport.value().count(b"HTTP/1.1 "), 1)
        self.assertTrue(connection.transport.disconnected, "aborted")
        self.assertEqual([event["log_level"] for event in events], [LogLevel.error])


class _Listening(MatrixResource):
    """A leaf that hears of the site's refusals of requests for it (``refused_by_site``)."""

    isLeaf = True

    def __init__(self, answer: Any) -> None:
        super().__init__()
        self.answer = answer
        self.heard: list[tuple[Any, list[bytes]]] = []

    def refused_by_site(self, refusal: Any, postpath: list[bytes]) -> Any:
        self.heard.append((refusal, postpath))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class SiteRefusalTests(SiteTestCase):
    """A resource hears of the requests for it that the site refused itself."""

    def refuse(self, site: FederationSite, target: bytes) -> list[dict[str, Any]]:
        """Send a PUT of ``target`` whose body is over the cap: 413; what was logged."""
        connection = self.connect(site)
        with capturedLogs() as events:
            connection.send(b"PUT %s HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" % target)
        self.assertOnlyAnswer(connection, 413, "M_TOO_LARGE")
        return list(events)

    def test_resource_hears_of_refusals(self) -> None:
        """The resource the path leads to (percent-encoded segments and an absolute-form
        target routed as Twisted routes them) hears of the refusal with the rest of the path,
        percent-decoded; a resource that logged it silences the site's own line."""
        listening = _Listening(True)
        root = MatrixResource()
        root.putChild(b"a", listening)
        site = FederationSite(root, reactor=self.clock, max_body_bytes=MAX_BODY)
        self.assertEqual(self.refuse(site, b"/%61/b%2Fc/d?x=1"), [])
        self.assertEqual(self.refuse(site, b"https://host/a/e"), [])
        ((first, first_rest), (second, second_rest)) = listening.heard
        self.assertEqual(
            (first.method, first.path, first_rest), (b"PUT", b"/%61/b%2Fc/d", [b"b/c", b"d"])
        )
        self.assertEqual((first.error.http_status, first.peer), (413, "203.0.113.9"))
        self.assertEqual((second.path, second_rest), (b"/a/e", [b"e"]))
        # Not a path it serves, or a resource not listening: the site's own line.
        for target in (b"/b/a", b"*"):
            (line,) = self.refuse(site, target)
            self.assertIn("Refusing a request body over", formatEvent(line))
        self.assertEqual(len(listening.heard), 2)

    def test_resource_not_logging_or_failing(self) -> None:
        """A resource that did not log the refusal leaves the site's line; one that raises is
        logged, and the refusal answered and logged all the same."""
        for answer, failures in ((False, 0), (RuntimeError("listener bug"), 1)):
            root = MatrixResource()
            root.putChild(b"a", _Listening(answer))
            site = FederationSite(root, reactor=self.clock, max_body_bytes=MAX_BODY)
            events = self.refuse(site, b"/a/b")
            self.assertEqual(
                len([event for event in events if event.get("log_failure") is not None]), failures
            )
            self.assertIn("Refusing a request body over", formatEvent(events[-1]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class HeadTests(SiteTestCase):
    """HEAD gets GET's status and headers (its body's length included), no body, and no
    warning from Twisted about a body returned for HEAD."""

    def exchange(self, method: bytes, path: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
        """The status line, the headers but Date, and what followed, of one answer."""
        connection = self.connect()
        connection.send(b"%s %s HTTP/1.1\r\nHost: us.example\r\n\r\n" % (method, path))
        head, _, rest = connection.transport.value().partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        headers = dict(line.split(b": ", 1) for line in lines)
        del headers[b"Date"]
        return status, headers, rest

    def test_head_like_get_without_body_or_warning(self) -> None:
        """The key server, the version endpoint and an unknown path (404): HEAD answers as
        GET does, without the body."""
        for path in (b"/_matrix/key/v2/server", b"/_matrix/federation/v1/version", b"/nope"):
            status, headers, body = self.exchange(b"GET", path)
            with capturedLogs() as events:
                head_status, head_headers, head_body = self.exchange(b"HEAD", path)
            self.assertEqual([formatEvent(event) for event in events], [], path)
            self.assertEqual(head_body, b"", path)
            self.assertEqual((head_status, head_headers), (status, headers), path)
            self.assertEqual(headers[b"Content-Length"], b"%d" % len(body), path)
            self.assertEqual(headers[b"Content-Type"], b"application/json", path)

    def test_head_refused_without_body_or_warning(self) -> None:
        """HEAD on the invite endpoint (PUT only): 405 with Allow, the length of its JSON
        ``M_UNRECOGNIZED`` body, no body, no warning."""
        path = self.s.path(2, "!room:them.example", "$event").encode()
        with capturedLogs() as events:
            status, headers, body = self.exchange(b"HEAD", path)
        self.assertEqual([formatEvent(event) for event in events], [])
        self.assertEqual((status, body), (b"HTTP/1.1 405 Method Not Allowed", b""))
        expected = b'{"errcode":"M_UNRECOGNIZED","error":"Method GET not allowed here"}'
        self.assertEqual(headers[b"Content-Length"], b"%d" % len(expected))
        self.assertEqual(headers[b"Content-Type"], b"application/json")
        self.assertEqual(headers[b"Allow"], b"PUT")

    def test_head_refused_like_get(self) -> None:
        """HEAD on the invite endpoints (PUT only) gets GET's status and headers, the length
        of GET's body included (RFC 9110 section 8.6), and no body."""
        for api_version in (1, 2):
            path = self.s.path(api_version, "!room:them.example", "$event").encode()
            status, headers, body = self.exchange(b"GET", path)
            head_status, head_headers, head_body = self.exchange(b"HEAD", path)
            self.assertEqual((head_status, head_headers), (status, headers), path)
            self.assertEqual(head_body, b"", path)
            self.assertEqual(headers[b"Content-Length"], b"%d" % len(body), path)


class HostTests(SiteTestCase):
    """The Host header (RFC 9112 section 3.2): one, with a valid value, in every HTTP/1.1
    request; at most one, valid, in HTTP/1.0; else JSON 400 ``M_UNKNOWN`` and the connection
    closed. An absolute-form target needs one too, but its value is not compared."""

    VERSION = b"GET /_matrix/federation/v1/version HTTP/1.1\r\n"

    def answer(self, request: bytes) -> Connection:
        """A connection that was sent ``request`` (and then, on HTTP/1.1, a valid one)."""
        connection = self.connect()
        connection.send(request)
        if b" HTTP/1.1\r\n" in request:
            connection.send(self.VERSION + b"Host: us.example\r\n\r\n")
        return connection

    def assertRefused(self, request: bytes, error: str) -> None:
        connection = self.answer(request)
        self.assertOnlyAnswer(connection, 400, "M_UNKNOWN")
        ((_, _, body),) = connection.responses()
        self.assertEqual(body["error"], error, request)
        self.assertFalse(connection.protocol._handlingRequest, request)

    def test_http_1_1_without_host_refused(self) -> None:
        """An HTTP/1.1 request without a Host line, in origin-form or absolute-form, with or
        without a body: 400 ``M_UNKNOWN``, nothing served, the next request not read."""
        self.assertRefused(self.VERSION + b"\r\n", "Missing Host header")
        self.assertRefused(
            b"GET http://us.example/_matrix/federation/v1/version HTTP/1.1\r\n\r\n",
            "Missing Host header",
        )
        request = self.valid_request()
        self.assertRefused(request.replace(b"Host: us.example\r\n", b""), "Missing Host header")
        self.assertEqual(self.s.store.invites, {})

    def test_repeated_host_refused(self) -> None:
        """Two Host lines, equal or not, in HTTP/1.1 or HTTP/1.0: 400 ``M_UNKNOWN``."""
        for version in (b"1.1", b"1.0"):
            for second in (b"us.example", b"other.example"):
                self.assertRefused(
                    b"GET /_matrix/federation/v1/version HTTP/%s\r\nHost: us.example\r\n"
                    b"Host: %s\r\n\r\n" % (version, second),
                    "More than one Host header",
                )

    def test_invalid_host_refused(self) -> None:
        """A Host value that is not ``uri-host [ ":" port ]`` (RFC 3986): 400 ``M_UNKNOWN``,
        in HTTP/1.1 and HTTP/1.0, and with an absolute-form target."""
        for value in (
            b"us example",
            b"us.example, other.example",
            b"us.example/path",
            b"user@us.example",
            b"us.example:84a8",
            b"us.example:8448:1",
            b"[::1",
            b"[::1]x",
            b"[zz::1]",
            b"us%2.example",
            b"us.\x7fexample",
            b"us.\xc3\xa9xample",
        ):
            for start in (
                self.VERSION,
                self.VERSION.replace(b"HTTP/1.1", b"HTTP/1.0"),
                b"GET http://us.example/_matrix/federation/v1/version HTTP/1.1\r\n",
            ):
                self.assertRefused(start + b"Host: %s\r\n\r\n" % value, "Invalid Host header")

    def test_valid_hosts_served(self) -> None:
        """Names, IPv4 and IPv6 literals (an IPvFuture too), with or without a port, an empty
        port or an empty value (a target with no authority), sub-delims and percent-encoding
        in a name: served, the connection kept."""
        connection = self.connect()
        values = (
            b"us.example",
            b"US.Example:8448",
            b"127.0.0.1",
            b"[::1]:8448",
            b"[2001:db8::7]",
            b"[v1.fe80::a+en1]",
            b"us.example:",
            b"",
            b"a_b~c-d!$&'()*+,;=e%41",
        )
        for value in values:
            connection.send(self.VERSION + b"Host: %s\r\n\r\n" % value)
        self.assertEqual([status for status, _, _ in connection.responses()], [200] * len(values))
        self.assertFalse(connection.closing)

    def test_http_1_0_without_host_served(self) -> None:
        """HTTP/1.0, where Host is optional: served without one."""
        connection = self.answer(self.VERSION.replace(b"HTTP/1.1", b"HTTP/1.0") + b"\r\n")
        self.assertEqual([status for status, _, _ in connection.responses()], [200])

    def test_absolute_form_host_value_not_compared(self) -> None:
        """An absolute-form target with a Host line naming another host: served by its path
        (the authority overrides Host, RFC 9112 section 3.2.2)."""
        connection = self.connect()
        connection.send(
            b"GET https://us.example/_matrix/federation/v1/version HTTP/1.1\r\n"
            b"Host: other.example:443\r\n\r\n"
        )
        self.assertEqual([status for status, _, _ in connection.responses()], [200])
        self.assertFalse(connection.closing)

    def test_head_without_host_refused_without_body(self) -> None:
        """HEAD without Host: the 400's headers and no body."""
        connection = self.connect()
        connection.send(b"HEAD /_matrix/federation/v1/version HTTP/1.1\r\n\r\n")
        head, _, rest = connection.transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
        self.assertEqual(rest, b"")
        self.assertTrue(connection.closing)


class HeadRefusalTests(SiteTestCase):
    """The site's own refusals (413, 408, 400) of a HEAD request: GET's status line and
    headers, the length of its JSON body included, and no body (RFC 9110 section 9.3.2)."""

    def refusal(
        self, method: bytes, rest: bytes, wait: float = 0
    ) -> tuple[bytes, dict[bytes, bytes], bytes, bool]:
        """The status line, headers and what followed of the answer to ``method /x`` followed
        by ``rest``, ``wait`` seconds later; and whether the connection is closing."""
        connection = self.connect()
        connection.send(method + b" /_matrix/key/v2/server HTTP/1.1\r\nHost: x\r\n" + rest)
        self.clock.advance(wait)
        head, _, body = connection.transport.value().partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        return status, dict(line.split(b": ", 1) for line in lines), body, connection.closing

    def test_head_refused_without_body(self) -> None:
        """A HEAD request with a body over the cap (413 ``M_TOO_LARGE``), one not received
        within the deadline (408 ``M_UNKNOWN``) and one with a bad Content-Length (400
        ``M_UNKNOWN``): GET's answer without its body, and the connection closed."""
        for rest, wait, status, errcode in (
            (b"Content-Length: 5000\r\n\r\n", 0, 413, "M_TOO_LARGE"),
            (b"X-Slow: 1\r\n", 30, 408, "M_UNKNOWN"),
            (b"Content-Length: 1x\r\n\r\n", 0, 400, "M_UNKNOWN"),
        ):
            get_status, get_headers, get_body, _ = self.refusal(b"GET", rest, wait)
            self.assertTrue(get_status.startswith(b"HTTP/1.1 %d " % status), get_status)
            self.assertEqual(json.loads(get_body)["errcode"], errcode)
            head_status, head_headers, head_body, closing = self.refusal(b"HEAD", rest, wait)
            self.assertEqual((head_status, head_headers), (get_status, get_headers), status)
            self.assertEqual(head_headers[b"Content-Length"], b"%d" % len(get_body))
            self.assertEqual(head_body, b"", status)
            self.assertTrue(closing)

    def test_head_refused_before_its_request_line_without_body(self) -> None:
        """A HEAD whose request line is over 16 KiB (414, whole or still arriving, after an
        answered request or not) or not complete within the deadline (408): GET's answer
        without its body, told from the line's start, and the connection closed."""
        version = b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: x\r\n\r\n"
        cases = []
        for earlier in (b"", version, b"\r\n"):
            for end in (b" HTTP/1.1\r\nHost: x\r\n\r\n", b""):
                cases.append((earlier, b" /" + b"a" * 17_000 + end, 0, 414))
            cases.append((earlier, b" /_matrix/federation/v1/ver", 30, 408))
        for earlier, rest, wait, status in cases:
            answers = []
            for method in (b"GET", b"HEAD"):
                connection = self.connect()
                connection.send(earlier + method + rest)
                self.clock.advance(wait)
                data = connection.transport.value()
                if earlier == version:
                    # The version's answer first, the refusal after it.
                    data = data[data.index(b"HTTP/1.1 %d " % status) :]
                head, _, body = data.partition(b"\r\n\r\n")
                status_line, *lines = head.split(b"\r\n")
                headers = dict(line.split(b": ", 1) for line in lines)
                headers.pop(b"Date", None)
                answers.append((status_line, headers, body, connection.closing))
            (
                (get_status, get_headers, get_body, _),
                (head_status, head_headers, head_body, closing),
            ) = answers
            self.assertTrue(get_status.startswith(b"HTTP/1.1 %d " % status), get_status)
            self.assertEqual(get_headers[b"Content-Length"], b"%d" % len(get_body))
            self.assertEqual((head_status, head_headers), (get_status, get_headers), status)
            self.assertEqual(head_body, b"", (earlier, status))
            self.assertTrue(closing)


class LocalAddressTests(SiteTestCase):
    """The connection's local address is asked of the transport once, not per request."""

    def test_one_local_address_lookup_per_connection(self) -> None:
        """Two invites on one keep-alive connection: one lookup of the local address,
        and each request still sees it."""
        connection = self.connect()
        real = connection.transport.getHost
        lookups: list[object] = []
        hosts: list[object] = []

        def get_host() -> Any:
            lookups.append(1)
            return real()

        connection.transport.getHost = get_host  # type: ignore[method-assign]
        original = Request.process

        def process(request: Request) -> Any:
            if request.channel is connection.protocol:  # not the origin's key server
                hosts.append(request.getHost())
            return original(request)

        self.patch(Request, "process", process)
        connection.send(self.valid_request(depth=1))
        connection.send(self.valid_request(depth=2))
        self.assertEqual([status for status, _, _ in connection.responses()], [200, 200])
        self.assertEqual(lookups, [1])
        self.assertEqual(hosts, [real(), real()])


class SiteSettingsTests(SiteTestCase):
    def test_hand_built_site_has_the_documented_defaults(self) -> None:
        """A FederationSite(root, reactor=...) built by hand has the defaults (README): a body
        cap of 1 MiB, a 30 s request deadline, a 60 s idle timeout; a Content-Length of
        1 MiB + 1 is refused 413 before the body, one of 1 MiB is not."""
        site = FederationSite(self.s.root, reactor=self.clock)
        self.assertEqual(
            (site.max_body_bytes, site.request_timeout, site.timeOut), (1_048_576, 30.0, 60.0)
        )
        head = b"PUT /_matrix/x HTTP/1.1\r\nHost: us.example\r\nContent-Length: %d\r\n\r\n"
        refused = self.connect(site)
        refused.send(head % (1_048_576 + 1))
        self.assertOnlyAnswer(refused, 413, "M_TOO_LARGE")
        kept = self.connect(site)
        kept.send(head % 1_048_576)
        self.assertEqual(kept.responses(), [])
        self.assertFalse(kept.closing)

    def test_limits_checked(self) -> None:
        """FederationSite refuses a negative body cap and a request deadline or idle timeout
        that is not positive; a cap of 0 (no body) and limits of a second are accepted."""
        for kwargs in ({"max_body_bytes": -1}, {"request_timeout": 0}, {"idle_timeout": 0}):
            with self.assertRaises(ValueError):
                FederationSite(self.s.root, reactor=self.clock, **kwargs)
        site = FederationSite(
            self.s.root, reactor=self.clock, max_body_bytes=0, request_timeout=1, idle_timeout=1
        )
        self.assertEqual((site.max_body_bytes, site.request_timeout, site.timeOut), (0, 1, 1))

    def test_own_refusals_have_standard_status_lines(self) -> None:
        """The site's own refusals carry the standard reason phrases (RFC 9110, section 15)."""
        for status, reason in (
            (400, b"Bad Request"),
            (408, b"Request Timeout"),
            (413, b"Content Too Large"),
            (414, b"URI Too Long"),
        ):
            raw = _raw_error_response(MatrixError(status, Codes.UNKNOWN, "x"))
            self.assertTrue(raw.startswith(b"HTTP/1.1 %d %s\r\n" % (status, reason)), raw)


class ProtocolNegotiationTests(SynchronousTestCase):
    """The protocols a TLS listener offers in ALPN: HTTP/1.1 only, the one the site speaks."""

    def test_only_http_1_1_offered(self) -> None:
        """With h2 importable (``H2_ENABLED``), Twisted's Site offers b"h2" too, and a client
        preferring it (curl, Go) then speaks HTTP/2 to an HTTP/1.1 parser; ours offers only
        b"http/1.1"."""
        self.patch(twisted_http, "H2_ENABLED", True)
        site = FederationSite(MatrixResource(), reactor=MemoryReactorClock())
        self.assertEqual(site.acceptableProtocols(), [b"http/1.1"])


class HeldStoreTestCase(SiteTestCase):
    """Invites are held in the store until the test fires their Deferred (``self.held``)."""

    def setUp(self) -> None:
        super().setUp()
        #: One Deferred per invite handed to the store, fired by the test.
        self.held: list[Deferred[None]] = []
        store_invite = self.s.store.store_invite

        def held_store_invite(record: Any) -> Deferred[Any]:
            held: Deferred[None] = Deferred()
            self.held.append(held)
            return held.addCallback(lambda _: store_invite(record))

        self.patch(self.s.store, "store_invite", held_store_invite)

    def version_request(self) -> bytes:
        return b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: us.example\r\n\r\n"


class PipelinedDeadlineTests(HeldStoreTestCase):
    """A request pipelined behind one still being handled must still arrive whole within
    ``request_timeout`` (30 s) of its own first byte; its 408 follows the earlier answer."""

    def assertAnswered(self, connection: Any, statuses: list[int]) -> None:
        """The answers are ``statuses``, the last a 408 ``M_UNKNOWN`` closing the connection."""
        responses = connection.responses()
        self.assertEqual([status for status, _, _ in responses], statuses)
        _, headers, body = responses[-1]
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(body["errcode"], "M_UNKNOWN")
        self.assertEqual(body["error"], "The request was not received within 30 seconds")
        self.assertTrue(connection.closing, "the connection is closed")

    def test_trickled_behind_request_in_progress(self) -> None:
        """An invite held 25 s in the store, a second request trickled from 1 s on: the 408
        comes at 31 s (30 s after the second request's first byte), not 30 s after the first
        answer."""
        connection = self.connect()
        started = self.clock.seconds()
        connection.send(self.valid_request())
        self.clock.advance(1)
        second = self.version_request()
        for index in range(len(second)):
            connection.send(second[index : index + 1])
            self.clock.advance(1)
            if self.clock.seconds() - started == 25:
                self.held[0].callback(None)
                self.assertEqual([status for status, _, _ in connection.responses()], [200])
            if connection.closing:
                break
        self.assertAlmostEqual(self.clock.seconds() - started, 31, places=6)
        self.assertAnswered(connection, [200, 408])
        connection.close()
        self.assertEqual(self.clock.getDelayedCalls(), [], "no timer left behind")

    def test_same_packet_start_behind_request_in_progress(self) -> None:
        """The start of a second request in the packet that ended an invite then held 20 s:
        408 at 30 s from that packet, not 30 s after the invite's answer."""
        connection = self.connect()
        connection.send(self.valid_request() + self.version_request()[:10])
        self.clock.advance(20)
        self.held[0].callback(None)
        self.assertEqual([status for status, _, _ in connection.responses()], [200])
        self.clock.advance(9.999)
        self.assertFalse(connection.closing)
        self.clock.advance(0.001)
        self.assertAnswered(connection, [200, 408])

    def test_deadline_passes_while_earlier_request_handled(self) -> None:
        """A second request's deadline passes while the invite before it is held: its 408
        comes right after the invite's answer (answers go in order), not 30 s later."""
        connection = self.connect()
        connection.send(self.valid_request())
        self.clock.advance(1)
        connection.send(self.version_request()[:10])
        self.clock.advance(39)
        self.assertEqual(connection.responses(), [])
        self.assertFalse(connection.closing)
        self.held[0].callback(None)
        self.assertAnswered(connection, [200, 408])

    def test_completed_after_its_deadline_refused(self) -> None:
        """A second request completed after its deadline, while the invite before it was
        held: 408 after the invite's answer, and it is not served."""
        connection = self.connect()
        connection.send(self.valid_request(depth=1))
        self.clock.advance(1)
        second = self.valid_request(depth=2)
        connection.send(second[:10])
        self.clock.advance(34)
        connection.send(second[10:])
        self.clock.advance(5)
        self.held[0].callback(None)
        self.assertAnswered(connection, [200, 408])
        self.assertEqual(len(self.held), 1, "the late invite was not handled")

    def test_third_request_keeps_the_deadline_it_was_held_with(self) -> None:
        """An invite, then (from 1 s) a second invite whole and the start of a third request,
        both held; the first answered at 20 s, the second held until 35 s: the third gets its
        408 then (its deadline, from 1 s at the latest, passed at 31 s)."""
        connection = self.connect()
        connection.send(self.valid_request(depth=1))
        self.clock.advance(1)
        connection.send(self.valid_request(depth=2) + self.version_request()[:10])
        self.clock.advance(19)
        self.held[0].callback(None)
        self.assertEqual(len(self.held), 2)
        self.clock.advance(15)
        self.assertEqual([status for status, _, _ in connection.responses()], [200])
        self.held[1].callback(None)
        self.assertAnswered(connection, [200, 200, 408])

    def test_late_request_with_body_and_one_behind_served(self) -> None:
        """An invite held 40 s; behind it, from 1 s, a second invite (with a body) and a version
        request, both whole long before their deadline (31 s): both served, in order (the late
        request is served when it proved complete without bytes received after its deadline)."""
        connection = self.connect()
        connection.send(self.valid_request(depth=1))
        self.clock.advance(1)
        connection.send(self.valid_request(depth=2) + self.version_request())
        self.clock.advance(39)
        self.held[0].callback(None)
        self.assertEqual(len(self.held), 2, "the second invite was handled")
        self.held[1].callback(None)
        self.assertEqual([status for status, _, _ in connection.responses()], [200, 200, 200])
        self.assertFalse(connection.closing)

    def test_third_request_completed_after_the_deadline_refused(self) -> None:
        """Behind an invite held 40 s: from 1 s a second invite whole and the start of a
        version request, whose rest arrives at 35 s (after the deadline they share, 31 s):
        the second invite is served, the version request answered 408 and not served."""
        connection = self.connect()
        connection.send(self.valid_request(depth=1))
        self.clock.advance(1)
        third = self.version_request()
        connection.send(self.valid_request(depth=2) + third[:10])
        self.clock.advance(34)
        connection.send(third[10:])
        self.clock.advance(5)
        self.held[0].callback(None)
        self.assertEqual(len(self.held), 2)
        self.held[1].callback(None)
        self.assertAnswered(connection, [200, 200, 408])

    def test_received_in_time_served_after_long_handling(self) -> None:
        """Requests that arrived whole within their deadline behind an invite held 45 s are
        served, however long they waited: one sent at once, one in two parts 19 s apart."""
        connection = self.connect()
        connection.send(self.valid_request())
        self.clock.advance(1)
        connection.send(self.version_request())
        second = self.version_request()
        connection.send(second[:10])
        self.clock.advance(19)
        connection.send(second[10:])
        self.clock.advance(25)
        self.held[0].callback(None)
        self.assertEqual([status for status, _, _ in connection.responses()], [200, 200, 200])
        self.assertFalse(connection.closing)
        self.assertEqual(self.site.requests_in_progress(), 0)
        connection.close()
        self.assertEqual(self.clock.getDelayedCalls(), [], "no timer left behind")

    def test_served_request_leaves_no_deadline(self) -> None:
        """A version request whole behind an invite held 4 s is served when the invite is
        answered; its deadline (from 1 s) goes with it: no unrequested 408 at 31 s on the then
        idle keep-alive connection."""
        connection = self.connect()
        connection.send(self.valid_request())
        self.clock.advance(1)
        connection.send(self.version_request())
        self.clock.advance(4)
        self.held[0].callback(None)
        self.assertEqual([status for status, _, _ in connection.responses()], [200, 200])
        self.clock.advance(40)
        self.assertEqual([status for status, _, _ in connection.responses()], [200, 200])
        self.assertFalse(connection.closing)


class DrainTests(HeldStoreTestCase):
    """``FederationSite.drain``: requests in progress are answered, everything else is closed."""

    def grace_calls(self) -> list[Any]:
        return [call for call in self.clock.getDelayedCalls() if call.func == self.site._abandon]

    def test_request_in_progress_answered_then_connection_closed(self) -> None:
        """An invite held in the store when the drain begins is answered 200 with
        ``Connection: close``; the drain fires (0 abandoned) once its connection has closed,
        and an idle keep-alive connection is closed at once."""
        idle = self.connect()
        idle.send(self.version_request())
        self.assertEqual([status for status, _, _ in idle.responses()], [200])
        busy = self.connect()
        busy.send(self.valid_request())
        self.assertEqual((busy.responses(), len(self.held)), ([], 1))
        self.assertEqual(self.site.requests_in_progress(), 1)

        drained = self.site.drain(10)

        self.assertNoResult(drained)
        self.assertTrue(idle.closing, "the idle connection is closed")
        self.assertFalse(busy.closing, "the busy connection is kept")
        self.assertEqual(busy.responses(), [])
        self.assertEqual(len(self.grace_calls()), 1)
        self.held[0].callback(None)
        ((status, headers, body),) = busy.responses()
        self.assertEqual((status, list(body)), (200, ["event"]))
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(busy.closing, "closed once answered")
        idle.close()
        self.assertNoResult(drained)  # the answer is not out until its connection has closed
        busy.close()
        self.assertEqual(self.successResultOf(drained), DrainResult(1, 0, 0))
        self.assertEqual(self.grace_calls(), [])
        self.assertEqual(self.site.requests_in_progress(), 0)

    def test_requests_arriving_when_drain_begins_are_answered(self) -> None:
        """Requests partly received when the drain begins (request line, or headers, still
        arriving) are received, handled and answered with ``Connection: close``; a request
        the peer sends during the drain behind one in progress is neither handled nor
        answered, and counted as dropped."""
        line = self.connect()
        line_data = self.valid_request(depth=1)
        line.send(line_data[:40])
        headers = self.connect()
        headers_data = self.valid_request(depth=2)
        split = headers_data.index(b"\r\n") + 10
        headers.send(headers_data[:split])
        busy = self.connect()
        busy.send(self.valid_request(depth=3))
        self.assertEqual(self.site.requests_in_progress(), 3)

        drained = self.site.drain(10)

        self.assertFalse(line.closing or headers.closing)
        line.send(line_data[40:])
        headers.send(headers_data[split:])
        self.assertEqual(len(self.held), 3)
        busy.send(self.valid_request(depth=4))  # during the drain: not taken, counted dropped
        for held in self.held:
            held.callback(None)
        for connection in (line, headers, busy):
            ((status, response_headers, _),) = connection.responses()
            self.assertEqual((status, response_headers[b"connection"]), (200, b"close"))
            self.assertTrue(connection.closing)
        self.assertEqual((len(self.held), len(self.s.store.invites)), (3, 3))
        for connection in (line, headers):
            connection.close()
        self.assertNoResult(drained)
        busy.close()
        self.assertEqual(self.successResultOf(drained), DrainResult(3, 0, 1))

    def test_empty_lines_after_a_request_are_no_request(self) -> None:
        """Empty lines after an answered request (which a server ignores, RFC 9112 section
        2.2) start no deadline: no 408 when it would pass, and a drain closes the connection
        as idle at once."""
        connections = []
        for packets in ([self.version_request() + b"\r\n"], [self.version_request(), b"\r\n"]):
            connection = self.connect()
            for packet in packets:
                connection.send(packet)
            connections.append(connection)
        self.assertEqual(self.site.requests_in_progress(), 0)
        self.clock.advance(31)
        for connection in connections:
            self.assertEqual([status for status, _, _ in connection.responses()], [200])
            self.assertFalse(connection.closing)
        drained = self.site.drain(10)
        self.assertEqual(self.successResultOf(drained), DrainResult(0, 0, 0))
        self.assertTrue(all(connection.closing for connection in connections))

    def test_grace_period_expires(self) -> None:
        """A request still unanswered when the grace period ends: its connection is aborted
        unanswered at exactly ``grace_period`` seconds, and the drain counts it abandoned."""
        busy = self.connect()
        busy.send(self.valid_request())
        drained = self.site.drain(10)
        self.clock.advance(9.999)
        self.assertNoResult(drained)
        self.assertFalse(busy.transport.disconnected)
        self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(drained), DrainResult(0, 1, 0))
        self.assertTrue(busy.transport.disconnected, "aborted")
        busy.close()
        self.assertEqual(busy.responses(), [])

    def test_nothing_in_progress(self) -> None:
        """With no request in progress the drain fires at once with nothing counted; idle
        connections are closed, and a request sent on one afterwards is not read."""
        idle = self.connect()
        idle.send(self.version_request())
        drained = self.site.drain(10)
        self.assertEqual(self.successResultOf(drained), DrainResult(0, 0, 0))
        self.assertTrue(idle.closing)
        idle.send(self.version_request())
        self.assertEqual([status for status, _, _ in idle.responses()], [200])
        self.assertEqual(self.grace_calls(), [])

    def test_refused_connection_still_closing_not_in_progress(self) -> None:
        """A request refused here (400, no Host) whose connection has not closed yet (the
        peer has not read the answer) is no request in progress: not counted, and a drain
        then fires at once with nothing counted."""
        connection = self.connect()
        connection.send(b"GET /_matrix/federation/v1/version HTTP/1.1\r\n\r\n")
        ((status, _, body),) = connection.responses()
        self.assertEqual((status, body["errcode"]), (400, "M_UNKNOWN"))
        self.assertTrue(connection.closing)
        self.assertEqual(self.site.requests_in_progress(), 0)
        self.assertEqual(self.successResultOf(self.site.drain(10)), DrainResult(0, 0, 0))
        self.assertEqual(self.grace_calls(), [])

    def test_no_new_connection_while_draining(self) -> None:
        """Once the drain has begun, a new connection is aborted as soon as it is made, also
        behind TLS; a second drain is refused."""
        address = IPv4Address("TCP", "203.0.113.9", 40001)
        self.assertIsInstance(self.site.buildProtocol(address), _LimitedChannel)
        self.site.drain(10)
        directory = self.mktemp()
        os.makedirs(directory)
        key, cert = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
        write_self_signed_certificate("localhost", key, cert)
        with open(key, "rb") as key_file, open(cert, "rb") as cert_file:
            pem = key_file.read() + cert_file.read()
        tls = ssl.PrivateCertificate.loadPEM(pem).options()
        for factory in (self.site, TLSMemoryBIOFactory(tls, False, self.site)):
            transport = StringTransport()
            protocol = factory.buildProtocol(address)
            protocol.makeConnection(transport)
            self.assertTrue(transport.disconnected or transport.disconnecting)
        self.assertEqual(self.site.requests_in_progress(), 0)
        self.assertRaises(RuntimeError, self.site.drain, 10)

    def test_idle_connection_that_does_not_close_is_aborted(self) -> None:
        """An idle connection closed by the drain whose close does not complete (its peer
        does not read: the transport here never finishes closing) is aborted ``abortTimeout``
        (15 s) later; one that closes meanwhile leaves no timer behind."""
        stuck, closes = self.connect(), self.connect()
        stuck.send(self.version_request())
        self.assertEqual(self.successResultOf(self.site.drain(10)), DrainResult(0, 0, 0))
        self.assertTrue(stuck.closing and closes.closing)
        self.clock.advance(14.999)
        self.assertFalse(stuck.transport.disconnected or closes.transport.disconnected)
        closes.close()
        self.clock.advance(0.001)
        self.assertTrue(stuck.transport.disconnected, "aborted")
        self.assertFalse(closes.transport.disconnected)
        stuck.close()
        self.assertEqual(self.clock.getDelayedCalls(), [], "no timer left behind")

    def test_finished_answer_not_sent_at_the_deadline_is_abandoned(self) -> None:
        """An answer finished within the grace period but not written out by its end (the
        peer does not read: the transport here never finishes closing) is abandoned, not
        finished: the abort discards it. Once finished, Twisted no longer lists its request,
        so it is no longer in progress; the connection still open is what counts. The request
        pipelined behind it is counted dropped once, when the answer finished."""
        busy = self.connect()
        busy.send(self.valid_request() + self.version_request())
        drained = self.site.drain(10)
        self.held[0].callback(None)
        ((status, headers, _),) = busy.responses()
        self.assertEqual((status, headers[b"connection"]), (200, b"close"))
        self.assertTrue(busy.closing)
        self.assertEqual(self.site.requests_in_progress(), 0)
        self.clock.advance(9.999)
        self.assertNoResult(drained)
        self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(drained), DrainResult(0, 1, 1))
        self.assertTrue(busy.transport.disconnected, "aborted")

    def test_pipelined_requests_dropped_and_counted(self) -> None:
        """Requests received behind an invite in progress when the drain begins, which Twisted
        holds unparsed: the invite is answered with ``Connection: close``, and they are neither
        handled nor answered, but each is counted dropped (a GET, a second invite, a chunked
        PUT, and the start of a fourth request); empty lines are no request."""
        chunked = (
            b"PUT /_matrix/nothing HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
        )
        busy = self.connect()
        busy.send(self.valid_request(depth=1) + self.version_request())
        busy.send(b"\r\n" + self.valid_request(depth=2) + chunked + b"\r\n")
        busy.send(self.version_request()[:10])
        blank = self.connect()
        blank.send(self.valid_request(depth=3) + b"\r\n\r\n")
        self.assertEqual((self.site.requests_in_progress(), len(self.held)), (2, 2))

        drained = self.site.drain(10)

        for held in self.held:
            held.callback(None)
        for connection in (busy, blank):
            ((status, headers, _),) = connection.responses()
            self.assertEqual((status, headers[b"connection"]), (200, b"close"))
            self.assertTrue(connection.closing)
            connection.close()
        self.assertEqual((len(self.held), len(self.s.store.invites)), (2, 2))
        self.assertEqual(self.successResultOf(drained), DrainResult(2, 0, 4))

    def test_pipelined_request_dropped_at_the_deadline(self) -> None:
        """A request pipelined behind an invite still held when the grace period ends is
        dropped with it when the connection is aborted: 1 abandoned, 1 dropped."""
        busy = self.connect()
        busy.send(self.valid_request())
        busy.send(self.version_request())
        drained = self.site.drain(10)
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(drained), DrainResult(0, 1, 1))
        self.assertTrue(busy.transport.disconnected, "aborted")
        self.assertEqual(busy.responses(), [])

    def test_requests_behind_a_closing_request_not_counted(self) -> None:
        """Bytes behind a request that asked for the close (``Connection: close``) or spoke
        HTTP/1.0 would be dropped without a drain (a client sends nothing after either, RFC
        9112 section 9.6): not counted as dropped by the drain, also when that request's
        headers were still arriving when the drain began."""
        closing_requests = []
        for depth in (1, 2):
            room_version, event = self.s.invite(extra={"depth": depth})
            body = self.s.v2_body(room_version, event)
            path = self.s.path(2, event["room_id"], event_id_of(room_version, event))
            header = _sign_request_lax(self.s.their_key, THEM, "PUT", path, body)
            closing_requests.append(
                put_request(path, json.dumps(body).encode(), header, b"Connection: close\r\n")
                + self.version_request()
            )
        closing = self.connect()
        closing.send(closing_requests[0])
        old = self.connect()
        old.send(
            self.valid_request(depth=3).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
            + self.version_request()
        )
        arriving = self.connect()
        split = closing_requests[1].index(b"\r\n") + 2  # the request line, no header
        arriving.send(closing_requests[1][:split])
        self.assertEqual((len(self.held), self.site.requests_in_progress()), (2, 3))
        self.assertEqual(len(arriving.protocol.requests), 1)
        drained = self.site.drain(10)
        arriving.send(closing_requests[1][split:])
        for held in self.held:
            held.callback(None)
        for connection in (closing, old, arriving):
            self.assertEqual([status for status, _, _ in connection.responses()], [200])
            self.assertTrue(connection.closing)
            connection.close()
        self.assertEqual(len(self.s.store.invites), 3)
        self.assertEqual(self.successResultOf(drained), DrainResult(3, 0, 0))


class DrainCountTests(HeldStoreTestCase):
    """What the drain counts dropped: only requests held behind one being handled, and
    counting never holds up an answer, a close, an abort or the drain itself."""

    def test_negative_chunk_size_pipelined(self) -> None:
        """A pipelined chunked request with chunk size ``-6``: the invite before it is
        answered and its connection closed, the request counted dropped (it froze the reactor
        in an endless count)."""
        busy = self.connect()
        busy.send(self.valid_request() + NEGATIVE_CHUNK)
        drained = self.site.drain(10)
        with time_limit(5):
            self.held[0].callback(None)
        self.assertEqual([status for status, _, _ in busy.responses()], [200])
        self.assertTrue(busy.closing)
        busy.close()
        self.assertEqual(self.successResultOf(drained), DrainResult(1, 0, 1))

    def test_huge_content_length_pipelined(self) -> None:
        """A pipelined request with a Content-Length of 5000 digits (too many for ``int()``):
        counted dropped, and the invite before it answered, its connection then closed."""
        busy = self.connect()
        busy.send(self.valid_request() + HUGE_CONTENT_LENGTH)
        drained = self.site.drain(10)
        self.held[0].callback(None)
        self.assertEqual([status for status, _, _ in busy.responses()], [200])
        self.assertTrue(busy.closing, "closed once answered")
        busy.close()
        self.assertEqual(self.successResultOf(drained), DrainResult(1, 0, 1))

    def test_huge_content_length_pipelined_at_grace_end(self) -> None:
        """The same request behind an invite still held at the end of the grace period:
        the connection is aborted and the drain fires, 1 abandoned, 1 dropped."""
        busy = self.connect()
        busy.send(self.valid_request() + HUGE_CONTENT_LENGTH)
        drained = self.site.drain(10)
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(drained), DrainResult(0, 1, 1))
        self.assertTrue(busy.transport.disconnected, "aborted")

    def test_count_failure_logged_and_counted_one(self) -> None:
        """Counting that fails, when an answer finishes or at the grace period's end: logged,
        counted as one request dropped, and the connection still closed (or aborted) and the
        drain fired."""

        def fail(data: bytes) -> int:
            raise RuntimeError("cannot count")

        self.patch(site_module, "_count_requests", fail)
        answered, held = self.connect(), self.connect()
        answered.send(self.valid_request(depth=1) + self.version_request())
        held.send(self.valid_request(depth=2) + self.version_request())
        drained = self.site.drain(10)
        with capturedLogs() as events:
            self.held[0].callback(None)
            self.assertEqual([status for status, _, _ in answered.responses()], [200])
            self.assertTrue(answered.closing, "closed once answered")
            answered.close()
            self.clock.advance(10)
        self.assertEqual(self.successResultOf(drained), DrainResult(1, 1, 2))
        self.assertTrue(held.transport.disconnected, "aborted")
        self.assertEqual(
            [
                formatEvent(event)
                for event in events
                if event["log_namespace"] == "federation_invite.web.site"
            ],
            ["Could not count the requests pipelined on a draining connection"] * 2,
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_request_arriving_at_grace_end_not_counted_dropped(self) -> None:
        """Requests whose header line is still arriving at the end of the grace period, on a
        new connection and after an answered request, are abandoned; their partial lines are
        not second requests, dropped."""
        data = self.valid_request()
        fresh, kept_alive = self.connect(), self.connect()
        kept_alive.send(self.version_request())
        for connection in (fresh, kept_alive):
            connection.send(data[: data.index(b"\r\n") + 10])
        drained = self.site.drain(10)
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(drained), DrainResult(0, 2, 0))

    def test_refused_during_drain_not_counted_dropped(self) -> None:
        """A request refused (413) during the drain, the connection not closed by the end of
        the grace period: abandoned, and what followed its headers (its body, refused
        unread) is no request dropped."""
        connection = self.connect()
        connection.send(b"PUT /x HTTP/1.1\r\nHost: x\r\n")
        drained = self.site.drain(10)
        connection.send(b"Content-Length: 99999\r\n\r\n" + self.version_request())
        self.assertEqual([status for status, _, _ in connection.responses()], [413])
        self.assertTrue(connection.closing)
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(drained), DrainResult(0, 1, 0))

    def test_rest_of_the_packet_of_a_request_answered_at_once_counted(self) -> None:
        """Requests behind one answered within the packet that ended it (held in the line
        buffer, not yet where Twisted holds what arrives during handling) are counted."""
        connection = self.connect()
        request = self.version_request()
        connection.send(request[:20])
        drained = self.site.drain(10)
        connection.send(request[20:] + request + request[:5])
        self.assertEqual([status for status, _, _ in connection.responses()], [200])
        self.assertTrue(connection.closing)
        connection.close()
        self.assertEqual(self.successResultOf(drained), DrainResult(1, 0, 2))


class CountRequestsTests(SynchronousTestCase):
    """``_count_requests``: how many requests begin in bytes held unparsed behind another."""

    def test_counts(self) -> None:
        get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        put = b"PUT /a HTTP/1.1\r\nHost: x\r\ncontent-length: 5\r\n\r\n\r\n\r\nx"
        chunked = (
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"
            b"A\r\n0123456789\r\n1;a=b\r\n\r\r\n0\r\nT: 1\r\nU: 2\r\n\r\n"
        )
        cases = [
            (b"", 0),
            (b"\r\n\r\n\n", 0),
            (get, 1),
            (b"\r\n" + get + b"\r\n" + get, 2),
            (put + get, 2),
            (chunked + get + b"\r\n", 2),
            (get + b"G", 2),
            (put[:-1], 1),  # its body incomplete
            (chunked[:-2] + get, 1),  # its trailer section unfinished: the rest is in it
            (b"PUT /a HTTP/1.1\r\nContent-Length: x\r\n\r\n" + get, 1),  # malformed
            (b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" + get, 1),
        ]
        for data, count in cases:
            self.assertEqual(_count_requests(data), count, data)

    def test_chunk_data_stepped_over_by_its_size(self) -> None:
        """A chunk's data is stepped over by its size, even when it holds CRLF CRLF, and a
        field line after Transfer-Encoding: chunked does not undo it: the request behind
        counts once (RFC 9112, section 7.1)."""
        get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        empty_lines = (
            b"PUT /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\n\r\n\r\n\r\n0\r\n\r\n"
        )
        self.assertEqual(_count_requests(empty_lines + get), 2)
        field_after = (
            b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: x\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        self.assertEqual(_count_requests(field_after + get), 2)

    def test_only_transfer_encoding_makes_a_body_chunked(self) -> None:
        """A request with another field valued chunked (X-Note) has no body: the request
        behind it counts."""
        get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        self.assertEqual(_count_requests(b"GET /b HTTP/1.1\r\nX-Note: chunked\r\n\r\n" + get), 2)

    def test_unfinished_trailer_section_at_the_end_counts_one(self) -> None:
        """Data ending in an unfinished trailer section: one request, and the count ends."""
        data = b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: 1"
        with time_limit(5):
            self.assertEqual(_count_requests(data), 1)

    def test_content_length_too_long_ends_the_count(self) -> None:
        """A Content-Length of more than 18 digits (of 5000, ``int()`` raised) or of other than
        ASCII digits ends the count, that request counting one; 18 digits are read."""
        get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        for value in (b"1" * 5000, b"1" * 19, b"0" * 19, "\u0661".encode(), b"\xb2", b"1 2"):
            data = b"PUT /a HTTP/1.1\r\nContent-Length: " + value + b"\r\n\r\n" + get
            self.assertEqual(_count_requests(data), 1, value[:20])
        data = b"PUT /a HTTP/1.1\r\nContent-Length: " + b"0" * 17 + b"3\r\n\r\nabc" + get
        self.assertEqual(_count_requests(data), 2)

    def test_malformed_chunk_size_ends_the_count(self) -> None:
        """A chunk size other than 1 to 16 hex digits (a sign, a space, an underscore, ``0x``,
        17 digits, none) ends the count, that request counting one; counted in a process of
        its own with a time limit, as ``-6`` sent the count backwards for ever."""
        get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        head = b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        malformed = (b"-6", b"-1000", b"-0", b"+2", b" 5", b"5 ", b"1_0", b"0x5", b"", b";a")
        cases = [(head + size + b"\r\nxx\r\n" + get, 1) for size in (*malformed, b"1" * 17)]
        cases += [
            (head + b"f" * 16 + b"\r\nxx\r\n" + get, 1),  # a body longer than what arrived
            (head + b"0" * 15 + b"3;a=b\r\nabc\r\n0\r\n\r\n" + get, 2),
        ]
        code = (
            "import json, sys\n"
            "from federation_invite.web.site import _count_requests\n"
            "print(json.dumps([_count_requests(bytes.fromhex(a)) for a in sys.argv[1:]]))\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(federation_invite.__file__)))
        try:
            result = subprocess.run(
                [sys.executable, "-c", code, *(data.hex() for data, _ in cases)],
                capture_output=True,
                check=True,
                timeout=30,
                env={**os.environ, "PYTHONPATH": root},
            )
        except subprocess.TimeoutExpired:
            self.fail("_count_requests did not end within 30 s")
        self.assertEqual(json.loads(result.stdout), [count for _, count in cases])
