"""Tests for federation_invite.client.FederationClient against in-memory peers."""

from __future__ import annotations

import json
from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet.defer import CancelledError, fail
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.names.error import DNSNameError
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.client import (
    BackoffError,
    FederationClient,
    RemoteError,
    TransportError,
)
from federation_invite.client._client import _interpret, describe_failure
from federation_invite.client.testing import FakePeersAgent
from federation_invite.core.errors import MatrixError
from federation_invite.core.keys import verify_key_of
from federation_invite.core.xmatrix import parse_xmatrix, verify_request

from ._fakes import CannedResource, FakeHostnameResolver, FakeSRVResolver

ORIGIN = "local.example"
REMOTE = "remote.example"
PUBLIC = "93.184.216.34"
INVITE_PATH = "/_matrix/federation/v2/invite/%21room%3Aremote.example/%24ev%2Fx%2By+z"


class _Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.key = generate_signing_key("k1")
        self.peer = CannedResource(200, {"ok": True})
        self.peers = FakePeersAgent({REMOTE: self.peer})
        self.client = FederationClient(
            self.clock, ORIGIN, self.key, agent=self.peers, timeout=30.0, max_response_bytes=4096
        )

    def remote_error(self, deferred: Any) -> RemoteError:
        error = self.failureResultOf(deferred, RemoteError).value
        self.assertNotIsInstance(error, MatrixError)
        self.assertEqual(error.destination, REMOTE)
        return error

    def transport_error(self, deferred: Any, kind: type = TransportError) -> TransportError:
        error = self.failureResultOf(deferred, kind).value
        self.assertIsInstance(error, TransportError)
        return error

    def verify(self, record: dict[str, Any], content: Any) -> None:
        """Check the recorded request's X-Matrix header as a receiving server would."""
        [header] = record["headers"].getRawHeaders(b"authorization")
        auth = parse_xmatrix(header)
        self.assertEqual(auth.origin, ORIGIN)
        self.assertEqual(auth.destination, REMOTE)
        self.assertEqual(auth.key_id, "ed25519:k1")
        verify_request(
            auth,
            verify_key_of(self.key),
            record["method"].decode(),
            record["uri"].decode(),
            content,
            REMOTE,
        )


