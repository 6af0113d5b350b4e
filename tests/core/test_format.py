"""Tests for federation_invite.core.format: is a PDU well-formed for its room version?"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.core.canonical import MAX_NESTING, encode_canonical_json
from federation_invite.core.errors import MatrixError
from federation_invite.core.format import (
    MAX_PDU_NESTING,
    MAX_PDU_SIZE,
    MAX_ROOM_STATE_NESTING,
    check_event_format,
    check_pdu_size,
    federation_form_problem,
    pdu_nesting_exceeded,
    pdu_nesting_problem,
    room_state_nesting_problem,
)
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS

ALL_VERSIONS = [str(n) for n in range(1, 13)]
HASH = "abase64encodedsha256hashshouldbe43byteslong"
STANDARD_IDS = [
    "$CD66HAED5npg6074c6pDtLKalHjVfYb2q4Q3LZgrW6o",
    "$acR1l0raoZnm60CBwAVgqbZqoO/mYU81xysh1u7XcJk",
]
URLSAFE_IDS = [
    "$Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3a5lr5Zg",
    "$CD66HAED5npg6074c6pDtLKalHjVfYb2q4Q3LZgrW6o",
]
V12_ROOM_ID = "!Nhcu5BS-UMnFX7hBVfVSoXiD7OgH6iRT-xyIuqDnpYQ"


def invite_event(version: str) -> dict[str, Any]:
    """A Synapse-style m.room.member invite PDU in the shape of room version ``version``."""
    event: dict[str, Any] = {
        "content": {"displayname": "Bob", "membership": "invite"},
        "depth": 12,
        "hashes": {"sha256": HASH},
        "origin_server_ts": 1549041175876,
        "room_id": "!abc123:example.org",
        "sender": "@alice:example.org",
        "signatures": {"example.org": {"ed25519:a_WujH": "86BytesOfSignatureOfTheRedactedEvent"}},
        "state_key": "@bob:remote.example",
        "type": "m.room.member",
        "unsigned": {"age": 4612},
    }
    if version in ("1", "2"):
        # pdu_v1: event_id in the PDU, (event_id, hashes) pairs; Synapse adds origin.
        event["event_id"] = "$a4ecee13e2accdadf56c1025:example.org"
        event["origin"] = "example.org"
        event["prev_events"] = [["$af232176:example.org", {"sha256": HASH}]]
        event["auth_events"] = [
            ["$create:example.org", {"sha256": HASH}],
            ["$power:example.org", {"sha256": HASH}],
        ]
        event["prev_state"] = []
    else:
        ids = STANDARD_IDS if version == "3" else URLSAFE_IDS
        event["prev_events"] = [ids[0]]
        event["auth_events"] = list(ids)
        if version == "12":
            event["room_id"] = V12_ROOM_ID
        elif version != "11":
            event["origin"] = "example.org"
    return event


def create_event_v12() -> dict[str, Any]:
    """A v12 m.room.create PDU: no room_id, no prev_events or auth_events entries."""
    event = invite_event("12")
    del event["room_id"]
    event.update(
        type="m.room.create",
        state_key="",
        content={"room_version": "12"},
        prev_events=[],
        auth_events=[],
        depth=1,
    )
    return event


class FormatTestCase(SynchronousTestCase):
    def assertBad(self, version: str, event: object, message: str) -> None:
        """check_event_format raises exactly 400 M_BAD_JSON "Invalid PDU: <message>"."""
        with self.assertRaises(MatrixError) as caught:
            check_event_format(version, event)
        self.assertEqual(
            (caught.exception.http_status, caught.exception.errcode, caught.exception.message),
            (400, "M_BAD_JSON", f"Invalid PDU: {message}"),
        )

    def assertBadEverywhere(self, mutate: Any, message: str, versions: Any = ALL_VERSIONS) -> None:
        """Apply ``mutate`` to each version's valid invite and expect ``message``."""
        for version in versions:
            event = invite_event(version)
            mutate(event)
            self.assertBad(version, event, message)


