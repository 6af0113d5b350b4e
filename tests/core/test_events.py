"""Tests for federation_invite.core.events: redaction, hashes, event and room IDs."""

from __future__ import annotations

import copy
import hashlib
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import encode_base64

from federation_invite.core.canonical import (
    MAX_SAFE_INTEGER,
    MIN_SAFE_INTEGER,
    CanonicalJSONError,
    encode_canonical_json,
)
from federation_invite.core.errors import MatrixError
from federation_invite.core.events import (
    PreparedEvent,
    add_content_hash,
    check_content_hash,
    compute_content_hash,
    compute_event_id,
    ensure_prepared,
    prepare_event,
    redact,
    reference_hash,
    room_id_for_create_event,
)
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS, RoomVersion

ALL_VERSIONS = list(KNOWN_ROOM_VERSIONS.values())


def versions(*identifiers: str) -> list[RoomVersion]:
    """The named room versions."""
    return [KNOWN_ROOM_VERSIONS[i] for i in identifiers]


V1_TO_5 = versions("1", "2", "3", "4", "5")
V6_UP = versions("6", "7", "8", "9", "10", "11", "12")
BEFORE_V8 = versions("1", "2", "3", "4", "5", "6", "7")
V8_UP = versions("8", "9", "10", "11", "12")
BEFORE_V9 = versions("1", "2", "3", "4", "5", "6", "7", "8")
V9_UP = versions("9", "10", "11", "12")
BEFORE_V11 = versions("1", "2", "3", "4", "5", "6", "7", "8", "9", "10")
V11_UP = versions("11", "12")


def base_event(**overrides: Any) -> dict[str, Any]:
    """A plausible PDU with every top-level key any redaction rule mentions, and some it does not."""
    event: dict[str, Any] = {
        "event_id": "$opaque:origin.example",
        "type": "m.room.message",
        "room_id": "!room:origin.example",
        "sender": "@alice:origin.example",
        "state_key": "",
        "content": {"body": "hello"},
        "hashes": {"sha256": "abc"},
        "signatures": {"origin.example": {"ed25519:1": "sig"}},
        "depth": 5,
        "prev_events": ["$prev"],
        "prev_state": [],
        "auth_events": ["$auth"],
        "origin": "origin.example",
        "origin_server_ts": 1234,
        "membership": "join",
        "unsigned": {"age": 10},
        "redacts": "$other",
        "extra_top_level": True,
    }
    event.update(overrides)
    return event


def redacted_content(version: RoomVersion, event_type: str, content: dict[str, Any]) -> Any:
    """The content ``redact`` leaves for an event of ``event_type``."""
    return redact(version, base_event(type=event_type, content=content))["content"]


class RedactionTopLevelTests(SynchronousTestCase):
    """Top-level keys kept by the redaction algorithm."""

    def test_v1_top_level(self) -> None:
        """v1 to v10 keep exactly the v1 list, dropping ``unsigned`` and unknown keys.

        rooms/fragments/v1-redactions.md (unchanged in v6-redactions.md, v9-redactions.md).
        """
        for version in BEFORE_V11:
            self.assertEqual(
                set(redact(version, base_event())),
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
                },
                version.identifier,
            )

    def test_v11_top_level(self) -> None:
        """v11 and v12 drop ``origin``, ``membership`` and ``prev_state``.

        rooms/fragments/v11-redactions.md; rooms/v11.md, "Redactions".
        """
        for version in V11_UP:
            redacted = redact(version, base_event())
            self.assertEqual(
                set(redacted),
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
                    "auth_events",
                    "origin_server_ts",
                },
            )

    def test_kept_values_unchanged(self) -> None:
        """Kept top-level values, ``signatures`` and ``hashes`` included, are kept as they are."""
        event = base_event()
        for version in ALL_VERSIONS:
            redacted = redact(version, event)
            for key in redacted:
                if key != "content":
                    self.assertEqual(redacted[key], event[key])

    def test_top_level_redacts_dropped(self) -> None:
        """A top-level ``redacts`` is in no version's list, so it is always dropped.

        rooms/fragments/v1-redactions.md .. v11-redactions.md.
        """
        for version in ALL_VERSIONS:
            redacted = redact(version, base_event(type="m.room.redaction"))
            self.assertNotIn("redacts", redacted)

    def test_input_not_mutated(self) -> None:
        """Redaction returns a new dict and leaves the input untouched."""
        event = base_event(
            type="m.room.member",
            content={"membership": "invite", "third_party_invite": {"signed": {}, "x": 1}},
        )
        original = copy.deepcopy(event)
        for version in ALL_VERSIONS:
            redact(version, event)
        self.assertEqual(event, original)

    def test_missing_content_stays_missing(self) -> None:
        """An event without ``content`` redacts to one without ``content``."""
        event = base_event()
        del event["content"]
        for version in ALL_VERSIONS:
            self.assertNotIn("content", redact(version, event))

    def test_content_not_an_object(self) -> None:
        """A non-object ``content`` cannot be redacted: ``ValueError``."""
        for version in ALL_VERSIONS:
            with self.assertRaises(ValueError) as caught:
                redact(version, base_event(content=["body"]))
            self.assertEqual(str(caught.exception), "event content is not an object")

    def test_type_not_a_string(self) -> None:
        """An event whose ``type`` is not a string keeps no content keys."""
        for version in ALL_VERSIONS:
            event = base_event(type=["m.room.create"], content={"creator": "@a:b"})
            self.assertEqual(redact(version, event)["content"], {})


