"""Tests for federation_invite.core.signing: JSON and event signatures, key validity."""

from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any

import canonicaljson
from hypothesis import given, settings
from hypothesis import strategies as st
from signedjson.key import generate_signing_key
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import encode_base64

from federation_invite.core import signing as signing_module
from federation_invite.core.canonical import MAX_SAFE_INTEGER, CanonicalJSONError
from federation_invite.core.errors import MatrixError
from federation_invite.core.events import (
    check_content_hash,
    prepare_event,
    redact,
)
from federation_invite.core.keys import key_id_of, sign_bytes, verify_key_of
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS, RoomVersion
from federation_invite.core.signing import (
    SEVEN_DAYS_MS,
    ServerVerifyKey,
    SignatureError,
    cap_valid_until_ts,
    hash_and_sign_event,
    key_valid_for_event,
    required_event_signers,
    sign_event,
    sign_json,
    signing_bytes,
    verify_event_signature,
    verify_event_signatures,
    verify_json,
    verify_json_with_one_of,
)

from .test_events import ALL_VERSIONS, events, json_values

ORIGIN = "origin.example"
OTHER = "other.example"
ORIGIN_KEY = generate_signing_key("a1")
ORIGIN_KEY_2 = generate_signing_key("a2")
OTHER_KEY = generate_signing_key("b1")
TS = 1_700_000_000_000

V1 = KNOWN_ROOM_VERSIONS["1"]
V2 = KNOWN_ROOM_VERSIONS["2"]
V3 = KNOWN_ROOM_VERSIONS["3"]
V4 = KNOWN_ROOM_VERSIONS["4"]
V5 = KNOWN_ROOM_VERSIONS["5"]
V11 = KNOWN_ROOM_VERSIONS["11"]
V12 = KNOWN_ROOM_VERSIONS["12"]
BEFORE_V5 = [V1, V2, V3, V4]
V5_UP = [v for v in ALL_VERSIONS if int(v.identifier) >= 5]


def server_key(
    server_name: str,
    signing_key: Any,
    valid_until_ts: int | None = TS + 1,
    expired_ts: int | None = None,
) -> ServerVerifyKey:
    """A ``ServerVerifyKey`` for ``signing_key``."""
    return ServerVerifyKey(
        server_name=server_name,
        key_id=f"ed25519:{signing_key.version}",
        verify_key=verify_key_of(signing_key),
        valid_until_ts=valid_until_ts,
        expired_ts=expired_ts,
    )


def keyring(*keys: ServerVerifyKey) -> dict[tuple[str, str], ServerVerifyKey]:
    """The ``(server_name, key_id)`` mapping the verify functions take."""
    return {(key.server_name, key.key_id): key for key in keys}


KEYS = keyring(server_key(ORIGIN, ORIGIN_KEY), server_key(OTHER, OTHER_KEY))


def invite_event(version: RoomVersion, **overrides: Any) -> dict[str, Any]:
    """An unsigned invite from ``@alice:origin.example`` to ``@bob:other.example``."""
    event: dict[str, Any] = {
        "type": "m.room.member",
        "state_key": "@bob:other.example",
        "sender": "@alice:origin.example",
        "room_id": "!room:origin.example",
        "content": {"membership": "invite", "displayname": "Bob"},
        "depth": 7,
        "prev_events": [],
        "auth_events": [],
        "origin_server_ts": TS,
        "unsigned": {"age": 5},
    }
    if version.event_id_in_event:
        event["event_id"] = "$abc:origin.example"
    event.update(overrides)
    return event


def signed_invite(version: RoomVersion, **overrides: Any) -> dict[str, Any]:
    """``invite_event`` hashed and signed by origin.example."""
    return hash_and_sign_event(version, invite_event(version, **overrides), ORIGIN, ORIGIN_KEY)


