"""Outbound requests failing for want of our own resources, and the cap on requests in
flight to one destination (``FederationClient``)."""

from __future__ import annotations

import errno
from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectBindError, ConnectError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived

from federation_invite.client import FederationClient, TransportError

ORIGIN = "local.example"
REMOTE = "remote.example"


class _RaisingAgent:
    """An ``IAgent`` whose every request fails with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.requests = 0

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Any:
        self.requests += 1
        return fail(self.error)


class LocalResourceErrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def client(self, error: Exception) -> FederationClient:
        return FederationClient(
            self.clock, ORIGIN, generate_signing_key("k1"), agent=_RaisingAgent(error)
        )

    def test_out_of_file_descriptors_does_not_back_the_destination_off(self) -> None:
        """A connection failing with EMFILE (our process out of file descriptors) fails as not
        sent, naming the cause, marked not_sent, without backing the destination off."""
        client = self.client(ConnectBindError(errno.EMFILE, "Too many open files"))
        error = self.failureResultOf(client.get_json(REMOTE, "/x"), TransportError).value
        self.assertEqual(error.reason, "not sent: out of file descriptors (EMFILE)")
        self.assertTrue(error.not_sent)
        self.assertEqual(client._backoff, {})
        # Not refused by a back-off: the next request is made.
        self.failureResultOf(client.get_json(REMOTE, "/x"), TransportError)
        self.assertEqual(client._agent.requests, 2)  # type: ignore[attr-defined]

    def test_each_local_resource_errno(self) -> None:
        """ENFILE, ENOBUFS and ENOMEM (as a ConnectError, an OSError, or wrapped in twisted.web's
        reasons) are ours too; another errno (ECONNREFUSED) is the destination's failure."""
        cases = [
            (ConnectError(errno.ENFILE, "x"), "out of file descriptors (ENFILE)"),
            (OSError(errno.ENOBUFS, "x"), "out of socket buffer memory (ENOBUFS)"),
            (
                ResponseNeverReceived([Failure(ConnectError(errno.ENOMEM, "x"))]),
                "out of memory (ENOMEM)",
            ),
        ]
        for exc, cause in cases:
            client = self.client(exc)
            error = self.failureResultOf(client.get_json(REMOTE, "/x"), TransportError).value
            self.assertEqual(error.reason, f"not sent: {cause}")
            self.assertTrue(error.not_sent)
            self.assertEqual(client._backoff, {})
        client = self.client(ConnectError(errno.ECONNREFUSED, "refused"))
        error = self.failureResultOf(client.get_json(REMOTE, "/x"), TransportError).value
        self.assertFalse(error.not_sent)
        self.assertEqual(list(client._backoff), [REMOTE])


class _HeldAgent:
    """An ``IAgent`` whose requests wait until the test answers them (``answer``), with
    ``in_flight`` counting those neither answered nor cancelled and ``most`` the most at once."""

    def __init__(self) -> None:
        self.held: list[tuple[bytes, Deferred[Any]]] = []
        self.most = 0

    @property
    def in_flight(self) -> int:
        return sum(not held.called for _, held in self.held)

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Any:
        held: Deferred[Any] = Deferred()
        self.held.append((uri, held))
        self.most = max(self.most, self.in_flight)
        return held

    def answer(self, index: int) -> None:
        """Answer the ``index``-th request held with a 200 and ``{}``."""
        _, held = self.held[index]
        held.callback(_Response())


class _Response:
    """A 200 answer ``{}`` for ``read_body`` (an ``IResponse`` enough for it)."""

    code = 200
    phrase = b"OK"
    length = 2

    def __init__(self) -> None:
        from twisted.web.http_headers import Headers

        self.headers = Headers()

    def deliverBody(self, protocol: Any) -> None:
        from twisted.web.client import ResponseDone

        protocol.makeConnection(_NoTransport())
        protocol.dataReceived(b"{}")
        protocol.connectionLost(Failure(ResponseDone()))


