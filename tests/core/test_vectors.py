"""The spec's published cryptographic test vectors, byte for byte.

appendices.md, "Cryptographic Test Vectors": seed
``YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1``, server ``domain``, key
``ed25519:1``. The event vectors follow room version 1 rules.
"""

from __future__ import annotations

import copy

from signedjson.key import decode_signing_key_base64
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import encode_base64

from federation_invite.core.events import (
    add_content_hash,
    check_content_hash,
    compute_content_hash,
)
from federation_invite.core.keys import key_id_of, verify_key_of
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
from federation_invite.core.signing import (
    ServerVerifyKey,
    hash_and_sign_event,
    sign_json,
    verify_event_signature,
    verify_event_signatures,
    verify_json,
)

SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"
SERVER_NAME = "domain"
KEY_ID = "ed25519:1"
V1 = KNOWN_ROOM_VERSIONS["1"]

SIGNING_KEY = decode_signing_key_base64("ed25519", "1", SEED)
VERIFY_KEY = ServerVerifyKey(
    server_name=SERVER_NAME,
    key_id=KEY_ID,
    verify_key=verify_key_of(SIGNING_KEY),
    valid_until_ts=None,
)
KEYS = {(SERVER_NAME, KEY_ID): VERIFY_KEY}

SIGNED_EMPTY = {
    "signatures": {
        "domain": {
            "ed25519:1": "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"
        }
    }
}

DATA = {"one": 1, "two": "Two"}
SIGNED_DATA = {
    "one": 1,
    "signatures": {
        "domain": {
            "ed25519:1": "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"
        }
    },
    "two": "Two",
}

MINIMAL_EVENT = {
    "room_id": "!x:domain",
    "sender": "@a:domain",
    "origin": "domain",
    "origin_server_ts": 1000000,
    "signatures": {},
    "hashes": {},
    "type": "X",
    "content": {},
    "prev_events": [],
    "auth_events": [],
    "depth": 3,
    "unsigned": {"age_ts": 1000000},
}
SIGNED_MINIMAL_EVENT = {
    "auth_events": [],
    "content": {},
    "depth": 3,
    "hashes": {"sha256": "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos"},
    "origin": "domain",
    "origin_server_ts": 1000000,
    "prev_events": [],
    "room_id": "!x:domain",
    "sender": "@a:domain",
    "signatures": {
        "domain": {
            "ed25519:1": "KxwGjPSDEtvnFgU00fwFz+l6d2pJM6XBIaMEn81SXPTRl16AqLAYqfIReFGZlHi5KLjAWbOoMszkwsQma+lYAg"
        }
    },
    "type": "X",
    "unsigned": {"age_ts": 1000000},
}

REDACTABLE_EVENT = {
    "content": {"body": "Here is the message content"},
    "event_id": "$0:domain",
    "origin": "domain",
    "origin_server_ts": 1000000,
    "type": "m.room.message",
    "room_id": "!r:domain",
    "sender": "@u:domain",
    "signatures": {},
    "unsigned": {"age_ts": 1000000},
}
SIGNED_REDACTABLE_EVENT = {
    "content": {"body": "Here is the message content"},
    "event_id": "$0:domain",
    "hashes": {"sha256": "onLKD1bGljeBWQhWZ1kaP9SorVmRQNdN5aM2JYU2n/g"},
    "origin": "domain",
    "origin_server_ts": 1000000,
    "type": "m.room.message",
    "room_id": "!r:domain",
    "sender": "@u:domain",
    "signatures": {
        "domain": {
            "ed25519:1": "Wm+VzmOUOz08Ds+0NTWb1d4CZrVsJSikkeRxh6aCcUwu6pNC78FunoD7KNWzqFn241eYHYMGCA5McEiVPdhzBA"
        }
    },
    "unsigned": {"age_ts": 1000000},
}


class SigningKeyTests(SynchronousTestCase):
    """The vectors' signing key (appendices, "Signing Key")."""

    def test_key_id(self) -> None:
        """The seed decodes to a key whose ID is ``ed25519:1``."""
        self.assertEqual(key_id_of(SIGNING_KEY), KEY_ID)


