"""Versioned schema files, applied in order, once, by whichever worker starts first.

``schema/NNNN_description.sql`` holds version NNNN for every database;
``schema/<dialect>/NNNN_description.sql`` replaces it for one dialect where the
SQL must differ. Applied versions are recorded in ``federation_invite_schema``; all
pending versions run in one transaction, under a lock, so two workers starting
together do not both migrate and a failed migration leaves nothing behind.
A database newer than the code is refused, never touched.

Earlier releases recorded them in ``schema_migrations``, the name golang-migrate,
Rails and dbmate use for theirs: an application's database holding one of those
was taken for ours (at its version 1, migrated already; at 3, or a timestamp,
newer than the code). A ``schema_migrations`` is now ours only if it is exactly
what those releases wrote (their columns, and rows naming our files 1..N); the
first migration then moves its rows to ``federation_invite_schema`` and drops it,
under the migration lock. Any other is another tool's, never read nor touched.
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable

import attrs
from twisted.enterprise import adbapi

from ._dialect import Dialect
from ._records import SchemaVersionError, StoreError

__all__ = [
    "LATEST_SCHEMA_VERSION",
    "LEGACY_SCHEMA_TABLE",
    "SCHEMA_TABLE",
    "Migration",
    "MigrationResult",
    "check_schema_txn",
    "current_version_txn",
    "load_migrations",
    "migrate_txn",
    "not_ours_message",
    "split_statements",
]

_FILE_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql\Z")
#: A statement creating a table, index or view, and the name it takes.
_CREATES_RE = re.compile(
    r'CREATE (?:UNIQUE )?(?:TABLE|INDEX|VIEW) (?:IF NOT EXISTS )?"?([A-Za-z_][A-Za-z0-9_]*)',
    re.IGNORECASE,
)
_DIALECTS = ("sqlite", "postgres")


@attrs.frozen
class Migration:
    """One schema version: its number, its file name and its statements."""

    version: int
    name: str
    statements: tuple[str, ...]


@attrs.frozen
class MigrationResult:
    """What a migration run found and did: versions before and after, names applied,
    and whether it moved an earlier release's bookkeeping (``schema_migrations``) to
    ``federation_invite_schema``."""

    before: int
    after: int
    applied: tuple[str, ...]
    moved_bookkeeping: bool = False


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


#: The file names of the schema versions this code has, version 1 first.
_MIGRATION_NAMES = tuple(migration.name for migration in load_migrations("sqlite"))

#: The schema version this code writes and reads.
LATEST_SCHEMA_VERSION = len(_MIGRATION_NAMES)

#: The table recording the applied versions, named for us.
SCHEMA_TABLE = "federation_invite_schema"
#: Where earlier releases recorded them; moved to ``SCHEMA_TABLE`` at the first migration.
LEGACY_SCHEMA_TABLE = "schema_migrations"
#: The columns of both, as ``Dialect.columns`` reads them.
_SCHEMA_COLUMNS = [
    ("version", "integer", True, True),
    ("name", "text", True, False),
    ("applied_ts", "bigint", True, False),
]
_CREATE_SCHEMA_TABLE = (
    f"CREATE TABLE {SCHEMA_TABLE} ("
    " version INTEGER NOT NULL PRIMARY KEY,"
    " name TEXT NOT NULL,"
    " applied_ts BIGINT NOT NULL)"
)


def _bookkeeping_txn(
    txn: adbapi.Transaction, dialect: Dialect, names: tuple[str, ...], operation: str
) -> tuple[str | None, int]:
    """Which table records our applied versions (None: neither), and the highest."""
    if dialect.table_exists(txn, SCHEMA_TABLE):
        if dialect.columns(txn, SCHEMA_TABLE) != _SCHEMA_COLUMNS:
            raise StoreError(operation, not_ours_message(dialect, "table", SCHEMA_TABLE))
        txn.execute(f"SELECT MAX(version) FROM {SCHEMA_TABLE}")
        row = txn.fetchone()
        return SCHEMA_TABLE, 0 if row is None or row[0] is None else int(row[0])
    if not dialect.table_exists(txn, LEGACY_SCHEMA_TABLE):
        return None, 0
    if dialect.columns(txn, LEGACY_SCHEMA_TABLE) != _SCHEMA_COLUMNS:
        return None, 0  # another tool's
    txn.execute(f"SELECT version, name FROM {LEGACY_SCHEMA_TABLE} ORDER BY version")
    rows = [(int(version), name) for version, name in txn.fetchall()]
    if not rows or rows != list(enumerate(names, start=1))[: len(rows)]:
        return None, 0  # another tool's, shaped as ours
    return LEGACY_SCHEMA_TABLE, len(rows)


def not_ours_message(dialect: Dialect, kind: str, name: str) -> str:
    """Why a database holding an object of another's under one of our names is refused."""
    return (
        f"the database already has a {kind} named {name!r} that is not federation-invite's;"
        f" give federation-invite {dialect.own_database_hint} [{dialect.display}]"
    )


