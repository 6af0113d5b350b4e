"""Tests for the composition root: assembled components and the site they serve."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from signedjson.key import encode_verify_key_base64
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from federation_invite import service as service_module
from federation_invite.config import ConfigError, load_config
from federation_invite.core.keys import key_id_of
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
from federation_invite.service import FederationInviteService, build_components, build_from_config
from federation_invite.signer import LocalSigner
from federation_invite.signingkey import load_or_create_signing_keys
from federation_invite.store import ServerKeyRecord, StoreError

from .daemon_harness import free_port
from .invites import BOB, THEM, US, _sign_request_lax, build_invite, event_id_of
from .support import MemoryStore, make_clock, make_key
from .test_hostile_slow import Connection, parse_responses, put_request


def service_lines(events: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The service's log events among ``events`` whose format contains ``text``."""
    return [
        event
        for event in events
        if event.get("log_namespace") == "federation_invite.service"
        and text in event.get("log_format", "")
    ]


class SiteRootTests(SynchronousTestCase):
    def site(self, **settings: Any) -> StubTreq:
        config = load_config(None, {"server_name": "example.org", **settings})
        components = build_components(config, make_clock(), MemoryStore(), make_key("k"))  # type: ignore[arg-type]
        return StubTreq(components.site_root())

    def get(self, client: StubTreq, path: str) -> tuple[int, Any, Any]:
        response = self.successResultOf(client.get("https://example.org" + path))
        return response.code, json.loads(self.successResultOf(response.content())), response.headers

    def test_well_known_delegation(self) -> None:
        """With well_known_server set, /.well-known/matrix/server delegates, cacheable for an hour."""
        client = self.site(well_known_server="matrix.example.org:443")
        code, body, headers = self.get(client, "/.well-known/matrix/server")
        self.assertEqual((code, body), (200, {"m.server": "matrix.example.org:443"}))
        self.assertEqual(headers.getRawHeaders("cache-control"), ["max-age=3600"])
        code, body, _ = self.get(client, "/.well-known/matrix/client")
        self.assertEqual((code, body["errcode"]), (404, "M_UNRECOGNIZED"))

    def test_below_leaf_endpoints_not_found(self) -> None:
        """A path below the version or the ``.well-known`` endpoint (a trailing slash
        included) is a path we do not serve: JSON 404 ``M_UNRECOGNIZED``, not their 200."""
        client = self.site(well_known_server="matrix.example.org:443")
        for path in (
            "/_matrix/federation/v1/version/",
            "/_matrix/federation/v1/version/anything",
            "/_matrix/federation/v1/version/anything/at/all",
            "/.well-known/matrix/server/",
            "/.well-known/matrix/server/anything",
        ):
            code, body, _ = self.get(client, path)
            self.assertEqual((code, body["errcode"]), (404, "M_UNRECOGNIZED"), path)
        for path in ("/_matrix/federation/v1/version", "/.well-known/matrix/server"):
            code, _, _ = self.get(client, path)
            self.assertEqual(code, 200, path)

    def test_no_well_known_by_default(self) -> None:
        """Without delegation configured, /.well-known is a JSON 404 and /_matrix is served."""
        client = self.site()
        code, body, _ = self.get(client, "/.well-known/matrix/server")
        self.assertEqual((code, body["errcode"]), (404, "M_UNRECOGNIZED"))
        code, body, _ = self.get(client, "/_matrix/key/v2/server")
        self.assertEqual((code, body["server_name"]), (200, "example.org"))


class ConfiguredSiteTests(SynchronousTestCase):
    """``FederationInvite.site(root)``: a ``FederationSite`` with the configuration's
    ``inbound.*`` connection limits, as the daemon listens with."""

    def setUp(self) -> None:
        config = load_config(
            None,
            {
                "server_name": "example.org",
                "inbound.max_body_bytes": 2048,
                "inbound.request_timeout": 5.0,
                "inbound.idle_timeout": 10.0,
            },
        )
        self.clock = make_clock()
        components = build_components(config, self.clock, MemoryStore(), make_key("k"))  # type: ignore[arg-type]
        self.site = components.site(components.site_root())

    def connect(self) -> Connection:
        connection = Connection(self.site)
        self.addCleanup(connection.close)
        return connection

    def test_configured_body_cap(self) -> None:
        """A body over ``inbound.max_body_bytes`` (2048, not the default 1 MiB): 413
        ``M_TOO_LARGE``, declared or chunked, and the connection closed."""
        head = b"PUT /_matrix/federation/v2/invite/!r:x/$e HTTP/1.1\r\nHost: example.org\r\n"
        body = b"x" * 2049
        for request in (
            head + b"Content-Length: %d\r\n\r\n" % len(body),
            head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body + b"\r\n",
        ):
            connection = self.connect()
            connection.send(request)
            ((status, _, answer),) = connection.responses()
            self.assertEqual((status, answer["errcode"]), (413, "M_TOO_LARGE"))
            self.assertTrue(connection.closing)

    def test_configured_request_timeout(self) -> None:
        """A request still incomplete ``inbound.request_timeout`` (5 s, not the default 30 s)
        after its first byte: 408 ``M_UNKNOWN`` then, not before, and the connection closed."""
        connection = self.connect()
        connection.send(b"GET /_matrix/key/v2/server HTTP/1.1\r\nHost: example.org\r\n")
        self.clock.advance(4.9)
        self.assertEqual(connection.transport.value(), b"")
        self.clock.advance(0.1)
        ((status, _, answer),) = connection.responses()
        self.assertEqual((status, answer["errcode"]), (408, "M_UNKNOWN"))
        self.assertTrue(connection.closing)

    def test_configured_idle_timeout(self) -> None:
        """A connection silent for ``inbound.idle_timeout`` (10 s, not the default 60 s) is
        closed."""
        connection = self.connect()
        self.clock.advance(9.9)
        self.assertFalse(connection.closing)
        self.clock.advance(0.1)
        self.assertTrue(connection.closing)


class ConfiguredClientTests(SynchronousTestCase):
    def test_destination_concurrent_reaches_the_client(self) -> None:
        """The default client is built with outbound.destination_concurrent: 2 requests in
        flight to one server, the third waiting for its turn."""
        from federation_invite.client.testing import FakePeersAgent
        from federation_invite.config import Config

        from .client._fakes import CannedResource

        agent = FakePeersAgent({"remote.example": CannedResource(hang=True)})
        config = Config({"server_name": US, "outbound.destination_concurrent": 2})
        components = build_components(
            config, make_clock(), MemoryStore(), make_key("k1"), agent=agent
        )
        for n in range(3):
            components.client.get_json("remote.example", f"/x{n}")
        self.assertEqual(len(agent.requests), 2)


class BuildFromConfigPathTests(TestCase):
    """The key, the data directory and the real SQLite database end up together."""

    async def build_and_close(self, config: Any) -> None:
        from twisted.internet import reactor

        components = await build_from_config(config, reactor)
        await components.close()

    def test_after_a_chdir(self) -> Deferred[None]:
        """A config with a relative data_dir, loaded in one directory, builds there after a chdir."""
        start, elsewhere = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        os.makedirs(start)
        os.makedirs(elsewhere)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(start)
        config = load_config(None, {"data_dir": "data"})
        os.chdir(elsewhere)

        async def go() -> None:
            await self.build_and_close(config)
            files = os.listdir(os.path.join(start, "data"))
            self.assertIn("signing.key", files)
            self.assertIn("federation-invite.db", files)
            self.assertEqual(os.listdir(elsewhere), [])

        return ensureDeferred(go())

    def test_close_closes_the_keyring(self) -> Deferred[None]:
        """Closing the components closes the keyring (its pause timers, which would
        otherwise outlive the service on the reactor)."""

        async def go() -> None:
            from twisted.internet import reactor

            config = load_config(None, {"data_dir": os.path.abspath(self.mktemp())})
            components = await build_from_config(config, reactor)
            closed: list[bool] = []
            self.patch(components.keyring, "close", lambda: closed.append(True))
            await components.close()
            self.assertEqual(closed, [True])

        return ensureDeferred(go())

    def test_close_with_a_key_fetch_in_flight_leaves_the_reactor_clean(self) -> Deferred[None]:
        """On the real reactor, as in an embedder's trial test: closing with a key fetch in
        flight to a peer that never answers fails its lookup with KeyringClosed and leaves
        no delayed call (its 60 s timeout), which trial would report as a dirty reactor."""

        async def go() -> None:
            from twisted.internet import reactor

            from federation_invite.client.testing import FakePeersAgent
            from federation_invite.keyring import KeyringClosed

            from .support import Tarpit

            tarpit = Tarpit()
            config = load_config(None, {"data_dir": os.path.abspath(self.mktemp())})
            components = await build_from_config(
                config, reactor, agent=FakePeersAgent({"hang.example": tarpit})
            )
            lookup = components.keyring.get_server_keys(
                "hang.example", ["ed25519:a"], int(reactor.seconds() * 1000)
            )
            for _ in range(500):  # the stored keys are read first, in a thread
                if tarpit.requests:
                    break
                await deferLater(reactor, 0.01, lambda: None)
            self.assertEqual(len(tarpit.requests), 1)
            await components.close()
            error = self.failureResultOf(lookup, KeyringClosed).value
            self.assertEqual((error.http_status, error.errcode), (500, "M_UNKNOWN"))

        return ensureDeferred(go())

    def test_close_with_a_well_known_fetch_in_flight_leaves_the_reactor_clean(
        self,
    ) -> Deferred[None]:
        """On the real reactor, through the real client's discovery: closing while a key
        fetch waits for ``https://<name>/.well-known/matrix/server`` (a name without a port)
        from a server that accepts and never answers abandons that fetch too: the lookup
        fails with KeyringClosed, and neither its 30 s timer nor its connection is left
        (trial would report a dirty reactor)."""

        async def go() -> None:
            from twisted.internet import reactor
            from twisted.internet.endpoints import TCP4ServerEndpoint, wrapClientTLS
            from twisted.internet.protocol import Factory
            from twisted.internet.ssl import optionsForClientTLS
            from twisted.web.client import Agent
            from twisted.web.iweb import IAgentEndpointFactory

            from federation_invite.keyring import KeyringClosed

            accepted: list[Protocol] = []

            class Hang(Protocol):
                def connectionMade(self) -> None:
                    accepted.append(self)

            port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
                Factory.forProtocol(Hang)
            )
            self.addCleanup(port.stopListening)

            @implementer(IAgentEndpointFactory)
            class ToTarpit:
                def endpointForURI(self, uri: Any) -> Any:
                    return wrapClientTLS(
                        optionsForClientTLS(uri.host.decode()),
                        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
                    )

            config = load_config(None, {"data_dir": os.path.abspath(self.mktemp())})
            components = await build_from_config(config, reactor)
            client: Any = components.client
            # Only the .well-known fetch's address is redirected (it would go to port 443).
            client._resolver._well_known_agent = Agent.usingEndpointFactory(
                reactor, ToTarpit(), pool=client._pool
            )
            before = set(reactor.getDelayedCalls())
            lookup = components.keyring.get_server_keys(
                "hang.test", ["ed25519:a"], int(reactor.seconds() * 1000)
            )
            for _ in range(500):  # the stored keys are read first, in a thread
                if accepted:
                    break
                await deferLater(reactor, 0.01, lambda: None)
            self.assertEqual(len(accepted), 1)
            await components.close()
            error = self.failureResultOf(lookup, KeyringClosed).value
            self.assertEqual((error.http_status, error.errcode), (500, "M_UNKNOWN"))
            left = [c for c in reactor.getDelayedCalls() if c not in before and c.active()]
            self.assertEqual(left, [])
            await deferLater(reactor, 0.05, lambda: None)  # the connection's close
            self.assertEqual([c for c in accepted if c.transport.connected], [])  # type: ignore[union-attr]

        return ensureDeferred(go())

    def test_uri_syntax_in_data_dir(self) -> Deferred[None]:
        """Data dirs named with %20, ?, # or a space hold their own key and database."""

        async def go() -> None:
            for name in ("fi%20data", "fi?test", "fi#1", "fi data"):
                base = os.path.abspath(self.mktemp())
                data_dir = os.path.join(base, name)
                await self.build_and_close(load_config(None, {"data_dir": data_dir}))
                self.assertEqual(os.listdir(base), [name])
                files = os.listdir(data_dir)
                self.assertIn("signing.key", files, name)
                self.assertIn("federation-invite.db", files, name)

        return ensureDeferred(go())


