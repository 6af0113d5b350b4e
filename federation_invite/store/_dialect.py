"""The thin seam between SQLite and PostgreSQL: URIs, connections, transactions.

Everything else (the SQL of every operation, the migrations) is shared. Our SQL
uses ``?`` placeholders; the PostgreSQL dialect rewrites them to ``%s``, which
is why no statement of ours may contain a literal ``?`` or ``%``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, quote, quote_plus, unquote, unquote_plus, urlsplit, urlunsplit

from twisted.enterprise import adbapi
from twisted.internet.interfaces import IReactorCore
from twisted.python import log

from ._records import StoreError

if TYPE_CHECKING:
    from ._sqlite_writer import SQLiteDirectReader, SQLiteInviteWriter

__all__ = ["Dialect", "PostgresDialect", "SQLiteDialect", "parse_database_uri"]

#: How long a SQLite connection waits for another's write lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 10_000
#: Key of the PostgreSQL advisory lock that serialises migrations across workers.
MIGRATION_LOCK_KEY = 0x66692D6D69677261  # "fi-migra"
#: Seconds libpq may take to connect (TCP, TLS, start-up and authentication) unless the
#: URI or ``PGCONNECT_TIMEOUT`` says otherwise; libpq's own default is to wait for ever.
POSTGRES_CONNECT_TIMEOUT = 10
#: The most connections a PostgreSQL store opens (its operations running at once) unless
#: told otherwise (``open_store``'s ``pool_size``, the ``database_pool_size`` setting).
POSTGRES_POOL_SIZE = 5
#: Seconds a PostgreSQL pool that was refused a connection while others were open opens
#: no more, its operations waiting for those instead (``_PostgresPool``).
POSTGRES_REFUSED_PAUSE = 60.0
#: Seconds a PostgreSQL statement may wait for a lock (``lock_timeout``) and run in all
#: (``statement_timeout``) unless the database's or role's settings, the URI's
#: ``options`` or ``PGOPTIONS`` set them; PostgreSQL's own default is for ever. Schema
#: migrations are exempt from these defaults.
POSTGRES_LOCK_TIMEOUT = 10.0
POSTGRES_STATEMENT_TIMEOUT = 30.0
#: libpq's TCP settings unless the URI names them: keepalives after 10 s idle, every 5 s,
#: the connection ended after 3 unanswered (the system's defaults take over two hours),
#: and ended too when data sent is unacknowledged for 30 s (``tcp_user_timeout``, in ms;
#: libpq 12 and later). So a server gone silent (its host down, the network cut) on an
#: open connection is noticed; neither applies to a Unix socket.
POSTGRES_TCP_SETTINGS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


class Dialect:
    """What differs between databases, and nothing else."""

    name: ClassVar[str]
    #: What to give federation-invite when the database holds another's objects under
    #: our names (the end of "give federation-invite ...").
    own_database_hint: ClassVar[str]

    def __init__(self, display: str, secrets: tuple[str, ...]) -> None:
        #: The URI with any password replaced, fit for logs and messages.
        self.display = display
        self._secrets = secrets

    def connection_pool(
        self, reactor: IReactorCore | None, size: int = POSTGRES_POOL_SIZE
    ) -> adbapi.ConnectionPool:
        """A new adbapi pool for this database (connections open lazily), of at most
        ``size`` connections where the database takes several (PostgreSQL)."""
        raise NotImplementedError

    def sql(self, statement: str) -> str:
        """``statement`` with our ``?`` placeholders in the driver's parameter style."""
        return statement

    def begin(self, txn: adbapi.Transaction, *, write: bool) -> None:
        """Start the transaction of one logical operation."""

    def lock_for_migrations(self, txn: adbapi.Transaction) -> None:
        """Make concurrent migrations by several workers take turns (inside ``txn``)."""

    def lock_for_schema_check(self, txn: adbapi.Transaction) -> None:
        """Wait (inside ``txn``) for a migration another worker is running, so that the
        schema is read as it was before it or after it, never in between."""

    def table_exists(self, txn: adbapi.Transaction, table: str) -> bool:
        """Whether ``table`` exists in the database the store uses."""
        raise NotImplementedError

    def object_kind(self, txn: adbapi.Transaction, name: str) -> str | None:
        """What holds ``name`` where the store creates its tables ('table', 'index',
        'view' and so on), or None: free for a table or index of ours."""
        raise NotImplementedError

    def columns(self, txn: adbapi.Transaction, table: str) -> list[tuple[str, str, bool, bool]]:
        """``table``'s columns in order: (name, type in lower case, NOT NULL, in the
        primary key)."""
        raise NotImplementedError

    def invite_writer(self, reactor: Any) -> SQLiteInviteWriter | None:
        """A writer of invite batches that spares the pool's thread, or None (the pool
        writes them). Only SQLite has one: ``_sqlite_writer``."""
        return None

    def direct_reader(self) -> SQLiteDirectReader | None:
        """A reader of one statement on the calling thread, or None (the pool reads).
        Only SQLite has one: ``_sqlite_writer``."""
        return None

    def driver_errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions that mean "the database said no", to be wrapped in StoreError."""
        return (adbapi.ConnectionLost,)

    #: Whether ``check_file`` has found the database file gone (SQLite): every write
    #: since has failed, and is refused before it begins.
    file_lost = False

    def cancel_queries(self, connections: list[Any]) -> None:
        """Cancel whatever the pool's ``connections`` are running (called from a thread
        of its own when the store is closed and they are still busy)."""

    def check_file(self, operation: str) -> None:
        """Raise ``StoreError`` if what was just committed may be lost: called after each
        write transaction's commit, before anyone is told it is stored."""

    def release_file(self, txn: adbapi.Transaction) -> None:
        """Once ``check_file`` first fails: leave nothing of the lost file where the next
        database opened at its path would take it for its own (run in the pool)."""

    def describe(self, error: BaseException) -> str:
        """A one-line description of a driver error with every secret removed."""
        text = " ".join(str(error).split()) or "(no message)"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return f"{type(error).__name__}: {text} [{self.display}]"


