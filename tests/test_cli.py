"""Tests for the operator command line."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tomllib

from signedjson.key import generate_signing_key
from twisted.trial.unittest import SynchronousTestCase

from federation_invite import cli
from federation_invite.cli import main
from federation_invite.config import load_config, ssl_endpoint_files
from federation_invite.signingkey import write_signing_key_file
from federation_invite.store._dialect import _import_psycopg2

from .support import hide_module


class CliTests(SynchronousTestCase):
    def run_cli(self, *argv: str) -> tuple[int, str]:
        out, self.err = io.StringIO(), io.StringIO()
        code = main(list(argv), out, self.err)
        return code, out.getvalue()

    def test_generate_config_then_check_and_show(self) -> None:
        """generate-config writes a valid config and a 0600 key that keys show describes."""
        data_dir = self.mktemp()
        path = self.mktemp()
        code, out = self.run_cli(
            "generate-config", "--server-name", "example.org", "--data-dir", data_dir, "-o", path
        )
        self.assertEqual(code, 0)
        self.assertIn("Generated signing key ed25519:a_", out)
        config = load_config(path)
        self.assertEqual(config.server_name, "example.org")
        self.assertEqual(stat.S_IMODE(os.stat(config.signing_key_path).st_mode), 0o600)
        code, out = self.run_cli("check-config", "-c", path)
        self.assertEqual((code, out), (0, f"OK: {path} (server name example.org)\n"))
        code, out = self.run_cli("keys", "show", "-c", path)
        self.assertEqual(code, 0)
        self.assertRegex(
            out, r"^ed25519:a_\w{4} [A-Za-z0-9+/]{43} \(sha256 fingerprint [A-Za-z0-9+/]{43}\)\n$"
        )
        with open(config.signing_key_path) as handle:
            seed = handle.read().split()[2]
        self.assertNotIn(seed, out)

    def test_server_name_and_signing_key_override_the_file(self) -> None:
        """--server-name and --signing-key override the file as the daemon's options of the same
        names do: keys show and check-config describe the key the daemon signs with."""
        data_dir = self.mktemp()
        path = self.mktemp()
        self.run_cli(
            "generate-config", "--server-name", "example.org", "--data-dir", data_dir, "-o", path
        )
        other = os.path.abspath(self.mktemp())
        write_signing_key_file(other, generate_signing_key("other"))
        code, out = self.run_cli("keys", "show", "-c", path, "--signing-key", other)
        self.assertEqual(code, 0, self.err.getvalue())
        self.assertRegex(out, r"^ed25519:other [A-Za-z0-9+/]{43} \(sha256 fingerprint")
        code, out = self.run_cli("keys", "show", "-c", path)
        self.assertNotIn("ed25519:other", out)
        code, out = self.run_cli(
            "check-config", "-c", path, "--server-name", "other.example", "--signing-key", other
        )
        self.assertEqual((code, out), (0, f"OK: {path} (server name other.example)\n"))

    def test_generate_config_refuses_overwrite(self) -> None:
        """An existing config file is not overwritten without --force."""
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("x")
        code, _ = self.run_cli(
            "generate-config", "--server-name", "e.org", "--data-dir", self.mktemp(), "-o", path
        )
        self.assertEqual(code, 1)
        self.assertIn("use --force", self.err.getvalue())
        with open(path) as handle:
            self.assertEqual(handle.read(), "x")

    def test_check_config_reports_bad_key(self) -> None:
        """check-config fails with exit status 1 on an invalid file."""
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("bogus = 1\n")
        code, _ = self.run_cli("check-config", "-c", path)
        self.assertEqual(code, 1)
        self.assertEqual(
            self.err.getvalue(), "federation-invite: unknown configuration key 'bogus'\n"
        )

    def test_check_config_reads_the_signing_key(self) -> None:
        """check-config refuses an old key with the ID of the key we sign with, and an unreadable
        key file, when the key exists; a missing key (created at start) is no error."""
        data_dir = self.mktemp()
        os.mkdir(data_dir)
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(
                f'server_name = "example.org"\ndata_dir = "{data_dir}"\n[keys]\nold_verify_keys'
                f" = [{{key_id = 'ed25519:a_1', key = '{'A' * 43}', expired_ts = 5}}]\n"
            )
        key_path = load_config(path).signing_key_path
        code, out = self.run_cli("check-config", "-c", path)
        self.assertEqual((code, out), (0, f"OK: {path} (server name example.org)\n"))
        write_signing_key_file(key_path, generate_signing_key("a_1"))
        code, _ = self.run_cli("check-config", "-c", path)
        self.assertEqual(code, 1)
        self.assertIn(
            "entry 0 has key_id 'ed25519:a_1', the ID of the key we sign with", self.err.getvalue()
        )
        os.unlink(key_path)
        with open(key_path, "w") as handle:
            handle.write("not a key\n")
        code, _ = self.run_cli("check-config", "-c", path)
        self.assertEqual(code, 1)
        self.assertIn(key_path, self.err.getvalue().splitlines()[-1])

    def test_check_config_dangling_key_and_file_data_dir(self) -> None:
        """check-config reads whatever is at the key's path: a dangling symlink is refused
        (the daemon could not read it), not "OK"; a data_dir that is a file is refused."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        key_path = os.path.join(base, "signing.key")
        os.symlink(os.path.join(base, "missing.key"), key_path)
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(f'data_dir = "{base}"\n')
        code, out = self.run_cli("check-config", "-c", path)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(
            self.err.getvalue(),
            f"federation-invite: configuration key 'signing_key': cannot read signing key "
            f"file {key_path}: No such file or directory\n",
        )
        data_file = os.path.join(base, "data")
        with open(data_file, "w") as handle:
            handle.write("")
        with open(path, "w") as handle:
            handle.write(f'data_dir = "{data_file}"\n')
        code, out = self.run_cli("check-config", "-c", path)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(
            self.err.getvalue().splitlines()[-1],
            f"federation-invite: configuration key 'data_dir': {data_file} exists and is not a "
            "directory",
        )

    def test_postgres_database_without_the_extra(self) -> None:
        """Without psycopg2 (the 'postgres' extra), check-config and a store command refuse a
        PostgreSQL database, in the file or given with --database, in one line naming the
        extra (exit status 1, no traceback); an ImportError a command raises is one line too."""
        hide_module(self, "psycopg2")
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write('database = "postgresql://postgres@127.0.0.1/none"\n')
        sqlite = self.mktemp()
        with open(sqlite, "w") as handle:
            handle.write(f'data_dir = "{os.path.abspath(self.mktemp())}"\n')
        refusal = (
            "federation-invite: configuration key 'database': needs the 'postgres' extra: "
            "pip install 'federation-invite[postgres]'\n"
        )
        for argv in (
            ["check-config", "-c", path],
            ["check-config", "-c", sqlite, "--database", "postgres:///none"],
        ):
            self.assertEqual(self.run_cli(*argv), (1, ""), argv)
            self.assertEqual(self.err.getvalue(), refusal, argv)
        # A store command (run on the reactor: in a process of its own).
        code = "import sys; sys.modules['psycopg2'] = None; from federation_invite.cli import main; sys.exit(main())"
        for argv in (
            ["users", "list", "-c", path],
            ["migrate", "-c", sqlite, "--database", "postgresql:///none"],
        ):
            result = subprocess.run(
                [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60
            )
            self.assertEqual(
                (result.returncode, result.stdout, result.stderr), (1, "", refusal), argv
            )

        def command(args: object, out: object) -> int:
            _import_psycopg2()
            return 0

        self.patch(cli, "_cmd_check_config", command)
        self.assertEqual(self.run_cli("check-config"), (1, ""))
        self.assertEqual(
            self.err.getvalue(),
            "federation-invite: PostgreSQL support needs psycopg2: "
            "pip install 'federation-invite[postgres]'\n",
        )


def _no_listener_for(key: str, cert: str) -> str:
    """generate-config's refusal of --tls-cert when no --listen endpoint serves KEY and CERT."""
    return (
        "federation-invite: --tls-cert writes a certificate for a TLS listener, but no "
        "--listen endpoint is an ssl: (or TLS systemd:) endpoint naming it; leave out --listen "
        "(for an ssl: listener on the server name's port) or give an ssl: or systemd: endpoint "
        f"with privateKey={key}:certKey={cert}\n"
    )


class GenerateTLSTests(SynchronousTestCase):
    def test_tls_cert_listener(self) -> None:
        """--tls-cert writes a certificate and key (0600) and a TLS listener that Twisted can parse."""
        from twisted.internet import endpoints, reactor

        data_dir = os.path.abspath(self.mktemp())
        path = self.mktemp()
        out = io.StringIO()
        code = main(
            [
                "generate-config",
                "--server-name",
                "localhost:18448",
                "--data-dir",
                data_dir,
                "-o",
                path,
                "--tls-cert",
            ],
            out,
            io.StringIO(),
        )
        self.assertEqual(code, 0)
        self.assertIn("self-signed TLS certificate", out.getvalue())
        config = load_config(path)
        (listen,) = config.listen
        self.assertTrue(listen.startswith("ssl:18448:interface=127.0.0.1:privateKey="))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(data_dir, "tls.key")).st_mode), 0o600)
        endpoint = endpoints.serverFromString(reactor, listen)
        self.assertIsInstance(endpoint, endpoints.SSL4ServerEndpoint)

    def test_tls_cert_listener_for_an_ipv6_literal(self) -> None:
        """--tls-cert with an IPv6-literal server name listens on the IPv6 loopback, where
        that name leads, escaped for the endpoint string (interface=\\:\\:1)."""
        from twisted.internet import endpoints, reactor

        data_dir = os.path.abspath(self.mktemp())
        path = self.mktemp()
        argv = ["generate-config", "--server-name", "[::1]:18448", "--data-dir", data_dir]
        code = main([*argv, "-o", path, "--tls-cert"], io.StringIO(), io.StringIO())
        self.assertEqual(code, 0)
        (listen,) = load_config(path).listen
        self.assertTrue(listen.startswith("ssl:18448:interface=\\:\\:1:privateKey="), listen)
        endpoint = endpoints.serverFromString(reactor, listen)
        self.assertIsInstance(endpoint, endpoints.SSL4ServerEndpoint)
        self.assertEqual(endpoint._interface, "::1")  # type: ignore[attr-defined]

    def test_tls_cert_listener_for_a_data_dir_with_backslash_and_colon(self) -> None:
        """A data dir whose name holds '\\' and ':' (special in endpoint strings) is escaped in
        the TLS listener generate-config writes: the listener reads the very files written."""
        from twisted.internet import endpoints, reactor

        data_dir = os.path.join(os.path.abspath(self.mktemp()), "a\\b:c")
        path = self.mktemp()
        argv = ["generate-config", "--server-name", "localhost:18448", "--data-dir", data_dir]
        code = main([*argv, "-o", path, "--tls-cert"], io.StringIO(), io.StringIO())
        self.assertEqual(code, 0)
        (listen,) = load_config(path).listen
        key, cert = os.path.join(data_dir, "tls.key"), os.path.join(data_dir, "tls.crt")
        self.assertEqual(ssl_endpoint_files(listen), (key, cert))
        self.assertTrue(os.path.exists(key) and os.path.exists(cert))
        endpoint = endpoints.serverFromString(reactor, listen)
        self.assertIsInstance(endpoint, endpoints.SSL4ServerEndpoint)

    def test_tls_cert_with_no_tls_listener_refused(self) -> None:
        """--tls-cert with --listen endpoints none of which is ssl: would write a certificate no
        listener uses: refused, one line on stderr, exit status 1, nothing written."""
        data_dir = os.path.abspath(self.mktemp())
        path = self.mktemp()
        out, err = io.StringIO(), io.StringIO()
        argv = ["generate-config", "--server-name", "e.org", "--data-dir", data_dir, "-o", path]
        code = main([*argv, "--listen", "tcp:8448", "--tls-cert"], out, err)
        self.assertEqual(code, 1)
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(
            err.getvalue(), _no_listener_for(f"{data_dir}/tls.key", f"{data_dir}/tls.crt")
        )
        self.assertFalse(os.path.exists(path))
        self.assertFalse(os.path.exists(data_dir))

    def test_tls_cert_with_a_tls_listener_for_other_files_refused(self) -> None:
        """--tls-cert with an ssl: --listen whose privateKey and certKey do not both resolve to the
        files it writes (DIR/tls.key, DIR/tls.crt) is refused: one line on stderr, exit status 1,
        nothing written; the same files named by a relative path, or positionally, are kept."""
        data_dir = os.path.abspath(self.mktemp())
        path = self.mktemp()
        argv = ["generate-config", "--server-name", "e.org", "--data-dir", data_dir, "-o", path]
        key, cert = f"{data_dir}/tls.key", f"{data_dir}/tls.crt"
        for listen in (
            "ssl:8448:privateKey=/etc/other.key:certKey=/etc/other.crt",
            f"ssl:8448:privateKey={key}:certKey=/etc/other.crt",
            f"ssl:8448:privateKey=/etc/other.key:certKey={cert}",
            f"ssl:8448:privateKey={key}",  # certKey defaults to privateKey
            f"ssl:8448:privateKey={cert}:certKey={key}",
        ):
            out, err = io.StringIO(), io.StringIO()
            code = main([*argv, "--listen", "tcp:8008", "--listen", listen, "--tls-cert"], out, err)
            self.assertEqual((code, out.getvalue()), (1, ""), listen)
            self.assertEqual(err.getvalue(), _no_listener_for(key, cert))
            self.assertFalse(os.path.exists(path))
            self.assertFalse(os.path.exists(data_dir))
        relative = os.path.relpath(data_dir)
        for listen in (
            f"ssl:8448:privateKey={relative}/tls.key:certKey=./{relative}/../{os.path.basename(relative)}/tls.crt",
            f"ssl:8448:{key}:{cert}",
        ):
            code = main([*argv, "--force", "--listen", listen, "--tls-cert"], out, out)
            self.assertEqual(code, 0, out.getvalue())
            with open(path, "rb") as handle:
                self.assertEqual(tomllib.load(handle)["listen"], [listen])  # as given
            # Loaded, its relative files resolved (joined, not normalised) from here: those
            # written.
            (loaded,) = load_config(path).listen
            files = ssl_endpoint_files(loaded)
            assert files is not None
            self.assertEqual(tuple(map(os.path.abspath, files)), (key, cert))

    def test_tls_cert_with_a_systemd_tls_listener(self) -> None:
        """--tls-cert with a systemd: --listen given privateKey and certKey (a TLS listener
        on systemd's socket) naming the files it writes is kept as given, the certificate
        written; one naming other files, or none (plain HTTP), is refused as an ssl: one."""
        data_dir = os.path.abspath(self.mktemp())
        path = self.mktemp()
        argv = ["generate-config", "--server-name", "e.org", "--data-dir", data_dir, "-o", path]
        key, cert = f"{data_dir}/tls.key", f"{data_dir}/tls.crt"
        for listen in (
            "systemd:domain=INET:index=0",
            f"systemd:domain=INET:index=0:privateKey={key}:certKey=/etc/other.crt",
            f"systemd:domain=INET:index=0:privateKey={key}",  # certKey defaults to privateKey
            "systemd:domain=INET:index=0:sslmethod=TLSv1_2_METHOD",  # privateKey: server.pem
        ):
            out, err = io.StringIO(), io.StringIO()
            code = main([*argv, "--listen", listen, "--tls-cert"], out, err)
            self.assertEqual((code, out.getvalue()), (1, ""), listen)
            self.assertEqual(err.getvalue(), _no_listener_for(key, cert))
            self.assertFalse(os.path.exists(path))
            self.assertFalse(os.path.exists(data_dir))
        tls = f"systemd:domain=INET:index=0:privateKey={key}:certKey={cert}"
        out = io.StringIO()
        code = main([*argv, "--listen", "tcp:8008", "--listen", tls, "--tls-cert"], out, out)
        self.assertEqual(code, 0, out.getvalue())
        self.assertIn("Wrote a self-signed TLS certificate", out.getvalue())
        self.assertEqual(load_config(path).listen, ("tcp:8008", tls))
        self.assertEqual(ssl_endpoint_files(tls), (key, cert))
        self.assertTrue(os.path.exists(cert) and os.path.exists(key))

    def test_tls_cert_with_a_tls_listener_kept(self) -> None:
        """--tls-cert with an ssl: --listen (beside a plain one) writes the certificate and keeps
        the listeners as given."""
        data_dir = os.path.abspath(self.mktemp())
        path = self.mktemp()
        tls = f"ssl:8448:privateKey={data_dir}/tls.key:certKey={data_dir}/tls.crt"
        out = io.StringIO()
        argv = ["generate-config", "--server-name", "e.org", "--data-dir", data_dir, "-o", path]
        code = main([*argv, "--listen", "tcp:8008", "--listen", tls, "--tls-cert"], out, out)
        self.assertEqual(code, 0, out.getvalue())
        self.assertIn("Wrote a self-signed TLS certificate", out.getvalue())
        self.assertEqual(load_config(path).listen, ("tcp:8008", tls))
        self.assertTrue(os.path.exists(os.path.join(data_dir, "tls.crt")))


