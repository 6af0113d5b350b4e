"""Tests for GET /_matrix/key/v2/server: our published, self-signed key document."""

from __future__ import annotations

import json
from typing import Any

from signedjson.key import decode_signing_key_base64, generate_signing_key
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.config import OldKey
from federation_invite.core.keys import decode_verify_key, encode_verify_key, verify_key_of
from federation_invite.core.signing import ServerVerifyKey, SignatureError, verify_json
from federation_invite.service import build_site_root
from federation_invite.web.keys import KeyServerResource
from federation_invite.web.tree import build_matrix_tree

SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"


class KeyServerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.key = decode_signing_key_base64("ed25519", "1", SEED)
        self.old = generate_signing_key("old")
        self.old_key = OldKey("ed25519:old", encode_verify_key(verify_key_of(self.old)), 123)
        resource = KeyServerResource(
            self.clock, "example.org", [self.key], [self.old_key], validity_ms=3_600_000
        )
        self.client = StubTreq(build_site_root(build_matrix_tree(resource)))

    def get(self, path: str) -> tuple[int, Any]:
        response = self.successResultOf(self.client.get("https://example.org" + path))
        return response.code, json.loads(self.successResultOf(response.content()))

    def verify(self, document: dict[str, Any]) -> None:
        """Verify the document with the key it publishes, as a fetching server would."""
        key_id = "ed25519:1"
        verify_key = decode_verify_key(key_id, document["verify_keys"][key_id]["key"])
        verify_json(
            document, "example.org", ServerVerifyKey("example.org", key_id, verify_key, None)
        )

    def test_document(self) -> None:
        """The document names our key, old keys, valid_until_ts = now + lifetime, and verifies."""
        code, document = self.get("/_matrix/key/v2/server")
        self.assertEqual(code, 200)
        self.assertEqual(document["server_name"], "example.org")
        self.assertEqual(
            document["verify_keys"],
            {"ed25519:1": {"key": encode_verify_key(verify_key_of(self.key))}},
        )
        self.assertEqual(
            document["old_verify_keys"],
            {"ed25519:old": {"key": self.old_key.key, "expired_ts": 123}},
        )
        self.assertEqual(document["valid_until_ts"], 1_700_000_000_000 + 3_600_000)
        self.assertEqual(list(document["signatures"]), ["example.org"])
        self.verify(document)

    def test_document_tracks_clock(self) -> None:
        """valid_until_ts moves with time and the new document still verifies."""
        self.clock.advance(60)
        _, document = self.get("/_matrix/key/v2/server")
        self.assertEqual(document["valid_until_ts"], 1_700_000_060_000 + 3_600_000)
        self.verify(document)

    def test_default_lifetime_one_day(self) -> None:
        """Built without a lifetime (as an embedder may), the document is valid for a day, as
        Synapse publishes it, and verifies."""
        resource = KeyServerResource(self.clock, "example.org", [self.key])
        self.client = StubTreq(build_site_root(build_matrix_tree(resource)))
        _, document = self.get("/_matrix/key/v2/server")
        self.assertEqual(document["valid_until_ts"], 1_700_000_000_000 + 86_400_000)
        self.verify(document)

    def test_tampering_detected(self) -> None:
        """Changing any published field breaks the self-signature."""
        _, document = self.get("/_matrix/key/v2/server")
        document["valid_until_ts"] += 1
        self.assertRaises(SignatureError, self.verify, document)

    def test_deprecated_key_id_path(self) -> None:
        """The deprecated /server/{keyId} form returns the same document."""
        _, plain = self.get("/_matrix/key/v2/server")
        code, by_id = self.get("/_matrix/key/v2/server/ed25519%3A1")
        self.assertEqual(code, 200)
        self.assertEqual(by_id, plain)

    def test_deeper_path_and_method(self) -> None:
        """Paths below a key ID are 404; PUT is 405; both M_UNRECOGNIZED."""
        code, body = self.get("/_matrix/key/v2/server/ed25519%3A1/x")
        self.assertEqual((code, body["errcode"]), (404, "M_UNRECOGNIZED"))
        response = self.successResultOf(
            self.client.put("https://example.org/_matrix/key/v2/server")
        )
        self.assertEqual(response.code, 405)

    def test_version_endpoint(self) -> None:
        """GET /_matrix/federation/v1/version names the implementation."""
        from federation_invite import __version__

        code, body = self.get("/_matrix/federation/v1/version")
        self.assertEqual(
            (code, body), (200, {"server": {"name": "federation-invite", "version": __version__}})
        )