class ValidEventTests(FormatTestCase):
    """Synapse-style invites pass for every room version (pdu_v1 .. pdu_v12)."""

    def test_invite_each_version(self) -> None:
        """A well-formed invite passes in room versions 1 to 12, by name or RoomVersion."""
        for version in ALL_VERSIONS:
            check_event_format(version, invite_event(version))
            check_event_format(KNOWN_ROOM_VERSIONS[version], invite_event(version))

    def test_does_not_mutate(self) -> None:
        """The caller's event is left untouched."""
        for version in ALL_VERSIONS:
            event = invite_event(version)
            before = copy.deepcopy(event)
            check_event_format(version, event)
            self.assertEqual(event, before)

    def test_optional_keys_absent(self) -> None:
        """state_key, unsigned, origin and redacts are optional."""
        for version in ALL_VERSIONS:
            event = invite_event(version)
            for key in ("state_key", "unsigned", "origin", "prev_state"):
                event.pop(key, None)
            check_event_format(version, event)

    def test_v12_create_event_without_room_id(self) -> None:
        """pdu_v12: the m.room.create event omits room_id."""
        check_event_format("12", create_event_v12())

    def test_reference_limits_exactly(self) -> None:
        """20 prev_events and 10 auth_events are allowed ("less than or equal to")."""
        for version in ALL_VERSIONS:
            event = invite_event(version)
            event["prev_events"] = event["prev_events"] * 20
            event["auth_events"] = event["auth_events"][:1] * 10
            check_event_format(version, event)

    def test_empty_references(self) -> None:
        """Empty prev_events and auth_events are well-formed (the auth rules judge them)."""
        for version in ALL_VERSIONS:
            event = invite_event(version)
            event["prev_events"] = event["auth_events"] = []
            check_event_format(version, event)

    def test_field_length_limit_exact(self) -> None:
        """type and state_key of exactly 255 bytes pass."""
        for version in ALL_VERSIONS:
            event = invite_event(version)
            event["type"] = "t" * 255
            event["state_key"] = "é" * 127 + "x"
            check_event_format(version, event)

    def test_depth_bounds(self) -> None:
        """depth 0 and the per-version maximum (2^63-1 before v6, 2^53-1 from v6) pass."""
        for version in ALL_VERSIONS:
            event = invite_event(version)
            event["depth"] = 0
            check_event_format(version, event)
            event["depth"] = 2**63 - 1 if int(version) < 6 else 2**53 - 1
            check_event_format(version, event)

    def test_origin_server_ts_bounds(self) -> None:
        """origin_server_ts is ``format: int64`` (pdu_base): -(2^63) and 2^63-1 pass in rooms
        v1-5; from v6 canonical JSON bounds it to [-(2^53)+1, 2^53-1], whose ends pass."""
        for version in ALL_VERSIONS:
            safe = int(version) >= 6
            for ts in (-(2**53) + 1, 2**53 - 1) if safe else (-(2**63), 2**63 - 1):
                event = invite_event(version)
                event["origin_server_ts"] = ts
                check_event_format(version, event)

    def test_floats_before_v6(self) -> None:
        """Room versions 1 to 5 tolerate floats and large integers in content."""
        for version in ALL_VERSIONS[:5]:
            event = invite_event(version)
            event["content"]["weight"] = 1.5
            event["content"]["big"] = 2**60
            check_event_format(version, event)

    def test_redacts_from_v11_not_top_level(self) -> None:
        """From v11 a top-level redacts is no PDU key (it lives in content) and is not checked."""
        for version in ("11", "12"):
            event = invite_event(version)
            event["redacts"] = 42
            check_event_format(version, event)

    def test_redacts_string_before_v11(self) -> None:
        """pdu_v1 .. pdu_v6 define redacts as a string."""
        for version in ALL_VERSIONS[:10]:
            event = invite_event(version)
            event["redacts"] = "$some/old+event"
            check_event_format(version, event)


