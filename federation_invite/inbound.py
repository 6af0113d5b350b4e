"""The invited server's side of "Inviting to a room" (server-server-api): check, co-sign, store.

``InviteHandler.on_invite`` runs every check of the inbound issue's table,
cheapest first, then has the signer add our signature, stores the invite, tells
the listeners and returns the answer body. Every refusal is a ``MatrixError``
raised where the fact is known. The web resource (``web/invite.py``) has
already applied rows 1 to 3 (body size, JSON, duplicate keys).

The hot path encodes and hashes the event once for its redacted form (event
ID, signature checks and our signature share one ``PreparedEvent``) and once
for its content hash; the size check reuses the body's length when the room
version's strict canonical JSON guarantees the canonical form is no longer.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from .auth import RequestAuthenticator
from .core.canonical import (
    MAX_NESTING,
    CanonicalJSONError,
    EncodedDict,
    check_canonical_json,
    encode_canonical_json,
    nesting_depth,
)
from .core.errors import Codes, MatrixError
from .core.events import PreparedEvent, check_content_hash, prepare_event, room_id_for_create_event
from .core.format import (
    MAX_PDU_NESTING,
    MAX_PDU_SIZE,
    MAX_ROOM_STATE_NESTING,
    check_event_format,
    check_pdu_size,
    pdu_nesting_errcode,
    pdu_nesting_exceeded,
)
from .core.ids import is_valid_user_id, server_name_key, server_name_of
from .core.keys import is_valid_key_id
from .core.roomversions import RoomVersion, get_room_version
from .core.signing import (
    ServerVerifyKey,
    SignatureError,
    required_event_signers,
    verify_event_signature,
    verify_event_signatures,
)
from .keyring import Keyring
from .logs import Logger, escape_log_text, literal_format
from .metrics import InviteMetrics
from .policy import InboundInvite, InvitePolicy
from .ratelimit import ConcurrencyLimiter, RateLimiter
from .signer import ISigner
from .store import InviteRecord, StoreError

__all__ = ["InviteHandler", "InviteLimits", "InviteListener"]

log = Logger(namespace="federation_invite.inbound")

_T = TypeVar("_T")

#: Called with the stored record after the commit, for invites handed over
#: (status ``pending``). May return a Deferred; failures are logged only.
InviteListener = Callable[[InviteRecord], Any]


@attrs.frozen
class InviteLimits:
    """Rate limits (the ``ratelimit.*`` configuration keys).

    Slowing (``origin_sleep_ms``) is off here by default, so that programs and
    tests building an ``InviteHandler`` by hand see no delays they did not ask
    for; the daemon's configuration turns it on (500 ms after 25 requests).
    """

    origin_per_second: float = 10.0
    origin_burst: int = 50
    origin_concurrent: int = 8
    invitee_per_second: float = 0.05
    invitee_burst: int = 10
    #: Requests of one origin's burst served at once; the rest of the burst is
    #: delayed by ``origin_sleep_ms`` each (0 ms: never slowed).
    origin_sleep_after: int = 25
    origin_sleep_ms: int = 0


class _InviteStore(Protocol):
    def store_invite(self, record: InviteRecord) -> Deferred[tuple[InviteRecord, bool]]: ...

    def get_invite(self, event_id: str) -> Deferred[InviteRecord | None]: ...


def _invalid(message: str) -> MatrixError:
    return MatrixError(400, Codes.INVALID_PARAM, message)


def _same_event(stored: dict[str, Any], received: dict[str, Any]) -> bool:
    """Whether two events are the same invite: equal in everything signatures and hashes cover."""

    def covered(event: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in event.items() if k not in ("signatures", "unsigned")}

    return covered(stored) == covered(received)


_NO_CREATE = "invite_room_state has no full m.room.create event"

#: Servers whose keys one invite's ``invite_room_state`` may have us fetch (room
#: versions whose room ID is the create event's hash, and strict mode): each full
#: entry needs its sender's signature, and the inviting server names the senders
#: freely, so without a bound one invite could hold its request (and one of its
#: origin's concurrency slots) through fetches from hundreds of servers. A real
#: room's relayed state is signed by a handful of servers (Synapse sends only the
#: create event in full); servers whose keys are in memory already (ours, the
#: inviting server's) do not count.
_MAX_ROOM_STATE_KEY_SERVERS = 8

#: Full ``invite_room_state`` entries checked in room versions 1 to 11 without
#: strict mode, where a failure only warns: entries beyond these are not checked,
#: so that an invite's room state costs a bounded amount of CPU (redacting,
#: hashing and verifying 1 MiB of full events took ~0.4 s of the reactor's
#: time). Real rooms relay a few full events at most.
_MAX_WARN_CHECKED_ENTRIES = 20

#: Full ``invite_room_state`` entries besides the create event checked where every
#: entry kept must be checked (v12, strict mode): each costs a content hash and a
#: signature check on the reactor thread (1 MiB of small signed events, ~2,300, took
#: ~0.24 s). Synapse (1.163) sends every entry its ``room_prejoin_state`` selects in
#: full: 8 with its default types, any number with more (a space's ``m.space.child``
#: events), and the spec sets no limit, so entries past these are dropped unchecked
#: (not stored nor handed over, counted on the invite's line), not refused
#: (``_bounded_full_entries`` chooses which are kept); but on the v1 endpoint, whose
#: event carries them and is kept as received, strict mode refuses them.
_MAX_ENFORCED_FULL_ENTRIES = 50

#: The state types the spec suggests for an invite's prejoin state (client-server API,
#: "Stripped state"; the inviter's own ``m.room.member`` too): what clients show of an
#: invite, so kept before other types when full entries have to be dropped.
_PREJOIN_TYPES = frozenset(
    (
        "m.room.create",
        "m.room.name",
        "m.room.avatar",
        "m.room.topic",
        "m.room.join_rules",
        "m.room.canonical_alias",
        "m.room.encryption",
    )
)


@attrs.frozen
class _RoomStateFindings:
    """What ``invite_room_state`` holds that was accepted though strict mode would refuse it,
    and the full entries kept in their redacted form.

    The invite's outcome line warns of it (server-server-api, "Inviting to a
    room", v1.16: "servers SHOULD warn about invites which fail the validation
    rather than error in room versions 1 through 11").
    """

    #: Entries in the stripped form (no hashes or signatures): Synapse's way.
    stripped: int = 0
    #: The first validation failure found in room versions 1 to 11 (the checks
    #: stop there, so there may be more), or ``None``.
    problem: str | None = None
    #: Full entries whose content hash did not match, replaced by their redacted copies.
    redacted: int = 0
    #: Full entries past those checked (``_MAX_ENFORCED_FULL_ENTRIES``), dropped unchecked.
    dropped: int = 0

    def describe(self) -> str:
        """The clauses the outcome line's text gets."""
        text = ""
        if self.dropped:
            text += (
                f"; {self.dropped} of its invite_room_state's full events, past the create"
                f" event and {_MAX_ENFORCED_FULL_ENTRIES} others checked, were dropped unchecked"
            )
        if self.redacted:
            text += (
                f"; {self.redacted} of its invite_room_state's full events did not match their"
                " content hash (redacted, or changed since signed) and were kept redacted"
            )
        clauses = []
        if self.stripped:
            clauses.append(f"holds {self.stripped} stripped entries")
        if self.problem is not None:
            clauses.append(f"fails validation (first problem found: {self.problem})")
        if clauses:
            text += (
                f"; its invite_room_state {' and '.join(clauses)},"
                " accepted as strict_invite_room_state is off"
            )
        return text

    def log_fields(self) -> dict[str, Any]:
        """The outcome line's level and fields: only those that apply."""
        fields: dict[str, Any] = {"level": LogLevel.warn}
        if self.stripped:
            fields["stripped_state"] = self.stripped
        if self.redacted:
            fields["redacted_state"] = self.redacted
        if self.dropped:
            fields["dropped_state"] = self.dropped
        if self.problem is not None:
            # A flag, not a count: the checks stop at the first problem.
            fields["invalid_room_state"] = True
            fields["room_state_problem"] = self.problem
        return fields


