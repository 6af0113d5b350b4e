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
  and where checkpoints run. Callers are answered after it returns, so an
  acknowledged invite is on disk. Where it runs depends on how long it takes:

  - while commits are quick (the median of the last few on the reactor thread
    at most ``REACTOR_COMMIT_SECONDS``: a disk whose fsync takes well under a
    millisecond), on the reactor thread itself, at the end of the reactor
    iteration in which the batch's first invite arrived, so that every invite
    read in that iteration joins the one transaction. No second thread takes
    the GIL: over TLS this took 8% off the daemon's CPU per invite (618 -> 571
    us, medians of 5 alternating pairs) and 4% off a server that only stores
    and logs (480 -> 461 us), and the batches grew (12-16 rows instead of
    10-11 under the benchmark's load; ``benchmarks/README.md``, fifth
    session). The reactor waits for the fsync meanwhile: 0.3-0.6 ms a commit
    there (3-6 ms with a checkpoint).
  - once they are slow (a disk whose fsync takes milliseconds), in a thread of
    our own, which holds the GIL only to enter and leave that one call, so the
    reactor goes on with other work meanwhile. With 5 ms fsyncs, commits on the
    reactor thread halved the daemon's throughput (794 against 1,485 invites/s).
    After ``_PROBE_EVERY`` commits in the thread one runs on the reactor thread,
    timed, so a disk that speeds up brings them back; a probe still slow
    doubles the wait for the next, so a disk that stays slow seldom stalls the
    reactor. Commits in the thread are not timed: taking the GIL back after
    the COMMIT can take milliseconds under load, and they would look slow for
    ever.

One writer connection, one transaction at a time: the store starts the next
batch only when the previous commit has finished. Checkpoints stay SQLite's
own (in the COMMIT that crosses 1,000 pages of WAL): running them from another
connection while commits went on made both fsync at once, and over a long run
commits stalled for up to 170 ms (the p99 latency went from 36 to 63 ms;
``benchmarks/README.md``).