class RejectTests(FormatTestCase):
    """Each rule of the PDU schemas rejects with 400 M_BAD_JSON naming the field."""

    def test_v3_plus_event_id_refused(self) -> None:
        """rooms/v3.md "Event format": "When events are sent over federation, the event_id
        field is no longer included"; Synapse refuses such a PDU (400 "Invalid event JSON"),
        and so does our outbound check before signing: an event_id key of any value is
        400 M_BAD_JSON in room versions 3 to 12 (v1/v2 still require it)."""
        for version in ALL_VERSIONS[2:]:
            for value in [
                "$anything",
                "$a4ecee13e2accdadf56c1025:example.org",
                {"not": "a string"},
            ]:
                event = invite_event(version)
                event["event_id"] = value
                self.assertBad(
                    version,
                    event,
                    f"room version {version} events carry no event_id over federation"
                    " (their ID is their reference hash): the event must be signed without it",
                )

    def test_v12_create_event_in_auth_events_refused(self) -> None:
        """rooms/v12.md: the m.room.create event "MUST NOT be selected for auth_events"; its ID
        is the room ID's hash ($ + the room ID's localpart), and Synapse refuses an event
        listing it (400 "auth_events must not contain the create event"), as our outbound
        check does before signing: 400 M_BAD_JSON, wherever it is in the list. Before v12 the
        create event is an auth event like any other."""
        create_id = "$" + V12_ROOM_ID[1:]
        for auth_events in ([create_id], [URLSAFE_IDS[0], create_id]):
            event = invite_event("12")
            event["auth_events"] = auth_events
            self.assertBad(
                "12",
                event,
                f"the event's auth_events list the room's m.room.create event {create_id},"
                " which room version 12 never selects as an auth event",
            )
        event = invite_event("11")
        event["auth_events"] = [create_id]
        check_event_format("11", event)

    def test_not_an_object(self) -> None:
        """A PDU must be a JSON object."""
        for value in [None, [], "event", 1, 1.5, True]:
            self.assertBad("10", value, "the event is not a JSON object")

    def test_unknown_room_version(self) -> None:
        """An unknown room version is 400 M_INCOMPATIBLE_ROOM_VERSION, from get_room_version."""
        with self.assertRaises(MatrixError) as caught:
            check_event_format("13", invite_event("11"))
        self.assertEqual(caught.exception.errcode, "M_INCOMPATIBLE_ROOM_VERSION")

    def test_missing_required_keys(self) -> None:
        """pdu_base and the versioned schemas: every required key must be present."""
        common = ["type", "sender", "origin_server_ts", "content", "depth", "hashes", "signatures"]
        common += ["prev_events", "auth_events", "room_id"]
        for version in ALL_VERSIONS:
            keys = [*common, "event_id"] if version in ("1", "2") else common
            for key in keys:
                event = invite_event(version)
                del event[key]
                self.assertBad(version, event, f"missing the {key!r} key")

    def test_strict_canonical_json_from_v6(self) -> None:
        """rooms/fragments/v6-canonical-json.md: floats and big integers are M_BAD_JSON from v6."""
        for version in ALL_VERSIONS[5:]:
            event = invite_event(version)
            event["content"]["weight"] = 1.5
            self.assertBad(
                version, event, "not canonical JSON: floats are not allowed in canonical JSON"
            )
            event = invite_event(version)
            event["unsigned"]["age"] = 2**53
            self.assertBad(
                version,
                event,
                f"not canonical JSON: integer {2**53} is outside [-(2**53)+1, 2**53-1]",
            )

    def test_never_json_in_any_version(self) -> None:
        """NaN and lone surrogates have no JSON form and are refused in every room version."""
        for version in ALL_VERSIONS:
            event = invite_event(version)
            event["content"]["x"] = float("nan")
            with self.assertRaises(MatrixError) as caught:
                check_event_format(version, event)
            self.assertEqual(caught.exception.errcode, "M_BAD_JSON")
            event = invite_event(version)
            event["content"]["\ud800"] = 1
            self.assertBad(
                version, event, "not canonical JSON: string is not valid Unicode (lone surrogate)"
            )

    def test_string_fields(self) -> None:
        """type, sender, room_id, state_key (and v1/v2 event_id) must be strings."""
        for key in ("type", "sender", "room_id", "state_key"):
            self.assertBadEverywhere(
                lambda e, key=key: e.__setitem__(key, ["x"]), f"{key!r} must be a string"
            )
        self.assertBadEverywhere(
            lambda e: e.__setitem__("event_id", 5), "'event_id' must be a string", ["1", "2"]
        )

    def test_field_length_limits(self) -> None:
        """Size limits: sender, room_id, state_key, type and event_id are at most 255 bytes."""
        for key in ("type", "state_key"):
            self.assertBadEverywhere(
                lambda e, key=key: e.__setitem__(key, "é" * 128),
                f"{key!r} is longer than 255 bytes",
            )
        self.assertBadEverywhere(
            lambda e: e.__setitem__("sender", "@" + "a" * 250 + ":example.org"),
            "'sender' is longer than 255 bytes",
        )
        self.assertBadEverywhere(
            lambda e: e.__setitem__("room_id", "!" + "a" * 250 + ":example.org"),
            "'room_id' is longer than 255 bytes",
        )
        self.assertBadEverywhere(
            lambda e: e.__setitem__("event_id", "$" + "a" * 250 + ":example.org"),
            "'event_id' is longer than 255 bytes",
            ["1", "2"],
        )

    def test_sender_grammar(self) -> None:
        """appendices "User Identifiers": sender must be a user ID (historical grammar allowed)."""
        for sender in ["alice:example.org", "@alice", "@alice:bad_host", "@a\x00:h", "!r:h"]:
            self.assertBadEverywhere(
                lambda e, s=sender: e.__setitem__("sender", s), "'sender' is not a valid user ID"
            )
        for version in ALL_VERSIONS:
            event = invite_event(version)
            event["sender"] = "@Alice With Spaces:example.org"
            check_event_format(version, event)

    def test_room_id_grammar(self) -> None:
        """appendices "Room IDs": !opaque:server before v12, the create event hash in v12."""
        message = "'room_id' is not a valid room ID for this room version"
        self.assertBadEverywhere(
            lambda e: e.__setitem__("room_id", V12_ROOM_ID), message, ALL_VERSIONS[:11]
        )
        self.assertBadEverywhere(
            lambda e: e.__setitem__("room_id", "!abc123:example.org"), message, ["12"]
        )
        self.assertBadEverywhere(lambda e: e.__setitem__("room_id", "$abc:example.org"), message)

    def test_v12_create_event_with_room_id(self) -> None:
        """pdu_v12 (v12 auth rule 1.2): an m.room.create event carries no room_id."""
        event = create_event_v12()
        event["room_id"] = V12_ROOM_ID
        self.assertBad("12", event, "an m.room.create event has no 'room_id' in this room version")

    def test_create_event_needs_room_id_before_v12(self) -> None:
        """Before v12 every event, m.room.create included, has a room_id."""
        event = create_event_v12()
        event["prev_events"] = event["auth_events"] = []
        self.assertBad("11", event, "missing the 'room_id' key")

    def test_v1_event_id_grammar(self) -> None:
        """rooms/fragments/v1-event-ids.md: v1/v2 event_id is $opaque:server_name."""
        for bad in [URLSAFE_IDS[0], "$no-server", "abc:example.org"]:
            self.assertBadEverywhere(
                lambda e, b=bad: e.__setitem__("event_id", b),
                "'event_id' is not a valid event ID for this room version",
                ["1", "2"],
            )

    def test_origin_server_ts(self) -> None:
        """pdu_base: origin_server_ts is an int64 integer (not a bool, string or float); just
        outside int64, 2^63 and -(2^63)-1, is refused 400 M_BAD_JSON in rooms v1-5."""
        for bad in ["1549041175876", True, None, 2**63, -(2**63) - 1]:
            self.assertBadEverywhere(
                lambda e, b=bad: e.__setitem__("origin_server_ts", b),
                "'origin_server_ts' must be an integer",
                ALL_VERSIONS[:5] if isinstance(bad, int) and abs(bad) >= 2**63 else ALL_VERSIONS,
            )
        self.assertBadEverywhere(
            lambda e: e.__setitem__("origin_server_ts", 1.0),
            "'origin_server_ts' must be an integer",
            ALL_VERSIONS[:5],
        )

    def test_depth_type(self) -> None:
        """depth is an integer, not a bool or string."""
        for bad in ["12", False, None, [1]]:
            self.assertBadEverywhere(
                lambda e, b=bad: e.__setitem__("depth", b), "'depth' must be an integer"
            )

    def test_depth_range(self) -> None:
        """depth is in 0..2^63-1 before v6 (pdu_v1/v3/v4) and 0..2^53-1 from v6 (depth_v6)."""
        for version in ALL_VERSIONS:
            limit = 2**63 - 1 if int(version) < 6 else 2**53 - 1
            event = invite_event(version)
            event["depth"] = -1
            self.assertBad(version, event, f"'depth' must be between 0 and {limit}")
        self.assertBadEverywhere(
            lambda e: e.__setitem__("depth", 2**63),
            f"'depth' must be between 0 and {2**63 - 1}",
            ALL_VERSIONS[:5],
        )

    def test_content_and_unsigned_objects(self) -> None:
        """pdu_base: content and (if present) unsigned are objects."""
        for bad in [[], "x", None, 1]:
            self.assertBadEverywhere(
                lambda e, b=bad: e.__setitem__("content", b), "'content' must be an object"
            )
            self.assertBadEverywhere(
                lambda e, b=bad: e.__setitem__("unsigned", b), "'unsigned' must be an object"
            )

    def test_hashes(self) -> None:
        """components/event_hash.yaml: hashes is an object with a string sha256."""
        self.assertBadEverywhere(
            lambda e: e.__setitem__("hashes", [HASH]), "'hashes' must be an object"
        )
        for bad in [{}, {"sha256": 1}, {"sha512": HASH}, {"sha256": None}]:
            self.assertBadEverywhere(
                lambda e, b=bad: e.__setitem__("hashes", b), "'hashes' must have a string 'sha256'"
            )

    def test_hashes_values_all_strings(self) -> None:
        """Synapse's PDU parser refuses a hashes object with any value that is not a string
        (400 "Invalid event JSON"), beside a valid sha256 too: 400 M_BAD_JSON here, so that
        we never co-sign an event Synapse cannot parse. Other string entries pass."""
        for extra in [1, None, {}, [HASH], True]:
            self.assertBadEverywhere(
                lambda e, x=extra: e.__setitem__("hashes", {"sha256": HASH, "sha512": x}),
                "'hashes' must hold only strings",
            )
        for version in ALL_VERSIONS:
            event = invite_event(version)
            event["hashes"] = {"sha256": HASH, "sha512": HASH}
            check_event_format(version, event)

    def test_member_unsigned_room_state_lists(self) -> None:
        """Synapse's PDU parser keeps an m.room.member event's unsigned invite_room_state and
        knock_room_state and refuses either unless it is an array (of anything) or null (400
        "Invalid event JSON"): 400 M_BAD_JSON here, so that we never co-sign one. Other
        unsigned keys pass, and these keys in other events (Synapse strips them)."""
        for key in ("invite_room_state", "knock_room_state"):
            for bad in [5, "x", {}, {"a": [1]}, True, 1.5]:
                self.assertBadEverywhere(
                    lambda e, k=key, b=bad: e.__setitem__("unsigned", {"age": 1, k: b}),
                    f"'unsigned' {key!r} of an m.room.member event must be an array or null",
                    # A float is no strict canonical JSON from v6, refused as such first.
                    ALL_VERSIONS[:5] if isinstance(bad, float) else ALL_VERSIONS,
                )
            for good in [[], [1], [None, "x", {"a": [1]}, [2]], None]:
                for version in ALL_VERSIONS:
                    event = invite_event(version)
                    event["unsigned"] = {"age": 1, key: good}
                    check_event_format(version, event)
                    event = {**invite_event(version), "type": "m.room.topic", "state_key": ""}
                    event["unsigned"] = {key: 5}
                    check_event_format(version, event)
        # The outbound check's input: any mapping, unchecked (a tuple is an array).
        v10 = KNOWN_ROOM_VERSIONS["10"]
        member = {"type": "m.room.member", "unsigned": {"knock_room_state": (1,)}}
        self.assertIsNone(federation_form_problem(v10, member))
        member["unsigned"] = {"invite_room_state": [], "knock_room_state": "x"}
        self.assertEqual(
            federation_form_problem(v10, member),
            "'unsigned' 'knock_room_state' of an m.room.member event must be an array or null",
        )

    def test_v1_reference_hashes_values_all_strings(self) -> None:
        """pdu_v1 reference pairs: Synapse refuses their hashes object too when a value is
        not a string ({} and extra string entries pass): 400 M_BAD_JSON."""
        good_id = "$af232176:example.org"
        for key in ("prev_events", "auth_events"):
            for bad in [{"sha256": HASH, "o": 1}, {"o": None}, {"o": {}}]:
                self.assertBadEverywhere(
                    lambda e, key=key, b=bad: e.__setitem__(key, [[good_id, b]]),
                    f"{key!r} hashes must hold only strings",
                    ["1", "2"],
                )
            event = invite_event("1")
            event[key] = [[good_id, {"sha256": HASH, "o": "s"}]]
            check_event_format("1", event)

    def test_signatures(self) -> None:
        """pdu_base: signatures maps server names to objects of string signatures."""
        self.assertBadEverywhere(
            lambda e: e.__setitem__("signatures", []), "'signatures' must be an object"
        )
        self.assertBadEverywhere(
            lambda e: e.__setitem__("signatures", {"example.org": "sig"}),
            "'signatures' must map server names to objects",
        )
        self.assertBadEverywhere(
            lambda e: e.__setitem__("signatures", {"example.org": {"ed25519:a": 1}}),
            "'signatures' must hold string signatures",
        )

    def test_redacts_type(self) -> None:
        """pdu_v1 .. pdu_v6: a top-level redacts must be a string."""
        self.assertBadEverywhere(
            lambda e: e.__setitem__("redacts", ["$x"]),
            "'redacts' must be a string",
            ALL_VERSIONS[:10],
        )

    def test_reference_arrays(self) -> None:
        """prev_events and auth_events are arrays of at most 20 and 10 entries."""
        for key, limit in (("prev_events", 20), ("auth_events", 10)):
            self.assertBadEverywhere(
                lambda e, key=key: e.__setitem__(key, {}), f"{key!r} must be an array"
            )
            self.assertBadEverywhere(
                lambda e, key=key, limit=limit: e.__setitem__(key, e[key][:1] * (limit + 1)),
                f"{key!r} has more than {limit} entries",
            )

    def test_numbers_checked_lone_surrogate(self) -> None:
        """With the walk skipped, a lone surrogate in an ID field is still 400 M_BAD_JSON."""
        event = invite_event("10")
        event["type"] = "\ud800"
        with self.assertRaises(MatrixError) as caught:
            check_event_format("10", event, numbers_checked=True)
        self.assertEqual(caught.exception.message, "Invalid PDU: 'type' is not valid Unicode")

    def test_numbers_checked_skips_the_walk(self) -> None:
        """numbers_checked: the caller vouches for the numbers, so no canonical walk is made."""
        event = invite_event("10")
        event["content"]["n"] = 1.5
        check_event_format("10", event, numbers_checked=True)
        self.assertBad("10", event, "not canonical JSON: floats are not allowed in canonical JSON")

    def test_v1_reference_pairs(self) -> None:
        """pdu_v1: entries are [event_id, {"sha256": hash}] pairs with a v1 event ID."""
        good_id = "$af232176:example.org"
        for key in ("prev_events", "auth_events"):
            for bad in [good_id, [good_id], [good_id, {"sha256": HASH}, 1], {"id": good_id}]:
                self.assertBadEverywhere(
                    lambda e, key=key, b=bad: e.__setitem__(key, [b]),
                    f"{key!r} entries must be [event_id, hashes] pairs",
                    ["1", "2"],
                )
            # Synapse sends [event_id, {}] for references it cannot hash: accepted.
            event = invite_event("1")
            event[key] = [[good_id, {}]]
            check_event_format("1", event)
            for bad_hash in [HASH, {"sha256": 5}]:
                message = (
                    f"{key!r} hashes must be an object"
                    if not isinstance(bad_hash, dict)
                    else f"{key!r} hashes must have a string 'sha256'"
                )
                self.assertBadEverywhere(
                    lambda e, key=key, b=bad_hash: e.__setitem__(key, [[good_id, b]]),
                    message,
                    ["1", "2"],
                )
            for bad_id in [URLSAFE_IDS[0], 7, "$nocolon", None]:
                self.assertBadEverywhere(
                    lambda e, key=key, b=bad_id: e.__setitem__(key, [[b, {"sha256": HASH}]]),
                    f"{key!r} holds an invalid event ID for this room version",
                    ["1", "2"],
                )

    def test_v3_plus_reference_ids(self) -> None:
        """v3: standard base64 IDs; v4+: URL-safe IDs; never pairs or v1 IDs."""
        for key in ("prev_events", "auth_events"):
            message = f"{key!r} holds an invalid event ID for this room version"
            bad_everywhere = ["$af232176:example.org", ["$x:h", {"sha256": HASH}], 5, None]
            for bad in bad_everywhere:
                self.assertBadEverywhere(
                    lambda e, key=key, b=bad: e.__setitem__(key, [b]), message, ALL_VERSIONS[2:]
                )
            self.assertBadEverywhere(
                lambda e, key=key: e.__setitem__(
                    key, ["$Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3a5lr5Zg"]
                ),
                message,
                ["3"],
            )
            self.assertBadEverywhere(
                lambda e, key=key: e.__setitem__(key, [STANDARD_IDS[1]]),
                message,
                ALL_VERSIONS[3:],
            )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