#: Nothing to warn of.
_ROOM_STATE_OK = _RoomStateFindings()
#: An empty invite_room_state in room versions 1 to 11.
_ROOM_STATE_EMPTY = _RoomStateFindings(problem=_NO_CREATE)


class InviteHandler:
    """Checks, co-signs, stores and hands over invites (see the module doc)."""

    def __init__(
        self,
        clock: IReactorTime,
        server_name: str,
        authenticator: RequestAuthenticator,
        keyring: Keyring,
        signer: ISigner,
        store: _InviteStore,
        policy: InvitePolicy,
        *,
        limits: InviteLimits | None = None,
        strict_invite_room_state: bool = False,
        listeners: Iterable[InviteListener] = (),
        metrics: InviteMetrics | None = None,
    ) -> None:
        limits = limits or InviteLimits()
        self._metrics = metrics or InviteMetrics(enabled=False)
        self._clock = clock
        self._server_name = server_name
        self._authenticator = authenticator
        self._keyring = keyring
        self._signer = signer
        self._store = store
        self._policy = policy
        self._strict_room_state = strict_invite_room_state
        self._listeners: list[InviteListener] = []
        for listener in listeners:
            self.add_listener(listener)
        #: Invites handed to the store and not yet stored (or failed), and who
        #: waits for there to be none (``settle``).
        self._storing = 0
        self._settle_waiters: list[Deferred[None]] = []
        #: Event IDs of the invites past their checks and not yet stored (or failed),
        #: each with the copies refused meanwhile that wait for its outcome (row 18).
        self._in_flight: dict[str, list[Deferred[None]]] = {}
        self._origin_rate = RateLimiter(
            clock,
            limits.origin_per_second,
            limits.origin_burst,
            what="requests from your server",
            sleep_after=limits.origin_sleep_after,
            sleep_seconds=limits.origin_sleep_ms / 1000,
        )
        self._origin_concurrency = ConcurrencyLimiter(
            limits.origin_concurrent, what="requests from your server"
        )
        self._invitee_rate = RateLimiter(
            clock, limits.invitee_per_second, limits.invitee_burst, what="invites for this user"
        )

    def add_listener(self, listener: InviteListener) -> None:
        """Be told of every invite handed over, after it is stored.

        ``TypeError`` for an object that is not callable, here rather than on every invite.
        """
        if not callable(listener):
            raise TypeError(
                f"an invite listener must be callable (listener(record)); "
                f"{type(listener).__name__} is not"
            )
        self._listeners.append(listener)

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def on_invite(
        self,
        request: IRequest,
        api_version: int,
        room_id: str,
        event_id: str,
        body: dict[str, Any],
        body_length: int,
        numbers_strict: bool = False,
        nesting_checked: bool = False,
    ) -> dict[str, Any]:
        """Handle one invite; return ``{"event": ...}`` (the v1 wrapping is the resource's).

        ``numbers_strict``: the body was parsed with ``parse_json_with_numbers``
        and holds no float or out-of-range integer, so strict and lax canonical
        encodings of it are the same bytes and need no separate checking walk
        (of the event, nor of a v2 body's ``invite_room_state``: row 7).
        ``nesting_checked``: the body was parsed with ``invite_body_nesting_problem``
        (row 2, as ``web.invite`` does), so neither the event nor its room state is
        walked again to check their nesting; otherwise that check is made here.
        """
        # The origin once its signature verified; until then the X-Matrix header's claim,
        # which the log lines keep apart (claimed_origin), so that nothing keyed on
        # ``origin`` (alerts, automatic deny lists) can be pointed at a server by a forgery.
        origin: str | None = None
        claimed: str | None = None
        started = self._clock.seconds()
        peer = _peer_address(request)
        # The invitee, once the event has named a valid one (row 11): for the refusal line.
        invitee: list[str] = []
        try:
            try:
                auth = self._authenticator.parse_header(request)
                claimed = auth.origin
                self._authenticator.check_acl(auth)
                origin = await self._authenticator.verify(auth, request, body)
                claimed = None
                # One budget per server, however its name is spelled (server_name_key).
                origin_key = _origin_key(origin)
                delay = self._origin_rate.acquire(origin_key)
                if delay:
                    # Slowed, not refused (yet): the wait holds a rate token but
                    # no processing slot; cancelling the request cancels the wait.
                    await deferLater(self._clock, delay)
                self._origin_concurrency.acquire(origin_key)
                try:
                    answer, outcome = await self._handle(
                        origin,
                        api_version,
                        room_id,
                        event_id,
                        body,
                        body_length,
                        numbers_strict,
                        nesting_checked,
                        peer,
                        invitee,
                    )
                finally:
                    self._origin_concurrency.release(origin_key)
            except StoreError as exc:
                # Any read on the way (keys, local users, rules) failing: the
                # database is unavailable; nothing was signed or stored.
                log.error(
                    "Database unavailable while handling invite {event_id} from {requester}:"
                    " {reason}",
                    event_id=event_id,
                    origin=origin,
                    claimed_origin=claimed,
                    requester=_requester(origin, peer, claimed),
                    reason=str(exc),
                    server_name=self._server_name,
                )
                raise MatrixError(
                    500, Codes.UNKNOWN, "The database is unavailable; try again later"
                ) from None
            except MatrixError:
                raise
            except Exception as exc:
                if isinstance(exc, CancelledError) and _client_gone(request):
                    raise  # the peer went away: render_async cancelled the work
                # A failure in our code or an embedder's (a signer, a policy hook;
                # a CancelledError of its own Deferred, the peer still there): its
                # traceback once, then the outcome line like any refusal's.
                log.failure(
                    "Unexpected error handling invite {event_id} from {requester}",
                    event_id=event_id,
                    requester=_requester(origin, peer, claimed),
                    server_name=self._server_name,
                )
                raise MatrixError(500, Codes.UNKNOWN, "Internal server error") from None
        except MatrixError as error:
            self._metrics.inbound("refused", error.errcode, self._clock.seconds() - started)
            _log_refusal(
                error,
                event_id,
                room_id,
                origin,
                claimed,
                invitee[0] if invitee else None,
                peer,
                self._server_name,
            )
            raise
        self._metrics.inbound(outcome, None, self._clock.seconds() - started)
        return answer

    async def _handle(
        self,
        origin: str,
        api_version: int,
        room_id: str,
        event_id: str,
        body: dict[str, Any],
        body_length: int,
        numbers_strict: bool,
        nesting_checked: bool,
        peer: str | None = None,
        known_invitee: list[str] | None = None,
    ) -> tuple[dict[str, Any], str]:
        """Rows 5 to 20; returns the answer and the outcome (accepted, ignored, repeated).

        The invitee is appended to ``known_invitee`` once row 11 has found it valid.
        """
        if not nesting_checked:
            # Row 2's nesting, for a body not parsed with it (on_invite called directly).
            problem = invite_body_nesting_problem(api_version, body)
            if problem is not None:
                raise problem
        room_version, event, invite_room_state = _unwrap(api_version, body)
        check_event_format(
            room_version, event, numbers_checked=numbers_strict, nesting_checked=True
        )
        if room_version.strict_canonical_json and not numbers_strict:
            # Row 7, v6+ (v6-canonical-json.md; invites-v2.yaml: the room state is
            # "formatted according to the room version"): Synapse refuses a float or
            # large integer in it as in the event. A v1 body's room state is in the
            # event, walked above; a clean body (numbers_strict) is not walked at all.
            try:
                check_canonical_json(invite_room_state, strict=True)
            except CanonicalJSONError as exc:
                raise MatrixError(
                    400, Codes.BAD_JSON, f"invite_room_state is not canonical JSON: {exc}"
                ) from None
        # With no float or large integer in the body, the lax encoding is the
        # strict one: encode without walking the event again for each hash.
        strict = False if numbers_strict else room_version.strict_canonical_json
        try:
            if not (room_version.strict_canonical_json and body_length <= MAX_PDU_SIZE):
                # Strict canonical JSON is never longer than the JSON it was parsed
                # from, so only lax room versions or large bodies need the encoding.
                check_pdu_size(encode_canonical_json(event, strict=strict))
            prepared = prepare_event(room_version, event, strict=strict)
            content_hash_ok = check_content_hash(room_version, event, strict=strict)
        except ValueError as exc:  # CanonicalJSONError: e.g. a lone surrogate
            raise MatrixError(400, Codes.BAD_JSON, f"Invalid PDU: {exc}") from None
        self._check_identity(room_version, event, prepared, room_id, event_id)
        invitee = self._check_membership(event, origin)
        if known_invitee is not None:
            known_invitee.append(invitee)
        await self._check_signatures(room_version, event, prepared)
        if not content_hash_ok:
            raise _invalid("The event's content hash is missing or wrong")
        if not isinstance(invite_room_state, list) or not all(
            isinstance(entry, dict) for entry in invite_room_state
        ):
            raise _invalid("invite_room_state must be a list of objects")
        room_state, invite_room_state = await self._check_room_state(
            room_version, room_id, invite_room_state, event["sender"], in_event=api_version == 1
        )
        invite = InboundInvite(
            origin=origin,
            room_version=room_version,
            room_id=room_id,
            event_id=event_id,
            sender=event["sender"],
            invitee=invitee,
            event=event,
            invite_room_state=invite_room_state,
        )
        try:
            status = await self._policy.check(invite)
            self._invitee_rate.acquire(invitee)
        except MatrixError:
            # A retry of an invite we already accepted is answered as before
            # (row 18), even if a rule or the invitee's limit would refuse it
            # now; only refusals pay for this lookup. A copy of an invite being
            # signed or stored here right now (sent twice at once; its token may
            # have been the invitee's last) waits for that first.
            first_copy = self._in_flight.get(event_id)
            if first_copy is not None:
                stored_first: Deferred[None] = Deferred()
                first_copy.append(stored_first)
                await stored_first
            stored_before = await self._store.get_invite(event_id)
            if stored_before is None or not _same_event(stored_before.event, event):
                raise
            return _repeated(stored_before, origin, peer, self._server_name)
        # The invitee's token is kept only by an invite stored now (row 17): a
        # repeat, a conflict (row 19), a failure, or the peer leaving before the
        # store gives it back, so retries never lock other servers out.
        created = False
        waiting: list[Deferred[None]] | None = None
        if event_id not in self._in_flight:
            waiting = self._in_flight[event_id] = []
        try:
            signed = await self._signer.sign_event(room_version, event, prepared)
            # One encoding of the co-signed event, both stored and sent back.
            signed_json = encode_canonical_json(signed, strict=False)
            record = InviteRecord(
                event_id=event_id,
                room_id=room_id,
                room_version=room_version.identifier,
                invitee=invitee,
                sender=event["sender"],
                origin=origin,
                event=signed,
                invite_room_state=invite_room_state,
                received_ts=self._now_ms(),
                status=status,
                event_json=signed_json.decode("utf-8"),
            )
            try:
                # Once handed to the store the invite may be committed whatever
                # happens to the request, so the rest (its log line, the metrics,
                # the listeners) runs even if the client goes away meanwhile: a
                # retry would otherwise be answered as a repeat and no listener told.
                self._storing += 1
                try:
                    stored, created = await _despite_cancellation(self._store.store_invite(record))
                finally:
                    self._stored_one()
            except StoreError as exc:
                log.error(
                    "Could not store invite {event_id}: {reason}",
                    event_id=event_id,
                    reason=str(exc),
                    server_name=self._server_name,
                )
                raise MatrixError(500, Codes.UNKNOWN, "The invite could not be stored") from None
        finally:
            if not created:
                self._invitee_rate.refund(invitee)
            if waiting is not None:
                del self._in_flight[event_id]
                for copy in waiting:
                    copy.callback(None)
        if not created:
            if not _same_event(stored.event, event):
                raise _invalid("A different event with this event ID was already received")
            return _repeated(stored, origin, peer, self._server_name)
        outcome = "accepted" if status == "pending" else status
        text = f"Invite {event_id} in {room_id} from {origin} for {invitee} accepted ({status})"
        extra: dict[str, Any] = {}
        if room_state is not _ROOM_STATE_OK:
            # Row 13's warning rides on the invite's one line (and raises its level).
            text += room_state.describe()
            extra = room_state.log_fields()
        _log_outcome(
            text,
            event_id=event_id,
            room_id=room_id,
            origin=origin,
            invitee=invitee,
            outcome=outcome,
            status=200,
            peer=peer,
            **extra,
            server_name=self._server_name,
        )
        if status == "pending":
            self._notify(stored)
        return _answer(signed, signed_json), outcome

    @staticmethod
    def _check_identity(
        room_version: RoomVersion,
        event: dict[str, Any],
        prepared: PreparedEvent,
        room_id: str,
        event_id: str,
    ) -> None:
        """Row 9: the path's IDs are the event's (v3+: the event ID is its reference hash)."""
        if event.get("room_id") != room_id:
            raise _invalid("The event's room_id is not the room in the request path")
        if prepared.event_id != event_id:
            raise _invalid("The event's ID is not the event ID in the request path")

    def _check_membership(self, event: dict[str, Any], origin: str) -> str:
        """Rows 10 and 11: an invite membership event from the origin, for one of ours."""
        if event.get("type") != "m.room.member":
            raise _invalid("The event is not an m.room.member event")
        content = event.get("content")
        if not isinstance(content, dict) or content.get("membership") != "invite":
            raise _invalid("The event's membership is not 'invite'")
        invitee = event.get("state_key")
        if not isinstance(invitee, str) or not is_valid_user_id(invitee):
            raise _invalid("The event's state_key is not a user ID")
        sender = event.get("sender")
        if not isinstance(sender, str) or not is_valid_user_id(sender):
            raise _invalid("The event's sender is not a user ID")
        if server_name_of(sender) != origin:
            raise _invalid("The event's sender is not a user of the requesting server")
        if server_name_of(invitee) != self._server_name:
            raise _invalid("The invitee is not a user of this server")
        return invitee

    async def _keys_for(
        self, room_version: RoomVersion, event: dict[str, Any], servers: Iterable[str]
    ) -> dict[tuple[str, str], ServerVerifyKey]:
        signatures = event.get("signatures", {})
        origin_server_ts = event.get("origin_server_ts", 0)
        valid_at = origin_server_ts if room_version.enforce_key_validity else 0
        keys: dict[tuple[str, str], ServerVerifyKey] = {}
        for server in servers:
            key_ids = _signing_key_ids(signatures, server)
            if not key_ids:
                continue
            found = await self._keyring.get_server_keys(server, key_ids, valid_at)
            for key_id, key in found.items():
                keys[(server, key_id)] = key
        return keys

    async def _check_signatures(
        self, room_version: RoomVersion, event: dict[str, Any], prepared: PreparedEvent
    ) -> None:
        """Row 12: every required signer's signature (v1/v2: also the event ID's server)."""
        await self._verify_signers(room_version, event, prepared, "The event")

    async def _verify_signers(
        self,
        room_version: RoomVersion,
        event: dict[str, Any],
        prepared: PreparedEvent,
        what: str,
    ) -> None:
        """Fetch the required signers' keys and check their signatures, or 400 M_INVALID_PARAM."""
        try:
            signers = required_event_signers(room_version, event)
        except ValueError as exc:
            raise _invalid(f"{what}: cannot tell who must sign it: {exc}") from None
        keys = await self._keys_for(room_version, event, signers)
        try:
            verify_event_signatures(room_version, event, keys, prepared=prepared)
        except SignatureError as exc:
            raise _invalid(f"{what}: signature check failed: {exc}") from None

    async def _check_room_state(
        self,
        room_version: RoomVersion,
        room_id: str,
        room_state: list[Any],
        inviter: str,
        *,
        in_event: bool = False,
    ) -> tuple[_RoomStateFindings, list[Any]]:
        """Row 13: ``invite_room_state`` (server-server-api, invites-v2 "invite_room_state").

        Room versions whose room ID is the create event's hash (v12) and strict
        mode refuse an entry that fails validation: a missing full create
        event (or a stripped one beside it), any full event checked that is
        malformed, too large, of another room or wrongly signed, or full events
        needing the keys of more than ``_MAX_ROOM_STATE_KEY_SERVERS`` servers
        not in memory (fetched at once). Only the create event and at most
        ``_MAX_ENFORCED_FULL_ENTRIES`` other full events are checked (chosen by
        ``_bounded_full_entries``; ``inviter`` is the invite's sender): the
        others are dropped unchecked and counted, except where ``in_event`` (the v1
        endpoint: the room state rides in the event's ``unsigned``, stored, handed over
        and answered as received, so nothing can be dropped from it): there more full
        events than are checked are refused. Stripped entries are refused only in
        strict mode (Synapse sends them, MSC4311). In room versions 1 to 11
        without strict mode the spec only asks for a warning, so the same
        checks refuse nothing, and are bounded: they stop at the first problem,
        only the first ``_MAX_WARN_CHECKED_ENTRIES`` full entries are checked
        (the rest are not), and signatures only with keys already in memory
        (fetching keys for an invite accepted anyway is not worth the latency).

        A checked full entry whose content hash does not match is no problem
        but replaced by its redacted copy (server-server-api, "Validating
        hashes and signatures on received events": we were given a redacted
        event, or one changed where no signature covers it; as Synapse does).
        Returns what the outcome line is to warn of, and the room state to
        store: ``room_state`` itself unless an entry was replaced or dropped (never
        changed in place: a v1 invite's state is in its event's ``unsigned``).
        """
        enforced = room_version.room_id_is_create_event_hash or self._strict_room_state
        if not room_state:  # the common case: no work beyond this
            if enforced:
                raise _invalid(_NO_CREATE)
            return _ROOM_STATE_EMPTY, room_state
        stripped = 0
        stripped_create = False
        full: list[dict[str, Any]] = []
        has_create = False
        # The redacted copies of full entries whose content hash did not match, by id().
        redacted: dict[int, dict[str, Any]] = {}
        for entry in room_state:
            if not _looks_like_pdu(entry):
                stripped += 1
                stripped_create = stripped_create or entry.get("type") == "m.room.create"
                continue
            full.append(entry)
            if entry.get("type") == "m.room.create" and entry.get("state_key") == "":
                has_create = True
        if enforced:
            if not has_create:
                raise _invalid(_NO_CREATE)
            if stripped and self._strict_room_state:
                raise _invalid("invite_room_state holds an entry that is not a full event")
            if stripped_create:
                # Only the full create event is vouched for (by the room ID in v12):
                # a second, stripped one would reach listeners and hooks unchecked.
                raise _invalid("invite_room_state holds a stripped m.room.create event")
            full, dropped = _bounded_full_entries(full, inviter)
            if dropped and in_event:
                # Only strict mode gets here (v12 has no v1 endpoint).
                raise _invalid(
                    f"invite_room_state holds more than {_MAX_ENFORCED_FULL_ENTRIES} full events"
                    " besides the create event, more than strict mode checks: on the v1"
                    " endpoint they ride in the event, which is kept as received, so none"
                    " can be dropped (the v2 endpoint drops them)"
                )
            # Every entry checked locally before any signature, whose keys may
            # have to be fetched: a bad entry costs no request.
            prepared = [self._check_state_pdu(room_version, room_id, entry) for entry in full]
            keys = await self._room_state_keys(room_version, full)
            for entry, (prepared_entry, hash_ok) in zip(full, prepared, strict=True):
                try:
                    verify_event_signatures(room_version, entry, keys, prepared=prepared_entry)
                except SignatureError as exc:
                    raise _invalid(
                        f"An invite_room_state event: signature check failed: {exc}"
                    ) from None
                if not hash_ok:
                    redacted[id(entry)] = prepared_entry.redacted
            if not stripped and not redacted and not dropped:
                return _ROOM_STATE_OK, room_state
            findings = _RoomStateFindings(
                stripped=stripped, redacted=len(redacted), dropped=len(dropped)
            )
            return findings, _with_redacted(room_state, redacted, dropped)
        problem = None if has_create else _NO_CREATE
        if problem is None:
            for entry in full[:_MAX_WARN_CHECKED_ENTRIES]:
                try:
                    prepared_entry, hash_ok = self._check_state_pdu(room_version, room_id, entry)
                    if not hash_ok:
                        redacted[id(entry)] = prepared_entry.redacted
                    self._verify_known_signers(room_version, entry, prepared_entry)
                except MatrixError as exc:
                    problem = exc.message
                    break  # only a warning results: the first problem is enough
        if not stripped and problem is None and not redacted:
            return _ROOM_STATE_OK, room_state
        findings = _RoomStateFindings(stripped, problem, len(redacted))
        return findings, _with_redacted(room_state, redacted)

    async def _room_state_keys(
        self, room_version: RoomVersion, entries: list[dict[str, Any]]
    ) -> dict[tuple[str, str], ServerVerifyKey]:
        """The keys of every server whose signature ``entries`` (checked full events) need.

        Those not in memory are fetched all at once, so that an invite waits
        for keys about one outbound timeout at most, and only if they are at
        most ``_MAX_ROOM_STATE_KEY_SERVERS`` servers (else 400 M_INVALID_PARAM,
        before any fetch). Each server is asked once, for every key ID any
        entry names and valid at the latest entry's time that needs it.
        """
        key_ids: dict[str, set[str]] = {}
        valid_at: dict[str, int] = {}
        for entry in entries:
            try:
                signers = required_event_signers(room_version, entry)
            except ValueError as exc:
                raise _invalid(
                    f"An invite_room_state event: cannot tell who must sign it: {exc}"
                ) from None
            signatures = entry["signatures"]  # a dict of dicts (check_event_format)
            entry_valid_at = entry["origin_server_ts"] if room_version.enforce_key_validity else 0
            for server in signers:
                ids = _signing_key_ids(signatures, server)
                if not ids:
                    continue  # nothing to fetch: its signature check fails
                key_ids.setdefault(server, set()).update(ids)
                valid_at[server] = max(valid_at.get(server, 0), entry_valid_at)
        keys: dict[tuple[str, str], ServerVerifyKey] = {}
        unknown: list[str] = []
        for server in sorted(key_ids):
            known = self._keyring.known_server_keys(server, key_ids[server], valid_at[server])
            if known is None:
                unknown.append(server)
            else:
                keys.update({(server, key_id): key for key_id, key in known.items()})
        if len(unknown) > _MAX_ROOM_STATE_KEY_SERVERS:
            raise _invalid(
                "invite_room_state's events are signed by more than"
                f" {_MAX_ROOM_STATE_KEY_SERVERS} servers whose keys would have to be fetched"
            )
        if unknown:
            fetched = await _all_of(
                [
                    self._keyring.get_server_keys(server, key_ids[server], valid_at[server])
                    for server in unknown
                ]
            )
            for server, found in zip(unknown, fetched, strict=True):
                keys.update({(server, key_id): key for key_id, key in found.items()})
        return keys

    @staticmethod
    def _check_state_pdu(
        room_version: RoomVersion,
        room_id: str,
        entry: dict[str, Any],
    ) -> tuple[PreparedEvent, bool]:
        """An ``invite_room_state`` full event's checks that need no keys: its format and
        room; 400 M_INVALID_PARAM, or its prepared form for the signatures (whose
        ``redacted`` is its redacted copy) and whether its content hash matches. Its
        nesting was checked with the invite's body (row 2), tighter than a PDU's own."""
        try:
            check_event_format(room_version, entry, nesting_checked=True)
            check_pdu_size(entry)  # as the invite's own (row 8): a PDU's limit
        except MatrixError as exc:
            raise _invalid(f"invite_room_state entry is not a valid event: {exc.message}") from None
        try:
            prepared = prepare_event(room_version, entry)
            is_create = entry.get("type") == "m.room.create" and entry.get("state_key") == ""
            if room_version.room_id_is_create_event_hash and is_create:
                if room_id_for_create_event(room_version, entry, prepared=prepared) != room_id:
                    raise _invalid(
                        "The room ID is not the hash of invite_room_state's create event"
                    )
            elif entry.get("room_id") != room_id:
                raise _invalid("An invite_room_state event belongs to another room")
            # The signatures cover only what redaction keeps (an m.room.name event's
            # name is not): the content hash covers the rest. A mismatch is a redacted
            # event (or one whose content the inviting server rewrote), whose redacted
            # copy the caller keeps instead, once its signatures verify (spec).
            hash_ok = check_content_hash(room_version, entry)
        except ValueError as exc:  # no canonical form, which the format check should catch
            raise _invalid(f"invite_room_state entry is not a valid event: {exc}") from None
        return prepared, hash_ok

    def _verify_known_signers(
        self, room_version: RoomVersion, entry: dict[str, Any], prepared: PreparedEvent
    ) -> None:
        """``_verify_signers`` for room versions 1 to 11, where the check is optional: signers
        whose keys are not in memory are skipped rather than fetched."""
        what = "An invite_room_state event"
        try:
            signers = required_event_signers(room_version, entry)
        except ValueError as exc:
            raise _invalid(f"{what}: cannot tell who must sign it: {exc}") from None
        signatures = entry["signatures"]  # a dict of dicts (check_event_format)
        valid_at = entry["origin_server_ts"] if room_version.enforce_key_validity else 0
        keys: dict[tuple[str, str], ServerVerifyKey] = {}
        for server in sorted(signers):
            key_ids = _signing_key_ids(signatures, server)
            known = self._keyring.known_server_keys(server, key_ids, valid_at)
            if known is None:
                continue  # would need a fetch (or a store read): not checked
            keys.update({(server, key_id): key for key_id, key in known.items()})
            try:
                verify_event_signature(room_version, entry, server, keys, prepared=prepared)
            except SignatureError as exc:
                raise _invalid(f"{what}: signature check failed: {exc}") from None

    def now(self) -> float:
        """The handler's clock, in seconds: when an invite's handling starts, for ``count``."""
        return self._clock.seconds()

    def refused_early(
        self,
        error: MatrixError,
        room_id: str | None,
        event_id: str | None,
        started: float,
        *,
        request: IRequest | None = None,
        peer: str | None = None,
    ) -> None:
        """Count and log an invite refused before ``on_invite``: by the endpoint (rows 1 to 3,
        a path ID that is not UTF-8, None here) or by the daemon's site (its limits), with
        the fields of ``on_invite``'s refusals; nothing was authenticated or read of the
        event, so ``origin`` and ``invitee`` are None. The peer is ``request``'s, if given."""
        if request is not None:
            peer = _peer_address(request)
        self._metrics.inbound("refused", error.errcode, self._clock.seconds() - started)
        _log_refusal(error, event_id, room_id, None, None, None, peer, self._server_name)

    def count(self, outcome: str, errcode: str | None, started: float) -> None:
        """Count an invite that ended before or around ``on_invite`` (refused by the endpoint,
        abandoned, failing unexpectedly) in this handler's metrics, which count the rest."""
        self._metrics.inbound(outcome, errcode, self._clock.seconds() - started)

    @property
    def storing(self) -> int:
        """How many invites are being stored (``settle`` waits for them)."""
        return self._storing

    def settle(self) -> Deferred[None]:
        """Fires once no invite is being stored: before the store is closed, so that
        an invite whose peer has gone (and is finished regardless) is not cut off."""
        if not self._storing:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._settle_waiters.append(waiter)
        return waiter

    def _stored_one(self) -> None:
        self._storing -= 1
        if not self._storing and self._settle_waiters:
            waiters, self._settle_waiters = self._settle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _notify(self, record: InviteRecord) -> None:
        def failed(failure: Any) -> None:
            log.failure("Invite listener failed for {event_id}", failure, event_id=record.event_id)

        for listener in self._listeners:
            maybeDeferred(listener, record).addErrback(failed)