class RoomVersionIdentifierTests(SynchronousTestCase):
    """The event functions take the room version as a RoomVersion or its identifier."""

    def test_identifier_accepted(self) -> None:
        """ "10" does what KNOWN_ROOM_VERSIONS["10"] does."""
        v10 = KNOWN_ROOM_VERSIONS["10"]
        event = invite_event(v10)
        signed = hash_and_sign_event("10", event, ORIGIN, ORIGIN_KEY)
        self.assertEqual(signed, hash_and_sign_event(v10, event, ORIGIN, ORIGIN_KEY))
        cosigned = sign_event("10", signed, OTHER, OTHER_KEY)
        self.assertEqual(cosigned, sign_event(v10, signed, OTHER, OTHER_KEY))
        self.assertEqual(required_event_signers("10", signed), {ORIGIN})
        verify_event_signatures("10", cosigned, KEYS)
        verify_event_signature("10", cosigned, OTHER, KEYS)
        self.assertTrue(key_valid_for_event("10", server_key(ORIGIN, ORIGIN_KEY), TS))

    def test_unknown_identifier(self) -> None:
        """An unknown identifier is 400 M_INCOMPATIBLE_ROOM_VERSION, as get_room_version says."""
        signed = signed_invite(KNOWN_ROOM_VERSIONS["10"])
        for call in (
            lambda: hash_and_sign_event("99", signed, ORIGIN, ORIGIN_KEY),
            lambda: sign_event("99", signed, ORIGIN, ORIGIN_KEY),
            lambda: required_event_signers("99", signed),
            lambda: verify_event_signatures("99", signed, KEYS),
            lambda: verify_event_signature("99", signed, ORIGIN, KEYS),
            lambda: key_valid_for_event("99", server_key(ORIGIN, ORIGIN_KEY), TS),
        ):
            error = self.assertRaises(MatrixError, call)
            self.assertEqual(
                (error.http_status, error.errcode), (400, "M_INCOMPATIBLE_ROOM_VERSION")
            )

    def test_keys_not_a_mapping(self) -> None:
        """The keys must map (server_name, key_id) to a ServerVerifyKey: a list of keys is a
        TypeError saying so, not an AttributeError."""
        v10 = KNOWN_ROOM_VERSIONS["10"]
        signed = signed_invite(v10)
        key = server_key(ORIGIN, ORIGIN_KEY)
        for call in (
            lambda: verify_event_signatures(v10, signed, [key]),  # type: ignore[arg-type]
            lambda: verify_event_signature(v10, signed, ORIGIN, [key]),  # type: ignore[arg-type]
        ):
            with self.assertRaises(TypeError) as raised:
                call()
            self.assertIn("(server_name, key_id)", str(raised.exception))

    def test_keys_any_mapping(self) -> None:
        """The keys may be any Mapping, not only a dict (a read-only MappingProxyType)."""
        v10 = KNOWN_ROOM_VERSIONS["10"]
        cosigned = sign_event(v10, signed_invite(v10), OTHER, OTHER_KEY)
        keys = MappingProxyType(KEYS)
        verify_event_signatures(v10, cosigned, keys)
        verify_event_signature(v10, cosigned, OTHER, keys)

    def test_key_of_the_wrong_kind(self) -> None:
        """A verify key where a signing key is wanted, and a keys mapping to plain VerifyKeys
        (not ServerVerifyKeys), are TypeErrors naming both kinds, not AttributeErrors."""
        v10 = KNOWN_ROOM_VERSIONS["10"]
        signed = signed_invite(v10)
        verify_key = verify_key_of(ORIGIN_KEY)
        plain = {(ORIGIN, key_id_of(ORIGIN_KEY)): verify_key}
        for call, wanted, passed in (
            (lambda: sign_json({}, ORIGIN, verify_key), "SigningKey", "VerifyKey"),
            (lambda: sign_json({}, ORIGIN, "k"), "SigningKey", "str"),
            (lambda: sign_event(v10, signed, OTHER, verify_key), "SigningKey", "VerifyKey"),
            (
                lambda: hash_and_sign_event(v10, invite_event(v10), ORIGIN, verify_key),
                "SigningKey",
                "VerifyKey",
            ),
            (lambda: verify_event_signatures(v10, signed, plain), "ServerVerifyKey", "VerifyKey"),
            (
                lambda: verify_event_signatures(V3, signed_invite(V3), plain),
                "ServerVerifyKey",
                "VerifyKey",
            ),
            (
                lambda: verify_event_signature(v10, signed, ORIGIN, plain),
                "ServerVerifyKey",
                "VerifyKey",
            ),
            (lambda: key_valid_for_event(V3, verify_key, TS), "ServerVerifyKey", "VerifyKey"),
            (
                lambda: verify_json_with_one_of(
                    sign_json({}, ORIGIN, ORIGIN_KEY), ORIGIN, {key_id_of(ORIGIN_KEY): verify_key}
                ),
                "ServerVerifyKey",
                "VerifyKey",
            ),
        ):
            with self.assertRaises(TypeError) as raised:
                call()
            self.assertIn(f"a {wanted}", str(raised.exception))
            self.assertIn(f"not a {passed}", str(raised.exception))


class CapValidUntilTests(SynchronousTestCase):
    """rooms/fragments/v5-signing-requirements.md: validity capped at seven days."""

    def test_seven_days(self) -> None:
        """``SEVEN_DAYS_MS`` is seven days in milliseconds."""
        self.assertEqual(SEVEN_DAYS_MS, 604_800_000)

    def test_cap(self) -> None:
        """The lesser of ``valid_until_ts`` and now + 7 days is used."""
        self.assertEqual(cap_valid_until_ts(TS + 1000, TS), TS + 1000)
        self.assertEqual(cap_valid_until_ts(TS + 10 * SEVEN_DAYS_MS, TS), TS + SEVEN_DAYS_MS)
        self.assertEqual(cap_valid_until_ts(TS + SEVEN_DAYS_MS, TS), TS + SEVEN_DAYS_MS)
        self.assertEqual(cap_valid_until_ts(TS - 5, TS), TS - 5)


class SignJSONTests(SynchronousTestCase):
    """appendices, "Signing JSON"."""

    def test_new_dict_input_untouched(self) -> None:
        """``sign_json`` returns a new dict and leaves the input (and its signatures) alone."""
        obj = {"a": 1, "signatures": {OTHER: {"ed25519:x": "s"}}, "unsigned": {"u": 1}}
        original = copy.deepcopy(obj)
        signed = sign_json(obj, ORIGIN, ORIGIN_KEY)
        self.assertEqual(obj, original)
        self.assertIsNot(signed, obj)

    def test_others_signatures_kept(self) -> None:
        """Existing signatures, by others and by our other keys, are kept."""
        obj = {"a": 1, "signatures": {OTHER: {"ed25519:x": "s"}, ORIGIN: {"ed25519:old": "o"}}}
        signed = sign_json(obj, ORIGIN, ORIGIN_KEY)
        self.assertEqual(signed["signatures"][OTHER], {"ed25519:x": "s"})
        self.assertEqual(
            set(signed["signatures"][ORIGIN]), {"ed25519:old", f"ed25519:{ORIGIN_KEY.version}"}
        )

    def test_malformed_signatures_replaced(self) -> None:
        """A ``signatures`` (or server entry) that is not an object is replaced by ours."""
        for obj in ({"a": 1, "signatures": "x"}, {"a": 1, "signatures": {ORIGIN: ["x"]}}):
            signed = sign_json(obj, ORIGIN, ORIGIN_KEY)
            self.assertEqual(list(signed["signatures"]), [ORIGIN])
            verify_json(signed, ORIGIN, server_key(ORIGIN, ORIGIN_KEY))

    def test_signature_covers_canonical_form(self) -> None:
        """The signature is over canonical JSON without ``signatures`` and ``unsigned``."""
        obj = {"b": [1, 2], "a": "é", "unsigned": {"x": 1}, "signatures": {}}
        signed = sign_json(obj, ORIGIN, ORIGIN_KEY)
        expected = sign_bytes(ORIGIN_KEY, b'{"a":"\xc3\xa9","b":[1,2]}')
        self.assertEqual(signed["signatures"][ORIGIN][f"ed25519:{ORIGIN_KEY.version}"], expected)
        self.assertEqual(signed["unsigned"], {"x": 1})

    def test_unsigned_not_covered(self) -> None:
        """Changing ``unsigned`` or adding signatures keeps the signature valid."""
        signed = sign_json({"a": 1, "unsigned": {"age": 1}}, ORIGIN, ORIGIN_KEY)
        changed = {**signed, "unsigned": {"age": 2}}
        changed = sign_json(changed, OTHER, OTHER_KEY)
        verify_json(changed, ORIGIN, server_key(ORIGIN, ORIGIN_KEY))
        verify_json(changed, OTHER, server_key(OTHER, OTHER_KEY))

    def test_strict_output(self) -> None:
        """Our signed output is strict canonical JSON: floats and unsafe integers refused."""
        for bad in (1.5, MAX_SAFE_INTEGER + 1):
            with self.assertRaises(CanonicalJSONError):
                sign_json({"a": bad}, ORIGIN, ORIGIN_KEY)

    def test_signing_bytes_strict_by_default(self) -> None:
        """signing_bytes encodes strictly unless told otherwise (appendices, "Canonical JSON":
        "Numbers in the JSON must be integers in the range [-(2**53)+1, (2**53)-1]"): a float
        or an unsafe integer is a SignatureError, as the verifiers raise it; strict=False
        (rooms v1-5) keeps them. signatures and unsigned are left out either way."""
        for bad, lax in ((1.5, b"1.5"), (MAX_SAFE_INTEGER + 1, b"9007199254740992")):
            obj = {"a": bad, "signatures": {}, "unsigned": {"age": 1}}
            with self.assertRaises(SignatureError) as raised:
                signing_bytes(obj)
            self.assertIn("no canonical JSON form", str(raised.exception))
            self.assertEqual(signing_bytes(obj, strict=False), b'{"a":' + lax + b"}")


