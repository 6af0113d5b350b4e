"""Tests for federation_invite.web.site: the access log (invites are logged once, by their
handler), the local address asked once per connection, and the drain on shutdown."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.server import Request, Site

from federation_invite.tlscert import write_self_signed_certificate
from federation_invite.web.site import _LimitedChannel

from ..invites import THEM, _sign_request_lax, event_id_of
from ..test_hostile_slow import SiteTestCase, put_request


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
        """Refusals before the handler (bad JSON) and other paths keep their access-log line."""
        path, _ = self.signed_invite()
        connection = self.connect()
        connection.send(
            put_request(path, b"not json", 'X-Matrix origin="a",key="ed25519:a",sig="a"')
        )
        connection.send(b"GET /_matrix/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual([status for status, _, _ in connection.responses()], [400, 404])
        self.assertEqual(self.logged, [path.encode(), b"/_matrix/nothing"])


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

    def test_absolute_and_authority_form(self) -> None:
        """``GET http://host/path`` (absolute-form) and ``CONNECT host:443`` (authority-form):
        JSON 404 ``M_UNRECOGNIZED``; federation peers send a path (origin-form)."""
        self.assertNotFound(
            b"GET http://us.example/_matrix/federation/v1/version HTTP/1.1\r\n"
            b"Host: us.example\r\n\r\n"
        )
        self.assertNotFound(b"CONNECT us.example:443 HTTP/1.1\r\nHost: us.example:443\r\n\r\n")


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
        expected = b'{"errcode":"M_UNRECOGNIZED","error":"Method HEAD not allowed here"}'
        self.assertEqual(headers[b"Content-Length"], b"%d" % len(expected))
        self.assertEqual(headers[b"Content-Type"], b"application/json")
        self.assertEqual(headers[b"Allow"], b"PUT")


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
        self.assertEqual(self.successResultOf(drained), 0)
        self.assertEqual(self.grace_calls(), [])
        self.assertEqual(self.site.requests_in_progress(), 0)

    def test_requests_arriving_when_drain_begins_are_answered(self) -> None:
        """Requests partly received when the drain begins (request line, or headers, still
        arriving) are received, handled and answered with ``Connection: close``; a request
        the peer sends during the drain behind one in progress is neither handled nor
        answered."""
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
        busy.send(self.valid_request(depth=4))  # during the drain: not taken
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
        self.assertEqual(self.successResultOf(drained), 0)

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
        self.assertEqual(self.successResultOf(drained), 0)
        self.assertTrue(all(connection.closing for connection in connections))

    def test_grace_period_expires(self) -> None:
        """A request still unanswered when the grace period ends: its connection is aborted
        unanswered at exactly ``grace_period`` seconds, and the drain fires with 1."""
        busy = self.connect()
        busy.send(self.valid_request())
        drained = self.site.drain(10)
        self.clock.advance(9.999)
        self.assertNoResult(drained)
        self.assertFalse(busy.transport.disconnected)
        self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(drained), 1)
        self.assertTrue(busy.transport.disconnected, "aborted")
        busy.close()
        self.assertEqual(busy.responses(), [])

    def test_nothing_in_progress(self) -> None:
        """With no request in progress the drain fires at once with 0; idle connections are
        closed, and a request sent on one afterwards is not read."""
        idle = self.connect()
        idle.send(self.version_request())
        drained = self.site.drain(10)
        self.assertEqual(self.successResultOf(drained), 0)
        self.assertTrue(idle.closing)
        idle.send(self.version_request())
        self.assertEqual([status for status, _, _ in idle.responses()], [200])
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
