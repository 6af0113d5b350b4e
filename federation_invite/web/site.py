"""The HTTP server the daemon listens with: a ``Site`` that bounds what one peer can hold.

Twisted's ``HTTPChannel`` has only an idle timeout, and every byte received
resets it, so a peer sending a request one byte at a time (slowloris) keeps a
connection and its buffers for as long as it likes; a body is buffered (to a
temporary file past 100 kB) before any resource sees it. ``FederationSite``
adds, per connection:

- a deadline from the first byte of each request until all of it (request
  line, headers, body) has arrived: ``request_timeout`` seconds, then 408
  ``M_UNKNOWN`` and the connection is closed. A request pipelined behind one
  still being handled is held by Twisted unparsed; its deadline runs all the
  same, from its own first byte, and its 408 follows the earlier answer;
- a body cap enforced while the body arrives: a ``Content-Length`` over
  ``max_body_bytes`` is refused before a byte of the body is read, and a
  chunked body is refused as soon as it grows past the cap: 413
  ``M_TOO_LARGE``, and the connection is closed;
- Twisted's idle timeout set to ``idle_timeout`` (Twisted's default is 60 s);
- malformed HTTP answered with a JSON 400 ``M_UNKNOWN`` instead of Twisted's bare
  ``400 Bad Request``, and the asterisk-form target (``OPTIONS *``) with a JSON
  404 ``M_UNRECOGNIZED`` instead of Twisted's empty 200 or 405, so that every
  answer we give is JSON. A request target with a byte outside visible ASCII
  (0x21-0x7e, RFC 9112 section 3.2) is malformed: Twisted's own check compares
  with decimal 176 where octal 0o176 was meant, and lets DEL and 0x80-0xb0 in.
  So is a ``Content-Length`` of more than 18 digits: Twisted reads any number
  of them with ``int()``, which raises past 4300, and the peer got no answer;
  and, as RFC 9112 (section 3.2) requires, an HTTP/1.1 request without a
  ``Host`` line, or any request with two or with an invalid value (Twisted
  does not look at it);
- no POST body parsed as a form (``application/x-www-form-urlencoded``,
  ``multipart/form-data``) before dispatch: nothing we serve reads form
  arguments, and Twisted's parser, run on any path before any resource,
  costs CPU and memory for nothing and can crash on a multipart part named
  with RFC 2231 syntax (``name*=``). Should Twisted still fail to take in a
  request (an exception out of ``requestReceived``), the peer gets a JSON 400
  ``M_UNKNOWN`` and the connection is closed, and one error line is logged;
- a refusal of a HEAD request (413, 408 or 400 once its request line is
  read; 414 or 408 before, told from the line's start) has the status line
  and headers of GET's, its ``Content-Length`` included, and no body (RFC
  9110, section 9.3.2);
- the absolute-form target (``PUT https://host/_matrix/...``), which a server
  must accept (RFC 9112, section 3.2.2), served as its path and query (the
  origin-form) would be: Twisted takes the whole URI for the path, so it was
  404. Only ``http`` and ``https``; the scheme and authority are otherwise
  ignored, as we do no virtual hosting. ``uri``, ``path``, ``args`` and the
  ``uri`` checked against the X-Matrix signature are the origin-form's;
- no access-log line for requests whose handler logs their outcome itself
  (``mark_outcome_logged``: the invite endpoints, one structured line per invite);
  the other requests' lines are Twisted's combined log format with each field
  a peer chooses (method, target, ``Referer``, ``User-Agent``) cut to its first
  200 bytes before it is escaped, so a peer does not choose their length;
- a request refused here (413, 408 or 400 once its request line is read) is
  told to the resource it was for, if that asks to hear (``refused_by_site``):
  the invite endpoints count and log it as they do their own refusals, in
  place of the site's own line. So is a request whose connection is lost
  (its sender went away, or a drain abandoned it) after its request line was
  read and before it arrived whole, with no error: the invite endpoints count
  it ``cancelled``, as one whose sender goes away before its answer;
- a graceful drain for shutdown (``drain``): no new connections; idle
  connections closed; requests in progress answered (then their connections
  closed) within a grace period, and the connections still open at its end
  aborted, their requests abandoned, whether unanswered or answered but not
  yet sent in full (the peer does not read). Requests a peer pipelined behind
  one in progress, which Twisted holds unparsed, are dropped unanswered, as
  RFC 9112 allows (section 9.3.2: the client retries them). The drain reports
  each figure (``DrainResult``).

Every connection we close ourselves (a refusal, or an idle one the drain
closes) is aborted ``abortTimeout`` (15) seconds later if the close has not
completed by then: a close waits for what we wrote to be sent, which a peer
that does not read holds up for good. (A connection the drain closes after its
answer is aborted at the end of the grace period instead.)

Only HTTP/1.x is spoken (no HTTP/2 negotiation), which is what federation peers use.
The resources below still apply their own checks (``web/invite.py`` also refuses
oversized bodies), so an embedder mounting our tree in a plain ``Site`` keeps
the protocol checks, though not these connection limits nor the request-target
handling.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IAccessLogFormatter, IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import provider

from ..core.errors import Codes, MatrixError
from ..logs import Logger
from ._base import not_found, write_error

__all__ = ["DrainResult", "FederationSite", "SiteRefusal", "mark_outcome_logged"]

log = Logger(namespace="federation_invite.web.site")

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
}


def _raw_error_response(error: MatrixError, head: bool = False) -> bytes:
    """A complete HTTP/1.1 response carrying ``error``, for a connection about to close.

    With ``head`` (the answer to a HEAD request), the same status line and headers,
    ``Content-Length`` included, and no body: a HEAD answer has none (RFC 9110, section 9.3.2).
    """
    body = json.dumps(error.to_json(), ensure_ascii=True).encode("ascii")
    reason = _REASONS.get(error.http_status, b"Error")
    start = (
        b"HTTP/1.1 %d %s\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"Cache-Control: no-cache, no-store, must-revalidate\r\n"
        b"Connection: close\r\n\r\n"
    ) % (error.http_status, reason, len(body))
    return start if head else start + body


def _begins_head(data: bytes) -> bool:
    """Whether ``data``, the start of a request whose request line is not parsed yet, is
    a HEAD request's: its request line (after the empty lines a server ignores) begins
    with the method ``HEAD`` and its space."""
    return data.lstrip(b"\r\n").startswith(b"HEAD ")


def _begins_request(data: bytes) -> bool:
    """Whether ``data`` holds a request's first byte: anything but the empty lines a
    server ignores before a request line (RFC 9112, section 2.2)."""
    return bool(data.strip(b"\r\n"))


#: The most digits of a ``Content-Length`` we read: 18 (under 1 EB), more than
#: any body could be, and few enough for ``int`` (Python refuses past 4300).
_MAX_CONTENT_LENGTH_DIGITS = 18

#: A chunk-size line (RFC 9112, section 7.1): 1*HEXDIG, at most 16 of them
#: (64 bits), then the chunk extensions, if any. ``int(x, 16)`` alone would
#: also take a sign, spaces and underscores.
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;.*)?", re.DOTALL)


def _count_requests(data: bytes) -> int:
    """How many requests begin in ``data``: bytes received behind a request in progress,
    which Twisted holds unparsed, and which a drain drops.

    Each request is stepped over (request line and header fields, then a body of
    its ``Content-Length`` or chunked); one that cannot be (incomplete, or
    malformed) counts as one request, the last. Empty lines between requests are
    none (``_begins_request``). Every step moves forward, and each byte is read
    a bounded number of times: linear in ``len(data)``, whatever the peer sent.
    """
    count = 0
    position = 0
    while True:
        while position < len(data) and data[position] in b"\r\n":
            position += 1
        if position >= len(data):
            return count
        count += 1
        end = data.find(b"\r\n\r\n", position)
        if end < 0:
            return count
        length = 0
        chunked = False
        for line in data[position:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                # bytes.isdigit: ASCII digits only.
                if not value.isdigit() or len(value) > _MAX_CONTENT_LENGTH_DIGITS:
                    return count
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.lower() == b"chunked"
        position = end + 4
        if chunked:
            position = _skip_chunked_body(data, position)
            if position < 0:
                return count
        else:
            position += length


def _skip_chunked_body(data: bytes, position: int) -> int:
    """Where the chunked body beginning at ``position`` in ``data`` ends (past
    ``position``); -1 if it does not, or if a chunk-size line is malformed."""
    while True:
        end = data.find(b"\r\n", position)
        if end < 0:
            return -1
        size_line = _CHUNK_SIZE_LINE.fullmatch(data, position, end)
        if size_line is None:
            return -1
        size = int(size_line[1], 16)  # 0 <= size < 2**64
        position = end + 2
        if size == 0:
            break
        position += size + 2
    # The trailer section: field lines up to an empty one.
    end = data.find(b"\r\n", position)
    while end > position:
        position = end + 2
        end = data.find(b"\r\n", position)
    return -1 if end < 0 else end + 2


#: The bytes a request target may have: visible ASCII (RFC 9112, section 3.2;
#: RFC 3986). Twisted's own check lets DEL and 0x80-0xb0 through as well.
_VISIBLE_ASCII = bytes(range(0x21, 0x7F))

#: The absolute-form of an ``http`` or ``https`` target (RFC 9112, section 3.2.2):
#: the authority, and then the path and query.
_ABSOLUTE_FORM = re.compile(rb"(?i:https?)://([^/?#]*)(.*)", re.DOTALL)


def _origin_form(target: bytes) -> bytes:
    """``target`` in origin-form: an ``http`` or ``https`` absolute-form target reduced to
    its path and query (``/`` if its path is empty, RFC 9112 section 3.2.1).

    A server must accept the absolute-form (RFC 9112, section 3.2.2). We do no
    virtual hosting: the scheme and authority are ignored, as is the ``Host``
    header (which that section says the authority overrides), so a request
    for another host is routed as one for us would be. Any other target is
    returned as it is: origin-form, asterisk-form (``*``), authority-form
    (``host:port``), other schemes, and ``http`` URIs with no host or with
    user information, which RFC 9110 (sections 4.2.1 and 4.2.4) has a recipient
    reject: none of those is a path we serve (404).
    """
    if target[:1] == b"/":
        return target
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        return target
    authority, rest = match.groups()
    if not authority or b"@" in authority:
        return target
    return rest if rest[:1] == b"/" else b"/" + rest


#: A valid ``Host`` value (RFC 9110 section 7.2: ``uri-host [ ":" port ]``, RFC 3986):
#: an IP-literal (IPv6 or IPvFuture in brackets), or an IPv4 address or registered
#: name (unreserved, sub-delims, percent-encoded); then an optional port. Empty is
#: valid (a target with no authority, RFC 9112 section 3.2).
_HOST = re.compile(
    rb"(?:\[(?:[0-9A-Fa-f:.]+|[vV][0-9A-Fa-f]+\.[0-9A-Za-z._~!$&'()*+,;=:-]+)\]"
    rb"|(?:[0-9A-Za-z._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)"
    rb"(?::[0-9]*)?"
)


def _host_problem(version: bytes, hosts: list[bytes] | None) -> str | None:
    """Why a request of HTTP ``version`` with these ``Host`` lines must be answered 400, if
    it must: RFC 9112 (section 3.2) has a server refuse an HTTP/1.1 request without
    ``Host``, and any request with more than one or with an invalid value."""
    if not hosts:
        return "Missing Host header" if version != b"HTTP/1.0" else None
    if len(hosts) > 1:
        return "More than one Host header"
    if _HOST.fullmatch(hosts[0]) is None:
        return "Invalid Host header"
    return None


class _Dropped(Protocol):
    """A connection accepted while draining: aborted as soon as it is made."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class _LimitedChannel(HTTPChannel):
    """``HTTPChannel`` with a per-request receive deadline and a body cap (see the module doc)."""

    #: Set by ``FederationSite.buildProtocol``.
    request_timeout: float | None = None
    max_body_bytes: int | None = None

    _deadline: IDelayedCall | None = None
    #: When (by the reactor's clock) the deadline last started: the first byte of
    #: the request being received, for the latency of a refusal (``SiteRefusal``).
    _request_started: float | None = None
    #: Set when the deadline passes while an earlier request is being handled
    #: (answers go in order, so the verdict waits for that answer): how many
    #: bytes have arrived since. The late request is served only if it proves
    #: complete without them.
    _late: int | None = None
    #: True while Twisted replays the bytes it held behind a handled request.
    _replaying = False
    #: Once a request is refused here, nothing more is read from the connection.
    refused = False
    #: The connection's local address, once asked for.
    _host: IAddress | None = None
    #: The site whose drain must hear of this connection; set by ``FederationSite.buildProtocol``.
    owner: FederationSite | None = None
    #: Set when the site drains: the request in progress is answered, then the connection closed.
    closing_after_request = False
    #: Set when the drain ends this keep-alive connection after its request in
    #: progress, until the requests pipelined behind that one are counted.
    _drops_pipelined = False

    def getHost(self) -> IAddress:
        """The local address, asked of the transport once per connection.

        ``twisted.web`` asks for it with every request, and for TCP each ask is a
        ``getsockname`` system call; a connection's local address never changes.
        """
        if self._host is None:
            self._host = super().getHost()
        return self._host

    # -- the deadline --------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if (
            self._deadline is None
            and self._late is None
            and self.request_timeout is not None
            and _begins_request(data)
        ):
            # The first byte of a request: from now it has request_timeout
            # seconds to arrive whole, however it trickles in, and whether or
            # not an earlier request is still being handled.
            self._start_deadline()
        super().dataReceived(data)

    def _start_deadline(self) -> None:
        assert self.request_timeout is not None
        self._deadline = self.callLater(self.request_timeout, self._too_slow)
        self._request_started = self._deadline.getTime() - self.request_timeout

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self._handlingRequest:
            # The late request is held, unparsed, behind one being handled,
            # whose answer must come first: the verdict waits for it
            # (setLineMode), counting what arrives meanwhile.
            self._late = 0
            return
        self._refuse_too_slow()

    def _refuse_too_slow(self) -> None:
        self._late = None
        if self.refused:
            return
        logged = self.refuse(
            MatrixError(
                408,
                Codes.UNKNOWN,
                f"The request was not received within {self.request_timeout:g} seconds",
            )
        )
        if not logged:
            log.info(
                "Closing connection from {peer}: request not received within {timeout} s",
                peer=str(self.transport.getPeer()) if self.transport else "?",
                timeout=self.request_timeout,
            )

    # -- the body cap ----------------------------------------------------

    def allHeadersReceived(self) -> None:
        problem = _host_problem(
            self._version, self.requests[-1].requestHeaders.getRawHeaders(b"host")
        )
        if problem is not None:
            # Its value is not used otherwise: we do no virtual hosting, and an
            # absolute-form target's authority overrides it (RFC 9112 3.2.2).
            self.refuse(MatrixError(400, Codes.UNKNOWN, problem))
            return
        declared = self.length
        if self.max_body_bytes is not None and declared and declared > self.max_body_bytes:
            # Refused before gotLength buffers anything and before a
            # "100 Continue" invites the body.
            self.refuse_too_large()
            return
        super().allHeadersReceived()
        if self.closing_after_request:
            # Headers completed during a drain: checkPersistence has just
            # made the connection persistent again.
            self.close_after_request()

    def refuse_too_large(self) -> None:
        """The body is (or would be) larger than ``max_body_bytes``: 413, and close."""
        if self.refused:
            return
        logged = self.refuse(
            MatrixError(413, Codes.TOO_LARGE, f"Request body exceeds {self.max_body_bytes} bytes")
        )
        if not logged:
            log.info(
                "Refusing a request body over {limit} bytes from {peer}",
                limit=self.max_body_bytes,
                peer=str(self.transport.getPeer()) if self.transport else "?",
            )

    # -- refusing ----------------------------------------------------------

    def refuse(
        self,
        error: MatrixError,
        request_line: tuple[bytes, bytes] | None = None,
        unparsed: bytes | None = None,
    ) -> bool:
        """Answer ``error`` at once, stop reading, and close the connection.

        ``request_line``: the method and target of the request refused; by
        default, those of the request being parsed, once its request line is
        (Twisted keeps them until the request is received whole). Before
        then, ``unparsed`` (by default the bytes buffered) is the start of
        the request, which tells a HEAD's answer: it has no body. The
        resource the request was for hears of the refusal if it asks to
        (``FederationSite.refused``); returns whether it logged it itself.
        """
        if self.refused:
            return False
        self.refused = True
        self._cancel_deadline()
        self.setTimeout(None)
        if self.transport is None:
            return False
        if request_line is None and hasattr(self, "_command"):
            request_line = self._command, self._path
        if request_line is not None:
            head = request_line[0] == b"HEAD"
        else:
            if unparsed is None:
                unparsed = self._buffer or b"".join(self._dataBuffer)
            head = _begins_head(unparsed)
        self.transport.write(_raw_error_response(error, head))
        self._close()
        if request_line is None or self.owner is None:
            return False
        return self._tell(request_line, error)

    def _tell(self, request_line: tuple[bytes, bytes], error: MatrixError | None) -> bool:
        """Tell the resource the request was for (``FederationSite.refused``) what became of
        it: refused with ``error``, or (None) lost before it was received whole."""
        assert self.owner is not None and self.transport is not None
        host = getattr(self.transport.getPeer(), "host", None)
        started = self._request_started
        return self.owner.refused(
            SiteRefusal(
                request_line[0],
                _origin_form(request_line[1]).split(b"?", 1)[0],
                error,
                host if isinstance(host, str) else None,
                0.0 if started is None else self.owner.reactor.seconds() - started,
            )
        )

    def _lost_mid_request(self) -> None:
        """The connection is lost or aborted: a request whose request line was read and which
        was neither received whole (Twisted then hands it to its resource, and forgets its
        request line) nor refused here is told to its resource as lost (``SiteRefusal`` with
        no error), once: nothing more is read from the connection."""
        if self.refused:
            return
        self.refused = True
        self._cancel_deadline()
        if self.owner is not None and self.transport is not None and hasattr(self, "_command"):
            self._tell((self._command, self._path), None)

    def _close(self) -> None:
        """Close the connection, and abort it if it has not closed within ``abortTimeout``.

        A close completes only once what we wrote is sent, so a peer that does
        not read would otherwise hold the socket (and its buffers) for good.
        """
        self.loseConnection()
        if self.abortTimeout is not None and self._abortingCall is None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def request_failed(
        self, request: http.Request, command: bytes, target: bytes, error: Exception
    ) -> None:
        """Twisted failed to take in a whole request (``_LimitedRequest.requestReceived``):
        400 ``M_UNKNOWN`` unless an answer was begun, and close; one log line."""
        log.error(
            "Could not take in {method} {target} from {peer}: {error}",
            method=command.decode("ascii", "replace")[:16],
            target=target.decode("ascii", "replace")[:200],
            peer=str(self.transport.getPeer()) if self.transport else "?",
            error=f"{type(error).__name__}: {error}"[:200],
        )
        if request.startedWriting:
            # Part of an answer is out: no other can follow it; end the connection.
            self.refused = True
            self._cancel_deadline()
            self.setTimeout(None)
            self.abort()
            return
        self.refuse(MatrixError(400, Codes.UNKNOWN, "Malformed HTTP request"), (command, target))

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's malformed-request answer (bad request line, header too
        # long, bad chunking...), in JSON like every other answer of ours.
        self.refuse(MatrixError(400, Codes.UNKNOWN, "Malformed HTTP request"))

    def headerReceived(self, line: bytes) -> bool:
        # A Content-Length of 1 to 18 ASCII digits (RFC 9110, section 8.6),
        # else 400: Twisted refuses non-digits, but calls int() on any number
        # of digits, and past 4300 that raises out of dataReceived (no answer,
        # the connection dropped). A field name is a token, which Twisted
        # matches case-insensitively, so the prefix is the whole name; the
        # rest of the line is looked at for this field only. Twisted refuses
        # a second Content-Length itself, even with the same value.
        #
        # A Transfer-Encoding is one ``chunked`` coding (RFC 9112 section 6.3:
        # chunked last, and the only coding we accept), else 400 and close.
        # Twisted refuses a value other than ``chunked`` or ``identity`` on a
        # line, and a second ``chunked`` line or one beside Content-Length (each
        # would set a second decoder), but takes ``identity`` for nothing: then
        # ``chunked`` and ``identity`` on two lines (one field, RFC 9110 section
        # 5.3), or ``identity`` alone, were framed and the connection kept.
        name = line[:18].lower()
        if name[:15] == b"content-length:":
            value = line[15:].strip(b" \t")
            if not value.isdigit() or len(value) > _MAX_CONTENT_LENGTH_DIGITS:
                self._respondToBadRequestAndDisconnect()
                return False
        elif name == b"transfer-encoding:" and line[18:].strip(b" \t").lower() != b"chunked":
            self._respondToBadRequestAndDisconnect()
            return False
        return super().headerReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # A request or header line over 16 KiB: Twisted would just hang up. Until
        # its request line is read, a request has no ``_command``: that line is
        # the long one, its target longer than we parse (RFC 9112 section 3: 414).
        if hasattr(self, "_command"):
            self.refuse(MatrixError(400, Codes.UNKNOWN, "Header line too long"))
        else:
            self.refuse(MatrixError(414, Codes.TOO_LARGE, "Request line too long"), unparsed=line)

    def lineReceived(self, line: bytes) -> None:
        if self.refused:
            return
        requests = len(self.requests)
        super().lineReceived(line)
        if (
            len(self.requests) > requests
            and not self.refused
            and self._path.translate(None, _VISIBLE_ASCII)
        ):
            # A request line Twisted accepted, whose target (``_path``) has a
            # byte Twisted's check misses.
            self._respondToBadRequestAndDisconnect()

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if self._late is not None and not self._replaying:
            self._late += len(data)  # arrived after the late request's deadline
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if self.refused:
            return
        if self._replaying:
            if not self._replayed_request_in_time():
                return
        else:
            self._cancel_deadline()
            if _begins_request(self._buffer) or any(map(_begins_request, self._dataBuffer)):
                # The next request began in the same packet as this one ended.
                self._start_deadline()
        super().allContentReceived()

    def _replayed_request_in_time(self) -> bool:
        """Whether a request parsed from held bytes arrived whole within its deadline.

        What Twisted held is parsed in order, and what is not parsed yet is
        the newest part of it: the request arrived whole in time if no byte
        received after its deadline lies within it. The next request, if it
        began among the held bytes, keeps this one's deadline: its own first
        byte came no earlier, and when is not recorded, so its deadline may
        be early (even passed already) but is never late. Bytes Twisted left
        unread (it stops reading past 16 KiB held) count as not arrived.
        """
        unparsed = len(self._buffer) + sum(map(len, self._dataBuffer))
        if self._late is not None:
            if unparsed < self._late:
                self._refuse_too_slow()
                return False
            if not unparsed:
                self._late = None
        elif not unparsed:
            self._cancel_deadline()
        return True

    def setLineMode(self, extra: bytes = b"") -> Any:
        if not extra:
            return super().setLineMode()
        # requestDone replays the bytes received while a request was handled.
        replaying, self._replaying = self._replaying, True
        try:
            why = super().setLineMode(extra)
        finally:
            self._replaying = replaying
        if (
            not replaying
            and self._late is not None
            and not self._handlingRequest
            and not self.refused
        ):
            # The late request was not whole among the bytes held for it.
            self._refuse_too_slow()
        return why

    # -- draining ----------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.owner is not None:
            self.owner._connection_made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost_mid_request()
        self._cancel_deadline()
        super().connectionLost(reason)
        if self.owner is not None:
            self.owner._connection_lost(self)

    def request_in_progress(self) -> bool:
        """Whether a request has begun to arrive here and is not yet answered in full.

        Twisted's ``requests`` holds a request from its request line until its
        answer is finished; the deadline runs from a request's first byte; a
        first line still incomplete sits in the line buffer.
        """
        if self.refused:  # answered already, and closing
            return False
        return bool(self.requests) or self._deadline is not None or _begins_request(self._buffer)

    def close_after_request(self) -> None:
        """Answer the request in progress with ``Connection: close``, then close.

        Twisted closes a connection that is not ``persistent`` once its answer
        is finished (``requestDone``), and drops what the peer sent after it.
        An answer already begun keeps its headers: the close after it is
        still a clean end of a complete answer (RFC 9112, section 9.6).
        """
        self.closing_after_request = True
        if not self.requests:
            # Its request line is still arriving: Twisted would drop it if the
            # connection were not persistent; allHeadersReceived comes back here.
            return
        # Whether the drain, not the request, ends the connection (until its
        # headers are in, Twisted assumes so; allHeadersReceived comes back).
        self._drops_pipelined = bool(self.persistent)
        self.persistent = False
        for request in self.requests:
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def close_idle(self) -> None:
        """Close a connection with no request in progress, reading nothing more from it.

        Not answered with an error: there is no request to answer, and a
        request racing the close is what every HTTP client must handle on an
        idle keep-alive connection (RFC 9112, section 9.3.1) by retrying on a
        new connection, as it would after our ``idle_timeout``. Aborted if
        not closed ``abortTimeout`` seconds later, as ``refuse`` does: a close
        waits for what we wrote to be sent, which a peer that does not read
        holds up for good.
        """
        if self.refused:
            return
        self.refused = True
        self.setTimeout(None)
        self._close()

    def requestDone(self, request: http.Request) -> None:
        if not self.persistent:
            # The connection closes after this answer: what was pipelined
            # behind it will never be parsed, nor need a deadline.
            self._cancel_deadline()
            self._late = None
            if self.owner is not None:
                self.owner._pipelined_dropped(self.drop_pipelined())
        super().requestDone(request)

    def drop_pipelined(self) -> int:
        """How many requests this connection received behind the one in progress, to be
        dropped unanswered because the drain closes it; each is counted once.

        Only a request being handled has bytes held behind it, and Twisted
        holds them unparsed: in ``_dataBuffer`` (what arrives while it is
        handled, and the rest of the packet that ended its body), or in
        ``_buffer`` while it is answered within the packet that ended its
        headers. Before that, what is buffered is the request's own. By RFC
        9112 (section 9.3.2) their client retries them on a new connection.
        Counted only where the drain ends a keep-alive connection: a client
        that asked for the close, or spoke HTTP/1.0, sends nothing more. What
        arrives once the answer is finished races the close, as a request on
        an idle connection does (``close_idle``), and is not counted. Counting
        cannot fail the caller: a failure is logged, and counts as one.
        """
        if not self._drops_pipelined:
            return 0
        self._drops_pipelined = False
        if not self._handlingRequest:
            # The request in progress is still arriving (or was refused, 413
            # or 400, as it did): what is buffered is its own, not a request
            # behind it (a header line, or the body of the refused request).
            return 0
        try:
            return _count_requests(self._buffer + b"".join(self._dataBuffer))
        except Exception:
            # A count is not worth a drain that never ends, nor a connection
            # left open after its answer: the caller closes or aborts it.
            log.failure("Could not count the requests pipelined on a draining connection")
            return 1

    def abort(self) -> None:
        """Drop the connection now, with whatever it had still to send."""
        self._lost_mid_request()
        if self.transport is not None:
            # Every stream transport a port gives us (TCP, TLS, UNIX) can abort.
            self.transport.abortConnection()  # type: ignore[attr-defined]


