"""Our signing key on disk, in Synapse's format, so operators can reuse an existing key.

The file holds one key per line: ``ed25519 <version> <unpadded base64 seed>``.
The first key is the one we sign with. A missing file is created with a new
key whose version is ``a_`` and four random characters (Synapse's convention),
with mode 0600 from the moment it exists. Creation is atomic and durable:
several workers may start at once on a fresh data directory, and all of them
end up with the same key, which survives a power cut once we sign with it. Key
material never appears in errors or logs.
"""

from __future__ import annotations

import errno
import os
import secrets
import string
import tempfile

from signedjson.key import decode_signing_key_base64, generate_signing_key
from signedjson.types import SigningKey
from unpaddedbase64 import decode_base64, encode_base64

from .core.keys import is_valid_key_id

__all__ = [
    "SigningKeyError",
    "generate_key_version",
    "load_or_create_signing_key",
    "load_or_create_signing_keys",
    "make_private_directories",
    "read_signing_keys",
    "write_signing_key_file",
]

_ALPHABET = string.ascii_letters + string.digits


class SigningKeyError(ValueError):
    """The key file is unreadable or malformed (the message never contains key material)."""


def generate_key_version() -> str:
    """A fresh key version: ``a_`` followed by four random letters or digits."""
    return "a_" + "".join(secrets.choice(_ALPHABET) for _ in range(4))


def _parse_line(path: str, number: int, line: str) -> SigningKey:
    parts = line.split()
    if len(parts) != 3:
        raise SigningKeyError(f"{path}:{number}: expected 'ed25519 <version> <seed>'")
    algorithm, version, seed = parts
    if algorithm != "ed25519":
        # No word of the line is quoted: a line in another order may begin with the seed.
        raise SigningKeyError(f"{path}:{number}: the first word is not ed25519")
    # The test our keyrings apply to a key ID (ours included), so we never publish a key
    # that another copy of this package refuses.
    if not is_valid_key_id(f"ed25519:{version}"):
        raise SigningKeyError(
            f"{path}:{number}: key version must be [a-zA-Z0-9_]+ and at most 247 characters"
            " (key ID 'ed25519:<version>' at most 255)"
        )
    try:
        raw = decode_base64(seed)
    except Exception:
        raise SigningKeyError(f"{path}:{number}: the seed is not unpadded base64") from None
    if len(raw) != 32:
        raise SigningKeyError(f"{path}:{number}: an ed25519 seed is 32 bytes")
    key: SigningKey = decode_signing_key_base64(algorithm, version, seed)
    return key


def read_signing_keys(path: str) -> list[SigningKey]:
    """Read every key in a Synapse-format key file; blank lines and ``#`` comments are skipped."""
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        raise SigningKeyError(f"{path}: not a signing key file (not ASCII)") from None
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key file {path}: {exc.strerror}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keys.append(_parse_line(path, number, stripped))
    if not keys:
        raise SigningKeyError(f"{path}: no signing key in the file")
    return keys


#: What opening or syncing a directory may fail with where that cannot be done at all.
_UNSYNCABLE = frozenset({errno.EACCES, errno.EPERM, errno.EINVAL, errno.EISDIR})


def make_private_directories(path: str) -> None:
    """Create directory ``path`` and each missing parent with mode 0700, whatever the umask.

    ``os.makedirs(path, mode=0o700)`` gives the mode to the last directory only,
    its parents getting 0777 less the umask (all of it under umask 0). Each one
    created here is also chmod-ed, as the umask may have removed owner bits.
    Directories that existed keep their mode; one made meanwhile by another
    worker too. Something at ``path`` (or a parent) that is not a directory
    raises ``FileExistsError`` or ``NotADirectoryError``.
    """
    missing = []
    current = path
    # The path as given, not normalised: the kernel resolves a ".." after a symlink.
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current.rstrip(os.sep))
        if not parent or parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
        else:
            os.chmod(directory, 0o700)


def _fsync_directory(directory: str) -> None:
    """Make the names just added to or removed from ``directory`` survive a power cut.

    Best-effort: a directory we may write into but not read (a root-owned 0711
    parent of a service's data dir) cannot be opened, and some file systems
    cannot sync a directory (EINVAL); the key is published by then, and
    refusing it would only stop a daemon that has its key.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno in _UNSYNCABLE:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _UNSYNCABLE:
            raise
    finally:
        os.close(fd)


def write_signing_key_file(path: str, key: SigningKey) -> None:
    """Write ``key`` to a new file with mode 0600, atomically and durably (refuses to overwrite).

    The complete key is written and fsynced under a temporary name in the same
    directory, then published with ``os.link``: a reader finds no file or the
    whole key, never a partial one, and the link raises FileExistsError when a
    key is already there (another worker won the race), so a key is never
    clobbered.
    """
    directory = os.path.dirname(path) or "."
    make_private_directories(directory)
    line = f"{key.alg} {key.version} {encode_base64(key.encode())}\n"
    # mkstemp creates the file with O_EXCL and mode 0600, so the seed is never
    # readable by others, not even for an instant (the link shares the inode).
    fd, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, path)
    finally:
        os.unlink(temporary)
    # One fsync makes both the new name and the removed temporary one durable.
    # The directory's own entry in its parent may be new too (we or
    # Config.ensure_data_dir just created it), so that is fsynced as well, where
    # we may open the parent (a root-owned 0711 one we may not).
    _fsync_directory(directory)
    _fsync_directory(os.path.dirname(os.path.abspath(directory)))


def load_or_create_signing_key(path: str) -> tuple[SigningKey, bool]:
    """The key we sign with, and whether it was just created because the file was missing."""
    keys, created = load_or_create_signing_keys(path)
    return keys[0], created


def load_or_create_signing_keys(path: str) -> tuple[list[SigningKey], bool]:
    """Every key of the file (the first is the one we sign with), and whether the file was
    just created, with one new key, because it was missing."""
    if not os.path.exists(path):
        key: SigningKey = generate_signing_key(generate_key_version())
        try:
            write_signing_key_file(path, key)
        except FileExistsError:
            # Another worker published its key first; it is complete (written
            # and fsynced before the link), so we use it rather than ours.
            pass
        else:
            return [key], True
    return read_signing_keys(path), False
