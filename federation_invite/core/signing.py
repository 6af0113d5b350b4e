"""Signing and verifying JSON objects and events (appendices, "Signing JSON").

Pure functions: signing returns a new dict with the signature merged into
``signatures``; verification raises :class:`SignatureError` with the reason.
Event signatures cover the *redacted* event without ``signatures`` and
``unsigned`` (server-server-api, "Signing Events"), which
:func:`~federation_invite.core.events.prepare_event` computes once.

Which keys may verify what: ``verify_keys`` sign requests and events;
``old_verify_keys`` (a :class:`ServerVerifyKey` with ``expired_ts``) sign
events only (server-server-api, "Publishing Keys"). Refusing old keys for
request authentication is the keyring's business; :func:`key_valid_for_event`
is the event rule only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from signedjson.types import SigningKey

from .canonical import encode_canonical_json
from .events import PreparedEvent, add_content_hash, ensure_prepared, prepare_event
from .keys import decode_signature, is_base64, sign_with_key_id, wrong_key
from .roomversions import RoomVersion, room_version_of

__all__ = [
    "SEVEN_DAYS_MS",
    "ServerVerifyKey",
    "SignatureError",
    "cap_valid_until_ts",
    "hash_and_sign_event",
    "key_valid_for_event",
    "required_event_signers",
    "sign_event",
    "sign_json",
    "signing_bytes",
    "verify_event_signature",
    "verify_event_signatures",
    "verify_json",
    "verify_json_with_one_of",
]

#: rooms/fragments/v5-signing-requirements.md: a key's validity is capped at
#: seven days into the future.
SEVEN_DAYS_MS = 7 * 24 * 60 * 60 * 1000

_NOT_SIGNED = frozenset({"signatures", "unsigned"})


class SignatureError(ValueError):
    """A required signature is missing, malformed or does not verify."""


@attrs.frozen
class ServerVerifyKey:
    """A server's published ed25519 verify key, as the keyring knows it.

    ``valid_until_ts`` is the (capped) validity of a current key, None when
    unknown. ``expired_ts`` is set for keys published in ``old_verify_keys``,
    which may verify events sent before that time and nothing else.
    """

    server_name: str
    key_id: str
    verify_key: VerifyKey = attrs.field(repr=False)
    valid_until_ts: int | None
    expired_ts: int | None = None


def cap_valid_until_ts(valid_until_ts: int, now_ms: int) -> int:
    """The lesser of ``valid_until_ts`` and seven days from ``now_ms``.

    rooms/fragments/v5-signing-requirements.md: so that a key published with a
    far-future validity can still be revoked; the keyring applies this when
    storing keys.
    """
    return min(valid_until_ts, now_ms + SEVEN_DAYS_MS)


def _signing_bytes(obj: Mapping[str, Any], *, strict: bool) -> bytes:
    return encode_canonical_json(
        {key: value for key, value in obj.items() if key not in _NOT_SIGNED}, strict=strict
    )


def signing_bytes(obj: Mapping[str, Any], *, strict: bool = True) -> bytes:
    """The bytes a signature of ``obj`` covers: its canonical JSON without ``signatures`` and
    ``unsigned``; ``SignatureError`` when ``obj`` has none (as the verifiers raise it).

    For a caller checking several servers' signatures of one object: encoded once, passed
    to each check as ``data``.
    """
    try:
        return _signing_bytes(obj, strict=strict)
    except ValueError as exc:
        raise SignatureError(f"Signed object has no canonical JSON form: {exc}") from None


def _merge_signature(
    obj: Mapping[str, Any],
    server_name: str,
    key_id: str,
    signature: str,
    *,
    replace_ours: bool = False,
) -> dict[str, Any]:
    """A new ``obj`` whose ``signatures`` carries ours too; others' signatures kept.

    ``replace_ours`` drops whatever was already under our server name, so that
    nobody can make us co-sign an event carrying "our" signatures we never made.
    """
    existing = obj.get("signatures")
    signatures: dict[str, Any] = dict(existing) if isinstance(existing, dict) else {}
    ours = None if replace_ours else signatures.get(server_name)
    ours = dict(ours) if isinstance(ours, dict) else {}
    ours[key_id] = signature
    signatures[server_name] = ours
    return {**obj, "signatures": signatures}


def sign_json(obj: Mapping[str, Any], server_name: str, signing_key: SigningKey) -> dict[str, Any]:
    """Return a new ``obj`` signed by ``server_name`` (appendices, "Signing Details").

    The signature covers the canonical JSON of ``obj`` without ``signatures``
    and ``unsigned``; ``unsigned`` is carried over untouched. Our output is
    always strict canonical JSON, so floats or unsafe integers raise
    ``CanonicalJSONError``.
    """
    key_id, signature = sign_with_key_id(signing_key, _signing_bytes(obj, strict=True))
    return _merge_signature(obj, server_name, key_id, signature)


def _signature_problem(verify_key: VerifyKey, data: bytes, signature: object) -> str | None:
    """Why ``signature`` is not a valid signature of ``data``, or None when it is."""
    if not isinstance(signature, str):
        return "is not a string"
    raw = decode_signature(signature)
    if raw is None:
        if is_base64(signature):
            return "is not valid base64 of an ed25519 signature"
        return "is not valid base64"
    try:
        verify_key.verify(data, raw)
    except BadSignatureError:
        return "is invalid"
    return None


def _signatures_of(obj: Mapping[str, Any], server_name: str) -> dict[str, Any]:
    signatures = obj.get("signatures")
    if not isinstance(signatures, dict):
        raise SignatureError(f"Missing signature for {server_name} (no signatures)")
    ours = signatures.get(server_name)
    if not isinstance(ours, dict) or not ours:
        raise SignatureError(f"Missing signature for {server_name}")
    return ours


def verify_json(
    obj: Mapping[str, Any], server_name: str, key: ServerVerifyKey, *, strict: bool = True
) -> None:
    """Check ``obj`` carries a valid signature by ``server_name`` with ``key``.

    Follows appendices, "Checking for a Signature". Raises ``SignatureError``
    when the signature is missing, not base64, or invalid, and when ``obj``
    has no canonical form (``strict=False`` admits floats, for data from old
    room versions). Raises ``ValueError`` if ``key`` belongs to another server.
    """
    if not isinstance(key, ServerVerifyKey):
        raise TypeError(
            f"verify_json takes a ServerVerifyKey (its key_id names the signature to check), "
            f"not a {type(key).__name__}"
        )
    if key.server_name != server_name:
        raise ValueError(f"key {key.key_id} belongs to {key.server_name}, not {server_name}")
    signature = _signatures_of(obj, server_name).get(key.key_id)
    if signature is None:
        raise SignatureError(f"Missing signature for {server_name} ({key.key_id})")
    _check_signature(obj, key, signature, strict)


def _check_signature(
    obj: Mapping[str, Any],
    key: ServerVerifyKey,
    signature: Any,
    strict: bool,
    data: bytes | None = None,
) -> None:
    """Raise ``SignatureError`` unless ``signature`` is ``key``'s over ``obj``'s signing bytes
    (``data`` when the caller has them already)."""
    if data is None:
        data = signing_bytes(obj, strict=strict)
    problem = _signature_problem(key.verify_key, data, signature)
    if problem is not None:
        raise SignatureError(f"Signature by {key.server_name} ({key.key_id}) {problem}")


def verify_json_with_one_of(
    obj: Mapping[str, Any],
    server_name: str,
    keys: Mapping[str, ServerVerifyKey],
    *,
    strict: bool = True,
    data: bytes | None = None,
) -> ServerVerifyKey:
    """Check ``obj`` carries a valid signature by ``server_name`` with one of ``keys`` (by key
    ID); return the key that made it.

    The first signature in ``obj``'s order by one of ``keys`` decides: it must hold, and later
    ones are not checked, as Synapse checks a key document's self-signature
    (``process_v2_response``). So ``obj`` is encoded and checked once, however many keys it
    lists or signatures it carries (a hostile key document may carry thousands); not at all
    when ``data`` gives its :func:`signing_bytes` (a document signed by two servers). Raises
    ``SignatureError`` when none of ``keys`` signed ``obj``, or as :func:`verify_json` does.
    """
    for key_id, signature in _signatures_of(obj, server_name).items():
        key = keys.get(key_id)
        if key is None:
            continue
        if not isinstance(key, ServerVerifyKey):
            raise wrong_key("ServerVerifyKey", key)
        if key.server_name != server_name or key.key_id != key_id:
            raise ValueError(
                f"key {key.key_id} of {key.server_name} given as {key_id} of {server_name}"
            )
        _check_signature(obj, key, signature, strict, data)
        return key
    raise SignatureError(
        f"Missing signature for {server_name} by any of the {len(keys)} keys given"
    )


def hash_and_sign_event(
    room_version: RoomVersion | str,
    event: Mapping[str, Any],
    server_name: str,
    signing_key: SigningKey,
) -> dict[str, Any]:
    """Add the content hash, then sign the redacted event: the sender's side.

    server-server-api, "Adding hashes and signatures to outgoing events";
    appendices, "Signing Events". Returns a new event; canonical JSON is strict
    as this is our own output.
    """
    if type(room_version) is not RoomVersion:  # a call only for an identifier
        room_version = room_version_of(room_version)
    hashed = add_content_hash(room_version, event)
    prepared = prepare_event(room_version, hashed, strict=True)
    key_id, signature = sign_with_key_id(signing_key, prepared.signing_bytes)
    return _merge_signature(hashed, server_name, key_id, signature)


def sign_event(
    room_version: RoomVersion | str,
    event: Mapping[str, Any],
    server_name: str,
    signing_key: SigningKey,
    *,
    prepared: PreparedEvent | None = None,
) -> dict[str, Any]:
    """Add our signature to someone else's event, changing nothing else.

    This is the co-signing an invited server does. Pass the ``prepared`` form
    of this very event to reuse its signing bytes; it must have been prepared
    from ``event`` (an equal dict will do) under the same room version.
    """
    if type(room_version) is not RoomVersion:  # a call only for an identifier
        room_version = room_version_of(room_version)
    prepared = ensure_prepared(room_version, event, prepared)
    key_id, signature = sign_with_key_id(signing_key, prepared.signing_bytes)
    # Any signature already under our name came from someone else (the sender
    # of an event we co-sign): only the one we just made is ours.
    return _merge_signature(event, server_name, key_id, signature, replace_ours=True)


def _server_of(identifier: object, what: str) -> str:
    """The server name part of a ``@user:server`` or ``$opaque:server`` identifier."""
    if not isinstance(identifier, str):
        raise ValueError(f"event {what} is not a string")
    _, colon, server = identifier.partition(":")
    if not colon or not server:
        raise ValueError(f"event {what} has no server name")
    return server


def required_event_signers(room_version: RoomVersion | str, event: Mapping[str, Any]) -> set[str]:
    """The servers whose signatures an event must carry.

    server-server-api, "Validating hashes and signatures on received events":
    the sender's server; in v1/v2 also the server named in the event ID. We
    do not apply the spec's exemption for invites made from a third-party
    invite, so the sender's server is always required. Raises ``ValueError``
    when ``sender`` (or a v1/v2 ``event_id``) names no server.
    """
    if type(room_version) is not RoomVersion:  # a call only for an identifier
        room_version = room_version_of(room_version)
    signers = {_server_of(event.get("sender"), "sender")}
    if room_version.check_event_id_server_signature:
        signers.add(_server_of(event.get("event_id"), "event_id"))
    return signers


def key_valid_for_event(
    room_version: RoomVersion | str, key: ServerVerifyKey, origin_server_ts: int
) -> bool:
    """Whether ``key`` may verify an event sent at ``origin_server_ts``.

    From v5 (rooms/fragments/v5-signing-requirements.md) a current key must be
    valid until at least ``origin_server_ts`` (an unknown validity is not
    enough), and an old key only verifies events sent no later than its
    ``expired_ts`` (server-server-api: keys "known to have expired prior to
    the event's origin_server_ts are ignored"; Synapse keeps an old key as
    valid until its ``expired_ts``, bound included). Before v5 any known key
    will do, as in Synapse, whose key validity is not enforced there. ``TypeError``
    unless ``key`` is a ``ServerVerifyKey`` (every key the verifiers use is checked so).
    """
    if not isinstance(key, ServerVerifyKey):
        raise wrong_key("ServerVerifyKey", key)
    if type(room_version) is not RoomVersion:  # a call only for an identifier
        room_version = room_version_of(room_version)
    if not room_version.enforce_key_validity:
        return True
    if key.expired_ts is not None:
        return origin_server_ts <= key.expired_ts
    return key.valid_until_ts is not None and key.valid_until_ts >= origin_server_ts


def verify_event_signature(
    room_version: RoomVersion | str,
    event: Mapping[str, Any],
    server_name: str,
    keys: Mapping[tuple[str, str], ServerVerifyKey],
    *,
    prepared: PreparedEvent | None = None,
) -> None:
    """Check ``event`` is validly signed by ``server_name`` with a key from ``keys``.

    Signatures by keys we do not know, or that are not valid for the event's
    ``origin_server_ts`` (:func:`key_valid_for_event`), are skipped; every
    remaining one must verify, and there must be at least one (appendices,
    "Checking for a Signature"; server-server-api, "Validating hashes and
    signatures on received events"). Raises ``SignatureError`` naming the
    server and the reason; ``TypeError`` when ``keys`` is no mapping, or gives
    anything but a ``ServerVerifyKey`` for a signature to check.
    """
    if type(room_version) is not RoomVersion:  # a call only for an identifier
        room_version = room_version_of(room_version)
    if type(keys) is not dict:
        _check_keys(keys)
    prepared = _verification_form(room_version, event, prepared)
    _verify_prepared(prepared, server_name, keys)


def verify_event_signatures(
    room_version: RoomVersion | str,
    event: Mapping[str, Any],
    keys: Mapping[tuple[str, str], ServerVerifyKey],
    *,
    prepared: PreparedEvent | None = None,
) -> None:
    """Check ``event`` carries a valid signature from every required signer.

    See :func:`required_event_signers` and :func:`verify_event_signature`.
    Raises ``SignatureError`` for the first signer that fails, and also when
    the event names no server to check.
    """
    if type(room_version) is not RoomVersion:  # a call only for an identifier
        room_version = room_version_of(room_version)
    if type(keys) is not dict:
        _check_keys(keys)
    try:
        signers = required_event_signers(room_version, event)
    except ValueError as exc:
        raise SignatureError(f"Cannot tell who must sign the event: {exc}") from None
    prepared = _verification_form(room_version, event, prepared)
    for server_name in sorted(signers):
        _verify_prepared(prepared, server_name, keys)


def _check_keys(keys: object) -> None:
    if type(keys) is not dict and not isinstance(keys, Mapping):
        raise TypeError(
            "keys must map (server_name, key_id) to a ServerVerifyKey, "
            f"not be a {type(keys).__name__}"
        )


def _verification_form(
    room_version: RoomVersion, event: Mapping[str, Any], prepared: PreparedEvent | None
) -> PreparedEvent:
    try:
        return ensure_prepared(room_version, event, prepared)
    except ValueError as exc:
        if prepared is not None:
            raise
        raise SignatureError(f"Event cannot be checked: {exc}") from None


def _verify_prepared(
    prepared: PreparedEvent,
    server_name: str,
    keys: Mapping[tuple[str, str], ServerVerifyKey],
) -> None:
    # The signatures are read from the redacted form, which is what they cover
    # ("this step should succeed whether we have been sent the full event or a
    # redacted copy").
    signatures = _signatures_of(prepared.redacted, server_name)
    room_version = prepared.room_version
    raw_ts = prepared.event.get("origin_server_ts")
    if type(raw_ts) is int:  # not bool, which is an int subclass
        origin_server_ts: int = raw_ts
    elif room_version.enforce_key_validity:
        raise SignatureError("Event has no integer origin_server_ts to check key validity")
    else:
        origin_server_ts = 0  # before v5 key validity does not depend on the time
    verified = False
    for key_id, signature in signatures.items():
        key = keys.get((server_name, key_id))
        if key is None:
            continue  # unknown key (or unknown algorithm): skipped
        if not key_valid_for_event(room_version, key, origin_server_ts):
            continue
        problem = _signature_problem(key.verify_key, prepared.signing_bytes, signature)
        if problem is not None:
            raise SignatureError(f"Signature by {server_name} ({key_id}) {problem}")
        verified = True
    if not verified:
        raise SignatureError(f"No signature by {server_name} with a known key valid for this event")
