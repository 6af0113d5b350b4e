"""The inviting server's side of "Inviting to a room" (server-server-api): send, check, hand back.

``InviteSender.send_invite`` signs the invite event (through the same
deferred-based ``ISigner`` as the inbound side) when it is not signed yet,
checks it is a sendable invite, ``PUT``s it to the invitee's server on the v2
endpoint (v1 for rooms of version 1 or 2 whose peer does not know v2), and
checks the answer before handing anything back:

- the answer has the endpoint's shape (v2 ``{"event": ...}``, v1
  ``[200, {"event": ...}]``, nothing else);
- its event equals the one sent in every field except ``signatures`` and
  ``unsigned``, which no hash or signature covers and which peers do touch
  (Synapse adds ``"unsigned": {}`` and, on v1, echoes the room state there);
- the event ID computed from it is the one sent;
- our signature is still there and valid;
- the invitee's server signed it with a key the keyring finds valid at the
  event's ``origin_server_ts`` (room version rules).

The event handed back is the one sent plus the invitee server's verified
signature(s): nothing else is taken from the answer. Every failure is an
``InviteError``, one subclass per kind, so that an embedder can tell the user
why (``InviteRefused`` carries the peer's status, errcode and message).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from unpaddedbase64 import encode_base64

from .client.errors import RemoteError, TransportError
from .core.canonical import CanonicalJSONError, encode_canonical_json
from .core.errors import Codes, MatrixError
from .core.events import (
    PreparedEvent,
    check_content_hash,
    prepare_event,
    room_id_for_create_event,
)
from .core.format import (
    MAX_ROOM_STATE_NESTING,
    check_event_format,
    check_pdu_size,
    federation_form_problem,
    pdu_nesting_exceeded,
)
from .core.ids import is_valid_room_id, is_valid_server_name, is_valid_user_id, server_name_of
from .core.roomversions import EventFormat, RedactionRules, RoomVersion, room_version_of
from .core.signing import (
    ServerVerifyKey,
    SignatureError,
    key_valid_for_event,
    verify_event_signature,
)
from .keyring import KeyringClosed
from .logs import Logger
from .signer import ISigner, check_signer

__all__ = [
    "IInviteClient",
    "IInviteKeyring",
    "InvalidInviteAnswer",
    "InviteError",
    "InviteNotSendable",
    "InviteRefused",
    "InviteSender",
    "InviteTransportError",
    "build_test_invite",
]

log = Logger(namespace="federation_invite.outbound")

_T = TypeVar("_T")

#: invites-v2.yaml: "Senders which receive a 400 or 404 response to this
#: endpoint should retry using the v1 API as the server may be older, if the
#: room version is "1" or "2"." (v1 receivers assume room version 1 or 2.)
_V1_ROOM_VERSIONS = frozenset({"1", "2"})
#: What no hash or signature covers, and peers may change in their answer.
_NOT_COVERED = frozenset({"signatures", "unsigned"})
#: Longest piece of peer-chosen text we repeat in an error message.
_MAX_SHOWN = 64


# -- errors


class InviteError(Exception):
    """Why ``send_invite`` failed; the invite event must then not be used."""


class InviteNotSendable(InviteError, ValueError):
    """The caller's invite cannot be sent as given; nothing was sent.

    ``reason`` says what is wrong (not an invite, a sender not ours, a v12 room
    without its create event in ``invite_room_state``, a bad hash...).
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

    def __str__(self) -> str:
        return f"invite not sent: {self.reason}"


class InviteRefused(InviteError, RemoteError):
    """The destination answered with an error: it said no, or could not say yes.

    The fields of ``RemoteError`` (``destination``, ``status``, ``errcode``
    (None when the body was not a Matrix error), ``message``, ``body``), plus
    ``retry_after_ms`` (from a ``429 M_LIMIT_EXCEEDED`` body, else None) and
    ``api_version``, the endpoint (1 or 2) that gave this answer. Typical:
    403 ``M_FORBIDDEN``, 403 ``M_INVITE_BLOCKED``, 400
    ``M_INCOMPATIBLE_ROOM_VERSION`` (``body["room_version"]``), 429.
    """

    def __init__(
        self,
        destination: str,
        status: int,
        errcode: str | None,
        message: str,
        body: Any = None,
        *,
        retry_after_ms: int | None = None,
        api_version: int = 2,
    ) -> None:
        RemoteError.__init__(self, destination, status, errcode, message, body)
        self.retry_after_ms = retry_after_ms
        self.api_version = api_version

    @classmethod
    def from_remote_error(cls, error: RemoteError, api_version: int) -> InviteRefused:
        """The refusal a client ``RemoteError`` describes."""
        retry_after_ms = None
        if isinstance(error.body, dict):
            value = error.body.get("retry_after_ms")
            if type(value) is int and value >= 0:
                retry_after_ms = value
        return cls(
            error.destination,
            error.status,
            error.errcode,
            error.message,
            error.body,
            retry_after_ms=retry_after_ms,
            api_version=api_version,
        )

    def __repr__(self) -> str:
        return (
            f"InviteRefused(destination={self.destination!r}, status={self.status!r}, "
            f"errcode={self.errcode!r}, message={self.message!r}, "
            f"retry_after_ms={self.retry_after_ms!r}, api_version={self.api_version!r})"
        )


