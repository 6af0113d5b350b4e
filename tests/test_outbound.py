"""Outbound invites (issue #6): our sender against our own receiver in memory, and against fake
peers that answer wrongly, refuse, or never answer."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectBindError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request
from unpaddedbase64 import encode_base64

from federation_invite import outbound
from federation_invite.client import (
    BackoffError,
    FederationClient,
    RemoteError,
    TransportError,
)
from federation_invite.client.testing import FakePeersAgent
from federation_invite.config import ConfigError, load_config
from federation_invite.core.canonical import encode_canonical_json
from federation_invite.core.errors import MatrixError
from federation_invite.core.events import (
    add_content_hash,
    check_content_hash,
    compute_content_hash,
    compute_event_id,
    prepare_event,
    room_id_for_create_event,
)
from federation_invite.core.format import check_event_format
from federation_invite.core.keys import encode_verify_key, key_id_of, sign_bytes, verify_key_of
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS, RoomVersion
from federation_invite.core.signing import hash_and_sign_event, sign_event, verify_event_signature
from federation_invite.core.xmatrix import parse_xmatrix
from federation_invite.keyring import Keyring
from federation_invite.outbound import (
    InvalidInviteAnswer,
    InviteError,
    InviteNotSendable,
    InviteRefused,
    InviteSender,
    InviteTransportError,
    build_test_invite,
)
from federation_invite.service import (
    FederationInvite,
    build_components,
    build_from_config,
    build_site_root,
)
from federation_invite.signer import LocalSigner, check_signer
from federation_invite.store import StoreError
from federation_invite.testing import FakeHomeserver
from federation_invite.web.invite import InviteResource
from federation_invite.web.keys import KeyServerResource
from federation_invite.web.tree import build_matrix_tree

from .support import MemoryStore, local_verify_key, make_clock, make_key

OURS = "origin.example"
PEER = "peer.example"
ALICE = f"@alice:{OURS}"
BOB = f"@bob:{PEER}"
TIMEOUT = 30.0
ALL_VERSIONS = list(KNOWN_ROOM_VERSIONS)

_DAY_MS = 86_400_000


def key_site(clock: Clock, server_name: str, keys: list[Any], validity_ms: int = _DAY_MS) -> Any:
    """A site root serving only ``server_name``'s key document."""
    return build_site_root(
        build_matrix_tree(KeyServerResource(clock, server_name, keys, validity_ms=validity_ms))
    )


class RecordingSigner:
    """A LocalSigner that records which of its methods were called."""

    def __init__(self, signer: LocalSigner) -> None:
        self._signer = signer
        self.server_name = signer.server_name
        self.calls: list[str] = []

    def sign_event(
        self, room_version: RoomVersion, event: dict[str, Any], prepared: Any = None
    ) -> Any:
        self.calls.append("sign_event")
        return self._signer.sign_event(room_version, event, prepared)

    def hash_and_sign_event(self, room_version: RoomVersion, event: dict[str, Any]) -> Any:
        self.calls.append("hash_and_sign_event")
        return self._signer.hash_and_sign_event(room_version, event)


class FakePeer(FakeHomeserver):
    """An invited server in memory that co-signs invites as Synapse does (a FakeHomeserver,
    key ID ``peer1``), unless told otherwise.

    ``canned[api_version] = (status, body)`` answers with that instead (bytes
    as HTML); ``mutate(event)`` changes the co-signed event; ``wrap(answer)``
    changes the whole answer; ``sign_key``/``sign`` choose its signature;
    ``hang`` never answers (the requests are kept in ``pending``). Each request
    is recorded in ``received`` as ``(api_version, uri, body)``; ``refusal`` is
    not used (``canned`` is).
    """

    def __init__(self, clock: Clock, name: str = PEER, validity_ms: int = _DAY_MS) -> None:
        super().__init__(name, clock, signing_key=make_key("peer1"))
        self.validity_ms = validity_ms
        self.key = self.signing_key
        self.sign_key = self.key
        self.sign = True
        self.canned: dict[int, tuple[int, Any]] = {}
        self.mutate: Callable[[dict[str, Any]], None] | None = None
        self.wrap: Callable[[Any], Any] | None = None
        self.hang = False
        self.received: list[tuple[int, bytes, Any]] = []
        self.pending: list[Request] = []
        self.root = self.site_root()

    def key_resource(self) -> KeyServerResource:
        return KeyServerResource(
            self.clock, self.server_name, [self.key], validity_ms=self.validity_ms
        )

    def answer(self, request: Request, api_version: int, body: Any) -> tuple[int, Any] | None:
        self.received.append((api_version, request.uri, body))
        if self.hang:
            self.pending.append(request)
            return None
        if api_version in self.canned:
            return self.canned[api_version]
        answer = self.cosigned(api_version, body)
        return 200, answer if self.wrap is None else self.wrap(answer)

    def cosign(self, room_version: RoomVersion, event: dict[str, Any]) -> dict[str, Any]:
        if self.sign:
            event = sign_event(room_version, event, self.server_name, self.sign_key)
        if self.mutate is not None:
            self.mutate(event)
        return event


