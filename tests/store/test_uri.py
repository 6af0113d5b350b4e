"""Database URIs: which are accepted, what they mean, and the messages for the rest."""

from __future__ import annotations

import socket
import sqlite3

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from federation_invite.store import (
    StoreError,
    _dialect,
    open_store,
    parse_database_uri,
    run_migrations,
)
from federation_invite.store._dialect import PostgresDialect, SQLiteDialect


class SQLiteURITests(SynchronousTestCase):
    def test_relative_absolute_and_memory(self) -> None:
        """Three slashes: a relative path; four: an absolute one; :memory: stays itself."""
        cases = {
            "sqlite:///relative/path.db": "relative/path.db",
            "sqlite:////absolute/path.db": "/absolute/path.db",
            "sqlite:///:memory:": ":memory:",
            "SQLite:///with%20space.db": "with space.db",
        }
        for uri, path in cases.items():
            dialect = parse_database_uri(uri)
            assert isinstance(dialect, SQLiteDialect)
            self.assertEqual(dialect.path, path)
            self.assertEqual(dialect.display, uri)

    def test_malformed_sqlite_uris(self) -> None:
        """A host, a missing path, a directory or query parameters are refused by name."""
        cases = {
            "sqlite://host/x.db": "must have three slashes after 'sqlite:' and no host",
            "sqlite://x.db": "must have three slashes after 'sqlite:' and no host",
            "sqlite:///": "does not name a database file",
            "sqlite:///dir/": "does not name a database file",
            "sqlite:///x.db?mode=ro": "must not have query parameters or a fragment",
            "sqlite:///x%00.db": "contains a NUL character",
        }
        for uri, message in cases.items():
            with self.assertRaises(ValueError) as caught:
                parse_database_uri(uri)
            self.assertIn(message, str(caught.exception))