class RedactionContentTests(SynchronousTestCase):
    """Content keys kept per event type, per room version."""

    def test_unknown_type_content_emptied(self) -> None:
        """Content of types with no rule is emptied in every version (v1-redactions.md)."""
        for version in ALL_VERSIONS:
            self.assertEqual(redacted_content(version, "m.room.message", {"body": "x"}), {})
            self.assertEqual(redacted_content(version, "m.room.topic", {"topic": "x"}), {})

    def test_member_membership(self) -> None:
        """m.room.member keeps ``membership`` only, in every version (v1-redactions.md)."""
        for version in ALL_VERSIONS:
            content = {"membership": "invite", "displayname": "Bob", "avatar_url": "mxc://a/b"}
            self.assertEqual(
                redacted_content(version, "m.room.member", content), {"membership": "invite"}
            )

    def test_member_join_authorised_before_v9(self) -> None:
        """``join_authorised_via_users_server`` is dropped before v9 (v1/v6-redactions.md)."""
        content = {"membership": "join", "join_authorised_via_users_server": "@a:b"}
        for version in BEFORE_V9:
            self.assertEqual(
                redacted_content(version, "m.room.member", content), {"membership": "join"}
            )

    def test_member_join_authorised_from_v9(self) -> None:
        """v9+ keep ``join_authorised_via_users_server`` (rooms/fragments/v9-redactions.md)."""
        content = {"membership": "join", "join_authorised_via_users_server": "@a:b"}
        for version in V9_UP:
            self.assertEqual(redacted_content(version, "m.room.member", content), content)

    def test_member_third_party_invite_before_v11(self) -> None:
        """Before v11 ``third_party_invite`` is redacted away entirely (v9-redactions.md)."""
        content = {"membership": "invite", "third_party_invite": {"signed": {"token": "t"}}}
        for version in BEFORE_V11:
            self.assertEqual(
                redacted_content(version, "m.room.member", content), {"membership": "invite"}
            )

    def test_member_third_party_invite_signed_v11(self) -> None:
        """v11+ keep ``third_party_invite`` with only its ``signed`` key.

        rooms/fragments/v11-redactions.md: "it allows the `signed` key of the
        `third_party_invite` key"; rooms/v11.md: it "will only contain the
        signed key after redaction".
        """
        signed = {"mxid": "@b:c", "token": "t", "signatures": {}}
        content = {
            "membership": "invite",
            "third_party_invite": {"display_name": "bob@example.org", "signed": signed},
        }
        for version in V11_UP:
            self.assertEqual(
                redacted_content(version, "m.room.member", content),
                {"membership": "invite", "third_party_invite": {"signed": signed}},
            )

    def test_member_third_party_invite_without_signed_v11(self) -> None:
        """v11+: a ``third_party_invite`` object without ``signed`` is kept, emptied.

        rooms/v11.md: the key "is no longer redacted, *but* will only contain the
        signed key after redaction".
        """
        content = {"membership": "invite", "third_party_invite": {"display_name": "x"}}
        for version in V11_UP:
            self.assertEqual(
                redacted_content(version, "m.room.member", content),
                {"membership": "invite", "third_party_invite": {}},
            )

    def test_member_third_party_invite_not_object_v11(self) -> None:
        """v11+: a ``third_party_invite`` that is not an object has no ``signed`` and is dropped."""
        content = {"membership": "invite", "third_party_invite": "signed"}
        for version in V11_UP:
            self.assertEqual(
                redacted_content(version, "m.room.member", content), {"membership": "invite"}
            )

    def test_create_before_v11(self) -> None:
        """Before v11 m.room.create keeps only ``creator`` (v1-redactions.md)."""
        content = {"creator": "@a:b", "room_version": "5", "m.federate": False}
        for version in BEFORE_V11:
            self.assertEqual(
                redacted_content(version, "m.room.create", content), {"creator": "@a:b"}
            )

    def test_create_v11_keeps_all(self) -> None:
        """v11+ m.room.create keeps all content (v11-redactions.md, "allows all keys")."""
        content = {
            "room_version": "12",
            "m.federate": False,
            "additional_creators": ["@b:c"],
            "predecessor": {"room_id": "!old:a"},
        }
        for version in V11_UP:
            result = redacted_content(version, "m.room.create", content)
            self.assertEqual(result, content)
            self.assertIsNot(result, content)

    def test_join_rules_before_v8(self) -> None:
        """Before v8 m.room.join_rules keeps only ``join_rule`` (v1/v6-redactions.md)."""
        content = {"join_rule": "restricted", "allow": [{"type": "m.room_membership"}]}
        for version in BEFORE_V8:
            self.assertEqual(
                redacted_content(version, "m.room.join_rules", content),
                {"join_rule": "restricted"},
            )

    def test_join_rules_allow_from_v8(self) -> None:
        """v8+ m.room.join_rules also keep ``allow`` (rooms/v8.md, "Redactions")."""
        content = {"join_rule": "restricted", "allow": [{"type": "m.room_membership"}], "x": 1}
        for version in V8_UP:
            self.assertEqual(
                redacted_content(version, "m.room.join_rules", content),
                {"join_rule": "restricted", "allow": [{"type": "m.room_membership"}]},
            )

    def test_power_levels_before_v11(self) -> None:
        """Before v11 power levels keep the eight v1 keys, not ``invite`` (v1-redactions.md)."""
        kept = {
            "ban": 50,
            "events": {"m.room.name": 50},
            "events_default": 0,
            "kick": 50,
            "redact": 50,
            "state_default": 50,
            "users": {"@a:b": 100},
            "users_default": 0,
        }
        content = {**kept, "invite": 0, "notifications": {"room": 50}}
        for version in BEFORE_V11:
            self.assertEqual(redacted_content(version, "m.room.power_levels", content), kept)

    def test_power_levels_invite_v11(self) -> None:
        """v11+ power levels also keep ``invite`` (v11-redactions.md), not ``notifications``."""
        kept = {
            "ban": 50,
            "events": {},
            "events_default": 0,
            "invite": 0,
            "kick": 50,
            "redact": 50,
            "state_default": 50,
            "users": {},
            "users_default": 0,
        }
        content = {**kept, "notifications": {"room": 50}}
        for version in V11_UP:
            self.assertEqual(redacted_content(version, "m.room.power_levels", content), kept)

    def test_history_visibility(self) -> None:
        """m.room.history_visibility keeps ``history_visibility`` in every version."""
        content = {"history_visibility": "shared", "other": 1}
        for version in ALL_VERSIONS:
            self.assertEqual(
                redacted_content(version, "m.room.history_visibility", content),
                {"history_visibility": "shared"},
            )

    def test_aliases_v1_to_v5(self) -> None:
        """v1 to v5 keep m.room.aliases ``aliases`` (rooms/fragments/v1-redactions.md)."""
        content = {"aliases": ["#a:b"], "other": 1}
        for version in V1_TO_5:
            self.assertEqual(
                redacted_content(version, "m.room.aliases", content), {"aliases": ["#a:b"]}
            )

    def test_aliases_not_special_from_v6(self) -> None:
        """v6+ no longer protect m.room.aliases content (rooms/fragments/v6-redactions.md)."""
        for version in V6_UP:
            self.assertEqual(redacted_content(version, "m.room.aliases", {"aliases": ["#a:b"]}), {})

    def test_redaction_redacts_before_v11(self) -> None:
        """Before v11 m.room.redaction content is emptied (v9-redactions.md has no rule)."""
        for version in BEFORE_V11:
            self.assertEqual(redacted_content(version, "m.room.redaction", {"redacts": "$x"}), {})

    def test_redaction_redacts_v11(self) -> None:
        """v11+ m.room.redaction keeps ``redacts`` in content (v11-redactions.md)."""
        for version in V11_UP:
            self.assertEqual(
                redacted_content(version, "m.room.redaction", {"redacts": "$x", "reason": "r"}),
                {"redacts": "$x"},
            )


