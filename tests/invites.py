"""Building invites the way Synapse builds them, and a receiving server wired for tests."""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import quote

from signedjson.types import SigningKey
from treq.testing import StubTreq
from twisted.internet.task import Clock
from unpaddedbase64 import encode_base64

from federation_invite import testing
from federation_invite.auth import RequestAuthenticator, ServerAcl
from federation_invite.core.canonical import encode_canonical_json
from federation_invite.core.events import compute_event_id, room_id_for_create_event
from federation_invite.core.keys import key_id_of, sign_bytes
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS, EventFormat, RoomVersion
from federation_invite.core.signing import hash_and_sign_event
from federation_invite.core.xmatrix import XMatrixAuth, format_xmatrix, request_json
from federation_invite.inbound import InviteHandler, InviteLimits
from federation_invite.keyring import Keyring
from federation_invite.policy import InvitePolicy
from federation_invite.service import build_site_root
from federation_invite.signer import LocalSigner
from federation_invite.web.invite import InviteResource
from federation_invite.web.keys import KeyServerResource
from federation_invite.web.tree import build_matrix_tree

from .support import NOW_S, FakeFederation, MemoryStore, local_verify_key, make_clock, make_key

NOW_MS = NOW_S * 1000
US = "us.example"
THEM = "remote.example"
ALICE = f"@alice:{THEM}"
BOB = f"@bob:{US}"


def fake_event_id(room_version: RoomVersion, seed: str) -> str:
    """A syntactically valid event ID for prev/auth references."""
    digest = hashlib.sha256(seed.encode()).digest()
    if room_version.event_format is EventFormat.V1:
        return f"${seed}:{THEM}"
    urlsafe = room_version.identifier not in ("3",)
    return "$" + encode_base64(digest, urlsafe=urlsafe)


def _references(room_version: RoomVersion, names: list[str]) -> list[Any]:
    if room_version.event_format is EventFormat.V1:
        return [
            [fake_event_id(room_version, n), {"sha256": encode_base64(b"h" * 32)}] for n in names
        ]
    return [fake_event_id(room_version, n) for n in names]


def build_create_event(
    room_version: RoomVersion, key: SigningKey, server: str = THEM, room_id: str | None = None
) -> dict[str, Any]:
    """A signed m.room.create event of ``room_id`` (by default ``!room:`` + ``server``, as
    ``build_invite``'s; v12: without room_id, per v12 event format)."""
    if room_version.room_id_is_create_event_hash:
        room_id = None
    return testing.build_create_event(
        room_version, server, key, origin_server_ts=NOW_MS - 10_000, room_id=room_id
    )


def stripped(
    event_type: str, state_key: str, content: dict[str, Any], sender: str = ALICE
) -> dict[str, Any]:
    """Stripped state as Synapse sends it in invite_room_state."""
    return {"type": event_type, "state_key": state_key, "content": content, "sender": sender}


def build_invite(
    room_version: RoomVersion,
    key: SigningKey,
    *,
    sender: str = ALICE,
    invitee: str = BOB,
    room_id: str | None = None,
    server: str = THEM,
    extra: dict[str, Any] | None = None,
    sign: bool = True,
) -> dict[str, Any]:
    """An invite event as Synapse builds it for ``room_version``, hashed and signed by ``server``."""
    event = testing.invite_event_template(
        room_version,
        server,
        sender=sender,
        invitee=invitee,
        room_id=room_id or f"!room:{server}",
        origin_server_ts=NOW_MS,
        prev_events=_references(room_version, ["prev"]),
        auth_events=_references(room_version, ["a1", "a2", "a3"]),
        depth=12,
        content={"membership": "invite", "displayname": "Bob"},
        event_id=(
            f"$invite{abs(hash(json.dumps(extra, sort_keys=True))) % 10**8}:{server}"
            if room_version.event_format is EventFormat.V1
            else None
        ),
    )
    event["unsigned"] = {"age": 4}
    event.update(extra or {})
    if not sign:
        return event
    return hash_and_sign_event(room_version, event, server, key)