The reads an invite waits on (the policy's invitee states) skip the pool's
thread the same way: ``SQLiteDirectReader`` runs them on the reactor thread,
one statement each, from a connection of their own.
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from ._dialect import configure_durable, is_busy

__all__ = ["REACTOR_COMMIT_SECONDS", "SQLiteDirectReader", "SQLiteInviteWriter"]

#: Commits run on the reactor thread while the median of the last few there takes at
#: most this long (seconds).
REACTOR_COMMIT_SECONDS = 0.001
#: How many of the latest commits on the reactor thread that median is taken over, and
#: how many it needs before it can send commits to the thread.
_RECENT_COMMITS = 9
_RECENT_NEEDED = 5
#: While commits run in the thread, after this many there one runs on the reactor
#: thread instead, to find out whether they are quick again. Each such probe that is
#: still slow doubles the wait for the next one, up to ``_PROBE_EVERY_MAX``, so that on
#: a disk that stays slow the reactor is seldom made to wait for it.
_PROBE_EVERY = 32
_PROBE_EVERY_MAX = 4096


class _OwnConnection:
    """A connection of our own to the store's file that never waits for a lock.

    It is opened with the store (``open``), right after the pool's, and only if
    the file is in WAL mode: the store's pool put it in WAL mode when it opened
    it (a property of the file), and we only check, never change it from here.
    Outside WAL mode ``usable`` turns False and the caller goes through the pool.
    So it does if the file at the path is no longer the one the pool opened
    (``file_replaced``: a backup restored over it since): the pool's write then
    fails its check after the COMMIT. Opened later (it once was, at the first
    invite), it would open the new file: the invite committed there, answered
    500, and the file paired with the old one's WAL and shared memory, which
    SQLite would take for its own (https://sqlite.org/howtocorrupt.html, 1.4).
    """

    def __init__(self, path: str, file_replaced: Callable[[], bool]) -> None:
        self._path = path
        self._file_replaced = file_replaced
        self._connection: sqlite3.Connection | None = None
        self.usable = True

    def _configure(self, connection: sqlite3.Connection) -> None:
        """Settings of this kind of connection, once it is open."""

    def open(self) -> None:
        """Open the connection now, as the store opens, rather than at first use."""
        try:
            self._connect()
        except sqlite3.Error:
            pass  # tried again, and reported as the store's error, at first use

    def _connect(self) -> sqlite3.Connection | None:
        if self._connection is None:
            if self._file_replaced():
                self.usable = False
                return None
            connection = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False, timeout=0
            )
            connection.execute("PRAGMA busy_timeout = 0")
            (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
            # Again once open: the file may have been replaced since the check.
            if str(mode).lower() != "wal" or self._file_replaced():
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
    """SQLite invite writes: INSERTs on the reactor thread, COMMIT there too while
    commits are quick, else in a thread of its own.

    Outside WAL mode every batch goes through the pool: there, our open
    transaction would block readers.
    """

    def __init__(self, path: str, file_replaced: Callable[[], bool], reactor: Any) -> None:
        super().__init__(path, file_replaced)
        self._reactor = reactor
        self._threads: ThreadPool | None = None
        self._shutdown_trigger: Any = None
        #: How long the latest commits on the reactor thread took, in seconds. Those in
        #: the thread are not timed: their time includes waiting for the GIL back.
        self._recent: deque[float] = deque(maxlen=_RECENT_COMMITS)
        #: What commits are timed with (real time: a commit's wait is the disk's).
        self.timer: Callable[[], float] = time.perf_counter
        #: Whether commits run on the reactor thread (they are quick), and how many
        #: ran in the thread since the last one on the reactor thread.
        self.commits_on_reactor = True
        self._in_thread = 0
        self._probe_every = _PROBE_EVERY

    @property
    def recent_commit_seconds(self) -> float | None:
        """The median of the latest commits on the reactor thread (None before any)."""
        return self._median() if self._recent else None

    def _median(self) -> float:
        return sorted(self._recent)[len(self._recent) // 2]

    def call_later(self, work: Callable[[], object]) -> Any:
        """Run ``work`` on the reactor thread once this reactor iteration is done."""
        return self._reactor.callLater(0, work)

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
        """COMMIT (write and fsync the WAL); fires once it is durable.

        While commits are quick it runs here and now, and the result has fired
        when this returns; else in the commit thread.
        """
        if self.commits_on_reactor or self._in_thread >= self._probe_every:
            try:
                self._timed_commit()
            except Exception:
                return fail()
            return succeed(None)
        self._in_thread += 1
        if self._threads is None:
            self._threads = ThreadPool(1, 1, name="federation-invite-sqlite-commit")
            self._threads.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._shut_down
            )
        return deferToThreadPool(self._reactor, self._threads, self._commit)

    def _timed_commit(self) -> None:
        """COMMIT on this (the reactor) thread; then decide where the next ones run."""
        started = self.timer()
        try:
            self._commit()
        finally:
            elapsed = self.timer() - started
            self._recent.append(elapsed)
            if self._in_thread:  # a probe
                self._in_thread = 0
                if elapsed > REACTOR_COMMIT_SECONDS:
                    self._probe_every = min(2 * self._probe_every, _PROBE_EVERY_MAX)
            self.commits_on_reactor = (
                len(self._recent) < _RECENT_NEEDED or self._median() <= REACTOR_COMMIT_SECONDS
            )
            if self.commits_on_reactor:
                self._probe_every = _PROBE_EVERY

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

    def close(self) -> Callable[[], None]:
        """Take no more commits; what finishes closing, to be run off the reactor thread.

        That stops the commit thread (after a commit in flight: joining it here
        would hold the reactor for as long as a stalled fsync) and then closes
        the connection. ``DatabaseStore.close`` runs it with the pool's close,
        which bounds the wait.
        """
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        threads, self._threads = self._threads, None

        def finish() -> None:
            if threads is not None:
                threads.stop()
            self._close_connection()

        return finish


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