class Origin:
    """Our server: a FederationClient on in-memory peers, a keyring, a signer, the sender."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or make_clock()
        self.key = make_key("origin1")
        self.agent = FakePeersAgent()
        self.client = FederationClient(
            self.clock, OURS, self.key, agent=self.agent, timeout=TIMEOUT
        )
        self.key_store = MemoryStore()
        self.keyring = Keyring(
            self.clock, self.key_store, self.client, local_keys=[local_verify_key(OURS, self.key)]
        )
        self.local_signer = LocalSigner(OURS, self.key)
        self.signer = RecordingSigner(self.local_signer)
        self.sender = InviteSender(self.signer, self.client, self.keyring)  # type: ignore[arg-type]
        #: Our key document, for receivers that check our signatures.
        self.key_site = key_site(self.clock, OURS, [self.key])

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def invite(
        self, room_version: str = "10", *, invitee: str = BOB, now_ms: int | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """An unsigned test invite of ALICE's and its room state (create event signed)."""
        deferred = build_test_invite(
            self.local_signer, room_version, ALICE, invitee, now_ms or self.now_ms()
        )
        invite, state = [], []
        deferred.addCallback(lambda result: (invite.append(result[0]), state.append(result[1])))
        return invite[0], state[0]

    def signed_invite(
        self, room_version: str = "10", **kwargs: Any
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        event, state = self.invite(room_version, **kwargs)
        return hash_and_sign_event(KNOWN_ROOM_VERSIONS[room_version], event, OURS, self.key), state

    def send(
        self,
        room_version: str,
        event: Any,
        state: Any = (),
        **kwargs: Any,
    ) -> Deferred[dict[str, Any]]:
        return self.sender.send_invite(room_version, event, state, **kwargs)

    def invite_apis(self) -> list[str]:
        """The API versions of the invite requests sent so far ("v1", "v2"), in order."""
        paths = [uri.partition(b"://")[2].split(b"/") for _, uri, _ in self.agent.requests]
        return [p[3].decode() for p in paths if p[2:5:2] == [b"federation", b"invite"]]


class Receiver:
    """Our own receiving side (``build_components``) as the invitee's server."""

    def __init__(self, origin: Origin, *, name: str = PEER, **overrides: Any) -> None:
        self.key = make_key("peer1")
        self.agent = FakePeersAgent({OURS: origin.key_site})
        client = FederationClient(origin.clock, name, self.key, agent=self.agent)
        config = load_config(
            None,
            {
                "server_name": name,
                "inbound.local_users": "any",
                "ratelimit.invitee_burst": 1000,
                **overrides,
            },
        )
        self.store = MemoryStore()
        self.components: FederationInvite = build_components(
            config, origin.clock, self.store, self.key, client=client
        )

    def site(self) -> Any:
        """Both invite endpoints, JSON errors elsewhere."""
        return build_site_root(self.components.matrix_resource())

    def v1_only_site(self) -> Any:
        """An older server: v1 only; the v2 path gets JSON 404 M_UNRECOGNIZED."""
        components = self.components
        return build_site_root(
            build_matrix_tree(
                components.key_server,
                {(b"federation", b"v1", b"invite"): InviteResource(components.handler, 1, 65536)},
            )
        )

    def v1_only_html_site(self) -> Any:
        """An older server behind plain twisted.web: unknown paths get an HTML 404 page."""
        root = Resource()
        matrix = Resource()
        key = Resource()
        key_v2 = Resource()
        federation = Resource()
        v1 = Resource()
        root.putChild(b"_matrix", matrix)
        matrix.putChild(b"key", key)
        key.putChild(b"v2", key_v2)
        key_v2.putChild(b"server", self.components.key_server)
        matrix.putChild(b"federation", federation)
        federation.putChild(b"v1", v1)
        v1.putChild(b"invite", InviteResource(self.components.handler, 1, 65536))
        return root


class _Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.origin = Origin()

    def assert_nothing_sent(self) -> None:
        self.assertEqual(self.origin.agent.requests, [])

    def assert_cosigned(
        self,
        room_version: str,
        sent: dict[str, Any],
        result: dict[str, Any],
        peer_key: Any,
        peer: str = PEER,
    ) -> None:
        """``result`` is ``sent`` plus the peer's valid signature, and verifies on its own."""
        version = KNOWN_ROOM_VERSIONS[room_version]
        self.assertEqual(
            {k: v for k, v in result.items() if k != "signatures"},
            {k: v for k, v in sent.items() if k != "signatures"},
        )
        self.assertEqual(set(result["signatures"]), {OURS, peer})
        keys = {
            (OURS, "ed25519:origin1"): local_verify_key(OURS, self.origin.key),
            (peer, "ed25519:peer1"): local_verify_key(peer, peer_key),
        }
        verify_event_signature(version, result, OURS, keys)
        verify_event_signature(version, result, peer, keys)


class RoundTripTests(_Base):
    """Our sender against our own receiver (InviteHandler behind the real resource tree)."""

    def test_v2_every_room_version(self) -> None:
        """Rooms 1 to 12: one v2 PUT, the receiver stores the invite, we get it doubly signed."""
        receiver = Receiver(self.origin)
        self.origin.agent.add_peer(PEER, receiver.site())
        for room_version in ALL_VERSIONS:
            event, state = self.origin.invite(room_version)
            result = self.successResultOf(self.origin.send(room_version, event, state))
            signed = hash_and_sign_event(
                KNOWN_ROOM_VERSIONS[room_version], event, OURS, self.origin.key
            )
            self.assert_cosigned(room_version, signed, result, receiver.key)
            event_id = compute_event_id(KNOWN_ROOM_VERSIONS[room_version], result)
            self.assertIn(event_id, receiver.store.invites, room_version)
            self.assertEqual(receiver.store.invites[event_id].event, result, room_version)
            self.assertEqual(self.origin.invite_apis()[-1], "v2")
        self.assertEqual(self.origin.invite_apis(), ["v2"] * len(ALL_VERSIONS))
        self.assertEqual(len(self.origin.agent.requests), len(ALL_VERSIONS) + 1)  # + one key fetch

    def test_keyring_closed_before_the_answer_check(self) -> None:
        """The keyring closed (the service stopping) when the answer is checked: the invitee
        server's key is not fetched, and send_invite fails with InviteTransportError (every
        failure an InviteError), not with the keyring's KeyringClosed."""
        receiver = Receiver(self.origin)
        self.origin.agent.add_peer(PEER, receiver.site())
        self.origin.keyring.close()
        event, state = self.origin.invite("10")
        sending = self.origin.send("10", event, state)
        error = self.failureResultOf(sending, InviteTransportError).value
        self.assertEqual(
            (error.destination, error.reason),
            (PEER, "its answer cannot be checked: the keyring is closed"),
        )
        self.assertEqual(self.origin.invite_apis(), ["v2"])

    def test_v1_fallback_on_json_404(self) -> None:
        """Rooms 1 and 2: a v1-only receiver's 404 M_UNRECOGNIZED on v2 leads to v1, which works."""
        receiver = Receiver(self.origin)
        self.origin.agent.add_peer(PEER, receiver.v1_only_site())
        for room_version in ("1", "2"):
            event, state = self.origin.invite(room_version)
            result = self.successResultOf(self.origin.send(room_version, event, state))
            signed = hash_and_sign_event(
                KNOWN_ROOM_VERSIONS[room_version], event, OURS, self.origin.key
            )
            self.assert_cosigned(room_version, signed, result, receiver.key)
            self.assertIn(result["event_id"], receiver.store.invites)
            # The receiver got the room state in unsigned (invites-v1.yaml) ...
            stored = receiver.store.invites[result["event_id"]]
            self.assertEqual(stored.invite_room_state, state)
            # ... but what we hand back is our event, not the receiver's echo.
            self.assertNotIn("unsigned", result)
            self.assertEqual(self.origin.invite_apis()[-2:], ["v2", "v1"], room_version)

    def test_v1_fallback_on_html_404(self) -> None:
        """Rooms 1 and 2: an HTML 404 on v2 (no Matrix error body) also leads to v1."""
        receiver = Receiver(self.origin)
        self.origin.agent.add_peer(PEER, receiver.v1_only_html_site())
        for room_version in ("1", "2"):
            event, state = self.origin.invite(room_version)
            result = self.successResultOf(self.origin.send(room_version, event, state))
            self.assertEqual(result["signatures"][PEER].keys(), {"ed25519:peer1"})
            self.assertEqual(self.origin.invite_apis()[-2:], ["v2", "v1"])

    def test_no_fallback_for_later_room_versions(self) -> None:
        """Rooms 3 to 12 never use v1: a v1-only receiver's 404 is the answer."""
        receiver = Receiver(self.origin)
        self.origin.agent.add_peer(PEER, receiver.v1_only_site())
        for room_version in ALL_VERSIONS[2:]:
            event, state = self.origin.invite(room_version)
            before = len(self.origin.agent.requests)
            error = self.failureResultOf(
                self.origin.send(room_version, event, state), InviteRefused
            ).value
            self.assertEqual(
                (error.status, error.errcode, error.api_version), (404, "M_UNRECOGNIZED", 2)
            )
            self.assertEqual(len(self.origin.agent.requests), before + 1, room_version)

    def test_receiver_refusal(self) -> None:
        """A refusal by our receiver (server_deny) arrives as InviteRefused 403 M_FORBIDDEN."""
        receiver = Receiver(self.origin, **{"inbound.server_deny": [OURS]})
        self.origin.agent.add_peer(PEER, receiver.site())
        event, state = self.origin.invite("10")
        error = self.failureResultOf(self.origin.send("10", event, state), InviteRefused).value
        self.assertEqual(
            (error.status, error.errcode, error.destination), (403, "M_FORBIDDEN", PEER)
        )
        self.assertEqual(receiver.store.invites, {})

    def test_strict_receiver_refusal(self) -> None:
        """invite_room_state goes as given; a strict receiver's 400 M_INVALID_PARAM comes back."""
        receiver = Receiver(self.origin, **{"inbound.strict_invite_room_state": True})
        self.origin.agent.add_peer(PEER, receiver.site())
        event, _ = self.origin.invite("10")
        stripped = [
            {"type": "m.room.name", "state_key": "", "content": {"name": "x"}, "sender": ALICE}
        ]
        error = self.failureResultOf(self.origin.send("10", event, stripped), InviteRefused).value
        self.assertEqual((error.status, error.errcode), (400, "M_INVALID_PARAM"))
        self.assertEqual(error.message, "invite_room_state has no full m.room.create event")


class OwnKeysTests(_Base):
    """Our receiver's own old keys (config keys.old_verify_keys), as build_components sets up."""

    def receiver_with_old_key(self, expired_ts: int) -> tuple[Receiver, Any]:
        old = make_key("old")
        entry = {
            "key_id": key_id_of(old),
            "key": encode_verify_key(verify_key_of(old)),
            "expired_ts": expired_ts,
        }
        receiver = Receiver(self.origin, **{"keys.old_verify_keys": [entry]})
        self.origin.agent.add_peer(PEER, receiver.site())
        return receiver, old

    def invite_into_room_created_with(
        self, key: Any, created_ms: int
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A v12 invite of BOB's into a room @carol:PEER created at ``created_ms``, the create
        event signed by PEER with ``key``."""
        v12 = KNOWN_ROOM_VERSIONS["12"]
        create = {
            "type": "m.room.create",
            "state_key": "",
            "sender": f"@carol:{PEER}",
            "content": {"room_version": "12"},
            "origin_server_ts": created_ms,
            "depth": 1,
            "prev_events": [],
            "auth_events": [],
        }
        create = hash_and_sign_event(v12, create, PEER, key)
        invite = {
            "type": "m.room.member",
            "state_key": BOB,
            "sender": ALICE,
            "content": {"membership": "invite"},
            "origin_server_ts": self.origin.now_ms(),
            "depth": 2,
            "room_id": room_id_for_create_event(v12, create),
            "prev_events": [compute_event_id(v12, create)],
            "auth_events": [],
        }
        return invite, create

    def test_events_signed_with_our_old_key(self) -> None:
        """A room we created with a key now old: its create event, relayed back to us in
        invite_room_state, verifies with that key, as it did before the key's expired_ts."""
        now = self.origin.now_ms()
        receiver, old = self.receiver_with_old_key(expired_ts=now - 1000)
        invite, create = self.invite_into_room_created_with(old, now - _DAY_MS)
        result = self.successResultOf(self.origin.send("12", invite, [create]))
        event_id = compute_event_id(KNOWN_ROOM_VERSIONS["12"], result)
        self.assertIn(event_id, receiver.store.invites)
        # Signed after the key expired: not ours.
        invite, create = self.invite_into_room_created_with(old, now - 500)
        error = self.failureResultOf(self.origin.send("12", invite, [create]), InviteRefused).value
        self.assertEqual((error.status, error.errcode), (400, "M_INVALID_PARAM"))
        self.assertIn("signature check failed", error.message)

    def test_requests_signed_with_our_old_key_refused(self) -> None:
        """Our old key never authenticates a request, even one claiming to come from us."""
        from treq.testing import StubTreq

        from federation_invite.core.xmatrix import sign_request

        receiver, old = self.receiver_with_old_key(expired_ts=self.origin.now_ms() + _DAY_MS)
        path = f"/_matrix/federation/v2/invite/%21r%3A{PEER}/%24e"
        body = {"event": {}, "room_version": "10", "invite_room_state": []}
        header = sign_request(old, PEER, PEER, "PUT", path, body)
        client = StubTreq(receiver.site())
        response = self.successResultOf(
            client.put(
                f"https://{PEER}{path}",
                data=json.dumps(body).encode(),
                headers={"Authorization": [header]},
            )
        )
        answer = json.loads(self.successResultOf(response.content()))
        self.assertEqual((response.code, answer["errcode"]), (401, "M_UNAUTHORIZED"))
        self.assertIn("old key", answer["error"])

    def test_old_key_with_our_signing_key_id_refused(self) -> None:
        """build_components refuses an old key with the ID of the key we sign with."""
        entry = {"key_id": "ed25519:peer1", "key": encode_verify_key(verify_key_of(make_key()))}
        error = self.assertRaises(
            ConfigError,
            Receiver,
            self.origin,
            **{"keys.old_verify_keys": [{**entry, "expired_ts": 5}]},
        )
        self.assertIn("ed25519:peer1", str(error))


class AnswerCheckTests(_Base):
    """Answers that come back 200 but must not be used: each with its own error."""

    def setUp(self) -> None:
        super().setUp()
        self.peer = FakePeer(self.origin.clock)
        self.origin.agent.add_peer(PEER, self.peer.root)

    def invalid(self, room_version: str = "10", **kwargs: Any) -> InvalidInviteAnswer:
        event, state = self.origin.invite(room_version, **kwargs)
        error = self.failureResultOf(
            self.origin.send(room_version, event, state), InvalidInviteAnswer
        ).value
        self.assertEqual(error.destination, PEER)
        return error

    def test_synapse_like_peer(self) -> None:
        """A peer that adds "unsigned": {} is fine: we hand back our event with its signature."""
        event, state = self.origin.signed_invite("10")
        result = self.successResultOf(self.origin.send("10", event, state))
        self.assertEqual(self.peer.received[0][2]["event"], event)
        self.assert_cosigned("10", event, result, self.peer.key)
        self.assertNotIn("unsigned", result)

    def test_tuple_in_the_event_sent_and_echoed_as_a_list(self) -> None:
        """A tuple in the caller's event goes on the wire as a JSON array: the peer's faithful
        echo (a list) is accepted, and what we hand back is what was sent (a list)."""
        event, state = self.origin.invite("10")
        event = dict(event, content={"membership": "invite", "org.example.tags": ("a", "b")})
        result = self.successResultOf(self.origin.send("10", event, state))
        self.assertEqual(
            self.peer.received[0][2]["event"]["content"]["org.example.tags"], ["a", "b"]
        )
        self.assertEqual(
            result["content"], {"membership": "invite", "org.example.tags": ["a", "b"]}
        )
        self.assertIs(type(result["content"]["org.example.tags"]), list)
        self.assertEqual(event["content"]["org.example.tags"], ("a", "b"))
        signed = hash_and_sign_event(KNOWN_ROOM_VERSIONS["10"], event, OURS, self.origin.key)
        self.assert_cosigned("10", json.loads(encode_canonical_json(signed)), result, self.peer.key)

    def test_v1_echo_of_room_state_accepted(self) -> None:
        """On v1 Synapse echoes the room state in unsigned; accepted, and not handed back."""
        self.peer.canned[2] = (404, b"<html>Not Found</html>")
        event, state = self.origin.signed_invite("1")
        event["unsigned"] = {"age": 1}
        result = self.successResultOf(self.origin.send("1", event, state))
        sent = self.peer.received[1][2]
        self.assertEqual(sent["unsigned"], {"age": 1, "invite_room_state": state})
        self.assertEqual(result["unsigned"], {"age": 1})
        self.assert_cosigned("1", event, result, self.peer.key)

    def test_unsigned_changes_ignored(self) -> None:
        """What the peer puts in unsigned is neither checked nor taken."""
        self.peer.mutate = lambda event: event.__setitem__("unsigned", {"age": 99, "x": [1]})
        event, state = self.origin.signed_invite("10")
        result = self.successResultOf(self.origin.send("10", event, state))
        self.assertNotIn("unsigned", result)

    def test_changed_content(self) -> None:
        """A peer that changes the content is refused."""
        self.peer.mutate = lambda event: event["content"].__setitem__("membership", "join")
        self.assertEqual(
            self.invalid().reason, "the event in the answer is not the one sent: changed 'content'"
        )

    def test_key_added_inside_content(self) -> None:
        """A peer that adds a key inside content (not covered by the event ID in v3+: the
        redaction drops it) is refused: nested objects must have the same keys too."""
        self.peer.mutate = lambda event: event["content"].__setitem__("reason", "hi")
        self.assertEqual(
            self.invalid().reason, "the event in the answer is not the one sent: changed 'content'"
        )

    def test_dropped_field(self) -> None:
        """A peer that drops a covered field is refused."""
        self.peer.mutate = lambda event: event.pop("depth")
        self.assertEqual(
            self.invalid().reason, "the event in the answer is not the one sent: dropped 'depth'"
        )

    def test_added_field(self) -> None:
        """A peer that adds a field is refused, and the message names it."""
        self.peer.mutate = lambda event: event.update(extra=1, more="x")
        self.assertEqual(
            self.invalid().reason,
            "the event in the answer is not the one sent: added 'extra', 'more'",
        )

    def test_several_changes_listed(self) -> None:
        """Changed, dropped and added fields are all reported, many truncated."""

        def mutate(event: dict[str, Any]) -> None:
            event["depth"] = 3
            del event["origin_server_ts"]
            event.update({f"k{i}": i for i in range(10)})

        self.peer.mutate = mutate
        self.assertEqual(
            self.invalid().reason,
            "the event in the answer is not the one sent: changed 'depth'; "
            "dropped 'origin_server_ts'; added 'k0', 'k1', 'k2', 'k3', 'k4', 'k5', 'k6', 'k7' "
            "and 2 more",
        )

    def test_eight_changes_listed_in_full(self) -> None:
        """Up to eight fields of a kind are all listed, with no "and N more"."""
        self.peer.mutate = lambda event: event.update({f"k{i}": i for i in range(8)})
        self.assertEqual(
            self.invalid().reason,
            "the event in the answer is not the one sent: added 'k0', 'k1', 'k2', 'k3', 'k4', "
            "'k5', 'k6', 'k7'",
        )

    def test_type_confusable_change(self) -> None:
        """2.0 for 2 (equal in Python, not in JSON) is a change."""
        self.peer.mutate = lambda event: event.__setitem__("depth", 2.0)
        self.assertEqual(
            self.invalid().reason, "the event in the answer is not the one sent: changed 'depth'"
        )

    def test_changed_event_id_v1(self) -> None:
        """Room v1/v2: the event ID is a field of the event; changing it is refused."""
        self.peer.mutate = lambda event: event.__setitem__("event_id", f"$other:{OURS}")
        self.assertEqual(
            self.invalid("1").reason,
            "the event in the answer is not the one sent: changed 'event_id'",
        )

    def test_added_event_id(self) -> None:
        """Room v3+: an event_id field in the answer is an added field."""
        self.peer.mutate = lambda event: event.__setitem__("event_id", "$x")
        self.assertEqual(
            self.invalid("4").reason,
            "the event in the answer is not the one sent: added 'event_id'",
        )

    def test_missing_invitee_signature(self) -> None:
        """An answer the invitee's server did not sign is refused."""
        self.peer.sign = False
        self.assertEqual(self.invalid().reason, f"the answer carries no signature by {PEER}")

    def test_signature_by_wrong_key(self) -> None:
        """A signature under the peer's key ID made with another key does not verify."""
        self.peer.sign_key = make_key("peer1")
        self.assertEqual(
            self.invalid().reason,
            f"the signature of {PEER} does not verify: Signature by {PEER} (ed25519:peer1) is invalid",
        )

    def test_signature_by_unknown_key(self) -> None:
        """A signature by a key the peer does not publish cannot be checked: refused."""
        self.peer.sign_key = make_key("rogue")
        self.assertEqual(
            self.invalid().reason,
            f"no verify key of {PEER} could be found for its signature ('ed25519:rogue')",
        )

    def test_key_store_read_failure(self) -> None:
        """A key-store read failing while the peer's signature is checked is not a StoreError
        (every failure is an InviteError): the keyring fetches the peer's key instead, and
        the invite comes back co-signed."""
        self.patch(
            self.origin.key_store,
            "get_server_keys",
            lambda *args, **kwargs: fail(StoreError("get_server_keys", "database is locked")),
        )
        event, state = self.origin.signed_invite("10")
        result = self.successResultOf(self.origin.send("10", event, state))
        self.assert_cosigned("10", event, result, self.peer.key)

    def test_signature_with_unknown_algorithm(self) -> None:
        """A peer signature under a non-ed25519 key ID cannot be checked: refused."""

        def mutate(event: dict[str, Any]) -> None:
            signatures = event["signatures"][PEER]
            signatures["other:peer1"] = signatures.pop("ed25519:peer1")

        self.peer.mutate = mutate
        self.assertEqual(
            self.invalid().reason,
            f"no verify key of {PEER} could be found for its signature ('other:peer1')",
        )

    def test_unknown_extra_signature_dropped(self) -> None:
        """A second signature by an unknown key is not verified, and not handed back."""

        def mutate(event: dict[str, Any]) -> None:
            event["signatures"][PEER]["ed25519:other"] = "AAAA"
            event["signatures"]["third.example"] = {"ed25519:x": "AAAA"}

        self.peer.mutate = mutate
        event, state = self.origin.signed_invite("10")
        result = self.successResultOf(self.origin.send("10", event, state))
        self.assertEqual(result["signatures"][PEER].keys(), {"ed25519:peer1"})
        self.assertEqual(result["signatures"].keys(), {OURS, PEER})

    def test_our_signature_removed(self) -> None:
        """An answer without our signature is refused."""
        self.peer.mutate = lambda event: event["signatures"].pop(OURS)
        self.assertEqual(self.invalid().reason, "our signature (ed25519:origin1) was removed")

    def test_our_signature_altered(self) -> None:
        """An answer whose copy of our signature does not verify is refused."""
        self.peer.mutate = lambda event: event["signatures"][OURS].__setitem__(
            "ed25519:origin1", "A" * 86
        )
        self.assertEqual(
            self.invalid().reason,
            "our signature in the answer does not verify: "
            f"Signature by {OURS} (ed25519:origin1) is invalid",
        )

    def test_signatures_not_an_object(self) -> None:
        """An answer whose signatures are not an object is refused."""
        self.peer.mutate = lambda event: event.__setitem__("signatures", [])
        self.assertEqual(self.invalid().reason, "the answer's event has no signatures object")

    def test_key_not_valid_at_event_time(self) -> None:
        """v5+: the peer's key must be valid at origin_server_ts; v4 does not ask (v5 rules)."""
        peer = FakePeer(self.origin.clock, validity_ms=60_000)
        self.origin.agent.add_peer(PEER, peer.root)
        later = self.origin.now_ms() + 3_600_000
        self.assertEqual(
            self.invalid("5", now_ms=later).reason,
            f"no signature by {PEER} with a key valid at the event's origin_server_ts "
            "(room version 5)",
        )
        event, state = self.origin.invite("4", now_ms=later)
        self.successResultOf(self.origin.send("4", event, state))

    def key_fetches(self) -> int:
        """The key documents fetched so far."""
        return sum(
            1 for _, uri, _ in self.origin.agent.requests if b"/_matrix/key/v2/server" in uri
        )

    def test_expired_peer_key_refetched_from_v5(self) -> None:
        """v5+: a cached key of the invitee's that is no longer valid at origin_server_ts is
        fetched again (v5 signing requirements), so a later invite still verifies; v4 does
        not ask for validity and uses the cached key without a fetch."""
        for room_version, fetches in (("10", 2), ("4", 1)):
            self.origin = Origin()
            peer = FakePeer(self.origin.clock, validity_ms=60_000)
            self.origin.agent.add_peer(PEER, peer.root)
            for _ in range(2):
                event, state = self.origin.invite(room_version)
                self.successResultOf(self.origin.send(room_version, event, state))
                self.origin.clock.advance(3600)
            self.assertEqual(self.key_fetches(), fetches, room_version)

    def test_v1_shaped_answer_on_v2(self) -> None:
        """[200, {"event": ...}] from the v2 endpoint is refused."""
        self.peer.wrap = lambda answer: [200, answer]
        self.assertEqual(
            self.invalid().reason, "the v2 endpoint answered in the v1 shape [200, {...}]"
        )

    def test_v2_answer_not_an_object(self) -> None:
        """A v2 answer that is not a JSON object is refused."""
        self.peer.wrap = lambda answer: "ok"
        self.assertEqual(self.invalid().reason, "the answer is not a JSON object")

    def test_v2_answer_without_event(self) -> None:
        """A v2 answer without event is refused."""
        self.peer.wrap = lambda answer: {"signed": answer["event"]}
        self.assertEqual(self.invalid().reason, "the answer has no event")

    def test_v2_answer_event_not_object(self) -> None:
        """A v2 answer whose event is not an object is refused."""
        self.peer.wrap = lambda answer: {"event": [answer["event"]]}
        self.assertEqual(self.invalid().reason, "the answer's event is not an object")

    def test_v1_answers_parsed_strictly(self) -> None:
        """v1: only [200, {"event": ...}] is an answer (invites-v1.yaml)."""
        self.peer.canned[2] = (404, b"<html>Not Found</html>")
        wrong: list[Callable[[Any], Any]] = [
            lambda answer: answer[1],
            lambda answer: [200],
            lambda answer: ["200", answer[1]],
            lambda answer: [True, answer[1]],
            lambda answer: [200.0, answer[1]],  # JSON tells 200.0 from 200
            lambda answer: [201, answer[1]],
            lambda answer: [200, answer[1], {}],
            lambda answer: [200, [answer[1]]],
        ]
        for wrap in wrong:
            self.peer.wrap = wrap
            self.assertEqual(self.invalid("2").reason, 'the v1 answer is not [200, {"event": ...}]')
        self.peer.wrap = lambda answer: [200, {"events": answer[1]["event"]}]
        self.assertEqual(self.invalid("2").reason, "the answer has no event")

    def test_not_json_200(self) -> None:
        """A 200 whose body is not JSON is an invalid answer, not a refusal."""
        self.peer.canned[2] = (200, b"<html>OK</html>")
        self.assertEqual(self.invalid().reason, "HTTP 200 OK: body is not JSON")

    def test_answer_kept_for_debugging(self) -> None:
        """InvalidInviteAnswer carries what came back and says where from."""
        self.peer.sign = False
        error = self.invalid()
        self.assertEqual(error.answer["event"]["sender"], ALICE)
        self.peer.wrap = lambda answer: "ok"
        self.assertEqual(self.invalid().answer, "ok")
        self.assertEqual(str(error), f"invalid answer from {PEER}: {error.reason}")
        self.assertIn("InvalidInviteAnswer(destination='peer.example'", repr(error))
        self.assertIsInstance(error, InviteError)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


class AnswerPropertyTests(_Base):
    """Whatever a peer changes in what hashes and signatures cover, the answer is refused."""

    def setUp(self) -> None:
        super().setUp()
        self.peer = FakePeer(self.origin.clock)
        self.origin.agent.add_peer(PEER, self.peer.root)
        self.event, self.state = self.origin.signed_invite("10")
        self.covered = sorted(set(self.event) - {"signatures", "unsigned"})

    @settings(max_examples=100, deadline=None)
    @given(
        key_index=st.integers(0, 20),
        new_key=st.text(min_size=1, max_size=8),
        value=_json_values,
        kind=st.sampled_from(["set", "add", "drop"]),
    )
    def test_covered_changes_refused(
        self, key_index: int, new_key: str, value: Any, kind: str
    ) -> None:
        """A changed, added or dropped covered field is never handed back as a success."""
        key = self.covered[key_index % len(self.covered)]
        if kind == "add":
            # unsigned is not covered: any value of it is rightly accepted.
            assume(new_key not in self.event and new_key != "unsigned")
            key = new_key
        if kind == "set":
            assume(encode_canonical_json(self.event[key]) != encode_canonical_json(value))

        def mutate(event: dict[str, Any]) -> None:
            if kind == "drop":
                del event[key]
            else:
                event[key] = value

        self.peer.mutate = mutate
        error = self.failureResultOf(
            self.origin.send("10", self.event, self.state), InvalidInviteAnswer
        ).value
        self.assertTrue(error.reason.startswith("the event in the answer is not the one sent: "))

    @settings(max_examples=50, deadline=None)
    @given(value=_json_values)
    def test_unsigned_changes_accepted(self, value: Any) -> None:
        """Anything in unsigned is accepted, and our own event is handed back."""
        self.peer.mutate = lambda event: event.__setitem__("unsigned", value)
        result = self.successResultOf(self.origin.send("10", self.event, self.state))
        self.assertEqual(
            {k: v for k, v in result.items() if k != "signatures"},
            {k: v for k, v in self.event.items() if k != "signatures"},
        )


class RefusalTests(_Base):
    """The peer says no: one exception type with status, errcode, message and destination."""

    def setUp(self) -> None:
        super().setUp()
        self.peer = FakePeer(self.origin.clock)
        self.origin.agent.add_peer(PEER, self.peer.root)

    def refused(self, room_version: str = "10") -> InviteRefused:
        event, state = self.origin.invite(room_version)
        error = self.failureResultOf(
            self.origin.send(room_version, event, state), InviteRefused
        ).value
        self.assertEqual(error.destination, PEER)
        self.assertIsInstance(error, RemoteError)
        self.assertNotIsInstance(error, MatrixError)
        return error

    def test_forbidden(self) -> None:
        """403 M_FORBIDDEN surfaces with its message."""
        self.peer.canned[2] = (403, {"errcode": "M_FORBIDDEN", "error": "User cannot invite"})
        error = self.refused()
        self.assertEqual(
            (error.status, error.errcode, error.message, error.retry_after_ms, error.api_version),
            (403, "M_FORBIDDEN", "User cannot invite", None, 2),
        )
        self.assertEqual(str(error), f"{PEER} answered 403 M_FORBIDDEN: User cannot invite")

    def test_invite_blocked(self) -> None:
        """403 M_INVITE_BLOCKED (spec v1.18) surfaces as such."""
        self.peer.canned[2] = (403, {"errcode": "M_INVITE_BLOCKED", "error": "Blocked"})
        error = self.refused()
        self.assertEqual(
            (error.status, error.errcode, error.message), (403, "M_INVITE_BLOCKED", "Blocked")
        )

    def test_incompatible_room_version(self) -> None:
        """400 M_INCOMPATIBLE_ROOM_VERSION keeps the body's room_version, and never falls back."""
        body = {"errcode": "M_INCOMPATIBLE_ROOM_VERSION", "error": "No", "room_version": "1"}
        self.peer.canned[2] = (400, body)
        error = self.refused("1")
        self.assertEqual(
            (error.status, error.errcode, error.body), (400, "M_INCOMPATIBLE_ROOM_VERSION", body)
        )
        self.assertEqual(len(self.peer.received), 1)

    def test_limit_exceeded(self) -> None:
        """429 carries retry_after_ms."""
        self.peer.canned[2] = (
            429,
            {"errcode": "M_LIMIT_EXCEEDED", "error": "Slow", "retry_after_ms": 2000},
        )
        error = self.refused()
        self.assertEqual(
            (error.status, error.errcode, error.retry_after_ms), (429, "M_LIMIT_EXCEEDED", 2000)
        )
        self.assertIn("retry_after_ms=2000", repr(error))

    def test_retry_after_zero_kept(self) -> None:
        """A retry_after_ms of 0 (a non-negative integer: retry at once) is passed on."""
        self.peer.canned[2] = (429, {"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 0})
        error = self.refused()
        self.assertEqual(
            (error.status, error.errcode, error.retry_after_ms), (429, "M_LIMIT_EXCEEDED", 0)
        )

    def test_bad_retry_after_ignored(self) -> None:
        """A retry_after_ms that is not a non-negative integer is not passed on."""
        for value in ("2000", -1, True, 1.5):
            self.peer.canned[2] = (429, {"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": value})
            self.assertIsNone(self.refused().retry_after_ms)
            self.origin.clock.advance(3600)  # past the back-off a 429 sets

    def test_server_error(self) -> None:
        """A 500 is a refusal (no fallback, even for room v1)."""
        self.peer.canned[2] = (500, {"errcode": "M_UNKNOWN", "error": "Internal server error"})
        error = self.refused("1")
        self.assertEqual((error.status, error.errcode), (500, "M_UNKNOWN"))
        self.assertEqual(len(self.peer.received), 1)

    def test_html_404_for_v3_plus(self) -> None:
        """An HTML 404 for a v3+ room is refused at once: no v1 for those rooms."""
        self.peer.canned[2] = (404, b"<html>Not Found</html>")
        error = self.refused("3")
        self.assertEqual((error.status, error.errcode), (404, None))
        self.assertEqual(error.message, "HTTP 404 Not Found: body is not JSON")
        self.assertEqual([api for api, _, _ in self.peer.received], [2])

    def test_fallback_conditions(self) -> None:
        """Only 404/405 without errcode or M_UNRECOGNIZED, and 400 M_UNRECOGNIZED, mean "no v2"."""
        falls_back = [
            (404, b"not found"),
            (404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}),
            (405, b""),
            (405, {"error": "no"}),
            (405, {"errcode": "M_UNRECOGNIZED"}),
            (400, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}),
        ]
        for canned in falls_back:
            self.peer.canned[2] = canned
            self.peer.received.clear()
            event, state = self.origin.invite("2")
            self.successResultOf(self.origin.send("2", event, state))
            self.assertEqual([api for api, _, _ in self.peer.received], [2, 1], canned)
        refused = [
            (404, {"errcode": "M_NOT_FOUND", "error": "No such room"}),
            (400, {"errcode": "M_UNKNOWN", "error": "Bad"}),
            (400, {"errcode": "M_INVALID_PARAM", "error": "Bad"}),
            (403, {"errcode": "M_UNRECOGNIZED"}),
            (401, b"who are you"),
        ]
        for canned in refused:
            self.peer.canned[2] = canned
            self.peer.received.clear()
            error = self.refused("2")
            self.assertEqual(error.status, canned[0])
            self.assertEqual([api for api, _, _ in self.peer.received], [2], canned)

    def test_v1_refusal_after_fallback(self) -> None:
        """A refusal from v1 after the fallback says it came from v1."""
        self.peer.canned[2] = (404, b"")
        self.peer.canned[1] = (403, {"errcode": "M_FORBIDDEN", "error": "No"})
        error = self.refused("1")
        self.assertEqual((error.status, error.errcode, error.api_version), (403, "M_FORBIDDEN", 1))


class TransportTests(_Base):
    """No answer at all: InviteTransportError, never a refusal."""

    def transport_error(self, deferred: Deferred[Any]) -> InviteTransportError:
        error = self.failureResultOf(deferred, InviteTransportError).value
        self.assertIsInstance(error, TransportError)
        self.assertNotIsInstance(error, RemoteError)
        self.assertEqual(error.destination, PEER)
        return error

    def test_hang_times_out(self) -> None:
        """A peer that never answers: the client's timeout fires (Clock)."""
        peer = FakePeer(self.origin.clock)
        peer.hang = True
        self.origin.agent.add_peer(PEER, peer.root)
        event, state = self.origin.invite("10")
        deferred = self.origin.send("10", event, state)
        self.assertNoResult(deferred)
        self.origin.clock.advance(TIMEOUT)
        error = self.transport_error(deferred)
        self.assertEqual(error.reason, "timed out after 30 s")
        self.assertEqual(str(error), f"cannot reach {PEER}: timed out after 30 s")

    def test_connection_refused(self) -> None:
        """A peer that cannot be reached."""
        event, state = self.origin.invite("10")
        error = self.transport_error(self.origin.send("10", event, state))
        self.assertIn("no fake peer named peer.example", error.reason)

    def test_not_sent_flags_kept(self) -> None:
        """An invite not sent for a cause of ours fails with an InviteTransportError keeping
        the client's ``not_sent`` and ``waited`` (a retry is safe: the peer never saw it):
        out of file descriptors (EMFILE), and timed out waiting for its turn behind 8 invites
        in flight to the peer; those 8, sent and timed out, have neither (diff3 review)."""

        class OutOfFiles:
            def request(self, method: bytes, uri: bytes, *args: Any, **kwargs: Any) -> Any:
                return fail(ConnectBindError(errno.EMFILE, "Too many open files"))

        agent = self.origin.client._agent
        self.origin.client._agent = OutOfFiles()  # type: ignore[assignment]
        event, state = self.origin.invite("10")
        error = self.transport_error(self.origin.send("10", event, state))
        self.assertEqual(error.reason, "not sent: out of file descriptors (EMFILE)")
        self.assertEqual((error.not_sent, error.waited), (True, False))
        self.origin.client._agent = agent
        peer = FakePeer(self.origin.clock)
        peer.hang = True
        self.origin.agent.add_peer(PEER, peer.root)
        sending = [self.origin.send("10", event, state) for _ in range(9)]
        self.origin.clock.advance(0)
        self.assertEqual(len(peer.received), 8)
        self.origin.clock.advance(TIMEOUT)
        errors = [self.transport_error(deferred) for deferred in sending]
        self.assertEqual(
            [(error.not_sent, error.waited) for error in errors],
            [(False, False)] * 8 + [(True, True)],
        )
        self.assertTrue(errors[-1].reason.startswith("not sent: timed out after 30 s waiting"))

    def test_every_flag_kept(self) -> None:
        """Each of the client's TransportError flags (resolver_busy, abandoned, not_sent,
        waited) is kept on the InviteTransportError, with the reason and the cause: an
        embedder tells "ours, retry" from "the peer is down" by them."""
        flags = ("resolver_busy", "abandoned", "not_sent", "waited")

        class Client:
            error: TransportError

            def put_json(self, *args: Any, **kwargs: Any) -> Any:
                return fail(self.error)

        client = Client()
        self.origin.sender._client = client  # type: ignore[assignment]
        for flag in flags:
            error = client.error = TransportError(PEER, f"because {flag}", **{flag: True})
            event, state = self.origin.invite("10")
            raised = self.transport_error(self.origin.send("10", event, state))
            self.assertEqual(raised.reason, f"because {flag}")
            self.assertEqual(
                {name: getattr(raised, name) for name in flags},
                {name: name == flag for name in flags},
            )
            self.assertIs(raised.__cause__, error)

    def test_back_off_does_not_stop_invites(self) -> None:
        """An invite is sent even while the client backs its server off (a user asked for it,
        as Synapse sends invites with ignore_backoff): after a 500, or a failed key fetch,
        the next invite reaches the peer; the 500 still backs the server off for the rest."""
        peer = FakePeer(self.origin.clock)
        peer.canned[2] = (500, b"down")
        self.origin.agent.add_peer(PEER, peer.root)
        event, state = self.origin.invite("10")
        self.assertEqual(
            self.failureResultOf(self.origin.send("10", event, state), InviteRefused).value.status,
            500,
        )
        self.failureResultOf(self.origin.client.get_json(PEER, "/x"), BackoffError)
        del peer.canned[2]
        self.origin.clock.advance(5)
        result = self.successResultOf(self.origin.send("10", event, state))
        self.assertIn(PEER, result["signatures"])
        self.assertEqual([api for api, _, _ in peer.received], [2, 2])
        self.assertEqual(self.origin.client._backoff, {})

    def test_failed_key_fetch_does_not_stop_invites(self) -> None:
        """A key fetch from the invitee's server that failed (which backs it off in the
        client) does not keep an invite to it from being sent."""
        event, state = self.origin.invite("10")
        self.assertEqual(
            self.successResultOf(self.origin.keyring.get_server_keys(PEER, ["ed25519:x"], 0)),
            {},
        )
        self.failureResultOf(self.origin.client.get_json(PEER, "/x"), BackoffError)
        peer = FakePeer(self.origin.clock)
        peer.canned[2] = (403, {"errcode": "M_FORBIDDEN", "error": "no"})
        self.origin.agent.add_peer(PEER, peer.root)
        self.origin.clock.advance(30)
        error = self.failureResultOf(self.origin.send("10", event, state), InviteRefused).value
        self.assertEqual((error.status, error.errcode), (403, "M_FORBIDDEN"))
        self.assertEqual([api for api, _, _ in peer.received], [2])

    def test_failed_key_fetch_does_not_fail_the_answer_check(self) -> None:
        """A failed key fetch from the invitee's server (which backs it off in the keyring for
        1 min) does not fail the check of its co-signed answer: a server that has just
        answered is up, so its key is fetched all the same (as Synapse's key fetches ignore
        back-off), and that fetch ends the keyring's back-off."""
        event, state = self.origin.invite("10")
        self.assertEqual(
            self.successResultOf(self.origin.keyring.get_server_keys(PEER, ["ed25519:x"], 0)),
            {},
        )
        self.assertEqual(self.origin.keyring.fetch_failures, 1)
        peer = FakePeer(self.origin.clock)
        self.origin.agent.add_peer(PEER, peer.root)
        self.origin.clock.advance(30)
        result = self.successResultOf(self.origin.send("10", event, state))
        self.assertEqual(result["signatures"].keys(), {OURS, PEER})
        self.assertEqual(self.origin.keyring.fetches, 2)
        # The back-off ended: only the 5 s pause after an answer is left.
        self.assertEqual(self.origin.keyring._backoff[PEER].delay_ms, 5_000)

    def test_failed_key_fetch_does_not_fail_the_answer_check_via(self) -> None:
        """Sent through another ``destination``, the invite's success does not end the
        client's back-off of the invitee's server; the answer check still fetches that
        server's key (the client's back-off is passed by, as the keyring's is)."""
        event, state = self.origin.invite("10")
        self.successResultOf(self.origin.keyring.get_server_keys(PEER, ["ed25519:x"], 0))
        self.assertEqual(self.origin.keyring.fetch_failures, 1)
        peer = FakePeer(self.origin.clock)
        self.origin.agent.add_peer(PEER, peer.root)
        self.origin.agent.add_peer("alias.example:8448", peer.root)
        self.origin.clock.advance(30)
        result = self.successResultOf(
            self.origin.send("10", event, state, destination="alias.example:8448")
        )
        self.assertEqual(result["signatures"].keys(), {OURS, PEER})
        self.assertEqual(self.origin.keyring.fetches, 2)

    def test_cancel(self) -> None:
        """Cancelling the Deferred abandons the request (CancelledError, not a transport error)."""
        peer = FakePeer(self.origin.clock)
        peer.hang = True
        self.origin.agent.add_peer(PEER, peer.root)
        event, state = self.origin.invite("10")
        deferred = self.origin.send("10", event, state)
        deferred.cancel()
        self.failureResultOf(deferred, CancelledError)


class BeforeSendingTests(_Base):
    """The caller's mistakes are caught before anything is sent; the signer signs what is missing."""

    def setUp(self) -> None:
        super().setUp()
        self.peer = FakePeer(self.origin.clock)
        self.origin.agent.add_peer(PEER, self.peer.root)

    def not_sendable(self, room_version: str, event: Any, state: Any = (), **kwargs: Any) -> str:
        error = self.failureResultOf(
            self.origin.send(room_version, event, state, **kwargs), InviteNotSendable
        ).value
        self.assertIsInstance(error, ValueError)
        self.assertEqual(str(error), f"invite not sent: {error.reason}")
        self.assert_nothing_sent()
        return error.reason

    def assert_not_sendable_signed_or_not(
        self, room_version: str, event: Any, state: Any, expected: str
    ) -> None:
        """``event`` is refused unsent with ``expected``, as it is and once signed by the origin."""
        self.assertEqual(self.not_sendable(room_version, event, state), expected)
        signed = hash_and_sign_event(
            KNOWN_ROOM_VERSIONS[room_version], event, OURS, self.origin.key
        )
        self.assertEqual(self.not_sendable(room_version, signed, state), expected)

    def test_invitee_of_our_own_refused(self) -> None:
        """Inviting one of our own users over federation is refused: the only co-signature
        there could be is ours."""
        event, state = self.origin.invite("10")
        event = {**event, "state_key": event["sender"]}
        reason = self.not_sendable("10", event, state, destination=PEER)
        self.assertIn("is one of our own users", reason)

    def test_unsigned_event_hashed_and_signed(self) -> None:
        """An event without hashes is hashed and signed through the signer, then sent."""
        event, state = self.origin.invite("10")
        result = self.successResultOf(self.origin.send("10", event, state))
        self.assertEqual(self.origin.signer.calls, ["hash_and_sign_event"])
        self.assertTrue(check_content_hash(KNOWN_ROOM_VERSIONS["10"], result))
        self.assertNotIn("hashes", event)  # the caller's event is untouched

    def test_hashed_event_signed(self) -> None:
        """An event with hashes but no signature of ours is only signed."""
        event, state = self.origin.invite("10")
        hashed = add_content_hash(KNOWN_ROOM_VERSIONS["10"], event)
        result = self.successResultOf(self.origin.send("10", hashed, state))
        self.assertEqual(self.origin.signer.calls, ["sign_event"])
        self.assertEqual(result["hashes"], hashed["hashes"])

    def test_signed_event_sent_as_is(self) -> None:
        """An event already hashed and signed by us goes out unchanged."""
        event, state = self.origin.signed_invite("10")
        self.successResultOf(self.origin.send("10", event, state))
        self.assertEqual(self.origin.signer.calls, [])
        self.assertEqual(self.peer.received[0][2]["event"], event)

    def test_v2_body_and_path(self) -> None:
        """The v2 body carries room_version, the event and invite_room_state as given."""
        event, state = self.origin.signed_invite("3")
        state.append(
            {"type": "m.room.name", "state_key": "", "content": {"name": "x"}, "sender": ALICE}
        )
        self.successResultOf(self.origin.send("3", event, state))
        _, uri, body = self.peer.received[0]
        self.assertEqual(body, {"room_version": "3", "event": event, "invite_room_state": state})
        event_id = compute_event_id(KNOWN_ROOM_VERSIONS["3"], event)
        quoted = event_id.replace("+", "%2B").replace("/", "%2F").replace("$", "%24")
        room = event["room_id"].replace("!", "%21").replace(":", "%3A")
        self.assertEqual(uri.decode(), f"/_matrix/federation/v2/invite/{room}/{quoted}")

    def test_explicit_destination(self) -> None:
        """An explicit destination is where we connect; the request is still addressed
        (X-Matrix destination) to the invitee's server, which must co-sign."""
        self.origin.agent.add_peer("alias.example:8448", self.peer.root)
        event, state = self.origin.invite("10")
        result = self.successResultOf(
            self.origin.send("10", event, state, destination="alias.example:8448")
        )
        self.assertEqual(result["signatures"].keys(), {OURS, PEER})
        _, url, headers = self.origin.agent.requests[0]
        self.assertTrue(url.startswith(b"https://alias.example:8448/"))
        [authorization] = headers.getRawHeaders(b"authorization")
        self.assertEqual(parse_xmatrix(authorization).destination, PEER)

    def test_explicit_destination_same_as_invitees(self) -> None:
        """An explicit destination equal to the invitee's server is the default route."""
        event, state = self.origin.invite("10")
        self.successResultOf(self.origin.send("10", event, state, destination=PEER))
        _, url, headers = self.origin.agent.requests[0]
        self.assertTrue(url.startswith(f"https://{PEER}/".encode()))
        [authorization] = headers.getRawHeaders(b"authorization")
        self.assertEqual(parse_xmatrix(authorization).destination, PEER)

    def test_v12_requires_full_create_event(self) -> None:
        """Room v12 without the full m.room.create PDU in invite_room_state is refused unsent."""
        event, state = self.origin.invite("12")
        self.assertEqual(
            self.not_sendable("12", event, []),
            "room version 12 requires the room's full m.room.create event (with hashes and "
            "signatures) in invite_room_state",
        )
        create = state[0]
        stripped = {k: create[k] for k in ("type", "state_key", "content", "sender")}
        self.assertEqual(
            self.not_sendable("12", event, [stripped]),
            "room version 12 requires the room's full m.room.create event (with hashes and "
            "signatures) in invite_room_state (only a stripped one was given)",
        )

    def test_v12_stripped_create_beside_full_refused(self) -> None:
        """Room v12: a stripped m.room.create beside the full one is refused unsent and unsigned,
        with our receiver's reason (it answers 400 M_INVALID_PARAM for it)."""
        event, state = self.origin.invite("12")
        create = state[0]
        stripped = {k: create[k] for k in ("type", "state_key", "content", "sender")}
        for room_state in (
            [create, stripped],
            [stripped, create],
            [create, {**stripped, "state_key": "x"}],
        ):
            self.assertEqual(
                self.not_sendable("12", event, room_state),
                "invite_room_state holds a stripped m.room.create event",
            )
        self.assertEqual(self.origin.signer.calls, [])

    def test_v12_create_of_another_room(self) -> None:
        """Room v12: the create event must be the one whose hash is the room ID."""
        event, _ = self.origin.invite("12")
        _, other_state = self.origin.invite("12", now_ms=self.origin.now_ms() + 1)
        other_room = room_id_for_create_event(KNOWN_ROOM_VERSIONS["12"], other_state[0])
        self.assertEqual(
            self.not_sendable("12", event, other_state),
            f"the m.room.create event in invite_room_state is the one of room {other_room}, "
            f"not of {event['room_id']!r}",
        )

    def test_v12_create_that_cannot_be_hashed(self) -> None:
        """Room v12: a create event with non-object content cannot be hashed."""
        event, state = self.origin.invite("12")
        broken = {**state[0], "content": "x"}
        self.assertEqual(
            self.not_sendable("12", event, [broken]),
            "the m.room.create event cannot be hashed: event content is not an object",
        )

    def test_v12_create_event_without_hashes_or_signatures_refused(self) -> None:
        """Room v12: a create event with hashes but no signatures (or signatures but no hashes)
        is not the full PDU, and is refused unsent as a stripped one."""
        event, state = self.origin.invite("12")
        for missing in ("signatures", "hashes"):
            partial = {k: v for k, v in state[0].items() if k != missing}
            self.assertEqual(
                self.not_sendable("12", event, [partial]),
                "room version 12 requires the room's full m.room.create event (with hashes and "
                "signatures) in invite_room_state (only a stripped one was given)",
                missing,
            )

    def test_v12_other_state_events_sent_along(self) -> None:
        """Room v12: other state events in invite_room_state (state_key "" too, such as the
        join rules) are not taken for the create event, and are sent as given."""
        event, state = self.origin.invite("12")
        join_rules = {**state[0], "type": "m.room.join_rules", "content": {"join_rule": "invite"}}
        self.successResultOf(self.origin.send("12", event, [join_rules, state[0]]))
        self.assertEqual(self.peer.received[0][2]["invite_room_state"], [join_rules, state[0]])

    def test_v1_to_v11_room_state_not_required(self) -> None:
        """Before v12 an empty invite_room_state is sent as given (Synapse's tests do so)."""
        event, _ = self.origin.invite("11")
        self.successResultOf(self.origin.send("11", event, []))
        self.assertEqual(self.peer.received[0][2]["invite_room_state"], [])

    def test_room_state_defaults_to_empty(self) -> None:
        """Before v12, invite_room_state may be left out: an empty list is sent."""
        event, _ = self.origin.invite("11")
        self.successResultOf(self.origin.sender.send_invite("11", event))
        self.assertEqual(self.peer.received[0][2]["invite_room_state"], [])

    def test_not_an_invite(self) -> None:
        """Only m.room.member invites by our users for user IDs are sent."""
        event, _ = self.origin.invite("10")
        cases = [
            ("not an object", [event], "the event is not a JSON object"),
            (
                "type",
                {**event, "type": "m.room.message"},
                "the event is not an m.room.member event",
            ),
            (
                "join",
                {**event, "content": {"membership": "join"}},
                "the event's membership is not 'invite'",
            ),
            ("content", {**event, "content": "invite"}, "the event's membership is not 'invite'"),
            ("state_key", {**event, "state_key": "bob"}, "the state_key 'bob' is not a user ID"),
            (
                "sender",
                {**event, "sender": "@eve:evil.example"},
                f"the sender '@eve:evil.example' is not a user of our server {OURS}",
            ),
            (
                "no sender",
                {k: v for k, v in event.items() if k != "sender"},
                f"the sender 'None' is not a user of our server {OURS}",
            ),
        ]
        for what, bad, reason in cases:
            self.assertEqual(self.not_sendable("10", bad), reason, what)

    def test_bad_arguments(self) -> None:
        """Unknown room versions, bad destinations and room state that is not a list of objects."""
        event, state = self.origin.invite("10")
        self.assertEqual(self.not_sendable("99", event), "unknown room version '99'")
        self.assertEqual(
            self.not_sendable("10", event, destination="not a server"),
            "destination 'not a server' is not a server name",
        )
        self.assertEqual(
            self.not_sendable("10", event, {"type": "m.room.create"}),
            "invite_room_state must be a list of events",
        )
        self.assertEqual(
            self.not_sendable("10", event, "abc"), "invite_room_state must be a list of events"
        )
        self.assertEqual(
            self.not_sendable("10", event, [state[0], "x"]),
            "invite_room_state must hold only JSON objects",
        )

    def test_room_state_not_canonical_json(self) -> None:
        """invite_room_state that has no strict canonical JSON form is refused unsent and
        unsigned, as an InviteNotSendable."""
        event, state = self.origin.invite("10")
        cases = [
            (1.5, "floats are not allowed in canonical JSON"),
            (b"x", "bytes is not a JSON type"),
            (2**53, "integer 9007199254740992 is outside [-(2**53)+1, 2**53-1]"),
            (-(2**53), "integer -9007199254740992 is outside [-(2**53)+1, 2**53-1]"),
            (float("nan"), "floats are not allowed in canonical JSON"),
            ({1: "x"}, "object key 1 is not a string"),
            ("\ud800", "string is not valid Unicode (lone surrogate)"),
        ]
        for value, reason in cases:
            entry = {"type": "m.room.name", "state_key": "", "content": {"name": value}}
            self.assertEqual(
                self.not_sendable("10", event, [*state, entry]),
                f"invite_room_state is not strict canonical JSON: {reason}",
            )
        self.assertEqual(self.origin.signer.calls, [])

    def test_room_version_object_accepted(self) -> None:
        """The room version may be given as a RoomVersion."""
        event, state = self.origin.invite("9")
        self.successResultOf(self.origin.sender.send_invite(KNOWN_ROOM_VERSIONS["9"], event, state))

    def test_our_signature_without_hashes(self) -> None:
        """A signature of ours without hashes is stale: refused rather than re-signed."""
        event, _ = self.origin.signed_invite("10")
        del event["hashes"]
        self.assertEqual(
            self.not_sendable("10", event), "the event carries our signature but no hashes"
        )
        self.assertEqual(self.origin.signer.calls, [])

    def test_wrong_content_hash(self) -> None:
        """A pre-hashed event whose content changed since is refused."""
        version = KNOWN_ROOM_VERSIONS["10"]
        event, _ = self.origin.invite("10")
        hashed = add_content_hash(version, event)
        hashed["content"] = {"membership": "invite", "reason": "changed"}
        self.assertEqual(
            self.not_sendable("10", hashed), "the event's content hash (hashes.sha256) is wrong"
        )

    def test_bad_own_signature(self) -> None:
        """A pre-signed event whose signature of ours does not verify is refused."""
        version = KNOWN_ROOM_VERSIONS["10"]
        event, _ = self.origin.invite("10")
        forged = hash_and_sign_event(version, event, OURS, make_key("origin1"))
        self.assertEqual(
            self.not_sendable("10", forged),
            f"our signature on the event does not verify: Signature by {OURS} "
            "(ed25519:origin1) is invalid",
        )

    def test_invalid_pdu(self) -> None:
        """An event that is not a valid PDU of its room version is refused."""
        event, _ = self.origin.invite("10")
        del event["depth"]
        self.assertEqual(
            self.not_sendable("10", event),
            "the event is not a valid room version 10 PDU: Invalid PDU: missing the 'depth' key",
        )

    def test_too_large(self) -> None:
        """An event over 64 KiB is refused."""
        event, _ = self.origin.invite("10")
        event["content"] = {"membership": "invite", "reason": "x" * 70_000}
        reason = self.not_sendable("10", event)
        self.assertTrue(
            reason.startswith("the event is not a valid room version 10 PDU: PDU is "), reason
        )

    def test_floats_cannot_be_signed(self) -> None:
        """Room v3 tolerates floats from others, but we sign and send strict canonical JSON only."""
        event, _ = self.origin.invite("3")
        event["content"] = {"membership": "invite", "x": 1.5}
        reason = self.not_sendable("3", event)
        self.assertTrue(reason.startswith("the event cannot be signed: "), reason)

    def test_lax_pre_signed_event_not_sent(self) -> None:
        """A v3 event signed elsewhere with a float is refused: our client sends strict JSON."""
        version = KNOWN_ROOM_VERSIONS["3"]
        event, _ = self.origin.invite("3")
        event["content"] = {"membership": "invite", "x": 1.5}
        event["hashes"] = {"sha256": encode_base64(compute_content_hash(version, event))}
        signing_bytes = prepare_event(version, event, strict=False).signing_bytes
        event["signatures"] = {
            OURS: {"ed25519:origin1": sign_bytes(self.origin.key, signing_bytes)}
        }
        reason = self.not_sendable("3", event)
        self.assertTrue(reason.startswith("the event is not strict canonical JSON: "), reason)

    def test_v1_event_id_of_another_server(self) -> None:
        """Room v1/v2: the event ID must name our server, whose signature it requires."""
        event, _ = self.origin.invite("1")
        event["event_id"] = "$abc:elsewhere.example"
        self.assertEqual(self.not_sendable("1", event), f"the event_id must name our server {OURS}")

    def test_v3_plus_event_id_refused(self) -> None:
        """Room v3+: an event carrying an event_id (Synapse: 400 M_BAD_JSON) is refused
        before it is signed, or, signed already, before it is sent."""
        for room_version in ("3", "10", "12"):
            event, state = self.origin.invite(room_version)
            event["event_id"] = "$abc:origin.example"
            expected = (
                f"room version {room_version} events carry no event_id over federation "
                "(their ID is their reference hash): the event must be signed without it"
            )
            self.assert_not_sendable_signed_or_not(room_version, event, state, expected)
            self.assertEqual(self.origin.signer.calls, [])
        self.assertEqual(self.peer.received, [])

    def assert_sent_or_too_deep(self, event: Any, state: Any, limit: int | None) -> None:
        """A room v10 ``event`` goes out (``limit`` None), or is refused as nested deeper
        than ``limit`` levels before the signer is called."""
        if limit is None:
            self.successResultOf(self.origin.send("10", event, state))
            return
        calls = len(self.origin.signer.calls)
        self.assertEqual(
            self.not_sendable("10", event, state),
            "the event is not a valid room version 10 PDU: "
            f"Invalid PDU: nested deeper than {limit} levels",
        )
        self.assertEqual(len(self.origin.signer.calls), calls)

    def test_too_deep_refused_before_signing(self) -> None:
        """An event nested deeper than Synapse's PDU parser takes (128 levels, the event
        counted; tuples are arrays too) is refused before it is signed; 127 levels go out."""
        for levels, ok in ((128, False), (127, True)):
            event, state = self.origin.invite("10")
            deep: Any = 1
            for level in range(levels - 2):  # the event and its content are two levels
                deep = (deep,) if level % 2 else {"n": deep}
            event["content"] = {**event["content"], "deep": deep}
            self.assert_sent_or_too_deep(event, state, None if ok else 127)

    def test_signer_deepening_the_event_in_place_refused_after_signing(self) -> None:
        """A signer that nests the content past 127 levels by writing into the event's own
        nested objects (the top-level values stay the very objects checked before signing)
        is caught by the check after signing: nothing is sent."""
        sign = self.origin.local_signer.hash_and_sign_event

        def deepening(room_version: Any, event: dict[str, Any]) -> Any:
            event["content"]["deep"] = _deep(200)
            return sign(room_version, event)

        event, state = self.origin.invite("10")
        self.patch(self.origin.local_signer, "hash_and_sign_event", deepening)
        self.assertEqual(
            self.not_sendable("10", event, state),
            "the event is not a valid room version 10 PDU: "
            "Invalid PDU: nested deeper than 127 levels",
        )
        self.assertEqual(self.peer.received, [])

    def test_what_synapse_strips_is_not_counted(self) -> None:
        """Unsigned keys Synapse strips before its PDU parser (all but invite_room_state and
        knock_room_state) do not count toward the 127 levels: such an event goes out; past
        the 512 levels every body is bounded by, it is refused before signing."""
        for levels, ok in ((511, False), (300, True)):  # + the event and unsigned
            event, state = self.origin.invite("10")
            event["unsigned"] = {"x": _deep(levels)}
            self.assert_sent_or_too_deep(event, state, None if ok else 512)

    def test_v12_create_event_in_auth_events_refused(self) -> None:
        """Room v12: auth_events listing the create event (Synapse: 400 M_BAD_JSON) is
        refused before the event is signed, or, signed already, before it is sent."""
        event, state = self.origin.invite("12")
        create_id = "$" + event["room_id"][1:]
        event["auth_events"] = ("$" + "A" * 43, create_id)  # a tuple goes out as a list
        expected = (
            f"the event's auth_events list the room's m.room.create event {create_id}, "
            "which room version 12 never selects as an auth event"
        )
        self.assertEqual(self.not_sendable("12", event, state), expected)
        event["auth_events"] = [create_id]
        signed = hash_and_sign_event(KNOWN_ROOM_VERSIONS["12"], event, OURS, self.origin.key)
        self.assertEqual(self.not_sendable("12", signed, state), expected)
        self.assertEqual(self.origin.signer.calls, [])
        self.assertEqual(self.peer.received, [])
        # Before v12 the create event is an auth event like any other (test_invite lists it).
        event, state = self.origin.invite("11")
        self.assertEqual(event["auth_events"], event["prev_events"])
        self.successResultOf(self.origin.send("11", event, state))

    def test_member_unsigned_room_state_not_an_array_refused(self) -> None:
        """An invite whose unsigned knock_room_state or invite_room_state is neither an array
        nor null (Synapse's PDU parser: 400 M_BAD_JSON) is refused before it is signed, or,
        signed already, before it is sent; an array (a tuple too) or null goes out."""
        for key, value in (
            ("knock_room_state", 5),
            ("invite_room_state", {}),
            ("knock_room_state", "x"),
        ):
            for room_version in ("1", "10"):
                event, state = self.origin.invite(room_version)
                event["unsigned"] = {"age": 1, key: value}
                expected = f"'unsigned' {key!r} of an m.room.member event must be an array or null"
                self.assert_not_sendable_signed_or_not(room_version, event, state, expected)
        self.assertEqual(self.origin.signer.calls, [])
        self.assertEqual(self.peer.received, [])
        for value in ((1,), None):
            event, state = self.origin.invite("10")
            event["unsigned"] = {"knock_room_state": value}
            self.successResultOf(self.origin.send("10", event, state))


def _with_event_id(event: dict[str, Any]) -> dict[str, Any]:
    return {**event, "event_id": "$anything"}


def _listing_the_create_event(event: dict[str, Any]) -> dict[str, Any]:
    return {**event, "auth_events": [*event["auth_events"], "$" + event["room_id"][1:]]}


def _room_state_no_array(event: dict[str, Any], key: str) -> dict[str, Any]:
    return {**event, "unsigned": {**event.get("unsigned", {}), key: 5}}


def _deep(levels: int) -> Any:
    deep: Any = 1
    for _ in range(levels):
        deep = {"n": deep}
    return deep


def _too_deep(event: dict[str, Any]) -> dict[str, Any]:
    deep: Any = 1
    for _ in range(126):  # + content + the event: 128 levels
        deep = {"n": deep}
    return {**event, "content": {**event["content"], "deep": deep}}


def _hash_of_no_string(room_version: RoomVersion, event: dict[str, Any]) -> dict[str, Any]:
    hashed = add_content_hash(room_version, event)
    return {**hashed, "hashes": {**hashed["hashes"], "sha512": 1}}


def _deep_room_state(state: list[dict[str, Any]]) -> list[dict[str, Any]]:
    deep: Any = 1
    for _ in range(123):  # + content + the entry: 125 levels
        deep = {"n": deep}
    return [
        *state,
        {
            "type": "m.room.name",
            "state_key": "",
            "sender": ALICE,
            "content": {"name": "x", "deep": deep},
        },
    ]


class InboundOutboundAgreementTests(_Base):
    """What our receiving side refuses as malformed, our sending side refuses before anything
    is signed, so that the two cannot drift apart again: for each shape Synapse's PDU parser
    refuses (v3+ event_id, a v12 auth_events listing the create event, nesting past 127
    levels, a hashes value that is no string, an m.room.member event's unsigned
    knock_room_state or invite_room_state that is no array, a room-state entry nested past
    124 levels), the outbound check fails with
    InviteNotSendable without calling the signer or sending, and the same event, signed by
    us and PUT as is to our own receiver, is refused with the status and errcode given."""

    SHAPES: list[tuple[str, str, Callable[[RoomVersion, dict[str, Any]], Any], int, str]] = [
        ("v3+ event_id", "10", lambda rv, e: _with_event_id(e), 400, "M_BAD_JSON"),
        ("v3+ event_id", "3", lambda rv, e: _with_event_id(e), 400, "M_BAD_JSON"),
        (
            "create event in auth_events",
            "12",
            lambda rv, e: _listing_the_create_event(e),
            400,
            "M_BAD_JSON",
        ),
        ("nested 128 deep", "10", lambda rv, e: _too_deep(e), 400, "M_BAD_JSON"),
        ("nested 128 deep", "1", lambda rv, e: _too_deep(e), 400, "M_BAD_JSON"),
        ("hash of no string", "10", _hash_of_no_string, 400, "M_BAD_JSON"),
        ("hash of no string", "12", _hash_of_no_string, 400, "M_BAD_JSON"),
        (
            "unsigned knock_room_state no array",
            "10",
            lambda rv, e: _room_state_no_array(e, "knock_room_state"),
            400,
            "M_BAD_JSON",
        ),
        (
            "unsigned knock_room_state no array",
            "1",
            lambda rv, e: _room_state_no_array(e, "knock_room_state"),
            400,
            "M_BAD_JSON",
        ),
        (
            "unsigned invite_room_state no array",
            "10",
            lambda rv, e: _room_state_no_array(e, "invite_room_state"),
            400,
            "M_BAD_JSON",
        ),
    ]
    #: Room state that Synapse's PDU parser refuses, which it parses inside the event's
    #: unsigned (v2 moves it there): an entry nested 125 deep, the entry counted.
    ROOM_STATE_SHAPES: list[tuple[str, str, Callable[[list[dict[str, Any]]], Any], int, str]] = [
        ("room-state entry nested 125 deep", "10", _deep_room_state, 400, "M_BAD_JSON"),
        ("room-state entry nested 125 deep", "1", _deep_room_state, 400, "M_BAD_JSON"),
    ]

    def test_inbound_and_outbound_agree(self) -> None:
        receiver = Receiver(self.origin)
        self.origin.agent.add_peer(PEER, receiver.site())
        cases = [
            (what, version_id, shape, None, status, errcode)
            for what, version_id, shape, status, errcode in self.SHAPES
        ] + [
            (what, version_id, None, state_shape, status, errcode)
            for what, version_id, state_shape, status, errcode in self.ROOM_STATE_SHAPES
        ]
        for what, version_id, shape, state_shape, status, errcode in cases:
            room_version = KNOWN_ROOM_VERSIONS[version_id]
            event, state = self.origin.invite(version_id)
            shaped = event if shape is None else shape(room_version, event)
            if state_shape is not None:
                state = state_shape(state)
            # Outbound: refused before the signer is asked, and nothing sent.
            calls = len(self.origin.signer.calls)
            requests = len(self.origin.agent.requests)
            self.failureResultOf(self.origin.send(version_id, shaped, state), InviteNotSendable)
            self.assertEqual(len(self.origin.signer.calls), calls, what)
            self.assertEqual(len(self.origin.agent.requests), requests, what)
            # Inbound: the same event signed by us, sent as is, is refused.
            if "hashes" in shaped:
                signed = sign_event(room_version, shaped, OURS, self.origin.key)
            else:
                signed = hash_and_sign_event(room_version, shaped, OURS, self.origin.key)
            event_id = compute_event_id(room_version, signed)
            if room_version.event_id_in_event:
                # v1: the room state rides in the event's unsigned (outside the signatures).
                api = "v1"
                body = {
                    **signed,
                    "unsigned": {**signed.get("unsigned", {}), "invite_room_state": state},
                }
            else:
                api = "v2"
                body = {"room_version": version_id, "event": signed, "invite_room_state": state}
            path = f"/_matrix/federation/{api}/invite/{quote(signed['room_id'], safe='')}/" + (
                quote(event_id, safe="")
            )
            error = self.failureResultOf(
                self.origin.client.put_json(PEER, path, body, ignore_backoff=True), RemoteError
            ).value
            self.assertEqual((error.status, error.errcode), (status, errcode), (what, version_id))
        self.assertEqual(receiver.store.invites, {})


class SignerTests(_Base):
    """The ISigner seam: a signer missing a method is refused when the parts are assembled;
    one that fails makes send_invite fail with InviteNotSendable, its error the cause."""

    def setUp(self) -> None:
        super().setUp()
        self.peer = FakePeer(self.origin.clock)
        self.origin.agent.add_peer(PEER, self.peer.root)

    def sender_with(self, signer: Any) -> InviteSender:
        return InviteSender(signer, self.origin.client, self.origin.keyring)

    def components_with(self, signer: Any) -> FederationInvite:
        """The parts ``build_components`` assembles around ``signer`` (on a memory store)."""
        return build_components(
            load_config(None, {"server_name": OURS}),
            self.origin.clock,
            MemoryStore(),  # type: ignore[arg-type]
            self.origin.key,
            signer=signer,
        )

    def test_incomplete_signer_refused_by_build_components(self) -> None:
        """build_components refuses, with a TypeError naming what is missing, a signer without
        server_name or a callable sign_event and hash_and_sign_event (so a signer with only
        sign_event cannot fail send_invite later with an AttributeError)."""

        class OnlySignEvent:
            server_name = OURS

            def sign_event(self, room_version: Any, event: Any, prepared: Any = None) -> Any:
                raise AssertionError("not called")

        class NoServerName:
            sign_event = hash_and_sign_event = staticmethod(lambda *args: None)

        class NotCallable:
            server_name = OURS
            sign_event = "sign"
            hash_and_sign_event = staticmethod(lambda *args: None)

        for signer, missing in (
            (OnlySignEvent(), "hash_and_sign_event"),
            (NoServerName(), "server_name"),
            (NotCallable(), "sign_event"),
        ):
            error = self.assertRaises(TypeError, self.components_with, signer)
            self.assertIn(missing, str(error))
            self.assertIn("ISigner", str(error))
            self.assertRaises(TypeError, self.sender_with, signer)
            data_dir = self.mktemp()
            building = Deferred.fromCoroutine(
                build_from_config(
                    load_config(None, {"server_name": OURS, "data_dir": data_dir}),
                    self.origin.clock,
                    signer=signer,
                )
            )
            self.assertIn(missing, str(self.failureResultOf(building, TypeError).value))
            self.assertFalse(os.path.exists(data_dir), "refused before opening anything")
        components = self.components_with(self.origin.signer)
        self.assertIs(components.signer, self.origin.signer)

    def test_signer_server_name_not_a_str_refused(self) -> None:
        """A signer whose server_name is not a str (bytes, None) is refused when the parts are
        assembled, not on the first invite (sign_json keys the signature by it)."""

        class NameNotAStr:
            server_name: Any = None
            sign_event = hash_and_sign_event = staticmethod(lambda *args: None)

        for name in (OURS.encode(), None):
            NameNotAStr.server_name = name
            error = self.assertRaises(TypeError, self.components_with, NameNotAStr())
            self.assertEqual(
                str(error), "NameNotAStr is not an ISigner: it has no server_name (a str)"
            )
            self.assertRaises(TypeError, self.sender_with, NameNotAStr())

    def test_every_missing_part_named(self) -> None:
        """A signer lacking several parts: the TypeError names each of them."""
        error = self.assertRaises(TypeError, check_signer, object())
        self.assertEqual(
            str(error),
            "object is not an ISigner: it has no sign_event, no hash_and_sign_event,"
            " no server_name (a str)",
        )

    def test_failing_signer(self) -> None:
        """A signer that raises, or whose Deferred fails, with any error makes send_invite fail
        with InviteNotSendable (an InviteError) whose cause is the signer's error; nothing is
        sent."""

        class FailingSigner:
            server_name = OURS

            def __init__(self, error: Exception, raises: bool) -> None:
                self.error = error
                self.raises = raises

            def _fail(self) -> Deferred[dict[str, Any]]:
                if self.raises:
                    raise self.error
                return fail(self.error)

            def sign_event(self, room_version: Any, event: Any, prepared: Any = None) -> Any:
                return self._fail()

            def hash_and_sign_event(self, room_version: Any, event: Any) -> Any:
                return self._fail()

        event, state = self.origin.invite("10")
        hashed = add_content_hash(KNOWN_ROOM_VERSIONS["10"], event)
        for error in (RuntimeError("HSM offline"), ConnectionRefusedError(), KeyError("k")):
            for raises in (True, False):
                for unsigned in (event, hashed):
                    sender = self.sender_with(FailingSigner(error, raises))
                    failure = self.failureResultOf(
                        sender.send_invite("10", unsigned, state), InviteNotSendable
                    )
                    self.assertIs(failure.value.__cause__, error)
                    self.assertTrue(failure.value.reason.startswith("the event cannot be signed: "))
        self.assert_nothing_sent()

    def test_signer_invite_error_and_cancel_kept(self) -> None:
        """An InviteError from the signer is raised as it is, and cancelling send_invite while
        the signer works cancels it (CancelledError), neither turned into InviteNotSendable."""
        refused = InviteRefused(PEER, 403, "M_FORBIDDEN", "no")
        cancelled: list[Any] = []
        pending: Deferred[dict[str, Any]] = Deferred(cancelled.append)

        class Signer:
            server_name = OURS
            answer: Any = None

            def sign_event(self, room_version: Any, event: Any, prepared: Any = None) -> Any:
                return self.answer

            def hash_and_sign_event(self, room_version: Any, event: Any) -> Any:
                return self.answer

        signer = Signer()
        event, state = self.origin.invite("10")
        signer.answer = fail(refused)
        failure = self.failureResultOf(
            self.sender_with(signer).send_invite("10", event, state), InviteRefused
        )
        self.assertIs(failure.value, refused)
        signer.answer = pending
        sending = self.sender_with(signer).send_invite("10", event, state)
        sending.cancel()
        self.failureResultOf(sending, CancelledError)
        self.assertEqual(cancelled, [pending])
        self.assert_nothing_sent()

    def test_signer_cancelled_itself(self) -> None:
        """A signer's own CancelledError, the caller not cancelling: InviteNotSendable."""

        class Signer:
            server_name = OURS

            def sign_event(self, room_version: Any, event: Any, prepared: Any = None) -> Any:
                return fail(CancelledError())

            def hash_and_sign_event(self, room_version: Any, event: Any) -> Any:
                return fail(CancelledError())

        event, state = self.origin.invite("10")
        hashed = add_content_hash(KNOWN_ROOM_VERSIONS["10"], event)
        for unsigned in (event, hashed):
            failure = self.failureResultOf(
                self.sender_with(Signer()).send_invite("10", unsigned, state), InviteNotSendable
            )
            self.assertIsInstance(failure.value.__cause__, CancelledError)
            self.assertTrue(failure.value.reason.startswith("the event cannot be signed: "))
        self.assert_nothing_sent()


class BuildTestInviteTests(SynchronousTestCase):
    """build_test_invite: a minimal invite to a new room, for every room version."""

    def setUp(self) -> None:
        self.key = make_key("origin1")
        self.signer = LocalSigner(OURS, self.key)

    def build(
        self, room_version: str, **kwargs: Any
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return self.successResultOf(
            build_test_invite(self.signer, room_version, ALICE, BOB, 1_700_000_000_000, **kwargs)
        )

    def test_every_room_version(self) -> None:
        """The create event and the (signed) invite are valid PDUs that reference each other."""
        for room_version in ALL_VERSIONS:
            version = KNOWN_ROOM_VERSIONS[room_version]
            invite, state = self.build(room_version)
            [create] = state
            check_event_format(version, create)
            invite_signed = hash_and_sign_event(version, invite, OURS, self.key)
            check_event_format(version, invite_signed)
            create_id = compute_event_id(version, create)
            prev = invite["prev_events"][0]
            self.assertEqual(prev[0] if isinstance(prev, list) else prev, create_id, room_version)
            self.assertEqual(invite["state_key"], BOB)
            self.assertEqual(invite["content"], {"membership": "invite"})
            self.assertEqual("creator" in create["content"], int(room_version) < 11, room_version)
            if room_version == "12":
                self.assertEqual(invite["room_id"], room_id_for_create_event(version, create))
                self.assertEqual(invite["auth_events"], [])
            else:
                self.assertEqual(create["room_id"], invite["room_id"])
                self.assertEqual(invite["auth_events"], invite["prev_events"])

    def test_chosen_room(self) -> None:
        """Before v12 the room may be chosen."""
        invite, state = self.build("10", room_id="!chosen:origin.example")
        self.assertEqual((invite["room_id"], state[0]["room_id"]), ("!chosen:origin.example",) * 2)

    def test_top_level_origin_before_v11_only(self) -> None:
        """Both events carry a top-level origin before v11, none from v11 (rooms/v11.md: the
        redaction algorithm no longer keeps it)."""
        for room_version in ALL_VERSIONS:
            invite, [create] = self.build(room_version)
            expected = int(room_version) < 11
            self.assertEqual(
                ("origin" in invite, "origin" in create), (expected,) * 2, room_version
            )

    def test_depths_and_fresh_ids(self) -> None:
        """The create event has depth 1 and the invite depth 2; each build makes a new room ID
        and, where events carry one (v1, v2), new distinct event IDs."""
        invite, [create] = self.build("1")
        again, [create_again] = self.build("1")
        self.assertEqual((create["depth"], invite["depth"]), (1, 2))
        event_ids = {e["event_id"] for e in (invite, create, again, create_again)}
        self.assertEqual(len(event_ids), 4)
        self.assertNotEqual(invite["room_id"], again["room_id"])
        self.assertNotEqual(self.build("10")[0]["room_id"], self.build("10")[0]["room_id"])

    def test_refusals(self) -> None:
        """v12 rooms cannot be chosen; senders must be ours; IDs must be valid."""
        cases = [
            (
                "12",
                ALICE,
                BOB,
                {"room_id": "!x:y"},
                "in room version 12 the room ID is the create event's hash: it cannot be chosen",
            ),
            (
                "10",
                "@eve:evil.example",
                BOB,
                {},
                f"the sender '@eve:evil.example' is not a user of our server {OURS}",
            ),
            ("10", ALICE, "bob", {}, "the invitee 'bob' is not a user ID"),
            ("10", ALICE, BOB, {"room_id": "room"}, "'room' is not a room ID"),
            ("13", ALICE, BOB, {}, "unknown room version '13'"),
        ]
        for room_version, sender, invitee, kwargs, reason in cases:
            error = self.failureResultOf(
                build_test_invite(self.signer, room_version, sender, invitee, 0, **kwargs),
                InviteNotSendable,
            ).value
            self.assertEqual(error.reason, reason)


class PublicNamesTests(SynchronousTestCase):
    def test_all(self) -> None:
        """Every name in outbound.__all__ exists, and every error is an InviteError."""
        for name in outbound.__all__:
            self.assertTrue(hasattr(outbound, name), name)
        for error in (InviteNotSendable, InviteRefused, InviteTransportError, InvalidInviteAnswer):
            self.assertTrue(issubclass(error, InviteError))