class VerifyJSONTests(SynchronousTestCase):
    """appendices, "Checking for a Signature"."""

    KEY = server_key(ORIGIN, ORIGIN_KEY)

    def test_plain_verify_key_refused(self) -> None:
        """verify_json takes a ServerVerifyKey (its key ID says which signature to check): a
        plain nacl VerifyKey is a TypeError saying so, not an AttributeError."""
        for key in (verify_key_of(ORIGIN_KEY), None, "ed25519:a1"):
            with self.assertRaises(TypeError) as raised:
                verify_json(self.signed(), ORIGIN, key)  # type: ignore[arg-type]
            self.assertIn("ServerVerifyKey", str(raised.exception))

    def signed(self) -> dict[str, Any]:
        """A small object signed by origin.example."""
        return sign_json({"a": 1}, ORIGIN, ORIGIN_KEY)

    def assertRejected(self, obj: Any, message: str, **kwargs: Any) -> None:
        """``verify_json`` raises ``SignatureError`` with exactly ``message``."""
        with self.assertRaises(SignatureError) as caught:
            verify_json(obj, ORIGIN, self.KEY, **kwargs)
        self.assertEqual(str(caught.exception), message)

    def test_valid(self) -> None:
        """A correct signature verifies; returns None."""
        self.assertIsNone(verify_json(self.signed(), ORIGIN, self.KEY))

    def test_no_signatures(self) -> None:
        """No ``signatures`` object: missing signature."""
        self.assertRejected({"a": 1}, "Missing signature for origin.example (no signatures)")
        self.assertRejected(
            {"a": 1, "signatures": []}, "Missing signature for origin.example (no signatures)"
        )

    def test_no_entry_for_server(self) -> None:
        """No (or an empty) entry for the server: missing signature."""
        self.assertRejected(
            {"a": 1, "signatures": {OTHER: {"ed25519:a1": "x"}}},
            "Missing signature for origin.example",
        )
        self.assertRejected(
            {"a": 1, "signatures": {ORIGIN: {}}}, "Missing signature for origin.example"
        )

    def test_no_signature_with_key(self) -> None:
        """Signed with another key ID only: missing signature for this key."""
        obj = sign_json({"a": 1}, ORIGIN, ORIGIN_KEY_2)
        self.assertRejected(obj, "Missing signature for origin.example (ed25519:a1)")

    def test_not_a_string(self) -> None:
        """A signature that is not a string is refused."""
        obj = {"a": 1, "signatures": {ORIGIN: {"ed25519:a1": 5}}}
        self.assertRejected(obj, "Signature by origin.example (ed25519:a1) is not a string")

    def test_bad_base64(self) -> None:
        """A signature that is not base64 is refused as such (step 4)."""
        for bad in ("a", "\u00e9" * 86):
            obj = {"a": 1, "signatures": {ORIGIN: {"ed25519:a1": bad}}}
            self.assertRejected(obj, "Signature by origin.example (ed25519:a1) is not valid base64")

    def test_signature_spellings(self) -> None:
        """A signature in the URL-safe alphabet or padded with "==" verifies; with any other
        character in it (whitespace, ":", "!") or another padding it is not valid base64, though
        base64 decoding that drops such characters would verify it."""
        obj = self.signed()
        signature = obj["signatures"][ORIGIN]["ed25519:a1"]
        urlsafe = signature.translate(str.maketrans("+/", "-_"))
        for good in (urlsafe, signature + "==", urlsafe + "=="):
            verify_json({**obj, "signatures": {ORIGIN: {"ed25519:a1": good}}}, ORIGIN, self.KEY)
        for bad in ("\t :" + signature, signature[:20] + "!!::" + signature[20:], signature + "="):
            self.assertRejected(
                {**obj, "signatures": {ORIGIN: {"ed25519:a1": bad}}},
                "Signature by origin.example (ed25519:a1) is not valid base64",
            )

    def test_wrong_length(self) -> None:
        """Base64 that does not decode to 64 bytes is refused."""
        obj = {"a": 1, "signatures": {ORIGIN: {"ed25519:a1": encode_base64(b"x" * 32)}}}
        self.assertRejected(
            obj,
            "Signature by origin.example (ed25519:a1) is not valid base64 of an ed25519 signature",
        )

    def test_invalid(self) -> None:
        """A well-formed signature of other data is invalid."""
        obj = {**self.signed(), "a": 2}
        self.assertRejected(obj, "Signature by origin.example (ed25519:a1) is invalid")

    def test_wrong_key(self) -> None:
        """A signature checked against another key (same ID) is invalid."""
        key = ServerVerifyKey(ORIGIN, "ed25519:a1", verify_key_of(OTHER_KEY), None)
        with self.assertRaises(SignatureError) as caught:
            verify_json(self.signed(), ORIGIN, key)
        self.assertEqual(
            str(caught.exception), "Signature by origin.example (ed25519:a1) is invalid"
        )

    def test_non_canonical(self) -> None:
        """Strictly, a float cannot be canonical, so there is nothing to verify."""
        data = {"a": 1.5}
        signature = sign_bytes(ORIGIN_KEY, canonicaljson.encode_canonical_json(data))
        obj = {**data, "signatures": {ORIGIN: {"ed25519:a1": signature}}}
        self.assertRejected(
            obj,
            "Signed object has no canonical JSON form: floats are not allowed in canonical JSON",
        )
        verify_json(obj, ORIGIN, self.KEY, strict=False)

    def test_key_of_another_server(self) -> None:
        """Passing another server's key is a programming error: ``ValueError``."""
        with self.assertRaises(ValueError) as caught:
            verify_json(self.signed(), OTHER, self.KEY)
        self.assertNotIsInstance(caught.exception, SignatureError)
        self.assertEqual(
            str(caught.exception), "key ed25519:a1 belongs to origin.example, not other.example"
        )


