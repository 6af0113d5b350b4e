"""One behaviour suite for ``IStore``, run against SQLite (always) and PostgreSQL."""

from __future__ import annotations

import inspect
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from federation_invite.core.canonical import encode_canonical_json
from federation_invite.store import (
    LATEST_SCHEMA_VERSION,
    InviteRule,
    IStore,
    SchemaVersionError,
    ServerKeyRecord,
    StoreError,
    open_store,
    run_migrations,
)
from federation_invite.store._base import (
    _STATES_PER_STATEMENT,
    MAX_INVITE_BATCH,
    _invitee_states_query,
)
from federation_invite.store._sqlite_writer import (
    _PROBE_EVERY,
    _PROBE_EVERY_MAX,
    REACTOR_COMMIT_SECONDS,
    SQLiteInviteWriter,
)

from ._support import (
    create_postgres_database,
    drop_postgres_database,
    make_invite,
    previous_release_database,
    raw_postgres,
    raw_sqlite,
)

_ROOT = Path(__file__).resolve().parents[2]


def _key(key_id: str = "ed25519:a", fetched_ts: int = 1000, **changes: Any) -> ServerKeyRecord:
    fields: dict[str, Any] = {
        "server_name": "remote.example",
        "key_id": key_id,
        "verify_key": "l8Hft5qXKn1vfHrg3p4+W8gELQVo8N13JkluMfmn2sQ",
        "valid_until_ts": 2000,
        "expired_ts": None,
        "fetched_ts": fetched_ts,
        "source": "remote.example",
    }
    fields.update(changes)
    return ServerKeyRecord(**fields)


