"""Tests for federation_invite.signingkey: Synapse's key file format, creation with mode 0600."""

from __future__ import annotations

import os
import stat

from signedjson.key import generate_signing_key
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import decode_base64, encode_base64

from federation_invite.signingkey import (
    SigningKeyError,
    generate_key_version,
    load_or_create_signing_key,
    read_signing_keys,
    write_signing_key_file,
)

# The spec's test-vector seed (appendices, "Cryptographic Test Vectors").
SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"


class SigningKeyFileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="ascii") as handle:
            handle.write(text)
        return path

    def test_reads_synapse_format(self) -> None:
        """A Synapse key file line 'ed25519 <version> <seed>' gives that key."""
        (key,) = read_signing_keys(self.write(f"ed25519 1 {SEED}\n"))
        self.assertEqual((key.alg, key.version), ("ed25519", "1"))
        self.assertEqual(key.encode(), decode_base64(SEED))

    def test_several_keys_comments_blank_lines(self) -> None:
        """Every key line is read in order; comments and blank lines are skipped."""
        other = generate_signing_key("a_b")
        text = f"# ours\n\ned25519 1 {SEED}\ned25519 a_b {encode_base64(other.encode())}\n"
        keys = read_signing_keys(self.write(text))
        self.assertEqual([k.version for k in keys], ["1", "a_b"])

    def test_malformed_files_refused_without_key_material(self) -> None:
        """Each malformed file is refused with its line, never echoing the seed."""
        cases = [
            "",
            "ed25519 1\n",
            f"rsa 1 {SEED}\n",
            f"ed25519 bad-version {SEED}\n",
            "ed25519 1 !!!notbase64\n",
            "ed25519 1 AAAA\n",
        ]
        for text in cases:
            error = self.assertRaises(SigningKeyError, read_signing_keys, self.write(text))
            self.assertNotIn(SEED, str(error))
            self.assertNotIn("notbase64", str(error))

    def test_non_ascii_and_missing(self) -> None:
        """A binary file and a missing file are refused as SigningKeyError."""
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(b"\xff\xfe")
        self.assertRaises(SigningKeyError, read_signing_keys, path)
        self.assertRaises(SigningKeyError, read_signing_keys, self.mktemp())

    def test_created_with_mode_0600(self) -> None:
        """A missing key file is created (with its directory) with mode 0600."""
        path = os.path.join(self.mktemp(), "sub", "signing.key")
        key, created = load_or_create_signing_key(path)
        self.assertTrue(created)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertRegex(key.version, r"^a_[a-zA-Z0-9]{4}$")
        again, created_again = load_or_create_signing_key(path)
        self.assertFalse(created_again)
        self.assertEqual(again.encode(), key.encode())

    def test_never_overwrites(self) -> None:
        """Writing a key file over an existing one is refused."""
        path = self.write(f"ed25519 1 {SEED}\n")
        self.assertRaises(FileExistsError, write_signing_key_file, path, generate_signing_key("x"))

    def test_key_versions_random(self) -> None:
        """Generated versions follow Synapse's 'a_' + 4 characters and differ."""
        versions = {generate_key_version() for _ in range(50)}
        self.assertGreater(len(versions), 40)
        for version in versions:
            self.assertRegex(version, r"^a_[a-zA-Z0-9]{4}$")