class InviteTransportError(InviteError, TransportError):
    """No answer came back (DNS, TLS, connection refused, timeout): not a refusal.

    ``destination``, ``reason`` and the flags (``not_sent``: never sent, for a cause of
    ours, so the peer never saw it; ``waited``, ``resolver_busy``, ``abandoned``) as in
    ``TransportError``, kept from the client's error, which is the ``__cause__``.
    """


class InvalidInviteAnswer(InviteError):
    """The destination answered 200, but the answer fails our checks: it must not be used.

    ``reason`` says which check failed; ``answer`` is what came back (parsed
    JSON, or bytes when it was not JSON), for debugging only.
    """

    def __init__(self, destination: str, reason: str, answer: Any = None) -> None:
        self.destination = destination
        self.reason = reason
        self.answer = answer
        super().__init__(destination, reason)

    def __str__(self) -> str:
        return f"invalid answer from {self.destination}: {self.reason}"

    def __repr__(self) -> str:
        return f"InvalidInviteAnswer(destination={self.destination!r}, reason={self.reason!r})"


# -- collaborators


class IInviteClient(Protocol):
    """The part of the federation client the sender uses (``FederationClient`` has it)."""

    def put_json(
        self,
        destination: str,
        path: str,
        body: Any,
        *,
        via: str | None = None,
        ignore_backoff: bool = False,
    ) -> Deferred[Any]: ...


class IInviteKeyring(Protocol):
    """The part of the keyring the sender uses (``Keyring`` has it)."""

    def get_server_keys(
        self,
        server_name: str,
        key_ids: Sequence[str],
        valid_at_ms: int,
        *,
        fetch_if_store_fails: bool = False,
        ignore_backoff: bool = False,
    ) -> Deferred[dict[str, ServerVerifyKey]]: ...


def _stand_in(deferred: Deferred[_T], cancelled: list[bool]) -> Deferred[_T]:
    """A Deferred with ``deferred``'s result, to await in its place: cancelling it (our
    caller cancelling, through the awaiting coroutine) appends True to ``cancelled`` and
    cancels ``deferred``, so that its CancelledError can be told from one of its own."""

    def cancel(_: Deferred[_T]) -> None:
        cancelled.append(True)
        deferred.cancel()

    stand_in: Deferred[_T] = Deferred(cancel)

    def relay(result: Any) -> None:
        if stand_in.called:
            return  # cancelled meanwhile (``deferred`` answered later): dropped
        if isinstance(result, Failure):
            stand_in.errback(result)
        else:
            stand_in.callback(result)

    deferred.addBoth(relay)
    return stand_in


def _shown(value: object) -> str:
    """Peer- or caller-chosen text, quoted and cut short, fit for an error message."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:_MAX_SHOWN])


def _same_json(a: object, b: object) -> bool:
    """Equality of JSON values that, unlike ``==``, tells ``1``, ``1.0`` and ``true`` apart."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _invite_path(api_version: int, room_id: str, event_id: str) -> str:
    # Path parameters are percent-encoded whole: a v3 event ID may hold "/" and "+".
    return (
        f"/_matrix/federation/v{api_version}/invite/"
        f"{quote(room_id, safe='')}/{quote(event_id, safe='')}"
    )


def _peer_does_not_know_v2(error: RemoteError) -> bool:
    """Whether a v2 error means "no such endpoint" rather than a refusal of the invite.

    404/405 with no Matrix error body (a plain web server's page) or with
    ``M_UNRECOGNIZED``, and 400 ``M_UNRECOGNIZED``, which old servers give for
    unknown endpoints. Any other errcode is the peer's answer to the invite.
    """
    if error.status in (404, 405):
        return error.errcode is None or error.errcode == Codes.UNRECOGNIZED
    return error.status == 400 and error.errcode == Codes.UNRECOGNIZED


