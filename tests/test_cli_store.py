"""Tests for the operator commands that use the database (real SQLite, real reactor)."""

from __future__ import annotations

import io
import json
import os
import sqlite3
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from federation_invite.cli import _buffered, build_parser, run_async
from federation_invite.config import ConfigError
from federation_invite.store import InviteRecord, InviteRule, StoreError, open_store

from .store._support import previous_release_database, raw_sqlite


class StoreCommandTests(TestCase):
    def setUp(self) -> None:
        self.db = self.mktemp() + ".db"
        self.config = self.mktemp()
        with open(self.config, "w") as handle:
            handle.write(f'server_name = "example.org"\ndatabase = "sqlite:///{self.db}"\n')

    async def run_cli(self, *argv: str) -> tuple[int, str]:
        out, self.err = io.StringIO(), io.StringIO()
        args = build_parser().parse_args([*argv, "-c", self.config])
        code = await run_async(args, out, reactor, self.err)
        return code, out.getvalue()

    def test_migrate(self) -> Deferred[None]:
        """migrate applies the schema once and then reports nothing to do."""

        async def go() -> None:
            code, out = await self.run_cli("migrate")
            self.assertEqual((code, out), (0, "Migrated from schema 0 to 1: 0001_initial.sql\n"))
            code, out = await self.run_cli("migrate")
            self.assertEqual((code, out), (0, "Schema is at version 1; nothing to do\n"))

        return ensureDeferred(go())

    async def test_migrate_moves_previous_release_bookkeeping(self) -> None:
        """migrate says so when it moves an earlier release's record of applied versions
        (schema_migrations) to federation_invite_schema."""
        for statement in previous_release_database("sqlite", applied_ts=5):
            raw_sqlite(self.db, statement)
        self.assertEqual(
            await self.run_cli("migrate"),
            (
                0,
                "Moved the record of applied schema versions from schema_migrations to"
                " federation_invite_schema\nSchema is at version 1; nothing to do\n",
            ),
        )
        self.assertEqual(
            await self.run_cli("migrate"), (0, "Schema is at version 1; nothing to do\n")
        )

    async def test_store_commands_use_database_pool_size(self) -> None:
        """A store command opens the database as the daemon does, with the configuration's
        database_pool_size (service.open_configured_store), not open_store's default."""
        from federation_invite import service as service_module

        opened: list[Any] = []

        def recording(uri: str, **kwargs: Any) -> Any:
            opened.append(kwargs.get("pool_size"))
            return open_store(uri, **kwargs)

        self.patch(service_module, "open_store", recording)
        with open(self.config, "a") as handle:
            handle.write("database_pool_size = 3\n")
        self.assertEqual(
            await self.run_cli("users", "add", "@bob:example.org"), (0, "Added @bob:example.org\n")
        )
        self.assertEqual(opened, [3])

    def test_users(self) -> Deferred[None]:
        """users add/list/remove manage local users; foreign user IDs are refused."""

        async def go() -> None:
            self.assertEqual(
                await self.run_cli("users", "add", "@bob:example.org"),
                (0, "Added @bob:example.org\n"),
            )
            self.assertEqual(
                await self.run_cli("users", "add", "@bob:example.org"),
                (0, "Already present: @bob:example.org\n"),
            )
            self.assertEqual(await self.run_cli("users", "list"), (0, "@bob:example.org\n"))
            with self.assertRaises(ConfigError):
                await self.run_cli("users", "add", "@bob:other.org")
            with self.assertRaises(ConfigError):
                await self.run_cli("users", "add", "bob")
            self.assertEqual(
                await self.run_cli("users", "remove", "@bob:example.org"),
                (0, "Removed @bob:example.org\n"),
            )
            self.assertEqual((await self.run_cli("users", "remove", "@bob:example.org"))[0], 1)
            self.assertEqual(await self.run_cli("users", "list"), (0, ""))

        return ensureDeferred(go())

    def test_database_and_data_dir_override_the_file(self) -> Deferred[None]:
        """--database and --data-dir override the file as the daemon's options do, so that
        the CLI can work on the database of a daemon started with them (without them, users
        add quietly went to the file's database)."""

        async def go() -> None:
            await self.run_cli("migrate")  # the file's database, listed empty below
            other = self.mktemp() + ".db"
            user = "@bob:example.org"
            self.assertEqual(
                await self.run_cli("users", "add", user, "--database", f"sqlite:///{other}"),
                (0, f"Added {user}\n"),
            )
            self.assertEqual(
                await self.run_cli("users", "list", "--database", f"sqlite:///{other}"),
                (0, f"{user}\n"),
            )
            self.assertEqual(await self.run_cli("users", "list"), (0, ""))
            store = await open_store(f"sqlite:///{other}", reactor=reactor)
            try:
                self.assertEqual(await store.list_local_users(), [user])
            finally:
                await store.close()
            # --data-dir: the default database (no database key) in that directory.
            data_dir = os.path.abspath(self.mktemp())
            with open(self.config, "w") as handle:
                handle.write('server_name = "example.org"\n')
            self.assertEqual(
                await self.run_cli("users", "add", user, "--data-dir", data_dir),
                (0, f"Added {user}\n"),
            )
            self.assertTrue(os.path.exists(os.path.join(data_dir, "federation-invite.db")))
            self.assertEqual(
                await self.run_cli("users", "list", "--data-dir", data_dir), (0, f"{user}\n")
            )

        return ensureDeferred(go())

    def test_server_name_overrides_the_file(self) -> Deferred[None]:
        """--server-name overrides the file as the daemon's option does: users (and rules) are
        added for the server name the daemon serves, not the file's."""

        async def go() -> None:
            user = "@bob:daemon.example"
            self.assertEqual(
                await self.run_cli("users", "add", user, "--server-name", "daemon.example"),
                (0, f"Added {user}\n"),
            )
            with self.assertRaises(ConfigError):
                await self.run_cli(
                    "users", "add", "@bob:example.org", "--server-name", "daemon.example"
                )
            with self.assertRaises(ConfigError):
                await self.run_cli("users", "add", user)
            self.assertEqual(
                await self.run_cli("rules", "list", user, "--server-name", "daemon.example"),
                (0, ""),
            )
            self.assertEqual(await self.run_cli("users", "list"), (0, f"{user}\n"))

        return ensureDeferred(go())

    def test_rules(self) -> Deferred[None]:
        """rules add/list/remove manage a user's invite rules; removing one that is not there
        says so and exits 1 (as users remove does), so a script sees the rule was not held."""

        async def go() -> None:
            user = "@bob:example.org"
            self.assertEqual(
                await self.run_cli("rules", "add", user, "--server", "*.evil", "--action", "block"),
                (0, "Added server *.evil block\n"),
            )
            await self.run_cli("rules", "add", user, "--user", "@friend:evil", "--action", "allow")
            code, out = await self.run_cli("rules", "list", user)
            self.assertEqual(code, 0)
            self.assertEqual(
                sorted(out.splitlines()), ["server *.evil block", "user @friend:evil allow"]
            )
            remove = ("rules", "remove", user, "--server", "*.evil", "--action", "block")
            self.assertEqual(await self.run_cli(*remove), (0, "Removed server *.evil block\n"))
            self.assertEqual(
                await self.run_cli("rules", "list", user), (0, "user @friend:evil allow\n")
            )
            self.assertEqual(await self.run_cli(*remove), (1, "Not present: server *.evil block\n"))

        return ensureDeferred(go())

    def test_invites_list_and_show(self) -> Deferred[None]:
        """invites list filters and prints a table or JSON; show prints one invite."""

        async def go() -> None:
            store = await open_store(f"sqlite:///{self.db}", reactor=reactor)
            event: dict[str, Any] = {"type": "m.room.member", "content": {"membership": "invite"}}
            for i, (invitee, status) in enumerate(
                [("@a:example.org", "pending"), ("@b:example.org", "ignored")]
            ):
                await store.store_invite(
                    InviteRecord(
                        f"$e{i}",
                        "!r:x",
                        "10",
                        invitee,
                        "@s:x",
                        "x",
                        event,
                        [],
                        1_700_000_000_000 + i,
                        status,
                    )
                )
            await store.close()
            code, out = await self.run_cli("invites", "list")
            lines = out.splitlines()
            self.assertEqual(len(lines), 3)
            self.assertIn("2023-11-14 22:13:20 ignored  @b:example.org", lines[1])
            self.assertTrue(lines[2].endswith("$e0"))
            code, out = await self.run_cli("invites", "list", "--status", "pending", "--json")
            self.assertEqual([r["event_id"] for r in json.loads(out)], ["$e0"])
            code, out = await self.run_cli("invites", "list", "--user", "@b:example.org")
            self.assertEqual(len(out.splitlines()), 2)
            code, out = await self.run_cli("invites", "show", "$e1", "--json")
            self.assertEqual((code, json.loads(out)["event"]), (0, event))
            code, out = await self.run_cli("invites", "show", "$e1")
            self.assertIn("status: ignored\n", out)
            with self.assertRaises(ConfigError):
                await self.run_cli("invites", "show", "$nope")

        return ensureDeferred(go())

    async def test_invites_output_leaves_out_the_stored_encoding(self) -> None:
        """invites show (text and --json) and invites list --json give the record's fields,
        not InviteRecord.event_json, the store's internal copy of the event's canonical
        text, which printed every event twice."""
        event: dict[str, Any] = {"type": "m.room.member", "content": {"membership": "invite"}}
        store = await open_store(f"sqlite:///{self.db}", reactor=reactor)
        await store.store_invite(
            InviteRecord("$e", "!r:x", "10", "@a:example.org", "@s:x", "x", event, [], 5)
        )
        await store.close()
        fields = [
            "event_id",
            "room_id",
            "room_version",
            "invitee",
            "sender",
            "origin",
            "event",
            "invite_room_state",
            "received_ts",
            "status",
        ]
        code, out = await self.run_cli("invites", "show", "$e", "--json")
        self.assertEqual((code, sorted(json.loads(out))), (0, sorted(fields)))
        code, out = await self.run_cli("invites", "list", "--json")
        self.assertEqual((code, [sorted(r) for r in json.loads(out)]), (0, [sorted(fields)]))
        code, out = await self.run_cli("invites", "show", "$e")
        self.assertEqual([line.split(":")[0] for line in out.splitlines()], fields)

    async def test_data_dir_that_is_a_file(self) -> None:
        """Every command that creates the data directory refuses a data_dir that is a file as
        the daemon and check-config do, naming the key (it was a bare '[Errno 17] File
        exists'), and creates nothing."""
        data_file = os.path.abspath(self.mktemp())
        with open(data_file, "w") as handle:
            handle.write("")
        problem = f"configuration key 'data_dir': {data_file} exists and is not a directory"
        for argv in (
            ["migrate"],
            ["users", "add", "@bob:example.org"],
            ["send-invite", "--sender", "@alice:example.org", "--invitee", "@bob:x.test"],
        ):
            with self.assertRaises(ConfigError) as caught:
                await self.run_cli(*argv, "--data-dir", data_file)
            self.assertEqual(str(caught.exception), problem, argv)
        self.assertFalse(os.path.exists(self.db))

    async def test_commands_but_add_refuse_a_missing_database(self) -> None:
        """users list and remove, rules list and remove, invites list and show on an SQLite
        database that does not exist (a mistyped --database or --data-dir) refuse it in one
        line naming the file, and create neither it nor the data directory (they answered
        from a new empty one)."""
        typo = os.path.abspath(self.mktemp()) + ".db"
        data_dir = os.path.abspath(self.mktemp())
        reads = (
            ["users", "list"],
            ["rules", "list", "@bob:example.org"],
            ["invites", "list"],
            ["invites", "show", "$e"],
            ["users", "remove", "@bob:example.org"],
            ["rules", "remove", "@bob:example.org", "--server", "*", "--action", "block"],
        )

        async def refused(argv: list[str], missing: str) -> None:
            with self.assertRaises(ConfigError) as caught:
                await self.run_cli(*argv)
            self.assertEqual(
                str(caught.exception),
                f"no database at {missing}; give the daemon's --database or --data-dir,"
                " or create it with 'federation-invite migrate'",
                argv,
            )

        for argv in reads:
            await refused([*argv, "--database", f"sqlite:///{typo}"], typo)
        # A config without database: the default, in the data directory.
        with open(self.config, "w") as handle:
            handle.write('server_name = "example.org"\n')
        for argv in reads:
            await refused(
                [*argv, "--data-dir", data_dir], os.path.join(data_dir, "federation-invite.db")
            )
        self.assertEqual([os.path.exists(p) for p in (typo, data_dir)], [False, False])

    async def test_writing_commands_create_a_missing_database_and_say_so(self) -> None:
        """users add and rules add on an SQLite database that does not exist create it (and
        the data directory), so that users and rules can be set up before the daemon's
        first start, and say so on stderr, naming the file."""
        self.assertFalse(os.path.exists(self.db))
        self.assertEqual(
            await self.run_cli("users", "add", "@bob:example.org"), (0, "Added @bob:example.org\n")
        )
        self.assertEqual(
            self.err.getvalue(), f"Created a new database at {os.path.abspath(self.db)}\n"
        )
        self.assertEqual(await self.run_cli("users", "list"), (0, "@bob:example.org\n"))
        self.assertEqual(self.err.getvalue(), "")

    async def test_refused_add_creates_nothing(self) -> None:
        """users add and rules add refused for their arguments (a user ID not on our server,
        an empty pattern) create neither the missing database nor the data directory, and
        say nothing of one (they created both and said 'Created a new database')."""
        data_dir = os.path.abspath(self.mktemp())
        with open(self.config, "w") as handle:
            handle.write('server_name = "example.org"\n')
        for argv, error, problem in (
            (
                ["users", "add", "@bob:other.example"],
                ConfigError,
                "'@bob:other.example' is not a user ID on this server (example.org)",
            ),
            (
                ["rules", "add", "@bob:other.example", "--server", "*", "--action", "block"],
                ConfigError,
                "'@bob:other.example' is not a user ID on this server (example.org)",
            ),
            (
                ["rules", "add", "@bob:example.org", "--user", "", "--action", "block"],
                ValueError,
                "pattern must not be empty",
            ),
        ):
            self.err = io.StringIO()
            with self.assertRaises(error) as caught:
                await self.run_cli(*argv, "--data-dir", data_dir)
            self.assertEqual(str(caught.exception), problem, argv)
            self.assertEqual(self.err.getvalue(), "", argv)
            self.assertFalse(os.path.exists(data_dir), argv)

    async def test_no_created_line_when_the_database_cannot_be_created(self) -> None:
        """users add on an SQLite file whose directory does not exist fails to open it and
        does not say 'Created a new database' (it said so before trying)."""
        path = os.path.join(os.path.abspath(self.mktemp()), "x.db")
        with self.assertRaises(StoreError):
            await self.run_cli(
                "users", "add", "@bob:example.org", "--database", f"sqlite:///{path}"
            )
        self.assertEqual(self.err.getvalue(), "")
        self.assertFalse(os.path.exists(path))

    def test_invites_list_columns_line_up(self) -> Deferred[None]:
        """invites list: each column of the header starts where the rows' column does (the
        header's first column was one wider than the rows' dates)."""

        async def go() -> None:
            store = await open_store(f"sqlite:///{self.db}", reactor=reactor)
            await store.store_invite(
                InviteRecord(
                    "$e0",
                    "!r:x",
                    "10",
                    "@a:example.org",
                    "@s:x",
                    "x",
                    {},
                    [],
                    1_700_000_000_000,
                    "pending",
                )
            )
            await store.close()
            code, out = await self.run_cli("invites", "list")
            self.assertEqual(code, 0)
            header, row = out.splitlines()
            self.assertEqual(
                header,
                f"{'received (UTC)':<19} {'status':<8} {'invitee':<30} {'sender':<30} "
                f"{'room':<30} event",
            )
            self.assertEqual(
                row,
                f"2023-11-14 22:13:20 pending  {'@a:example.org':<30} {'@s:x':<30} "
                f"{'!r:x':<30} $e0",
            )
            for title, value in (
                ("status", "pending"),
                ("invitee", "@a:example.org"),
                ("sender", "@s:x"),
                ("room", "!r:x"),
                ("event", "$e0"),
            ):
                self.assertEqual(header.index(f" {title}"), row.index(f" {value}"), title)

        return ensureDeferred(go())

    def test_invites_list_pages_with_after(self) -> Deferred[None]:
        """invites list --after EVENT_ID gives the next page: every invite exactly once, in
        order, even where several share a millisecond; a full page says how to go on."""

        async def go() -> None:
            store = await open_store(f"sqlite:///{self.db}", reactor=reactor)
            # 8 invites, 3 per millisecond: pages of 3 split every millisecond's group.
            for i in range(8):
                await store.store_invite(
                    InviteRecord(
                        f"$p{i}",
                        "!r:x",
                        "10",
                        "@a:example.org",
                        "@s:x",
                        "x",
                        {},
                        [],
                        1_700_000_000_000 + i // 3,
                        "pending",
                    )
                )
            await store.close()
            newest_first = [f"$p{i}" for i in range(7, -1, -1)]

            seen: list[str] = []
            argv: list[str] = []
            hints = []
            for _ in range(5):  # bounded: a broken --after would repeat the first page
                code, out = await self.run_cli("invites", "list", "--limit", "3", *argv)
                self.assertEqual(code, 0)
                lines = out.splitlines()[1:]
                if lines and lines[-1].startswith("-- next page: --after "):
                    hints.append(lines.pop())
                seen.extend(line.rsplit(" ", 1)[1] for line in lines)
                if len(lines) < 3:
                    break
                argv = ["--after", seen[-1]]
            self.assertEqual(seen, newest_first)
            # Full pages (3, 3, then 2) say how to go on, with the ID quoted for a shell.
            self.assertEqual(hints, ["-- next page: --after '$p5'", "-- next page: --after '$p2'"])

            pages = []
            after: list[str] = []
            for _ in range(3):
                code, out = await self.run_cli("invites", "list", "--limit", "3", "--json", *after)
                page = [r["event_id"] for r in json.loads(out)]
                pages.append(page)
                after = ["--after", page[-1]]
            self.assertEqual(pages, [newest_first[:3], newest_first[3:6], newest_first[6:]])

            # Filters apply to later pages too.
            code, out = await self.run_cli(
                "invites", "list", "--json", "--user", "@nobody:example.org", "--after", "$p4"
            )
            self.assertEqual((code, json.loads(out)), (0, []))
            with self.assertRaises(ConfigError) as raised:
                await self.run_cli("invites", "list", "--after", "$nope")
            self.assertIn("no invite with event ID '$nope'", str(raised.exception))

        return ensureDeferred(go())

    def test_next_page_hint_for_an_id_with_control_characters(self) -> Deferred[None]:
        """A full page whose last (v1/v2, peer-chosen) event ID holds control characters
        does not end with its escaped form, which names no invite: it points to --json."""

        async def go() -> None:
            store = await open_store(f"sqlite:///{self.db}", reactor=reactor)
            for event_id, ts in (("$a\x1bb:them.example", 2), ("$plain:them.example", 1)):
                await store.store_invite(
                    InviteRecord(
                        event_id, "!r:x", "1", "@a:example.org", "@s:x", "x", {}, [], ts, "pending"
                    )
                )
            await store.close()
            _, paged = await self.run_cli("invites", "list", "--limit", "1")
            self.assertEqual(
                paged.splitlines()[-1],
                "-- next page: --after the last event ID, as --json gives it",
            )
            _, as_json = await self.run_cli("invites", "list", "--limit", "1", "--json")
            (last,) = json.loads(as_json)
            _, paged = await self.run_cli("invites", "list", "--after", last["event_id"])
            self.assertTrue(paged.splitlines()[1].endswith("$plain:them.example"))

        return ensureDeferred(go())

    def test_peer_chosen_text_is_escaped(self) -> Deferred[None]:
        """IDs with escape sequences or newlines are shown escaped, never sent to the terminal raw."""

        async def go() -> None:
            store = await open_store(f"sqlite:///{self.db}", reactor=reactor)
            sender = "@\x1b[2Jfake\nline:evil.example"
            await store.store_invite(
                InviteRecord(
                    "$x",
                    "!r\x1b]0;t\x07:e",
                    "10",
                    "@a:example.org",
                    sender,
                    "evil.example",
                    {},
                    [],
                    1,
                    "pending",
                )
            )
            await store.close()
            _, table = await self.run_cli("invites", "list")
            _, shown = await self.run_cli("invites", "show", "$x")
            for text in (table, shown):
                self.assertNotIn("\x1b", text)
                self.assertNotIn("\x07", text)
                self.assertIn("\\x1b[2Jfake\\nline", text)
            self.assertEqual(len(table.splitlines()), 2)

        return ensureDeferred(go())

    def test_users_and_rules_lists_are_escaped(self) -> Deferred[None]:
        """Users and rules put in the database by a library caller (or another tool) with
        escape sequences or newlines are listed escaped, as invites are."""

        async def go() -> None:
            store = await open_store(f"sqlite:///{self.db}", reactor=reactor)
            await store.add_local_user("@\x1b[2Jbob:example.org")
            await store.add_invite_rule(
                InviteRule("@bob:example.org", "server", "evil\nuser @x:y allow", "block")
            )
            await store.close()
            _, users = await self.run_cli("users", "list")
            _, rules = await self.run_cli("rules", "list", "@bob:example.org")
            self.assertEqual(users, "@\\x1b[2Jbob:example.org\n")
            self.assertEqual(rules, "server evil\\nuser @x:y allow block\n")

        return ensureDeferred(go())

    def test_invites_list_with_a_time_beyond_the_calendar(self) -> Deferred[None]:
        """A received_ts no calendar date fits (a library caller may store any integer up
        to 2**53) is listed as its milliseconds, not a crash after the header."""

        async def go() -> None:
            store = await open_store(f"sqlite:///{self.db}", reactor=reactor)
            for event_id, ts in (("$far", 2**53 - 1), ("$before", -(2**53) + 1)):
                await store.store_invite(
                    InviteRecord(
                        event_id, "!r:x", "1", "@a:example.org", "@s:x", "x", {}, [], ts, "pending"
                    )
                )
            await store.close()
            code, table = await self.run_cli("invites", "list")
            self.assertEqual(code, 0)
            lines = table.splitlines()
            self.assertEqual(len(lines), 3)
            self.assertTrue(lines[1].startswith(f"{2**53 - 1} ms "), lines[1])
            self.assertTrue(lines[1].endswith("$far"), lines[1])
            self.assertTrue(lines[2].startswith(f"{-(2**53) + 1} ms "), lines[2])

        return ensureDeferred(go())

    def test_invites_from_the_command_line(self) -> None:
        """invites list and show run from the command line (on the reactor, in a process of
        its own): the list's header alone, exit status 0; an unknown event ID, one line, status 1."""
        import os
        import subprocess

        from .daemon_harness import BIN

        command = os.path.join(BIN, "federation-invite")
        self.assertEqual(run_command("migrate", "-c", self.config).returncode, 0)
        result = subprocess.run(
            [command, "invites", "list", "-c", self.config], capture_output=True, timeout=60
        )
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertTrue(result.stdout.startswith(b"received (UTC)"), result.stdout)
        self.assertEqual(result.stdout.count(b"\n"), 1, result.stdout)
        result = subprocess.run(
            [command, "invites", "show", "$x", "-c", self.config], capture_output=True, timeout=60
        )
        self.assertEqual(
            (result.returncode, result.stdout, result.stderr),
            (1, b"", b"federation-invite: no invite with event ID '$x'\n"),
        )

    def test_empty_rule_pattern_is_refused(self) -> None:
        """rules add/remove with an empty --user or --server pattern: exit status 1 and one
        line saying the pattern must not be empty (an empty --user was taken for a missing
        one, and became a server rule whose pattern was None)."""
        import os
        import subprocess

        from .daemon_harness import BIN

        self.assertEqual(run_command("migrate", "-c", self.config).returncode, 0)
        for command in ("add", "remove"):
            for option in ("--user", "--server"):
                result = subprocess.run(
                    [
                        os.path.join(BIN, "federation-invite"),
                        "rules",
                        command,
                        "@bob:example.org",
                        option,
                        "",
                        "--action",
                        "block",
                        "-c",
                        self.config,
                    ],
                    capture_output=True,
                    timeout=60,
                )
                self.assertEqual(
                    (result.returncode, result.stdout, result.stderr),
                    (1, b"", b"federation-invite: pattern must not be empty\n"),
                    (command, option),
                )


