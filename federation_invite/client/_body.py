"""Read an HTTP response body into memory, refusing to read more than a cap."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

__all__ = ["MAX_BODY_PIECES", "BodyTooLarge", "discard_body", "read_body"]

#: Most pieces (``dataReceived`` calls: chunks of a chunked body, reads of the
#: connection) a body may arrive in. Real bodies come in pieces of kilobytes (TLS
#: records are up to 16 KiB); one in tiny chunks (2 bytes each under the 1 MiB cap:
#: ~350,000) costs twisted.web's decoder and us work per piece, about a second of CPU.
#: 16,384 pieces is 64 bytes each on average for a 1 MiB body.
MAX_BODY_PIECES = 16_384


class BodyTooLarge(Exception):
    """The response body is longer than the caller is willing to read, or arrives in
    more than ``MAX_BODY_PIECES`` pieces."""

    def __init__(self, max_bytes: int, reason: str | None = None) -> None:
        self.max_bytes = max_bytes
        super().__init__(reason or f"response body exceeds {max_bytes} bytes")


class _CappedReader(Protocol):
    def __init__(self, finished: Deferred[bytes], max_bytes: int) -> None:
        self._finished = finished
        self._max_bytes = max_bytes
        #: The body so far, in one buffer: a list of the pieces would cost an object
        #: (~40 bytes or more) per piece, however small.
        self._body = bytearray()
        self._pieces = 0
        self.done = False

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        self._pieces += 1
        if len(self._body) + len(data) > self._max_bytes:
            self._refuse(BodyTooLarge(self._max_bytes))
        elif self._pieces > MAX_BODY_PIECES:
            reason = f"response body in more than {MAX_BODY_PIECES} pieces"
            self._refuse(BodyTooLarge(self._max_bytes, reason))
        else:
            self._body += data

    def _refuse(self, error: BodyTooLarge) -> None:
        self.done = True
        self._body = bytearray()
        self.abort()
        self._finished.errback(error)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.done:
            return
        self.done = True
        # PotentialDataLoss: an HTTP/1.0-style body delimited by the connection
        # closing; what arrived is all there is.
        if reason.check(ResponseDone, PotentialDataLoss):
            body, self._body = bytes(self._body), bytearray()
            self._finished.callback(body)
        else:
            self._finished.errback(reason)

    def abort(self) -> None:
        """Stop reading: the connection is dropped rather than drained."""
        # The transport handed to a body protocol is an IPushProducer proxy.
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()


def discard_body(response: IResponse) -> None:
    """Stop ``response``'s body: the connection is dropped (unless already done with),
    rather than held, unread, until garbage collection."""
    reader = _CappedReader(Deferred(), 0)
    reader.done = True
    response.deliverBody(reader)
    reader.abort()


def read_body(response: IResponse, max_bytes: int) -> Deferred[bytes]:
    """The whole body of ``response``; fails with ``BodyTooLarge`` past ``max_bytes``, or
    past ``MAX_BODY_PIECES`` pieces.

    A declared ``Content-Length`` over the cap fails at once without reading.
    Cancelling the returned Deferred drops the connection.
    """
    if response.length is not UNKNOWN_LENGTH and response.length > max_bytes:
        discard_body(response)
        return fail(BodyTooLarge(max_bytes))
    reader: _CappedReader

    def cancel(_: Deferred[Any]) -> None:
        reader.done = True
        reader.abort()

    finished: Deferred[bytes] = Deferred(cancel)
    reader = _CappedReader(finished, max_bytes)
    response.deliverBody(reader)
    return finished