class GenerateConfigRobustnessTests(SynchronousTestCase):
    def test_rerun_with_tls_cert_and_force(self) -> None:
        """Running generate-config --tls-cert --force again keeps the key and certificate."""
        data_dir = os.path.abspath(self.mktemp())
        path = self.mktemp()
        argv = [
            "generate-config",
            "--server-name",
            "localhost:18448",
            "--data-dir",
            data_dir,
            "-o",
            path,
            "--tls-cert",
            "--force",
        ]
        self.assertEqual(main(argv, io.StringIO(), io.StringIO()), 0)
        out = io.StringIO()
        self.assertEqual(main(argv, out, io.StringIO()), 0)
        self.assertIn("Kept the existing self-signed TLS certificate", out.getvalue())
        self.assertIn("Kept existing signing key", out.getvalue())

    def test_data_dir_written_absolute(self) -> None:
        """The written config names the data directory absolutely (the daemon may start elsewhere)."""
        path = self.mktemp()
        self.assertEqual(
            main(
                ["generate-config", "--server-name", "e.org", "--data-dir", "rel-dir", "-o", path],
                io.StringIO(),
                io.StringIO(),
            ),
            0,
        )
        self.addCleanup(__import__("shutil").rmtree, "rel-dir", True)
        self.assertEqual(load_config(path).data_dir, os.path.abspath("rel-dir"))

    def test_data_dir_that_is_a_file_is_named(self) -> None:
        """generate-config refuses a --data-dir that is a file as check-config does, naming
        the key (it was a bare '[Errno 17] File exists'), and writes no config."""
        data_file = os.path.abspath(self.mktemp())
        with open(data_file, "w") as handle:
            handle.write("")
        path = self.mktemp()
        out, err = io.StringIO(), io.StringIO()
        code = main(
            ["generate-config", "--server-name", "e.org", "--data-dir", data_file, "-o", path],
            out,
            err,
        )
        self.assertEqual(
            (code, out.getvalue(), err.getvalue()),
            (
                1,
                "",
                f"federation-invite: configuration key 'data_dir': {data_file} exists and is "
                "not a directory\n",
            ),
        )
        self.assertFalse(os.path.exists(path))

    def test_unwritable_data_dir_is_one_line_and_no_config(self) -> None:
        """An OS error is one line on stderr, exit status 1, and no config file is left behind."""
        path = self.mktemp()
        err = io.StringIO()
        code = main(
            ["generate-config", "--server-name", "e.org", "--data-dir", "/proc/nope", "-o", path],
            io.StringIO(),
            err,
        )
        self.assertEqual(code, 1)
        self.assertTrue(err.getvalue().startswith("federation-invite: "))
        self.assertFalse(os.path.exists(path))