class SQLiteDialect(Dialect):
    """The embedded default: one file, WAL mode, one connection per pool.

    Every write starts with ``BEGIN IMMEDIATE``, taking the write lock at the
    start: a deferred transaction that reads and then writes could fail with
    ``SQLITE_BUSY`` when another pool wrote in between, without waiting.
    """

    name = "sqlite"
    own_database_hint = "a database file of its own"

    def __init__(self, path: str, display: str) -> None:
        super().__init__(display, ())
        self.path = path
        #: (st_dev, st_ino) of the file the first connection opened; None for a
        #: database with no file of its own (``:memory:``) or before it is opened.
        self._file_identity: tuple[int, int] | None = None
        #: ``path`` made absolute when the first connection opened it; the store's
        #: own connections open this, so a later chdir cannot point them elsewhere.
        self._file_path = path

    def connection_pool(
        self, reactor: IReactorCore | None, size: int = POSTGRES_POOL_SIZE
    ) -> adbapi.ConnectionPool:
        extra: dict[str, Any] = {} if reactor is None else {"cp_reactor": reactor}
        return adbapi.ConnectionPool(
            "sqlite3",
            database=self.path,
            timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
            # We issue BEGIN ourselves; adbapi's commit()/rollback() end it.
            isolation_level=None,
            # adbapi runs each connection in its pool thread, never two at once.
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=self._open_connection,
            **extra,
        )

    def begin(self, txn: adbapi.Transaction, *, write: bool) -> None:
        txn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def invite_writer(self, reactor: Any) -> SQLiteInviteWriter:
        from ._sqlite_writer import SQLiteInviteWriter

        return SQLiteInviteWriter(self._file_path, self.file_replaced, reactor)

    def direct_reader(self) -> SQLiteDirectReader:
        from ._sqlite_writer import SQLiteDirectReader

        return SQLiteDirectReader(self._file_path, self.file_replaced)

    def table_exists(self, txn: adbapi.Transaction, table: str) -> bool:
        txn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
        return txn.fetchone() is not None

    def object_kind(self, txn: adbapi.Transaction, name: str) -> str | None:
        # Tables, indexes and views share one namespace, whose names ignore ASCII case.
        txn.execute(
            "SELECT type FROM sqlite_master"
            " WHERE type IN ('table', 'index', 'view') AND name = ? COLLATE NOCASE",
            (name,),
        )
        row = txn.fetchone()
        return None if row is None else str(row[0])

    def columns(self, txn: adbapi.Transaction, table: str) -> list[tuple[str, str, bool, bool]]:
        txn.execute('SELECT name, lower(type), "notnull", pk FROM pragma_table_info(?)', (table,))
        rows = txn.fetchall()
        return [(name, kind, bool(notnull), bool(pk)) for name, kind, notnull, pk in rows]

    def driver_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error, *super().driver_errors())

    def _open_connection(self, connection: sqlite3.Connection) -> None:
        _configure_sqlite(connection)
        if self._file_identity is None and self.path != ":memory:":
            # Absolute now, as SQLite resolved it, so that a later chdir changes
            # nothing. Joined, not normalised: SQLite (the kernel) follows a
            # symlink before a "..", and so must every later open and stat.
            try:
                self._file_path = os.path.join(os.getcwd(), self.path)
            except OSError:  # the working directory is gone: keep the path as given
                self._file_path = self.path
            self._file_identity = _file_identity(self._file_path)

    def check_file(self, operation: str) -> None:
        """Raise ``StoreError`` once the database file was deleted or replaced under us.

        An open SQLite connection keeps writing to the file it opened even after
        that file is unlinked or another is renamed over its path: every commit
        would succeed, and every invite acknowledged from then on would be gone at
        the next start. The store calls this after each write transaction's
        COMMIT, before anyone is told it is stored: one ``stat`` per batch of
        invites, and after the commit because the file may be replaced while the
        write waits for the lock or commits. The write then fails as any storage
        failure does (an invite is answered 500 M_UNKNOWN and the reason logged),
        and so does every write after it, refused before it begins (``file_lost``),
        until the daemon is restarted on the file now at that path.
        """
        if self.file_lost or self.file_replaced():
            self.file_lost = True
            raise StoreError(
                operation,
                "the database file was deleted or replaced while open; nothing more is"
                f" written to it: restart to use the file now at its path [{self.display}]",
            )

    def release_file(self, txn: adbapi.Transaction) -> None:
        """Empty the lost file's WAL into it (``wal_checkpoint(TRUNCATE)``).

        That WAL is still at the database's path plus ``-wal``, with the write
        ``check_file`` refused in it: left there, SQLite would take it for the WAL
        of the file next opened at the path (the one renamed over it, or a new one)
        and apply it to that file at the next start, so that the refused invite
        would be found stored and the restored file overwritten
        (https://sqlite.org/howtocorrupt.html, 1.4).
        """
        txn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        busy, _, _ = txn.fetchone()
        if busy:
            raise StoreError("emptying the lost file's WAL", "a connection is still reading it")

    def file_replaced(self) -> bool:
        """Whether the file at the database's path is no longer the one the pool opened
        (deleted, or another renamed over it)."""
        expected = self._file_identity
        if expected is None:
            return False
        try:
            found: tuple[int, int] | None = _file_identity(self._file_path)
        except FileNotFoundError:
            found = None
        except OSError:
            # Not ours to judge (a permission change, say): SQLite reports what
            # actually stops it.
            return False
        return found != expected