class JSONSigningVectorTests(SynchronousTestCase):
    """appendices, "Cryptographic Test Vectors" / "JSON Signing"."""

    def test_sign_empty_object(self) -> None:
        """Signing ``{}`` emits exactly the published signature."""
        self.assertEqual(sign_json({}, SERVER_NAME, SIGNING_KEY), SIGNED_EMPTY)

    def test_sign_object_with_data(self) -> None:
        """Signing ``{"one": 1, "two": "Two"}`` emits exactly the published signed JSON."""
        original = copy.deepcopy(DATA)
        self.assertEqual(sign_json(DATA, SERVER_NAME, SIGNING_KEY), SIGNED_DATA)
        self.assertEqual(DATA, original)

    def test_verify_published_signed_json(self) -> None:
        """Both published signed objects verify with our ``verify_json``."""
        verify_json(SIGNED_EMPTY, SERVER_NAME, VERIFY_KEY)
        verify_json(SIGNED_DATA, SERVER_NAME, VERIFY_KEY)


class EventSigningVectorTests(SynchronousTestCase):
    """appendices, "Cryptographic Test Vectors" / "Event Signing" (room version 1)."""

    def test_minimal_event_content_hash(self) -> None:
        """The minimal event's content hash is the published ``5jM4...``."""
        self.assertEqual(
            encode_base64(compute_content_hash(V1, MINIMAL_EVENT)),
            "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos",
        )
        self.assertEqual(
            add_content_hash(V1, MINIMAL_EVENT)["hashes"], SIGNED_MINIMAL_EVENT["hashes"]
        )

    def test_minimal_event(self) -> None:
        """Hashing and signing the minimal event emits exactly the published event."""
        original = copy.deepcopy(MINIMAL_EVENT)
        signed = hash_and_sign_event(V1, MINIMAL_EVENT, SERVER_NAME, SIGNING_KEY)
        self.assertEqual(signed, SIGNED_MINIMAL_EVENT)
        self.assertEqual(MINIMAL_EVENT, original)

    def test_redactable_event_content_hash(self) -> None:
        """The redactable event's content hash is the published ``onLK...``."""
        self.assertEqual(
            encode_base64(compute_content_hash(V1, REDACTABLE_EVENT)),
            "onLKD1bGljeBWQhWZ1kaP9SorVmRQNdN5aM2JYU2n/g",
        )

    def test_redactable_event(self) -> None:
        """Hashing and signing the redactable event emits exactly the published event."""
        original = copy.deepcopy(REDACTABLE_EVENT)
        signed = hash_and_sign_event(V1, REDACTABLE_EVENT, SERVER_NAME, SIGNING_KEY)
        self.assertEqual(signed, SIGNED_REDACTABLE_EVENT)
        self.assertEqual(REDACTABLE_EVENT, original)

    def test_verify_published_minimal_event(self) -> None:
        """The published minimal event passes our signature and content-hash checks.

        It has no ``event_id``, so no v1 signer set can be derived from it; its
        signature by ``domain`` is checked directly.
        """
        verify_event_signature(V1, SIGNED_MINIMAL_EVENT, SERVER_NAME, KEYS)
        self.assertTrue(check_content_hash(V1, SIGNED_MINIMAL_EVENT))

    def test_verify_published_redactable_event(self) -> None:
        """The published redactable event passes the full v1 signer check and its hash check."""
        verify_event_signatures(V1, SIGNED_REDACTABLE_EVENT, KEYS)
        self.assertTrue(check_content_hash(V1, SIGNED_REDACTABLE_EVENT))

    def test_verify_redacted_copy(self) -> None:
        """The redactable event's signature still verifies once its body is redacted.

        server-server-api, "Validating hashes and signatures on received events":
        the check "should succeed whether we have been sent the full event or a
        redacted copy"; the content hash then no longer matches.
        """
        redacted_copy = {**SIGNED_REDACTABLE_EVENT, "content": {}}
        verify_event_signatures(V1, redacted_copy, KEYS)
        self.assertFalse(check_content_hash(V1, redacted_copy))
