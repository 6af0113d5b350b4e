"""Inbound invites through the real resource tree (StubTreq): one test per row of the issue's table,
plus acceptance for every room version on v1 and v2."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from federation_invite import inbound as inbound_module
from federation_invite import policy as policy_module
from federation_invite.auth import ServerAcl
from federation_invite.config import load_config
from federation_invite.core import canonical as canonical_module
from federation_invite.core import format as format_module
from federation_invite.core.canonical import encode_canonical_json, parse_json_with_numbers
from federation_invite.core.errors import MatrixError
from federation_invite.core.events import prepare_event, redact
from federation_invite.core.format import check_event_format
from federation_invite.core.keys import key_id_of, verify_key_of
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS, RoomVersion
from federation_invite.core.signing import (
    ServerVerifyKey,
    hash_and_sign_event,
    verify_event_signature,
)
from federation_invite.inbound import InviteLimits
from federation_invite.metrics import InviteMetrics
from federation_invite.policy import InvitePolicy
from federation_invite.service import build_components
from federation_invite.store import InviteRule, StoreError
from federation_invite.web import invite as invite_resource_module

from .invites import (
    ALICE,
    BOB,
    NOW_MS,
    THEM,
    US,
    InviteScenario,
    build_create_event,
    build_invite,
    event_id_of,
    stripped,
    v12_room,
)
from .support import MemoryStore, make_clock, make_key, source_tree_file


class InboundTestCase(SynchronousTestCase):
    scenario_kwargs: dict[str, Any] = {}

    def setUp(self) -> None:
        self.s = InviteScenario(**self.scenario_kwargs)

    def result(self, deferred: Deferred[Any]) -> tuple[int, Any]:
        self.stored_before = getattr(self, "stored_now", 0)
        self.s.client.flush()
        response = self.successResultOf(deferred)
        self.stored_now = len(self.s.store.invites)
        self.raw_answer = self.successResultOf(response.content())
        return response.code, json.loads(self.raw_answer)

    def send_v2(
        self,
        room_version: RoomVersion,
        event: dict[str, Any],
        room_state: list[Any] | None = None,
        *,
        room_id: str | None = None,
        event_id: str | None = None,
        body: Any = None,
        **kwargs: Any,
    ) -> tuple[int, Any]:
        if body is None:
            body = self.s.v2_body(room_version, event, room_state)
        return self.result(
            self.s.send(
                2,
                body,
                room_id=room_id or event.get("room_id", "!x:y"),
                event_id=event_id or event_id_of(room_version, event),
                **kwargs,
            )
        )

    def send_v1(self, event: dict[str, Any], **kwargs: Any) -> tuple[int, Any]:
        return self.result(
            self.s.send(1, event, room_id=event["room_id"], event_id=event["event_id"], **kwargs)
        )

    def send_as(self, origin: str, depth: int) -> Deferred[Any]:
        """Send a new invite from ``@alice:origin``, signed as ``origin`` (a spelling of ours
        serving our sender's key); the Deferred of the response."""
        self.s.federation.add_key_server(self.s.clock, origin, [self.s.their_key])
        room_version = KNOWN_ROOM_VERSIONS["10"]
        event = build_invite(
            room_version,
            self.s.their_key,
            sender=f"@alice:{origin}",
            server=origin,
            extra={"depth": depth},
        )
        return self.s.send(
            2,
            self.s.v2_body(room_version, event),
            room_id=event["room_id"],
            event_id=event_id_of(room_version, event),
            origin=origin,
        )

    def assertRefused(self, answer: tuple[int, Any], status: int, errcode: str) -> dict[str, Any]:
        code, body = answer
        self.assertEqual(
            (code, body.get("errcode") if isinstance(body, dict) else body), (status, errcode), body
        )
        self.assertIsInstance(body.get("error"), str)
        self.assertEqual(
            len(self.s.store.invites), self.stored_before, "a refused invite must not be stored"
        )
        return body

    def assertCoSigned(
        self, room_version: RoomVersion, sent: dict[str, Any], returned: dict[str, Any]
    ) -> None:
        """Only signatures changed, ours was added and verifies, theirs is intact."""
        self.assertEqual(
            {k: v for k, v in returned.items() if k != "signatures"},
            {k: v for k, v in sent.items() if k != "signatures"},
        )
        self.assertEqual(returned["signatures"][THEM], sent["signatures"][THEM])
        self.assertEqual(set(returned["signatures"]), {THEM, US})
        key = ServerVerifyKey(
            US, key_id_of(self.s.our_key), verify_key_of(self.s.our_key), 2**53 - 1
        )
        verify_event_signature(room_version, returned, US, {(US, key.key_id): key})

    def call_on_invite_unchecked(self, parse: Callable[..., Any]) -> None:
        """Have the resource parse bodies with ``parse`` and call on_invite with
        nesting_checked False, as an embedder calling it directly would."""
        on_invite = self.s.handler.on_invite

        async def unchecked(*args: Any) -> Any:
            return await on_invite(*args[:7], False)

        self.patch(self.s.handler, "on_invite", unchecked)
        self.patch(invite_resource_module, "parse_json_with_numbers", parse)

    def create_and_entries(
        self, room_version: RoomVersion, count: int
    ) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
        """A room's create event (by the origin), its room ID, and ``count`` full state
        entries of it sent by the creator just after."""
        create = build_create_event(room_version, self.s.their_key)
        room_id = create["room_id"]
        entries = self.many_entries(
            room_version,
            room_id,
            count,
            sender=create["sender"],
            origin_server_ts=create["origin_server_ts"] + 1,
        )
        return create, room_id, entries

    def many_entries(
        self,
        room_version: RoomVersion,
        room_id: str,
        count: int,
        *,
        sender: str = f"@carol:{THEM}",
        origin_server_ts: int = NOW_MS - 5_000,
    ) -> list[dict[str, Any]]:
        """``count`` distinct valid full state events of ``room_id`` (custom type), with an
        ``event_id`` of their own where the room version has one (v1, v2)."""
        return [
            hash_and_sign_event(
                room_version,
                {
                    "type": "org.example.many",
                    "state_key": f"k{n}",
                    "sender": sender,
                    "room_id": room_id,
                    "content": {"n": n},
                    **({"event_id": f"$e{n}:{THEM}"} if room_version.event_id_in_event else {}),
                    "origin_server_ts": origin_server_ts,
                    "depth": 2,
                    "prev_events": [],
                    "auth_events": [],
                },
                THEM,
                self.s.their_key,
            )
            for n in range(count)
        ]


class AcceptanceTests(InboundTestCase):
    scenario_kwargs = {"limits": InviteLimits(invitee_burst=100)}

    def test_v2_every_room_version(self) -> None:
        """v2 accepts a Synapse-style invite in every room version 1-12 and co-signs it."""
        for identifier, room_version in KNOWN_ROOM_VERSIONS.items():
            if room_version.room_id_is_create_event_hash:
                _, create, room_id = v12_room(self.s.their_key)
                event = build_invite(room_version, self.s.their_key, room_id=room_id)
                state = [create, stripped("m.room.join_rules", "", {"join_rule": "invite"})]
            else:
                event = build_invite(
                    room_version, self.s.their_key, extra={"depth": 12 + int(identifier)}
                )
                state = [
                    stripped(
                        "m.room.create", "", {"room_version": identifier}, "@creator:remote.example"
                    )
                ]
            code, body = self.send_v2(room_version, event, state)
            self.assertEqual(code, 200, (identifier, body))
            self.assertEqual(list(body), ["event"])
            self.assertCoSigned(room_version, event, body["event"])
            self.assertNotIn("event_id", body["event"]) if room_version.identifier not in (
                "1",
                "2",
            ) else None
            stored = self.s.store.invites[event_id_of(room_version, event)]
            self.assertEqual(
                (stored.room_version, stored.invitee, stored.sender, stored.origin),
                (identifier, BOB, ALICE, THEM),
            )
            self.assertEqual(stored.event, body["event"])
            self.assertEqual(stored.invite_room_state, state)
            self.assertEqual(stored.status, "pending")
        self.assertEqual(len(self.s.listened), 12)

    def test_v1_room_versions_1_and_2(self) -> None:
        """v1 accepts the bare event (room state in unsigned) and answers [200, {"event": ...}]."""
        for identifier in ("1", "2"):
            room_version = KNOWN_ROOM_VERSIONS[identifier]
            state = [stripped("m.room.create", "", {"creator": ALICE})]
            event = build_invite(
                room_version,
                self.s.their_key,
                extra={"unsigned": {"invite_room_state": state}, "depth": int(identifier)},
            )
            code, body = self.send_v1(event)
            self.assertEqual(code, 200, body)
            self.assertEqual(body[0], 200)
            self.assertEqual(list(body[1]), ["event"])
            self.assertCoSigned(room_version, event, body[1]["event"])
            self.assertEqual(body[1]["event"]["unsigned"], {"invite_room_state": state})
            self.assertEqual(self.s.store.invites[event["event_id"]].invite_room_state, state)

    def test_answer_is_the_stored_encoding(self) -> None:
        """The co-signed event is encoded once: the answer's bytes hold the stored text.

        v2 answers ``{"event":...}`` and v1 ``[200,{"event":...}]``, each the
        canonical encoding of what it holds; a retry is answered from the
        stored text.
        """
        room_version = KNOWN_ROOM_VERSIONS["10"]
        event = build_invite(room_version, self.s.their_key)
        code, body = self.send_v2(room_version, event)
        self.assertEqual(code, 200, body)
        stored = self.s.store.invites[event_id_of(room_version, event)]
        self.assertEqual(stored.event_json, encode_canonical_json(body["event"]).decode())
        self.assertEqual(self.raw_answer, b'{"event":' + stored.event_json.encode() + b"}")
        # The retry: answered from the stored record's text, not a new encoding.
        self.s.store.invites[stored.event_id] = attrs.evolve(
            stored, event_json=stored.event_json[:-1] + ',"zz":1}'
        )
        code, again = self.send_v2(room_version, event)
        self.assertEqual((code, again["event"]["zz"]), (200, 1))

        v1_version = KNOWN_ROOM_VERSIONS["1"]
        v1_event = build_invite(v1_version, self.s.their_key)
        code, body = self.send_v1(v1_event)
        self.assertEqual(code, 200, body)
        v1_stored = self.s.store.invites[v1_event["event_id"]]
        self.assertEqual(self.raw_answer, encode_canonical_json(body))
        self.assertEqual(self.raw_answer, b'[200,{"event":' + v1_stored.event_json.encode() + b"}]")

    def test_handler_answer_holds_what_its_encoding_says(self) -> None:
        """on_invite's answer (new, or a repeat answered from the stored text) carries the
        encoding the resource writes, and as a dict holds what that says (``{"event": ...}``),
        for whoever reads the value rather than the bytes: an embedder calling on_invite."""
        answers: list[Any] = []
        on_invite = self.s.handler.on_invite

        async def capturing(*args: Any) -> Any:
            answer = await on_invite(*args)
            answers.append(answer)
            return answer

        self.patch(self.s.handler, "on_invite", capturing)
        room_version, event = self.s.invite()
        for _ in ("new", "repeat"):
            code, body = self.send_v2(room_version, event)
            self.assertEqual(code, 200, body)
            self.assertEqual(dict(answers[-1]), body)
            self.assertEqual(answers[-1].canonical, self.raw_answer)
        self.assertEqual(len(answers), 2)

    def test_received_ts_is_the_arrival_time_in_ms(self) -> None:
        """The stored invite's received_ts is the time it arrived, in milliseconds since the
        epoch (the store's order and paging key)."""
        self.s.clock.advance(0.25)
        room_version, event = self.s.invite()
        self.assertEqual(self.send_v2(room_version, event)[0], 200)
        stored = self.s.store.invites[event_id_of(room_version, event)]
        self.assertEqual(stored.received_ts, NOW_MS + 250)

    def test_v1_assumes_room_version_1(self) -> None:
        """v1 checks the event under room version 1 rules: a v3-shaped event is malformed there."""
        room_version = KNOWN_ROOM_VERSIONS["4"]
        event = build_invite(room_version, self.s.their_key)
        answer = self.result(
            self.s.send(
                1, event, room_id=event["room_id"], event_id=event_id_of(room_version, event)
            )
        )
        self.assertRefused(answer, 400, "M_BAD_JSON")

    def test_unsigned_untouched_and_no_event_id_added(self) -> None:
        """The answer keeps the sender's unsigned as is and adds no event_id (v3+)."""
        room_version, event = self.s.invite("11", extra={"unsigned": {"age": 1, "x": [1, 2]}})
        code, body = self.send_v2(room_version, event)
        self.assertEqual(code, 200)
        self.assertEqual(body["event"]["unsigned"], {"age": 1, "x": [1, 2]})
        self.assertNotIn("event_id", body["event"])

    def test_percent_encoded_v3_event_id_with_slash(self) -> None:
        """A v3 event ID containing '/' and '+' routes correctly when percent-encoded."""
        room_version = KNOWN_ROOM_VERSIONS["3"]
        for depth in range(1, 400):
            event = build_invite(room_version, self.s.their_key, extra={"depth": depth})
            event_id = event_id_of(room_version, event)
            if "/" in event_id and "+" in event_id:
                break
        else:  # pragma: no cover
            self.fail("no v3 event ID with / and + found")
        code, body = self.send_v2(room_version, event, event_id=event_id)
        self.assertEqual(code, 200, body)
        self.assertIn(event_id, self.s.store.invites)

    def test_listener_failure_is_not_fatal(self) -> None:
        """A failing listener is logged and the invite is still answered."""

        def broken(record: Any) -> None:
            raise RuntimeError("listener bug")

        self.s.handler.add_listener(broken)
        room_version, event = self.s.invite()
        code, _ = self.send_v2(room_version, event)
        self.assertEqual(code, 200)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class PduNestingTests(InboundTestCase):
    """Row 2: Synapse's PDU parser refuses a PDU nested 128 levels deep (the event object
    counted), so an invite whose event is nested that deep is refused before it is co-signed:
    valid JSON, but not a well-formed event, 400 M_BAD_JSON (Synapse's "Invalid event JSON");
    127 levels are accepted. Past the 512 levels every body is bounded by, M_NOT_JSON. The v2 body wraps the
    event, so its limit is 128; Synapse parses the room state inside the event's unsigned,
    so its entries may nest 124 levels (the entry counted), on v2 as on v1."""

    scenario_kwargs = {"limits": InviteLimits(invitee_burst=100)}

    def deep_invite(self, room_version_id: str, levels: int) -> tuple[RoomVersion, dict[str, Any]]:
        """A signed invite whose event nests ``levels`` deep, through its content."""
        deep: Any = 1
        for _ in range(levels - 2):  # the event and its content are two levels
            deep = {"n": deep}
        content = {"membership": "invite", "deep": deep}
        room_version = KNOWN_ROOM_VERSIONS[room_version_id]
        return room_version, build_invite(
            room_version, self.s.their_key, extra={"content": content}
        )

    def test_v2_event_nesting_limit(self) -> None:
        room_version, event = self.deep_invite("10", 127)
        self.assertEqual(self.send_v2(room_version, event)[0], 200)
        room_version, event = self.deep_invite("10", 128)
        answer = self.assertRefused(self.send_v2(room_version, event), 400, "M_BAD_JSON")
        self.assertEqual(answer["error"], "JSON is nested deeper than 128 levels")

    def test_v1_event_nesting_limit(self) -> None:
        """On v1 the body is the event: its limit is 127."""
        _, event = self.deep_invite("1", 127)
        self.assertEqual(self.send_v1(event)[0], 200)
        _, event = self.deep_invite("1", 128)
        answer = self.assertRefused(self.send_v1(event), 400, "M_BAD_JSON")
        self.assertEqual(answer["error"], "JSON is nested deeper than 127 levels")

    def test_nesting_bounds_in_bodies_with_no_other_brackets(self) -> None:
        """Row 2 at its bounds in bodies with as many arrays and objects as they are deep (the
        parse walks a body for its depth only when it holds more of them than
        INVITE_BODY_BRACKETS): a v1 event of 127 levels passes the parse (then 401 here,
        unauthenticated), one of 128 is 400 M_BAD_JSON; a v2 room-state entry of 124 levels
        passes, one of 125 is 400 M_BAD_JSON."""

        def nest(levels: int) -> Any:
            value: Any = {}
            for _ in range(levels - 1):
                value = {"a": value}
            return value

        def put(version: int, body: Any) -> tuple[int, Any]:
            path = self.s.path(version, "!r:remote.example", "$e:remote.example")
            header = ['X-Matrix origin=remote.example,key="ed25519:x",sig="y"']
            return self.result(self.s.put_raw(path, json.dumps(body).encode(), headers=header))

        v1_bodies = {
            levels: {"type": "m.room.member", "content": nest(levels - 1)} for levels in (127, 128)
        }
        self.assertEqual(put(1, v1_bodies[127])[0], 401)
        answer = self.assertRefused(put(1, v1_bodies[128]), 400, "M_BAD_JSON")
        self.assertEqual(answer["error"], "JSON is nested deeper than 127 levels")
        event = {"type": "m.room.member"}
        v2_bodies = {
            levels: {"room_version": "10", "event": event, "invite_room_state": [nest(levels)]}
            for levels in (124, 125)
        }
        self.assertEqual(put(2, v2_bodies[124])[0], 401)
        answer = self.assertRefused(put(2, v2_bodies[125]), 400, "M_BAD_JSON")
        self.assertEqual(
            answer["error"], "invite_room_state: an entry is nested deeper than 124 levels"
        )

    def test_room_state_entry_nesting(self) -> None:
        """v2: an invite_room_state entry nested 127 deep makes the body 129: refused."""
        room_version, event = self.s.invite()
        deep: Any = 1
        for _ in range(125):
            deep = {"n": deep}
        entry = stripped("m.room.name", "", {"name": "x", "deep": deep})
        self.assertRefused(self.send_v2(room_version, event, [entry]), 400, "M_BAD_JSON")

    @staticmethod
    def deep_entry(levels: int) -> dict[str, Any]:
        """A stripped room-state entry nested ``levels`` deep, the entry counted."""
        deep: Any = 1
        for _ in range(levels - 2):  # the entry and its content are two levels
            deep = {"n": deep}
        return stripped("m.room.name", "", {"name": "x", "deep": deep})

    def test_room_state_entry_limit_v2(self) -> None:
        """v2: Synapse moves the body's invite_room_state into the event's unsigned before
        its PDU parser, so each entry sits four levels into the event: 124 levels (the entry
        counted) are accepted, 125 refused, as on v1 (not the 126 a 128-deep body allows)."""
        room_version, event = self.s.invite()
        self.assertEqual(self.send_v2(room_version, event, [self.deep_entry(124)])[0], 200)
        for levels in (125, 126):
            room_version, event = self.s.invite()
            answer = self.assertRefused(
                self.send_v2(room_version, event, [self.deep_entry(levels)]), 400, "M_BAD_JSON"
            )
            self.assertEqual(
                answer["error"], "invite_room_state: an entry is nested deeper than 124 levels"
            )

    def test_room_state_entry_limit_v1(self) -> None:
        """v1: the room state rides in the event's unsigned, its entries at level 4: 124
        levels accepted, 125 refused (the event's own limit)."""
        room_version = KNOWN_ROOM_VERSIONS["1"]
        for levels, ok in ((124, True), (125, False)):
            event = build_invite(
                room_version,
                self.s.their_key,
                extra={"unsigned": {"invite_room_state": [self.deep_entry(levels)]}},
            )
            if ok:
                self.assertEqual(self.send_v1(event)[0], 200)
            else:
                self.assertRefused(self.send_v1(event), 400, "M_BAD_JSON")

    @staticmethod
    def deep(levels: int) -> Any:
        """A value nested ``levels`` deep."""
        value: Any = 1
        for _ in range(levels):
            value = {"n": value}
        return value

    def test_what_synapse_strips_is_not_counted(self) -> None:
        """Synapse strips every unsigned key of an invite but invite_room_state and
        knock_room_state before its PDU parser (age it reads and drops), and its v2 /invite
        reads only the body's event, room_version and invite_room_state (which replaces the
        event's unsigned.invite_room_state): their depth never counts, so deep values there
        are accepted (bounded only by the 512 levels every body is), as Synapse accepts them;
        a body nested past 512 is refused."""
        unsigned_keys = ("x", "age", "age_ts")
        for levels in (126, 300, 509):
            for key in unsigned_keys:
                room_version, event = self.s.invite(extra={"unsigned": {key: self.deep(levels)}})
                self.assertEqual(self.send_v2(room_version, event)[0], 200, (key, levels))
                event = build_invite(
                    KNOWN_ROOM_VERSIONS["1"],
                    self.s.their_key,
                    extra={"unsigned": {key: self.deep(levels)}},
                )
                self.assertEqual(self.send_v1(event)[0], 200, (key, levels))
            # v2: the event's own unsigned.invite_room_state (replaced by the body's), a key
            # of the body's own.
            room_version, event = self.s.invite(
                extra={"unsigned": {"invite_room_state": [self.deep(levels - 1)]}}
            )
            self.assertEqual(self.send_v2(room_version, event)[0], 200, levels)
            room_version, event = self.s.invite()
            body = {**self.s.v2_body(room_version, event), "x": self.deep(levels)}
            self.assertEqual(self.send_v2(room_version, event, body=body)[0], 200, levels)
        # Past 512 levels, the limit of every body.
        room_version, event = self.s.invite(extra={"unsigned": {"x": self.deep(510)}})
        answer = self.assertRefused(self.send_v2(room_version, event), 400, "M_NOT_JSON")
        self.assertEqual(answer["error"], "JSON is nested deeper than 512 levels")
        event = build_invite(
            KNOWN_ROOM_VERSIONS["1"], self.s.their_key, extra={"unsigned": {"x": self.deep(511)}}
        )
        answer = self.assertRefused(self.send_v1(event), 400, "M_NOT_JSON")
        self.assertEqual(answer["error"], "JSON is nested deeper than 512 levels")

    def test_deep_body_not_an_object_is_not_json(self) -> None:
        """A v1 or v2 body that is valid JSON but no object (row 2) stays 400 M_NOT_JSON
        however deep it is: it is no event to be malformed."""
        for version in (1, 2):
            path = self.s.path(version, "!r:remote.example", "$e:remote.example")
            header = ['X-Matrix origin=remote.example,key="ed25519:x",sig="y"']
            for levels in (128, 300):
                data = b"[" * levels + b"]" * levels
                answer = self.result(self.s.put_raw(path, data, headers=header))
                body = self.assertRefused(answer, 400, "M_NOT_JSON")
                self.assertEqual(body["error"], "The body must be a JSON object", (version, levels))

    def test_knock_room_state_counts(self) -> None:
        """unsigned.knock_room_state, which Synapse keeps, counts as the event's own: a
        value in it reaching level 128 of the event is refused, on v2 and v1."""
        for levels, ok in ((125, True), (126, False)):  # + event, unsigned: 127, 128
            room_version, event = self.s.invite(
                extra={"unsigned": {"knock_room_state": [self.deep(levels - 1)]}}
            )
            if ok:
                self.assertEqual(self.send_v2(room_version, event)[0], 200)
            else:
                self.assertRefused(self.send_v2(room_version, event), 400, "M_BAD_JSON")
            event = build_invite(
                KNOWN_ROOM_VERSIONS["1"],
                self.s.their_key,
                extra={"unsigned": {"knock_room_state": [self.deep(levels - 1)]}},
            )
            if ok:
                self.assertEqual(self.send_v1(event)[0], 200)
            else:
                self.assertRefused(self.send_v1(event), 400, "M_BAD_JSON")

    def test_room_state_entry_limit_on_invite_called_directly(self) -> None:
        """on_invite called without the parse-time limit (nesting_checked False, as an
        embedder calling it directly) holds v2 room-state entries to 124 levels too."""
        self.call_on_invite_unchecked(
            lambda raw, **kwargs: parse_json_with_numbers(raw, require_object=True)
        )
        room_version, event = self.s.invite()
        self.assertEqual(self.send_v2(room_version, event, [self.deep_entry(124)])[0], 200)
        room_version, event = self.s.invite()
        answer = self.assertRefused(
            self.send_v2(room_version, event, [self.deep_entry(125)]), 400, "M_BAD_JSON"
        )
        self.assertEqual(
            answer["error"], "invite_room_state: an entry is nested deeper than 124 levels"
        )
        room_version, event = self.deep_invite("10", 128)
        answer = self.assertRefused(self.send_v2(room_version, event), 400, "M_BAD_JSON")
        self.assertEqual(answer["error"], "JSON is nested deeper than 128 levels")
        # What Synapse strips is not counted here either.
        room_version, event = self.s.invite(extra={"unsigned": {"x": self.deep(300)}})
        body = {**self.s.v2_body(room_version, event), "x": self.deep(300)}
        self.assertEqual(self.send_v2(room_version, event, body=body)[0], 200)


class NestingWalkTests(InboundTestCase):
    """Row 2's nesting is checked in one walk of the body: each of its arrays and objects
    is visited at most once, whatever the depth (the parse's 512 bound and the invite's
    own limits counted together), and a typical invite is not walked at all. Visits are
    counted by a stand-in for the walk (canonical.nesting_depth), not timed."""

    scenario_kwargs = {"limits": InviteLimits(invitee_burst=100)}

    def setUp(self) -> None:
        super().setUp()
        self.visited: list[int] = []
        walk = canonical_module.nesting_depth

        def counting(value: Any, limit: int = canonical_module.MAX_NESTING) -> int:
            level = [value] if type(value) in (dict, list, tuple) else []
            depth = visited = 0
            while level:
                depth += 1
                visited += len(level)
                if depth > limit:
                    break
                level = [
                    child
                    for container in level
                    for child in (container.values() if type(container) is dict else container)
                    if type(child) in (dict, list, tuple)
                ]
            self.visited.append(visited)
            self.assertEqual(depth, walk(value, limit))
            return depth

        for module in (canonical_module, format_module, inbound_module):
            if hasattr(module, "nesting_depth"):
                self.patch(module, "nesting_depth", counting)

    @staticmethod
    def containers(value: Any) -> int:
        count, level = 0, [value]
        while level:
            level = [v for v in level if isinstance(v, dict | list)]
            count += len(level)
            level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)]
        return count

    def assertWalkedOnce(self, body: Any, answer: tuple[int, Any], expected: Any) -> None:
        """``expected``: 200, or the 400's (errcode, message)."""
        code, result = answer
        if expected == 200:
            self.assertEqual(code, 200)
        else:
            self.assertEqual((code, result["errcode"], result["error"]), (400, *expected))
        self.assertGreater(sum(self.visited), 0)
        self.assertLessEqual(sum(self.visited), self.containers(body), self.visited)

    def test_typical_invite_not_walked(self) -> None:
        room_version, event = self.s.invite()
        self.assertEqual(self.send_v2(room_version, event)[0], 200)
        self.assertEqual(self.visited, [])

    def test_flat_brackets_walked_once(self) -> None:
        """600 [] (past the 512 brackets that bound every body) in the content, an unsigned
        key Synapse strips, or a v2 body key of its own: one walk, on v1 and v2."""
        flat = [[] for _ in range(600)]
        v1 = KNOWN_ROOM_VERSIONS["1"]
        for where in ("content", "unsigned", "body"):
            self.visited.clear()
            extra = {"content": {"membership": "invite", "x": flat}} if where == "content" else {}
            if where == "unsigned":
                extra = {"unsigned": {"x": flat}}
            room_version, event = self.s.invite(extra=extra)
            body = self.s.v2_body(room_version, event)
            if where == "body":
                body["x"] = flat
            self.assertWalkedOnce(body, self.send_v2(room_version, event, body=body), 200)
            if where == "body":
                continue
            self.visited.clear()
            event = build_invite(v1, self.s.their_key, extra=extra)
            self.assertWalkedOnce(event, self.send_v1(event), 200)

    def test_deep_and_flat_walked_once(self) -> None:
        """Content 300 levels deep beside 600 [] (refused at the event's limit), or 600
        levels deep (past the 512 of every body): still one walk."""
        flat = [[] for _ in range(600)]
        too_deep = ("M_NOT_JSON", "JSON is nested deeper than 512 levels")
        for levels, v2_error, v1_error in (
            (
                300,
                ("M_BAD_JSON", "JSON is nested deeper than 128 levels"),
                ("M_BAD_JSON", "JSON is nested deeper than 127 levels"),
            ),
            (600, too_deep, too_deep),
        ):
            content = {"membership": "invite", "x": flat, "deep": PduNestingTests.deep(levels)}
            self.visited.clear()
            room_version, event = self.s.invite(extra={"content": content})
            body = self.s.v2_body(room_version, event)
            self.assertWalkedOnce(body, self.send_v2(room_version, event, body=body), v2_error)
            self.visited.clear()
            event = build_invite(
                KNOWN_ROOM_VERSIONS["1"], self.s.their_key, extra={"content": content}
            )
            self.assertWalkedOnce(event, self.send_v1(event), v1_error)
            self.visited.clear()
            event = build_invite(
                KNOWN_ROOM_VERSIONS["1"],
                self.s.their_key,
                extra={"unsigned": {"x": flat, "deep": PduNestingTests.deep(levels)}},
            )
            self.assertWalkedOnce(event, self.send_v1(event), 200 if levels == 300 else v1_error)

    def test_on_invite_called_directly_bounds_the_body_too(self) -> None:
        """on_invite called without the parse-time check (nesting_checked False) gives the
        resource's answers, the 512 of every body included (a v2 body key of its own, an
        unsigned key Synapse strips), in one walk."""
        self.call_on_invite_unchecked(
            lambda raw, **kwargs: (json.loads(raw), True)  # no nesting bound at all
        )
        deep = PduNestingTests.deep
        room_version, event = self.s.invite()
        body = {**self.s.v2_body(room_version, event), "x": deep(511)}  # 512 levels
        self.assertEqual(self.send_v2(room_version, event, body=body)[0], 200)
        room_version, event = self.s.invite()
        body = {**self.s.v2_body(room_version, event), "x": deep(512)}
        self.visited.clear()
        self.assertWalkedOnce(
            body,
            self.send_v2(room_version, event, body=body),
            ("M_NOT_JSON", "JSON is nested deeper than 512 levels"),
        )
        room_version, event = self.s.invite(extra={"unsigned": {"x": deep(510)}})
        answer = self.assertRefused(self.send_v2(room_version, event), 400, "M_NOT_JSON")
        self.assertEqual(answer["error"], "JSON is nested deeper than 512 levels")