class SignedRequestTests(_Base):
    def test_get_signed_without_content(self) -> None:
        """GET carries an X-Matrix header over {method, uri, origin, destination} that verifies."""
        result = self.successResultOf(
            self.client.get_json(REMOTE, "/_matrix/federation/v1/version")
        )
        self.assertEqual(result, {"ok": True})
        [record] = self.peer.requests
        self.assertEqual(record["method"], b"GET")
        self.assertEqual(record["uri"], b"/_matrix/federation/v1/version")
        self.assertEqual(record["body"], b"")
        self.verify(record, None)

    def test_path_with_sub_delims_sent(self) -> None:
        """'!' (the lowest visible ASCII byte, an RFC 3986 sub-delim) and '~' in a path are
        sent as they are, not refused as a caller bug."""
        self.assertEqual(self.successResultOf(self.client.get_json(REMOTE, "/a!b~c")), {"ok": True})
        self.assertEqual(self.peer.requests[0]["uri"], b"/a!b~c")

    def test_put_signed_with_content(self) -> None:
        """PUT sends canonical JSON and signs it as content; the signature verifies."""
        body = {"room_version": "10", "event": {"b": 1, "a": "\u00e9"}, "invite_room_state": []}
        self.successResultOf(self.client.put_json(REMOTE, INVITE_PATH, body))
        [record] = self.peer.requests
        self.assertEqual(record["method"], b"PUT")
        self.assertEqual(
            record["body"],
            '{"event":{"a":"\u00e9","b":1},"invite_room_state":[],"room_version":"10"}'.encode(),
        )
        self.assertEqual(record["headers"].getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(json.loads(record["body"]), body)
        self.verify(record, body)

    def test_signature_rejects_other_content(self) -> None:
        """The signature covers the content: verifying against other content fails."""
        self.successResultOf(self.client.put_json(REMOTE, "/p", {"a": 1}))
        from federation_invite.core.xmatrix import XMatrixError

        self.assertRaises(XMatrixError, self.verify, self.peer.requests[0], {"a": 2})

    def test_path_sent_exactly(self) -> None:
        """The percent-encoded path reaches the peer byte for byte, and that is what is signed."""
        self.successResultOf(self.client.put_json(REMOTE, INVITE_PATH, {}))
        [record] = self.peer.requests
        self.assertEqual(record["uri"], INVITE_PATH.encode())
        self.verify(record, {})

    def test_query_args_signed(self) -> None:
        """Query args are percent-encoded (space as %20, repeated keys) and included in the signed uri."""
        self.successResultOf(
            self.client.get_json(REMOTE, "/_matrix/x", args={"a": "b c/d", "v": ["1", "2"]})
        )
        [record] = self.peer.requests
        self.assertEqual(record["uri"], b"/_matrix/x?a=b%20c%2Fd&v=1&v=2")
        self.verify(record, None)

    def test_post_signed_and_unsigned(self) -> None:
        """POST is signed by default; signed=False sends no Authorization header."""
        self.successResultOf(self.client.post_json(REMOTE, "/_matrix/key/v2/query", {"q": 1}))
        self.verify(self.peer.requests[0], {"q": 1})
        self.successResultOf(
            self.client.post_json(REMOTE, "/_matrix/key/v2/query", {"q": 1}, signed=False)
        )
        self.assertIsNone(self.peer.requests[1]["headers"].getRawHeaders(b"authorization"))

    def test_unsigned_get(self) -> None:
        """signed=False GETs carry no Authorization header."""
        self.successResultOf(self.client.get_json(REMOTE, "/_matrix/key/v2/server", signed=False))
        self.assertIsNone(self.peer.requests[0]["headers"].getRawHeaders(b"authorization"))

    def test_put_via_another_server(self) -> None:
        """put_json(via=...) connects to via but addresses and signs the request to destination."""
        via = CannedResource(200, {"ok": True})
        self.peers.add_peer("alias.example:8448", via)
        self.successResultOf(
            self.client.put_json(REMOTE, INVITE_PATH, {}, via="alias.example:8448")
        )
        self.assertEqual(self.peer.requests, [])
        [record] = via.requests
        self.verify(record, {})  # destination=REMOTE, as verify checks
        self.assertTrue(self.peers.requests[0][1].startswith(b"https://alias.example:8448/"))

    def test_put_via_failure_concerns_via(self) -> None:
        """A transport failure through via names via and backs off via, not destination."""
        error = self.transport_error(
            self.client.put_json(REMOTE, INVITE_PATH, {}, via="nowhere.example")
        )
        self.assertEqual(error.destination, "nowhere.example")
        self.successResultOf(self.client.put_json(REMOTE, INVITE_PATH, {}))
        self.transport_error(
            self.client.put_json(REMOTE, INVITE_PATH, {}, via="nowhere.example"), BackoffError
        )

    def test_put_via_not_a_server_name(self) -> None:
        """A via that is not a server name is refused before anything is sent."""
        error = self.transport_error(self.client.put_json(REMOTE, "/p", {}, via="bad name"))
        self.assertEqual(error.destination, "bad name")
        self.assertEqual(self.peers.requests, [])

    def test_body_none_means_no_body(self) -> None:
        """A None body sends no body and signs without content."""
        self.successResultOf(self.client.put_json(REMOTE, "/p", None))
        [record] = self.peer.requests
        self.assertEqual(record["body"], b"")
        self.verify(record, None)

    def test_url_given_to_agent(self) -> None:
        """The agent is asked for https://<destination><path>, so IPv6 and ports pass through."""
        self.peers.add_peer("[2001:db8::1]:8448", self.peer)
        self.successResultOf(self.client.get_json("[2001:db8::1]:8448", "/x", args={"k": "v"}))
        self.assertEqual(self.peers.requests[-1][1], b"https://[2001:db8::1]:8448/x?k=v")

    def test_empty_object_body_sent_and_signed(self) -> None:
        """An empty JSON object body is a body (only None means none): sent as '{}' with its
        Content-Type and signed as content; every request says it accepts JSON, and who sends it."""
        self.successResultOf(self.client.put_json(REMOTE, "/p", {}))
        [record] = self.peer.requests
        self.assertEqual(record["body"], b"{}")
        self.assertEqual(record["headers"].getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(record["headers"].getRawHeaders(b"accept"), [b"application/json"])
        [agent] = record["headers"].getRawHeaders(b"user-agent")
        self.assertTrue(agent.startswith(b"federation-invite/"))
        self.verify(record, {})


class CallerErrorTests(_Base):
    def test_bad_path(self) -> None:
        """Paths that are not percent-encoded ASCII, or that carry a query, are refused."""
        for path in ["relative", "/a b", "/é", "/a?b=c", "/a#b", "/a\n", "/a\x7f"]:
            self.failureResultOf(self.client.get_json(REMOTE, path), ValueError)
        self.assertEqual(self.peer.requests, [])

    def test_invalid_destination(self) -> None:
        """A destination that is not a server name is a TransportError, and no request is made."""
        error = self.transport_error(self.client.get_json("not a name", "/x"))
        self.assertEqual(error.destination, "not a name")
        self.assertIn("not a valid server name", error.reason)
        self.assertEqual(self.peers.requests, [])

    def test_non_canonical_body(self) -> None:
        """A body with no canonical JSON form (a float) is refused before sending."""
        self.failureResultOf(self.client.put_json(REMOTE, "/p", {"x": 1.5}), ValueError)
        self.assertEqual(self.peer.requests, [])

    def test_invalid_own_server_name(self) -> None:
        """The client refuses to be built with an invalid server name of its own."""
        self.assertRaises(ValueError, FederationClient, self.clock, "bad name", self.key)


class RemoteErrorTests(_Base):
    def test_matrix_error(self) -> None:
        """A 4xx with a Matrix error body gives its status, errcode and message, not a MatrixError."""
        self.peer.code = 403
        self.peer.body = {"errcode": "M_FORBIDDEN", "error": "You are not invited"}
        error = self.remote_error(self.client.put_json(REMOTE, INVITE_PATH, {}))
        self.assertEqual(error.status, 403)
        self.assertEqual(error.errcode, "M_FORBIDDEN")
        self.assertEqual(error.message, "You are not invited")
        self.assertEqual(error.body, self.peer.body)
        self.assertEqual(str(error), "remote.example answered 403 M_FORBIDDEN: You are not invited")
        self.assertIn("M_FORBIDDEN", repr(error))

    def test_json_error_without_errcode(self) -> None:
        """A JSON error body without errcode/error keeps the status and the HTTP reason."""
        self.peer.code = 400
        self.peer.body = {"errcode": 7}
        error = self.remote_error(self.client.get_json(REMOTE, "/x"))
        self.assertEqual(
            (error.status, error.errcode, error.message), (400, None, "HTTP 400 Bad Request")
        )

    def test_non_string_error_text_ignored(self) -> None:
        """An "error" that is not a string is no message: the HTTP reason stands in (the
        errcode kept), and the text of an error without errcode has none either."""
        self.peer.code = 400
        self.peer.body = {"errcode": "M_UNKNOWN", "error": 5}
        error = self.remote_error(self.client.get_json(REMOTE, "/x"))
        self.assertEqual(
            (error.status, error.errcode, error.message),
            (400, "M_UNKNOWN", "HTTP 400 Bad Request"),
        )
        self.peer.body = {}
        error = self.remote_error(self.client.get_json(REMOTE, "/x"))
        self.assertEqual(str(error), "remote.example answered 400: HTTP 400 Bad Request")
        self.assertEqual(
            repr(error),
            "RemoteError(destination='remote.example', status=400, errcode=None, "
            "message='HTTP 400 Bad Request')",
        )

    def test_5xx_without_json(self) -> None:
        """A 5xx with an HTML body: errcode None, raw body kept, message says it was not JSON."""
        self.peer.code = 502
        self.peer.body = b"<html>Bad gateway</html>"
        error = self.remote_error(self.client.get_json(REMOTE, "/x"))
        self.assertEqual(error.status, 502)
        self.assertIsNone(error.errcode)
        self.assertEqual(error.message, "HTTP 502 Bad Gateway: body is not JSON")
        self.assertEqual(error.body, b"<html>Bad gateway</html>")

    def test_2xx_not_json(self) -> None:
        """A 200 whose body is not JSON is a RemoteError too."""
        self.peer.body = b"plain text"
        error = self.remote_error(self.client.get_json(REMOTE, "/x"))
        self.assertEqual((error.status, error.errcode), (200, None))
        self.assertEqual(error.message, "HTTP 200 OK: body is not JSON")

    def test_2xx_empty(self) -> None:
        """A 200 with an empty body is not JSON."""
        self.peer.body = b""
        self.assertEqual(self.remote_error(self.client.get_json(REMOTE, "/x")).status, 200)

    def test_duplicate_keys_not_our_error(self) -> None:
        """JSON our strict parser refuses (duplicate keys) becomes a RemoteError, never our 400."""
        self.peer.body = b'{"a": 1, "a": 2}'
        self.remote_error(self.client.get_json(REMOTE, "/x"))

    def test_oversized_with_length(self) -> None:
        """A response declaring more than max_response_bytes is refused."""
        self.peer.body = {"pad": "x" * 5000}
        error = self.remote_error(self.client.get_json(REMOTE, "/x"))
        self.assertEqual((error.status, error.errcode), (200, None))
        self.assertEqual(error.message, "response body exceeds 4096 bytes")

    def test_oversized_chunked(self) -> None:
        """A chunked response growing past max_response_bytes is cut off."""
        self.peer.chunks = [b'{"pad": "'] + [b"x" * 1000] * 5 + [b'"}']
        error = self.remote_error(self.client.get_json(REMOTE, "/x"))
        self.assertEqual(error.message, "response body exceeds 4096 bytes")

    def test_chunked_within_limit(self) -> None:
        """A chunked response within the cap is read whole."""
        self.peer.chunks = [b'{"pad": "'] + [b"x" * 1000] * 3 + [b'"}']
        result = self.successResultOf(self.client.get_json(REMOTE, "/x"))
        self.assertEqual(len(result["pad"]), 3000)

    def test_long_message_truncated(self) -> None:
        """A peer's error text is kept to 500 characters."""
        self.peer.code = 400
        self.peer.body = {"errcode": "M_X", "error": "e" * 2000}
        self.assertEqual(len(self.remote_error(self.client.get_json(REMOTE, "/x")).message), 500)

    def answered(self, code: int, phrase: bytes, body: bytes) -> Any:
        """A get_json answered with ``code`` and the reason phrase ``phrase``."""
        self.peer.hang = True
        requesting = self.client.get_json(REMOTE, "/x")
        [request] = self.peer.pending
        request.setResponseCode(code, phrase)
        request.write(body)
        request.finish()
        self.peers.flush()
        return requesting

    def test_long_reason_phrase_truncated_when_body_not_json(self) -> None:
        """A peer's reason phrase is kept to 500 characters in a non-JSON error's message."""
        error = self.remote_error(self.answered(502, b"p" * 2000, b"<html>"))
        self.assertEqual(error.message, "HTTP 502 " + "p" * 500 + ": body is not JSON")

    def test_long_reason_phrase_truncated_in_json_error_without_text(self) -> None:
        """A JSON error without an "error" string: the message is the status line, its reason
        phrase kept to 500 characters."""
        error = self.remote_error(self.answered(404, b"q" * 2000, b'{"errcode": "M_NOT_FOUND"}'))
        self.assertEqual(error.message, "HTTP 404 " + "q" * 500)

    def test_status_line_without_reason_phrase(self) -> None:
        """An empty reason phrase leaves no trailing space in the message, with or without a
        JSON body; a reason phrase is read as Latin-1 (HTTP's), not UTF-8."""
        with self.assertRaises(RemoteError) as caught:
            _interpret(REMOTE, 599, b"", b"x")
        self.assertEqual(caught.exception.message, "HTTP 599: body is not JSON")
        with self.assertRaises(RemoteError) as caught:
            _interpret(REMOTE, 599, b"", b"{}")
        self.assertEqual(caught.exception.message, "HTTP 599")
        with self.assertRaises(RemoteError) as caught:
            _interpret(REMOTE, 500, b"\xe9t\xe9", b"x")
        self.assertEqual(caught.exception.message, "HTTP 500 \u00e9t\u00e9: body is not JSON")

    def test_long_errcode_truncated(self) -> None:
        """A peer's errcode is kept to 500 characters, as its error text is."""
        self.peer.code = 400
        self.peer.body = {"errcode": "E" * 2000}
        self.assertEqual(self.remote_error(self.client.get_json(REMOTE, "/x")).errcode, "E" * 500)

    def test_only_2xx_are_results(self) -> None:
        """Only 2xx answers are results (RFC 9110, section 15.3): 200 and 299 are, a 199 and a
        300 with a JSON body are RemoteErrors."""
        self.assertEqual(_interpret(REMOTE, 200, b"OK", b"{}"), {})
        self.assertEqual(_interpret(REMOTE, 299, b"", b"{}"), {})
        for status in (199, 300):
            self.assertRaises(RemoteError, _interpret, REMOTE, status, b"", b"{}")
        self.peer.code, self.peer.body = 300, {}
        self.assertEqual(self.remote_error(self.client.get_json(REMOTE, "/x")).status, 300)


class TransportErrorTests(_Base):
    def test_unreachable(self) -> None:
        """A connection failure is a TransportError naming the destination and the reason."""
        error = self.transport_error(self.client.get_json("nowhere.example", "/x"))
        self.assertEqual(error.destination, "nowhere.example")
        self.assertIn("cannot connect", error.reason)
        self.assertIn("nowhere.example", str(error))
        self.assertIn("TransportError(destination='nowhere.example'", repr(error))

    def test_timeout(self) -> None:
        """A peer that never answers gives a TransportError after the timeout (Clock)."""
        self.peer.hang = True
        requesting = self.client.get_json(REMOTE, "/x")
        self.clock.advance(29.9)
        self.assertNoResult(requesting)
        self.clock.advance(0.1)
        error = self.transport_error(requesting)
        self.assertEqual(error.reason, "timed out after 30 s")
        self.assertFalse(error.resolver_busy)

    def test_timeout_during_body(self) -> None:
        """The timeout also covers reading the body."""
        self.peer.hang = True
        requesting = self.client.get_json(REMOTE, "/x")
        [request] = self.peer.pending
        request.setHeader(b"content-length", b"100")
        request.write(b'{"partial":')
        self.peers.flush()
        self.assertNoResult(requesting)
        self.clock.advance(30)
        self.assertEqual(self.transport_error(requesting).reason, "timed out after 30 s")

    def test_caller_cancel(self) -> None:
        """Cancelling a request gives CancelledError and does not count as a failure."""
        self.peer.hang = True
        requesting = self.client.get_json(REMOTE, "/x")
        requesting.cancel()
        self.failureResultOf(requesting, CancelledError)
        self.peer.hang = False
        self.successResultOf(self.client.get_json(REMOTE, "/x"))

    def test_caller_cancel_during_body(self) -> None:
        """Cancelling while the body is being read is a cancellation too, not a failure."""
        self.peer.hang = True
        requesting = self.client.get_json(REMOTE, "/x")
        [request] = self.peer.pending
        request.setHeader(b"content-length", b"100")
        request.write(b'{"partial":')
        self.peers.flush()
        requesting.cancel()
        self.failureResultOf(requesting, CancelledError)
        self.assertEqual(self.client._backoff, {})

    def test_describe_failure(self) -> None:
        """Transport failures are named by kind: DNS, blocked, TLS, refused."""
        from OpenSSL import SSL
        from twisted.internet.error import ConnectingCancelledError, DNSLookupError
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseNeverReceived

        from federation_invite.client import BlockedAddressError

        self.assertEqual(describe_failure(DNSLookupError("x")), "DNS lookup failed: x")
        self.assertEqual(
            describe_failure(BlockedAddressError("h.example", ["10.0.0.1"])),
            "refused by the outbound IP blocklist: h.example resolves only to blocked addresses (10.0.0.1)",
        )
        tls = ResponseNeverReceived([Failure(SSL.Error([("x", "y", "certificate verify failed")]))])
        self.assertEqual(describe_failure(tls), "TLS handshake failed: certificate verify failed")
        self.assertTrue(describe_failure(SSL.Error()).startswith("TLS handshake failed"))
        self.assertTrue(
            describe_failure(ResponseNeverReceived([Failure(ValueError("v"))])).startswith(
                "connection failed"
            )
        )
        self.assertEqual(
            describe_failure(ConnectingCancelledError(None)), "connection attempt timed out"
        )
        self.assertEqual(describe_failure(KeyError("k")), "KeyError: 'k'")

    def test_describe_failure_edge_cases(self) -> None:
        """A DNS failure without details has no dangling colon; a service_identity
        VerificationError's text is the TLS detail; TLS details are kept to 500 characters;
        wrapped reasons that are plain exceptions are described, and none falls through."""
        from OpenSSL import SSL
        from service_identity import VerificationError
        from twisted.internet.error import DNSLookupError

        self.assertEqual(describe_failure(DNSLookupError()), "DNS lookup failed")
        mismatch = VerificationError("name mismatch")
        self.assertEqual(describe_failure(mismatch), f"TLS handshake failed: {mismatch}")
        self.assertIn("name mismatch", describe_failure(mismatch))
        long = VerificationError("v" * 2000)
        self.assertEqual(describe_failure(long), "TLS handshake failed: " + str(long)[:500])
        error = SSL.Error([("SSL routines", "f", "r" * 2000)])
        self.assertEqual(describe_failure(error), "TLS handshake failed: " + "r" * 500)

        class Wrapped(Exception):
            def __init__(self, reasons: list[Any]) -> None:
                super().__init__("wrapped")
                self.reasons = reasons

        self.assertEqual(
            describe_failure(Wrapped([ConnectionRefusedError("nope")])), "connection failed: nope"
        )
        self.assertEqual(describe_failure(Wrapped([])), "Wrapped: wrapped")

    def test_describe_failure_names_the_first_reason(self) -> None:
        """A wrapped failure is described by its first reason; a TLS error without text by
        its class name; a blocked host's text lists at most four of its addresses."""
        from OpenSSL import SSL
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseNeverReceived

        from federation_invite.client import BlockedAddressError

        failure = ResponseNeverReceived(
            [Failure(ConnectionRefusedError("first")), Failure(ValueError("second"))]
        )
        self.assertEqual(describe_failure(failure), "connection failed: first")
        self.assertEqual(describe_failure(SSL.Error()), "TLS handshake failed: Error")
        addresses = [f"10.0.0.{i}" for i in range(1, 7)]
        blocked = BlockedAddressError("h.example", addresses)
        self.assertEqual(
            str(blocked),
            "h.example resolves only to blocked addresses (10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.4)",
        )
        self.assertEqual(blocked.addresses, addresses)

    def test_transport_error_caused_by_the_failure(self) -> None:
        """A TransportError is raised from the failure it describes (its __cause__)."""
        error = self.transport_error(self.client.get_json("nowhere.example", "/x"))
        self.assertIsNotNone(error.__cause__)
        self.assertIn(describe_failure(error.__cause__), error.reason)

    def test_classification_through_twisted_web_reasons(self) -> None:
        """A cancellation while connecting, a resolution step abandoned by close and a
        connection failing for want of our resources (each errno, as ConnectError or
        OSError) are recognised inside twisted.web's reasons too."""
        import errno

        from twisted.internet.error import ConnectBindError, ConnectingCancelledError
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseNeverReceived

        from federation_invite.client._client import (
            _abandoned_by_close,
            _is_cancellation,
            _local_resource_error,
        )
        from federation_invite.client.discovery import _ResolverClosed

        def wrapped(exc: BaseException) -> ResponseNeverReceived:
            return ResponseNeverReceived([Failure(ValueError("other")), Failure(exc)])

        self.assertTrue(_is_cancellation(wrapped(ConnectingCancelledError(None))))
        self.assertFalse(_is_cancellation(wrapped(ValueError("v"))))
        self.assertTrue(_abandoned_by_close(wrapped(_ResolverClosed("x"))))
        self.assertFalse(_abandoned_by_close(wrapped(ConnectionRefusedError())))
        for number, what in [
            (errno.EMFILE, "out of file descriptors"),
            (errno.ENFILE, "out of file descriptors"),
            (errno.ENOBUFS, "out of socket buffer memory"),
            (errno.ENOMEM, "out of memory"),
        ]:
            expected = f"{what} ({errno.errorcode[number]})"
            self.assertEqual(_local_resource_error(OSError(number, "x")), expected)
            self.assertEqual(
                _local_resource_error(wrapped(ConnectBindError(number, "socket"))), expected
            )
        self.assertIsNone(_local_resource_error(wrapped(OSError(errno.ECONNREFUSED, "x"))))


class ConnectingCancelTests(SynchronousTestCase):
    """The real agent on a memory reactor: a request cancelled while its connection is being made."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.installNameResolver(FakeHostnameResolver({"good.example": [PUBLIC]}))
        self.client = FederationClient(
            self.reactor,
            ORIGIN,
            generate_signing_key("k1"),
            srv_resolver=FakeSRVResolver(),
            timeout=10,
        )

    def test_caller_cancel_while_connecting(self) -> None:
        """Cancelled while connecting: CancelledError, not a TransportError, and no back-off."""
        requesting = self.client.get_json("good.example:8448", "/x")
        self.assertEqual([(c[0], c[1]) for c in self.reactor.tcpClients], [(PUBLIC, 8448)])
        requesting.cancel()
        self.failureResultOf(requesting, CancelledError)
        self.assertEqual(self.client._backoff, {})
        self.assertNoResult(self.client.get_json("good.example:8448", "/x"))
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_timeout_while_connecting(self) -> None:
        """Our timeout while connecting is still a TransportError that backs the peer off."""
        requesting = self.client.get_json("good.example:8448", "/x")
        self.reactor.advance(10)
        error = self.failureResultOf(requesting, TransportError).value
        self.assertEqual(error.reason, "timed out after 10 s")
        self.assertEqual((error.resolver_busy, error.abandoned), (False, False))
        self.failureResultOf(self.client.get_json("good.example:8448", "/x"), BackoffError)


class BackoffTests(_Base):
    def fail_once(self) -> None:
        self.transport_error(self.client.get_json(REMOTE, "/x"))

    def test_fail_fast_then_retry(self) -> None:
        """After a failure, calls fail fast for 1 min without a request; then one is tried again."""
        self.peer.code, self.peer.body = 503, b"down"
        self.remote_error(self.client.get_json(REMOTE, "/x"))
        self.assertEqual(len(self.peer.requests), 1)
        error = self.transport_error(self.client.get_json(REMOTE, "/x"), BackoffError)
        self.assertIsInstance(error, BackoffError)
        assert isinstance(error, BackoffError)
        self.assertEqual(error.destination, REMOTE)
        self.assertEqual(error.failures, 1)
        self.assertEqual(error.retry_at, self.clock.seconds() + 60)
        self.assertIn("next attempt allowed in 60 s", error.reason)
        self.assertEqual(len(self.peer.requests), 1)
        self.clock.advance(60)
        self.peer.code, self.peer.body = 200, {"ok": True}
        self.assertEqual(self.successResultOf(self.client.get_json(REMOTE, "/x")), {"ok": True})
        self.assertEqual(len(self.peer.requests), 2)

    def test_backoff_error_text(self) -> None:
        """A BackoffError's text counts the failures and says the wait, never below 0 s (a
        retry_at already past); its repr names its class."""
        error = BackoffError(REMOTE, 100.0, 3, 160.0)
        self.assertEqual(
            str(error),
            "cannot reach remote.example: backing off after 3 consecutive failure(s); "
            "next attempt allowed in 0 s",
        )
        self.assertTrue(repr(error).startswith("BackoffError(destination='remote.example', "))

    def test_backoff_over_after_clock_steps_back(self) -> None:
        """A back-off recorded "after" now (the wall clock stepped back since) is over: the
        destination is tried again rather than refused for as long as the step."""
        self.peer.code, self.peer.body = 503, b"down"
        self.remote_error(self.client.get_json(REMOTE, "/x"))
        self.clock.rightNow -= 3600
        self.peer.code, self.peer.body = 200, {"ok": True}
        self.assertEqual(self.successResultOf(self.client.get_json(REMOTE, "/x")), {"ok": True})
        self.assertEqual(len(self.peer.requests), 2)

    def test_doubling_up_to_an_hour(self) -> None:
        """Consecutive failures double the wait: 1, 2, 4, ... minutes, capped at 1 h."""
        self.peer.hang = True
        waits = []
        for _ in range(8):
            requesting = self.client.get_json(REMOTE, "/x")
            self.clock.advance(30)
            self.transport_error(requesting)
            start = self.clock.seconds()
            error = self.failureResultOf(self.client.get_json(REMOTE, "/x"), BackoffError).value
            waits.append(error.retry_at - start)
            self.clock.advance(error.retry_at - start)
        self.assertEqual(waits, [60, 120, 240, 480, 960, 1920, 3600, 3600])

    def test_wait_stays_an_hour_however_many_failures(self) -> None:
        """After any number of consecutive failures (past 1,024, where 2 ** n overflowed a
        float) the wait stays 1 h and each failure is still a TransportError."""
        for _ in range(1030):
            self.clock.advance(1)  # each request starts after the last failure: it escalates
            self.transport_error(self.client.get_json("nowhere.example", "/x", ignore_backoff=True))
        error = self.failureResultOf(
            self.client.get_json("nowhere.example", "/x"), BackoffError
        ).value
        self.assertEqual((error.failures, error.retry_at - self.clock.seconds()), (1030, 3600))
        self.clock.advance(3600)
        self.transport_error(self.client.get_json("nowhere.example", "/x"))
        error = self.failureResultOf(
            self.client.get_json("nowhere.example", "/x"), BackoffError
        ).value
        self.assertEqual((error.failures, error.retry_at - self.clock.seconds()), (1031, 3600))

    def test_simultaneous_failures_count_once(self) -> None:
        """Requests in flight together that fail together are one failure: the back-off
        escalates only for a failure of a request started after the last failure."""
        self.peer.hang = True
        requests = [self.client.get_json(REMOTE, f"/x/{n}") for n in range(7)]
        self.peer.hang = False
        self.clock.advance(1)
        for request in self.peer.pending:
            request.setResponseCode(502)
            request.write(b"{}")
            request.finish()
        self.peers.flush()
        for requesting in requests:
            self.assertEqual(self.remote_error(requesting).status, 502)
        error = self.failureResultOf(self.client.get_json(REMOTE, "/x"), BackoffError).value
        self.assertEqual((error.failures, error.retry_at - self.clock.seconds()), (1, 60))
        # One started after that failure escalates it.
        self.clock.advance(60)
        self.peer.code, self.peer.body = 502, {}
        self.remote_error(self.client.get_json(REMOTE, "/x"))
        error = self.failureResultOf(self.client.get_json(REMOTE, "/x"), BackoffError).value
        self.assertEqual((error.failures, error.retry_at - self.clock.seconds()), (2, 120))

    def test_failures_at_the_instant_requests_started_count_once(self) -> None:
        """Requests started at one instant and failing at that same instant are one failure
        (only a request started after the last failure escalates the back-off)."""
        self.peer.hang = True
        first = self.client.get_json(REMOTE, "/x")
        second = self.client.get_json(REMOTE, "/x")
        for request in self.peer.pending:
            request.setResponseCode(503)
            request.write(b"down")
            request.finish()
        self.peers.flush()
        self.remote_error(first)
        self.remote_error(second)
        error = self.failureResultOf(self.client.get_json(REMOTE, "/x"), BackoffError).value
        self.assertEqual(error.failures, 1)

    def test_post_json_counts_in_backoff_by_default(self) -> None:
        """post_json without backoff= is refused by and counted in the back-off as get_json is
        (only backoff=False, for notary queries, leaves it out)."""
        self.peer.code, self.peer.body = 503, b"down"
        self.remote_error(self.client.post_json(REMOTE, "/x", {}))
        self.assertEqual(list(self.client._backoff), [REMOTE])
        error = self.failureResultOf(self.client.post_json(REMOTE, "/x", {}), BackoffError).value
        self.assertEqual(error.failures, 1)
        self.assertEqual(len(self.peer.requests), 1)

    def test_success_resets(self) -> None:
        """A success clears the back-off: the next failure waits 1 min again."""
        self.peer.code, self.peer.body = 500, {}
        for _ in range(3):
            self.remote_error(self.client.get_json(REMOTE, "/x"))
            self.clock.advance(3600)
        self.peer.code = 200
        self.successResultOf(self.client.get_json(REMOTE, "/x"))
        self.peer.code = 500
        self.remote_error(self.client.get_json(REMOTE, "/x"))
        error = self.failureResultOf(self.client.get_json(REMOTE, "/x"), BackoffError).value
        self.assertEqual((error.failures, error.retry_at - self.clock.seconds()), (1, 60))

    def test_4xx_is_not_a_failure(self) -> None:
        """A 4xx proves the server alive: no back-off, and it resets an earlier one."""
        self.peer.code, self.peer.body = 500, {}
        self.remote_error(self.client.get_json(REMOTE, "/x"))
        self.clock.advance(60)
        self.peer.code = 404
        self.remote_error(self.client.get_json(REMOTE, "/x"))
        self.assertEqual(self.remote_error(self.client.get_json(REMOTE, "/x")).status, 404)
        # The back-off is over and ended: the next failure waits 1 min again, not 2.
        self.peer.code = 500
        self.remote_error(self.client.get_json(REMOTE, "/x"))
        error = self.failureResultOf(self.client.get_json(REMOTE, "/x"), BackoffError).value
        self.assertEqual((error.failures, error.retry_at - self.clock.seconds()), (1, 60))

    def test_401_and_429_are_failures(self) -> None:
        """A 401 (it will not accept us for a while) or a 429 (it is rate-limiting us) backs
        the server off, as Synapse's RetryDestinationLimiter does; it does not reset one."""
        for status, errcode in [(401, "M_UNAUTHORIZED"), (429, "M_LIMIT_EXCEEDED")]:
            name = f"answers{status}.example"
            peer = CannedResource(status, {"errcode": errcode, "error": "no"})
            self.peers.add_peer(name, peer)
            error = self.failureResultOf(self.client.get_json(name, "/x"), RemoteError).value
            self.assertEqual((error.status, error.errcode), (status, errcode))
            backoff = self.failureResultOf(self.client.get_json(name, "/x"), BackoffError).value
            self.assertEqual((backoff.failures, backoff.retry_at - self.clock.seconds()), (1, 60))
            self.assertEqual(len(peer.requests), 1)
            self.clock.advance(60)
            self.failureResultOf(self.client.get_json(name, "/x"), RemoteError)
            backoff = self.failureResultOf(self.client.get_json(name, "/x"), BackoffError).value
            self.assertEqual((backoff.failures, backoff.retry_at - self.clock.seconds()), (2, 120))

    def test_429s_together_count_once(self) -> None:
        """Requests in flight together that are all answered 429 are one failure."""
        self.peer.hang = True
        requests = [self.client.get_json(REMOTE, f"/x/{n}") for n in range(5)]
        self.peer.hang = False
        self.clock.advance(1)
        for request in self.peer.pending:
            request.setResponseCode(429)
            request.write(b'{"errcode": "M_LIMIT_EXCEEDED", "error": "slow down"}')
            request.finish()
        self.peers.flush()
        for requesting in requests:
            error = self.remote_error(requesting)
            self.assertEqual((error.status, error.errcode), (429, "M_LIMIT_EXCEEDED"))
        error = self.failureResultOf(self.client.get_json(REMOTE, "/x"), BackoffError).value
        self.assertEqual((error.failures, error.retry_at - self.clock.seconds()), (1, 60))

    def test_transport_failure_counts(self) -> None:
        """Connection failures back off too; other destinations are unaffected."""
        self.transport_error(self.client.get_json("nowhere.example", "/x"))
        self.transport_error(self.client.get_json("nowhere.example", "/x"), BackoffError)
        self.successResultOf(self.client.get_json(REMOTE, "/x"))

    def test_backoff_is_per_name_as_fetched(self) -> None:
        """Each spelling of a server name has a back-off of its own: one can fail where the
        server's own spelling succeeds (``remote.example.`` against a certificate for
        ``remote.example``; a proxy routing by SNI or Host as written), and anyone can make us
        ask for one (a forged request's origin), so none backs the server off."""
        variants = ["remote.example.", "Remote.Example.", "REMOTE.example", "remote.example:08448"]
        for variant in variants:
            self.transport_error(self.client.get_json(variant, "/x"))
            self.transport_error(self.client.get_json(variant, "/x"), BackoffError)
            self.assertEqual(self.successResultOf(self.client.get_json(REMOTE, "/x")), {"ok": True})
        self.assertEqual(sorted(self.client._backoff), sorted(variants))

    def test_backoff_off_for_a_request(self) -> None:
        """A request made with backoff=False is neither refused by a back-off nor recorded in
        one, timed out or answered 5xx (notary queries: a notary slow about some third server,
        or failing to reach it, is not a dead notary)."""
        self.peer.hang = True
        requesting = self.client.post_json(REMOTE, "/x", {}, backoff=False)
        self.clock.advance(30)
        self.transport_error(requesting)
        self.assertEqual(self.client._backoff, {})
        self.peer.hang = False
        self.peer.code, self.peer.body = 503, b"down"
        self.remote_error(self.client.post_json(REMOTE, "/x", {}, backoff=False))
        self.assertEqual(self.client._backoff, {})
        self.remote_error(self.client.get_json(REMOTE, "/x"))
        self.transport_error(self.client.get_json(REMOTE, "/x"), BackoffError)
        self.peer.code, self.peer.body = 200, {"ok": True}
        self.assertEqual(
            self.successResultOf(self.client.post_json(REMOTE, "/x", {}, backoff=False)),
            {"ok": True},
        )
        self.transport_error(self.client.get_json(REMOTE, "/x"), BackoffError)

    def test_4xx_without_backoff_does_not_end_a_backoff(self) -> None:
        """post_json(backoff=False) is not counted in the back-off: its 4xx answer does not end
        one either."""
        self.peer.code, self.peer.body = 503, b"down"
        self.remote_error(self.client.get_json(REMOTE, "/x"))
        self.peer.code, self.peer.body = 400, {"errcode": "M_BAD_JSON"}
        self.remote_error(self.client.post_json(REMOTE, "/x", {}, backoff=False))
        self.transport_error(self.client.get_json(REMOTE, "/x"), BackoffError)

    def test_backoff_ignored_by_a_request(self) -> None:
        """put_json(ignore_backoff=True) is sent while the destination is backed off (an invite
        a user asked for, as Synapse's ignore_backoff) and still counts: a failure escalates
        the back-off, a success ends it."""
        self.peer.code, self.peer.body = 503, b"down"
        self.remote_error(self.client.get_json(REMOTE, "/x"))
        self.clock.advance(1)
        error = self.remote_error(self.client.put_json(REMOTE, "/p", {}, ignore_backoff=True))
        self.assertEqual(error.status, 503)
        self.assertEqual(len(self.peer.requests), 2)
        backoff = self.failureResultOf(self.client.get_json(REMOTE, "/x"), BackoffError).value
        self.assertEqual((backoff.failures, backoff.retry_at - self.clock.seconds()), (2, 120))
        self.peer.code, self.peer.body = 200, {"ok": True}
        self.assertEqual(
            self.successResultOf(self.client.put_json(REMOTE, "/p", {}, ignore_backoff=True)),
            {"ok": True},
        )
        self.assertEqual(self.client._backoff, {})
        self.assertEqual(self.successResultOf(self.client.get_json(REMOTE, "/x")), {"ok": True})

    def test_backoff_table_bounded(self) -> None:
        """Failing destinations are forgotten once their wait has passed and the table is full."""
        self.client.BACKOFF_TABLE_SIZE = 3
        for index in range(3):
            self.transport_error(self.client.get_json(f"dead{index}.example", "/x"))
        self.clock.advance(61)
        self.transport_error(self.client.get_json("dead9.example", "/x"))
        self.assertEqual(sorted(self.client._backoff), ["dead9.example"])
        for index in range(3):
            self.transport_error(self.client.get_json(f"more{index}.example", "/x"))
        self.assertLessEqual(len(self.client._backoff), 3)

    def test_full_backoff_table_keeps_the_longest_waits(self) -> None:
        """A full table forgets the back-offs that end soonest, not all of them: names that
        fail once each (anyone can send many) cannot wipe a long back-off."""
        self.client.BACKOFF_TABLE_SIZE = 4
        for _ in range(3):
            self.transport_error(self.client.get_json("nowhere.example", "/x"))
            self.clock.advance(240)
        self.transport_error(self.client.get_json("nowhere.example", "/x"))
        for index in range(20):
            self.transport_error(self.client.get_json(f"dead{index}.example", "/x"))
            self.clock.advance(1)
        self.assertLessEqual(len(self.client._backoff), 4)
        error = self.failureResultOf(
            self.client.get_json("nowhere.example", "/x"), BackoffError
        ).value
        self.assertEqual(error.failures, 4)

    def test_backoff_table_holds_10000_servers(self) -> None:
        """At most 10,000 servers are remembered in back-off (README): 10,000 all still backed
        off are all remembered; the 10,001st makes room."""
        for index in range(10_000):
            self.transport_error(self.client.get_json(f"d{index}.example", "/x"))
        self.assertEqual(len(self.client._backoff), 10_000)
        self.transport_error(self.client.get_json("one-more.example", "/x"))
        self.assertLessEqual(len(self.client._backoff), 10_000)
        self.assertIn("one-more.example", self.client._backoff)


class DefaultsTests(_Base):
    def default_client(self) -> FederationClient:
        """A client with every optional setting left at its default."""
        return FederationClient(self.clock, ORIGIN, self.key, agent=self.peers)

    def test_tls_verified_by_default(self) -> None:
        """Built without verify_tls (and without an agent), the client verifies peers'
        certificates (README: outbound.verify_tls defaults to true)."""
        client = FederationClient(self.clock, ORIGIN, self.key)
        self.addCleanup(client.close)
        self.assertIs(client._agent._tls_policy.verify, True)  # type: ignore[attr-defined]

    def test_default_timeout_is_60_seconds(self) -> None:
        """Without timeout=, a request a peer never answers fails after 60 s (README:
        outbound.timeout, 60 s)."""
        self.peer.hang = True
        requesting = self.default_client().get_json(REMOTE, "/x")
        self.clock.advance(59.9)
        self.assertNoResult(requesting)
        self.clock.advance(0.1)
        self.assertEqual(self.transport_error(requesting).reason, "timed out after 60 s")

    def test_default_response_cap_is_1_mib(self) -> None:
        """Without max_response_bytes=, a body of exactly 1 MiB is read and one byte more is
        refused (README: the body capped at 1 MiB)."""
        client = self.default_client()
        prefix, suffix = b'{"pad":"', b'"}'
        filler = 1_048_576 - len(prefix) - len(suffix)
        self.peer.body = prefix + b"x" * filler + suffix
        self.assertEqual(len(self.successResultOf(client.get_json(REMOTE, "/x"))["pad"]), filler)
        self.peer.body = prefix + b"x" * (filler + 1) + suffix
        error = self.remote_error(client.get_json(REMOTE, "/x"))
        self.assertEqual(error.message, "response body exceeds 1048576 bytes")


class BytesProducerTests(SynchronousTestCase):
    def test_produces_at_once(self) -> None:
        """The request body producer writes everything on start; flow control is a no-op."""
        from twisted.internet.testing import StringTransport

        from federation_invite.client.agent import BytesProducer

        producer = BytesProducer(b"abc")
        self.assertEqual(producer.length, 3)
        consumer = StringTransport()
        self.successResultOf(producer.startProducing(consumer))
        producer.pauseProducing()
        producer.resumeProducing()
        producer.stopProducing()
        self.assertEqual(consumer.value(), b"abc")


class ConstructionTests(SynchronousTestCase):
    def test_verify_tls_off_is_logged(self) -> None:
        """verify_tls=False logs a warning saying verification is off."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        client = FederationClient(Clock(), ORIGIN, generate_signing_key("k"), verify_tls=False)
        self.successResultOf(client.close())
        warnings = [e for e in events if "verification is OFF" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["log_level"].name, "warn")

    def test_close_stops_the_system_resolver(self) -> None:
        """close() also stops the timer of the system DNS resolver its first SRV lookup
        created (resolv.conf re-read every 60 s), so no timer outlives the client."""
        from twisted.names import client as names_client

        from federation_invite.client import ResolvedServer

        # No packet sent: the query is answered NXDOMAIN at once.
        self.patch(
            names_client.Resolver,
            "lookupService",
            lambda resolver, name, timeout=None: fail(DNSNameError(name)),
        )
        clock = Clock()
        client = FederationClient(clock, ORIGIN, generate_signing_key("k"))
        server = ResolvedServer(REMOTE, REMOTE, REMOTE, None, REMOTE, REMOTE)
        targets = client._agent._resolver.resolve_targets(server)  # type: ignore[attr-defined]
        self.assertEqual(self.successResultOf(targets), [(REMOTE, 8448)])
        self.assertNotEqual(clock.getDelayedCalls(), [])
        self.successResultOf(client.close())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_close_abandons_a_well_known_fetch_in_flight(self) -> None:
        """close() abandons a request waiting for the destination's .well-known (a name
        without a port whose .well-known never answers): it fails with TransportError,
        marked ``abandoned`` (for the keyring), its timers are cancelled, and the
        destination is not backed off (the client, not the server, gave up)."""
        clock = Clock()
        client = FederationClient(clock, ORIGIN, generate_signing_key("k"))
        hanging = CannedResource(hang=True)
        client._resolver._well_known_agent = FakePeersAgent(  # type: ignore[union-attr]
            {REMOTE: hanging}
        )
        requesting = client.get_json(REMOTE, "/x")
        self.assertEqual(len(hanging.requests), 1)
        self.assertNoResult(requesting)
        self.successResultOf(client.close())
        error = self.failureResultOf(requesting, TransportError).value
        self.assertEqual(
            error.reason,
            f"cannot connect: resolving https://{REMOTE}/.well-known/matrix/server"
            " abandoned: the resolver was closed",
        )
        self.assertTrue(error.abandoned)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(client._backoff, {})

    def test_request_after_close_fetches_well_known_anew(self) -> None:
        """A request made after close() works as any: it makes a new .well-known fetch (the
        abandoned one left nothing cached), whose 30 s timeout ends it as usual: the
        request then goes on to the SRV query, as after any .well-known fetch that hangs."""
        from federation_invite.client.discovery import WELL_KNOWN_TIMEOUT

        clock = Clock()
        srv = FakeSRVResolver()
        srv.hold = True
        client = FederationClient(clock, ORIGIN, generate_signing_key("k"), srv_resolver=srv)
        hanging = CannedResource(hang=True)
        client._resolver._well_known_agent = FakePeersAgent(  # type: ignore[union-attr]
            {REMOTE: hanging}
        )
        first = client.get_json(REMOTE, "/x")
        self.successResultOf(client.close())
        self.assertTrue(self.failureResultOf(first, TransportError).value.abandoned)
        self.assertEqual(clock.getDelayedCalls(), [])
        again = client.get_json(REMOTE, "/x")
        self.assertEqual(len(hanging.requests), 2)
        self.assertNoResult(again)
        self.assertEqual(srv.lookups, [])
        clock.advance(WELL_KNOWN_TIMEOUT - 0.001)
        self.assertEqual(srv.lookups, [])
        clock.advance(0.001)
        self.assertEqual(srv.lookups, [f"_matrix-fed._tcp.{REMOTE}"])
        self.assertEqual(len(hanging.requests), 2)
        self.assertNoResult(again)
        self.assertEqual(client._backoff, {})
        self.successResultOf(client.close())
        error = self.failureResultOf(again, TransportError).value
        self.assertEqual(
            error.reason,
            f"cannot connect: resolving _matrix-fed._tcp.{REMOTE} abandoned:"
            " the resolver was closed",
        )
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_close_abandons_an_srv_lookup_in_flight(self) -> None:
        """close() abandons a request waiting for its destination's SRV query: it fails
        with TransportError, the query and the timers are cancelled, and the destination
        is not backed off."""
        clock = Clock()
        srv = FakeSRVResolver()
        srv.hold = True
        client = FederationClient(clock, ORIGIN, generate_signing_key("k"), srv_resolver=srv)
        client._resolver._well_known_agent = FakePeersAgent()  # type: ignore[union-attr]
        requesting = client.get_json(REMOTE, "/x")
        self.assertEqual(list(srv.outstanding), [f"_matrix-fed._tcp.{REMOTE}"])
        self.assertNoResult(requesting)
        self.successResultOf(client.close())
        error = self.failureResultOf(requesting, TransportError).value
        self.assertEqual(
            error.reason,
            f"cannot connect: resolving _matrix-fed._tcp.{REMOTE} abandoned:"
            " the resolver was closed",
        )
        self.assertTrue(error.abandoned)
        self.assertEqual(srv.outstanding, {})
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(client._backoff, {})

    def test_close_without_pool(self) -> None:
        """close() is a no-op for a client built around an injected agent."""
        client = FederationClient(
            Clock(), ORIGIN, generate_signing_key("k"), agent=FakePeersAgent()
        )
        self.successResultOf(client.close())