class ContentHashTests(SynchronousTestCase):
    """server-server-api, "Calculating the content hash for an event"."""

    def test_definition(self) -> None:
        """The hash is sha256 of the canonical event without unsigned, signatures, hashes."""
        event = base_event()
        stripped = {k: v for k, v in event.items() if k not in ("unsigned", "signatures", "hashes")}
        expected = hashlib.sha256(encode_canonical_json(stripped)).digest()
        for version in ALL_VERSIONS:
            self.assertEqual(compute_content_hash(version, event), expected)

    def test_ignores_unsigned_signatures_hashes(self) -> None:
        """Changing or removing unsigned, signatures or hashes leaves the content hash alone."""
        event = base_event()
        variants = [
            {**event, "unsigned": {"age": 99999}},
            {**event, "signatures": {}},
            {**event, "hashes": {"sha256": "other"}},
            {k: v for k, v in event.items() if k not in ("unsigned", "signatures", "hashes")},
        ]
        for version in ALL_VERSIONS:
            expected = compute_content_hash(version, event)
            for variant in variants:
                self.assertEqual(compute_content_hash(version, variant), expected)

    def test_covers_unredacted_content(self) -> None:
        """Content that redaction drops is still covered by the content hash."""
        event = base_event()
        for version in ALL_VERSIONS:
            self.assertNotEqual(
                compute_content_hash(version, event),
                compute_content_hash(version, {**event, "content": {"body": "bye"}}),
            )

    def test_add_then_check(self) -> None:
        """``add_content_hash`` sets unpadded base64 ``hashes.sha256`` that checks out."""
        event = base_event()
        del event["hashes"]
        original = copy.deepcopy(event)
        for version in ALL_VERSIONS:
            hashed = add_content_hash(version, event)
            self.assertEqual(
                hashed["hashes"], {"sha256": encode_base64(compute_content_hash(version, event))}
            )
            self.assertNotIn("=", hashed["hashes"]["sha256"])
            self.assertTrue(check_content_hash(version, hashed))
            self.assertEqual({k: v for k, v in hashed.items() if k != "hashes"}, event)
        self.assertEqual(event, original)

    def test_add_keeps_other_algorithms(self) -> None:
        """Other entries of an existing ``hashes`` object are kept; the input is not mutated."""
        event = base_event(hashes={"sha256": "old", "blake3": "xyz"})
        hashed = add_content_hash(ALL_VERSIONS[0], event)
        self.assertEqual(hashed["hashes"]["blake3"], "xyz")
        self.assertNotEqual(hashed["hashes"]["sha256"], "old")
        self.assertEqual(event["hashes"], {"sha256": "old", "blake3": "xyz"})

    def test_add_replaces_malformed_hashes(self) -> None:
        """A ``hashes`` that is not an object is replaced."""
        hashed = add_content_hash(ALL_VERSIONS[0], base_event(hashes="nope"))
        self.assertEqual(list(hashed["hashes"]), ["sha256"])

    def test_check_rejects(self) -> None:
        """``check_content_hash`` is False for missing, malformed or wrong hashes."""
        event = base_event()
        good = add_content_hash(ALL_VERSIONS[0], event)["hashes"]["sha256"]
        wrong = encode_base64(b"\x00" * 32)
        cases = {
            "missing hashes": {k: v for k, v in event.items() if k != "hashes"},
            "hashes not an object": {**event, "hashes": [good]},
            "no sha256": {**event, "hashes": {"sha512": good}},
            "sha256 not a string": {**event, "hashes": {"sha256": 5}},
            "not base64": {**event, "hashes": {"sha256": "a"}},
            "not ascii": {**event, "hashes": {"sha256": "\u00e9" * 43}},
            "wrong": {**event, "hashes": {"sha256": wrong}},
            "truncated": {**event, "hashes": {"sha256": good[:-4]}},
        }
        for version in ALL_VERSIONS:
            for name, case in cases.items():
                self.assertFalse(check_content_hash(version, case), name)

    def test_check_accepts_padded(self) -> None:
        """A padded base64 hash is accepted, as other servers' lenient decoders accept it."""
        event = base_event()
        good = add_content_hash(ALL_VERSIONS[0], event)["hashes"]["sha256"]
        self.assertTrue(
            check_content_hash(ALL_VERSIONS[0], {**event, "hashes": {"sha256": good + "="}})
        )

    def test_strictness_follows_room_version(self) -> None:
        """Floats are tolerated in received v1-v5 events and refused from v6.

        rooms/fragments/v6-canonical-json.md.
        """
        event = base_event(content={"body": "x", "score": 1.5})
        for version in V1_TO_5:
            compute_content_hash(version, event)
        for version in V6_UP:
            with self.assertRaises(CanonicalJSONError):
                compute_content_hash(version, event)
            with self.assertRaises(CanonicalJSONError):
                check_content_hash(version, event)

    def test_add_is_strict(self) -> None:
        """Our own output is strict canonical JSON in every room version."""
        event = base_event(content={"n": MAX_SAFE_INTEGER + 1})
        for version in ALL_VERSIONS:
            with self.assertRaises(CanonicalJSONError):
                add_content_hash(version, event)