class VerifyJSONWithOneOfTests(SynchronousTestCase):
    """``verify_json_with_one_of``: a key document's self-signature, checked once."""

    KEYS = {
        "ed25519:a1": server_key(ORIGIN, ORIGIN_KEY),
        "ed25519:a2": server_key(ORIGIN, ORIGIN_KEY_2),
    }

    def signed(self) -> dict[str, Any]:
        """A small object signed by origin.example's a1, then a2."""
        return sign_json(sign_json({"a": 1}, ORIGIN, ORIGIN_KEY), ORIGIN, ORIGIN_KEY_2)

    def assertRejected(self, obj: Any, keys: Any, message: str) -> None:
        """``verify_json_with_one_of`` raises ``SignatureError`` with exactly ``message``."""
        with self.assertRaises(SignatureError) as caught:
            verify_json_with_one_of(obj, ORIGIN, keys)
        self.assertEqual(str(caught.exception), message)

    def test_first_signature_by_a_given_key_decides(self) -> None:
        """The first signature (in the object's order) by one of the keys is checked and the
        key that made it returned; the later ones are not checked."""
        obj = self.signed()
        self.assertEqual(verify_json_with_one_of(obj, ORIGIN, self.KEYS), self.KEYS["ed25519:a1"])
        obj["signatures"][ORIGIN]["ed25519:a2"] = obj["signatures"][ORIGIN]["ed25519:a1"]
        self.assertEqual(verify_json_with_one_of(obj, ORIGIN, self.KEYS), self.KEYS["ed25519:a1"])

    def test_bad_first_signature_refused(self) -> None:
        """A bad signature by one of the keys refuses the object, even if a later one holds."""
        obj = self.signed()
        obj["signatures"][ORIGIN]["ed25519:a1"] = obj["signatures"][ORIGIN]["ed25519:a2"]
        self.assertRejected(obj, self.KEYS, "Signature by origin.example (ed25519:a1) is invalid")

    def test_signatures_by_other_keys_skipped(self) -> None:
        """Signatures by key IDs not given are skipped; with none given: missing signature."""
        obj = self.signed()
        only_a2 = {"ed25519:a2": self.KEYS["ed25519:a2"]}
        self.assertEqual(verify_json_with_one_of(obj, ORIGIN, only_a2), only_a2["ed25519:a2"])
        self.assertRejected(
            sign_json({"a": 1}, ORIGIN, OTHER_KEY),
            self.KEYS,
            "Missing signature for origin.example by any of the 2 keys given",
        )
        self.assertRejected(
            {"a": 1}, self.KEYS, "Missing signature for origin.example (no signatures)"
        )
        self.assertRejected(
            self.signed(), {}, "Missing signature for origin.example by any of the 0 keys given"
        )

    def test_signing_bytes_given(self) -> None:
        """``data``: the caller's signing bytes are checked in place of the object's encoding
        (so they must be the object's)."""
        obj = self.signed()
        self.assertEqual(
            verify_json_with_one_of(obj, ORIGIN, self.KEYS, data=signing_bytes(obj)),
            self.KEYS["ed25519:a1"],
        )
        self.assertEqual(
            verify_json_with_one_of(obj, ORIGIN, self.KEYS, data=signing_bytes(self.signed())),
            self.KEYS["ed25519:a1"],
        )
        with self.assertRaises(SignatureError) as caught:
            verify_json_with_one_of(obj, ORIGIN, self.KEYS, data=signing_bytes({"a": 2}))
        self.assertEqual(
            str(caught.exception), "Signature by origin.example (ed25519:a1) is invalid"
        )
        # The object is not encoded when its bytes are given: a float it holds is no error.
        data = {"a": 1.5}
        given_bytes = canonicaljson.encode_canonical_json(data)
        obj = {**data, "signatures": {ORIGIN: {"ed25519:a1": sign_bytes(ORIGIN_KEY, given_bytes)}}}
        self.assertEqual(
            verify_json_with_one_of(obj, ORIGIN, self.KEYS, data=given_bytes),
            self.KEYS["ed25519:a1"],
        )

    def test_non_canonical(self) -> None:
        """Strictly, a float cannot be canonical; ``strict=False`` admits it."""
        data = {"a": 1.5}
        signature = sign_bytes(ORIGIN_KEY, canonicaljson.encode_canonical_json(data))
        obj = {**data, "signatures": {ORIGIN: {"ed25519:a1": signature}}}
        self.assertRejected(
            obj,
            self.KEYS,
            "Signed object has no canonical JSON form: floats are not allowed in canonical JSON",
        )
        verify_json_with_one_of(obj, ORIGIN, self.KEYS, strict=False)

    def test_key_of_another_server(self) -> None:
        """A key of another server, or filed under another key ID, is a ``ValueError``."""
        obj = sign_json({"a": 1}, OTHER, ORIGIN_KEY)  # other.example's ed25519:a1
        for keys in (
            {"ed25519:a1": self.KEYS["ed25519:a1"]},  # origin.example's
            {"ed25519:a1": server_key(OTHER, OTHER_KEY)},  # ed25519:b1
        ):
            with self.assertRaises(ValueError) as caught:
                verify_json_with_one_of(obj, OTHER, keys)
            self.assertNotIsInstance(caught.exception, SignatureError)

    def test_many_signatures_one_encoding(self) -> None:
        """An object carrying many signatures by given keys is encoded once (verify_json per
        key re-encoded it for each: a 1 MiB key document with 6,000 keys cost 37 s)."""
        keys = {
            f"ed25519:k{n}": server_key(ORIGIN, generate_signing_key(f"k{n}")) for n in range(50)
        }
        obj = {"a": 1, "signatures": {ORIGIN: {key_id: "x" for key_id in keys}}}
        obj["signatures"][ORIGIN]["ed25519:k0"] = sign_json({"a": 1}, ORIGIN, ORIGIN_KEY)[
            "signatures"
        ][ORIGIN]["ed25519:a1"]
        keys["ed25519:k0"] = ServerVerifyKey(ORIGIN, "ed25519:k0", verify_key_of(ORIGIN_KEY), None)
        calls: list[object] = []
        encode = signing_module.encode_canonical_json

        def counting(*args: Any, **kwargs: Any) -> bytes:
            calls.append(args)
            return encode(*args, **kwargs)

        self.patch(signing_module, "encode_canonical_json", counting)
        self.assertEqual(verify_json_with_one_of(obj, ORIGIN, keys), keys["ed25519:k0"])
        self.assertEqual(len(calls), 1)


