"""Event hashing, redaction and event IDs, per room version.

Everything here is pure: dicts in, new values out, inputs never mutated. The
one expensive step on the inbound invite path, redacting the event and
encoding it as canonical JSON, is done once by :func:`prepare_event`; the
resulting :class:`PreparedEvent` carries the bytes that signatures cover (the
redacted event without ``signatures`` and ``unsigned``), whose sha256 is also
the reference hash and so the event ID (server-server-api, "Calculating the
reference hash for an event"). The simple functions are thin wrappers over it.

Nested values of a redacted event are shared with the input, not copied:
treat both as immutable. Every function takes the room version as a
``RoomVersion`` or its identifier (``"10"``); an unknown one raises 400
``M_INCOMPATIBLE_ROOM_VERSION`` (``get_room_version``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import attrs
from unpaddedbase64 import decode_base64, encode_base64

from .canonical import encode_canonical_json
from .roomversions import EventIdFormat, RedactionRules, RoomVersion, room_version_of

__all__ = [
    "PreparedEvent",
    "add_content_hash",
    "check_content_hash",
    "compute_content_hash",
    "compute_event_id",
    "ensure_prepared",
    "prepare_event",
    "redact",
    "reference_hash",
    "room_id_for_create_event",
]

# The top-level keys the redaction algorithm keeps (rooms/fragments/v1-redactions.md,
# unchanged in v6-redactions.md and v9-redactions.md). ``unsigned`` is not in the
# list, so redaction drops it.
_KEPT_TOP_LEVEL_V1 = frozenset(
    {
        "event_id",
        "type",
        "room_id",
        "sender",
        "state_key",
        "content",
        "hashes",
        "signatures",
        "depth",
        "prev_events",
        "prev_state",
        "auth_events",
        "origin",
        "origin_server_ts",
        "membership",
    }
)
# rooms/fragments/v11-redactions.md: ``origin``, ``membership`` and ``prev_state``
# are no longer protected.
_KEPT_TOP_LEVEL_V11 = _KEPT_TOP_LEVEL_V1 - {"origin", "membership", "prev_state"}

_POWER_LEVELS_V1 = frozenset(
    {"ban", "events", "events_default", "kick", "redact", "state_default", "users", "users_default"}
)

# Content keys kept per event type (rooms/fragments/*-redactions.md). The
# v11 special cases (create keeps everything, member keeps
# ``third_party_invite.signed``) are handled in ``_redact_content``.
_KEPT_CONTENT_V1: dict[str, frozenset[str]] = {
    "m.room.member": frozenset({"membership"}),
    "m.room.create": frozenset({"creator"}),
    "m.room.join_rules": frozenset({"join_rule"}),
    "m.room.power_levels": _POWER_LEVELS_V1,
    "m.room.aliases": frozenset({"aliases"}),
    "m.room.history_visibility": frozenset({"history_visibility"}),
}
# v6-redactions.md: m.room.aliases is no longer special.
_KEPT_CONTENT_V6 = {k: v for k, v in _KEPT_CONTENT_V1.items() if k != "m.room.aliases"}
# rooms/v8.md, "Redactions": join_rules also keeps ``allow``.
_KEPT_CONTENT_V8 = {**_KEPT_CONTENT_V6, "m.room.join_rules": frozenset({"join_rule", "allow"})}
# v9-redactions.md: member also keeps ``join_authorised_via_users_server``.
_KEPT_CONTENT_V9 = {
    **_KEPT_CONTENT_V8,
    "m.room.member": frozenset({"membership", "join_authorised_via_users_server"}),
}
# v11-redactions.md: power_levels keeps ``invite``; m.room.redaction keeps ``redacts``.
_KEPT_CONTENT_V11 = {
    **_KEPT_CONTENT_V9,
    "m.room.power_levels": _POWER_LEVELS_V1 | {"invite"},
    "m.room.redaction": frozenset({"redacts"}),
}

_RULES: dict[RedactionRules, tuple[frozenset[str], dict[str, frozenset[str]]]] = {
    RedactionRules.V1: (_KEPT_TOP_LEVEL_V1, _KEPT_CONTENT_V1),
    RedactionRules.V6: (_KEPT_TOP_LEVEL_V1, _KEPT_CONTENT_V6),
    RedactionRules.V8: (_KEPT_TOP_LEVEL_V1, _KEPT_CONTENT_V8),
    RedactionRules.V9: (_KEPT_TOP_LEVEL_V1, _KEPT_CONTENT_V9),
    RedactionRules.V11: (_KEPT_TOP_LEVEL_V11, _KEPT_CONTENT_V11),
}

_NOT_CONTENT_HASHED = frozenset({"unsigned", "signatures", "hashes"})
_NOT_SIGNED = frozenset({"signatures", "unsigned"})


def redact(room_version: RoomVersion | str, event: Mapping[str, Any]) -> dict[str, Any]:
    """Return the redacted form of ``event`` under ``room_version``'s redaction rules.

    Only the protected top-level keys survive (``signatures`` and ``hashes``
    do, ``unsigned`` does not), and ``content`` keeps only the keys its event
    type protects. A missing ``content`` stays missing. Raises ``ValueError``
    when ``content`` is present but not an object. Redaction is idempotent.
    """
    if type(room_version) is not RoomVersion:  # a call only for an identifier
        room_version = room_version_of(room_version)
    kept_top, kept_content = _RULES[room_version.redaction_rules]
    redacted = {key: value for key, value in event.items() if key in kept_top}
    if "content" in redacted:
        redacted["content"] = _redact_content(
            room_version, event.get("type"), redacted["content"], kept_content
        )
    return redacted


def _redact_content(
    room_version: RoomVersion,
    event_type: object,
    content: object,
    kept_content: dict[str, frozenset[str]],
) -> dict[str, Any]:
    if not isinstance(content, dict):
        raise ValueError("event content is not an object")
    v11 = room_version.redaction_rules is RedactionRules.V11
    if not isinstance(event_type, str):
        # No type-specific rules can apply; the event is malformed anyway,
        # but redaction itself stays total.
        return {}
    if v11 and event_type == "m.room.create":
        # v11-redactions.md: m.room.create allows all keys.
        return dict(content)
    allowed = kept_content.get(event_type, frozenset())
    new_content = {key: value for key, value in content.items() if key in allowed}
    if v11 and event_type == "m.room.member":
        # v11-redactions.md: "it allows the `signed` key of the `third_party_invite` key"
        # (rooms/v11.md: third_party_invite "will only contain the signed key after
        # redaction"). A third_party_invite that is not an object has no `signed` key
        # to keep, so it is dropped.
        third_party_invite = content.get("third_party_invite")
        if isinstance(third_party_invite, dict):
            new_content["third_party_invite"] = {
                key: value for key, value in third_party_invite.items() if key == "signed"
            }
    return new_content


@attrs.frozen
class PreparedEvent:
    """An event with its redaction, signing bytes and reference hash computed once.

    ``signing_bytes`` is the canonical JSON of the redacted event without
    ``signatures`` and ``unsigned``: the exact bytes every event signature
    covers, and whose sha256 is the reference hash (and, from v3, the event
    ID). Build one with :func:`prepare_event`; reuse it for event-ID
    computation, signature verification and co-signing.
    """

    room_version: RoomVersion
    #: The event as given (not copied; never mutated here).
    event: Mapping[str, Any] = attrs.field(repr=False)
    redacted: dict[str, Any] = attrs.field(repr=False)
    signing_bytes: bytes = attrs.field(repr=False)
    reference_hash: bytes

    @property
    def event_id(self) -> str:
        """The event ID under this room version (see :func:`compute_event_id`)."""
        id_format = self.room_version.event_id_format
        if id_format is EventIdFormat.V1_OPAQUE:
            # rooms/fragments/v1-event-ids.md: the ID is chosen by the sender and
            # carried in the event itself.
            event_id = self.event.get("event_id")
            if not isinstance(event_id, str):
                raise ValueError("event has no event_id string")
            return event_id
        urlsafe = id_format is EventIdFormat.V4_URLSAFE
        return "$" + encode_base64(self.reference_hash, urlsafe=urlsafe)


def prepare_event(
    room_version: RoomVersion | str, event: Mapping[str, Any], *, strict: bool | None = None
) -> PreparedEvent:
    """Redact ``event`` and compute its signing bytes and reference hash, once.

    ``strict`` selects the canonical JSON rules; by default those of the room
    version for received data (``room_version.strict_canonical_json``). Pass
    ``strict=True`` for events we author. Raises ``ValueError`` (including
    ``CanonicalJSONError``) for an event that cannot be redacted or encoded.
    """
    if type(room_version) is not RoomVersion:  # a call only for an identifier
        room_version = room_version_of(room_version)
    if strict is None:
        strict = room_version.strict_canonical_json
    redacted = redact(room_version, event)
    unsigned_form = {key: value for key, value in redacted.items() if key not in _NOT_SIGNED}
    signing_bytes = encode_canonical_json(unsigned_form, strict=strict)
    return PreparedEvent(
        room_version=room_version,
        event=event,
        redacted=redacted,
        signing_bytes=signing_bytes,
        reference_hash=hashlib.sha256(signing_bytes).digest(),
    )


def ensure_prepared(
    room_version: RoomVersion | str, event: Mapping[str, Any], prepared: PreparedEvent | None = None
) -> PreparedEvent:
    """Return ``prepared`` when it was prepared from ``event``, else prepare ``event`` now.

    Lets callers pass a :class:`PreparedEvent` along with its event without
    risking a mix-up: a prepared form of another event (compared by identity,
    then equality) or room version raises ``ValueError``.
    """
    if type(room_version) is not RoomVersion:  # a call only for an identifier
        room_version = room_version_of(room_version)
    if prepared is None:
        return prepare_event(room_version, event)
    if prepared.room_version is not room_version and prepared.room_version != room_version:
        raise ValueError("prepared event is for another room version")
    if prepared.event is not event and prepared.event != event:
        raise ValueError("prepared event was prepared from another event")
    return prepared


def reference_hash(room_version: RoomVersion | str, event: Mapping[str, Any]) -> bytes:
    """The sha256 reference hash of ``event``.

    server-server-api, "Calculating the reference hash for an event": redact,
    drop ``signatures`` and ``unsigned``, canonical JSON, sha256.
    """
    return prepare_event(room_version, event).reference_hash


def compute_event_id(room_version: RoomVersion | str, event: Mapping[str, Any]) -> str:
    """The event's ID: its own ``event_id`` in v1/v2, else ``$`` + base64 of the reference hash.

    v3 uses standard unpadded base64 (which may contain ``+`` and ``/``), v4+
    the URL-safe alphabet (rooms/fragments/v4-event-ids.md). Raises
    ``ValueError`` for a v1/v2 event without a string ``event_id``.
    """
    if type(room_version) is not RoomVersion:  # a call only for an identifier
        room_version = room_version_of(room_version)
    if room_version.event_id_format is EventIdFormat.V1_OPAQUE:
        # No hashing needed: the ID is in the event.
        event_id = event.get("event_id")
        if not isinstance(event_id, str):
            raise ValueError("event has no event_id string")
        return event_id
    return prepare_event(room_version, event).event_id


def room_id_for_create_event(
    room_version: RoomVersion | str,
    create_event: Mapping[str, Any],
    *,
    prepared: PreparedEvent | None = None,
) -> str:
    """The room ID a v12+ ``m.room.create`` event defines: ``!`` + its URL-safe reference hash.

    (rooms/v12.md; appendices, "Room IDs": the create event's event ID with
    the ``!`` sigil.) Raises ``ValueError`` for other room versions or event
    types.
    """
    if type(room_version) is not RoomVersion:  # a call only for an identifier
        room_version = room_version_of(room_version)
    if not room_version.room_id_is_create_event_hash:
        raise ValueError(f"room version {room_version.identifier} room IDs are not hashes")
    if create_event.get("type") != "m.room.create":
        raise ValueError("not an m.room.create event")
    prepared = ensure_prepared(room_version, create_event, prepared)
    return "!" + encode_base64(prepared.reference_hash, urlsafe=True)


def compute_content_hash(
    room_version: RoomVersion | str, event: Mapping[str, Any], *, strict: bool | None = None
) -> bytes:
    """The sha256 content hash (server-server-api, "Calculating the content hash for an event").

    Covers the whole unredacted event except ``unsigned``, ``signatures`` and
    ``hashes``. ``strict`` defaults to the room version's rules for received
    data; raises ``CanonicalJSONError`` for an event with no canonical form.
    """
    if type(room_version) is not RoomVersion:  # a call only for an identifier
        room_version = room_version_of(room_version)
    if strict is None:
        strict = room_version.strict_canonical_json
    hashed = {key: value for key, value in event.items() if key not in _NOT_CONTENT_HASHED}
    return hashlib.sha256(encode_canonical_json(hashed, strict=strict)).digest()


def add_content_hash(room_version: RoomVersion | str, event: Mapping[str, Any]) -> dict[str, Any]:
    """A new event with ``hashes.sha256`` set to its content hash (unpadded base64).

    For events we author, so canonical JSON is always strict. Other entries
    already in ``hashes`` are kept.
    """
    digest = compute_content_hash(room_version, event, strict=True)
    existing = event.get("hashes")
    hashes = dict(existing) if isinstance(existing, dict) else {}
    hashes["sha256"] = encode_base64(digest)
    return {**event, "hashes": hashes}


def check_content_hash(
    room_version: RoomVersion | str, event: Mapping[str, Any], *, strict: bool | None = None
) -> bool:
    """True when ``hashes.sha256`` matches the event's content hash.

    False when the hash is missing, not a string, not base64, or wrong (the
    spec then has receivers use the redacted copy). An event that cannot be
    encoded at all raises ``CanonicalJSONError``, as it is malformed rather
    than redacted. ``strict`` as for ``compute_content_hash``.
    """
    if type(room_version) is not RoomVersion:  # a call only for an identifier
        room_version = room_version_of(room_version)
    hashes = event.get("hashes")
    if not isinstance(hashes, dict):
        return False
    claimed = hashes.get("sha256")
    if not isinstance(claimed, str):
        return False
    try:
        # Lenient decoding (standard or URL-safe alphabet), as other servers do.
        claimed_bytes = decode_base64(claimed)
    except ValueError:
        return False
    return hmac.compare_digest(
        claimed_bytes, compute_content_hash(room_version, event, strict=strict)
    )