class InviteSender:
    """Sends invites to other servers and checks their co-signed answers (see the module doc).

    ``signer`` adds our signature (its ``server_name`` is ours), ``client``
    sends signed requests (``FederationClient``), ``keyring`` finds verify
    keys: the invitee server's, and ours (give the keyring our key as a local
    key, as ``service.build_components`` does).
    """

    def __init__(self, signer: ISigner, client: IInviteClient, keyring: IInviteKeyring) -> None:
        check_signer(signer)
        self._signer = signer
        self._client = client
        self._keyring = keyring
        self.server_name: str = signer.server_name

    def send_invite(
        self,
        room_version: RoomVersion | str,
        event: Mapping[str, Any],
        invite_room_state: Sequence[Mapping[str, Any]] = (),
        *,
        destination: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Send ``event`` and fire with it signed by both servers; fail with an ``InviteError``.

        The invite goes to the invitee's server (the ``state_key``'s), which
        must co-sign it. ``destination``, a server name, is where to connect
        instead of resolving that server's name (its discovery and TLS): the
        request is still addressed and signed to the invitee's server (the
        X-Matrix ``destination`` is the receiving server's name, server-server
        API "Request Authentication"), so only that server, reached another
        way, can accept it.
        ``invite_room_state`` is sent as given; room version 12 requires the
        room's full ``m.room.create`` event in it. An event without ``hashes``
        is hashed and signed by the signer, one without our signature signed;
        a signer that fails gives ``InviteNotSendable`` (its error the cause).
        What receivers refuse as malformed is refused here, before anything is
        signed or sent: a room v3+ event that carries an ``event_id``, a room v12
        one whose ``auth_events`` list the room's create event, one whose ``hashes``
        hold a value that is no string, one nested deeper than 127 levels (not
        counting the ``unsigned`` keys Synapse strips), or room state with an
        entry nested deeper than 124 (the same rules as our receiving side's:
        ``federation_form_problem``, ``format.pdu_nesting_exceeded``).
        ``event`` is never modified. Cancelling the Deferred abandons the request.
        """
        return Deferred.fromCoroutine(
            self._send(room_version, event, invite_room_state, destination)
        )

    # -- before sending

    async def _send(
        self,
        room_version_or_id: RoomVersion | str,
        event: Mapping[str, Any],
        invite_room_state: Sequence[Mapping[str, Any]],
        destination: str | None,
    ) -> dict[str, Any]:
        room_version = _room_version(room_version_or_id)
        room_state = _room_state(invite_room_state)
        invitee = self._check_invite(event)
        via = destination
        destination = server_name_of(invitee)
        if via is not None and not is_valid_server_name(via):
            raise InviteNotSendable(f"destination {_shown(via)} is not a server name")
        if via == destination:
            via = None
        if room_version.room_id_is_create_event_hash:
            _check_create_event(room_version, event, room_state)
        _check_before_signing(room_version, event, room_state)
        signed, prepared = _check_signed(
            room_version, await self._sign(room_version, event), room_state
        )
        if (
            room_version.event_id_in_event
            and server_name_of(signed["event_id"]) != self.server_name
        ):
            # v1/v2: the event ID's server must sign too (server-server-api,
            # "Validating hashes and signatures on received events"); that is us.
            raise InviteNotSendable(f"the event_id must name our server {self.server_name}")
        try:
            await self._verify(room_version, signed, prepared, self.server_name)
        except SignatureError as exc:
            raise InviteNotSendable(f"our signature on the event does not verify: {exc}") from None
        event_id = prepared.event_id
        room_id: str = signed["room_id"]
        log.info(
            "Sending invite {event_id} in {room_id} for {invitee} to {destination}{routed}",
            event_id=event_id,
            room_id=room_id,
            invitee=invitee,
            destination=destination,
            via=via,
            routed="" if via is None else f" via {via}",
        )
        try:
            received, answer, api_version = await self._exchange(
                room_version, destination, via, room_id, event_id, signed, room_state
            )
            result = await self._check_answer(
                room_version,
                destination,
                server_name_of(invitee),
                signed,
                event_id,
                received,
                answer,
            )
        except InviteError as exc:
            log.info(
                "Invite {event_id} to {destination} failed: {error}",
                event_id=event_id,
                destination=destination,
                error=str(exc),
                outcome="failed",
            )
            raise
        log.info(
            "Invite {event_id} co-signed by {destination} (v{api_version} API)",
            event_id=event_id,
            destination=destination,
            api_version=api_version,
            outcome="sent",
        )
        return result

    def _check_invite(self, event: object) -> str:
        """An invite membership event by one of our users for a user ID; the invitee."""
        if not isinstance(event, Mapping):
            raise InviteNotSendable("the event is not a JSON object")
        if event.get("type") != "m.room.member":
            raise InviteNotSendable("the event is not an m.room.member event")
        content = event.get("content")
        if not isinstance(content, Mapping) or content.get("membership") != "invite":
            raise InviteNotSendable("the event's membership is not 'invite'")
        invitee = event.get("state_key")
        if not is_valid_user_id(invitee):
            raise InviteNotSendable(f"the state_key {_shown(invitee)} is not a user ID")
        assert isinstance(invitee, str)
        if server_name_of(invitee) == self.server_name:
            # The "invitee server's signature" would be our own, which we sent:
            # nothing could be verified. Local invites need no federation.
            raise InviteNotSendable(f"the invitee {_shown(invitee)} is one of our own users")
        sender = event.get("sender")
        if not is_valid_user_id(sender) or server_name_of(sender) != self.server_name:
            raise InviteNotSendable(
                f"the sender {_shown(sender)} is not a user of our server {self.server_name}"
            )
        return invitee

    async def _sign(self, room_version: RoomVersion, event: Mapping[str, Any]) -> dict[str, Any]:
        """The event with our hashes and signature, signing only what is missing."""
        signatures = event.get("signatures")
        ours = signatures.get(self.server_name) if isinstance(signatures, Mapping) else None
        if "hashes" not in event and ours:
            # The signature covers the hashes: one made without them is stale.
            raise InviteNotSendable("the event carries our signature but no hashes")
        caller_cancelled: list[bool] = []
        try:
            if "hashes" not in event:
                signing = self._signer.hash_and_sign_event(room_version, dict(event))
            elif not ours:
                signing = self._signer.sign_event(room_version, dict(event))
            else:
                return dict(event)
            if isinstance(signing, Deferred):
                signing = _stand_in(signing, caller_cancelled)
            return await signing
        except InviteError:
            raise
        except ValueError as exc:  # the event has no canonical form, say
            raise InviteNotSendable(f"the event cannot be signed: {exc}") from exc
        except Exception as exc:
            if isinstance(exc, CancelledError) and caller_cancelled:
                raise  # the caller cancelled send_invite
            # A remote signer or HSM that failed (its own Deferred cancelled, say):
            # nothing can be sent either.
            raise InviteNotSendable(
                f"the event cannot be signed: the signer failed ({type(exc).__name__}: {exc})"
            ) from exc

    # -- the exchange

    async def _exchange(
        self,
        room_version: RoomVersion,
        destination: str,
        via: str | None,
        room_id: str,
        event_id: str,
        event: dict[str, Any],
        room_state: list[dict[str, Any]],
    ) -> tuple[dict[str, Any], Any, int]:
        """PUT the invite on v2, then v1 where allowed: the answer's event, the answer, the API."""
        body = {
            "room_version": room_version.identifier,
            "event": event,
            "invite_room_state": room_state,
        }
        try:
            answer = await self._put(destination, via, _invite_path(2, room_id, event_id), body, 2)
        except InviteRefused as exc:
            if room_version.identifier not in _V1_ROOM_VERSIONS or not _peer_does_not_know_v2(exc):
                raise
            log.info(
                "{destination} does not know the v2 invite API ({status}); trying v1",
                destination=destination,
                status=exc.status,
            )
        else:
            return _unwrap_v2(destination, answer), answer, 2
        # invites-v1.yaml: the body is the event itself, the room state in its unsigned.
        unsigned = event.get("unsigned")
        v1_body = {
            **event,
            "unsigned": {
                **(unsigned if isinstance(unsigned, dict) else {}),
                "invite_room_state": room_state,
            },
        }
        answer = await self._put(destination, via, _invite_path(1, room_id, event_id), v1_body, 1)
        return _unwrap_v1(destination, answer), answer, 1

    async def _put(
        self, destination: str, via: str | None, path: str, body: Any, api_version: int
    ) -> Any:
        """One PUT; the client's errors translated into ``InviteError``s."""
        try:
            # A user asked for this invite: it is sent even while the client backs
            # the server off (after a failed key fetch from it, say), and its outcome
            # still counts there, as Synapse sends invites (ignore_backoff=True).
            return await self._client.put_json(
                destination, path, body, via=via, ignore_backoff=True
            )
        except RemoteError as exc:
            if 200 <= exc.status < 300:
                # A success status with an unreadable body (not JSON, too big).
                raise InvalidInviteAnswer(destination, exc.message, exc.body) from exc
            raise InviteRefused.from_remote_error(exc, api_version) from exc
        except TransportError as exc:
            raise InviteTransportError(
                exc.destination,
                exc.reason,
                resolver_busy=exc.resolver_busy,
                abandoned=exc.abandoned,
                not_sent=exc.not_sent,
                waited=exc.waited,
            ) from exc

    # -- checking the answer

    async def _check_answer(
        self,
        room_version: RoomVersion,
        destination: str,
        invitee_server: str,
        sent: dict[str, Any],
        event_id: str,
        received: dict[str, Any],
        answer: Any,
    ) -> dict[str, Any]:
        """The sent event plus the invitee server's verified signatures, or InvalidInviteAnswer."""

        def invalid(reason: str) -> InvalidInviteAnswer:
            return InvalidInviteAnswer(destination, reason, answer)

        differences = _differences(sent, received)
        if differences:
            raise invalid("the event in the answer is not the one sent: " + "; ".join(differences))
        prepared = prepare_event(room_version, received)
        if prepared.event_id != event_id:
            # Unreachable while the fields above compare equal; kept as the
            # check the spec's event IDs rest on, should the comparison change.
            raise invalid(f"the answer's event ID {prepared.event_id} is not {event_id}")
        signatures = received.get("signatures")
        if not isinstance(signatures, dict):
            raise invalid("the answer's event has no signatures object")
        ours = signatures.get(self.server_name)
        sent_ours = sent["signatures"][self.server_name]
        if not isinstance(ours, dict) or not any(key_id in ours for key_id in sent_ours):
            raise invalid(f"our signature ({', '.join(sorted(sent_ours))}) was removed")
        try:
            await self._verify(room_version, received, prepared, self.server_name)
        except SignatureError as exc:
            raise invalid(f"our signature in the answer does not verify: {exc}") from None
        theirs = signatures.get(invitee_server)
        if not isinstance(theirs, dict) or not theirs:
            raise invalid(f"the answer carries no signature by {invitee_server}")
        verified = await self._verified_signatures(room_version, received, prepared, invitee_server)
        if isinstance(verified, str):
            raise invalid(verified)
        merged = {server: dict(keys) for server, keys in sent["signatures"].items()}
        merged.setdefault(invitee_server, {}).update(verified)
        return {**sent, "signatures": merged}

    async def _keys(
        self, room_version: RoomVersion, event: Mapping[str, Any], server_name: str
    ) -> dict[tuple[str, str], ServerVerifyKey]:
        """The keyring's keys for the ed25519 key IDs ``server_name`` signed ``event`` with."""
        signatures = event["signatures"].get(server_name)
        key_ids = sorted(
            key_id
            for key_id in (signatures if isinstance(signatures, dict) else {})
            if isinstance(key_id, str) and key_id.startswith("ed25519:")
        )
        if not key_ids:
            return {}
        # rooms/fragments/v5-signing-requirements.md: from v5 a key must be
        # valid at the event's origin_server_ts; before, any known key will do.
        valid_at = event["origin_server_ts"] if room_version.enforce_key_validity else 0
        # A key store that cannot be read must not fail the invite with a
        # StoreError (every failure is an InviteError): fetch the keys instead.
        # The server has just answered us (or is us): it is up, so its keys are
        # fetched even while the keyring backs it off after an earlier failure,
        # as Synapse fetches keys (ignore_backoff=True).
        try:
            found = await self._keyring.get_server_keys(
                server_name, key_ids, valid_at, fetch_if_store_fails=True, ignore_backoff=True
            )
        except KeyringClosed:
            # The service is stopping: not the server's fault, and worth a retry later.
            raise InviteTransportError(
                server_name, "its answer cannot be checked: the keyring is closed"
            ) from None
        return {(server_name, key_id): key for key_id, key in found.items()}

    async def _verify(
        self,
        room_version: RoomVersion,
        event: Mapping[str, Any],
        prepared: PreparedEvent,
        server_name: str,
    ) -> None:
        """``server_name``'s signature on ``event`` verifies (raises ``SignatureError``)."""
        keys = await self._keys(room_version, event, server_name)
        verify_event_signature(room_version, event, server_name, keys, prepared=prepared)

    async def _verified_signatures(
        self,
        room_version: RoomVersion,
        event: dict[str, Any],
        prepared: PreparedEvent,
        server_name: str,
    ) -> dict[str, str] | str:
        """``server_name``'s signatures that verify with a key valid for the event; else why not.

        Signatures by keys the keyring cannot find, or not valid at the
        event's time, are left out (and so dropped from what we hand back);
        one by a usable key that does not verify fails the whole answer.
        """
        keys = await self._keys(room_version, event, server_name)
        if not keys:
            key_ids = ", ".join(_shown(k) for k in sorted(event["signatures"][server_name])[:4])
            return f"no verify key of {server_name} could be found for its signature ({key_ids})"
        origin_server_ts: int = event["origin_server_ts"]
        verified: dict[str, str] = {}
        for (_, key_id), key in sorted(keys.items()):
            if not key_valid_for_event(room_version, key, origin_server_ts):
                continue
            try:
                verify_event_signature(
                    room_version,
                    event,
                    server_name,
                    {(server_name, key_id): key},
                    prepared=prepared,
                )
            except SignatureError as exc:
                return f"the signature of {server_name} does not verify: {exc}"
            verified[key_id] = event["signatures"][server_name][key_id]
        if not verified:
            return (
                f"no signature by {server_name} with a key valid at the event's origin_server_ts "
                f"(room version {room_version.identifier})"
            )
        return verified