class _LimitedRequest(Request):
    """A ``Request`` that counts its body as it arrives and stops at the channel's cap."""

    _body_received = 0
    #: Set (``mark_outcome_logged``) when a handler logs this request's outcome
    #: in a structured line of its own: the access log then skips it.
    outcome_logged = False

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if not isinstance(channel, _LimitedChannel):
            super().handleContentChunk(data)
            return
        if channel.refused:
            return
        self._body_received += len(data)
        if channel.max_body_bytes is not None and self._body_received > channel.max_body_bytes:
            channel.refuse_too_large()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # An absolute-form target is served as its origin-form would be:
        # routed by its path (prepath, postpath), its query parsed into args,
        # and authenticated (``auth.py`` signs ``uri``) as the path and query
        # that the X-Matrix scheme signs; the access log shows that too.
        try:
            super().requestReceived(command, _origin_form(path), version)
        except Exception as exc:
            # Twisted's parsing before dispatch failing (rendering errors are
            # caught by ``process``): raised out of dataReceived, it would drop
            # the connection unanswered and log a traceback.
            channel = self.channel
            if not isinstance(channel, _LimitedChannel):
                raise
            channel.request_failed(self, command, path, exc)

    def _handleStar(self) -> None:
        # The asterisk-form target (``OPTIONS *``, RFC 9112 section 3.2.4),
        # which Twisted answers itself, with no body: 200 for OPTIONS, 405 for
        # the rest. We serve OPTIONS nowhere, so ``*`` is answered as any path
        # we do not serve is, whatever the method: JSON 404 M_UNRECOGNIZED.
        body = write_error(self, not_found())
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()