class RequestShapeTests(InboundTestCase):
    scenario_kwargs = {"max_body_bytes": 4096}

    def test_row01_body_too_large(self) -> None:
        """Row 1: a body over the configured cap is 413 M_TOO_LARGE."""
        room_version, event = self.s.invite(
            extra={"content": {"membership": "invite", "pad": "x" * 5000}}
        )
        self.assertRefused(self.send_v2(room_version, event), 413, "M_TOO_LARGE")

    def test_row02_not_json(self) -> None:
        """Row 2: not UTF-8, not JSON, or not an object, on v1 and v2: 400 M_NOT_JSON."""
        path = self.s.path(2, "!r:remote.example", "$e:remote.example")
        for data in (b"\xff\xfe{}", b"{not json", b"[1, 2]", b'"x"', b"", b"NaN", b"{} x"):
            for version in (1, 2):
                path = self.s.path(version, "!r:remote.example", "$e:remote.example")
                header = ['X-Matrix origin=remote.example,key="ed25519:x",sig="y"']
                answer = self.result(self.s.put_raw(path, data, headers=header))
                self.assertRefused(answer, 400, "M_NOT_JSON")

    def test_row03_duplicate_keys(self) -> None:
        """Row 3: duplicate keys anywhere in the JSON: 400 M_BAD_JSON."""
        path = self.s.path(2, "!r:remote.example", "$e:remote.example")
        data = b'{"room_version": "10", "event": {"a": 1, "a": 2}}'
        answer = self.result(
            self.s.put_raw(path, data, headers=['X-Matrix origin=a,key="ed25519:x",sig="y"'])
        )
        self.assertRefused(answer, 400, "M_BAD_JSON")

    def test_unknown_paths_and_methods(self) -> None:
        """Wrong segment counts are 404 and GET is 405, both M_UNRECOGNIZED."""
        for path in (
            "/_matrix/federation/v2/invite/!r:x",
            "/_matrix/federation/v2/invite/!r:x/$e:x/more",
            "/_matrix/federation/v2/invite",
            "/_matrix/federation/v3/invite/!r:x/$e:x",
        ):
            answer = self.result(self.s.put_raw(path, b"{}", headers=[]))
            self.assertRefused(answer, 404, "M_UNRECOGNIZED")
        answer = self.result(
            self.s.client.get("https://us.example/_matrix/federation/v2/invite/%21r%3Ax/%24e%3Ax")
        )
        self.assertRefused(answer, 405, "M_UNRECOGNIZED")

    def test_empty_path_segments(self) -> None:
        """An empty room ID or event ID segment is a path we do not serve: 404 M_UNRECOGNIZED,
        not an invite handed to the handler (which would answer 401, or 400 for row 9)."""
        for path in (
            "/_matrix/federation/v2/invite//%24e%3Ax",
            "/_matrix/federation/v2/invite/%21r%3Ax/",
            "/_matrix/federation/v1/invite//",
        ):
            answer = self.result(self.s.put_raw(path, b"{}", headers=[]))
            self.assertRefused(answer, 404, "M_UNRECOGNIZED")

    def test_path_not_utf8(self) -> None:
        """A path parameter that is not UTF-8 is 400 M_INVALID_PARAM."""
        answer = self.result(
            self.s.put_raw("/_matrix/federation/v2/invite/%FF/%24e", b"{}", headers=[])
        )
        self.assertRefused(answer, 400, "M_INVALID_PARAM")


class AuthenticationRowTests(InboundTestCase):
    def test_row04_unauthenticated(self) -> None:
        """Row 4: no or bad X-Matrix authentication: 401 M_UNAUTHORIZED."""
        room_version, event = self.s.invite()
        self.assertRefused(self.send_v2(room_version, event, headers=[]), 401, "M_UNAUTHORIZED")
        self.assertRefused(
            self.send_v2(room_version, event, key=make_key("them1")), 401, "M_UNAUTHORIZED"
        )

    def test_row04_denied_origin(self) -> None:
        """Row 4: an origin denied by the server ACL: 403 M_FORBIDDEN."""
        self.s = InviteScenario(acl=ServerAcl.of(deny=("remote.*",)))
        room_version, event = self.s.invite()
        self.assertRefused(self.send_v2(room_version, event), 403, "M_FORBIDDEN")