class ParserTests(SynchronousTestCase):
    def test_command_groups_need_a_sub_command(self) -> None:
        """The command, and a sub-command of keys, users, rules and invites, must be given:
        leaving one out is a usage error (exit status 2), not a command run with None."""
        for argv in ([], ["keys"], ["users"], ["rules"], ["invites"]):
            error = self.assertRaises(SystemExit, cli.build_parser().parse_args, argv)
            self.assertEqual(error.code, 2, argv)

    def test_generate_config_tls_cert_help_names_tls_systemd_endpoints(self) -> None:
        """generate-config --help says a --tls-cert listener given by --listen may be an ssl:
        or a TLS systemd: endpoint naming the certificate, as the command accepts."""
        import contextlib

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            error = self.assertRaises(
                SystemExit, cli.build_parser().parse_args, ["generate-config", "--help"]
            )
        self.assertEqual(error.code, 0)
        text = " ".join(out.getvalue().split())
        self.assertIn(
            "with --listen: one of them must be a TLS endpoint naming the certificate (ssl:, "
            "or systemd: given privateKey/certKey)",
            text,
        )

    def test_invites_list_limit_default(self) -> None:
        """invites list shows at most 100 invites unless --limit says otherwise."""
        self.assertEqual(cli.build_parser().parse_args(["invites", "list"]).limit, 100)
        self.assertEqual(
            cli.build_parser().parse_args(["invites", "list", "--limit", "5"]).limit, 5
        )


