"""Floods (issue #10, point 2): an origin sending thousands of invites a second is slowed, then
refused with 429, while other origins are served at once; a flooded invitee is protected by its
own limit; the limits come from the configuration."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.config import ConfigError, load_config
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
from federation_invite.inbound import InviteLimits
from federation_invite.service import build_components

from .figures import report
from .invites import (
    BOB,
    THEM,
    US,
    InviteScenario,
    _sign_request_lax,
    build_invite,
    event_id_of,
)
from .support import FakeFederation, MemoryStore, make_clock, make_key

OTHER = "other.example"
CAROL = f"@carol:{US}"


class Flood:
    """Requests fired at a scenario, each remembering when (simulated) it was sent and answered."""

    def __init__(self, scenario: InviteScenario) -> None:
        self.s = scenario
        self.records: list[dict[str, Any]] = []

    def prepare(self, origin: str, key: Any, *, invitee: str = BOB, depth: int = 1) -> Any:
        """A signed request ``(path, data, header)`` for one invite from ``origin``."""
        room_version = KNOWN_ROOM_VERSIONS["10"]
        event = build_invite(
            room_version,
            key,
            sender=f"@mallory:{origin}",
            server=origin,
            invitee=invitee,
            extra={"depth": depth},
        )
        body = self.s.v2_body(room_version, event)
        path = self.s.path(2, event["room_id"], event_id_of(room_version, event))
        return path, json.dumps(body).encode(), _sign_request_lax(key, origin, "PUT", path, body)

    def send(self, request: Any, label: str) -> dict[str, Any]:
        path, data, header = request
        record: dict[str, Any] = {"label": label, "sent": self.s.clock.seconds()}
        self.records.append(record)
        deferred: Deferred[Any] = self.s.put_raw(path, data, headers=[header])

        def answered(response: Any) -> Deferred[None]:
            record["answered"] = self.s.clock.seconds()
            record["code"] = response.code
            record["retry_after"] = response.headers.getRawHeaders(b"retry-after")

            def body(content: bytes) -> None:
                record["body"] = json.loads(content)

            return response.content().addCallback(body)

        deferred.addCallback(answered)
        self.s.client.flush()
        return record


class OriginFloodTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.s = InviteScenario(
            limits=InviteLimits(
                origin_per_second=10,
                origin_burst=50,
                origin_sleep_after=25,
                origin_sleep_ms=500,
                invitee_per_second=10**6,
                invitee_burst=10**6,
            )
        )
        self.other_key = make_key("other1")
        self.s.federation.add_key_server(self.s.clock, OTHER, [self.other_key])
        self.flood = Flood(self.s)

    def run_flood(
        self, total: int, per_ms: int
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``total`` requests from THEM, ``per_ms`` each simulated millisecond; OTHER every 100 ms."""
        theirs = self.flood.prepare(THEM, self.s.their_key)
        a: list[dict[str, Any]] = []
        b: list[dict[str, Any]] = []
        for i in range(total):
            a.append(self.flood.send(theirs, "A"))
            if i % per_ms == per_ms - 1:
                tick = (i + 1) // per_ms
                if tick % 100 == 0:
                    record = self.flood.send(
                        self.flood.prepare(OTHER, self.other_key, depth=tick), "B"
                    )
                    b.append(record)
                    # Served promptly: answered before the clock moves on.
                    self.assertEqual(record.get("code"), 200, record)
                    self.assertEqual(record["answered"], record["sent"])
                self.s.clock.advance(0.001)
        for _ in range(600):
            self.s.clock.advance(0.001)
            self.s.client.flush()
        return a, b

    def test_thousands_per_second_slowed_then_refused_other_origin_served(self) -> None:
        """2000 invites in one simulated second from one origin: 25 at once, 25 slowed by 500 ms,
        then 429 M_LIMIT_EXCEEDED with retry_after_ms (only refilled tokens pass, slowed); another
        origin is answered at once throughout."""
        a, b = self.run_flood(2000, 2)
        self.assertEqual(len(b), 10)
        self.assertTrue(all("code" in r for r in a), "every request answered")
        accepted = [r for r in a if r["code"] == 200]
        refused = [r for r in a if r["code"] != 200]
        for record in accepted[:25]:
            self.assertEqual(record["answered"] - record["sent"], 0.0)
        for record in accepted[25:]:
            # Answered when the clock passes sent + 0.5 (it moves in 1 ms steps).
            self.assertTrue(0.5 <= record["answered"] - record["sent"] < 0.502, record)
        # The burst (50) plus what 10 per second refills during the second.
        self.assertGreaterEqual(len(accepted), 58)
        self.assertLessEqual(len(accepted), 61)
        self.assertEqual(len(accepted) + len(refused), 2000)
        for record in refused:
            self.assertEqual((record["code"], record["body"]["errcode"]), (429, "M_LIMIT_EXCEEDED"))
            self.assertEqual(record["answered"], record["sent"], "refusals are not slowed")
            self.assertGreater(record["body"]["retry_after_ms"], 0)
            self.assertLessEqual(record["body"]["retry_after_ms"], 101)
            self.assertEqual(record["retry_after"], [b"1"])
        self.assertEqual(self.s.handler._origin_concurrency.active(THEM), 0)
        # B's invites were stored besides A's one invite (sent again and again).
        self.assertEqual(len(self.s.store.invites), 11)
        report(
            "flood",
            requests_from_flooding_origin=len(a),
            served_at_once=sum(1 for r in accepted if r["answered"] == r["sent"]),
            slowed=sum(1 for r in accepted if r["answered"] > r["sent"]),
            refused_429=len(refused),
            other_origin_served=sum(1 for r in b if r["code"] == 200),
            other_origin_requests=len(b),
        )

    def test_slowing_can_be_turned_off(self) -> None:
        """With origin_sleep_ms = 0 the whole burst is answered at once, then 429."""
        self.s = InviteScenario(
            limits=InviteLimits(origin_burst=50, origin_sleep_ms=0, invitee_burst=10**6)
        )
        self.flood = Flood(self.s)
        theirs = self.flood.prepare(THEM, self.s.their_key)
        records = [self.flood.send(theirs, "A") for _ in range(60)]
        self.assertEqual([r["code"] for r in records], [200] * 50 + [429] * 10)
        self.assertTrue(all(r["answered"] == r["sent"] for r in records))

    def test_slowed_request_holds_no_processing_slot(self) -> None:
        """While slowed requests wait, the origin's concurrency slots stay free, and a slowed
        request cancelled by its client leaves no timer behind."""
        self.s = InviteScenario(
            limits=InviteLimits(
                origin_burst=10,
                origin_sleep_after=1,
                origin_sleep_ms=500,
                origin_concurrent=1,
                invitee_burst=10**6,
            )
        )
        self.flood = Flood(self.s)
        theirs = self.flood.prepare(THEM, self.s.their_key)
        records = [self.flood.send(theirs, "A") for _ in range(5)]
        self.assertEqual(records[0]["code"], 200)
        self.assertTrue(all("code" not in r for r in records[1:]))
        self.assertEqual(self.s.handler._origin_concurrency.active(THEM), 0)
        self.assertEqual(len(self.s.clock.getDelayedCalls()), 4)
        self.s.clock.advance(0.5)
        self.s.client.flush()
        self.assertEqual([r["code"] for r in records], [200] * 5)