class EventSigningTests(SynchronousTestCase):
    """server-server-api, "Signing Events"."""

    def test_hash_and_sign(self) -> None:
        """The sender side adds the content hash, then signs the redacted event."""
        for version in ALL_VERSIONS:
            event = invite_event(version)
            original = copy.deepcopy(event)
            signed = hash_and_sign_event(version, event, ORIGIN, ORIGIN_KEY)
            self.assertEqual(event, original)
            self.assertTrue(check_content_hash(version, signed))
            verify_event_signatures(version, signed, KEYS)
            self.assertEqual(
                {k: v for k, v in signed.items() if k not in ("hashes", "signatures")}, event
            )

    def test_hash_and_sign_strict_beyond_the_content_hash(self) -> None:
        """Our events are strict canonical JSON where only the signature covers them too: a
        float in ``hashes`` (left out of the content hash, kept by redaction, so signed) is
        refused with CanonicalJSONError in every room version, v1-5 included."""
        for version in ALL_VERSIONS:
            event = invite_event(version)
            event["hashes"] = {"other": 1.5}
            with self.assertRaises(CanonicalJSONError):
                hash_and_sign_event(version, event, ORIGIN, ORIGIN_KEY)

    def test_signature_is_over_redacted_form(self) -> None:
        """The signature covers the redacted event without signatures and unsigned."""
        for version in ALL_VERSIONS:
            signed = signed_invite(version)
            redacted = redact(version, signed)
            redacted.pop("signatures")
            expected = sign_bytes(ORIGIN_KEY, canonicaljson.encode_canonical_json(redacted))
            self.assertEqual(signed["signatures"][ORIGIN]["ed25519:a1"], expected)

    def test_sign_event_adds_signature_only(self) -> None:
        """Co-signing adds our signature and changes nothing else (the invitee's step)."""
        for version in ALL_VERSIONS:
            signed = signed_invite(version)
            original = copy.deepcopy(signed)
            cosigned = sign_event(version, signed, OTHER, OTHER_KEY)
            self.assertEqual(signed, original)
            self.assertEqual(
                {k: v for k, v in cosigned.items() if k != "signatures"},
                {k: v for k, v in signed.items() if k != "signatures"},
            )
            self.assertEqual(cosigned["signatures"][ORIGIN], signed["signatures"][ORIGIN])
            verify_event_signature(version, cosigned, OTHER, KEYS)
            verify_event_signatures(version, cosigned, KEYS)

    def test_sign_event_with_prepared(self) -> None:
        """A prepared event's signing bytes are reused; an equal copy is accepted too."""
        for version in ALL_VERSIONS:
            signed = signed_invite(version)
            prepared = prepare_event(version, signed)
            expected = sign_event(version, signed, OTHER, OTHER_KEY)
            self.assertEqual(
                sign_event(version, signed, OTHER, OTHER_KEY, prepared=prepared), expected
            )
            self.assertEqual(
                sign_event(version, copy.deepcopy(signed), OTHER, OTHER_KEY, prepared=prepared),
                expected,
            )

    def test_prepared_mismatch(self) -> None:
        """A prepared form of another event or room version is refused with ``ValueError``."""
        signed = signed_invite(V11)
        prepared = prepare_event(V11, signed)
        other = {**signed, "depth": 8}
        for call in (
            lambda: sign_event(V11, other, OTHER, OTHER_KEY, prepared=prepared),
            lambda: verify_event_signatures(V11, other, KEYS, prepared=prepared),
        ):
            with self.assertRaises(ValueError) as caught:
                call()
            self.assertEqual(
                str(caught.exception), "prepared event was prepared from another event"
            )
        with self.assertRaises(ValueError) as caught:
            sign_event(V12, signed, OTHER, OTHER_KEY, prepared=prepared)
        self.assertEqual(str(caught.exception), "prepared event is for another room version")