class CommandLoggingTests(SynchronousTestCase):
    def test_critical_events_on_stderr_but_rollback_failures(self) -> None:
        """A command's critical log events are printed on stderr (as Twisted prints them until
        logging begins), each once: those logged before it begins are not printed again; adbapi's
        "Rollback failed" (its rollback of a lost connection) is left out, another failure is
        not; events below critical are not printed. In a process of its own: it begins the
        global log."""
        code = (
            "import sys\n"
            "from twisted.python import log\n"
            "from federation_invite.cli import _log_errors_to\n"
            "log.err(ValueError('early'), 'Early failure')\n"
            "_log_errors_to(sys.stderr)\n"
            "try:\n"
            "    raise ValueError('connection already closed')\n"
            "except ValueError:\n"
            "    log.err(None, 'Rollback failed')\n"
            "log.err(ValueError('other'), 'Other failure')\n"
            "log.msg('not critical')\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        self.assertEqual((result.returncode, result.stdout), (0, ""), result.stderr)
        self.assertEqual(result.stderr.count("Early failure\n"), 1, result.stderr)
        self.assertIn(
            "Other failure\nTraceback (most recent call last):\n"
            "Failure: builtins.ValueError: other\n",
            result.stderr,
        )
        for absent in ("Rollback failed", "connection already closed", "not critical"):
            self.assertNotIn(absent, result.stderr)