KEYS = sorted(set(invite_event("1")) | set(invite_event("12")) | {"redacts", "event_id"})


def nested(levels: int) -> Any:
    """A value nesting ``levels`` arrays and objects (alternating) around an integer."""
    value: Any = 1
    for level in range(levels):
        value = [value] if level % 2 else {"n": value}
    return value


class NestingTests(FormatTestCase):
    """Synapse's PDU parser (serde_json, recursion limit 128) refuses a PDU nested 128 levels
    deep, the event object counted (400 M_BAD_JSON "Invalid event JSON"); 127 parse. So
    nothing deeper is well-formed here: 400 M_BAD_JSON (valid JSON, no well-formed event);
    past the 512 levels of every body, 400 M_NOT_JSON as the parser answers."""

    def assertTooDeep(self, version: str, event: dict[str, Any]) -> None:
        with self.assertRaises(MatrixError) as caught:
            check_event_format(version, event)
        self.assertEqual(
            (caught.exception.http_status, caught.exception.errcode, caught.exception.message),
            (400, "M_BAD_JSON", "Invalid PDU: nested deeper than 127 levels"),
        )

    def test_limit_is_synapses(self) -> None:
        """127 levels pass and 128 are refused, in content, an unsigned key Synapse keeps
        (invite_room_state, knock_room_state) or a key of its own, in every room version."""
        self.assertEqual(MAX_PDU_NESTING, 127)
        for version in ALL_VERSIONS:
            for place, key, above in (
                ("content", "deep", 2),
                ("unsigned", "invite_room_state", 2),
                ("unsigned", "knock_room_state", 2),
                ("deep", None, 1),
            ):
                for levels, ok in ((MAX_PDU_NESTING, True), (MAX_PDU_NESTING + 1, False)):
                    event = invite_event(version)
                    if key is not None:  # an array (as unsigned ones must be)
                        event.setdefault(place, {})[key] = [nested(levels - above - 1)]
                    else:
                        event[place] = nested(levels - above)
                    if ok:
                        check_event_format(version, event)
                    else:
                        self.assertTooDeep(version, event)

    def test_what_synapse_strips_is_not_counted(self) -> None:
        """Synapse strips an invite's unsigned keys but invite_room_state and
        knock_room_state (every unsigned key of other events) before its PDU parser: their
        depth does not count, up to the 512 levels every body is bounded by."""
        for event_type, key in (
            ("m.room.member", "x"),
            ("m.room.member", "age"),
            ("m.room.name", "invite_room_state"),
            ("m.room.name", "knock_room_state"),
        ):
            event = invite_event("10")
            event["type"] = event_type
            event["unsigned"] = {key: nested(510)}  # + the event and unsigned: 512
            self.assertIsNone(pdu_nesting_problem(event), (event_type, key))
            check_event_format("10", event)
            event["unsigned"] = {key: nested(511)}
            self.assertEqual(
                pdu_nesting_problem(event), "nested deeper than 512 levels", (event_type, key)
            )
            with self.assertRaises(MatrixError) as caught:
                check_event_format("10", event)
            self.assertEqual(
                (caught.exception.http_status, caught.exception.errcode),
                (400, "M_NOT_JSON"),
            )

    def test_room_state_given_replaces_the_events(self) -> None:
        """With room_state (Synapse's v2 /invite: the body's invite_room_state), that is
        counted in place of the event's own unsigned.invite_room_state, its entries at
        level 4: 124 levels each."""
        event = invite_event("10")
        event["unsigned"] = {"invite_room_state": [nested(300)]}
        self.assertIsNone(pdu_nesting_problem(event, room_state=[nested(124)]))
        self.assertIsNone(pdu_nesting_problem(event, room_state={"not": "a list"}))
        self.assertEqual(
            pdu_nesting_problem(event, room_state=[nested(125)]),
            "invite_room_state: an entry is nested deeper than 124 levels",
        )
        del event["unsigned"]
        self.assertEqual(
            pdu_nesting_problem(event, room_state=[nested(125)]),
            "invite_room_state: an entry is nested deeper than 124 levels",
        )

    def test_far_too_deep(self) -> None:
        """100,000 levels (built, not parsed) are refused just the same, without recursing."""
        event = invite_event("10")
        event["content"]["deep"] = nested(100_000)
        self.assertTooDeep("10", event)

    def test_nesting_checked_skips_the_walk(self) -> None:
        """nesting_checked: the caller parsed the event with the limit (parse_json's
        max_nesting), so it is not walked again."""
        event = invite_event("10")
        event["content"]["deep"] = nested(MAX_PDU_NESTING)
        check_event_format("10", event, nesting_checked=True)
        self.assertTooDeep("10", event)


