"""federation_invite.testing, used as an embedder's trial tests use it (public names only)."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from federation_invite import (
    Config,
    InvalidInviteAnswer,
    InviteRecord,
    InviteRefused,
    MatrixError,
    build_from_config,
)
from federation_invite.core.events import compute_event_id, room_id_for_create_event
from federation_invite.core.signing import hash_and_sign_event
from federation_invite.core.xmatrix import parse_xmatrix
from federation_invite.testing import (
    FakeHomeserver,
    FakePeersAgent,
    build_create_event,
    fake_peers,
    invite_event_template,
)

from .support import source_tree_file


# The README's "Testing your code with trial" example: keep the two identical.
class BridgeTests(TestCase):
    async def setUp(self) -> None:
        self.remote = FakeHomeserver("remote.test", reactor)
        self.federation = await build_from_config(
            Config(
                {
                    "server_name": "bridge.test",
                    "data_dir": self.mktemp(),  # a new SQLite database per test
                    "inbound.local_users": "any",
                }
            ),
            reactor,
            agent=fake_peers(self.remote),  # the keyring and send_invite reach it in memory
        )
        self.addCleanup(lambda: self.federation.close())
        self.invited: list[InviteRecord] = []
        self.federation.add_listener(self.invited.append)

    async def test_invite_is_received(self) -> None:
        invite = self.remote.invite("10", invitee="@bob:bridge.test")
        status, body = await self.remote.put_invite(self.federation, invite)
        self.assertEqual(status, 200)
        self.assertIn("bridge.test", body["event"]["signatures"])
        self.assertEqual([record.invitee for record in self.invited], ["@bob:bridge.test"])

    async def test_we_invite(self) -> None:
        event = {
            "type": "m.room.member",
            "state_key": "@carol:remote.test",
            "sender": "@bot:bridge.test",
            "room_id": "!room:bridge.test",
            "content": {"membership": "invite"},
            "origin_server_ts": int(reactor.seconds() * 1000),
            "depth": 3,
            "prev_events": ["$" + "p" * 43],
            "auth_events": ["$" + "a" * 43],
        }
        signed = await self.federation.send_invite("10", event)
        self.assertEqual(set(signed["signatures"]), {"bridge.test", "remote.test"})


# End of the README's example.


class ReceivingTests(TestCase):
    setUp = BridgeTests.setUp

    async def receive(self, room_version: str, api_version: int = 2) -> None:
        invite = self.remote.invite(room_version, invitee="@bob:bridge.test")
        status, body = await self.remote.put_invite(
            self.federation, invite, api_version=api_version
        )
        self.assertEqual(status, 200, body)
        answer = body if api_version == 2 else body[1]
        self.assertEqual(compute_event_id(room_version, answer["event"]), invite.event_id)
        [record] = self.invited
        self.assertEqual((record.event_id, record.room_id), (invite.event_id, invite.room_id))
        self.assertEqual(record.room_version, room_version)
        self.assertEqual(record.sender, "@alice:remote.test")
        self.assertEqual(
            [event["type"] for event in record.invite_room_state],
            ["m.room.create", "m.room.join_rules", "m.room.member"],
        )

    async def test_room_version_1(self) -> None:
        """A v1 invite (own event IDs, reference pairs) is received whole: 200, told once,
        its room state the full PDUs it was sent with."""
        await self.receive("1")

    async def test_room_version_1_on_v1_api(self) -> None:
        """put_invite(api_version=1) sends the v1 shape, room state in unsigned: 200."""
        await self.receive("1", api_version=1)

    async def test_room_version_2_on_v1_api(self) -> None:
        """A room version 2 invite also goes over the v1 API: 200; the receiver, told no room
        version, records the invite under room version 1 (which v1 receivers assume, and
        which does not differ from 2 for an invite)."""
        invite = self.remote.invite("2", invitee="@bob:bridge.test")
        status, body = await self.remote.put_invite(self.federation, invite, api_version=1)
        self.assertEqual(status, 200, body)
        self.assertEqual(compute_event_id("2", body[1]["event"]), invite.event_id)
        [record] = self.invited
        self.assertEqual((record.event_id, record.room_version), (invite.event_id, "1"))

    async def test_room_version_10(self) -> None:
        """A v10 invite is received: 200, told once."""
        await self.receive("10")

    async def test_room_version_12(self) -> None:
        """A v12 invite (room ID the create event's hash, create event in the room state as a
        full PDU and not in auth_events) is received: 200, told once."""
        await self.receive("12")
        [record] = self.invited
        create = record.invite_room_state[0]
        self.assertEqual(room_id_for_create_event("12", create), record.room_id)
        self.assertNotIn("room_id", create)

    async def test_unknown_invitee_refused(self) -> None:
        """An invitee not ours (local_users a list without it) is answered 404 M_NOT_FOUND,
        and no listener is told."""
        await self.federation.close()
        self.federation = await build_from_config(
            Config(
                {
                    "server_name": "bridge.test",
                    "data_dir": self.mktemp(),
                    "inbound.local_users": "database",
                }
            ),
            reactor,
            agent=fake_peers(self.remote),
        )
        self.federation.add_listener(self.invited.append)
        invite = self.remote.invite("10", invitee="@nobody:bridge.test")
        status, body = await self.remote.put_invite(self.federation, invite)
        self.assertEqual((status, body["errcode"]), (404, "M_NOT_FOUND"))
        self.assertEqual(self.invited, [])

    async def test_wrong_key_refused(self) -> None:
        """An invite signed with a key the homeserver does not publish is refused 401."""
        impostor = FakeHomeserver("remote.test", reactor)
        invite = impostor.invite("10", invitee="@bob:bridge.test")
        status, body = await impostor.put_invite(self.federation, invite)
        self.assertEqual(status, 401, body)
        self.assertEqual(body["errcode"], "M_UNAUTHORIZED")
        self.assertEqual(self.invited, [])


class WaitingTests(TestCase):
    setUp = BridgeTests.setUp

    async def test_answer_that_takes_time_waited_for(self) -> None:
        """On the real reactor put_invite waits for an answer however many reactor turns it
        takes (a policy hook answering after 0.2 s, as a bridge asking its database would):
        it gave up after 10,000 turns, about 0.07 s."""

        class SlowHook:
            def check_invite(self, invite: Any) -> Any:
                return deferLater(reactor, 0.2, lambda: None)

        self.federation.add_policy_hook(SlowHook())
        invite = self.remote.invite("10", invitee="@bob:bridge.test")
        status, body = await self.remote.put_invite(self.federation, invite)
        self.assertEqual(status, 200, body)

    async def test_clock_without_the_stores_reactor_named(self) -> None:
        """A FakeHomeserver on a Clock, without reactor=, cannot see a store that answers from
        its threads: put_invite fails saying to pass reactor= (the store's reactor)."""
        remote = FakeHomeserver("remote.test", Clock())
        invite = remote.invite("10", invitee="@bob:bridge.test")
        with self.assertRaises(AssertionError) as caught:
            await remote.put_invite(self.federation, invite)
        self.assertIn("reactor=", str(caught.exception))


class SendingTests(TestCase):
    setUp = BridgeTests.setUp

    async def test_refusal(self) -> None:
        """A FakeHomeserver's refusal reaches send_invite as InviteRefused with its status
        and errcode; the request was received."""
        self.remote.refusal = MatrixError(403, "M_FORBIDDEN", "not you")
        event = {
            "type": "m.room.member",
            "state_key": "@carol:remote.test",
            "sender": "@bot:bridge.test",
            "room_id": "!room:bridge.test",
            "content": {"membership": "invite"},
            "origin_server_ts": int(reactor.seconds() * 1000),
            "depth": 3,
            "prev_events": ["$" + "p" * 43],
            "auth_events": ["$" + "a" * 43],
        }
        with self.assertRaises(InviteRefused) as caught:
            await self.federation.send_invite("10", event)
        self.assertEqual((caught.exception.status, caught.exception.errcode), (403, "M_FORBIDDEN"))
        self.assertEqual(len(self.remote.received), 1)


class TwoServersTests(TestCase):
    """Two FederationInvites in one test, each serving the other through its FakePeersAgent
    (``add_peer``): given the reactor, the agent moves the bytes of an answer given later
    (from a store's threads) itself, with no ``flush()`` by the test."""

    async def build(self, name: str, agent: FakePeersAgent) -> Any:
        config = Config(
            {
                "server_name": name,
                "data_dir": self.mktemp(),
                "inbound.local_users": "any",
                "outbound.timeout": 5.0,
            }
        )
        federation = await build_from_config(config, reactor, agent=agent)
        self.addCleanup(federation.close)
        return federation

    async def test_invite_between_two_federation_invites(self) -> None:
        agent_a, agent_b = FakePeersAgent(reactor=reactor), FakePeersAgent(reactor=reactor)
        a = await self.build("a.test", agent_a)
        b = await self.build("b.test", agent_b)
        agent_a.add_peer("b.test", b.site_root())
        agent_b.add_peer("a.test", a.site_root())
        invited: list[InviteRecord] = []
        b.add_listener(invited.append)
        event = {
            "type": "m.room.member",
            "state_key": "@carol:b.test",
            "sender": "@bot:a.test",
            "room_id": "!room:a.test",
            "content": {"membership": "invite"},
            "origin_server_ts": int(reactor.seconds() * 1000),
            "depth": 3,
            "prev_events": ["$" + "p" * 43],
            "auth_events": ["$" + "a" * 43],
        }
        started = reactor.seconds()
        signed = await a.send_invite("10", event)
        self.assertEqual(set(signed["signatures"]), {"a.test", "b.test"})
        self.assertEqual([record.invitee for record in invited], ["@carol:b.test"])
        self.assertLess(reactor.seconds() - started, 4.0)  # not the 5 s timeout

    def test_fake_peers_passes_the_reactor(self) -> None:
        """fake_peers(..., reactor=...) builds an agent that moves bytes on that reactor,
        only while a request is open: an answer given at once leaves no timer behind."""
        clock = Clock()
        agent = fake_peers(FakeHomeserver("a.test", clock), reactor=clock)
        response = self.successResultOf(
            agent.request(b"GET", b"https://a.test/_matrix/key/v2/server")
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(clock.getDelayedCalls(), [])


class SubclassTests(TestCase):
    """FakeHomeserver answering otherwise, as a subclass overriding answer or cosign."""

    async def send_invite(self, remote: FakeHomeserver) -> Any:
        """send_invite of @carol:remote.test from a new bridge whose peer is ``remote``."""
        federation = await build_from_config(
            Config({"server_name": "bridge.test", "data_dir": self.mktemp()}),
            reactor,
            agent=fake_peers(remote),
        )
        self.addCleanup(federation.close)
        event = invite_event_template(
            "10",
            "bridge.test",
            sender="@bot:bridge.test",
            invitee="@carol:remote.test",
            room_id="!room:bridge.test",
            origin_server_ts=int(reactor.seconds() * 1000),
            prev_events=["$" + "p" * 43],
            auth_events=["$" + "a" * 43],
            depth=3,
        )
        return await federation.send_invite("10", event)

    async def test_answer_overridden(self) -> None:
        """An answer override sees the request, and answers what it returns: bytes as
        text/html (a proxy's 502 page: InviteRefused 502, no errcode), else JSON, here
        cosigned's (Synapse's) answer after the 502; received stays as it leaves it."""

        origins: list[str] = []

        class BehindProxy(FakeHomeserver):
            def answer(self, request: Any, api_version: int, body: Any) -> Any:
                origins.append(parse_xmatrix(request.getHeader(b"Authorization")).origin)
                if len(origins) == 1:
                    return 502, b"<html>Bad Gateway</html>"
                return 200, self.cosigned(api_version, body)

        remote = BehindProxy("remote.test", reactor)
        with self.assertRaises(InviteRefused) as caught:
            await self.send_invite(remote)
        self.assertEqual((caught.exception.status, caught.exception.errcode), (502, None))
        self.assertEqual(caught.exception.body, b"<html>Bad Gateway</html>")
        signed = await self.send_invite(remote)
        self.assertEqual(set(signed["signatures"]), {"bridge.test", "remote.test"})
        self.assertEqual(origins, ["bridge.test", "bridge.test"])
        self.assertEqual(remote.received, [])

    async def test_cosign_overridden(self) -> None:
        """A cosign override changes the event answered: send_invite refuses the answer."""

        class Meddling(FakeHomeserver):
            def cosign(self, room_version: Any, event: dict[str, Any]) -> dict[str, Any]:
                return super().cosign(room_version, {**event, "depth": 4})

        with self.assertRaises(InvalidInviteAnswer) as caught:
            await self.send_invite(Meddling("remote.test", reactor))
        self.assertEqual(
            caught.exception.reason, "the event in the answer is not the one sent: changed 'depth'"
        )


class BuildingTests(SynchronousTestCase):
    def test_clock_time_and_given_key(self) -> None:
        """Events carry the clock's time; a given signing key is the one published."""
        clock = Clock()
        clock.advance(1_700_000_000)
        remote = FakeHomeserver("remote.test", clock, signing_key=None)
        invite = remote.invite(
            "10", invitee="@bob:us.test", content={"membership": "invite", "x": 1}
        )
        self.assertEqual(invite.event["origin_server_ts"], 1_700_000_000_000)
        self.assertEqual(invite.event["content"], {"membership": "invite", "x": 1})
        self.assertEqual(invite.body(2)["room_version"], "10")
        self.assertEqual(invite.body(1)["unsigned"]["invite_room_state"], invite.invite_room_state)

    def test_v12_room_id_cannot_be_chosen(self) -> None:
        """In v12 the room ID is the create event's hash: giving one is a ValueError."""
        remote = FakeHomeserver("remote.test", Clock())
        self.assertRaises(ValueError, remote.invite, "12", invitee="@b:us.test", room_id="!r:x")

    def test_create_event_per_version(self) -> None:
        """build_create_event names the creator before v11 only, and has no room_id in v12."""
        remote = FakeHomeserver("remote.test", Clock())
        v10 = build_create_event("10", "remote.test", remote.signing_key, origin_server_ts=1)
        v11 = build_create_event("11", "remote.test", remote.signing_key, origin_server_ts=1)
        v12 = build_create_event("12", "remote.test", remote.signing_key, origin_server_ts=1)
        self.assertEqual(v10["content"]["creator"], "@creator:remote.test")
        self.assertNotIn("creator", v11["content"])
        self.assertNotIn("room_id", v12)
        self.assertEqual(v10, hash_and_sign_event("10", v10, "remote.test", remote.signing_key))

    def test_fake_peers_is_the_client_agent(self) -> None:
        """fake_peers builds the FakePeersAgent re-exported here."""
        agent: Any = fake_peers(FakeHomeserver("a.test", Clock()))
        self.assertIsInstance(agent, FakePeersAgent)

    def test_agent_or_client(self) -> None:
        """build_components takes a client or an agent, not both: TypeError."""
        from signedjson.key import generate_signing_key

        from federation_invite import build_components

        with self.assertRaises(TypeError):
            build_components(
                Config({"server_name": "us.test"}),
                Clock(),
                None,  # type: ignore[arg-type]
                generate_signing_key("k"),
                client=object(),
                agent=FakePeersAgent(),
            )


class FidelityTests(SynchronousTestCase):
    """The invites FakeHomeserver builds and how it answers, as Synapse would."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.remote = FakeHomeserver("remote.test", self.clock)

    def test_v12_create_event_never_in_auth_events(self) -> None:
        """rooms/v12.md: the create event is never listed in auth_events (the invite's nor
        the stripped state events'); before v12 it is in each."""
        for version, listed in (("12", False), ("11", True), ("10", True)):
            invite = self.remote.invite(version, invitee="@bob:us.test")
            create = invite.invite_room_state[0]
            create_id = compute_event_id(version, create)
            for event in (invite.event, *invite.invite_room_state[1:]):
                self.assertEqual(
                    create_id in event["auth_events"], listed, (version, event["type"])
                )

    def test_events_in_the_order_synapse_creates_them(self) -> None:
        """The create event, the sender's join, the join rules and the invite follow each
        other: timestamps now-3 .. now, depths 1 .. 4."""
        invite = self.remote.invite("10", invitee="@bob:us.test")
        create, join_rules, member = invite.invite_room_state
        now = int(self.clock.seconds() * 1000)
        ordered = [create, member, join_rules, invite.event]
        self.assertEqual(
            [event["origin_server_ts"] for event in ordered], [now - 3, now - 2, now - 1, now]
        )
        self.assertEqual([event["depth"] for event in ordered], [1, 2, 3, 4])

    def test_invite_template_unsigned_age(self) -> None:
        """The template's unsigned is {"age": 0}, as Synapse sends a new event."""
        event = invite_event_template(
            "10",
            "remote.test",
            sender="@alice:remote.test",
            invitee="@bob:us.test",
            room_id="!r:remote.test",
            origin_server_ts=1,
            prev_events=[],
            auth_events=[],
            depth=2,
        )
        self.assertEqual(event["unsigned"], {"age": 0})

    def test_create_event_origin(self) -> None:
        """Where the room version keeps the top-level origin (before v11) the create event
        names its server in "origin"; from v11 it has none."""
        key = self.remote.signing_key
        for version, origin in (("10", "remote.test"), ("11", None)):
            create = build_create_event(version, "remote.test", key, origin_server_ts=1)
            self.assertEqual(create.get("origin"), origin, version)

    def test_invitee_and_default_path(self) -> None:
        """FakeInvite.invitee is the invite's state_key; path() defaults to the v2 API."""
        invite = self.remote.invite("10", invitee="@bob:us.test")
        self.assertEqual(invite.invitee, "@bob:us.test")
        self.assertTrue(invite.path().startswith("/_matrix/federation/v2/invite/"), invite.path())
        self.assertEqual(invite.path(), invite.path(2))

    def test_put_invite_v1_only_for_room_versions_1_and_2(self) -> None:
        """The v1 invite API carries no room version, and receivers (ours, Synapse) read its
        body as room version 1 or 2, as invites-v2.yaml's fallback rule says (only "if the
        room version is "1" or "2""): put_invite(api_version=1) of a v3+ invite, whose event
        v1 receivers refuse as malformed, raises ValueError at once, nothing sent."""
        from twisted.web.resource import Resource

        seen: list[Any] = []

        class Recorder(Resource):
            isLeaf = True

            def render_PUT(self, request: Any) -> bytes:
                seen.append(request.path)
                return b"{}"

        for version in [str(n) for n in range(3, 13)]:
            invite = self.remote.invite(version, invitee="@bob:us.test")
            error = self.assertRaises(
                ValueError, self.remote.put_invite, Recorder(), invite, api_version=1
            )
            self.assertEqual(
                str(error),
                f"the v1 invite API carries room versions 1 and 2 only, not {version}: "
                "use api_version=2",
            )
            self.assertEqual(
                self.successResultOf(self.remote.put_invite(Recorder(), invite))[0], 200
            )
        self.assertEqual(len(seen), 10)  # the v2 requests only
        for version in ("1", "2"):
            invite = self.remote.invite(version, invitee="@bob:us.test")
            answer = self.remote.put_invite(Recorder(), invite, api_version=1)
            self.assertEqual(self.successResultOf(answer)[0], 200)
        self.assertEqual(len(seen), 12)

    def test_put_invite_to_a_resource_signs_for_the_invitees_server(self) -> None:
        """put_invite to a resource, without a destination, signs its X-Matrix header for
        the invitee's server."""
        from twisted.web.resource import Resource

        seen: list[Any] = []

        class Echo(Resource):
            isLeaf = True

            def render_PUT(self, request: Any) -> bytes:
                seen.append(parse_xmatrix(request.getHeader(b"authorization")))
                return b"{}"

        invite = self.remote.invite("10", invitee="@bob:us.test")
        status, _ = self.successResultOf(self.remote.put_invite(Echo(), invite))
        self.assertEqual(status, 200)
        [header] = seen
        self.assertEqual((header.origin, header.destination), ("remote.test", "us.test"))

    def test_bytes_answer_sent_as_html(self) -> None:
        """An answer given as bytes (a proxy's error page) is sent as it is, with
        Content-Type text/html."""
        from treq.testing import StubTreq

        class Proxy(FakeHomeserver):
            def answer(self, request: Any, api_version: int, body: Any) -> Any:
                return 502, b"<html>Bad Gateway</html>"

        proxy = Proxy("proxy.test", self.clock)
        invite = self.remote.invite("10", invitee="@bob:proxy.test")
        response = self.successResultOf(
            StubTreq(proxy.site_root()).put(
                "https://proxy.test" + invite.path(), json=invite.body()
            )
        )
        self.assertEqual(response.code, 502)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/html"])
        self.assertEqual(self.successResultOf(response.content()), b"<html>Bad Gateway</html>")

    def test_put_invite_gives_up_after_60_seconds_on_a_reactor(self) -> None:
        """On a reactor (not a Clock), put_invite to a server that never answers fails
        after 60 s (under trial's 120 s test timeout), saying why."""

        class NotAClock:
            """A reactor that is not a Clock, on the test's Clock's time."""

            def seconds(self) -> float:
                return clock.seconds()

            def callLater(self, *args: Any, **kwargs: Any) -> Any:
                return clock.callLater(*args, **kwargs)

        class Hanging(FakeHomeserver):
            def answer(self, request: Any, api_version: int, body: Any) -> Any:
                return None

        clock = Clock()
        remote = FakeHomeserver("remote.test", clock, reactor=NotAClock())  # type: ignore[arg-type]
        hanging = Hanging("hang.test", clock)
        invite = remote.invite("10", invitee="@bob:hang.test")
        answer = remote.put_invite(hanging.site_root(), invite)
        for _ in range(60):
            clock.advance(1)
        self.assertNoResult(answer)
        for _ in range(10):
            clock.advance(0.001)
        failure = self.failureResultOf(answer, AssertionError)
        self.assertIn("after 60 s of waiting", str(failure.value))


class ReadmeExampleTests(SynchronousTestCase):
    def test_readme_example_is_bridge_tests(self) -> None:
        """The README's "Testing your code with trial" example is BridgeTests above, verbatim
        (so this module runs it)."""
        with open(source_tree_file("README.md"), encoding="utf-8") as handle:
            readme = handle.read()
        section = readme.split("\n### Testing your code with trial\n", 1)[1]
        example = section.split("```python\n", 1)[1].split("```", 1)[0]
        with open(__file__.replace(".pyc", ".py"), encoding="utf-8") as handle:
            source = handle.read()
        start = source.index("class BridgeTests(TestCase):")
        ours = source[start : source.index("# End of the README's example.")].rstrip()
        self.assertIn(ours + "\n", example)