class ReferenceHashTests(SynchronousTestCase):
    """server-server-api, "Calculating the reference hash for an event"."""

    def test_definition(self) -> None:
        """Redact, drop signatures and unsigned, canonical JSON, sha256."""
        event = base_event()
        for version in ALL_VERSIONS:
            redacted = redact(version, event)
            redacted.pop("signatures")
            expected = hashlib.sha256(encode_canonical_json(redacted)).digest()
            self.assertEqual(reference_hash(version, event), expected)

    def test_prepared_event(self) -> None:
        """``prepare_event`` yields the redaction, the signing bytes and their sha256 together."""
        event = base_event()
        for version in ALL_VERSIONS:
            prepared = prepare_event(version, event)
            self.assertIsInstance(prepared, PreparedEvent)
            self.assertIs(prepared.event, event)
            self.assertEqual(prepared.redacted, redact(version, event))
            unsigned_form = {k: v for k, v in prepared.redacted.items() if k != "signatures"}
            self.assertEqual(prepared.signing_bytes, encode_canonical_json(unsigned_form))
            self.assertEqual(
                prepared.reference_hash, hashlib.sha256(prepared.signing_bytes).digest()
            )
            self.assertEqual(prepared.reference_hash, reference_hash(version, event))

    def test_ignores_unsigned_signatures_and_redacted_content(self) -> None:
        """What redaction drops, and signatures, do not change the reference hash."""
        event = base_event()
        for version in ALL_VERSIONS:
            expected = reference_hash(version, event)
            for variant in (
                {**event, "unsigned": {"age": 1, "invite_room_state": []}},
                {**event, "signatures": {"other.example": {"ed25519:a": "s"}}},
                {**event, "content": {"body": "different"}},
                {**event, "extra_top_level": "different"},
            ):
                self.assertEqual(reference_hash(version, variant), expected)

    def test_covers_hashes(self) -> None:
        """The reference hash covers ``hashes``, and so the unredacted content indirectly."""
        event = base_event()
        for version in ALL_VERSIONS:
            self.assertNotEqual(
                reference_hash(version, event),
                reference_hash(version, {**event, "hashes": {"sha256": "other"}}),
            )

    def test_prepare_strictness(self) -> None:
        """``prepare_event`` follows the room version unless ``strict`` is given."""
        event = base_event(type="m.room.power_levels", content={"ban": 50.0})
        prepare_event(KNOWN_ROOM_VERSIONS["5"], event)
        with self.assertRaises(CanonicalJSONError):
            prepare_event(KNOWN_ROOM_VERSIONS["5"], event, strict=True)
        with self.assertRaises(CanonicalJSONError):
            prepare_event(KNOWN_ROOM_VERSIONS["6"], event)
        prepare_event(KNOWN_ROOM_VERSIONS["6"], event, strict=False)