class PostgresURITests(SynchronousTestCase):
    def test_postgres_uris(self) -> None:
        """postgresql:// and postgres:// both reach libpq as postgresql:// URIs."""
        for scheme in ("postgresql", "postgres"):
            uri = f"{scheme}://fi@db.example:5433/invites?sslmode=require"
            dialect = parse_database_uri(uri)
            assert isinstance(dialect, PostgresDialect)
            self.assertEqual(dialect.dsn, "postgresql://fi@db.example:5433/invites?sslmode=require")
            self.assertEqual(dialect.display, uri)

    def test_password_hidden_from_display_and_errors(self) -> None:
        """A password in the URI is replaced in the display form and in driver messages."""
        dialect = parse_database_uri("postgresql://fi:p%40ss@db.example/invites")
        self.assertEqual(dialect.display, "postgresql://fi:***@db.example/invites")
        message = dialect.describe(RuntimeError("auth failed for p@ss and p%40ss\n  here"))
        self.assertEqual(
            message,
            "RuntimeError: auth failed for *** and *** here [postgresql://fi:***@db.example/invites]",
        )

    def test_unix_socket_uris(self) -> None:
        """Unix sockets, as libpq reads URIs: no host (its default directory), the directory
        as ?host=, or percent-encoded in the host's place; all reach libpq as written."""
        for uri in (
            "postgresql:///invites",
            "postgresql://fi@/invites?host=/var/run/postgresql",
            "postgresql://fi@:5433/invites?host=/tmp",
            "postgresql://%2Fvar%2Frun%2Fpostgresql/invites",
            "postgres:///invites?host=/var/run/postgresql&sslmode=disable",
        ):
            dialect = parse_database_uri(uri)
            assert isinstance(dialect, PostgresDialect)
            self.assertEqual(dialect.dsn, "postgresql" + uri[uri.index("://") :])
            self.assertEqual(dialect.display, uri)
        dialect = parse_database_uri("postgresql://fi:s3cret@/invites?host=/run/pg")
        self.assertEqual(dialect.display, "postgresql://fi:***@/invites?host=/run/pg")

    def test_multi_host_uris(self) -> None:
        """libpq's several hosts in the authority (failover: target_session_attrs), each
        with its port, are accepted and reach libpq as written, the password hidden; a bad
        port of any of them is refused as malformed."""
        for uri in (
            "postgresql://fi@h1.example:5432,h2.example:5433/invites?target_session_attrs=read-write",
            "postgresql://fi@h1.example,h2.example:5433,[::1]:5434/invites",
            "postgres://h1.example:5432,h2.example/invites",
        ):
            dialect = parse_database_uri(uri)
            assert isinstance(dialect, PostgresDialect)
            self.assertEqual(dialect.dsn, "postgresql" + uri[uri.index("://") :])
            self.assertEqual(dialect.display, uri)
        dialect = parse_database_uri("postgresql://fi:s3cret@h1:5433,h2:5432/invites")
        self.assertEqual(dialect.display, "postgresql://fi:***@h1:5433,h2:5432/invites")
        for uri in (
            "postgresql://fi@h1:5432,h2:port/invites",
            "postgresql://fi@h1:5432,h2:99999/invites",
            "postgresql://fi@h1:5432,[::1]x/invites",
        ):
            with self.assertRaises(ValueError) as caught:
                parse_database_uri(uri)
            self.assertEqual(
                str(caught.exception),
                "PostgreSQL URI is malformed (percent-encode special characters)",
            )

    def test_multi_host_uris_do_not_depend_on_urlsplit_brackets(self) -> None:
        """An IPv6 host after another (h1:5432,[::1]:5433) is accepted whatever urlsplit
        does with text before a '[': Pythons with the CVE-2025-0938 fix (Debian 12's
        3.11.2-6+deb12u6, later CPython releases) refuse such a netloc, stood in for here
        by a urlsplit that does; the host list never reaches urlsplit."""
        real = _dialect.urlsplit

        def strict(url: str, *args: object, **kwargs: object) -> object:
            parts = real(url, *args, **kwargs)  # type: ignore[arg-type]
            before, bracket, _ = parts.netloc.rpartition("@")[2].partition("[")
            if bracket and before:
                raise ValueError("Invalid IPv6 URL")  # "no data is allowed before a bracket"
            return parts

        self.patch(_dialect, "urlsplit", strict)
        for uri in (
            "postgresql://fi@h1:5432,[::1]:5433/invites?target_session_attrs=read-write",
            "postgresql://fi@h1.example,h2.example:5433,[::1]:5434/invites",
            "postgresql://[::1]:5432,h1:5433,[fe80::1]/invites",
        ):
            dialect = parse_database_uri(uri)
            assert isinstance(dialect, PostgresDialect)
            self.assertEqual(dialect.dsn, uri)
            self.assertEqual(dialect.display, uri)
        dialect = parse_database_uri(
            "postgresql://fi:s3cret@h1:5432,[::1]:5433/invites?connect_timeout=5"
        )
        self.assertEqual(
            dialect.display, "postgresql://fi:***@h1:5432,[::1]:5433/invites?connect_timeout=5"
        )
        self.assertIn("s3cret", dialect._secrets)
        for uri in (
            "postgresql://fi@h1:5432,[::1]x/invites",
            "postgresql://fi@h1:5432,[::1:5433/invites",
            "postgresql://fi@h1:5432,[::1]:99999/invites",
        ):
            with self.assertRaises(ValueError) as caught:
                parse_database_uri(uri)
            self.assertEqual(
                str(caught.exception),
                "PostgreSQL URI is malformed (percent-encode special characters)",
            )

    def test_malformed_postgres_uris(self) -> None:
        """No database, a bad port or a fragment are refused, password hidden."""
        cases = {
            "postgresql:///": "must name a database",
            "postgresql://fi:pw@/?host=/tmp": "'postgresql://fi:***@/?host=/tmp' must name a database",
            "postgresql://fi:pw@db.example": "'postgresql://fi:***@db.example' must name a database",
            "postgresql://db.example/": "must name a database",
            # A second '/' may be a password's unencoded '/' (fi:12345/678@...: libpq reads
            # host fi, port 12345): refused quoting nothing.
            "postgresql://db.example/a/b": "PostgreSQL URI is malformed (percent-encode special characters)",
            "postgresql://fi:12345/678@db.example/x": "PostgreSQL URI is malformed (percent-encode special characters)",
            "postgresql://db.example:port/x": "PostgreSQL URI is malformed (percent-encode special characters)",
            "postgresql://db.example/x#frag": "must not have a fragment",
        }
        for uri, message in cases.items():
            with self.assertRaises(ValueError) as caught:
                parse_database_uri(uri)
            self.assertIn(message, str(caught.exception))
            self.assertNotIn(":pw@", str(caught.exception))
            self.assertNotIn("678", str(caught.exception))