# -- pure helpers


def _room_version(room_version: RoomVersion | str) -> RoomVersion:
    try:
        return room_version_of(room_version)
    except MatrixError:
        raise InviteNotSendable(f"unknown room version {_shown(room_version)}") from None


def _room_state(invite_room_state: object) -> list[dict[str, Any]]:
    if isinstance(invite_room_state, str | bytes | Mapping) or not isinstance(
        invite_room_state, Sequence
    ):
        raise InviteNotSendable("invite_room_state must be a list of events")
    if not all(isinstance(entry, Mapping) for entry in invite_room_state):
        raise InviteNotSendable("invite_room_state must hold only JSON objects")
    room_state = [dict(entry) for entry in invite_room_state]
    try:
        # Our client sends strict canonical JSON only (no floats, safe integers).
        encode_canonical_json(room_state, strict=True)
    except CanonicalJSONError as exc:
        raise InviteNotSendable(f"invite_room_state is not strict canonical JSON: {exc}") from None
    return room_state


def _check_create_event(
    room_version: RoomVersion, event: Mapping[str, Any], room_state: list[dict[str, Any]]
) -> None:
    """v12: ``invite_room_state`` must hold the room's create event as a full PDU.

    invites-v2.yaml "invite_room_state": "MUST contain the m.room.create
    event", and receivers SHOULD validate it for v12, whose room ID is that
    event's hash (rooms/v12.md). Stripped state has no hashes or signatures;
    a stripped ``m.room.create`` (any ``state_key``) beside the full one is
    refused too, as receivers refuse it (ours: ``_check_room_state``, 400
    ``M_INVALID_PARAM`` with the same reason).
    """
    creates = [
        entry
        for entry in room_state
        if entry.get("type") == "m.room.create" and entry.get("state_key") == ""
    ]
    full = [entry for entry in creates if "hashes" in entry and "signatures" in entry]
    if not full:
        raise InviteNotSendable(
            f"room version {room_version.identifier} requires the room's full m.room.create "
            "event (with hashes and signatures) in invite_room_state"
            + (" (only a stripped one was given)" if creates else "")
        )
    if any(
        entry.get("type") == "m.room.create" and not ("hashes" in entry and "signatures" in entry)
        for entry in room_state
    ):
        raise InviteNotSendable("invite_room_state holds a stripped m.room.create event")
    room_id = event.get("room_id")
    for create in full:
        try:
            create_room_id = room_id_for_create_event(room_version, create)
        except ValueError as exc:
            raise InviteNotSendable(f"the m.room.create event cannot be hashed: {exc}") from None
        if create_room_id != room_id:
            raise InviteNotSendable(
                f"the m.room.create event in invite_room_state is the one of room "
                f"{create_room_id}, not of {_shown(room_id)}"
            )


