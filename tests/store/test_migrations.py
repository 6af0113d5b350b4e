"""Schema files: splitting, discovery, ordering and dialect variants."""

from __future__ import annotations

import importlib.abc
import importlib.util
import re
import sqlite3
import sys
import tempfile
import types
import warnings
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from federation_invite.store import LATEST_SCHEMA_VERSION, SchemaVersionError, _migrations
from federation_invite.store._dialect import SQLiteDialect
from federation_invite.store._migrations import (
    Migration,
    MigrationResult,
    load_migrations,
    migrate_txn,
    split_statements,
)


class SplitStatementsTests(SynchronousTestCase):
    def test_comments_quotes_and_whitespace(self) -> None:
        """Semicolons end statements except inside quotes or comments; whitespace collapses."""
        script = (
            "-- a comment; not a statement\n"
            "CREATE TABLE t (a TEXT DEFAULT 'x;y', \"odd;name\" TEXT); -- trailing; comment\n"
            "\n  INSERT INTO t VALUES ('it''s');\n;\n"
            "SELECT 1"
        )
        self.assertEqual(
            split_statements(script),
            [
                "CREATE TABLE t (a TEXT DEFAULT 'x;y', \"odd;name\" TEXT)",
                "INSERT INTO t VALUES ('it''s')",
                "SELECT 1",
            ],
        )

    def test_comment_at_the_end_without_a_newline(self) -> None:
        """A script whose last line is a comment with no newline after it (a schema file
        saved without one) ends there: the comment is dropped, the statements kept."""
        self.assertEqual(
            split_statements("CREATE TABLE t (a TEXT); SELECT 1 -- the end; not a statement"),
            ["CREATE TABLE t (a TEXT)", "SELECT 1"],
        )
        self.assertEqual(split_statements("SELECT 1;\n-- only a comment"), ["SELECT 1"])

    def test_unterminated_quote(self) -> None:
        """A script with an unterminated string is refused rather than split wrongly."""
        with self.assertRaises(ValueError) as caught:
            split_statements("SELECT 'oops;")
        self.assertEqual(str(caught.exception), "unterminated quoted string in SQL script")


class LoadMigrationsTests(SynchronousTestCase):
    def schema_dir(self, files: dict[str, str]) -> Path:
        root = Path(tempfile.mkdtemp(prefix="fi-schema-"))
        self.addCleanup(_remove_tree, root)
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        return root

    def test_order_and_dialect_override(self) -> None:
        """Versions load in order; a dialect's file replaces the common one for that dialect;
        other files, and directories whose names end in .sql, are not versions."""
        root = self.schema_dir(
            {
                "0002_b.sql": "B;",
                "0001_a.sql": "A1; A2",
                "postgres/0002_b.sql": "B_PG;",
                "README.txt": "ignored",
                "0003_old.sql/README.txt": "a directory named like a file: ignored",
            }
        )
        sqlite = load_migrations("sqlite", root)
        self.assertEqual(
            [(m.version, m.name, m.statements) for m in sqlite],
            [(1, "0001_a.sql", ("A1", "A2")), (2, "0002_b.sql", ("B",))],
        )
        postgres = load_migrations("postgres", root)
        self.assertEqual(postgres[1].statements, ("B_PG",))

    def test_bad_sets_of_files(self) -> None:
        """Gaps, dialect-only versions, duplicates and misnamed files are refused."""
        cases = [
            ({"0001_a.sql": "", "0003_c.sql": ""}, "must be 1..N without gaps, found [1, 3]"),
            ({"0001_a.sql": "", "sqlite/0002_b.sql": ""}, "version 2 exists only for sqlite"),
            ({"0001_a.sql": "", "0001_b.sql": ""}, "two schema files for version 1"),
            ({"1_a.sql": ""}, "schema file '1_a.sql' is not named NNNN_description.sql"),
        ]
        for files, message in cases:
            with self.assertRaises(ValueError) as caught:
                load_migrations("sqlite", self.schema_dir(files))
            self.assertIn(message, str(caught.exception))

    def test_packaged_schema(self) -> None:
        """The shipped schema loads for both dialects with the same versions and names."""
        sqlite = load_migrations("sqlite")
        postgres = load_migrations("postgres")
        self.assertEqual(len(sqlite), LATEST_SCHEMA_VERSION)
        self.assertEqual([m.name for m in sqlite], [m.name for m in postgres])
        self.assertEqual(sqlite[0].name, "0001_initial.sql")

    def test_imports_where_importlib_abc_has_no_traversable(self) -> None:
        """The module imports, without a DeprecationWarning, where importlib.abc has no
        Traversable (Python 3.14 removed it; 3.12 and 3.13 warn that it goes)."""
        real = importlib.abc
        stand_in = types.ModuleType("importlib.abc")
        stand_in.__dict__.update(
            (name, value)
            for name, value in vars(real).items()
            if name not in ("Traversable", "TraversableResources", "__getattr__")
        )
        spec = importlib.util.spec_from_file_location(
            "federation_invite.store._migrations_copy", _migrations.__file__
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["importlib.abc"] = stand_in
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                spec.loader.exec_module(module)
        finally:
            sys.modules["importlib.abc"] = real
        self.assertEqual(len(module.load_migrations("sqlite")), LATEST_SCHEMA_VERSION)

    def test_postgres_variant_differs_only_by_collation(self) -> None:
        """The PostgreSQL variant of each version is the common SQL plus COLLATE "C"."""
        for common, variant in zip(
            load_migrations("sqlite"), load_migrations("postgres"), strict=True
        ):
            stripped = tuple(re.sub(r' COLLATE "C"', "", s) for s in variant.statements)
            self.assertEqual(stripped, common.statements, common.name)


class MigrateTxnTests(SynchronousTestCase):
    def test_applies_only_pending_versions(self) -> None:
        """From an intermediate version only the later files run; newer is refused."""
        connection = sqlite3.connect(":memory:", isolation_level=None)
        self.addCleanup(connection.close)
        cursor = connection.cursor()
        dialect = SQLiteDialect(":memory:", "sqlite:///:memory:")
        first = Migration(1, "0001_a.sql", ("CREATE TABLE a (x INTEGER)",))
        second = Migration(2, "0002_b.sql", ("CREATE TABLE b (x INTEGER)",))
        self.assertEqual(
            migrate_txn(cursor, dialect, (first,), 5), MigrationResult(0, 1, ("0001_a.sql",))
        )
        self.assertEqual(
            migrate_txn(cursor, dialect, (first, second), 6),
            MigrationResult(1, 2, ("0002_b.sql",)),
        )
        rows = cursor.execute("SELECT version, name, applied_ts FROM federation_invite_schema")
        self.assertEqual(rows.fetchall(), [(1, "0001_a.sql", 5), (2, "0002_b.sql", 6)])
        with self.assertRaises(SchemaVersionError) as caught:
            migrate_txn(cursor, dialect, (first,), 7)
        self.assertEqual((caught.exception.database_version, caught.exception.code_version), (2, 1))


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
