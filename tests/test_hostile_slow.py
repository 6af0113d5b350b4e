"""Slow and broken peers (issue #10, point 3): requests trickled byte by byte (slowloris) are cut
off at a deadline from their first byte, bodies are capped while they arrive, malformed HTTP gets
JSON answers, and a key server that hangs or answers garbage holds up only its own origin."""

from __future__ import annotations

import json
import socket
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from federation_invite.client import FederationClient
from federation_invite.inbound import InviteLimits
from federation_invite.web.site import FederationSite

from .invites import THEM, InviteScenario, _sign_request_lax, build_invite, event_id_of
from .support import make_key

MAX_BODY = 4096


def parse_responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], Any]]:
    """Split what a server wrote into ``(status, headers, JSON body)`` per response."""
    responses = []
    while data:
        head, separator, data = data.partition(b"\r\n\r\n")
        assert separator, f"incomplete response head: {head!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if status == 100:
            responses.append((status, headers, None))
            continue
        length = int(headers[b"content-length"])
        body, data = data[:length], data[length:]
        responses.append((status, headers, json.loads(body)))
    return responses


class Connection:
    """One client connection to a site over a ``StringTransport`` (no sockets)."""

    def __init__(self, site: Any) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "203.0.113.9", 40000))
        self.protocol = site.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)
        self.lost = False

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)

    def responses(self) -> list[tuple[int, dict[bytes, bytes], Any]]:
        return parse_responses(self.transport.value())

    def close(self) -> None:
        """The transport reports the connection gone (what a real socket does after closing)."""
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