class BodyRowTests(InboundTestCase):
    def test_row05_missing_and_mistyped(self) -> None:
        """Row 5: v2 room_version or event missing (M_MISSING_PARAM) or of the wrong type (M_BAD_JSON)."""
        room_version, event = self.s.invite()
        cases = [
            ({"event": event}, "M_MISSING_PARAM"),
            ({"room_version": "10"}, "M_MISSING_PARAM"),
            ({"room_version": 10, "event": event}, "M_BAD_JSON"),
            ({"room_version": "10", "event": [event]}, "M_BAD_JSON"),
        ]
        for body, errcode in cases:
            self.assertRefused(self.send_v2(room_version, event, body=body), 400, errcode)

    def test_row06_unknown_room_version(self) -> None:
        """Row 6: an unknown room version: 400 M_INCOMPATIBLE_ROOM_VERSION naming it."""
        room_version, event = self.s.invite()
        body = self.assertRefused(
            self.send_v2(
                room_version, event, body={"room_version": "org.example.custom", "event": event}
            ),
            400,
            "M_INCOMPATIBLE_ROOM_VERSION",
        )
        self.assertEqual(body["room_version"], "org.example.custom")

    def test_row07_malformed_event(self) -> None:
        """Row 7: events not well-formed for their room version: 400 M_BAD_JSON."""
        room_version, event = self.s.invite()
        mutations = [
            {k: v for k, v in event.items() if k != "depth"},
            {**event, "depth": -1},
            {**event, "prev_events": "x"},
            {**event, "auth_events": [f"$a{i}" for i in range(11)]},
            {**event, "content": {"membership": "invite", "n": 1.5}},
            {**event, "content": {"membership": "invite", "n": 2**53}},
            {**event, "sender": "alice"},
            {**event, "room_id": "room"},
        ]
        for mutated in mutations:
            answer = self.send_v2(
                room_version,
                mutated,
                room_id=event["room_id"],
                event_id=event_id_of(room_version, event),
            )
            self.assertRefused(answer, 400, "M_BAD_JSON")

    def test_row07_member_unsigned_room_state_not_an_array(self) -> None:
        """Row 7: an invite whose unsigned knock_room_state or invite_room_state is neither an
        array nor null (Synapse's PDU parser: 400 "Invalid event JSON") is 400 M_BAD_JSON on
        v2 and v1, neither co-signed nor stored; an array of anything, or null, is accepted."""
        v1 = KNOWN_ROOM_VERSIONS["1"]
        message = "Invalid PDU: 'unsigned' {!r} of an m.room.member event must be an array or null"
        bad = [
            ("knock_room_state", 5),
            ("knock_room_state", {}),
            ("knock_room_state", "x"),
            ("invite_room_state", 5),
            ("invite_room_state", {"type": "m.room.name"}),
        ]
        for n, (key, value) in enumerate(bad):
            extra = {
                "unsigned": {"age": 1, key: value},
                "content": {"membership": "invite", "n": n},
            }
            room_version, event = self.s.invite("10", extra=extra)
            answer = self.assertRefused(self.send_v2(room_version, event), 400, "M_BAD_JSON")
            self.assertEqual(answer["error"], message.format(key))
            event = build_invite(v1, self.s.their_key, extra=extra)
            answer = self.assertRefused(self.send_v1(event), 400, "M_BAD_JSON")
            self.assertEqual(answer["error"], message.format(key))
        self.assertEqual(self.s.store.invites, {})
        for n, value in enumerate(([1, "x", {}], None)):
            unsigned = {"knock_room_state": value}
            extra = {"unsigned": unsigned, "content": {"membership": "invite", "m": n}}
            room_version, event = self.s.invite("10", extra=extra)
            code, body = self.send_v2(room_version, event)
            self.assertEqual(code, 200, body)
            self.assertEqual(body["event"]["unsigned"], unsigned)
            event = build_invite(v1, self.s.their_key, extra=extra)
            self.assertEqual(self.send_v1(event)[0], 200)

    def room_state_with(
        self, identifier: str, content: dict[str, Any]
    ) -> tuple[RoomVersion, dict[str, Any], list[dict[str, Any]]]:
        """A new invite of room version ``identifier`` and its room state, a stripped entry
        with ``content`` in it (v12: beside the room's full create event)."""
        entry = stripped("m.room.name", "", content)
        if identifier != "12":
            room_version, event = self.s.invite(identifier)
            return room_version, event, [entry]
        room_version, create, room_id = v12_room(self.s.their_key)
        event = build_invite(room_version, self.s.their_key, room_id=room_id)
        return room_version, event, [create, entry]

    def test_row07_room_state_not_strict_canonical(self) -> None:
        """Row 7, v6+ (v6-canonical-json.md, as Synapse): a float or an integer outside
        [-(2**53)+1, 2**53-1] in a v2 body's invite_room_state is 400 M_BAD_JSON, nothing
        stored, counted and logged as a malformed event is."""
        metrics = self.s.handler._metrics = InviteMetrics(enabled=True)
        refused = 0
        for identifier in ("10", "11", "12"):
            for value, problem in (
                (1.5, "floats are not allowed in canonical JSON"),
                (2**60, f"integer {2**60} is outside [-(2**53)+1, 2**53-1]"),
                (-(2**53), f"integer {-(2**53)} is outside [-(2**53)+1, 2**53-1]"),
            ):
                room_version, event, state = self.room_state_with(
                    identifier, {"name": "x", "n": [{"v": value}]}
                )
                with capturedLogs() as events:
                    answer = self.assertRefused(
                        self.send_v2(room_version, event, state), 400, "M_BAD_JSON"
                    )
                refused += 1
                self.assertEqual(
                    answer["error"], f"invite_room_state is not canonical JSON: {problem}"
                )
                (line,) = [e for e in events if e.get("outcome")]
                self.assertEqual(
                    (line["outcome"], line["status"], line["errcode"], line["reason"]),
                    ("refused", 400, "M_BAD_JSON", answer["error"]),
                )
                self.assertEqual(line["origin"], THEM)
        # The same counter and line as an event with a float in it (row 7).
        room_version, event = self.s.invite()
        mutated = {**event, "content": {"membership": "invite", "n": 1.5}}
        with capturedLogs() as events:
            answer = self.send_v2(room_version, mutated, event_id=event_id_of(room_version, event))
            self.assertRefused(answer, 400, "M_BAD_JSON")
        (line,) = [e for e in events if e.get("outcome")]
        self.assertEqual((line["outcome"], line["status"]), ("refused", 400))
        counted = metrics.registry.get_sample_value(
            "federation_invite_inbound_invites_total",
            {"outcome": "refused", "errcode": "M_BAD_JSON"},
        )
        self.assertEqual(counted, refused + 1)
        self.assertEqual(self.s.store.invites, {})

    def test_row07_room_state_numbers_lax_before_v6(self) -> None:
        """Row 7: before v6 (v5 here) floats and large integers in invite_room_state are
        accepted and stored as sent, as Synapse accepts them."""
        room_version, event, state = self.room_state_with("5", {"name": "x", "n": 1.5})
        state.append(stripped("m.room.topic", "", {"topic": "t", "big": 2**60}))
        self.assertEqual(self.send_v2(room_version, event, state)[0], 200)
        stored = self.s.store.invites[event_id_of(room_version, event)]
        self.assertEqual(stored.invite_room_state, state)

    def test_row07_clean_room_state_not_walked(self) -> None:
        """Row 7: invite_room_state is walked for its numbers only when the parser saw a
        float or a large integer in the body: a clean body (bounds included) pays nothing."""
        walked: list[Any] = []
        check = inbound_module.check_canonical_json

        def counting(value: Any, **kwargs: Any) -> None:
            walked.append(value)
            check(value, **kwargs)

        self.patch(inbound_module, "check_canonical_json", counting)
        for identifier in ("10", "12"):
            content = {"name": "x", "n": [2**53 - 1, -(2**53) + 1]}
            room_version, event, state = self.room_state_with(identifier, content)
            self.assertEqual(self.send_v2(room_version, event, state)[0], 200)
            stored = self.s.store.invites[event_id_of(room_version, event)]
            self.assertEqual(stored.invite_room_state, state)
        self.assertEqual(walked, [])
        room_version, event, state = self.room_state_with("10", {"name": "x", "n": 1.5})
        self.assertRefused(self.send_v2(room_version, event, state), 400, "M_BAD_JSON")
        self.assertEqual(walked, [state])

    def test_row07_oversized_reference_ids_not_memoised(self) -> None:
        """Row 7: a v1/v2 prev_events or auth_events ID over 255 bytes is 400 M_BAD_JSON, and
        the refused ID is not kept as a key of the ID memo (a peer sending 8192 such
        invites would otherwise pin up to 8 GiB)."""
        from federation_invite.core import ids

        v1 = KNOWN_ROOM_VERSIONS["1"]
        event = build_invite(v1, self.s.their_key)
        self.assertEqual(self.send_v1(event)[0], 200)  # its valid IDs are now memoised
        size = ids._split_namespaced_text.cache_info().currsize
        for n, key in enumerate(("prev_events", "auth_events", "prev_events")):
            oversized = {**event, key: [[f"${n}" + "x" * 100_000 + f":{THEM}", {}]]}
            answer = self.assertRefused(self.send_v1(oversized), 400, "M_BAD_JSON")
            self.assertEqual(
                answer["error"],
                f"Invalid PDU: {key!r} holds an invalid event ID for this room version",
            )
            self.assertEqual(ids._split_namespaced_text.cache_info().currsize, size)

    def test_row08_pdu_too_large(self) -> None:
        """Row 8: an event whose canonical form is over 65536 bytes: 413 M_TOO_LARGE."""
        for identifier in ("5", "10"):  # a lax and a strict room version
            room_version, event = self.s.invite(
                identifier, extra={"content": {"membership": "invite", "pad": "x" * 66000}}
            )
            self.assertRefused(self.send_v2(room_version, event), 413, "M_TOO_LARGE")

    def test_row08_size_bound_with_compact_body(self) -> None:
        """Row 8 at its bound, the body sent compact (a few hundred bytes over the event, which
        a strict room version's shortcut on the body's length must not let through): an event
        of 65536 canonical bytes is accepted, one of 65537 refused 413 M_TOO_LARGE, in a lax
        and a strict room version."""

        def sized(identifier: str, size: int) -> tuple[RoomVersion, dict[str, Any]]:
            pad = 100
            for _ in range(3):  # the pad's length shows in the hashes and signature too
                room_version, event = self.s.invite(
                    identifier, extra={"content": {"membership": "invite", "pad": "x" * pad}}
                )
                pad += size - len(encode_canonical_json(event))
            self.assertEqual(len(encode_canonical_json(event)), size)
            return room_version, event

        def send_compact(room_version: RoomVersion, event: dict[str, Any]) -> tuple[int, Any]:
            body = self.s.v2_body(room_version, event)
            path = self.s.path(2, event["room_id"], event_id_of(room_version, event))
            return self.result(self.s.put_raw(path, encode_canonical_json(body), content=body))

        for identifier in ("5", "10"):
            self.assertEqual(send_compact(*sized(identifier, 65536))[0], 200)
            self.assertRefused(send_compact(*sized(identifier, 65537)), 413, "M_TOO_LARGE")

    def test_row09_path_mismatch(self) -> None:
        """Row 9: room_id or event_id differing from the path: 400 M_INVALID_PARAM."""
        room_version, event = self.s.invite()
        self.assertRefused(
            self.send_v2(room_version, event, room_id="!other:remote.example"),
            400,
            "M_INVALID_PARAM",
        )
        self.assertRefused(
            self.send_v2(room_version, event, event_id="$" + "A" * 43), 400, "M_INVALID_PARAM"
        )
        v1 = KNOWN_ROOM_VERSIONS["1"]
        event1 = build_invite(v1, self.s.their_key)
        self.assertRefused(
            self.send_v2(v1, event1, event_id="$other:remote.example"), 400, "M_INVALID_PARAM"
        )

    def test_row10_not_an_invite(self) -> None:
        """Row 10: wrong type, membership, or non-user state_key/sender: 400 M_INVALID_PARAM."""
        cases = [
            {"type": "m.room.message"},
            {"content": {"membership": "join"}},
            {"content": {"body": "no membership"}},
            {"state_key": "bob"},
        ]
        for extra in cases:
            room_version, event = self.s.invite(extra=extra)
            self.assertRefused(self.send_v2(room_version, event), 400, "M_INVALID_PARAM")
        # A sender that is no user ID is already malformed (row 7).
        room_version, event = self.s.invite(extra={"sender": "@:remote.example:x"})
        self.assertEqual(self.send_v2(room_version, event)[0], 400)

    def test_row11_wrong_servers(self) -> None:
        """Row 11: sender not on the origin, or invitee not on our server: 400 M_INVALID_PARAM."""
        room_version, event = self.s.invite(sender="@mallory:elsewhere.example")
        self.assertRefused(self.send_v2(room_version, event), 400, "M_INVALID_PARAM")
        room_version, event = self.s.invite(invitee="@bob:elsewhere.example")
        self.assertRefused(self.send_v2(room_version, event), 400, "M_INVALID_PARAM")

    def test_row11_sender_of_another_server_signed_by_it(self) -> None:
        """Row 11 on its own: an invite whose sender is on another server, signed by that
        server (so row 12 passes), sent by the origin: 400 M_INVALID_PARAM, for the sender's
        server, not accepted as the origin's."""
        elsewhere = "elsewhere.example"
        key = make_key("elsewhere")
        self.s.federation.add_key_server(self.s.clock, elsewhere, [key])
        room_version = KNOWN_ROOM_VERSIONS["10"]
        event = build_invite(room_version, key, sender=f"@mallory:{elsewhere}", server=elsewhere)
        answer = self.assertRefused(self.send_v2(room_version, event), 400, "M_INVALID_PARAM")
        self.assertEqual(
            answer["error"], "The event's sender is not a user of the requesting server"
        )
        self.assertEqual(self.s.listened, [])

    def test_row12_signatures_and_hashes(self) -> None:
        """Row 12: a missing or wrong sender signature, or a wrong content hash: 400 M_INVALID_PARAM."""
        room_version, event = self.s.invite()
        unsigned = {**event, "signatures": {}}
        self.assertRefused(self.send_v2(room_version, unsigned), 400, "M_INVALID_PARAM")
        forged = hash_and_sign_event(
            room_version,
            {k: v for k, v in event.items() if k not in ("signatures", "hashes")},
            THEM,
            make_key("them1"),
        )
        self.assertRefused(self.send_v2(room_version, forged), 400, "M_INVALID_PARAM")
        rehashed = {**event, "content": {"membership": "invite", "displayname": "Eve"}}
        self.assertRefused(self.send_v2(room_version, rehashed), 400, "M_INVALID_PARAM")
        bad_hash = {**event, "hashes": {"sha256": "A" * 43}}
        self.assertRefused(self.send_v2(room_version, bad_hash), 400, "M_INVALID_PARAM")
        # A valid signature with characters outside base64 added (decoding that dropped them,
        # as base64.b64decode without validate does, would verify it).
        key_id = key_id_of(self.s.their_key)
        signature = event["signatures"][THEM][key_id]
        for bad in ("\t :" + signature, signature[:43] + " " + signature[43:]):
            junk = {**event, "signatures": {THEM: {key_id: bad}}}
            self.assertRefused(self.send_v2(room_version, junk), 400, "M_INVALID_PARAM")

    def test_row12_key_refetched_for_the_event_time(self) -> None:
        """Row 12, room versions 5+: a cached key of the sender's server that is not valid at
        the event's origin_server_ts is fetched again for that time (its server now vouches
        for it longer), and the invite accepted."""
        self.s.federation.add_key_server(self.s.clock, THEM, [self.s.their_key], validity_ms=10_000)
        room_version, event = self.s.invite(extra={"depth": 5})
        self.assertEqual(self.send_v2(room_version, event)[0], 200)  # key cached until +10 s
        self.assertEqual(self.s.federation.count(THEM), 1)
        self.s.federation.add_key_server(self.s.clock, THEM, [self.s.their_key])
        self.s.clock.advance(6)  # past the keyring's pause; the cached key still valid now
        room_version, event = self.s.invite(extra={"depth": 6, "origin_server_ts": NOW_MS + 20_000})
        self.assertEqual(self.send_v2(room_version, event)[0], 200)
        self.assertEqual(self.s.federation.count(THEM), 2)

    def test_row12_key_not_refetched_for_the_event_time_before_v5(self) -> None:
        """Row 12, room versions 1-4 (keys need not be valid at the event's time): a cached key
        of the sender's server is used whatever the event's origin_server_ts, not fetched
        again (here its server has gone away since)."""
        self.s.federation.add_key_server(self.s.clock, THEM, [self.s.their_key], validity_ms=10_000)
        room_version, event = self.s.invite("4", extra={"depth": 5})
        self.assertEqual(self.send_v2(room_version, event)[0], 200)  # key cached until +10 s
        self.assertEqual(self.s.federation.count(THEM), 1)
        del self.s.federation.servers[THEM]
        self.s.clock.advance(6)  # past the keyring's pause; the cached key still valid now
        room_version, event = self.s.invite(
            "4", extra={"depth": 6, "origin_server_ts": NOW_MS + 20_000}
        )
        self.assertEqual(self.send_v2(room_version, event)[0], 200)
        self.assertEqual(self.s.federation.count(THEM), 1)

    def test_row12_v1_event_id_server_must_sign(self) -> None:
        """Row 12, v1/v2: the event ID's server must sign too (rooms/v1 signing rules)."""
        v1 = KNOWN_ROOM_VERSIONS["1"]
        event = build_invite(v1, self.s.their_key, extra={"event_id": "$e:third.example"})
        self.assertRefused(self.send_v2(v1, event), 400, "M_INVALID_PARAM")

    def test_row12_invalid_key_ids_not_looked_for(self) -> None:
        """Row 12: signatures by key IDs that are not valid ed25519 key IDs (here 50 of 1000
        characters, by a v1 event ID's server) are missing signatures: 400 M_INVALID_PARAM,
        without a fetch of that server, and nothing of them kept by the keyring."""
        v1 = KNOWN_ROOM_VERSIONS["1"]
        self.s.federation.add_key_server(self.s.clock, "third.example", [make_key("k1")])
        event = build_invite(v1, self.s.their_key, extra={"event_id": "$e:third.example"})
        event["signatures"]["third.example"] = {
            f"ed25519:{n:02d}" + "A" * 1000: "A" * 86 for n in range(50)
        }
        self.assertRefused(self.send_v1(event), 400, "M_INVALID_PARAM")
        self.assertEqual(self.s.federation.count("third.example"), 0)
        # Only the pause after the origin's key fetch, for the key ID it asked for.
        self.assertEqual(
            {name: backoff.asked for name, backoff in self.s.keyring._backoff.items()},
            {THEM: {key_id_of(self.s.their_key)}},
        )

    def test_row13_room_state_shape(self) -> None:
        """Row 13: invite_room_state not a list of objects: 400 M_INVALID_PARAM."""
        room_version, event = self.s.invite()
        for state in ("x", {"a": 1}, [1], [[]]):
            body = {"room_version": "10", "event": event, "invite_room_state": state}
            self.assertRefused(self.send_v2(room_version, event, body=body), 400, "M_INVALID_PARAM")

    def test_row13_room_state_shape_checked_after_rows_7_to_12(self) -> None:
        """Row 13's shape check runs in row 13's place: an event that is malformed (row 7),
        too large (row 8) or wrongly signed (row 12) is refused as such even when its
        invite_room_state is not a list of objects; v1 carries it in the event's unsigned."""
        room_version, event = self.s.invite(extra={"depth": "x"})
        body = {"room_version": "10", "event": event, "invite_room_state": "nope"}
        self.assertRefused(self.send_v2(room_version, event, body=body), 400, "M_BAD_JSON")
        content = {"membership": "invite", "displayname": "B" * 70_000}
        room_version, event = self.s.invite(extra={"content": content})
        body = {"room_version": "10", "event": event, "invite_room_state": [1]}
        self.assertRefused(self.send_v2(room_version, event, body=body), 413, "M_TOO_LARGE")
        room_version, event = self.s.invite()
        forged = {**event, "signatures": {THEM: {key_id_of(self.s.their_key): "A" * 86}}}
        body = {"room_version": "10", "event": forged, "invite_room_state": "nope"}
        answer = self.assertRefused(
            self.send_v2(room_version, forged, body=body), 400, "M_INVALID_PARAM"
        )
        self.assertIn("signature check failed", answer["error"])
        v1 = KNOWN_ROOM_VERSIONS["1"]
        # A list, but not of objects: anything but an array (or null) is row 7's already.
        unsigned = {"invite_room_state": ["nope"]}
        event = build_invite(v1, self.s.their_key, extra={"depth": "x", "unsigned": unsigned})
        self.assertRefused(self.send_v1(event), 400, "M_BAD_JSON")
        event = build_invite(v1, self.s.their_key, extra={"unsigned": unsigned})
        answer = self.assertRefused(self.send_v1(event), 400, "M_INVALID_PARAM")
        self.assertEqual(answer["error"], "invite_room_state must be a list of objects")
        state = [stripped("m.room.name", "", {"name": "x"})]
        event = build_invite(v1, self.s.their_key, extra={"unsigned": {"invite_room_state": state}})
        self.assertEqual(self.send_v1(event)[0], 200)

    def test_row13_v12_create_event(self) -> None:
        """Row 13, v12: no full create PDU, a create with a bad signature, or a room ID that is
        not the create event's hash: 400 M_INVALID_PARAM."""
        room_version, create, room_id = v12_room(self.s.their_key)
        event = build_invite(room_version, self.s.their_key, room_id=room_id)
        join_rules = stripped("m.room.join_rules", "", {"join_rule": "invite"})
        stripped_create = stripped("m.room.create", "", create["content"], create["sender"])
        for state in ([], [join_rules], [stripped_create, join_rules]):
            self.assertRefused(self.send_v2(room_version, event, state), 400, "M_INVALID_PARAM")
        forged = {**create, "signatures": {THEM: {key_id_of(self.s.their_key): "A" * 86}}}
        self.assertRefused(self.send_v2(room_version, event, [forged]), 400, "M_INVALID_PARAM")
        other_create = build_create_event(room_version, self.s.their_key)
        other_create = hash_and_sign_event(
            room_version,
            {
                **{k: v for k, v in other_create.items() if k not in ("signatures", "hashes")},
                "origin_server_ts": 5,
            },
            THEM,
            self.s.their_key,
        )
        self.assertRefused(
            self.send_v2(room_version, event, [other_create]), 400, "M_INVALID_PARAM"
        )
        code, _ = self.send_v2(room_version, event, [create, join_rules])
        self.assertEqual(code, 200)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_row13_stripped_state_accepted_v1_to_11(self) -> None:
        """Row 13: stripped state and empty state are accepted for v1-11 (Synapse's behaviour)."""
        room_version, event = self.s.invite("9")
        self.assertEqual(
            self.send_v2(room_version, event, [stripped("m.room.name", "", {"name": "x"})])[0], 200
        )
        room_version, event = self.s.invite("9", extra={"depth": 99})
        self.assertEqual(self.send_v2(room_version, event, [])[0], 200)


THIRD = "third.example"
#: Another room's ID, in the room version's form (v12: a create event's hash).
OTHER_ROOM = {
    KNOWN_ROOM_VERSIONS["10"]: "!other:remote.example",
    KNOWN_ROOM_VERSIONS["12"]: "!" + "B" * 43,
}


