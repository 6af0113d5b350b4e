"""Prometheus metrics: invites by outcome, latency, key fetches, the /metrics resource."""

from __future__ import annotations

import json
import os
from io import BytesIO
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from federation_invite import metrics as metrics_module
from federation_invite import service
from federation_invite.config import Config, ConfigError, load_config
from federation_invite.core.errors import Codes
from federation_invite.metrics import InviteMetrics
from federation_invite.service import FederationInvite, build_components, build_from_config
from federation_invite.testing import FakeHomeserver, fake_peers
from federation_invite.web import invite as invite_module
from federation_invite.web.invite import InviteResource
from federation_invite.web.metrics import build_metrics_root
from federation_invite.web.site import FederationSite

from .invites import THEM, InviteScenario, event_id_of
from .support import MemoryStore, make_clock, make_key
from .test_hostile_slow import Connection


class MetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.scenario = InviteScenario()
        self.metrics = InviteMetrics()
        self.scenario.handler._metrics = self.metrics
        self.metrics.watch_key_fetches(
            lambda: (self.scenario.keyring.fetches, self.scenario.keyring.fetch_failures)
        )

    def send(self, **kwargs: Any) -> int:
        room_version, event = self.scenario.invite(**kwargs)
        deferred = self.scenario.send(
            2,
            self.scenario.v2_body(room_version, event),
            room_id=event["room_id"],
            event_id=event_id_of(room_version, event),
        )
        self.scenario.client.flush()
        return int(self.successResultOf(deferred).code)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        value: float | None = self.metrics.registry.get_sample_value(name, labels or {})
        return value

    def test_inbound_counters_and_latency(self) -> None:
        """Accepted and refused invites are counted by outcome and errcode, with latency."""
        self.assertEqual(self.send(), 200)
        self.assertEqual(self.send(invitee="@nobody:us.example"), 404)
        self.assertEqual(
            self.sample(
                "federation_invite_inbound_invites_total", {"outcome": "accepted", "errcode": ""}
            ),
            1.0,
        )
        self.assertEqual(
            self.sample(
                "federation_invite_inbound_invites_total",
                {"outcome": "refused", "errcode": "M_NOT_FOUND"},
            ),
            1.0,
        )
        self.assertEqual(self.sample("federation_invite_inbound_invite_seconds_count"), 2.0)
        self.assertEqual(self.sample("federation_invite_key_fetches_total"), 1.0)
        self.assertEqual(self.sample("federation_invite_key_fetch_failures_total"), 0.0)

    def inbound_counts(self) -> dict[tuple[str, str], float]:
        """Every ``federation_invite_inbound_invites_total`` sample, by (outcome, errcode)."""
        counts: dict[tuple[str, str], float] = {}
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == "federation_invite_inbound_invites_total":
                    counts[sample.labels["outcome"], sample.labels["errcode"]] = sample.value
        return counts

    def put_raw(self, path: str, data: bytes) -> tuple[int, str]:
        deferred = self.scenario.put_raw(path, data, content={"x": 1})
        self.scenario.client.flush()
        response = self.successResultOf(deferred)
        return response.code, json.loads(self.successResultOf(response.content()))["errcode"]

    def test_inbound_body_refusals_counted(self) -> None:
        """Refusals by the endpoint itself (rows 1 to 3, a path that is not UTF-8) are counted
        once each, like the handler's refusals, with latency; none is counted twice."""
        self.scenario = InviteScenario(max_body_bytes=100)
        self.scenario.handler._metrics = self.metrics
        path = self.scenario.path(2, "!room:remote.example", "$x")
        answers = [
            self.put_raw(path, b"{" + b" " * 200 + b"}"),
            self.put_raw(path, b"nope"),
            self.put_raw(path, b"[1]"),
            self.put_raw(path, b'{"a":1,"a":1}'),
            self.put_raw(path[: -len("%24x")] + "%ff", b"{}"),
            self.put_raw(path, b"{}"),  # signed over other content: the handler refuses it
        ]
        self.assertEqual(
            answers,
            [
                (413, "M_TOO_LARGE"),
                (400, "M_NOT_JSON"),
                (400, "M_NOT_JSON"),
                (400, "M_BAD_JSON"),
                (400, "M_INVALID_PARAM"),
                (401, "M_UNAUTHORIZED"),
            ],
        )
        self.assertEqual(
            self.inbound_counts(),
            {
                ("refused", "M_TOO_LARGE"): 1.0,
                ("refused", "M_NOT_JSON"): 2.0,
                ("refused", "M_BAD_JSON"): 1.0,
                ("refused", "M_INVALID_PARAM"): 1.0,
                ("refused", "M_UNAUTHORIZED"): 1.0,
            },
        )
        self.assertEqual(self.sample("federation_invite_inbound_invite_seconds_count"), 6.0)

    def test_site_refusals_of_invites_counted(self) -> None:
        """Invite requests the daemon's FederationSite refuses before the endpoint runs (a body
        over the cap, declared or chunked: 413; a bad Host: 400) are counted refused with
        their errcode, v1 and v2; other paths, other methods, a path the endpoint would answer
        404, and the metrics listener's own site are not counted."""
        self.scenario = InviteScenario(max_body_bytes=100)
        self.scenario.handler._metrics = self.metrics
        site = FederationSite(self.scenario.root, reactor=self.scenario.clock, max_body_bytes=100)
        metrics_site = FederationSite(
            build_metrics_root(self.metrics), reactor=self.scenario.clock, max_body_bytes=100
        )
        v2 = self.scenario.path(2, "!room:remote.example", "$x").encode()
        v1 = self.scenario.path(1, "!room:remote.example", "$x").encode()
        too_long = b"Host: us.example\r\nContent-Length: 200\r\n\r\n"
        chunk = b"40\r\n" + b" " * 64 + b"\r\n"  # two of them: 128 bytes
        chunked = b"Host: us.example\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2
        requests = [
            (site, b"PUT " + v2 + b" HTTP/1.1\r\n" + too_long, (413, "M_TOO_LARGE")),
            (site, b"PUT " + v1 + b" HTTP/1.1\r\n" + too_long, (413, "M_TOO_LARGE")),
            (site, b"PUT " + v2 + b" HTTP/1.1\r\n" + chunked, (413, "M_TOO_LARGE")),
            (site, b"PUT " + v2 + b" HTTP/1.1\r\nHost: a b\r\n\r\n", (400, "M_UNKNOWN")),
            (site, b"PUT /_matrix/nothing HTTP/1.1\r\n" + too_long, (413, "M_TOO_LARGE")),
            (site, b"POST " + v2 + b" HTTP/1.1\r\n" + too_long, (413, "M_TOO_LARGE")),
            (site, b"PUT " + v2 + b"/more HTTP/1.1\r\n" + too_long, (413, "M_TOO_LARGE")),
            (metrics_site, b"PUT " + v2 + b" HTTP/1.1\r\n" + too_long, (413, "M_TOO_LARGE")),
        ]
        for serving, data, expected in requests:
            connection = Connection(serving)
            self.addCleanup(connection.close)
            connection.send(data)
            ((status, _, body),) = connection.responses()
            self.assertEqual((status, body["errcode"]), expected, data)
        self.assertEqual(
            self.inbound_counts(), {("refused", "M_TOO_LARGE"): 3.0, ("refused", "M_UNKNOWN"): 1.0}
        )
        self.assertEqual(self.sample("federation_invite_inbound_invite_seconds_count"), 4.0)

    def test_site_refusal_latency_from_first_byte(self) -> None:
        """An invite the site refuses 408 after trickling for request_timeout is observed in
        the latency histogram as taking that long (from its first byte), not 0 s."""
        site = FederationSite(self.scenario.root, reactor=self.scenario.clock, request_timeout=30)
        v2 = self.scenario.path(2, "!room:remote.example", "$x").encode()
        connection = Connection(site)
        self.addCleanup(connection.close)
        connection.send(b"PUT " + v2 + b" HTTP/1.1\r\nHost: us.example\r\nContent-Length: 50\r\n")
        for _ in range(29):
            self.scenario.clock.advance(1)
            connection.send(b"X-Slow: 1\r\n")
        self.scenario.clock.advance(1)
        ((status, _, body),) = connection.responses()
        self.assertEqual((status, body["errcode"]), (408, "M_UNKNOWN"))
        self.assertEqual(self.inbound_counts(), {("refused", "M_UNKNOWN"): 1.0})
        self.assertEqual(self.sample("federation_invite_inbound_invite_seconds_sum"), 30.0)

    def test_invite_lost_before_it_arrived_counted_cancelled(self) -> None:
        """An invite PUT whose sender hangs up while its body arrives, or that a drain
        abandons mid-body, is counted cancelled once (timed from its first byte), with no
        log line; a request for another path is not counted."""
        v2 = self.scenario.path(2, "!room:remote.example", "$x").encode()
        head = b" HTTP/1.1\r\nHost: us.example\r\nContent-Length: 50\r\n\r\n{"
        site = FederationSite(self.scenario.root, reactor=self.scenario.clock, request_timeout=30)
        with capturedLogs() as events:
            for target in (v2, b"/_matrix/nothing"):
                connection = Connection(site)
                connection.send(b"PUT " + target + head)
                self.scenario.clock.advance(5)
                connection.close()
            self.scenario.clock.advance(60)
            # The drain aborts the connection at the end of its grace period; the
            # transport then reports it lost, which counts nothing more.
            draining = FederationSite(
                self.scenario.root, reactor=self.scenario.clock, request_timeout=30
            )
            connection = Connection(draining)
            connection.send(b"PUT " + v2 + head)
            drained = draining.drain(10)
            self.scenario.clock.advance(11)
            self.assertTrue(connection.transport.disconnected)
            connection.close()
            self.scenario.clock.advance(60)
        self.assertEqual(self.successResultOf(drained).abandoned, 1)
        self.assertEqual(self.inbound_counts(), {("cancelled", ""): 2.0})
        self.assertEqual(self.sample("federation_invite_inbound_invite_seconds_sum"), 16.0)
        self.assertEqual([event for event in events if "outcome" in event], [])

    def test_inbound_unexpected_failure_counted(self) -> None:
        """An invite failing unexpectedly (500 M_UNKNOWN) is counted refused, M_UNKNOWN."""

        async def broken(*args: Any) -> Any:
            raise RuntimeError("bug")

        self.patch(self.scenario.handler, "on_invite", broken)
        self.assertEqual(self.send(), 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.inbound_counts(), {("refused", "M_UNKNOWN"): 1.0})
        self.assertEqual(self.sample("federation_invite_inbound_invite_seconds_count"), 1.0)

    def test_inbound_unexpected_failure_before_the_handler_counted(self) -> None:
        """An invite failing unexpectedly before its handler runs (in the body's parse): 500
        M_UNKNOWN, counted once, refused M_UNKNOWN, as every invite PUT is."""

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("bug")

        self.patch(invite_module, "parse_json_with_numbers", broken)
        self.assertEqual(self.send(), 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.inbound_counts(), {("refused", "M_UNKNOWN"): 1.0})
        self.assertEqual(self.sample("federation_invite_inbound_invite_seconds_count"), 1.0)

    def test_inbound_cancelled_counted(self) -> None:
        """An invite whose sender goes away before its answer is counted cancelled, once."""
        pending: Deferred[Any] = Deferred()

        async def waiting(*args: Any) -> Any:
            return await pending

        self.patch(self.scenario.handler, "on_invite", waiting)
        resource = InviteResource(self.scenario.handler, 2, 1000)
        request = DummyRequest([b"%21room%3Aremote.example", b"%24x"])
        request.method = b"PUT"
        request.content = BytesIO(b"{}")
        resource.render(request)
        self.assertEqual(self.inbound_counts(), {})
        self.scenario.clock.advance(2)
        request.processingFailed(ConnectionLost())
        self.assertEqual(request.written, [])
        self.assertEqual(self.inbound_counts(), {("cancelled", ""): 1.0})
        self.assertEqual(self.sample("federation_invite_inbound_invite_seconds_sum"), 2.0)

    def test_sender_gone_once_its_invite_is_stored_counted_accepted(self) -> None:
        """A sender gone before its invite reached the store is counted cancelled, and the
        invite not stored; one gone once its invite was being stored: stored, logged and
        counted accepted, answered to nobody (README, Logs and metrics)."""
        requests: list[Any] = []
        on_invite = self.scenario.handler.on_invite

        def capturing(request: Any, *args: Any) -> Any:
            requests.append(request)
            return on_invite(request, *args)

        self.patch(self.scenario.handler, "on_invite", capturing)

        def send_and_leave(depth: int) -> str:
            room_version, event = self.scenario.invite(extra={"depth": depth})
            event_id = event_id_of(room_version, event)
            body = self.scenario.v2_body(room_version, event)
            pending = self.scenario.send(2, body, room_id=event["room_id"], event_id=event_id)
            self.scenario.client.flush()
            pending.cancel()  # the sender goes away
            self.scenario.client.flush()
            self.failureResultOf(pending)
            self.assertTrue(requests[-1]._disconnected)
            return event_id

        self.scenario.federation.hold[THEM] = keys = Deferred()
        before = send_and_leave(20)  # gone while the origin's key is fetched
        del self.scenario.federation.hold[THEM]
        keys.callback(None)
        self.scenario.client.flush()
        self.assertEqual(self.inbound_counts(), {("cancelled", ""): 1.0})
        self.assertNotIn(before, self.scenario.store.invites)

        gate: Deferred[None] = Deferred()
        store_invite = self.scenario.store.store_invite
        self.patch(
            self.scenario.store,
            "store_invite",
            lambda record: gate.addCallback(lambda _: self.successResultOf(store_invite(record))),
        )
        with capturedLogs() as events:
            during = send_and_leave(21)  # gone while its invite is being stored
            self.assertEqual(self.inbound_counts(), {("cancelled", ""): 1.0})
            gate.callback(None)
        self.assertEqual(self.inbound_counts(), {("cancelled", ""): 1.0, ("accepted", ""): 1.0})
        record = self.scenario.store.invites[during]
        self.assertEqual(self.scenario.listened, [record])
        self.assertEqual([e["outcome"] for e in events if e.get("outcome")], ["accepted"])
        self.assertEqual([request.startedWriting for request in requests], [False, False])

    def test_latency_never_negative_when_the_clock_steps_back(self) -> None:
        """An invite in progress while the wall clock steps back is observed as taking 0 s,
        not a negative time (which would make the histogram's sum decrease)."""
        held: Deferred[None] = Deferred()
        store_invite = self.scenario.store.store_invite
        self.patch(
            self.scenario.store,
            "store_invite",
            lambda record: held.addCallback(lambda _: store_invite(record)),
        )
        room_version, event = self.scenario.invite()
        deferred = self.scenario.send(
            2,
            self.scenario.v2_body(room_version, event),
            room_id=event["room_id"],
            event_id=event_id_of(room_version, event),
        )
        self.scenario.clock.rightNow -= 3600
        held.callback(None)
        self.scenario.client.flush()
        self.assertEqual(self.successResultOf(deferred).code, 200)
        self.assertEqual(self.inbound_counts(), {("accepted", ""): 1.0})
        self.assertEqual(self.sample("federation_invite_inbound_invite_seconds_sum"), 0.0)
        self.assertEqual(
            self.sample("federation_invite_inbound_invite_seconds_bucket", {"le": "0.001"}), 1.0
        )

    def test_outbound_counter(self) -> None:
        """Outbound outcomes are counted by outcome and errcode."""
        self.metrics.outbound("refused", "M_FORBIDDEN")
        self.assertEqual(
            self.sample(
                "federation_invite_outbound_invites_total",
                {"outcome": "refused", "errcode": "M_FORBIDDEN"},
            ),
            1.0,
        )

    def test_peer_errcodes_bounded(self) -> None:
        """Errcodes we do not know (peer-chosen) are counted as 'other', strings the Codes
        class holds that are not errcodes (its module's and its own name) included."""
        for n in range(5):
            self.metrics.outbound("refused", f"M_MADE_UP_{n}")
        self.metrics.outbound("refused", Codes.__module__)
        self.metrics.outbound("refused", Codes.__qualname__)
        self.assertEqual(
            self.sample(
                "federation_invite_outbound_invites_total",
                {"outcome": "refused", "errcode": "other"},
            ),
            7.0,
        )

    def test_resource(self) -> None:
        """The metrics resource serves the text exposition format."""
        self.send()
        client = StubTreq(build_metrics_root(self.metrics))
        response = self.successResultOf(client.get("http://localhost/metrics"))
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        text = self.successResultOf(response.content()).decode()
        self.assertIn(
            'federation_invite_inbound_invites_total{errcode="",outcome="accepted"} 1.0', text
        )

    def test_resource_other_paths_and_methods(self) -> None:
        """Other paths (the root, a child of /metrics) get JSON 404 and other methods JSON
        405, ``M_UNRECOGNIZED``, as on the federation listener; HEAD /metrics gets the text
        format's headers and no body."""
        client = StubTreq(build_metrics_root(self.metrics))
        for method, path, status in [
            ("GET", "/", 404),
            ("GET", "/nope", 404),
            ("GET", "/metrics/nope", 404),
            ("POST", "/nope", 404),
            ("POST", "/metrics", 405),
            ("DELETE", "/metrics", 405),
        ]:
            response = self.successResultOf(client.request(method, "http://localhost" + path))
            self.assertEqual(response.code, status, (method, path))
            self.assertEqual(
                response.headers.getRawHeaders("content-type"), ["application/json"], path
            )
            body = json.loads(self.successResultOf(response.content()))
            self.assertEqual(body["errcode"], "M_UNRECOGNIZED", (method, path))
            self.assertIsInstance(body["error"], str)
            if status == 405:
                self.assertEqual(response.headers.getRawHeaders("allow"), ["GET, HEAD"])
        got = self.successResultOf(client.get("http://localhost/metrics"))
        text = self.successResultOf(got.content())
        head = self.successResultOf(client.head("http://localhost/metrics"))
        self.assertEqual(head.code, 200)
        self.assertEqual(
            head.headers.getRawHeaders("content-type"), got.headers.getRawHeaders("content-type")
        )
        self.assertEqual(head.headers.getRawHeaders("content-length"), [str(len(text))])
        self.assertEqual(self.successResultOf(head.content()), b"")

    def test_disabled_is_noop(self) -> None:
        """With metrics off every call is a no-op and there is no resource."""
        metrics = InviteMetrics(enabled=False)
        metrics.inbound("accepted", None, 0.1)
        metrics.outbound("accepted")
        self.assertRaises(RuntimeError, build_metrics_root, metrics)
        self.assertRaises(RuntimeError, metrics.exposition)
        _ = json

    def test_config_key(self) -> None:
        """metrics.listen is accepted when the extra is installed, and validated as a string."""
        self.assertEqual(
            load_config(None, {"metrics.listen": "tcp:9100"}).get("metrics.listen"), "tcp:9100"
        )
        self.assertRaises(ConfigError, load_config, None, {"metrics.listen": 5})


