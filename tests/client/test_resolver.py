"""Tests for federation_invite.client._resolver: address lookups that hang do not starve
the client's other connections."""

from __future__ import annotations

import socket
import threading
from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet import reactor as global_reactor
from twisted.internet import ssl
from twisted.internet._resolver import GAIResolver
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from federation_invite.client import FederationClient, TransportError
from federation_invite.client._resolver import RESOLVER_THREADS, ThreadedResolver
from federation_invite.keyring import Keyring

from ..support import MemoryKeyStore
from ._fakes import FakeSRVResolver, make_certificate

real_reactor: Any = global_reactor

#: Threads of Twisted's reactor pool, which name lookups used to share.
_REACTOR_THREADS = 10


class _Answering(Protocol):
    """Answers each request with an empty JSON object."""

    def __init__(self) -> None:
        self._received = b""

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        while b"\r\n\r\n" in self._received:
            _, self._received = self._received.split(b"\r\n\r\n", 1)
            transport: Any = self.transport
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")


class _Receiver:
    def __init__(self) -> None:
        self.addresses: list[Any] = []
        self.done: Deferred[list[Any]] = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


class SlowLookupTests(TestCase):
    """The reactor's resolver is a ``GAIResolver`` whose getaddrinfo hangs for names under
    slow.test (as the system's does while a name server does not answer) until the test
    ends, answers 127.0.0.1 for good.test and the names under it, where a TLS peer
    answers, and fails at once for names under none.test."""

    timeout = 30

    def setUp(self) -> None:
        self.release = threading.Event()
        self.entered = 0
        self.looked_up: list[str] = []
        cert_pem, key_pem = make_certificate(["good.test"], ["127.0.0.1"])
        options = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()
        port = real_reactor.listenSSL(
            0, Factory.forProtocol(_Answering), options, interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        self.good = f"good.test:{port.getHost().port}"
        previous = real_reactor.installNameResolver(
            GAIResolver(real_reactor, real_reactor.getThreadPool, self.getaddrinfo)
        )
        self.addCleanup(real_reactor.installNameResolver, previous)
        # Cleanups run last first: the hung lookups end before anything else is undone.
        self.addCleanup(self.release.set)

    def getaddrinfo(self, host: str, port: int, *args: Any) -> Any:
        self.looked_up.append(host)
        if host.endswith(".slow.test"):
            self.entered += 1
            self.release.wait(20)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host.endswith(".none.test"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host == "good.test" or host.endswith(".good.test"):
            host = "127.0.0.1"
        return socket.getaddrinfo(host, port, *args)

    def client(self, timeout: float, srv_resolver: Any = None) -> FederationClient:
        client = FederationClient(
            real_reactor,
            "local.example",
            generate_signing_key("k"),
            verify_tls=False,
            ip_allowlist=["127.0.0.1/32"],
            timeout=timeout,
            srv_resolver=srv_resolver,
        )
        self.addCleanup(client.close)
        return client

    def hang(self, client: FederationClient, count: int) -> DeferredList[Any]:
        """``count`` requests whose address lookups hang (each its own name)."""
        requests = [client.get_json(f"x{n}.slow.test:8448", "/x") for n in range(count)]
        return DeferredList(requests, consumeErrors=True)

    async def until(self, condition: Any, seconds: float = 5.0) -> None:
        for _ in range(int(seconds * 100)):
            if condition():
                return
            await deferLater(real_reactor, 0.01, lambda: None)

    async def no_resolver_threads(self, client: FederationClient) -> None:
        """Once the hung lookups end, their threads end too."""
        self.release.set()
        await self.until(lambda: not _dns_threads())
        self.assertEqual(_dns_threads(), [])
        assert client._name_resolver is not None
        self.assertEqual(client._name_resolver.threads, 0)

    async def assert_close_abandons(
        self, client: FederationClient, waiting: Deferred[Any], host: str
    ) -> None:
        """Closing ``client`` fails the request ``waiting``, its lookup of ``host`` waiting for a
        thread, as abandoned by the closed resolver."""
        await client.close()
        with self.assertRaises(TransportError) as caught:
            await waiting
        self.assertTrue(caught.exception.abandoned)
        self.assertEqual(
            caught.exception.reason,
            f"cannot connect: resolving {host} abandoned: the resolver was closed",
        )

    async def test_healthy_peer_reached(self) -> None:
        """With more lookups hung than the reactor has threads, a server whose name
        resolves at once is reached, within its request's timeout."""
        client = self.client(timeout=5.0)
        hung = self.hang(client, _REACTOR_THREADS + 2)
        await self.until(lambda: self.entered == _REACTOR_THREADS + 2, seconds=2.0)
        self.assertEqual(await client.get_json(self.good, "/x"), {})
        self.assertEqual(client._backoff.keys() & {self.good}, set())
        await self.no_resolver_threads(client)
        results = await hung
        self.assertEqual([ok for ok, _ in results], [False] * (_REACTOR_THREADS + 2))

    async def test_waiting_for_a_thread_is_not_the_servers_fault(self) -> None:
        """A request timing out while address lookups wait for a resolver thread (all of
        them busy with lookups that hang) says so and does not back the server off; once
        threads are free again, it is reached."""
        client = self.client(timeout=0.5)
        assert client._name_resolver is not None
        # README.md, limits table: address lookups in threads of the client's own, "at most
        # 256 at once".
        self.assertEqual(RESOLVER_THREADS, 256)
        self.assertEqual(client._name_resolver.max_threads, RESOLVER_THREADS)
        client._name_resolver.max_threads = 2
        hung = self.hang(client, 2)
        await self.until(lambda: self.entered == 2)
        with self.assertRaises(TransportError) as caught:
            await client.get_json(self.good, "/x")
        self.assertEqual(
            caught.exception.reason,
            "timed out after 0.5 s (address lookups were waiting for a resolver thread)",
        )
        self.assertTrue(caught.exception.resolver_busy)
        self.assertEqual(client._backoff.keys() & {self.good}, set())
        await self.no_resolver_threads(client)
        await hung
        self.assertEqual(await client.get_json(self.good, "/x"), {})

    async def test_lookup_of_timed_out_request_not_made(self) -> None:
        """A request that timed out while its address lookup waited for a resolver thread
        takes that lookup out of the queue: it is never made, for nobody."""
        client = self.client(timeout=0.5)
        assert client._name_resolver is not None
        client._name_resolver.max_threads = 1
        hung = self.hang(client, 1)
        await self.until(lambda: self.entered == 1)
        with self.assertRaises(TransportError) as caught:
            await client.get_json(self.good, "/x")
        self.assertTrue(caught.exception.resolver_busy)
        self.assertEqual(client._name_resolver.waiting, 0)
        # Discovery is told of such waits too (its .well-known fetches).
        assert client._resolver is not None
        self.assertEqual(client._resolver._lookups_waited(), client._name_resolver.waits)
        self.assertEqual(client._name_resolver.waits, 1)
        await self.no_resolver_threads(client)
        await hung
        self.assertEqual(self.looked_up, ["x0.slow.test"])

    async def test_keyring_does_not_back_off_for_a_busy_resolver(self) -> None:
        """A key fetch timing out only because its address lookups waited for a resolver
        thread (one, busy with a lookup that hangs) is not the server's fault: the keyring
        does not back it off either, and a lookup right after fetches again."""
        client = self.client(timeout=0.5)
        assert client._name_resolver is not None
        client._name_resolver.max_threads = 1
        hung = self.hang(client, 1)
        await self.until(lambda: self.entered == 1)
        keyring = Keyring(real_reactor, MemoryKeyStore(), client)
        self.assertEqual(await keyring.get_server_keys(self.good, ["ed25519:k"], 0), {})
        self.assertEqual((keyring.fetches, keyring.fetch_failures), (1, 1))
        self.assertEqual(client._backoff.keys() & {self.good}, set())
        self.assertEqual(keyring._backoff.keys() & {self.good}, set())
        await self.no_resolver_threads(client)
        await hung
        # Threads free again, the server is asked at once (and answers, without that key).
        self.assertEqual(await keyring.get_server_keys(self.good, ["ed25519:k"], 0), {})
        self.assertEqual(keyring.fetches, 2)

    async def test_close_answers_waiting_lookups(self) -> None:
        """Closing the client answers the lookups still waiting for a thread at once: their
        requests (an invite's, a key fetch's) were never sent, so they fail as abandoned and
        back nobody off, in the client or in the keyring; the hung one ends on its own."""
        client = self.client(timeout=10.0)
        assert client._name_resolver is not None
        client._name_resolver.max_threads = 1
        hung = self.hang(client, 1)
        await self.until(lambda: self.entered == 1)
        waiting = client.get_json(self.good, "/x")
        keyring = Keyring(real_reactor, MemoryKeyStore(), client)
        lookup = keyring.get_server_keys(self.good, ["ed25519:k"], 0)
        # Both requests share one queued getaddrinfo call.
        await self.until(
            lambda: client._name_resolver is not None and client._name_resolver.waiting == 1
        )
        await self.assert_close_abandons(client, waiting, "good.test")
        self.assertEqual(await lookup, {})
        self.assertEqual(client._backoff.keys() & {self.good}, set())
        self.assertEqual(keyring._backoff.keys() & {self.good}, set())
        self.assertEqual(keyring._direct_backoff.keys() & {self.good}, set())
        await self.no_resolver_threads(client)
        await hung

    async def test_close_answering_a_targets_lookup_tries_no_next_target(self) -> None:
        """A server with two SRV targets, the first's address lookup waiting for a thread
        when the client is closed: the request fails as abandoned, backing nobody off, and
        the second target is not tried (its lookup, made after the close, would have been
        answered, and the request sent or failed with that target's error)."""
        port = int(self.good.rsplit(":", 1)[1])
        targets = [(0, 0, port, "a.good.test"), (1, 0, port, "b.good.test")]
        srv = FakeSRVResolver({"_matrix-fed._tcp.srv.none.test": targets})
        client = self.client(timeout=10.0, srv_resolver=srv)
        assert client._name_resolver is not None
        # Threads free: no .well-known (its name does not resolve) and the SRV answer kept.
        self.assertEqual(await client.get_json("srv.none.test", "/x"), {})
        await client.close()  # no pooled connection left: the next request looks a.good.test up
        self.looked_up.clear()
        client._name_resolver.max_threads = 1
        hung = self.hang(client, 1)
        await self.until(lambda: self.entered == 1)
        waiting = client.get_json("srv.none.test", "/x")
        await self.until(
            lambda: client._name_resolver is not None and client._name_resolver.waiting == 1
        )
        self.assertEqual(client._name_resolver.waiting, 1)
        await self.assert_close_abandons(client, waiting, "a.good.test")
        self.assertEqual(self.looked_up, ["x0.slow.test"])
        self.assertEqual(client._backoff.keys() & {"srv.none.test"}, set())
        await self.no_resolver_threads(client)
        await hung


class ThreadedResolverTests(TestCase):
    """Addresses as getaddrinfo gives them; another resolver installed is used as it is."""

    def resolve(self, getaddrinfo: Any, host: str = "host.test") -> Deferred[list[Any]]:
        previous = real_reactor.installNameResolver(
            GAIResolver(real_reactor, real_reactor.getThreadPool, getaddrinfo)
        )
        self.addCleanup(real_reactor.installNameResolver, previous)
        receiver = _Receiver()
        ThreadedResolver(real_reactor).resolveHostName(receiver, host, 8448)
        return receiver.done

    async def test_addresses(self) -> None:
        def getaddrinfo(host: str, port: int, family: int, kind: int) -> Any:
            self.assertEqual((host, port, family, kind), ("host.test", 8448, 0, 1))
            self.assertTrue(threading.current_thread().name.startswith("federation-invite-dns"))
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 8448)),
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2606:4700::1", 8448, 0, 0)),
            ]

        self.assertEqual(
            await self.resolve(getaddrinfo),
            [
                IPv4Address("TCP", "93.184.216.34", 8448),
                IPv6Address("TCP", "2606:4700::1", 8448),
            ],
        )

    async def test_failures_answer_no_address(self) -> None:
        def fails(host: str, *args: Any) -> Any:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        def breaks(host: str, *args: Any) -> Any:
            raise UnicodeError("label too long")

        self.assertEqual(await self.resolve(fails), [])
        self.assertEqual(await self.resolve(breaks), [])

    def test_other_resolver_used(self) -> None:
        """A resolver installed in the reactor that is not Twisted's GAIResolver (an
        application's, a test's fake) answers itself, in no thread of ours."""
        from ._fakes import FakeHostnameResolver

        fake = FakeHostnameResolver({"host.test": ["93.184.216.34"]})
        previous = real_reactor.installNameResolver(fake)
        self.addCleanup(real_reactor.installNameResolver, previous)
        receiver = _Receiver()
        ThreadedResolver(real_reactor).resolveHostName(receiver, "host.test", 8448)
        self.assertEqual(
            self.successResultOf(receiver.done), [IPv4Address("TCP", "93.184.216.34", 8448)]
        )
        self.assertEqual(fake.lookups, ["host.test"])