class RoomStateValidationTests(InboundTestCase):
    """Row 13 with strict mode off: v12 refuses every full entry that fails validation (stripped
    entries are accepted); v1-11 accept the invite and warn on its outcome line."""

    scenario_kwargs = {"limits": InviteLimits(invitee_burst=100)}

    def setUp(self) -> None:
        super().setUp()
        self.depth = 100
        self.third_key = make_key("third1")
        self.s.federation.add_key_server(self.s.clock, THIRD, [self.third_key])

    def room(self, identifier: str) -> tuple[RoomVersion, dict[str, Any], str]:
        """A room of that version: its version, its create event and its room ID."""
        if identifier == "12":
            return v12_room(self.s.their_key)
        room_version = KNOWN_ROOM_VERSIONS[identifier]
        create = build_create_event(room_version, self.s.their_key)
        return room_version, create, create["room_id"]

    def state_event(
        self,
        room_version: RoomVersion,
        room_id: str,
        *,
        server: str = THEM,
        key: Any = None,
        content: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A full m.room.join_rules event of ``room_id``, sent and signed by ``server``."""
        event = {
            "type": "m.room.join_rules",
            "state_key": "",
            "sender": f"@carol:{server}",
            "room_id": room_id,
            "content": content or {"join_rule": "invite"},
            "origin_server_ts": NOW_MS - 5_000,
            "depth": 2,
            "prev_events": [],
            "auth_events": [],
        }
        if room_version.redaction_keeps_top_level_origin:
            event["origin"] = server
        return hash_and_sign_event(room_version, event, server, key or self.s.their_key)

    def send_logged(
        self, room_version: RoomVersion, room_id: str, state: list[Any]
    ) -> tuple[tuple[int, Any], dict[str, Any]]:
        """Send a new invite to ``room_id`` with ``state``: the answer and its outcome line."""
        self.depth += 1
        event = build_invite(
            room_version, self.s.their_key, room_id=room_id, extra={"depth": self.depth}
        )
        with capturedLogs() as events:
            answer = self.send_v2(room_version, event, state)
        (line,) = [e for e in events if e.get("outcome")]
        return answer, line

    def test_v12_room_state_keys_valid_at_the_latest_entry(self) -> None:
        """v12: the keys checking full room-state entries must be valid at the latest entry's
        time needing them: a cached key of their server not valid then is fetched again (its
        server now vouches for it longer), and the entries pass."""
        self.s.federation.add_key_server(self.s.clock, THEM, [self.s.their_key], validity_ms=10_000)
        room_version, create, room_id = self.room("12")
        answer, _ = self.send_logged(room_version, room_id, [create])
        self.assertEqual(answer[0], 200)  # the key cached until +10 s
        self.assertEqual(self.s.federation.count(THEM), 1)
        self.s.federation.add_key_server(self.s.clock, THEM, [self.s.their_key])
        self.s.clock.advance(6)  # past the keyring's pause; the cached key still valid now
        early = self.many_entries(room_version, room_id, 2)[0]
        late = self.many_entries(room_version, room_id, 2, origin_server_ts=NOW_MS + 20_000)[1]
        answer, line = self.send_logged(room_version, room_id, [create, early, late])
        self.assertEqual(answer[0], 200)
        self.assertNotIn("invalid_room_state", line)
        self.assertEqual(self.s.federation.count(THEM), 2)

    def bad_entries(
        self, room_version: RoomVersion, room_id: str
    ) -> list[tuple[str, dict[str, Any], str]]:
        """Full entries failing each check: what fails, the entry, a part of the reason."""
        good = self.state_event(room_version, room_id)
        return [
            (
                "other room",
                self.state_event(room_version, OTHER_ROOM[room_version]),
                "another room",
            ),
            ("unsigned", {**good, "signatures": {}}, "signature check failed"),
            (
                "bad signature",
                {**good, "signatures": {THEM: {key_id_of(self.s.their_key): "A" * 86}}},
                "signature check failed",
            ),
            (
                "signed by another key",
                self.state_event(room_version, room_id, key=make_key("them1")),
                "signature check failed",
            ),
            (
                # What redaction keeps changed: the signature no longer matches (a
                # content hash mismatch alone only has the redacted copy kept).
                "content rewritten under its signature",
                {**good, "content": {"join_rule": "public"}},
                "signature check failed",
            ),
            (
                "bad format",
                {
                    "type": "m.room.name",
                    "state_key": "",
                    "room_id": room_id,
                    "hashes": {},
                    "signatures": {},
                    "content": {},
                },
                "not a valid event",
            ),
            (
                # Synapse's PDU parser refuses it (every hash value a string).
                "a hash that is no string",
                {**good, "hashes": {**good["hashes"], "sha512": 1}},
                "'hashes' must hold only strings",
            ),
            (
                "over 64 KiB",
                self.state_event(
                    room_version, room_id, content={"join_rule": "invite", "pad": "x" * 66_000}
                ),
                "more than the 65536 allowed",
            ),
        ]

    def test_full_entry_not_strict_canonical_is_row_7(self) -> None:
        """v6+: a full entry holding a float (or a large integer) is refused in row 7's place,
        400 M_BAD_JSON (as Synapse), not warned of (v1-11) nor refused as invalid state (v12,
        M_INVALID_PARAM); v5 accepts a large integer (warning only of the signature that the
        change of depth broke)."""
        for identifier in ("10", "12"):
            room_version, create, room_id = self.room(identifier)
            good = self.state_event(room_version, room_id)
            for entry in ({**good, "depth": 2.5}, {**good, "depth": 2**60}):
                answer, line = self.send_logged(room_version, room_id, [create, entry])
                body = self.assertRefused(answer, 400, "M_BAD_JSON")
                self.assertIn("invite_room_state is not canonical JSON", body["error"])
                self.assertEqual(line["outcome"], "refused")
        room_version, create, room_id = self.room("5")
        entry = {**self.state_event(room_version, room_id), "depth": 2**60}
        answer, line = self.send_logged(room_version, room_id, [create, entry])
        self.assertWarned(answer, line, "signature check failed")
        self.assertEqual(self.stored_state(), [create, entry])

    def test_v12_full_entries_validated(self) -> None:
        """v12: a full entry besides the create event that is of another room, unsigned, wrongly
        signed (its content changed under the signature included) or malformed: 400
        M_INVALID_PARAM, whatever its place."""
        room_version, create, room_id = self.room("12")
        name = stripped("m.room.name", "", {"name": "x"})
        for what, entry, reason in self.bad_entries(room_version, room_id):
            for state in ([create, entry], [entry, name, create]):
                answer, line = self.send_logged(room_version, room_id, state)
                body = self.assertRefused(answer, 400, "M_INVALID_PARAM")
                self.assertIn(reason, body["error"], what)
                self.assertEqual(line["outcome"], "refused")

    def name_event(self, room_version: RoomVersion, room_id: str) -> dict[str, Any]:
        """A full m.room.name event of ``room_id``, signed by the inviting server."""
        event = {
            "type": "m.room.name",
            "state_key": "",
            "sender": f"@carol:{THEM}",
            "room_id": room_id,
            "content": {"name": "Buy cheap watches"},
            "origin_server_ts": NOW_MS - 5_000,
            "depth": 3,
            "prev_events": [],
            "auth_events": [],
        }
        if room_version.redaction_keeps_top_level_origin:
            event["origin"] = THEM
        return hash_and_sign_event(room_version, event, THEM, self.s.their_key)

    def stored_state(self) -> list[Any]:
        """The invite_room_state of the last invite stored, checked to be the listeners' too."""
        record = list(self.s.store.invites.values())[-1]
        self.assertEqual(self.s.listened[-1].invite_room_state, record.invite_room_state)
        return record.invite_room_state

    def assertKeptRedacted(
        self, answer: tuple[int, Any], line: dict[str, Any], state: list[Any], count: int = 1
    ) -> None:
        """Accepted, with ``state`` stored and handed over, on a warn line counting the full
        entries replaced by their redacted copies (and no validation problem)."""
        self.assertEqual(answer[0], 200, answer[1])
        self.assertEqual(line["outcome"], "accepted")
        self.assertIs(line["log_level"], LogLevel.warn)
        self.assertEqual(line["redacted_state"], count)
        self.assertNotIn("invalid_room_state", line)
        self.assertIn("did not match their content hash", formatEvent(line))
        self.assertEqual(self.stored_state(), state)

    def test_v12_redacted_full_entry_kept_redacted(self) -> None:
        """v12: a full entry whose signature verifies but whose content hash does not (redacted
        at its origin, or its content rewritten since) is accepted as its redacted copy (spec:
        "use the redacted copy it calculated"); with a bad signature, still 400 M_INVALID_PARAM."""
        room_version, create, room_id = self.room("12")
        name = self.name_event(room_version, room_id)
        redacted = redact(room_version, name)
        as_relayed = {**redacted, "unsigned": {"redacted_because": {"type": "m.room.redaction"}}}
        rewritten = {**name, "content": {"name": "Rewritten by the inviting server"}}
        for entry in (as_relayed, rewritten):
            answer, line = self.send_logged(room_version, room_id, [create, entry])
            self.assertKeptRedacted(answer, line, [create, redacted])
        answer, line = self.send_logged(room_version, room_id, [create, name])
        self.assertEqual(answer[0], 200, answer[1])
        self.assertIs(line["log_level"], LogLevel.info)
        self.assertEqual(self.stored_state(), [create, name])
        forged = {**as_relayed, "signatures": {THEM: {key_id_of(self.s.their_key): "A" * 86}}}
        answer, line = self.send_logged(room_version, room_id, [create, forged])
        body = self.assertRefused(answer, 400, "M_INVALID_PARAM")
        self.assertIn("An invite_room_state event: signature check failed", body["error"])

    def count_verifications(self) -> list[dict[str, Any]]:
        """The invite_room_state entries whose signatures are verified from now on, in order."""
        verified: list[dict[str, Any]] = []
        real = inbound_module.verify_event_signatures

        def counting(room_version: RoomVersion, event: Any, *args: Any, **kwargs: Any) -> Any:
            if event.get("type") != "m.room.member":  # not the invite itself
                verified.append(event)
            return real(room_version, event, *args, **kwargs)

        self.patch(inbound_module, "verify_event_signatures", counting)
        return verified

    def assertDropped(
        self, answer: tuple[int, Any], line: dict[str, Any], state: list[Any], count: int
    ) -> None:
        """Accepted, ``state`` stored and handed over, on a warn line counting ``count``
        full entries dropped unchecked past the bound."""
        self.assertEqual(answer[0], 200, answer[1])
        self.assertEqual(line["outcome"], "accepted")
        self.assertIs(line["log_level"], LogLevel.warn)
        self.assertEqual(line["dropped_state"], count)
        self.assertNotIn("invalid_room_state", line)
        self.assertIn(f"{count} of its invite_room_state's full events", formatEvent(line))
        self.assertEqual(self.stored_state(), state)

    def test_v12_full_entries_beyond_bound_dropped(self) -> None:
        """v12: an invite with more full entries than are checked (the create event and 50
        others; Synapse sends every prejoin entry in full) is accepted, the create event and
        the first 50 others checked, stored and handed over, the rest dropped unchecked and
        counted on a warn line (dropped_state); only the kept entries' signatures are
        verified. At the bound nothing is dropped."""
        bound = 50  # the README's number (row 13), not the module's constant: the test pins it
        room_version, create, room_id = self.room("12")
        entries = self.many_entries(room_version, room_id, 68)
        checked = self.count_entry_checks()
        verified = self.count_verifications()
        answer, line = self.send_logged(room_version, room_id, [create, *entries])
        self.assertDropped(answer, line, [create, *entries[:bound]], 68 - bound)
        self.assertEqual(checked, [create, *entries[:bound]])
        self.assertEqual(verified, [create, *entries[:bound]])
        # The create event is always kept, wherever it is.
        answer, line = self.send_logged(room_version, room_id, [*entries, create])
        self.assertDropped(answer, line, [*entries[:bound], create], 68 - bound)
        del checked[:], verified[:]
        answer, line = self.send_logged(room_version, room_id, [create, *entries[:bound]])
        self.assertEqual(answer[0], 200, answer[1])
        self.assertIs(line["log_level"], LogLevel.info)
        self.assertNotIn("dropped_state", line)
        self.assertEqual(self.stored_state(), [create, *entries[:bound]])
        self.assertEqual(len(verified), bound + 1)

    def test_v12_prejoin_types_kept_before_others(self) -> None:
        """v12, past the bound: entries of the spec's prejoin state types (name, topic, join
        rules...) are kept before other types wherever they are given; the rest in order."""
        bound = 50
        room_version, create, room_id = self.room("12")
        entries = self.many_entries(room_version, room_id, 60)
        name = self.name_event(room_version, room_id)
        rules = self.state_event(room_version, room_id)
        answer, line = self.send_logged(room_version, room_id, [create, *entries, name, rules])
        self.assertDropped(answer, line, [create, *entries[: bound - 2], name, rules], 12)

    def test_v12_inviter_membership_kept_before_others(self) -> None:
        """v12, past the bound: the inviter's own m.room.member (a prejoin entry, README row
        13) is kept before other types wherever it is given; another user's membership is
        not."""
        room_version, create, room_id = self.room("12")
        entries = self.many_entries(room_version, room_id, 60)

        def member(user: str) -> dict[str, Any]:
            return hash_and_sign_event(
                room_version,
                {
                    "type": "m.room.member",
                    "state_key": user,
                    "sender": user,
                    "room_id": room_id,
                    "content": {"membership": "join"},
                    "origin_server_ts": NOW_MS - 5_000,
                    "depth": 3,
                    "prev_events": [],
                    "auth_events": [],
                },
                THEM,
                self.s.their_key,
            )

        inviter, other = member(ALICE), member(f"@carol:{THEM}")
        answer, line = self.send_logged(room_version, room_id, [create, *entries, other, inviter])
        self.assertDropped(answer, line, [create, *entries[:49], inviter], 12)

    def test_v12_bad_entry_within_bound_refused(self) -> None:
        """v12, past the bound: a bad entry among those checked is still 400 M_INVALID_PARAM;
        one among those dropped is never checked (dropped, the invite accepted), whatever
        JSON value its type or state_key is."""
        room_version, create, room_id = self.room("12")
        entries = self.many_entries(room_version, room_id, 68)
        for what, bad, reason in self.bad_entries(room_version, room_id):
            state = [create, *entries[:10], bad, *entries[10:]]
            answer, _ = self.send_logged(room_version, room_id, state)
            body = self.assertRefused(answer, 400, "M_INVALID_PARAM")
            self.assertIn(reason, body["error"], what)
        forged = {**entries[0], "signatures": {THEM: {key_id_of(self.s.their_key): "A" * 86}}}
        answer, line = self.send_logged(room_version, room_id, [create, *entries, forged])
        self.assertDropped(answer, line, [create, *entries[:50]], 19)
        # Any JSON value as type or state_key (a list, an object: unhashable) is sorted as
        # another type: among those checked refused for its format, past them dropped.
        for kind in (["m.room.name"], {"m.room.name": 1}, None, 1):
            for state_key in ("", ["x"], {"x": 1}):
                bad = {**entries[0], "type": kind, "state_key": state_key}
                state = [create, *entries[:10], bad, *entries[10:]]
                answer, _ = self.send_logged(room_version, room_id, state)
                body = self.assertRefused(answer, 400, "M_INVALID_PARAM")
                self.assertIn("'type' must be a string", body["error"], (kind, state_key))
                answer, line = self.send_logged(room_version, room_id, [create, *entries, bad])
                self.assertDropped(answer, line, [create, *entries[:50]], 19)
        bad = {**entries[0], "type": "m.room.member", "state_key": ["x"]}
        answer, line = self.send_logged(room_version, room_id, [create, *entries, bad])
        self.assertDropped(answer, line, [create, *entries[:50]], 19)

    def test_v12_stripped_create_refused(self) -> None:
        """v12: a stripped m.room.create beside the full one is 400 M_INVALID_PARAM: the full
        create event is what the room ID vouches for, and listeners and hooks must not be handed
        a second, unverified one."""
        room_version, create, room_id = self.room("12")
        forged = stripped("m.room.create", "", {"creator": "@evil:x"}, create["sender"])
        for state in ([create, forged], [forged, create]):
            answer, _ = self.send_logged(room_version, room_id, state)
            body = self.assertRefused(answer, 400, "M_INVALID_PARAM")
            self.assertIn("stripped m.room.create", body["error"])

    def test_v12_valid_full_entries_and_stripped_accepted(self) -> None:
        """v12: valid full entries (keys of their senders' servers fetched as needed) and
        stripped entries are accepted; the line warns of the stripped ones only."""
        room_version, create, room_id = self.room("12")
        ours = self.state_event(room_version, room_id)
        theirs = self.state_event(room_version, room_id, server=THIRD, key=self.third_key)
        name = stripped("m.room.name", "", {"name": "x"})
        (code, _), line = self.send_logged(room_version, room_id, [create, ours, theirs, name])
        self.assertEqual(code, 200)
        self.assertEqual(self.s.federation.count(THIRD), 1)
        self.assertIs(line["log_level"], LogLevel.warn)
        self.assertEqual(line["stripped_state"], 1)
        self.assertNotIn("invalid_room_state", line)
        (code, _), line = self.send_logged(room_version, room_id, [create, ours, theirs])
        self.assertEqual(code, 200)
        self.assertIs(line["log_level"], LogLevel.info)
        self.assertNotIn("stripped_state", line)

    def key_servers(self, count: int) -> tuple[list[str], Any]:
        """``count`` new servers serving one key (whose keys we do not hold yet) and the key."""
        key = make_key("many1")
        servers = [f"s{n}.example" for n in range(count)]
        for server in servers:
            self.s.federation.add_key_server(self.s.clock, server, [key])
        return servers, key

    def test_v12_key_servers_capped(self) -> None:
        """v12: full entries needing the keys of more than 8 servers (ours and the inviting
        server's, in memory, not counted): 400 M_INVALID_PARAM naming the cap, before any
        fetch; at the cap, accepted."""
        cap = 8  # the README's number, not the module's constant: the test pins it
        room_version, create, room_id = self.room("12")
        servers, key = self.key_servers(cap + 1)
        known = [
            self.state_event(room_version, room_id),
            self.state_event(room_version, room_id, server=US, key=self.s.our_key),
        ]
        unknown = [self.state_event(room_version, room_id, server=s, key=key) for s in servers]
        answer, line = self.send_logged(room_version, room_id, [create, *known, *unknown])
        body = self.assertRefused(answer, 400, "M_INVALID_PARAM")
        self.assertIn(f"more than {cap} servers", body["error"])
        self.assertEqual(line["outcome"], "refused")
        self.assertEqual([c for c in self.s.federation.calls if c[1] in servers], [])
        answer, line = self.send_logged(room_version, room_id, [create, *known, *unknown[:-1]])
        self.assertEqual(answer[0], 200, answer[1])
        self.assertEqual([self.s.federation.count(s) for s in servers], [1] * cap + [0])
        forged = {**unknown[0], "signatures": {servers[0]: {key_id_of(key): "A" * 86}}}
        answer, line = self.send_logged(room_version, room_id, [create, *known, forged])
        body = self.assertRefused(answer, 400, "M_INVALID_PARAM")
        self.assertIn(f"signature check failed: Signature by {servers[0]}", body["error"])

    def test_v12_keys_fetched_at_once(self) -> None:
        """v12: the keys of the servers signing full entries are fetched at once (every one
        asked before any answers, each once), so an invite waits for one fetch, not one each."""
        room_version, create, room_id = self.room("12")
        servers, key = self.key_servers(3)
        for server in servers:
            self.s.federation.hold[server] = Deferred()
        entries = [self.state_event(room_version, room_id, server=s, key=key) for s in servers]
        again = self.state_event(
            room_version, room_id, server=servers[0], key=key, content={"join_rule": "public"}
        )
        event = build_invite(room_version, self.s.their_key, room_id=room_id)
        state = [create, *entries, again]
        deferred = self.s.send(
            2,
            self.s.v2_body(room_version, event, state),
            room_id=room_id,
            event_id=event_id_of(room_version, event),
        )
        self.s.client.flush()
        self.assertEqual([self.s.federation.count(s) for s in servers], [1, 1, 1])
        self.assertNoResult(deferred)
        for server in servers:
            self.s.federation.hold.pop(server).callback(None)
        self.assertEqual(self.result(deferred)[0], 200)
        self.assertEqual([self.s.federation.count(s) for s in servers], [1, 1, 1])

    def test_v12_signer_key_valid_at_the_entry_time(self) -> None:
        """v12 (key validity enforced, v5 on): a signer's key held in memory but valid only
        until before the entry was sent is not used: it is fetched again, and the entry
        verifies with the key now served."""
        room_version, create, room_id = self.room("12")
        (server,), key = self.key_servers(1)
        now = self.s.clock.seconds()
        self.s.clock.rightNow = now - 3600  # an hour ago, served valid for one second
        self.s.federation.add_key_server(self.s.clock, server, [key], validity_ms=1000)
        self.successResultOf(self.s.keyring.get_server_keys(server, [key_id_of(key)], 0))
        self.s.clock.rightNow = now
        self.s.federation.add_key_server(self.s.clock, server, [key])
        entry = self.state_event(room_version, room_id, server=server, key=key)
        answer, _ = self.send_logged(room_version, room_id, [create, entry])
        self.assertEqual(answer[0], 200, answer[1])
        self.assertEqual(self.s.federation.count(server), 2)

    def test_v12_key_fetches_at_their_cap(self) -> None:
        """v12: full entries whose signers' keys would need fetches while the keyring's
        fetches in flight are at their cap: 429 M_LIMIT_EXCEEDED (row 17), at once, nothing
        fetched; the lookups refused together leave no failure unhandled (none is logged as
        an unhandled error once collected)."""
        their_key_id = key_id_of(self.s.their_key)
        self.successResultOf(self.s.keyring.get_server_keys(THEM, [their_key_id], NOW_MS))
        self.patch(self.s.keyring, "_max_fetches", 1)
        self.s.federation.hold["slow.example"] = gate = Deferred()
        slow = self.s.keyring.get_server_keys("slow.example", ["ed25519:x"], 0)
        room_version, create, room_id = self.room("12")
        servers, key = self.key_servers(2)
        entries = [self.state_event(room_version, room_id, server=s, key=key) for s in servers]
        answer, _ = self.send_logged(room_version, room_id, [create, *entries])
        body = self.assertRefused(answer, 429, "M_LIMIT_EXCEEDED")
        self.assertEqual(body["retry_after_ms"], 5000)
        self.assertEqual([self.s.federation.count(s) for s in servers], [0, 0])
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])
        gate.callback(None)
        self.assertEqual(self.successResultOf(slow), {})

    def assertWarned(self, answer: tuple[int, Any], line: dict[str, Any], reason: str) -> None:
        """Accepted, on a warn line flagging invalid room state and giving (a part of) the reason
        of the first problem found."""
        self.assertEqual(answer[0], 200, answer[1])
        self.assertEqual(line["outcome"], "accepted")
        self.assertIs(line["log_level"], LogLevel.warn)
        self.assertIs(line["invalid_room_state"], True)
        self.assertIn(reason, line["room_state_problem"])
        self.assertIn(
            f"fails validation (first problem found: {line['room_state_problem']})",
            formatEvent(line),
        )

    def count_entry_checks(self) -> list[dict[str, Any]]:
        """The invite_room_state entries whose format is checked from now on (each one checked
        is first format-checked), in order."""
        checked: list[dict[str, Any]] = []

        def counting(room_version: RoomVersion, event: Any, **kwargs: Any) -> Any:
            if event.get("type") != "m.room.member":  # not the invite itself
                checked.append(event)
            return check_event_format(room_version, event, **kwargs)

        self.patch(inbound_module, "check_event_format", counting)
        return checked

    def test_v1_to_11_invalid_entries_warned(self) -> None:
        """v1-11: a full entry failing a check is accepted (200) with a warning naming the reason
        and counting the problems; so is a missing create event (empty state included)."""
        room_version, create, room_id = self.room("10")
        for what, entry, reason in self.bad_entries(room_version, room_id):
            answer, line = self.send_logged(room_version, room_id, [create, entry])
            self.assertWarned(answer, line, reason)
            self.assertNotIn("stripped_state", line, what)
        unsigned_create = {**create, "content": {"room_version": "9"}, "signatures": {}}
        answer, line = self.send_logged(room_version, room_id, [unsigned_create])
        self.assertWarned(answer, line, "signature check failed")
        no_create = "invite_room_state has no full m.room.create event"
        answer, line = self.send_logged(room_version, room_id, [])
        self.assertWarned(answer, line, no_create)
        self.assertNotIn("stripped_state", line)
        self.assertNotIn("redacted_state", line)
        self.assertNotIn("did not match their content hash", formatEvent(line))
        stripped_create = stripped("m.room.create", "", create["content"], create["sender"])
        other_room = self.state_event(room_version, OTHER_ROOM[room_version])
        answer, line = self.send_logged(room_version, room_id, [stripped_create, other_room])
        self.assertWarned(answer, line, no_create)
        self.assertEqual(line["stripped_state"], 1)
        self.assertIn("holds 1 stripped entries and fails validation (", formatEvent(line))

    def test_v1_to_11_redacted_full_entry_kept_redacted(self) -> None:
        """v1-11: a checked full entry whose content hash does not match (a redacted create or
        name event, or content rewritten where no signature covers it) is accepted and stored
        as its redacted copy, counted on the warn line, not flagged as invalid state."""
        room_version, create, room_id = self.room("10")
        name = self.name_event(room_version, room_id)
        answer, line = self.send_logged(room_version, room_id, [create, redact(room_version, name)])
        self.assertKeptRedacted(answer, line, [create, redact(room_version, name)])
        # v10 redaction keeps no content of a create event but "creator".
        rewritten_create = {**create, "content": {**create["content"], "room_version": "9"}}
        rewritten_name = {**name, "content": {"name": "Rewritten"}}
        answer, line = self.send_logged(room_version, room_id, [rewritten_create, rewritten_name])
        expected = [redact(room_version, create), redact(room_version, name)]
        self.assertKeptRedacted(answer, line, expected, count=2)

    def test_v1_to_11_checks_stop_at_first_problem(self) -> None:
        """v1-11: the checks stop at the first problem (only a warning results): entries after
        it are not checked, nor any entry when the create event is missing."""
        room_version, create, room_id = self.room("10")
        checked = self.count_entry_checks()
        other_room = self.state_event(room_version, OTHER_ROOM[room_version])
        good = [self.state_event(room_version, room_id) for _ in range(5)]
        answer, line = self.send_logged(room_version, room_id, [create, other_room, *good])
        self.assertEqual(checked, [create, other_room])
        self.assertWarned(answer, line, "another room")
        del checked[:]
        answer, line = self.send_logged(room_version, room_id, [other_room, *good])
        self.assertEqual(checked, [])
        self.assertWarned(answer, line, "no full m.room.create event")

    def test_v1_to_11_first_full_entries_checked_only(self) -> None:
        """v1-11: only the first 20 full entries are checked (stripped ones not counted): a bad
        entry among them is warned of, one beyond them is not."""
        cap = 20  # the README's number, not the module's constant: the test pins it
        room_version, create, room_id = self.room("10")
        checked = self.count_entry_checks()
        good = self.state_event(room_version, room_id)
        bad = self.state_event(room_version, OTHER_ROOM[room_version])
        answer, line = self.send_logged(room_version, room_id, [create, *[good] * (cap - 2), bad])
        self.assertEqual(len(checked), cap)
        self.assertWarned(answer, line, "another room")
        del checked[:]
        state = [create, *[good] * (cap - 1), bad, *[good] * 5]
        answer, line = self.send_logged(room_version, room_id, state)
        self.assertEqual(len(checked), cap)
        self.assertEqual(answer[0], 200)
        self.assertIs(line["log_level"], LogLevel.info)
        self.assertNotIn("invalid_room_state", line)

    def test_v1_to_11_valid_state_not_warned(self) -> None:
        """v1-11: a valid full create event (and other valid full events) gets a plain info line;
        with stripped entries beside it the line warns of those only."""
        for identifier in ("1", "3", "10"):
            room_version = KNOWN_ROOM_VERSIONS[identifier]
            create = build_create_event(room_version, self.s.their_key)
            answer, line = self.send_logged(room_version, create["room_id"], [create])
            self.assertEqual(answer[0], 200, identifier)
            self.assertIs(line["log_level"], LogLevel.info, identifier)
            self.assertNotIn("invalid_room_state", line)
        room_version, create, room_id = self.room("10")
        name = stripped("m.room.name", "", {"name": "x"})
        state = [create, self.state_event(room_version, room_id), name]
        answer, line = self.send_logged(room_version, room_id, state)
        self.assertEqual(answer[0], 200)
        self.assertIs(line["log_level"], LogLevel.warn)
        self.assertEqual(line["stripped_state"], 1)
        self.assertNotIn("invalid_room_state", line)

    def test_v1_to_11_signatures_checked_with_known_keys_only(self) -> None:
        """v1-11: an entry signed by a server whose keys are not in memory is not checked (its
        keys are not fetched for an invite accepted anyway); once they are, it is."""
        room_version, create, room_id = self.room("10")
        forged = {
            **self.state_event(room_version, room_id, server=THIRD, key=self.third_key),
            "signatures": {THIRD: {key_id_of(self.third_key): "A" * 86}},
        }
        answer, line = self.send_logged(room_version, room_id, [create, forged])
        self.assertEqual(answer[0], 200)
        self.assertIs(line["log_level"], LogLevel.info)
        self.assertEqual(self.s.federation.count(THIRD), 0)
        self.successResultOf(
            self.s.keyring.get_server_keys(THIRD, [key_id_of(self.third_key)], NOW_MS)
        )
        answer, line = self.send_logged(room_version, room_id, [create, forged])
        self.assertWarned(answer, line, f"Signature by {THIRD}")