#: How many bytes of each access-log field a peer chooses (method, target, ``Referer``,
#: ``User-Agent``) are written, before Twisted escapes them: at most four times as many
#: characters (``\xff``). As much as the package's own lines keep of a peer's path.
_ACCESS_LOG_FIELD_BYTES = 200


class _AccessLogFields:
    """What ``combinedLogFormatter`` reads of a request, each field a peer chooses cut."""

    __slots__ = ("_request", "clientproto", "code", "method", "sentLength", "uri")

    def __init__(self, request: Any) -> None:
        self._request = request
        self.method = request.method[:_ACCESS_LOG_FIELD_BYTES]
        self.uri = request.uri[:_ACCESS_LOG_FIELD_BYTES]
        self.clientproto = request.clientproto[:_ACCESS_LOG_FIELD_BYTES]
        self.code = request.code
        self.sentLength = request.sentLength

    def getClientAddress(self) -> IAddress:
        address: IAddress = self._request.getClientAddress()
        return address

    def getHeader(self, name: bytes) -> bytes | None:
        value: bytes | None = self._request.getHeader(name)
        return None if value is None else value[:_ACCESS_LOG_FIELD_BYTES]


@provider(IAccessLogFormatter)
def _access_log_line(timestamp: str, request: IRequest) -> str:
    """Twisted's combined log format line, each field a peer chooses cut to
    ``_ACCESS_LOG_FIELD_BYTES`` (then escaped as Twisted escapes it)."""
    line: str = http.combinedLogFormatter(timestamp, _AccessLogFields(request))
    return line