def put_request(path: str, body: bytes, header: str, extra: bytes = b"") -> bytes:
    return (
        f"PUT {path} HTTP/1.1\r\nHost: us.example\r\nAuthorization: {header}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


class SiteTestCase(SynchronousTestCase):
    """A FederationSite over an InviteScenario's tree, on the scenario's Clock."""

    def setUp(self) -> None:
        self.s = InviteScenario(limits=InviteLimits(invitee_burst=100), max_body_bytes=MAX_BODY)
        self.clock: Clock = self.s.clock
        self.site = FederationSite(
            self.s.root,
            reactor=self.clock,
            max_body_bytes=MAX_BODY,
            request_timeout=30,
            idle_timeout=60,
        )

    def connect(self, site: Any = None) -> Connection:
        connection = Connection(site or self.site)
        self.addCleanup(connection.close)
        return connection

    def valid_request(self, depth: int = 1) -> bytes:
        room_version, event = self.s.invite(extra={"depth": depth})
        body = self.s.v2_body(room_version, event)
        path = self.s.path(2, event["room_id"], event_id_of(room_version, event))
        header = _sign_request_lax(self.s.their_key, THEM, "PUT", path, body)
        return put_request(path, json.dumps(body).encode(), header)

    def trickle(self, connection: Connection, data: bytes, interval: float) -> float:
        """Send ``data`` a byte every ``interval`` seconds until the server closes; the time taken."""
        started = self.clock.seconds()
        for index in range(len(data)):
            connection.send(data[index : index + 1])
            self.clock.advance(interval)
            if connection.closing:
                break
        return self.clock.seconds() - started

    def assertOnlyAnswer(self, connection: Connection, status: int, errcode: str) -> None:
        ((code, headers, body),) = connection.responses()
        self.assertEqual((code, body["errcode"]), (status, errcode), body)
        self.assertIsInstance(body["error"], str)
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertTrue(connection.closing, "the connection is closed")


class SlowlorisTests(SiteTestCase):
    def test_trickled_headers_cut_off_at_deadline(self) -> None:
        """Headers a byte a second (each byte resets Twisted's idle timeout): 408 M_UNKNOWN and
        the connection closed 30 s after the first byte; nothing was stored."""
        connection = self.connect()
        taken = self.trickle(connection, self.valid_request(), 1.0)
        self.assertAlmostEqual(taken, 30.0, places=6)
        self.assertOnlyAnswer(connection, 408, "M_UNKNOWN")
        self.assertEqual(self.s.store.invites, {})
        connection.close()
        self.assertEqual(self.clock.getDelayedCalls(), [], "no timer left behind")

    def test_pipelined_partial_request_gets_its_deadline(self) -> None:
        """A request answered at once followed, in the same packet, by the start of another:
        the second still has to arrive within the deadline (408 at 30 s)."""
        connection = self.connect()
        connection.send(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nX-a: 1\r\n")
        self.clock.advance(29)
        self.assertFalse(connection.closing)
        self.clock.advance(1)
        self.assertTrue(connection.closing)
        codes = [code for code, _, _ in connection.responses()]
        self.assertEqual(codes, [404, 408])

    def test_plain_site_would_hold_the_connection(self) -> None:
        """Why: behind Twisted's own Site the same trickle is still open after 10 minutes."""
        connection = self.connect(Site(self.s.root, reactor=self.clock, timeout=60))
        request = self.valid_request()
        for index in range(600):
            connection.send(request[index : index + 1])
            self.clock.advance(1.0)
        self.assertFalse(connection.closing)

    def test_trickled_body_cut_off_at_deadline(self) -> None:
        """Headers at once, then the body a byte every 0.1 s: 408 at 30 s from the first byte."""
        connection = self.connect()
        request = self.valid_request()
        head, _, body = request.partition(b"\r\n\r\n")
        connection.send(head + b"\r\n\r\n")
        self.clock.advance(5)
        taken = self.trickle(connection, body, 0.1)
        self.assertTrue(24.9 < taken < 25.11, taken)
        self.assertOnlyAnswer(connection, 408, "M_UNKNOWN")

    def test_slow_but_in_time_is_served_and_next_request_gets_its_own_deadline(self) -> None:
        """A request arriving whole in 29 s is served; on the same connection the next request's
        deadline counts from its own first byte, not from the connection's start."""
        connection = self.connect()
        request = self.valid_request()
        chunk = len(request) // 29 + 1
        for index in range(0, len(request), chunk):
            connection.send(request[index : index + chunk])
            self.clock.advance(1.0)
        self.assertEqual([r[0] for r in connection.responses()], [200])
        self.clock.advance(20)
        second = self.valid_request(depth=2)
        connection.send(second[:10])
        self.clock.advance(29)
        connection.send(second[10:])
        self.assertEqual([r[0] for r in connection.responses()], [200, 200])
        self.assertFalse(connection.closing)

    def test_processing_time_is_not_receive_time(self) -> None:
        """Once received, a request waiting on a slow key server is not cut off by the deadline."""
        self.s.federation.hold[THEM] = held = Deferred()
        connection = self.connect()
        connection.send(self.valid_request())
        self.clock.advance(100)
        self.assertEqual(connection.responses(), [])
        self.assertFalse(connection.closing)
        held.callback(None)
        self.assertEqual([r[0] for r in connection.responses()], [200])

    def test_idle_connection_closed(self) -> None:
        """A connection that never sends anything is closed after idle_timeout (60 s)."""
        connection = self.connect()
        self.clock.advance(59)
        self.assertFalse(connection.closing)
        self.clock.advance(1)
        self.assertTrue(connection.closing)
        self.assertEqual(connection.transport.value(), b"")

    def test_configured_timeouts(self) -> None:
        """request_timeout and idle_timeout are the site's parameters (the daemon's inbound.*)."""
        site = FederationSite(self.s.root, reactor=self.clock, request_timeout=2, idle_timeout=5)
        connection = self.connect(site)
        self.assertAlmostEqual(self.trickle(connection, self.valid_request(), 0.5), 2.0, places=6)
        self.assertOnlyAnswer(connection, 408, "M_UNKNOWN")
        idle = self.connect(site)
        self.clock.advance(5)
        self.assertTrue(idle.closing)


class BodyCapTests(SiteTestCase):
    def test_declared_length_over_cap_refused_before_body(self) -> None:
        """Content-Length over max_body_bytes: 413 M_TOO_LARGE right after the headers, the body
        never buffered, the connection closed."""
        connection = self.connect()
        connection.send(
            b"PUT /_matrix/federation/v2/invite/a/b HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n" % (10**12)
        )
        self.assertOnlyAnswer(connection, 413, "M_TOO_LARGE")
        connection.send(b"x" * 100_000)
        (request,) = connection.protocol.requests
        self.assertIsNone(getattr(request, "content", None), "no body buffer was made")

    def test_declared_length_over_cap_no_100_continue(self) -> None:
        """With Expect: 100-continue an oversized body is refused without inviting it."""
        connection = self.connect()
        connection.send(
            b"PUT /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)
        )
        self.assertOnlyAnswer(connection, 413, "M_TOO_LARGE")

    def test_chunked_body_refused_as_it_grows(self) -> None:
        """A chunked body (no length declared) is refused as soon as it passes the cap; what was
        buffered never exceeds the cap and later chunks are not read."""
        connection = self.connect()
        connection.send(
            b"PUT /_matrix/federation/v2/invite/a/b HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
        sent = 0
        while not connection.closing:
            connection.send(chunk)
            sent += 1
            self.assertLessEqual(sent, 5)
        self.assertEqual(sent, MAX_BODY // 1024 + 1)
        self.assertOnlyAnswer(connection, 413, "M_TOO_LARGE")
        (request,) = connection.protocol.requests
        self.assertLessEqual(request.content.tell(), MAX_BODY)
        connection.send(chunk * 10)
        self.assertEqual(request.content.tell(), MAX_BODY)

    def test_body_at_cap_accepted_by_the_site(self) -> None:
        """A body of exactly max_body_bytes passes the site (the resource then judges it)."""
        connection = self.connect()
        body = b" " * (MAX_BODY - 2) + b"{}"
        connection.send(
            b"PUT /_matrix/federation/v2/invite/a/b HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        ((code, _, answer),) = connection.responses()
        self.assertEqual((code, answer["errcode"]), (401, "M_UNAUTHORIZED"))
        self.assertFalse(connection.closing)

    def test_chunked_body_at_cap_for_a_resource_without_a_cap(self) -> None:
        """A chunked body of exactly max_body_bytes passes the site to a resource with no cap
        of its own (the version endpoint: 405 for a PUT); one byte more is refused by the
        site itself, 413 M_TOO_LARGE."""
        for size, status, errcode in (
            (MAX_BODY, 405, "M_UNRECOGNIZED"),
            (MAX_BODY + 1, 413, "M_TOO_LARGE"),
        ):
            connection = self.connect()
            connection.send(
                b"PUT /_matrix/federation/v1/version HTTP/1.1\r\nHost: x\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                b"%x\r\n%s\r\n0\r\n\r\n" % (size, b"x" * size)
            )
            ((code, _, answer),) = connection.responses()
            self.assertEqual((code, answer["errcode"]), (status, errcode), size)
            self.assertEqual(connection.closing, status == 413)


class MalformedHTTPTests(SiteTestCase):
    def test_malformed_requests_get_json_400(self) -> None:
        """Bad request lines, header syntax, oversized headers and bad chunking: JSON 400."""
        cases = [
            b"NONSENSE\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"PUT /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 600 + b"\r\n",
        ]
        for raw in cases:
            connection = self.connect()
            connection.send(raw)
            ((code, _, body),) = connection.responses()
            self.assertEqual((code, body["errcode"]), (400, "M_UNKNOWN"), raw[:40])
            self.assertTrue(connection.closing, raw[:40])


class KeyServerTests(SynchronousTestCase):
    def test_hanging_key_server_blocks_only_its_origin(self) -> None:
        """Origin A's key server hangs: B's invite is answered meanwhile; when A's fetch fails
        (the client's timeout), A gets 401 M_UNAUTHORIZED and nothing is stored for A."""
        s = InviteScenario(limits=InviteLimits(invitee_burst=100))
        b_key = make_key("b1")
        s.federation.add_key_server(s.clock, "b.example", [b_key])
        s.federation.hold[THEM] = held = Deferred()
        room_version, event_a = s.invite()
        pending = s.send(
            2,
            s.v2_body(room_version, event_a),
            room_id=event_a["room_id"],
            event_id=event_id_of(room_version, event_a),
        )
        s.client.flush()
        self.assertNoResult(pending)
        event_b = build_invite(
            room_version, b_key, sender="@b:b.example", server="b.example", extra={"depth": 2}
        )
        answer_b = s.send(
            2,
            s.v2_body(room_version, event_b),
            room_id=event_b["room_id"],
            event_id=event_id_of(room_version, event_b),
            key=b_key,
            origin="b.example",
        )
        s.client.flush()
        self.assertEqual(self.successResultOf(answer_b).code, 200)
        held.errback(TimeoutError("key server did not answer"))
        s.client.flush()
        response = self.successResultOf(pending)
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual((response.code, body["errcode"]), (401, "M_UNAUTHORIZED"))
        self.assertEqual(
            [r.origin for r in s.store.invites.values()], ["b.example"], "only B's invite stored"
        )


class _Silent(Protocol):
    """Accepts the connection and never says anything (a hung key server)."""


class _Garbage(Protocol):
    """Answers anything with bytes that are neither TLS nor HTTP."""

    def connectionMade(self) -> None:
        self.transport.write(b"\x00garbage\xff" * 100)


class RealKeyServerTests(TestCase):
    """The real FederationClient against hung and garbage-speaking servers on loopback."""

    timeout = 20

    def setUp(self) -> None:
        self.ports = []
        for protocol in (_Silent, _Garbage):
            port = reactor.listenTCP(0, Factory.forProtocol(protocol), interface="127.0.0.1")  # type: ignore[attr-defined]
            self.addCleanup(port.stopListening)
            self.ports.append(port.getHost().port)

    async def wait(self, s: InviteScenario, deferred: Deferred[Any], seconds: float) -> Any:
        results: list[Any] = []
        deferred.addBoth(results.append)
        for _ in range(int(seconds / 0.02)):
            s.client.flush()
            if results:
                return results[0]
            await deferLater(reactor, 0.02)
        return None

    def test_hung_and_garbage_key_servers(self) -> None:
        """A's key server hangs (0.5 s client timeout), C's speaks garbage: B is answered while A
        waits; A and C get 401 M_UNAUTHORIZED; a new connection after all that still works."""

        async def go() -> None:
            s = InviteScenario(limits=InviteLimits(invitee_burst=100))
            client = FederationClient(
                reactor,
                "us.example",
                make_key("c1"),
                ip_allowlist=["127.0.0.1/32"],
                verify_tls=False,
                timeout=0.5,
            )
            self.addCleanup(lambda: ensureDeferred(_close(client)))
            fake_get_json = s.federation.get_json

            def get_json(destination: str, path: str, **kwargs: Any) -> Deferred[Any]:
                if destination.startswith("127.0.0.1:"):
                    return client.get_json(destination, path, **kwargs)
                return fake_get_json(destination, path, **kwargs)

            s.federation.get_json = get_json  # type: ignore[method-assign]
            b_key = make_key("b1")
            s.federation.add_key_server(s.clock, "b.example", [b_key])
            hung, garbage = (f"127.0.0.1:{port}" for port in self.ports)
            room_version = s.invite()[0]

            def send(origin: str, key: Any, depth: int) -> Deferred[Any]:
                event = build_invite(
                    room_version, key, sender=f"@x:{origin}", server=origin, extra={"depth": depth}
                )
                return s.send(
                    2,
                    s.v2_body(room_version, event),
                    room_id=event["room_id"],
                    event_id=event_id_of(room_version, event),
                    key=key,
                    origin=origin,
                )

            started = reactor.seconds()  # type: ignore[attr-defined]
            from_a = send(hung, make_key("a1"), 1)
            from_c = send(garbage, make_key("g1"), 2)
            from_b = send("b.example", b_key, 3)
            s.client.flush()
            self.assertEqual(self.successResultOf(from_b).code, 200)
            self.assertNoResult(from_a)
            for deferred in (from_c, from_a):
                response = await self.wait(s, deferred, 5)
                self.assertIsNotNone(response, "answered within the timeout")
                body = json.loads(self.successResultOf(response.content()))
                self.assertEqual((response.code, body["errcode"]), (401, "M_UNAUTHORIZED"))
            elapsed = reactor.seconds() - started  # type: ignore[attr-defined]
            self.assertLess(elapsed, 3.0)

        return ensureDeferred(go())  # type: ignore[return-value]


async def _close(client: FederationClient) -> None:
    close = getattr(client, "close", None)
    if close is not None:
        await close()


class RealSocketTests(TestCase):
    """The FederationSite on a real loopback port with the real reactor."""

    timeout = 20

    def test_slowloris_over_a_socket_while_others_are_served(self) -> None:
        """A byte every 50 ms over TCP: 408 and closed at the 0.5 s deadline, while a normal
        client on another connection is answered; an oversized Content-Length gets 413 at once."""

        async def go() -> None:
            s = InviteScenario()
            site = FederationSite(
                s.root, reactor=reactor, request_timeout=0.5, idle_timeout=5, max_body_bytes=1024
            )
            port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
            self.addCleanup(port.stopListening)
            number = port.getHost().port
            slow = socket.create_connection(("127.0.0.1", number))
            self.addCleanup(slow.close)
            slow.setblocking(False)
            request = b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: x\r\n\r\n"
            received = b""
            started = reactor.seconds()  # type: ignore[attr-defined]
            served = False
            closed_at = None
            for index in range(200):
                try:
                    slow.send(request[index : index + 1])
                except OSError:
                    pass
                if not served:
                    response = await treq.get(
                        f"http://127.0.0.1:{number}/_matrix/federation/v1/version",
                        persistent=False,
                    )
                    self.assertEqual(response.code, 200)
                    await response.content()
                    served = True
                await deferLater(reactor, 0.05)
                try:
                    chunk = slow.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    closed_at = reactor.seconds() - started  # type: ignore[attr-defined]
                    break
                received += chunk
            self.assertTrue(served)
            self.assertIsNotNone(closed_at, "the server closed the slow connection")
            assert closed_at is not None
            self.assertLess(closed_at, 2.0)
            ((code, _, body),) = parse_responses(received)
            self.assertEqual((code, body["errcode"]), (408, "M_UNKNOWN"))

            big = socket.create_connection(("127.0.0.1", number))
            self.addCleanup(big.close)
            big.sendall(b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
            big.setblocking(False)
            answer = b""
            for _ in range(100):
                await deferLater(reactor, 0.02)
                try:
                    chunk = big.recv(4096)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                answer += chunk
            ((code, _, body),) = parse_responses(answer)
            self.assertEqual((code, body["errcode"]), (413, "M_TOO_LARGE"))

        return ensureDeferred(go())  # type: ignore[return-value]