class StoreTestsMixin:
    """Every behaviour of the store; subclasses supply a fresh, empty database per test."""

    uri: str

    # -- supplied by the backend subclasses --

    def raw(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run ``statement`` directly on the test database (``?`` placeholders)."""
        raise NotImplementedError

    def failing_uri(self) -> tuple[str, str]:
        """A URI the driver cannot open, and a secret it contains that must not leak."""
        raise NotImplementedError

    def explain(self, statement: str, args: tuple[Any, ...]) -> str:
        """The query plan of ``statement``, as text, with sequential scans discouraged."""
        raise NotImplementedError

    # -- helpers --

    async def open(self, **kwargs: Any) -> Any:
        store = await open_store(self.uri, reactor=reactor, **kwargs)
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        return store

    # -- invites --

    async def test_provides_istore(self) -> None:
        """The opened store provides every IStore method and is at the latest schema."""
        store = await self.open()
        self.assertTrue(verifyObject(IStore, store))
        self.assertTrue(repr(store).startswith("<DatabaseStore "), repr(store))
        self.assertEqual(await store.schema_version(), LATEST_SCHEMA_VERSION)

    async def test_store_invite_once_then_existing_row(self) -> None:
        """A second store_invite with the same event_id returns the first row unchanged."""
        store = await self.open()
        first = make_invite()
        self.assertEqual(await store.store_invite(first), (first, True))
        other = make_invite(received_ts=5, status="ignored", event={"different": True})
        self.assertEqual(await store.store_invite(other), (first, False))
        self.assertEqual(self.raw("SELECT COUNT(*) FROM invites"), [(1,)])

    async def test_group_commit(self) -> None:
        """Invites arriving while a write is in flight are committed together, each answered."""
        store = await self.open()
        transactions = []
        original = store._pool.runInteraction

        def counting(*args: Any, **kwargs: Any) -> Any:
            transactions.append(1)
            return original(*args, **kwargs)

        store._pool.runInteraction = counting
        records = [make_invite(f"$group{i}") for i in range(50)]
        records.append(make_invite("$group7", received_ts=9))  # a duplicate inside a batch
        results = await gatherResults([store.store_invite(r) for r in records])
        self.assertEqual([created for _, created in results], [True] * 50 + [False])
        self.assertEqual(results[-1][0], records[7])
        self.assertLessEqual(len(transactions), 3)
        self.assertEqual(self.raw("SELECT COUNT(*) FROM invites"), [(50,)])

    async def test_more_invites_than_one_batch_each_stored_once(self) -> None:
        """Invites arriving together beyond MAX_INVITE_BATCH are all stored and each caller
        answered once as stored (group commit in batches of at most MAX_INVITE_BATCH)."""
        store = await self.open()
        batch_sizes: list[int] = []
        write_directly = store._write_directly

        def recording(rows: list[tuple[Any, ...]]) -> Any:
            # Every batch goes here first, whether it then commits directly or in the pool.
            batch_sizes.append(len(rows))
            return write_directly(rows)

        store._write_directly = recording
        count = 2 * MAX_INVITE_BATCH + 88
        records = [make_invite(f"$b{i:04d}") for i in range(count)]
        results = await gatherResults([store.store_invite(r) for r in records])
        self.assertEqual([created for _, created in results], [True] * count)
        self.assertEqual(self.raw("SELECT COUNT(*) FROM invites"), [(count,)])
        self.assertEqual(sum(batch_sizes), count)
        self.assertGreater(len(batch_sizes), 1, batch_sizes)
        self.assertLessEqual(max(batch_sizes), MAX_INVITE_BATCH, batch_sizes)

    async def test_group_commit_failure_fails_the_batch_only(self) -> None:
        """A failed batch fails each of its callers with StoreError; later writes do not hang."""
        store = await self.open()
        await store.store_invite(make_invite("$before"))
        self.raw("DROP TABLE invites")
        results = await DeferredList(
            [store.store_invite(make_invite(f"$x{i}")) for i in range(3)], consumeErrors=True
        )
        for success, failure in results:
            self.assertFalse(success)
            self.assertIsInstance(failure.value, StoreError)  # type: ignore[attr-defined]
        with self.assertRaises(StoreError):  # type: ignore[attr-defined]
            await store.store_invite(make_invite("$after"))

    def commits_in_flight(self, store: Any) -> None:
        """Make the store's writes stay in flight after ``store_invite`` returns."""

    async def test_close_fails_queued_invites(self) -> None:
        """Invites queued behind a write in flight fail with StoreError when the store closes."""
        store = await open_store(self.uri, reactor=reactor)
        self.commits_in_flight(store)
        first = store.store_invite(make_invite("$first"))
        queued = store.store_invite(make_invite("$queued"))
        await store.close()
        self.assertEqual((await first)[1], True)
        with self.assertRaises(StoreError):  # type: ignore[attr-defined]
            await queued

    async def test_invite_json_round_trips_as_canonical_text(self) -> None:
        """Event and room state come back equal and are stored as canonical JSON text."""
        store = await self.open()
        event = {"z": [1, {"b": 2, "a": "\u2603\U0001f600"}], "float": 1.5, "big": 2**60}
        record = make_invite(event=event, invite_room_state=[{"k": "v"}, []])
        await store.store_invite(record)
        self.assertEqual(await store.get_invite(record.event_id), record)
        stored = self.raw(
            "SELECT event_json, invite_room_state_json FROM invites WHERE event_id = ?",
            (record.event_id,),
        )
        self.assertEqual(
            stored,
            [
                (
                    encode_canonical_json(event, strict=False).decode(),
                    '[{"k":"v"},[]]',
                )
            ],
        )

    async def test_event_json_given_is_written_as_is_and_read_back(self) -> None:
        """A record's event_json is stored without encoding the event again; reads carry it."""
        store = await self.open()
        event = make_invite().event
        text = encode_canonical_json(event, strict=False).decode()
        # Text the store could not have produced itself: proof that it was not re-encoded.
        marked = text[:-1] + ',"zz_marker":1}'
        record = make_invite(event_json=marked)
        await store.store_invite(record)
        (row,) = self.raw("SELECT event_json FROM invites WHERE event_id = ?", (record.event_id,))
        self.assertEqual(row, (marked,))
        read = await store.get_invite(record.event_id)
        self.assertEqual(read.event_json, marked)
        self.assertEqual(read.event, {**event, "zz_marker": 1})
        plain = make_invite("$plain")
        self.assertIsNone(plain.event_json)
        await store.store_invite(plain)
        self.assertEqual((await store.get_invite("$plain")).event_json, text)
        listed = await store.list_invites(invitee=plain.invitee)
        self.assertEqual({r.event_json for r in listed}, {marked, text})

    async def test_get_invite_unknown_is_none(self) -> None:
        """get_invite of an event never stored fires with None."""
        store = await self.open()
        self.assertIsNone(await store.get_invite("$nothing"))

    async def test_list_invites_default_limit_is_100(self) -> None:
        """list_invites() without limit returns the 100 newest (IStore.list_invites: limit=100)."""
        store = await self.open()
        for i in range(101):
            await store.store_invite(make_invite(f"$l{i:03d}", received_ts=1000 + i))
        listed = await store.list_invites()
        self.assertEqual(len(listed), 100)
        self.assertEqual(listed[-1].event_id, "$l001")

    async def test_list_invites_filters_and_orders_newest_first(self) -> None:
        """list_invites filters by invitee, room and status, newest first, with limit and paging."""
        store = await self.open()
        a, b = "@a:local.example", "@b:local.example"
        records = [
            make_invite("$1", invitee=a, room_id="!x:r", received_ts=10),
            make_invite("$2", invitee=a, room_id="!y:r", received_ts=30, status="ignored"),
            make_invite("$3", invitee=b, room_id="!x:r", received_ts=20),
            make_invite("$4", invitee=b, room_id="!y:r", received_ts=30, status="accepted"),
            make_invite("$5", invitee=a, room_id="!x:r", received_ts=40, status="rejected"),
        ]
        for record in records:
            await store.store_invite(record)

        async def ids(**kwargs: Any) -> list[str]:
            return [r.event_id for r in await store.list_invites(**kwargs)]

        # Equal received_ts: event_id descending, the same on both backends.
        self.assertEqual(await ids(), ["$5", "$4", "$2", "$3", "$1"])
        self.assertEqual(await ids(invitee=a), ["$5", "$2", "$1"])
        self.assertEqual(await ids(room_id="!x:r"), ["$5", "$3", "$1"])
        self.assertEqual(await ids(status="pending"), ["$3", "$1"])
        self.assertEqual(await ids(invitee=b, room_id="!y:r", status="accepted"), ["$4"])
        self.assertEqual(await ids(invitee=b, status="ignored"), [])
        self.assertEqual(await ids(limit=2), ["$5", "$4"])
        self.assertEqual(await ids(before_ts=30), ["$3", "$1"])
        self.assertEqual(await ids(invitee=a, before_ts=40, limit=1), ["$2"])
        self.assertEqual(await ids(before_ts=30, before_event_id="$4"), ["$2", "$3", "$1"])
        self.assertEqual(await ids(room_id="!y:r", before_ts=30, before_event_id="$4"), ["$2"])
        self.assertEqual(await store.list_invites(invitee="@nobody:x"), [])

    async def test_paging_by_last_invite_lists_each_invite_once(self) -> None:
        """Paging with the last invite's (received_ts, event_id) visits every invite
        exactly once, in order, even when a page ends among invites received in the
        same millisecond (before_ts alone would skip the rest of that millisecond)."""
        store = await self.open()
        records = [make_invite(f"$p{i:02}", received_ts=100 + i // 4) for i in range(22)]
        for record in records:
            await store.store_invite(record)
        newest_first = sorted(records, key=lambda r: (r.received_ts, r.event_id), reverse=True)
        expected = [r.event_id for r in newest_first]
        seen: list[str] = []
        last: Any = None
        while True:
            page = await store.list_invites(
                limit=3,
                before_ts=None if last is None else last.received_ts,
                before_event_id=None if last is None else last.event_id,
            )
            if not page:
                break
            seen.extend(r.event_id for r in page)
            last = page[-1]
        self.assertEqual(seen, expected)
        # Paging by timestamp alone loses the invites sharing the page's last millisecond.
        first = await store.list_invites(limit=3)
        rest = await store.list_invites(limit=1000, before_ts=first[-1].received_ts)
        listed = {r.event_id for r in first + rest}
        self.assertEqual(set(expected) - listed, {"$p16", "$p17", "$p18"})

    async def test_set_invite_status(self) -> None:
        """set_invite_status changes only the status and reports unknown invites."""
        store = await self.open()
        record = make_invite()
        await store.store_invite(record)
        self.assertIs(await store.set_invite_status(record.event_id, "accepted"), True)
        stored = await store.get_invite(record.event_id)
        self.assertEqual(stored.status, "accepted")
        self.assertEqual(stored.event, record.event)
        self.assertIs(await store.set_invite_status("$missing", "rejected"), False)

    async def test_invalid_arguments_raise_value_error_at_call(self) -> None:
        """Bad arguments raise ValueError when called, before any SQL runs."""
        store = await self.open()
        cases = [
            (lambda: store.set_invite_status("$e", "done"), "status must be one of"),
            (lambda: store.set_invite_status("$\x00", "pending"), "event_id must not contain NUL"),
            (lambda: store.get_invite("$\udcff"), "event_id must be valid Unicode"),
            (lambda: store.add_local_user("@\ud800:x"), "user_id must be valid Unicode"),
            (lambda: store.list_invites(status="new"), "status must be one of"),
            (lambda: store.list_invites(limit=0), "limit must be an integer from 1 to 1000"),
            (lambda: store.list_invites(limit=1001), "limit must be an integer from 1 to 1000"),
            (lambda: store.list_invites(limit=True), "limit must be an integer from 1 to 1000"),
            (lambda: store.list_invites(before_ts="1"), "before_ts must be an integer"),
            (lambda: store.list_invites(before_event_id="$e"), "before_event_id needs before_ts"),
            (
                lambda: store.list_invites(before_ts=1, before_event_id=""),
                "before_event_id must not be empty",
            ),
            (lambda: store.list_invites(invitee=""), "invitee must not be empty"),
            (lambda: store.get_invite(1), "event_id must be a string, not int"),
            (lambda: store.store_invite({"event_id": "$e"}), "expected a InviteRecord"),
            (lambda: store.store_server_keys([{}]), "expected a ServerKeyRecord"),
            (lambda: store.get_server_keys("s", "ed25519:a"), "key_ids must be an iterable"),
            (lambda: store.add_local_user(None), "user_id must be a string"),
            (lambda: store.add_invite_rule(("@a:x", "user", "*", "block")), "expected a Invite"),
            (
                lambda: store.store_invite(make_invite(event={"nan": float("nan")})),
                "NaN",
            ),
        ]
        for call, message in cases:
            with self.assertRaises(ValueError) as caught:  # type: ignore[attr-defined]
                call()
            self.assertIn(message, str(caught.exception))
        self.assertEqual(self.raw("SELECT COUNT(*) FROM invites"), [(0,)])

    async def test_lookups_and_lists_are_indexed(self) -> None:
        """Lookups by event_id and lists by invitee, room and status use an index."""
        await self.open()
        cases = [
            ("invitee = ?", "@a:x", "invites_by_invitee"),
            ("room_id = ?", "!r:x", "invites_by_room"),
            ("status = ?", "pending", "invites_by_status"),
        ]
        for condition, value, index in cases:
            plan = self.explain(
                f"SELECT * FROM invites WHERE {condition}"
                " ORDER BY received_ts DESC, event_id DESC LIMIT 100",
                (value,),
            )
            self.assertIn(index, plan)
        plan = self.explain("SELECT * FROM invites WHERE event_id = ?", ("$e",))
        self.assertRegex(plan, "(?i)index")

    # -- remote keys --

    async def test_server_keys_written_in_key_order(self) -> None:
        """store_server_keys upserts its rows ordered by (server_name, key_id), whatever
        the caller's order: two workers storing the same keys in different orders would
        otherwise deadlock on each other's row locks (PostgreSQL)."""
        store = await self.open()
        written: list[list[tuple[Any, ...]]] = []
        store_keys_txn = store._store_keys_txn

        def recording(txn: Any, rows: list[tuple[Any, ...]]) -> None:
            written.append(list(rows))
            store_keys_txn(txn, rows)

        self.patch(store, "_store_keys_txn", recording)  # type: ignore[attr-defined]
        await store.store_server_keys(
            [
                _key("ed25519:b"),
                _key("ed25519:c", server_name="a.example"),
                _key("ed25519:a"),
                _key("ed25519:a", server_name="z.example"),
            ]
        )
        (rows,) = written
        self.assertEqual(
            [row[:2] for row in rows],
            [
                ("a.example", "ed25519:c"),
                ("remote.example", "ed25519:a"),
                ("remote.example", "ed25519:b"),
                ("z.example", "ed25519:a"),
            ],
        )
        self.assertEqual(len(await store.get_server_keys("remote.example")), 2)

    async def test_server_keys_newer_fetch_replaces_older(self) -> None:
        """Keys upsert on (server_name, key_id); an older fetch never overwrites a newer one."""
        store = await self.open()
        await store.store_server_keys([_key(fetched_ts=100, valid_until_ts=500)])
        newer = _key(fetched_ts=200, valid_until_ts=None, expired_ts=150, source="notary.example")
        await store.store_server_keys([newer])
        self.assertEqual(await store.get_server_keys("remote.example"), {"ed25519:a": newer})
        await store.store_server_keys([_key(fetched_ts=150, valid_until_ts=999)])
        self.assertEqual(await store.get_server_keys("remote.example"), {"ed25519:a": newer})
        same_time = _key(fetched_ts=200, valid_until_ts=700)
        await store.store_server_keys([same_time])
        self.assertEqual(await store.get_server_keys("remote.example"), {"ed25519:a": same_time})

    async def test_notary_never_revives_an_old_key(self) -> None:
        """A key stored as old (expired_ts) is not made current again by a notary's answer,
        however late (a stale notary copy would undo a rotation); the server's own is."""
        store = await self.open()
        old = _key(fetched_ts=100, valid_until_ts=None, expired_ts=90)
        await store.store_server_keys([old])
        stale = _key(fetched_ts=200, valid_until_ts=5000, source="notary.example")
        await store.store_server_keys([stale])
        self.assertEqual(await store.get_server_keys("remote.example"), {"ed25519:a": old})
        notary_old = _key(fetched_ts=300, valid_until_ts=None, expired_ts=80, source="n.example")
        await store.store_server_keys([notary_old])
        self.assertEqual(await store.get_server_keys("remote.example"), {"ed25519:a": notary_old})
        own = _key(fetched_ts=400, valid_until_ts=6000)
        await store.store_server_keys([own])
        self.assertEqual(await store.get_server_keys("remote.example"), {"ed25519:a": own})

    async def test_key_stored_as_fetched_after_now_is_replaced(self) -> None:
        """A key stored as fetched after now (our clock ran ahead) is replaced by any fetch,
        not kept until the clock catches up; a key stored as old stays old on a notary's word."""
        store = await self.open()
        now_ms = int(reactor.seconds() * 1000)
        ahead_ms = now_ms + 30 * 86_400_000
        await store.store_server_keys([_key(fetched_ts=ahead_ms, valid_until_ts=now_ms)])
        fresh = _key(fetched_ts=now_ms, valid_until_ts=now_ms + 86_400_000)
        await store.store_server_keys([fresh])
        self.assertEqual(await store.get_server_keys("remote.example"), {"ed25519:a": fresh})
        await store.store_server_keys([_key(fetched_ts=now_ms - 1, valid_until_ts=now_ms)])
        self.assertEqual(await store.get_server_keys("remote.example"), {"ed25519:a": fresh})
        old = _key(fetched_ts=ahead_ms, valid_until_ts=None, expired_ts=now_ms)
        await store.store_server_keys([old])
        notary = _key(fetched_ts=now_ms, valid_until_ts=now_ms, source="notary.example")
        await store.store_server_keys([notary])
        self.assertEqual(await store.get_server_keys("remote.example"), {"ed25519:a": old})

    async def test_get_server_keys_by_key_ids(self) -> None:
        """get_server_keys returns one server's keys, all of them or only those asked for."""
        store = await self.open()
        keys = [_key("ed25519:a"), _key("ed25519:b"), _key("ed25519:a", server_name="other")]
        await store.store_server_keys(keys)
        self.assertEqual(await store.store_server_keys([]), None)
        self.assertEqual(
            await store.get_server_keys("remote.example"),
            {"ed25519:a": keys[0], "ed25519:b": keys[1]},
        )
        self.assertEqual(
            await store.get_server_keys("remote.example", ["ed25519:b", "ed25519:zz"]),
            {"ed25519:b": keys[1]},
        )
        self.assertEqual(await store.get_server_keys("remote.example", []), {})
        self.assertEqual(await store.get_server_keys("unknown.example"), {})

    async def test_keys_reused_by_another_worker_and_after_restart(self) -> None:
        """Keys stored by one store are read by a second pool and by a reopened one."""
        first = await self.open()
        second = await self.open()
        key = _key(valid_until_ts=123_456)
        await first.store_server_keys([key])
        self.assertEqual(await second.get_server_keys("remote.example"), {"ed25519:a": key})
        await first.close()
        reopened = await self.open()
        self.assertEqual(await reopened.get_server_keys("remote.example"), {"ed25519:a": key})

    # -- local users and rules --

    async def test_local_users(self) -> None:
        """Local users: add is idempotent, lookups are exact (case-sensitive), remove reports."""
        store = await self.open()
        self.assertIs(await store.add_local_user("@b:local.example"), True)
        self.assertIs(await store.add_local_user("@b:local.example"), False)
        self.assertIs(await store.add_local_user("@A:local.example"), True)
        self.assertIs(await store.is_local_user("@b:local.example"), True)
        self.assertIs(await store.is_local_user("@a:local.example"), False)
        self.assertEqual(await store.list_local_users(), ["@A:local.example", "@b:local.example"])
        self.assertIs(await store.remove_local_user("@b:local.example"), True)
        self.assertIs(await store.remove_local_user("@b:local.example"), False)
        self.assertEqual(await store.list_local_users(), ["@A:local.example"])

    async def test_invite_rules(self) -> None:
        """Rules: add is idempotent, lists are per user and sorted, remove reports."""
        store = await self.open()
        user = "@a:local.example"
        block = InviteRule(user, "server", "*.evil.example", "block")
        allow = InviteRule(user, "server", "*.evil.example", "allow")
        ignore = InviteRule(user, "user", "@spam*:*", "ignore")
        other = InviteRule("@b:local.example", "user", "*", "block")
        for rule in (ignore, block, allow, other):
            self.assertIs(await store.add_invite_rule(rule), True)
        self.assertIs(await store.add_invite_rule(block), False)
        self.assertEqual(await store.list_invite_rules(user), [allow, block, ignore])
        self.assertIs(await store.remove_invite_rule(block), True)
        self.assertIs(await store.remove_invite_rule(block), False)
        self.assertEqual(await store.list_invite_rules(user), [allow, ignore])
        self.assertEqual(await store.list_invite_rules("@b:local.example"), [other])
        self.assertEqual(await store.list_invite_rules("@c:local.example"), [])

    async def test_invitee_states(self) -> None:
        """Whether users are ours and their rules, all in one read, in any number."""
        store = await self.open()
        user = "@a:local.example"
        block = InviteRule(user, "server", "*.evil.example", "block")
        allow = InviteRule(user, "user", "@friend:*", "allow")
        stranger_rule = InviteRule("@z:local.example", "user", "*", "block")
        for rule in (block, allow, stranger_rule):
            await store.add_invite_rule(rule)
        self.assertEqual(await store.invitee_states([user]), {user: (False, [block, allow])})
        await store.add_local_user(user)
        many = [f"@u{i}:local.example" for i in range(1200)]  # over one IN list's chunk
        for name in many[::100]:
            await store.add_local_user(name)
        states = await store.invitee_states([user, "@z:local.example", "@A:local.example", *many])
        self.assertEqual(states[user], (True, [block, allow]))
        self.assertEqual(states["@z:local.example"], (False, [stranger_rule]))
        self.assertEqual(states["@A:local.example"], (False, []))
        self.assertEqual([name for name in many if states[name][0]], many[::100])
        self.assertEqual(len(states), 1203)
        self.assertEqual(await store.invitee_states([]), {})

    async def test_invitee_states_over_several_statements(self) -> None:
        """invitee_states of more users than _STATES_PER_STATEMENT reads them in statements of
        that many, missing none: the last of the first, the first of the second and the one
        alone in the third are each found local."""
        store = await self.open()
        users = [f"@u{i:04d}:local.example" for i in range(2 * _STATES_PER_STATEMENT + 1)]
        local = [users[_STATES_PER_STATEMENT - 1], users[_STATES_PER_STATEMENT], users[-1]]
        for user in local:
            await store.add_local_user(user)
        states = await store.invitee_states(users)
        self.assertEqual(len(states), len(users))
        self.assertEqual([user for user, (is_local, _) in states.items() if is_local], local)

    # -- concurrency and durability --

    async def test_two_workers_store_the_same_invite_once(self) -> None:
        """Two pools storing the same invites concurrently: one row each, identical answers."""
        worker_a = await self.open()
        worker_b = await self.open()
        rounds = 40
        calls = []
        for n in range(rounds):
            event_id = f"$race{n}"
            # Each worker's copy differs, so equal answers prove both got the stored row.
            for worker, ts in ((worker_a, 1), (worker_b, 2), (worker_a, 3), (worker_b, 4)):
                calls.append(worker.store_invite(make_invite(event_id, received_ts=ts)))
        results = await gatherResults(calls, consumeErrors=True)
        for n in range(rounds):
            answers = results[4 * n : 4 * n + 4]
            self.assertEqual(sum(created for _, created in answers), 1, answers)
            # Equal by value (the creator gets back its own record; the others the
            # row read back, whose JSON keys come back sorted).
            self.assertTrue(all(record == answers[0][0] for record, _ in answers), answers)
        self.assertEqual(
            self.raw("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM invites"), [(rounds, rounds)]
        )

    async def test_concurrent_start_migrates_once(self) -> None:
        """Two workers opening an empty database at once both start; each version runs once."""
        stores = await gatherResults(
            [open_store(self.uri, reactor=reactor) for _ in range(3)], consumeErrors=True
        )
        for store in stores:
            self.addCleanup(store.close)  # type: ignore[attr-defined]
        rows = self.raw("SELECT version FROM federation_invite_schema ORDER BY version")
        self.assertEqual(rows, [(v,) for v in range(1, LATEST_SCHEMA_VERSION + 1)])

    def test_acknowledged_invite_survives_killed_process(self) -> None:
        """An invite acknowledged by a process that is then SIGKILLed is found by a new pool."""
        child = subprocess.run(
            [sys.executable, "-m", "tests.store._crash_child", self.uri, "$durable"],
            cwd=_ROOT,
            env={**os.environ, "PYTHONPATH": str(_ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(child.returncode, -signal.SIGKILL, child.stderr)
        self.assertEqual(child.stdout, "acknowledged $durable created=True\n")

        async def check() -> None:
            store = await self.open()
            self.assertEqual(await store.get_invite("$durable"), make_invite("$durable"))

        return check()  # type: ignore[return-value]

    # -- failures --

    async def test_driver_failure_is_store_error_without_secret(self) -> None:
        """A database that cannot be opened fails with StoreError, never showing the password."""
        uri, secret = self.failing_uri()
        with self.assertRaises(StoreError) as caught:  # type: ignore[attr-defined]
            await open_store(uri, reactor=reactor)
        message = str(caught.exception)
        self.assertTrue(message.startswith("migrate failed: "), message)
        self.assertNotIn(secret, message)
        self.assertIsNotNone(caught.exception.__cause__)

    async def test_failure_during_operation_is_store_error(self) -> None:
        """A statement the database refuses surfaces as StoreError naming the operation."""
        store = await self.open()
        self.raw("DROP TABLE local_users")
        with self.assertRaises(StoreError) as caught:  # type: ignore[attr-defined]
            await store.is_local_user("@a:local.example")
        self.assertRegex(str(caught.exception), r"^is_local_user failed: \w+: .*local_users")
        # The pool is still usable afterwards.
        self.assertIsNone(await store.get_invite("$e"))

    async def test_non_driver_errors_are_not_store_errors(self) -> None:
        """Only driver errors become StoreError (DatabaseStore._run): a bug in a transaction's
        own code reaches the caller as itself, on reads and on writes."""
        store = await self.open()

        def broken(txn: Any) -> None:
            raise ZeroDivisionError("bug")

        for write in (False, True):
            with self.assertRaises(ZeroDivisionError):  # type: ignore[attr-defined]
                await store._run("broken", broken, write=write)

    async def test_closed_store_refuses_use(self) -> None:
        """Using a store after close() is a programming error, raised at once."""
        store = await self.open()
        await store.close()
        await store.close()
        with self.assertRaises(RuntimeError):  # type: ignore[attr-defined]
            store.get_invite("$e")

    # -- migrations --

    async def test_empty_database_migrates_to_latest(self) -> None:
        """run_migrations takes an empty database to the latest version, recording each file."""
        result = await run_migrations(self.uri, reactor=reactor)
        self.assertEqual(result.before, 0)
        self.assertEqual(result.after, LATEST_SCHEMA_VERSION)
        self.assertEqual(result.applied[0], "0001_initial.sql")
        self.assertEqual(len(result.applied), LATEST_SCHEMA_VERSION)
        rows = self.raw("SELECT version, name FROM federation_invite_schema ORDER BY version")
        self.assertEqual([r[1] for r in rows], list(result.applied))
        for table in ("invites", "server_keys", "local_users", "invite_rules"):
            self.assertEqual(self.raw(f"SELECT COUNT(*) FROM {table}"), [(0,)])

    async def test_empty_bookkeeping_table_migrates_from_zero(self) -> None:
        """A federation_invite_schema of ours holding no row (created by hand from the
        README, or a schema-only dump of a fresh database restored) is at version 0: every
        migration runs, and the database opens at the latest version."""
        self.raw(
            "CREATE TABLE federation_invite_schema (version INTEGER NOT NULL PRIMARY KEY,"
            " name TEXT NOT NULL, applied_ts BIGINT NOT NULL)"
        )
        with self.assertRaises(SchemaVersionError) as caught:  # type: ignore[attr-defined]
            await open_store(self.uri, reactor=reactor, migrate=False)
        self.assertEqual(caught.exception.database_version, 0)
        result = await run_migrations(self.uri, reactor=reactor)
        self.assertEqual((result.before, result.after), (0, LATEST_SCHEMA_VERSION))
        self.assertEqual(len(result.applied), LATEST_SCHEMA_VERSION)
        store = await self.open()
        self.assertEqual(await store.schema_version(), LATEST_SCHEMA_VERSION)

    async def test_latest_is_a_no_op(self) -> None:
        """Migrating a database already at the latest version changes nothing."""
        store = await self.open()
        await store.add_local_user("@a:local.example")
        before = self.raw("SELECT version, name, applied_ts FROM federation_invite_schema")
        result = await run_migrations(self.uri, reactor=reactor)
        self.assertEqual(result.applied, ())
        self.assertEqual((result.before, result.after), (LATEST_SCHEMA_VERSION,) * 2)
        self.assertEqual(
            self.raw("SELECT version, name, applied_ts FROM federation_invite_schema"), before
        )
        reopened = await self.open(migrate=False)
        self.assertEqual(await reopened.list_local_users(), ["@a:local.example"])

    async def test_newer_database_is_refused(self) -> None:
        """A database from a newer release is refused with a clear message and left untouched."""
        await run_migrations(self.uri, reactor=reactor)
        newer = LATEST_SCHEMA_VERSION + 1
        self.raw(
            "INSERT INTO federation_invite_schema (version, name, applied_ts) VALUES (?, ?, ?)",
            (newer, f"{newer:04d}_future.sql", 0),
        )
        expected = (
            f"schema check failed: the database has schema version {newer}, newer than the"
            f" latest this federation-invite knows ({LATEST_SCHEMA_VERSION}); refusing to"
            " use it: upgrade federation-invite, or point it at another database"
        )
        for attempt in (
            lambda: open_store(self.uri, reactor=reactor),
            lambda: open_store(self.uri, reactor=reactor, migrate=False),
            lambda: run_migrations(self.uri, reactor=reactor),
        ):
            with self.assertRaises(SchemaVersionError) as caught:  # type: ignore[attr-defined]
                await attempt()
            self.assertEqual(str(caught.exception), expected)
            self.assertEqual(caught.exception.database_version, newer)
            self.assertEqual(caught.exception.code_version, LATEST_SCHEMA_VERSION)
        self.assertEqual(self.raw("SELECT MAX(version) FROM federation_invite_schema"), [(newer,)])

    async def test_unmigrated_database_refused_without_migrate(self) -> None:
        """open_store(migrate=False) refuses a database older than the code, creating nothing."""
        with self.assertRaises(SchemaVersionError) as caught:  # type: ignore[attr-defined]
            await open_store(self.uri, reactor=reactor, migrate=False)
        self.assertEqual(
            str(caught.exception),
            "schema check failed: the database has schema version 0, older than this"
            f" federation-invite needs ({LATEST_SCHEMA_VERSION}); run the migrations first",
        )
        self.assertEqual(
            (caught.exception.database_version, caught.exception.code_version),
            (0, LATEST_SCHEMA_VERSION),
        )
        result = await run_migrations(self.uri, reactor=reactor)
        self.assertEqual(result.before, 0)

    # -- the schema bookkeeping table, and other tools' --

    def table_names(self) -> set[str]:
        """The tables of the test database (its default schema)."""
        raise NotImplementedError

    def dialect_name(self) -> str:
        return "sqlite" if self.uri.startswith("sqlite:") else "postgres"

    def create_previous_release_database(self) -> None:
        """A database as the releases before federation_invite_schema left it."""
        for statement in previous_release_database(self.dialect_name(), applied_ts=1234):
            self.raw(statement)

    async def test_previous_release_database_upgraded(self) -> None:
        """A database the previous release made (bookkeeping in schema_migrations) opens
        without migrating as it is, and at the first migration its bookkeeping moves to
        federation_invite_schema (rows and applied_ts kept, schema_migrations dropped) with
        every row of data intact."""
        self.create_previous_release_database()
        self.raw("INSERT INTO local_users (user_id) VALUES (?)", ("@a:local.example",))
        rule = InviteRule("@a:local.example", "server", "spam.example", "block")
        self.raw(
            "INSERT INTO invite_rules (user_id, kind, pattern, action) VALUES (?, ?, ?, ?)",
            (rule.user_id, rule.kind, rule.pattern, rule.action),
        )
        unmigrated = await open_store(self.uri, reactor=reactor, migrate=False)
        self.assertEqual(await unmigrated.schema_version(), 1)
        self.assertEqual(await unmigrated.list_local_users(), ["@a:local.example"])
        await unmigrated.close()
        self.assertIn("schema_migrations", self.table_names())
        self.assertNotIn("federation_invite_schema", self.table_names())

        result = await run_migrations(self.uri, reactor=reactor)
        self.assertEqual((result.before, result.after), (1, LATEST_SCHEMA_VERSION))
        self.assertTrue(result.moved_bookkeeping)
        self.assertNotIn("schema_migrations", self.table_names())
        rows = self.raw("SELECT version, name, applied_ts FROM federation_invite_schema")
        self.assertEqual(rows[0], (1, "0001_initial.sql", 1234))
        self.assertEqual(len(rows), LATEST_SCHEMA_VERSION)
        store = await self.open()
        self.assertEqual(await store.schema_version(), LATEST_SCHEMA_VERSION)
        self.assertEqual(await store.list_local_users(), ["@a:local.example"])
        self.assertEqual(await store.list_invite_rules("@a:local.example"), [rule])
        invite = make_invite("$after")
        self.assertEqual(await store.store_invite(invite), (invite, True))
        again = await run_migrations(self.uri, reactor=reactor)
        self.assertEqual((again.applied, again.moved_bookkeeping), ((), False))

    async def test_previous_release_database_concurrent_start(self) -> None:
        """Three workers opening a previous release's database at once all start; its
        bookkeeping moves once (under the migration lock)."""
        self.create_previous_release_database()
        stores = await gatherResults(
            [open_store(self.uri, reactor=reactor) for _ in range(3)], consumeErrors=True
        )
        for store in stores:
            self.addCleanup(store.close)  # type: ignore[attr-defined]
        self.assertNotIn("schema_migrations", self.table_names())
        rows = self.raw("SELECT version, applied_ts FROM federation_invite_schema ORDER BY version")
        self.assertEqual(rows[0], (1, 1234))
        self.assertEqual([v for v, _ in rows], list(range(1, LATEST_SCHEMA_VERSION + 1)))

    async def test_other_tools_schema_migrations_ignored(self) -> None:
        """Another tool's schema_migrations (golang-migrate's at versions 1 and 3, Rails' or
        dbmate's timestamp versions, or one shaped as ours but with other files, other
        column types or no row at all) is not taken for ours: migrating creates our tables
        beside it and leaves it as it was; without migrating the database is at version 0."""
        cases = [
            (
                "CREATE TABLE schema_migrations"
                " (version BIGINT NOT NULL PRIMARY KEY, dirty BOOLEAN NOT NULL)",
                [(1, False)],
            ),
            (
                "CREATE TABLE schema_migrations"
                " (version BIGINT NOT NULL PRIMARY KEY, dirty BOOLEAN NOT NULL)",
                [(3, False)],
            ),
            (
                "CREATE TABLE schema_migrations (version VARCHAR(128) NOT NULL PRIMARY KEY)",
                [("20240101120000",)],
            ),
            (
                "CREATE TABLE schema_migrations (version INTEGER NOT NULL PRIMARY KEY,"
                " name TEXT NOT NULL, applied_ts BIGINT NOT NULL)",
                [(1, "0001_create_users.sql", 5)],
            ),
            (
                "CREATE TABLE schema_migrations (version BIGINT NOT NULL PRIMARY KEY,"
                " name TEXT NOT NULL, applied_ts BIGINT NOT NULL)",
                [(1, "0001_initial.sql", 5)],
            ),
            (
                "CREATE TABLE schema_migrations (version INTEGER NOT NULL PRIMARY KEY,"
                " name TEXT NOT NULL, applied_ts BIGINT)",
                [(1, "0001_initial.sql", 5)],
            ),
            (  # ours exactly, but no row names one of our files: another tool's, empty
                "CREATE TABLE schema_migrations (version INTEGER NOT NULL PRIMARY KEY,"
                " name TEXT NOT NULL, applied_ts BIGINT NOT NULL)",
                [],
            ),
        ]
        ours = ("invites", "server_keys", "local_users", "invite_rules", "federation_invite_schema")
        for create, rows in cases:
            for table in (*ours, "schema_migrations"):
                self.raw(f"DROP TABLE IF EXISTS {table}")
            self.raw(create)
            for row in rows:
                marks = ", ".join("?" * len(row))
                self.raw(f"INSERT INTO schema_migrations VALUES ({marks})", row)
            before = self.raw("SELECT * FROM schema_migrations")
            with self.assertRaises(SchemaVersionError) as caught:  # type: ignore[attr-defined]
                await open_store(self.uri, reactor=reactor, migrate=False)
            self.assertEqual(caught.exception.database_version, 0, create)
            store = await open_store(self.uri, reactor=reactor)
            try:
                self.assertEqual(await store.schema_version(), LATEST_SCHEMA_VERSION)
                self.assertTrue(await store.add_local_user("@a:local.example"))
                self.assertEqual(await store.list_local_users(), ["@a:local.example"])
            finally:
                await store.close()
            self.assertEqual(self.raw("SELECT * FROM schema_migrations"), before, create)
            self.assertTrue(set(ours) <= self.table_names(), create)

    def own_database_hint(self) -> str:
        if self.dialect_name() == "sqlite":
            return "a database file of its own"
        return (
            "a database of its own, or a schema of its own (CREATE SCHEMA <schema>, then"
            " ?options=-csearch_path%3D<schema> in the URI)"
        )

    async def test_our_names_taken_by_others_refused(self) -> None:
        """A database holding another's table, index or view under one of our names (an
        application's own invites table, beside golang-migrate's schema_migrations, say)
        is refused at open with a StoreError naming it and saying what to do, not the
        driver's "already exists" or a later "does not exist"; nothing is created and
        the application's objects are left as they were."""
        golang_migrate = (
            "CREATE TABLE schema_migrations"
            " (version BIGINT NOT NULL PRIMARY KEY, dirty BOOLEAN NOT NULL)"
        )
        cases = [
            (
                ["CREATE TABLE invites (id INTEGER PRIMARY KEY, email TEXT)"],
                ["DROP TABLE invites"],
                ("table", "invites"),
            ),
            (
                [golang_migrate, "CREATE TABLE invites (id INTEGER PRIMARY KEY, email TEXT)"],
                ["DROP TABLE invites", "DROP TABLE schema_migrations"],
                ("table", "invites"),
            ),
            (
                [
                    "CREATE TABLE app_rooms (room_id TEXT)",
                    "CREATE INDEX invites_by_room ON app_rooms (room_id)",
                ],
                ["DROP TABLE app_rooms"],
                ("index", "invites_by_room"),
            ),
            (
                ["CREATE VIEW local_users AS SELECT 'x' AS user_id"],
                ["DROP VIEW local_users"],
                ("view", "local_users"),
            ),
        ]
        for creates, drops, (kind, name) in cases:
            for statement in creates:
                self.raw(statement)
            before = self.table_names()
            with self.assertRaises(StoreError) as caught:  # type: ignore[attr-defined]
                await open_store(self.uri, reactor=reactor)
            self.assertNotIsInstance(caught.exception, SchemaVersionError)
            self.assertEqual(
                str(caught.exception),
                f"migrate failed: the database already has a {kind} named {name!r} that is"
                f" not federation-invite's; give federation-invite {self.own_database_hint()}"
                f" [{self.uri}]",
            )
            self.assertEqual(self.table_names(), before, creates)
            for statement in drops:
                self.raw(statement)

    async def test_bookkeeping_table_of_another_refused(self) -> None:
        """A federation_invite_schema that is not ours (other columns) is refused, with or
        without migrating, naming it, and left as it was."""
        self.raw("CREATE TABLE federation_invite_schema (version TEXT NOT NULL)")
        self.raw("INSERT INTO federation_invite_schema VALUES ('v9')")
        message = (
            " failed: the database already has a table named 'federation_invite_schema' that"
            f" is not federation-invite's; give federation-invite {self.own_database_hint()}"
            f" [{self.uri}]"
        )
        for migrate, operation in ((True, "migrate"), (False, "schema check")):
            with self.assertRaises(StoreError) as caught:  # type: ignore[attr-defined]
                await open_store(self.uri, reactor=reactor, migrate=migrate)
            self.assertEqual(str(caught.exception), operation + message)
        self.assertEqual(self.table_names(), {"federation_invite_schema"})
        self.assertEqual(self.raw("SELECT * FROM federation_invite_schema"), [("v9",)])


class _FakeDriverConnection:
    """A DB-API connection whose rollback fails, open or (``closed``) lost."""

    def __init__(self, closed: int) -> None:
        self.closed = closed
        self.rollbacks = 0

    def rollback(self) -> None:
        self.rollbacks += 1
        raise RuntimeError("could not roll back")


class _FakePool:
    """What adbapi's ``Connection`` uses of its pool."""

    reconnect = True
    noisy = False
    good_sql = "SELECT 1"

    def __init__(self, connection: _FakeDriverConnection) -> None:
        self.connection = connection
        self.disconnected: list[Any] = []

    def connect(self) -> _FakeDriverConnection:
        return self.connection

    def disconnect(self, connection: Any) -> None:
        self.disconnected.append(connection)


class LostConnectionRollbackTests(SynchronousTestCase):
    """The PostgreSQL pool's connections: quiet about a rollback only where the connection
    is already lost (closed), adbapi's own rollback (and its log) on one still open."""

    def test_lost_connection_dropped_without_a_rollback(self) -> None:
        """Closed: not rolled back (nothing is left to roll back), dropped from the pool
        (to be replaced), nothing logged, nothing raised (the operation's own error is)."""
        from federation_invite.store._dialect import _LostQuietlyConnection

        driver = _FakeDriverConnection(closed=2)
        pool = _FakePool(driver)
        _LostQuietlyConnection(pool).rollback()
        self.assertEqual((driver.rollbacks, pool.disconnected), (0, [driver]))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_rollback_failing_on_an_open_connection_still_logged(self) -> None:
        """Open: adbapi's rollback; its failure is logged ("Rollback failed") and the
        connection dropped, as before."""
        from twisted.enterprise.adbapi import ConnectionLost

        from federation_invite.store._dialect import _LostQuietlyConnection

        driver = _FakeDriverConnection(closed=0)
        pool = _FakePool(driver)
        self.assertRaises(ConnectionLost, _LostQuietlyConnection(pool).rollback)
        self.assertEqual((driver.rollbacks, pool.disconnected), (1, [driver]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class InviteeStatesStatementTests(SynchronousTestCase):
    def test_statements_few_whatever_the_number_of_users(self) -> None:
        """A read of N invitees' states (1 to the most in one statement) is one of at most 10
        statement texts, its IN lists padded by repeating the last user: each distinct text is
        a prepared statement SQLite keeps (up to 142 KiB each, 128 per connection), so reads of
        every size in between kept growing the daemon's memory."""
        texts = set()
        for count in range(1, _STATES_PER_STATEMENT + 1):
            users = [f"@u{i}:local.example" for i in range(count)]
            statement, args = _invitee_states_query(users)
            texts.add(statement)
            self.assertEqual(statement.count("?"), len(args))
            self.assertEqual(set(args), set(users))
        self.assertLessEqual(len(texts), 10)


class SQLiteDialectTests(SynchronousTestCase):
    """What the SQLite dialect sets on every connection, and how it releases a lost file."""

    def pragma(self, connection: sqlite3.Connection, name: str) -> Any:
        return connection.execute(f"PRAGMA {name}").fetchone()[0]

    def test_connection_settings(self) -> None:
        """Every connection the store opens commits with synchronous = FULL (2: README, an
        invite answered 200 survives a power cut), in WAL mode, with a 10 s busy timeout
        and foreign keys enforced (no table has one yet: pinned so that the first one
        added is); the invite writer's connections (configure_durable) are FULL too."""
        from federation_invite.store import _dialect, parse_database_uri

        path = os.path.abspath(self.mktemp())
        dialect = parse_database_uri(f"sqlite:///{path}")
        connection = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(connection.close)
        dialect._open_connection(connection)  # type: ignore[attr-defined]
        self.assertEqual(self.pragma(connection, "synchronous"), 2)
        self.assertEqual(self.pragma(connection, "journal_mode"), "wal")
        self.assertEqual(self.pragma(connection, "busy_timeout"), 10_000)
        self.assertEqual(self.pragma(connection, "foreign_keys"), 1)
        durable = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(durable.close)
        _dialect.configure_durable(durable)
        self.assertEqual(self.pragma(durable, "synchronous"), 2)

    def test_release_file_blocked_by_a_reader_raises(self) -> None:
        """When the lost file's WAL cannot be emptied (another connection still reads it)
        release_file raises StoreError, so that the store logs that the -wal and -shm
        files must be deleted before a restart (else SQLite applies the refused write to
        the file now at the path); once emptied, it returns and the WAL is empty."""
        from federation_invite.store._dialect import SQLiteDialect

        path = os.path.abspath(self.mktemp())
        writer = sqlite3.connect(path, isolation_level=None, timeout=0)  # no busy wait
        self.addCleanup(writer.close)
        writer.execute("PRAGMA journal_mode = WAL")
        writer.execute("CREATE TABLE t (x)")
        writer.execute("INSERT INTO t VALUES (1)")
        reader = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(reader.close)
        reader.execute("BEGIN")
        reader.execute("SELECT * FROM t").fetchall()  # a snapshot the checkpoint waits for
        writer.execute("INSERT INTO t VALUES (2)")
        dialect = SQLiteDialect(path, f"sqlite:///{path}")
        error = self.assertRaises(StoreError, dialect.release_file, writer.cursor())
        self.assertIn("a connection is still reading it", str(error))
        reader.execute("COMMIT")
        dialect.release_file(writer.cursor())
        self.assertEqual(os.path.getsize(path + "-wal"), 0)


class PostgresDialectTests(SynchronousTestCase):
    def test_pool_size(self) -> None:
        """A PostgreSQL store's pool opens 1 to 5 connections (several operations at
        once) unless told another size, reconnecting lost ones; built without connecting
        (no server needed)."""
        from twisted.internet.testing import MemoryReactorClock

        from federation_invite.store import parse_database_uri

        dialect = parse_database_uri("postgresql://postgres@127.0.0.1:5432/fi_never_opened")
        pool = dialect.connection_pool(MemoryReactorClock())  # never started: no connection
        self.assertEqual((pool.min, pool.max, pool.reconnect), (1, 5, True))
        pool = dialect.connection_pool(MemoryReactorClock(), 2)
        self.assertEqual((pool.min, pool.max), (1, 2))


class SQLiteStoreTests(StoreTestsMixin, TestCase):
    """The suite on a SQLite file in a temporary directory."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="fi-store-")
        self.addCleanup(_remove_tree, directory)
        self.path = os.path.join(directory, "store.db")
        self.uri = f"sqlite:///{self.path}"

    def raw(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return raw_sqlite(self.path, statement, args)

    def table_names(self) -> set[str]:
        return {name for (name,) in self.raw("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def failing_uri(self) -> tuple[str, str]:
        return f"sqlite:///{self.path}.missing/secret-dir/x.db", "nothing-secret-here"

    def commits_in_flight(self, store: Any) -> None:
        # Quick commits finish before store_invite's caller sees its Deferred
        # (SQLiteDirectWriteTests); slow ones run in the commit thread.
        _slow_commits(store._direct_writer)

    def explain(self, statement: str, args: tuple[Any, ...]) -> str:
        return repr(self.raw(f"EXPLAIN QUERY PLAN {statement}", args))

    async def test_wal_mode(self) -> None:
        """The SQLite file is in WAL mode after opening, so readers do not block the writer."""
        await self.open()
        self.assertEqual(self.raw("PRAGMA journal_mode"), [("wal",)])

    async def test_memory_database(self) -> None:
        """sqlite:///:memory: gives a working private store on its single connection."""
        store = await open_store("sqlite:///:memory:", reactor=reactor)
        self.addCleanup(store.close)
        await store.add_local_user("@a:local.example")
        self.assertEqual(await store.list_local_users(), ["@a:local.example"])
        self.assertEqual(await store.schema_version(), LATEST_SCHEMA_VERSION)

    async def test_direct_connections_open_with_the_store(self) -> None:
        """The direct writer's and reader's connections open with the store, before any
        invite: opened later they could open a file restored over the path since
        (https://sqlite.org/howtocorrupt.html, 1.4)."""
        store = await self.open()
        self.assertIsNotNone(store._direct_writer._connection)
        self.assertIsNotNone(store._direct_reader._connection)

    async def test_after_the_file_is_lost_writes_refused_reads_served(self) -> None:
        """The database file deleted under an open store: the write that finds it fails and
        retires the direct writer (nothing more goes to the lost file's WAL), every later write
        is refused and reads still answer (Dialect.check_file runs after write commits only)."""
        store = await self.open()
        await store.store_invite(make_invite("$first"))
        os.remove(self.path)
        with self.assertRaises(StoreError):
            await store.store_invite(make_invite("$second"))
        self.assertFalse(store._direct_writer.usable)
        self.assertEqual((await store.get_invite("$first")).event_id, "$first")
        self.assertIn("$first", [r.event_id for r in await store.list_invites()])
        self.assertFalse(await store.is_local_user("@a:local.example"))
        self.assertEqual(await store.list_local_users(), [])
        self.assertEqual(await store.list_invite_rules("@a:local.example"), [])
        rule = InviteRule("@a:local.example", "user", "@*:spam.example", "block")
        for write in (
            lambda: store.store_invite(make_invite("$third")),  # through the pool now
            lambda: store.set_invite_status("$first", "ignored"),
            lambda: store.add_local_user("@a:local.example"),
            lambda: store.remove_local_user("@a:local.example"),
            lambda: store.add_invite_rule(rule),
            lambda: store.remove_invite_rule(rule),
        ):
            with self.assertRaises(StoreError):
                await write()

    async def test_open_store_without_a_reactor_uses_the_global_one(self) -> None:
        """open_store(uri) without reactor= runs on the global reactor."""
        store = await open_store(self.uri)
        self.addCleanup(store.close)
        self.assertIs(store._reactor, reactor)


class SQLiteDirectWriteTests(TestCase):
    """SQLite invites: INSERTs on the reactor thread, COMMIT there too while commits
    are quick, else in the writer's own thread; invitee states read on the reactor
    thread."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="fi-store-")
        self.addCleanup(_remove_tree, directory)
        self.path = os.path.join(directory, "store.db")
        self.uri = f"sqlite:///{self.path}"

    async def open(self) -> Any:
        store = await open_store(self.uri, reactor=reactor)
        self.addCleanup(store.close)
        return store

    def _record_commits(self, writer: Any) -> list[str]:
        """The name of the thread each COMMIT runs in, in order."""
        commits: list[str] = []
        original = writer._commit

        def commit() -> None:
            commits.append(threading.current_thread().name)
            original()

        writer._commit = commit
        return commits

    async def test_invitee_states_after_close_refused(self) -> None:
        """invitee_states on a closed store is refused as every other operation is
        (RuntimeError), not answered from the direct reader, which close() closed: it
        reopened a connection to the file that nothing closed."""
        store = await self.open()
        self.assertEqual(
            await store.invitee_states(["@a:example.org"]), {"@a:example.org": (False, [])}
        )
        await store.close()
        with self.assertRaises(RuntimeError) as raised:
            store.invitee_states(["@a:example.org"])
        self.assertEqual(str(raised.exception), "invitee_states on a closed store")
        self.assertIsNone(store._direct_reader._connection)

    async def test_quick_commits_run_on_the_reactor_thread_once_per_iteration(self) -> None:
        """Quick commits: the invites handed over in one reactor iteration are committed
        together at its end, on the reactor thread (no thread is started), and another
        connection sees every row as soon as the callers are answered."""
        store = await self.open()
        writer = store._direct_writer
        commits = self._record_commits(writer)
        records = [make_invite(f"$e{i}") for i in range(40)]
        storing = [store.store_invite(r) for r in records]
        self.assertFalse(any(d.called for d in storing))  # not before the iteration ends
        answers = await gatherResults(storing)
        self.assertEqual([created for _, created in answers], [True] * 40)
        self.assertEqual(commits, [threading.current_thread().name])
        self.assertIsNone(writer._threads)
        self.assertTrue(writer.commits_on_reactor)
        self.assertEqual(raw_sqlite(self.path, "SELECT COUNT(*) FROM invites"), [(40,)])

    async def test_invites_stored_one_after_another_do_not_grow_the_stack(self) -> None:
        """A caller storing invites one after another, each once the previous is answered,
        while commits run on the reactor thread: each is still written at once (no reactor
        iteration between them), but not from inside the previous batch's callbacks, so
        the stack stays flat (it grew a batch per invite, and past ~245 invites
        store_invite failed with CanonicalJSONError 'value is nested too deeply')."""
        store = await self.open()
        store._direct_writer.timer = lambda: 0.0  # every commit quick: stays on the reactor
        iterations: list[None] = []
        depths = []
        for n in range(300):
            self.assertEqual((await store.store_invite(make_invite(f"$seq{n}")))[1], True)
            depths.append(len(inspect.stack(0)))
            self.assertLess(depths[-1] - depths[0], 20, f"after {n + 1} invites")
            if n == 0:
                reactor.callLater(0, iterations.append, None)
        self.assertEqual(iterations, [])
        self.assertTrue(store._direct_writer.commits_on_reactor)
        self.assertEqual(raw_sqlite(self.path, "SELECT COUNT(*) FROM invites"), [(300,)])

    async def test_a_long_sequence_lets_the_reactor_run(self) -> None:
        """A caller storing invites one after another does not hold the reactor for the
        whole sequence: past MAX_BATCHES_AT_ONCE batches answered at once, the rest waits
        for the end of the reactor iteration, so other work runs (here: within 3,000)."""
        store = await self.open()
        store._direct_writer.timer = lambda: 0.0  # every commit quick: stays on the reactor
        iterations: list[None] = []
        for n in range(3000):
            self.assertEqual((await store.store_invite(make_invite(f"$long{n}")))[1], True)
            if n == 0:
                reactor.callLater(0, iterations.append, None)
        self.assertEqual(iterations, [None])
        self.assertEqual(raw_sqlite(self.path, "SELECT COUNT(*) FROM invites"), [(3000,)])

    async def test_a_caller_retrying_at_once_does_not_hang_the_reactor(self) -> None:
        """Writes failing before they reach a thread (every INSERT fails here) and a caller
        retrying at once from its errback: the reactor still gets a turn (it spun for ever,
        each retry queued and written in the same loop)."""
        store = await self.open()
        store._direct_writer.timer = lambda: 0.0
        original = store._store_invites_txn

        def txn(cursor: Any, rows: list[tuple[Any, ...]]) -> Any:
            if rows[0][0] == "$first":
                return original(cursor, rows)
            raise StoreError("store_invite", "disk I/O error")

        store._store_invites_txn = txn
        ticked: Deferred[None] = Deferred()
        finished: Deferred[None] = Deferred()
        tries = 0

        def attempt(_: object = None) -> None:
            nonlocal tries
            tries += 1
            if ticked.called or tries > 5000:  # without the bound, a hang but for this
                if not finished.called:
                    finished.callback(None)
                return
            store.store_invite(make_invite("$retry")).addErrback(attempt)

        def start(_: object) -> None:
            reactor.callLater(0, ticked.callback, None)
            attempt()

        await store.store_invite(make_invite("$first")).addCallback(start)
        await finished
        self.assertLess(tries, 5000, "the reactor never ran while the caller retried")
        self.assertEqual(raw_sqlite(self.path, "SELECT event_id FROM invites"), [("$first",)])

    async def test_close_during_a_long_sequence(self) -> None:
        """close() while a caller stores invites one after another past the bound returns
        (it writes what waited for the iteration's end, at most the bound again), the
        caller's next invite is told the store was closed, and nothing is written or
        scheduled after it."""
        store = await self.open()
        store._direct_writer.timer = lambda: 0.0
        stored = 0
        refused: list[Failure] = []

        closed: Deferred[None] = Deferred()

        def next_invite(_: object = None) -> None:
            nonlocal stored
            if _ is not None:
                stored += 1
            if stored == 1:
                reactor.callLater(0, lambda: store.close().chainDeferred(closed))
            elif stored == 5000:  # without the bound, close() never returned but for this
                return
            storing = store.store_invite(make_invite(f"$close{stored}"))
            storing.addCallbacks(next_invite, refused.append)

        next_invite()
        await closed
        self.assertLess(stored, 5000)
        self.assertIsNone(store._scheduled_write)
        self.assertEqual(
            [f.getErrorMessage() for f in refused], ["store_invite failed: the store was closed"]
        )
        self.assertEqual(raw_sqlite(self.path, "SELECT COUNT(*) FROM invites"), [(stored,)])
        await deferLater(reactor, 0.05)
        self.assertEqual(raw_sqlite(self.path, "SELECT COUNT(*) FROM invites"), [(stored,)])
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_slow_commits_move_to_the_commit_thread_and_back(self) -> None:
        """Commits taking milliseconds (a slow disk) move to the writer's thread once the
        median of the last few passes REACTOR_COMMIT_SECONDS, so the reactor goes on
        meanwhile. One in _PROBE_EVERY + 1 still runs on the reactor thread, timed: once
        those are quick again, commits come back to the reactor thread."""
        store = await self.open()
        writer = store._direct_writer
        commits = self._record_commits(writer)
        durations = _fake_commit_durations(writer, 0.005)
        here = threading.current_thread().name
        for index in range(15):
            self.assertEqual((await store.store_invite(make_invite(f"$slow{index}")))[1], True)
        # Five commits timed before the median counts, then the thread.
        self.assertEqual(commits[:5], [here] * 5)
        self.assertNotIn(here, commits[5:])
        self.assertFalse(writer.commits_on_reactor)
        self.assertAlmostEqual(writer.recent_commit_seconds, 0.005)
        durations[0] = 0.0002
        before = len(commits)
        index = 0
        while not writer.commits_on_reactor:
            await store.store_invite(make_invite(f"$quick{index}"))
            index += 1
            self.assertLess(index, 400)
        # Probes every _PROBE_EVERY thread commits; five quick ones outvote the slow.
        probes = [i for i, name in enumerate(commits[before:]) if name == here]
        self.assertEqual(len(probes), 5)
        self.assertEqual(probes[0], _PROBE_EVERY - 10)
        self.assertEqual([b - a for a, b in itertools.pairwise(probes)], [_PROBE_EVERY + 1] * 4)
        await store.store_invite(make_invite("$back"))
        self.assertEqual(commits[-1], here)
        self.assertEqual(writer._probe_every, _PROBE_EVERY)
        self.assertAlmostEqual(writer.recent_commit_seconds, 0.0002)
        self.assertEqual(raw_sqlite(self.path, "SELECT COUNT(*) FROM invites"), [(15 + index + 1,)])

    async def test_probes_of_a_disk_that_stays_slow_grow_apart(self) -> None:
        """Commits slow for good: each probe on the reactor thread that is still slow
        doubles the number of commits in the thread before the next one."""
        store = await self.open()
        writer = store._direct_writer
        commits = self._record_commits(writer)
        _fake_commit_durations(writer, 0.005)
        here = threading.current_thread().name
        for index in range(5 + 32 + 1 + 64 + 1 + 128 + 1 + 10):
            await store.store_invite(make_invite(f"$slow{index}"))
        probes = [i for i, name in enumerate(commits) if name == here]
        self.assertEqual(probes, [0, 1, 2, 3, 4, 37, 102, 231])
        self.assertEqual(writer._probe_every, 256)
        self.assertFalse(writer.commits_on_reactor)

    async def test_close_writes_the_batch_waiting_for_the_iteration_end(self) -> None:
        """close() right after store_invite (quick commits, the batch not started yet):
        the batch is written and its callers answered, as if the store had been idle."""
        store = await open_store(self.uri, reactor=reactor)
        storing = [store.store_invite(make_invite(f"$last{i}")) for i in range(3)]
        await store.close()
        self.assertEqual([(await d)[1] for d in storing], [True] * 3)
        self.assertEqual(raw_sqlite(self.path, "SELECT COUNT(*) FROM invites"), [(3,)])

    async def test_close_from_a_callback_of_the_batch_it_writes(self) -> None:
        """A caller answered by the batch close() writes, closing the store itself:
        the store is closed once, that inner close() returns a fired Deferred, and the
        answer stands."""
        store = await open_store(self.uri, reactor=reactor)
        closes: list[object] = []

        def close_again(result: Any) -> Any:
            closes.append(store.close())
            return result

        storing = store.store_invite(make_invite("$a")).addCallback(close_again)
        await store.close()
        self.assertEqual((await storing)[1], True)
        self.assertEqual(len(closes), 1)
        self.assertIsInstance(closes[0], Deferred)  # IStore.close returns a Deferred
        self.assertTrue(closes[0].called)
        self.assertIsNone(store._direct_writer._connection)

    async def _check_failed_commit(self, slow: bool) -> None:
        store = await self.open()
        writer = store._direct_writer
        await store.store_invite(make_invite("$first"))  # the writer's connection is open
        if slow:
            _slow_commits(writer)

        class FailingCommit:
            def __init__(self, real: sqlite3.Connection) -> None:
                self.real = real

            def execute(self, statement: str, *args: Any) -> Any:
                if statement == "COMMIT":
                    writer._connection = self.real
                    raise sqlite3.OperationalError("database or disk is full")
                return self.real.execute(statement, *args)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.real, name)

        writer._connection = FailingCommit(writer._connection)
        with self.assertRaises(StoreError) as caught:
            await store.store_invite(make_invite("$lost"))
        self.assertIn("database or disk is full", str(caught.exception))
        self.assertEqual(writer._threads is not None, slow)
        # The transaction was rolled back: the writer's connection is idle again (not
        # holding the write lock until the next batch).
        self.assertFalse(writer._connection.in_transaction)
        self.assertEqual(
            await store.store_invite(make_invite("$kept")), (make_invite("$kept"), True)
        )
        self.assertEqual(
            raw_sqlite(self.path, "SELECT event_id FROM invites ORDER BY event_id"),
            [("$first",), ("$kept",)],
        )

    async def test_failed_commit_fails_the_batch_and_the_next_one_works(self) -> None:
        """A COMMIT that fails (disk full...) on the reactor thread: StoreError for the
        batch, nothing stored; the next batch starts clean and is stored."""
        await self._check_failed_commit(slow=False)

    async def test_failed_commit_in_the_thread_fails_the_batch_and_the_next_one_works(
        self,
    ) -> None:
        """The same with slow commits, which run in the commit thread."""
        await self._check_failed_commit(slow=True)

    async def test_failed_insert_rolls_back(self) -> None:
        """An INSERT failing on the reactor thread: StoreError, rolled back, the next works."""
        store = await self.open()
        original = store._store_invites_txn

        def failing(txn: Any, rows: Any) -> Any:
            store._store_invites_txn = original
            original(txn, rows)
            raise sqlite3.IntegrityError("simulated")

        store._store_invites_txn = failing
        with self.assertRaises(StoreError):
            await store.store_invite(make_invite("$rolled-back"))
        self.assertFalse(store._direct_writer._connection.in_transaction)
        await store.store_invite(make_invite("$next"))
        self.assertEqual(
            raw_sqlite(self.path, "SELECT event_id FROM invites ORDER BY event_id"), [("$next",)]
        )

    async def test_transaction_left_open_abandoned_by_the_next_batch(self) -> None:
        """A transaction left open on the writer's connection (a ROLLBACK that failed): the
        next batch rolls it back and starts its own (BEGIN IMMEDIATE inside it would fail),
        so the invite is stored and the leftover's writes are not."""
        store = await self.open()
        await store.store_invite(make_invite("$first"))  # the writer's connection is open
        writer = store._direct_writer
        writer._connection.execute("BEGIN")
        writer._connection.execute("INSERT INTO local_users (user_id) VALUES ('@left:over')")
        self.assertEqual((await store.store_invite(make_invite("$next")))[1], True)
        self.assertFalse(writer._connection.in_transaction)
        self.assertEqual(raw_sqlite(self.path, "SELECT COUNT(*) FROM invites"), [(2,)])
        self.assertEqual(raw_sqlite(self.path, "SELECT user_id FROM local_users"), [])

    async def test_commits_over_a_millisecond_leave_the_reactor_thread(self) -> None:
        """REACTOR_COMMIT_SECONDS is a millisecond: commits of 0.9 ms stay on the reactor
        thread; once the median of the last nine is 1.5 ms they go to the commit thread."""
        self.assertEqual(REACTOR_COMMIT_SECONDS, 0.001)
        store = await self.open()
        writer = store._direct_writer
        durations = _fake_commit_durations(writer, 0.0009)
        for index in range(10):
            await store.store_invite(make_invite(f"$quick{index}"))
        self.assertTrue(writer.commits_on_reactor)
        durations[0] = 0.0015
        for index in range(4):
            await store.store_invite(make_invite(f"$slow{index}"))
            self.assertTrue(writer.commits_on_reactor)  # still outvoted: 5 of 9 at 0.9 ms
        await store.store_invite(make_invite("$slow4"))
        self.assertFalse(writer.commits_on_reactor)
        self.assertAlmostEqual(writer.recent_commit_seconds, 0.0015)

    async def test_lock_held_elsewhere_falls_back_to_the_pool(self) -> None:
        """Another connection holds the write lock: the reactor thread does not wait for it;
        the pool's thread does, and the invite is stored once the lock is released."""
        store = await self.open()
        other = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        storing = store.store_invite(make_invite("$waited"))
        # Returned at once: waiting for the lock here would take the busy timeout
        # (10 s), as the release below cannot run while the reactor thread waits.
        # 1 s leaves room for a loaded machine (a tighter bound is a flaky test).
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertFalse(storing.called)
        reactor.callLater(0.2, other.execute, "ROLLBACK")
        self.assertEqual((await storing)[1], True)
        self.assertEqual(raw_sqlite(self.path, "SELECT COUNT(*) FROM invites"), [(1,)])

    async def test_memory_database_uses_the_pool(self) -> None:
        """sqlite:///:memory: is private to the pool's connection: no writer or reader is
        used (another connection would see another, empty database)."""
        store = await open_store("sqlite:///:memory:", reactor=reactor)
        self.addCleanup(store.close)
        self.assertEqual((await store.store_invite(make_invite()))[1], True)
        self.assertFalse(store._direct_writer.usable)
        self.assertEqual(len(await store.list_invites()), 1)
        await store.add_local_user("@a:local.example")
        states = await store.invitee_states(["@a:local.example"])
        self.assertEqual(states, {"@a:local.example": (True, [])})
        self.assertFalse(store._direct_reader.usable)

    async def test_invitee_states_read_on_the_reactor_thread(self) -> None:
        """Invitee states are read at once, on this thread, without the pool; a change
        committed by another connection is seen by the next read."""
        store = await self.open()
        user, other_user = "@a:local.example", "@b:local.example"
        rule = InviteRule(user, "user", "@x:*", "block")
        await store.add_local_user(user)
        await store.add_invite_rule(rule)

        def no_pool(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("read through the pool")

        self.patch(store._pool, "runInteraction", no_pool)
        reading = store.invitee_states([user, other_user])
        self.assertTrue(reading.called)
        self.assertEqual(await reading, {user: (True, [rule]), other_user: (False, [])})
        raw_sqlite(self.path, "INSERT INTO local_users (user_id) VALUES (?)", (other_user,))
        self.assertEqual(await store.invitee_states([other_user]), {other_user: (True, [])})
        # The reader's connection cannot write.
        with self.assertRaises(sqlite3.OperationalError):
            store._direct_reader._connection.execute("DELETE FROM local_users")

    def _failing_reader(self, store: Any, message: str) -> None:
        real = store._direct_reader._connection

        class Failing:
            def execute(self, statement: str, *args: Any) -> Any:
                store._direct_reader._connection = real
                raise sqlite3.OperationalError(message)

        store._direct_reader._connection = Failing()

    async def test_busy_direct_read_goes_through_the_pool(self) -> None:
        """SQLite busy for the reader: the same read goes through the pool, which waits."""
        store = await self.open()
        await store.add_local_user("@a:local.example")
        await store.invitee_states(["@a:local.example"])  # the reader's connection is open
        self._failing_reader(store, "database is locked")
        through_pool: list[object] = []
        original = store._pool.runInteraction

        def counted(*args: Any, **kwargs: Any) -> Any:
            through_pool.append(args[0])
            return original(*args, **kwargs)

        self.patch(store._pool, "runInteraction", counted)
        states = await store.invitee_states(["@a:local.example"])
        self.assertEqual(states, {"@a:local.example": (True, [])})
        self.assertEqual(len(through_pool), 1)
        self.assertTrue(store._direct_reader.usable)

    async def test_failed_direct_read_is_a_store_error(self) -> None:
        """Any other error of the reader: StoreError naming it; the next read works."""
        store = await self.open()
        await store.invitee_states(["@a:local.example"])
        self._failing_reader(store, "disk I/O error")
        with self.assertRaises(StoreError) as caught:
            await store.invitee_states(["@a:local.example"])
        self.assertIn("disk I/O error", str(caught.exception))
        self.assertEqual(
            await store.invitee_states(["@a:local.example"]), {"@a:local.example": (False, [])}
        )

    async def test_checkpoints_stay_sqlite_own(self) -> None:
        """The writer leaves checkpoints to SQLite (in the COMMIT past 1,000 pages of
        WAL): the WAL does not grow without bound."""
        store = await self.open()
        await store.store_invite(make_invite("$a"))
        writer = store._direct_writer
        (pages,) = writer._connection.execute("PRAGMA wal_autocheckpoint").fetchone()
        self.assertEqual(pages, 1000)

    async def test_reactor_shutdown_stops_the_commit_thread(self) -> None:
        """A store never closed: the reactor's shutdown stops the thread (which would keep
        the process alive) and later batches go through the pool."""
        store = await self.open()
        writer = store._direct_writer
        _slow_commits(writer)
        await store.store_invite(make_invite("$a"))
        threads = writer._threads
        trigger = writer._shutdown_trigger
        self.assertIsNotNone(trigger)
        writer._shut_down()  # what the reactor's "during shutdown" trigger calls
        reactor.removeSystemEventTrigger(trigger)
        self.assertFalse(threads.started)
        self.assertFalse(writer.usable)
        self.assertEqual((await store.store_invite(make_invite("$b")))[1], True)
        self.assertIsNone(writer._threads)

    async def test_close_stops_the_commit_thread(self) -> None:
        """close() stops the writer's thread and connection, and closes the reader's."""
        store = await open_store(self.uri, reactor=reactor)
        writer = store._direct_writer
        _slow_commits(writer)
        await store.store_invite(make_invite())
        self.assertIsNotNone(writer._threads)
        await store.invitee_states(["@a:local.example"])
        reader = store._direct_reader
        self.assertIsNotNone(reader._connection)
        await store.close()
        self.assertIsNone(writer._threads)
        self.assertIsNone(writer._connection)
        self.assertIsNone(reader._connection)

    async def _close_during_a_stuck_commit(self) -> tuple[Any, Any, Any, threading.Event]:
        """A store whose COMMIT in the commit thread waits on an Event (a stalled fsync),
        closed meanwhile: (writer, the invite's Deferred, close()'s, the Event)."""
        store = await open_store(self.uri, reactor=reactor)
        writer = store._direct_writer
        await store.store_invite(make_invite("$first"))  # the writer's connection is open
        _slow_commits(writer)
        entered, release = threading.Event(), threading.Event()
        # Should close() join the thread here, the test fails rather than hangs.
        safety = threading.Timer(10, release.set)
        safety.start()
        self.addCleanup(safety.cancel)
        self.addCleanup(release.set)
        original = writer._commit

        def stalled() -> None:
            entered.set()
            release.wait()
            original()

        writer._commit = stalled
        storing = store.store_invite(make_invite("$stalled"))
        await deferToThread(entered.wait)
        closing = store.close()
        self.assertFalse(release.is_set())  # close() returned while the COMMIT ran
        return writer, storing, closing, release

    async def test_close_waits_for_a_commit_off_the_reactor_thread(self) -> None:
        """close() during a thread COMMIT returns at once, fires and closes after the COMMIT."""
        writer, storing, closing, release = await self._close_during_a_stuck_commit()
        self.assertNoResult(closing)
        self.assertIsNotNone(writer._connection)
        release.set()
        await closing
        self.assertEqual((await storing)[1], True)
        self.assertIsNone(writer._threads)
        self.assertIsNone(writer._connection)
        self.assertEqual(raw_sqlite(self.path, "SELECT COUNT(*) FROM invites"), [(2,)])

    async def test_close_abandons_a_commit_stuck_too_long(self) -> None:
        """close() abandons a COMMIT stuck past CLOSE_WAIT_SECONDS (logged), closing after it."""
        from federation_invite.store import _base

        self.patch(_base, "CLOSE_WAIT_SECONDS", 0)
        with capturedLogs() as events:
            writer, storing, closing, release = await self._close_during_a_stuck_commit()
            await closing
        self.assertFalse(release.is_set())
        self.assertIn(
            "queries still running after 0 s are cancelled and abandoned",
            "\n".join(formatEvent(event) for event in events),
        )
        self.assertIsNotNone(writer._connection)
        release.set()
        self.assertEqual((await storing)[1], True)
        deadline = time.monotonic() + 10
        while writer._connection is not None:
            self.assertLess(time.monotonic(), deadline, "the connection was never closed")
            await deferLater(reactor, 0.01)


class SQLiteInviteWriterTests(SynchronousTestCase):
    """The SQLite writer on its own, on a fake clock."""

    def wal_file(self) -> str:
        path = os.path.abspath(self.mktemp()) + ".db"
        setup = sqlite3.connect(path, isolation_level=None)
        setup.execute("PRAGMA journal_mode = WAL")
        setup.close()
        return path

    def writer(self, file_replaced: Any = lambda: False) -> SQLiteInviteWriter:
        self.clock = Clock()
        writer = SQLiteInviteWriter(self.wal_file(), file_replaced, self.clock)
        writer.open()
        self.addCleanup(lambda: writer.close()())
        return writer

    def test_batch_runs_at_the_end_of_this_iteration(self) -> None:
        """call_later runs its work once the current reactor iteration is done (a delay of
        0), not a moment later: a quick commit does not hold its invites' answers."""
        writer = self.writer()
        calls: list[None] = []
        writer.call_later(lambda: calls.append(None))
        self.assertEqual(calls, [])
        self.clock.advance(0)
        self.assertEqual(calls, [None])

    def test_probe_wait_doubles_up_to_4096_commits(self) -> None:
        """Each probe of a disk still slow doubles the commits in the thread before the next
        one, up to _PROBE_EVERY_MAX, 4096 (a probe every 4096 commits), and no further."""
        self.assertEqual(_PROBE_EVERY_MAX, 4096)
        writer = self.writer()
        _fake_commit_durations(writer, 0.005)
        for _ in range(5):
            writer.begin()
            self.assertTrue(writer.commit().called)
        self.assertFalse(writer.commits_on_reactor)
        for waited, after in ((1024, 2048), (2048, 4096), (4096, 4096)):
            writer._probe_every = writer._in_thread = waited
            self.assertIsNotNone(writer.begin())
            self.assertTrue(writer.commit().called)  # the probe, on this thread
            self.assertEqual((writer._in_thread, writer._probe_every), (0, after))

    def test_file_replaced_while_opening_not_used(self) -> None:
        """The file found replaced once the connection is open (after the check before it):
        the connection is closed, usable turns False and begin() sends the batch to the pool
        (None), as when the file was replaced before."""
        checks: list[None] = []

        def replaced() -> bool:  # from the second check on
            checks.append(None)
            return len(checks) > 1

        writer = self.writer(replaced)
        self.assertEqual(len(checks), 2)
        self.assertFalse(writer.usable)
        self.assertIsNone(writer._connection)
        self.assertIsNone(writer.begin())


def _fake_commit_durations(writer: Any, seconds: float) -> list[float]:
    """Make every COMMIT of ``writer`` seem to take ``durations[0]`` seconds (a list
    the caller may change later)."""
    durations = [seconds]
    now = [0.0]

    def timer() -> float:
        # Called before and after each commit: each call moves time on by a commit.
        now[0] += durations[0]
        return now[0]

    writer.timer = timer
    return durations


def _slow_commits(writer: Any) -> None:
    """Make ``writer``'s commits slow from now on: they run in its commit thread."""
    writer.commits_on_reactor = False
    _fake_commit_durations(writer, 1.0)


class PostgresStoreTests(StoreTestsMixin, TestCase):
    """The suite on a fresh PostgreSQL database per test."""

    def setUp(self) -> None:
        from ._support import POSTGRES_BASE, fresh_postgres_database

        self.database = fresh_postgres_database(self)
        self.uri = f"{POSTGRES_BASE}/{self.database}"

    def raw(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return raw_postgres(self.database, statement, args)

    def table_names(self) -> set[str]:
        rows = self.raw(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        return {name for (name,) in rows}

    def failing_uri(self) -> tuple[str, str]:
        return (
            "postgresql://postgres:Sup3rSecretPw@127.0.0.1:5432/fi_missing_database_xyz",
            "Sup3rSecretPw",
        )

    def explain(self, statement: str, args: tuple[Any, ...]) -> str:
        import psycopg2

        from ._support import POSTGRES_BASE

        connection = psycopg2.connect(f"{POSTGRES_BASE}/{self.database}")
        try:
            cursor = connection.cursor()
            cursor.execute("SET enable_seqscan = off")
            cursor.execute(f"EXPLAIN {statement.replace('?', '%s')}", args)
            return "\n".join(row[0] for row in cursor.fetchall())
        finally:
            connection.close()

    async def test_postgres_scheme_alias(self) -> None:
        """postgres:// is accepted as well as postgresql://."""
        store = await open_store(self.uri.replace("postgresql://", "postgres://"), reactor=reactor)
        self.addCleanup(store.close)
        self.assertEqual(await store.schema_version(), LATEST_SCHEMA_VERSION)

    async def settings(self, store: Any) -> tuple[str, str]:
        """lock_timeout and statement_timeout as one of ``store``'s connections has them."""

        def show(txn: Any) -> tuple[str, str]:
            txn.execute(
                "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')"
            )
            return tuple(txn.fetchone())

        return await store._pool.runInteraction(show)  # type: ignore[no-any-return]

    async def test_lost_connections_replaced_before_an_operation_fails(self) -> None:
        """Connections the server ended (pg_terminate_backend, a restart): each operation
        that finds its connection lost before any statement of it ran is run once more on a
        new connection, so none fails, and nothing is logged (no "Rollback failed")."""
        store = await self.open()
        # Several at once, so that several of the pool's connections are open.
        await gatherResults([store.list_local_users() for _ in range(10)])
        with capturedLogs() as events:
            ended = self.raw(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            self.assertGreaterEqual(len(ended), 1)
            for _ in range(3):
                results = await gatherResults([store.list_local_users() for _ in range(10)])
                self.assertEqual(results, [[]] * 10)
        self.assertEqual(
            [
                formatEvent(event)
                for event in events
                if "log_failure" in event or "failure" in event
            ],
            [],
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_idle_session_timeout(self) -> None:
        """With idle_session_timeout (the server ending idle connections), an operation
        after an idle period is served on a new connection, not failed."""
        self.raw(f'ALTER DATABASE "{self.database}" SET idle_session_timeout = 200')
        store = await self.open()
        await gatherResults([store.list_local_users() for _ in range(5)])
        for n in range(3):
            await deferLater(reactor, 0.5, lambda: None)
            await store.add_local_user(f"@u{n}:example.org")
            self.assertEqual(len(await store.list_local_users()), n + 1)

    async def test_lost_connection_reruns_only_what_had_not_run(self) -> None:
        """Run once more on a new connection: only a transaction whose connection was found
        lost at its first statement; one lost after a statement ran fails as it is (a write
        an operator ended on purpose is not redone)."""
        store = await self.open()
        runs: list[int] = []

        def first_statement_on_a_lost_connection(txn: Any) -> int:
            runs.append(1)
            if len(runs) == 1:
                ended = self.raw(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                self.assertGreaterEqual(len(ended), 1)
            txn.execute("SELECT 1")
            return int(txn.fetchone()[0])

        self.assertEqual(await store._pool.runInteraction(first_statement_on_a_lost_connection), 1)
        self.assertEqual(len(runs), 2)
        del runs[:]

        def lost_after_a_statement(txn: Any) -> None:
            runs.append(1)
            txn.execute("SELECT 1")
            txn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        import psycopg2

        with self.assertRaises(psycopg2.OperationalError):
            await store._pool.runInteraction(lost_after_a_statement)
        self.assertEqual(len(runs), 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_lock_and_statement_timeouts(self) -> None:
        """Each connection waits at most 10 s for a lock and runs a statement at most 30 s,
        unless the URI's options (or PGOPTIONS), the database's or the role's settings
        give their own limit (0, for ever, too), which is kept."""
        store = await self.open()
        self.assertEqual(await self.settings(store), ("10s", "30s"))
        await store.close()
        self.raw(f'ALTER DATABASE "{self.database}" SET statement_timeout = 0')
        store = await open_store(f"{self.uri}?options=-c%20lock_timeout%3D1234", reactor=reactor)
        self.addCleanup(store.close)
        self.assertEqual(await self.settings(store), ("1234ms", "0"))

    async def test_timeouts_hold_per_transaction(self) -> None:
        """The default limits are the transaction's own (SET LOCAL), as through a pooler in
        transaction mode: a server connection that lost them between transactions (a new
        one, a RESET) still has them in the next, and none is left on the connection
        between transactions for another client of a pooler to inherit."""
        store = await self.open()
        await gatherResults([Deferred.fromCoroutine(self.settings(store)) for _ in range(10)])
        connections = list(store._pool._idle)
        self.assertGreaterEqual(len(connections), 1)
        for connection in connections:
            cursor = connection.cursor()
            cursor.execute(
                "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')"
            )
            self.assertEqual(cursor.fetchone(), ("0", "0"))
            cursor.execute("SET SESSION lock_timeout = 0; SET SESSION statement_timeout = 0")
            connection.commit()
        for _ in range(3):
            self.assertEqual(
                await gatherResults(
                    [Deferred.fromCoroutine(self.settings(store)) for _ in range(10)]
                ),
                [("10s", "30s")] * 10,
            )

    def limited_role(self, limit: int) -> str:
        """A URI for a new non-superuser role (superusers ignore CONNECTION LIMIT) owning
        the test database, which takes at most ``limit`` connections; dropped after."""
        import secrets

        from ._support import POSTGRES_BASE, drop_postgres_database

        role = f"fi_test_role_{os.getpid()}_{secrets.token_hex(4)}"
        self.raw(f'CREATE ROLE "{role}" LOGIN')
        self.addCleanup(self.raw_admin, f'DROP ROLE IF EXISTS "{role}"')
        self.addCleanup(drop_postgres_database, self.database)  # before the role
        self.raw(f'ALTER DATABASE "{self.database}" OWNER TO "{role}"')
        self.raw(f'ALTER DATABASE "{self.database}" CONNECTION LIMIT {limit}')
        return POSTGRES_BASE.replace("//postgres@", f"//{role}@", 1) + f"/{self.database}"

    def raw_admin(self, statement: str) -> None:
        from ._support import _admin_connection

        connection = _admin_connection()
        try:
            connection.cursor().execute(statement)
        finally:
            connection.close()

    async def test_fewer_connections_than_the_pool_size(self) -> None:
        """A server that takes fewer connections than the pool's size (CONNECTION LIMIT,
        max_connections nearly used up): the operations that could not open one wait for
        one of the open ones, so none fails; only parallelism is lost."""
        uri = self.limited_role(2)
        store = await open_store(uri, reactor=reactor)
        self.addCleanup(store.close)
        for n in range(3):
            users = [f"@u{n}_{i}:example.org" for i in range(20)]
            await gatherResults([store.add_local_user(user) for user in users])
            results = await gatherResults([store.is_local_user(user) for user in users])
            self.assertEqual(results, [True] * 20)
        (sessions,) = self.raw(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
        self.assertLessEqual(sessions[0], 2)

    async def test_waits_for_a_shared_connection_past_the_connect_timeout(self) -> None:
        """Refused a second connection (CONNECTION LIMIT 1), an operation waits for the open
        one as long as another operation uses it, not only POSTGRES_CONNECT_TIMEOUT (here
        1 s): it runs once that operation (2.5 s) is over, instead of failing with the
        server's refusal."""
        from federation_invite.store import _dialect

        self.patch(_dialect, "POSTGRES_CONNECT_TIMEOUT", 1)
        uri = self.limited_role(1)
        store = await open_store(uri, reactor=reactor, pool_size=2)
        self.addCleanup(store.close)
        slow = store._run(  # type: ignore[attr-defined]
            "sleep", lambda txn: txn.execute("SELECT pg_sleep(2.5)"), write=False
        )
        # Until the slow operation holds the only connection.
        deadline = time.monotonic() + 10
        while not self.raw(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND strpos(query, 'pg_sleep(2.5)') > 0 AND state = 'active'"
        )[0][0]:
            self.assertLess(time.monotonic(), deadline, "the slow operation never ran")
            await deferLater(reactor, 0.05)
        started = time.monotonic()
        self.assertFalse(await store.is_local_user("@u:example.org"))
        self.assertGreater(time.monotonic() - started, 1.5)  # it did wait past the 1 s
        await slow

    async def test_pool_size(self) -> None:
        """The pool opens at most ``pool_size`` connections, however many operations run."""
        store = await self.open(pool_size=2)
        await gatherResults([store.add_local_user(f"@u{i}:example.org") for i in range(30)])
        (sessions,) = self.raw(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
        self.assertLessEqual(sessions[0], 2)
        self.assertEqual(len(await store.list_local_users()), 30)

    async def test_migration_waits_beyond_the_timeouts(self) -> None:
        """A migration waiting for another worker's (its lock) or running long is not cut
        by the default limits (here 0.2 s); the store's connections have them afterwards."""
        from federation_invite.store import _dialect

        self.patch(_dialect, "POSTGRES_LOCK_TIMEOUT", 0.2)
        self.patch(_dialect, "POSTGRES_STATEMENT_TIMEOUT", 0.2)
        other = _connect(self.database)
        other.autocommit = True
        self.addCleanup(other.close)
        other.cursor().execute("SELECT pg_advisory_lock(%s)", (_dialect.MIGRATION_LOCK_KEY,))
        reactor.callLater(
            1.0,
            other.cursor().execute,
            "SELECT pg_advisory_unlock(%s)",
            (_dialect.MIGRATION_LOCK_KEY,),
        )
        store = await self.open()
        self.assertEqual(await store.schema_version(), LATEST_SCHEMA_VERSION)
        self.assertEqual(await self.settings(store), ("200ms", "200ms"))

    async def test_schema_check_waits_for_a_migration(self) -> None:
        """open_store(migrate=False) (a worker or command that does not migrate) waits while
        another worker holds the migration lock, so the schema is read before or after a
        migration, never in between, and opens once that lock is released."""
        from federation_invite.store import _dialect

        await (await open_store(self.uri, reactor=reactor)).close()
        other = _connect(self.database)
        other.autocommit = True
        self.addCleanup(other.close)
        other.cursor().execute("SELECT pg_advisory_lock(%s)", (_dialect.MIGRATION_LOCK_KEY,))
        opening = open_store(self.uri, reactor=reactor, migrate=False)
        waiting = (
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        deadline = time.monotonic() + 30
        while not opening.called and not self.raw(waiting)[0][0]:
            self.assertLess(time.monotonic(), deadline, "the schema check never waited")
            await deferLater(reactor, 0.05)
        self.assertNoResult(opening)  # type: ignore[attr-defined]
        other.cursor().execute("SELECT pg_advisory_unlock(%s)", (_dialect.MIGRATION_LOCK_KEY,))
        store = await opening
        self.assertEqual(await store.schema_version(), LATEST_SCHEMA_VERSION)
        await store.close()

    async def test_close_does_not_wait_for_a_stuck_query(self) -> None:
        """close() with a write stuck on another session's lock (no limit set: it would
        wait for ever) waits CLOSE_WAIT_SECONDS (here 0.2 s), never on the reactor
        thread, then cancels it: close() has finished while the lock is still held, and
        the write fails, nothing stored. (The lock is released after 20 s regardless.)"""
        from federation_invite.store import _base, _dialect

        self.patch(_dialect, "POSTGRES_LOCK_TIMEOUT", 0)
        self.patch(_dialect, "POSTGRES_STATEMENT_TIMEOUT", 0)
        self.patch(_base, "CLOSE_WAIT_SECONDS", 0.2)
        store = await self.open()
        holder = _connect(self.database)
        self.addCleanup(holder.close)
        holder.cursor().execute("LOCK TABLE invites IN SHARE MODE")
        writing = store.store_invite(make_invite("$stuck"))
        # Until the write waits on the lock: a fixed pause was not enough on a loaded
        # machine, and a write sent after close()'s cancel would wait for ever.
        deadline = time.monotonic() + 30
        while not self.raw(
            "SELECT COUNT(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )[0][0]:
            self.assertLess(time.monotonic(), deadline, "the write never waited on the lock")
            await deferLater(reactor, 0.05)
        self.assertNoResult(writing)
        released: list[bool] = []
        safety = threading.Timer(20, lambda: (holder.rollback(), released.append(True)))
        safety.start()
        self.addCleanup(safety.cancel)
        await store.close()
        self.assertEqual(released, [])
        with self.assertRaises(StoreError) as raised:
            await writing
        self.assertIn("canceling statement due to user request", str(raised.exception))
        holder.rollback()
        self.assertEqual(self.raw("SELECT COUNT(*) FROM invites"), [(0,)])

    async def test_store_in_another_schema_reopened(self) -> None:
        """A store whose search_path names another schema (options=-csearch_path=fi, or
        the role's setting) is migrated there, and found migrated there when opened again
        (its tables looked for in current_schema(), not in public)."""
        from ._support import POSTGRES_BASE

        self.raw("CREATE SCHEMA fi")
        uri = f"{POSTGRES_BASE}/{self.database}?options=-csearch_path%3Dfi"
        for _ in range(2):
            store = await open_store(uri, reactor=reactor)
            await store.close()
        tables = self.raw(
            "SELECT table_schema FROM information_schema.tables"
            " WHERE table_name = 'federation_invite_schema'"
        )
        self.assertEqual(tables, [("fi",)])

    async def test_schema_of_its_own_in_an_applications_database(self) -> None:
        """The README's way into an application's database: a schema of its own named by
        ?options=-csearch_path%3D<schema>. With the application's invites table and
        golang-migrate's schema_migrations in public, the store is migrated into the
        schema and works end to end; public is left as it was."""
        from ._support import POSTGRES_BASE

        self.raw(
            "CREATE TABLE schema_migrations"
            " (version BIGINT NOT NULL PRIMARY KEY, dirty BOOLEAN NOT NULL)"
        )
        self.raw("INSERT INTO schema_migrations VALUES (3, false)")
        self.raw("CREATE TABLE invites (id INTEGER PRIMARY KEY, email TEXT)")
        self.raw("INSERT INTO invites VALUES (1, 'a@example.com')")
        self.raw("CREATE SCHEMA federation_invite")
        uri = f"{POSTGRES_BASE}/{self.database}?options=-csearch_path%3Dfederation_invite"
        store = await open_store(uri, reactor=reactor)
        self.addCleanup(store.close)
        self.assertEqual(await store.schema_version(), LATEST_SCHEMA_VERSION)
        await store.add_local_user("@alice:local.example")
        invite = make_invite("$shared")
        self.assertEqual(await store.store_invite(invite), (invite, True))
        self.assertEqual(await store.get_invite("$shared"), invite)
        self.assertEqual([r.event_id for r in await store.list_invites()], ["$shared"])
        self.assertEqual(self.table_names(), {"schema_migrations", "invites"})
        self.assertEqual(self.raw("SELECT * FROM schema_migrations"), [(3, False)])
        self.assertEqual(self.raw("SELECT * FROM invites"), [(1, "a@example.com")])
        ours = self.raw(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'federation_invite' ORDER BY table_name"
        )
        self.assertEqual(
            [name for (name,) in ours],
            ["federation_invite_schema", "invite_rules", "invites", "local_users", "server_keys"],
        )

    async def test_non_utf8_database_refused(self) -> None:
        """A database whose server_encoding is not UTF8 (LATIN1, SQL_ASCII), which could
        not hold every invite's text, is refused at open with one clear StoreError."""
        from ._support import POSTGRES_BASE

        for encoding in ("LATIN1", "SQL_ASCII"):
            database = create_postgres_database(
                f"ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
            )
            self.addCleanup(drop_postgres_database, database)
            uri = f"{POSTGRES_BASE}/{database}"
            with self.assertRaises(StoreError) as raised:
                await open_store(uri, reactor=reactor)
            self.assertEqual(
                str(raised.exception),
                f"connect failed: the database's encoding is {encoding}, not UTF8;"
                f" create it with ENCODING 'UTF8' [{uri}]",
            )

    async def test_client_encoding_is_utf8(self) -> None:
        """PGCLIENTENCODING or the URI's client_encoding naming another encoding does not
        stop an invite with text outside it (an emoji) from being stored and read back."""
        os.environ["PGCLIENTENCODING"] = "LATIN1"
        self.addCleanup(os.environ.pop, "PGCLIENTENCODING", None)
        for number, uri in enumerate((self.uri, f"{self.uri}?client_encoding=LATIN1")):
            store = await open_store(uri, reactor=reactor)
            self.addCleanup(store.close)
            invite = make_invite(
                f"$emoji{number}",
                event={"content": {"displayname": "\U0001f600 caf\u00e9"}},
            )
            self.assertEqual(await store.store_invite(invite), (invite, True))
            self.assertEqual(await store.get_invite(f"$emoji{number}"), invite)

    async def test_read_committed_whatever_the_database_default(self) -> None:
        """With default_transaction_isolation 'repeatable read' or 'serializable' on the
        database, an invite whose insert waited for another worker's insert of the same
        event_id is answered with that worker's row (READ COMMITTED, as the store's
        insert-then-select needs), not a serialization failure."""
        for number, level in enumerate(("repeatable read", "serializable")):
            self.raw(
                f"ALTER DATABASE \"{self.database}\" SET default_transaction_isolation = '{level}'"
            )
            store = await open_store(self.uri, reactor=reactor)
            self.addCleanup(store.close)
            event_id = f"$raced{number}"
            await store.store_invite(make_invite(f"$other{number}", received_ts=1))
            other = _connect(self.database)
            self.addCleanup(other.close)
            # Another worker's insert of the same event_id, not yet committed.
            other.cursor().execute(
                "UPDATE invites SET event_id = %s WHERE event_id = %s",
                (event_id, f"$other{number}"),
            )
            storing = store.store_invite(make_invite(event_id))
            deadline = time.monotonic() + 30
            while not self.raw(
                "SELECT COUNT(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )[0][0]:
                self.assertLess(time.monotonic(), deadline, "the insert never waited")
                await deferLater(reactor, 0.05)
            other.commit()
            self.assertEqual(await storing, (make_invite(event_id, received_ts=1), False))

    async def test_application_name(self) -> None:
        """The URI's application_name (or PGAPPNAME) names the connections; without one
        they are named federation-invite."""

        def show(txn: Any) -> str:
            txn.execute("SELECT current_setting('application_name')")
            return str(txn.fetchone()[0])

        for uri, name in (
            (f"{self.uri}?application_name=worker-7", "worker-7"),
            (self.uri, "federation-invite"),
        ):
            store = await open_store(uri, reactor=reactor)
            self.addCleanup(store.close)
            self.assertEqual(await store._pool.runInteraction(show), name)

    async def test_unix_socket(self) -> None:
        """The same server reached over its Unix socket (?host=the socket's directory)."""
        directory = os.environ.get("FEDERATION_INVITE_TEST_POSTGRES_SOCKET", "/var/run/postgresql")
        if not os.path.exists(os.path.join(directory, ".s.PGSQL.5432")):
            raise SkipTest(f"no PostgreSQL socket in {directory}")
        store = await open_store(
            f"postgresql://postgres@/{self.database}?host={directory}", reactor=reactor
        )
        self.addCleanup(store.close)
        record, created = await store.store_invite(make_invite("$over_the_socket"))
        self.assertTrue(created)
        self.assertEqual(await store.get_invite("$over_the_socket"), record)
        rows = self.raw("SELECT count(*) FROM invites WHERE event_id = ?", ("$over_the_socket",))
        self.assertEqual(rows, [(1,)])


def _connect(database: str) -> Any:
    """A psycopg2 connection of its own to ``database`` (a test's other session)."""
    import psycopg2

    from ._support import POSTGRES_BASE

    return psycopg2.connect(f"{POSTGRES_BASE}/{database}")


def _remove_tree(directory: str) -> None:
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