class StrictRoomStateTests(InboundTestCase):
    scenario_kwargs = {"strict_invite_room_state": True}

    def test_row13_strict_mode(self) -> None:
        """Row 13, strict mode: every entry must be a valid full PDU of the room, create included."""
        room_version = KNOWN_ROOM_VERSIONS["10"]
        create = build_create_event(room_version, self.s.their_key)
        event = build_invite(room_version, self.s.their_key, room_id=create["room_id"])
        self.assertRefused(self.send_v2(room_version, event, []), 400, "M_INVALID_PARAM")
        self.assertRefused(
            self.send_v2(room_version, event, [create, stripped("m.room.name", "", {"name": "x"})]),
            400,
            "M_INVALID_PARAM",
        )
        elsewhere = build_create_event(room_version, self.s.their_key, server="remote.example")
        elsewhere = hash_and_sign_event(
            room_version,
            {
                **{k: v for k, v in elsewhere.items() if k not in ("signatures", "hashes")},
                "room_id": "!other:remote.example",
            },
            THEM,
            self.s.their_key,
        )
        self.assertRefused(self.send_v2(room_version, event, [elsewhere]), 400, "M_INVALID_PARAM")
        self.assertEqual(self.send_v2(room_version, event, [create])[0], 200)

    def test_row13_strict_mode_entries_beyond_bound_dropped(self) -> None:
        """Row 13, strict mode: past the create event and 50 other full entries, the rest are
        dropped unchecked (not stored, not handed over, counted on a warn line), not refused:
        nothing unchecked reaches listeners, and Synapse's valid invites are not refused."""
        room_version = KNOWN_ROOM_VERSIONS["10"]
        create, room_id, entries = self.create_and_entries(room_version, 68)
        event = build_invite(room_version, self.s.their_key, room_id=room_id)
        with capturedLogs() as events:
            answer = self.send_v2(room_version, event, [create, *entries])
        self.assertEqual(answer[0], 200, answer[1])
        (line,) = [e for e in events if e.get("outcome")]
        self.assertIs(line["log_level"], LogLevel.warn)
        self.assertEqual(line["dropped_state"], 18)
        stored = self.s.store.invites[event_id_of(room_version, event)]
        self.assertEqual(stored.invite_room_state, [create, *entries[:50]])
        self.assertEqual(self.s.listened[-1].invite_room_state, [create, *entries[:50]])
        forged = {**entries[5], "signatures": {THEM: {key_id_of(self.s.their_key): "A" * 86}}}
        event = build_invite(room_version, self.s.their_key, room_id=room_id, extra={"depth": 9})
        state = [create, *entries[:5], forged, *entries[6:]]
        self.assertRefused(self.send_v2(room_version, event, state), 400, "M_INVALID_PARAM")

    def test_row13_strict_mode_v1_endpoint_beyond_bound_refused(self) -> None:
        """Row 13, strict mode, v1 endpoint: the room state rides in the event's unsigned, which
        is stored, handed over and answered as received, so more full entries than are checked
        (the create event and 50 others) are refused 400 M_INVALID_PARAM, not dropped: none
        unchecked reaches the store or listeners. At the bound the invite is accepted."""
        room_version = KNOWN_ROOM_VERSIONS["1"]
        create, room_id, entries = self.create_and_entries(room_version, 51)
        forged = {**entries[-1], "content": {"evil": True}, "signatures": {}}
        for depth, state in enumerate(([create, *entries], [create, *entries[:50], forged]), 10):
            event = build_invite(
                room_version,
                self.s.their_key,
                room_id=room_id,
                extra={"depth": depth, "unsigned": {"invite_room_state": state}},
            )
            body = self.assertRefused(self.send_v1(event), 400, "M_INVALID_PARAM")
            self.assertIn("more than 50 full events", body["error"])
            self.assertNotIn(event["event_id"], self.s.store.invites)
        self.assertEqual(self.s.listened, [])
        event = build_invite(
            room_version,
            self.s.their_key,
            room_id=room_id,
            extra={"depth": 20, "unsigned": {"invite_room_state": [create, *entries[:50]]}},
        )
        self.assertEqual(self.send_v1(event)[0], 200)
        self.assertEqual(self.s.listened[-1].invite_room_state, [create, *entries[:50]])

    def test_row13_strict_mode_content_hash_mismatch_kept_redacted(self) -> None:
        """Row 13, strict mode: a state event signed by its server whose content hash does not
        match (redacted, or its content rewritten since where no signature covers it) is
        accepted, stored and handed over as its redacted copy, never as received; with a bad
        signature it is refused: 400 M_INVALID_PARAM."""
        for identifier in ("10", "12"):
            room_version = KNOWN_ROOM_VERSIONS[identifier]
            if room_version.room_id_is_create_event_hash:
                room_version, create, room_id = v12_room(self.s.their_key)
            else:
                create = build_create_event(room_version, self.s.their_key)
                room_id = create["room_id"]
            name = hash_and_sign_event(
                room_version,
                {
                    "type": "m.room.name",
                    "state_key": "",
                    "sender": create["sender"],
                    "room_id": room_id,
                    "content": {"name": "The real name"},
                    "origin_server_ts": create["origin_server_ts"] + 1,
                    "depth": 2,
                    "prev_events": [],
                    "auth_events": [],
                },
                THEM,
                self.s.their_key,
            )
            redacted = redact(room_version, name)
            rewritten = {**name, "content": {"name": "Rewritten by the inviting server"}}
            forged = {**redacted, "signatures": {THEM: {key_id_of(self.s.their_key): "A" * 86}}}
            cases = (([create, redacted], redacted), ([create, rewritten], redacted))
            for depth, (state, kept) in enumerate(cases, start=10):
                event = build_invite(
                    room_version, self.s.their_key, room_id=room_id, extra={"depth": depth}
                )
                answer = self.send_v2(room_version, event, state)
                self.assertEqual(answer[0], 200, (identifier, answer[1]))
                stored = self.s.store.invites[event_id_of(room_version, event)]
                self.assertEqual(stored.invite_room_state, [create, kept], identifier)
                self.assertEqual(self.s.listened[-1].invite_room_state, [create, kept])
            event = build_invite(
                room_version, self.s.their_key, room_id=room_id, extra={"depth": 20}
            )
            body = self.assertRefused(
                self.send_v2(room_version, event, [create, forged]), 400, "M_INVALID_PARAM"
            )
            self.assertIn("An invite_room_state event: signature check failed", body["error"])


class PolicyRowTests(InboundTestCase):
    def test_row14_unknown_invitee(self) -> None:
        """Row 14: an invitee this server does not know: 404 M_NOT_FOUND."""
        room_version, event = self.s.invite(invitee=f"@nobody:{US}")
        self.assertRefused(self.send_v2(room_version, event), 404, "M_NOT_FOUND")

    def test_row14_any_local_user_mode(self) -> None:
        """With local_users = 'any', every user ID on our server is an invitee."""
        self.s = InviteScenario(policy_kwargs={"local_users": "any"})
        room_version, event = self.s.invite(invitee=f"@anyone:{US}")
        self.assertEqual(self.send_v2(room_version, event)[0], 200)

    def test_row15_operator_policy(self) -> None:
        """Row 15: sender server denied, sender denied, or a hook refusing: 403 M_FORBIDDEN."""
        for kwargs in ({"server_deny": ["REMOTE.example"]}, {"user_deny": ["@alice:*"]}):
            self.s = InviteScenario(policy_kwargs=kwargs)
            room_version, event = self.s.invite()
            self.assertRefused(self.send_v2(room_version, event), 403, "M_FORBIDDEN")

        class Hook:
            def __init__(self) -> None:
                self.seen: list[Any] = []

            def check_invite(self, invite: Any) -> Deferred[str | None]:
                self.seen.append(invite)
                return succeed("Bob is not taking invites from Alice")

        self.s = InviteScenario()
        hook = Hook()
        self.s.policy.add_hook(hook)
        room_version, event = self.s.invite()
        body = self.assertRefused(self.send_v2(room_version, event), 403, "M_FORBIDDEN")
        self.assertEqual(body["error"], "Bob is not taking invites from Alice")
        self.assertEqual(
            (hook.seen[0].sender, hook.seen[0].invitee, hook.seen[0].origin), (ALICE, BOB, THEM)
        )

    def test_row15_server_deny_names_sender_or_origin(self) -> None:
        """Row 15: inbound.server_deny ("origin or sender servers refused") refuses an invite
        whose sender's server or origin it names, each alone: the daemon makes them one name
        (row 11), but InvitePolicy is public and an embedder may check other invites."""
        from federation_invite.policy import InboundInvite

        store = MemoryStore()
        store.users.add(BOB)
        policy = InvitePolicy(US, store, server_deny=["denied.example"])

        def check(origin: str, sender: str) -> Deferred[str]:
            invite = InboundInvite(
                origin, KNOWN_ROOM_VERSIONS["10"], "!r:x", "$e", sender, BOB, {}, []
            )
            return Deferred.fromCoroutine(policy.check(invite))

        for origin, sender in (("denied.example", ALICE), (THEM, "@mallory:denied.example")):
            error = self.failureResultOf(check(origin, sender), MatrixError).value
            self.assertEqual((error.http_status, error.errcode), (403, "M_FORBIDDEN"))
        self.assertEqual(self.successResultOf(check(THEM, ALICE)), "pending")

    def test_row15_hook_answers(self) -> None:
        """Row 15: a hook may answer with a Deferred, a plain value or a coroutine: None lets the
        invite through, a reason refuses it (403 M_FORBIDDEN), a MatrixError is answered as it
        is, and any other error is a logged 500 M_UNKNOWN."""

        class Hook:
            def __init__(self, answer: Callable[[], Any]) -> None:
                self.answer = answer

            def check_invite(self, invite: Any) -> Any:
                return self.answer()

        class AsyncHook:
            def __init__(self, reason: str | None) -> None:
                self.reason = reason

            async def check_invite(self, invite: Any) -> str | None:
                return self.reason

        def refuse_with(error: Exception) -> Any:
            raise error

        teapot = MatrixError(418, "M_TEAPOT", "I am a teapot")
        cases: list[tuple[Any, int, str | None]] = [
            (Hook(lambda: None), 200, None),
            (Hook(lambda: succeed(None)), 200, None),
            (AsyncHook(None), 200, None),
            (Hook(lambda: "plain reason"), 403, "plain reason"),
            (AsyncHook("async reason"), 403, "async reason"),
            (Hook(lambda: refuse_with(teapot)), 418, "I am a teapot"),
            (Hook(lambda: refuse_with(RuntimeError("hook bug"))), 500, None),
            (Hook(lambda: fail(RuntimeError("hook bug"))), 500, None),
        ]
        for depth, (hook, status, message) in enumerate(cases, 1):
            self.s, self.stored_now = InviteScenario(), 0
            self.s.policy.add_hook(hook)
            room_version, event = self.s.invite(extra={"depth": depth})
            if status == 200:
                self.assertEqual(self.send_v2(room_version, event)[0], 200, depth)
                continue
            errcode = {403: "M_FORBIDDEN", 418: "M_TEAPOT", 500: "M_UNKNOWN"}[status]
            body = self.assertRefused(self.send_v2(room_version, event), status, errcode)
            if message is not None:
                self.assertEqual(body["error"], message)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_row15_hook_or_signer_cancelled_itself(self) -> None:
        """A hook's or signer's own CancelledError, the peer connected: a logged 500 M_UNKNOWN."""

        class CancelledHook:
            def check_invite(self, invite: Any) -> Any:
                return fail(CancelledError())

        def cancelled_signer(*args: Any) -> Deferred[dict[str, Any]]:
            return fail(CancelledError())

        for depth, broken in enumerate(("hook", "signer"), 1):
            self.s, self.stored_now = InviteScenario(), 0
            metrics = self.s.handler._metrics = InviteMetrics(enabled=True)
            if broken == "hook":
                self.s.policy.add_hook(CancelledHook())
            else:
                self.patch(self.s.handler._signer, "sign_event", cancelled_signer)
            room_version, event = self.s.invite(extra={"depth": depth})
            with capturedLogs() as events:
                self.assertRefused(self.send_v2(room_version, event), 500, "M_UNKNOWN")
            (line,) = [e for e in events if e.get("outcome")]
            self.assertEqual((line["outcome"], line["status"]), ("refused", 500), broken)
            counted = metrics.registry.get_sample_value(
                "federation_invite_inbound_invites_total",
                {"outcome": "refused", "errcode": "M_UNKNOWN"},
            )
            self.assertEqual(counted, 1.0, broken)
        self.assertEqual(len(self.flushLoggedErrors(CancelledError)), 2)

    def test_row15_hook_unencodable_matrix_error(self) -> None:
        """A hook's MatrixError whose body cannot be encoded (a date, a set, bytes): a logged
        500 M_UNKNOWN, answered, counted and on the invite's line as such (not as its 403)."""
        import datetime

        class Hook:
            def __init__(self, error: MatrixError, deferred: bool) -> None:
                self.error, self.deferred = error, deferred

            def check_invite(self, invite: Any) -> Any:
                if self.deferred:
                    return fail(self.error)
                raise self.error

        errors = [
            MatrixError(403, "M_FORBIDDEN", "Not now", until=datetime.date(2030, 1, 1)),
            MatrixError(403, "M_FORBIDDEN", "Not now", servers={"a"}),
            MatrixError(403, "M_FORBIDDEN", b"Not now"),  # type: ignore[arg-type]
        ]
        for depth, error in enumerate(errors, 1):
            self.s, self.stored_now = InviteScenario(), 0
            metrics = self.s.handler._metrics = InviteMetrics(enabled=True)
            self.s.policy.add_hook(Hook(error, deferred=depth % 2 == 1))
            room_version, event = self.s.invite(extra={"depth": depth})
            with capturedLogs() as events:
                body = self.assertRefused(self.send_v2(room_version, event), 500, "M_UNKNOWN")
            self.assertEqual(body, {"errcode": "M_UNKNOWN", "error": "Internal server error"})
            (line,) = [e for e in events if e.get("outcome")]
            self.assertEqual((line["outcome"], line["status"]), ("refused", 500), depth)
            counted = metrics.registry.get_sample_value(
                "federation_invite_inbound_invites_total",
                {"outcome": "refused", "errcode": "M_UNKNOWN"},
            )
            self.assertEqual(counted, 1.0, depth)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 3)

    def test_row15_hook_matrix_error_the_web_cannot_answer(self) -> None:
        """A hook's MatrixError with a bad status or retry_after_ms: answered, logged and
        counted alike as a 500 M_UNKNOWN (not as the hook's 429/403, nor left unanswered)."""

        class Hook:
            def __init__(self, error: MatrixError) -> None:
                self.error = error

            def check_invite(self, invite: Any) -> Any:
                raise self.error

        errors = [
            MatrixError(429, "M_LIMIT_EXCEEDED", "Slow down", retry_after_ms=None),
            MatrixError(429, "M_LIMIT_EXCEEDED", "Slow down", retry_after_ms="soon"),
            MatrixError("403", "M_FORBIDDEN", "Not now"),  # type: ignore[arg-type]
            MatrixError(1403, "M_FORBIDDEN", "Not now"),
            MatrixError(True, "M_FORBIDDEN", "Not now"),
        ]
        for depth, error in enumerate(errors, 1):
            self.s, self.stored_now = InviteScenario(), 0
            metrics = self.s.handler._metrics = InviteMetrics(enabled=True)
            self.s.policy.add_hook(Hook(error))
            room_version, event = self.s.invite(extra={"depth": depth})
            with capturedLogs() as events:
                body = self.assertRefused(self.send_v2(room_version, event), 500, "M_UNKNOWN")
            self.assertEqual(body, {"errcode": "M_UNKNOWN", "error": "Internal server error"})
            (line,) = [e for e in events if e.get("outcome")]
            self.assertEqual(
                (line["outcome"], line["status"], line.get("errcode")),
                ("refused", 500, "M_UNKNOWN"),
                error,
            )
            for errcode, expected in (("M_UNKNOWN", 1.0), (error.errcode, None)):
                counted = metrics.registry.get_sample_value(
                    "federation_invite_inbound_invites_total",
                    {"outcome": "refused", "errcode": errcode},
                )
                self.assertEqual(counted, expected, (error, errcode))
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), len(errors))

    def test_row15_hook_without_check_invite_refused(self) -> None:
        """A hook without a callable check_invite (a plain function, say) is refused with a
        TypeError when registered, rather than answering every invite with 500."""

        def function_hook(invite: Any) -> None:
            return None

        class NotCallable:
            check_invite = None

        config, key = load_config(None, {"server_name": US}), make_key("us1")
        components = build_components(config, self.s.clock, self.s.store, key)
        for hook in (function_hook, NotCallable(), None):
            with self.assertRaises(TypeError) as raised:
                self.s.policy.add_hook(hook)
            self.assertIn("check_invite", str(raised.exception))
            with self.assertRaises(TypeError):
                InvitePolicy(US, self.s.store, hooks=[hook])
            with self.assertRaises(TypeError):
                components.add_policy_hook(hook)
            with self.assertRaises(TypeError):
                build_components(config, self.s.clock, self.s.store, key, hooks=[hook])
        room_version, event = self.s.invite()
        self.assertEqual(self.send_v2(room_version, event)[0], 200)

    def test_row15_16_rules_not_bypassed_by_port_dot_or_case(self) -> None:
        """Deny lists and invitee rules match the sender's host whatever port, trailing dot or
        case it is written with."""
        from federation_invite.auth import ServerAcl

        for name in ("remote.example:8448", "REMOTE.example."):
            self.assertFalse(ServerAcl.of(deny=("remote.example",)).allows(name))
        self.s = InviteScenario(policy_kwargs={"server_deny": ["remote.example"], "user_deny": []})
        from federation_invite.policy import InboundInvite

        invite = InboundInvite(
            "remote.example:8448",
            KNOWN_ROOM_VERSIONS["10"],
            "!r:x",
            "$e",
            "@a:remote.example:8448",
            BOB,
            {},
            [],
        )
        failure = self.failureResultOf(Deferred.fromCoroutine(self.s.policy.check(invite)))
        self.assertEqual(failure.value.errcode, "M_FORBIDDEN")
        self.s = InviteScenario()
        self.s.store.rules.append(InviteRule(BOB, "server", "remote.example", "block"))
        self.s.store.rules.append(InviteRule(BOB, "user", "@mallory:remote.example", "block"))
        for sender, origin in (
            ("@a:REMOTE.example.", "REMOTE.example."),
            ("@mallory:remote.example:8448", "remote.example:8448"),
        ):
            invite = InboundInvite(
                origin, KNOWN_ROOM_VERSIONS["10"], "!r:x", "$e", sender, BOB, {}, []
            )
            failure = self.failureResultOf(Deferred.fromCoroutine(self.s.policy.check(invite)))
            self.assertEqual(failure.value.errcode, "M_INVITE_BLOCKED")

    def test_row15_16_ipv6_server_names(self) -> None:
        """Rows 15-16: an IPv6 server name in the server ACL, a deny list or an invitee rule
        ('[2001:db8::1]', '[::1]:8448') names that server; its brackets are not a character
        class matching single characters."""
        from federation_invite.policy import InboundInvite

        v6 = "[2001:db8::1]"
        acl = ServerAcl.of(deny=(v6, "[::1]:8448"))
        for name in (v6, v6 + ":8448", "[2001:DB8::1]", "[::1]:8448"):
            self.assertFalse(acl.allows(name), name)
        for name in ("2", "d", ":", "1", "[::1]:9", "[2001:db8::2]", THEM):
            self.assertTrue(acl.allows(name), name)
        only = ServerAcl.of(allow=(v6,))
        self.assertTrue(only.allows(v6 + ":8448"))
        self.assertFalse(only.allows("2"))
        self.s = InviteScenario(acl=ServerAcl.of(deny=(v6,)))
        room_version, event = self.s.invite()
        self.assertRefused(self.send_v2(room_version, event, origin=v6), 403, "M_FORBIDDEN")
        self.assertEqual(self.send_v2(room_version, event)[0], 200)

        def check(server: str) -> Deferred[str]:
            invite = InboundInvite(
                server, KNOWN_ROOM_VERSIONS["10"], "!r:x", "$e", f"@alice:{server}", BOB, {}, []
            )
            return Deferred.fromCoroutine(self.s.policy.check(invite))

        for policy_kwargs in ({"server_deny": [v6]}, {"user_deny": [f"@*:{v6}"]}):
            self.s = InviteScenario(policy_kwargs=policy_kwargs)
            self.assertEqual(self.failureResultOf(check(v6)).value.errcode, "M_FORBIDDEN")
            self.assertEqual(self.successResultOf(check("d")), "pending")
        for kind, pattern in (("server", v6), ("user", f"@alice:{v6}")):
            self.s = InviteScenario()
            self.s.store.rules.append(InviteRule(BOB, kind, pattern, "block"))
            self.assertEqual(self.failureResultOf(check(v6)).value.errcode, "M_INVITE_BLOCKED")
            self.assertEqual(self.successResultOf(check("d")), "pending")

    def test_row15_other_spellings_of_a_denied_server(self) -> None:
        """Row 15: a server denied by inbound.server_allow/server_deny or the policy's
        server_deny, as an IPv6 literal or with a port, is refused (403 M_FORBIDDEN) under every
        spelling of the same address and port ([2a01:04f8::1], [2a01:4f8:0::1], port 08448),
        and the deny entry may itself be written in any of them; other servers are served."""
        denied = "[2a01:4f8::1]"
        spellings = [
            denied,
            "[2A01:4F8::1]",
            "[2a01:04f8::1]",
            "[2a01:4f8:0::1]",
            "[2a01:4f8:0:0:0:0:0:1]",
            "[2a01:04f8::1]:08448",
        ]
        for entry in (denied, "[2A01:04F8:0::1]"):
            for scenario in (
                InviteScenario(acl=ServerAcl.of(deny=(entry,))),
                InviteScenario(policy_kwargs={"server_deny": [entry]}),
            ):
                self.s, self.stored_now = scenario, 0
                for depth, origin in enumerate(spellings, 1):
                    answer = self.result(self.send_as(origin, depth))
                    self.assertRefused(answer, 403, "M_FORBIDDEN")
                self.assertEqual(self.result(self.send_as("[2a01:4f8::2]", 9))[0], 200)
        for entry in ("evil.example:8448", "evil.example:08448"):
            for scenario in (
                InviteScenario(acl=ServerAcl.of(deny=(entry,))),
                InviteScenario(policy_kwargs={"server_deny": [entry]}),
            ):
                self.s, self.stored_now = scenario, 0
                for depth, origin in enumerate(
                    ("evil.example:8448", "EVIL.example:8448", "evil.example:08448"), 1
                ):
                    answer = self.result(self.send_as(origin, depth))
                    self.assertRefused(answer, 403, "M_FORBIDDEN")
                self.assertEqual(self.result(self.send_as("evil.example:8449", 9))[0], 200)

    def test_row15_16_user_globs_ignore_case(self) -> None:
        """Rows 15-16: inbound.user_deny and invitee user rules match user IDs in any case, as
        Synapse's invite rules (matrix_common glob_to_regex) do."""
        from federation_invite.policy import InboundInvite

        def check(sender: str) -> Deferred[str]:
            invite = InboundInvite(
                THEM, KNOWN_ROOM_VERSIONS["10"], "!r:x", "$e", sender, BOB, {}, []
            )
            return Deferred.fromCoroutine(self.s.policy.check(invite))

        self.s = InviteScenario(policy_kwargs={"user_deny": ["@spam*:*"]})
        for sender in ("@spam1:them.example", "@SPAM1:them.example", "@Spam:them.example"):
            self.assertEqual(self.failureResultOf(check(sender)).value.errcode, "M_FORBIDDEN")
        self.assertEqual(self.successResultOf(check("@alice:them.example")), "pending")
        for pattern, action, status in (
            ("@Mallory:*", "block", None),
            ("@MALLORY:them.example", "ignore", "ignored"),
        ):
            self.s = InviteScenario()
            self.s.store.rules.append(InviteRule(BOB, "user", pattern, action))
            if status is None:
                failure = self.failureResultOf(check("@mallory:them.example"))
                self.assertEqual(failure.value.errcode, "M_INVITE_BLOCKED")
            else:
                self.assertEqual(self.successResultOf(check("@mallory:them.example")), status)
            self.assertEqual(self.successResultOf(check("@alice:them.example")), "pending")

    def test_deny_lists_refuse_a_single_string(self) -> None:
        """server_deny or user_deny given as a str is a TypeError at construction, not a list of
        one-character globs that denies nobody."""
        for kwargs in ({"server_deny": "remote.example"}, {"user_deny": "@alice:remote.example"}):
            with self.assertRaises(TypeError):
                InvitePolicy(US, self.s.store, **kwargs)  # type: ignore[arg-type]

    def test_row15_hook_reason_cut(self) -> None:
        """Row 15: a hook's reason is answered as the 403 M_FORBIDDEN's error, cut to 500
        characters."""

        class Verbose:
            def check_invite(self, invite: Any) -> str:
                return "r" * 600

        self.s.policy.add_hook(Verbose())
        room_version, event = self.s.invite()
        body = self.assertRefused(self.send_v2(room_version, event), 403, "M_FORBIDDEN")
        self.assertEqual(body["error"], "r" * 500)

    def test_policy_arguments_checked(self) -> None:
        """local_users is 'database' or 'any', and caching needs a clock: else ValueError."""
        with self.assertRaises(ValueError):
            InvitePolicy(US, self.s.store, local_users="all")
        for seconds in (5.0, 0.5):
            with self.assertRaises(ValueError):
                InvitePolicy(US, self.s.store, cache_seconds=seconds)
        InvitePolicy(US, self.s.store, local_users="any", cache_seconds=0.0)

    def test_row14_invitee_of_another_server(self) -> None:
        """InvitePolicy.check (public: an embedder may call it) refuses an invitee of another
        server, 404 M_NOT_FOUND, whatever local_users says ('any' is every user of ours)."""
        from federation_invite.policy import InboundInvite

        invitee = "@bob:elsewhere.example"
        for local_users in ("database", "any"):
            self.s = InviteScenario(policy_kwargs={"local_users": local_users})
            self.s.store.users.add(invitee)
            invite = InboundInvite(
                THEM, KNOWN_ROOM_VERSIONS["10"], "!r:x", "$e", ALICE, invitee, {}, []
            )
            failure = self.failureResultOf(
                Deferred.fromCoroutine(self.s.policy.check(invite)), MatrixError
            )
            self.assertEqual(
                (failure.value.http_status, failure.value.errcode), (404, "M_NOT_FOUND")
            )

    def test_row16_invitee_rules(self) -> None:
        """Row 16: a block rule gives 403 M_INVITE_BLOCKED; allow overrides block."""
        self.s.store.rules.append(InviteRule(BOB, "server", "*", "block"))
        room_version, event = self.s.invite()
        self.assertRefused(self.send_v2(room_version, event), 403, "M_INVITE_BLOCKED")
        self.s.store.rules.append(InviteRule(BOB, "user", ALICE, "allow"))
        self.assertEqual(self.send_v2(room_version, event)[0], 200)

    def test_row16_ignore_rule(self) -> None:
        """Row 16: an ignore rule accepts and stores the invite as ignored, not handed over."""
        self.s.store.rules.append(InviteRule(BOB, "user", "@alice:*", "ignore"))
        room_version, event = self.s.invite()
        code, body = self.send_v2(room_version, event)
        self.assertEqual(code, 200)
        self.assertCoSigned(room_version, event, body["event"])
        self.assertEqual(self.s.store.invites[event_id_of(room_version, event)].status, "ignored")
        self.assertEqual(self.s.listened, [])

    def test_row16_server_rules_match_any_case(self) -> None:
        """Row 16: a user's server rule matches the sender's server in any case, wildcards
        included, as its user rules and the operator's lists do."""
        for pattern in ("*.EVIL.example", "X.Evil.*", "x.EVIL.example"):
            rule = InviteRule(BOB, "server", pattern, "block")
            error = self.assertRaises(
                MatrixError,
                InvitePolicy._invitee_rules,
                [rule],
                "@a:x.evil.example",
                "x.evil.example",
            )
            self.assertEqual((error.http_status, error.errcode), (403, "M_INVITE_BLOCKED"))