def event_with_id_chars(version: RoomVersion, wanted: str) -> tuple[dict[str, Any], str]:
    """Search ``depth`` values for an event whose v3 (standard) event ID contains ``wanted``."""
    for depth in range(1, 10_000):
        event = base_event(depth=depth)
        del event["event_id"]
        encoded = encode_base64(reference_hash(version, event))
        if wanted in encoded:
            return event, encoded
    raise AssertionError("no such event found")  # pragma: no cover


class EventIdTests(SynchronousTestCase):
    """Event IDs per room version (rooms/fragments/v1-event-ids.md, v3 page, v4-event-ids.md)."""

    def test_v1_v2_carried_in_event(self) -> None:
        """v1/v2 event IDs are the event's own ``event_id`` (v1-event-ids.md)."""
        for version in versions("1", "2"):
            event = base_event()
            self.assertEqual(compute_event_id(version, event), "$opaque:origin.example")
            self.assertEqual(prepare_event(version, event).event_id, "$opaque:origin.example")

    def test_v1_v2_missing_or_not_string(self) -> None:
        """v1/v2 events without a string ``event_id`` raise ``ValueError``."""
        missing = base_event()
        del missing["event_id"]
        for version in versions("1", "2"):
            for event in (missing, base_event(event_id=5), base_event(event_id=None)):
                with self.assertRaises(ValueError) as caught:
                    compute_event_id(version, event)
                self.assertEqual(str(caught.exception), "event has no event_id string")
                with self.assertRaises(ValueError) as caught:
                    prepare_event(version, event).event_id  # noqa: B018
                self.assertEqual(str(caught.exception), "event has no event_id string")

    def test_v1_v2_need_no_valid_content(self) -> None:
        """v1/v2 event IDs are read from the event, never hashed: content need not be valid."""
        event = {"event_id": "$a:x", "content": "not an object"}
        for version in ("1", "2"):
            self.assertEqual(compute_event_id(version, event), "$a:x")

    def test_v3_standard_base64(self) -> None:
        """v3 event IDs are ``$`` + standard unpadded base64 and may contain ``+`` and ``/``.

        rooms/v3.md, "Event IDs".
        """
        v3 = KNOWN_ROOM_VERSIONS["3"]
        for char in "+/":
            event, encoded = event_with_id_chars(v3, char)
            event_id = compute_event_id(v3, event)
            self.assertEqual(event_id, "$" + encoded)
            self.assertIn(char, event_id)
            self.assertEqual(len(event_id), 44)

    def test_v4_up_urlsafe(self) -> None:
        """v4+ event IDs use the URL-safe alphabet: ``-`` and ``_`` where v3 has ``+`` and ``/``.

        rooms/fragments/v4-event-ids.md.
        """
        v3 = KNOWN_ROOM_VERSIONS["3"]
        for char, urlsafe_char in (("+", "-"), ("/", "_")):
            event, encoded = event_with_id_chars(v3, char)
            # v3, v4 and v5 share redaction rules, so the reference hash is the same.
            for version in versions("4", "5"):
                event_id = compute_event_id(version, event)
                self.assertEqual(event_id, "$" + encoded.replace("+", "-").replace("/", "_"))
                self.assertIn(urlsafe_char, event_id)
                self.assertNotIn(char, event_id)

    def test_v4_up_is_hash(self) -> None:
        """Every v4+ event ID is ``$`` + URL-safe base64 of its reference hash; no padding."""
        event = base_event()
        for version in versions("4", "5", "6", "7", "8", "9", "10", "11", "12"):
            expected = "$" + encode_base64(reference_hash(version, event), urlsafe=True)
            self.assertEqual(compute_event_id(version, event), expected)
            self.assertEqual(prepare_event(version, event).event_id, expected)
            self.assertNotIn("=", expected)

    def test_event_id_field_ignored_from_v3(self) -> None:
        """From v3 a stray ``event_id`` in the PDU does not decide the ID."""
        for version in versions("3", "4", "11"):
            event_id = compute_event_id(version, base_event(event_id="$claimed:x"))
            self.assertNotEqual(event_id, "$claimed:x")