class NestingExceededTests(SynchronousTestCase):
    """``pdu_nesting_exceeded``: the limit an event crosses (0 if none), alone (as
    ``check_pdu_nesting`` asks), with a v2 body's room state, and inside the body that
    carries it (``wrapped``, as ``inbound.invite_body_nesting_problem`` asks), where the
    body's 512 levels are answered first."""

    def test_limits(self) -> None:
        self.assertEqual((MAX_NESTING, MAX_PDU_NESTING, MAX_ROOM_STATE_NESTING), (512, 127, 124))

    def test_not_an_object(self) -> None:
        """An event that is no object (which the format check refuses next) is counted
        whole: 127 levels alone; as a body or in one, the body's 512 first."""
        self.assertEqual(pdu_nesting_exceeded(5), 0)
        self.assertEqual(pdu_nesting_exceeded([nested(126)]), 0)
        self.assertEqual(pdu_nesting_exceeded([nested(127)]), MAX_PDU_NESTING)
        # wrapped=0 (v1: the body is the event): 512 levels in all.
        self.assertEqual(pdu_nesting_exceeded([nested(126)], wrapped=0), 0)
        self.assertEqual(pdu_nesting_exceeded([nested(511)], wrapped=0), MAX_PDU_NESTING)
        self.assertEqual(pdu_nesting_exceeded([nested(512)], wrapped=0), MAX_NESTING)
        # wrapped=1 (v2: the event a level down): 511 for the event.
        self.assertEqual(pdu_nesting_exceeded([nested(125)], wrapped=1), 0)
        self.assertEqual(pdu_nesting_exceeded([nested(510)], wrapped=1), MAX_PDU_NESTING)
        self.assertEqual(pdu_nesting_exceeded([nested(511)], wrapped=1), MAX_NESTING)

    def test_v1_body(self) -> None:
        """wrapped=0: past 127 levels is the PDU's limit up to the body's 512, then the
        body's; a stripped unsigned key counts toward the 512 only."""
        event = invite_event("1")
        event["content"]["deep"] = nested(510)  # + the event and content: 512
        self.assertEqual(pdu_nesting_exceeded(event, wrapped=0), MAX_PDU_NESTING)
        event["content"]["deep"] = nested(511)
        self.assertEqual(pdu_nesting_exceeded(event, wrapped=0), MAX_NESTING)
        event = invite_event("1")
        event["unsigned"] = {"x": nested(510)}
        self.assertEqual(pdu_nesting_exceeded(event, wrapped=0), 0)
        event["unsigned"] = {"x": nested(511)}
        self.assertEqual(pdu_nesting_exceeded(event, wrapped=0), MAX_NESTING)

    def test_v2_body(self) -> None:
        """wrapped=1: the event, its stripped unsigned keys, the room state and the body's
        other values (``beside``) each bounded by the body's 512 levels (511 from the
        event's level); the room state's entries by 124 once inside that."""
        event = invite_event("10")
        self.assertEqual(pdu_nesting_exceeded(event, [], wrapped=1), 0)
        # The body's other values, at the event's level.
        self.assertEqual(pdu_nesting_exceeded(event, [], wrapped=1, beside=[nested(511)]), 0)
        self.assertEqual(
            pdu_nesting_exceeded(event, [], wrapped=1, beside=[{}, nested(512)]), MAX_NESTING
        )
        # The room state: its entries at level 4 of the parsed event.
        self.assertEqual(pdu_nesting_exceeded(event, [nested(124)], wrapped=1), 0)
        self.assertEqual(
            pdu_nesting_exceeded(event, [nested(125)], wrapped=1), MAX_ROOM_STATE_NESTING
        )
        self.assertEqual(
            pdu_nesting_exceeded(event, [nested(510)], wrapped=1), MAX_ROOM_STATE_NESTING
        )
        self.assertEqual(pdu_nesting_exceeded(event, [nested(511)], wrapped=1), MAX_NESTING)
        # Room state that is no list: Synapse parses [] in its place; the body's bound holds.
        self.assertEqual(pdu_nesting_exceeded(event, {"x": nested(510)}, wrapped=1), 0)
        self.assertEqual(pdu_nesting_exceeded(event, {"x": nested(511)}, wrapped=1), MAX_NESTING)
        # A stripped unsigned key of the event: body, event, unsigned, then the value.
        event["unsigned"] = {"x": nested(509)}
        self.assertEqual(pdu_nesting_exceeded(event, [], wrapped=1), 0)
        event["unsigned"] = {"x": nested(510)}
        self.assertEqual(pdu_nesting_exceeded(event, [], wrapped=1), MAX_NESTING)
        # Past 127 levels in the event itself, inside the 511: the PDU's limit.
        event = invite_event("10")
        event["content"]["deep"] = nested(509)  # + the event and content: 511
        self.assertEqual(pdu_nesting_exceeded(event, [], wrapped=1), MAX_PDU_NESTING)
        event["content"]["deep"] = nested(510)
        self.assertEqual(pdu_nesting_exceeded(event, [], wrapped=1), MAX_NESTING)

    def test_room_state_of_another_event_is_stripped(self) -> None:
        """Synapse's v2 /invite puts the body's room state in the event's unsigned, and
        strips every unsigned key of an event that is no m.room.member before its parser:
        such room state counts toward the 512 levels only (its entries at level 4)."""
        for unsigned in ({"age": 1}, None):
            event = invite_event("10")
            event["type"] = "m.room.name"
            if unsigned is None:
                del event["unsigned"]
            else:
                event["unsigned"] = unsigned
            self.assertEqual(pdu_nesting_exceeded(event, [nested(125)]), 0)
            self.assertEqual(pdu_nesting_exceeded(event, [nested(509)]), 0)
            self.assertEqual(pdu_nesting_exceeded(event, [nested(510)]), MAX_NESTING)
            self.assertEqual(
                pdu_nesting_problem(event, [nested(510)]), "nested deeper than 512 levels"
            )