def _check_before_signing(
    room_version: RoomVersion, event: Mapping[str, Any], room_state: list[dict[str, Any]]
) -> None:
    """What receivers refuse as malformed (Synapse, and ``check_event_format`` on
    receipt: 400 ``M_BAD_JSON``) though the PDU schemas allow it, as
    ``federation_form_problem`` says; checked before the event is signed, since
    the signatures cover it (an ``event_id`` key survives redaction, so it cannot
    be stripped from a signed event: the event must be signed without it), as a
    room v12 event whose ``auth_events`` list the room's create event or one whose
    ``hashes`` hold a value that is no string, and one nested deeper than
    Synapse's PDU parser takes, or whose room state is (``_nesting_problem``).
    """
    problem = federation_form_problem(room_version, event)
    if problem is not None:
        raise InviteNotSendable(problem)
    problem = _nesting_problem(room_version, event, room_state)
    if problem is not None:
        raise InviteNotSendable(problem)


def _nesting_problem(
    room_version: RoomVersion, event: Mapping[str, Any], room_state: list[dict[str, Any]]
) -> str | None:
    """Why Synapse would refuse ``event`` sent with ``room_state`` as nested too deep
    (``pdu_nesting_exceeded``: it parses the room state inside the event's ``unsigned``,
    where our v1 fallback sends it too and its v2 ``/invite`` moves it, in place of the
    event's own; the ``unsigned`` keys it strips do not count), or None."""
    exceeded = pdu_nesting_exceeded(event, room_state)
    if not exceeded:
        return None
    if exceeded == MAX_ROOM_STATE_NESTING:
        return f"invite_room_state: an entry is nested deeper than {exceeded} levels"
    return (
        f"the event is not a valid room version {room_version.identifier} PDU: "
        f"Invalid PDU: nested deeper than {exceeded} levels"
    )