class PostgresCommandTests(TestCase):
    def test_killed_connection_is_one_line_on_stderr(self) -> None:
        """A command whose PostgreSQL backend is terminated mid-statement exits 1 with one
        line on stderr: adbapi's 'Rollback failed' tracebacks (the connection is gone, so
        its rollback fails) are not printed before it."""
        import os
        import subprocess
        import time

        from .daemon_harness import BIN
        from .store._support import (
            POSTGRES_BASE,
            create_postgres_database,
            drop_postgres_database,
            raw_postgres,
            require_postgres,
        )

        require_postgres(self)
        import psycopg2

        database = create_postgres_database()
        self.addCleanup(drop_postgres_database, database)
        config = self.mktemp()
        with open(config, "w") as handle:
            handle.write(
                f'server_name = "example.org"\ndata_dir = "{self.mktemp()}"\n'
                f'database = "{POSTGRES_BASE}/{database}"\n'
            )
        command = os.path.join(BIN, "federation-invite")
        subprocess.run([command, "migrate", "-c", config], check=True, capture_output=True)
        holder = psycopg2.connect(f"{POSTGRES_BASE}/{database}")
        self.addCleanup(holder.close)
        holder.cursor().execute("LOCK TABLE local_users")
        adding = subprocess.Popen(
            [command, "users", "add", "@alice:example.org", "-c", config],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(adding.kill)
        deadline = time.monotonic() + 30
        while True:
            waiting = raw_postgres(
                database,
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            if waiting:
                break
            self.assertLess(time.monotonic(), deadline, "the command never waited on the lock")
            time.sleep(0.05)
        raw_postgres(database, "SELECT pg_terminate_backend(?)", (waiting[0][0],))
        out, err = adding.communicate(timeout=60)
        self.assertEqual((adding.returncode, out), (1, b""))
        self.assertEqual(err.count(b"\n"), 1, err)
        self.assertTrue(err.startswith(b"federation-invite: add_local_user failed: "), err)


class InterruptTests(TestCase):
    """SIGINT/SIGTERM while a store command waits to open its database (a real process)."""

    def setUp(self) -> None:
        self.db = os.path.abspath(self.mktemp() + ".db")
        self.config = self.mktemp()
        with open(self.config, "w") as handle:
            handle.write(f'server_name = "example.org"\ndatabase = "sqlite:///{self.db}"\n')
        self.assertEqual(run_command("migrate", "-c", self.config).returncode, 0)
        # Another process's write lock, as a daemon's long transaction holds it: the
        # command waits for it (up to SQLite's busy timeout, 10 s).
        locker = sqlite3.connect(self.db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        self.addCleanup(locker.close)

    def interrupted(self, signum: int, *argv: str) -> tuple[int, bytes, bytes, float]:
        """Start the command, wait until it is waiting for the database (its pool thread
        started), send ``signum``: exit status, output, seconds from the signal to the end."""
        import signal
        import subprocess
        import time

        from .daemon_harness import BIN

        process = subprocess.Popen(
            [os.path.join(BIN, "federation-invite"), *argv, "-c", self.config],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Ctrl-C's signal as a shell's foreground job gets it (trial's own handler
            # would otherwise be the one the child starts with).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        deadline = time.monotonic() + 30
        while len(os.listdir(f"/proc/{process.pid}/task")) < 2:
            self.assertLess(time.monotonic(), deadline, "the command never opened the database")
            time.sleep(0.05)
        time.sleep(0.5)
        process.send_signal(signum)
        sent = time.monotonic()
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            self.fail(f"{argv} still running 30 s after signal {signum}")
        return process.returncode, out, err, time.monotonic() - sent

    def test_sigint_while_opening_ends_the_command(self) -> None:
        """Ctrl-C while a store command waits for a locked database ends it within seconds
        (it hung for ever in Thread.start at interpreter exit): exit status 130, one line."""
        import signal

        for argv in (["users", "list"], ["invites", "list"], ["migrate"]):
            code, out, err, seconds = self.interrupted(signal.SIGINT, *argv)
            self.assertEqual((code, out, err), (130, b"", b"federation-invite: interrupted\n"))
            self.assertLess(seconds, 5, argv)

    def test_sigterm_while_opening_ends_the_command(self) -> None:
        """SIGTERM (timeout(1), a service manager) while a store command waits for a locked
        database ends it within seconds: exit status 143, one line."""
        import signal

        code, out, err, seconds = self.interrupted(
            signal.SIGTERM, "users", "add", "@dave:example.org"
        )
        self.assertEqual((code, out, err), (143, b"", b"federation-invite: terminated\n"))
        self.assertLess(seconds, 5)


def run_command(*argv: str) -> Any:
    """Run the federation-invite script in a process of its own."""
    import subprocess

    from .daemon_harness import BIN

    return subprocess.run(
        [os.path.join(BIN, "federation-invite"), *argv], capture_output=True, timeout=60
    )


class BrokenPipeTests(TestCase):
    """A reader that stops early (``federation-invite users list | head -1``)."""

    def setUp(self) -> None:
        self.db = os.path.abspath(self.mktemp() + ".db")
        self.config = self.mktemp()
        with open(self.config, "w") as handle:
            handle.write(f'server_name = "example.org"\ndatabase = "sqlite:///{self.db}"\n')
        self.assertEqual(run_command("migrate", "-c", self.config).returncode, 0)

    def add_users(self, count: int) -> None:
        connection = sqlite3.connect(self.db)
        with connection:
            connection.executemany(
                "INSERT INTO local_users (user_id) VALUES (?)",
                [(f"@user{i:06}:example.org",) for i in range(count)],
            )
        connection.close()

    def add_invites(self, count: int) -> None:
        """``count`` invites of about 2 KB each in --json: a listing written in one piece."""
        connection = sqlite3.connect(self.db)
        with connection:
            connection.executemany(
                "INSERT INTO invites VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        f"$event{i:06}",
                        "!room:other.org",
                        "10",
                        f"@user{i:06}:example.org",
                        "@sender:other.org",
                        "other.org",
                        json.dumps({"content": {"padding": "x" * 2000}}),
                        "[]",
                        1_700_000_000_000 + i,
                        "pending",
                    )
                    for i in range(count)
                ],
            )
        connection.close()

    def listed_into_closed_pipe(
        self,
        read_first_line: bool,
        *command: str,
        unbuffered: bool | None = None,
    ) -> tuple[int, bytes]:
        """Run ``command`` (default ``users list``) into a pipe that is closed after its
        first line (or before it writes); with ``unbuffered`` given, PYTHONUNBUFFERED set
        to 1 or left out of its environment. Its exit status and stderr."""
        import subprocess

        from .daemon_harness import BIN

        env = dict(os.environ)
        env.pop("PYTHONUNBUFFERED", None)
        if unbuffered:
            env["PYTHONUNBUFFERED"] = "1"
        process = subprocess.Popen(
            [
                os.path.join(BIN, "federation-invite"),
                *(command or ("users", "list")),
                "-c",
                self.config,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env if unbuffered is not None else None,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        assert process.stdout is not None and process.stderr is not None
        if read_first_line:
            first = process.stdout.readline()
            self.assertIn(first, (b"@user000000:example.org\n", b"[\n"))
        process.stdout.close()
        err = process.stderr.read()
        return process.wait(timeout=60), err

    def test_reader_closing_the_pipe_during_the_listing(self) -> None:
        """A listing longer than the pipe's buffer, its reader gone after one line: exit
        status 141 (as a tool ended by SIGPIPE) and nothing on stderr (it printed
        '[Errno 32] Broken pipe' and exited 1)."""
        self.add_users(20_000)
        self.assertEqual(self.listed_into_closed_pipe(True), (141, b""))

    def test_reader_gone_before_the_output_is_flushed(self) -> None:
        """A short listing whose reader is gone before it is written (the failure comes at the
        last flush): exit status 141, nothing on stderr (Python's 'Exception ignored ...
        BrokenPipeError' and exit status 120 otherwise)."""
        self.add_users(1)
        self.assertEqual(self.listed_into_closed_pipe(False), (141, b""))

    def long_json_listing_into_closed_pipe(self, unbuffered: bool) -> tuple[int, bytes]:
        """``invites list --json`` of about 1 MB, written in one piece, its reader gone
        after the first line, while the write is still in progress."""
        self.add_invites(500)
        return self.listed_into_closed_pipe(
            True, "invites", "list", "--json", "--limit", "1000", unbuffered=unbuffered
        )

    def test_reader_closing_the_pipe_during_one_long_write_unbuffered(self) -> None:
        """With PYTHONUNBUFFERED=1 (stdout has no buffer), a listing written in one piece
        whose reader is gone during the write: exit status 141, nothing on stderr (the
        write the closed pipe cut short was taken as done, and the command exited 0)."""
        self.assertEqual(self.long_json_listing_into_closed_pipe(True), (141, b""))

    def test_unbuffered_output_still_written_at_each_line(self) -> None:
        """With PYTHONUNBUFFERED=1, the buffer the command puts under stdout is flushed at
        each line, as stdout was, so that the lines keep their order with stderr's (2>&1: an
        error after some lines comes after them); closing it leaves the descriptor open."""
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        os.set_blocking(read_end, False)  # nothing written yet: BlockingIOError, not a hang
        stdout = io.TextIOWrapper(
            io.FileIO(write_end, "w", closefd=False), encoding="utf-8", write_through=True
        )
        out = _buffered(stdout)
        self.assertIsNot(out, stdout)
        out.write("one\n")
        self.assertEqual(os.read(read_end, 100), b"one\n")
        out.write("two ")
        out.write("three\n")
        self.assertEqual(os.read(read_end, 100), b"two three\n")
        out.close()
        os.fstat(write_end)  # still open

    def test_reader_closing_the_pipe_during_one_long_write(self) -> None:
        """Without PYTHONUNBUFFERED, a listing written in one piece whose reader is gone
        during the write: exit status 141, nothing on stderr."""
        self.assertEqual(self.long_json_listing_into_closed_pipe(False), (141, b""))