def _file_identity(path: str) -> tuple[int, int]:
    """(st_dev, st_ino) of the file at ``path``."""
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _configure_sqlite(connection: sqlite3.Connection) -> None:
    """Per-connection settings: WAL, fsync on every commit, foreign keys, lock waits."""
    connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    # WAL lets readers in other pools go on while one writes; it is a property
    # of the file and persists.
    _set_wal(connection)
    configure_durable(connection)


def configure_durable(connection: sqlite3.Connection) -> None:
    """What every connection of ours that writes must set: fsync on every commit, foreign keys."""
    # FULL: an acknowledged invite survives a power cut, not only a crash.
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA foreign_keys = ON")


def is_busy(error: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused because another connection holds a lock (busy or locked)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(error).lower()
    return "locked" in text or "busy" in text


def _set_wal(connection: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode = WAL``, waiting for other connections as a write would.

    On a new file several workers starting at once all switch it; SQLite
    answers "database is locked" at once, without waiting for the busy timeout,
    to a connection whose switch would deadlock with another's transaction. We
    retry (this runs in a pool thread) until the busy timeout has passed.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


class _LostQuietlyConnection(adbapi.Connection):
    """adbapi's pooled connection, except for a rollback once the connection is lost.

    A connection the server ended (``pg_terminate_backend``, a restart) or the network
    cut fails its operation, and psycopg2 marks it closed; adbapi then rolls it back,
    which fails, and logs two tracebacks ("Rollback failed": the rollback's error, then
    the ``ConnectionLost`` it raises) beside the operation's own one-line error. Here
    such a connection, with nothing left to roll back (the server ended its transaction
    with it), is only dropped from the pool, to be replaced at its next use, as adbapi
    does; the operation still fails with its own error. A rollback failing on a
    connection still open is adbapi's, and logged as before.
    """

    def rollback(self) -> None:
        connection = self._connection
        if connection is not None and connection.closed:
            self._pool.disconnect(connection)
            return
        super().rollback()


class _TrackedTransaction(adbapi.Transaction):
    """adbapi's transaction (its cursor), noting whether a statement of it has run, and
    setting the default limits for itself with its first statement
    (``PostgresDialect._open_connection``)."""

    #: Whether a statement has run in this transaction: from then on it may have
    #: changed something, and is not run again on another connection.
    executed = False

    def _limits(self) -> str:
        """The statement setting this transaction's limits, before its first one, or ''."""
        if self.executed:
            return ""
        limits: Mapping[Any, str] = self._pool.transaction_limits
        return limits.get(self._connection._connection, "")

    def execute(self, statement: str, *args: Any, **kwargs: Any) -> Any:
        cursor: Any = self._cursor
        # One round trip: psycopg2 sends both statements at once, the results are the
        # last one's. No '%' in the first (the parameters are substituted in both).
        result = cursor.execute(self._limits() + statement, *args, **kwargs)
        self.executed = True
        return result

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        cursor: Any = self._cursor
        limits = self._limits()
        if limits:
            cursor.execute(limits)
        result = cursor.executemany(*args, **kwargs)
        self.executed = True
        return result


class _PostgresPool(adbapi.ConnectionPool):
    """adbapi's pool, with ``_LostQuietlyConnection`` for its connections, its connections
    shared by its threads, and each transaction that found its connection lost before any
    statement of it ran run again, on another connection.

    Shared: adbapi gives each pool thread a connection of its own, opened at its first
    use, so that a thread whose connection the server refused (``CONNECTION LIMIT``,
    ``max_connections`` nearly used up) failed every operation given to it while the
    others' connections sat idle. Here a thread takes any idle connection, opens one only
    when none is idle, and when the server refuses it while others are open waits for one
    of those (opening no more for ``POSTGRES_REFUSED_PAUSE`` seconds): fewer connections
    than threads cost parallelism, not operations. At most ``cp_max`` are open.

    Run again: adbapi notices that a pooled connection was ended by the server (a
    restart, a failover, ``pg_terminate_backend``, ``idle_session_timeout``) only when an
    operation fails on it: without this, each lost connection failed one operation (a
    whole batch of invites). Only a transaction none of whose statements ran is run
    again (its BEGIN or first statement failed on the closed connection: nothing of it
    reached the database), so a write ended on purpose halfway is not redone.
    """

    connectionFactory = _LostQuietlyConnection
    transactionFactory = _TrackedTransaction

    def __init__(self, *args: Any, transaction_limits: Mapping[Any, str], **kw: Any) -> None:
        super().__init__(*args, **kw)
        #: The statement setting each connection's limits for a transaction
        #: (``PostgresDialect.transaction_limits``).
        self.transaction_limits = transaction_limits
        #: Guards what follows; notified when a connection is released or closed.
        self._available = threading.Condition()
        #: Open connections no thread is using, the last released last.
        self._idle: list[Any] = []
        #: Connections open (idle, in use, ``self.connections``) or being opened.
        self._open = 0
        #: Until then (``time.monotonic()``), open no connection while others are open:
        #: the server refused the last one.
        self._refused_until = 0.0

    def connect(self) -> Any:
        """The calling thread's connection: its own while it runs an operation, else an
        idle one, else a new one; else (the server refused it, or ``cp_max`` are open)
        one released by another thread, for as long as others are open: each is released
        when its operation ends, as a thread is to the operations queued for one (the
        statement limits bound it). With none open, the server's refusal is raised.

        A thread not refused itself tries to open one after ``POSTGRES_CONNECT_TIMEOUT``
        seconds of waiting, not only once ``POSTGRES_REFUSED_PAUSE`` is over."""
        tid = self.threadID()
        refused = False
        retry_at = time.monotonic() + POSTGRES_CONNECT_TIMEOUT
        while True:
            with self._available:
                conn = self.connections.get(tid)
                if conn is not None:
                    return conn
                while True:
                    if self._idle:
                        conn = self._idle.pop()
                        self.connections[tid] = conn
                        return conn
                    now = time.monotonic()
                    if self._open == 0 or (
                        self._open < self.max
                        and (now >= self._refused_until or (not refused and now >= retry_at))
                    ):
                        self._open += 1
                        break
                    if self._open >= self.max:
                        self._available.wait()  # notified when one is released or closed
                        continue
                    wake = self._refused_until if refused else min(retry_at, self._refused_until)
                    self._available.wait(max(0.01, wake - now))
            try:
                conn = self.dbapi.connect(*self.connargs, **self.connkw)
                if self.openfun is not None:
                    self.openfun(conn)
            except BaseException:
                with self._available:
                    self._open -= 1
                    self._available.notify_all()
                    if not self._open:
                        raise
                    # Others are open: wait for one of theirs.
                    self._refused_until = time.monotonic() + POSTGRES_REFUSED_PAUSE
                refused = True
                continue
            with self._available:
                self.connections[tid] = conn
            return conn

    def disconnect(self, conn: Any) -> None:
        """Close the calling thread's connection (lost, or its rollback failed)."""
        tid = self.threadID()
        with self._available:
            if conn is not self.connections.get(tid):
                raise Exception("wrong connection for thread")
            del self.connections[tid]
            self._open -= 1
            self._available.notify_all()
        self._close(conn)

    def _release(self) -> None:
        """The calling thread's operation is over: its connection (if still open) is idle."""
        tid = self.threadID()
        with self._available:
            conn = self.connections.pop(tid, None)
            if conn is not None:
                self._idle.append(conn)
                self._available.notify()

    def finalClose(self) -> None:
        super().finalClose()
        with self._available:
            idle, self._idle = self._idle, []
            self._open = 0
        for conn in idle:
            self._close(conn)

    def _runWithConnection(self, func: Any, *args: Any, **kw: Any) -> Any:
        try:
            return super()._runWithConnection(func, *args, **kw)
        finally:
            self._release()

    def _runInteraction(self, interaction: Any, *args: Any, **kw: Any) -> Any:
        try:
            # Each connection found lost is closed: at most ``cp_max`` more attempts
            # (idle ones the server ended at the same time, then a new one).
            for attempt in range(self.max + 1):
                conn = self.connectionFactory(self)
                trans = self.transactionFactory(self, conn)
                try:
                    result = interaction(trans, *args, **kw)
                    trans.close()
                    conn.commit()
                    return result
                except BaseException:
                    driver = conn._connection
                    lost = driver is not None and bool(driver.closed)
                    try:
                        conn.rollback()  # drops a lost connection (_LostQuietlyConnection)
                    except BaseException:
                        log.err(None, "Rollback failed")
                    if attempt < self.max and lost and not trans.executed:
                        continue
                    raise
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            self._release()


class PostgresDialect(Dialect):
    """PostgreSQL through psycopg2, for several workers sharing one database."""

    name = "postgres"
    own_database_hint = (
        "a database of its own, or a schema of its own (CREATE SCHEMA <schema>, then"
        " ?options=-csearch_path%3D<schema> in the URI)"
    )

    def __init__(self, dsn: str, display: str, secrets: tuple[str, ...]) -> None:
        super().__init__(display, secrets)
        self.dsn = dsn
        #: For each open connection that needs our default limits, the statement that
        #: sets them for a transaction (``_open_connection``).
        self.transaction_limits: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    def connection_pool(
        self, reactor: IReactorCore | None, size: int = POSTGRES_POOL_SIZE
    ) -> adbapi.ConnectionPool:
        psycopg2 = _import_psycopg2()
        extra: dict[str, Any] = {} if reactor is None else {"cp_reactor": reactor}
        named = self._uri_parameters()
        if "connect_timeout" not in named and "PGCONNECT_TIMEOUT" not in os.environ:
            # A server that accepts the connection and never answers (overloaded, a
            # half-dead host, a firewall) would otherwise hold a pool thread, and
            # the daemon's start or a request, for ever.
            extra["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT
        for name, value in POSTGRES_TCP_SETTINGS.items():
            if name == "tcp_user_timeout" and psycopg2.extensions.libpq_version() < 120000:
                continue  # an older libpq refuses the keyword
            if name not in named:
                extra[name] = value
        return _PostgresPool(
            "psycopg2",
            self.dsn,
            # The fallback: the URI's application_name and PGAPPNAME win.
            fallback_application_name="federation-invite",
            cp_min=1,
            cp_max=size,
            cp_reconnect=True,
            cp_openfun=self._open_connection,
            transaction_limits=self.transaction_limits,
            **extra,
        )

    def _uri_parameters(self) -> set[str]:
        """The libpq parameters the URI names (kept as they are: psycopg2's keyword
        arguments would override them, and the environment's)."""
        query = urlsplit(self.dsn).query
        return {name for name, _ in parse_qsl(query, keep_blank_values=True)}

    def _open_connection(self, connection: Any) -> None:
        """Find which of the default lock and statement limits (``POSTGRES_LOCK_TIMEOUT``)
        a new connection needs: each unless already set by anyone else (the server's
        configuration, the database's or role's settings, the URI's ``options`` or
        ``PGOPTIONS``). Each transaction on it sets them for itself (``set_config(...,
        true)``, SET LOCAL) with its first statement (``_TrackedTransaction``).

        Not libpq's ``options``: PgBouncer refuses a connection whose startup packet sets
        them, unless configured to ignore them. Nor a session SET: through a pooler in
        transaction mode it would stay on whichever server connection ran it, for the
        pooler's other clients, and be lost for ours once the pooler replaced it.

        Also refuse a database whose encoding is not UTF8 (it could not hold every
        invite's text: the write would fail with an encoding error, and with it every
        invite of its batch), and talk UTF8 to the server whatever ``PGCLIENTENCODING``
        or the URI's ``client_encoding`` say, as Synapse does; and run every transaction
        at READ COMMITTED.
        """
        try:
            encoding = connection.info.parameter_status("server_encoding")
            if encoding != "UTF8":
                raise StoreError(
                    "connect",
                    f"the database's encoding is {encoding}, not UTF8;"
                    f" create it with ENCODING 'UTF8' [{self.display}]",
                )
            connection.set_client_encoding("UTF8")
            # The insert-then-select of store_invite needs to see another worker's row
            # committed while its insert waited: READ COMMITTED, whatever the database's
            # default_transaction_isolation. psycopg2 sends it with each BEGIN (no query
            # of its own, nothing left set on a pooled server connection).
            connection.set_session(isolation_level="READ COMMITTED")
            cursor = connection.cursor()
            cursor.execute(
                "SELECT name FROM pg_settings"
                " WHERE name IN ('lock_timeout', 'statement_timeout') AND source = 'default'"
                " ORDER BY name"
            )
            defaults = {
                "lock_timeout": f"{round(POSTGRES_LOCK_TIMEOUT * 1000)}ms",
                "statement_timeout": f"{round(POSTGRES_STATEMENT_TIMEOUT * 1000)}ms",
            }
            unset = [name for (name,) in cursor.fetchall()]
            cursor.close()
            connection.commit()
            if unset:
                calls = ", ".join(
                    f"set_config('{name}', '{defaults[name]}', true)" for name in unset
                )
                self.transaction_limits[connection] = f"SELECT {calls}; "
        except BaseException:
            connection.close()  # adbapi would keep it in no pool, and never close it
            raise

    def sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def lock_for_migrations(self, txn: adbapi.Transaction) -> None:
        # Our default limits (set for the transaction by its first statement; the source
        # of no other setting is "session") do not apply to a migration, which may wait
        # for another worker's and rewrite big tables: lifted for this transaction.
        txn.execute(
            "SELECT set_config(name, '0', true) FROM pg_settings"
            " WHERE name IN ('lock_timeout', 'statement_timeout') AND source = 'session'"
        )
        # Released at commit or rollback; DDL is transactional in PostgreSQL.
        txn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))

    def lock_for_schema_check(self, txn: adbapi.Transaction) -> None:
        # Shared: checks do not wait for each other, only for a migration.
        txn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (MIGRATION_LOCK_KEY,))

    def table_exists(self, txn: adbapi.Transaction, table: str) -> bool:
        txn.execute(
            "SELECT 1 FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_name = %s",
            (table,),
        )
        return txn.fetchone() is not None

    def object_kind(self, txn: adbapi.Transaction, name: str) -> str | None:
        # Tables, indexes, views, sequences... share the schema's namespace (pg_class).
        txn.execute(
            "SELECT CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table'"
            " WHEN 'i' THEN 'index' WHEN 'I' THEN 'index' WHEN 'v' THEN 'view'"
            " WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence'"
            " WHEN 'f' THEN 'foreign table' ELSE 'relation' END"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND c.relname = %s",
            (name,),
        )
        row = txn.fetchone()
        return None if row is None else str(row[0])

    def columns(self, txn: adbapi.Transaction, table: str) -> list[tuple[str, str, bool, bool]]:
        txn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,"
            " COALESCE(a.attnum = ANY (i.indkey), false)"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
            " LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary"
            " WHERE n.nspname = current_schema() AND c.relname = %s AND c.relkind IN ('r', 'p')"
            " ORDER BY a.attnum",
            (table,),
        )
        return [(name, kind, notnull, pk) for name, kind, notnull, pk in txn.fetchall()]

    def driver_errors(self) -> tuple[type[BaseException], ...]:
        return (_import_psycopg2().Error, *super().driver_errors())

    def cancel_queries(self, connections: list[Any]) -> None:
        # libpq's cancel request, meant to be sent from another thread; the server
        # ignores it for an idle connection. One that cannot be sent (the server
        # unreachable) leaves that query to end by itself.
        for connection in connections:
            try:
                connection.cancel()
            except Exception:  # closed meanwhile, or the server unreachable
                continue