def _check_signed(
    room_version: RoomVersion, event: dict[str, Any], room_state: list[dict[str, Any]]
) -> tuple[dict[str, Any], PreparedEvent]:
    """Format, size and content hash of the event about to be sent; the event as it goes
    on the wire and its prepared form. Its nesting is checked with the room state sent
    beside it, as Synapse parses them (``_nesting_problem``).

    The event is decoded back from its canonical encoding, and that is what is sent,
    compared with the answer and handed back: a tuple the caller put in it (which
    canonical JSON encodes as an array) is then the list the peer echoes.
    """
    try:
        # Our client sends strict canonical JSON only (no floats, safe integers).
        encoded = encode_canonical_json(event, strict=True)
        sent: dict[str, Any] = json.loads(encoded)
        check_event_format(room_version, sent, nesting_checked=True)
        check_pdu_size(encoded)
    except MatrixError as exc:
        raise InviteNotSendable(
            f"the event is not a valid room version {room_version.identifier} PDU: {exc.message}"
        ) from None
    except ValueError as exc:
        raise InviteNotSendable(f"the event is not strict canonical JSON: {exc}") from None
    problem = _nesting_problem(room_version, sent, room_state)
    if problem is not None:
        raise InviteNotSendable(problem)
    if not check_content_hash(room_version, sent):
        raise InviteNotSendable("the event's content hash (hashes.sha256) is wrong")
    return sent, prepare_event(room_version, sent, strict=True)