class InviteeFloodTests(SynchronousTestCase):
    def test_flooded_invitee_protected_by_its_own_limit(self) -> None:
        """20 origins inviting one user: past invitee_burst they get 429 M_LIMIT_EXCEEDED (nothing
        stored), while another user is still invited and no origin is limited."""
        s = InviteScenario(limits=InviteLimits(invitee_per_second=0.05, invitee_burst=10))
        s.store.users.add(CAROL)
        flood = Flood(s)
        origins = []
        for n in range(20):
            name = f"flood{n}.example"
            key = make_key(f"f{n}")
            s.federation.add_key_server(s.clock, name, [key])
            origins.append((name, key))
        to_bob = [
            flood.send(flood.prepare(name, key, depth=depth), "bob")
            for depth in (1, 2)
            for name, key in origins
        ]
        codes = [r["code"] for r in to_bob]
        self.assertEqual(codes, [200] * 10 + [429] * 30)
        for record in to_bob[10:]:
            self.assertEqual(record["body"]["errcode"], "M_LIMIT_EXCEEDED")
            self.assertEqual(record["body"]["retry_after_ms"], 20001)
        self.assertEqual(sum(1 for r in s.store.invites.values() if r.invitee == BOB), 10)
        name, key = origins[-1]
        to_carol = flood.send(flood.prepare(name, key, invitee=CAROL, depth=3), "carol")
        self.assertEqual(to_carol["code"], 200)
        s.clock.advance(20)
        self.assertEqual(flood.send(flood.prepare(name, key, depth=4), "bob")["code"], 200)


class ConfiguredLimitsTests(SynchronousTestCase):
    def test_configuration_sets_slowing(self) -> None:
        """ratelimit.origin_sleep_after / origin_sleep_ms reach the daemon's handler."""
        clock = make_clock()
        federation = FakeFederation()
        their_key = make_key("them1")
        federation.add_key_server(clock, THEM, [their_key])
        config = load_config(
            None,
            {
                "server_name": US,
                "inbound.local_users": "any",
                "ratelimit.origin_sleep_after": 2,
                "ratelimit.origin_sleep_ms": 250,
                "ratelimit.invitee_burst": 100,
            },
        )
        components = build_components(
            config, clock, MemoryStore(), make_key("us1"), client=federation
        )  # type: ignore[arg-type]
        s = InviteScenario(clock=clock)
        from treq.testing import StubTreq

        s.client = StubTreq(components.site_root())
        s.their_key = their_key
        flood = Flood(s)
        records = [flood.send(flood.prepare(THEM, their_key, depth=d), "A") for d in (1, 2, 3)]
        self.assertEqual([r.get("code") for r in records], [200, 200, None])
        clock.advance(0.25)
        s.client.flush()
        self.assertEqual(records[2]["code"], 200)
        self.assertEqual(records[2]["answered"] - records[2]["sent"], 0.25)

    def test_bad_values_refused(self) -> None:
        """Negative slowing settings are refused at start, naming the key."""
        for key in ("ratelimit.origin_sleep_after", "ratelimit.origin_sleep_ms"):
            with self.assertRaises(ConfigError) as caught:
                load_config(None, {key: -1})
            self.assertIn(key, str(caught.exception))
