"""Storage faults (issue #10, point 4), on the real stores: while the database is unavailable an
invite is answered 500 M_UNKNOWN with a clear log line, nothing signed is returned unless it was
stored, and service resumes by itself once the database is back.

SQLite: another connection holds the write lock (the busy timeout is shortened to 300 ms here).
PostgreSQL: the store's server processes are terminated (pg_terminate_backend) in the middle of a
write, and the database refuses connections for a while (ALLOW_CONNECTIONS false).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from federation_invite.auth import RequestAuthenticator
from federation_invite.inbound import InviteHandler, InviteLimits
from federation_invite.keyring import Keyring
from federation_invite.policy import InvitePolicy
from federation_invite.service import build_site_root
from federation_invite.signer import LocalSigner
from federation_invite.store import InviteRecord, IStore, StoreError, open_store
from federation_invite.store import _dialect as dialect_module
from federation_invite.web.invite import InviteResource
from federation_invite.web.keys import KeyServerResource
from federation_invite.web.tree import build_matrix_tree

from .figures import report
from .invites import BOB, US, InviteScenario, event_id_of
from .store._support import (
    POSTGRES_BASE,
    fresh_postgres_database,
    raw_sqlite,
)
from .support import local_verify_key


class RealStoreScenario(InviteScenario):
    """``InviteScenario`` with a real (SQLite or PostgreSQL) store in place of ``MemoryStore``."""

    def __init__(self, store: IStore, restart_of: RealStoreScenario | None = None) -> None:
        super().__init__(limits=InviteLimits(invitee_burst=1000))
        if restart_of is not None:
            # The same servers, keys and time, as after a restart of ours.
            self.clock, self.federation = restart_of.clock, restart_of.federation
            self.their_key, self.our_key = restart_of.their_key, restart_of.our_key
        self.store = store  # type: ignore[assignment]
        self.keyring = Keyring(
            self.clock, store, self.federation, local_keys=[local_verify_key(US, self.our_key)]
        )
        self.handler = InviteHandler(
            self.clock,
            US,
            RequestAuthenticator(self.clock, US, self.keyring),
            self.keyring,
            LocalSigner(US, self.our_key),
            store,
            InvitePolicy(US, store),
            limits=InviteLimits(invitee_burst=1000),
            listeners=[self.listened.append],
        )
        tree = build_matrix_tree(
            KeyServerResource(self.clock, US, [self.our_key]),
            {(b"federation", b"v2", b"invite"): InviteResource(self.handler, 2, 1_048_576)},
        )
        self.root = build_site_root(tree)
        self.client = StubTreq(self.root)


class StorageFaultMixin:
    """The shared steps; subclasses open the store and break the database."""

    timeout = 30
    s: RealStoreScenario

    async def start(self, store: IStore, restart_of: RealStoreScenario | None = None) -> None:
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        await store.add_local_user(BOB)
        self.s = RealStoreScenario(store, restart_of)
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)  # type: ignore[attr-defined]
        self.depth = 0
        self.assertEqual((await self.invite())[0], 200)  # type: ignore[attr-defined]

    def new_invite(self) -> tuple[Any, dict[str, Any]]:
        self.depth += 1
        return self.s.invite(extra={"depth": self.depth})

    async def invite(self, invite: tuple[Any, dict[str, Any]] | None = None) -> tuple[int, Any]:
        return await self.answer(self.send(invite or self.new_invite()))

    def send(self, invite: tuple[Any, dict[str, Any]]) -> Deferred[Any]:
        """Send ``invite``; the response once it comes (see ``answer``)."""
        room_version, event = invite
        return self.s.send(
            2,
            self.s.v2_body(room_version, event),
            room_id=event["room_id"],
            event_id=event_id_of(room_version, event),
        )

    async def answer(self, deferred: Deferred[Any], seconds: float = 20) -> tuple[int, Any]:
        results: list[Any] = []
        deferred.addBoth(results.append)
        for _ in range(int(seconds / 0.01)):
            self.s.client.flush()
            if results:
                response = results[0]
                content = await response.content()
                return response.code, json.loads(content)
            await deferLater(reactor, 0.01)
        raise AssertionError("no answer")

    async def stored(self, invite: tuple[Any, dict[str, Any]]) -> Any:
        room_version, event = invite
        return await self.s.store.get_invite(event_id_of(room_version, event))

    def assertStoreFailure(self, answer: tuple[int, Any]) -> None:
        """500 M_UNKNOWN, no event in the answer, and the log says which operation failed."""
        status, body = answer
        self.assertEqual((status, body.get("errcode")), (500, "M_UNKNOWN"), body)  # type: ignore[attr-defined]
        self.assertNotIn("event", body)  # type: ignore[attr-defined]
        reasons = [
            str(e.get("reason", ""))
            for e in self.logged
            if e.get("log_namespace") == "federation_invite.inbound"
            and e.get("log_level") is LogLevel.error
        ]
        # StoreError's text: "<operation> failed: <driver error> [<database, no password>]".
        self.assertRegex(reasons[-1], r"^[a-z_]+ failed: \w+")  # type: ignore[attr-defined]
        self.last_reason = reasons[-1]

    async def assertAcceptedOnce(
        self, invite: tuple[Any, dict[str, Any]], answer: tuple[int, Any]
    ) -> None:
        status, body = answer
        self.assertEqual(status, 200, body)  # type: ignore[attr-defined]
        record = await self.stored(invite)
        self.assertEqual(record.event, body["event"])  # type: ignore[attr-defined, union-attr]
        self.assertIn(US, body["event"]["signatures"])  # type: ignore[attr-defined]


class SQLiteStorageFaultTests(StorageFaultMixin, TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.patch(dialect_module, "SQLITE_BUSY_TIMEOUT_MS", 300)
        self.path = os.path.abspath(self.mktemp()) + ".db"
        await self.start(await open_store(f"sqlite:///{self.path}", reactor=reactor))

    def lock(self) -> sqlite3.Connection:
        """Another connection takes the write lock and keeps it."""
        other = sqlite3.connect(self.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        self.addCleanup(other.close)
        return other

    async def test_locked_database(self) -> None:
        """Write lock held elsewhere: 500 M_UNKNOWN, logged, nothing stored or returned signed;
        the same invite once the lock is released: 200, stored once."""
        other = self.lock()
        invite = self.new_invite()
        self.assertStoreFailure(await self.invite(invite))
        self.assertIn(
            "database is locked",
            self.logged[-2].get("reason", "") + self.logged[-1].get("reason", ""),
        )
        other.execute("ROLLBACK")
        self.assertIsNone(await self.stored(invite))
        await self.assertAcceptedOnce(invite, await self.invite(invite))
        self.assertEqual(len(await self.s.store.list_invites()), 2)
        report(
            "storage-sqlite-lock",
            faults_injected=1,
            answered_500=1,
            signed_but_unstored=0,
            invites_lost=0,
        )

    async def test_key_read_failure(self) -> None:
        """A failing read of an origin's stored keys (none in memory): 500 M_UNKNOWN, logged
        with the operation, and no fetch around the database (README row 20); only the
        sender's answer check falls back to fetching."""
        self.s = RealStoreScenario(self.s.store)  # a new keyring: nothing in memory
        self.patch(
            self.s.store,
            "get_server_keys",
            lambda *args, **kwargs: fail(StoreError("get_server_keys", "disk I/O error")),
        )
        self.assertStoreFailure(await self.invite())
        self.assertEqual(self.last_reason, "get_server_keys failed: disk I/O error")
        self.assertEqual(self.s.federation.calls, [])

    async def test_lock_released_while_waiting(self) -> None:
        """A lock released within the busy timeout: the waiting invite succeeds by itself."""
        other = self.lock()
        invite = self.new_invite()
        reactor.callLater(0.1, other.execute, "ROLLBACK")  # type: ignore[attr-defined]
        await self.assertAcceptedOnce(invite, await self.invite(invite))

    async def _check_file_gone(self, remove: Any) -> None:
        """After ``remove()`` takes the file away from its path: every invite is refused
        500 M_UNKNOWN with the reason logged, and other writes fail too, rather than
        being written to a file that is no longer the database."""
        accepted = self.new_invite()
        await self.assertAcceptedOnce(accepted, await self.invite(accepted))
        remove()
        for _ in range(2):  # and it stays refused
            self.assertStoreFailure(await self.invite())
            self.assertIn("the database file was deleted or replaced while open", self.last_reason)
            self.assertIn(self.path, self.last_reason)
        with self.assertRaises(StoreError) as raised:
            await self.s.store.set_invite_status(event_id_of(*accepted), "accepted")
        self.assertIn("set_invite_status failed: the database file was", str(raised.exception))
        with self.assertRaises(StoreError):
            await self.s.store.add_local_user("@new:" + US)

    async def test_database_file_deleted(self) -> None:
        """The database file unlinked while open."""
        await self._check_file_gone(lambda: os.unlink(self.path))

    async def test_database_file_replaced(self) -> None:
        """Another file renamed over the database's path while open (a restore gone wrong):
        nothing is written to either; the file now at the path is untouched."""
        other = os.path.abspath(self.mktemp()) + ".db"
        raw_sqlite(other, "PRAGMA journal_mode = WAL")
        raw_sqlite(other, "CREATE TABLE kept (x)")
        before = os.stat(other)
        await self._check_file_gone(lambda: os.replace(other, self.path))
        after = os.stat(self.path)
        self.assertEqual((after.st_ino, after.st_size), (before.st_ino, before.st_size))
        # Nor at the next start: the lost file's WAL, still at the path, is not applied
        # to the file there.
        await self.s.store.close()
        self.assertEqual(raw_sqlite(self.path, "SELECT name FROM sqlite_master"), [("kept",)])

    async def test_file_replaced_while_the_write_waits_for_the_lock(self) -> None:
        """The file is replaced after the check before the write, while the write waits
        for the lock: the write lands in the old file, so it is not answered as stored."""
        holder = self.lock()
        room_version, event = self.new_invite()
        record = InviteRecord(
            event_id_of(room_version, event), "!r:x", "10", BOB, "@s:x", "x", {}, [], 1, "pending"
        )
        writing = self.s.store.store_invite(record)
        other = os.path.abspath(self.mktemp()) + ".db"
        sqlite3.connect(other).close()
        await deferLater(reactor, 0.05, os.replace, other, self.path)
        holder.execute("ROLLBACK")
        with self.assertRaises(StoreError) as raised:
            await writing
        self.assertIn("the database file was deleted or replaced while open", str(raised.exception))

    async def test_file_replaced_before_the_first_invite(self) -> None:
        """A backup restored over the database after the store opened, before its first
        invite (the writer's and reader's own connections not open yet): the invite is
        refused 500 M_UNKNOWN, not written to the file now at the path, no listener told;
        after a restart on that file the sender's retry is stored and the listeners told."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "live.db")
        backup = os.path.join(directory, "backup.db")
        restored = await open_store(f"sqlite:///{backup}", reactor=reactor)
        for user in (BOB, "@restored:" + US):
            await restored.add_local_user(user)
        await restored.close()
        store = await open_store(f"sqlite:///{path}", reactor=reactor)
        self.addCleanup(store.close)
        await store.add_local_user(BOB)
        self.s = RealStoreScenario(store)
        os.replace(backup, path)
        invite = self.new_invite()
        self.assertStoreFailure(await self.invite(invite))
        self.assertIn("the database file was deleted or replaced while open", self.last_reason)
        self.assertEqual(self.s.listened, [])
        await store.close()
        self.assertEqual(raw_sqlite(path, "SELECT COUNT(*) FROM invites"), [(0,)])
        reopened = await open_store(f"sqlite:///{path}", reactor=reactor)
        self.addCleanup(reopened.close)
        # The restored file as it was (not paired with the old one's WAL).
        self.assertEqual(await reopened.list_local_users(), [BOB, "@restored:" + US])
        self.s = RealStoreScenario(reopened, restart_of=self.s)
        await self.assertAcceptedOnce(invite, await self.invite(invite))
        self.assertEqual(len(self.s.listened), 1)

    async def _close_with_a_batch_waiting(self, release_after: float | None) -> Deferred[Any]:
        """close() in the reactor iteration an invite arrived in, while another connection
        holds the write lock (released from another thread after ``release_after`` s)."""
        holder = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.addCleanup(holder.close)
        holder.execute("BEGIN IMMEDIATE")
        room_version, event = self.new_invite()
        record = InviteRecord(
            event_id_of(room_version, event), "!r:x", "10", BOB, "@s:x", "x", {}, [], 1, "pending"
        )
        writing = self.s.store.store_invite(record)
        if release_after is not None:
            timer = threading.Timer(release_after, holder.execute, ("ROLLBACK",))
            timer.start()
            self.addCleanup(timer.join)
        await self.s.store.close()  # neither raises nor leaves the pool running
        self.assertFalse(self.s.store._pool.running)  # type: ignore[attr-defined]
        self.record = record
        return writing

    async def test_close_writes_a_waiting_batch_through_the_pool(self) -> None:
        """The batch goes through the pool, which close() waits for: it is stored."""
        writing = await self._close_with_a_batch_waiting(release_after=0.05)
        self.assertEqual(await writing, (self.record, True))
        reopened = await open_store(f"sqlite:///{self.path}", reactor=reactor)
        self.addCleanup(reopened.close)
        self.assertEqual(await reopened.get_invite(self.record.event_id), self.record)

    async def test_close_fails_a_waiting_batch_the_lock_never_lets_in(self) -> None:
        """The lock is never released: the batch fails (database is locked) rather than
        leaving its callers waiting for ever."""
        writing = await self._close_with_a_batch_waiting(release_after=None)
        with self.assertRaises(StoreError) as raised:
            await writing
        self.assertIn("locked", str(raised.exception))

    async def test_path_through_a_symlink_and_dot_dot(self) -> None:
        """``link/../x.db`` is the file the kernel finds (through the symlink), for every
        connection of the store, not ``x.db`` beside ``link``."""
        base = os.path.abspath(self.mktemp())
        real = os.path.join(base, "deep", "real")
        os.makedirs(real)
        os.symlink(real, os.path.join(base, "link"))
        store = await open_store(f"sqlite:///{base}/link/../x.db", reactor=reactor)
        self.addCleanup(store.close)
        await store.add_local_user(BOB)
        record = InviteRecord("$s", "!r:x", "10", BOB, "@s:x", "x", {}, [], 1, "pending")
        self.assertEqual(await store.store_invite(record), (record, True))
        self.assertEqual(await store.get_invite("$s"), record)
        self.assertEqual(await store.invitee_states([BOB]), {BOB: (True, [])})
        self.assertTrue(os.path.exists(os.path.join(base, "deep", "x.db")))
        self.assertFalse(os.path.exists(os.path.join(base, "x.db")))

    async def test_working_directory_change_is_not_a_deletion(self) -> None:
        """A relative database path keeps naming the file SQLite opened after a chdir."""
        here = os.getcwd()
        self.addCleanup(os.chdir, here)
        os.chdir(os.path.dirname(self.path))
        relative = os.path.basename(self.path) + "-relative.db"
        store = await open_store(f"sqlite:///{relative}", reactor=reactor)
        self.addCleanup(store.close)
        os.chdir(here)
        await store.add_local_user(BOB)
        # The invitee-state read and the invite write use their own connections,
        # opened with the store: to the same file.
        self.assertEqual(await store.invitee_states([BOB]), {BOB: (True, [])})
        room_version, event = self.new_invite()
        record = InviteRecord(
            event_id_of(room_version, event), "!r:x", "10", BOB, "@s:x", "x", {}, [], 1, "pending"
        )
        self.assertEqual(await store.store_invite(record), (record, True))
        self.assertFalse(os.path.exists(relative))


class PostgresStorageFaultTests(StorageFaultMixin, TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.database = fresh_postgres_database(self)
        await self.start(await open_store(f"{POSTGRES_BASE}/{self.database}", reactor=reactor))

    def admin(self, database: str = "postgres") -> Any:
        import psycopg2

        connection = psycopg2.connect(f"{POSTGRES_BASE}/{database}")
        self.addCleanup(connection.close)
        return connection

    def terminate_store_connections(self) -> int:
        connection = self.admin()
        connection.autocommit = True
        cursor = connection.cursor()
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND application_name = 'federation-invite'",
            (self.database,),
        )
        return len(cursor.fetchall())

    async def stored(self, invite: tuple[Any, dict[str, Any]]) -> Any:
        # The pool's other connections were terminated too: each fails once
        # (StoreError) and is replaced, so reading back may take a few tries.
        for _ in range(10):
            try:
                return await super().stored(invite)
            except StoreError:
                continue
        self.fail("the store did not recover")  # type: ignore[attr-defined]

    async def until_served(self, invite: tuple[Any, dict[str, Any]]) -> int:
        """Retry ``invite`` until it is accepted; every failure is a clean 500. Returns the tries."""
        for attempt in range(1, 10):
            answer = await self.invite(invite)
            if answer[0] == 200:
                await self.assertAcceptedOnce(invite, answer)
                return attempt
            self.assertStoreFailure(answer)
            self.assertIsNone(await self.stored(invite))
        self.fail("service did not resume")  # type: ignore[attr-defined]

    async def test_backend_terminated_mid_write(self) -> None:
        """The store's server process is killed while its INSERT waits on a lock: 500 M_UNKNOWN,
        nothing stored; afterwards the pool reconnects and the same invite is stored once."""
        holder = self.admin(self.database)
        holder.cursor().execute("LOCK TABLE invites IN ACCESS EXCLUSIVE MODE")
        invite = self.new_invite()
        room_version, event = invite
        pending = self.s.send(
            2,
            self.s.v2_body(room_version, event),
            room_id=event["room_id"],
            event_id=event_id_of(room_version, event),
        )
        await deferLater(reactor, 0.3)
        self.s.client.flush()
        self.assertNoResult(pending)  # type: ignore[attr-defined]
        self.assertGreaterEqual(self.terminate_store_connections(), 1)  # type: ignore[attr-defined]
        self.assertStoreFailure(await self.answer(pending))
        holder.rollback()
        self.assertIsNone(await self.stored(invite))
        tries = await self.until_served(invite)
        self.assertEqual(len(await self.s.store.list_invites()), 2)
        # No rollback traceback for the dead connections (nor any other error).
        self.assertEqual(self.flushLoggedErrors(), [])
        report("storage-postgres-kill", faults_injected=1, tries_until_served=tries, invites_lost=0)

    async def _check_lock_held_elsewhere(self, reason: str) -> None:
        """A new store (with the limits the caller patched) while another session locks
        the invites table: two invites, the second queued behind the first, are answered
        500 M_UNKNOWN with ``reason`` logged; once the lock is released, the first is
        stored once. ``answer`` gives up after 20 s: a limit that never ends the wait fails."""
        store = await open_store(f"{POSTGRES_BASE}/{self.database}", reactor=reactor)
        await self.start(store, restart_of=self.s)
        holder = self.admin(self.database)
        holder.cursor().execute("LOCK TABLE invites IN SHARE MODE")  # writes wait, reads do not
        first, second = self.new_invite(), self.new_invite()
        pending = [self.send(first), self.send(second)]
        for response in pending:
            self.assertStoreFailure(await self.answer(response))
            self.assertIn(reason, self.last_reason)
        holder.rollback()
        self.assertIsNone(await self.stored(first))
        await self.assertAcceptedOnce(first, await self.invite(first))

    async def test_table_locked_elsewhere(self) -> None:
        """Another session's lock on the invites table (an operator's transaction, VACUUM
        FULL, another version's migration): a write waits for it at most lock_timeout
        (10 s, here 0.3 s), then fails, rather than holding up every later invite."""
        self.patch(dialect_module, "POSTGRES_LOCK_TIMEOUT", 0.3)
        await self._check_lock_held_elsewhere("canceling statement due to lock timeout")

    async def test_statement_running_too_long(self) -> None:
        """Any statement running past statement_timeout (30 s, here 0.3 s; a lock wait
        here, lock_timeout left at 10 s) is cancelled by the server."""
        self.patch(dialect_module, "POSTGRES_STATEMENT_TIMEOUT", 0.3)
        await self._check_lock_held_elsewhere("canceling statement due to statement timeout")

    async def test_database_refusing_connections_for_a_while(self) -> None:
        """The database goes away (connections refused, existing ones terminated): invites get
        500 M_UNKNOWN; once it accepts connections again, service resumes by itself."""
        admin = self.admin()
        admin.autocommit = True
        admin.cursor().execute(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS false')
        self.terminate_store_connections()
        invite = self.new_invite()
        for _ in range(3):
            self.assertStoreFailure(await self.invite(invite))
        admin.cursor().execute(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS true')
        tries = await self.until_served(invite)
        self.assertEqual(len(await self.s.store.list_invites()), 2)
        self.flushLoggedErrors()
        report(
            "storage-postgres-outage",
            faults_injected=1,
            answered_500_during=3,
            tries_until_served=tries,
            invites_lost=0,
        )