def _differences(sent: Mapping[str, Any], received: Mapping[str, Any]) -> list[str]:
    """What the answer changed in the fields hashes and signatures cover (empty: nothing)."""
    sent_keys = set(sent) - _NOT_COVERED
    received_keys = {key for key in received if key not in _NOT_COVERED}
    changed = sorted(k for k in sent_keys & received_keys if not _same_json(sent[k], received[k]))
    problems = []
    for what, keys in (
        ("changed", changed),
        ("dropped", sorted(sent_keys - received_keys)),
        ("added", sorted(received_keys - sent_keys)),
    ):
        if keys:
            shown = ", ".join(_shown(key) for key in keys[:8])
            more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
            problems.append(f"{what} {shown}{more}")
    return problems


def _unwrap_v2(destination: str, answer: Any) -> dict[str, Any]:
    """invites-v2.yaml: the answer is ``{"event": <the event>}``."""
    if isinstance(answer, list):
        raise InvalidInviteAnswer(
            destination, "the v2 endpoint answered in the v1 shape [200, {...}]", answer
        )
    if not isinstance(answer, dict):
        raise InvalidInviteAnswer(destination, "the answer is not a JSON object", answer)
    return _event_of(destination, answer, answer)


def _unwrap_v1(destination: str, answer: Any) -> dict[str, Any]:
    """invites-v1.yaml: the answer is exactly ``[200, {"event": <the event>}]``."""
    if (
        not isinstance(answer, list)
        or len(answer) != 2
        or type(answer[0]) is not int
        or answer[0] != 200
        or not isinstance(answer[1], dict)
    ):
        raise InvalidInviteAnswer(destination, 'the v1 answer is not [200, {"event": ...}]', answer)
    return _event_of(destination, answer[1], answer)


