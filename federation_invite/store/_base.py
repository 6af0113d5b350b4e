"""``DatabaseStore``: ``IStore`` over ``twisted.enterprise.adbapi``, for every dialect.

Each public method is one transaction run in the pool's threads. The SQL is
shared; the dialect supplies placeholders, ``BEGIN`` and locking. One
exception, for speed: on a SQLite file, batches of invites are INSERTed on the
reactor thread and COMMITted in a thread of their own (``_sqlite_writer``),
falling back to the pool when another connection holds the write lock.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from ..core.canonical import encode_canonical_json
from ..logs import Logger
from ._dialect import POSTGRES_POOL_SIZE, Dialect, parse_database_uri
from ._interface import IStore
from ._migrations import (
    LATEST_SCHEMA_VERSION,
    MigrationResult,
    check_schema_txn,
    current_version_txn,
    load_migrations,
    migrate_txn,
)
from ._records import (
    INVITE_STATUSES,
    InviteRecord,
    InviteRule,
    ServerKeyRecord,
    StoreError,
    check_choice,
    check_text,
    check_timestamp,
)
from ._sqlite_writer import SQLiteDirectReader, SQLiteInviteWriter

__all__ = ["DatabaseStore", "migrate", "open_store", "run_migrations"]

_T = TypeVar("_T")
_log = Logger()

#: Seconds ``close`` waits for the queries still running before it cancels them
#: (PostgreSQL) and leaves their threads to end by themselves.
CLOSE_WAIT_SECONDS = 5.0
#: The most rows one list call returns.
MAX_LIST_LIMIT = 1000
#: The most invites written in one transaction (the rest wait for the next).
MAX_INVITE_BATCH = 256
#: The most batches ``_write_invites`` writes one after another when each is answered
#: before its write returns (SQLite committing on the reactor thread, or a write
#: refused at once) and its callers' callbacks queue more: the rest waits for the end
#: of the reactor iteration, so that a caller storing invites one after another, or
#: retrying at once on a failure, does not hold the reactor for as long as it goes on.
MAX_BATCHES_AT_ONCE = 512
#: The most users in one read of invitee states: its statement has two ``IN (...)``
#: lists, so 800 parameters, within the 999 that SQLite allowed before 3.32.
_STATES_PER_STATEMENT = 400

_INVITE_COLUMNS = (
    "event_id, room_id, room_version, invitee, sender, origin,"
    " event_json, invite_room_state_json, received_ts, status"
)
_KEY_COLUMNS = "server_name, key_id, verify_key, valid_until_ts, expired_ts, fetched_ts, source"


def _canonical_text(value: Any) -> str:
    # strict=False: old room versions (1-5) admit floats and big integers in
    # received events, and we must keep exactly what we answered.
    return encode_canonical_json(value, strict=False).decode("utf-8")


def _invite_from_row(row: tuple[Any, ...]) -> InviteRecord:
    return InviteRecord(
        event_id=row[0],
        room_id=row[1],
        room_version=row[2],
        invitee=row[3],
        sender=row[4],
        origin=row[5],
        event=json.loads(row[6]),
        invite_room_state=json.loads(row[7]),
        received_ts=int(row[8]),
        status=row[9],
        event_json=row[6],
    )


def _key_from_row(row: tuple[Any, ...]) -> ServerKeyRecord:
    return ServerKeyRecord(
        server_name=row[0],
        key_id=row[1],
        verify_key=row[2],
        valid_until_ts=None if row[3] is None else int(row[3]),
        expired_ts=None if row[4] is None else int(row[4]),
        fetched_ts=int(row[5]),
        source=row[6],
    )


#: The sizes an invitee-states read's ``IN`` lists are padded to (the last user repeated,
#: which matches nothing more): each distinct statement text is a statement SQLite
#: prepares and Python's ``sqlite3`` keeps (128 per connection, 5-142 KiB each), so reads
#: of every size the policy's batches happen to take grew the daemon's memory for as long
#: as new sizes came (about 5 MiB at the benchmark's load); these are at most 10, about
#: 0.4 MiB. The last is ``_STATES_PER_STATEMENT``.
_STATES_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, _STATES_PER_STATEMENT)


@functools.lru_cache(maxsize=len(_STATES_SIZES))
def _invitee_states_statement(size: int) -> str:
    marks = ", ".join("?" * size)
    return (
        f"SELECT user_id, NULL, NULL, NULL FROM local_users WHERE user_id IN ({marks})"
        " UNION ALL SELECT user_id, kind, pattern, action FROM invite_rules"
        f" WHERE user_id IN ({marks}) ORDER BY 1, 2, 3, 4"
    )


def _invitee_states_query(user_ids: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
    """One statement for whether each user is local and its rules: local users come
    back as ``(user_id, NULL, NULL, NULL)``, each rule as ``(user_id, kind, pattern,
    action)``. One statement is one consistent read, whatever runs it. At most
    ``_STATES_PER_STATEMENT`` users, padded to one of ``_STATES_SIZES``."""
    size = _STATES_SIZES[bisect.bisect_left(_STATES_SIZES, len(user_ids))]
    padded = (*user_ids, *itertools.repeat(user_ids[-1], size - len(user_ids)))
    return _invitee_states_statement(size), (*padded, *padded)


def _states_from_rows(
    user_ids: Sequence[str], rows: Iterable[tuple[Any, ...]]
) -> dict[str, tuple[bool, list[InviteRule]]]:
    """Each user's ``(is local, rules)`` from ``_invitee_states_query``'s rows."""
    local: set[str] = set()
    rules: dict[str, list[InviteRule]] = {}
    for row in rows:
        if row[1] is None:
            local.add(row[0])
        else:
            rules.setdefault(row[0], []).append(InviteRule(*row))
    return {user_id: (user_id in local, rules.get(user_id, [])) for user_id in user_ids}


def _check_record(value: object, kind: type) -> None:
    if not isinstance(value, kind):
        raise ValueError(f"expected a {kind.__name__}, not {type(value).__name__}")


@implementer(IStore)
class DatabaseStore:
    """The one ``IStore`` implementation; build it with ``open_store``."""

    def __init__(self, pool: adbapi.ConnectionPool, dialect: Dialect, reactor: Any) -> None:
        self._pool = pool
        self._dialect = dialect
        self._reactor = reactor
        #: Fires once ``close`` is done with the pool (``_close_pool``).
        self._pool_closed: Deferred[None] | None = None
        self._closing = False
        self._closed = False
        self._invite_queue: list[
            tuple[InviteRecord, tuple[Any, ...], Deferred[tuple[InviteRecord, bool]]]
        ] = []
        self._invite_writing = False
        #: The reactor's call of ``_write_scheduled``, while a batch waits for it.
        self._scheduled_write: Any = None
        #: The dialect's writer of invite batches, if it has one (SQLite; set by open_store).
        self._direct_writer: SQLiteInviteWriter | None = None
        #: The dialect's reader on the calling thread, if it has one (SQLite; set by open_store).
        self._direct_reader: SQLiteDirectReader | None = None

    def enable_direct_access(self, reactor: Any) -> None:
        """Use the dialect's own writer of invite batches and reader of invitee states,
        where it has them (SQLite: INSERTs and those reads on the reactor thread, COMMIT
        there too while commits are quick, else in a thread of its own; ``_sqlite_writer``).
        Their connections open now, with the store, not at the first invite."""
        if self._direct_writer is None:
            self._direct_writer = self._dialect.invite_writer(reactor)
            if self._direct_writer is not None:
                self._direct_writer.open()
        if self._direct_reader is None:
            self._direct_reader = self._dialect.direct_reader()
            if self._direct_reader is not None:
                self._direct_reader.open()

    def __repr__(self) -> str:
        return f"<DatabaseStore {self._dialect.display}>"

    # -- plumbing -------------------------------------------------------

    def _run(
        self,
        operation: str,
        work: Callable[..., _T],
        *args: Any,
        write: bool,
    ) -> Deferred[_T]:
        """Run ``work(txn, *args)`` as one transaction; driver errors become StoreError."""
        if self._closed:
            raise RuntimeError(f"{operation} on a closed store")
        dialect = self._dialect
        if write and dialect.file_lost:
            # Refused before it begins: it would go to the lost file's WAL again.
            try:
                dialect.check_file(operation)
            except StoreError:
                return fail()

        def interaction(txn: adbapi.Transaction) -> _T:
            dialect.begin(txn, write=write)
            return work(txn, *args)

        d: Deferred[_T] = self._pool.runInteraction(interaction)
        if write:
            d.addCallback(self._committed_to_the_file, operation)
        d.addErrback(self._translate, operation)
        return d

    def _committed_to_the_file(self, result: _T, operation: str) -> _T:
        """After a COMMIT: the file written is still the database (``Dialect.check_file``)."""
        lost_before = self._dialect.file_lost
        try:
            self._dialect.check_file(operation)
        except StoreError:
            if not lost_before:
                self._release_lost_file()
            raise
        return result

    def _release_lost_file(self) -> None:
        """The first write to find the database file gone: from now on every write goes
        through ``_run``, which refuses it, and the lost file's WAL is emptied into it
        (``Dialect.release_file``)."""
        if self._direct_writer is not None:
            self._direct_writer.usable = False
        releasing = self._pool.runInteraction(self._dialect.release_file)
        releasing.addErrback(
            lambda failure: _log.error(
                "Could not empty the WAL of the lost database file {database} ({reason}):"
                " once stopped, delete the database's -wal and -shm files (the lost file's)"
                " before restarting, or SQLite applies them to the file now at its path",
                database=self._dialect.display,
                reason=failure.getErrorMessage(),
            )
        )

    def _translate(self, failure: Failure, operation: str) -> Failure:
        error = failure.value
        if isinstance(error, StoreError) or not isinstance(error, self._dialect.driver_errors()):
            return failure
        wrapped = StoreError(operation, self._dialect.describe(error))
        wrapped.__cause__ = error
        return Failure(wrapped)

    def _execute(
        self,
        txn: adbapi.Transaction | sqlite3.Cursor,
        statement: str,
        args: tuple[Any, ...] = (),
    ) -> None:
        txn.execute(self._dialect.sql(statement), args)

    # -- invites --------------------------------------------------------

    def store_invite(self, record: InviteRecord) -> Deferred[tuple[InviteRecord, bool]]:
        """Store ``record`` unless its ``event_id`` is stored already (see ``IStore``).

        Group commit: while one write of invites is in flight, the invites that
        arrive meanwhile are queued and written together in the next single
        transaction, each caller answered once that transaction has committed.
        Under load this turns many thread hops and commits into one; when idle,
        a lone invite is written at once (SQLite while its commits are quick: at
        the end of this reactor iteration, with the others read in it).
        """
        _check_record(record, InviteRecord)
        values = (
            record.event_id,
            record.room_id,
            record.room_version,
            record.invitee,
            record.sender,
            record.origin,
            record.event_json if record.event_json is not None else _canonical_text(record.event),
            _canonical_text(record.invite_room_state) if record.invite_room_state else "[]",
            record.received_ts,
            record.status,
        )
        if self._closed:
            raise RuntimeError("store_invite on a closed store")
        waiter: Deferred[tuple[InviteRecord, bool]] = Deferred()
        self._invite_queue.append((record, values, waiter))
        if not self._invite_writing:
            writer = self._direct_writer
            if writer is not None and writer.usable and writer.commits_on_reactor:
                # The COMMIT will run on this thread: start the batch once this
                # reactor iteration is done, so that every invite read in it joins.
                self._invite_writing = True
                self._scheduled_write = writer.call_later(self._write_scheduled)
            else:
                self._write_invites()
        return waiter

    def _write_scheduled(self) -> None:
        # The queue holds at least the invite that scheduled this call: only
        # _write_invites takes from it, and close() runs this before it fails
        # what is left.
        self._scheduled_write = None
        self._write_invites()

    def _write_invites(self) -> None:
        """Write the queued invites, a batch (one transaction) at a time.

        A batch answered before its write returns (SQLite committing on the
        reactor thread) has run its callers' callbacks in this stack, and they
        may have queued more invites (a caller storing one after another): this
        loop writes those at once, rather than the batch's last callback from
        inside them, so the stack does not grow by a batch per invite (past a
        few hundred, Python's recursion limit failed the callers). At most
        ``MAX_BATCHES_AT_ONCE`` of them: the rest is written once the reactor
        has had its turn, as a lone invite is.
        """
        for _ in range(MAX_BATCHES_AT_ONCE):
            if not (self._write_batch() and self._invite_queue and not self._closed):
                return
        self._invite_writing = True
        self._scheduled_write = self._reactor.callLater(0, self._write_scheduled)

    def _write_batch(self) -> bool:
        """Start writing the next batch; True if it was answered before this returned (the
        caller writes the next), else its answer writes the next once it comes."""
        batch = self._invite_queue[:MAX_INVITE_BATCH]
        self._invite_queue = self._invite_queue[MAX_INVITE_BATCH:]
        self._invite_writing = True
        # A consistent order of inserts keeps two workers' batches from
        # deadlocking on each other's unique-index locks (PostgreSQL).
        batch.sort(key=lambda item: item[0].event_id)
        rows = [values for _, values, _ in batch]
        writing = self._write_directly(rows)
        if writing is None:
            writing = self._run("store_invite", self._store_invites_txn, rows, write=True)

        def written(existing: list[InviteRecord | None]) -> None:
            for (record, _, waiter), found in zip(batch, existing, strict=True):
                waiter.callback((record, True) if found is None else (found, False))

        def failed(failure: Failure) -> None:
            for _, _, waiter in batch:
                waiter.errback(failure)

        returned = answered = False

        def next_batch(_: object) -> None:
            nonlocal answered
            self._invite_writing = False
            if not returned:
                answered = True
            elif self._invite_queue and not self._closed:
                self._write_invites()

        writing.addCallbacks(written, failed).addBoth(next_batch)
        returned = True
        return answered

    def _write_directly(
        self, rows: list[tuple[Any, ...]]
    ) -> Deferred[list[InviteRecord | None]] | None:
        """SQLite: INSERT here, COMMIT here too or in the writer's thread (``_sqlite_writer``).

        None when there is no such writer or another connection holds the write
        lock: the batch then goes through the pool, whose thread waits for it.
        """
        writer = self._direct_writer
        if writer is None or not writer.usable:
            return None
        try:
            cursor = writer.begin()
            if cursor is None:
                return None
            try:
                existing = self._store_invites_txn(cursor, rows)
            except BaseException:
                writer.rollback()
                raise
        except Exception:
            return fail().addErrback(self._translate, "store_invite")
        committed = writer.commit().addCallback(lambda _: existing)
        committed.addCallback(self._committed_to_the_file, "store_invite")
        return committed.addErrback(self._translate, "store_invite")

    def _store_invites_txn(
        self, txn: adbapi.Transaction | sqlite3.Cursor, rows: list[tuple[Any, ...]]
    ) -> list[InviteRecord | None]:
        """Insert each row unless present; None for a row inserted, else the row that was there."""
        existing: list[InviteRecord | None] = []
        for values in rows:
            # ON CONFLICT DO NOTHING waits for a concurrent insert of the same key
            # to commit or roll back (PostgreSQL), or for the write lock (SQLite),
            # so the SELECT below always sees the one row that won.
            self._execute(
                txn,
                f"INSERT INTO invites ({_INVITE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (event_id) DO NOTHING",
                values,
            )
            if txn.rowcount == 1:
                existing.append(None)
                continue
            self._execute(
                txn, f"SELECT {_INVITE_COLUMNS} FROM invites WHERE event_id = ?", values[:1]
            )
            existing.append(_invite_from_row(txn.fetchone()))
        return existing

    def get_invite(self, event_id: str) -> Deferred[InviteRecord | None]:
        check_text("event_id", event_id)
        return self._run("get_invite", self._get_invite_txn, event_id, write=False)

    def _get_invite_txn(self, txn: adbapi.Transaction, event_id: str) -> InviteRecord | None:
        self._execute(txn, f"SELECT {_INVITE_COLUMNS} FROM invites WHERE event_id = ?", (event_id,))
        row = txn.fetchone()
        return None if row is None else _invite_from_row(row)

    def list_invites(
        self,
        *,
        invitee: str | None = None,
        room_id: str | None = None,
        status: str | None = None,
        limit: int = 100,
        before_ts: int | None = None,
        before_event_id: str | None = None,
    ) -> Deferred[list[InviteRecord]]:
        conditions: list[str] = []
        args: list[Any] = []
        if invitee is not None:
            conditions.append("invitee = ?")
            args.append(check_text("invitee", invitee))
        if room_id is not None:
            conditions.append("room_id = ?")
            args.append(check_text("room_id", room_id))
        if status is not None:
            conditions.append("status = ?")
            args.append(check_choice("status", status, INVITE_STATUSES))
        if before_event_id is not None:
            # Keyset paging: strictly after the (received_ts, event_id) of the last
            # invite of the previous page in the list's order, so that invites
            # received in the same millisecond are neither skipped nor repeated.
            if before_ts is None:
                raise ValueError("before_event_id needs before_ts")
            conditions.append("(received_ts < ? OR (received_ts = ? AND event_id < ?))")
            ts = check_timestamp("before_ts", before_ts)
            args.extend((ts, ts, check_text("before_event_id", before_event_id)))
        elif before_ts is not None:
            conditions.append("received_ts < ?")
            args.append(check_timestamp("before_ts", before_ts))
        if type(limit) is not int or not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}, not {limit!r}")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        statement = (
            f"SELECT {_INVITE_COLUMNS} FROM invites{where}"
            " ORDER BY received_ts DESC, event_id DESC LIMIT ?"
        )
        return self._run(
            "list_invites", self._list_invites_txn, statement, (*args, limit), write=False
        )

    def _list_invites_txn(
        self, txn: adbapi.Transaction, statement: str, args: tuple[Any, ...]
    ) -> list[InviteRecord]:
        self._execute(txn, statement, args)
        return [_invite_from_row(row) for row in txn.fetchall()]

    def set_invite_status(self, event_id: str, status: str) -> Deferred[bool]:
        check_text("event_id", event_id)
        check_choice("status", status, INVITE_STATUSES)
        return self._run(
            "set_invite_status",
            self._change_txn,
            "UPDATE invites SET status = ? WHERE event_id = ?",
            (status, event_id),
            write=True,
        )

    def _change_txn(self, txn: adbapi.Transaction, statement: str, args: tuple[Any, ...]) -> bool:
        """Run one INSERT/UPDATE/DELETE; True when it changed a row."""
        self._execute(txn, statement, args)
        return bool(txn.rowcount > 0)

    # -- remote server keys ---------------------------------------------

    def store_server_keys(self, records: Iterable[ServerKeyRecord]) -> Deferred[None]:
        now_ms = _now_ms(self._reactor)
        rows = []
        for record in records:
            _check_record(record, ServerKeyRecord)
            rows.append((*_fields(record), now_ms))
        if not rows:
            return succeed(None)
        # A consistent order, as for invites: two workers upserting the same keys in
        # different orders would deadlock on each other's row locks (PostgreSQL).
        rows.sort(key=lambda row: (row[0], row[1]))
        return self._run("store_server_keys", self._store_keys_txn, rows, write=True)

    def _store_keys_txn(self, txn: adbapi.Transaction, rows: list[tuple[Any, ...]]) -> None:
        # A fetch replaces the stored key unless the stored one was fetched
        # later (a slow worker must not overwrite a newer answer), or unless it
        # would make a key stored as old current again on a notary's word (a
        # stale notary copy would undo a rotation); only the server itself can.
        # A key stored as fetched after now (a clock that ran ahead) is stale, as
        # in ``_clock``: any fetch replaces it, or none would until the clock
        # caught up. Each row ends with now.
        statement = self._dialect.sql(
            f"INSERT INTO server_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (server_name, key_id) DO UPDATE SET"
            " verify_key = excluded.verify_key,"
            " valid_until_ts = excluded.valid_until_ts,"
            " expired_ts = excluded.expired_ts,"
            " fetched_ts = excluded.fetched_ts,"
            " source = excluded.source"
            " WHERE (server_keys.fetched_ts <= excluded.fetched_ts OR server_keys.fetched_ts > ?)"
            " AND (server_keys.expired_ts IS NULL OR excluded.expired_ts IS NOT NULL"
            " OR excluded.source = excluded.server_name)"
        )
        txn.executemany(statement, rows)

    def get_server_keys(
        self, server_name: str, key_ids: Iterable[str] | None = None
    ) -> Deferred[dict[str, ServerKeyRecord]]:
        check_text("server_name", server_name)
        statement = f"SELECT {_KEY_COLUMNS} FROM server_keys WHERE server_name = ?"
        args: list[str] = [server_name]
        if key_ids is not None:
            if isinstance(key_ids, str):
                raise ValueError("key_ids must be an iterable of key IDs, not one string")
            wanted = sorted({check_text("key_id", key_id) for key_id in key_ids})
            if not wanted:
                return succeed({})
            statement += f" AND key_id IN ({', '.join('?' * len(wanted))})"
            args.extend(wanted)
        return self._run("get_server_keys", self._get_keys_txn, statement, tuple(args), write=False)

    def _get_keys_txn(
        self, txn: adbapi.Transaction, statement: str, args: tuple[Any, ...]
    ) -> dict[str, ServerKeyRecord]:
        self._execute(txn, statement, args)
        records = (_key_from_row(row) for row in txn.fetchall())
        return {record.key_id: record for record in records}

    # -- local users ----------------------------------------------------

    def add_local_user(self, user_id: str) -> Deferred[bool]:
        check_text("user_id", user_id)
        return self._run(
            "add_local_user",
            self._change_txn,
            "INSERT INTO local_users (user_id) VALUES (?) ON CONFLICT (user_id) DO NOTHING",
            (user_id,),
            write=True,
        )

    def remove_local_user(self, user_id: str) -> Deferred[bool]:
        check_text("user_id", user_id)
        return self._run(
            "remove_local_user",
            self._change_txn,
            "DELETE FROM local_users WHERE user_id = ?",
            (user_id,),
            write=True,
        )

    def is_local_user(self, user_id: str) -> Deferred[bool]:
        check_text("user_id", user_id)
        return self._run("is_local_user", self._is_local_user_txn, user_id, write=False)

    def _is_local_user_txn(self, txn: adbapi.Transaction, user_id: str) -> bool:
        self._execute(txn, "SELECT 1 FROM local_users WHERE user_id = ?", (user_id,))
        return txn.fetchone() is not None

    def invitee_states(
        self, user_ids: Sequence[str]
    ) -> Deferred[dict[str, tuple[bool, list[InviteRule]]]]:
        if self._closed:
            raise RuntimeError("invitee_states on a closed store")
        for user_id in user_ids:
            check_text("user_id", user_id)
        users = list(user_ids)
        reader = self._direct_reader
        if reader is not None and reader.usable and 0 < len(users) <= _STATES_PER_STATEMENT:
            # One statement, on this thread (SQLite): no hop to the pool's thread.
            statement, args = _invitee_states_query(users)
            try:
                rows = reader.read(self._dialect.sql(statement), args)
            except Exception:
                return fail().addErrback(self._translate, "invitee_states")
            if rows is not None:
                return succeed(_states_from_rows(users, rows))
        return self._run("invitee_states", self._invitee_states_txn, users, write=False)

    def _invitee_states_txn(
        self, txn: adbapi.Transaction, user_ids: list[str]
    ) -> dict[str, tuple[bool, list[InviteRule]]]:
        rows: list[tuple[Any, ...]] = []
        for start in range(0, len(user_ids), _STATES_PER_STATEMENT):
            statement, args = _invitee_states_query(user_ids[start : start + _STATES_PER_STATEMENT])
            self._execute(txn, statement, args)
            rows.extend(txn.fetchall())
        return _states_from_rows(user_ids, rows)

    def list_local_users(self) -> Deferred[list[str]]:
        return self._run("list_local_users", self._list_local_users_txn, write=False)

    def _list_local_users_txn(self, txn: adbapi.Transaction) -> list[str]:
        self._execute(txn, "SELECT user_id FROM local_users ORDER BY user_id")
        return [row[0] for row in txn.fetchall()]

    # -- invite rules ---------------------------------------------------

    def add_invite_rule(self, rule: InviteRule) -> Deferred[bool]:
        _check_record(rule, InviteRule)
        return self._run(
            "add_invite_rule",
            self._change_txn,
            "INSERT INTO invite_rules (user_id, kind, pattern, action) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (user_id, kind, pattern, action) DO NOTHING",
            _fields(rule),
            write=True,
        )

    def remove_invite_rule(self, rule: InviteRule) -> Deferred[bool]:
        _check_record(rule, InviteRule)
        return self._run(
            "remove_invite_rule",
            self._change_txn,
            "DELETE FROM invite_rules"
            " WHERE user_id = ? AND kind = ? AND pattern = ? AND action = ?",
            _fields(rule),
            write=True,
        )

    def list_invite_rules(self, user_id: str) -> Deferred[list[InviteRule]]:
        check_text("user_id", user_id)
        return self._run("list_invite_rules", self._list_rules_txn, user_id, write=False)

    def _list_rules_txn(self, txn: adbapi.Transaction, user_id: str) -> list[InviteRule]:
        self._execute(
            txn,
            "SELECT user_id, kind, pattern, action FROM invite_rules WHERE user_id = ?"
            " ORDER BY kind, pattern, action",
            (user_id,),
        )
        return [InviteRule(*row) for row in txn.fetchall()]

    # -- schema and lifetime -------------------------------------------

    def schema_version(self) -> Deferred[int]:
        return self._run("schema_version", current_version_txn, self._dialect, write=False)

    def _migrate(self, now_ms: int) -> Deferred[MigrationResult]:
        migrations = load_migrations(self._dialect.name)
        return self._run("migrate", migrate_txn, self._dialect, migrations, now_ms, write=True)

    def _check_schema(self) -> Deferred[int]:
        return self._run(
            "schema check", check_schema_txn, self._dialect, LATEST_SCHEMA_VERSION, write=False
        )

    def close(self) -> Deferred[None]:
        if not self._closing:
            # Closing guards against a close() from a callback of the batch written
            # below; closed (refusing any use) is set once that batch is on its way.
            self._closing = True
            if self._scheduled_write is not None:
                # A batch waiting for the end of the reactor iteration: its
                # callers were told nothing yet, so write it now, as it would
                # have been written had it arrived while the store was idle;
                # before the store counts as closed, as it may go through the
                # pool (another connection holding the write lock), which
                # closing then waits for.
                self._scheduled_write.cancel()
                self._write_scheduled()
                if self._scheduled_write is not None:
                    # Its callers kept storing one after another past
                    # MAX_BATCHES_AT_ONCE batches: what they queued since is
                    # failed below, as queued behind a write.
                    self._scheduled_write.cancel()
                    self._scheduled_write = None
            self._closed = True
            # Invites queued behind a write in flight will not be written now:
            # tell their callers (nothing was stored, so nothing is answered).
            queued, self._invite_queue = self._invite_queue, []
            for _, _, waiter in queued:
                waiter.errback(StoreError("store_invite", "the store was closed"))
            finish_writer = None
            if self._direct_writer is not None:
                finish_writer = self._direct_writer.close()
            if self._direct_reader is not None:
                self._direct_reader.close()
            self._pool_closed = self._close_pool(finish_writer)
        if self._pool_closed is None:  # close() from a callback of the batch written above
            return succeed(None)
        done: Deferred[None] = Deferred()

        def relay(result: None) -> None:
            done.callback(None)
            return result

        self._pool_closed.addCallback(relay)
        return done

    def _close_pool(self, finish_writer: Callable[[], None] | None = None) -> Deferred[None]:
        """``ConnectionPool.close`` without blocking the reactor thread on a stuck query.

        adbapi's close joins the pool's threads on the calling thread, so a query
        waiting on a lock or on a server gone silent held the reactor, and a stop,
        until it ended. Here the threads are joined, and then their connections
        closed, in a thread of our own, after ``finish_writer`` (the SQLite
        writer's: its commit thread joined, a COMMIT in a stalled fsync, then its
        connection closed); the Deferred fires then, or once
        ``CLOSE_WAIT_SECONDS`` have passed: the queries still running are then
        cancelled (``Dialect.cancel_queries``) and their threads left to end by
        themselves (logged).
        """
        pool, reactor = self._pool, self._reactor
        # What ConnectionPool.close does before finalClose, which joins.
        for trigger in ("shutdownID", "startID"):
            if getattr(pool, trigger) is not None:
                reactor.removeSystemEventTrigger(getattr(pool, trigger))
                setattr(pool, trigger, None)
        closed: Deferred[None] = Deferred()

        def finished() -> None:
            if not closed.called:
                too_long.cancel()
                closed.callback(None)

        def close_in_thread() -> None:
            try:
                try:
                    if finish_writer is not None:
                        finish_writer()
                finally:
                    pool.finalClose()
            finally:
                reactor.callFromThread(finished)

        def give_up() -> None:
            _log.warn(
                "Closing the database {database}: queries still running after {seconds} s"
                " are cancelled and abandoned",
                database=self._dialect.display,
                seconds=CLOSE_WAIT_SECONDS,
            )
            connections = list(pool.connections.values())
            # In a thread: a PostgreSQL cancel request is a connection of its own.
            threading.Thread(
                target=self._dialect.cancel_queries,
                args=(connections,),
                name="federation-invite-store-cancel",
                daemon=True,
            ).start()
            closed.callback(None)

        too_long = reactor.callLater(CLOSE_WAIT_SECONDS, give_up)
        threading.Thread(
            target=close_in_thread, name="federation-invite-store-close", daemon=True
        ).start()
        return closed


def _fields(record: ServerKeyRecord | InviteRule) -> tuple[Any, ...]:
    """A record's fields in declaration order, matching the column lists above."""
    return attrs.astuple(record, recurse=False)


def _resolve_reactor(reactor: Any | None) -> Any:
    if reactor is None:
        # Only when the embedding program did not hand us one; never at import.
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor


def _now_ms(reactor: IReactorTime) -> int:
    return int(reactor.seconds() * 1000)


async def _open(uri: str, reactor: Any | None, migrate: bool, pool_size: int) -> DatabaseStore:
    dialect = parse_database_uri(uri)
    reactor = _resolve_reactor(reactor)
    store = DatabaseStore(dialect.connection_pool(reactor, pool_size), dialect, reactor)
    try:
        if migrate:
            result = await store._migrate(_now_ms(reactor))
            if result.moved_bookkeeping:
                _log.info(
                    "Moved {database}'s record of applied schema versions from"
                    " schema_migrations to federation_invite_schema",
                    database=dialect.display,
                )
            if result.applied:
                _log.info(
                    "Migrated {database} from schema {before} to {after}",
                    database=dialect.display,
                    before=result.before,
                    after=result.after,
                )
        else:
            await store._check_schema()
    except Exception:
        # Not BaseException: a GeneratorExit (the coroutine closed unfinished, as at
        # interpreter exit when the reactor stopped under it) cannot wait for a close,
        # and a close started then hangs the exit in Thread.start.
        await store.close()
        raise
    store.enable_direct_access(reactor)
    return store


def open_store(
    uri: str,
    *,
    reactor: IReactorCore | None = None,
    migrate: bool = True,
    pool_size: int = POSTGRES_POOL_SIZE,
) -> Deferred[IStore]:
    """Open the database named by ``uri`` and fire with its ``IStore``.

    With ``migrate`` (the default) pending schema migrations run first; without
    it a database not exactly at the code's schema version is refused with
    ``SchemaVersionError``. A database newer than the code is always refused.
    PostgreSQL: at most ``pool_size`` connections are open, opened as operations
    run at once (SQLite: one). A bad URI or ``pool_size`` raises ``ValueError`` at once.
    """
    parse_database_uri(uri)
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
        raise ValueError(f"pool_size must be an integer of at least 1, not {pool_size!r}")
    return Deferred.fromCoroutine(_open(uri, reactor, migrate, pool_size))


async def _run_migrations(uri: str, reactor: Any | None) -> MigrationResult:
    dialect = parse_database_uri(uri)
    reactor = _resolve_reactor(reactor)
    store = DatabaseStore(dialect.connection_pool(reactor), dialect, reactor)
    try:
        result = await store._migrate(_now_ms(reactor))
    except Exception:  # not GeneratorExit: as in _open
        await store.close()
        raise
    await store.close()
    return result


def run_migrations(uri: str, *, reactor: IReactorCore | None = None) -> Deferred[MigrationResult]:
    """Apply pending migrations to ``uri`` and close: the operator's explicit command.

    Fires with what was found and applied (nothing when already at the latest
    version); fails with ``SchemaVersionError`` for a database newer than the code.
    """
    parse_database_uri(uri)
    return Deferred.fromCoroutine(_run_migrations(uri, reactor))


#: The operator command's name for ``run_migrations``.
migrate = run_migrations