class _HeldStore(MemoryStore):
    """A MemoryStore whose ``store_invite`` waits for the test, and that refuses use once closed."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Deferred[None]] = []
        self.closed = False

    def store_invite(self, record: Any) -> Deferred[Any]:
        held: Deferred[None] = Deferred()
        self.held.append(held)

        def store(_: None) -> Deferred[Any]:
            if self.closed:
                raise StoreError("store_invite", "the store is closed")
            return MemoryStore.store_invite(self, record)

        return held.addCallback(store)

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


class _RawClient(Protocol):
    """A client connection that records every byte received and when it is closed."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class DrainOnStopTests(TestCase):
    """``stopService`` (SIGTERM under twistd) on real loopback listeners: stop listening,
    answer the requests in progress within the grace period, then close the store."""

    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.store = _HeldStore()
        self.store.users.add(BOB)
        self.their_key = make_key("them1")
        self.store.keys[(THEM, key_id_of(self.their_key))] = ServerKeyRecord(
            server_name=THEM,
            key_id=key_id_of(self.their_key),
            verify_key=encode_verify_key_base64(self.their_key.verify_key),
            valid_until_ts=2**53 - 1,
            expired_ts=None,
            fetched_ts=int(reactor.seconds() * 1000),
            source=THEM,
        )

        async def open_store(uri: str, reactor: Any = None, **kwargs: Any) -> Any:
            return self.store

        self.patch(service_module, "open_store", open_store)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def new_service(self, grace_period: float = 10.0, **kwargs: Any) -> FederationInviteService:
        """A service listening on a free loopback port (``self.port``), not yet started;
        ``kwargs`` for ``FederationInviteService``."""
        self.port = free_port()
        config = load_config(
            None,
            {
                "server_name": US,
                "data_dir": self.mktemp(),
                "listen": [f"tcp:{self.port}:interface=127.0.0.1"],
                "inbound.shutdown_grace_period": grace_period,
            },
        )
        return FederationInviteService(config, self.reactor, make_key("us1"), **kwargs)

    async def start(self, grace_period: float = 10.0, **kwargs: Any) -> FederationInviteService:
        service = self.new_service(grace_period, **kwargs)
        service.startService()
        await service.ready
        self.addCleanup(lambda: None if not service.running else service.stopService())
        return service

    async def connect(self) -> _RawClient:
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port)
        client = _RawClient()
        await connectProtocol(endpoint, client)
        self.addCleanup(lambda: client.transport and client.transport.abortConnection())
        return client

    def invite_request(self, depth: int = 1) -> bytes:
        room_version = KNOWN_ROOM_VERSIONS["10"]
        event = build_invite(room_version, self.their_key, extra={"depth": depth})
        body = {"room_version": "10", "event": event, "invite_room_state": []}
        path = (
            f"/_matrix/federation/v2/invite/{quote(event['room_id'], safe='')}/"
            f"{quote(event_id_of(room_version, event), safe='')}"
        )
        header = _sign_request_lax(self.their_key, THEM, "PUT", path, body)
        return put_request(path, json.dumps(body).encode(), header)

    async def until(self, condition: Callable[[], bool]) -> None:
        for _ in range(200):
            if condition():
                return
            await deferLater(self.reactor, 0.01)
        self.fail("condition not reached within 2 s")

    async def held_invite(self) -> _RawClient:
        """A connection whose invite is held in the store."""
        client = await self.connect()
        assert client.transport is not None
        client.transport.write(self.invite_request())
        await self.until(lambda: len(self.store.held) == 1)
        return client

    def logged(self, text: str) -> list[dict[str, Any]]:
        return service_lines(self.events, text)

    def test_second_stop_signal_while_draining_logged(self) -> None:
        """Under twistd (on_hangup given), a SIGTERM or SIGINT during the stop that the
        first began logs one info line (already shutting down, what it waits for) instead
        of reaching twistd's handler, whose second reactor.stop() logged a critical
        ReactorNotRunning traceback; the handlers before are untouched until the stop and
        restored once it is over."""
        import signal

        from twisted.logger import formatEvent

        called: list[int] = []

        def previous(signum: int, frame: object) -> None:
            called.append(signum)

        stop_signals = (signal.SIGTERM, signal.SIGINT)

        async def go() -> None:
            service = await self.start(on_hangup=lambda: None)
            client = await self.held_invite()
            # The reactor running (it installs its own handlers then), twistd's replaced:
            # trial must go on.
            for signum in stop_signals:
                self.addCleanup(signal.signal, signum, signal.getsignal(signum))
                signal.signal(signum, previous)
            self.assertEqual([signal.getsignal(signum) for signum in stop_signals], [previous] * 2)
            stopping = service.stopService()
            for signum in stop_signals:
                os.kill(os.getpid(), signum)
            await self.until(lambda: len(self.logged("already shutting down")) == 2)
            self.assertEqual(called, [])
            self.store.held[0].callback(None)
            await stopping
            await client.lost
            self.assertEqual(client.received.count(b"HTTP/1.1 200 "), 1)
            lines = self.logged("already shutting down")
            self.assertEqual([event["log_level"] for event in lines], [LogLevel.info] * 2)
            for name, event in zip(("SIGTERM", "SIGINT"), lines, strict=True):
                self.assertRegex(
                    formatEvent(event),
                    rf"^Received {name}: already shutting down, waiting up to \d+ s more for 1 "
                    rf"request\(s\) in progress$",
                )
            self.assertEqual([signal.getsignal(signum) for signum in stop_signals], [previous] * 2)
            os.kill(os.getpid(), signal.SIGTERM)
            self.assertEqual(called, [signal.SIGTERM])

        return ensureDeferred(go())

    def test_stop_twice(self) -> None:
        """A second stop while the first drains, and a third after it, wait for that one
        stop: the held invite is answered once, the store closed once."""

        async def go() -> None:
            service = await self.start()
            client = await self.held_invite()
            first, second = service.stopService(), service.stopService()
            self.assertFalse(second.called)
            self.store.held[0].callback(None)
            await first
            await second
            await service.stopService()
            self.assertTrue(self.store.closed)
            await client.lost
            self.assertEqual(client.received.count(b"HTTP/1.1 200 "), 1)
            self.assertEqual(len(self.logged("Stopped serving")), 1)

        return ensureDeferred(go())

    def test_stopped_while_opening_the_store(self) -> None:
        """A stop that comes while the database is still opening waits for it to open,
        then closes it; nothing listens."""
        opening: Deferred[Any] = Deferred()

        async def open_store(uri: str, reactor: Any = None, **kwargs: Any) -> Any:
            return await opening

        self.patch(service_module, "open_store", open_store)

        async def go() -> None:
            service = self.new_service()
            service.startService()
            stopping = service.stopService()
            self.assertFalse(stopping.called)
            opening.callback(self.store)
            await stopping
            components = await service.ready
            self.assertIs(components.store, self.store)
            self.assertTrue(self.store.closed)
            self.assertEqual(len(self.logged("stopped while starting")), 1)
            with self.assertRaises(ConnectionRefusedError):
                await self.connect()

        return ensureDeferred(go())

    def test_request_in_progress_answered_before_store_closed(self) -> None:
        """An invite held in the store when the service stops: the store stays open, the
        idle keep-alive connection is closed, the invite is answered 200 (stored in an open
        store), and then the store is closed; one log line at each end of the drain."""

        async def go() -> None:
            service = await self.start()
            idle = await self.connect()
            assert idle.transport is not None
            idle.transport.write(b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: x\r\n\r\n")
            await self.until(lambda: b"\r\n\r\n" in idle.received)
            busy = await self.held_invite()

            stopping = service.stopService()
            await self.until(lambda: idle.lost.called)
            await deferLater(self.reactor, 0.05)
            self.assertNoResult(stopping)
            self.assertFalse(self.store.closed)
            self.assertEqual(busy.received, b"")
            self.assertFalse(busy.lost.called)
            (start,) = self.logged("Stopping")
            self.assertEqual((start["in_progress"], start["grace_period"]), (1, 10.0))

            self.store.held[0].callback(None)
            await busy.lost
            ((status, headers, body),) = parse_responses(busy.received)
            self.assertEqual(
                (status, headers[b"connection"], list(body)), (200, b"close", ["event"])
            )
            await stopping
            self.assertTrue(self.store.closed)
            self.assertEqual(len(self.store.invites), 1)
            (end,) = self.logged("Stopped serving")
            self.assertEqual(
                (end["finished"], end["abandoned"], end["dropped"], end["log_level"]),
                (1, 0, 0, LogLevel.info),
            )

        return ensureDeferred(go())

    def test_grace_period_expires(self) -> None:
        """An invite still held in the store when the grace period (0.3 s) ends: its
        connection is dropped unanswered and a warning counts 1 request abandoned; the
        store is closed only once that invite is stored (it is finished regardless)."""

        async def go() -> None:
            service = await self.start(grace_period=0.3)
            busy = await self.held_invite()
            started = self.reactor.seconds()
            stopping = service.stopService()
            await busy.lost
            self.assertGreaterEqual(self.reactor.seconds() - started, 0.3)
            self.assertEqual(busy.received, b"")
            await deferLater(self.reactor, 0.05)
            self.assertFalse(stopping.called or self.store.closed)
            self.store.held[0].callback(None)
            await stopping
            self.assertTrue(self.store.closed)
            self.assertEqual(len(self.store.invites), 1)
            self.assertEqual([e["outcome"] for e in self.events if "outcome" in e], ["accepted"])
            (end,) = self.logged("Stopped serving")
            self.assertEqual(
                (end["finished"], end["abandoned"], end["dropped"], end["grace_period"]),
                (0, 1, 0, 0.3),
            )
            self.assertEqual(end["log_level"], LogLevel.warn)

        return ensureDeferred(go())

    def test_pipelined_request_dropped_and_counted(self) -> None:
        """A request pipelined behind an invite held in the store when the service stops: the
        invite is answered (``Connection: close``), the request behind it is dropped
        unanswered (its client retries it, RFC 9112 section 9.3.2), and the warning counts
        it: 1 finished, 0 abandoned, 1 dropped."""

        async def go() -> None:
            service = await self.start()
            busy = await self.held_invite()
            assert busy.transport is not None
            busy.transport.write(b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: x\r\n\r\n")
            # Received, and held (unparsed) behind the invite:
            await self.until(
                lambda: any(
                    b"".join(channel._dataBuffer)
                    for site in service._sites
                    for channel in site._channels
                )
            )
            stopping = service.stopService()
            self.store.held[0].callback(None)
            await busy.lost
            await stopping
            ((status, headers, _),) = parse_responses(busy.received)
            self.assertEqual((status, headers[b"connection"]), (200, b"close"))
            (end,) = self.logged("Stopped serving")
            self.assertEqual(
                (end["finished"], end["abandoned"], end["dropped"], end["log_level"]),
                (1, 0, 1, LogLevel.warn),
            )

        return ensureDeferred(go())

    def test_no_new_connection_once_stopping(self) -> None:
        """While the drain waits for an invite in progress, a new connection is refused."""

        async def go() -> None:
            service = await self.start()
            busy = await self.held_invite()
            stopping = service.stopService()
            await deferLater(self.reactor, 0.05)
            self.assertNoResult(stopping)
            with self.assertRaises(ConnectionRefusedError):
                await self.connect()
            self.store.held[0].callback(None)
            await stopping
            await busy.lost
            self.assertEqual(parse_responses(busy.received)[0][0], 200)

        return ensureDeferred(go())


class RestartTests(TestCase):
    """A ``FederationInviteService`` stopped and started again in one process (an
    embedder's ``MultiService``, a test suite): each run listens, then closes, on its own."""

    timeout = 20

    async def serves(self, service: FederationInviteService) -> int:
        """Check that ``service`` answers a version request on its port: that port."""
        from twisted.internet import reactor

        (listener,) = list(service)
        port = (await listener._waitingForPort).getHost().port  # type: ignore[attr-defined]
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client = _RawClient()
        await connectProtocol(endpoint, client)
        assert client.transport is not None
        client.transport.write(
            b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: us.example\r\n"
            b"Connection: close\r\n\r\n"
        )
        await client.lost
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "))
        return int(port)

    async def run_once(self, service: FederationInviteService) -> tuple[Any, int]:
        """Start ``service``, check it serves, stop it: its components and port number."""
        service.startService()
        components = await service.ready
        port = await self.serves(service)
        await service.stopService()
        return components, port

    def new_service(self) -> FederationInviteService:
        """A service with a real SQLite store, listening on a free loopback port."""
        from twisted.internet import reactor

        config = load_config(
            None,
            {
                "server_name": US,
                "data_dir": os.path.abspath(self.mktemp()),
                "listen": ["tcp:0:interface=127.0.0.1"],
            },
        )
        config.ensure_data_dir()
        return FederationInviteService(config, reactor, make_key("us1"))

    async def test_start_stop_start_stop(self) -> None:
        """Each start gets its own ``ready`` (the second run's components, newly built),
        each stop closes that run's port and store, and nothing is logged as an error."""
        from twisted.internet import reactor

        service = self.new_service()
        first, _ = await self.run_once(service)
        self.assertTrue(first.store._closed)
        second, port = await self.run_once(service)
        self.assertIsNot(second, first)
        self.assertIs(service.components, second)
        self.assertTrue(second.store._closed)
        self.assertEqual(list(service), [])
        with self.assertRaises(ConnectionRefusedError):
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())
        del first, second
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_started_again_while_stopping(self) -> None:
        """startService while the previous stopService is still under way (not waited
        for): the new run starts once that stop is over (which closes its own run's store
        and ports only), then serves; its stop closes its store; no error logged."""
        service = self.new_service()
        service.startService()
        first = await service.ready

        async def close_left_open() -> None:
            # Should this test fail: no store left open (its threads keep trial running).
            with contextlib.suppress(Exception):
                await service.ready
            for components in (first, service.components):
                if components is not None and not components.store._closed:
                    await components.store.close()

        self.addCleanup(lambda: ensureDeferred(close_left_open()))
        stopping = service.stopService()
        self.assertFalse(stopping.called)
        service.startService()
        second_ready = service.ready
        await stopping
        self.assertTrue(first.store._closed)
        second = await second_ready
        self.assertIsNot(second, first)
        self.assertFalse(second.store._closed)
        self.assertIs(service.components, second)
        await self.serves(service)
        await service.stopService()
        self.assertTrue(second.store._closed)
        self.assertEqual(list(service), [])
        self.assertEqual(self.flushLoggedErrors(), [])


class AssemblyFailureTests(SynchronousTestCase):
    """A failure assembling the components after the database was opened (a caller's
    mistake, a configuration only the key can refute) closes that database again."""

    def setUp(self) -> None:
        self.store = _HeldStore()
        self.opened: list[str] = []

        async def open_store(uri: str, reactor: Any = None, **kwargs: Any) -> Any:
            self.opened.append(uri)
            return self.store

        self.patch(service_module, "open_store", open_store)
        self.data_dir = os.path.abspath(self.mktemp())

    def config(self, **settings: Any) -> Any:
        return load_config(None, {"server_name": US, "data_dir": self.data_dir, **settings})

    def old_key_setting(self, key: Any) -> dict[str, Any]:
        """``keys.old_verify_keys`` listing ``key``'s ID, which the key it signs with may not have."""
        entry = {
            "key_id": key_id_of(key),
            "key": encode_verify_key_base64(key.verify_key),
            "expired_ts": 5,
        }
        return {"keys.old_verify_keys": [entry]}

    def build(self, config: Any, **kwargs: Any) -> Failure:
        return self.failureResultOf(
            Deferred.fromCoroutine(build_from_config(config, MemoryReactorClock(), **kwargs))
        )

    def test_mistakes_refused_before_the_database_opens(self) -> None:
        """A hook without check_invite, an unknown keyword, our signing key's ID among the
        old keys: refused as before, and no database is opened for nothing."""
        self.build(self.config(), hooks=[lambda invite: None]).trap(TypeError)
        failure = self.build(self.config(), listener=print)
        failure.trap(TypeError)
        self.assertIn("listener", str(failure.value))
        self.config().ensure_data_dir()
        (key,), _ = load_or_create_signing_keys(self.config().signing_key_path)
        self.build(self.config(**self.old_key_setting(key))).trap(ConfigError)
        self.assertEqual(self.opened, [])

    def test_store_closed_when_assembly_fails(self) -> None:
        """build_components failing once the database is open (here, listeners that are
        no iterable): the error is raised, and the store it opened is closed."""
        self.build(self.config(), listeners=5).trap(TypeError)
        self.assertEqual(len(self.opened), 1)
        self.assertTrue(self.store.closed)

    def test_service_closes_the_store_when_assembly_fails(self) -> None:
        """The daemon's start failing to assemble (its key's ID among the old keys) closes
        the store it opened; ready fails with the error, logged in one line."""
        key = make_key("us1")
        service = FederationInviteService(
            self.config(**self.old_key_setting(key)), MemoryReactorClock(), key
        )
        service.startService()
        self.failureResultOf(service.ready, ConfigError)
        self.assertTrue(self.store.closed)
        self.assertEqual(list(service), [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_signer_for_another_server_refused(self) -> None:
        """A signer whose server_name is not the configured server name: ConfigError (a
        ValueError) naming both, from build_components, and from build_from_config before
        the data directory or the database is opened."""
        signer = LocalSigner("other.example", make_key("o1"))
        config = load_config(None, {"server_name": US})
        error = self.assertRaises(
            ConfigError,
            build_components,
            config,
            MemoryReactorClock(),
            MemoryStore(),  # type: ignore[arg-type]
            make_key("us1"),
            signer=signer,
        )
        self.assertIsInstance(error, ValueError)
        self.assertIn("'other.example'", str(error))
        self.assertIn(f"'{US}'", str(error))
        failure = self.build(self.config(), signer=signer)
        failure.trap(ConfigError)
        self.assertIn("'other.example'", str(failure.value))
        self.assertEqual(self.opened, [])
        self.assertFalse(os.path.exists(self.data_dir))

    def test_signer_with_an_unpublished_key_refused(self) -> None:
        """A signer that signs with another key than the one the key document publishes is
        refused when the parts are assembled (ConfigError, one clear message), and
        build_from_config closes the database it opened; with our key it builds."""
        config = load_config(None, {"server_name": US})
        key = make_key("us1")

        def assemble(signing_with: Any) -> Any:
            return build_components(
                config,
                MemoryReactorClock(),
                MemoryStore(),  # type: ignore[arg-type]
                key,
                signer=LocalSigner(US, signing_with),
            )

        error = self.assertRaises(ConfigError, assemble, make_key("hsm"))
        self.assertIn("the signer signs with a key this server does not publish: ", str(error))
        self.assertIn("ed25519:hsm", str(error))
        self.assertIn("ed25519:us1", str(error))
        # Same key ID, other key: refused as well.
        self.assertRaises(ConfigError, assemble, make_key("us1"))
        built = assemble(key)
        self.assertEqual(built.signer.server_name, US)
        failure = self.build(self.config(), signer=LocalSigner(US, make_key("hsm")))
        failure.trap(ConfigError)
        self.assertIn("does not publish", str(failure.value))
        self.assertEqual(len(self.opened), 1)
        self.assertTrue(self.store.closed)

    def test_signer_answering_later_checked_before_build_from_config_returns(self) -> None:
        """A signer whose Deferred fires later (a remote signer): build_from_config waits for
        its answer to the probe and refuses a signature by another key; with the file's key
        it returns the components."""
        self.config().ensure_data_dir()
        (file_key,), _ = load_or_create_signing_keys(self.config().signing_key_path)
        for key, refused in ((make_key("hsm"), True), (file_key, False)):
            self.store = _HeldStore()
            pending: list[Deferred[Any]] = []

            class RemoteSigner:
                server_name = US

                def __init__(self, local: LocalSigner, pending: list[Deferred[Any]]) -> None:
                    self.local, self.pending = local, pending

                def sign_event(self, room_version: Any, event: Any, prepared: Any = None) -> Any:
                    raise AssertionError("not called")

                def hash_and_sign_event(self, room_version: Any, event: Any) -> Any:
                    answer: Deferred[Any] = Deferred()
                    self.pending.append(answer)
                    local = self.local
                    answer.addCallback(lambda _: local.hash_and_sign_event(room_version, event))
                    return answer

            building = Deferred.fromCoroutine(
                build_from_config(
                    self.config(),
                    MemoryReactorClock(),
                    signer=RemoteSigner(LocalSigner(US, key), pending),
                )
            )
            self.assertNoResult(building)
            (answer,) = pending
            answer.callback(None)
            if refused:
                failure = self.failureResultOf(building, ConfigError)
                self.assertIn("does not publish", str(failure.value))
                self.assertTrue(self.store.closed)
                # build_components cannot wait: it logs the refusal when the answer comes.
                events: list[dict[str, Any]] = []
                globalLogPublisher.addObserver(events.append)
                self.addCleanup(globalLogPublisher.removeObserver, events.append)
                build_components(
                    self.config(),
                    MemoryReactorClock(),
                    MemoryStore(),  # type: ignore[arg-type]
                    file_key,
                    signer=RemoteSigner(LocalSigner(US, key), pending),
                )
                self.assertEqual(service_lines(events, "signer cannot be used"), [])
                pending[-1].callback(None)
                (line,) = service_lines(events, "signer cannot be used")
                self.assertEqual(line["log_level"], LogLevel.critical)
                self.assertIn("does not publish", line["reason"])
            else:
                self.assertEqual(self.successResultOf(building).signer.server_name, US)
                self.assertFalse(self.store.closed)

    def test_signer_never_answering_the_probe_fails_build_from_config(self) -> None:
        """A signer that never answers the probe (a remote signer down, an HSM wedged) does
        not keep build_from_config waiting for ever: after SIGNER_PROBE_TIMEOUT_SECONDS it
        fails with ConfigError saying so, the signer's Deferred cancelled and the store
        closed; one second before, it still waits."""
        # README.md, "build_from_config waits for the probe, for 30 s at most".
        self.assertEqual(service_module.SIGNER_PROBE_TIMEOUT_SECONDS, 30.0)
        self.config().ensure_data_dir()
        cancelled: list[Deferred[Any]] = []

        class SilentSigner:
            server_name = US

            def sign_event(self, room_version: Any, event: Any, prepared: Any = None) -> Any:
                raise AssertionError("not called")

            def hash_and_sign_event(self, room_version: Any, event: Any) -> Any:
                return Deferred(cancelled.append)

        clock = MemoryReactorClock()
        building = Deferred.fromCoroutine(
            build_from_config(self.config(), clock, signer=SilentSigner())
        )
        clock.advance(service_module.SIGNER_PROBE_TIMEOUT_SECONDS - 1)
        self.assertNoResult(building)
        self.assertFalse(self.store.closed)
        clock.advance(1)
        failure = self.failureResultOf(building, ConfigError)
        self.assertEqual(
            str(failure.value),
            f"the signer did not answer a probe event within "
            f"{service_module.SIGNER_PROBE_TIMEOUT_SECONDS:g} s: it cannot sign invites",
        )
        self.assertEqual(len(cancelled), 1)
        self.assertTrue(self.store.closed)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_daemon_refuses_to_start_with_an_unpublished_signing_key(self) -> None:
        """The daemon's start checks its signer against the published key: a mismatch fails
        ready with ConfigError, logged in one line, and closes the store; the default starts."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        key = make_key("us1")
        service = FederationInviteService(self.config(), MemoryReactorClock(), key)
        service.startService()
        self.assertEqual(self.successResultOf(service.ready).signer.server_name, US)
        self.successResultOf(service.stopService())
        self.store = _HeldStore()
        self.patch(
            service_module, "LocalSigner", lambda server_name, _: LocalSigner(US, make_key("hsm"))
        )
        service = FederationInviteService(self.config(), MemoryReactorClock(), key)
        service.startService()
        self.failureResultOf(service.ready, ConfigError)
        self.assertTrue(self.store.closed)
        (line,) = service_lines(events, "could not start")
        self.assertEqual(line["log_level"], LogLevel.critical)
        self.assertTrue(
            line["reason"].startswith("the signer signs with a key this server does not publish: ")
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_non_callable_listener_refused(self) -> None:
        """add_listener (or listeners=) with an object that is not callable raises TypeError at
        once, as add_policy_hook does, instead of failing every invite later."""
        components = build_components(
            load_config(None, {"server_name": US}),
            MemoryReactorClock(),
            MemoryStore(),  # type: ignore[arg-type]
            make_key("us1"),
        )
        error = self.assertRaises(TypeError, components.add_listener, 3)
        self.assertIn("int", str(error))
        self.assertEqual(components.handler._listeners, [])
        components.add_listener(print)
        self.assertEqual(components.handler._listeners, [print])
        self.assertRaises(
            TypeError,
            build_components,
            load_config(None, {"server_name": US}),
            MemoryReactorClock(),
            MemoryStore(),  # type: ignore[arg-type]
            make_key("us1"),
            listeners=[print, 3],
        )


class UnfinishedStartTests(SynchronousTestCase):
    """A database that accepts the connection and never answers keeps the start from
    finishing; the daemon must still stop on SIGTERM, and say why it waits."""

    def setUp(self) -> None:
        # twistd's reactor, running: a failed start would ask it to stop and to exit 1.
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.store = _HeldStore()
        self.opening: Deferred[Any] = Deferred()

        async def open_store(uri: str, reactor: Any = None, **kwargs: Any) -> Any:
            return await self.opening

        self.patch(service_module, "open_store", open_store)
        # The exit status asked for at exit, which must not end this process.
        self.exit_statuses: list[int] = []
        self.patch(service_module, "_exit_status_at_exit", self.exit_statuses.append)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def new_service(self) -> FederationInviteService:
        config = load_config(
            None,
            {
                "server_name": US,
                "data_dir": self.mktemp(),
                "listen": ["tcp:0:interface=127.0.0.1"],
                "inbound.shutdown_grace_period": 3.0,
            },
        )
        return FederationInviteService(config, self.reactor, make_key("us1"), exit_on_failure=True)

    def logged(self, text: str) -> list[dict[str, Any]]:
        return service_lines(self.events, text)

    def test_stop_abandons_a_start_that_never_finishes(self) -> None:
        """A stop while the database never opens waits inbound.shutdown_grace_period (3 s),
        then cancels the start, logs a warning saying so, and finishes: the reactor can
        stop, and twistd's own exit status stands (no stop or exit 1 is asked for)."""
        service = self.new_service()
        service.startService()
        stopping = service.stopService()
        self.reactor.advance(2.9)
        self.assertNoResult(stopping)
        self.assertNoResult(service.ready)
        self.reactor.advance(0.1)
        self.successResultOf(stopping)
        self.failureResultOf(service.ready, CancelledError)
        self.assertTrue(self.opening.called)  # cancelled
        (warning,) = self.logged("start abandoned")
        self.assertEqual((warning["log_level"], warning["grace_period"]), (LogLevel.warn, 3.0))
        self.assertEqual(self.logged("could not start"), [])
        self.assertEqual(
            (self.reactor.hasStopped, self.reactor.triggers, self.exit_statuses), (False, {}, [])
        )
        self.assertEqual(list(service), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_store_opened_after_the_start_was_abandoned_is_closed(self) -> None:
        """A store that opens only after the stop gave up on it (its opening ignored the
        cancellation) is closed at once; nothing listens, nothing more is logged."""
        late: Deferred[Any] = Deferred()

        async def open_store(uri: str, reactor: Any = None, **kwargs: Any) -> Any:
            try:
                return await self.opening
            except CancelledError:
                return await late

        self.patch(service_module, "open_store", open_store)
        service = self.new_service()
        service.startService()
        stopping = service.stopService()
        self.reactor.advance(3.0)
        self.successResultOf(stopping)
        late.callback(self.store)
        self.assertTrue(self.store.closed)
        self.failureResultOf(service.ready, CancelledError)
        self.assertEqual(list(service), [])
        self.assertEqual(self.logged("could not start"), [])
        self.assertEqual(
            (self.reactor.hasStopped, self.reactor.triggers, self.exit_statuses), (False, {}, [])
        )

    def test_start_within_the_grace_period(self) -> None:
        """A database that opens within the grace period of a stop: the stop waits for it,
        listens on nothing and closes the store, as before."""
        service = self.new_service()
        service.startService()
        stopping = service.stopService()
        self.reactor.advance(2.9)
        self.opening.callback(self.store)
        self.successResultOf(stopping)
        self.assertIs(self.successResultOf(service.ready).store, self.store)
        self.assertEqual(self.logged("start abandoned"), [])
        self.assertEqual(list(service), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def opened_in_turn(self) -> list[Deferred[Any]]:
        """Have each start's ``open_store`` wait for a Deferred of its own, listed."""
        openings: list[Deferred[Any]] = []

        async def open_store(uri: str, reactor: Any = None, **kwargs: Any) -> Any:
            openings.append(Deferred())
            return await openings[-1]

        self.patch(service_module, "open_store", open_store)
        return openings

    def test_start_during_a_stop_waits_for_it(self) -> None:
        """Started again while a stop waits for the first start: the second run neither
        listens nor opens its store until that stop is over (the first run's store closed,
        its port closed); then it does, and serves, with a ready of its own."""
        openings = self.opened_in_turn()
        service = self.new_service()
        service.startService()
        first_ready = service.ready
        stopping = service.stopService()
        service.startService()
        self.assertIsNot(service.ready, first_ready)
        self.assertEqual((len(openings), len(self.reactor.tcpServers)), (1, 1))
        first_store, second_store = _HeldStore(), _HeldStore()
        openings[0].callback(first_store)
        self.successResultOf(stopping)
        self.assertIs(self.successResultOf(first_ready).store, first_store)
        self.assertTrue(first_store.closed)
        self.assertEqual((len(openings), len(self.reactor.tcpServers)), (2, 2))
        self.assertNoResult(service.ready)
        openings[1].callback(second_store)
        self.assertIs(self.successResultOf(service.ready).store, second_store)
        self.assertTrue(service.running)
        self.assertEqual(len(list(service)), 1)
        self.assertEqual(len(self.logged("listening on")), 1)
        self.successResultOf(service.stopService())
        self.assertTrue(second_store.closed)

    def test_stop_cancels_a_start_waiting_for_a_stop(self) -> None:
        """Stopped again before a start waiting for the last stop has begun: that start
        never begins (its ready fails with CancelledError), nothing more listens or opens."""
        openings = self.opened_in_turn()
        service = self.new_service()
        service.startService()
        service.stopService()
        service.startService()
        second_ready = service.ready
        stopping = service.stopService()
        self.failureResultOf(second_ready, CancelledError)
        openings[0].callback(self.store)
        self.successResultOf(stopping)
        self.assertTrue(self.store.closed)
        self.assertFalse(service.running)
        self.assertEqual((len(openings), len(self.reactor.tcpServers), list(service)), (1, 1, []))

    def test_failed_start_exits_with_status_1_after_shutdown(self) -> None:
        """A daemon's start failing once the reactor runs stops the reactor and asks for
        exit status 1 at exit (after twistd's shutdown and pidfile removal), not with an
        'after shutdown' os._exit that skips the pidfile's removal."""
        service = self.new_service()
        service.startService()
        self.opening.errback(StoreError("open", "refused"))
        self.failureResultOf(service.ready, StoreError)
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual((self.exit_statuses, self.reactor.triggers), ([1], {}))
        self.flushLoggedErrors(StoreError)

    def test_expected_start_failures_logged_in_one_line(self) -> None:
        """A database that cannot be opened (StoreError), an OSError, a port that cannot be
        listened on or a ConfigError, found once started, is one critical line giving the
        reason, no traceback; an unexpected error keeps its traceback."""
        for error, reason in [
            (
                StoreError("migrate", "OperationalError: unable to open database file"),
                "migrate failed: OperationalError: unable to open database file",
            ),
            (
                PermissionError(13, "Permission denied", "/data/x.db"),
                "Permission denied: /data/x.db",
            ),
            (
                CannotListenError("127.0.0.1", 8448, OSError(98, "Address already in use")),
                "Address already in use",
            ),
            (ConfigError("configuration key 'x': bad"), "configuration key 'x': bad"),
        ]:
            self.events.clear()
            self.opening = Deferred()
            service = self.new_service()
            service.startService()
            self.opening.errback(error)
            self.failureResultOf(service.ready, type(error))
            (line,) = self.logged("could not start")
            self.assertEqual(line["log_level"], LogLevel.critical)
            self.assertEqual(line["reason"], reason)
            self.assertNotIn("log_failure", line)
            self.assertEqual(self.flushLoggedErrors(), [])
        self.events.clear()
        self.opening = Deferred()
        service = self.new_service()
        service.startService()
        self.opening.errback(ZeroDivisionError("a bug"))
        self.failureResultOf(service.ready, ZeroDivisionError)
        (line,) = self.logged("could not start")
        self.assertIn("log_failure", line)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_slow_database_warned_about(self) -> None:
        """A database not open after 5 s is worth a warning (once, naming it, its password
        hidden); one that opens in time is not."""
        service = self.new_service()
        service.config = load_config(
            None, {"server_name": US, "database": "postgresql://fi:s3cret@db.example/invites"}
        )
        service.startService()
        self.reactor.advance(4.9)
        self.assertEqual(self.logged("database"), [])
        self.reactor.advance(0.1)
        (warning,) = self.logged("Still opening the database")
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(warning["database"], "postgresql://fi:***@db.example/invites")
        self.reactor.advance(60)
        self.assertEqual(len(self.logged("Still opening the database")), 1)
        self.opening.errback(StoreError("open", "refused"))
        self.failureResultOf(service.ready, StoreError)
        self.flushLoggedErrors(StoreError)

        quick = self.new_service()
        self.opening = Deferred()
        quick.startService()
        self.reactor.advance(1)
        self.opening.callback(self.store)
        self.successResultOf(quick.ready)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(self.logged("Still opening the database")), 1)
        self.successResultOf(quick.stopService())
        self.successResultOf(service.stopService())


class _ClosingStore(MemoryStore):
    """A MemoryStore that counts its closes, and fails them with ``close_error`` if set."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = 0
        self.close_error: Exception | None = None

    def close(self) -> Deferred[None]:
        self.closed += 1
        if self.close_error is not None:
            return fail(self.close_error)
        return succeed(None)


class StopOutcomeTests(SynchronousTestCase):
    """The service on a running MemoryReactorClock whose store opens at once: what every
    stopService call sees, what a start or twistd's privilegedStartService does during a
    stop, what the stop puts back."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.store = _ClosingStore()

        async def open_store(uri: str, reactor: Any = None, **kwargs: Any) -> Any:
            return self.store

        self.patch(service_module, "open_store", open_store)
        self.patch(service_module, "_exit_status_at_exit", lambda status: None)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def new_service(self, **kwargs: Any) -> FederationInviteService:
        config = load_config(
            None,
            {
                "server_name": US,
                "data_dir": self.mktemp(),
                "listen": ["tcp:8448:interface=127.0.0.1"],
            },
        )
        return FederationInviteService(config, self.reactor, make_key("us1"), **kwargs)

    def test_every_stop_call_sees_a_failed_stop(self) -> None:
        """A stop that fails (the database cannot be closed) fails every stopService call,
        those made during it and those after it ("every call ... waits for that one
        stop"), not only the first (mutation review: `_relay` not passing the failure on)."""
        self.store.close_error = StoreError("close", "disk gone")
        service = self.new_service()
        service.startService()
        self.successResultOf(service.ready)
        first, second = service.stopService(), service.stopService()
        self.reactor.advance(0)
        self.failureResultOf(first, StoreError)
        self.failureResultOf(second, StoreError)
        self.failureResultOf(service.stopService(), StoreError)
        self.failureResultOf(service.stopService(), StoreError)
        self.assertEqual(self.store.closed, 1)

    def test_failed_stop_not_logged_again_when_collected(self) -> None:
        """A failed stop whose callers each handled the failure leaves no unhandled one
        behind: the service garbage-collected, nothing is logged as "Unhandled error in
        Deferred" (the stop's own Deferred kept the Failure as its result)."""
        self.store.close_error = StoreError("close", "disk gone")
        service = self.new_service()
        service.startService()
        self.successResultOf(service.ready)
        self.failureResultOf(service.stopService(), StoreError)
        self.failureResultOf(service.stopService(), StoreError)
        del service
        gc.collect()
        unhandled = [
            event
            for event in self.events
            if "Unhandled error in Deferred" in str(event.get("log_format", ""))
        ]
        self.assertEqual(unhandled, [])
        self.assertEqual(self.flushLoggedErrors(StoreError), [])

    def test_privileged_start_during_a_stop_binds_nothing(self) -> None:
        """twistd's privilegedStartService during a stop binds no port (the old run still
        holds it); the startService that follows listens once the stop is over."""
        closing: Deferred[None] = Deferred()
        self.patch(self.store, "close", lambda: closing)
        service = self.new_service()
        service.startService()
        self.successResultOf(service.ready)
        self.assertEqual(len(self.reactor.tcpServers), 1)
        stopping = service.stopService()
        self.assertNoResult(stopping)
        service.privilegedStartService()
        service.startService()
        self.assertEqual(len(self.reactor.tcpServers), 1)  # nothing bound during the stop
        closing.callback(None)
        self.successResultOf(stopping)
        self.assertEqual(len(self.reactor.tcpServers), 2)  # bound by the start that waited
        self.successResultOf(service.ready)

    def test_hangup_handler_set_outside_python_restored_as_default(self) -> None:
        """A SIGHUP handler from before that Python cannot name (signal.signal returned
        None: set outside Python) is put back as SIG_DFL at the stop, not as SIG_IGN
        (which would leave SIGHUP doing nothing)."""
        import signal as real_signal
        from types import SimpleNamespace

        calls: list[Any] = []

        def fake_signal(signum: int, handler: Any) -> Any:
            if signum != real_signal.SIGHUP:  # SIGTERM's and SIGINT's during the stop
                return real_signal.SIG_DFL
            calls.append(handler)
            return None if len(calls) == 1 else handler

        self.patch(
            service_module,
            "signal",
            SimpleNamespace(
                SIGHUP=real_signal.SIGHUP,
                SIGTERM=real_signal.SIGTERM,
                SIGINT=real_signal.SIGINT,
                SIG_DFL=real_signal.SIG_DFL,
                SIG_IGN=real_signal.SIG_IGN,
                signal=fake_signal,
            ),
        )
        service = self.new_service(on_hangup=lambda: None)
        service.startService()
        self.successResultOf(service.ready)
        self.successResultOf(service.stopService())
        self.assertEqual(len(calls), 2)
        self.assertIs(calls[1], real_signal.SIG_DFL)


class _Client:
    """An outbound client whose close is counted and answers when the test says."""

    def __init__(self) -> None:
        self.closing: Deferred[None] = Deferred()
        self.close_calls = 0

    def close(self) -> Deferred[None]:
        self.close_calls += 1
        return self.closing


class _WatchedStore(_ClosingStore):
    """A _ClosingStore that counts the writes asked of it once closed."""

    def __init__(self) -> None:
        super().__init__()
        self.writes_after_close = 0

    def store_server_keys(self, records: Any) -> Deferred[None]:
        self.writes_after_close += bool(self.closed)
        return super().store_server_keys(records)

    def store_invite(self, record: Any) -> Deferred[Any]:
        self.writes_after_close += bool(self.closed)
        return super().store_invite(record)


class ComponentsTests(SynchronousTestCase):
    """build_components' assembly: the key document, the metrics, close()."""

    def build(self, client: Any = None, **settings: Any) -> Any:
        self.clock = make_clock()
        self.store = _ClosingStore()
        config = load_config(None, {"server_name": "example.org", **settings})
        return build_components(config, self.clock, self.store, make_key("k"), client=client)

    def test_key_document_valid_for_validity_period_seconds(self) -> None:
        """keys.validity_period is in seconds, the key document's valid_until_ts in
        milliseconds: now + period * 1000 (one day by default)."""
        for settings, period_ms in (({}, 86_400_000), ({"keys.validity_period": 7200}, 7_200_000)):
            components = self.build(**settings)
            client = StubTreq(components.site_root())
            response = self.successResultOf(client.get("https://example.org/_matrix/key/v2/server"))
            body = json.loads(self.successResultOf(response.content()))
            now_ms = int(self.clock.seconds() * 1000)
            self.assertEqual(body["valid_until_ts"], now_ms + period_ms, settings)

    def test_close_closes_the_client_then_the_store(self) -> None:
        """close() closes the outbound client (its pooled connections, its resolver
        threads), and the store once the client is closed."""
        client = _Client()
        components = self.build(client=client)
        closing = Deferred.fromCoroutine(components.close())
        self.assertEqual(client.close_calls, 1)
        self.assertEqual(self.store.closed, 0)
        client.closing.callback(None)
        self.successResultOf(closing)
        self.assertEqual(self.store.closed, 1)

    def test_close_waits_for_the_client_at_most_timeout(self) -> None:
        """A client whose close never ends (a peer that never completes the TLS close)
        holds close() up for ``timeout`` seconds only, then the store is closed."""
        client = _Client()
        components = self.build(client=client)
        closing = Deferred.fromCoroutine(components.close(timeout=2.0))
        self.clock.advance(1.9)
        self.assertNoResult(closing)
        self.clock.advance(0.1)
        self.successResultOf(closing)
        self.assertEqual(self.store.closed, 1)

    def test_close_waits_for_invites_being_stored_at_most_timeout(self) -> None:
        """Invites still being stored hold close() up for ``timeout`` seconds at most,
        then the database is closed all the same."""
        components = self.build()
        never: Deferred[None] = Deferred()
        self.patch(components.handler, "settle", lambda: never)
        closing = Deferred.fromCoroutine(components.close(timeout=2.0))
        self.clock.advance(1.9)
        self.assertNoResult(closing)
        self.assertEqual(self.store.closed, 0)
        self.clock.advance(0.1)
        self.successResultOf(closing)
        self.assertEqual(self.store.closed, 1)

    def test_close_says_how_many_invites_were_still_being_stored(self) -> None:
        """The warning when invites are still being stored after ``timeout`` says how many
        and how long close() waited for them (not Twisted's "(2.0, 'Deferred')")."""
        from twisted.logger import capturedLogs, formatEvent

        components = self.build()
        never: Deferred[None] = Deferred()
        self.patch(components.handler, "settle", lambda: never)
        self.patch(components.handler, "_storing", 3)
        with capturedLogs() as events:
            closing = Deferred.fromCoroutine(components.close(timeout=2.0))
            self.clock.advance(2.0)
            self.successResultOf(closing)
        self.assertEqual(
            [formatEvent(event) for event in events if event["log_level"] == LogLevel.warn],
            [
                "Closing the database with 3 invite(s) still being stored, not done after"
                " waiting 2.0 s for them"
            ],
        )

    def test_close_abandons_the_outbound_requests_in_flight(self) -> None:
        """close() with a key fetch and an invite in flight to peers that never answer:
        both requests are cancelled (no timer left, their connections closed), the key
        lookup fails with KeyringClosed (500 M_UNKNOWN) and send_invite with
        InviteTransportError (not_sent False: it may have been sent); nothing is logged above
        info, nothing is written to the store once closed, and a send_invite after close is
        refused at once, sending nothing, with not_sent True."""
        from twisted.logger import capturedLogs

        from federation_invite.client.testing import FakePeersAgent
        from federation_invite.keyring import KeyringClosed
        from federation_invite.outbound import InviteTransportError, build_test_invite

        from .support import Tarpit

        keys, invites = Tarpit(), Tarpit()
        peers = FakePeersAgent({"hang.example": keys, "invitee.example": invites})
        self.clock = make_clock()
        self.store = store = _WatchedStore()
        key = make_key("k")
        config = load_config(
            None, {"server_name": "example.org", "metrics.listen": "tcp:0:interface=127.0.0.1"}
        )
        components = build_components(config, self.clock, store, key, agent=peers)  # type: ignore[arg-type]
        now_ms = int(self.clock.seconds() * 1000)
        lookup = components.keyring.get_server_keys("hang.example", ["ed25519:a"], now_ms)
        event, state = self.successResultOf(
            build_test_invite(
                LocalSigner("example.org", key),
                "10",
                "@alice:example.org",
                "@bob:invitee.example",
                now_ms,
            )
        )
        sending = Deferred.fromCoroutine(components.send_invite("10", event, state))
        self.assertNoResult(lookup)
        self.assertNoResult(sending)
        self.assertEqual((len(keys.requests), len(invites.requests)), (1, 1))
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        with capturedLogs() as events:
            self.successResultOf(Deferred.fromCoroutine(components.close()))
            peers.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((keys.lost, invites.lost), (1, 1))
        error = self.failureResultOf(lookup, KeyringClosed).value
        self.assertEqual((error.http_status, error.errcode), (500, "M_UNKNOWN"))
        refused = self.failureResultOf(sending, InviteTransportError).value
        self.assertEqual(
            (refused.destination, refused.reason),
            ("invitee.example", "not answered: the service is stopping"),
        )
        self.assertFalse(refused.not_sent)  # it may have been sent
        self.assertEqual(
            [e for e in events if e["log_level"] >= LogLevel.warn or "log_failure" in e], []
        )
        self.assertEqual(store.closed, 1)
        after = Deferred.fromCoroutine(components.send_invite("10", event, state))
        refused = self.failureResultOf(after, InviteTransportError).value
        self.assertEqual(
            (refused.destination, refused.reason),
            ("invitee.example", "not sent: the service is closed"),
        )
        # Never sent, for a cause of ours: the peer never saw it, a retry is safe.
        self.assertTrue(refused.not_sent)
        self.failureResultOf(
            components.keyring.get_server_keys("other.example", ["ed25519:a"], now_ms),
            KeyringClosed,
        )
        self.assertEqual(len(peers.requests), 2)
        self.clock.advance(3600)
        self.assertEqual((store.writes_after_close, self.clock.getDelayedCalls()), (0, []))
        _, body = components.metrics.exposition()
        self.assertIn(
            'federation_invite_outbound_invites_total{errcode="",outcome="transport"} 2.0',
            body.decode(),
        )

    def test_close_fails_invites_waiting_for_a_turn_as_not_sent(self) -> None:
        """Invites still waiting for their turn when close() abandons them were never sent:
        "not sent: the service is stopping", not_sent True (as when their timeout comes while
        they wait); those in flight keep "not answered", not_sent False (they may have been
        sent)."""
        from federation_invite.client.testing import FakePeersAgent
        from federation_invite.outbound import InviteTransportError, build_test_invite

        from .support import Tarpit

        invites = Tarpit()
        peers = FakePeersAgent({"invitee.example": invites})
        self.clock = make_clock()
        key = make_key("k")
        config = load_config(None, {"server_name": "example.org"})
        components = build_components(config, self.clock, _WatchedStore(), key, agent=peers)  # type: ignore[arg-type]
        now_ms = int(self.clock.seconds() * 1000)
        sending = []
        for n in range(10):
            event, state = self.successResultOf(
                build_test_invite(
                    LocalSigner("example.org", key),
                    "10",
                    "@alice:example.org",
                    f"@bob{n}:invitee.example",
                    now_ms + n,
                )
            )
            sending.append(Deferred.fromCoroutine(components.send_invite("10", event, state)))
        self.clock.advance(0)
        self.assertEqual(len(invites.requests), 8)
        self.successResultOf(Deferred.fromCoroutine(components.close()))
        peers.flush()
        self.clock.advance(0)
        errors = [self.failureResultOf(d, InviteTransportError).value for d in sending]
        self.assertEqual(
            [(e.reason, e.not_sent) for e in errors],
            [("not answered: the service is stopping", False)] * 8
            + [("not sent: the service is stopping", True)] * 2,
        )
        self.assertEqual(len(invites.requests), 8)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_metrics_count_the_keyrings_fetches(self) -> None:
        """The assembled metrics read the keyring's fetch counters
        (federation_invite_key_fetches_total and _key_fetch_failures_total)."""
        components = self.build(**{"metrics.listen": "tcp:0:interface=127.0.0.1"})
        components.keyring.fetches = 3
        components.keyring.fetch_failures = 2
        _, body = components.metrics.exposition()
        text = body.decode()
        self.assertIn("federation_invite_key_fetches_total 3.0", text)
        self.assertIn("federation_invite_key_fetch_failures_total 2.0", text)


class ServerEndpointTests(SynchronousTestCase):
    def test_systemd_index_named_given_either_way(self) -> None:
        """An index given positionally (systemd:INET:5) is named in the ConfigError when
        systemd passed no socket there, as the keyword one is (not the domain)."""
        self.patch(
            os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        )
        for description in (
            "systemd:INET:index=5",
            "systemd:INET:5",
            "systemd:domain=INET:index=5",
        ):
            error = self.assertRaises(
                ConfigError, service_module._server_endpoint, MemoryReactorClock(), description
            )
            self.assertIn("systemd passed no socket at index 5 (", str(error), description)

    def test_chain_is_the_certificates_after_the_leaf(self) -> None:
        """An ssl: endpoint's certKey holding leaf + intermediate serves the intermediate
        alone as the extra chain, not the leaf again (RFC 8446 4.4.2: each certificate
        after the first certifies the one before it)."""
        from cryptography import x509

        _, key_path, fullchain_path = _write_ca_chain(os.path.abspath(self.mktemp()))
        with open(fullchain_path, "rb") as handle:
            leaf, intermediate = x509.load_pem_x509_certificates(handle.read())
        endpoint = service_module._server_endpoint(
            MemoryReactorClock(), f"ssl:0:privateKey={key_path}:certKey={fullchain_path}"
        )
        options: Any = endpoint._sslContextFactory.options  # type: ignore[attr-defined]
        chain = [certificate.to_cryptography() for certificate in options.extraCertChain]
        self.assertEqual(chain, [intermediate])
        self.assertEqual(options.certificate.to_cryptography(), leaf)


class ExitStatusTests(SynchronousTestCase):
    def test_output_flushed_before_exit(self) -> None:
        """What the process wrote to stdout and stderr (buffered: a pipe) is flushed
        before os._exit(status). Run without PYTHONUNBUFFERED (which would hide it)."""
        import subprocess

        code = (
            "import sys\n"
            "from federation_invite.service import _exit_status_at_exit\n"
            "_exit_status_at_exit(3)\n"
            "sys.stdout.write('last words')\n"
            "sys.stderr.write('to stderr')\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
        )
        self.assertEqual((done.returncode, done.stdout), (3, "last words"))
        self.assertIn("to stderr", done.stderr)


class PostgresStopWhileOpeningTests(TestCase):
    """On a real PostgreSQL: another worker's migration is stuck (it holds the advisory
    lock our migration waits for, which no limit of ours cuts); SIGTERM must still end
    within the grace period, not wait for that worker."""

    def setUp(self) -> None:
        from .store._support import POSTGRES_BASE, fresh_postgres_database

        self.database = fresh_postgres_database(self)
        self.uri = f"{POSTGRES_BASE}/{self.database}"

    async def poll_count(
        self, other: Any, sql: str, done: Callable[[int], bool], seconds: float, what: str
    ) -> None:
        """Run ``sql`` (a count, with this test's database as its parameter) on ``other``
        every 50 ms until ``done(count)``; fail after ``seconds`` saying ``what``."""
        from twisted.internet import reactor

        deadline = reactor.seconds() + seconds
        while True:
            with other.cursor() as cursor:
                cursor.execute(sql, (self.database,))
                (count,) = cursor.fetchone()
            if done(count):
                return
            self.assertLess(reactor.seconds(), deadline, f"{count}: {what}")
            await deferLater(reactor, 0.05)

    async def test_stop_while_another_worker_migrates(self) -> None:
        """The stop gives up on the start after inbound.shutdown_grace_period (0.5 s) and
        finishes while the other worker still holds its lock (released after 20 s
        regardless); the abandoned start closes its store by itself, its wait cancelled."""
        import threading

        import psycopg2
        from twisted.internet import reactor

        from federation_invite.store import _base
        from federation_invite.store._dialect import MIGRATION_LOCK_KEY

        self.patch(_base, "CLOSE_WAIT_SECONDS", 0.2)
        other = psycopg2.connect(self.uri)
        other.autocommit = True
        self.addCleanup(other.close)
        other.cursor().execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        released: list[bool] = []
        safety = threading.Timer(20, lambda: (other.close(), released.append(True)))
        safety.start()
        self.addCleanup(safety.cancel)
        config = load_config(
            None,
            {
                "server_name": US,
                "data_dir": os.path.abspath(self.mktemp()),
                "database": self.uri,
                "listen": ["tcp:0:interface=127.0.0.1"],
                "inbound.shutdown_grace_period": 0.5,
            },
        )
        service = service_module.make_service(
            config, reactor, exit_on_failure=False, freeze_gc=False
        )
        service.startService()
        # Until the migration waits for the lock: a fixed pause was not enough on a loaded
        # machine, and a migration sent after the stop's cancel would wait for ever.
        await self.poll_count(
            other,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
            " AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
            lambda waiting: waiting > 0,
            30,
            "the migration never waited",
        )
        await service.stopService()
        self.assertEqual(released, [])
        with self.assertRaises(CancelledError):
            await service.ready
        self.assertEqual(released, [])
        self.assertEqual(list(service), [])
        # The abandoned start's migration, its wait cancelled, ends in a thread of its
        # own; let it end before the database is dropped (dropping it terminates any
        # session left, which that thread would log as an error of this test).
        await self.poll_count(
            other,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            lambda left: left == 0,
            15,
            "session(s) left",
        )


class PoolSizeTests(SynchronousTestCase):
    """database_pool_size reaches open_store on every path that opens the store from a
    configuration: the daemon's start, the embedding entry point."""

    def setUp(self) -> None:
        self.opened: list[dict[str, Any]] = []
        self.opening: Deferred[Any] = Deferred()

        async def open_store(uri: str, reactor: Any = None, **kwargs: Any) -> Any:
            self.opened.append(kwargs)
            return await self.opening

        self.patch(service_module, "open_store", open_store)
        self.config = load_config(
            None,
            {
                "server_name": US,
                "data_dir": self.mktemp(),
                "listen": ["tcp:0:interface=127.0.0.1"],
                "database_pool_size": 2,
                "inbound.shutdown_grace_period": 1.0,
            },
        )

    def test_daemon_start(self) -> None:
        """The daemon's start (twistd/twist: _open_and_serve) opens the store with the
        configured pool size, not open_store's default."""
        reactor = MemoryReactorClock()
        service = FederationInviteService(
            self.config, reactor, make_key("us1"), exit_on_failure=False
        )
        service.startService()
        self.assertEqual([kwargs.get("pool_size") for kwargs in self.opened], [2])
        stopping = service.stopService()
        reactor.advance(1.0)  # the stop abandons the start still opening
        self.successResultOf(stopping)
        self.failureResultOf(service.ready, CancelledError)

    def test_build_from_config(self) -> None:
        """The embedding entry point opens the store with the configured pool size."""
        building = ensureDeferred(build_from_config(self.config, MemoryReactorClock()))
        self.assertEqual([kwargs.get("pool_size") for kwargs in self.opened], [2])
        building.cancel()
        self.failureResultOf(building, CancelledError)


class PostgresPoolSizeTests(TestCase):
    """On a real PostgreSQL: the daemon's pool is as large as database_pool_size."""

    def setUp(self) -> None:
        from .store._support import POSTGRES_BASE, fresh_postgres_database

        self.database = fresh_postgres_database(self)
        self.uri = f"{POSTGRES_BASE}/{self.database}"

    async def test_daemon_pool_size(self) -> None:
        """make_service's service (what twistd and twist run) opens at most
        database_pool_size (2) connections, its pool threads as many."""
        from twisted.internet import reactor

        config = load_config(
            None,
            {
                "server_name": US,
                "data_dir": os.path.abspath(self.mktemp()),
                "database": self.uri,
                "database_pool_size": 2,
                "listen": ["tcp:0:interface=127.0.0.1"],
            },
        )
        service = service_module.make_service(
            config, reactor, exit_on_failure=False, freeze_gc=False
        )
        service.startService()
        try:
            await service.ready
            pool = service.components.store._pool  # type: ignore[attr-defined]
            self.assertEqual((pool.max, pool.threadpool.max), (2, 2))
        finally:
            await service.stopService()


def _port_free(port: int) -> bool:
    """Whether nothing listens on loopback ``port`` (closed connections may linger)."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class ListenAtStartTests(TestCase):
    """The ports are bound when the service starts (twistd: ``privilegedStartService``,
    before it tells a daemon's launcher the start went well), before the database is
    opened: what fails there fails the start at once, and no connection is accepted
    until the store is open."""

    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.store = _HeldStore()
        self.opening: Deferred[Any] = Deferred()
        self.opened: list[str] = []

        async def open_store(uri: str, reactor: Any = None, **kwargs: Any) -> Any:
            self.opened.append(uri)
            return await self.opening

        self.patch(service_module, "open_store", open_store)
        self.busy = socket_listening()
        self.addCleanup(self.busy.close)
        self.busy_port = self.busy.getsockname()[1]

    def new_service(self, *listen: str, **settings: Any) -> FederationInviteService:
        config = load_config(
            None,
            {"server_name": US, "data_dir": self.mktemp(), "listen": list(listen), **settings},
        )
        return FederationInviteService(config, self.reactor, make_key("us1"))

    async def until_free(self, port: int) -> None:
        for _ in range(200):
            if _port_free(port):
                return
            await deferLater(self.reactor, 0.01)
        self.fail(f"port {port} still bound after 2 s")

    async def test_port_in_use_refused_at_once(self) -> None:
        """A port in use fails privilegedStartService with one ConfigError naming the key,
        the endpoint and the reason; the ports bound before it are closed again and no
        database is opened."""
        first = free_port()
        busy = f"tcp:{self.busy_port}:interface=127.0.0.1"
        service = self.new_service(f"tcp:{first}:interface=127.0.0.1", busy)
        error = self.assertRaises(ConfigError, service.privilegedStartService)
        self.assertEqual(
            str(error),
            f"configuration key 'listen': cannot listen on {busy!r}: Address already in use",
        )
        self.assertEqual((list(service), self.opened), ([], []))
        await self.until_free(first)

    def test_started_without_twistd_raises_too(self) -> None:
        """startService alone (twist, an embedder) binds, and so fails, the same way; the
        service is not running and its ready has not fired."""
        service = self.new_service(f"tcp:{self.busy_port}:interface=127.0.0.1")
        self.assertRaises(ConfigError, service.startService)
        self.assertFalse(service.running)
        self.assertNoResult(service.ready)
        self.assertEqual(self.opened, [])

    def test_make_service_leaves_the_excepthook_alone(self) -> None:
        """make_service's service (exit_on_failure, its default) failing to listen raises
        ConfigError to the embedder and leaves sys.excepthook as it was, each time: the
        one-line report of an uncaught start error is twistd's and twist's (tap)."""
        before = sys.excepthook
        self.addCleanup(setattr, sys, "excepthook", before)
        config = load_config(
            None,
            {
                "server_name": US,
                "data_dir": os.path.abspath(self.mktemp()),
                "listen": [f"tcp:{self.busy_port}:interface=127.0.0.1"],
            },
        )
        for _ in range(2):
            service = service_module.make_service(config, self.reactor, freeze_gc=False)
            self.assertRaises(ConfigError, service.startService)
            self.assertIs(sys.excepthook, before)

    def test_tls_files_read_at_once(self) -> None:
        """A TLS key or certificate missing or not PEM fails the start at once, in one line."""
        missing = os.path.abspath(self.mktemp())
        garbage = os.path.abspath(self.mktemp())
        with open(garbage, "w") as handle:
            handle.write("not a certificate\n")
        for path, reason in [
            (missing, f"No such file or directory: {missing}"),
            (garbage, "the TLS key or certificate is not usable PEM"),
        ]:
            endpoint = f"ssl:{free_port()}:interface=127.0.0.1:privateKey={path}:certKey={path}"
            error = self.assertRaises(
                ConfigError, self.new_service(endpoint).privilegedStartService
            )
            self.assertTrue(
                str(error).startswith(
                    f"configuration key 'listen': cannot listen on {endpoint!r}: {reason}"
                ),
                str(error),
            )
            self.assertNotIn("\n", str(error))
        self.assertEqual(self.opened, [])

    def test_unix_socket_in_a_missing_directory_names_the_path(self) -> None:
        """A unix: endpoint (listen or metrics.listen) in a directory that does not exist
        fails naming the path Twisted could not create (its lock file, a symlink whose
        OSError.filename is the process ID, filename2 the path), not the process ID."""
        path = os.path.join(os.path.abspath(self.mktemp()), "fi.sock")
        endpoint = f"unix:{path}"
        tcp = f"tcp:{free_port()}:interface=127.0.0.1"
        for listen, metrics, key in ((endpoint, "", "listen"), (tcp, endpoint, "metrics.listen")):
            service = self.new_service(listen, **{"metrics.listen": metrics})
            error = self.assertRaises(ConfigError, service.privilegedStartService)
            self.assertEqual(
                str(error),
                f"configuration key {key!r}: cannot listen on {endpoint!r}: No such file or "
                f"directory: {path}.lock",
            )
        self.assertEqual(self.opened, [])

    def test_systemd_endpoint_without_a_socket(self) -> None:
        """A systemd: endpoint whose socket systemd did not pass (LISTEN_FDS unset, as
        outside a .socket unit, or too few sockets; no socket of that name) fails saying so,
        not with Twisted's IndexError or KeyError."""
        from twisted.internet.endpoints import _SystemdParser
        from twisted.python.systemd import ListenFDs

        self.patch(_SystemdParser, "_sddaemon", ListenFDs([3], ("web",)))
        for endpoint, reason in (
            (
                "systemd:domain=INET:index=1",
                "systemd passed no socket at index 1 (LISTEN_FDS unset, as outside a systemd "
                "socket unit, or fewer sockets passed than index + 1)",
            ),
            (
                "systemd:domain=INET:name=federation",
                "systemd passed no socket named 'federation' (LISTEN_FDS unset, as outside a "
                "systemd socket unit, or no FileDescriptorName=federation among LISTEN_FDNAMES)",
            ),
        ):
            error = self.assertRaises(
                ConfigError, self.new_service(endpoint).privilegedStartService
            )
            self.assertEqual(
                str(error), f"configuration key 'listen': cannot listen on {endpoint!r}: {reason}"
            )
        self.assertEqual(self.opened, [])

    def test_systemd_endpoint_with_a_missing_tls_file(self) -> None:
        """A systemd: endpoint with TLS arguments whose key file cannot be read fails in one
        line naming the file, as an ssl: endpoint's does."""
        from twisted.internet.endpoints import _SystemdParser
        from twisted.python.systemd import ListenFDs

        self.patch(_SystemdParser, "_sddaemon", ListenFDs([3]))
        missing = os.path.join(os.path.abspath(self.mktemp()), "tls.key")
        endpoint = f"systemd:domain=INET:index=0:privateKey={missing}"
        error = self.assertRaises(ConfigError, self.new_service(endpoint).privilegedStartService)
        self.assertEqual(
            str(error),
            f"configuration key 'listen': cannot listen on {endpoint!r}: No such file or "
            f"directory: {missing}",
        )
        self.assertEqual(self.opened, [])

    async def test_tls_full_chain_served(self) -> None:
        """An ssl: certKey file holding the leaf and its intermediate (a CA's fullchain.pem,
        as the README shows) serves both: a client trusting only the root verifies."""
        from twisted.internet.endpoints import wrapClientTLS
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        root_pem, key_path, fullchain_path = _write_ca_chain(os.path.abspath(self.mktemp()))
        port = free_port()
        service = self.new_service(
            f"ssl:{port}:interface=127.0.0.1:privateKey={key_path}:certKey={fullchain_path}"
        )
        service.startService()
        self.opening.callback(self.store)
        await service.ready
        self.addCleanup(service.stopService)
        client = _RawClient()
        options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(root_pem))
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(self.reactor, "127.0.0.1", port))
        await connectProtocol(endpoint, client)
        assert client.transport is not None
        self.addCleanup(lambda: client.transport and client.transport.abortConnection())
        client.transport.write(
            b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: localhost\r\n"
            b"Connection: close\r\n\r\n"
        )
        await client.lost
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "), client.received)

    async def connect_and_ask_version(self, port: int) -> _RawClient:
        """A loopback connection to ``port`` that has sent a version request."""
        client = _RawClient()
        await connectProtocol(TCP4ClientEndpoint(self.reactor, "127.0.0.1", port), client)
        assert client.transport is not None
        self.addCleanup(lambda: client.transport and client.transport.abortConnection())
        client.transport.write(
            b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: us.example\r\n"
            b"Connection: close\r\n\r\n"
        )
        # A few reactor turns: a port accepting now would have accepted (and, before
        # serving, dropped) it by then.
        for _ in range(5):
            await deferLater(self.reactor, 0)
        return client

    async def test_connection_made_while_the_store_opens_is_served(self) -> None:
        """Bound while the database opens, a port does not accept: a connection made (and
        a request sent) then waits in the kernel's backlog, as on a socket systemd holds,
        and is answered 200 once the store is open; later ones too; the stop closes it."""
        port = free_port()
        service = self.new_service(f"tcp:{port}:interface=127.0.0.1")
        service.privilegedStartService()
        service.startService()
        self.assertFalse(_port_free(port))
        early = await self.connect_and_ask_version(port)
        self.assertFalse(early.lost.called)
        self.assertEqual(early.received, b"")
        self.opening.callback(self.store)
        await service.ready
        await early.lost
        self.assertTrue(early.received.startswith(b"HTTP/1.1 200 "), early.received)
        later = await self.connect_and_ask_version(port)
        await later.lost
        self.assertTrue(later.received.startswith(b"HTTP/1.1 200 "), later.received)
        await service.stopService()
        self.assertTrue(self.store.closed)
        await self.until_free(port)

    async def test_hangup_handled_from_start_until_stopped(self) -> None:
        """With on_hangup (twistd's plugin: its log file reopened), SIGHUP calls it, in
        the reactor thread, from the start until the stop is over, during the drain too,
        instead of ending the process; the handler before the start is then restored
        (each run installs it anew). Without on_hangup (an embedder's), SIGHUP is left
        alone."""
        import signal

        self.addCleanup(signal.signal, signal.SIGHUP, signal.getsignal(signal.SIGHUP))
        before: list[int] = []

        def previous(signum: int, frame: object) -> None:
            before.append(signum)

        signal.signal(signal.SIGHUP, previous)  # not SIG_DFL: a mistake must not end trial
        untouched = self.new_service(f"tcp:{free_port()}:interface=127.0.0.1")
        untouched.startService()
        self.opening.callback(self.store)
        await untouched.ready
        self.assertIs(signal.getsignal(signal.SIGHUP), previous)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(before, [signal.SIGHUP])
        await untouched.stopService()

        hangups: list[str] = []
        config = load_config(
            None,
            {
                "server_name": US,
                "data_dir": self.mktemp(),
                "listen": [f"tcp:{free_port()}:interface=127.0.0.1"],
            },
        )
        service = FederationInviteService(
            config, self.reactor, make_key("us1"), on_hangup=lambda: hangups.append("hup")
        )

        async def hang_up() -> None:
            count = len(hangups)
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(200):
                if len(hangups) > count:
                    return
                await deferLater(self.reactor, 0.01)
            self.fail("SIGHUP did not call on_hangup")

        for _ in range(2):  # a start after a stop handles it again
            self.opening = Deferred()
            self.store = _HeldStore()
            self.assertIs(signal.getsignal(signal.SIGHUP), previous)
            service.startService()
            self.opening.callback(self.store)
            await service.ready
            await hang_up()
            stopping = service.stopService()
            self.assertNoResult(stopping)
            os.kill(os.getpid(), signal.SIGHUP)  # while stopping: handled once in the reactor
            await stopping
            self.assertIs(signal.getsignal(signal.SIGHUP), previous)
        await deferLater(self.reactor, 0)
        self.assertEqual((hangups, before), (["hup"] * 4, [signal.SIGHUP]))

    async def test_stop_while_starting_closes_the_port(self) -> None:
        """A stop while the database opens, with a connection waiting to be accepted: the
        port is closed, that connection is closed unanswered, the store closed."""
        port = free_port()
        service = self.new_service(f"tcp:{port}:interface=127.0.0.1")
        service.startService()
        waiting = await self.connect_and_ask_version(port)
        stopping = service.stopService()
        self.opening.callback(self.store)
        await stopping
        await waiting.lost
        self.assertEqual(waiting.received, b"")
        self.assertTrue(self.store.closed)
        await self.until_free(port)
        with self.assertRaises(ConnectionRefusedError):
            await connectProtocol(TCP4ClientEndpoint(self.reactor, "127.0.0.1", port), Protocol())

    async def test_failed_start_closes_its_ports(self) -> None:
        """A start failing after the ports were bound (the database) closes them before
        ready fails, and forgets them."""
        port = free_port()
        service = self.new_service(f"tcp:{port}:interface=127.0.0.1")
        service.startService()
        self.opening.errback(StoreError("open", "refused"))
        with self.assertRaises(StoreError):
            await service.ready
        self.assertEqual(list(service), [])
        self.assertTrue(_port_free(port))
        self.flushLoggedErrors(StoreError)


@implementer(IHandshakeListener)
class _TLSClient(_RawClient):
    """A TLS client connection: ``handshake`` fires once the handshake is done, or fails
    with why the connection was lost before (a certificate the client refused)."""

    def __init__(self) -> None:
        super().__init__()
        self.handshake: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.handshake.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.handshake.called:
            self.handshake.errback(reason)
        super().connectionLost(reason)


#: RFC 7919's ffdhe2048 group, as dhParameters (``openssl genpkey -genparam -algorithm DH
#: -pkeyopt dh_param:ffdhe2048``): generating parameters takes too long for a test.
_FFDHE2048 = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def _certificates(path: str) -> list[Any]:
    """The PEM certificates in the file at ``path`` (cryptography's)."""
    from cryptography import x509

    with open(path, "rb") as handle:
        return x509.load_pem_x509_certificates(handle.read())


class TLSReloadTests(TestCase):
    """``reload_tls`` (SIGHUP under twistd): each ssl: listener's key, certificate and chain
    are read again from their paths; new connections get them, connections already open keep
    theirs. Files that cannot be used leave the certificate loaded before in place, said in
    one line naming the listener and the file."""

    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor

        async def open_store(uri: str, reactor: Any = None, **kwargs: Any) -> Any:
            return _ClosingStore()

        self.patch(service_module, "open_store", open_store)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.dir = os.path.abspath(self.mktemp())
        self.root_pem, self.key_path, self.cert_path = _write_ca_chain(
            os.path.join(self.dir, "live")
        )
        self.port = free_port()
        self.description = (
            f"ssl:{self.port}:interface=127.0.0.1:privateKey={self.key_path}:"
            f"certKey={self.cert_path}"
        )

    async def start(self, **kwargs: Any) -> FederationInviteService:
        config = load_config(
            None,
            {
                "server_name": US,
                "data_dir": os.path.join(self.dir, "data"),
                "listen": [self.description],
            },
        )
        service = FederationInviteService(config, self.reactor, make_key("us1"), **kwargs)
        service.startService()
        await service.ready
        self.addCleanup(service.stopService)
        return service

    async def connect(self, root_pem: bytes) -> _TLSClient:
        """A TLS connection to the listener, by a client trusting ``root_pem`` alone (it
        verifies only if the listener sends the intermediate as the chain)."""
        from twisted.internet.endpoints import wrapClientTLS
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        client = _TLSClient()
        options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(root_pem))
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port))
        await connectProtocol(endpoint, client)
        self.addCleanup(lambda: client.lost.called or client.transport.abortConnection())  # type: ignore[union-attr]
        await client.handshake
        return client

    def served(self, client: _TLSClient) -> list[Any]:
        """The certificates the listener sent ``client``: the leaf, then the chain."""
        connection: Any = client.transport._tlsConnection  # type: ignore[union-attr]
        return [certificate.to_cryptography() for certificate in connection.get_peer_cert_chain()]

    async def ask_version(self, client: _TLSClient) -> bytes:
        assert client.transport is not None
        client.transport.write(
            b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: localhost\r\n"
            b"Connection: close\r\n\r\n"
        )
        await client.lost
        return client.received

    def renew(self, name: str) -> bytes:
        """A new root, intermediate, key and leaf, the key and leaf + intermediate renamed
        over the listener's files (as a renewal's deploy step does): the new root's PEM."""
        root_pem, key_path, cert_path = _write_ca_chain(os.path.join(self.dir, name))
        os.replace(key_path, self.key_path)
        os.replace(cert_path, self.cert_path)
        return root_pem

    def tls_lines(self) -> list[str]:
        from twisted.logger import formatEvent

        return [
            formatEvent(event)
            for event in service_lines(self.events, "")
            if "TLS" in event.get("log_format", "")
        ]

    async def test_new_connections_get_the_renewed_certificate(self) -> None:
        """After the files are renewed and reload_tls called, a new connection gets the new
        leaf and the certificates after it in certKey as the chain (a client trusting only
        the new root verifies; one trusting only the old root refuses); a connection opened
        before keeps the old certificate and is still answered. One line says which
        listener now serves which certificate, by serial and notAfter."""
        from OpenSSL import SSL

        service = await self.start()
        before = _certificates(self.cert_path)
        old = await self.connect(self.root_pem)
        self.assertEqual(self.served(old), before)
        new_root = self.renew("renewed")
        after = _certificates(self.cert_path)
        self.assertNotEqual(after[0].serial_number, before[0].serial_number)
        self.assertEqual(self.tls_lines(), [])
        self.assertTrue(service.reload_tls())
        new = await self.connect(new_root)
        self.assertEqual(self.served(new), after)
        with self.assertRaises(SSL.Error):
            await self.connect(self.root_pem)
        self.assertEqual(self.served(old), before)
        self.assertTrue((await self.ask_version(old)).startswith(b"HTTP/1.1 200 "))
        self.assertTrue((await self.ask_version(new)).startswith(b"HTTP/1.1 200 "))
        not_after = after[0].not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        self.assertEqual(
            self.tls_lines(),
            [
                f"Reloaded TLS for listener {self.description!r}: certificate "
                f"{self.cert_path}, serial {after[0].serial_number:X}, notAfter {not_after}"
            ],
        )

    async def test_systemd_socket_served_with_tls_and_reloaded(self) -> None:
        """A systemd: listener given ssl:'s TLS arguments (privateKey, certKey) serves TLS on
        the socket systemd passed (a real handshake: the leaf and its chain from certKey),
        and reload_tls reads its files again, as an ssl: listener's."""
        import socket

        from twisted.internet.endpoints import _SystemdParser
        from twisted.python.systemd import ListenFDs

        inherited = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        inherited.bind(("127.0.0.1", 0))
        inherited.listen(50)
        self.port = inherited.getsockname()[1]
        # Its descriptor is the endpoint's to close, once adopted (as systemd's is).
        self.patch(_SystemdParser, "_sddaemon", ListenFDs([inherited.detach()]))
        self.description = (
            f"systemd:domain=INET:index=0:privateKey={self.key_path}:certKey={self.cert_path}"
        )
        service = await self.start()
        before = _certificates(self.cert_path)
        old = await self.connect(self.root_pem)
        self.assertEqual(self.served(old), before)
        self.assertTrue((await self.ask_version(old)).startswith(b"HTTP/1.1 200 "))
        new_root = self.renew("renewed")
        self.assertTrue(service.reload_tls())
        new = await self.connect(new_root)
        self.assertEqual(self.served(new), _certificates(self.cert_path))
        self.assertTrue((await self.ask_version(new)).startswith(b"HTTP/1.1 200 "))
        [line] = self.tls_lines()
        self.assertTrue(line.startswith(f"Reloaded TLS for listener {self.description!r}: "))

    async def test_unusable_files_keep_the_certificate_loaded_before(self) -> None:
        """A key that does not match the certificate, a file that is not PEM, an empty
        certificate file or a missing one: reload_tls answers False, new connections still
        get the certificate loaded before, and one line names the listener and the file
        (no key material)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        service = await self.start()
        before = _certificates(self.cert_path)
        with open(self.key_path, "rb") as handle:
            key_pem = handle.read()
        with open(self.cert_path, "rb") as handle:
            cert_pem = handle.read()
        other_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        encrypted_key = serialization.load_pem_private_key(key_pem, None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        key, cert = self.key_path, self.cert_path
        cases = [
            (
                other_key,
                cert_pem,
                f"{key}: the private key does not match the certificate in {cert}",
            ),
            (key_pem, b"not a certificate\n", f"{cert}: holds no PEM certificate"),
            (key_pem, b"", f"{cert}: holds no PEM certificate"),
            (b"garbage\n", cert_pem, f"{key}: holds no unencrypted PEM private key"),
            (encrypted_key, cert_pem, f"{key}: holds no unencrypted PEM private key"),
            (key_pem, None, f"{cert}: No such file or directory"),
        ]
        for new_key, new_cert, reason in cases:
            del self.events[:]
            with open(self.key_path, "wb") as handle:
                handle.write(new_key)
            if new_cert is None:
                os.remove(self.cert_path)
            else:
                with open(self.cert_path, "wb") as handle:
                    handle.write(new_cert)
            self.assertFalse(service.reload_tls())
            client = await self.connect(self.root_pem)
            self.assertEqual(self.served(client), before, reason)
            self.assertTrue((await self.ask_version(client)).startswith(b"HTTP/1.1 200 "))
            lines = self.tls_lines()
            self.assertEqual(
                lines,
                [
                    f"Could not reload TLS for listener {self.description!r}: {reason}; still "
                    f"serving the certificate loaded before (serial {before[0].serial_number:X})"
                ],
            )
            self.assertNotIn("PRIVATE", lines[0])
        # Put right, the files are loaded again.
        with open(self.key_path, "wb") as handle:
            handle.write(key_pem)
        with open(self.cert_path, "wb") as handle:
            handle.write(cert_pem)
        self.assertTrue(service.reload_tls())

    async def test_extra_chain_and_dh_parameters_reloaded(self) -> None:
        """With extraCertChain (and dhParameters), the chain file is read again too; a
        chain file holding no certificate keeps the chain loaded before, named in the line."""
        from cryptography.hazmat.primitives import serialization

        leaf_path = os.path.join(self.dir, "live", "cert.pem")
        chain_path = os.path.join(self.dir, "live", "chain.pem")
        dh_path = os.path.join(self.dir, "live", "dh.pem")

        def split(fullchain: str) -> None:
            leaf, intermediate = _certificates(fullchain)
            with open(leaf_path, "wb") as handle:
                handle.write(leaf.public_bytes(serialization.Encoding.PEM))
            with open(chain_path, "wb") as handle:
                handle.write(intermediate.public_bytes(serialization.Encoding.PEM))

        split(self.cert_path)
        with open(dh_path, "wb") as handle:
            handle.write(_FFDHE2048)
        self.description = (
            f"ssl:{self.port}:interface=127.0.0.1:privateKey={self.key_path}:"
            f"certKey={leaf_path}:extraCertChain={chain_path}:dhParameters={dh_path}"
        )
        service = await self.start()
        before = _certificates(self.cert_path)
        self.assertEqual(self.served(await self.connect(self.root_pem)), before)
        new_root = self.renew("renewed")
        after = _certificates(self.cert_path)
        split(self.cert_path)
        self.assertTrue(service.reload_tls())
        self.assertEqual(self.served(await self.connect(new_root)), after)
        with open(chain_path, "rb") as handle:
            chain_pem = handle.read()
        for path, content, reason in (
            (chain_path, b"", "holds no PEM certificate"),
            (dh_path, b"garbage\n", "holds no PEM Diffie-Hellman parameters"),
        ):
            del self.events[:]
            with open(path, "wb") as handle:
                handle.write(content)
            self.assertFalse(service.reload_tls())
            self.assertEqual(self.served(await self.connect(new_root)), after)
            self.assertEqual(
                self.tls_lines(),
                [
                    f"Could not reload TLS for listener {self.description!r}: {path}: {reason}; "
                    f"still serving the certificate loaded before (serial "
                    f"{after[0].serial_number:X})"
                ],
            )
            with open(chain_path, "wb") as handle:
                handle.write(chain_pem)
            with open(dh_path, "wb") as handle:
                handle.write(_FFDHE2048)

    async def test_hangup_reopens_the_log_file_then_reloads_tls(self) -> None:
        """SIGHUP (twistd's plugin: on_hangup reopens its log file) does both: on_hangup,
        then the TLS reload, whose line goes to the reopened log file."""
        import signal

        self.addCleanup(signal.signal, signal.SIGHUP, signal.getsignal(signal.SIGHUP))
        signal.signal(signal.SIGHUP, lambda signum, frame: None)  # a mistake must not end trial
        order: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if "Reloaded TLS" in event.get("log_format", ""):
                order.append("reload")

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        service = await self.start(on_hangup=lambda: order.append("reopen"))
        new_root = self.renew("renewed")
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):
            if "reload" in order:
                break
            await deferLater(self.reactor, 0.01)
        self.assertEqual(order, ["reopen", "reload"])
        self.assertEqual(self.served(await self.connect(new_root)), _certificates(self.cert_path))
        await service.stopService()


def _write_ca_chain(directory: str) -> tuple[bytes, str, str]:
    """A root CA, an intermediate it signed and a leaf for localhost the intermediate signed,
    written to ``directory``: (the root's PEM, the leaf's key file, leaf + intermediate file)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(
        name: str, key: Any, issuer: x509.Name, issuer_key: Any, ca: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            usage = x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            )
            builder = builder.add_extension(usage, critical=True)
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Root")])
    root = issue("Test Root", keys[0], root_name, keys[0], True)
    intermediate = issue("Test Intermediate", keys[1], root.subject, keys[0], True)
    leaf = issue("localhost", keys[2], intermediate.subject, keys[1], False)
    os.makedirs(directory)
    key_path = os.path.join(directory, "key.pem")
    fullchain_path = os.path.join(directory, "fullchain.pem")
    with open(key_path, "wb") as handle:
        handle.write(
            keys[2].private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(fullchain_path, "wb") as handle:
        for certificate in (leaf, intermediate):
            handle.write(certificate.public_bytes(serialization.Encoding.PEM))
    return root.public_bytes(serialization.Encoding.PEM), key_path, fullchain_path


def socket_listening() -> Any:
    """A loopback socket listening on a free port: that port is in use."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock
