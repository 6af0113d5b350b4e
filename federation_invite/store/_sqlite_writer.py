"""SQLite invite writes without a second Python thread competing for the GIL.

Under load, the reactor thread holds the GIL nearly all the time and lets go
of it briefly at every C call that releases it (each TLS read and write, each
ed25519 operation). A database thread with Python work to do (binding a row,
stepping a statement, the next ``execute``) takes the GIL at each of those
moments, and the reactor thread waits for it back. Measured over TLS
(``benchmarks/README.md``, medians of three rounds): writing this way takes
about 5% off the daemon's CPU per invite (855 -> 811 us) and 8% off a server
that only stores and logs (688 -> 635 us).

So for SQLite the group-committed batch is written in two parts:

- ``BEGIN IMMEDIATE`` and the INSERTs run on the calling (reactor) thread:
  CPU work on pages in memory, ~30 us a row, no waiting. The write lock is
  asked for without waiting (``busy_timeout = 0``): if another connection
  holds it, the caller falls back to the pool's thread, which waits for it
  (``SQLITE_BUSY_TIMEOUT_MS``) as every other write does.
- ``COMMIT``, where the WAL is written and fsynced (``synchronous = FULL``)
  and where checkpoints run, happens in a thread of our own, which holds the
  GIL only to enter and leave that one call. Callers are answered after it
  returns, so an acknowledged invite is on disk, as before.

One writer connection, one transaction at a time: the store starts the next
batch only when the previous commit has finished. Checkpoints stay SQLite's
own (in the COMMIT that crosses 1,000 pages of WAL, so in the commit thread):
running them from another connection while commits went on made both fsync at
once, and over a long run commits stalled for up to 170 ms (the p99 latency
went from 36 to 63 ms; ``benchmarks/README.md``).

The reads an invite waits on (the policy's invitee states) skip the pool's
thread the same way: ``SQLiteDirectReader`` runs them on the reactor thread,
one statement each, from a connection of their own.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from ._dialect import configure_durable, is_busy

__all__ = ["SQLiteDirectReader", "SQLiteInviteWriter"]


class _OwnConnection:
    """A connection of our own to the store's file that never waits for a lock.

    It is opened on first use, and only if the file is in WAL mode: the store's
    pool put it in WAL mode when it opened it (a property of the file), and we
    only check, never change it from here. Outside WAL mode ``usable`` turns
    False and the caller goes through the pool.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._connection: sqlite3.Connection | None = None
        self.usable = True

    def _configure(self, connection: sqlite3.Connection) -> None:
        """Settings of this kind of connection, once it is open."""

    def _connect(self) -> sqlite3.Connection | None:
        if self._connection is None:
            connection = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False, timeout=0
            )
            connection.execute("PRAGMA busy_timeout = 0")
            (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
            if str(mode).lower() != "wal":
                connection.close()
                self.usable = False
                return None
            self._configure(connection)
            self._connection = connection
        return self._connection

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class SQLiteInviteWriter(_OwnConnection):
    """The reactor-thread half and the commit thread of SQLite invite writes.

    Outside WAL mode every batch goes through the pool: there, our open
    transaction would block readers.
    """

    def __init__(self, path: str, reactor: Any) -> None:
        super().__init__(path)
        self._reactor = reactor
        self._threads: ThreadPool | None = None
        self._shutdown_trigger: Any = None

    def _configure(self, connection: sqlite3.Connection) -> None:
        configure_durable(connection)

    def begin(self) -> sqlite3.Cursor | None:
        """Start a write transaction at once, or None if another connection holds the lock.

        Raises ``sqlite3.Error`` for anything else (the caller reports it as a
        ``StoreError``).
        """
        connection = self._connect()
        if connection is None:
            return None
        if connection.in_transaction:
            # Only after a failure we could not roll back: start clean.
            connection.execute("ROLLBACK")
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                return None
            raise
        return connection.cursor()

    def rollback(self) -> None:
        """Abandon the transaction ``begin`` started (after a failed INSERT)."""
        if self._connection is not None and self._connection.in_transaction:
            self._connection.execute("ROLLBACK")

    def commit(self) -> Deferred[None]:
        """COMMIT (write and fsync the WAL) in the commit thread; fires once it is durable."""
        if self._threads is None:
            self._threads = ThreadPool(1, 1, name="federation-invite-sqlite-commit")
            self._threads.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._shut_down
            )
        return deferToThreadPool(self._reactor, self._threads, self._commit)

    def _commit(self) -> None:
        connection = self._connection
        assert connection is not None
        try:
            connection.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (disk full, I/O error) may leave the transaction
            # open; roll it back so the next batch starts clean.
            if connection.in_transaction:
                try:
                    connection.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    def _shut_down(self) -> None:
        # The reactor is stopping and the store was not closed: stop the thread
        # (its worker would keep the process from exiting) and start no other.
        self._shutdown_trigger = None
        self.usable = False
        self._stop_threads()

    def _stop_threads(self) -> None:
        if self._threads is not None:
            self._threads.stop()
            self._threads = None

    def close(self) -> None:
        """Stop the commit thread (after a commit in flight) and close the connection."""
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        self._stop_threads()
        self._close_connection()


class SQLiteDirectReader(_OwnConnection):
    """One-statement reads on the reactor thread, from a connection of their own.

    For the reads an invite waits on (the policy's invitee states: whether a
    user is ours, and its rules). Through the pool, each such read is two hops
    between threads and the GIL handed over several times. In an invite storm
    nearly every invite is for an invitee not seen before, so nearly every
    invite waited for one (``benchmarks/README.md``: 5-10% of the daemon's CPU
    per invite, and a third more system time). One statement in autocommit
    mode is its own read transaction, so what it reads is consistent. In WAL
    mode readers never wait for writers; should SQLite answer busy all the
    same (another connection holding the file exclusively), ``read`` says so
    and the caller reads through the pool, which waits. Outside WAL mode (or
    for ``:memory:``, which is private to one connection) it is not used.
    """

    def _configure(self, connection: sqlite3.Connection) -> None:
        connection.execute("PRAGMA query_only = 1")

    def read(self, statement: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]] | None:
        """The rows of one statement, or None if SQLite is busy (read through the pool).

        Raises ``sqlite3.Error`` for anything else (the caller reports it as a
        ``StoreError``).
        """
        connection = self._connect()
        if connection is None:
            return None
        try:
            return connection.execute(statement, args).fetchall()
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                return None
            raise

    def close(self) -> None:
        self._close_connection()
