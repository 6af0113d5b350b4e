"""The stable room versions 1 to 12 and the rules in which they differ.

Only rules that matter to building, checking, hashing, redacting and signing an
event are tabled here (rooms/v1.md .. rooms/v12.md and their fragments); auth
and state-resolution rules belong to a full homeserver.
"""

from __future__ import annotations

import enum

import attrs

from .errors import Codes, MatrixError

__all__ = [
    "KNOWN_ROOM_VERSIONS",
    "EventFormat",
    "EventIdFormat",
    "RedactionRules",
    "RoomVersion",
    "get_room_version",
    "room_version_of",
]


class EventIdFormat(enum.Enum):
    """How an event's ID is formed."""

    #: v1/v2: ``$opaque:server``, chosen by the sender and carried in the PDU.
    V1_OPAQUE = "v1"
    #: v3: ``$`` + standard unpadded base64 of the reference hash (v3 event IDs).
    V3_BASE64 = "v3"
    #: v4+: ``$`` + URL-safe unpadded base64 of the reference hash (v4 event IDs).
    V4_URLSAFE = "v4"


class EventFormat(enum.Enum):
    """Shape of the PDU (server-server-api, "PDUs", per room version)."""

    #: v1/v2: ``event_id`` in the PDU; ``prev_events``/``auth_events`` are
    #: ``[[event_id, {"sha256": hash}], ...]``.
    V1 = 1
    #: v3 to v11: no ``event_id``; ``prev_events``/``auth_events`` are lists of IDs.
    V3 = 3
    #: v12: as V3, and the create event has no ``room_id``; the room ID is the
    #: create event's reference hash with the ``!`` sigil.
    V12 = 12


class RedactionRules(enum.Enum):
    """Which redaction algorithm applies (rooms/fragments/*-redactions.md)."""

    V1 = "v1"  # v1-v5: aliases content kept.
    V6 = "v6"  # v6, v7: m.room.aliases no longer special.
    V8 = "v8"  # v8: join_rules keeps ``allow``.
    V9 = "v9"  # v9, v10: member keeps ``join_authorised_via_users_server``.
    V11 = "v11"  # v11, v12: the v11 rules.


@attrs.frozen
class RoomVersion:
    """One stable room version and the rules this package needs from it."""

    identifier: str
    event_format: EventFormat
    event_id_format: EventIdFormat
    redaction_rules: RedactionRules
    #: v6+: received events must be strict canonical JSON (no floats, integers
    #: within the safe range), else 400 M_BAD_JSON.
    strict_canonical_json: bool
    #: v5+: a signing key must be valid at the event's ``origin_server_ts``
    #: (``valid_until_ts`` capped at now + 7 days).
    enforce_key_validity: bool
    #: v1/v2: events must also be signed by the server named in the event ID.
    check_event_id_server_signature: bool
    #: v12: room IDs are ``!`` + the create event's reference hash (no server part).
    room_id_is_create_event_hash: bool
    #: v7+: the ``knock`` membership exists.
    knock: bool
    #: v8+: ``restricted`` join rules.
    restricted_join_rule: bool
    #: v10+: power levels must be integers.
    integer_power_levels: bool

    @property
    def event_id_in_event(self) -> bool:
        """True where the PDU carries its own ``event_id`` (v1 and v2)."""
        return self.event_format is EventFormat.V1

    @property
    def redaction_keeps_top_level_origin(self) -> bool:
        """True before v11, whose redaction drops ``origin``, ``membership``, ``prev_state``."""
        return self.redaction_rules is not RedactionRules.V11


def _version(
    identifier: str,
    event_format: EventFormat,
    event_id_format: EventIdFormat,
    redaction_rules: RedactionRules,
) -> RoomVersion:
    number = int(identifier)
    return RoomVersion(
        identifier=identifier,
        event_format=event_format,
        event_id_format=event_id_format,
        redaction_rules=redaction_rules,
        strict_canonical_json=number >= 6,
        enforce_key_validity=number >= 5,
        check_event_id_server_signature=number <= 2,
        room_id_is_create_event_hash=number >= 12,
        knock=number >= 7,
        restricted_join_rule=number >= 8,
        integer_power_levels=number >= 10,
    )


_F, _I, _R = EventFormat, EventIdFormat, RedactionRules

KNOWN_ROOM_VERSIONS: dict[str, RoomVersion] = {
    v.identifier: v
    for v in (
        _version("1", _F.V1, _I.V1_OPAQUE, _R.V1),
        _version("2", _F.V1, _I.V1_OPAQUE, _R.V1),
        _version("3", _F.V3, _I.V3_BASE64, _R.V1),
        _version("4", _F.V3, _I.V4_URLSAFE, _R.V1),
        _version("5", _F.V3, _I.V4_URLSAFE, _R.V1),
        _version("6", _F.V3, _I.V4_URLSAFE, _R.V6),
        _version("7", _F.V3, _I.V4_URLSAFE, _R.V6),
        _version("8", _F.V3, _I.V4_URLSAFE, _R.V8),
        _version("9", _F.V3, _I.V4_URLSAFE, _R.V9),
        _version("10", _F.V3, _I.V4_URLSAFE, _R.V9),
        _version("11", _F.V3, _I.V4_URLSAFE, _R.V11),
        _version("12", _F.V12, _I.V4_URLSAFE, _R.V11),
    )
}


def get_room_version(identifier: object) -> RoomVersion:
    """Look up a room version, or raise 400 ``M_INCOMPATIBLE_ROOM_VERSION``.

    The error carries ``room_version`` as the v2 invite API's example shows.
    """
    version = KNOWN_ROOM_VERSIONS.get(identifier) if isinstance(identifier, str) else None
    if version is None:
        raise MatrixError(
            400,
            Codes.INCOMPATIBLE_ROOM_VERSION,
            f"Room version {str(identifier)[:32]!r} is not supported by this server",
            room_version=identifier if isinstance(identifier, str) else str(identifier),
        )
    return version


def room_version_of(room_version: RoomVersion | str) -> RoomVersion:
    """``room_version`` itself, or the version it names (``get_room_version``'s errors).

    What every function of the core taking a room version accepts: a
    ``RoomVersion`` or its identifier (``"10"``).
    """
    if isinstance(room_version, RoomVersion):
        return room_version
    return get_room_version(room_version)