class RoomVersionIdentifierTests(SynchronousTestCase):
    """Every function here takes the room version as a RoomVersion or its identifier."""

    def test_identifier_accepted(self) -> None:
        """ "10" does what KNOWN_ROOM_VERSIONS["10"] does; "12" likewise for room IDs."""
        v10, v12 = KNOWN_ROOM_VERSIONS["10"], KNOWN_ROOM_VERSIONS["12"]
        event = base_event(type="m.room.member", content={"membership": "invite"})
        hashed = add_content_hash(v10, event)
        for function in (
            redact,
            reference_hash,
            compute_event_id,
            compute_content_hash,
            add_content_hash,
            check_content_hash,
        ):
            self.assertEqual(function("10", hashed), function(v10, hashed), function.__name__)
        self.assertEqual(prepare_event("10", event), prepare_event(v10, event))
        self.assertEqual(ensure_prepared("10", event, prepare_event(v10, event)).room_version, v10)
        create = {**RoomIdTests.CREATE}
        self.assertEqual(
            room_id_for_create_event("12", create), room_id_for_create_event(v12, create)
        )

    def test_unknown_identifier(self) -> None:
        """An unknown identifier (or one not a str) is 400 M_INCOMPATIBLE_ROOM_VERSION, as
        get_room_version says."""
        event = base_event()
        for function in (
            redact,
            prepare_event,
            reference_hash,
            compute_event_id,
            compute_content_hash,
            add_content_hash,
            check_content_hash,
            room_id_for_create_event,
        ):
            for identifier in ("99", 10, None):
                error = self.assertRaises(MatrixError, function, identifier, event)
                self.assertEqual(
                    (error.http_status, error.errcode), (400, "M_INCOMPATIBLE_ROOM_VERSION")
                )