class RoomStateNestingTests(FormatTestCase):
    """Synapse parses the invite's room state inside the event's unsigned (its v2 /invite
    moves it there), each entry at level 4 of the event: an entry may nest 124 levels, the
    entry counted. Anything but a list is not counted (Synapse drops it)."""

    def test_limit(self) -> None:
        self.assertEqual(MAX_ROOM_STATE_NESTING, 124)
        for levels, problem in (
            (124, None),
            (125, "an entry is nested deeper than 124 levels"),
            (100_000, "an entry is nested deeper than 124 levels"),
        ):
            entry = {"type": "m.room.name", "state_key": "", "content": {"x": nested(levels - 2)}}
            self.assertEqual(room_state_nesting_problem([{}, entry]), problem, levels)
            self.assertEqual(room_state_nesting_problem(({}, entry)), problem, levels)
            self.assertIsNone(room_state_nesting_problem({"x": entry}))


class NeverCrashTests(FormatTestCase):
    """check_event_format raises only MatrixError for any JSON-shaped input."""

    def assertOnlyMatrixError(self, version: str, event: object) -> None:
        try:
            check_event_format(version, event)
        except MatrixError as exc:
            self.assertEqual((exc.http_status, exc.errcode), (400, "M_BAD_JSON"))

    @settings(max_examples=200)
    @given(st.sampled_from(ALL_VERSIONS), JSON)
    def test_arbitrary_json(self, version: str, value: Any) -> None:
        """Arbitrary JSON values are refused with 400 M_BAD_JSON, never another exception."""
        self.assertOnlyMatrixError(version, value)

    @settings(max_examples=200)
    @given(
        st.sampled_from(ALL_VERSIONS),
        st.lists(
            st.tuples(st.sampled_from(KEYS), st.sampled_from(["set", "delete", "wrap"]), JSON),
            min_size=1,
            max_size=4,
        ),
    )
    def test_mutated_valid_events(self, version: str, mutations: list[Any]) -> None:
        """Valid invites with keys replaced, deleted or nested still raise only MatrixError."""
        event = invite_event(version)
        for key, action, value in mutations:
            if action == "set":
                event[key] = value
            elif action == "delete":
                event.pop(key, None)
            else:
                event[key] = [event.get(key), value]
        self.assertOnlyMatrixError(version, event)

    @settings(max_examples=200)
    @given(
        st.sampled_from(ALL_VERSIONS),
        st.sampled_from(["prev_events", "auth_events", "hashes", "signatures"]),
        st.lists(JSON, max_size=3),
    )
    def test_mutated_nested_fields(self, version: str, key: str, values: list[Any]) -> None:
        """Nested values inside the structured fields raise only MatrixError."""
        event = invite_event(version)
        if isinstance(event[key], list):
            event[key] = event[key] + values + [[v, v] for v in values]
        else:
            for index, value in enumerate(values):
                event[key][str(index)] = value
                event[key]["sha256"] = value
        self.assertOnlyMatrixError(version, event)