class InviteScenario:
    """A receiving server (us) with its resource tree, and a sending server (them)."""

    def __init__(
        self,
        *,
        limits: InviteLimits | None = None,
        acl: ServerAcl | None = None,
        max_body_bytes: int = 1_048_576,
        strict_invite_room_state: bool = False,
        policy_kwargs: dict[str, Any] | None = None,
        clock: Clock | None = None,
        policy_cache_seconds: float = 0.0,
    ) -> None:
        self.clock = clock or make_clock()
        self.federation = FakeFederation()
        self.their_key = make_key("them1")
        self.federation.add_key_server(self.clock, THEM, [self.their_key])
        self.our_key = make_key("us1")
        self.store = MemoryStore()
        self.store.users.add(BOB)
        self.keyring = Keyring(
            self.clock, self.store, self.federation, local_keys=[local_verify_key(US, self.our_key)]
        )
        authenticator = RequestAuthenticator(self.clock, US, self.keyring, acl)
        self.policy = InvitePolicy(
            US,
            self.store,
            clock=self.clock,
            cache_seconds=policy_cache_seconds,
            **(policy_kwargs or {}),
        )
        self.listened: list[Any] = []
        self.handler = InviteHandler(
            self.clock,
            US,
            authenticator,
            self.keyring,
            LocalSigner(US, self.our_key),
            self.store,
            self.policy,
            limits=limits,
            strict_invite_room_state=strict_invite_room_state,
            listeners=[self.listened.append],
        )
        key_server = KeyServerResource(self.clock, US, [self.our_key])
        extra = {
            (b"federation", b"v1", b"invite"): InviteResource(self.handler, 1, max_body_bytes),
            (b"federation", b"v2", b"invite"): InviteResource(self.handler, 2, max_body_bytes),
        }
        self.root = build_site_root(build_matrix_tree(key_server, extra))
        self.client = StubTreq(self.root)

    def invite(
        self, room_version_id: str = "10", **kwargs: Any
    ) -> tuple[RoomVersion, dict[str, Any]]:
        room_version = KNOWN_ROOM_VERSIONS[room_version_id]
        return room_version, build_invite(room_version, self.their_key, **kwargs)

    def v2_body(
        self, room_version: RoomVersion, event: dict[str, Any], room_state: list[Any] | None = None
    ) -> dict[str, Any]:
        return {
            "room_version": room_version.identifier,
            "event": event,
            "invite_room_state": room_state if room_state is not None else [],
        }

    def path(self, api_version: int, room_id: str, event_id: str) -> str:
        return (
            f"/_matrix/federation/v{api_version}/invite/"
            f"{quote(room_id, safe='')}/{quote(event_id, safe='')}"
        )

    def put_raw(
        self,
        path: str,
        data: bytes,
        *,
        content: Any = None,
        key: SigningKey | None = None,
        origin: str = THEM,
        headers: list[str] | None = None,
    ) -> Any:
        """PUT ``data`` at ``path`` signed as ``origin`` over ``content``; returns the Deferred."""
        if headers is None:
            signed_content = content if content is not None else json.loads(data)
            headers = [
                _sign_request_lax(key or self.their_key, origin, "PUT", path, signed_content)
            ]
        return self.client.put(
            "https://us.example" + path,
            data=data,
            headers={"Authorization": headers, "Content-Type": ["application/json"]},
        )

    def send(
        self,
        api_version: int,
        body: Any,
        *,
        room_id: str,
        event_id: str,
        **kwargs: Any,
    ) -> Any:
        data = json.dumps(body).encode()
        return self.put_raw(self.path(api_version, room_id, event_id), data, content=body, **kwargs)


def _sign_request_lax(key: SigningKey, origin: str, method: str, path: str, content: Any) -> str:
    """Like ``sign_request``, but admitting floats, so tests can send malformed bodies signed."""
    data = encode_canonical_json(request_json(method, path, origin, US, content), strict=False)
    return format_xmatrix(XMatrixAuth(origin, US, key_id_of(key), sign_bytes(key, data)))


def event_id_of(room_version: RoomVersion, event: dict[str, Any]) -> str:
    return compute_event_id(room_version, event)


def v12_room(key: SigningKey) -> tuple[RoomVersion, dict[str, Any], str]:
    """A v12 room: its version, its signed create event and its room ID."""
    room_version = KNOWN_ROOM_VERSIONS["12"]
    create = build_create_event(room_version, key)
    return room_version, create, room_id_for_create_event(room_version, create)