class PolicyCacheTests(InboundTestCase):
    scenario_kwargs = {"policy_cache_seconds": 5.0, "limits": InviteLimits(invitee_burst=100)}

    def test_cached_within_ttl_then_refreshed(self) -> None:
        """An invitee's status and rules are read once per TTL; changes apply after it."""
        for depth in (1, 2, 3):
            room_version, event = self.s.invite(extra={"depth": depth})
            self.assertEqual(self.send_v2(room_version, event)[0], 200)
        self.assertEqual(self.s.store.policy_reads, 1)
        self.s.store.rules.append(InviteRule(BOB, "server", "*", "block"))
        room_version, event = self.s.invite(extra={"depth": 4})
        self.assertEqual(self.send_v2(room_version, event)[0], 200)
        self.s.clock.advance(5)
        room_version, event = self.s.invite(extra={"depth": 5})
        self.assertRefused(self.send_v2(room_version, event), 403, "M_INVITE_BLOCKED")
        self.assertEqual(self.s.store.policy_reads, 2)

    def test_nothing_kept_when_caching_is_off(self) -> None:
        """With cache_seconds 0 (the default) every invite reads its invitee's state, and no
        answer is kept in memory."""
        self.s = InviteScenario()
        for depth in (1, 2):
            room_version, event = self.s.invite(extra={"depth": depth})
            self.assertEqual(self.send_v2(room_version, event)[0], 200)
        self.assertEqual(self.s.store.policy_reads, 2)
        self.assertEqual(self.s.policy._cache, {})

    def test_cache_emptied_when_full(self) -> None:
        """A read that would take the cache past its size empties it first (memory stays
        bounded): the invitees cached before are read again, the last one is not."""
        self.patch(policy_module, "_CACHE_SIZE", 2)
        users = [f"@u{i}:{US}" for i in range(3)]
        self.s.store.users.update(users)
        for depth, user in enumerate([*users, users[1], users[2], users[0]]):
            room_version, event = self.s.invite(invitee=user, extra={"depth": depth + 1})
            self.assertEqual(self.send_v2(room_version, event)[0], 200)
        self.assertEqual(self.s.store.policy_reads, 5)

    def test_cache_size_is_the_documented_one(self) -> None:
        """The bound README's policy_cache_seconds row (the option's doc) gives."""
        with open(source_tree_file("README.md"), encoding="utf-8") as readme:
            text = readme.read()
        self.assertEqual(policy_module._CACHE_SIZE, 100_000)
        self.assertIn(f"At most {policy_module._CACHE_SIZE:,} invitees are held", text)

    def test_forget(self) -> None:
        """forget() drops cached answers at once (one invitee, or all)."""
        room_version, event = self.s.invite(extra={"depth": 1})
        self.assertEqual(self.send_v2(room_version, event)[0], 200)
        self.s.store.users.discard(BOB)
        self.s.policy.forget(BOB)
        room_version, event = self.s.invite(extra={"depth": 2})
        self.assertRefused(self.send_v2(room_version, event), 404, "M_NOT_FOUND")
        self.s.store.users.add(BOB)
        self.s.policy.forget()
        self.assertEqual(self.send_v2(room_version, event)[0], 200)

    def test_clock_stepping_back_does_not_keep_answers(self) -> None:
        """Answers read before the wall clock stepped back are read again: a rule added or a
        user removed since applies at once, not once the clock is back where it was."""
        room_version, event = self.s.invite(extra={"depth": 1})
        self.assertEqual(self.send_v2(room_version, event)[0], 200)
        self.s.store.rules.append(InviteRule(BOB, "server", "*", "block"))
        self.s.clock.rightNow -= 3600
        room_version, event = self.s.invite(extra={"depth": 2})
        self.assertRefused(self.send_v2(room_version, event), 403, "M_INVITE_BLOCKED")
        self.assertEqual(self.s.store.policy_reads, 2)
        self.s.store.users.discard(BOB)
        self.s.clock.rightNow -= 3600
        room_version, event = self.s.invite(extra={"depth": 3})
        self.assertRefused(self.send_v2(room_version, event), 404, "M_NOT_FOUND")
        self.assertEqual(self.s.store.policy_reads, 3)


class PolicyReadSharingTests(SynchronousTestCase):
    """Cache misses are read in groups: one read in flight, the next takes all queued."""

    def setUp(self) -> None:
        self.reads: list[tuple[list[str], Deferred[dict[str, tuple[bool, list[Any]]]]]] = []
        test = self

        class SlowStore:
            def invitee_states(
                self, user_ids: list[str]
            ) -> Deferred[dict[str, tuple[bool, list[Any]]]]:
                reading: Deferred[dict[str, tuple[bool, list[Any]]]] = Deferred()
                test.reads.append((list(user_ids), reading))
                return reading

        self.clock = make_clock()
        self.policy = InvitePolicy(US, SlowStore(), clock=self.clock, cache_seconds=5.0)

    def answer(self, index: int, local: set[str]) -> None:
        users, reading = self.reads[index]
        reading.callback({user: (user in local, []) for user in users})

    def test_misses_read_in_groups(self) -> None:
        """A miss reads at once; misses during that read share the next one; then all cached."""
        carol, dave = f"@carol:{US}", f"@dave:{US}"
        first = self.policy._invitee(BOB)
        during = [self.policy._invitee(name) for name in (carol, BOB, dave, carol)]
        self.assertEqual([users for users, _ in self.reads], [[BOB]])
        self.answer(0, {BOB, carol})
        self.assertEqual(self.successResultOf(first), (True, []))
        self.assertTrue(during[1].called)
        # BOB's second caller shared the first read; carol and dave queued for one more.
        self.assertEqual([users for users, _ in self.reads], [[BOB], [carol, dave]])
        self.assertFalse(during[0].called)
        self.answer(1, {BOB, carol})
        self.assertEqual(
            [self.successResultOf(d) for d in during],
            [(True, []), (True, []), (False, []), (True, [])],
        )
        for name in (BOB, carol, dave):
            self.policy._invitee(name)
        self.assertEqual(len(self.reads), 2)
        self.clock.advance(5)
        self.policy._invitee(BOB)
        self.assertEqual(len(self.reads), 3)

    def test_cancelled_caller_cancels_no_other(self) -> None:
        """A request gone away cancels its own wait only; the read and the others go on."""
        first, second = self.policy._invitee(BOB), self.policy._invitee(BOB)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertFalse(self.reads[0][1].called)
        self.answer(0, set())
        self.assertEqual(self.successResultOf(second), (False, []))

    def test_failed_read_fails_every_caller_and_is_not_cached(self) -> None:
        """A store error reaches every caller of the read; queued misses still get read."""
        first, second = self.policy._invitee(BOB), self.policy._invitee(BOB)
        queued = self.policy._invitee(f"@carol:{US}")
        self.reads[0][1].errback(StoreError("invitee_states", "database is locked"))
        self.failureResultOf(first, StoreError)
        self.failureResultOf(second, StoreError)
        self.assertEqual(self.reads[1][0], [f"@carol:{US}"])
        self.answer(1, {f"@carol:{US}"})
        self.assertEqual(self.successResultOf(queued), (True, []))
        self.policy._invitee(BOB)
        self.assertEqual(self.reads[2][0], [BOB])

    def test_steady_invitee_refreshed_in_background(self) -> None:
        """An answer used in the second half of its life is read again without anyone waiting;
        the renewed answer then serves past the old expiry. A fresh answer is not read again."""
        first = self.policy._invitee(BOB)
        self.answer(0, {BOB})
        self.successResultOf(first)  # cached until t=5
        self.clock.advance(2)
        self.successResultOf(self.policy._invitee(BOB))
        self.clock.advance(1)  # t=3: 2 s of 5 left, so queued for a background read
        self.assertEqual(self.successResultOf(self.policy._invitee(BOB)), (True, []))
        self.assertEqual(len(self.reads), 1, "refreshes wait to be read together")
        self.clock.advance(0.3)  # the first queued refresh has waited 5% of the lifetime
        self.assertEqual(self.successResultOf(self.policy._invitee(BOB)), (True, []))
        self.assertEqual([users for users, _ in self.reads], [[BOB], [BOB]])
        self.answer(1, {BOB})  # read at t=3.3: cached until t=8.3
        self.clock.advance(2.7)  # t=6, past the first answer's expiry
        self.assertEqual(self.successResultOf(self.policy._invitee(BOB)), (True, []))
        self.assertEqual(len(self.reads), 2)
        self.clock.advance(2.3)  # t=8.3: expired, as no refresh was read since
        waiting = self.policy._invitee(BOB)
        self.assertNoResult(waiting)
        self.assertEqual(len(self.reads), 3)

    def test_refreshes_grouped_and_ride_along_with_misses(self) -> None:
        """Queued refreshes are read together: with the next miss's read, or once enough wait."""
        carol, dave = f"@carol:{US}", f"@dave:{US}"
        self.policy._invitee(BOB), self.policy._invitee(carol)
        self.answer(0, {BOB, carol})  # BOB's read; carol's queued behind it
        self.answer(1, {BOB, carol})  # both cached until t=5
        self.clock.advance(3)
        self.policy._invitee(BOB), self.policy._invitee(carol)
        missed = self.policy._invitee(dave)
        self.assertEqual(self.reads[2][0], [dave, BOB, carol])
        self.answer(2, {BOB, carol})
        self.assertEqual(self.successResultOf(missed), (False, []))
        self.clock.advance(3)  # t=6: both renewed at t=3 (until t=8)
        self.successResultOf(self.policy._invitee(BOB))
        self.successResultOf(self.policy._invitee(carol))
        self.assertEqual(len(self.reads), 3)
        # Enough queued: read at once, without waiting.
        self.clock.advance(3)  # t=9: expired; read again, cached until t=14
        self.policy._invitee(BOB), self.policy._invitee(carol)
        self.answer(3, {BOB, carol})
        self.answer(4, {BOB, carol})
        self.patch(policy_module, "_REFRESH_GROUP", 2)
        self.clock.advance(3)  # t=12
        self.policy._invitee(BOB)
        self.assertEqual(len(self.reads), 5)
        self.policy._invitee(carol)
        self.assertEqual(self.reads[5][0], [BOB, carol])

    def test_invitee_renewed_while_queued_is_not_read_again(self) -> None:
        """An invitee queued for a refresh while a read of it was on its way is renewed by
        that read: neither the next refresh group nor the next miss's read repeats it."""
        carol, dave = f"@carol:{US}", f"@dave:{US}"
        self.policy._invitee(BOB)
        self.answer(0, {BOB})  # cached until t=5
        self.clock.advance(3)
        self.policy._invitee(BOB)  # queued for a refresh
        self.clock.advance(0.3)
        self.policy._invitee(BOB)  # t=3.3: the refresh is read
        self.assertEqual(self.reads[1][0], [BOB])
        self.clock.advance(0.1)
        self.successResultOf(self.policy._invitee(BOB))  # queued again, meanwhile
        self.answer(1, {BOB})  # renewed: cached until t=8.3
        self.clock.advance(0.5)
        self.successResultOf(self.policy._invitee(BOB))  # fresh: not queued
        missed = self.policy._invitee(carol)
        self.assertEqual(self.reads[2][0], [carol], "BOB was renewed: no second read")
        self.answer(2, {carol})
        self.successResultOf(missed)
        # The same for a refresh group that would start with nothing due.
        self.clock.advance(2)  # t=5.9: BOB in the second half of its life again
        self.policy._invitee(BOB)
        self.policy._invitee(dave)  # a miss: BOB rides along
        self.assertEqual(self.reads[3][0], [dave, BOB])
        self.clock.advance(0.3)
        self.policy._invitee(BOB)  # queued while that read is on its way
        self.answer(3, {BOB})  # renewed until t=10.9
        self.clock.advance(0.3)
        self.policy._invitee(BOB)  # fresh; the stale queued entry is due by time alone
        self.assertEqual(len(self.reads), 4)

    def test_one_background_refresh_at_a_time(self) -> None:
        """Refreshes queued while a refresh read is on its way wait for it to end, however long
        they have waited: at most one background read is in flight at once."""
        carol = f"@carol:{US}"
        self.policy._invitee(BOB), self.policy._invitee(carol)
        self.answer(0, {BOB, carol})  # BOB's read; carol's queued behind it
        self.answer(1, {BOB, carol})  # both cached until t=5
        self.clock.advance(3)
        self.policy._invitee(BOB)  # queued for a refresh
        self.clock.advance(0.3)
        self.policy._invitee(BOB)  # t=3.3: the refresh is read
        self.assertEqual(self.reads[2][0], [BOB])
        self.policy._invitee(carol)  # queued while that refresh is on its way
        self.clock.advance(0.3)
        self.policy._invitee(carol)  # t=3.6: waited long enough, but one is in flight
        self.assertEqual(len(self.reads), 3)
        self.answer(2, {BOB})
        self.policy._invitee(carol)  # the next look reads it
        self.assertEqual(self.reads[3][0], [carol])

    def test_refresh_group_with_nothing_due_reads_nothing(self) -> None:
        """A refresh group due by time whose invitees are all being read already (by a miss's
        read) reads nothing: no store read of an empty list."""
        self.policy._invitee(BOB)
        self.answer(0, {BOB})  # cached until t=5
        self.clock.advance(3)
        self.policy._invitee(BOB)  # queued for a refresh
        self.clock.advance(0.3)
        self.policy._invitee(BOB)  # t=3.3: the refresh is read
        self.clock.advance(1.7)  # t=5: the first answer expired
        self.policy._invitee(BOB)  # a miss: its read is on its way too
        self.assertEqual([users for users, _ in self.reads], [[BOB], [BOB], [BOB]])
        self.answer(1, {BOB})  # the refresh: cached until t=8.3
        self.clock.advance(0.9)
        self.policy._invitee(BOB)  # t=5.9: in its second half, queued for a refresh
        self.clock.advance(0.3)
        self.policy._invitee(BOB)  # t=6.2: the group is due, but BOB is being read
        self.assertEqual(len(self.reads), 3)

    def test_refresh_failure_or_forget_leaves_no_stale_answer(self) -> None:
        """A failed refresh fails no caller and the answer expires as before; a refresh
        answered after forget() is not cached."""
        self.policy._invitee(BOB)
        self.answer(0, {BOB})
        self.clock.advance(3)
        self.policy._invitee(BOB)
        self.clock.advance(0.3)
        self.successResultOf(self.policy._invitee(BOB))
        self.policy.forget()
        self.answer(1, {BOB})
        after_forget = self.policy._invitee(BOB)
        self.assertNoResult(after_forget)
        self.assertEqual(self.reads[2][0], [BOB])
        self.answer(2, {BOB})  # t=3.3: until t=8.3
        self.successResultOf(after_forget)
        self.clock.advance(3)
        self.policy._invitee(BOB)
        self.clock.advance(0.3)
        self.policy._invitee(BOB)
        self.reads[3][1].errback(StoreError("invitee_states", "database is locked"))
        self.successResultOf(self.policy._invitee(BOB))  # t=6.6: still the t=3.3 answer
        self.clock.advance(1.7)  # t=8.3
        self.assertNoResult(self.policy._invitee(BOB))

    def test_forgotten_while_queued_for_refresh_not_read(self) -> None:
        """An invitee queued for a background refresh, then forgotten (users or rules
        changed), is not read by the next read (its next invite reads it), and the
        invitee whose miss started that read is answered, as is the forgotten one's next."""
        carol = f"@carol:{US}"
        self.policy._invitee(BOB)
        self.answer(0, {BOB})
        self.clock.advance(3)
        self.policy._invitee(BOB)  # second half of its life: queued for a refresh
        self.policy.forget(BOB)
        reading = self.policy._invitee(carol)
        self.assertEqual([users for users, _ in self.reads], [[BOB], [carol]])
        self.answer(1, {carol})
        self.assertEqual(self.successResultOf(reading), (True, []))
        again = self.policy._invitee(BOB)
        self.assertEqual(self.reads[2][0], [BOB])
        self.answer(2, set())
        self.assertEqual(self.successResultOf(again), (False, []))

    def test_invitee_missing_from_the_answer_is_not_ours(self) -> None:
        """A store whose answer leaves an invitee out (an embedder's IStore) makes it not
        ours, fail-closed, both for its caller and in the cache."""
        reading = self.policy._invitee(BOB)
        self.reads[0][1].callback({})
        self.assertEqual(self.successResultOf(reading), (False, []))
        self.assertEqual(self.successResultOf(self.policy._invitee(BOB)), (False, []))
        self.assertEqual(len(self.reads), 1)

    def test_cache_lifetime_under_a_second(self) -> None:
        """inbound.policy_cache_seconds under a second (0.5) still caches, for that long."""
        self.policy = InvitePolicy(US, self.policy._store, clock=self.clock, cache_seconds=0.5)
        self.policy._invitee(BOB)
        self.answer(0, {BOB})
        self.clock.advance(0.2)  # first half of its life: no refresh either
        self.assertEqual(self.successResultOf(self.policy._invitee(BOB)), (True, []))
        self.assertEqual(len(self.reads), 1)
        self.clock.advance(0.4)
        self.assertNoResult(self.policy._invitee(BOB))
        self.assertEqual(self.reads[1][0], [BOB])

    def test_store_raising_at_once_fails_the_read_only(self) -> None:
        """A store that raises instead of failing a Deferred fails that read's callers;
        the next miss is read again (no read is left marked in flight)."""
        calls = []

        class ClosedStore:
            def invitee_states(self, user_ids: list[str]) -> Any:
                calls.append(list(user_ids))
                raise RuntimeError("invitee_states on a closed store")

        policy = InvitePolicy(US, ClosedStore(), clock=self.clock, cache_seconds=5.0)
        self.failureResultOf(policy._invitee(BOB), RuntimeError)
        self.failureResultOf(policy._invitee(BOB), RuntimeError)
        self.assertEqual(calls, [[BOB], [BOB]])

    def test_answer_read_before_a_clock_step_back_is_read_again(self) -> None:
        """An answer read "in the future" (the clock stepped back since) is stale: the next
        caller waits for a read, whose answer is then cached for the normal lifetime."""
        self.policy._invitee(BOB)
        self.answer(0, {BOB})
        self.clock.rightNow -= 3600
        waiting = self.policy._invitee(BOB)
        self.assertNoResult(waiting)
        self.assertEqual(self.reads[1][0], [BOB])
        self.answer(1, set())
        self.assertEqual(self.successResultOf(waiting), (False, []))
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(self.policy._invitee(BOB)), (False, []))
        self.assertEqual(len(self.reads), 2)
        self.clock.advance(3)
        self.assertNoResult(self.policy._invitee(BOB))
        self.assertEqual(len(self.reads), 3)

    def test_refreshes_queued_before_a_clock_step_back(self) -> None:
        """Refreshes queued before the clock stepped back are read at the next look, not once
        the clock is back where it was; one no longer fresh rides along with a miss's read."""
        carol, dave = f"@carol:{US}", f"@dave:{US}"
        self.policy._invitee(BOB)
        self.answer(0, {BOB})
        self.clock.advance(3)
        self.policy._invitee(BOB)  # queued for a refresh
        self.clock.rightNow -= 0.4  # t=2.6: still fresh, still in its second half
        self.assertEqual(self.successResultOf(self.policy._invitee(BOB)), (True, []))
        self.assertEqual([users for users, _ in self.reads], [[BOB], [BOB]])
        self.answer(1, {BOB})  # read at t=2.6
        self.policy._invitee(carol)
        self.answer(2, {carol})  # read at t=2.6, too
        self.clock.advance(3)
        self.policy._invitee(BOB), self.policy._invitee(carol)  # queued at t=5.6
        self.clock.rightNow -= 3600  # both now read "in the future": stale
        self.policy._invitee(dave)
        self.assertEqual([users for users, _ in self.reads[3:]], [[dave, BOB, carol]])

    def test_any_local_users_reads_rules_only(self) -> None:
        """local_users = any: every user on our server is ours; its rules still apply."""
        rule = InviteRule(BOB, "server", "*", "block")
        store = MemoryStore()
        store.rules.append(rule)
        policy = InvitePolicy(US, store, local_users="any")
        self.assertEqual(self.successResultOf(policy._invitee(BOB)), (True, [rule]))