async def _all_of(deferreds: list[Deferred[_T]]) -> list[_T]:
    """The results of ``deferreds``, awaited together; the first failure is raised as
    itself (not wrapped in ``FirstError``), the others are consumed."""
    try:
        return await gatherResults(deferreds, consumeErrors=True)
    except FirstError as exc:
        exc.subFailure.raiseException()


async def _despite_cancellation(deferred: Deferred[_T]) -> _T:
    """``await deferred``, carried on to its result even if the awaiting coroutine is cancelled.

    Cancelling the coroutine's Deferred (``render_async`` does when the client
    goes away) cancels only a stand-in awaited here: ``deferred`` is left to
    finish and the coroutine goes on with its result or exception as if it had
    not been cancelled. What the coroutine then returns is answered to nobody.
    """
    outcome: list[Any] = []
    waiter: Deferred[None] | None = None

    def arrived(result: Any) -> None:
        outcome.append(result)
        if waiter is not None:
            waiter.callback(None)

    deferred.addBoth(arrived)
    while not outcome:
        waiter = Deferred()
        try:
            await waiter
        except CancelledError:
            pass  # the stand-in was cancelled, not ``deferred``: wait on
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    value: _T = result
    return value


def _repeated(
    stored: InviteRecord, origin: str, peer: str | None, server_name: str
) -> tuple[dict[str, Any], str]:
    """Answer a retry of an invite we accepted before: the event as we answered it then
    (``server_name``: ours, for the log line)."""
    _log_outcome(
        f"Invite {stored.event_id} in {stored.room_id} from {origin} received again; "
        "answered as before",
        event_id=stored.event_id,
        room_id=stored.room_id,
        origin=origin,
        invitee=stored.invitee,
        outcome="repeated",
        status=200,
        peer=peer,
        server_name=server_name,
    )
    if stored.event_json is None:
        return {"event": stored.event}, "repeated"
    return _answer(stored.event, stored.event_json.encode("utf-8")), "repeated"


def _answer(event: dict[str, Any], event_json: bytes) -> EncodedDict:
    """``{"event": event}``, carrying its encoding built from the event's own (``event_json``)."""
    return EncodedDict({"event": event}, b'{"event":' + event_json + b"}")


#: ``server_name_key`` for the per-origin limits, memoised: it is a ``str.translate`` of about
#: 0.5 us (1.2 us for a 55-character name) and a few scans per call (more for an IPv6 literal
#: or a port with a leading zero), a cache hit about 0.05 us. Only verified
#: origins (valid names, at most 261 characters) are looked up, and the cache is bounded.
_origin_key = functools.lru_cache(maxsize=4096)(server_name_key)

_LOG_SYSTEM = {level: f"{log.namespace}#{level.name}" for level in LogLevel.iterconstants()}


def _requester(origin: str | None, peer: str | None, claimed: str | None = None) -> str:
    """Who a log line says sent the request: its authenticated origin, or else the peer and
    the origin its X-Matrix header claimed, if one was read."""
    if origin is not None:
        return origin
    who = f"an unauthenticated peer at {peer}" if peer else "an unauthenticated peer"
    return f"{who} claiming to be {claimed}" if claimed is not None else who


def _log_refusal(
    error: MatrixError,
    event_id: str | None,
    room_id: str | None,
    origin: str | None,
    claimed: str | None,
    invitee: str | None,
    peer: str | None,
    server_name: str,
) -> None:
    """The outcome line of a refused invite (IDs None where the path's were not UTF-8);
    ``server_name`` is ours, the receiving server's (tenants apart)."""
    _log_outcome(
        f"Invite {'?' if event_id is None else event_id}"
        f" in {'?' if room_id is None else room_id} from {_requester(origin, peer, claimed)}"
        f"{f' for {invitee}' if invitee else ''} refused: "
        f"{error.http_status} {error.errcode} {error.message}",
        event_id=event_id,
        room_id=room_id,
        origin=origin,
        claimed_origin=claimed,
        invitee=invitee,
        status=error.http_status,
        errcode=error.errcode,
        reason=error.message,
        outcome="refused",
        peer=peer,
        server_name=server_name,
    )