class RoomIdTests(SynchronousTestCase):
    """v12 room IDs (rooms/v12.md; appendices, "Room IDs")."""

    CREATE = {
        "type": "m.room.create",
        "state_key": "",
        "sender": "@alice:origin.example",
        "content": {"room_version": "12", "additional_creators": ["@bob:other.example"]},
        "depth": 1,
        "prev_events": [],
        "auth_events": [],
        "origin_server_ts": 1000,
        "hashes": {"sha256": "x"},
        "signatures": {},
    }

    def test_room_id_is_create_event_hash(self) -> None:
        """The room ID is the create event's event ID with ``!`` instead of ``$``."""
        v12 = KNOWN_ROOM_VERSIONS["12"]
        room_id = room_id_for_create_event(v12, self.CREATE)
        self.assertEqual(
            room_id, "!" + encode_base64(reference_hash(v12, self.CREATE), urlsafe=True)
        )
        self.assertEqual(room_id, "!" + compute_event_id(v12, self.CREATE)[1:])
        self.assertNotIn(":", room_id)

    def test_room_id_with_prepared(self) -> None:
        """A prepared create event gives the same room ID without rehashing."""
        v12 = KNOWN_ROOM_VERSIONS["12"]
        prepared = prepare_event(v12, self.CREATE)
        self.assertEqual(
            room_id_for_create_event(v12, self.CREATE, prepared=prepared),
            room_id_for_create_event(v12, self.CREATE),
        )

    def test_room_id_with_mismatched_prepared(self) -> None:
        """A prepared form of another event is refused rather than silently used."""
        v12 = KNOWN_ROOM_VERSIONS["12"]
        prepared = prepare_event(v12, {**self.CREATE, "depth": 2})
        with self.assertRaises(ValueError) as caught:
            room_id_for_create_event(v12, self.CREATE, prepared=prepared)
        self.assertEqual(str(caught.exception), "prepared event was prepared from another event")

    def test_ensure_prepared(self) -> None:
        """``ensure_prepared`` reuses a matching prepared form and prepares when given none."""
        v12 = KNOWN_ROOM_VERSIONS["12"]
        prepared = prepare_event(v12, self.CREATE)
        self.assertIs(ensure_prepared(v12, self.CREATE, prepared), prepared)
        self.assertIs(ensure_prepared(v12, dict(self.CREATE), prepared), prepared)
        self.assertEqual(ensure_prepared(v12, self.CREATE), prepared)
        with self.assertRaises(ValueError) as caught:
            ensure_prepared(KNOWN_ROOM_VERSIONS["11"], self.CREATE, prepared)
        self.assertEqual(str(caught.exception), "prepared event is for another room version")

    def test_room_id_covers_all_create_content(self) -> None:
        """v12 create content is kept by redaction, so it changes the room ID."""
        v12 = KNOWN_ROOM_VERSIONS["12"]
        other = {**self.CREATE, "content": {"room_version": "12"}}
        self.assertNotEqual(
            room_id_for_create_event(v12, self.CREATE), room_id_for_create_event(v12, other)
        )

    def test_not_v12(self) -> None:
        """Room versions before 12 do not derive room IDs from the create event."""
        with self.assertRaises(ValueError) as caught:
            room_id_for_create_event(KNOWN_ROOM_VERSIONS["11"], self.CREATE)
        self.assertEqual(str(caught.exception), "room version 11 room IDs are not hashes")

    def test_not_create(self) -> None:
        """Only an m.room.create event defines a room ID."""
        with self.assertRaises(ValueError) as caught:
            room_id_for_create_event(
                KNOWN_ROOM_VERSIONS["12"], {**self.CREATE, "type": "m.room.member"}
            )
        self.assertEqual(str(caught.exception), "not an m.room.create event")


