"""Helpers for testing code that embeds federation-invite, with trial and no network.

- ``FakeHomeserver(server_name, clock)``: a remote homeserver in memory with its own
  signing key. It serves its key document (``key_resource()``, ``site_root()``), builds
  invites signed as Synapse 1.163 sends them (``invite(...)``: a ``FakeInvite``, the
  room's state as full PDUs, the create event first), PUTs them to your server with a
  valid X-Matrix header (``put_invite(target, invite)``), and answers your
  ``send_invite`` by co-signing, as Synapse does (or with ``refusal``; a subclass
  overrides ``answer`` or ``cosign`` to answer otherwise).
- ``fake_peers(*homeservers, reactor=None)``: a ``FakePeersAgent`` serving them; give it
  as ``agent=`` to ``build_components`` or ``build_from_config``, and your server's keyring
  and ``send_invite`` talk to them in memory (with ``reactor``, also to resources answering
  later, such as another ``FederationInvite`` added with ``add_peer``).
- ``build_create_event`` and ``invite_event_template``: the events themselves.

Nothing here imports the global reactor: pass a ``Clock`` or the reactor. See the
README's "Testing your code with trial".
"""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import attrs
from signedjson.key import generate_signing_key
from signedjson.types import SigningKey
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock, deferLater
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from unpaddedbase64 import encode_base64

from .client.testing import FakePeersAgent
from .core.errors import MatrixError
from .core.events import prepare_event, room_id_for_create_event
from .core.ids import server_name_of
from .core.roomversions import EventFormat, RedactionRules, RoomVersion, room_version_of
from .core.signing import hash_and_sign_event, sign_event
from .core.xmatrix import sign_request
from .service import FederationInvite, build_site_root
from .web.keys import KeyServerResource
from .web.tree import build_matrix_tree

__all__ = [
    "FakeHomeserver",
    "FakeInvite",
    "FakePeersAgent",
    "build_create_event",
    "fake_peers",
    "invite_event_template",
]

#: The room versions the v1 invite API carries (invites-v2.yaml; v1 receivers assume 1 or 2).
_V1_ROOM_VERSIONS = frozenset({"1", "2"})
#: On a ``Clock``: how many times ``put_invite`` advances it by 0 for an answer.
_MAX_TURNS = 10_000
#: On a real reactor: how long ``put_invite`` waits for an answer (below trial's own
#: 120 s timeout), and how often it moves bytes meanwhile (the reactor sleeps between).
_GIVE_UP_SECONDS = 60.0
_POLL_SECONDS = 0.001


