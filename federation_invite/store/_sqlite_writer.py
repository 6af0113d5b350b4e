"""SQLite invite writes without a second Python thread competing for the GIL.

Under load, the reactor thread holds the GIL nearly all the time and lets go
of it briefly at every C call that releases it (each TLS read and write, each
ed25519 operation). A database thread with Python work to do (binding a row,
stepping a statement, the next ``execute``) takes the GIL at each of those
moments, and the reactor thread waits for it back: under load this
ping-pong cost more CPU than the SQL itself (measured in ``benchmarks/``,
about 230 us per invite against a same-work server without the thread).

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
batch only when the previous commit has finished.

Checkpoints (copying the WAL back into the database file, and its fsync) would
run inside whichever COMMIT crosses SQLite's threshold, holding up every
invite waiting for the next batch: the tail of our latency under load. The
writer turns automatic checkpoints off on its connection and, once the WAL has
grown by ``CHECKPOINT_BYTES`` (SQLite's own threshold is 1,000 pages: 4 MiB),
runs a PASSIVE checkpoint from another connection in a third thread, while
commits go on (WAL mode allows both at once). The WAL file is truncated when it
restarts after a checkpoint (``journal_size_limit = 0``), so its size is what
it holds. Should checkpoints keep failing or be held back by readers, a WAL
file past ``FORCED_CHECKPOINT_BYTES`` is checkpointed in the commit thread, as
SQLite itself would.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

__all__ = ["CHECKPOINT_BYTES", "FORCED_CHECKPOINT_BYTES", "SQLiteInviteWriter"]

_log = Logger(namespace="federation_invite.store")

#: WAL growth between background checkpoints.
CHECKPOINT_BYTES = 4 * 1024 * 1024
#: WAL file size from which the commit thread checkpoints itself (background
#: checkpoints failing or falling behind).
FORCED_CHECKPOINT_BYTES = 64 * 1024 * 1024


class SQLiteInviteWriter:
    """The reactor-thread half and the commit thread of SQLite invite writes."""

    def __init__(self, path: str, reactor: Any) -> None:
        self._path = path
        self._reactor = reactor
        self._connection: sqlite3.Connection | None = None
        self._threads: ThreadPool | None = None
        self._checkpoint_threads: ThreadPool | None = None
        self._checkpoint_connection: sqlite3.Connection | None = None
        self._checkpointing = False
        #: The WAL size at which the next background checkpoint starts.
        self._next_checkpoint_at = CHECKPOINT_BYTES
        self._last_wal_size = 0
        #: Background checkpoints done, and failed (for tests and curiosity).
        self.checkpoints = 0
        self.checkpoint_failures = 0
        self._shutdown_trigger: Any = None
        #: False once we find the file is not in WAL mode (then every batch goes
        #: through the pool: outside WAL, our open transaction would block readers).
        self.usable = True

    def _connect(self) -> sqlite3.Connection | None:
        if self._connection is None:
            connection = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False, timeout=0
            )
            connection.execute("PRAGMA busy_timeout = 0")
            # The store's pool put the file in WAL mode when it opened it (a
            # property of the file); we only check, never change it from here.
            (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
            if str(mode).lower() != "wal":
                connection.close()
                self.usable = False
                return None
            connection.execute("PRAGMA synchronous = FULL")
            connection.execute("PRAGMA foreign_keys = ON")
            # Checkpoints are ours to run, off the commit path (see the module doc).
            connection.execute("PRAGMA wal_autocheckpoint = 0")
            connection.execute("PRAGMA journal_size_limit = 0")
            self._connection = connection
        return self._connection

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
            if _busy(exc):
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
        committing = deferToThreadPool(self._reactor, self._threads, self._commit)
        return committing.addCallback(self._after_commit)

    def _commit(self) -> int:
        """COMMIT; the WAL's size after it (checkpointing here only past the forced size)."""
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
        size = self._wal_size()
        if size > FORCED_CHECKPOINT_BYTES:
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
            size = self._wal_size()
        return size

    def _wal_size(self) -> int:
        try:
            return os.stat(self._path + "-wal").st_size
        except OSError:
            return 0

    def _after_commit(self, wal_size: int) -> None:
        # The batch is durable whatever happens here: never fail it.
        try:
            self._maybe_checkpoint(wal_size)
        except Exception:
            _log.failure("Could not start a checkpoint of the SQLite WAL")

    def _maybe_checkpoint(self, wal_size: int) -> None:
        if wal_size < self._last_wal_size:
            # The WAL restarted (and was truncated): count afresh.
            self._next_checkpoint_at = CHECKPOINT_BYTES
        self._last_wal_size = wal_size
        due = wal_size >= self._next_checkpoint_at
        if due and not self._checkpointing and self.usable:
            self._checkpointing = True
            # A checkpoint held back by a reader leaves the WAL as it is: the
            # next one waits for as much growth again rather than running after
            # every commit.
            self._next_checkpoint_at = wal_size + CHECKPOINT_BYTES
            if self._checkpoint_threads is None:
                self._checkpoint_threads = ThreadPool(
                    1, 1, name="federation-invite-sqlite-checkpoint"
                )
                self._checkpoint_threads.start()
            checkpointing = deferToThreadPool(
                self._reactor, self._checkpoint_threads, self._checkpoint
            )
            checkpointing.addCallbacks(self._checkpointed, self._checkpoint_failed)

    def _checkpoint(self) -> None:
        if self._checkpoint_connection is None:
            connection = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False, timeout=0
            )
            connection.execute("PRAGMA synchronous = FULL")
            self._checkpoint_connection = connection
        # PASSIVE: copies what it can without waiting for readers or the writer.
        self._checkpoint_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _checkpointed(self, _: object) -> None:
        self._checkpointing = False
        self.checkpoints += 1

    def _checkpoint_failed(self, failure: Failure) -> None:
        self._checkpointing = False
        self.checkpoint_failures += 1
        _log.warn(
            "Background checkpoint of the SQLite WAL failed (retried after the next commit):"
            " {reason}",
            reason=failure.getErrorMessage(),
        )

    def _shut_down(self) -> None:
        # The reactor is stopping and the store was not closed: stop the thread
        # (its worker would keep the process from exiting) and start no other.
        self._shutdown_trigger = None
        self.usable = False
        self._stop_threads()

    def _stop_threads(self) -> None:
        for threads in (self._threads, self._checkpoint_threads):
            if threads is not None:
                threads.stop()
        self._threads = self._checkpoint_threads = None

    def close(self) -> None:
        """Stop the commit thread (after a commit in flight) and close the connection."""
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        self._stop_threads()
        for connection in (self._connection, self._checkpoint_connection):
            if connection is not None:
                connection.close()
        self._connection = self._checkpoint_connection = None


def _busy(error: sqlite3.OperationalError) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(error).lower()
    return "locked" in text or "busy" in text
