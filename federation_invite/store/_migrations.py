"""Versioned schema files, applied in order, once, by whichever worker starts first.

``schema/NNNN_description.sql`` holds version NNNN for every database;
``schema/<dialect>/NNNN_description.sql`` replaces it for one dialect where the
SQL must differ. Applied versions are recorded in ``schema_migrations``; all
pending versions run in one transaction, under a lock, so two workers starting
together do not both migrate and a failed migration leaves nothing behind.
A database newer than the code is refused, never touched.
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable

import attrs
from twisted.enterprise import adbapi

from ._dialect import Dialect
from ._records import SchemaVersionError

__all__ = [
    "LATEST_SCHEMA_VERSION",
    "Migration",
    "MigrationResult",
    "check_schema_txn",
    "current_version_txn",
    "load_migrations",
    "migrate_txn",
    "split_statements",
]

_FILE_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql\Z")
_DIALECTS = ("sqlite", "postgres")


@attrs.frozen
class Migration:
    """One schema version: its number, its file name and its statements."""

    version: int
    name: str
    statements: tuple[str, ...]


@attrs.frozen
class MigrationResult:
    """What a migration run found and did: versions before and after, names applied."""

    before: int
    after: int
    applied: tuple[str, ...]


def split_statements(script: str) -> list[str]:
    """Split an SQL script on the semicolons that end statements.

    Knows ``--`` comments and quoted strings and identifiers, which is all our
    schema files use (no trigger bodies). We split ourselves because sqlite3's
    ``executescript`` commits first, which would break the one-transaction rule.
    """
    statements: list[str] = []
    current: list[str] = []
    quote = ""
    i = 0
    while i < len(script):
        char = script[i]
        if quote:
            current.append(char)
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
            current.append(char)
        elif script.startswith("--", i):
            end = script.find("\n", i)
            i = len(script) if end == -1 else end
            continue
        elif char == ";":
            statements.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    if quote:
        raise ValueError("unterminated quoted string in SQL script")
    statements.append("".join(current))
    return [" ".join(s.split()) for s in statements if s.strip()]


def _versions_in(folder: Traversable) -> dict[int, tuple[str, Traversable]]:
    found: dict[int, tuple[str, Traversable]] = {}
    if not folder.is_dir():
        return found
    for entry in folder.iterdir():
        match = _FILE_RE.match(entry.name)
        if entry.is_file() and entry.name.endswith(".sql"):
            if match is None:
                raise ValueError(f"schema file {entry.name!r} is not named NNNN_description.sql")
            version = int(match.group(1))
            if version in found:
                raise ValueError(f"two schema files for version {version} in {folder.name}")
            found[version] = (entry.name, entry)
    return found


def load_migrations(dialect_name: str, root: Traversable | None = None) -> tuple[Migration, ...]:
    """Every schema version for ``dialect_name``, in order, checked to be 1..N without gaps."""
    if root is None:
        root = resources.files("federation_invite.store").joinpath("schema")
    files = _versions_in(root)
    for version, found in _versions_in(root.joinpath(dialect_name)).items():
        if version not in files:
            raise ValueError(f"schema version {version} exists only for {dialect_name}")
        files[version] = found
    if sorted(files) != list(range(1, len(files) + 1)):
        raise ValueError(f"schema versions must be 1..N without gaps, found {sorted(files)}")
    migrations = []
    for version in sorted(files):
        name, entry = files[version]
        statements = tuple(split_statements(entry.read_text(encoding="utf-8")))
        migrations.append(Migration(version, name, statements))
    return tuple(migrations)


#: The schema version this code writes and reads.
LATEST_SCHEMA_VERSION = len(load_migrations("sqlite"))


def current_version_txn(txn: adbapi.Transaction, dialect: Dialect) -> int:
    """The highest applied version, 0 for a database never migrated."""
    if not dialect.table_exists(txn, "schema_migrations"):
        return 0
    txn.execute("SELECT MAX(version) FROM schema_migrations")
    row = txn.fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


def _refuse_newer(current: int, latest: int) -> None:
    if current > latest:
        raise SchemaVersionError(
            f"the database has schema version {current}, newer than the latest this"
            f" federation-invite knows ({latest}); refusing to use it: upgrade"
            " federation-invite, or point it at another database",
            database_version=current,
            code_version=latest,
        )


def check_schema_txn(txn: adbapi.Transaction, dialect: Dialect, latest: int) -> int:
    """Refuse a database whose schema is not exactly ``latest``; return its version."""
    current = current_version_txn(txn, dialect)
    _refuse_newer(current, latest)
    if current < latest:
        raise SchemaVersionError(
            f"the database has schema version {current}, older than this"
            f" federation-invite needs ({latest}); run the migrations first",
            database_version=current,
            code_version=latest,
        )
    return current


def migrate_txn(
    txn: adbapi.Transaction,
    dialect: Dialect,
    migrations: tuple[Migration, ...],
    now_ms: int,
) -> MigrationResult:
    """Apply every pending migration in this transaction (run with ``write=True``)."""
    dialect.lock_for_migrations(txn)
    latest = len(migrations)
    current = current_version_txn(txn, dialect)
    _refuse_newer(current, latest)
    if current == latest:
        return MigrationResult(current, current, ())
    if current == 0:
        txn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER NOT NULL PRIMARY KEY,"
            " name TEXT NOT NULL,"
            " applied_ts BIGINT NOT NULL)"
        )
    applied = []
    for migration in migrations[current:]:
        for statement in migration.statements:
            txn.execute(statement)
        txn.execute(
            dialect.sql(
                "INSERT INTO schema_migrations (version, name, applied_ts) VALUES (?, ?, ?)"
            ),
            (migration.version, migration.name, now_ms),
        )
        applied.append(migration.name)
    return MigrationResult(current, latest, tuple(applied))