def build_create_event(
    room_version: RoomVersion | str,
    server_name: str,
    signing_key: SigningKey,
    *,
    origin_server_ts: int,
    sender: str | None = None,
    room_id: str | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    """A room's ``m.room.create`` event by ``sender`` (``@creator:<server_name>``), hashed and
    signed by ``server_name``, as Synapse builds it.

    Before v12 it carries ``room_id`` (by default ``!room:<server_name>``); in v12 it has
    none (the room ID is its hash: ``room_id_for_create_event``). Before v11 the content
    names the ``creator``. In v1/v2 ``event_id`` defaults to ``$create:<server_name>``.
    """
    room_version = room_version_of(room_version)
    sender = sender or f"@creator:{server_name}"
    content: dict[str, Any] = {"room_version": room_version.identifier}
    if room_version.redaction_rules is not RedactionRules.V11:
        content["creator"] = sender  # rooms/v11.md removed it
    event: dict[str, Any] = {
        "type": "m.room.create",
        "state_key": "",
        "sender": sender,
        "content": content,
        "origin_server_ts": origin_server_ts,
        "depth": 1,
        "prev_events": [],
        "auth_events": [],
    }
    if room_version.room_id_is_create_event_hash:
        if room_id is not None:
            raise ValueError("in room version 12 the room ID is the create event's hash")
    else:
        event["room_id"] = room_id or f"!room:{server_name}"
    if room_version.event_format is EventFormat.V1:
        event["event_id"] = event_id or f"$create:{server_name}"
    if room_version.redaction_keeps_top_level_origin:
        event["origin"] = server_name
    return hash_and_sign_event(room_version, event, server_name, signing_key)


def invite_event_template(
    room_version: RoomVersion | str,
    server_name: str,
    *,
    sender: str,
    invitee: str,
    room_id: str,
    origin_server_ts: int,
    prev_events: Sequence[Any],
    auth_events: Sequence[Any],
    depth: int,
    content: dict[str, Any] | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    """An ``m.room.member`` invite of ``invitee`` by ``sender``, not yet hashed or signed:
    sign it with ``core.signing.hash_and_sign_event(room_version, event, server_name, key)``.

    ``content`` defaults to ``{"membership": "invite"}``; ``unsigned`` is ``{"age": 0}``,
    as Synapse sends a new event. v1/v2 events need their ``event_id`` (default: random,
    of ``server_name``); ``origin`` is set where the room version keeps it.
    """
    room_version = room_version_of(room_version)
    event: dict[str, Any] = {
        "type": "m.room.member",
        "state_key": invitee,
        "sender": sender,
        "content": {"membership": "invite"} if content is None else content,
        "room_id": room_id,
        "origin_server_ts": origin_server_ts,
        "depth": depth,
        "prev_events": list(prev_events),
        "auth_events": list(auth_events),
        "unsigned": {"age": 0},
    }
    if room_version.event_format is EventFormat.V1:
        event["event_id"] = event_id or f"${secrets.token_hex(9)}:{server_name}"
    if room_version.redaction_keeps_top_level_origin:
        event["origin"] = server_name
    return event


@attrs.frozen
class FakeInvite:
    """A signed invite and the room state sent with it (``FakeHomeserver.invite``)."""

    room_version: RoomVersion
    event: dict[str, Any]
    invite_room_state: list[dict[str, Any]]
    #: The invite's event ID (computed for v3+; the event's own in v1/v2).
    event_id: str

    @property
    def room_id(self) -> str:
        room_id: str = self.event["room_id"]
        return room_id

    @property
    def invitee(self) -> str:
        invitee: str = self.event["state_key"]
        return invitee

    def body(self, api_version: int = 2) -> Any:
        """The request body: v2 ``{room_version, event, invite_room_state}``; v1 the event,
        the room state in its ``unsigned`` (which receivers take for room versions 1 and 2
        only: built as asked for any, to test a receiver's refusal)."""
        if api_version == 1:
            event = copy.deepcopy(self.event)
            event.setdefault("unsigned", {})["invite_room_state"] = self.invite_room_state
            return event
        return {
            "room_version": self.room_version.identifier,
            "event": self.event,
            "invite_room_state": self.invite_room_state,
        }

    def path(self, api_version: int = 2) -> str:
        """``/_matrix/federation/v<api_version>/invite/<room ID>/<event ID>``."""
        return (
            f"/_matrix/federation/v{api_version}/invite/"
            f"{quote(self.room_id, safe='')}/{quote(self.event_id, safe='')}"
        )


class FakeHomeserver:
    """A remote homeserver in memory: its key, its key document, its invites.

    ``clock`` gives the time its events and key document carry (a ``Clock`` or the
    reactor: the one your ``FederationInvite`` runs on, so its keys are valid there).
    ``reactor`` is what ``put_invite`` waits on for answers that need a reactor turn
    (the store's threads): the reactor the store was opened with (in trial,
    ``twisted.internet.reactor``); by default ``clock``, which a ``Clock`` advances by 0.

    The invite endpoints of ``site_root()`` answer as Synapse does: the event co-signed
    (v2 ``{"event": ...}``, v1 ``[200, {"event": ...}]``), or, while ``refusal`` is a
    ``MatrixError``, that error. They do not check the request's signature. Each
    request's parsed body is appended to ``received``.

    To answer otherwise, subclass it and override ``answer`` (each invite request) or
    ``cosign`` (how the event answered is signed).
    """

    def __init__(
        self,
        server_name: str,
        clock: IReactorTime,
        *,
        signing_key: SigningKey | None = None,
        reactor: IReactorTime | None = None,
    ) -> None:
        self.server_name = server_name
        self.clock = clock
        self.reactor = clock if reactor is None else reactor
        self.signing_key: SigningKey = signing_key or generate_signing_key("fake1")
        #: Answer invites sent to this server with this error instead (None: co-sign).
        self.refusal: MatrixError | None = None
        #: The invite request bodies received, in order.
        self.received: list[Any] = []

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def key_resource(self) -> KeyServerResource:
        """``/_matrix/key/v2/server``'s resource: this server's key document."""
        return KeyServerResource(self.clock, self.server_name, [self.signing_key])

    def site_root(self) -> Resource:
        """A whole site: the key document and the v1/v2 invite endpoints; JSON 404s."""
        return build_site_root(
            build_matrix_tree(
                self.key_resource(),
                {
                    (b"federation", b"v1", b"invite"): _InviteEndpoint(self, 1),
                    (b"federation", b"v2", b"invite"): _InviteEndpoint(self, 2),
                },
            )
        )

    def answer(self, request: Request, api_version: int, body: Any) -> tuple[int, Any] | None:
        """How the invite endpoints answer ``request`` on ``api_version`` (``body`` is its
        parsed JSON): ``(status, answer)``, the answer sent as JSON, or, if bytes, as they are
        as ``text/html`` (a proxy's error page); or None: never (a server that hangs).

        By default it appends ``body`` to ``received``, then answers ``refusal`` while it is
        set, else ``(200, cosigned(api_version, body))``. Override it in a subclass to answer
        otherwise.
        """
        self.received.append(body)
        if self.refusal is not None:
            return self.refusal.http_status, self.refusal.to_json()
        return 200, self.cosigned(api_version, body)

    def cosigned(self, api_version: int, body: Any) -> Any:
        """What Synapse answers, with status 200, an invite request whose parsed JSON body is
        ``body``: its event (a copy, ``unsigned`` added as ``{}`` if missing), signed by
        ``cosign``; v2 ``{"event": ...}``, v1 ``[200, {"event": ...}]``."""
        if api_version == 1:
            room_version = room_version_of("1")
            event = copy.deepcopy(body)
        else:
            room_version = room_version_of(body["room_version"])
            event = copy.deepcopy(body["event"])
        event.setdefault("unsigned", {})
        answer: Any = {"event": self.cosign(room_version, event)}
        return [200, answer] if api_version == 1 else answer

    def cosign(self, room_version: RoomVersion, event: dict[str, Any]) -> dict[str, Any]:
        """``event`` (``cosigned``'s copy) as this server answers it: signed with
        ``signing_key``. Override it in a subclass to sign it otherwise, or change it."""
        return sign_event(room_version, event, self.server_name, self.signing_key)

    def invite(
        self,
        room_version: RoomVersion | str,
        *,
        invitee: str,
        sender: str | None = None,
        room_id: str | None = None,
        invite_room_state: list[dict[str, Any]] | None = None,
        content: dict[str, Any] | None = None,
    ) -> FakeInvite:
        """An invite of ``invitee`` by ``sender`` (``@alice:<server_name>``) into a new room of
        ours, hashed and signed, with ``invite_room_state`` as Synapse 1.163 sends it: the
        room's create event, its join rules and the sender's membership, as full PDUs.

        ``room_id`` defaults to a new room (it cannot be chosen in v12: the create event's
        hash); ``invite_room_state`` given replaces the room state sent.
        """
        room_version = room_version_of(room_version)
        sender = sender or f"@alice:{self.server_name}"
        v12 = room_version.room_id_is_create_event_hash
        if room_id is None and not v12:
            room_id = f"!{secrets.token_hex(9)}:{self.server_name}"
        now = self.now_ms()
        create = build_create_event(
            room_version,
            self.server_name,
            self.signing_key,
            origin_server_ts=now - 3,
            sender=sender,
            room_id=room_id,
            event_id=self._event_id(room_version),
        )
        create_ref = self._reference(room_version, create)
        if v12:
            room_id = room_id_for_create_event(room_version, create)
        assert room_id is not None
        # rooms/v12.md: the create event is never listed in auth_events.
        auth_create = [] if v12 else [create_ref]
        member = self._state_event(
            room_version,
            "m.room.member",
            sender,
            {"membership": "join"},
            sender,
            room_id,
            now - 2,
            2,
            [create_ref],
            auth_create,
        )
        member_ref = self._reference(room_version, member)
        join_rules = self._state_event(
            room_version,
            "m.room.join_rules",
            "",
            {"join_rule": "invite"},
            sender,
            room_id,
            now - 1,
            3,
            [member_ref],
            [*auth_create, member_ref],
        )
        join_rules_ref = self._reference(room_version, join_rules)
        event = invite_event_template(
            room_version,
            self.server_name,
            sender=sender,
            invitee=invitee,
            room_id=room_id,
            origin_server_ts=now,
            prev_events=[join_rules_ref],
            auth_events=[*auth_create, member_ref, join_rules_ref],
            depth=4,
            content=content,
            event_id=self._event_id(room_version),
        )
        event = hash_and_sign_event(room_version, event, self.server_name, self.signing_key)
        state = [create, join_rules, member] if invite_room_state is None else invite_room_state
        event_id = prepare_event(room_version, event).event_id
        return FakeInvite(room_version, event, state, event_id)

    def put_invite(
        self,
        target: FederationInvite | IResource,
        invite: FakeInvite,
        *,
        api_version: int = 2,
        destination: str | None = None,
    ) -> Deferred[tuple[int, Any]]:
        """PUT ``invite`` to ``target`` (a ``FederationInvite``, or a resource serving
        ``/_matrix``) signed with an X-Matrix header for ``destination`` (the
        ``FederationInvite``'s server name, else the invitee's server), in memory.

        Fires with the answer's status code and parsed JSON body.

        ``api_version=1`` only for room versions 1 and 2: the v1 API carries no room
        version, and its receivers (ours, Synapse) read the body as room version 1 or 2
        (invites-v2.yaml allows falling back to it only "if the room version is "1" or
        "2""), so the event of a v3+ invite, which has no ``event_id``, is malformed
        there; such a call raises ``ValueError`` at once, sending nothing.
        """
        if api_version == 1 and invite.room_version.identifier not in _V1_ROOM_VERSIONS:
            raise ValueError(
                "the v1 invite API carries room versions 1 and 2 only, not "
                f"{invite.room_version.identifier}: use api_version=2"
            )
        if isinstance(target, FederationInvite):
            resource: IResource = target.site_root()
            destination = destination or target.server_name
        else:
            resource = target
            destination = destination or server_name_of(invite.invitee)
        return Deferred.fromCoroutine(self._put(resource, destination, invite, api_version))

    async def _put(
        self, resource: IResource, destination: str, invite: FakeInvite, api_version: int
    ) -> tuple[int, Any]:
        path = invite.path(api_version)
        body = invite.body(api_version)
        authorization = sign_request(
            self.signing_key, self.server_name, destination, "PUT", path, body
        )
        client: Any = StubTreq(resource)
        response = await self._settle(
            client,
            client.request(
                "PUT",
                f"https://{destination}{path}",
                data=json.dumps(body).encode("utf-8"),
                headers={"Authorization": [authorization], "Content-Type": ["application/json"]},
            ),
        )
        content = await self._settle(client, response.content())
        return response.code, json.loads(content)

    async def _settle(self, client: StubTreq, waiting: Deferred[Any]) -> Any:
        """Move bytes between ``client`` and the resource until ``waiting`` fires: on a
        ``Clock``, advancing it by 0 (time passes only when the test advances it); on a real
        reactor, every ``_POLL_SECONDS`` for up to ``_GIVE_UP_SECONDS``."""
        done: list[object] = []

        def note(result: object) -> object:
            done.append(True)
            return result

        waiting.addBoth(note)
        client.flush()
        if isinstance(self.reactor, Clock):
            for _ in range(_MAX_TURNS):
                if done:
                    return await waiting
                self.reactor.advance(0)
                client.flush()
            raise AssertionError(
                "no answer from the server: this FakeHomeserver's reactor is a Clock, which"
                " only advancing moves; a store (SQLite, PostgreSQL) answers from its threads"
                " through the real reactor: pass reactor= (the reactor the store was opened"
                " with), or advance the Clock past what the server waits for"
            )
        give_up = self.reactor.seconds() + _GIVE_UP_SECONDS
        while not done:
            if self.reactor.seconds() > give_up:
                raise AssertionError(
                    f"no answer from the server after {_GIVE_UP_SECONDS:.0f} s of waiting"
                )
            await deferLater(self.reactor, _POLL_SECONDS, lambda: None)
            client.flush()
        return await waiting

    def _event_id(self, room_version: RoomVersion) -> str | None:
        if room_version.event_format is EventFormat.V1:
            return f"${secrets.token_hex(9)}:{self.server_name}"
        return None

    def _reference(self, room_version: RoomVersion, event: dict[str, Any]) -> Any:
        """How ``event`` is listed in ``prev_events``/``auth_events`` in this room version."""
        prepared = prepare_event(room_version, event)
        if room_version.event_format is EventFormat.V1:
            return [prepared.event_id, {"sha256": encode_base64(prepared.reference_hash)}]
        return prepared.event_id

    def _state_event(
        self,
        room_version: RoomVersion,
        event_type: str,
        state_key: str,
        content: dict[str, Any],
        sender: str,
        room_id: str,
        ts: int,
        depth: int,
        prev_events: list[Any],
        auth_events: list[Any],
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": event_type,
            "state_key": state_key,
            "sender": sender,
            "content": content,
            "room_id": room_id,
            "origin_server_ts": ts,
            "depth": depth,
            "prev_events": prev_events,
            "auth_events": auth_events,
        }
        event_id = self._event_id(room_version)
        if event_id is not None:
            event["event_id"] = event_id
        if room_version.redaction_keeps_top_level_origin:
            event["origin"] = self.server_name
        return hash_and_sign_event(room_version, event, self.server_name, self.signing_key)


def fake_peers(*homeservers: FakeHomeserver, reactor: IReactorTime | None = None) -> FakePeersAgent:
    """A ``FakePeersAgent`` serving each homeserver's ``site_root()`` under its name: give it
    as ``agent=`` to ``build_components`` or ``build_from_config``. With ``reactor``, the
    agent moves the bytes of answers given later itself (``add_peer`` of another
    ``FederationInvite``), see ``FakePeersAgent``."""
    return FakePeersAgent(
        {server.server_name: server.site_root() for server in homeservers}, reactor=reactor
    )


class _InviteEndpoint(Resource):
    """One API version's invite endpoint of a ``FakeHomeserver``."""

    isLeaf = True

    def __init__(self, server: FakeHomeserver, api_version: int) -> None:
        super().__init__()
        self._server = server
        self._api_version = api_version

    def render_PUT(self, request: Request) -> bytes | int:
        assert request.content is not None
        body = json.loads(request.content.read())
        answered = self._server.answer(request, self._api_version, body)
        if answered is None:
            return NOT_DONE_YET
        status, answer = answered
        request.setResponseCode(status)
        if isinstance(answer, bytes):
            request.setHeader(b"Content-Type", b"text/html")
            return answer
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(answer).encode("utf-8")
