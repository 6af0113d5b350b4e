"""Tests for core.errors, core.keys and core.roomversions."""

from __future__ import annotations

from signedjson.key import decode_signing_key_base64
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.core.errors import MatrixError
from federation_invite.core.keys import (
    decode_verify_key,
    encode_verify_key,
    is_valid_key_id,
    key_id_of,
    sign_bytes,
    verify_bytes,
    verify_key_of,
)
from federation_invite.core.roomversions import (
    KNOWN_ROOM_VERSIONS,
    EventFormat,
    EventIdFormat,
    RedactionRules,
    get_room_version,
    room_version_of,
)

SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"


class MatrixErrorTests(SynchronousTestCase):
    def test_json_and_repr(self) -> None:
        """The body is errcode, error, then extras; str and repr name status and code."""
        error = MatrixError(400, "M_INCOMPATIBLE_ROOM_VERSION", "no", room_version="99")
        self.assertEqual(
            error.to_json(),
            {"errcode": "M_INCOMPATIBLE_ROOM_VERSION", "error": "no", "room_version": "99"},
        )
        self.assertEqual(str(error), "400 M_INCOMPATIBLE_ROOM_VERSION: no")
        self.assertEqual(
            repr(error), "MatrixError(400, 'M_INCOMPATIBLE_ROOM_VERSION', 'no', room_version='99')"
        )

    def test_extras_cannot_override(self) -> None:
        """An extra named like a standard field never replaces it."""
        self.assertEqual(
            MatrixError(403, "M_FORBIDDEN", "x", error="other").to_json()["error"], "x"
        )


class KeyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = decode_signing_key_base64("ed25519", "1", SEED)

    def test_key_ids(self) -> None:
        """Only ed25519:[a-zA-Z0-9_]+ key IDs of at most 255 characters are valid."""
        self.assertTrue(is_valid_key_id("ed25519:a_B9"))
        for bad in ("ed25519:", "ed25519:a-b", "curve25519:a", "ed25519:" + "a" * 250, 5, None):
            self.assertFalse(is_valid_key_id(bad), bad)
        self.assertEqual(key_id_of(self.key), "ed25519:1")

    def test_verify_key_round_trip(self) -> None:
        """A published verify key decodes to the same key; malformed ones are refused."""
        published = encode_verify_key(verify_key_of(self.key))
        self.assertEqual(decode_verify_key("ed25519:1", published), verify_key_of(self.key))
        self.assertRaises(ValueError, decode_verify_key, "rsa:1", published)
        self.assertRaises(ValueError, decode_verify_key, "ed25519:1", "!!!")
        self.assertRaises(ValueError, decode_verify_key, "ed25519:1", "\u00e9t\u00e9")
        self.assertRaises(ValueError, decode_verify_key, "ed25519:1", "AAAA")
        for key_id, key in ((None, published), (5, published), ("ed25519:1", None)):
            self.assertRaises(ValueError, decode_verify_key, key_id, key)

    def test_sign_and_verify_bytes(self) -> None:
        """Signatures verify; wrong data, bad base64, wrong length or type do not."""
        signature = sign_bytes(self.key, b"data")
        verify_key = verify_key_of(self.key)
        self.assertTrue(verify_bytes(verify_key, b"data", signature))
        self.assertFalse(verify_bytes(verify_key, b"other", signature))
        for bad in (None, 5, "!!!", "AAAA", "A" * 200, "\u00e9" * 86):
            self.assertFalse(verify_bytes(verify_key, b"data", bad))

    def test_signature_spellings(self) -> None:
        """verify_bytes takes a signature in the standard or URL-safe base64 alphabet, unpadded or
        padded with "=="; any other character in it (whitespace, ":", "!") or any other padding
        makes it invalid, though base64 decoding that drops such characters would verify it."""
        signature = sign_bytes(self.key, b"data")
        verify_key = verify_key_of(self.key)
        urlsafe = signature.translate(str.maketrans("+/", "-_"))
        self.assertNotEqual(urlsafe, signature)
        for good in (signature, urlsafe, signature + "==", urlsafe + "=="):
            self.assertTrue(verify_bytes(verify_key, b"data", good), good)
        for bad in (
            "\t :" + signature,
            signature[:20] + "!!::" + signature[20:],
            signature[:43] + " " + signature[43:],
            " " + signature + " ",
            signature + "\n",
            signature + "=",
            signature + "===",
            "==" + signature,
        ):
            self.assertFalse(verify_bytes(verify_key, b"data", bad), repr(bad))

    def test_data_must_be_bytes(self) -> None:
        """verify_bytes and sign_bytes take the data as bytes: a str is a TypeError saying so
        (a programming error, not a bad signature), whatever the signature."""
        signature = sign_bytes(self.key, b"data")
        for bad_signature in (signature, "A" * 86, None):
            with self.assertRaises(TypeError) as raised:
                verify_bytes(verify_key_of(self.key), "data", bad_signature)  # type: ignore[arg-type]
            self.assertIn("bytes", str(raised.exception))
        with self.assertRaises(TypeError) as raised:
            sign_bytes(self.key, "data")  # type: ignore[arg-type]
        self.assertIn("bytes", str(raised.exception))

    def test_key_of_the_wrong_kind(self) -> None:
        """A verify key where a signing key is wanted, or a signing key (or anything else) where
        a verify key is wanted, is a TypeError naming both kinds: encode_verify_key never
        returns a signing key's private seed formatted as a public key."""
        verify_key = verify_key_of(self.key)
        signature = sign_bytes(self.key, b"data")
        for call, wanted, passed in (
            (lambda: encode_verify_key(self.key), "VerifyKey", "SigningKey"),
            (lambda: encode_verify_key("x"), "VerifyKey", "str"),
            (lambda: encode_verify_key(None), "VerifyKey", "NoneType"),
            (lambda: verify_bytes(self.key, b"data", signature), "VerifyKey", "SigningKey"),
            (lambda: verify_bytes(self.key, b"data", None), "VerifyKey", "SigningKey"),
            (lambda: key_id_of(verify_key), "SigningKey", "VerifyKey"),
            (lambda: verify_key_of(verify_key), "SigningKey", "VerifyKey"),
            (lambda: sign_bytes(verify_key, b"data"), "SigningKey", "VerifyKey"),
            (lambda: sign_bytes("k", b"data"), "SigningKey", "str"),
        ):
            with self.assertRaises(TypeError) as raised:
                call()
            self.assertIn(f"a {wanted}", str(raised.exception))
            self.assertIn(f"not a {passed}", str(raised.exception))


class RoomVersionTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Each stable version 1-12 has the rules the room version pages give it."""
        self.assertEqual(list(KNOWN_ROOM_VERSIONS), [str(i) for i in range(1, 13)])
        v = KNOWN_ROOM_VERSIONS
        self.assertEqual(
            [v[i].event_id_format for i in ("1", "2", "3", "4", "12")],
            [
                EventIdFormat.V1_OPAQUE,
                EventIdFormat.V1_OPAQUE,
                EventIdFormat.V3_BASE64,
                EventIdFormat.V4_URLSAFE,
                EventIdFormat.V4_URLSAFE,
            ],
        )
        self.assertEqual(
            [v[str(i)].redaction_rules for i in range(1, 13)],
            [RedactionRules.V1] * 5
            + [RedactionRules.V6] * 2
            + [RedactionRules.V8]
            + [RedactionRules.V9] * 2
            + [RedactionRules.V11] * 2,
        )
        self.assertEqual(
            [v[str(i)].strict_canonical_json for i in range(1, 13)], [False] * 5 + [True] * 7
        )
        self.assertEqual(
            [v[str(i)].enforce_key_validity for i in range(1, 13)], [False] * 4 + [True] * 8
        )
        self.assertEqual(
            [v[str(i)].check_event_id_server_signature for i in range(1, 13)],
            [True] * 2 + [False] * 10,
        )
        self.assertEqual(
            [v[str(i)].room_id_is_create_event_hash for i in range(1, 13)], [False] * 11 + [True]
        )
        self.assertEqual(
            [v[str(i)].event_format for i in range(1, 13)],
            [EventFormat.V1] * 2 + [EventFormat.V3] * 9 + [EventFormat.V12],
        )
        self.assertTrue(v["2"].event_id_in_event)
        self.assertFalse(v["3"].event_id_in_event)
        self.assertTrue(v["10"].redaction_keeps_top_level_origin)
        self.assertFalse(v["11"].redaction_keeps_top_level_origin)
        self.assertEqual([v[str(i)].knock for i in (6, 7)], [False, True])
        self.assertEqual([v[str(i)].restricted_join_rule for i in (7, 8)], [False, True])
        self.assertEqual([v[str(i)].integer_power_levels for i in (9, 10)], [False, True])

    def test_unknown(self) -> None:
        """Unknown or non-string versions: 400 M_INCOMPATIBLE_ROOM_VERSION with room_version."""
        for bad, shown in (
            ("13", "13"),
            ("org.matrix.msc1234", "org.matrix.msc1234"),
            (5, "5"),
            (None, "None"),
        ):
            error = self.assertRaises(MatrixError, get_room_version, bad)
            self.assertEqual(
                (error.http_status, error.errcode, error.extra["room_version"]),
                (400, "M_INCOMPATIBLE_ROOM_VERSION", shown),
            )
        self.assertIs(get_room_version("11"), KNOWN_ROOM_VERSIONS["11"])

    def test_room_version_of(self) -> None:
        """room_version_of: a RoomVersion is itself, an identifier the version it names, and
        an unknown one get_room_version's 400 M_INCOMPATIBLE_ROOM_VERSION."""
        for identifier, version in KNOWN_ROOM_VERSIONS.items():
            self.assertIs(room_version_of(version), version)
            self.assertIs(room_version_of(identifier), version)
        error = self.assertRaises(MatrixError, room_version_of, "13")
        self.assertEqual(
            (error.http_status, error.errcode, error.extra["room_version"]),
            (400, "M_INCOMPATIBLE_ROOM_VERSION", "13"),
        )