class EmbeddedMetricsTests(TestCase):
    """An embedder's metrics: ``metrics=True`` counts without ``metrics.listen`` (which only
    the daemon listens on), ``metrics_resource()`` serves them where the application mounts
    it, and a disabled ``InviteMetrics`` says why it is off."""

    async def build(self, **kwargs: Any) -> FederationInvite:
        from twisted.internet import reactor

        self.remote = FakeHomeserver("remote.test", reactor)
        values = {"server_name": "b.test", "data_dir": self.mktemp(), "inbound.local_users": "any"}
        federation = await build_from_config(
            Config(values), reactor, agent=fake_peers(self.remote), **kwargs
        )
        self.addCleanup(federation.close)
        return federation

    async def test_metrics_true_counts_and_serves(self) -> None:
        federation = await self.build(metrics=True)
        self.assertTrue(federation.metrics.enabled)
        invite = self.remote.invite("10", invitee="@u:b.test")
        self.assertEqual((await self.remote.put_invite(federation, invite))[0], 200)
        root = Resource()
        root.putChild(b"metrics", federation.metrics_resource())
        response = await StubTreq(root).get("http://app.example/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        text = (await response.content()).decode()
        self.assertIn(
            'federation_invite_inbound_invites_total{errcode="",outcome="accepted"} 1.0', text
        )
        self.assertIn("federation_invite_key_fetches_total 1.0", text)
        # The README: the instance's registry can be added to the application's.
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(federation.metrics.registry)
        self.assertIn(
            b'federation_invite_inbound_invites_total{errcode="",outcome="accepted"} 1.0',
            generate_latest(registry),
        )

    async def test_off_by_default_without_metrics_listen(self) -> None:
        """As before, an embedder's build counts nothing unless asked (the daemon's default:
        counting when metrics.listen is set); the error names the way to turn them on,
        not the extra, which is installed."""
        federation = await self.build()
        self.assertFalse(federation.metrics.enabled)
        reason = (
            "metrics are off: build_from_config and build_components count with metrics=True "
            "(the daemon: with metrics.listen set)"
        )
        self.assertEqual(str(self.assertRaises(RuntimeError, federation.metrics_resource)), reason)
        self.assertEqual(
            str(self.assertRaises(RuntimeError, federation.metrics.exposition)), reason
        )
        self.assertEqual(
            str(self.assertRaises(RuntimeError, build_metrics_root, federation.metrics)), reason
        )

    def test_metrics_false_with_metrics_listen(self) -> None:
        """By default metrics.listen turns counting on, as for the daemon; metrics=False
        turns it off even then."""
        config = Config({"server_name": "b.test", "metrics.listen": "tcp:0"})
        for metrics, enabled in ((None, True), (False, False), (True, True)):
            components = build_components(
                config, make_clock(), MemoryStore(), make_key("us1"), metrics=metrics
            )
            self.assertIs(components.metrics.enabled, enabled, metrics)
        components = build_components(Config(), make_clock(), MemoryStore(), make_key("us1"))
        self.assertFalse(components.metrics.enabled)

    async def test_metrics_true_without_the_extra(self) -> None:
        """Without prometheus-client, metrics=True is a ConfigError before anything is opened,
        and a disabled InviteMetrics names the extra."""
        self.patch(metrics_module, "metrics_available", lambda: False)
        self.patch(service, "metrics_available", lambda: False)
        data_dir = self.mktemp()
        failed = ensureDeferred(
            build_from_config(Config({"data_dir": data_dir}), MemoryReactorClock(), metrics=True)
        )
        error = await self.assertFailure(failed, ConfigError)
        self.assertEqual(
            str(error),
            "metrics=True needs the 'metrics' extra (prometheus-client): "
            "pip install 'federation-invite[metrics]'",
        )
        self.assertFalse(os.path.exists(data_dir))
        metrics = InviteMetrics()
        self.assertFalse(metrics.enabled)
        self.assertEqual(
            str(self.assertRaises(RuntimeError, metrics.exposition)),
            "metrics need the 'metrics' extra (prometheus-client): "
            "pip install 'federation-invite[metrics]'",
        )