def _dns_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("federation-invite-dns")]


class SharedLookupTests(TestCase):
    """Concurrent lookups of one name share one getaddrinfo call; a lookup nobody waits for
    any more is never made. getaddrinfo blocks for names under slow.test until released."""

    timeout = 30

    def setUp(self) -> None:
        self.release = threading.Event()
        self.calls: list[tuple[Any, ...]] = []
        previous = real_reactor.installNameResolver(
            GAIResolver(real_reactor, real_reactor.getThreadPool, self.getaddrinfo)
        )
        self.addCleanup(real_reactor.installNameResolver, previous)
        self.resolver = ThreadedResolver(real_reactor)
        self.addCleanup(self.resolver.close)
        self.addCleanup(self.release.set)

    def getaddrinfo(self, host: str, port: int, family: int, kind: int) -> Any:
        self.calls.append((host, port, family, kind))
        if host.endswith("slow.test"):
            self.release.wait(20)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

    def lookup(self, host: str, port: int = 8448) -> tuple[_Receiver, Any]:
        receiver = _Receiver()
        return receiver, self.resolver.resolveHostName(receiver, host, port)

    async def until(self, condition: Any, seconds: float = 5.0) -> None:
        for _ in range(int(seconds * 100)):
            if condition():
                return
            await deferLater(real_reactor, 0.01, lambda: None)

    async def test_concurrent_lookups_share_one_call(self) -> None:
        """100 lookups of one name at once make one getaddrinfo call, whose addresses
        every one of them gets; a lookup of the same name on another port is its own."""
        lookups = [self.lookup("a.slow.test") for _ in range(100)]
        await self.until(lambda: len(self.calls) == 1)
        other_port, _ = self.lookup("a.slow.test", 443)
        await self.until(lambda: len(self.calls) == 2)
        self.assertEqual(self.resolver.threads, 2)
        self.release.set()
        results = await DeferredList([receiver.done for receiver, _ in lookups])
        self.assertEqual(
            {tuple(addresses) for _, addresses in results},
            {(IPv4Address("TCP", "93.184.216.34", 8448),)},
        )
        self.assertEqual(await other_port.done, [IPv4Address("TCP", "93.184.216.34", 443)])
        self.assertEqual(
            sorted(self.calls), [("a.slow.test", 443, 0, 1), ("a.slow.test", 8448, 0, 1)]
        )
        # Done: a later lookup makes a call of its own.
        again, _ = self.lookup("a.slow.test")
        await again.done
        self.assertEqual(len(self.calls), 3)

    async def test_lookup_nobody_waits_for_is_not_made(self) -> None:
        """A lookup waiting for a thread whose every receiver cancelled it is never made, and
        its receivers are not answered; one receiver of two cancelling leaves the other's."""
        self.resolver.max_threads = 1
        hung, _ = self.lookup("a.slow.test")
        await self.until(lambda: len(self.calls) == 1)
        dropped, dropped_lookup = self.lookup("dropped.test")
        left, left_lookup = self.lookup("kept.test")
        kept, _ = self.lookup("kept.test")
        self.assertEqual(self.resolver.waiting, 2)
        dropped_lookup.cancel()
        left_lookup.cancel()
        left_lookup.cancel()  # twice: nothing more
        self.assertEqual(self.resolver.waiting, 1)
        self.release.set()
        self.assertEqual(await kept.done, [IPv4Address("TCP", "93.184.216.34", 8448)])
        await hung.done
        await self.until(lambda: self.resolver.threads == 0)
        self.assertEqual([call[0] for call in self.calls], ["a.slow.test", "kept.test"])
        self.assertFalse(dropped.done.called)
        self.assertFalse(left.done.called)
        # Cancelling a lookup already answered changes nothing.
        dropped_lookup.cancel()

    async def test_joining_a_waiting_call_counts_as_a_wait(self) -> None:
        """A lookup joining a call that waits for a thread waits too: each is counted in
        ``waits`` (what tells discovery a .well-known timeout may be our resolver's fault);
        one joining a running call is not."""
        self.resolver.max_threads = 1
        hung, _ = self.lookup("a.slow.test")
        await self.until(lambda: len(self.calls) == 1)
        self.lookup("a.slow.test")
        self.assertEqual(self.resolver.waits, 0)
        queued, _ = self.lookup("queued.test")
        self.assertEqual(self.resolver.waits, 1)
        joined, _ = self.lookup("queued.test")
        self.assertEqual(self.resolver.waits, 2)
        self.release.set()
        await DeferredList([hung.done, queued.done, joined.done])
        await self.until(lambda: self.resolver.threads == 0)
        self.assertEqual([call[0] for call in self.calls], ["a.slow.test", "queued.test"])

    async def test_cancelling_a_running_call_is_harmless(self) -> None:
        """Cancelling the only lookup of a call a thread is making (a request timing out while
        its getaddrinfo hangs) raises nothing (IHostResolution.cancel): the call runs on, its
        result goes to nobody, and the resolver goes on making lookups."""
        hung, hung_lookup = self.lookup("a.slow.test")
        await self.until(lambda: len(self.calls) == 1)
        hung_lookup.cancel()
        self.release.set()
        await self.until(lambda: self.resolver.threads == 0)
        other, _ = self.lookup("other.test")
        self.assertEqual(await other.done, [IPv4Address("TCP", "93.184.216.34", 8448)])
        self.assertFalse(hung.done.called)

    async def test_one_slow_name_leaves_threads_for_others(self) -> None:
        """100 lookups of one name whose DNS hangs hold one thread, not all of them: another
        name's lookup is made at once."""
        self.resolver.max_threads = 2
        hung = [self.lookup("a.slow.test")[0] for _ in range(100)]
        await self.until(lambda: len(self.calls) == 1)
        other, _ = self.lookup("other.test")
        self.assertEqual(await other.done, [IPv4Address("TCP", "93.184.216.34", 8448)])
        self.assertEqual(self.resolver.waits, 0)
        self.release.set()
        await DeferredList([receiver.done for receiver in hung])
        self.assertEqual([call[0] for call in self.calls], ["a.slow.test", "other.test"])
