"""Ed25519 key helpers shared by event signing and X-Matrix request signing.

Key IDs are ``ed25519:<version>`` (server-server-api, "Retrieving server
keys"); signatures travel as standard unpadded base64 (appendices, "Signing
JSON").
"""

from __future__ import annotations

import binascii
import re
from typing import cast

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey as NaclSigningKey
from nacl.signing import VerifyKey
from signedjson.types import SigningKey
from unpaddedbase64 import decode_base64, encode_base64

__all__ = [
    "KEY_ID_RE",
    "decode_verify_key",
    "encode_verify_key",
    "is_valid_key_id",
    "key_id_of",
    "sign_bytes",
    "verify_bytes",
    "verify_key_of",
]

#: The key ID grammar for the keys we accept: algorithm ``ed25519`` and a
#: version of ``[a-zA-Z0-9_]`` (server-server-api, "Publishing Keys").
KEY_ID_RE = re.compile(r"ed25519:[a-zA-Z0-9_]+\Z")


#: An ed25519 signature (64 bytes) in unpadded base64 (appendices, "Unpadded Base64"): 86
#: characters, with "==" after them accepted too (the appendix asks decoders to take padded
#: input), and the URL-safe alphabet's "-" and "_" too, which signedjson (unpaddedbase64), so
#: Synapse, accepts. Any other character makes it no signature: base64.b64decode without
#: validate drops whitespace, ":" and the like, so a valid signature with junk added verified.
_SIGNATURE_RE = re.compile(r"[A-Za-z0-9+/_-]{86}(?:==)?")
#: Base64 of any length in the same alphabets, unpadded or correctly padded.
_BASE64_RE = re.compile(
    r"(?:[A-Za-z0-9+/_-]{4})*(?:[A-Za-z0-9+/_-]{2}(?:==)?|[A-Za-z0-9+/_-]{3}=?)?"
)
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def decode_signature(signature: str) -> bytes | None:
    """The 64 bytes of an ed25519 signature written as ``_SIGNATURE_RE`` says, else None.

    One regular-expression match and one C decode: on the path of every request and event.
    """
    if _SIGNATURE_RE.fullmatch(signature) is None:
        return None
    return binascii.a2b_base64(signature[:86].encode("ascii").translate(_TO_STANDARD) + b"==")


def is_base64(text: str) -> bool:
    """True for base64 of any length in the alphabets ``decode_signature`` takes."""
    return _BASE64_RE.fullmatch(text) is not None


def is_valid_key_id(key_id: object) -> bool:
    """True for an ``ed25519:<version>`` key ID we can verify with."""
    return isinstance(key_id, str) and len(key_id) <= 255 and KEY_ID_RE.match(key_id) is not None


def wrong_key(wanted: str, given: object) -> TypeError:
    """The ``TypeError`` for a key of the wrong kind (or no key at all) given as ``wanted``."""
    return TypeError(f"a {wanted} is wanted here, not a {type(given).__name__}")


def key_id_of(signing_key: SigningKey) -> str:
    """The key ID of a signedjson signing key (``alg`` and ``version`` attributes).

    ``TypeError`` for anything but a nacl ``SigningKey`` (as signedjson makes them).
    """
    if not isinstance(signing_key, NaclSigningKey):
        raise wrong_key("SigningKey", signing_key)
    return f"{signing_key.alg}:{signing_key.version}"


def verify_key_of(signing_key: SigningKey) -> VerifyKey:
    """The public half of a signing key (``TypeError`` for anything but a ``SigningKey``)."""
    if not isinstance(signing_key, NaclSigningKey):
        raise wrong_key("SigningKey", signing_key)
    return cast(VerifyKey, signing_key.verify_key)


def encode_verify_key(verify_key: VerifyKey) -> str:
    """The unpadded base64 form published in ``verify_keys``.

    ``TypeError`` for anything but a nacl ``VerifyKey``: a ``SigningKey`` encodes to its
    private seed, which must never be published as if it were the public key.
    """
    if not isinstance(verify_key, VerifyKey):
        raise wrong_key("VerifyKey", verify_key)
    return encode_base64(verify_key.encode())


def decode_verify_key(key_id: str, key_base64: str) -> VerifyKey:
    """Decode a published verify key; raises ``ValueError`` for anything malformed."""
    if not is_valid_key_id(key_id):
        shown = key_id[:64] if isinstance(key_id, str) else key_id
        raise ValueError(f"unsupported key ID {shown!r}")
    try:
        raw = decode_base64(key_base64)
    except Exception:
        raise ValueError("verify key is not base64") from None
    if len(raw) != 32:
        raise ValueError("an ed25519 verify key is 32 bytes")
    return VerifyKey(raw)


def sign_bytes(signing_key: SigningKey, data: bytes) -> str:
    """Sign ``data`` and return the signature as unpadded base64.

    ``TypeError`` unless ``data`` is bytes and ``signing_key`` a nacl ``SigningKey``.
    """
    if not isinstance(data, bytes):
        raise TypeError(f"the data to sign must be bytes, not {type(data).__name__}")
    if not isinstance(signing_key, NaclSigningKey):
        raise wrong_key("SigningKey", signing_key)
    return encode_base64(signing_key.sign(data).signature)


def sign_with_key_id(signing_key: SigningKey, data: bytes) -> tuple[str, str]:
    """``(key_id_of(signing_key), sign_bytes(signing_key, data))`` with one key check.

    For the signing functions, which need both and whose ``data`` is their own bytes.
    """
    if not isinstance(signing_key, NaclSigningKey):
        raise wrong_key("SigningKey", signing_key)
    signature = encode_base64(signing_key.sign(data).signature)
    return f"{signing_key.alg}:{signing_key.version}", signature


def verify_bytes(verify_key: VerifyKey, data: bytes, signature_base64: object) -> bool:
    """True when ``signature_base64`` is a valid ed25519 signature of ``data``.

    Any ``signature_base64`` is answered (False unless a valid signature);
    ``data`` not bytes, or ``verify_key`` not a nacl ``VerifyKey``, is a programming
    error: ``TypeError``.
    """
    if not isinstance(data, bytes):
        raise TypeError(f"the signed data must be bytes, not {type(data).__name__}")
    if not isinstance(verify_key, VerifyKey):
        raise wrong_key("VerifyKey", verify_key)
    if not isinstance(signature_base64, str):
        return False
    signature = decode_signature(signature_base64)
    if signature is None:
        return False
    try:
        verify_key.verify(data, signature)
    except BadSignatureError:
        return False
    return True