def _import_psycopg2() -> Any:
    try:
        import psycopg2
    except ImportError as e:  # pragma: no cover - the test environment has it
        raise ImportError(
            "PostgreSQL support needs psycopg2: pip install 'federation-invite[postgres]'"
        ) from e
    return psycopg2


_SUPPORTED = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite:///:memory:,"
    " postgresql://user@host:port/dbname, postgresql://user@/dbname?host=/socket/directory"
)


def parse_database_uri(uri: str) -> Dialect:
    """The dialect and connection settings for a database URI.

    ``sqlite:///relative.db`` (relative to the working directory),
    ``sqlite:////absolute.db``, ``sqlite:///:memory:`` (private to one
    connection, for tests), ``postgresql://user[:password]@host[:port]/dbname``
    (``postgres://`` too; query parameters go to libpq, e.g. ``?sslmode=require``;
    several hosts as libpq takes them, ``host1:5432,host2:5433``).
    PostgreSQL over a Unix socket, as libpq reads URIs: no host for its default
    socket directory (``postgresql:///dbname``), or the directory as the
    ``host`` parameter (``postgresql://user@/dbname?host=/var/run/postgresql``)
    or percent-encoded in the host's place (``postgresql://%2Fvar%2Frun%2Fpostgresql/dbname``).
    Anything else raises ``ValueError`` saying what is accepted.
    """
    if not isinstance(uri, str):
        raise ValueError(f"database URI must be a string, not {type(uri).__name__}")
    scheme, _, rest = uri.partition("://")
    scheme = scheme.lower()
    if not rest:
        raise ValueError(f"database URI {uri!r} is not a URI; expected one of: {_SUPPORTED}")
    if scheme == "sqlite":
        return _parse_sqlite(uri, rest)
    if scheme in ("postgresql", "postgres"):
        return _parse_postgres(uri)
    raise ValueError(
        f"database URI scheme {scheme!r} is not supported; expected one of: {_SUPPORTED}"
    )