def _log_outcome(text: str, level: LogLevel = LogLevel.info, **fields: Any) -> None:
    """The one line per invite: its text rendered here, its fields kept for JSON observers.

    The text is rendered here with an f-string, and Twisted is handed it as
    the format itself, escaped (``escape_log_text``) and its braces doubled,
    so that formatting it is one literal (``string.Formatter`` finds no field
    to look up: 15 -> 11 us per line with the text observer) and braces in
    peer-chosen IDs are printed as they are. The escaped text is also a field
    (``text``), for JSON observers; the other fields keep the raw values. The
    event is given to the logger's observer directly, with the keys
    ``Logger.emit`` would add: about 15 us less per line (40 -> 24 us here).
    """
    text = escape_log_text(text)
    fields.update(
        text=text,
        log_logger=log,
        log_level=level,
        log_namespace=log.namespace,
        # What the text observer would work out from the namespace and level.
        log_system=_LOG_SYSTEM[level],
        log_source=None,
        log_format=literal_format(text),
        log_time=time.time(),
    )
    log.observer(fields)


def _signing_key_ids(signatures: dict[str, Any], server: str) -> list[str]:
    """The key IDs ``server`` signed with that could name an ed25519 key (others are never
    looked up: a signature by one is simply missing)."""
    return [key_id for key_id in signatures.get(server, {}) if is_valid_key_id(key_id)]