def _event_of(destination: str, container: dict[str, Any], answer: Any) -> dict[str, Any]:
    if "event" not in container:
        raise InvalidInviteAnswer(destination, "the answer has no event", answer)
    event = container["event"]
    if not isinstance(event, dict):
        raise InvalidInviteAnswer(destination, "the answer's event is not an object", answer)
    return event


# -- a test invite, for the operator command and interop checks


def _reference(room_version: RoomVersion, prepared: PreparedEvent) -> Any:
    """How an event is listed in ``prev_events``/``auth_events`` in this room version."""
    if room_version.event_format is EventFormat.V1:
        return [prepared.event_id, {"sha256": encode_base64(prepared.reference_hash)}]
    return prepared.event_id


def build_test_invite(
    signer: ISigner,
    room_version: RoomVersion | str,
    sender: str,
    invitee: str,
    now_ms: int,
    *,
    room_id: str | None = None,
) -> Deferred[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """A minimal invite to a new room, and its ``invite_room_state``: for interop checks.

    Builds the room's ``m.room.create`` event (signed by ``signer``) and an
    unsigned invite whose ``prev_events`` (and, before v12, ``auth_events``)
    name it; the room state is ``[create event]``, as the spec asks. Before
    v12 ``room_id`` defaults to a new random room on our server; in v12 the
    room ID is the create event's hash and ``room_id`` must not be given.
    Fails with ``InviteNotSendable`` for an unknown version or bad IDs.
    """
    return Deferred.fromCoroutine(
        _build_test_invite(signer, room_version, sender, invitee, now_ms, room_id)
    )


async def _build_test_invite(
    signer: ISigner,
    room_version_or_id: RoomVersion | str,
    sender: str,
    invitee: str,
    now_ms: int,
    room_id: str | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    room_version = _room_version(room_version_or_id)
    server = signer.server_name
    if not is_valid_user_id(sender) or server_name_of(sender) != server:
        raise InviteNotSendable(f"the sender {_shown(sender)} is not a user of our server {server}")
    if not is_valid_user_id(invitee):
        raise InviteNotSendable(f"the invitee {_shown(invitee)} is not a user ID")
    v12 = room_version.room_id_is_create_event_hash
    if v12 and room_id is not None:
        raise InviteNotSendable(
            f"in room version {room_version.identifier} the room ID is the create event's "
            "hash: it cannot be chosen"
        )
    if room_id is None and not v12:
        room_id = f"!{secrets.token_hex(9)}:{server}"
    if room_id is not None and not is_valid_room_id(room_id, room_version):
        raise InviteNotSendable(f"{_shown(room_id)} is not a room ID")
    content: dict[str, Any] = {"room_version": room_version.identifier}
    if room_version.redaction_rules is not RedactionRules.V11:
        # rooms/v11.md: "creator" was removed from the create event in v11.
        content["creator"] = sender
    create: dict[str, Any] = {
        "type": "m.room.create",
        "state_key": "",
        "sender": sender,
        "content": content,
        "origin_server_ts": now_ms,
        "depth": 1,
        "prev_events": [],
        "auth_events": [],
    }
    invite: dict[str, Any] = {
        "type": "m.room.member",
        "state_key": invitee,
        "sender": sender,
        "content": {"membership": "invite"},
        "origin_server_ts": now_ms,
        "depth": 2,
    }
    if room_version.event_id_in_event:
        create["event_id"] = f"${secrets.token_hex(9)}:{server}"
        invite["event_id"] = f"${secrets.token_hex(9)}:{server}"
    if room_version.redaction_keeps_top_level_origin:
        create["origin"] = invite["origin"] = server
    if not v12:
        create["room_id"] = room_id
    create = await signer.hash_and_sign_event(room_version, create)
    prepared = prepare_event(room_version, create, strict=True)
    if v12:
        room_id = room_id_for_create_event(room_version, create, prepared=prepared)
    invite["room_id"] = room_id
    invite["prev_events"] = [_reference(room_version, prepared)]
    # rooms/v12.md: the create event is never listed in auth_events.
    invite["auth_events"] = [] if v12 else [_reference(room_version, prepared)]
    return invite, [create]