class RateLimitRowTests(InboundTestCase):
    scenario_kwargs = {
        "limits": InviteLimits(
            origin_per_second=1, origin_burst=3, invitee_per_second=0.1, invitee_burst=2
        )
    }

    def test_row17_per_origin(self) -> None:
        """Row 17: an origin over its burst: 429 M_LIMIT_EXCEEDED with retry_after_ms; it refills."""
        self.s.store.users.update({f"@u{i}:{US}" for i in range(10)})
        for i in range(3):
            room_version, event = self.s.invite(invitee=f"@u{i}:{US}")
            self.assertEqual(self.send_v2(room_version, event)[0], 200)
        room_version, event = self.s.invite(invitee=f"@u9:{US}")
        body = self.assertRefused(self.send_v2(room_version, event), 429, "M_LIMIT_EXCEEDED")
        self.assertEqual(body["retry_after_ms"], 1001)
        self.s.clock.advance(1)
        self.assertEqual(self.send_v2(room_version, event)[0], 200)

    def test_row17_key_fetches_at_their_cap(self) -> None:
        """Row 17: a required signer's key (v1: the event ID's server's) that would need a fetch
        while the keyring's fetches in flight are at their cap: 429 M_LIMIT_EXCEEDED with
        retry_after_ms, at once, without a fetch; invites needing only keys held are served."""
        import federation_invite.keyring as keyring_module

        self.patch(keyring_module, "_MAX_FETCHES_IN_FLIGHT", 1)
        self.s = InviteScenario(limits=InviteLimits(invitee_burst=100))
        room_version, event = self.s.invite()
        self.assertEqual(self.send_v2(room_version, event)[0], 200)
        v1 = KNOWN_ROOM_VERSIONS["1"]

        def signed_by(server: str) -> dict[str, Any]:
            event = build_invite(v1, self.s.their_key, extra={"event_id": f"$e:{server}"})
            event["signatures"][server] = {"ed25519:x": "A" * 86}
            return event

        gate: Deferred[None] = Deferred()
        self.s.federation.hold["slow.example"] = gate
        slow = signed_by("slow.example")
        pending = self.s.send(
            2, self.s.v2_body(v1, slow), room_id=slow["room_id"], event_id=slow["event_id"]
        )
        self.s.client.flush()
        self.assertNoResult(pending)
        body = self.assertRefused(
            self.send_v2(v1, signed_by("third.example")), 429, "M_LIMIT_EXCEEDED"
        )
        self.assertEqual(body["retry_after_ms"], 5000)
        self.assertEqual(self.s.federation.count("third.example"), 0)
        room_version, event = self.s.invite(extra={"depth": 5})
        self.assertEqual(self.send_v2(room_version, event)[0], 200)
        gate.callback(None)
        self.assertRefused(self.result(pending), 400, "M_INVALID_PARAM")
        self.assertRefused(self.send_v2(v1, signed_by("third.example")), 400, "M_INVALID_PARAM")
        self.assertEqual(self.s.federation.count("third.example"), 1)

    def test_hand_built_limits_are_the_documented_defaults(self) -> None:
        """InviteLimits() has the README's default limits, except that it does not slow."""
        documented = InviteLimits(
            origin_per_second=10.0,
            origin_burst=50,
            origin_concurrent=8,
            invitee_per_second=0.05,
            invitee_burst=10,
            origin_sleep_after=25,
            origin_sleep_ms=0,
        )
        self.assertEqual(InviteLimits(), documented)

    def test_row17_per_invitee(self) -> None:
        """Row 17: one invitee over its own limit: 429, while other invitees are served."""
        for depth in (1, 2):
            room_version, event = self.s.invite(extra={"depth": depth})
            self.assertEqual(self.send_v2(room_version, event)[0], 200)
        self.s.clock.advance(2)
        room_version, event = self.s.invite(extra={"depth": 3})
        code, body = self.send_v2(room_version, event)
        self.assertEqual((code, body["errcode"]), (429, "M_LIMIT_EXCEEDED"))
        self.assertEqual(body["retry_after_ms"], 8001)
        self.s.store.users.add(f"@carol:{US}")
        room_version, event = self.s.invite(invitee=f"@carol:{US}")
        self.assertEqual(self.send_v2(room_version, event)[0], 200)

    def test_row17_concurrency(self) -> None:
        """Row 17: more concurrent requests from one origin than allowed: 429."""
        self.s = InviteScenario(limits=InviteLimits(origin_concurrent=1))
        gate: Deferred[None] = Deferred()
        original = self.s.store.invitee_states

        def slow(user_ids: list[str]) -> Deferred[dict[str, tuple[bool, list[Any]]]]:
            return gate.addCallback(lambda _: self.successResultOf(original(user_ids)))

        self.s.store.invitee_states = slow  # type: ignore[method-assign]
        room_version, first = self.s.invite(extra={"depth": 1})
        pending = self.s.send(
            2,
            self.s.v2_body(room_version, first),
            room_id=first["room_id"],
            event_id=event_id_of(room_version, first),
        )
        room_version, second = self.s.invite(extra={"depth": 2})
        code, body = self.send_v2(room_version, second)
        self.assertEqual((code, body["errcode"]), (429, "M_LIMIT_EXCEEDED"))
        gate.callback(None)
        self.assertEqual(self.result(pending)[0], 200)
        self.assertEqual(self.s.handler._origin_concurrency.active(THEM), 0)

    def test_row17_origin_rate_shared_by_spellings(self) -> None:
        """Row 17: the spellings of one server name in other cases share its rate limit, as
        they share its keys and back-off: 'Remote.example' and 'REMOTE.EXAMPLE' get no budget
        of their own."""
        self.s = InviteScenario(
            limits=InviteLimits(origin_burst=3, origin_per_second=0.001, invitee_burst=100)
        )
        for depth in (1, 2, 3):
            self.assertEqual(self.result(self.send_as(THEM, depth))[0], 200)
        for depth, spelling in enumerate(("Remote.example", "REMOTE.EXAMPLE", THEM), 4):
            answer = self.result(self.send_as(spelling, depth))
            self.assertRefused(answer, 429, "M_LIMIT_EXCEEDED")

    def test_row17_origin_rate_shared_by_address_spellings(self) -> None:
        """Row 17: the spellings of one IPv6 literal ([2a01:04f8::1], [2a01:4f8:0::1], ...) and
        of one port (08448) share its rate limit: none gets a budget of its own."""
        self.s = InviteScenario(
            limits=InviteLimits(origin_burst=1, origin_per_second=0.001, invitee_burst=100)
        )
        self.assertEqual(self.result(self.send_as("[2a01:4f8::1]", 1))[0], 200)
        for depth, spelling in enumerate(
            (
                "[2a01:04f8::1]",
                "[2a01:04f8:0::1]",
                "[2a01:4f8:0::1]",
                "[2a01:4f8::0:1]",
                "[2a01:4f8::01]",
                "[2A01:4F8:0:0:0:0:0:1]",
            ),
            2,
        ):
            answer = self.result(self.send_as(spelling, depth))
            self.assertRefused(answer, 429, "M_LIMIT_EXCEEDED")
        self.assertEqual(self.result(self.send_as("evil.example:8448", 10))[0], 200)
        answer = self.result(self.send_as("evil.example:08448", 11))
        self.assertRefused(answer, 429, "M_LIMIT_EXCEEDED")

    def test_row17_origin_concurrency_shared_by_spellings(self) -> None:
        """Row 17: a request from 'REMOTE.example' counts against 'remote.example''s
        concurrency limit, and gives its place back when done."""
        self.s = InviteScenario(limits=InviteLimits(origin_concurrent=1, invitee_burst=100))
        gate: Deferred[None] = Deferred()
        original = self.s.store.invitee_states

        def slow(user_ids: list[str]) -> Deferred[dict[str, tuple[bool, list[Any]]]]:
            return gate.addCallback(lambda _: self.successResultOf(original(user_ids)))

        self.s.store.invitee_states = slow  # type: ignore[method-assign]
        pending = self.send_as(THEM, 1)
        self.s.client.flush()
        self.assertRefused(self.result(self.send_as("REMOTE.example", 2)), 429, "M_LIMIT_EXCEEDED")
        gate.callback(None)
        self.assertEqual(self.result(pending)[0], 200)
        self.assertEqual(self.result(self.send_as("REMOTE.example", 3))[0], 200)
        self.assertEqual(self.s.handler._origin_concurrency.active(THEM), 0)

    def test_row17_repeats_take_no_invitee_token(self) -> None:
        """Row 17: the invitee's limit counts invites stored, not repeats of one (row 18):
        sending an accepted invite again, however often, leaves its tokens for new invites
        (from this or any other server)."""
        self.s = InviteScenario(limits=InviteLimits(invitee_burst=3, invitee_per_second=0.001))
        room_version, event = self.s.invite(extra={"depth": 1})
        first = self.send_v2(room_version, event)
        self.assertEqual(first[0], 200)
        for _ in range(5):
            self.assertEqual(self.send_v2(room_version, event), first)
        self.assertEqual(len(self.s.store.invites), 1)
        for depth in (2, 3):
            room_version, other = self.s.invite(extra={"depth": depth})
            self.assertEqual(self.send_v2(room_version, other)[0], 200)
        room_version, fourth = self.s.invite(extra={"depth": 4})
        self.assertRefused(self.send_v2(room_version, fourth), 429, "M_LIMIT_EXCEEDED")
        self.assertEqual(self.send_v2(room_version, event), first)  # still answered (row 18)

    def test_row17_invites_not_stored_take_no_invitee_token(self) -> None:
        """Row 17: an invite that passed every check but was not stored gives the invitee's
        token back: the store failing (500), signing failing (500), the same event ID with a
        different event (row 19), the peer leaving before the store. A new invite is then
        accepted with a burst of one; once one is stored, the next is 429."""
        self.s = InviteScenario(limits=InviteLimits(invitee_burst=1, invitee_per_second=0.001))
        v1 = KNOWN_ROOM_VERSIONS["1"]
        self.s.store.fail_invites = True
        for depth in (1, 2):
            event = build_invite(v1, self.s.their_key, extra={"depth": depth})
            self.assertRefused(self.send_v2(v1, event), 500, "M_UNKNOWN")
        self.s.store.fail_invites = False

        def failing_sign(*args: Any) -> Deferred[dict[str, Any]]:
            raise RuntimeError("HSM unreachable")

        signer = self.s.handler._signer
        signs = signer.sign_event
        self.patch(signer, "sign_event", failing_sign)
        for depth in (3, 4):
            event = build_invite(v1, self.s.their_key, extra={"depth": depth})
            self.assertRefused(self.send_v2(v1, event), 500, "M_UNKNOWN")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        held: Deferred[dict[str, Any]] = Deferred()
        self.patch(signer, "sign_event", lambda *args: held)
        event = build_invite(v1, self.s.their_key, extra={"depth": 5})
        pending = self.s.send(
            2, self.s.v2_body(v1, event), room_id=event["room_id"], event_id=event["event_id"]
        )
        self.s.client.flush()
        pending.cancel()  # the peer leaves while we sign: nothing is stored
        self.s.client.flush()
        self.failureResultOf(pending)
        self.assertTrue(held.called)  # cancelled with the request
        self.assertEqual(self.s.store.invites, {})
        self.patch(signer, "sign_event", signs)
        # Row 19: the event ID stored for another invitee; Bob's invite under it is refused.
        carol = f"@carol:{US}"
        self.s.store.users.add(carol)
        same = {"event_id": "$same:remote.example"}
        event = build_invite(v1, self.s.their_key, invitee=carol, extra=same)
        self.assertEqual(self.send_v2(v1, event)[0], 200)
        other = build_invite(v1, self.s.their_key, extra={**same, "depth": 99})
        for _ in range(2):
            self.assertRefused(self.send_v2(v1, other), 400, "M_INVALID_PARAM")
        room_version, new = self.s.invite(extra={"depth": 6})
        self.assertEqual(self.send_v2(room_version, new)[0], 200)
        room_version, after = self.s.invite(extra={"depth": 7})
        self.assertRefused(self.send_v2(room_version, after), 429, "M_LIMIT_EXCEEDED")


