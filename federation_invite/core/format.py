"""Is this PDU well-formed for its room version?

The first of the "Checks performed on receipt of a PDU" (server-server-api.md):
an event must comply with the event format of its room version, as the schemas
``pdu_v1``, ``pdu_v3``, ``pdu_v4``, ``pdu_v6``, ``pdu_v11`` and ``pdu_v12``
(data/api/server-server/definitions) lay it out, plus the identifier grammars
(appendices.md) and the size limits of the client-server spec's "Size limits"
(65536 bytes per PDU; 255 bytes for ``sender``, ``room_id``, ``state_key``,
``type`` and ``event_id``). Every failure is a ``MatrixError`` 400
``M_BAD_JSON`` naming the field (nesting deeper than Synapse's PDU parser takes,
``MAX_PDU_NESTING``, included), or 413 ``M_TOO_LARGE`` for the size, or 400
``M_NOT_JSON`` for nesting deeper than any body may (``MAX_NESTING``).

Like the schemas, the check allows keys it does not know, with one exception
that rooms/v3.md states outside the schemas: "When events are sent over
federation, the event_id field is no longer included". A v3+ PDU that carries
an ``event_id`` is refused (Synapse: 400 "Invalid event JSON"); the key is
covered by the hashes and signatures, so it could not be stripped before
co-signing. Likewise a room v12 event whose ``auth_events`` list the room's
create event (rooms/v12.md: it "MUST NOT be selected"; Synapse refuses it on
receipt), or whose ``hashes`` hold a value that is not a string, or an
``m.room.member`` event whose ``unsigned`` ``invite_room_state`` or
``knock_room_state`` is neither an array nor null (Synapse's PDU parser refuses
either). ``federation_form_problem`` holds these rules, shared with the
outbound check that refuses to sign such an event. The top-level ``origin``
is no longer part of any PDU schema and is not checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

from .canonical import (
    MAX_NESTING,
    MAX_SAFE_INTEGER,
    CanonicalJSONError,
    check_canonical_json,
    nesting_depth,
)
from .canonical import encode_canonical_json as _encode
from .errors import Codes, MatrixError
from .ids import MAX_ID_BYTES, is_valid_event_id, is_valid_room_id, is_valid_user_id
from .roomversions import EventFormat, RedactionRules, RoomVersion, room_version_of

__all__ = [
    "MAX_AUTH_EVENTS",
    "MAX_PDU_NESTING",
    "MAX_PDU_SIZE",
    "MAX_PREV_EVENTS",
    "MAX_ROOM_STATE_NESTING",
    "check_event_format",
    "check_pdu_nesting",
    "check_pdu_size",
    "federation_form_problem",
    "pdu_nesting_errcode",
    "pdu_nesting_exceeded",
    "pdu_nesting_problem",
    "room_state_nesting_problem",
]

#: A PDU's canonical JSON, signatures included, is at most this many bytes
#: (client-server spec, "Size limits").
MAX_PDU_SIZE = 65536
#: "Must contain less than or equal to 20 events." (pdu_v1..pdu_v12 ``prev_events``)
MAX_PREV_EVENTS = 20
#: "Must contain less than or equal to 10 events." (pdu_v1..pdu_v12 ``auth_events``)
MAX_AUTH_EVENTS = 10
#: Deepest nesting of arrays and objects in a PDU, the event object counted as
#: level 1. The spec sets no limit, but Synapse's PDU parser (serde_json, whose
#: recursion limit is 128) refuses a PDU nested 128 levels deep (400 "Invalid
#: event JSON"; measured against Synapse 1.163.2): a deeper event could not
#: reach the room, so it is never co-signed. The ``unsigned`` keys Synapse strips
#: before parsing do not count (``pdu_nesting_exceeded``). Lower than the
#: parser's ``canonical.MAX_NESTING``, which bounds every body.
MAX_PDU_NESTING = 127
#: Deepest nesting of an ``invite_room_state`` entry, the entry counted as level 1.
#: Synapse parses the room state inside the invite's ``unsigned`` (its v2
#: ``/invite`` moves the body's ``invite_room_state`` there first), each entry at
#: level 4 of the event (event, ``unsigned``, the list, the entry), on v1 as on v2.
MAX_ROOM_STATE_NESTING = MAX_PDU_NESTING - 3

#: pdu_v1/v3/v4 ``depth``: "Must be less than the maximum value for an integer (2^63 - 1)".
_MAX_DEPTH_V1 = 2**63 - 1
#: pdu_base ``origin_server_ts`` is ``format: int64``.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_CREATE = "m.room.create"


def _bad(message: str) -> NoReturn:
    raise MatrixError(400, Codes.BAD_JSON, f"Invalid PDU: {message}")


#: The keys every PDU must have, by event format (pdu_v1 adds ``event_id``), in the
#: order a missing one is reported.
_REQUIRED_KEYS = {
    event_format: (
        "type",
        "sender",
        "origin_server_ts",
        "content",
        "depth",
        "hashes",
        "signatures",
        "prev_events",
        "auth_events",
    )
    + (("event_id",) if event_format is EventFormat.V1 else ())
    for event_format in EventFormat
}
_REQUIRED_KEY_SETS = {
    event_format: frozenset(keys) for event_format, keys in _REQUIRED_KEYS.items()
}


def _check_id_string(event: dict[str, Any], key: str) -> str:
    """Type-check one of the size-limited string fields and return it."""
    value = event[key]
    if type(value) is str and value.isascii():
        # The common case: one byte of UTF-8 a character, nothing to encode.
        if len(value) > MAX_ID_BYTES:
            _bad(f"{key!r} is longer than {MAX_ID_BYTES} bytes")
        return value
    if not isinstance(value, str):
        _bad(f"{key!r} must be a string")
    try:
        # Lone surrogates were refused by the canonical walk, unless the caller
        # skipped it (numbers_checked): then they are refused here.
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        _bad(f"{key!r} is not valid Unicode")
    if size > MAX_ID_BYTES:
        _bad(f"{key!r} is longer than {MAX_ID_BYTES} bytes")
    return value


def check_event_format(
    room_version: RoomVersion | str,
    event: object,
    *,
    numbers_checked: bool = False,
    nesting_checked: bool = False,
) -> None:
    """Raise ``MatrixError`` 400 ``M_BAD_JSON`` unless ``event`` is a well-formed PDU.

    Checks, per the room version's PDU schema: the required keys and their
    JSON types, the grammar of ``sender``, ``room_id``, ``event_id`` (v1/v2)
    and of the IDs in ``prev_events``/``auth_events``, their counts, the
    255-byte field limits, ``depth`` bounds, from v6 strict canonical JSON
    for the whole event, and what ``federation_form_problem`` refuses (v3+:
    an ``event_id`` key; v12: the create event in ``auth_events``; ``hashes``
    values and a member event's ``unsigned`` room state that Synapse's PDU
    parser refuses). It does
    not check hashes, signatures or auth rules, nor the 64 KiB size limit
    (``check_pdu_size``). Raises only ``MatrixError``, whatever JSON-shaped
    value it is given.

    ``numbers_checked``: the caller parsed the event from JSON and knows it
    holds no float and no out-of-range integer (``parse_json_with_numbers``),
    so the canonical-JSON walk is skipped; strings without a UTF-8 form then
    surface when the event is encoded, as ``CanonicalJSONError``.

    An event nested deeper than Synapse's PDU parser takes (``check_pdu_nesting``:
    ``MAX_PDU_NESTING`` levels, the ``unsigned`` keys it strips not counted) is
    400 ``M_BAD_JSON`` too, as Synapse answers it (``M_NOT_JSON`` only past the
    ``MAX_NESTING`` of every body, as the parser answers). ``nesting_checked``:
    the caller checked that with the body (``inbound.invite_body_nesting_problem``,
    as ``parse_json``'s ``nesting_problem``), so the event is not walked again.
    """
    version = room_version if type(room_version) is RoomVersion else room_version_of(room_version)
    if not isinstance(event, dict):
        _bad("the event is not a JSON object")
    if not nesting_checked:
        check_pdu_nesting(event)
    if not numbers_checked:
        try:
            # v6+ (rooms/fragments/v6-canonical-json.md): strictly enforced. Before
            # v6, floats and large integers are tolerated, but values with no JSON
            # form at all (NaN, lone surrogates) never are: they cannot be hashed.
            check_canonical_json(event, strict=version.strict_canonical_json)
        except CanonicalJSONError as exc:
            _bad(f"not canonical JSON: {exc}")

    event_format = version.event_format
    if not event.keys() >= _REQUIRED_KEY_SETS[event_format]:
        for key in _REQUIRED_KEYS[event_format]:
            if key not in event:
                _bad(f"missing the {key!r} key")

    event_type = _check_id_string(event, "type")
    if not is_valid_user_id(_check_id_string(event, "sender")):
        _bad("'sender' is not a valid user ID")
    _check_room_id(version, event, event_type)
    if "state_key" in event:
        _check_id_string(event, "state_key")
    if event_format is EventFormat.V1:
        if not is_valid_event_id(_check_id_string(event, "event_id"), version):
            _bad("'event_id' is not a valid event ID for this room version")

    timestamp = event["origin_server_ts"]
    if type(timestamp) is not int or not _INT64_MIN <= timestamp <= _INT64_MAX:
        _bad("'origin_server_ts' must be an integer")
    _check_depth(version, event["depth"])

    if not isinstance(event["content"], dict):
        _bad("'content' must be an object")
    if "unsigned" in event and not isinstance(event["unsigned"], dict):
        _bad("'unsigned' must be an object")
    _check_hashes(event["hashes"], "'hashes'")
    _check_signatures(event["signatures"])
    # pdu_v1 .. pdu_v6 define a top-level ``redacts``; from v11 it lives in content.
    if version.redaction_rules is not RedactionRules.V11 and "redacts" in event:
        if not isinstance(event["redacts"], str):
            _bad("'redacts' must be a string")

    _check_references(version, event["prev_events"], "prev_events", MAX_PREV_EVENTS)
    _check_references(version, event["auth_events"], "auth_events", MAX_AUTH_EVENTS)
    problem = federation_form_problem(version, event)
    if problem is not None:
        _bad(problem)


def federation_form_problem(version: RoomVersion, event: Mapping[str, Any]) -> str | None:
    """Why receivers refuse ``event`` as malformed though its PDU schema allows it; None if
    they do not.

    Room v3+ (rooms/v3.md "Event format"): "When events are sent over federation,
    the event_id field is no longer included"; Synapse refuses a PDU with an
    ``event_id`` key (400 "Invalid event JSON").

    Room v12 (rooms/v12.md, auth rule 3.2): "The m.room.create event MUST NOT
    be selected for auth_events"; its ID is derived from the room ID (``$`` +
    the room ID's hash), so this needs no lookup, and Synapse refuses such an
    event on receipt (400 "auth_events must not contain the create event")
    rather than in the auth rules, which an invitee cannot run.

    Every room version: ``hashes`` (components/event_hash.yaml) requires a
    string ``sha256`` and leaves other entries open, but Synapse's PDU parser
    refuses any value that is not a string (400 "Invalid event JSON"). Likewise
    an ``m.room.member`` event's ``unsigned`` ``invite_room_state`` or
    ``knock_room_state`` (the keys it keeps there, ``_PARSED_UNSIGNED_KEYS``)
    that is neither an array (of anything) nor null; on v2 Synapse replaces the
    event's own ``invite_room_state`` with the body's, but the inviting server
    parses the event we answer, its ``unsigned`` as received, with its own.
    Only an ``unsigned`` holding one of them is looked into.

    One rule for both directions: ``check_event_format`` refuses such a PDU on
    receipt (400 ``M_BAD_JSON``), and the outbound client refuses to sign one.
    ``event`` may be any mapping (the outbound check runs before the event is
    signed or its format checked).
    """
    if not version.event_id_in_event and "event_id" in event:
        return (
            f"room version {version.identifier} events carry no event_id over federation "
            "(their ID is their reference hash): the event must be signed without it"
        )
    if version.room_id_is_create_event_hash:
        room_id = event.get("room_id")
        auth_events = event.get("auth_events")
        if (
            isinstance(room_id, str)
            and isinstance(auth_events, list | tuple)
            and f"${room_id[1:]}" in auth_events
        ):
            return (
                f"the event's auth_events list the room's m.room.create event ${room_id[1:]}, "
                f"which room version {version.identifier} never selects as an auth event"
            )
    hashes = event.get("hashes")
    if isinstance(hashes, Mapping) and len(hashes) > 1 and not _all_strings(hashes):
        return "'hashes' must hold only strings"
    unsigned = event.get("unsigned")
    if (
        unsigned
        and isinstance(unsigned, Mapping)
        and not unsigned.keys().isdisjoint(_PARSED_UNSIGNED_KEYS)
    ):
        return _parsed_unsigned_problem(event, unsigned)
    return None


def _parsed_unsigned_problem(event: Mapping[str, Any], unsigned: Mapping[str, Any]) -> str | None:
    # Synapse's PDU parser takes each of these (kept in an m.room.member event's
    # unsigned only) as an array of anything, or null, and refuses anything else.
    if event.get("type") != "m.room.member":
        return None
    for key in _PARSED_UNSIGNED_KEYS:
        value = unsigned.get(key)
        if value is not None and not isinstance(value, list | tuple):
            return f"'unsigned' {key!r} of an m.room.member event must be an array or null"
    return None


def check_pdu_nesting(event: object) -> None:
    """Raise ``MatrixError`` 400 ``M_BAD_JSON`` if ``event`` is nested too deep for
    Synapse's PDU parser (``pdu_nesting_problem``): deeper than ``MAX_PDU_NESTING``
    levels, the event counted, not counting the ``unsigned`` keys Synapse strips,
    which may nest as deep as any body (``MAX_NESTING``; deeper, 400 ``M_NOT_JSON``,
    as the parser answers such a body: ``pdu_nesting_errcode``).

    One check for both directions: ``check_event_format`` on receipt (unless the
    caller checked the event's nesting with its body's), and the outbound client
    before it signs an event. Walks level by level, without recursion.
    """
    exceeded = pdu_nesting_exceeded(event)
    if exceeded:
        raise MatrixError(
            400, pdu_nesting_errcode(exceeded), f"Invalid PDU: {_nesting_message(exceeded)}"
        )


def pdu_nesting_errcode(exceeded: int) -> str:
    """The errcode refusing a PDU (or an invite body) that crosses the nesting limit
    ``exceeded`` (``pdu_nesting_exceeded``): ``M_NOT_JSON`` past ``MAX_NESTING``, the
    bound of every body we parse; ``M_BAD_JSON`` past a PDU's or a room-state entry's
    limit, valid JSON but no well-formed event (Synapse: 400 ``M_BAD_JSON`` "Invalid
    event JSON")."""
    return Codes.NOT_JSON if exceeded >= MAX_NESTING else Codes.BAD_JSON


#: The ``unsigned`` keys of an ``m.room.member`` event that Synapse's
#: ``event_from_pdu_json`` keeps for its PDU parser (``_strip_unsigned_values``
#: keeps these and ``age``, which it then reads and drops, as ``age_ts``); it
#: keeps none of other events'.
_PARSED_UNSIGNED_KEYS = ("invite_room_state", "knock_room_state")
_NOT_GIVEN: Any = object()


def pdu_nesting_exceeded(
    event: object,
    room_state: object = _NOT_GIVEN,
    *,
    wrapped: int | None = None,
    beside: Iterable[Any] = (),
) -> int:
    """The nesting limit ``event`` crosses as Synapse's PDU parser is given it, or 0.

    Synapse strips the ``unsigned`` keys of an invite but ``invite_room_state``
    and ``knock_room_state`` (all of another event's) before its parser, so they
    do not count toward ``MAX_PDU_NESTING`` (the answer if the rest is deeper);
    they are bounded as any body is, their values at level 3 (``MAX_NESTING``).
    ``room_state``: Synapse's v2 ``/invite`` puts the body's ``invite_room_state``
    (a list; anything else as ``[]``) in the event's ``unsigned`` before parsing,
    in place of the event's own, where each entry sits at level 4: when that is
    what crosses the limit, the answer is ``MAX_ROOM_STATE_NESTING``.

    ``wrapped``: the event is a body's (0: the body is the event, as v1's; 1: the body
    wraps it, as v2's, with ``room_state`` and the values ``beside`` at the event's
    level), and the whole body is bounded too: ``MAX_NESTING`` first if it is deeper.
    Each part (the event but its ``unsigned``, the ``unsigned`` values kept and
    stripped, ``room_state``, ``beside``) is walked once, as deep as its limits need,
    so no array or object is visited twice.
    """
    outer = MAX_NESTING if wrapped is None else MAX_NESTING - wrapped  # the event's bound
    if not isinstance(event, Mapping):
        depth = nesting_depth(event, MAX_PDU_NESTING if wrapped is None else outer)
        if wrapped is not None and depth > outer:
            return MAX_NESTING
        return MAX_PDU_NESTING if depth > MAX_PDU_NESTING else 0
    replaced = room_state is not _NOT_GIVEN
    unsigned = event.get("unsigned", _NOT_GIVEN)
    given_unsigned = isinstance(unsigned, Mapping)
    parsed_unsigned = given_unsigned or (replaced and unsigned is _NOT_GIVEN)
    kept: list[Any] = []
    stripped: list[Any] = []
    member = event.get("type") == "m.room.member"
    if parsed_unsigned:
        rest = [value for key, value in event.items() if key != "unsigned"]
        keys = _PARSED_UNSIGNED_KEYS[replaced:] if member else ()  # v2: the body's replaces
        if given_unsigned:
            for key, value in unsigned.items():
                (kept if key in keys else stripped).append(value)
    else:  # absent, or no object (which Synapse cannot take): parsed as it is
        rest = list(event.values())
    listed = isinstance(room_state, list | tuple)
    in_parsed = replaced and parsed_unsigned and member
    in_stripped = replaced and parsed_unsigned and not member
    # Each part's walk, as deep as is needed to see the limits it may cross; the lists
    # stand for the event (rest) and its unsigned (kept, stripped).
    if wrapped is None:
        depth = nesting_depth(rest, MAX_PDU_NESTING)
        kept_depth = nesting_depth(kept, MAX_PDU_NESTING - 1) if kept else 1
        stripped_depth = nesting_depth(stripped, MAX_NESTING - 1) if stripped else 1
        state_limit = MAX_NESTING - 2 if in_stripped else MAX_ROOM_STATE_NESTING + 1
    else:
        depth = nesting_depth(rest, outer)
        kept_depth = nesting_depth(kept, outer - 1) if kept else 1
        stripped_depth = nesting_depth(stripped, outer - 1) if stripped else 1
        state_limit = max(outer, MAX_NESTING - 2)  # beside the event, or in its unsigned
    state_depth = 0
    if replaced and (listed or wrapped is not None):
        state_depth = nesting_depth(room_state, state_limit)
    if wrapped is not None:
        given = max(depth, 1 + kept_depth, 1 + stripped_depth) if given_unsigned else depth
        others = list(beside)
        beside_depth = nesting_depth(others, outer + 1) if others else 1  # the list a level
        if max(given, state_depth, beside_depth - 1) > outer:
            return MAX_NESTING
    placed = state_depth if listed else 1  # Synapse's [] for anything but a list
    if parsed_unsigned:
        depth = max(depth, 1 + kept_depth, 2 + placed if in_parsed else 0)
        if in_stripped:
            stripped_depth = max(stripped_depth, 1 + placed)
    if depth > MAX_PDU_NESTING:
        if listed and state_depth > MAX_ROOM_STATE_NESTING + 1:
            return MAX_ROOM_STATE_NESTING
        return MAX_PDU_NESTING
    # The stripped values sit at level 3 of the event, as their list's members would.
    if stripped_depth > MAX_NESTING - 1:
        return MAX_NESTING
    return 0


def pdu_nesting_problem(event: object, room_state: object = _NOT_GIVEN) -> str | None:
    """Why Synapse would refuse ``event`` (with ``room_state``, as its v2 ``/invite``
    does: ``pdu_nesting_exceeded``) as nested too deep, or None."""
    exceeded = pdu_nesting_exceeded(event, room_state)
    return _nesting_message(exceeded) if exceeded else None


def _nesting_message(exceeded: int) -> str:
    if exceeded == MAX_ROOM_STATE_NESTING:
        return f"invite_room_state: an entry is nested deeper than {MAX_ROOM_STATE_NESTING} levels"
    return f"nested deeper than {exceeded} levels"


def room_state_nesting_problem(room_state: object) -> str | None:
    """Why Synapse would refuse an invite carrying ``room_state`` (a list, the v2
    body's or our outbound's ``invite_room_state``) as nested too deep: an entry
    nested deeper than ``MAX_ROOM_STATE_NESTING`` levels, the entry counted; or
    None. Anything but a list is not counted (Synapse's v2 ``/invite`` drops it)."""
    if not isinstance(room_state, list | tuple):
        return None
    limit = MAX_ROOM_STATE_NESTING + 1  # the list is a level
    if nesting_depth(room_state, limit) > limit:
        return f"an entry is nested deeper than {MAX_ROOM_STATE_NESTING} levels"
    return None


def _check_room_id(version: RoomVersion, event: dict[str, Any], event_type: str) -> None:
    if version.room_id_is_create_event_hash and event_type == _CREATE:
        # pdu_v12 / room_id_v12: "Omitted from m.room.create events"; the
        # create event's own hash is the room ID (v12 auth rule 1.2 rejects it).
        if "room_id" in event:
            _bad("an m.room.create event has no 'room_id' in this room version")
        return
    if "room_id" not in event:
        _bad("missing the 'room_id' key")
    if not is_valid_room_id(_check_id_string(event, "room_id"), version):
        _bad("'room_id' is not a valid room ID for this room version")


def _check_depth(version: RoomVersion, depth: object) -> None:
    # v6+ (depth_v6.yaml) caps depth at 2^53 - 1 to stay canonical JSON.
    limit = MAX_SAFE_INTEGER if version.strict_canonical_json else _MAX_DEPTH_V1
    if type(depth) is not int:  # not bool, which JSON true/false become
        _bad("'depth' must be an integer")
    if not 0 <= depth <= limit:
        _bad(f"'depth' must be between 0 and {limit}")


def _check_hashes(hashes: object, where: str) -> None:
    # components/event_hash.yaml: an object with a required string ``sha256``.
    if not isinstance(hashes, dict):
        _bad(f"{where} must be an object")
    if not isinstance(hashes.get("sha256"), str):
        _bad(f"{where} must have a string 'sha256'")
    # Other entries must be strings too: federation_form_problem.


def _check_hash_values(hashes: dict[str, Any], where: str) -> None:
    # The schema leaves other entries open, but Synapse's PDU parser refuses any
    # value that is not a string (400 "Invalid event JSON"): such an event could
    # not reach the room, so it is never co-signed.
    if not _all_strings(hashes):
        _bad(f"{where} must hold only strings")


def _all_strings(hashes: Mapping[str, Any]) -> bool:
    return all(isinstance(value, str) for value in hashes.values())


def _check_signatures(signatures: object) -> None:
    # pdu_base ``signatures``: server name -> key ID -> signature string.
    if not isinstance(signatures, dict):
        _bad("'signatures' must be an object")
    for server_signatures in signatures.values():
        if not isinstance(server_signatures, dict):
            _bad("'signatures' must map server names to objects")
        for signature in server_signatures.values():
            if not isinstance(signature, str):
                _bad("'signatures' must hold string signatures")


def _check_references(version: RoomVersion, refs: object, key: str, limit: int) -> None:
    if not isinstance(refs, list):
        _bad(f"{key!r} must be an array")
    if len(refs) > limit:
        _bad(f"{key!r} has more than {limit} entries")
    pairs = version.event_format is EventFormat.V1
    for ref in refs:
        if pairs:
            # pdu_v1: each entry is an [event_id, {"sha256": hash}] pair.
            if not isinstance(ref, list) or len(ref) != 2:
                _bad(f"{key!r} entries must be [event_id, hashes] pairs")
            event_id, hashes = ref
            # Synapse sends {} for a reference it cannot hash (an event its store
            # does not return) and ignores these hashes on receipt, as every
            # receiver may: refusing {} would refuse Synapse's v1/v2 invites.
            if not isinstance(hashes, dict):
                _bad(f"{key!r} hashes must be an object")
            if "sha256" in hashes and not isinstance(hashes["sha256"], str):
                _bad(f"{key!r} hashes must have a string 'sha256'")
            _check_hash_values(hashes, f"{key!r} hashes")
        else:
            event_id = ref
        if not is_valid_event_id(event_id, version):
            _bad(f"{key!r} holds an invalid event ID for this room version")


def check_pdu_size(event_or_canonical_bytes: dict[str, Any] | bytes) -> None:
    """Raise 413 ``M_TOO_LARGE`` if a PDU's canonical JSON exceeds 65536 bytes.

    The limit counts the complete event with its signatures, encoded as
    canonical JSON (client-server spec, "Size limits"). Pass the bytes when
    they are already computed, to avoid encoding twice. A value with no JSON
    form at all gives 400 ``M_BAD_JSON``.
    """
    if isinstance(event_or_canonical_bytes, bytes):
        size = len(event_or_canonical_bytes)
    else:
        try:
            size = len(_encode(event_or_canonical_bytes, strict=False))
        except CanonicalJSONError as exc:
            _bad(f"not canonical JSON: {exc}")
    if size > MAX_PDU_SIZE:
        raise MatrixError(
            413, Codes.TOO_LARGE, f"PDU is {size} bytes, more than the {MAX_PDU_SIZE} allowed"
        )
