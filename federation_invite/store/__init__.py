"""Storage shared by every worker: SQLite by default, PostgreSQL for several workers.

``open_store("sqlite:///invites.db")`` or ``open_store("postgresql://user@host/db")``
fires with an ``IStore``; schema migrations run at start-up, and
``run_migrations(uri)`` (alias ``migrate``) runs them on an operator's command.
"""

from ._base import DatabaseStore, migrate, open_store, run_migrations
from ._dialect import parse_database_uri
from ._interface import IStore
from ._migrations import LATEST_SCHEMA_VERSION, MigrationResult
from ._records import (
    INVITE_STATUSES,
    InviteRecord,
    InviteRule,
    SchemaVersionError,
    ServerKeyRecord,
    StoreError,
)

__all__ = [
    "INVITE_STATUSES",
    "LATEST_SCHEMA_VERSION",
    "DatabaseStore",
    "IStore",
    "InviteRecord",
    "InviteRule",
    "MigrationResult",
    "SchemaVersionError",
    "ServerKeyRecord",
    "StoreError",
    "migrate",
    "open_store",
    "parse_database_uri",
    "run_migrations",
]
