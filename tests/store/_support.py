"""Databases for the store tests: a temporary SQLite file, or a fresh PostgreSQL database.

PostgreSQL: the server at 127.0.0.1:5432 with trust auth for user ``postgres``
(``FEDERATION_INVITE_TEST_POSTGRES`` may name another server as a libpq URI
without a database). Each test creates ``fi_test_<pid>_<random>`` and drops it
in cleanup. When the server cannot be reached the PostgreSQL tests are skipped
with a loud reason, or fail when the ``CI`` environment variable is set.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from typing import Any

from twisted.trial.unittest import SkipTest

from federation_invite.store import InviteRecord

POSTGRES_BASE = os.environ.get(
    "FEDERATION_INVITE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432"
).rstrip("/")

_unreachable: list[str] = []  # the reason, once a probe has failed in this process


def _admin_connection() -> Any:
    import psycopg2

    connection = psycopg2.connect(f"{POSTGRES_BASE}/postgres", connect_timeout=3)
    connection.autocommit = True
    return connection


def require_postgres(test: Any) -> None:
    """Skip (or, under CI, fail) ``test`` loudly when PostgreSQL cannot be reached."""
    if not _unreachable:
        try:
            _admin_connection().close()
            return
        except Exception as e:  # ImportError or any psycopg2 error
            _unreachable.append(f"{type(e).__name__}: {' '.join(str(e).split())}")
    message = (
        f"!!! PostgreSQL at {POSTGRES_BASE} is unreachable ({_unreachable[0]}):"
        " the PostgreSQL half of the store suite did NOT run !!!"
    )
    if "CI" in os.environ:
        test.fail(message + " (CI is set, so this is a failure)")
    raise SkipTest(message)


def create_postgres_database(options: str = "") -> str:
    """Create a uniquely named empty database (with CREATE DATABASE's ``options``, e.g.
    an ENCODING) and return its name."""
    name = f"fi_test_{os.getpid()}_{secrets.token_hex(4)}"
    connection = _admin_connection()
    try:
        connection.cursor().execute(f'CREATE DATABASE "{name}" {options}')
    finally:
        connection.close()
    return name


def drop_postgres_database(name: str) -> None:
    """Drop a test database, ending any connection a test left behind first."""
    connection = _admin_connection()
    try:
        cursor = connection.cursor()
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        connection.close()


def fresh_postgres_database(test: Any) -> str:
    """A new empty database for ``test`` (skipped, or failed under CI, without
    PostgreSQL), dropped when it ends: its name."""
    require_postgres(test)
    name = create_postgres_database()
    test.addCleanup(drop_postgres_database, name)
    return name


def raw_postgres(name: str, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement (``?`` placeholders) outside the store, committed."""
    import psycopg2

    connection = psycopg2.connect(f"{POSTGRES_BASE}/{name}")
    try:
        with connection:
            cursor = connection.cursor()
            cursor.execute(statement.replace("?", "%s"), args)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def raw_sqlite(path: str, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement outside the store, committed."""
    connection = sqlite3.connect(path)
    try:
        with connection:
            return connection.execute(statement, args).fetchall()
    finally:
        connection.close()


#: How the releases before federation_invite_schema created their bookkeeping table
#: (their migrate_txn's statement, verbatim).
PREVIOUS_RELEASE_BOOKKEEPING = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INTEGER NOT NULL PRIMARY KEY,"
    " name TEXT NOT NULL,"
    " applied_ts BIGINT NOT NULL)"
)


def previous_release_database(dialect_name: str, applied_ts: int) -> list[str]:
    """The statements that make an empty database what the releases before
    federation_invite_schema left: schema version 1 applied (its file's statements),
    recorded in ``schema_migrations`` as their migrate_txn recorded it."""
    from federation_invite.store._migrations import load_migrations

    return [
        PREVIOUS_RELEASE_BOOKKEEPING,
        *load_migrations(dialect_name)[0].statements,
        "INSERT INTO schema_migrations (version, name, applied_ts)"
        f" VALUES (1, '0001_initial.sql', {int(applied_ts)})",
    ]


def make_invite(event_id: str = "$event1", **changes: Any) -> InviteRecord:
    """A plausible invite record; keyword arguments replace fields."""
    fields: dict[str, Any] = {
        "event_id": event_id,
        "room_id": "!room:remote.example",
        "room_version": "10",
        "invitee": "@alice:local.example",
        "sender": "@bob:remote.example",
        "origin": "remote.example",
        "event": {
            "type": "m.room.member",
            "state_key": "@alice:local.example",
            "content": {"membership": "invite", "displayname": "Alice \u00e9\u2603"},
            "signatures": {"remote.example": {"ed25519:1": "c2ln"}},
        },
        "invite_room_state": [{"type": "m.room.name", "content": {"name": "A room"}}],
        "received_ts": 1_700_000_000_000,
        "status": "pending",
    }
    fields.update(changes)
    return InviteRecord(**fields)
