"""Tests for federation_invite.signingkey: Synapse's key file format, creation with mode 0600."""

from __future__ import annotations

import errno
import os
import stat

from signedjson.key import generate_signing_key
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from unpaddedbase64 import decode_base64, encode_base64

from federation_invite.signingkey import (
    SigningKeyError,
    generate_key_version,
    load_or_create_signing_key,
    make_private_directories,
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

    def test_seed_first_line_refused_without_any_of_the_seed(self) -> None:
        """A line whose first word is the seed is refused naming its line, no 8 seed characters."""
        path = self.write(f"{SEED} a_AAAA ed25519\n")
        error = str(self.assertRaises(SigningKeyError, read_signing_keys, path))
        self.assertEqual(error, f"{path}:1: the first word is not ed25519")
        for start in range(len(SEED) - 7):
            self.assertNotIn(SEED[start : start + 8], error)

    def test_key_id_longer_than_255_refused(self) -> None:
        """A version making the key ID longer than 255 characters (which no keyring of ours
        accepts) is refused with one line; 'ed25519:' and a 247-character version loads."""
        path = self.write(f"ed25519 {'a' * 300} {SEED}\n")
        error = str(self.assertRaises(SigningKeyError, read_signing_keys, path))
        self.assertEqual(
            error,
            f"{path}:1: key version must be [a-zA-Z0-9_]+ and at most 247 characters"
            " (key ID 'ed25519:<version>' at most 255)",
        )
        self.assertNotIn("\n", error)
        self.assertNotIn("a" * 300, error)
        (key,) = read_signing_keys(self.write(f"ed25519 {'a' * 247} {SEED}\n"))
        self.assertEqual(key.version, "a" * 247)

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

    def test_missing_directories_created_0700_whatever_the_umask(self) -> None:
        """Every directory created for a new key file has mode 0700, under umask 0 (which
        left os.makedirs' intermediate ones 0777) or one removing owner bits; a directory
        that existed keeps its mode."""
        for umask in (0o000, 0o277):
            base = os.path.abspath(self.mktemp())
            os.makedirs(base)
            os.chmod(base, 0o755)
            old_umask = os.umask(umask)
            try:
                load_or_create_signing_key(os.path.join(base, "a", "b", "c", "signing.key"))
            finally:
                os.umask(old_umask)
            modes = [
                stat.S_IMODE(os.stat(os.path.join(base, *parts)).st_mode)
                for parts in ((), ("a",), ("a", "b"), ("a", "b", "c"))
            ]
            self.assertEqual(modes, [0o755, 0o700, 0o700, 0o700], oct(umask))

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

    def test_creation_race_loser_loads_winners_key(self) -> None:
        """A worker whose key file appears after its existence check loads that key, no exception."""
        path = os.path.join(self.mktemp(), "signing.key")
        os.makedirs(os.path.dirname(path))
        real_exists = os.path.exists

        def winner_writes_after_check(candidate: str) -> bool:
            # The other worker publishes its key right after we found none.
            found = real_exists(candidate)
            if candidate == path:
                write_signing_key_file(path, generate_signing_key("a_win"))
            return found

        self.patch(os.path, "exists", winner_writes_after_check)
        key, created = load_or_create_signing_key(path)
        self.assertFalse(created)
        (on_disk,) = read_signing_keys(path)
        self.assertEqual((key.version, key.encode()), ("a_win", on_disk.encode()))
        self.assertEqual(os.listdir(os.path.dirname(path)), ["signing.key"])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_created_key_fsynced_before_return(self) -> None:
        """The key's contents are fsynced before its name appears, then its directory and parent."""
        path = os.path.join(self.mktemp(), "signing.key")
        real_fsync = os.fsync
        calls = []

        def recording_fsync(fd: int) -> None:
            info = os.fstat(fd)
            calls.append((info.st_ino, stat.S_ISDIR(info.st_mode), os.path.exists(path)))
            real_fsync(fd)

        self.patch(os, "fsync", recording_fsync)
        load_or_create_signing_key(path)
        directory = os.path.dirname(path)
        key_file, key_dir, parent = (
            os.stat(p).st_ino for p in (path, directory, os.path.dirname(directory))
        )
        self.assertEqual(
            calls, [(key_file, False, False), (key_dir, True, True), (parent, True, True)]
        )

    def test_published_complete_with_mode_0600(self) -> None:
        """The name is linked to a complete 0600 file in the same directory, which alone remains."""
        path = os.path.join(self.mktemp(), "signing.key")
        real_link = os.link
        published = []

        def recording_link(source: str, target: str) -> None:
            with open(source, encoding="ascii") as handle:
                text = handle.read()
            mode = stat.S_IMODE(os.stat(source).st_mode)
            published.append((os.path.dirname(os.path.abspath(source)), target, mode, text))
            real_link(source, target)

        self.patch(os, "link", recording_link)
        key, created = load_or_create_signing_key(path)
        self.assertTrue(created)
        line = f"ed25519 {key.version} {encode_base64(key.encode())}\n"
        directory = os.path.dirname(os.path.abspath(path))
        self.assertEqual(published, [(directory, path, 0o600, line)])
        self.assertEqual(os.listdir(os.path.dirname(path)), ["signing.key"])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_failed_creation_leaves_nothing_behind(self) -> None:
        """A failed fsync or link publishes no key and leaves no temporary file."""
        for name in ["fsync", "link"]:
            path = os.path.join(self.mktemp(), "signing.key")

            def failing(*args: object, name: str = name) -> None:
                raise OSError(5, f"injected {name} failure")

            patched = self.patch(os, name, failing)
            error = self.assertRaises(OSError, load_or_create_signing_key, path)
            patched.restore()
            self.assertEqual(error.strerror, f"injected {name} failure")
            self.assertEqual(os.listdir(os.path.dirname(path)), [])

    def test_directory_fsync_without_read_permission(self) -> None:
        """A data dir whose parent we may not read (root's 0711 /srv holding ours) still gets
        its key: the directory fsyncs are best-effort once the key is published."""
        path = os.path.join(self.mktemp(), "signing.key")
        parent = os.path.dirname(os.path.abspath(os.path.dirname(path)))
        real_open = os.open
        refused = []

        def refusing_open(name: str, flags: int, *args: object, **kwargs: object) -> int:
            if os.path.abspath(name) == parent and flags & os.O_DIRECTORY:
                refused.append(name)
                raise PermissionError(13, "Permission denied", name)
            return real_open(name, flags, *args, **kwargs)  # type: ignore[arg-type]

        self.patch(os, "open", refusing_open)
        key, created = load_or_create_signing_key(path)
        self.assertTrue(created)
        self.assertEqual(refused, [parent])
        (on_disk,) = read_signing_keys(path)
        self.assertEqual(on_disk.encode(), key.encode())

    def test_directory_fsync_failing_otherwise_raises(self) -> None:
        """Only a directory that cannot be opened at all for a sync (EACCES, EPERM, EINVAL,
        EISDIR) is skipped: another error opening it (EIO) is raised, not taken as synced."""
        path = os.path.join(self.mktemp(), "signing.key")
        real_open = os.open

        def failing_open(name: str, flags: int, *args: object, **kwargs: object) -> int:
            if flags & os.O_DIRECTORY:
                raise OSError(errno.EIO, "injected directory open failure", name)
            return real_open(name, flags, *args, **kwargs)  # type: ignore[arg-type]

        self.patch(os, "open", failing_open)
        error = self.assertRaises(OSError, load_or_create_signing_key, path)
        self.assertEqual(
            (error.errno, error.strerror), (errno.EIO, "injected directory open failure")
        )

    def test_no_descriptor_left_open(self) -> None:
        """Writing a key file closes every descriptor it opened (the file's, and those of the
        directory and its parent opened to fsync them)."""
        if not os.path.isdir("/proc/self/fd"):
            raise SkipTest("no /proc/self/fd to list this process's descriptors")
        directory = self.mktemp()
        os.makedirs(directory)
        before = sorted(os.listdir("/proc/self/fd"))
        write_signing_key_file(os.path.join(directory, "signing.key"), generate_signing_key("a"))
        self.assertEqual(sorted(os.listdir("/proc/self/fd")), before)

    def test_bare_file_name_written_in_the_working_directory(self) -> None:
        """A key path without a directory ('signing.key') is written in the working directory,
        its temporary file there too: nothing else is created."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        key, created = load_or_create_signing_key("signing.key")
        self.assertTrue(created)
        self.assertEqual(os.listdir(directory), ["signing.key"])
        (on_disk,) = read_signing_keys(os.path.join(directory, "signing.key"))
        self.assertEqual(on_disk.encode(), key.encode())


class PrivateDirectoryTests(SynchronousTestCase):
    """make_private_directories: the key file's directory, and its missing parents, 0700."""

    def test_file_in_the_way_refused(self) -> None:
        """A regular file where the directory (or a parent) should be raises FileExistsError,
        also through write_signing_key_file, rather than being taken as the directory."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        in_the_way = os.path.join(base, "file")
        with open(in_the_way, "w"):
            pass
        for path in (in_the_way, os.path.join(in_the_way, "sub")):
            self.assertRaises(FileExistsError, make_private_directories, path)
            self.assertRaises(
                FileExistsError,
                write_signing_key_file,
                os.path.join(path, "signing.key"),
                generate_signing_key("a"),
            )
        self.assertEqual(os.listdir(base), ["file"])

    def test_directory_made_meanwhile_accepted(self) -> None:
        """A directory another worker creates between our check and our mkdir is used as it
        is: its FileExistsError is not an error, and its mode is not changed."""
        path = os.path.join(os.path.abspath(self.mktemp()), "keys")
        real_mkdir = os.mkdir

        def other_worker_first(directory: str, mode: int = 0o777) -> None:
            real_mkdir(directory, 0o750)
            os.chmod(directory, 0o750)
            raise FileExistsError(errno.EEXIST, "File exists", directory)

        self.patch(os, "mkdir", other_worker_first)
        make_private_directories(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o750)