def _client_gone(request: IRequest) -> bool:
    """Whether the request's connection was lost (``render_async`` then cancels the work).

    A request object that cannot tell (not a ``twisted.web.http.Request``) is
    taken to be gone, the only reason for cancelling the work it knows of.
    """
    return bool(getattr(request, "_disconnected", True))


def _peer_address(request: IRequest) -> str | None:
    """The client's IP address, for the invite log lines (which replace the access log)."""
    try:
        address = request.getClientAddress()
    except Exception:  # pragma: no cover - a request object without a transport
        return None
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else None


def _looks_like_pdu(entry: dict[str, Any]) -> bool:
    """Full events carry hashes and signatures; stripped state (``{type, state_key,
    content, sender}``) does not."""
    return "signatures" in entry and "hashes" in entry


def _with_redacted(
    room_state: list[Any],
    redacted: dict[int, dict[str, Any]],
    dropped: frozenset[int] = frozenset(),
) -> list[Any]:
    """``room_state`` with the entries in ``redacted`` (by ``id``) replaced by their redacted
    copies and those in ``dropped`` (by ``id``) left out: a new list if any, else
    ``room_state`` itself."""
    if not redacted and not dropped:
        return room_state
    return [redacted.get(id(entry), entry) for entry in room_state if id(entry) not in dropped]


