"""Tests for federation_invite.client._body: reading a peer's response body within bounds."""

from __future__ import annotations

from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseFailed
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from federation_invite.client import FederationClient, RemoteError
from federation_invite.client._body import MAX_BODY_PIECES, BodyTooLarge, read_body
from federation_invite.client.testing import FakePeersAgent


class _Response:
    """The body side of an ``IResponse``: ``feed`` delivers pieces to the body protocol."""

    length: Any = UNKNOWN_LENGTH

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.protocol: Protocol | None = None

    def deliverBody(self, protocol: Protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def feed(self, pieces: list[bytes]) -> None:
        assert self.protocol is not None
        for piece in pieces:
            if self.transport.producerState == "stopped":
                return
            self.protocol.dataReceived(piece)
        self.protocol.connectionLost(Failure(ResponseDone()))


class ReadBodyTests(SynchronousTestCase):
    """read_body keeps the body in one buffer and refuses one in absurdly many pieces."""

    def read(self, pieces: list[bytes], max_bytes: int = 1_048_576) -> Any:
        response = _Response()
        reading = read_body(response, max_bytes)  # type: ignore[arg-type]
        response.feed(pieces)
        return reading, response.transport

    def test_pieces_joined(self) -> None:
        """The body is the pieces' bytes in order, however they were cut."""
        pieces = [bytes([n % 256]) * (n % 7) for n in range(1000)]
        reading, _ = self.read(pieces)
        self.assertEqual(self.successResultOf(reading), b"".join(pieces))
        self.assertIsInstance(self.successResultOf(self.read([])[0]), bytes)

    def test_many_pieces_within_bound(self) -> None:
        """MAX_BODY_PIECES pieces of one byte are read."""
        pieces = [b"ab"[n % 2 : n % 2 + 1] for n in range(MAX_BODY_PIECES)]
        reading, transport = self.read(pieces)
        self.assertEqual(self.successResultOf(reading), b"ab" * (MAX_BODY_PIECES // 2))
        self.assertEqual(transport.producerState, "producing")

    def test_too_many_pieces(self) -> None:
        """One piece more is refused, far under the byte cap, and the connection dropped."""
        # README.md, limits table: a body "refused once it has come in more than 16,384 pieces".
        self.assertEqual(MAX_BODY_PIECES, 16_384)
        reading, transport = self.read([b"x"] * (MAX_BODY_PIECES + 1))
        error = self.failureResultOf(reading, BodyTooLarge).value
        self.assertEqual(str(error), f"response body in more than {MAX_BODY_PIECES} pieces")
        self.assertEqual(transport.producerState, "stopped")

    def test_byte_cap_still_holds(self) -> None:
        reading, transport = self.read([b"x" * 10] * 11, max_bytes=100)
        error = self.failureResultOf(reading, BodyTooLarge).value
        self.assertEqual(str(error), "response body exceeds 100 bytes")
        self.assertEqual(transport.producerState, "stopped")


class ReadBodyEndTests(SynchronousTestCase):
    """How a body read ends: its connection closing, lost mid-way, or the read cancelled."""

    def start(self) -> tuple[Any, Protocol, _Response]:
        response = _Response()
        reading = read_body(response, 100)  # type: ignore[arg-type]
        assert response.protocol is not None
        response.protocol.dataReceived(b'{"ok": ')
        return reading, response.protocol, response

    def test_body_ended_by_the_connection_closing(self) -> None:
        """A body without Content-Length or chunking, ended by the peer closing the
        connection (HTTP/1.0 style: twisted.web reports PotentialDataLoss), is the
        whole body."""
        reading, protocol, _ = self.start()
        protocol.dataReceived(b"true}")
        protocol.connectionLost(Failure(PotentialDataLoss()))
        self.assertEqual(self.successResultOf(reading), b'{"ok": true}')

    def test_body_cut_short_fails(self) -> None:
        """A body whose connection is lost mid-way fails the read with that reason at once
        (not left to the request's timeout)."""
        reading, protocol, _ = self.start()
        protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionError())])))
        self.failureResultOf(reading, ResponseFailed)

    def test_cancelled_read_ignores_the_connection_lost_after(self) -> None:
        """Cancelling a read drops the connection, and the connectionLost that follows is
        ignored (not fired into the cancelled Deferred again: AlreadyCalledError)."""
        reading, protocol, response = self.start()
        reading.cancel()
        self.failureResultOf(reading, CancelledError)
        self.assertEqual(response.transport.producerState, "stopped")
        protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionError())])))


class _TinyChunks(Resource):
    """Answers a chunked JSON body written one byte per chunk."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request: Request) -> Any:
        for index in range(len(self.body)):
            request.write(self.body[index : index + 1])
        request.finish()
        return NOT_DONE_YET


class ClientBodyPiecesTests(SynchronousTestCase):
    """Through FederationClient: a chunked body of tiny chunks under the 1 MiB cap is
    refused past MAX_BODY_PIECES chunks, as a RemoteError (as a body too large is)."""

    def client(self, body: bytes) -> FederationClient:
        peers = FakePeersAgent({"remote.example": _TinyChunks(body)})
        return FederationClient(Clock(), "local.example", generate_signing_key("k"), agent=peers)

    def test_tiny_chunks(self) -> None:
        body = b'{"a":"' + b"x" * (MAX_BODY_PIECES - 8) + b'"}'
        self.assertEqual(len(body), MAX_BODY_PIECES)
        result = self.successResultOf(self.client(body).get_json("remote.example", "/x"))
        self.assertEqual(result, {"a": "x" * (MAX_BODY_PIECES - 8)})
        body = b'{"a":"' + b"x" * (MAX_BODY_PIECES - 7) + b'"}'
        requesting = self.client(body).get_json("remote.example", "/x")
        error = self.failureResultOf(requesting, RemoteError).value
        self.assertEqual((error.status, error.errcode), (200, None))
        self.assertEqual(error.message, f"response body in more than {MAX_BODY_PIECES} pieces")