class _NoTransport:
    def stopProducing(self) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def abortConnection(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class TurnTests(SynchronousTestCase):
    """At most ``concurrent_per_destination`` (8) requests in flight to one destination; the
    rest wait for their turn within the request's timeout."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.agent = _HeldAgent()
        self.client = self.make_client(timeout=30.0)

    def make_client(self, **kwargs: Any) -> FederationClient:
        """A client of ``ORIGIN`` on this test's clock, through ``self.agent`` unless told."""
        kwargs.setdefault("agent", self.agent)
        return FederationClient(self.clock, ORIGIN, generate_signing_key("k1"), **kwargs)

    def test_at_most_eight_in_flight_to_one_destination(self) -> None:
        """100 concurrent requests to one destination: 8 sent, the others sent in order as
        each ends; every one answered; another destination is not held up; once all are
        over, nothing is left of the destination in the client."""
        requests = [self.client.put_json(REMOTE, f"/p{n}", {}) for n in range(100)]
        self.assertEqual(self.agent.in_flight, 8)
        other = self.client.get_json("other.example", "/x")
        self.assertEqual(self.agent.in_flight, 9)
        self.agent.answer(8)
        self.assertEqual(self.successResultOf(other), {})
        answered = 0
        while answered < 100:
            index = next(i for i, (uri, held) in enumerate(self.agent.held) if not held.called)
            self.agent.answer(index)
            answered += 1
            self.clock.advance(0)  # the turn is handed on at the reactor's next turn
            self.assertLessEqual(self.agent.in_flight, 8)
        self.assertEqual(self.agent.most, 9)  # 8 to remote.example, 1 to other.example
        sent = [uri for uri, _ in self.agent.held if b"remote.example" in uri]
        self.assertEqual(sent, [f"https://{REMOTE}/p{n}".encode() for n in range(100)])
        for requesting in requests:
            self.assertEqual(self.successResultOf(requesting), {})
        self.assertEqual(self.client._lanes, {})

    def test_cap_configurable(self) -> None:
        """concurrent_per_destination sets the cap; below 1 (or not an int) is refused."""
        client = self.make_client(
            concurrent_per_destination=2,
        )
        for n in range(5):
            client.get_json(REMOTE, f"/x{n}")
        self.assertEqual(self.agent.in_flight, 2)
        for bad in (0, -1, True, 2.0):
            with self.assertRaises(ValueError):
                self.make_client(
                    concurrent_per_destination=bad,
                )

    def test_key_requests_do_not_wait_behind_others(self) -> None:
        """Key requests (/_matrix/key/...) have turns of their own: a key fetch from a server
        with 1,000 invites waiting for it goes at once, and key requests are capped alike."""
        for n in range(1000):
            self.client.put_json(REMOTE, f"/_matrix/federation/v2/invite/r/e{n}", {})
        fetching = self.client.get_json(REMOTE, "/_matrix/key/v2/server", signed=False)
        self.assertEqual(self.agent.in_flight, 9)
        self.agent.answer(8)
        self.assertEqual(self.successResultOf(fetching), {})
        queries = [self.client.post_json(REMOTE, "/_matrix/key/v2/query", {}) for _ in range(10)]
        self.assertEqual(self.agent.in_flight, 16)
        self.assertNoResult(queries[-1])

    def test_timeout_while_waiting_for_a_turn(self) -> None:
        """A request whose timeout comes while it still waits fails as not sent, and one that
        waited and then times out once sent as timed out: neither backs the destination off
        (nor counts as its failure); those sent at once and timing out do. Nothing is left
        of the destination once all are over, and no timer."""
        client = self.make_client(
            timeout=30.0,
            concurrent_per_destination=1,
        )
        first = client.get_json(REMOTE, "/1", ignore_backoff=True)
        self.clock.advance(10)
        second = client.get_json(REMOTE, "/2", ignore_backoff=True)
        third = client.get_json(REMOTE, "/3", ignore_backoff=True)
        self.clock.advance(16)
        self.agent.answer(0)  # at 26 s: the second is sent, 16 s of its 30 used
        self.assertEqual(self.successResultOf(first), {})
        self.clock.advance(0)
        self.assertEqual(self.agent.in_flight, 1)
        self.clock.advance(14)  # at 40 s: the second and third time out together
        error = self.failureResultOf(second, TransportError).value
        self.assertEqual(
            error.reason,
            "timed out after 30 s, 16.0 s of them waiting for a turn (at most 1 requests in"
            " flight to a server at once)",
        )
        self.assertEqual((error.not_sent, error.waited), (False, True))
        error = self.failureResultOf(third, TransportError).value
        self.assertEqual(
            error.reason,
            "not sent: timed out after 30 s waiting for a turn (at most 1 requests in flight"
            " to a server at once)",
        )
        self.assertEqual((error.not_sent, error.waited), (True, True))
        self.assertEqual(len(self.agent.held), 2)  # the third never sent
        self.assertEqual(client._backoff, {})
        self.assertEqual(client._lanes, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # One sent after a wait with half its time or more left, or at once, that times out is
        # the destination's failure, as before.
        first = client.get_json(REMOTE, "/4", ignore_backoff=True)
        second = client.get_json(REMOTE, "/5", ignore_backoff=True)
        self.clock.advance(15)
        self.agent.answer(2)
        self.clock.advance(0)  # the second sent with 15 s of its 30 left
        self.clock.advance(15)
        error = self.failureResultOf(second, TransportError).value
        self.assertEqual((error.reason, error.waited), ("timed out after 30 s", False))
        self.assertEqual(list(client._backoff), [REMOTE])
        alone = client.get_json(REMOTE, "/6", ignore_backoff=True)
        self.clock.advance(30)
        error = self.failureResultOf(alone, TransportError).value
        self.assertEqual((error.reason, error.waited), ("timed out after 30 s", False))

    def test_cancelled_while_waiting(self) -> None:
        """A request cancelled while it waits leaves the queue (CancelledError, never sent,
        no back-off); those behind it move up; the lane is forgotten once idle."""
        from twisted.internet.defer import CancelledError

        first = self.client.get_json(REMOTE, "/0")
        waiting = [self.client.get_json(REMOTE, f"/{n}") for n in range(1, 12)]
        self.assertEqual(self.agent.in_flight, 8)
        waiting[8].cancel()  # the 10th: one of those waiting
        self.failureResultOf(waiting[8], CancelledError)
        lane = self.client._lanes[(REMOTE, False)]
        self.assertEqual(len(lane.waiting), 3)
        self.agent.answer(0)
        self.successResultOf(first)
        self.clock.advance(0)
        self.assertEqual(self.agent.held[-1][0], f"https://{REMOTE}/8".encode())
        for index in range(1, 11):
            self.agent.answer(index)
            self.clock.advance(0)
        sent = [uri for uri, _ in self.agent.held]
        self.assertNotIn(f"https://{REMOTE}/9".encode(), sent)
        self.assertEqual(len(sent), 11)
        self.assertEqual(self.client._backoff, {})
        self.assertEqual(self.client._lanes, {})

    def test_requests_failing_at_once_hand_their_turns_on_in_a_loop(self) -> None:
        """10,000 requests waiting that each fail at once when sent (a refused connection)
        hand their turns on without nesting calls (no RecursionError); all fail; nothing left."""
        agent = _RaisingAgent(ConnectError(errno.ECONNREFUSED, "refused"))
        held = _HeldAgent()

        class Agent:
            first = True

            def request(self, *args: Any) -> Any:
                if Agent.first:
                    Agent.first = False
                    return held.request(*args)
                return agent.request(*args)

        client = self.make_client(
            agent=Agent(),
            concurrent_per_destination=1,
        )
        first = client.get_json(REMOTE, "/0", ignore_backoff=True)
        rest = [client.get_json(REMOTE, f"/{n}", ignore_backoff=True) for n in range(1, 10_000)]
        held.answer(0)
        self.successResultOf(first)
        self.clock.advance(0)
        for requesting in rest:
            self.failureResultOf(requesting, TransportError)
        self.assertEqual(agent.requests, 9_999)
        self.assertEqual(client._lanes, {})

    def test_no_turn_given_with_almost_no_time_left(self) -> None:
        """A turn coming when a request has less than a second left (a tenth of its timeout,
        if less) is not taken: the request is not sent (no connection opened for nothing),
        and fails as not sent when its timeout comes; the turn goes to the next one."""
        client = self.make_client(
            timeout=30.0,
            concurrent_per_destination=1,
        )
        first = client.get_json(REMOTE, "/1")
        late = client.get_json(REMOTE, "/2")
        self.clock.advance(10)
        later = client.get_json(REMOTE, "/3")
        self.clock.advance(19.5)
        self.agent.answer(0)  # at 29.5 s: "/2" has 0.5 s left, "/3" 10.5 s
        self.successResultOf(first)
        self.clock.advance(0)
        self.assertEqual([uri for uri, _ in self.agent.held][-1], f"https://{REMOTE}/3".encode())
        self.assertEqual(len(self.agent.held), 2)
        self.assertNoResult(late)
        self.clock.advance(0.5)
        error = self.failureResultOf(late, TransportError).value
        self.assertTrue(error.not_sent)
        self.agent.answer(1)
        self.successResultOf(later)
        self.assertEqual((client._lanes, client._backoff), ({}, {}))