def mark_outcome_logged(request: object) -> None:
    """Tell ``FederationSite`` that ``request``'s outcome has its own log line.

    The invite endpoints call this: their handler logs every invite accepted or
    refused with its fields (event, room, origin, invitee, outcome), so a second,
    access-log line per invite only costs CPU. Other requests keep their line.
    """
    if isinstance(request, _LimitedRequest):
        request.outcome_logged = True


class SiteRefusal(NamedTuple):
    """A request ``FederationSite`` refused itself, before any resource saw it (413, 408,
    400): what the resource it was for hears of it (``FederationSite.refused``)."""

    #: The request's method, as sent (``b"PUT"``).
    method: bytes
    #: Its path, without the query, as in origin-form, still percent-encoded.
    path: bytes
    #: What it was answered; None if it was not: its connection was lost (the
    #: sender went away, or a drain abandoned it) after its request line was read
    #: and before it was received whole.
    error: MatrixError | None
    #: The client's IP address, if it has one.
    peer: str | None
    #: Seconds from the request's first byte (when its deadline began) to the
    #: refusal, by the site's clock: the refusal's time to answer.
    elapsed: float = 0.0


class DrainResult(NamedTuple):
    """What became of the requests a drain (``FederationSite.drain``) saw.

    Each request in progress when the drain began is ``finished`` or
    ``abandoned``; ``dropped`` counts requests besides those.
    """

    #: Requests in progress whose connections closed within the grace period:
    #: answered in full (error answers included), or given up by their peer.
    finished: int
    #: Requests in progress whose connections were still open when the grace
    #: period ended, and were aborted: unanswered, or their answer (finished
    #: or not) not yet sent in full.
    abandoned: int
    #: Requests received whole or in part behind one in progress (HTTP
    #: pipelining), never parsed, and dropped unanswered when the drain closed
    #: their connection; their clients retry them (RFC 9112, section 9.3.2).
    dropped: int