class OtherURITests(SynchronousTestCase):
    def test_unknown_schemes_and_non_uris(self) -> None:
        """Other schemes and non-URIs are refused with the list of accepted forms."""
        for uri in ("mysql://db/x", "invites.db", "", "sqlite:"):
            with self.assertRaises(ValueError) as caught:
                parse_database_uri(uri)
            self.assertIn("expected one of: sqlite:///relative/path.db", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            parse_database_uri(b"sqlite:///x.db")  # type: ignore[arg-type]
        self.assertEqual(str(caught.exception), "database URI must be a string, not bytes")

    def test_open_and_migrate_refuse_bad_uri_at_call(self) -> None:
        """open_store and run_migrations raise ValueError at once, before any connection."""
        with self.assertRaises(ValueError):
            open_store("mysql://db/x")
        with self.assertRaises(ValueError):
            run_migrations("sqlite://host/x.db")

    def test_open_refuses_bad_pool_size_at_call(self) -> None:
        """open_store refuses a pool_size that is not an integer of at least 1 with
        ValueError at once, before any connection (0 would be a pool in which every
        operation waits for ever, True a pool of one)."""
        for uri in ("sqlite:///" + self.mktemp() + ".db", "postgresql://postgres@127.0.0.1:1/x"):
            for size in (0, -1, True, False, 1.5, "5"):
                with self.assertRaises(ValueError) as caught:
                    open_store(uri, pool_size=size)  # type: ignore[arg-type]
                self.assertEqual(
                    str(caught.exception),
                    f"pool_size must be an integer of at least 1, not {size!r}",
                )


class PasswordDisplayTests(SynchronousTestCase):
    def test_query_password_hidden(self) -> None:
        """A ?password= in the URI is hidden in the display string too."""
        dialect = parse_database_uri("postgresql://u@h/db?password=s3cret&sslmode=require")
        self.assertEqual(dialect.display, "postgresql://u@h/db?password=***&sslmode=require")

    def test_query_sslpassword_hidden(self) -> None:
        """?sslpassword= (the client key's passphrase) is hidden from the display string and
        from driver messages, as written and percent-encoded."""
        dialect = parse_database_uri(
            "postgresql://u@h/db?sslkey=%2Fk.pem&sslpassword=hun%2Bter%202&password=pw"
        )
        self.assertEqual(
            dialect.display, "postgresql://u@h/db?sslkey=%2Fk.pem&sslpassword=***&password=***"
        )
        for leaked in ("hun+ter 2", "hun%2Bter%202", "hun%2Bter+2"):
            described = dialect.describe(RuntimeError(f"bad key passphrase {leaked}"))
            self.assertNotIn("hun", described)
            self.assertIn("***", described)

    def test_malformed_uri_does_not_quote_the_password(self) -> None:
        """An unencoded '#' in a password makes the URI malformed; the error quotes none of it."""
        error = self.assertRaises(
            ValueError, parse_database_uri, "postgresql://u:s3c#ret@h:5432/db"
        )
        self.assertNotIn("s3c", str(error))
        self.assertNotIn("ret", str(error))


class LibpqPasswordTests(SynchronousTestCase):
    """What libpq reads as a password is what is hidden: its own parse decides."""

    def test_unencoded_at_in_password_refused(self) -> None:
        """A second unencoded '@' in the userinfo (libpq splits at the first, urlsplit at
        the last, so libpq's host error would quote the rest of the password) is refused
        as malformed, quoting none of the URI."""
        for uri in (
            "postgresql://postgres:S3cr@etPw@127.0.0.1:5432/db",
            "postgresql://S3cr@etPw@127.0.0.1/db",
            "postgresql://u:S3cr@etPw@127.0.0.1?host=/tmp",
        ):
            error = self.assertRaises(ValueError, parse_database_uri, uri)
            self.assertEqual(
                str(error), "PostgreSQL URI is malformed (percent-encode special characters)"
            )

    def test_unencoded_question_mark_or_hash_in_userinfo_refused(self) -> None:
        """An unencoded '?' or '#' before the userinfo's '@' (libpq ends the userinfo at the
        first '@' or '/', urlsplit the authority at '?' or '#', so urlsplit found no password
        and the fragment and database checks quoted the URI with it) is refused as malformed,
        quoting none of the URI."""
        for uri in (
            "postgresql://fi:1234?5678@db.example/invites",
            "postgresql://fi:1234#5678@db.example/invites",
            "postgresql://fi:?5678@db.example/invites",
            "postgresql://fi:#5678@db.example/invites",
            "postgresql://fi?x:5678@db.example/invites",
        ):
            error = self.assertRaises(ValueError, parse_database_uri, uri)
            self.assertEqual(
                str(error), "PostgreSQL URI is malformed (percent-encode special characters)"
            )
            self.assertNotIn("5678", str(error))
        # Percent-encoded, the same password is read and hidden.
        dialect = parse_database_uri("postgresql://fi:1234%3F5678@db.example/invites")
        self.assertNotIn("5678", dialect.display)

    def test_percent_encoded_parameter_name_hidden(self) -> None:
        """?pass%77ord= is a password to libpq: hidden from the display and from messages."""
        dialect = parse_database_uri("postgresql://u@h/db?pass%77ord=s3cret&sslmode=require")
        self.assertEqual(dialect.display, "postgresql://u@h/db?pass%77ord=***&sslmode=require")
        self.assertEqual(
            dialect.describe(RuntimeError("no s3cret")),
            "RuntimeError: no *** [postgresql://u@h/db?pass%77ord=***&sslmode=require]",
        )

    def test_password_as_libpq_decodes_it_hidden(self) -> None:
        """libpq takes '+' literally and decodes a partly encoded password: every spelling
        of what it reads is hidden."""
        dialect = parse_database_uri("postgresql://u@h/db?password=%53e+cret")
        for leaked in ("Se+cret", "%53e+cret", "Se%2Bcret"):
            self.assertNotIn("cret", dialect.describe(RuntimeError(f"bad {leaked}")))

    def test_bad_percent_escape_refused_without_quoting(self) -> None:
        """A password libpq cannot decode (a bad or NUL escape) is refused at parse,
        quoting none of it, instead of libpq quoting it raw at connect."""
        for uri in (
            "postgresql://u@h/db?password=%53ecretPw%zz",
            "postgresql://u:S3cretPw%zz@h/db",
            "postgresql://u@h/db?sslpassword=S3cretPw%00",
        ):
            error = self.assertRaises(ValueError, parse_database_uri, uri)
            self.assertIn("PostgreSQL URI is malformed", str(error))
            self.assertNotIn("ecretPw", str(error))


class SQLiteWALSwitchTests(SynchronousTestCase):
    """Switching a new file to WAL waits out other workers' start-up instead of failing."""

    class Connection:
        def __init__(self, failures: int) -> None:
            self.failures = failures
            self.calls = 0

        def execute(self, statement: str) -> None:
            assert statement == "PRAGMA journal_mode = WAL"
            self.calls += 1
            if self.calls <= self.failures:
                raise sqlite3.OperationalError("database is locked")

    def test_retried_while_locked(self) -> None:
        """'database is locked' at once (SQLite's deadlock answer) is retried until it works."""
        connection = self.Connection(failures=3)
        _dialect._set_wal(connection)  # type: ignore[arg-type]
        self.assertEqual(connection.calls, 4)

    def test_gives_up_after_the_busy_timeout(self) -> None:
        """Still locked after the busy timeout: the error is raised."""
        self.patch(_dialect, "SQLITE_BUSY_TIMEOUT_MS", 30)
        connection = self.Connection(failures=10**9)
        self.assertRaises(sqlite3.OperationalError, _dialect._set_wal, connection)
        self.assertGreater(connection.calls, 1)

    def test_other_errors_are_not_retried(self) -> None:
        """Any other error is raised at once."""

        class Broken(self.Connection):
            def execute(self, statement: str) -> None:
                self.calls += 1
                raise sqlite3.OperationalError("disk I/O error")

        connection = Broken(failures=0)
        self.assertRaises(sqlite3.OperationalError, _dialect._set_wal, connection)
        self.assertEqual(connection.calls, 1)


class PostgresConnectTimeoutTests(SynchronousTestCase):
    """A PostgreSQL server that accepts connections and never answers must not hang the
    daemon: libpq waits for ever unless given ``connect_timeout``."""

    def pool_keywords(self, uri: str) -> dict[str, object]:
        """Helper: the keyword arguments ``uri``'s dialect gives adbapi's pool."""
        calls: list[dict[str, object]] = []

        def pool(*args: object, **kwargs: object) -> None:
            calls.append(kwargs)

        self.patch(_dialect, "_PostgresPool", pool)
        dialect = parse_database_uri(uri)
        assert isinstance(dialect, PostgresDialect)
        dialect.connection_pool(None)
        (kwargs,) = calls
        return kwargs

    def test_default_connect_timeout(self) -> None:
        """Without a connect_timeout in the URI, psycopg2 is given connect_timeout=10."""
        self.patch(_dialect.os, "environ", {})
        kwargs = self.pool_keywords("postgresql://fi@db.example/invites?sslmode=require")
        self.assertEqual(kwargs["connect_timeout"], 10)

    def test_uri_connect_timeout_wins(self) -> None:
        """A connect_timeout in the URI (even 0, for ever) or in PGCONNECT_TIMEOUT is
        libpq's to apply: no keyword argument overrides it."""
        self.patch(_dialect.os, "environ", {})
        for uri in (
            "postgresql://fi@db.example/invites?connect_timeout=3",
            "postgresql://fi@/invites?host=/run/pg&connect_timeout=0",
        ):
            self.assertNotIn("connect_timeout", self.pool_keywords(uri), uri)
        self.patch(_dialect.os, "environ", {"PGCONNECT_TIMEOUT": "30"})
        kwargs = self.pool_keywords("postgresql://fi@db.example/invites")
        self.assertNotIn("connect_timeout", kwargs)


class PostgresSilentServerTests(SynchronousTestCase):
    """A server gone silent on an open connection (its host down, the network cut) must
    be noticed: libpq leaves TCP keepalives to the system (hours) unless told."""

    pool_keywords = PostgresConnectTimeoutTests.pool_keywords

    def test_default_keepalives_and_user_timeout(self) -> None:
        """Without them in the URI, psycopg2 is given keepalives after 10 s idle, every 5 s,
        3 unanswered ending the connection, and (libpq 12 and later) tcp_user_timeout:
        data unacknowledged for 30 s ends it too."""
        self.patch(_dialect.os, "environ", {})
        kwargs = self.pool_keywords("postgresql://fi@db.example/invites")
        self.assertEqual(
            {name: kwargs[name] for name in kwargs if name.startswith(("keepalives", "tcp_"))},
            {
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "tcp_user_timeout": 30_000,
            },
        )

    def test_tcp_user_timeout_needs_libpq_12(self) -> None:
        """An older libpq, which would refuse the keyword, is not given tcp_user_timeout."""
        import psycopg2.extensions

        self.patch(psycopg2.extensions, "libpq_version", lambda: 110_022)
        self.assertNotIn("tcp_user_timeout", self.pool_keywords("postgresql://fi@db/invites"))

    def test_uri_settings_win(self) -> None:
        """Each one the URI names (keepalives=0 too) is libpq's to apply, not overridden."""
        kwargs = self.pool_keywords(
            "postgresql://fi@db.example/invites?keepalives=0&keepalives_count=9&tcp_user_timeout=0"
        )
        for name in ("keepalives", "keepalives_count", "tcp_user_timeout"):
            self.assertNotIn(name, kwargs)
        self.assertEqual((kwargs["keepalives_idle"], kwargs["keepalives_interval"]), (10, 5))


class PostgresBlackholeTests(TestCase):
    def test_silent_server_fails_the_open(self) -> Deferred[None]:
        """A loopback port that accepts TCP and never answers: with the default
        connect_timeout (here 1 s) opening the store fails instead of waiting for ever."""
        from twisted.internet import reactor

        self.patch(_dialect, "POSTGRES_CONNECT_TIMEOUT", 1)
        self.patch(_dialect.os, "environ", {})
        silent = socket.socket()
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody reads or answers
        port = silent.getsockname()[1]
        opening = open_store(f"postgresql://fi@127.0.0.1:{port}/invites", reactor=reactor)
        return self.assertFailure(opening, StoreError)  # type: ignore[no-any-return]