def current_version_txn(
    txn: adbapi.Transaction, dialect: Dialect, operation: str = "schema_version"
) -> int:
    """The highest applied version, 0 for a database never migrated."""
    return _bookkeeping_txn(txn, dialect, _MIGRATION_NAMES, operation)[1]


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
    dialect.lock_for_schema_check(txn)
    current = current_version_txn(txn, dialect, "schema check")
    _refuse_newer(current, latest)
    if current < latest:
        raise SchemaVersionError(
            f"the database has schema version {current}, older than this"
            f" federation-invite needs ({latest}); run the migrations first",
            database_version=current,
            code_version=latest,
        )
    return current


def _execute_checked(txn: adbapi.Transaction, dialect: Dialect, statement: str) -> None:
    """Execute a migration's ``statement``; if it creates a table, index or view whose name
    is taken already (by another's: ours are created once, by the version that records them),
    refuse the database, naming it, instead of the driver's "already exists"."""
    creates = _CREATES_RE.match(statement)
    if creates is not None:
        kind = dialect.object_kind(txn, creates.group(1))
        if kind is not None:
            raise StoreError("migrate", not_ours_message(dialect, kind, creates.group(1)))
    txn.execute(statement)


def migrate_txn(
    txn: adbapi.Transaction,
    dialect: Dialect,
    migrations: tuple[Migration, ...],
    now_ms: int,
) -> MigrationResult:
    """Apply every pending migration in this transaction (run with ``write=True``)."""
    dialect.lock_for_migrations(txn)
    latest = len(migrations)
    names = tuple(migration.name for migration in migrations)
    table, current = _bookkeeping_txn(txn, dialect, names, "migrate")
    _refuse_newer(current, latest)
    if table != SCHEMA_TABLE:
        _execute_checked(txn, dialect, _CREATE_SCHEMA_TABLE)
    if table == LEGACY_SCHEMA_TABLE:
        txn.execute(
            f"INSERT INTO {SCHEMA_TABLE} (version, name, applied_ts)"
            f" SELECT version, name, applied_ts FROM {LEGACY_SCHEMA_TABLE}"
        )
        txn.execute(f"DROP TABLE {LEGACY_SCHEMA_TABLE}")
    moved = table == LEGACY_SCHEMA_TABLE
    if current == latest:
        return MigrationResult(current, current, (), moved)
    applied = []
    for migration in migrations[current:]:
        for statement in migration.statements:
            _execute_checked(txn, dialect, statement)
        txn.execute(
            dialect.sql(f"INSERT INTO {SCHEMA_TABLE} (version, name, applied_ts) VALUES (?, ?, ?)"),
            (migration.version, migration.name, now_ms),
        )
        applied.append(migration.name)
    return MigrationResult(current, latest, tuple(applied), moved)
