"""Tests for the keyring: memory, store, direct fetch, notaries, sharing, back-off, validity."""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from federation_invite.client import BackoffError, FederationClient, TransportError
from federation_invite.client.testing import FakePeersAgent
from federation_invite.config import Notary
from federation_invite.core.canonical import encode_canonical_json
from federation_invite.core.errors import MatrixError
from federation_invite.core.keys import encode_verify_key, key_id_of, sign_bytes, verify_key_of
from federation_invite.core.signing import SEVEN_DAYS_MS, sign_json
from federation_invite.keyring import (
    KeyFetchBusy,
    KeyFetchError,
    Keyring,
    KeyringClosed,
    parse_key_response,
)
from federation_invite.store import StoreError
from federation_invite.web._base import MatrixResource, write_json
from federation_invite.web.keys import KeyServerResource, server_keys_document

from .client._fakes import CannedResource
from .support import (
    NOW_S,
    FakeFederation,
    MemoryKeyStore,
    Tarpit,
    Unreachable,
    make_clock,
    make_key,
)

NOW_MS = NOW_S * 1000
DAY_MS = 86_400_000


def many_keys_document(server_name: str, current: int, old: int = 0) -> dict[str, Any]:
    """A key document listing ``current`` verify keys, every one signing it, and ``old`` old
    keys: one private key under many key IDs, as a hostile server can publish."""
    key = make_key("a")
    published = encode_verify_key(verify_key_of(key))
    document: dict[str, Any] = {
        "server_name": server_name,
        "valid_until_ts": NOW_MS + DAY_MS,
        "verify_keys": {f"ed25519:k{n}": {"key": published} for n in range(current)},
        "old_verify_keys": {
            f"ed25519:o{n}": {"key": published, "expired_ts": 5} for n in range(old)
        },
    }
    signature = sign_json(document, server_name, key)["signatures"][server_name]["ed25519:a"]
    document["signatures"] = {
        server_name: {key_id: signature for key_id in document["verify_keys"]}
    }
    return document


def failure_backoffs(keyring: Keyring) -> dict[str, Any]:
    """The keyring's back-offs after failures: its table without the 5 s pauses after an answer
    (which every fetch answered sets, every key asked for found or not)."""
    return {name: backoff for name, backoff in keyring._backoff.items() if backoff.asked is None}


def lax_signed(document: dict[str, Any], server_name: str, key: Any) -> dict[str, Any]:
    """``document`` with ``server_name``'s signature by ``key`` over its lax canonical JSON
    (floats and large integers kept, as rooms v1-5 allow): what ``sign_json``, which is
    strict, refuses to make."""
    unsigned = {k: v for k, v in document.items() if k not in ("signatures", "unsigned")}
    signature = sign_bytes(key, encode_canonical_json(unsigned, strict=False))
    signatures = {**document.get("signatures", {}), server_name: {key_id_of(key): signature}}
    return {**document, "signatures": signatures}


class NotaryQuery(MatrixResource):
    """POST /_matrix/key/v2/query of a notary that answers from the documents it holds."""

    isLeaf = True

    def __init__(
        self, notary_name: str, notary_key: Any, documents: dict[str, dict[str, Any]]
    ) -> None:
        super().__init__()
        self.notary_name = notary_name
        self.notary_key = notary_key
        self.documents = documents
        self.queries: list[Any] = []
        #: Answer only documents listing a key ID asked for, as Synapse's notary does
        #: (``remote_key_resource``): a made-up key ID gets an empty list.
        self.by_key_id = False

    def render_POST(self, request: Request) -> bytes:
        query = json.loads(request.content.read())
        self.queries.append(query)
        answers = [
            sign_json(self.documents[name], self.notary_name, self.notary_key)
            for name, key_ids in query["server_keys"].items()
            if name in self.documents
            and (not self.by_key_id or self.lists_one_of(self.documents[name], key_ids))
        ]
        return write_json(request, 200, {"server_keys": answers})

    @staticmethod
    def lists_one_of(document: dict[str, Any], key_ids: Any) -> bool:
        listed = set(document["verify_keys"]) | set(document.get("old_verify_keys", {}))
        return not key_ids or bool(listed & set(key_ids))


class KeyringTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = make_clock()
        self.store = MemoryKeyStore()
        self.federation = FakeFederation()
        self.remote_key = make_key("r1")
        self.key_id = key_id_of(self.remote_key)
        self.federation.add_key_server(self.clock, "remote.example", [self.remote_key])
        self.keyring = Keyring(self.clock, self.store, self.federation)

    def get(
        self, keyring: Keyring | None = None, server: str = "remote.example", valid_at: int = NOW_MS
    ) -> dict[str, Any]:
        keyring = keyring or self.keyring
        return self.successResultOf(keyring.get_server_keys(server, [self.key_id], valid_at))

    def keyring_failing_first(self, *failures: TransportError) -> Keyring:
        """A keyring whose client fails with ``failures``, one a fetch, then answers as
        ``self.federation`` does."""
        federation = self.federation
        pending = list(failures)

        class FailingFirst:
            def get_json(self, destination: str, path: str, **kwargs: Any) -> Any:
                if pending:
                    return fail(pending.pop(0))
                return federation.get_json(destination, path)

        return Keyring(self.clock, self.store, FailingFirst())

    def assert_no_backoff_after(self, failure: TransportError) -> None:
        """A fetch failing with ``failure`` backs the server off neither in the keyring nor
        directly: the next lookup fetches at once, and finds its keys."""
        keyring = self.keyring_failing_first(failure)
        self.assertEqual(self.get(keyring), {})
        self.assertEqual((keyring.fetches, keyring._backoff, keyring._direct_backoff), (1, {}, {}))
        self.assertIn(self.key_id, self.get(keyring))
        self.assertEqual(keyring.fetches, 2)

    def test_direct_fetch_then_memory(self) -> None:
        """An unknown server's key is fetched once, stored, then served from memory."""
        keys = self.get()
        key = keys[self.key_id]
        self.assertEqual(key.verify_key, verify_key_of(self.remote_key))
        self.assertEqual(key.valid_until_ts, NOW_MS + DAY_MS)
        self.assertEqual(self.federation.count("remote.example"), 1)
        stored = self.store.keys[("remote.example", self.key_id)]
        self.assertEqual(
            (stored.valid_until_ts, stored.fetched_ts, stored.source),
            (NOW_MS + DAY_MS, NOW_MS, "remote.example"),
        )
        reads = self.store.reads
        self.get()
        self.assertEqual(self.federation.count("remote.example"), 1)
        self.assertEqual(self.store.reads, reads)

    def test_seven_day_cap(self) -> None:
        """A key published as valid for 30 days is kept as valid for 7 (v5 signing requirements)."""
        self.federation.add_key_server(
            self.clock, "long.example", [self.remote_key], validity_ms=30 * DAY_MS
        )
        key = self.get(server="long.example")[self.key_id]
        self.assertEqual(key.valid_until_ts, NOW_MS + SEVEN_DAYS_MS)

    def test_store_reused_across_restart(self) -> None:
        """A second keyring on the same store (a restart, another worker) does not refetch."""
        self.get()
        fresh = Keyring(self.clock, self.store, self.federation)
        self.assertIn(self.key_id, self.get(fresh))
        self.assertEqual(self.federation.count("remote.example"), 1)

    def test_expiry_triggers_refetch(self) -> None:
        """A cached key that is no longer valid at the asked time is fetched again."""
        self.get()
        self.clock.advance(DAY_MS // 1000 + 1)
        key = self.get(valid_at=int(self.clock.seconds() * 1000))[self.key_id]
        self.assertEqual(self.federation.count("remote.example"), 2)
        self.assertEqual(key.valid_until_ts, int(self.clock.seconds() * 1000) + DAY_MS)

    def test_key_valid_until_the_asked_time_not_refetched(self) -> None:
        """A cached key whose valid_until_ts is exactly the time asked is still valid then (the
        bound included, as key_valid_for_event and Synapse judge it): no refetch. Past the 5 s
        pause, as within it no lookup of a key ID just asked for fetches, whatever its validity;
        a millisecond later is past the bound: a refetch."""
        self.get()
        key = self.keyring.cached_keys("remote.example")[self.key_id]
        self.clock.advance(6)
        self.assertIn(self.key_id, self.get(valid_at=key.valid_until_ts))
        self.assertEqual(self.federation.count("remote.example"), 1)
        self.assertIn(self.key_id, self.get(valid_at=key.valid_until_ts + 1))
        self.assertEqual(self.federation.count("remote.example"), 2)

    def test_concurrent_asks_share_one_fetch(self) -> None:
        """Two verifications of the same unknown server at once cause exactly one fetch."""
        from twisted.internet.defer import Deferred

        gate: Deferred[None] = Deferred()
        self.federation.hold["remote.example"] = gate
        first = self.keyring.get_server_keys("remote.example", [self.key_id], NOW_MS)
        second = self.keyring.get_server_keys("remote.example", [self.key_id], NOW_MS)
        self.assertNoResult(first)
        self.assertNoResult(second)
        gate.callback(None)
        self.assertIn(self.key_id, self.successResultOf(first))
        self.assertIn(self.key_id, self.successResultOf(second))
        self.assertEqual(self.federation.count("remote.example"), 1)

    def test_lookup_in_a_back_off_joins_the_senders_fetch(self) -> None:
        """While the server is backed off, a lookup finding the sender's fetch (ignore_backoff)
        under way joins it (no fetch more) and gets the key it finds, rather than nothing."""
        servers = self.federation.servers
        resource = servers.pop("remote.example")
        self.assertEqual(self.get(), {})  # down: backed off 1 min
        servers["remote.example"] = resource
        gate: Deferred[None] = Deferred()
        self.federation.hold["remote.example"] = gate
        sender = self.keyring.get_server_keys(
            "remote.example", [self.key_id], NOW_MS, ignore_backoff=True
        )
        inbound = self.keyring.get_server_keys("remote.example", [self.key_id], NOW_MS)
        self.assertNoResult(inbound)
        del self.federation.hold["remote.example"]
        gate.callback(None)
        for lookup in (sender, inbound):
            self.assertIn(self.key_id, self.successResultOf(lookup))
        self.assertEqual(self.keyring.fetches, 2)

    def test_cancelled_waiter_does_not_cancel_fetch(self) -> None:
        """A caller that gives up does not cancel the shared fetch for the others."""
        from twisted.internet.defer import CancelledError, Deferred

        gate: Deferred[None] = Deferred()
        self.federation.hold["remote.example"] = gate
        first = self.keyring.get_server_keys("remote.example", [self.key_id], NOW_MS)
        second = self.keyring.get_server_keys("remote.example", [self.key_id], NOW_MS)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        gate.callback(None)
        self.assertIn(self.key_id, self.successResultOf(second))

    def test_cancelled_lookups_leave_the_shared_fetch(self) -> None:
        """A lookup cancelled (its peer gone) leaves the fetch it joined: the fetch keeps
        nothing of it, however many come and go while it runs; the others still get keys."""
        from twisted.internet.defer import CancelledError, Deferred

        gate: Deferred[None] = Deferred()
        self.federation.hold["remote.example"] = gate
        kept = self.keyring.get_server_keys("remote.example", [self.key_id], NOW_MS)
        for _ in range(1000):
            lookup = self.keyring.get_server_keys("remote.example", [self.key_id], NOW_MS)
            lookup.cancel()
            self.failureResultOf(lookup, CancelledError)
        self.assertEqual(len(self.keyring._inflight["remote.example"].waiters), 1)
        gate.callback(None)
        self.assertIn(self.key_id, self.successResultOf(kept))
        self.assertEqual(self.federation.count("remote.example"), 1)

    def test_lookup_cancelled_by_an_earlier_ones_caller_when_the_fetch_ends(self) -> None:
        """Three lookups share a fetch; the first one's caller, answered, cancels the second
        (as a request giving up on its other lookups would): the second fails with
        CancelledError, the third still gets its key, nothing is logged as an error."""
        gate: Deferred[None] = Deferred()
        self.federation.hold["remote.example"] = gate
        first, second, third = (
            self.keyring.get_server_keys("remote.example", [self.key_id], NOW_MS) for _ in range(3)
        )
        first.addCallback(lambda keys: (second.cancel(), keys)[1])
        gate.callback(None)
        self.assertIn(self.key_id, self.successResultOf(first))
        self.failureResultOf(second, CancelledError)
        self.assertIn(self.key_id, self.successResultOf(third))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_cancelled_lookups_leave_the_pause_wait(self) -> None:
        """A lookup waiting for a pause to end that is cancelled leaves it, and leaves the
        fetch made at the pause's end (which took over the pause's lookups) too; the
        others get the key from that one fetch."""
        from twisted.internet.defer import CancelledError, Deferred

        self.successResultOf(
            self.keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
        )
        rotated = make_key("r2")
        self.federation.add_key_server(self.clock, "remote.example", [rotated])
        kept = self.keyring.get_server_keys("remote.example", [key_id_of(rotated)], NOW_MS)
        lookups = [
            self.keyring.get_server_keys("remote.example", [key_id_of(rotated)], NOW_MS)
            for _ in range(100)
        ]
        for lookup in lookups[:50]:
            lookup.cancel()
            self.failureResultOf(lookup, CancelledError)
        self.assertEqual(len(self.keyring._pause_waits["remote.example"].waiters), 51)
        gate: Deferred[None] = Deferred()
        self.federation.hold["remote.example"] = gate
        self.clock.advance(5)
        self.assertEqual(len(self.keyring._inflight["remote.example"].waiters), 51)
        for lookup in lookups[50:]:
            lookup.cancel()
            self.failureResultOf(lookup, CancelledError)
        self.assertEqual(len(self.keyring._inflight["remote.example"].waiters), 1)
        gate.callback(None)
        self.assertIn(key_id_of(rotated), self.successResultOf(kept))
        self.assertEqual(self.federation.count("remote.example"), 2)

    def test_backoff_after_failure(self) -> None:
        """A dead server is asked once, then not again until its back-off (1 min, doubling) passes."""
        self.assertEqual(self.get(server="dead.example"), {})
        self.assertEqual(self.federation.count("dead.example"), 1)
        self.assertEqual(self.get(server="dead.example"), {})
        self.assertEqual(self.federation.count("dead.example"), 1)
        self.clock.advance(60)
        self.get(server="dead.example")
        self.assertEqual(self.federation.count("dead.example"), 2)
        self.clock.advance(60)
        self.get(server="dead.example")
        self.assertEqual(self.federation.count("dead.example"), 2)
        self.clock.advance(60)
        self.get(server="dead.example")
        self.assertEqual(self.federation.count("dead.example"), 3)
        self.assertEqual(self.keyring.fetch_failures, 3)

    def test_backoff_doubles_from_a_minute_up_to_an_hour(self) -> None:
        """A dead server is not asked again before a full minute; each failure after doubles
        the wait, up to an hour (1, 2, 4, 8, 16, 32 min, then 60 min)."""
        self.get(server="dead.example")
        self.clock.advance(59.999)
        self.get(server="dead.example")
        self.assertEqual(self.federation.count("dead.example"), 1)
        self.clock.advance(0.001)
        delays = []
        for _ in range(7):
            self.get(server="dead.example")
            delay_ms = self.keyring._backoff["dead.example"].delay_ms
            delays.append(delay_ms // 60_000)
            self.clock.advance(delay_ms / 1000)
        self.assertEqual(delays, [2, 4, 8, 16, 32, 60, 60])
        self.assertEqual(self.federation.count("dead.example"), 8)

    def test_ignore_backoff_fetches_during_a_back_off(self) -> None:
        """``ignore_backoff=True`` (the sender's answer check: that server has just answered
        us) fetches even while the server is backed off, and the outcome counts: a success
        ends the back-off, a failure doubles it. Without it (every inbound lookup) the
        back-off holds."""
        self.assertEqual(self.get(server="flaky.example"), {})
        self.clock.advance(30)
        self.assertEqual(
            self.successResultOf(
                self.keyring.get_server_keys(
                    "flaky.example", [self.key_id], NOW_MS, ignore_backoff=True
                )
            ),
            {},
        )
        self.assertEqual(self.federation.count("flaky.example"), 2)
        self.clock.advance(60)  # a doubled back-off (2 min) from the second failure
        self.assertEqual(self.get(server="flaky.example"), {})
        self.assertEqual(self.federation.count("flaky.example"), 2)
        self.federation.add_key_server(self.clock, "flaky.example", [self.remote_key])
        self.assertEqual(self.get(server="flaky.example"), {})
        keys = self.successResultOf(
            self.keyring.get_server_keys(
                "flaky.example", [self.key_id], NOW_MS, ignore_backoff=True
            )
        )
        self.assertIn(self.key_id, keys)
        self.assertEqual(failure_backoffs(self.keyring), {})
        self.assertEqual(self.federation.count("flaky.example"), 3)

    def test_ignore_backoff_fetches_within_a_pause(self) -> None:
        """An ``ignore_backoff`` lookup within the pause after a made-up key ID fetches at once,
        and the lookups waiting for the pause to end get that fetch instead."""
        self.successResultOf(
            self.keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
        )
        rotated = make_key("r2")
        self.federation.add_key_server(self.clock, "remote.example", [rotated])
        waiting = self.keyring.get_server_keys("remote.example", [key_id_of(rotated)], NOW_MS)
        self.assertNoResult(waiting)
        keys = self.successResultOf(
            self.keyring.get_server_keys(
                "remote.example", [key_id_of(rotated)], NOW_MS, ignore_backoff=True
            )
        )
        self.assertIn(key_id_of(rotated), keys)
        self.assertIn(key_id_of(rotated), self.successResultOf(waiting))
        self.assertEqual(self.federation.count("remote.example"), 2)
        self.clock.advance(5)
        self.assertEqual(self.federation.count("remote.example"), 2)

    def test_every_fetch_passes_the_clients_back_off(self) -> None:
        """Every fetch of a server's own keys asks the client with ``ignore_backoff=True`` (as
        Synapse fetches keys), an inbound lookup's as the sender's answer check's: the client's
        back-off of that server, set by other requests, never holds a key fetch up."""
        seen: list[dict[str, Any]] = []
        federation = self.federation

        class RecordingClient:
            def get_json(self, destination: str, path: str, **kwargs: Any) -> Any:
                seen.append(kwargs)
                return federation.get_json(destination, path)

        federation.add_key_server(self.clock, "other.example", [self.remote_key])
        keyring = Keyring(self.clock, self.store, RecordingClient())
        self.assertIn(self.key_id, self.get(keyring))
        keys = self.successResultOf(
            keyring.get_server_keys("other.example", [self.key_id], NOW_MS, ignore_backoff=True)
        )
        self.assertIn(self.key_id, keys)
        self.assertEqual(seen, [{"signed": False, "ignore_backoff": True}] * 2)

    def test_client_backoff_does_not_hold_up_key_fetches(self) -> None:
        """The federation client's back-off of a server (our invites to it failed while it was
        down) does not hold up the fetch of its keys, as Synapse fetches them with
        ``ignore_backoff``: once it is back, the first lookup (a request it sends us) fetches
        and finds its key, and that success ends the client's back-off too. Only the keyring's
        own back-off limits those fetches: while it is down, one fetch, then none for 1 min."""
        peers = FakePeersAgent()
        client = FederationClient(self.clock, "local.example", make_key("l1"), agent=peers)
        for wait in (61, 122, 10):  # three invites our users sent while it was down
            invite = client.put_json(
                "remote.example", "/_matrix/federation/v2/invite/x", {}, ignore_backoff=True
            )
            peers.flush()
            self.failureResultOf(invite, TransportError)
            self.clock.advance(wait)
        self.assertTrue(client._backoff["remote.example"].waiting(self.clock.seconds()))
        keyring = Keyring(self.clock, self.store, client)

        def lookup() -> dict[str, Any]:
            now_ms = int(self.clock.seconds() * 1000)
            found = keyring.get_server_keys("remote.example", [self.key_id], now_ms)
            peers.flush()
            return self.successResultOf(found)

        self.assertEqual(lookup(), {})
        self.assertEqual(len(peers.requests), 4)
        self.assertEqual(keyring._backoff["remote.example"].delay_ms, 60_000)
        self.clock.advance(59)
        self.assertEqual(lookup(), {})
        self.assertEqual(len(peers.requests), 4)
        self.clock.advance(1)
        peers.add_peer("remote.example", self.federation.servers["remote.example"])
        self.assertIn(self.key_id, lookup())
        self.assertEqual(len(peers.requests), 5)
        self.assertEqual(
            (failure_backoffs(keyring), client._backoff, keyring.fetch_failures), ({}, {}, 1)
        )

    def test_client_refusing_a_fetch_is_not_a_server_failure(self) -> None:
        """A client that refuses a key fetch itself (``BackoffError``: no request sent) is not
        a failure of the server: the keyring does not double its own back-off for it, and
        asks the client again once the client's back-off is over (not before, nor the
        notaries); a failure of the server then backs it off the 1 min minimum."""
        clock = self.clock
        federation = self.federation
        retry_at = NOW_S + 230
        calls: list[float] = []

        class BackingOff:
            def get_json(self, destination: str, path: str, **kwargs: Any) -> Any:
                calls.append(clock.seconds())
                if clock.seconds() < retry_at:
                    return fail(BackoffError(destination, retry_at, 3, clock.seconds()))
                if clock.seconds() < retry_at + 60:
                    return fail(TransportError(destination, "connection refused"))
                return federation.get_json(destination, path)

        keyring = Keyring(self.clock, self.store, BackingOff())
        self.assertEqual(self.get(keyring), {})
        for wait in (60, 60, 60, 49.999):
            self.clock.advance(wait)
            self.assertEqual(self.get(keyring), {})
        self.assertEqual(calls, [NOW_S])
        self.clock.advance(0.001)
        self.assertEqual(self.get(keyring), {})
        self.assertEqual(calls, [NOW_S, retry_at])
        self.assertEqual(keyring._backoff["remote.example"].delay_ms, 60_000)
        self.clock.advance(59.999)
        self.assertEqual(self.get(keyring), {})
        self.assertEqual(len(calls), 2)
        self.clock.advance(0.001)
        self.assertIn(self.key_id, self.get(keyring))
        self.assertEqual((len(calls), failure_backoffs(keyring)), (3, {}))

    def test_client_refusal_waits_at_least_a_pause_at_most_an_hour(self) -> None:
        """A client refusing a fetch until 1 s from now (or until long past an hour) makes
        the keyring wait 5 s (or 1 h): a lookup meanwhile costs no call."""
        clock = self.clock
        calls: list[float] = []
        retry_in: list[float] = [1, 5 * 3600]

        class Refusing:
            def get_json(self, destination: str, path: str, **kwargs: Any) -> Any:
                calls.append(clock.seconds())
                return fail(
                    BackoffError(destination, clock.seconds() + retry_in[0], 3, clock.seconds())
                )

        keyring = Keyring(self.clock, self.store, Refusing())
        self.assertEqual(self.get(keyring), {})
        self.clock.advance(4.9)
        self.assertEqual(self.get(keyring), {})
        self.assertEqual(len(calls), 1)
        self.clock.advance(0.1)
        retry_in.pop(0)
        self.assertEqual(self.get(keyring), {})
        self.assertEqual(len(calls), 2)
        self.assertEqual(
            keyring._backoff["remote.example"].until_ms - int(clock.seconds() * 1000), 3_600_000
        )

    def test_client_refusal_keeps_the_delay_to_double(self) -> None:
        """A client refusal between two failures of the server neither doubles the keyring's
        back-off nor forgets it: the second failure waits 2 min, as without the refusal."""
        clock = self.clock
        outcomes: list[Any] = [
            lambda d: TransportError(d, "connection refused"),
            lambda d: BackoffError(d, clock.seconds() + 10, 1, clock.seconds()),
            lambda d: TransportError(d, "connection refused"),
        ]

        class Client:
            def get_json(self, destination: str, path: str, **kwargs: Any) -> Any:
                return fail(outcomes.pop(0)(destination))

        keyring = Keyring(self.clock, self.store, Client())
        self.assertEqual(self.get(keyring), {})  # 1 min
        self.clock.advance(60)
        self.assertEqual(self.get(keyring), {})  # refused by the client: 10 s
        self.clock.advance(10)
        self.assertEqual(self.get(keyring), {})  # fails again: 2 min
        self.assertEqual(outcomes, [])
        self.assertEqual(keyring._backoff["remote.example"].delay_ms, 120_000)

    def test_no_backoff_when_our_request_was_sent_late(self) -> None:
        """A fetch whose request timed out having waited for its turn (sent with less than
        half its time left: ``TransportError.waited``, not ``not_sent``) backs the server
        off neither in the keyring nor directly: the next lookup fetches at once."""
        self.assert_no_backoff_after(
            TransportError(
                "remote.example", "timed out after 60 s, 40.0 s of them waiting", waited=True
            )
        )

    def test_no_backoff_when_our_resolver_was_busy(self) -> None:
        """A fetch that timed out only because our address lookups waited for a resolver
        thread (``TransportError.resolver_busy``) backs the server off no more than the
        client does: the next lookup fetches at once; a failure of its own then backs it off
        a minute, and its keys are found once it answers."""
        keyring = self.keyring_failing_first(
            TransportError("remote.example", "timed out after 60 s (...)", resolver_busy=True),
            TransportError("remote.example", "timed out after 60 s (...)", resolver_busy=True),
            TransportError("remote.example", "timed out after 60 s"),
        )
        for fetches in (1, 2):
            self.assertEqual(self.get(keyring), {})
            self.assertEqual((keyring.fetches, keyring._backoff), (fetches, {}))
        self.assertEqual(self.get(keyring), {})
        self.assertEqual(keyring._backoff["remote.example"].delay_ms, 60_000)
        self.assertEqual(self.get(keyring), {})
        self.assertEqual(keyring.fetches, 3)
        self.clock.advance(60)
        self.assertIn(self.key_id, self.get(keyring))
        self.assertEqual(keyring.fetches, 4)

    def test_no_backoff_when_our_request_was_not_sent(self) -> None:
        """A fetch whose request was not sent for want of our own resources (the client's
        ``TransportError.not_sent``: out of file descriptors, EMFILE) backs the server off
        neither in the keyring nor directly: the next lookup fetches at once, and finds its
        keys."""
        self.assert_no_backoff_after(
            TransportError(
                "remote.example", "not sent: out of file descriptors (EMFILE)", not_sent=True
            )
        )

    def test_backoff_over_after_clock_steps_back(self) -> None:
        """A back-off set "after" now (the wall clock stepped back since) is over: the server
        is asked again, not only once the clock has caught up."""
        self.assertEqual(self.get(server="dead.example"), {})
        self.clock.rightNow -= 3600
        self.get(server="dead.example")
        self.assertEqual(self.federation.count("dead.example"), 2)
        self.get(server="dead.example")  # the new back-off holds
        self.assertEqual(self.federation.count("dead.example"), 2)

    def test_unknown_key_id_does_not_back_off_the_server(self) -> None:
        """Naming a server with a made-up key ID (anyone can) does not back that server off:
        it is asked again after 5 s, so a key it really rotates to is found."""
        self.assertEqual(
            self.successResultOf(
                self.keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
            ),
            {},
        )
        rotated = make_key("r2")
        self.federation.add_key_server(self.clock, "remote.example", [rotated])
        self.clock.advance(5)
        keys = self.successResultOf(
            self.keyring.get_server_keys("remote.example", [key_id_of(rotated)], NOW_MS)
        )
        self.assertIn(key_id_of(rotated), keys)
        self.assertEqual(self.federation.count("remote.example"), 2)

    def test_new_key_asked_in_the_pause_waits_for_its_end(self) -> None:
        """A made-up key ID (anyone can send one every 5 s) does not keep a server's new key
        from being found: asked within the pause that answer set, it waits for the pause to
        end and gets the key from the one fetch made then; the made-up key ID asked again is
        answered at once, without a fetch."""
        made_up = self.keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
        self.assertEqual(self.successResultOf(made_up), {})
        rotated = make_key("r2")
        self.federation.add_key_server(self.clock, "remote.example", [rotated])
        self.clock.advance(2)
        new = self.keyring.get_server_keys("remote.example", [key_id_of(rotated)], NOW_MS)
        again = self.keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
        self.assertEqual(self.successResultOf(again), {})
        self.assertNoResult(new)
        self.clock.advance(2.999)
        self.assertNoResult(new)
        self.assertEqual(self.federation.count("remote.example"), 1)
        self.clock.advance(0.001)
        keys = self.successResultOf(new)
        self.assertEqual(keys[key_id_of(rotated)].verify_key, verify_key_of(rotated))
        self.assertEqual(self.federation.count("remote.example"), 2)

    def test_lookups_in_the_pause_share_one_fetch_at_its_end(self) -> None:
        """Lookups of key IDs not asked yet, all within one pause, wait for it to end and share
        one fetch then, which sets the next pause: at most one fetch per pause, whatever is
        asked."""
        self.successResultOf(
            self.keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
        )
        rotated = make_key("r2")
        self.federation.add_key_server(self.clock, "remote.example", [rotated])
        waiting = [
            self.keyring.get_server_keys("remote.example", [f"ed25519:made_up{n}"], NOW_MS)
            for n in range(10)
        ]
        self.clock.advance(1)
        both = self.keyring.get_server_keys(
            "remote.example", [key_id_of(rotated), "ed25519:made_up0"], NOW_MS
        )
        real = self.keyring.get_server_keys("remote.example", [key_id_of(rotated)], NOW_MS)
        for ask in [*waiting, both, real]:
            self.assertNoResult(ask)
        self.clock.advance(4)
        for ask in waiting:
            self.assertEqual(self.successResultOf(ask), {})
        self.assertEqual(list(self.successResultOf(both)), [key_id_of(rotated)])
        self.assertIn(key_id_of(rotated), self.successResultOf(real))
        self.assertEqual(self.federation.count("remote.example"), 2)
        later = self.keyring.get_server_keys("remote.example", ["ed25519:made_up10"], NOW_MS)
        self.assertNoResult(later)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(later), {})
        self.assertEqual(self.federation.count("remote.example"), 3)

    def test_key_ids_waiting_for_the_pause_bounded(self) -> None:
        """At most 64 key IDs wait for a server's pause to end; a lookup that would add more is
        answered at once with what memory has, as before."""
        self.successResultOf(
            self.keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
        )
        waiting = [
            self.keyring.get_server_keys("remote.example", [f"ed25519:made_up{n}"], NOW_MS)
            for n in range(63)
        ]
        over = self.keyring.get_server_keys(
            "remote.example", ["ed25519:made_up63", "ed25519:made_up64"], NOW_MS
        )
        self.assertEqual(self.successResultOf(over), {})
        waiting.append(
            self.keyring.get_server_keys(
                "remote.example", ["ed25519:made_up0", "ed25519:made_up63"], NOW_MS
            )
        )
        full = self.keyring.get_server_keys("remote.example", [self.key_id, "ed25519:x"], NOW_MS)
        self.assertEqual(self.successResultOf(full), {self.key_id: mock.ANY})
        for ask in waiting:
            self.assertNoResult(ask)
        self.clock.advance(5)
        for ask in waiting:
            self.assertEqual(self.successResultOf(ask), {})
        self.assertEqual(self.federation.count("remote.example"), 2)

    def test_cancelled_pause_waiter_does_not_cancel_the_fetch(self) -> None:
        """A caller waiting for the pause to end that gives up (its request abandoned) does not
        cancel the fetch made then for the others, nor does it if it was the only one."""
        from twisted.internet.defer import CancelledError

        self.successResultOf(
            self.keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
        )
        rotated = make_key("r2")
        self.federation.add_key_server(self.clock, "remote.example", [rotated])
        first = self.keyring.get_server_keys("remote.example", [key_id_of(rotated)], NOW_MS)
        second = self.keyring.get_server_keys("remote.example", [key_id_of(rotated)], NOW_MS)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.clock.advance(5)
        self.assertIn(key_id_of(rotated), self.successResultOf(second))
        self.assertEqual(self.federation.count("remote.example"), 2)
        self.clock.advance(5)  # past the pause that fetch set
        self.successResultOf(
            self.keyring.get_server_keys("remote.example", ["ed25519:bogus2"], NOW_MS)
        )
        lone = self.keyring.get_server_keys("remote.example", ["ed25519:made_up"], NOW_MS)
        lone.cancel()
        self.failureResultOf(lone, CancelledError)
        self.assertEqual(self.federation.count("remote.example"), 3)
        self.clock.advance(5)
        self.assertEqual(self.federation.count("remote.example"), 4)

    def test_close_ends_the_pause_waits(self) -> None:
        """Closing the keyring (the service stopping) answers the lookups waiting for a
        pause to end with what memory holds, and leaves no timer on the reactor (a
        trial test of an embedding would find it dirty); nothing is fetched after."""
        self.successResultOf(
            self.keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
        )
        waiting = self.keyring.get_server_keys("remote.example", ["ed25519:r2"], NOW_MS)
        self.assertNoResult(waiting)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.keyring.close()
        self.assertEqual(self.successResultOf(waiting), {})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(5)
        self.assertEqual(self.federation.count("remote.example"), 1)

    def test_pause_lookup_cancelled_by_an_earlier_ones_caller_at_close(self) -> None:
        """Three lookups wait for a pause to end; the first one's caller, answered by the
        close, cancels the second: the second fails with CancelledError, the third is still
        answered, and close() raises nothing."""
        self.successResultOf(
            self.keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
        )
        first, second, third = (
            self.keyring.get_server_keys("remote.example", ["ed25519:r2"], NOW_MS) for _ in range(3)
        )
        self.assertEqual(len(self.keyring._pause_waits["remote.example"].waiters), 3)
        first.addCallback(lambda keys: (second.cancel(), keys)[1])
        self.keyring.close()
        self.assertEqual(self.successResultOf(first), {})
        self.failureResultOf(second, CancelledError)
        self.assertEqual(self.successResultOf(third), {})

    def test_failure_after_an_answer_backs_off_a_full_minute(self) -> None:
        """A server that answered without the key asked (a 5 s pause) and then fails outright
        is backed off for the 1 min minimum, not for twice the 5 s pause."""
        self.assertEqual(
            self.successResultOf(
                self.keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
            ),
            {},
        )
        self.clock.advance(5)
        del self.federation.servers["remote.example"]

        def ask() -> dict[str, Any]:
            return self.successResultOf(
                self.keyring.get_server_keys("remote.example", ["ed25519:r2"], NOW_MS)
            )

        self.assertEqual(ask(), {})
        self.assertEqual(self.federation.count("remote.example"), 2)
        self.clock.advance(59)
        self.assertEqual(ask(), {})
        self.assertEqual(self.federation.count("remote.example"), 2)
        self.clock.advance(1)
        ask()
        self.assertEqual(self.federation.count("remote.example"), 3)

    def test_key_document_over_the_cap_refused(self) -> None:
        """A key document listing more than 64 keys is refused with a log line, none of its
        keys kept; the server answered, so it is asked again after 5 s, not backed off."""
        self.federation.servers["big.example"] = CannedResource(
            200, many_keys_document("big.example", 40, 25)
        )
        with capturedLogs() as events:
            keys = self.successResultOf(
                self.keyring.get_server_keys("big.example", ["ed25519:k0"], NOW_MS)
            )
        self.assertEqual(keys, {})
        self.assertEqual(self.store.keys, {})
        self.assertEqual(self.keyring.cached_keys("big.example"), {})
        self.assertIn(
            "Refused the keys big.example sent: KeyFetchError: key document lists 65 keys, "
            "more than 64",
            [formatEvent(event) for event in events],
        )
        self.clock.advance(5)
        self.successResultOf(self.keyring.get_server_keys("big.example", ["ed25519:k0"], NOW_MS))
        self.assertEqual(self.federation.count("big.example"), 2)

    def test_each_spelling_fetched_and_backed_off_on_its_own(self) -> None:
        """Fetches in flight and back-offs are per name as fetched: a fetch can fail for one
        spelling where the server's own succeeds (see the tests below), so spellings of one
        dead server cost a fetch each (the cap on fetches in flight bounds them), and each
        is backed off on its own."""
        from twisted.internet.defer import Deferred

        variants = ["dead.example", "DEAD.example", "dead.example:08448", "dead.example:8448"]
        gate: Deferred[None] = Deferred()
        for name in variants:
            self.federation.hold[name] = gate
        asked = [self.keyring.get_server_keys(name, [self.key_id], NOW_MS) for name in variants]
        asked.append(self.keyring.get_server_keys("DEAD.example", [self.key_id], NOW_MS))
        self.assertEqual(sorted(self.keyring._inflight), sorted(variants))
        gate.callback(None)
        for answer in asked:
            self.assertEqual(self.successResultOf(answer), {})
        self.assertEqual(len(self.federation.calls), 4)
        self.federation.hold.clear()
        for name in variants:
            self.assertEqual(self.get(server=name), {})
        self.assertEqual(len(self.federation.calls), 4)
        self.assertEqual(sorted(self.keyring._backoff), sorted(variants))

    def test_other_spellings_of_a_live_server_do_not_stop_its_lookups(self) -> None:
        """A forged origin (or signer) naming a live server in another spelling, which reaches
        the same server (another case, its port with a leading zero, its IPv6 literal not in
        RFC 5952 form), gets the server's document naming it as it spells itself, refused:
        that spelling is paused, not the server, whose lookups fetch at once, right after
        and however often the forgery is repeated."""
        spellings = [
            ("remote.example", "REMOTE.example"),
            ("remote.example:8448", "remote.example:08448"),
            ("[2a01:4f8::1]", "[2a01:04f8::1]"),
            ("[2a01:4f8::1]:8448", "[2a01:4f8:0:0:0:0:0:1]:08448"),
        ]
        for real, variant in spellings:
            self.federation.add_key_server(self.clock, real, [self.remote_key])
            self.federation.servers[variant] = self.federation.servers[real]
            self.assertEqual(self.get(server=variant), {})
            self.assertIn(self.key_id, self.get(server=real), real)
            self.assertEqual(self.federation.count(real), 1, real)
            self.assertEqual(self.get(server=variant), {})
            self.assertEqual(self.federation.count(variant), 1, variant)
        self.assertNotIn("remote.example", failure_backoffs(self.keyring))

    def test_name_ending_in_a_dot_never_fetched(self) -> None:
        """A server name whose host ends in a dot (``remote.example.``, valid by the grammar, or
        ``remote.example.:8448``) can never be fetched: TLS checks it against the certificate
        of ``remote.example`` and fails (and discovery's too). Named by a forged request, its
        lookups find nothing and fetch nothing, not even for the sender's answer check:
        ``remote.example`` is neither backed off nor paused, and is fetched at once, however
        often the forgery is repeated."""
        for _ in range(6):
            for server in ("remote.example.", "remote.example.:8448"):
                self.assertEqual(self.get(server=server), {})
            for server in ("Remote.Example.", "Remote.Example.:443"):
                self.assertEqual(
                    self.successResultOf(
                        self.keyring.get_server_keys(
                            server, [self.key_id], NOW_MS, ignore_backoff=True
                        )
                    ),
                    {},
                )
            self.clock.advance(61)
        self.assertEqual(
            (self.federation.calls, self.keyring._backoff, self.keyring.fetches), ([], {}, 0)
        )
        self.assertIn(self.key_id, self.get())

    def test_forged_dotted_origin_does_not_stop_a_refresh_through_the_client(self) -> None:
        """Through the federation client (``remote.example.`` unreachable, as TLS makes it): a
        peer whose stored key needs its daily refresh is refreshed at once after forged
        lookups of ``remote.example.``, and 30, 59 and 61 s later."""
        peers = FakePeersAgent({"remote.example": self.federation.servers["remote.example"]})
        client = FederationClient(self.clock, "local.example", make_key("l1"), agent=peers)
        keyring = Keyring(self.clock, self.store, client)

        def current() -> list[str]:
            now_ms = int(self.clock.seconds() * 1000)
            lookup = keyring.get_server_keys("remote.example", [self.key_id], now_ms)
            peers.flush()
            keys = self.successResultOf(lookup)
            return [kid for kid, key in keys.items() if (key.valid_until_ts or 0) >= now_ms]

        self.assertEqual(current(), [self.key_id])
        self.clock.advance(DAY_MS / 1000 + 1)
        for step in (0, 30, 29, 2):
            self.clock.advance(step)
            now_ms = int(self.clock.seconds() * 1000)
            forged = keyring.get_server_keys("remote.example.", [self.key_id], now_ms)
            peers.flush()
            self.assertEqual(self.successResultOf(forged), {})
            self.assertEqual(current(), [self.key_id])
        self.assertEqual((client._backoff, failure_backoffs(keyring)), ({}, {}))

    def test_case_variant_does_not_back_off_the_server(self) -> None:
        """Naming a live server in other case gets its answer, refused (its server_name is
        spelled otherwise), but does not back the server off for more than 5 s."""
        self.federation.servers["REMOTE.example"] = self.federation.servers["remote.example"]
        self.assertEqual(self.get(server="REMOTE.example"), {})
        rotated = make_key("r2")
        self.federation.add_key_server(self.clock, "remote.example", [rotated])
        self.clock.advance(5)
        keys = self.successResultOf(
            self.keyring.get_server_keys("remote.example", [key_id_of(rotated)], NOW_MS)
        )
        self.assertIn(key_id_of(rotated), keys)

    def test_error_answers_back_off_as_the_client_judges(self) -> None:
        """A key server answering 401, 429 or 5xx is backed off (1 min); one answering another
        4xx is up and asked again after 5 s, as the federation client judges the same answers."""
        peers = FakePeersAgent()
        answers = {
            "gone.example": (404, "M_NOT_FOUND"),
            "unauth.example": (401, "M_UNAUTHORIZED"),
            "limited.example": (429, "M_LIMIT_EXCEEDED"),
            "broken.example": (502, "M_UNKNOWN"),
        }
        resources = {}
        for name, (status, errcode) in answers.items():
            resources[name] = CannedResource(status, {"errcode": errcode, "error": "no"})
            peers.add_peer(name, resources[name])
        client = FederationClient(self.clock, "local.example", make_key("l1"), agent=peers)
        keyring = Keyring(self.clock, self.store, client)
        for name in answers:
            self.assertEqual(self.get(keyring, server=name), {})
        self.clock.advance(5)
        for name in answers:
            self.assertEqual(self.get(keyring, server=name), {})
        asked = {name: len(resource.requests) for name, resource in resources.items()}
        self.assertEqual(
            asked,
            {"gone.example": 2, "unauth.example": 1, "limited.example": 1, "broken.example": 1},
        )
        self.clock.advance(55)
        for name in answers:
            self.get(keyring, server=name)
        self.assertEqual([len(resource.requests) for resource in resources.values()], [3, 2, 2, 2])

    def test_invalid_key_ids_neither_fetched_nor_kept(self) -> None:
        """Key IDs that are not valid ed25519 key IDs (over 255 characters, other characters,
        another algorithm) can never verify anything: they are not looked for, so they cause
        no fetch and are not kept in the back-off table (a v1 invite's event-ID server can be
        made to name 60 key IDs of 1000 characters each)."""
        longest = "ed25519:" + "a" * 247
        invalid = ["ed25519:" + "a" * 248, "ed25519:" + "A" * 1000, "ed25519:a-b", "other:a"]
        self.assertEqual(
            self.successResultOf(self.keyring.get_server_keys("gone.example", invalid, NOW_MS)),
            {},
        )
        self.assertEqual((self.federation.calls, self.keyring._backoff), ([], {}))
        self.assertIn(self.key_id, self.get())
        keys = self.successResultOf(
            self.keyring.get_server_keys("remote.example", [self.key_id, *invalid], NOW_MS)
        )
        self.assertEqual(list(keys), [self.key_id])
        self.assertEqual(self.federation.count("remote.example"), 1)
        self.clock.advance(5)  # past the pause that fetch set
        self.assertEqual(
            self.successResultOf(
                self.keyring.get_server_keys("remote.example", [longest, *invalid], NOW_MS)
            ),
            {},
        )
        self.assertEqual(self.federation.count("remote.example"), 2)
        self.assertEqual(self.keyring._backoff["remote.example"].asked, {longest})

    def test_ended_pauses_forgotten(self) -> None:
        """The pause after an answer without the key asked is forgotten once over (with the key
        IDs that fetch asked for), at the latest when a later fetch ends: it would change
        nothing. A failure's back-off is kept past its end, to double the next."""
        names = [f"s{n}.example" for n in range(20)]
        for name in names:
            self.federation.add_key_server(self.clock, name, [self.remote_key])
            made_up = [f"ed25519:made_up{n}" for n in range(60)]
            self.successResultOf(self.keyring.get_server_keys(name, made_up, NOW_MS))
        self.get(server="dead.example")
        self.assertEqual(len(self.keyring._backoff), 21)
        self.clock.advance(4)
        self.get(server="dead2.example")
        self.assertEqual(len(self.keyring._backoff), 22)
        self.clock.advance(1)
        self.successResultOf(
            self.keyring.get_server_keys("remote.example", ["ed25519:made_up"], NOW_MS)
        )
        self.assertEqual(
            sorted(self.keyring._backoff), ["dead.example", "dead2.example", "remote.example"]
        )
        self.clock.advance(120)
        self.get(server="dead.example")  # a second failure: doubled
        self.assertEqual(self.keyring._backoff["dead.example"].delay_ms, 120_000)
        self.assertEqual(sorted(self.keyring._backoff), ["dead.example", "dead2.example"])

    def test_backoff_table_bounded(self) -> None:
        """Back-offs for many (attacker-chosen) names are pruned once they run out."""
        import federation_invite.keyring as keyring_module

        self.patch(keyring_module, "_BACKOFF_TABLE_SIZE", 10)
        for n in range(25):
            self.get(server=f"dead{n}.example")
            self.clock.advance(61)
        self.assertLessEqual(len(self.keyring._backoff), 10)

    def test_direct_backoff_table_bounded(self) -> None:
        """The direct key server back-offs (set by every failure of a server's own request)
        are bounded as the fetch back-offs are: past ``_BACKOFF_TABLE_SIZE`` names, at most
        that many are kept, the newest among them."""
        import federation_invite.keyring as keyring_module

        self.patch(keyring_module, "_BACKOFF_TABLE_SIZE", 10)
        for n in range(25):
            self.get(server=f"dead{n}.example")
            self.assertIn(f"dead{n}.example", self.keyring._direct_backoff)
            self.assertLessEqual(len(self.keyring._direct_backoff), 10)
            self.clock.advance(61)
        self.assertEqual(self.federation.count("dead24.example"), 1)

    def test_direct_backoff_not_set_for_our_own_failures(self) -> None:
        """Neither a timeout while our address lookups waited for a resolver thread
        (``resolver_busy``) nor the client's refusal (``BackoffError``) sets the server's
        direct back-off: neither is its failure; a failure of its own then does (1 min)."""
        clock = self.clock
        failures: list[Exception] = [
            TransportError("remote.example", "timed out after 60 s (...)", resolver_busy=True),
            BackoffError("remote.example", NOW_S + 1, 3, NOW_S),
            TransportError("remote.example", "connection refused"),
        ]

        class Failing:
            def get_json(self, destination: str, path: str, **kwargs: Any) -> Any:
                return fail(failures.pop(0))

        keyring = Keyring(clock, self.store, Failing())
        self.assertEqual(self.get(keyring), {})  # resolver busy
        self.assertEqual((keyring.fetches, keyring._direct_backoff), (1, {}))
        self.assertEqual(self.get(keyring), {})  # refused by the client
        self.assertEqual((keyring.fetches, keyring._direct_backoff), (2, {}))
        self.clock.advance(5)
        self.assertEqual(self.get(keyring), {})  # the server's own failure
        self.assertEqual((keyring.fetches, failures), (3, []))
        direct = keyring._direct_backoff["remote.example"]
        self.assertEqual((direct.until_ms, direct.delay_ms), (NOW_MS + 5_000 + 60_000, 60_000))

    def test_full_backoff_table_keeps_the_longest_waits(self) -> None:
        """A full table forgets the back-offs that end soonest, not all of them: names that
        fail once each (anyone can send many) cannot wipe a long back-off."""
        import federation_invite.keyring as keyring_module

        self.patch(keyring_module, "_BACKOFF_TABLE_SIZE", 4)
        for wait in (60, 120, 240):
            self.get(server="dead.example")
            self.clock.advance(wait)
        self.get(server="dead.example")  # the fourth failure: 8 min
        for n in range(20):
            self.get(server=f"dead{n}.example")
            self.clock.advance(1)
        self.assertEqual(
            sorted(self.keyring._backoff),
            ["dead.example", "dead17.example", "dead18.example", "dead19.example"],
        )
        self.clock.advance(480 - 21)
        self.get(server="dead.example")
        self.assertEqual(self.federation.count("dead.example"), 4)
        self.clock.advance(1)
        self.get(server="dead.example")
        self.assertEqual(self.federation.count("dead.example"), 5)

    def test_full_backoff_table_keeps_doubling(self) -> None:
        """A failing server whose back-off is over keeps doubling it when the table is full
        (making room for it does not forget its own entry first)."""
        import federation_invite.keyring as keyring_module

        self.patch(keyring_module, "_BACKOFF_TABLE_SIZE", 4)
        self.get(server="dead.example")
        self.clock.advance(60)
        self.get(server="dead.example")  # 2 min
        for n in range(3):
            self.get(server=f"dead{n}.example")
        self.clock.advance(120)
        self.get(server="dead.example")  # 4 min
        self.assertEqual(self.federation.count("dead.example"), 3)
        self.clock.advance(239)
        self.get(server="dead.example")
        self.assertEqual(self.federation.count("dead.example"), 3)
        self.clock.advance(1)
        self.get(server="dead.example")
        self.assertEqual(self.federation.count("dead.example"), 4)

    def test_memory_keeps_servers_being_fetched(self) -> None:
        """A server whose fetch awaits the store write is not dropped by loads of others meanwhile
        (the fetch and its callers then read its keys from memory)."""
        from twisted.internet.defer import Deferred

        import federation_invite.keyring as keyring_module

        self.patch(keyring_module, "_MEMORY_SIZE", 4)
        for n in range(8):
            self.federation.add_key_server(self.clock, f"s{n}.example", [self.remote_key])
            self.get(server=f"s{n}.example")
        keyring = Keyring(self.clock, self.store, self.federation)
        write: Deferred[None] = Deferred()
        store_server_keys = self.store.store_server_keys
        self.patch(self.store, "store_server_keys", lambda records: write)
        fetched = keyring.get_server_keys("remote.example", [self.key_id], NOW_MS)
        self.patch(self.store, "store_server_keys", store_server_keys)
        for n in range(8):
            self.assertIn(self.key_id, self.get(keyring, server=f"s{n}.example"))
        self.assertLessEqual(len(keyring._memory), 5)
        write.callback(None)
        self.assertIn(self.key_id, self.successResultOf(fetched))
        self.assertEqual(keyring.fetches, 1)

    def test_backoff_reset_on_success(self) -> None:
        """Once the server answers again, its back-off is over: only the 5 s pause after an
        answer is left, and a failure after it backs off from the 1 min minimum again."""
        self.get(server="flaky.example")
        self.clock.advance(61)
        self.get(server="flaky.example")
        self.assertEqual(self.keyring._backoff["flaky.example"].delay_ms, 120_000)
        self.clock.advance(121)
        self.federation.add_key_server(self.clock, "flaky.example", [self.remote_key])
        self.assertIn(self.key_id, self.get(server="flaky.example"))
        self.assertEqual(failure_backoffs(self.keyring), {})
        self.assertEqual(self.keyring._backoff["flaky.example"].delay_ms, 5_000)
        del self.federation.servers["flaky.example"]
        self.clock.advance(5)
        self.get(server="flaky.example", valid_at=NOW_MS + 2 * DAY_MS)  # a refresh, failed
        self.assertEqual(self.federation.count("flaky.example"), 4)
        self.assertEqual(self.keyring._backoff["flaky.example"].delay_ms, 60_000)

    def test_invalid_server_name_not_fetched(self) -> None:
        """An invalid server name is never fetched."""
        self.assertEqual(self.get(server="bad name"), {})
        self.assertEqual(self.federation.calls, [])

    def test_store_write_failure_is_not_fatal(self) -> None:
        """Keys that were fetched and checked are used even if storing them fails."""
        self.store.fail_writes = True
        self.assertIn(self.key_id, self.get())

    def fail_store_reads(self) -> None:
        self.patch(
            self.store,
            "get_server_keys",
            lambda *args, **kwargs: fail(StoreError("get_server_keys", "database is locked")),
        )

    def test_store_read_failure_fails_the_ask_by_default(self) -> None:
        """A failing store read fails the ask with the StoreError and fetches nothing: inbound
        requests answer it 500 M_UNKNOWN (README, "What an invite must pass", row 20)."""
        self.fail_store_reads()
        failure = self.failureResultOf(
            self.keyring.get_server_keys("remote.example", [self.key_id], NOW_MS), StoreError
        )
        self.assertEqual(str(failure.value), "get_server_keys failed: database is locked")
        self.assertEqual(self.federation.calls, [])

    def test_store_read_failure_can_fall_back_to_fetching(self) -> None:
        """With fetch_if_store_fails=True a failing store read is logged (the store's error,
        no key) and the keys are fetched as if none were stored."""
        self.fail_store_reads()
        with capturedLogs() as events:
            keys = self.successResultOf(
                self.keyring.get_server_keys(
                    "remote.example", [self.key_id], NOW_MS, fetch_if_store_fails=True
                )
            )
        self.assertEqual(keys[self.key_id].verify_key, verify_key_of(self.remote_key))
        self.assertEqual(self.federation.count("remote.example"), 1)
        [warning] = [event for event in events if event["log_level"] is LogLevel.warn]
        self.assertEqual(
            formatEvent(warning),
            "Could not read the stored keys of remote.example, fetching them: "
            "StoreError: get_server_keys failed: database is locked",
        )

    def rotate(self, expired_ts: int) -> Any:
        """remote.example moves self.remote_key to old_verify_keys (expired at ``expired_ts``)
        and signs with a new key, which it returns."""
        from federation_invite.config import OldKey

        new_key = make_key("r2")
        old = OldKey(self.key_id, encode_verify_key(verify_key_of(self.remote_key)), expired_ts)
        self.federation.add_key_server(self.clock, "remote.example", [new_key], old_keys=[old])
        return new_key

    def test_rotation_turns_the_cached_key_old(self) -> None:
        """After a rotation, the refetch turns the key in memory old, as in the store: an event
        sent before the key expired verifies, from memory as after a restart, one sent after
        does not."""
        from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
        from federation_invite.core.signing import key_valid_for_event

        v10 = KNOWN_ROOM_VERSIONS["10"]
        self.get()  # current, valid until NOW_MS + 1 day
        self.clock.advance(5 * DAY_MS // 1000)
        rotated_ms = NOW_MS + 5 * DAY_MS
        self.rotate(expired_ts=rotated_ms)
        self.clock.advance(5 * DAY_MS // 1000)
        sent_ms = NOW_MS + 3 * DAY_MS  # after the first validity, before the rotation
        key = self.get(valid_at=sent_ms)[self.key_id]
        self.assertEqual((key.valid_until_ts, key.expired_ts), (None, rotated_ms))
        self.assertEqual(self.keyring.cached_keys("remote.example")[self.key_id], key)
        restarted = Keyring(self.clock, self.store, self.federation)
        self.assertEqual(self.get(restarted, valid_at=sent_ms)[self.key_id], key)
        for keyring_key in (key, restarted.cached_keys("remote.example")[self.key_id]):
            self.assertTrue(key_valid_for_event(v10, keyring_key, sent_ms))
            self.assertFalse(key_valid_for_event(v10, keyring_key, rotated_ms + 1))
        self.assertEqual(self.federation.count("remote.example"), 2)

    def test_old_key_listed_current_again_is_fetched(self) -> None:
        """An old key is final only up to its expired_ts: a lookup needing it valid later
        fetches (as Synapse, which keeps an old key as valid until its expired_ts), so a server
        that rolled a rotation back and lists the key as current again gets it used as current,
        in memory and in the store. Lookups up to expired_ts (bound included) need no fetch."""
        self.get()
        self.clock.advance(2 * DAY_MS // 1000)
        rotated_ms = NOW_MS + 2 * DAY_MS
        self.rotate(expired_ts=rotated_ms)
        key = self.get(valid_at=rotated_ms)[self.key_id]
        self.assertEqual((key.valid_until_ts, key.expired_ts), (None, rotated_ms))
        self.assertEqual(self.federation.count("remote.example"), 2)
        self.clock.advance(DAY_MS // 1000)
        self.assertEqual(self.get(valid_at=rotated_ms)[self.key_id], key)
        self.assertEqual(self.federation.count("remote.example"), 2)
        # The rotation rolled back: K1 is current again.
        self.federation.add_key_server(self.clock, "remote.example", [self.remote_key])
        now_ms = NOW_MS + 3 * DAY_MS
        key = self.get(valid_at=now_ms)[self.key_id]
        self.assertEqual((key.valid_until_ts, key.expired_ts), (now_ms + DAY_MS, None))
        self.assertEqual(self.federation.count("remote.example"), 3)
        stored = self.store.keys[("remote.example", self.key_id)]
        self.assertEqual((stored.valid_until_ts, stored.expired_ts), (now_ms + DAY_MS, None))
        restarted = Keyring(self.clock, self.store, self.federation)
        self.assertEqual(self.get(restarted, valid_at=now_ms)[self.key_id], key)
        self.assertEqual(self.federation.count("remote.example"), 3)

    def test_old_key_refetched_after_a_restart(self) -> None:
        """An old key in the store only (after a restart) is fetched when needed valid after its
        expired_ts, and found current if the server lists it so again."""
        self.get()
        self.clock.advance(2 * DAY_MS // 1000)
        rotated_ms = NOW_MS + 2 * DAY_MS
        self.rotate(expired_ts=rotated_ms)
        self.get(valid_at=rotated_ms)
        self.federation.add_key_server(self.clock, "remote.example", [self.remote_key])
        restarted = Keyring(self.clock, self.store, self.federation)
        self.assertEqual(
            self.get(restarted, valid_at=rotated_ms)[self.key_id].expired_ts, rotated_ms
        )
        self.assertEqual(self.federation.count("remote.example"), 2)
        key = self.get(restarted, valid_at=rotated_ms + 1)[self.key_id]
        self.assertEqual((key.valid_until_ts, key.expired_ts), (rotated_ms + DAY_MS, None))
        self.assertEqual(self.federation.count("remote.example"), 3)

    def test_old_key_lookups_past_its_expiry_fetch_once_per_pause(self) -> None:
        """Lookups needing an old key valid after its expired_ts (requests signed with it, anyone
        can send them) while the server still lists it as old cost one fetch per 5 s pause:
        the first fetches, those within the pause get the old key at once, the next after it
        fetches again."""
        rotated_ms = NOW_MS + 1000
        self.rotate(expired_ts=rotated_ms)
        self.assertEqual(self.get()[self.key_id].expired_ts, rotated_ms)
        self.assertEqual(self.federation.count("remote.example"), 1)
        self.clock.advance(5)  # past the pause that fetch set
        now_ms = NOW_MS + 5000
        for _ in range(3):
            key = self.get(valid_at=now_ms)[self.key_id]
            self.assertEqual(key.expired_ts, rotated_ms)
        self.assertEqual(self.federation.count("remote.example"), 2)
        self.clock.advance(4.999)
        self.get(valid_at=now_ms)
        self.assertEqual(self.federation.count("remote.example"), 2)
        self.clock.advance(0.001)
        self.assertEqual(self.get(valid_at=now_ms)[self.key_id].expired_ts, rotated_ms)
        self.assertEqual(self.federation.count("remote.example"), 3)
        self.assertEqual(self.keyring._backoff["remote.example"].delay_ms, 5_000)

    def test_store_read_keeps_a_later_fetch(self) -> None:
        """A store read never replaces a key in memory with an earlier fetch's answer (the
        store may lag behind memory: a failed write, another worker): memory's "old" copy of
        a rotated-out key is not replaced by the store's earlier "current" one."""
        self.get()
        self.clock.advance(2 * DAY_MS // 1000)
        self.rotate(expired_ts=NOW_MS + DAY_MS)
        self.store.fail_writes = True  # the store keeps the first fetch: current
        now_ms = int(self.clock.seconds() * 1000)
        self.assertEqual(self.get(valid_at=now_ms)[self.key_id].expired_ts, NOW_MS + DAY_MS)
        # Only the key IDs memory does not answer are read from the store: the old key asked
        # for after its expiry is one, and within the pause of the fetch that turned it old
        # the lookup is answered from memory, no fetch.
        reads = self.store.reads
        keys = self.get(valid_at=now_ms)
        self.assertEqual(self.store.reads, reads + 1)
        self.assertEqual(self.federation.count("remote.example"), 2)
        self.assertIsNone(self.store.keys[("remote.example", self.key_id)].expired_ts)
        self.assertEqual(keys[self.key_id].expired_ts, NOW_MS + DAY_MS)
        self.assertEqual(
            self.keyring.cached_keys("remote.example")[self.key_id].expired_ts, NOW_MS + DAY_MS
        )

    def test_undecodable_stored_key_skipped(self) -> None:
        """A stored key that does not decode (a corrupt row) is skipped with a warning, when a
        lookup asks for it (only the key IDs asked for are read): as if it were not stored, it
        is fetched; the server's other stored keys are still used, without a fetch."""
        from federation_invite.store import ServerKeyRecord

        published = encode_verify_key(verify_key_of(self.remote_key))
        self.successResultOf(
            self.store.store_server_keys(
                [
                    ServerKeyRecord(
                        "remote.example",
                        "ed25519:bad",
                        "AAAA",
                        NOW_MS + DAY_MS,
                        None,
                        NOW_MS,
                        "remote.example",
                    ),
                    ServerKeyRecord(
                        "remote.example",
                        self.key_id,
                        published,
                        NOW_MS + DAY_MS,
                        None,
                        NOW_MS,
                        "remote.example",
                    ),
                ]
            )
        )
        with capturedLogs() as events:
            keys = self.get()
        self.assertEqual(keys[self.key_id].verify_key, verify_key_of(self.remote_key))
        self.assertEqual([formatEvent(event) for event in events], [])
        self.assertEqual(self.federation.calls, [])
        with capturedLogs() as events:
            keys = self.successResultOf(
                self.keyring.get_server_keys("remote.example", ["ed25519:bad", self.key_id], NOW_MS)
            )
        self.assertEqual(keys[self.key_id].verify_key, verify_key_of(self.remote_key))
        self.assertEqual(self.keyring.cached_keys("remote.example").keys(), {self.key_id})
        self.assertIn(
            "Ignoring an undecodable stored key ed25519:bad of remote.example",
            [formatEvent(event) for event in events],
        )
        self.assertEqual(self.federation.count("remote.example"), 1)

    def test_key_fetched_while_our_clock_ran_ahead_is_replaced(self) -> None:
        """A key fetched while our clock ran ahead (its fetched_ts now in the future) is
        replaced by the next fetch once the clock is set right, in memory and in the store,
        rather than outliving every fresh answer until the clock catches up."""
        ours = make_clock()
        ours.advance(30 * DAY_MS // 1000)
        store = MemoryKeyStore(ours)
        keyring = Keyring(ours, store, self.federation)
        self.get(keyring)  # fetched_ts 30 days ahead; valid until NOW_MS + 1 day
        ours.rightNow = float(NOW_S)  # NTP sets our clock right
        for clock in (ours, self.clock):
            clock.advance(2 * DAY_MS // 1000)
        now_ms = NOW_MS + 2 * DAY_MS
        self.assertEqual(
            self.get(keyring, valid_at=now_ms)[self.key_id].valid_until_ts, now_ms + DAY_MS
        )
        self.assertEqual(store.keys[("remote.example", self.key_id)].fetched_ts, now_ms)
        restarted = Keyring(ours, store, self.federation)
        self.assertEqual(
            self.get(restarted, valid_at=now_ms)[self.key_id].valid_until_ts, now_ms + DAY_MS
        )
        self.assertEqual(self.federation.count("remote.example"), 2)

    def test_local_old_keys(self) -> None:
        """local_verify_keys gives our signing key and each configured old key (with its
        expired_ts): the keyring answers both for our name, without a request."""
        from federation_invite.config import OldKey
        from federation_invite.keyring import local_verify_keys

        ours, old = make_key("me2"), make_key("me1")
        old_entry = OldKey(key_id_of(old), encode_verify_key(verify_key_of(old)), NOW_MS - DAY_MS)
        keyring = Keyring(
            self.clock,
            self.store,
            self.federation,
            local_keys=local_verify_keys("me.example", ours, [old_entry]),
        )
        keys = self.successResultOf(
            keyring.get_server_keys("me.example", [key_id_of(ours), key_id_of(old)], 0)
        )
        self.assertEqual(
            {k: (v.verify_key, v.valid_until_ts, v.expired_ts) for k, v in keys.items()},
            {
                key_id_of(ours): (verify_key_of(ours), 2**53 - 1, None),
                key_id_of(old): (verify_key_of(old), None, NOW_MS - DAY_MS),
            },
        )
        self.assertEqual((self.federation.calls, self.store.reads), ([], 0))

    def keyring_with_local_key(self) -> tuple[Keyring, Any]:
        """A keyring that also holds our own key (server me.example), and that key."""
        from .support import local_verify_key

        ours = make_key("me")
        keyring = Keyring(
            self.clock,
            self.store,
            self.federation,
            local_keys=[local_verify_key("me.example", ours)],
        )
        return keyring, ours

    def test_local_keys_never_fetched(self) -> None:
        """Our own keys are answered from memory without any request."""
        keyring, ours = self.keyring_with_local_key()
        keys = self.successResultOf(
            keyring.get_server_keys("me.example", [key_id_of(ours)], NOW_MS)
        )
        self.assertEqual(keys[key_id_of(ours)].verify_key, verify_key_of(ours))
        self.assertEqual(self.federation.calls, [])

    def test_known_server_keys_answers_from_memory_only(self) -> None:
        """known_server_keys answers as get_server_keys would when memory suffices (our own keys,
        a fetched key still valid at the time asked), else None, without fetching or reading."""
        self.assertIsNone(self.keyring.known_server_keys("remote.example", [self.key_id], NOW_MS))
        self.assertEqual((self.federation.calls, self.store.reads), ([], 0))
        fetched = self.get()
        self.assertEqual(
            self.keyring.known_server_keys("remote.example", [self.key_id], NOW_MS), fetched
        )
        later = NOW_MS + DAY_MS + 1  # past the fetched key's valid_until_ts: a refetch
        self.assertIsNone(self.keyring.known_server_keys("remote.example", [self.key_id], later))
        self.assertIsNone(self.keyring.known_server_keys("remote.example", ["ed25519:x"], NOW_MS))
        keyring, ours = self.keyring_with_local_key()
        self.assertEqual(
            keyring.known_server_keys("me.example", [key_id_of(ours), "ed25519:x"], later),
            {key_id_of(ours): keyring.cached_keys("me.example")[key_id_of(ours)]},
        )
        self.assertEqual(self.federation.count("remote.example"), 1)

    def test_memory_bounded(self) -> None:
        """Beyond the bound, the least recently loaded servers are dropped from memory (never our
        own keys) and are answered from the store again, without a fetch, when next asked for."""
        import federation_invite.keyring as keyring_module

        self.patch(keyring_module, "_MEMORY_SIZE", 10)
        keyring, ours = self.keyring_with_local_key()
        for n in range(25):
            self.federation.add_key_server(self.clock, f"s{n}.example", [self.remote_key])
            self.assertIn(self.key_id, self.get(keyring, server=f"s{n}.example"))
            self.assertLessEqual(len(keyring._memory), 10)
        self.assertIn(key_id_of(ours), keyring.cached_keys("me.example"))
        self.assertIn(self.key_id, keyring.cached_keys("s24.example"))
        self.assertEqual(keyring.cached_keys("s0.example"), {})
        reads = self.store.reads
        self.assertIn(self.key_id, self.get(keyring, server="s0.example"))
        self.assertEqual(self.store.reads, reads + 1)
        self.assertEqual(self.federation.count("s0.example"), 1)
        self.assertEqual(keyring.fetches, 25)
        keys = self.successResultOf(
            keyring.get_server_keys("me.example", [key_id_of(ours)], NOW_MS)
        )
        self.assertEqual(keys[key_id_of(ours)].verify_key, verify_key_of(ours))

    def test_memory_evicts_down_to_half_the_bound(self) -> None:
        """Memory holds up to its bound; one server more drops the least recently loaded down
        to half the bound at once (amortised O(1) per load), not one at a time."""
        import federation_invite.keyring as keyring_module

        self.patch(keyring_module, "_MEMORY_SIZE", 4)
        for n in range(4):
            self.federation.add_key_server(self.clock, f"s{n}.example", [self.remote_key])
            self.get(server=f"s{n}.example")
        self.assertEqual(len(self.keyring._memory), 4)
        self.federation.add_key_server(self.clock, "s4.example", [self.remote_key])
        self.get(server="s4.example")
        self.assertEqual(list(self.keyring._memory), ["s3.example", "s4.example"])

    def test_memory_keeps_servers_waiting_for_their_pause(self) -> None:
        """A server with lookups waiting for its pause to end is not dropped by loads of
        others meanwhile (its fetch then counts as a refresh, and its waiters keep its keys);
        dropped servers leave nothing behind (their fetched_ts too)."""
        import federation_invite.keyring as keyring_module

        self.patch(keyring_module, "_MEMORY_SIZE", 4)
        self.get()
        waiting = self.keyring.get_server_keys("remote.example", ["ed25519:next"], NOW_MS)
        self.assertNoResult(waiting)
        for n in range(8):
            self.federation.add_key_server(self.clock, f"s{n}.example", [self.remote_key])
            self.get(server=f"s{n}.example")
        self.assertIn(self.key_id, self.keyring.cached_keys("remote.example"))
        self.assertLessEqual(set(self.keyring._fetched_ts), set(self.keyring._memory))
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(waiting), {})
        self.assertEqual(self.federation.count("remote.example"), 2)

    def test_lookup_in_a_pause_whose_store_read_ends_after_close(self) -> None:
        """A lookup in a server's pause whose store read completes after ``close()`` is
        answered with what memory holds at once: no pause wait (whose end would fetch on a
        closed keyring, and the lookup never be answered) and no timer left."""
        self.assertEqual(
            self.successResultOf(
                self.keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
            ),
            {},
        )  # answered without the key: the 5 s pause
        gate: Deferred[None] = Deferred()
        read = self.store.get_server_keys
        self.patch(
            self.store,
            "get_server_keys",
            lambda *args, **kwargs: gate.addCallback(lambda _: read(*args, **kwargs)),
        )
        other = self.keyring.get_server_keys("remote.example", ["ed25519:other"], NOW_MS)
        self.keyring.close()
        gate.callback(None)
        self.assertEqual(self.successResultOf(other), {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closed_while_storing_records_no_pause(self) -> None:
        """A fetch closed while it awaits its store write (no client request to cancel) ends
        recording nothing: no pause, no back-off; its lookup fails with KeyringClosed."""
        write: Deferred[None] = Deferred()
        self.patch(self.store, "store_server_keys", lambda records: write)
        lookup = self.keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
        self.keyring.close()
        self.failureResultOf(lookup, KeyringClosed)
        write.callback(None)
        self.assertEqual((self.keyring._backoff, self.keyring._direct_backoff), ({}, {}))
        self.assertEqual(self.keyring._inflight, {})


class _FreshKeyIdsClient:
    """A hostile key server: each fetch of its document lists 64 key IDs never listed before
    (one private key under all of them, one signature), as reviewed in bounds.md, finding 1."""

    def __init__(self, clock: Any, server_name: str) -> None:
        self.clock = clock
        self.server_name = server_name
        self.key = make_key("a")
        self.published = encode_verify_key(verify_key_of(self.key))
        self.listed = 0
        self.fetches = 0

    def next_key_id(self) -> str:
        """A key ID the next fetch will list, not listed yet: what each forged request names."""
        return f"ed25519:k{self.listed + 1}"

    def get_json(self, destination: str, path: str, **kwargs: Any) -> Deferred[Any]:
        self.fetches += 1
        base, self.listed = self.listed, self.listed + 64
        document = {
            "server_name": destination,
            "valid_until_ts": int(self.clock.seconds() * 1000) + DAY_MS,
            "verify_keys": {
                ("ed25519:a" if n == 0 else f"ed25519:k{base + n}"): {"key": self.published}
                for n in range(64)
            },
        }
        return succeed(sign_json(document, destination, self.key))

    def post_json(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        raise AssertionError("no notaries configured")


class KeyMemoryBoundTests(SynchronousTestCase):
    """The keys held in memory per server are bounded, and so are the fetches lookups of key
    IDs we do not hold can cause (bounds review, finding 1)."""

    def setUp(self) -> None:
        self.clock = make_clock()
        self.store = MemoryKeyStore()

    def test_fresh_key_ids_per_fetch_keep_memory_and_fetches_bounded(self) -> None:
        """The reviewer's attack: 600 lookups 10 ms apart, each naming a key ID we do not hold
        that the server lists at its next fetch (64 fresh ones per fetch; each lookup used to
        cost a fetch and 63 keys more in memory). One fetch per 5 s pause (the lookups within
        it wait for its end), at most 64 keys of that name in memory, every lookup answered
        with the key it named."""
        client = _FreshKeyIdsClient(self.clock, "evil.example")
        keyring = Keyring(self.clock, self.store, client)
        lookups = []
        for _ in range(600):
            key_id = client.next_key_id()
            lookups.append((key_id, keyring.get_server_keys("evil.example", [key_id], NOW_MS)))
            self.clock.advance(0.01)
        self.clock.advance(5)
        for key_id, lookup in lookups:
            self.assertEqual(list(self.successResultOf(lookup)), [key_id])
        # At 0 s, then at the end of each pause: 5 s (the lookups of 0.01-4.99 s) and 10 s
        # (those of 5.00-5.99 s).
        self.assertEqual((client.fetches, keyring.fetches), (3, 3))
        self.assertEqual(len(keyring.cached_keys("evil.example")), 64)
        self.assertEqual(len(keyring._fetched_ts["evil.example"]), 64)
        self.assertEqual(keyring.fetch_failures, 0)

    def test_restart_loads_only_the_key_ids_asked_for(self) -> None:
        """A name with thousands of stored keys (listed over time) costs a fresh keyring (a
        restart, an eviction) only the keys a lookup asks for: answered from the store, no
        fetch, the others left there."""
        client = _FreshKeyIdsClient(self.clock, "evil.example")
        keyring = Keyring(self.clock, self.store, client)
        for _ in range(40):
            self.successResultOf(
                keyring.get_server_keys("evil.example", [client.next_key_id()], NOW_MS)
            )
            self.clock.advance(5)
        self.assertEqual(sum(1 for name, _ in self.store.keys if name == "evil.example"), 2521)
        restarted = Keyring(self.clock, self.store, client)
        keys = self.successResultOf(
            restarted.get_server_keys("evil.example", ["ed25519:k1", "ed25519:k2000"], NOW_MS)
        )
        self.assertEqual(set(keys), {"ed25519:k1", "ed25519:k2000"})
        self.assertEqual(set(restarted.cached_keys("evil.example")), set(keys))
        self.assertEqual((client.fetches, restarted.fetches), (40, 0))

    def test_rotations_with_memory_bounded(self) -> None:
        """A legitimate server rotating its key 70 times (the old key moved to old_verify_keys,
        the last 3 listed): each new key is found by the first lookup naming it (one rotated to
        within 5 s of the last fetch waits for that pause to end); memory keeps at most 64 of
        its keys, and a key long rotated out, dropped from memory, is still answered from the
        store for an event sent before it expired, without a fetch."""
        from federation_invite.config import OldKey

        federation = FakeFederation()
        keyring = Keyring(self.clock, self.store, federation)
        signing = [make_key(f"r{n}") for n in range(71)]
        old: list[OldKey] = []
        expired = []
        for n, key in enumerate(signing):
            if n:
                now_ms = int(self.clock.seconds() * 1000)
                previous = signing[n - 1]
                old.append(
                    OldKey(key_id_of(previous), encode_verify_key(verify_key_of(previous)), now_ms)
                )
                expired.append(now_ms)
            federation.add_key_server(self.clock, "remote.example", [key], old_keys=old[-3:])
            lookup = keyring.get_server_keys("remote.example", [key_id_of(key)], NOW_MS)
            if n == 70:  # rotated 1 s after the last fetch: waits for its pause to end
                self.assertNoResult(lookup)
                self.clock.advance(4)
            keys = self.successResultOf(lookup)
            self.assertEqual(keys[key_id_of(key)].verify_key, verify_key_of(key))
            self.assertLessEqual(len(keyring.cached_keys("remote.example")), 64)
            self.clock.advance(6 if n < 69 else 1)
        self.assertEqual(federation.count("remote.example"), 71)
        held = keyring.cached_keys("remote.example")
        self.assertEqual(len(held), 64)
        self.assertEqual(held[key_id_of(signing[69])].expired_ts, expired[69])
        self.assertNotIn(key_id_of(signing[0]), held)
        first = key_id_of(signing[0])
        keys = self.successResultOf(keyring.get_server_keys("remote.example", [first], expired[0]))
        self.assertEqual(
            (keys[first].verify_key, keys[first].expired_ts),
            (verify_key_of(signing[0]), expired[0]),
        )
        self.assertEqual(federation.count("remote.example"), 71)


class NotaryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = make_clock()
        self.store = MemoryKeyStore()
        self.federation = FakeFederation()
        self.remote_key = make_key("r1")
        self.key_id = key_id_of(self.remote_key)
        self.notary_key = make_key("n1")
        document = server_keys_document("down.example", [self.remote_key], [], NOW_MS, DAY_MS)
        self.notary = NotaryQuery("notary.example", self.notary_key, {"down.example": document})
        from federation_invite.service import build_site_root
        from federation_invite.web.tree import build_matrix_tree

        matrix = build_matrix_tree(MatrixResource(), {(b"key", b"v2", b"query"): self.notary})
        self.federation.servers["notary.example"] = build_site_root(matrix)

    def keyring(self, notary_key: Any = None) -> Keyring:
        key = notary_key or self.notary_key
        notary = Notary(
            "notary.example", ((key_id_of(key), encode_verify_key(verify_key_of(key))),)
        )
        return Keyring(self.clock, self.store, self.federation, notaries=[notary])

    def test_notary_fallback(self) -> None:
        """When the server itself is down, its keys come from a notary whose signature holds."""
        keys = self.successResultOf(
            self.keyring().get_server_keys("down.example", [self.key_id], NOW_MS)
        )
        self.assertEqual(keys[self.key_id].verify_key, verify_key_of(self.remote_key))
        self.assertEqual(
            self.notary.queries,
            [{"server_keys": {"down.example": {self.key_id: {"minimum_valid_until_ts": NOW_MS}}}}],
        )
        self.assertEqual(self.store.keys[("down.example", self.key_id)].source, "notary.example")

    def test_notary_not_asked_when_the_server_answered(self) -> None:
        """Notaries are only asked for the keys the server's own answer lacks: a server that
        listed every key asked costs no notary query."""
        self.federation.add_key_server(self.clock, "up.example", [self.remote_key])
        keys = self.successResultOf(
            self.keyring().get_server_keys("up.example", [self.key_id], NOW_MS)
        )
        self.assertIn(self.key_id, keys)
        self.assertEqual(self.notary.queries, [])

    def dead_server_flood(self, with_notary: bool) -> tuple[int, int]:
        """Lookups of a dead server's keys (connection refused) every second for 2 h, through
        the real FederationClient (its own back-off), with or without a notary that answers
        an empty list (as Synapse's does for a server it cannot reach either): the direct
        fetches of the server and the notary queries made."""
        from twisted.web.resource import Resource

        from federation_invite.client.testing import FakePeersAgent

        queries: list[bytes] = []

        class EmptyNotary(Resource):
            isLeaf = True

            def render_POST(self, request: Request) -> bytes:
                queries.append(request.content.read())
                return write_json(request, 200, {"server_keys": []})

        peers = FakePeersAgent({"notary.example": EmptyNotary()})
        client = FederationClient(self.clock, "local.example", make_key("k"), agent=peers)
        key = self.notary_key
        notaries = [
            Notary("notary.example", ((key_id_of(key), encode_verify_key(verify_key_of(key))),))
        ]
        keyring = Keyring(self.clock, self.store, client, notaries=notaries if with_notary else [])
        for _ in range(2 * 3600):
            lookup = keyring.get_server_keys(
                "dead.example", ["ed25519:x"], int(self.clock.seconds() * 1000)
            )
            self.assertEqual(self.successResultOf(lookup), {})
            self.clock.advance(1)
        direct = sum(1 for _, uri, _ in peers.requests if b"//dead.example/" in uri)
        return direct, len(queries)

    def test_dead_server_backed_off_without_notaries(self) -> None:
        """Without notaries, a dead server is asked for its keys after a back-off of 1 min
        doubling up to 1 h (README): at 0, 1, 3, 7, 15, 31 and 63 min, 7 times in 2 h."""
        self.assertEqual(self.dead_server_flood(with_notary=False), (7, 0))

    def test_dead_server_backed_off_with_a_notary_answering(self) -> None:
        """With a notary that answers (an empty list), a dead server is still asked directly
        only after its back-off (1 min doubling up to 1 h: 7 times in 2 h, as without
        notaries), while the notary is asked at most once per 5 s pause (1440 times)."""
        self.assertEqual(self.dead_server_flood(with_notary=True), (7, 1440))

    def test_direct_back_off_when_the_notary_query_waited_for_its_turn(self) -> None:
        """A server refusing connections is backed off directly (1 min) even when the notary
        query that followed timed out waiting for its turn (the notary's key turns all
        taken), through the real FederationClient: the next lookup asks the notary alone, not
        the server; the notary not asked backs nobody off in the keyring (diff3 review)."""
        sent: list[bytes] = []

        class Agent:
            """remote.example refuses connections; notary.example never answers."""

            def request(self, method: bytes, uri: bytes, *args: Any, **kwargs: Any) -> Any:
                sent.append(uri)
                if b"//remote.example" in uri:
                    return fail(ConnectionRefusedError("refused"))
                return Deferred(lambda d: None)

        client = FederationClient(
            self.clock, "origin.example", make_key("k"), agent=Agent(), timeout=60.0
        )
        keyring = Keyring(self.clock, self.store, client, notaries=self.keyring()._notaries)
        for _ in range(8):  # the notary's key turns all taken by queries that hang
            client.post_json(
                "notary.example", "/_matrix/key/v2/query", {"server_keys": {}}, backoff=False
            ).addErrback(lambda f: None)

        def direct() -> int:
            return sum(1 for uri in sent if b"//remote.example" in uri)

        lookup = keyring.get_server_keys("remote.example", [self.key_id], NOW_MS)
        self.clock.advance(61)
        for _ in range(5):
            self.clock.advance(0)
        self.assertEqual(self.successResultOf(lookup), {})
        self.assertEqual(direct(), 1)
        self.assertEqual(keyring._direct_backoff["remote.example"].delay_ms, 60_000)
        self.assertEqual(keyring._backoff, {})
        again = keyring.get_server_keys("remote.example", [self.key_id], NOW_MS)
        self.clock.advance(0)
        self.assertEqual((direct(), keyring.fetches), (1, 2))
        again.addErrback(lambda f: None)

    def test_direct_back_off_decided_by_the_servers_own_request(self) -> None:
        """Whether the server's own key server is backed off is decided by its own request
        alone: refused, it is backed off 1 min whether the notary query after it was not sent
        (EMFILE), sent late and timed out (``waited``) or failed (the keyring's back-off
        then too); not sent itself (EMFILE), it is not, whatever the notary did. A notary
        query or server request not sent sets no keyring back-off."""
        refused = TransportError("remote.example", "connection refused")
        emfile = TransportError("remote.example", "not sent: EMFILE", not_sent=True)
        notary_emfile = TransportError("notary.example", "not sent: EMFILE", not_sent=True)
        notary_waited = TransportError("notary.example", "timed out", waited=True)
        notary_down = TransportError("notary.example", "timed out after 60 s")
        cases = [
            (refused, notary_emfile, True, False),
            (refused, notary_waited, True, False),
            (refused, notary_down, True, True),
            (emfile, notary_down, False, False),
            (emfile, notary_emfile, False, False),
        ]

        class FailingClient:
            def __init__(self, direct: Exception, notary: Exception) -> None:
                self.direct, self.notary = direct, notary

            def get_json(self, destination: str, path: str, **kwargs: Any) -> Any:
                return fail(self.direct)

            def post_json(self, destination: str, path: str, *args: Any, **kwargs: Any) -> Any:
                return fail(self.notary)

        for direct_error, notary_error, direct_backoff, backoff in cases:
            client = FailingClient(direct_error, notary_error)
            keyring = Keyring(self.clock, self.store, client, notaries=self.keyring()._notaries)
            lookup = keyring.get_server_keys("remote.example", [self.key_id], NOW_MS)
            self.assertEqual(self.successResultOf(lookup), {})
            self.assertEqual(
                ("remote.example" in keyring._direct_backoff, "remote.example" in keyring._backoff),
                (direct_backoff, backoff),
                (direct_error.reason, notary_error.reason),
            )

    def test_no_backoff_when_the_notary_query_waited_for_a_resolver_thread(self) -> None:
        """A notary query timing out only while our address lookups waited for a resolver
        thread (``resolver_busy``) backs nobody off, as one not sent: a fetch asking the
        notary alone (the server in its direct back-off) or whose server request was not sent
        sets no keyring back-off nor a direct one (a refused server request still sets its
        direct back-off); a notary really failing still backs the server off (final review)."""
        busy = TransportError(
            "notary.example",
            "timed out after 60 s (address lookups were waiting for a resolver thread)",
            resolver_busy=True,
        )
        notary_down = TransportError("notary.example", "timed out after 60 s")
        refused = TransportError("remote.example", "connection refused")
        emfile = TransportError("remote.example", "not sent: EMFILE", not_sent=True)

        class FailingClient:
            def __init__(self, direct: Exception | None, notary: Exception) -> None:
                self.direct, self.notary = direct, notary

            def get_json(self, destination: str, path: str, **kwargs: Any) -> Any:
                if self.direct is None:
                    raise AssertionError("the server asked in its direct back-off")
                return fail(self.direct)

            def post_json(self, destination: str, path: str, *args: Any, **kwargs: Any) -> Any:
                return fail(self.notary)

        # (server's request, or None: skipped; notary's) -> (direct back-off ms, keyring's)
        cases = [
            (None, busy, 60_000, None),
            (None, notary_down, 60_000, 60_000),
            (emfile, busy, None, None),
            (refused, busy, 60_000, None),
            (refused, notary_down, 60_000, 60_000),
        ]
        for direct_error, notary_error, direct_backoff, backoff in cases:
            client = FailingClient(direct_error, notary_error)
            keyring = Keyring(self.clock, self.store, client, notaries=self.keyring()._notaries)
            if direct_error is None:
                keyring._back_off_direct("remote.example", int(self.clock.seconds() * 1000))
            lookup = keyring.get_server_keys("remote.example", [self.key_id], NOW_MS)
            self.assertEqual(self.successResultOf(lookup), {})
            direct = keyring._direct_backoff.get("remote.example")
            fetch = keyring._backoff.get("remote.example")
            self.assertEqual(
                (
                    None if direct is None else direct.delay_ms,
                    None if fetch is None else fetch.delay_ms,
                ),
                (direct_backoff, backoff),
                (direct_error and direct_error.reason, notary_error.reason),
            )

    def test_direct_back_off_ended_by_the_servers_answer(self) -> None:
        """The back-off of a server's own key server that a notary answered for: within it,
        lookups ask the notary only (once per 5 s pause); the sender's answer check
        (``ignore_backoff``) asks the server anyway; after it, the server is asked again,
        and its answer ends the back-off: a later failure starts again from 1 min."""
        keyring = self.keyring()
        self.notary.by_key_id = True  # the notary answers an empty list for back.example

        def direct() -> int:
            return sum(1 for call in self.federation.calls if call[1] == "back.example")

        def look(**kwargs: Any) -> Any:
            now_ms = int(self.clock.seconds() * 1000)
            return self.successResultOf(
                keyring.get_server_keys("back.example", [self.key_id], now_ms, **kwargs)
            )

        self.assertEqual(look(), {})
        self.assertEqual((direct(), len(self.notary.queries)), (1, 1))
        self.federation.add_key_server(self.clock, "back.example", [self.remote_key])
        self.clock.advance(30)
        self.assertEqual(look(), {})  # the notary only: the server's back-off lasts 1 min
        self.assertEqual((direct(), len(self.notary.queries)), (1, 2))
        self.assertEqual(look(), {})  # within the pause: nobody
        self.assertEqual((direct(), len(self.notary.queries)), (1, 2))
        self.assertIn(self.key_id, look(ignore_backoff=True))
        self.assertEqual((direct(), len(self.notary.queries)), (2, 2))
        # Its answer ended the back-off: when it fails again, 1 min again, not 2.
        del self.federation.servers["back.example"]
        self.clock.advance(10)
        self.assertEqual(
            self.successResultOf(
                keyring.get_server_keys(
                    "back.example", ["ed25519:other"], self.clock.seconds() * 1000
                )
            ),
            {},
        )
        self.assertEqual(direct(), 3)
        self.clock.advance(59)  # the notary only, pausing 5 s
        keyring.get_server_keys("back.example", ["ed25519:other"], self.clock.seconds() * 1000)
        self.assertEqual(direct(), 3)
        self.clock.advance(5)  # pause and the 1 min back-off over (2 min would not be)
        keyring.get_server_keys("back.example", ["ed25519:other"], self.clock.seconds() * 1000)
        self.assertEqual(direct(), 4)

    def back_off_direct_then_rotate(self, keyring: Keyring) -> None:
        """back.example's own key server failed once while the notary answered (an empty
        list): its direct back-off (1 min) runs, its 5 s pause is over; it is back, with
        ``self.remote_key``, which the notary does not have."""
        self.notary.by_key_id = True
        self.assertEqual(
            self.successResultOf(keyring.get_server_keys("back.example", ["ed25519:old"], NOW_MS)),
            {},
        )
        self.assertEqual(self.direct_requests("back.example"), 1)
        self.federation.add_key_server(self.clock, "back.example", [self.remote_key])
        self.clock.advance(10)

    def sender_joining_a_held_notary_query(
        self, keyring: Keyring, server_name: str, key_id: str
    ) -> tuple[Deferred[None], Deferred[Any], Deferred[Any]]:
        """An inbound lookup of ``key_id`` whose fetch's notary query is held, and the sender's
        answer check (``ignore_backoff``) joining it: (the notary's gate, the inbound lookup,
        the sender's)."""
        gate: Deferred[None] = Deferred()
        self.federation.hold["notary.example"] = gate
        now_ms = int(self.clock.seconds() * 1000)
        inbound = keyring.get_server_keys(server_name, [key_id], now_ms)
        sender = keyring.get_server_keys(server_name, [key_id], now_ms, ignore_backoff=True)
        return gate, inbound, sender

    def direct_requests(self, server_name: str) -> int:
        return sum(
            1
            for _, destination, path, _ in self.federation.calls
            if destination == server_name and path == "/_matrix/key/v2/server"
        )

    def test_sender_joining_a_notary_only_fetch_asks_the_server(self) -> None:
        """The sender's answer check (``ignore_backoff``) joining a fetch in flight that skips
        the server (in its direct back-off) and asks the notary alone still gets the server
        asked: once the notary has answered without the key, that fetch asks the server too,
        and the key the server has just signed with is found (one fetch, two notary queries
        in all); the server's answer ends its direct back-off. A lookup joining without
        ``ignore_backoff`` gets no direct request."""
        keyring = self.keyring()
        self.back_off_direct_then_rotate(keyring)
        gate: Deferred[None] = Deferred()
        self.federation.hold["notary.example"] = gate
        now_ms = int(self.clock.seconds() * 1000)
        inbound = keyring.get_server_keys("back.example", [self.key_id], now_ms)
        joining = keyring.get_server_keys("back.example", [self.key_id], now_ms)
        sender = keyring.get_server_keys("back.example", [self.key_id], now_ms, ignore_backoff=True)
        self.assertEqual(self.direct_requests("back.example"), 1)  # the notary first
        del self.federation.hold["notary.example"]
        gate.callback(None)
        for lookup in (inbound, joining, sender):
            keys = self.successResultOf(lookup)
            self.assertIn(self.key_id, keys)
            self.assertEqual(keys[self.key_id].verify_key, verify_key_of(self.remote_key))
        self.assertEqual(self.direct_requests("back.example"), 2)
        self.assertEqual(len(self.notary.queries), 2)
        self.assertEqual(keyring.fetches, 2)
        self.assertNotIn("back.example", keyring._direct_backoff)

    def test_lookup_joining_a_notary_only_fetch_asks_no_server(self) -> None:
        """Without the sender's check, a notary-only fetch stays one: lookups joining it
        (inbound requests, anyone's) never get the server asked within its back-off."""
        keyring = self.keyring()
        self.back_off_direct_then_rotate(keyring)
        gate: Deferred[None] = Deferred()
        self.federation.hold["notary.example"] = gate
        now_ms = int(self.clock.seconds() * 1000)
        lookups = [keyring.get_server_keys("back.example", [self.key_id], now_ms) for _ in range(3)]
        del self.federation.hold["notary.example"]
        gate.callback(None)
        for lookup in lookups:
            self.assertEqual(self.successResultOf(lookup), {})
        self.assertEqual(self.direct_requests("back.example"), 1)
        self.assertEqual(len(self.notary.queries), 2)

    def test_sender_joining_a_notary_only_fetch_gets_the_notarys_key(self) -> None:
        """When the notary's answer has the key, the sender's check joining a notary-only fetch
        costs no direct request: the server is asked only for keys still missing."""
        keyring = self.keyring()
        self.notary.by_key_id = True
        self.assertEqual(
            self.successResultOf(keyring.get_server_keys("down.example", ["ed25519:old"], NOW_MS)),
            {},
        )
        self.clock.advance(10)
        gate, inbound, sender = self.sender_joining_a_held_notary_query(
            keyring, "down.example", self.key_id
        )
        del self.federation.hold["notary.example"]
        gate.callback(None)
        for lookup in (inbound, sender):
            self.assertIn(self.key_id, self.successResultOf(lookup))
        self.assertEqual(self.direct_requests("down.example"), 1)
        self.assertIn("down.example", keyring._direct_backoff)

    def test_lookup_joining_during_the_notary_query_gets_the_notarys_key(self) -> None:
        """A lookup joining a fetch while its notary query is in flight is answered at once
        with its key from the notary's document, though that query did not name it: no
        failure, no pause wait, no second notary query (diffkc review, finding 1)."""
        k1, k2 = self.remote_key, make_key("r2")
        self.notary.documents["down.example"] = server_keys_document(
            "down.example", [k1, k2], [], NOW_MS, DAY_MS
        )
        keyring = self.keyring()
        gate: Deferred[None] = Deferred()
        self.federation.hold["notary.example"] = gate
        first = keyring.get_server_keys("down.example", [key_id_of(k1)], NOW_MS)
        joining = keyring.get_server_keys("down.example", [key_id_of(k2)], NOW_MS)
        del self.federation.hold["notary.example"]
        gate.callback(None)
        self.assertIn(key_id_of(k1), self.successResultOf(first))
        keys = self.successResultOf(joining)
        self.assertEqual(keys[key_id_of(k2)].verify_key, verify_key_of(k2))
        self.assertEqual((len(self.notary.queries), keyring.fetch_failures), (1, 0))

    def test_sender_joining_a_notary_only_fetch_server_still_down(self) -> None:
        """The sender's answer check joining a notary-only fetch, when the server is still
        down: the late direct request fails too and counts as the check's own fetch's
        would, doubling the server's direct back-off (1 min -> 2 min); the fetch, answered
        by the notary without the key, records the 5 s pause only; the lookups get no key."""
        keyring = self.keyring()
        self.notary.by_key_id = True
        self.assertEqual(
            self.successResultOf(keyring.get_server_keys("down.example", ["ed25519:old"], NOW_MS)),
            {},
        )
        self.assertEqual(keyring._direct_backoff["down.example"].delay_ms, 60_000)
        self.clock.advance(10)
        now_ms = int(self.clock.seconds() * 1000)
        gate, inbound, sender = self.sender_joining_a_held_notary_query(
            keyring, "down.example", "ed25519:new"
        )
        self.assertEqual(self.direct_requests("down.example"), 1)  # the notary first
        del self.federation.hold["notary.example"]
        gate.callback(None)
        for lookup in (inbound, sender):
            self.assertEqual(self.successResultOf(lookup), {})
        self.assertEqual(self.direct_requests("down.example"), 2)
        self.assertEqual((len(self.notary.queries), keyring.fetches), (2, 2))
        direct = keyring._direct_backoff["down.example"]
        self.assertEqual((direct.until_ms, direct.delay_ms), (now_ms + 120_000, 120_000))
        pause = keyring._backoff["down.example"]
        self.assertEqual(
            (pause.until_ms, pause.delay_ms, pause.asked),
            (now_ms + 5_000, 5_000, frozenset({"ed25519:new"})),
        )

    def test_sender_joining_a_notary_only_fetch_server_answers_notary_down(self) -> None:
        """The server's own answer, asked for the sender's check after the notary failed, is
        an answer: the fetch ends in the 5 s pause, not a failure's back-off (the server
        would get no key for a minute though it just answered), and the server's direct
        back-off is over."""
        keyring = self.keyring()
        self.back_off_direct_then_rotate(keyring)
        gate, inbound, sender = self.sender_joining_a_held_notary_query(
            keyring, "back.example", "ed25519:other"
        )
        del self.federation.hold["notary.example"]
        del self.federation.servers["notary.example"]  # the notary is down
        gate.callback(None)
        self.assertEqual(self.successResultOf(inbound), {})
        self.assertEqual(self.successResultOf(sender), {})
        self.assertEqual(self.direct_requests("back.example"), 2)
        self.assertEqual(failure_backoffs(keyring), {})
        self.assertIsNotNone(keyring._backoff["back.example"].asked)
        self.assertNotIn("back.example", keyring._direct_backoff)

    def test_no_notary_query_after_close(self) -> None:
        """A fetch closed while it stores the server's answer asks no notary afterwards."""
        self.federation.add_key_server(self.clock, "remote.example", [self.remote_key])
        keyring = self.keyring()
        write: Deferred[None] = Deferred()
        self.patch(self.store, "store_server_keys", lambda records: write)
        lookup = keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
        keyring.close()
        self.failureResultOf(lookup, KeyringClosed)
        write.callback(None)
        self.assertEqual(self.notary.queries, [])
        self.assertEqual(
            [destination for _, destination, _, _ in self.federation.calls], ["remote.example"]
        )

    def test_slow_notary_not_backed_off(self) -> None:
        """A notary slow about one server (it must reach that server itself: a tarpit anyone can
        name) is not backed off in the federation client: invites to its users and lookups of
        other servers still reach it."""
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET

        from federation_invite.client import FederationClient
        from federation_invite.client.testing import FakePeersAgent

        notary = self.notary

        class SlowAboutTarpit(Resource):
            isLeaf = True

            def render(self, request: Request) -> Any:
                if b"tarpit.example" in request.content.getvalue():
                    return NOT_DONE_YET
                request.content.seek(0)
                return notary.render_POST(request)

        peers = FakePeersAgent({"notary.example": SlowAboutTarpit()})
        client = FederationClient(self.clock, "local.example", make_key("k"), agent=peers)
        key = self.notary_key
        keyring = Keyring(
            self.clock,
            self.store,
            client,
            notaries=[
                Notary("notary.example", ((key_id_of(key), encode_verify_key(verify_key_of(key))),))
            ],
        )
        tarpit = keyring.get_server_keys("tarpit.example", ["ed25519:x"], NOW_MS)
        self.clock.advance(60)
        self.assertEqual(self.successResultOf(tarpit), {})
        self.assertNotIn("notary.example", client._backoff)
        keys = self.successResultOf(keyring.get_server_keys("down.example", [self.key_id], NOW_MS))
        self.assertIn(self.key_id, keys)
        self.assertEqual(len(self.notary.queries), 1)

    def test_joined_fetch_looks_for_the_joiners_keys(self) -> None:
        """Callers that joined a fetch for other key IDs have theirs asked of the notary in that
        fetch (here: an old key only a notary still has, and a made-up key ID): one fetch."""
        from twisted.internet.defer import Deferred

        from federation_invite.config import OldKey

        old = make_key("old")
        old_entry = OldKey(key_id_of(old), encode_verify_key(verify_key_of(old)), NOW_MS - DAY_MS)
        self.federation.add_key_server(self.clock, "remote.example", [self.remote_key])
        self.notary.documents["remote.example"] = server_keys_document(
            "remote.example", [self.remote_key], [old_entry], NOW_MS, DAY_MS
        )
        keyring = self.keyring()
        gate: Deferred[None] = Deferred()
        self.federation.hold["remote.example"] = gate
        current = keyring.get_server_keys("remote.example", [self.key_id], NOW_MS)
        retired = keyring.get_server_keys("remote.example", [key_id_of(old)], NOW_MS)
        made_up = keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
        del self.federation.hold["remote.example"]
        gate.callback(None)
        self.assertEqual(
            self.successResultOf(current)[self.key_id].verify_key, verify_key_of(self.remote_key)
        )
        self.assertEqual(
            self.successResultOf(retired)[key_id_of(old)].verify_key, verify_key_of(old)
        )
        self.assertEqual(self.successResultOf(made_up), {})
        self.assertEqual(keyring.fetches, 1)
        # Asked in that fetch: answered at once. Not asked: waits for the 5 s pause to end.
        self.successResultOf(keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS))
        other = keyring.get_server_keys("remote.example", ["ed25519:other"], NOW_MS)
        self.assertNoResult(other)
        self.assertEqual(keyring.fetches, 1)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(other), {})
        self.assertEqual(keyring.fetches, 2)

    def test_notary_answer_without_the_document_is_an_answer(self) -> None:
        """A notary answering without the server's document (it holds none listing the made-up
        key ID asked) answered: with the server down, the server is asked again after 5 s, not
        backed off for a minute, so its real keys are found through the notary."""
        self.notary.by_key_id = True
        keyring = self.keyring()
        made_up = keyring.get_server_keys("down.example", ["ed25519:bogus"], NOW_MS)
        self.assertEqual(self.successResultOf(made_up), {})
        self.assertEqual(len(self.notary.queries), 1)
        self.assertEqual(keyring.fetch_failures, 1)
        self.clock.advance(5)
        keys = self.successResultOf(keyring.get_server_keys("down.example", [self.key_id], NOW_MS))
        self.assertEqual(keys[self.key_id].verify_key, verify_key_of(self.remote_key))
        self.assertEqual(len(self.notary.queries), 2)

    def test_joiners_key_ids_asked_of_the_notary(self) -> None:
        """A caller joining a fetch started for a made-up key ID (the server down) has its own
        key IDs asked of the notary in that fetch: one fetch, one query, the key found."""
        from twisted.internet.defer import Deferred

        self.notary.by_key_id = True
        keyring = self.keyring()
        gate: Deferred[None] = Deferred()
        self.federation.hold["down.example"] = gate
        made_up = keyring.get_server_keys("down.example", ["ed25519:bogus"], NOW_MS)
        real = keyring.get_server_keys("down.example", [self.key_id], NOW_MS)
        del self.federation.hold["down.example"]
        gate.callback(None)
        self.assertEqual(self.successResultOf(made_up), {})
        self.assertEqual(
            self.successResultOf(real)[self.key_id].verify_key, verify_key_of(self.remote_key)
        )
        self.assertEqual(
            self.notary.queries,
            [
                {
                    "server_keys": {
                        "down.example": {
                            "ed25519:bogus": {"minimum_valid_until_ts": NOW_MS},
                            self.key_id: {"minimum_valid_until_ts": NOW_MS},
                        }
                    }
                }
            ],
        )
        self.assertEqual(keyring.fetches, 1)

    def test_joiner_of_an_answered_fetch_gets_the_old_key(self) -> None:
        """The server up, a caller joining a fetch started for a made-up key ID gets the old
        key only the notary still has, though that fetch ends in the 5 s pause: asked in the
        shared fetch, or, when it joined after the notary was asked, in the fetch made when
        that pause ends (not at once: one fetch per pause)."""
        from twisted.internet.defer import Deferred

        old = make_key("old")
        self.federation.add_key_server(self.clock, "remote.example", [self.remote_key])
        self.notary.documents["remote.example"] = server_keys_document(
            "remote.example",
            [old],
            [],
            NOW_MS - 30 * DAY_MS,
            DAY_MS,
        )
        self.notary.by_key_id = True
        for held in ("remote.example", "notary.example"):
            self.notary.queries.clear()
            self.store = MemoryKeyStore()
            keyring = self.keyring()
            gate: Deferred[None] = Deferred()
            self.federation.hold[held] = gate
            made_up = keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
            retired = keyring.get_server_keys("remote.example", [key_id_of(old)], 0)
            del self.federation.hold[held]
            gate.callback(None)
            self.assertEqual(self.successResultOf(made_up), {})
            if held == "notary.example":
                self.assertNoResult(retired)
                self.assertEqual(keyring.fetches, 1)
                self.clock.advance(5)
            self.assertEqual(
                self.successResultOf(retired)[key_id_of(old)].verify_key, verify_key_of(old), held
            )
            asked = [list(query["server_keys"]["remote.example"]) for query in self.notary.queries]
            if held == "remote.example":  # joined before the notary was asked
                self.assertEqual(asked, [["ed25519:bogus", key_id_of(old)]])
                # The made-up key ID's 5 s pause holds for anyone asking it again.
                self.successResultOf(
                    keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
                )
                self.assertEqual(keyring.fetches, 1)
            else:  # joined while the notary was being asked for the made-up key ID
                self.assertEqual(asked, [["ed25519:bogus"], [key_id_of(old)]])
                self.assertEqual(keyring.fetches, 2)

    def test_joined_key_id_asked_valid_at_the_latest_time(self) -> None:
        """Callers wanting one key ID valid at different times share one fetch that asks the
        notary for the latest of them (minimum_valid_until_ts), whatever order they came in."""
        from twisted.internet.defer import Deferred

        self.notary.by_key_id = True
        keyring = self.keyring()
        gate: Deferred[None] = Deferred()
        self.federation.hold["down.example"] = gate
        later = keyring.get_server_keys("down.example", [self.key_id], NOW_MS + 10)
        earlier = keyring.get_server_keys("down.example", [self.key_id], NOW_MS)
        del self.federation.hold["down.example"]
        gate.callback(None)
        for ask in (later, earlier):
            self.assertIn(self.key_id, self.successResultOf(ask))
        self.assertEqual(
            self.notary.queries,
            [
                {
                    "server_keys": {
                        "down.example": {self.key_id: {"minimum_valid_until_ts": NOW_MS + 10}}
                    }
                }
            ],
        )

    def old_key_only_the_notary_has(self) -> Any:
        """remote.example is up and lists its current key; the notary still holds its document
        from 30 days ago, listing the key it has rotated out since, which it returns."""
        old = make_key("old")
        self.federation.add_key_server(self.clock, "remote.example", [self.remote_key])
        self.notary.documents["remote.example"] = server_keys_document(
            "remote.example", [old], [], NOW_MS - 30 * DAY_MS, DAY_MS
        )
        self.notary.by_key_id = True
        return old

    def test_sender_joining_after_the_notary_was_asked_fetches_again_at_once(self) -> None:
        """An ``ignore_backoff`` lookup (the sender's answer check: the server has just answered
        us) joining a fetch after its notary query went out gets one more fetch at once, not
        after the 5 s pause that fetch set: the old key only the notary has is found."""
        from twisted.internet.defer import Deferred

        old = self.old_key_only_the_notary_has()
        keyring = self.keyring()
        gate: Deferred[None] = Deferred()
        self.federation.hold["notary.example"] = gate
        made_up = keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
        retired = keyring.get_server_keys(
            "remote.example", [key_id_of(old)], 0, ignore_backoff=True
        )
        del self.federation.hold["notary.example"]
        gate.callback(None)
        self.assertEqual(self.successResultOf(made_up), {})
        self.assertEqual(
            self.successResultOf(retired)[key_id_of(old)].verify_key, verify_key_of(old)
        )
        self.assertEqual(keyring.fetches, 2)

    def test_key_id_joined_after_the_notary_was_asked_is_not_taken_as_asked(self) -> None:
        """A key ID that joined a fetch after its notary query went out was asked of no notary:
        looked up again within the pause that fetch set, it waits for the pause to end (and is
        found then), rather than being answered at once as a key ID the notary lacks."""
        from twisted.internet.defer import Deferred

        old = self.old_key_only_the_notary_has()
        keyring = self.keyring()
        gate: Deferred[None] = Deferred()
        self.federation.hold["notary.example"] = gate
        keyring.get_server_keys("remote.example", ["ed25519:bogus"], NOW_MS)
        retired = keyring.get_server_keys("remote.example", [key_id_of(old)], 0)
        del self.federation.hold["notary.example"]
        gate.callback(None)
        self.assertNoResult(retired)
        again = keyring.get_server_keys("remote.example", [key_id_of(old)], 0)
        self.assertNoResult(again)
        self.clock.advance(5)
        for ask in (retired, again):
            self.assertEqual(
                self.successResultOf(ask)[key_id_of(old)].verify_key, verify_key_of(old)
            )
        self.assertEqual(keyring.fetches, 2)

    def test_key_id_joined_valid_at_a_later_time_waits_for_the_pause(self) -> None:
        """A caller joining a fetch after its notary query went out, for a key ID that query
        named valid at an earlier time only, was not asked for at its time: it waits for the
        pause that fetch ends in, whose fetch asks the notary for the key valid at its time
        (rather than being answered at once as if the notary had been asked)."""
        from twisted.internet.defer import Deferred

        old = self.old_key_only_the_notary_has()  # valid until 29 days ago
        keyring = self.keyring()
        gate: Deferred[None] = Deferred()
        self.federation.hold["notary.example"] = gate
        earlier = keyring.get_server_keys("remote.example", [key_id_of(old)], 0)
        later = keyring.get_server_keys("remote.example", [key_id_of(old)], NOW_MS)
        del self.federation.hold["notary.example"]
        gate.callback(None)
        self.assertIn(key_id_of(old), self.successResultOf(earlier))
        self.assertNoResult(later)
        self.clock.advance(5)
        self.assertIn(key_id_of(old), self.successResultOf(later))
        self.assertEqual(
            [query["server_keys"]["remote.example"] for query in self.notary.queries],
            [
                {key_id_of(old): {"minimum_valid_until_ts": 0}},
                {key_id_of(old): {"minimum_valid_until_ts": NOW_MS}},
            ],
        )

    def test_joined_key_ids_bounded(self) -> None:
        """Callers joining a fetch add at most 64 key IDs to what the notaries are asked; the
        others wait for the pause it ends in and share the one fetch made then."""
        from twisted.internet.defer import Deferred

        keyring = self.keyring()
        gate: Deferred[None] = Deferred()
        self.federation.hold["down.example"] = gate
        asks = [
            keyring.get_server_keys("down.example", [f"ed25519:bogus{n}"], NOW_MS)
            for n in range(100)
        ]
        del self.federation.hold["down.example"]
        gate.callback(None)
        for ask in asks[:64]:
            self.assertEqual(self.successResultOf(ask), {})
        for ask in asks[64:]:
            self.assertNoResult(ask)
        self.assertEqual(keyring.fetches, 1)
        self.clock.advance(5)
        for ask in asks[64:]:
            self.assertEqual(self.successResultOf(ask), {})
        asked = [len(query["server_keys"]["down.example"]) for query in self.notary.queries]
        self.assertEqual(asked, [64, 36])
        self.assertEqual(keyring.fetches, 2)

    def test_key_ids_waiting_for_the_pause_asked_of_the_notary(self) -> None:
        """The fetch made when a pause ends asks the notaries for every key ID that waited for
        it (the server down, a real key only the notary has is found), in one query."""
        self.notary.by_key_id = True
        keyring = self.keyring()
        made_up = keyring.get_server_keys("down.example", ["ed25519:bogus"], NOW_MS)
        self.assertEqual(self.successResultOf(made_up), {})
        self.clock.advance(1)
        real = keyring.get_server_keys("down.example", [self.key_id], NOW_MS + 1000)
        other = keyring.get_server_keys("down.example", ["ed25519:other"], NOW_MS)
        self.assertNoResult(real)
        self.assertEqual(len(self.notary.queries), 1)
        self.clock.advance(4)
        self.assertEqual(
            self.successResultOf(real)[self.key_id].verify_key, verify_key_of(self.remote_key)
        )
        self.assertEqual(self.successResultOf(other), {})
        self.assertEqual(
            self.notary.queries[1:],
            [
                {
                    "server_keys": {
                        "down.example": {
                            self.key_id: {"minimum_valid_until_ts": NOW_MS + 1000},
                            "ed25519:other": {"minimum_valid_until_ts": NOW_MS},
                        }
                    }
                }
            ],
        )
        self.assertEqual(keyring.fetches, 2)

    def rotated(self) -> tuple[Keyring, Any, Any]:
        """rotated.example rotated K1 out an hour ago (K2 current, K1 old); the notary still
        holds its document from before (K1 current for a day). The keyring has read the
        server's own document: K1 old."""
        from federation_invite.config import OldKey

        k1, k2 = make_key("k1"), make_key("k2")
        self.notary.documents["rotated.example"] = server_keys_document(
            "rotated.example", [k1], [], NOW_MS, DAY_MS
        )
        expired = OldKey(key_id_of(k1), encode_verify_key(verify_key_of(k1)), NOW_MS - 3_600_000)
        self.federation.add_key_server(self.clock, "rotated.example", [k2], old_keys=[expired])
        keyring = self.keyring()
        keys = self.successResultOf(
            keyring.get_server_keys("rotated.example", [key_id_of(k1), key_id_of(k2)], NOW_MS)
        )
        self.assertEqual(keys[key_id_of(k1)].expired_ts, NOW_MS - 3_600_000)
        return keyring, k1, k2

    def test_stale_notary_copy_does_not_undo_a_rotation(self) -> None:
        """A lookup the server cannot answer (a made-up key ID) asks the notary, whose stale
        copy lists K1 as current: K1 stays old, in memory and in the store, so requests
        signed with it stay refused."""
        self.assert_bogus_lookup_keeps_k1_old(server_down=False)

    def test_stale_notary_copy_does_not_undo_a_rotation_with_the_server_down(self) -> None:
        """With the server down, the notary's stale copy listing K1 as current is all the fetch
        gets: K1 still stays old, in memory and in the store."""
        self.assert_bogus_lookup_keeps_k1_old(server_down=True)

    def test_stale_notary_copy_does_not_undo_a_rotation_after_a_restart(self) -> None:
        """After a restart, memory holds only the keys lookups named (K1, stored as old, not
        read): the notary's stale copy listing K1 as current, answering a made-up key ID, is
        not taken into memory either, so a lookup of K1 reads it from the store, still old."""
        _, k1, _ = self.rotated()
        del self.federation.servers["rotated.example"]
        self.clock.advance(10)
        restarted = self.keyring()
        self.successResultOf(restarted.get_server_keys("rotated.example", ["ed25519:bogus"], 0))
        self.assertTrue(self.notary.queries)
        self.assertEqual(restarted.cached_keys("rotated.example"), {})
        sent_ms = NOW_MS - 7_200_000  # an event sent before the rotation
        keys = self.successResultOf(
            restarted.get_server_keys("rotated.example", [key_id_of(k1)], sent_ms)
        )
        self.assertEqual(keys[key_id_of(k1)].expired_ts, NOW_MS - 3_600_000)

    def assert_bogus_lookup_keeps_k1_old(self, server_down: bool) -> None:
        """After the rotation, a made-up key ID's lookup asks the notary and K1 stays old."""
        keyring, k1, _ = self.rotated()
        if server_down:
            del self.federation.servers["rotated.example"]
        self.clock.advance(10)
        self.successResultOf(keyring.get_server_keys("rotated.example", ["ed25519:bogus"], 0))
        self.assertTrue(self.notary.queries)
        self.assertEqual(
            keyring.cached_keys("rotated.example")[key_id_of(k1)].expired_ts, NOW_MS - 3_600_000
        )
        self.assertEqual(
            self.store.keys[("rotated.example", key_id_of(k1))].expired_ts, NOW_MS - 3_600_000
        )

    def test_server_answer_wins_over_the_notary_in_one_fetch(self) -> None:
        """Within one fetch, the keys the server itself listed are not replaced by a notary's
        answer for them (asked for another key): K2 keeps the server's validity."""
        keyring, _, k2 = self.rotated()
        self.notary.documents["rotated.example"] = server_keys_document(
            "rotated.example", [k2], [], NOW_MS, 3 * DAY_MS
        )
        self.clock.advance(10)
        self.successResultOf(keyring.get_server_keys("rotated.example", ["ed25519:bogus"], 0))
        self.assertTrue(self.notary.queries)
        # The server's answer of this fetch (valid for a day from now), not the notary's.
        for held in (
            keyring.cached_keys("rotated.example")[key_id_of(k2)],
            self.store.keys[("rotated.example", key_id_of(k2))],
        ):
            self.assertEqual(held.valid_until_ts, NOW_MS + 10_000 + DAY_MS)

    def test_notary_document_encoded_once(self) -> None:
        """A notary's copy of a key document is encoded to canonical JSON once, for both the
        notary's signature and the server's self-signature."""
        from twisted.internet.defer import succeed

        from federation_invite.core import signing

        document = sign_json(
            self.notary.documents["down.example"], "notary.example", self.notary_key
        )

        class NotaryOnly:
            def get_json(self, destination: str, path: str, **kwargs: Any) -> Any:
                return fail(ConnectionRefusedError(destination))

            def post_json(self, destination: str, path: str, body: Any, **kwargs: Any) -> Any:
                return succeed({"server_keys": [document]})

        notary = Notary(
            "notary.example",
            ((key_id_of(self.notary_key), encode_verify_key(verify_key_of(self.notary_key))),),
        )
        keyring = Keyring(self.clock, self.store, NotaryOnly(), notaries=[notary])
        encoded: list[Any] = []
        real = signing.encode_canonical_json

        def counting(value: Any, **kwargs: Any) -> bytes:
            encoded.append(value)
            return real(value, **kwargs)

        with mock.patch.object(signing, "encode_canonical_json", counting):
            keys = self.successResultOf(
                keyring.get_server_keys("down.example", [self.key_id], NOW_MS)
            )
        self.assertEqual(keys[self.key_id].verify_key, verify_key_of(self.remote_key))
        self.assertEqual(len(encoded), 1)

    def test_notary_bad_signature_refused(self) -> None:
        """A notary answer not signed by the notary key we configured is refused."""
        keyring = self.keyring(notary_key=make_key("other"))
        keys = self.successResultOf(keyring.get_server_keys("down.example", [self.key_id], NOW_MS))
        self.assertEqual(keys, {})
        self.assertEqual(self.store.keys, {})

    def test_notary_copy_not_signed_by_it_skipped(self) -> None:
        """A notary answer holding several documents of the server is judged document by
        document, as Synapse does: a copy without the notary's signature (or with a bad one)
        is skipped with a log line, and the notary-signed copy beside it is used, in either
        order."""
        document = self.notary.documents["down.example"]
        signed = sign_json(document, "notary.example", self.notary_key)
        forged = sign_json(document, "notary.example", make_key("n1"))  # same key ID
        for n, answer in enumerate(([document, signed], [signed, document], [forged, signed])):
            self.store = MemoryKeyStore()
            self.federation.servers["notary.example"] = CannedResource(200, {"server_keys": answer})
            with capturedLogs() as events:
                keys = self.successResultOf(
                    self.keyring().get_server_keys("down.example", [self.key_id], NOW_MS)
                )
            self.assertEqual(keys[self.key_id].verify_key, verify_key_of(self.remote_key), n)
            self.assertEqual(
                self.store.keys[("down.example", self.key_id)].source, "notary.example"
            )
            refused = [
                formatEvent(event)
                for event in events
                if formatEvent(event).startswith("Refused a copy of the keys of down.example")
            ]
            self.assertEqual(len(refused), 1, n)
            self.assertIn("notary signature invalid", refused[0])

    def test_notary_document_with_a_float_refused(self) -> None:
        """A key document is strict canonical JSON (appendices, "Canonical JSON": "Numbers in
        the JSON must be integers in the range [-(2**53)+1, (2**53)-1]"): a notary's copy
        holding a float, signed over its lax encoding by the server and the notary, is refused
        as the notary's signature is checked, none of its keys kept."""
        document = server_keys_document("down.example", [self.remote_key], [], NOW_MS, DAY_MS)
        document["weight"] = 1.5
        document = lax_signed(document, "down.example", self.remote_key)
        signed = lax_signed(document, "notary.example", self.notary_key)
        self.federation.servers["notary.example"] = CannedResource(200, {"server_keys": [signed]})
        with capturedLogs() as events:
            keys = self.successResultOf(
                self.keyring().get_server_keys("down.example", [self.key_id], NOW_MS)
            )
        self.assertEqual(keys, {})
        self.assertEqual(self.store.keys, {})
        self.assertIn(
            "Notary notary.example gave no keys for down.example: KeyFetchError: notary "
            "signature invalid: Signed object has no canonical JSON form: floats are not allowed "
            "in canonical JSON",
            [formatEvent(event) for event in events],
        )

    def test_notary_document_over_the_cap_refused(self) -> None:
        """A notary's copy of a key document listing more than 64 keys is refused too."""
        self.notary.documents["down.example"] = many_keys_document("down.example", 65)
        keys = self.successResultOf(
            self.keyring().get_server_keys("down.example", ["ed25519:k0"], NOW_MS)
        )
        self.assertEqual(keys, {})
        self.assertEqual(self.store.keys, {})

    def test_notary_forged_origin_signature_refused(self) -> None:
        """A notary answer whose origin self-signature is forged is refused."""
        impostor = make_key("r1")  # same key ID, different key
        self.notary.documents["down.example"] = server_keys_document(
            "down.example", [impostor], [], NOW_MS, DAY_MS
        )
        self.notary.documents["down.example"]["verify_keys"] = {
            self.key_id: {"key": encode_verify_key(verify_key_of(self.remote_key))}
        }
        keys = self.successResultOf(
            self.keyring().get_server_keys("down.example", [self.key_id], NOW_MS)
        )
        self.assertEqual(keys, {})

    def test_malformed_or_failed_notary_answer_is_a_failure(self) -> None:
        """A notary answer that is not an object with a server_keys list (key/v2/query), or no
        answer at all, is a failure: with the server down too, it is backed off for the 1 min
        minimum, not asked again after the 5 s pause an answer sets."""
        answers = [
            CannedResource(200, {"server_keys": {}}),
            CannedResource(200, {"server_keys": "down.example"}),
            CannedResource(200, []),
            CannedResource(500, {"errcode": "M_UNKNOWN"}),
        ]
        for n, answer in enumerate(answers):
            self.federation.servers["notary.example"] = answer
            keyring, server = self.keyring(), f"dead{n}.example"
            for wait, fetched in ((0, 1), (5, 1), (55, 2)):
                self.clock.advance(wait)
                keys = keyring.get_server_keys(server, [self.key_id], NOW_MS)
                self.assertEqual(self.successResultOf(keys), {})
                self.assertEqual(self.federation.count(server), fetched, (n, wait))
            self.assertEqual(len(answer.requests), 2)

    def test_other_entries_in_a_notary_answer_skipped(self) -> None:
        """Entries of a notary's server_keys that are not objects, or are documents of other
        servers (not signed by the notary), are skipped before its signature is checked; the
        server's document among them is used."""
        signed = sign_json(self.notary.documents["down.example"], "notary.example", self.notary_key)
        other = server_keys_document("other.example", [make_key("o")], [], NOW_MS, DAY_MS)
        self.federation.servers["notary.example"] = CannedResource(
            200, {"server_keys": [42, other, signed]}
        )
        keys = self.successResultOf(
            self.keyring().get_server_keys("down.example", [self.key_id], NOW_MS)
        )
        self.assertEqual(keys[self.key_id].verify_key, verify_key_of(self.remote_key))


class FetchCapTests(SynchronousTestCase):
    """At most so many key fetches in flight at once, over every server: a lookup needing one
    more (a server whose keys are neither in memory nor in the store) is refused at once,
    429 M_LIMIT_EXCEEDED, without fetching and without backing the server off."""

    def setUp(self) -> None:
        self.clock = make_clock()
        self.store = MemoryKeyStore()
        self.federation = FakeFederation()
        self.key = make_key("r1")
        self.key_id = key_id_of(self.key)
        for name in ("a.example", "b.example", "c.example", "held.example", "stored.example"):
            self.federation.add_key_server(self.clock, name, [self.key])
        self.keyring = Keyring(self.clock, self.store, self.federation, max_fetches_in_flight=2)

    def lookup(self, server: str, keyring: Keyring | None = None, **kwargs: Any) -> Any:
        keyring = keyring or self.keyring
        return keyring.get_server_keys(server, [self.key_id], NOW_MS, **kwargs)

    def fill(self, *servers: str) -> tuple[list[Deferred[None]], list[Any]]:
        """Start a lookup of each of ``servers``, their fetches held: (the gates, the lookups)."""
        gates: list[Deferred[None]] = []
        for server in servers:
            gates.append(Deferred())
            self.federation.hold[server] = gates[-1]
        lookups = [self.lookup(server) for server in servers]
        for server in servers:
            del self.federation.hold[server]
        for lookup in lookups:
            self.assertNoResult(lookup)
        return gates, lookups

    def assertBusy(self, deferred: Any) -> None:
        error = self.failureResultOf(deferred, KeyFetchBusy).value
        self.assertIsInstance(error, MatrixError)
        self.assertEqual(
            (error.http_status, error.errcode, error.to_json()["retry_after_ms"]),
            (429, "M_LIMIT_EXCEEDED", 5000),
        )

    def assertFetchedNow(self, server: str) -> None:
        """A lookup of ``server`` fetches it at once (one request) and finds its key."""
        before = self.federation.count(server)
        self.assertIn(self.key_id, self.successResultOf(self.lookup(server)))
        self.assertEqual(self.federation.count(server), before + 1)

    def test_lookup_beyond_the_cap_refused_at_once(self) -> None:
        """With the cap's fetches in flight, a lookup needing another is refused at once: no
        request, no back-off, no failure counted; the server is fetched once a slot is free."""
        gates, lookups = self.fill("a.example", "b.example")
        self.assertBusy(self.lookup("c.example"))
        self.assertBusy(self.lookup("c.example"))
        self.assertEqual(self.federation.count("c.example"), 0)
        self.assertEqual(self.keyring._backoff, {})
        self.assertEqual((self.keyring.fetches, self.keyring.fetch_failures), (2, 0))
        gates[0].callback(None)
        self.assertIn(self.key_id, self.successResultOf(lookups[0]))
        self.assertFetchedNow("c.example")
        self.assertEqual(failure_backoffs(self.keyring), {})

    def test_default_cap(self) -> None:
        """The default is the README's: 64 fetches in flight."""
        keyring = Keyring(self.clock, self.store, self.federation)
        names = [f"s{n}.example" for n in range(65)]
        gates: list[Deferred[None]] = []
        for name in names:
            self.federation.add_key_server(self.clock, name, [self.key])
            gates.append(Deferred())
            self.federation.hold[name] = gates[-1]
        lookups = [self.lookup(name, keyring) for name in names[:64]]
        self.assertBusy(self.lookup(names[64], keyring))
        self.assertEqual(self.federation.count(names[64]), 0)
        for gate in gates:
            gate.callback(None)
        for lookup in lookups:
            self.assertIn(self.key_id, self.successResultOf(lookup))

    def test_refresh_of_a_stored_server_not_starved_by_unknown_ones(self) -> None:
        """A server whose keys are stored but no longer valid (a key's valid_until_ts passes
        daily) is refreshed from a pool of its own: with the unknown servers' fetches at their
        cap (forged origins on tarpits), its lookup fetches at once, from memory's keys and
        from the store's (after a restart); an unknown server is still refused, 429."""
        self.assertIn(self.key_id, self.successResultOf(self.lookup("stored.example")))
        self.assertIn(self.key_id, self.successResultOf(self.lookup("held.example")))
        self.clock.advance(DAY_MS / 1000 + 1)
        now_ms = NOW_MS + DAY_MS + 1000
        gates, _ = self.fill("a.example", "b.example")
        self.assertBusy(self.lookup("c.example"))
        restarted = Keyring(self.clock, self.store, self.federation, max_fetches_in_flight=2)
        gates += self.fill_in(restarted, "x.example", "y.example")
        for keyring, server in ((self.keyring, "held.example"), (restarted, "stored.example")):
            before = self.federation.count(server)
            keys = self.successResultOf(keyring.get_server_keys(server, [self.key_id], now_ms))
            self.assertEqual(keys[self.key_id].valid_until_ts, now_ms + DAY_MS, server)
            self.assertEqual(self.federation.count(server), before + 1)
        self.assertBusy(self.lookup("c.example"))
        self.assertEqual(self.federation.count("c.example"), 0)

    def test_refresh_pool_capped(self) -> None:
        """Refreshes have a cap of their own (``max_refreshes_in_flight``, 64 by default): past
        it a refresh is refused as any fetch at a cap is (429, no request, no back-off), while
        unknown servers are fetched from theirs; a slot is freed when its fetch ends."""
        keyring = self.refresh_capped_keyring()
        for server in ("a.example", "b.example", "c.example"):
            self.assertIn(self.key_id, self.successResultOf(self.lookup(server, keyring)))
        self.clock.advance(DAY_MS / 1000 + 1)
        now_ms = NOW_MS + DAY_MS + 1000
        gates = self.fill_in(keyring, "a.example", "b.example", valid_at_ms=now_ms)
        refused = keyring.get_server_keys("c.example", [self.key_id], now_ms)
        self.assertBusy(refused)
        self.assertEqual(self.federation.count("c.example"), 1)
        self.assertEqual(failure_backoffs(keyring), {})
        self.assertFalse(keyring._backing_off("c.example"))
        self.assertIn(self.key_id, self.successResultOf(self.lookup("held.example", keyring)))
        gates[0].callback(None)
        keys = self.successResultOf(keyring.get_server_keys("c.example", [self.key_id], now_ms))
        self.assertEqual(keys[self.key_id].valid_until_ts, now_ms + DAY_MS)
        self.assertEqual(Keyring(self.clock, self.store, self.federation)._max_refreshes, 64)
        for keyword in ("max_fetches_in_flight", "max_refreshes_in_flight"):
            with self.assertRaises(ValueError):  # both caps at least 1
                Keyring(self.clock, self.store, self.federation, **{keyword: 0})

    def fill_in(
        self, keyring: Keyring, *servers: str, valid_at_ms: int = NOW_MS
    ) -> list[Deferred[None]]:
        """Start a lookup of each of ``servers`` in ``keyring``, their fetches held: the gates."""
        gates: list[Deferred[None]] = []
        for server in servers:
            gates.append(Deferred())
            self.federation.hold[server] = gates[-1]
            self.assertNoResult(keyring.get_server_keys(server, [self.key_id], valid_at_ms))
            del self.federation.hold[server]
        return gates

    def refresh_capped_keyring(self) -> Keyring:
        """A keyring whose fetches of unknown servers and refreshes are both capped at 2."""
        return Keyring(
            self.clock,
            self.store,
            self.federation,
            max_fetches_in_flight=2,
            max_refreshes_in_flight=2,
        )

    def pause_c_example(self) -> None:
        """``self.keyring`` refresh-capped, with a.example's and b.example's keys stored (the
        pauses their fetches set over) and c.example in the pause a made-up key ID's fetch
        set (its key stored: its next fetch is a refresh)."""
        self.keyring = self.refresh_capped_keyring()
        for server in ("a.example", "b.example"):
            self.assertIn(self.key_id, self.successResultOf(self.lookup(server)))
        self.clock.advance(5)  # past the pauses those fetches set
        self.assertEqual(
            self.successResultOf(
                self.keyring.get_server_keys("c.example", ["ed25519:made_up"], NOW_MS)
            ),
            {},
        )

    def end_the_pause_at_the_cap(self) -> list[Deferred[None]]:
        """Fill the refreshes' pool (a.example and b.example refreshed, their fetches held),
        then let c.example's pause end: the gates of the held fetches."""
        gates = self.fill_in(
            self.keyring, "a.example", "b.example", valid_at_ms=NOW_MS + DAY_MS + 1
        )
        self.clock.advance(5)
        return gates

    def test_keys_held_unaffected(self) -> None:
        """At the cap, keys in memory are answered (without a coroutine: the hot path), and so
        are keys in the store; a lookup joining a fetch in flight costs no slot and waits for
        it; the sender's answer check (``ignore_backoff``) is not refused."""
        self.assertIn(self.key_id, self.successResultOf(self.lookup("held.example")))
        other = Keyring(self.clock, self.store, self.federation)
        self.assertIn(self.key_id, self.successResultOf(self.lookup("stored.example", other)))
        gates, _ = self.fill("a.example", "b.example")
        held = self.lookup("held.example")
        self.assertIn(self.key_id, self.successResultOf(held))
        self.assertIn(self.key_id, self.successResultOf(self.lookup("stored.example")))
        self.assertEqual(self.federation.count("stored.example"), 1)
        joined = self.lookup("a.example")
        self.assertNoResult(joined)
        self.assertIn(
            self.key_id, self.successResultOf(self.lookup("c.example", ignore_backoff=True))
        )
        gates[0].callback(None)
        self.assertIn(self.key_id, self.successResultOf(joined))
        self.assertEqual(self.federation.count("a.example"), 1)

    def test_slot_released_on_failure(self) -> None:
        """A fetch that fails (the server unreachable) frees its slot; only that server is
        backed off."""
        gates, lookups = self.fill("a.example", "b.example")
        gates[0].errback(Unreachable("a.example"))
        self.assertEqual(self.successResultOf(lookups[0]), {})
        self.assertEqual(list(self.keyring._backoff), ["a.example"])
        self.assertFetchedNow("c.example")

    def test_slot_released_on_cancellation(self) -> None:
        """A lookup given up (its request abandoned) leaves the shared fetch running, whose slot
        is freed when it ends; a fetch whose request is cancelled frees its slot too."""
        gates, lookups = self.fill("a.example", "b.example")
        lookups[0].cancel()
        self.failureResultOf(lookups[0], CancelledError)
        self.assertBusy(self.lookup("c.example"))
        gates[0].callback(None)
        self.assertIn(self.key_id, self.keyring.cached_keys("a.example"))
        gates[1].cancel()
        self.assertEqual(self.successResultOf(lookups[1]), {})
        self.assertFetchedNow("c.example")
        self.assertFetchedNow("stored.example")
        self.assertEqual(self.keyring._inflight, {})

    def test_slot_released_on_timeout(self) -> None:
        """A key server that never answers holds its slot until the client's timeout (60 s),
        no longer; discovery, the fetch and the notaries are one slot's work."""
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET

        from federation_invite.service import build_site_root
        from federation_invite.web.tree import build_matrix_tree

        class Tarpit(Resource):
            isLeaf = True

            def render(self, request: Request) -> Any:
                return NOT_DONE_YET

        key_server = KeyServerResource(self.clock, "c.example", [self.key])
        peers = FakePeersAgent(
            {
                "tarpit1.example": Tarpit(),
                "tarpit2.example": Tarpit(),
                "c.example": build_site_root(build_matrix_tree(key_server)),
            }
        )
        client = FederationClient(self.clock, "local.example", make_key("k"), agent=peers)
        keyring = Keyring(self.clock, self.store, client, max_fetches_in_flight=2)
        tarpits = [self.lookup(f"tarpit{n}.example", keyring) for n in (1, 2)]
        self.assertBusy(self.lookup("c.example", keyring))
        self.clock.advance(59)
        self.assertBusy(self.lookup("c.example", keyring))
        self.clock.advance(1)
        for tarpit in tarpits:
            self.assertEqual(self.successResultOf(tarpit), {})
        self.assertIn(self.key_id, self.successResultOf(self.lookup("c.example", keyring)))
        self.assertEqual(keyring._inflight, {})

    def test_pause_over_at_the_cap_refused(self) -> None:
        """Lookups waiting for a server's pause to end, when it ends with its pool's fetches at
        their cap, are refused (429) rather than fetched beyond the cap; the server is not
        backed off for it, and is fetched at once when next asked with a slot free. (The fetch
        that set the pause stored c.example's key: its next is a refresh, and the refreshes'
        pool is the one filled.)"""
        self.pause_c_example()
        waiting = self.keyring.get_server_keys("c.example", ["ed25519:other"], NOW_MS)
        self.assertNoResult(waiting)
        gates = self.end_the_pause_at_the_cap()
        self.assertBusy(waiting)
        self.assertEqual(self.federation.count("c.example"), 1)
        self.assertEqual(self.keyring._pause_waits, {})
        self.assertFalse(self.keyring._backing_off("c.example"))
        gates[0].callback(None)
        self.assertEqual(
            self.successResultOf(
                self.keyring.get_server_keys("c.example", ["ed25519:other"], NOW_MS)
            ),
            {},
        )
        self.assertEqual(self.federation.count("c.example"), 2)

    def test_pause_lookup_cancelled_by_an_earlier_ones_caller_when_busy(self) -> None:
        """Three lookups wait for a pause that ends at the cap; the first one's caller,
        refused, cancels the second: the second fails with CancelledError, the third is
        still refused, and nothing is logged as an error."""
        self.pause_c_example()
        first, second, third = (
            self.keyring.get_server_keys("c.example", ["ed25519:other"], NOW_MS) for _ in range(3)
        )

        def cancel_second(failure: Any) -> Any:
            second.cancel()
            return failure

        first.addErrback(cancel_second)
        self.end_the_pause_at_the_cap()
        self.assertBusy(first)
        self.failureResultOf(second, CancelledError)
        self.assertBusy(third)
        self.assertEqual(self.flushLoggedErrors(), [])


class _RecordingKeyStore(MemoryKeyStore):
    """A MemoryKeyStore that counts the key writes asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def store_server_keys(self, records: Any) -> Deferred[None]:
        self.writes += 1
        return super().store_server_keys(records)


class ClientClosedTests(SynchronousTestCase):
    """``FederationClient.close()`` alone (the keyring left open: the client works after)
    abandoning a key fetch's request at its ``.well-known`` step (``TransportError.abandoned``):
    not the server's failure, so the keyring backs it off no more than the client does."""

    def setUp(self) -> None:
        self.clock = make_clock()
        self.client = FederationClient(self.clock, "local.example", make_key("k"))
        self.hanging = CannedResource(hang=True)
        self.client._resolver._well_known_agent = FakePeersAgent(  # type: ignore[union-attr]
            {"remote.example": self.hanging, "notary.example": self.hanging}
        )
        notary_key = make_key("n")
        notary = Notary(
            "notary.example",
            ((key_id_of(notary_key), encode_verify_key(verify_key_of(notary_key))),),
        )
        self.keyring = Keyring(self.clock, MemoryKeyStore(), self.client, notaries=[notary])

    def lookup(self) -> Deferred[Any]:
        now_ms = int(self.clock.seconds() * 1000)
        return self.keyring.get_server_keys("remote.example", ["ed25519:a"], now_ms)

    def hosts(self) -> list[bytes]:
        """The ``Host`` of each ``.well-known`` fetch made."""
        return [request["host"] for request in self.hanging.requests]

    def test_no_back_off_for_a_fetch_abandoned_by_the_clients_close(self) -> None:
        """The server's request abandoned by the client's close: the lookup gets no key, and
        neither the keyring's back-off nor its direct back-off is set; the next lookup fetches
        again at once (a new ``.well-known`` fetch)."""
        self.keyring = Keyring(self.clock, MemoryKeyStore(), self.client)
        lookup = self.lookup()
        self.assertEqual(len(self.hanging.requests), 1)
        self.assertNoResult(lookup)
        self.successResultOf(self.client.close())
        self.assertEqual(self.successResultOf(lookup), {})
        self.assertEqual((self.keyring._backoff, self.keyring._direct_backoff), ({}, {}))
        self.assertEqual(self.client._backoff, {})
        self.assertEqual(self.keyring.fetches, 1)
        again = self.lookup()
        self.assertNoResult(again)
        self.assertEqual(self.keyring.fetches, 2)
        self.assertEqual(self.hosts(), [b"remote.example", b"remote.example"])
        self.successResultOf(self.client.close())
        self.assertEqual(self.successResultOf(again), {})

    def test_no_back_off_for_a_notary_query_abandoned_by_the_clients_close(self) -> None:
        """A fetch asking the notary alone (the server's own key server in its direct
        back-off) whose notary query is abandoned by the client's close: no back-off is set
        (a notary that did not answer otherwise backs the server off 1 min), and the direct
        back-off is left as it was."""
        now_ms = int(self.clock.seconds() * 1000)
        self.keyring._back_off_direct("remote.example", now_ms)
        direct_backoff = dict(self.keyring._direct_backoff)
        lookup = self.lookup()
        self.assertEqual(self.hosts(), [b"notary.example"])
        self.successResultOf(self.client.close())
        self.assertEqual(self.successResultOf(lookup), {})
        self.assertEqual(self.keyring._backoff, {})
        self.assertEqual(self.keyring._direct_backoff, direct_backoff)

    def test_pause_only_when_a_notary_answers_after_the_servers_request_was_abandoned(
        self,
    ) -> None:
        """The server's request abandoned by the client's close, then a notary answering
        without the key: the fetch records the 5 s pause only (an answer without the key),
        no back-off, and the server's own key server is not backed off."""
        notary = CannedResource(body={"server_keys": []})
        peers = FakePeersAgent({"notary.example": notary})
        federation_agent = self.client._agent

        class Routing:
            """The notary's requests to the fake, the others to the client's own agent."""

            def request(self, method: bytes, uri: bytes, *args: Any, **kwargs: Any) -> Any:
                if uri.partition(b"://")[2].startswith(b"notary.example/"):
                    return peers.request(method, uri, *args, **kwargs)
                return federation_agent.request(method, uri, *args, **kwargs)

        self.client._agent = Routing()  # type: ignore[assignment]
        now_ms = int(self.clock.seconds() * 1000)
        lookup = self.lookup()
        self.assertEqual(self.hosts(), [b"remote.example"])
        self.assertNoResult(lookup)
        self.successResultOf(self.client.close())
        self.assertEqual(self.successResultOf(lookup), {})
        self.assertEqual(len(notary.requests), 1)
        self.assertEqual(self.keyring._direct_backoff, {})
        self.assertEqual(list(self.keyring._backoff), ["remote.example"])
        pause = self.keyring._backoff["remote.example"]
        self.assertEqual(
            (pause.until_ms, pause.delay_ms, pause.asked),
            (now_ms + 5_000, 5_000, frozenset({"ed25519:a"})),
        )
        self.assertEqual(self.client._backoff, {})


class CloseTests(SynchronousTestCase):
    """``Keyring.close()`` (the service stopping) abandons the fetches in flight: their client
    request is cancelled (no timer left, the connection closed), their lookups fail with
    ``KeyringClosed`` (500 ``M_UNKNOWN``), nothing is stored or logged as an error after."""

    def setUp(self) -> None:
        self.clock = make_clock()
        self.store = _RecordingKeyStore()
        self.key_id = "ed25519:a"
        self.server = Tarpit()
        self.notary = Tarpit()
        self.peers = FakePeersAgent({"hang.example": self.server, "notary.example": self.notary})
        client = FederationClient(self.clock, "local.example", make_key("k"), agent=self.peers)
        notary_key = make_key("n")
        notaries = [
            Notary(
                "notary.example",
                ((key_id_of(notary_key), encode_verify_key(verify_key_of(notary_key))),),
            )
        ]
        self.keyring = Keyring(self.clock, self.store, client, notaries=notaries)

    def lookup(self, server: str, key_id: str | None = None) -> Deferred[Any]:
        return self.keyring.get_server_keys(server, [key_id or self.key_id], NOW_MS)

    def assertClosed(self, lookup: Deferred[Any]) -> None:
        error = self.failureResultOf(lookup, KeyringClosed).value
        self.assertEqual((error.http_status, error.errcode), (500, "M_UNKNOWN"))

    def close(self) -> list[Any]:
        """Close the keyring; the events logged meanwhile at warn or above, or failures."""
        with capturedLogs() as events:
            self.keyring.close()
            self.peers.flush()
        return [e for e in events if e["log_level"] >= LogLevel.warn or "log_failure" in e]

    def assertNothingAfter(self) -> None:
        """A lookup after close fails at once, reading and fetching nothing; time passing
        brings no request, no write, no timer."""
        requests, reads = len(self.peers.requests), self.store.reads
        self.assertClosed(self.lookup("other.example"))
        self.clock.advance(3600)
        self.assertEqual((len(self.peers.requests), self.store.reads), (requests, reads))
        self.assertEqual((self.store.writes, self.clock.getDelayedCalls()), (0, []))
        self.assertEqual((self.keyring._inflight, self.keyring._backoff), ({}, {}))

    def test_close_abandons_the_servers_fetch(self) -> None:
        """A fetch whose server never answers, two lookups waiting on it: closing cancels its
        request (its 60 s timer, its connection), both lookups fail with KeyringClosed, no
        notary is asked, and nothing is logged above info."""
        lookups = [self.lookup("hang.example"), self.lookup("hang.example", "ed25519:b")]
        for lookup in lookups:
            self.assertNoResult(lookup)
        self.assertEqual((len(self.server.requests), len(self.clock.getDelayedCalls())), (1, 1))
        self.assertEqual(self.close(), [])
        for lookup in lookups:
            self.assertClosed(lookup)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((self.server.lost, self.notary.requests), (1, []))
        self.assertEqual(self.keyring.fetch_failures, 0)
        self.assertNothingAfter()

    def test_lookup_cancelled_by_an_earlier_ones_caller_at_close(self) -> None:
        """Three lookups share a fetch; the first one's caller, told KeyringClosed, cancels
        the second: the second fails with CancelledError, the third is still told
        KeyringClosed, and close() raises and logs nothing."""
        first, second, third = (self.lookup("hang.example") for _ in range(3))

        def cancel_second(failure: Any) -> Any:
            second.cancel()
            return failure

        first.addErrback(cancel_second)
        self.assertEqual(self.close(), [])
        self.assertClosed(first)
        self.failureResultOf(second, CancelledError)
        self.assertClosed(third)
        self.assertEqual((self.clock.getDelayedCalls(), self.server.lost), ([], 1))

    def test_close_abandons_the_notary_query(self) -> None:
        """A fetch past its server (unreachable) waiting on a notary that never answers: closing
        cancels the notary's query (timer and connection); the lookup fails with KeyringClosed;
        the server is not backed off for it."""
        lookup = self.lookup("down.example")
        self.assertNoResult(lookup)
        self.assertEqual((len(self.notary.requests), len(self.clock.getDelayedCalls())), (1, 1))
        self.assertEqual(self.close(), [])
        self.assertClosed(lookup)
        self.assertEqual((self.clock.getDelayedCalls(), self.notary.lost), ([], 1))
        self.assertEqual(self.keyring.fetch_failures, 0)
        self.assertNothingAfter()

    def test_answer_arriving_as_the_fetch_is_cancelled_not_stored(self) -> None:
        """A key document that arrives as close cancels its fetch (the request answered by
        its cancellation) is neither stored nor kept: the store is closed next."""
        federation = FakeFederation()
        federation.add_key_server(self.clock, "remote.example", [make_key("r1")])
        keyring = Keyring(self.clock, self.store, federation)
        federation.hold["remote.example"] = Deferred(lambda held: held.callback(None))
        lookup = keyring.get_server_keys("remote.example", ["ed25519:r1"], NOW_MS)
        self.assertNoResult(lookup)
        with capturedLogs() as events:
            keyring.close()
        self.assertClosed(lookup)
        self.assertEqual(federation.count("remote.example"), 1)
        self.assertEqual((self.store.writes, self.store.keys), (0, {}))
        self.assertEqual(keyring.cached_keys("remote.example"), {})
        self.assertEqual((keyring._inflight, keyring._backoff), ({}, {}))
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.warn], [])

    def test_cancelled_lookup_left_alone(self) -> None:
        """A lookup given up before the close (its request abandoned) stays cancelled: the
        close's failure is not delivered to it, nor logged as unhandled."""
        lookup = self.lookup("hang.example")
        lookup.cancel()
        self.failureResultOf(lookup, CancelledError)
        self.assertEqual(self.close(), [])
        self.assertEqual((self.clock.getDelayedCalls(), self.server.lost), ([], 1))


class ParseKeyResponseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = make_key("a")
        self.document = server_keys_document("s.example", [self.key], [], NOW_MS, DAY_MS)

    def refused(self, document: Any, server: str = "s.example") -> str:
        return str(
            self.assertRaises(KeyFetchError, parse_key_response, document, server, NOW_MS, "x")
        )

    def with_old_key(self, expired_ts: int) -> dict[str, Any]:
        """The records of a document listing our key and an old one that expired at
        ``expired_ts``, by key ID."""
        from federation_invite.config import OldKey

        old = OldKey("ed25519:old", encode_verify_key(verify_key_of(make_key("old"))), expired_ts)
        document = server_keys_document("s.example", [self.key], [old], NOW_MS, DAY_MS)
        return {r.key_id: r for r in parse_key_response(document, "s.example", NOW_MS, "x")}

    def test_old_keys(self) -> None:
        """old_verify_keys become records with expired_ts and no validity."""
        records = self.with_old_key(5)
        self.assertEqual(
            (records["ed25519:old"].expired_ts, records["ed25519:old"].valid_until_ts), (5, None)
        )
        self.assertEqual(records["ed25519:a"].valid_until_ts, NOW_MS + DAY_MS)

    def test_key_both_current_and_old_is_current(self) -> None:
        """A key ID listed in both verify_keys and old_verify_keys is kept once, as current
        (the current entry wins: a key cannot be both)."""
        from federation_invite.config import OldKey

        old = OldKey("ed25519:a", encode_verify_key(verify_key_of(self.key)), 5)
        document = server_keys_document("s.example", [self.key], [old], NOW_MS, DAY_MS)
        records = parse_key_response(document, "s.example", NOW_MS, "x")
        self.assertEqual(
            [(r.key_id, r.valid_until_ts, r.expired_ts) for r in records],
            [("ed25519:a", NOW_MS + DAY_MS, None)],
        )

    def test_old_key_expired_at_zero_kept(self) -> None:
        """An old key's expired_ts of 0 is a valid timestamp (non-negative): the key is kept."""
        records = self.with_old_key(0)
        self.assertEqual(
            (records["ed25519:old"].expired_ts, records["ed25519:old"].valid_until_ts), (0, None)
        )

    def test_boolean_and_negative_timestamps_refused(self) -> None:
        """JSON true is no integer: a document whose valid_until_ts is true is refused, and
        an old key whose expired_ts is true or negative is skipped (the rest kept)."""
        self.assertIn(
            "no integer valid_until_ts", self.refused({**self.document, "valid_until_ts": True})
        )
        other = encode_verify_key(verify_key_of(make_key("o")))
        document = {k: v for k, v in self.document.items() if k != "signatures"}
        document["old_verify_keys"] = {
            "ed25519:t": {"key": other, "expired_ts": True},
            "ed25519:n": {"key": other, "expired_ts": -1},
            "ed25519:z": {"key": other, "expired_ts": 0},
        }
        document = sign_json(document, "s.example", self.key)
        records = parse_key_response(document, "s.example", NOW_MS, "x")
        self.assertEqual(sorted(r.key_id for r in records), ["ed25519:a", "ed25519:z"])

    def test_nothing_skipped_no_log_line(self) -> None:
        """A document whose entries are all usable is parsed without a log line."""
        with capturedLogs() as events:
            parse_key_response(self.document, "s.example", NOW_MS, "x")
        self.assertEqual(events, [])

    def test_refusals(self) -> None:
        """Each malformed or unsigned key document is refused with a reason."""
        self.assertIn("not a JSON object", self.refused([]))
        self.assertIn("is for", self.refused(self.document, server="other.example"))
        self.assertIn("valid_until_ts", self.refused({**self.document, "valid_until_ts": "x"}))
        self.assertIn("no verify_keys", self.refused({**self.document, "verify_keys": {}}))
        self.assertIn("old_verify_keys", self.refused({**self.document, "old_verify_keys": []}))
        # No usable verify key left to have signed it:
        for unusable in (
            {"rsa:1": {"key": "x"}},
            {"ed25519:a": {}},
            {"ed25519:a": {"key": "AAAA"}},
        ):
            self.assertIn(
                "not self-signed: Missing signature for s.example",
                self.refused({**self.document, "verify_keys": unusable}),
            )
        self.assertIn("self-signed", self.refused({**self.document, "valid_until_ts": NOW_MS + 1}))
        unsigned = {k: v for k, v in self.document.items() if k != "signatures"}
        self.assertIn("not self-signed: Missing signature for s.example", self.refused(unsigned))
        # Signed by a key it does not list (an impostor's, or an old key's) only:
        other = make_key("b")
        self.assertIn(
            "not self-signed: Missing signature for s.example",
            self.refused(sign_json(unsigned, "s.example", other)),
        )

    def test_first_listed_signature_decides(self) -> None:
        """The first signature by a listed key decides, as in Synapse: a bad one refuses the
        document even though another listed key's holds; after a good one, the others are not
        checked (a document listing many keys costs one check)."""
        second = make_key("b")
        document = server_keys_document("s.example", [self.key, second], [], NOW_MS, DAY_MS)
        signatures = document["signatures"]["s.example"]
        self.assertEqual(list(signatures), ["ed25519:a", "ed25519:b"])
        good_a, good_b = signatures["ed25519:a"], signatures["ed25519:b"]
        signatures["ed25519:a"] = good_b  # b's signature under a's ID
        self.assertIn(
            "key response not self-signed: Signature by s.example (ed25519:a) is invalid",
            self.refused(document),
        )
        signatures["ed25519:a"], signatures["ed25519:b"] = good_a, good_a
        records = parse_key_response(document, "s.example", NOW_MS, "x")
        self.assertEqual({record.key_id for record in records}, {"ed25519:a", "ed25519:b"})

    def test_many_keys_one_encoding(self) -> None:
        """A document listing 64 keys, all signing it, is canonically encoded once (each
        signature re-encoded it: 6,000 keys in 1 MiB cost 37 s of reactor time)."""
        from federation_invite.core import signing

        calls: list[object] = []
        encode = signing.encode_canonical_json

        def counting(*args: Any, **kwargs: Any) -> bytes:
            calls.append(args)
            return encode(*args, **kwargs)

        document = many_keys_document("s.example", 64)
        self.patch(signing, "encode_canonical_json", counting)
        records = parse_key_response(document, "s.example", NOW_MS, "x")
        self.assertEqual(len(records), 64)
        self.assertEqual(len(calls), 1)

    def test_too_many_keys_refused(self) -> None:
        """More than 64 verify_keys and old_verify_keys together are refused before any
        signature check; 64 are accepted."""
        self.assertEqual(
            self.refused(many_keys_document("s.example", 40, 25)),
            "key document lists 65 keys, more than 64",
        )
        self.assertEqual(
            self.refused(many_keys_document("s.example", 65)),
            "key document lists 65 keys, more than 64",
        )
        records = parse_key_response(
            many_keys_document("s.example", 40, 24), "s.example", NOW_MS, "x"
        )
        self.assertEqual(len(records), 64)

    def test_unusable_entries_skipped(self) -> None:
        """Entries we cannot use are skipped and the rest kept (as Synapse does): a listed key
        that did not sign, other algorithms, a key ID outside [a-zA-Z0-9_], an undecodable key,
        an old key without expired_ts. One log line counts them, escaped."""
        from federation_invite.config import OldKey

        upcoming, old, other = make_key("next"), make_key("old"), make_key("x")
        old_entry = OldKey("ed25519:old", encode_verify_key(verify_key_of(old)), 5)
        document = server_keys_document("s.example", [self.key], [old_entry], NOW_MS, DAY_MS)
        del document["signatures"]
        other_key = encode_verify_key(verify_key_of(other))
        document["verify_keys"].update(
            {
                "ed25519:next": {"key": encode_verify_key(verify_key_of(upcoming))},
                "curve25519:x": {"key": other_key},
                "ed25519:bad": {"key": "AAAA"},
            }
        )
        document["old_verify_keys"].update(
            {
                "ed25519:old-1": {"key": other_key, "expired_ts": 5},
                "ed25519:noexp": {"key": other_key},
                "ed25519:\x1b[2J": {"key": other_key, "expired_ts": 5},
            }
        )
        document = sign_json(document, "s.example", self.key)
        with capturedLogs() as events:
            records = parse_key_response(document, "s.example", NOW_MS, "x")
        self.assertEqual(
            {(r.key_id, r.valid_until_ts, r.expired_ts) for r in records},
            {
                ("ed25519:a", NOW_MS + DAY_MS, None),
                ("ed25519:next", NOW_MS + DAY_MS, None),
                ("ed25519:old", None, 5),
            },
        )
        self.assertEqual([event["count"] for event in events], [5])
        self.assertNotIn("\x1b", formatEvent(events[0]))