def _parse_sqlite(uri: str, rest: str) -> SQLiteDialect:
    host, slash, path = rest.partition("/")
    if host or not slash:
        raise ValueError(
            f"SQLite URI {uri!r} must have three slashes after 'sqlite:' and no host:"
            " sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    if "?" in path or "#" in path:
        raise ValueError(f"SQLite URI {uri!r} must not have query parameters or a fragment")
    path = unquote(path)
    if not path or path.endswith("/"):
        raise ValueError(f"SQLite URI {uri!r} does not name a database file")
    if "\x00" in path:
        raise ValueError(f"SQLite URI {uri!r} contains a NUL character")
    return SQLiteDialect(path, uri)


#: libpq's URI parameters whose values are secrets.
_SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


_MALFORMED = "PostgreSQL URI is malformed (percent-encode special characters)"


def _parse_postgres(uri: str) -> PostgresDialect:
    # libpq's several hosts (h1:5432,h2:5433,[::1]:5434, for failover), each with its
    # port, are taken out before urlsplit sees the URI: urlsplit reads one host, and its
    # check of a bracketed one differs between patch releases (with the CVE-2025-0938
    # fix, "no data is allowed before a bracket" refuses h1,[::1]). Where urlsplit would
    # find them: after the last '@' of the authority, which ends at the first '/', '?'
    # or '#'.
    start = uri.index("://") + 3
    end = len(uri)
    for delimiter in "/?#":
        found = uri.find(delimiter, start)
        if found >= 0:
            end = min(end, found)
    at = uri.rfind("@", start, end)
    if at >= 0:
        start = at + 1
    hosts = uri[start:end]
    try:
        for host in hosts.split(","):
            _check_port(host)
        # urlsplit sees a neutral host in their place, for the rest of the URI.
        parts = urlsplit(uri[:start] + "h" + uri[end:] if hosts else uri)
    except ValueError:
        # The parser's message can quote parts of the URI (a password with an
        # unencoded '#' or '/' looks like a bad port): say nothing more.
        raise ValueError(_MALFORMED) from None
    # libpq takes the userinfo up to the FIRST '@' before the first '/', urlsplit up to
    # the last: with an unencoded '@' in the password libpq would connect to a host
    # named after the rest of it, and quote it in its error (RFC 3986 3.2.1 and libpq
    # both ask for special characters to be percent-encoded).
    authority = uri[uri.index("://") + 3 :].partition("/")[0]
    if authority.count("@") > 1:
        raise ValueError(_MALFORMED)
    # Nor does libpq end the userinfo at '?' or '#', as urlsplit does: with one unencoded
    # there, urlsplit would find no password to hide (and the checks below quote the URI).
    if any(char in authority.partition("@")[0] for char in "?#") and "@" in authority:
        raise ValueError(_MALFORMED)
    # libpq reads URIs itself; only the scheme needs normalising for old versions.
    dsn = "postgresql" + uri[uri.index("://") :]
    secrets: set[str] = set()
    display = uri
    if parts.password is not None:
        secrets |= {parts.password, unquote(parts.password)}
        userinfo = parts.netloc.rpartition("@")[0]
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{hosts}"
        display = urlunsplit(parts._replace(netloc=netloc))
    # libpq also takes ?password=... and ?sslpassword=... (the client key's passphrase),
    # their names percent-encoded too (?pass%77ord=): keep them out of every display.
    query = parts.query.split("&")
    for index, item in enumerate(query):
        name, equals, value = item.partition("=")
        if equals and unquote(name) in _SECRET_PARAMETERS:
            if value:
                decoded = unquote(value)
                secrets |= {value, decoded, unquote_plus(value)}
                secrets |= {quote(decoded, safe=""), quote_plus(decoded, safe="")}
            query[index] = f"{name}=***"
    if query != parts.query.split("&"):
        # Textually: urlunsplit would drop the empty host of postgresql:///db.
        display = display.partition("?")[0] + "?" + "&".join(query)
    if parts.fragment:
        raise ValueError(f"PostgreSQL URI {display!r} must not have a fragment")
    dbname = unquote(parts.path.lstrip("/"))
    if "/" in parts.path.lstrip("/"):
        # Perhaps a password's unencoded '/' (fi:12345/678@host/db: libpq reads host fi,
        # port 12345, database "678@host/db"): quote nothing of it.
        raise ValueError(_MALFORMED)
    if not dbname or "/" in dbname:
        raise ValueError(f"PostgreSQL URI {display!r} must name a database: .../dbname")
    # What libpq itself reads as a password, however spelled, is a secret too.
    secrets.update(_libpq_secrets(dsn))
    secrets.discard("")
    # Longest first, so that a secret containing another is replaced whole.
    ordered = tuple(sorted(secrets, key=lambda secret: (-len(secret), secret)))
    return PostgresDialect(dsn, display, ordered)


def _check_port(host: str) -> None:
    """Raise ``ValueError`` unless ``host`` (one host of a URI's authority, ``name``,
    ``name:port``, ``[v6]`` or ``[v6]:port``) has no port or a port 0-65535."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0 or host[end + 1 : end + 2] not in ("", ":"):
            raise ValueError("bad IPv6 host")
        port = host[end + 2 :]
    else:
        port = host.partition(":")[2]
    if port and not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError("bad port")


def _libpq_secrets(dsn: str) -> tuple[str, ...]:
    """The password and SSL key passphrase in ``dsn`` as libpq reads them (its own
    parse, so every spelling it takes as one is found), or () without psycopg2.

    Raises ``ValueError``, quoting nothing of ``dsn``, for a URI libpq cannot read
    (a bad percent escape, say): its message would quote the part, password or not.
    """
    try:
        from psycopg2 import ProgrammingError
        from psycopg2.extensions import parse_dsn
    except ImportError:  # pragma: no cover - the test environment has psycopg2
        return ()
    try:
        parameters = parse_dsn(dsn)
    except ProgrammingError as e:
        reason = str(e).partition('"')[0].rstrip(' :"')
        raise ValueError(f"{_MALFORMED}: {reason}") from None
    return tuple(parameters[name] for name in _SECRET_PARAMETERS if parameters.get(name))