class RequiredSignersTests(SynchronousTestCase):
    """server-server-api, "Validating hashes and signatures on received events"."""

    def test_v1_v2_sender_and_event_id_server(self) -> None:
        """v1/v2 also require the server named in the event ID."""
        for version in (V1, V2):
            event = invite_event(version, event_id="$x:other.example")
            self.assertEqual(required_event_signers(version, event), {ORIGIN, OTHER})
            same = invite_event(version)
            self.assertEqual(required_event_signers(version, same), {ORIGIN})

    def test_v3_up_sender_only(self) -> None:
        """From v3 only the sender's server is required (even for invites, v11 and v12)."""
        for version in ALL_VERSIONS[2:]:
            event = invite_event(version, event_id="$x:other.example")
            self.assertEqual(required_event_signers(version, event), {ORIGIN})

    def test_server_with_port(self) -> None:
        """The server name is everything after the localpart's colon, port included."""
        event = invite_event(V11, sender="@alice:origin.example:8448")
        self.assertEqual(required_event_signers(V11, event), {"origin.example:8448"})

    def test_malformed(self) -> None:
        """A sender or v1 event ID naming no server raises ``ValueError``."""
        cases = [
            (V11, {"sender": 5}, "event sender is not a string"),
            (V11, {"sender": "@alice"}, "event sender has no server name"),
            (V11, {"sender": "@alice:"}, "event sender has no server name"),
            (V1, {"event_id": None}, "event event_id is not a string"),
            (V1, {"event_id": "$abc"}, "event event_id has no server name"),
        ]
        for version, overrides, message in cases:
            with self.assertRaises(ValueError) as caught:
                required_event_signers(version, invite_event(version, **overrides))
            self.assertEqual(str(caught.exception), message)


class KeyValidityTests(SynchronousTestCase):
    """rooms/fragments/v5-signing-requirements.md and old_verify_keys."""

    def test_before_v5_any_key(self) -> None:
        """Before v5 any known key is acceptable, whatever its validity."""
        for version in BEFORE_V5:
            for key in (
                server_key(ORIGIN, ORIGIN_KEY, valid_until_ts=None),
                server_key(ORIGIN, ORIGIN_KEY, valid_until_ts=TS - 1),
                server_key(ORIGIN, ORIGIN_KEY, valid_until_ts=None, expired_ts=TS - 1),
            ):
                self.assertTrue(key_valid_for_event(version, key, TS))

    def test_v5_current_key(self) -> None:
        """From v5 a current key must be valid until at least ``origin_server_ts``."""
        for version in V5_UP:
            for valid_until, expected in ((TS - 1, False), (TS, True), (TS + 1, True)):
                key = server_key(ORIGIN, ORIGIN_KEY, valid_until_ts=valid_until)
                self.assertEqual(key_valid_for_event(version, key, TS), expected)

    def test_v5_unknown_validity(self) -> None:
        """From v5 a key of unknown validity is not valid for events."""
        key = server_key(ORIGIN, ORIGIN_KEY, valid_until_ts=None)
        for version in V5_UP:
            self.assertFalse(key_valid_for_event(version, key, TS))

    def test_v5_old_key(self) -> None:
        """From v5 an old key verifies only events sent no later than its ``expired_ts``:
        a key that expired at the event's ``origin_server_ts`` had not expired *prior* to it."""
        for version in V5_UP:
            for expired, expected in ((TS + 1, True), (TS, True), (TS - 1, False)):
                key = server_key(ORIGIN, ORIGIN_KEY, valid_until_ts=None, expired_ts=expired)
                self.assertEqual(key_valid_for_event(version, key, TS), expected)