class PduSizeTests(SynchronousTestCase):
    """Size limits: a PDU's canonical JSON with signatures is at most 65536 bytes."""

    def padded(self, size: int) -> dict[str, Any]:
        event = invite_event("10")
        event["content"]["pad"] = ""
        base = len(encode_canonical_json(event))
        event["content"]["pad"] = "x" * (size - base)
        self.assertEqual(len(encode_canonical_json(event)), size)
        return event

    def test_at_limit(self) -> None:
        """Exactly 65536 bytes is allowed, as an event or as precomputed bytes."""
        check_pdu_size(self.padded(MAX_PDU_SIZE))
        check_pdu_size(b"x" * MAX_PDU_SIZE)

    def test_over_limit(self) -> None:
        """65537 bytes is 413 M_TOO_LARGE, as an event or as precomputed bytes."""
        for value in (self.padded(MAX_PDU_SIZE + 1), b"x" * (MAX_PDU_SIZE + 1)):
            with self.assertRaises(MatrixError) as caught:
                check_pdu_size(value)
            self.assertEqual(
                (caught.exception.http_status, caught.exception.errcode, caught.exception.message),
                (413, "M_TOO_LARGE", "PDU is 65537 bytes, more than the 65536 allowed"),
            )

    def test_counts_bytes_not_characters(self) -> None:
        """Non-ASCII text counts by its UTF-8 bytes."""
        event = invite_event("10")
        event["content"]["pad"] = "é" * 33000
        with self.assertRaises(MatrixError) as caught:
            check_pdu_size(event)
        self.assertEqual(caught.exception.errcode, "M_TOO_LARGE")

    def test_floats_counted_not_refused(self) -> None:
        """Old room versions' floats do not stop the size check."""
        event = invite_event("3")
        event["content"]["weight"] = 1.5
        check_pdu_size(event)

    def test_no_json_form(self) -> None:
        """A value with no JSON form is 400 M_BAD_JSON."""
        event = invite_event("3")
        event["content"]["weight"] = float("inf")
        with self.assertRaises(MatrixError) as caught:
            check_pdu_size(event)
        self.assertEqual(
            (caught.exception.http_status, caught.exception.errcode),
            (400, "M_BAD_JSON"),
        )