def _bounded_full_entries(
    full: list[dict[str, Any]], inviter: str
) -> tuple[list[dict[str, Any]], frozenset[int]]:
    """The full entries to check and keep (in the order given) and the ``id``s of those to
    drop: all of them if at most ``_MAX_ENFORCED_FULL_ENTRIES`` besides the create event
    (the first full ``m.room.create`` of empty state key: the caller made sure of one),
    else the create event and that many others, entries of the spec's prejoin types
    (``_PREJOIN_TYPES`` and the inviter's own membership) before the rest, each in the
    order given."""
    if len(full) <= _MAX_ENFORCED_FULL_ENTRIES + 1:
        return full, frozenset()
    create = next(
        entry
        for entry in full
        if entry.get("type") == "m.room.create" and entry.get("state_key") == ""
    )

    def ordinary(entry: dict[str, Any]) -> bool:
        # No entry's format is checked yet: type and state_key may be any JSON value (a
        # list or an object is unhashable); one that is no string is another type, refused
        # by _check_state_pdu if kept.
        kind = entry.get("type")
        if kind == "m.room.member":
            return entry.get("state_key") != inviter
        return not isinstance(kind, str) or kind not in _PREJOIN_TYPES

    others = [entry for entry in full if entry is not create]
    # sorted() is stable: within each group, the order given.
    chosen = sorted(others, key=ordinary)[:_MAX_ENFORCED_FULL_ENTRIES]
    kept = {id(create), *map(id, chosen)}
    return (
        [entry for entry in full if id(entry) in kept],
        frozenset(id(entry) for entry in full if id(entry) not in kept),
    )