class VerifyEventTests(SynchronousTestCase):
    """server-server-api, "Validating hashes and signatures on received events"."""

    def assertRejected(
        self,
        version: RoomVersion,
        event: Any,
        keys: Any,
        message: str,
        server_name: str | None = None,
    ) -> None:
        """Verification raises ``SignatureError`` with exactly ``message``."""
        with self.assertRaises(SignatureError) as caught:
            if server_name is None:
                verify_event_signatures(version, event, keys)
            else:
                verify_event_signature(version, event, server_name, keys)
        self.assertEqual(str(caught.exception), message)

    def test_v1_event_id_server_must_sign(self) -> None:
        """v1/v2: the event ID's server must sign too; its signature completes the check."""
        for version in (V1, V2):
            signed = signed_invite(version, event_id="$x:other.example")
            self.assertRejected(version, signed, KEYS, "Missing signature for other.example")
            verify_event_signatures(version, sign_event(version, signed, OTHER, OTHER_KEY), KEYS)

    def test_v3_up_event_id_server_not_required(self) -> None:
        """v3+: only the sender's server must sign."""
        for version in ALL_VERSIONS[2:]:
            verify_event_signatures(version, signed_invite(version), KEYS)

    def test_sender_server_must_sign(self) -> None:
        """An event signed only by another server fails for the sender's server."""
        for version in ALL_VERSIONS:
            event = hash_and_sign_event(version, invite_event(version), OTHER, OTHER_KEY)
            self.assertRejected(version, event, KEYS, "Missing signature for origin.example")

    def test_unknown_keys_skipped(self) -> None:
        """Signatures by unknown keys are skipped; with none known the check fails."""
        for version in ALL_VERSIONS:
            signed = signed_invite(version)
            second = sign_event(version, signed, ORIGIN, ORIGIN_KEY_2)["signatures"][ORIGIN]
            ours = {**signed["signatures"][ORIGIN], **second}
            extra = {**signed, "signatures": {**signed["signatures"], ORIGIN: ours}}
            verify_event_signatures(version, extra, KEYS)
            only_unknown = keyring(server_key(ORIGIN, ORIGIN_KEY_2), server_key(OTHER, OTHER_KEY))
            verify_event_signatures(version, extra, only_unknown)
            self.assertRejected(
                version,
                signed,
                keyring(server_key(OTHER, OTHER_KEY)),
                "No signature by origin.example with a known key valid for this event",
            )

    def test_cosigning_drops_planted_signatures(self) -> None:
        """sign_event keeps others' signatures but replaces whatever sat under our own name."""
        for version in ALL_VERSIONS:
            signed = signed_invite(version)
            planted = {
                **signed,
                "signatures": {**signed["signatures"], OTHER: {"ed25519:planted": "AAAA"}},
            }
            cosigned = sign_event(version, planted, OTHER, OTHER_KEY)
            self.assertEqual(list(cosigned["signatures"][OTHER]), [key_id_of(OTHER_KEY)])
            self.assertEqual(cosigned["signatures"][ORIGIN], signed["signatures"][ORIGIN])

    def test_unknown_algorithm_skipped(self) -> None:
        """Key IDs of algorithms we do not understand are skipped (appendices, step 2)."""
        signed = signed_invite(V11)
        signed["signatures"][ORIGIN]["curve25519:x"] = "garbage"
        verify_event_signatures(V11, signed, KEYS)

    def test_any_bad_known_signature_fails(self) -> None:
        """Every signature by a known valid key must verify, not just one."""
        for version in ALL_VERSIONS:
            signed = signed_invite(version)
            signed["signatures"][ORIGIN]["ed25519:a2"] = signed["signatures"][ORIGIN]["ed25519:a1"]
            keys = {**KEYS, **keyring(server_key(ORIGIN, ORIGIN_KEY_2))}
            self.assertRejected(
                version, signed, keys, "Signature by origin.example (ed25519:a2) is invalid"
            )

    def test_malformed_signature(self) -> None:
        """A known key's signature that is not a string or not base64 fails with that reason."""
        for bad, reason in ((None, "is not a string"), ("a", "is not valid base64")):
            signed = signed_invite(V11)
            signed["signatures"][ORIGIN]["ed25519:a1"] = bad
            self.assertRejected(
                V11, signed, KEYS, f"Signature by origin.example (ed25519:a1) {reason}"
            )

    def test_signature_with_other_characters(self) -> None:
        """An event's valid signature with whitespace or ":" added is not valid base64 (though
        base64 decoding that drops them would verify it); URL-safe or padded, it verifies."""
        signature = signed_invite(V11)["signatures"][ORIGIN]["ed25519:a1"]
        for bad in ("\t :" + signature, signature[:43] + " " + signature[43:]):
            signed = signed_invite(V11)
            signed["signatures"][ORIGIN]["ed25519:a1"] = bad
            self.assertRejected(
                V11, signed, KEYS, "Signature by origin.example (ed25519:a1) is not valid base64"
            )
        for good in (signature.translate(str.maketrans("+/", "-_")), signature + "=="):
            signed = signed_invite(V11)
            signed["signatures"][ORIGIN]["ed25519:a1"] = good
            verify_event_signatures(V11, signed, KEYS)

    def test_signatures_not_object(self) -> None:
        """An event without a ``signatures`` object is missing its signatures."""
        for signatures in (None, [], {ORIGIN: "x"}):
            event = {**signed_invite(V11), "signatures": signatures}
            self.assertRejected(
                V11,
                event,
                KEYS,
                "Missing signature for origin.example"
                + (" (no signatures)" if not isinstance(signatures, dict) else ""),
            )

    def test_redacted_copy_verifies(self) -> None:
        """A redacted copy still verifies; only the content hash tells it apart."""
        for version in ALL_VERSIONS:
            signed = signed_invite(version)
            redacted = redact(version, signed)
            verify_event_signatures(version, redacted, KEYS)
            self.assertFalse(check_content_hash(version, redacted))

    def test_unsigned_not_covered(self) -> None:
        """``unsigned`` may change in transit without breaking the signature."""
        for version in ALL_VERSIONS:
            signed = {**signed_invite(version), "unsigned": {"invite_room_state": []}}
            verify_event_signatures(version, signed, KEYS)

    def test_key_validity_enforced_v5(self) -> None:
        """From v5 a key expired before ``origin_server_ts`` is skipped, so the check fails."""
        expired = keyring(server_key(ORIGIN, ORIGIN_KEY, valid_until_ts=TS - 1))
        old_key = keyring(server_key(ORIGIN, ORIGIN_KEY, valid_until_ts=None, expired_ts=TS - 1))
        for version in V5_UP:
            signed = signed_invite(version)
            for keys in (expired, old_key):
                self.assertRejected(
                    version,
                    signed,
                    keys,
                    "No signature by origin.example with a known key valid for this event",
                )
            old_valid = keyring(
                server_key(ORIGIN, ORIGIN_KEY, valid_until_ts=None, expired_ts=TS + 1)
            )
            verify_event_signatures(version, signed, old_valid)
        for version in BEFORE_V5:
            signed = signed_invite(version)
            verify_event_signatures(version, signed, expired)
            verify_event_signatures(version, signed, old_key)

    def test_origin_server_ts_required_v5(self) -> None:
        """From v5 an event without an integer ``origin_server_ts`` cannot be checked."""
        for ts in (None, "1", True):
            for version in V5_UP:
                event = {**signed_invite(version), "origin_server_ts": ts}
                if ts is None:
                    del event["origin_server_ts"]
                self.assertRejected(
                    version,
                    event,
                    KEYS,
                    "Event has no integer origin_server_ts to check key validity",
                )

    def test_origin_server_ts_not_needed_before_v5(self) -> None:
        """Before v5 key validity does not depend on ``origin_server_ts``."""
        for version in BEFORE_V5:
            event = signed_invite(version)
            del event["origin_server_ts"]
            event = hash_and_sign_event(version, event, ORIGIN, ORIGIN_KEY)
            verify_event_signatures(version, event, KEYS)

    def test_no_signer(self) -> None:
        """An event whose sender names no server cannot be checked."""
        event = signed_invite(V11, sender="alice")
        self.assertRejected(
            V11, event, KEYS, "Cannot tell who must sign the event: event sender has no server name"
        )

    def test_cannot_prepare(self) -> None:
        """An event that cannot be redacted or encoded fails verification cleanly."""
        self.assertRejected(
            V11,
            {**signed_invite(V11), "content": "invite"},
            KEYS,
            "Event cannot be checked: event content is not an object",
        )
        self.assertRejected(
            V11,
            {**signed_invite(V11), "depth": 2**60},
            KEYS,
            "Event cannot be checked: integer 1152921504606846976 is outside [-(2**53)+1, 2**53-1]",
            server_name=ORIGIN,
        )

    def test_with_prepared(self) -> None:
        """A prepared event is used as is for verification."""
        for version in ALL_VERSIONS:
            signed = signed_invite(version)
            prepared = prepare_event(version, signed)
            verify_event_signatures(version, signed, KEYS, prepared=prepared)
            verify_event_signature(version, signed, ORIGIN, KEYS, prepared=prepared)


# -- property tests ----------------------------------------------------------------------

