"""``PUT /_matrix/federation/v{1,2}/invite/{roomId}/{eventId}``: the invite endpoints.

This resource applies the inbound table's rows 1 to 3 (body size, UTF-8 JSON
object, duplicate keys), percent-decodes the path parameters (each raw path
segment decoded once, so a v3 event ID's ``/`` arrives as ``%2F`` and stays
in its segment), hands the rest to ``InviteHandler`` and shapes the answer:
v1 ``[200, {"event": ...}]`` (Synapse's historical quirk, kept by the spec's
invites-v1.yaml), v2 ``{"event": ...}``. Invites it refuses itself, and those
``FederationSite`` refuses before it sees them (``refused_by_site``), it has
the handler count and log (one line each, as the handler's own refusals);
those the client abandons (cancelled) and those failing unexpectedly (500
``M_UNKNOWN``, logged with their traceback) it counts in the handler's metrics.
"""

from __future__ import annotations

import functools
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.web.server import Request

from ..core.canonical import EncodedDict, EncodedList, parse_json_with_numbers
from ..core.errors import Codes, MatrixError
from ..inbound import INVITE_BODY_BRACKETS, InviteHandler, invite_body_nesting_problem
from ._base import MatrixResource, not_found, render_async, write_error
from .site import SiteRefusal, mark_outcome_logged

__all__ = ["InviteResource"]


def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.getHeader(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise MatrixError(413, Codes.TOO_LARGE, f"Request body exceeds {max_bytes} bytes")
    if request.content is None:
        return b""
    body: bytes = request.content.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise MatrixError(413, Codes.TOO_LARGE, f"Request body exceeds {max_bytes} bytes")
    return body


def _path_parameter(segment: bytes) -> str | None:
    """A path parameter (percent-decoded already) as text; None if it is not UTF-8."""
    try:
        return segment.decode("utf-8")
    except UnicodeDecodeError:
        return None


class InviteResource(MatrixResource):
    """One API version's ``invite`` path segment; consumes ``{roomId}/{eventId}`` below it."""

    isLeaf = True

    def __init__(self, handler: InviteHandler, api_version: int, max_body_bytes: int) -> None:
        super().__init__()
        if api_version not in (1, 2):
            raise ValueError("api_version must be 1 or 2")
        self._handler = handler
        self._api_version = api_version
        self._max_body_bytes = max_body_bytes
        # Row 2's nesting (invite_body_nesting_problem), asked only of a body with
        # more brackets than could break it.
        self._max_nesting = INVITE_BODY_BRACKETS[api_version]
        self._nesting_problem = functools.partial(invite_body_nesting_problem, api_version)

    def dispatch(self, request: Request) -> bytes | int:
        segments = request.postpath or []
        if len(segments) != 2 or not all(segments):
            return write_error(request, not_found())
        return super().dispatch(request)

    def _count(self, outcome: str, errcode: str | None, started: float) -> None:
        """Count an invite the handler did not: into its metrics, by its clock, so that
        every invite lands in one ``federation_invite_inbound_invites_total``."""
        self._handler.count(outcome, errcode, started)

    def refused_by_site(self, refusal: SiteRefusal, postpath: list[bytes]) -> bool:
        """An invite request ``FederationSite`` refused before this resource saw it (413,
        408, 400): counted and logged as the refusals of ``render_PUT`` are, by the handler;
        or one whose sender went away (or a drain abandoned it) before it arrived whole:
        counted ``cancelled``, with no log line, as those ``render_PUT`` took are.
        Other methods and paths below this one (answered 405 or 404 here) are not invites."""
        if refusal.method != b"PUT" or len(postpath) != 2 or not all(postpath):
            return False
        # It began with its first byte, refusal.elapsed before it was refused (or lost).
        started = self._handler.now() - refusal.elapsed
        if refusal.error is None:
            self._count("cancelled", None, started)
            return True
        room_segment, event_segment = postpath
        self._handler.refused_early(
            refusal.error,
            _path_parameter(room_segment),
            _path_parameter(event_segment),
            started,
            peer=refusal.peer,
        )
        return True

    def render_PUT(self, request: Request) -> int:
        started = self._handler.now()
        room_segment, event_segment = request.postpath or [b"", b""]
        room_id = _path_parameter(room_segment)
        event_id = _path_parameter(event_segment)
        try:
            if room_id is None or event_id is None:
                what = "room ID" if room_id is None else "event ID"
                raise MatrixError(400, Codes.INVALID_PARAM, f"The {what} in the path is not UTF-8")
            raw = _read_body(request, self._max_body_bytes)
            # Row 2 before row 3: a duplicate key is reported only in a JSON object.
            # Nested no deeper than Synapse's PDU parser takes the event and its room
            # state (invite_body_nesting_problem): then the handler need not walk the
            # event or its room state for it. A shallow body is not walked at all.
            body, numbers_strict = parse_json_with_numbers(
                raw,
                require_object=True,
                max_nesting=self._max_nesting,
                nesting_problem=self._nesting_problem,
                problem_bounds_nesting=True,  # in the same walk: one walk of the body
            )
        except MatrixError as error:
            # Rows 1 to 3 and the path: refused before the handler, which logs and counts
            # the rest; one invite line for it as well, instead of the access log's.
            mark_outcome_logged(request)
            self._handler.refused_early(error, room_id, event_id, started, request=request)
            raise
        except Exception:
            self._count("refused", Codes.UNKNOWN, started)  # answered 500 M_UNKNOWN
            raise
        api_version = self._api_version

        async def work() -> tuple[int, Any]:
            # From here on the handler logs the outcome (accepted, repeated or
            # refused, with its fields); unexpected failures are logged by
            # render_async. Either way no access-log line is needed as well.
            mark_outcome_logged(request)
            try:
                answer = await self._handler.on_invite(
                    request,
                    api_version,
                    room_id,
                    event_id,
                    body,
                    len(raw),
                    numbers_strict,
                    True,  # nesting_checked: parsed with max_nesting
                )
            except MatrixError:
                raise  # counted by the handler
            except CancelledError:
                self._count("cancelled", None, started)  # the client went away
                raise
            except Exception:
                self._count("refused", Codes.UNKNOWN, started)  # answered 500 M_UNKNOWN
                raise
            if api_version == 2:
                return 200, answer
            if isinstance(answer, EncodedDict):
                return 200, EncodedList([200, answer], b"[200," + answer.canonical + b"]")
            return 200, [200, answer]

        return render_async(request, work)