class IdempotencyRowTests(InboundTestCase):
    def test_row18_same_event_again(self) -> None:
        """Row 18: the same event again: 200 with the same co-signed event, stored once."""
        room_version, event = self.s.invite()
        first = self.send_v2(room_version, event)
        second = self.send_v2(room_version, event)
        self.assertEqual(first, second)
        self.assertEqual(len(self.s.store.invites), 1)
        self.assertEqual(len(self.s.listened), 1)

    def test_row18_retry_with_another_unsigned(self) -> None:
        """Row 18: a retry whose unsigned differs (its age grows with each retry) is the same
        invite, which unsigned is not part of: 200 with the first answer, stored once."""
        room_version, event = self.s.invite()
        first = self.send_v2(room_version, event)
        self.assertEqual(first[0], 200)
        retry = {**event, "unsigned": {"age": 5000}}
        self.assertEqual(self.send_v2(room_version, retry), first)
        self.assertEqual(len(self.s.store.invites), 1)
        self.assertEqual(len(self.s.listened), 1)

    def test_row18_repeat_answered_even_if_now_refused(self) -> None:
        """Row 18: a retry of an accepted invite is answered as before even when a new rule or
        the invitee's exhausted limit would refuse a new invite."""
        self.s = InviteScenario(limits=InviteLimits(invitee_burst=1, invitee_per_second=0.001))
        room_version, event = self.s.invite()
        first = self.send_v2(room_version, event)
        self.assertEqual(first[0], 200)
        self.assertEqual(self.send_v2(room_version, event), first)  # invitee limit exhausted
        self.s.store.rules.append(InviteRule(BOB, "server", "*", "block"))
        self.assertEqual(self.send_v2(room_version, event), first)  # now blocked
        room_version, other = self.s.invite(extra={"depth": 77})
        self.assertRefused(self.send_v2(room_version, other), 403, "M_INVITE_BLOCKED")
        self.assertEqual(len(self.s.store.invites), 1)
        self.assertEqual(len(self.s.listened), 1)

    def test_row18_copy_sent_while_the_first_is_stored(self) -> None:
        """Row 18: a copy arriving while the first is stored, the invitee's limit spent: 200."""
        self.s = InviteScenario(limits=InviteLimits(invitee_burst=1, invitee_per_second=0.001))
        gates = self.hold_store()
        room_version, event = self.s.invite()
        event_id = event_id_of(room_version, event)
        body = self.s.v2_body(room_version, event)
        first = self.s.send(2, body, room_id=event["room_id"], event_id=event_id)
        self.s.client.flush()
        second = self.s.send(2, body, room_id=event["room_id"], event_id=event_id)
        self.s.client.flush()
        self.assertEqual(len(gates), 1)
        self.assertNoResult(second)
        gates[0].callback(None)
        answer = self.result(first)
        self.assertEqual(answer[0], 200)
        self.assertEqual(self.result(second), answer)
        self.assertEqual(len(self.s.store.invites), 1)
        self.assertEqual(len(self.s.listened), 1)

    def test_row18_two_copies_stored_at_once(self) -> None:
        """Row 18: two copies both past the checks (the invitee's limit not spent), stored at
        once: both answered 200 with the same bytes, one accepted and one repeated, stored
        once, one listener call."""
        gates = self.hold_store()
        room_version, event = self.s.invite()
        event_id = event_id_of(room_version, event)
        body = self.s.v2_body(room_version, event)
        with capturedLogs() as events:
            first = self.s.send(2, body, room_id=event["room_id"], event_id=event_id)
            self.s.client.flush()
            second = self.s.send(2, body, room_id=event["room_id"], event_id=event_id)
            self.s.client.flush()
            self.assertEqual(len(gates), 2)
            gates[0].callback(None)
            answer = self.result(first)
            raw = self.raw_answer
            gates[1].callback(None)
            self.assertEqual(self.result(second), answer)
            self.assertEqual(self.raw_answer, raw)
        self.assertEqual(answer[0], 200)
        self.assertEqual(
            sorted(e["outcome"] for e in events if e.get("outcome")), ["accepted", "repeated"]
        )
        self.assertEqual(len(self.s.store.invites), 1)
        self.assertEqual(len(self.s.listened), 1)
        self.assertEqual(self.s.handler._in_flight, {})

    def hold_store(self) -> list[Deferred[None]]:
        """Make each store_invite wait on a gate the test fires; the gates, in call order."""
        gates: list[Deferred[None]] = []
        store_invite = self.s.store.store_invite

        def held_store(record: Any) -> Deferred[Any]:
            gate: Deferred[None] = Deferred()
            gates.append(gate)
            return gate.addCallback(lambda _: self.successResultOf(store_invite(record)))

        self.s.store.store_invite = held_store  # type: ignore[method-assign]
        return gates

    def test_row18_copy_waiting_on_the_first_whose_peer_leaves(self) -> None:
        """Row 18: a copy refused by the invitee's limit (the first copy, being stored, holds
        the token) waits for the first; its peer leaving ends only that copy: the first is
        still answered 200 and the listener told once. With three copies and the middle one's
        peer gone, the third is still answered, with the first's bytes.

        This relies on the copy's waiter Deferred (``stored_first`` in
        ``InviteHandler._handle``) having no canceller: cancelling it then makes it swallow
        the first copy's later ``callback``. With a canceller leaving it unfired, that
        callback would raise AlreadyCalledError in the first copy's ``finally``: the first
        would answer 500 and tell no listener, and the copies after it would never be
        answered."""
        for copies in (2, 3):
            self.s = InviteScenario(limits=InviteLimits(invitee_burst=1, invitee_per_second=0.001))
            gates = self.hold_store()
            room_version, event = self.s.invite()
            event_id = event_id_of(room_version, event)
            body = self.s.v2_body(room_version, event)
            sent = []
            for _ in range(copies):
                sent.append(self.s.send(2, body, room_id=event["room_id"], event_id=event_id))
                self.s.client.flush()
            first, leaving, *rest = sent
            self.assertEqual(len(gates), 1)
            self.assertEqual(len(self.s.handler._in_flight[event_id]), copies - 1)  # waiting
            for copy in sent:
                self.assertNoResult(copy)
            leaving.cancel()  # the middle copy's peer goes away while it waits
            self.s.client.flush()
            self.failureResultOf(leaving)
            with capturedLogs() as events:
                gates[0].callback(None)
                answer = self.result(first)
                raw = self.raw_answer
                for copy in rest:
                    self.assertEqual(self.result(copy), answer)
                    self.assertEqual(self.raw_answer, raw)
            self.assertEqual(answer[0], 200)
            record = self.s.store.invites[event_id]
            self.assertEqual(answer[1], {"event": record.event})
            # The cancelled copy logs no outcome; the third is answered (and logged) as soon
            # as the first's store ends, before the first's own line.
            self.assertEqual(
                sorted(e["outcome"] for e in events if e.get("outcome")),
                ["accepted"] + ["repeated"] * len(rest),
            )
            self.assertEqual(len(self.s.store.invites), 1)
            self.assertEqual(self.s.listened, [record])
            self.assertEqual(self.s.handler._in_flight, {})

    def test_row18_retry_while_the_first_waits_for_the_origin_key(self) -> None:
        """Row 18: a retry (its unsigned age grown) arriving while the first copy waits for the
        origin's key: one key fetch; both answered 200 with the same bytes, one logged as
        accepted and the other as repeated; one row, one listener call."""
        gate: Deferred[None] = Deferred()
        self.s.federation.hold[THEM] = gate
        room_version, event = self.s.invite()
        event_id = event_id_of(room_version, event)
        retry = {**event, "unsigned": {"age": 999}}
        with capturedLogs() as events:
            first = self.s.send(
                2, self.s.v2_body(room_version, event), room_id=event["room_id"], event_id=event_id
            )
            self.s.client.flush()
            second = self.s.send(
                2, self.s.v2_body(room_version, retry), room_id=event["room_id"], event_id=event_id
            )
            self.s.client.flush()
            self.assertNoResult(first)
            self.assertNoResult(second)
            self.assertEqual(self.s.federation.count(THEM), 1)
            del self.s.federation.hold[THEM]
            gate.callback(None)
            answer = self.result(first)
            raw = self.raw_answer
            self.assertEqual(self.result(second), answer)
            self.assertEqual(self.raw_answer, raw)
        self.assertEqual(self.s.federation.count(THEM), 1)
        record = self.s.store.invites[event_id]
        self.assertEqual(answer, (200, {"event": record.event}))
        self.assertEqual(record.event["unsigned"], {"age": 4})
        self.assertEqual(
            sorted(e["outcome"] for e in events if e.get("outcome")), ["accepted", "repeated"]
        )
        self.assertEqual(len(self.s.store.invites), 1)
        self.assertEqual(self.s.listened, [record])

    def test_row18_same_invite_on_v1_then_v2_and_back(self) -> None:
        """Row 18: an invite accepted on v1 (invite_room_state in its unsigned), then sent on
        v2 with another invite_room_state: 200 with the event stored from v1, unsigned
        included, counted as repeated; the v2 body's invite_room_state is ignored. Sent on v1
        again, it gets the first v1 answer."""
        v1 = KNOWN_ROOM_VERSIONS["1"]
        event = build_invite(v1, self.s.their_key, extra={"event_id": "$a:remote.example"})
        on_v1 = {
            **event,
            "unsigned": {
                "age": 4,
                "invite_room_state": [stripped("m.room.name", "", {"name": "N"})],
            },
        }
        with capturedLogs() as events:
            code, v1_answer = self.send_v1(on_v1)
            v1_raw = self.raw_answer
            v2_answer = self.send_v2(v1, event, [stripped("m.room.name", "", {"name": "Other"})])
            v2_raw = self.raw_answer
            self.assertEqual(self.send_v1(on_v1), (code, v1_answer))
            self.assertEqual(self.raw_answer, v1_raw)
        self.assertEqual(code, 200)
        record = self.s.store.invites["$a:remote.example"]
        self.assertEqual(record.event["unsigned"], on_v1["unsigned"])
        self.assertEqual(v1_answer, [200, {"event": record.event}])
        self.assertEqual(v2_answer, (200, {"event": record.event}))
        assert record.event_json is not None
        self.assertEqual(v2_raw, b'{"event":' + record.event_json.encode() + b"}")
        self.assertEqual(record.invite_room_state, [stripped("m.room.name", "", {"name": "N"})])
        self.assertEqual(
            [e["outcome"] for e in events if e.get("outcome")],
            ["accepted", "repeated", "repeated"],
        )
        self.assertEqual(len(self.s.store.invites), 1)
        self.assertEqual(self.s.listened, [record])

    def test_row18_retry_resigned_with_a_rotated_key(self) -> None:
        """Row 18: a retry the sender re-signed with a new key after rotating (hashes and
        everything they cover unchanged): answered with the stored bytes, which carry the old
        key's signature; stored once."""
        room_version, event = self.s.invite()
        first = self.send_v2(room_version, event)
        first_raw = self.raw_answer
        self.assertEqual(first[0], 200)
        new_key = make_key("them2")
        self.s.federation.add_key_server(self.s.clock, THEM, [new_key])
        self.s.clock.advance(5)  # past the pause after the first request's key fetch
        unsigned = {k: v for k, v in event.items() if k != "signatures"}
        resigned = hash_and_sign_event(room_version, unsigned, THEM, new_key)
        self.assertEqual(list(resigned["signatures"][THEM]), ["ed25519:them2"])
        self.assertEqual(resigned["hashes"], event["hashes"])
        with capturedLogs() as events:
            self.assertEqual(self.send_v2(room_version, resigned), first)
        self.assertEqual(self.raw_answer, first_raw)
        self.assertEqual(first[1]["event"]["signatures"][THEM], event["signatures"][THEM])
        self.assertEqual([e["outcome"] for e in events if e.get("outcome")], ["repeated"])
        self.assertEqual(len(self.s.store.invites), 1)
        self.assertEqual(len(self.s.listened), 1)

    def test_row19_same_id_different_event(self) -> None:
        """Row 19: the same (opaque, v1) event ID with a different event: 400 M_INVALID_PARAM."""
        v1 = KNOWN_ROOM_VERSIONS["1"]
        event = build_invite(v1, self.s.their_key, extra={"event_id": "$same:remote.example"})
        self.assertEqual(self.send_v2(v1, event)[0], 200)
        other = build_invite(
            v1, self.s.their_key, extra={"event_id": "$same:remote.example", "depth": 99}
        )
        code, body = self.send_v2(v1, other)
        self.assertEqual((code, body["errcode"]), (400, "M_INVALID_PARAM"))
        self.assertEqual(self.s.store.invites["$same:remote.example"].event["depth"], 12)

    def test_row19_refused_when_a_rule_refuses_too(self) -> None:
        """Rows 18/19: an invite a rule now refuses, under the (opaque, v1) event ID of a stored
        invite that is another event, gets the rule's refusal, not the stored invite as if it
        were a retry of it."""
        v1 = KNOWN_ROOM_VERSIONS["1"]
        same = {"event_id": "$same:remote.example"}
        event = build_invite(v1, self.s.their_key, extra=same)
        self.assertEqual(self.send_v2(v1, event)[0], 200)
        self.s.store.rules.append(InviteRule(BOB, "server", "*", "block"))
        other = build_invite(v1, self.s.their_key, extra={**same, "depth": 99})
        self.assertRefused(self.send_v2(v1, other), 403, "M_INVITE_BLOCKED")
        self.assertEqual(self.s.store.invites["$same:remote.example"].event["depth"], 12)
        self.assertEqual(len(self.s.listened), 1)

    def test_row20_store_fails(self) -> None:
        """Row 20: the store fails: 500 M_UNKNOWN and nothing signed is returned."""
        self.s.store.fail_invites = True
        room_version, event = self.s.invite()
        code, body = self.send_v2(room_version, event)
        self.assertEqual((code, body["errcode"]), (500, "M_UNKNOWN"))
        self.assertNotIn("event", body)

    def test_row20_read_fails(self) -> None:
        """Row 20: a read on the way (the invitee's policy state) fails: 500 M_UNKNOWN, logged
        with the failed operation, and nothing signed is returned."""
        self.s.store.invitee_states = lambda user_ids: fail(  # type: ignore[method-assign]
            StoreError("invitee_states", "database is locked")
        )
        room_version, event = self.s.invite()
        with capturedLogs() as events:
            code, body = self.send_v2(room_version, event)
        self.assertEqual((code, body["errcode"]), (500, "M_UNKNOWN"))
        self.assertNotIn("event", body)
        (error,) = [e for e in events if e["log_level"] is LogLevel.error]
        self.assertIn("invitee_states", formatEvent(error))
        self.assertEqual(self.s.store.invites, {})

    def test_row18_repeat_of_a_record_without_its_encoding(self) -> None:
        """Row 18: a stored invite without its answer's encoding (event_json None) is answered
        again with the stored event, and counted as repeated."""
        room_version, event = self.s.invite()
        code, first = self.send_v2(room_version, event)
        self.assertEqual(code, 200)
        event_id = event_id_of(room_version, event)
        record = self.s.store.invites[event_id]
        self.s.store.invites[event_id] = attrs.evolve(record, event_json=None)
        metrics = self.s.handler._metrics = InviteMetrics(enabled=True)
        self.assertEqual(self.send_v2(room_version, event), (200, first))
        self.assertEqual(first["event"], record.event)
        counted = metrics.registry.get_sample_value(
            "federation_invite_inbound_invites_total", {"outcome": "repeated", "errcode": ""}
        )
        self.assertEqual(counted, 1.0)


class ClientGoneTests(InboundTestCase):
    """The peer disconnects while its invite is being handled."""

    def setUp(self) -> None:
        super().setUp()
        self.requests: list[Request] = []
        on_invite = self.s.handler.on_invite

        def capturing(request: Request, *args: Any) -> Any:
            self.requests.append(request)
            return on_invite(request, *args)

        self.s.handler.on_invite = capturing  # type: ignore[method-assign]
        self.held: list[tuple[Any, Deferred[None]]] = []
        store_invite = self.s.store.store_invite

        def held_store(record: Any) -> Deferred[Any]:
            gate: Deferred[None] = Deferred()
            self.held.append((record, gate))
            return gate.addCallback(lambda _: self.successResultOf(store_invite(record)))

        self.s.store.store_invite = held_store  # type: ignore[method-assign]

    def send_and_disconnect(self) -> tuple[RoomVersion, dict[str, Any]]:
        """Send an invite and disconnect once it is handed to the (held) store."""
        room_version, event = self.s.invite()
        create = build_create_event(room_version, self.s.their_key)
        pending = self.s.send(
            2,
            self.s.v2_body(room_version, event, [create]),
            room_id=event["room_id"],
            event_id=event_id_of(room_version, event),
        )
        self.s.client.flush()
        self.assertEqual(len(self.held), 1)
        pending.cancel()
        self.s.client.flush()
        self.failureResultOf(pending)
        (request,) = self.requests
        self.assertTrue(request._disconnected)
        return room_version, event

    def assertNothingWritten(self) -> None:
        (request,) = self.requests
        self.assertFalse(request.startedWriting)
        self.assertFalse(request.finished)
        self.assertIsNone(request.responseHeaders.getRawHeaders(b"content-type"))

    def test_stored_invite_announced_after_disconnect(self) -> None:
        """An invite whose peer disconnects while it is stored is still logged as accepted and
        handed to the listeners, once; nothing is written, and a retry is a repeat."""
        room_version, event = self.send_and_disconnect()
        event_id = event_id_of(room_version, event)
        self.assertEqual(self.s.handler._origin_concurrency.active(THEM), 1)
        record, gate = self.held[0]
        with capturedLogs() as events:
            gate.callback(None)
        self.assertEqual(self.s.listened, [record])
        self.assertEqual(self.s.store.invites[event_id], record)
        (line,) = [e for e in events if e.get("outcome")]
        self.assertEqual(line["outcome"], "accepted")
        self.assertEqual(
            formatEvent(line),
            f"Invite {event_id} in {event['room_id']} from {THEM} for {BOB} accepted (pending)",
        )
        self.assertNothingWritten()
        self.assertEqual(self.s.handler._origin_concurrency.active(THEM), 0)
        del self.s.store.store_invite  # the retry is stored without waiting
        code, body = self.send_v2(room_version, event)
        self.assertEqual((code, body["event"]), (200, record.event))
        self.assertEqual(self.s.listened, [record])

    def test_store_failure_after_disconnect_logged(self) -> None:
        """A store failing after the peer disconnected is logged as a 500 refusal, unanswered."""
        room_version, event = self.send_and_disconnect()
        _, gate = self.held[0]
        with capturedLogs() as events:
            gate.errback(StoreError("store_invite", "database is locked"))
        (stored_error,) = [e for e in events if e["log_level"].name == "error"]
        self.assertEqual(stored_error["event_id"], event_id_of(room_version, event))
        self.assertIn("Could not store invite", formatEvent(stored_error))
        (line,) = [e for e in events if e.get("outcome")]
        self.assertEqual(
            (line["outcome"], line["status"], line["errcode"]), ("refused", 500, "M_UNKNOWN")
        )
        self.assertEqual(self.s.listened, [])
        self.assertEqual(self.s.store.invites, {})
        self.assertNothingWritten()
        self.assertEqual(self.s.handler._origin_concurrency.active(THEM), 0)

    def test_invitee_token_after_disconnect(self) -> None:
        """Row 17: an invite stored after its peer left keeps the invitee's token (it is
        stored); one whose store then fails gives it back."""
        limiter = self.s.handler._invitee_rate
        burst = InviteLimits().invitee_burst
        self.send_and_disconnect()
        self.held[0][1].callback(None)
        self.assertEqual(limiter._tokens(BOB, self.s.clock.seconds()), burst - 1)
        self.s.store.invites.clear()
        self.held.clear()
        self.requests.clear()
        self.send_and_disconnect()
        self.held[0][1].errback(StoreError("store_invite", "database is locked"))
        self.assertEqual(limiter._tokens(BOB, self.s.clock.seconds()), burst - 1)
        self.assertEqual(self.s.store.invites, {})

    def test_disconnect_before_store_stops_the_work(self) -> None:
        """A peer disconnecting while its server's keys are fetched stops the work: nothing is
        signed, stored, logged as an outcome or handed to the listeners."""
        self.s.federation.hold[THEM] = keys = Deferred()
        room_version, event = self.s.invite()
        with capturedLogs() as events:
            pending = self.s.send(
                2,
                self.s.v2_body(room_version, event),
                room_id=event["room_id"],
                event_id=event_id_of(room_version, event),
            )
            self.s.client.flush()
            self.assertEqual(self.s.federation.count(THEM), 1)
            pending.cancel()
            self.s.client.flush()
            self.failureResultOf(pending)
            keys.callback(None)
            self.s.client.flush()
        self.assertEqual(self.held, [])
        self.assertEqual(self.s.store.invites, {})
        self.assertEqual(self.s.listened, [])
        self.assertEqual([e for e in events if e.get("outcome")], [])
        self.assertNothingWritten()
        self.assertEqual(self.s.handler._origin_concurrency.active(THEM), 0)

    def test_settle_waits_for_the_invites_being_stored(self) -> None:
        """settle() fires at once while no invite is being stored, else once the store is done
        with the last one (stored or failed), even if its peer left."""
        self.successResultOf(self.s.handler.settle())
        self.send_and_disconnect()
        settled = [self.s.handler.settle(), self.s.handler.settle()]
        for waiter in settled:
            self.assertNoResult(waiter)
        self.held[0][1].callback(None)
        for waiter in settled:
            self.successResultOf(waiter)
        self.successResultOf(self.s.handler.settle())
        self.s.store.invites.clear()
        self.held.clear()
        self.requests.clear()
        self.send_and_disconnect()
        waiter = self.s.handler.settle()
        self.assertNoResult(waiter)
        self.held[0][1].errback(StoreError("store_invite", "database is locked"))
        self.successResultOf(waiter)
        self.successResultOf(self.s.handler.settle())

    def test_settle_waits_for_every_invite_being_stored(self) -> None:
        """With two invites in the store at once, settle() fires once both are done: the first
        one finishing is not enough."""
        pending = []
        for depth in (1, 2):
            room_version, event = self.s.invite(extra={"depth": depth})
            pending.append(
                self.s.send(
                    2,
                    self.s.v2_body(room_version, event),
                    room_id=event["room_id"],
                    event_id=event_id_of(room_version, event),
                )
            )
            self.s.client.flush()
        self.assertEqual(len(self.held), 2)
        settled = self.s.handler.settle()
        self.held[0][1].callback(None)
        self.assertNoResult(settled)
        self.held[1][1].callback(None)
        self.successResultOf(settled)
        for deferred in pending:
            self.assertEqual(self.result(deferred)[0], 200)


class HotPathTests(InboundTestCase):
    def test_keys_from_memory_after_first_fetch(self) -> None:
        """The origin's key is fetched once; later invites verify from memory."""
        for depth in (1, 2, 3):
            room_version, event = self.s.invite(extra={"depth": depth})
            self.assertEqual(self.send_v2(room_version, event)[0], 200)
        self.assertEqual(self.s.federation.count(THEM), 1)
        self.assertEqual(self.s.store.reads, 1)

    def test_one_redaction_encoding_per_invite(self) -> None:
        """The redacted form is encoded once (shared by event ID, verification and co-signing)."""
        import federation_invite.core.events as events

        calls = []
        original = events.prepare_event

        def counting(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return original(*args, **kwargs)

        import federation_invite.inbound as inbound

        self.patch(inbound, "prepare_event", counting)
        room_version, event = self.s.invite()
        self.assertEqual(self.send_v2(room_version, event)[0], 200)
        self.assertEqual(len(calls), 1)
        _ = prepare_event, encode_canonical_json