PROPERTY_KEYS = keyring(server_key("origin.example", ORIGIN_KEY, valid_until_ts=2**53 - 1))


def tamper(value: Any) -> Any:
    """A JSON value certainly different from ``value``."""
    return {"tampered": value}


class SigningPropertyTests(SynchronousTestCase):
    """Round trips and tamper detection for arbitrary events in every room version."""

    @settings(max_examples=200, deadline=None)
    @given(events())
    def test_sign_then_verify(self, version_and_event: tuple[RoomVersion, dict]) -> None:
        """An event we hash and sign verifies, and its content hash checks out."""
        version, event = version_and_event
        signed = hash_and_sign_event(version, event, ORIGIN, ORIGIN_KEY)
        verify_event_signatures(version, signed, PROPERTY_KEYS)
        self.assertTrue(check_content_hash(version, signed))

    @settings(max_examples=200, deadline=None)
    @given(events(), st.data())
    def test_tampering_signed_field_breaks_signature(
        self, version_and_event: tuple[RoomVersion, dict], data: st.DataObject
    ) -> None:
        """Changing any top-level key or content key that redaction keeps breaks the signature."""
        version, event = version_and_event
        signed = hash_and_sign_event(version, event, ORIGIN, ORIGIN_KEY)
        redacted = redact(version, signed)
        targets = [("top", key) for key in redacted if key not in ("signatures", "content")]
        targets += [("content", key) for key in redacted.get("content", {})]
        where, key = data.draw(st.sampled_from(targets))
        if where == "top" and key == "origin_server_ts":
            # Still an integer, so that v5+ key validity can be checked.
            tampered = {**signed, key: signed[key] ^ 1}
        elif where == "top":
            tampered = {**signed, key: tamper(signed[key])}
        else:
            content = dict(signed["content"])
            if (
                key == "third_party_invite"
                and version.identifier in ("11", "12")
                and signed["type"] == "m.room.member"
            ):
                # Only its `signed` key survives a member event's redaction
                # (v11-redactions.md); a v11+ create event keeps all its content.
                content[key] = {"signed": tamper(content[key].get("signed"))}
            else:
                content[key] = tamper(content[key])
            tampered = {**signed, "content": content}
        with self.assertRaises(SignatureError) as caught:
            verify_event_signature(version, tampered, ORIGIN, PROPERTY_KEYS)
        self.assertEqual(
            str(caught.exception),
            f"Signature by origin.example (ed25519:{ORIGIN_KEY.version}) is invalid",
        )

    def test_tampering_third_party_invite_signed_breaks_signature(self) -> None:
        """v11 and v12: a member event's third_party_invite keeps only ``signed`` through
        redaction, so changing ``signed`` breaks the signature and changing another of its
        keys does not (the branch of test_tampering_signed_field_breaks_signature that its
        derandomized draws never reach)."""
        for version in (V11, V12):
            event = {
                "type": "m.room.member",
                "room_id": "!room:origin.example",
                "sender": "@alice:origin.example",
                "state_key": "@bob:origin.example",
                "content": {
                    "membership": "invite",
                    "third_party_invite": {
                        "display_name": "Bob",
                        "signed": {"mxid": "@bob:origin.example", "token": "abc"},
                    },
                },
                "depth": 3,
                "origin_server_ts": 1000,
                "prev_events": [],
                "auth_events": [],
            }
            signed = hash_and_sign_event(version, event, ORIGIN, ORIGIN_KEY)
            invite = signed["content"]["third_party_invite"]
            renamed = {**invite, "display_name": "Robert"}
            verify_event_signature(
                version,
                {**signed, "content": {**signed["content"], "third_party_invite": renamed}},
                ORIGIN,
                PROPERTY_KEYS,
            )
            tampered_invite = {**invite, "signed": tamper(invite["signed"])}
            tampered = {
                **signed,
                "content": {**signed["content"], "third_party_invite": tampered_invite},
            }
            with self.subTest(version=version.identifier):
                with self.assertRaises(SignatureError) as caught:
                    verify_event_signature(version, tampered, ORIGIN, PROPERTY_KEYS)
                self.assertEqual(
                    str(caught.exception),
                    f"Signature by origin.example (ed25519:{ORIGIN_KEY.version}) is invalid",
                )

    @settings(max_examples=200, deadline=None)
    @given(events(), json_values)
    def test_unsigned_and_redacted_content_not_signed(
        self, version_and_event: tuple[RoomVersion, dict], value: Any
    ) -> None:
        """Changes redaction drops keep the signature valid but break the content hash."""
        version, event = version_and_event
        signed = hash_and_sign_event(version, event, ORIGIN, ORIGIN_KEY)
        content = {**signed["content"], "x_not_kept": tamper(value)}
        changed = {**signed, "content": content, "unsigned": {"age": value}}
        if not (version.identifier in ("11", "12") and signed["type"] == "m.room.create"):
            verify_event_signatures(version, changed, PROPERTY_KEYS)
        self.assertFalse(check_content_hash(version, changed))

    @settings(max_examples=200, deadline=None)
    @given(
        st.sampled_from(ALL_VERSIONS),
        st.integers(0, 2**50),
        st.one_of(st.none(), st.integers(0, 2**50)),
        st.one_of(st.none(), st.integers(0, 2**50)),
    )
    def test_key_validity_rule(
        self,
        version: RoomVersion,
        ts: int,
        valid_until_ts: int | None,
        expired_ts: int | None,
    ) -> None:
        """Verification succeeds exactly when the key is valid for the event's timestamp."""
        key = server_key(ORIGIN, ORIGIN_KEY, valid_until_ts=valid_until_ts, expired_ts=expired_ts)
        if not version.enforce_key_validity:
            expected = True
        elif expired_ts is not None:
            expected = ts <= expired_ts
        else:
            expected = valid_until_ts is not None and valid_until_ts >= ts
        self.assertEqual(key_valid_for_event(version, key, ts), expected)
        signed = signed_invite(version, origin_server_ts=ts)
        if expected:
            verify_event_signatures(version, signed, keyring(key))
        else:
            with self.assertRaises(SignatureError):
                verify_event_signatures(version, signed, keyring(key))