class FederationSite(Site):
    """A ``Site`` with the connection limits of the module doc; the daemon listens with it.

    ``FederationInvite.site(root)`` builds one with the configured ``inbound.*`` limits;
    built by hand, it has the defaults below.
    """

    protocol = _LimitedChannel  # type: ignore[assignment]
    requestFactory = _LimitedRequest

    def __init__(
        self,
        resource: Resource,
        *,
        reactor: IReactorTime,
        max_body_bytes: int = 1_048_576,
        request_timeout: float = 30.0,
        idle_timeout: float = 60.0,
    ) -> None:
        if max_body_bytes < 0 or request_timeout <= 0 or idle_timeout <= 0:
            raise ValueError("limits must be positive")
        # parsePOSTFormSubmission (Twisted 25.5): Twisted would otherwise parse every
        # POST body with a form content type, on any path, before dispatch; nothing
        # here reads form arguments, and its multipart parser is slow and can crash.
        super().__init__(
            resource,
            timeout=idle_timeout,
            reactor=reactor,
            logFormatter=_access_log_line,
            parsePOSTFormSubmission=False,
        )
        self.displayTracebacks = False
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        #: Every open connection: added and removed once per connection, never
        #: per request, and read only when draining.
        self._channels: set[_LimitedChannel] = set()
        self._draining = False
        #: The connections a drain waits for, its Deferred and its deadline.
        self._awaited: set[_LimitedChannel] = set()
        self._drained: Deferred[DrainResult] | None = None
        self._grace: IDelayedCall | None = None
        #: How many requests the drain awaited, and how many it dropped (``DrainResult``).
        self._in_progress = 0
        self._dropped = 0

    def refused(self, refusal: SiteRefusal) -> bool:
        """Tell the resource a refused request was for of the refusal, if it asks to hear:
        whether it logged the refusal itself (then the site does not). A request lost
        before it arrived whole is told the same way, with no error (and no line of ours).

        A resource asks by having a ``refused_by_site(refusal, postpath)`` method
        (the invite endpoints do: they count and log every invite, refused here
        too); ``postpath`` is what is left of the path below it, percent-decoded,
        as Twisted would give it. Only the static tree (``putChild``) is
        searched, as Twisted would route the request. A failure is logged, and
        counts as not logged.
        """
        if refusal.path[:1] != b"/":
            return False  # not a path (OPTIONS *, authority-form): nothing we serve
        resource: Any = self.resource
        postpath = [unquote_to_bytes(segment) for segment in refusal.path[1:].split(b"/")]
        while postpath and not resource.isLeaf:
            resource = getattr(resource, "children", {}).get(postpath.pop(0))
            if resource is None:
                return False
        hear = getattr(resource, "refused_by_site", None)
        if hear is None:
            return False
        try:
            return bool(hear(refusal, postpath))
        except Exception:
            log.failure("Could not report a refused request to its resource")
            return False

    def log(self, request: http.Request) -> None:
        """The access log line, except for requests whose handler logged them."""
        if not getattr(request, "outcome_logged", False):
            super().log(request)

    def buildProtocol(self, addr: Any) -> Any:
        if self._draining:
            # Stopping: a new connection is dropped at once. Not by returning
            # None, which a TCP port handles but a TLS wrapper does not.
            return _Dropped()
        channel = super().buildProtocol(addr)
        if isinstance(channel, _LimitedChannel):
            channel.request_timeout = self.request_timeout
            channel.max_body_bytes = self.max_body_bytes
            channel.owner = self
        return channel

    def acceptableProtocols(self) -> list[bytes]:
        """What a TLS listener offers in ALPN: HTTP/1.1 alone, the one protocol our channel
        speaks. Twisted's Site offers h2 too when the h2 package can be imported, and a
        client preferring it (curl, Go) then sends HTTP/2 frames to an HTTP/1.1 parser."""
        return [b"http/1.1"]

    # -- the drain ------------------------------------------------------------

    def requests_in_progress(self) -> int:
        """How many requests have begun to arrive and are not yet answered in full."""
        return sum(1 for channel in self._channels if channel.request_in_progress())

    def drain(self, grace_period: float) -> Deferred[DrainResult]:
        """Stop serving, letting the requests in progress finish within ``grace_period`` seconds.

        At once: new connections are refused, idle connections are closed
        (and aborted if they have not closed ``abortTimeout`` seconds later),
        and each connection with a request in progress (being received,
        handled or answered) is closed once its answer is finished; requests
        its peer pipelined behind that one are dropped unanswered. Fires once
        those connections have closed (their answers written out) or, after
        ``grace_period`` seconds, aborts those still open and fires then; with
        a ``DrainResult``. Stop the ports listening as well: their new
        connections are refused here, but they stay open.
        """
        if self._draining:
            raise RuntimeError("already draining")
        self._draining = True
        for channel in list(self._channels):
            if channel.request_in_progress():
                channel.close_after_request()
                self._awaited.add(channel)
            else:
                channel.close_idle()
        self._in_progress = len(self._awaited)
        if not self._awaited:
            return succeed(DrainResult(0, 0, 0))
        self._drained = Deferred()
        self._grace = self.reactor.callLater(grace_period, self._abandon)
        return self._drained

    def _connection_made(self, channel: _LimitedChannel) -> None:
        self._channels.add(channel)

    def _connection_lost(self, channel: _LimitedChannel) -> None:
        self._channels.discard(channel)
        if channel in self._awaited:
            self._awaited.discard(channel)
            if not self._awaited and self._drained is not None:
                if self._grace is not None and self._grace.active():
                    self._grace.cancel()
                self._drained.callback(DrainResult(self._in_progress, 0, self._dropped))

    def _pipelined_dropped(self, count: int) -> None:
        self._dropped += count

    def _abandon(self) -> None:
        """The grace period is over: abort the connections still awaited.

        Each was awaited for one request, and counts as abandoned whatever
        became of that request: a connection closes once its answer is
        written out, so one still open has not sent its answer in full,
        whether that answer is unfinished or finished and still buffered (its
        peer does not read). Aborting discards what is buffered, in the
        process and, as it resets the connection, in the kernel. Behind TLS a
        connection also stays open while its peer has not answered our
        close_notify, answer sent or not; the abort resets it all the same,
        and we cannot tell what the peer had read: abandoned too.
        """
        awaited, self._awaited = self._awaited, set()
        for channel in awaited:
            self._dropped += channel.drop_pipelined()
            channel.abort()
        abandoned = len(awaited)
        assert self._drained is not None
        self._drained.callback(DrainResult(self._in_progress - abandoned, abandoned, self._dropped))