# -- property tests ----------------------------------------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(MIN_SAFE_INTEGER, MAX_SAFE_INTEGER)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
EVENT_TYPES = [
    "m.room.member",
    "m.room.create",
    "m.room.join_rules",
    "m.room.power_levels",
    "m.room.aliases",
    "m.room.history_visibility",
    "m.room.redaction",
    "m.room.message",
]
CONTENT_KEYS = [
    "membership",
    "join_authorised_via_users_server",
    "third_party_invite",
    "creator",
    "room_version",
    "join_rule",
    "allow",
    "ban",
    "invite",
    "users",
    "notifications",
    "aliases",
    "history_visibility",
    "redacts",
    "body",
]


@st.composite
def events(draw: st.DrawFn) -> tuple[RoomVersion, dict[str, Any]]:
    """A room version and an arbitrary (JSON-valid, strict) event for it."""
    version = draw(st.sampled_from(ALL_VERSIONS))
    content = draw(st.dictionaries(st.sampled_from(CONTENT_KEYS), json_values, max_size=6))
    event = {
        "type": draw(st.sampled_from(EVENT_TYPES)),
        "room_id": "!room:origin.example",
        "sender": "@alice:origin.example",
        "content": content,
        "depth": draw(st.integers(0, MAX_SAFE_INTEGER)),
        "origin_server_ts": draw(st.integers(0, MAX_SAFE_INTEGER)),
        "prev_events": [],
        "auth_events": [],
        "hashes": {"sha256": draw(st.text(max_size=4))},
    }
    extra = draw(
        st.dictionaries(
            st.sampled_from(["state_key", "origin", "membership", "unsigned", "x_custom"]),
            json_values,
            max_size=3,
        )
    )
    event.update(extra)
    if version.event_id_in_event:
        event["event_id"] = "$opaque:origin.example"
    return version, event


def shuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON value with every object's keys inserted in a random order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {key: shuffled(child, rng) for key, child in items}
    if isinstance(value, list):
        return [shuffled(child, rng) for child in value]
    return value


class EventPropertyTests(SynchronousTestCase):
    """Properties of redaction and hashing over arbitrary events in every room version."""

    @settings(max_examples=200, deadline=None)
    @given(events())
    def test_redaction_idempotent(self, version_and_event: tuple[RoomVersion, dict]) -> None:
        """Redacting a redacted event changes nothing."""
        version, event = version_and_event
        once = redact(version, event)
        self.assertEqual(redact(version, once), once)

    @settings(max_examples=200, deadline=None)
    @given(events(), st.randoms(use_true_random=False))
    def test_insertion_order_irrelevant(
        self, version_and_event: tuple[RoomVersion, dict], rng: random.Random
    ) -> None:
        """Signing bytes, reference hash and content hash do not depend on key order."""
        version, event = version_and_event
        other = shuffled(event, rng)
        a, b = prepare_event(version, event), prepare_event(version, other)
        self.assertEqual(a.signing_bytes, b.signing_bytes)
        self.assertEqual(a.reference_hash, b.reference_hash)
        self.assertEqual(compute_content_hash(version, event), compute_content_hash(version, other))

    @settings(max_examples=200, deadline=None)
    @given(events(), json_values)
    def test_content_change_breaks_content_hash(
        self, version_and_event: tuple[RoomVersion, dict], value: Any
    ) -> None:
        """Any change to content is caught by the content hash."""
        version, event = version_and_event
        hashed = add_content_hash(version, event)
        content = dict(event["content"])
        content["changed"] = {"old": content.get("changed"), "new": value}
        self.assertTrue(check_content_hash(version, hashed))
        self.assertFalse(check_content_hash(version, {**hashed, "content": content}))

    @settings(max_examples=200, deadline=None)
    @given(events())
    def test_prepared_consistent(self, version_and_event: tuple[RoomVersion, dict]) -> None:
        """The prepared form agrees with the simple functions, and the input is not mutated."""
        version, event = version_and_event
        original = copy.deepcopy(event)
        prepared = prepare_event(version, event)
        self.assertEqual(prepared.redacted, redact(version, event))
        self.assertEqual(prepared.reference_hash, reference_hash(version, event))
        self.assertEqual(prepared.event_id, compute_event_id(version, event))
        self.assertNotIn("unsigned", prepared.redacted)
        self.assertEqual(event, original)