#: An invite body's limit (row 2): v1, the body is the event; v2 wraps it in an object.
_BODY_NESTING = {1: MAX_PDU_NESTING, 2: MAX_PDU_NESTING + 1}
#: The number of arrays and objects (brackets) a body must exceed for
#: ``invite_body_nesting_problem`` to find a problem in it (``parse_json``'s
#: ``max_nesting`` with it): v2's room-state entries sit at level 3 of the body
#: but must stay within ``MAX_ROOM_STATE_NESTING``, so a refused one takes 127.
INVITE_BODY_BRACKETS = {1: MAX_PDU_NESTING, 2: MAX_ROOM_STATE_NESTING + 2}
#: The keys of a v2 body Synapse's PDU parser is given (the room state in the event).
_V2_PARSED_KEYS = ("event", "invite_room_state")


def invite_body_nesting_problem(api_version: int, body: Any) -> MatrixError | None:
    """Row 2's nesting: the refusal of the invite ``body`` of the ``api_version`` endpoint
    that Synapse would refuse as nested too deep, or None: 400 ``M_BAD_JSON`` for an event
    or room-state entry nested deeper than Synapse's PDU parser takes (valid JSON, but no
    well-formed event: its "Invalid event JSON"), 400 ``M_NOT_JSON`` for a body deeper than
    the 512 levels of every body (``format.pdu_nesting_errcode``); a body that is no object
    only for the latter (row 2). Its event may nest ``MAX_PDU_NESTING`` levels,
    the event counted (the v1 body is the event: 127; the v2 body wraps it: 128); its room
    state's entries ``MAX_ROOM_STATE_NESTING`` (124, the entry counted), which Synapse
    parses inside the event's ``unsigned`` on v2 as on v1. What Synapse leaves out is not
    counted (``format.pdu_nesting_exceeded``): the ``unsigned`` keys it strips (all but
    ``invite_room_state`` and ``knock_room_state``), and on v2 the event's own
    ``unsigned.invite_room_state`` (replaced by the body's) and the body's keys other
    than ``event`` and ``invite_room_state``; they are bounded as every body is, by
    ``MAX_NESTING``. That bound is checked here too, first (its answer that of the parser:
    "JSON is nested deeper than 512 levels"), in the same walk: each array and object of
    the body is visited at most once (``pdu_nesting_exceeded``'s ``wrapped``).

    ``web.invite`` parses bodies with it (``parse_json``'s ``nesting_problem``, asked only
    for a body with more than ``INVITE_BODY_BRACKETS`` brackets, with
    ``problem_bounds_nesting``, so the parser does not walk the body apart for the 512);
    ``on_invite`` asks it for a body not parsed so (``nesting_checked`` False), with the
    same answers.
    """
    if api_version == 1 and isinstance(body, dict):
        exceeded = pdu_nesting_exceeded(body, wrapped=0)
    elif isinstance(body, dict) and isinstance(body.get("event"), dict):
        exceeded = pdu_nesting_exceeded(
            body["event"],
            body.get("invite_room_state", []),
            wrapped=1,
            beside=[value for key, value in body.items() if key not in _V2_PARSED_KEYS],
        )
    else:  # row 2 or 5 refuses it
        exceeded = MAX_NESTING if nesting_depth(body, MAX_NESTING) > MAX_NESTING else 0
    if not exceeded:
        return None
    errcode = pdu_nesting_errcode(exceeded)
    if exceeded == MAX_ROOM_STATE_NESTING:
        message = f"invite_room_state: an entry is nested deeper than {exceeded} levels"
        return MatrixError(400, errcode, message)
    if exceeded == MAX_PDU_NESTING:
        exceeded = _BODY_NESTING[api_version]
    return MatrixError(400, errcode, f"JSON is nested deeper than {exceeded} levels")


def _unwrap(api_version: int, body: dict[str, Any]) -> tuple[RoomVersion, dict[str, Any], Any]:
    """Rows 5 and 6: the room version, the event and the room state, whose shape is
    checked in row 13's place (a v1 event's ``unsigned`` is part of the event, so the
    event's format (row 7) is checked first, with it)."""
    if api_version == 1:
        # invites-v1.yaml: the body is the event; receivers assume room version
        # 1 or 2 (which do not differ here); room state rides in unsigned.
        event = body
        room_version = get_room_version("1")
        unsigned = event.get("unsigned")
        room_state = unsigned.get("invite_room_state", []) if isinstance(unsigned, dict) else []
    else:
        if "room_version" not in body:
            raise MatrixError(400, Codes.MISSING_PARAM, "Missing room_version")
        if "event" not in body:
            raise MatrixError(400, Codes.MISSING_PARAM, "Missing event")
        if not isinstance(body["room_version"], str):
            raise MatrixError(400, Codes.BAD_JSON, "room_version must be a string")
        if not isinstance(body["event"], dict):
            raise MatrixError(400, Codes.BAD_JSON, "event must be an object")
        room_version = get_room_version(body["room_version"])
        event = body["event"]
        room_state = body.get("invite_room_state", [])
    return room_version, event, room_state
