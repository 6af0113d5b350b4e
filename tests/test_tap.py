"""Tests for the twistd plugin: option parsing, overrides and the service tree."""

from __future__ import annotations

import io
import os
import socket
import stat
import sys
import threading
from collections.abc import Callable

from signedjson.key import generate_signing_key
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase, TestCase

from federation_invite.config import ConfigError
from federation_invite.service import FederationInviteService, make_service
from federation_invite.signingkey import write_signing_key_file
from federation_invite.store import StoreError
from federation_invite.tap import Options, makeService, reopen_log_file

from .daemon_harness import DaemonHarness
from .support import hide_module


class OptionsTests(SynchronousTestCase):
    def test_no_config_uses_embedded_default(self) -> None:
        """With no options at all the embedded default configuration is used."""
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["loaded"].server_name, "localhost:8448")
        self.assertIsNone(options["loaded"].path)

    def test_overrides(self) -> None:
        """Each command-line option overrides its config key; --listen repeats."""
        path = self.mktemp()
        FilePath(path).setContent(b'server_name = "file.example"\n')
        options = Options()
        options.parseOptions(
            [
                "--config",
                path,
                "--server-name",
                "cli.example",
                "--listen",
                "tcp:1",
                "--listen",
                "tcp:2",
                "--signing-key",
                "/k",
                "--database",
                "sqlite:///x.db",
                "--data-dir",
                "/d",
            ]
        )
        config = options["loaded"]
        self.assertEqual(config.server_name, "cli.example")
        self.assertEqual(config.listen, ("tcp:1", "tcp:2"))
        self.assertEqual(config.signing_key_path, "/k")
        self.assertEqual(config.database, "sqlite:///" + os.path.join(os.getcwd(), "x.db"))
        self.assertEqual(config.data_dir, "/d")

    def test_metrics_listen_override(self) -> None:
        """--metrics-listen overrides metrics.listen, so workers sharing one config file can
        each have their own metrics port; an empty one turns the listener off."""
        path = self.mktemp()
        FilePath(path).setContent(b'[metrics]\nlisten = "tcp:9100:interface=127.0.0.1"\n')
        options = Options()
        options.parseOptions(["--config", path])
        self.assertEqual(options["loaded"].get("metrics.listen"), "tcp:9100:interface=127.0.0.1")
        options = Options()
        options.parseOptions(["--config", path, "--metrics-listen", "tcp:9101"])
        self.assertEqual(options["loaded"].get("metrics.listen"), "tcp:9101")
        options = Options()
        options.parseOptions(["--config", path, "--metrics-listen", ""])
        self.assertIsNone(options["loaded"].get("metrics.listen"))
        options = Options()
        error = self.assertRaises(
            SystemExit, options.parseOptions, ["--metrics-listen", "nonsense:1"]
        )
        self.assertIn("'metrics.listen'", str(error.code))

    def test_bad_config_ends_the_process(self) -> None:
        """A bad value or an unknown key ends the process with one line naming the key (exit
        status 1, printed on stderr by Python), as makeService's refusals do; not twistd's
        usage text."""
        self.patch(sys, "argv", ["/venv/bin/twistd", "-n", "federation-invite"])
        options = Options()
        error = self.assertRaises(SystemExit, options.parseOptions, ["--server-name", "a b"])
        self.assertEqual(
            error.code,
            "twistd: configuration key 'server_name': must be a Matrix server name "
            "(host, IPv4, [IPv6], optional :port)",
        )
        path = self.mktemp()
        FilePath(path).setContent(b"[inbound]\nno_such_key = 1\n")
        error = self.assertRaises(SystemExit, Options().parseOptions, ["--config", path])
        self.assertEqual(error.code, "twistd: unknown configuration key 'inbound.no_such_key'")
        # Without the 'postgres' extra, a PostgreSQL database is one line naming the extra.
        hide_module(self, "psycopg2")
        error = self.assertRaises(
            SystemExit, Options().parseOptions, ["--database", "postgresql://u@127.0.0.1/db"]
        )
        self.assertEqual(
            error.code,
            "twistd: configuration key 'database': needs the 'postgres' extra: "
            "pip install 'federation-invite[postgres]'",
        )
        # An option the plugin does not have is still twistd's usage error.
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--no-such-option"])

    def test_plugin_discoverable(self) -> None:
        """twistd's plugin discovery finds the federation-invite ServiceMaker."""
        from twisted.application.service import IServiceMaker

        names = [maker.tapname for maker in getPlugins(IServiceMaker)]
        self.assertIn("federation-invite", names)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MakeServiceTests(TestCase):
    def test_service_starts_store_and_listeners(self) -> Deferred[None]:
        """The service opens the store, then listens on every endpoint and serves the key."""
        import treq
        from twisted.internet import reactor

        data_dir = self.mktemp()
        ports = [free_port(), free_port()]
        options = Options()
        options.parseOptions(
            ["--data-dir", data_dir]
            + [arg for port in ports for arg in ("--listen", f"tcp:{port}:interface=127.0.0.1")]
        )
        service = make_service(options["loaded"], reactor, exit_on_failure=False, freeze_gc=False)
        self.assertTrue(os.path.exists(os.path.join(data_dir, "signing.key")))
        self.assertEqual(list(service), [])

        async def go() -> None:
            service.startService()
            components = await service.ready
            try:
                children = list(service)
                self.assertEqual(len(children), 2)
                for child in children:
                    self.assertIsInstance(child, StreamServerEndpointService)
                for port in ports:
                    response = await treq.get(
                        f"http://127.0.0.1:{port}/_matrix/key/v2/server", persistent=False
                    )
                    body = await response.json()
                    self.assertEqual(body["server_name"], "localhost:8448")
                self.assertEqual(await components.store.schema_version(), 1)
            finally:
                await service.stopService()
            self.assertTrue(os.path.exists(os.path.join(data_dir, "federation-invite.db")))

        return ensureDeferred(go())

    def test_daemon_freezes_the_gc_once_listening(self) -> Deferred[None]:
        """make_service's daemon calls gc.freeze() after start-up and raises the youngest
        generation's threshold to GEN0_THRESHOLD (the others kept); a hand-built one
        does neither."""
        import gc

        from twisted.internet import reactor

        from federation_invite.service import GEN0_THRESHOLD

        # README.md, "raises the threshold of its youngest generation from 700 to 10,000".
        self.assertEqual(GEN0_THRESHOLD, 10_000)

        frozen: list[int] = []
        self.patch(gc, "freeze", lambda: frozen.append(len(frozen)))
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        thresholds: list[tuple[int, ...]] = []
        self.patch(gc, "set_threshold", lambda *values: thresholds.append(values))
        services = []
        for freeze in (True, False):
            options = Options()
            options.parseOptions(
                ["--data-dir", self.mktemp(), "--listen", f"tcp:{free_port()}:interface=127.0.0.1"]
            )
            services.append(
                make_service(options["loaded"], reactor, exit_on_failure=False, freeze_gc=freeze)
            )
        self.assertIs(
            make_service.__kwdefaults__["freeze_gc"],
            True,  # type: ignore[index]
        )

        async def go() -> None:
            for index, service in enumerate(services):
                service.startService()
                try:
                    await service.ready
                    self.assertEqual(frozen, [0])  # the first froze, the second did not
                    self.assertEqual(thresholds, [(GEN0_THRESHOLD, *before[1:])])
                finally:
                    await service.stopService()
                self.assertEqual(len(frozen), 1, index)

        return ensureDeferred(go())

    def test_metrics_listener(self) -> Deferred[None]:
        """With metrics.listen set, the daemon also serves Prometheus metrics there."""
        import treq
        from twisted.internet import reactor

        port, metrics_port = free_port(), free_port()
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(
                f'data_dir = "{self.mktemp()}"\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
                f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n'
            )
        options = Options()
        options.parseOptions(["--config", path])
        service = make_service(options["loaded"], reactor, exit_on_failure=False, freeze_gc=False)

        async def go() -> None:
            service.startService()
            await service.ready
            try:
                self.assertEqual(len(list(service)), 2)
                response = await treq.get(
                    f"http://127.0.0.1:{metrics_port}/metrics", persistent=False
                )
                text = (await response.content()).decode()
                self.assertIn("federation_invite_key_fetches_total 0.0", text)
            finally:
                await service.stopService()

        return ensureDeferred(go())

    def test_start_failure_reported(self) -> Deferred[None]:
        """A store that cannot be opened fails ``ready`` (and is logged) instead of hanging."""
        from twisted.internet import reactor

        options = Options()
        # Port 0: the embedded default (8448) may be in use (another test run, a daemon).
        options.parseOptions(
            [
                "--data-dir",
                self.mktemp(),
                "--database",
                "sqlite:////nonexistent/dir/x.db",
                "--listen",
                "tcp:0:interface=127.0.0.1",
            ]
        )
        service = make_service(options["loaded"], reactor, exit_on_failure=False, freeze_gc=False)
        service.reactor = _NotRunning(reactor)
        service.startService()

        async def go() -> None:
            with self.assertRaises(StoreError):
                await service.ready
            self.flushLoggedErrors()

        return ensureDeferred(go())

    def test_started_in_another_directory(self) -> Deferred[None]:
        """As under twistd --rundir: made in one directory and started in another, the
        service keeps the key, the data dir and the database in the first."""
        from twisted.internet import reactor

        start, rundir = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        os.makedirs(start)
        os.makedirs(rundir)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(start)
        options = Options()
        options.parseOptions(
            ["--data-dir", "data", "--listen", f"tcp:{free_port()}:interface=127.0.0.1"]
        )
        service = make_service(options["loaded"], reactor, exit_on_failure=False, freeze_gc=False)
        os.chdir(rundir)

        async def go() -> None:
            service.startService()
            try:
                await service.ready
            finally:
                await service.stopService()
            files = os.listdir(os.path.join(start, "data"))
            self.assertIn("signing.key", files)
            self.assertIn("federation-invite.db", files)
            self.assertEqual(os.listdir(rundir), [])

        return ensureDeferred(go())

    def test_relative_endpoint_files_found_from_another_directory(self) -> Deferred[None]:
        """As under twistd --rundir: an ssl: listener's relative key and certificate and a
        relative unix: socket, given where the options are parsed, are found and made
        there when the service starts in another directory."""
        import shutil
        import tempfile

        from twisted.internet import reactor

        from federation_invite.tlscert import write_self_signed_certificate

        # Short paths: a Unix socket's must fit in 108 bytes.
        start, rundir = tempfile.mkdtemp(prefix="fi"), tempfile.mkdtemp(prefix="fi")
        self.addCleanup(shutil.rmtree, start)
        self.addCleanup(shutil.rmtree, rundir)
        write_self_signed_certificate(
            "localhost", os.path.join(start, "tls.key"), os.path.join(start, "tls.crt")
        )
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(start)
        options = Options()
        options.parseOptions(
            [
                "--data-dir",
                "data",
                "--listen",
                f"ssl:{free_port()}:interface=127.0.0.1:privateKey=tls.key:certKey=tls.crt",
                "--listen",
                "unix:fi.sock",
            ]
        )
        service = make_service(options["loaded"], reactor, exit_on_failure=False, freeze_gc=False)
        os.chdir(rundir)

        async def go() -> None:
            service.startService()
            try:
                await service.ready
                self.assertIn("fi.sock", os.listdir(start))
                self.assertTrue(service.reload_tls())
            finally:
                await service.stopService()
            self.assertEqual(os.listdir(rundir), [])

        return ensureDeferred(go())

    async def assert_serves_socket(
        self, service: FederationInviteService, path: str, message: object
    ) -> None:
        """``service`` started listens on a unix socket at ``path``; then it is stopped."""
        service.startService()
        try:
            await service.ready
            self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode), message)
        finally:
            await service.stopService()

    def test_relative_unix_socket_from_a_short_or_long_start_directory(self) -> Deferred[None]:
        """A relative unix: socket binds in the start directory whether its absolute path
        fits in a Unix socket address or not (then bound relative to the working directory,
        the start directory or, under twistd --rundir, one above it); from a directory it is
        not under, a too long one fails in one line naming the limit."""
        import shutil
        import tempfile

        from twisted.internet import reactor

        from federation_invite.service import UNIX_PATH_LONGEST

        short, elsewhere = tempfile.mkdtemp(prefix="fi"), tempfile.mkdtemp(prefix="fi")
        self.addCleanup(shutil.rmtree, short)
        self.addCleanup(shutil.rmtree, elsewhere)
        deep = os.path.join(short, "d" * 50, "e" * 40)
        os.makedirs(deep)
        self.addCleanup(os.chdir, os.getcwd())

        def service_in(start: str, socket: str = "fi.sock") -> FederationInviteService:
            os.chdir(start)
            options = Options()
            options.parseOptions(["--data-dir", "data", "--listen", f"unix:{socket}"])
            self.assertEqual(options["loaded"].listen, (f"unix:{start}/{socket}",))
            return make_service(options["loaded"], reactor, exit_on_failure=False, freeze_gc=False)

        async def go() -> None:
            # (start directory, working directory at start: the rundir)
            for start, rundir in ((short, short), (deep, deep), (deep, short)):
                self.assertEqual(len(f"{start}/fi.sock") > UNIX_PATH_LONGEST, start == deep)
                service = service_in(start)
                os.chdir(rundir)
                await self.assert_serves_socket(service, os.path.join(start, "fi.sock"), start)
                self.assertNotIn("fi.sock", os.listdir(start))
            service = service_in(deep)
            os.chdir(elsewhere)
            error = self.assertRaises(ConfigError, service.privilegedStartService)
            self.assertEqual(
                str(error),
                f"configuration key 'listen': cannot listen on 'unix:{deep}/fi.sock': the "
                f"socket's path is {len(deep) + 8} bytes, over the {UNIX_PATH_LONGEST} a Unix "
                "socket address holds, and not under the working directory: give a shorter "
                "absolute path",
            )
            # Bound relative, a failure still names the absolute path.
            error = self.assertRaises(
                ConfigError, service_in(deep, "nodir/fi.sock").privilegedStartService
            )
            self.assertTrue(
                str(error).endswith(f": No such file or directory: {deep}/nodir/fi.sock.lock"),
                str(error),
            )

        return ensureDeferred(go())

    def test_relative_unix_socket_path_at_the_kernel_limit(self) -> None:
        """A unix: socket whose absolute path is the longest a socket address holds with its
        terminating NUL (107 bytes on Linux, 103 on macOS and BSD) binds absolute; one a byte
        or two longer (108, 109) binds relative to the working directory: none fails."""
        import shutil
        import sys
        import tempfile

        from twisted.internet import reactor

        from federation_invite.service import UNIX_PATH_LONGEST

        longest = 103 if sys.platform == "darwin" or "bsd" in sys.platform else 107
        self.assertEqual(UNIX_PATH_LONGEST, longest)  # the README's numbers
        base = tempfile.mkdtemp(prefix="fi")
        self.addCleanup(shutil.rmtree, base)
        self.addCleanup(os.chdir, os.getcwd())

        async def go() -> None:
            for size in (longest, longest + 1, longest + 2):
                start = os.path.join(base, "d" * (size - len(base) - len("//fi.sock")))
                os.makedirs(start)
                os.chdir(start)
                options = Options()
                options.parseOptions(["--data-dir", "data", "--listen", "unix:fi.sock"])
                (listen,) = options["loaded"].listen
                self.assertEqual(len(os.fsencode(listen)) - len("unix:"), size)
                service = make_service(
                    options["loaded"], reactor, exit_on_failure=False, freeze_gc=False
                )
                await self.assert_serves_socket(service, os.path.join(start, "fi.sock"), size)

        return ensureDeferred(go())

    def test_make_service_entry_point(self) -> None:
        """The plugin's makeService builds the daemon's service with the global reactor."""
        options = Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--listen", "tcp:0"])
        self.patch(sys, "excepthook", sys.excepthook)  # makeService replaces it
        service = makeService(options)
        self.assertIsInstance(service, FederationInviteService)
        # SIGHUP (logrotate's postrotate, systemd's ExecReload) reopens twistd's log file.
        self.assertIs(service._on_hangup, reopen_log_file)


class StartErrorInOneLineTests(SynchronousTestCase):
    """Under twistd and twist a start's ConfigError (a port in use) ends the process: one
    line on stderr, not a traceback (tests/test_daemon.py runs it)."""

    def test_start_errors_in_one_line(self) -> None:
        """makeService replaces sys.excepthook once per process, with a hook that prints a
        ConfigError as one line on stderr and hands any other error to the hook before it."""
        handed_on: list[BaseException] = []
        self.patch(sys, "excepthook", lambda kind, value, tb: handed_on.append(value))
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        hooks = []
        for _ in range(2):
            options = Options()
            options.parseOptions(["--data-dir", self.mktemp(), "--listen", "tcp:0"])
            makeService(options)
            hooks.append(sys.excepthook)
        self.assertIs(hooks[0], hooks[1])
        error = ConfigError("configuration key 'listen': cannot listen on 'tcp:1': Address in use")
        sys.excepthook(ConfigError, error, None)
        self.assertEqual(
            stderr.getvalue(),
            "federation-invite could not start: configuration key 'listen': cannot listen on "
            "'tcp:1': Address in use\n",
        )
        other = ZeroDivisionError("a bug")
        sys.excepthook(ZeroDivisionError, other, None)
        self.assertEqual(handed_on, [other])


class MakeServiceRefusalTests(SynchronousTestCase):
    """What only makeService finds (the data directory, the key file) is one line naming the
    key, with exit status 1, as a bad value is; never a traceback."""

    def refusal(self, *argv: str) -> str:
        """Helper: makeService's SystemExit message for these options (status 1)."""
        options = Options()
        options.parseOptions(["--listen", "tcp:0", *argv])
        self.patch(sys, "argv", ["/venv/bin/twistd", "-n", "federation-invite"])
        error = self.assertRaises(SystemExit, makeService, options)
        self.assertIsInstance(error.code, str)
        message = str(error.code)
        self.assertTrue(message.startswith("twistd: configuration key "), message)
        self.assertNotIn("\n", message)
        return message

    def test_data_dir_is_a_file(self) -> None:
        """A data_dir that is a regular file is refused by name."""
        path = os.path.abspath(self.mktemp())
        FilePath(path).setContent(b"")
        message = self.refusal("--data-dir", path)
        self.assertIn(f"'data_dir': {path} exists and is not a directory", message)
        message = self.refusal("--data-dir", os.path.join(path, "sub", "data"))
        self.assertIn(f"'data_dir': {path} exists and is not a directory", message)

    def test_bad_signing_key_files(self) -> None:
        """A dangling symlink, a directory, an empty file or a malformed one as the signing
        key is refused naming signing_key and the file; the seed is never quoted."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "dir.key"))
        os.symlink(os.path.join(base, "missing"), os.path.join(base, "dangling.key"))
        FilePath(os.path.join(base, "empty.key")).setContent(b"")
        FilePath(os.path.join(base, "bad.key")).setContent(b"ed25519 a_1 SEEDSEEDSEED\n")
        for name, reason in (
            ("dangling.key", "cannot read signing key file"),
            ("dir.key", "cannot read signing key file"),
            ("empty.key", "no signing key in the file"),
            ("bad.key", "an ed25519 seed is 32 bytes"),
        ):
            path = os.path.join(base, name)
            message = self.refusal("--data-dir", base, "--signing-key", path)
            self.assertIn("'signing_key': ", message)
            self.assertIn(path, message)
            self.assertIn(reason, message)
            self.assertNotIn("SEEDSEED", message)

    def test_old_key_with_the_signing_key_id(self) -> None:
        """keys.old_verify_keys naming the key we sign with is refused before start too."""
        data_dir = os.path.abspath(self.mktemp())
        os.makedirs(data_dir)
        write_signing_key_file(os.path.join(data_dir, "signing.key"), generate_signing_key("a_1"))
        config = self.mktemp()
        FilePath(config).setContent(
            f"[keys]\nold_verify_keys = [{{key_id = 'ed25519:a_1', key = '{'A' * 43}', "
            "expired_ts = 5}]\n".encode()
        )
        message = self.refusal("--data-dir", data_dir, "--config", config)
        self.assertIn("'keys.old_verify_keys': entry 0 has key_id 'ed25519:a_1'", message)


class KeyFileModeTests(SynchronousTestCase):
    def load(self, mode: int, more_keys: int = 0, listed: int = 0) -> list[dict[str, object]]:
        """Helper: the warnings logged while make_service loads a key file of ``mode``
        (holding ``more_keys`` keys after the first, the first ``listed`` of them also
        configured under keys.old_verify_keys)."""
        from signedjson.key import encode_verify_key_base64, get_verify_key
        from twisted.internet.testing import MemoryReactor
        from twisted.logger import LogLevel, formatEvent, globalLogPublisher

        data_dir = os.path.abspath(self.mktemp())
        os.makedirs(data_dir)
        self.key_path = os.path.join(data_dir, "signing.key")
        write_signing_key_file(self.key_path, generate_signing_key("a_1"))
        with open(self.key_path) as handle:
            text = handle.read()
        seeds = [text.split()[2]]
        old_keys = []
        for index in range(more_keys):
            extra = self.mktemp()
            extra_key = generate_signing_key(f"b_{index}")
            if index < listed:
                public = encode_verify_key_base64(get_verify_key(extra_key))
                old_keys.append(
                    f"{{key_id = 'ed25519:b_{index}', key = '{public}', expired_ts = 5}}"
                )
            write_signing_key_file(extra, extra_key)
            with open(extra) as handle:
                line = handle.read()
            seeds.append(line.split()[2])
            with open(self.key_path, "a") as handle:
                handle.write(line)
        os.chmod(self.key_path, mode)
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        options = Options()
        config = self.mktemp()
        FilePath(config).setContent(f"[keys]\nold_verify_keys = [{', '.join(old_keys)}]\n".encode())
        options.parseOptions(["--data-dir", data_dir, "--listen", "tcp:0", "--config", config])
        make_service(options["loaded"], MemoryReactor(), exit_on_failure=False, freeze_gc=False)
        for event in events:
            for seed in seeds:
                self.assertNotIn(seed, formatEvent(event))
        return [event for event in events if event["log_level"] == LogLevel.warn]

    def test_key_open_to_others_warned_about(self) -> None:
        """A key file that group or others may read (or write) is loaded, with one warning
        naming the file and its mode, as ssh does; never its content."""
        from twisted.logger import formatEvent

        for mode in (0o640, 0o604, 0o620):
            (warning,) = self.load(mode)
            self.assertEqual(
                formatEvent(warning),
                f"Signing key file {self.key_path} has mode {mode:04o}: others than its owner "
                "may read or change it; chmod 600 it",
            )

    def test_further_keys_in_the_file_warned_about(self) -> None:
        """A key file holding several keys (Synapse's may) is used with its first key, with
        one warning naming the keys left unused and where they can go; never a seed."""
        from twisted.logger import formatEvent

        (warning,) = self.load(0o600, more_keys=2)
        self.assertEqual(
            formatEvent(warning),
            f"Signing key file {self.key_path} holds 3 keys: only the first, ed25519:a_1, signs"
            " and is published; not used: ed25519:b_0, ed25519:b_1 (list them under"
            " keys.old_verify_keys to keep verifying what they signed)",
        )

    def test_further_keys_listed_as_old_keys_not_warned_about(self) -> None:
        """Further keys of the file already listed under keys.old_verify_keys are not named as
        unused: only those not listed are, and with all listed there is no warning."""
        from twisted.logger import formatEvent

        (warning,) = self.load(0o600, more_keys=2, listed=1)
        self.assertEqual(
            formatEvent(warning),
            f"Signing key file {self.key_path} holds 3 keys: only the first, ed25519:a_1, signs"
            " and is published; not used: ed25519:b_1 (list them under keys.old_verify_keys"
            " to keep verifying what they signed)",
        )
        self.assertEqual(self.load(0o600, more_keys=2, listed=2), [])

    def test_private_key_file_not_warned_about(self) -> None:
        """A key file of mode 0600 (or 0400) loads without a warning."""
        self.assertEqual(self.load(0o600), [])
        self.assertEqual(self.load(0o400), [])


class _NotRunning:
    """A reactor proxy reporting it is not running, so a failed start does not stop trial's."""

    def __init__(self, reactor: object) -> None:
        self._reactor = reactor
        self.running = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._reactor, name)


class CommandLineTests(SynchronousTestCase):
    def test_twistd_and_twist_list_the_plugin(self) -> None:
        """Both `twistd --help` and `twist --help` list federation-invite (the install works)."""
        import subprocess
        import sys

        bin_dir = os.path.dirname(sys.executable)
        for command in ("twistd", "twist"):
            result = subprocess.run(
                [os.path.join(bin_dir, command), "--help"], capture_output=True, text=True
            )
            self.assertIn("federation-invite", result.stdout, command)
        result = subprocess.run(
            [os.path.join(bin_dir, "twist"), "federation-invite", "--help"],
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--server-name", result.stdout)

    def test_config_refusals_one_line_on_stderr(self) -> None:
        """Under twistd and twist, an unknown configuration key, a bad value (in the file or
        on the command line), an unreadable file, one that is not UTF-8 or (found by
        makeService) a data_dir that is a file prints one line on stderr naming it, nothing
        on stdout, and exits with status 1, as the README says."""
        import subprocess

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        unknown = os.path.join(directory, "unknown.toml")
        FilePath(unknown).setContent(b'server_name = "example.org"\nsever_name = "x"\n')
        bad = os.path.join(directory, "bad.toml")
        FilePath(bad).setContent(b"[ratelimit]\norigin_burst = 0\n")
        latin1 = os.path.join(directory, "latin1.toml")
        FilePath(latin1).setContent(b'server_name = "caf\xe9.example"\n')
        bin_dir = os.path.dirname(sys.executable)
        for command, prefix in (
            ([os.path.join(bin_dir, "twistd"), "-n", "--pidfile="], "twistd"),
            ([os.path.join(bin_dir, "twist")], "twist"),
        ):
            for args, expected in (
                (["-c", unknown], "unknown configuration key 'sever_name'"),
                (["-c", bad], "configuration key 'ratelimit.origin_burst': must be an integer"),
                (["--server-name", "a b"], "configuration key 'server_name': must be"),
                (["-c", os.path.join(directory, "missing.toml")], "cannot read config file"),
                (["-c", latin1], f"config file {latin1} is not UTF-8 (TOML must be): byte 0xe9"),
                (["--data-dir", bad, "--listen", "tcp:0"], "configuration key 'data_dir': "),
            ):
                result = subprocess.run(
                    [*command, "federation-invite", *args],
                    capture_output=True,
                    text=True,
                    cwd=directory,
                    timeout=60,
                )
                self.assertEqual(result.stdout, "", (prefix, args))
                self.assertEqual(result.returncode, 1, (prefix, args, result.stderr))
                line = result.stderr.rstrip("\n")
                self.assertNotIn("\n", line, (prefix, args))
                self.assertTrue(line.startswith(f"{prefix}: {expected}"), (prefix, line))
        self.assertEqual(sorted(os.listdir(directory)), ["bad.toml", "latin1.toml", "unknown.toml"])

    def test_twistd_rundir(self) -> None:
        """`twistd --rundir DIR` serves, with key and database in the starting directory's data dir."""
        import signal
        import subprocess
        import sys
        import time

        start, rundir = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        os.makedirs(start)
        os.makedirs(rundir)
        log_path = os.path.abspath(self.mktemp())

        def log() -> str:
            with open(log_path, "rb") as handle:
                return handle.read().decode(errors="replace")

        with open(log_path, "wb") as output:
            daemon = subprocess.Popen(
                [
                    os.path.join(os.path.dirname(sys.executable), "twistd"),
                    "-n",
                    "--pidfile=",
                    "--rundir",
                    rundir,
                    "federation-invite",
                    "--data-dir",
                    "data",
                    "--listen",
                    "tcp:0:interface=127.0.0.1",
                ],
                cwd=start,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 30
            while "listening on" not in log() and daemon.poll() is None:
                self.assertLess(time.monotonic(), deadline, log())
                time.sleep(0.05)
            self.assertIsNone(daemon.poll(), log())
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        files = os.listdir(os.path.join(start, "data"))
        self.assertIn("signing.key", files)
        self.assertIn("federation-invite.db", files)
        self.assertEqual(os.listdir(rundir), [])


class JSONLoggerTests(DaemonHarness):
    """The README's JSON-lines logging command, run as the README writes it."""

    timeout = 60
    twistd_options = ("--logger", "federation_invite.logs.json_observer")
    extra_config = (
        '[inbound]\nlocal_users = "any"\n'
        "[outbound]\nverify_tls = false\nip_allowlist = ['127.0.0.1/32']\n"
    )

    def test_json_observer_writes_one_json_object_per_line(self) -> Deferred[None]:
        """`twistd -n --logger federation_invite.logs.json_observer federation-invite -c FILE`
        starts, serves an invite, and stops on SIGTERM; everything it writes is one JSON event
        per line, the invite's outcome line with its fields."""
        from twisted.logger import eventFromJSON, formatEvent

        async def go() -> None:
            await self.start_daemon()
            event_id, path, body, header = self.signed_invite(invitee=f"@bob:{self.server_name}")
            code, answer = await self.put(path, body, header, persistent=False)
            self.assertEqual(code, 200, (answer, self.read_log()))
            await self.stop_daemon()
            lines = self.read_log().splitlines()
            events = []
            for line in lines:
                try:
                    event = eventFromJSON(line)
                except ValueError:
                    self.fail(f"not one JSON event: {line!r}")
                self.assertIsInstance(event, dict, line)
                self.assertIn("log_level", event, line)
                events.append(event)
            texts = [formatEvent(event) for event in events]
            self.assertIn("Server Shut Down.", texts)
            (invite,) = [event for event in events if event.get("event_id") == event_id]
            self.assertEqual(
                (invite["outcome"], invite["origin"], invite["invitee"], invite["peer"]),
                ("accepted", self.remote, f"@bob:{self.server_name}", "127.0.0.1"),
            )

        return ensureDeferred(go())


class _TwistdCommandLine(SynchronousTestCase):
    """makeService as twistd calls it, from a whole twistd command line."""

    def service_from(self, *argv: str) -> object:
        """makeService on what twistd parsed of ``argv`` (our options as its subcommand)."""
        from twisted.scripts.twistd import ServerOptions

        self.data_dir = os.path.abspath(self.mktemp())
        config = ServerOptions()
        config.parseOptions(
            [*argv, "federation-invite", "--data-dir", self.data_dir, "--listen", "tcp:0"]
        )
        self.patch(sys, "argv", ["/venv/bin/twistd", *argv, "federation-invite"])
        self.patch(sys, "excepthook", sys.excepthook)  # makeService replaces it
        return makeService(config.subOptions)


class PrivilegeSwitchTests(_TwistdCommandLine):
    """twistd's --uid/--gid cannot work: makeService creates the data directory and the
    key as the user twistd starts as, and the store is opened after the switch."""

    def test_another_uid_or_gid_refused(self) -> None:
        """--uid or --gid naming another user or group than twistd's own ends the process
        with one line saying what to do instead, before anything is created."""
        for argv in (["--uid", str(os.getuid() + 4321)], ["--gid", str(os.getgid() + 4321)]):
            error = self.assertRaises(SystemExit, self.service_from, *argv)
            self.assertEqual(
                error.code,
                "twistd: --uid and --gid are not supported (the data directory and the signing "
                "key would be created as this user, the database opened as the other): run "
                "twistd as the user to serve as (ports below 1024: a systemd: socket-activated "
                "endpoint, or a proxy)",
            )
            self.assertFalse(os.path.exists(self.data_dir), argv)

    def test_own_uid_and_gid_accepted(self) -> None:
        """--uid and --gid naming twistd's own user and group change nothing: accepted."""
        service = self.service_from("--uid", str(os.getuid()), "--gid", str(os.getgid()))
        self.assertIsInstance(service, FederationInviteService)


class JSONLoggerRefusalTests(_TwistdCommandLine):
    """twistd's --logger federation_invite.logs.json_observer writes to standard output:
    daemonized (no -n), that is /dev/null, and every line was lost; with --logfile, the file
    got nothing (twistd's --logger replaces it). Both are refused in one line."""

    observer = "federation_invite.logs.json_observer"

    def test_daemonized_or_with_a_log_file_refused(self) -> None:
        """Without -n, or with --logfile, one line says to run it with -n and without
        --logfile, before anything is created."""
        for argv in (
            ["--logger", self.observer],
            ["--logger", self.observer, "--logfile", "fi.log"],
            ["-n", "--logger", self.observer, "--logfile", "fi.log"],
        ):
            error = self.assertRaises(SystemExit, self.service_from, *argv)
            self.assertEqual(
                error.code,
                f"twistd: --logger {self.observer} writes to standard output, which a daemon "
                "sends to /dev/null and which replaces --logfile: run twistd with -n and "
                "without --logfile (a supervisor such as systemd keeps standard output)",
                argv,
            )
            self.assertFalse(os.path.exists(self.data_dir), argv)

    def test_in_the_foreground_accepted(self) -> None:
        """With -n (and --logfile - at most, standard output), it starts."""
        for argv in (
            ["-n", "--logger", self.observer],
            ["-n", "--logfile", "-", "--logger", self.observer],
        ):
            self.assertIsInstance(self.service_from(*argv), FederationInviteService)


class ReopenLogFileTests(SynchronousTestCase):
    """SIGHUP under twistd (``reopen_log_file``): the log file (--logfile) is reopened at
    its path, where logrotate's ``create`` mode has put a new file after moving the old
    one away; one line says so. Without a log file (-n: standard output), one line says
    there is nothing to reopen."""

    def observe(self, out: object) -> None:
        """Helper: log to ``out`` as twistd does (its observer, in the global publisher)."""
        from twisted.logger import globalLogPublisher, textFileLogObserver

        observer = textFileLogObserver(out)  # type: ignore[arg-type]
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def observed_log_file(self) -> tuple[str, LogFile]:
        """Helper: a log file in a directory of its own, observed as twistd's is."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "fi.log")
        logfile = LogFile.fromFullPath(path)
        self.addCleanup(logfile.close)
        self.observe(logfile)
        return path, logfile

    def test_log_file_reopened_at_its_path(self) -> None:
        from twisted.logger import Logger

        path, _ = self.observed_log_file()
        Logger().info("before the rotation")
        os.rename(path, path + ".1")  # logrotate: the file moved away, a new one created
        FilePath(path).setContent(b"")
        reopen_log_file()
        Logger().info("after the rotation")
        rotated = FilePath(path + ".1").getContent().decode()
        current = FilePath(path).getContent().decode().splitlines()
        self.assertIn("before the rotation", rotated)
        self.assertNotIn("after the rotation", rotated)
        self.assertNotIn("reopened", rotated)
        self.assertEqual(len(current), 2, current)
        self.assertTrue(
            current[0].endswith(
                f" [federation_invite.tap#info] SIGHUP: reopened the log file {path}"
            ),
            current[0],
        )
        self.assertTrue(current[1].endswith("after the rotation"), current[1])
        # The path gone (logrotate's nocreate): a file is created there.
        os.rename(path, path + ".2")
        reopen_log_file()
        self.assertIn("SIGHUP: reopened", FilePath(path).getContent().decode())

    def test_log_file_that_cannot_be_reopened_kept(self) -> None:
        """A path that cannot be opened now (its directory gone): the lines go on to the
        file opened before, the first of them saying why."""
        from twisted.logger import Logger

        path, _ = self.observed_log_file()
        directory = os.path.dirname(path)
        moved = directory + ".moved"
        os.rename(directory, moved)
        reopen_log_file()
        Logger().info("still logged")
        lines = FilePath(os.path.join(moved, "fi.log")).getContent().decode().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn(
            f"SIGHUP: could not reopen the log file {directory}/fi.log: No such file or "
            "directory; still logging to the file opened before",
            lines[0],
        )
        self.assertTrue(lines[1].endswith("still logged"), lines[1])

    def test_nothing_to_reopen_on_standard_output(self) -> None:
        out = io.StringIO()
        self.observe(out)
        reopen_log_file()
        (line,) = out.getvalue().splitlines()
        self.assertTrue(
            line.endswith(
                " [federation_invite.tap#info] SIGHUP: no log file to reopen (logging to "
                "standard output, syslog or a --logger observer)"
            ),
            line,
        )

    def observed_as_twist(self, out: object, log_format: str) -> Callable[[], None]:
        """Helper: log to ``out`` as twist does (``Runner.startLogging``): its file observer
        for ``--log-format`` in a ``FilteringLogObserver``, in the global publisher, until
        the call returned."""
        from twisted.logger import (
            FilteringLogObserver,
            LogLevelFilterPredicate,
            globalLogPublisher,
            jsonFileLogObserver,
            textFileLogObserver,
        )

        factory = {"json": jsonFileLogObserver, "text": textFileLogObserver}[log_format]
        observer = FilteringLogObserver(
            factory(out),  # type: ignore[arg-type]
            [LogLevelFilterPredicate()],
        )
        globalLogPublisher.addObserver(observer)
        # Removing an observer removed before does nothing.
        return lambda: globalLogPublisher.removeObserver(observer)

    def test_twist_log_file_reopened_at_its_path(self) -> None:
        """twist's --log-file FILE (a plain file it opens in append mode, JSON or text) is
        reopened at its path on SIGHUP, as twistd's --logfile is; a path that cannot be
        opened keeps the file opened before."""
        from twisted.logger import Logger

        for log_format in ("json", "text"):
            directory = os.path.abspath(self.mktemp())
            os.makedirs(directory)
            path = os.path.join(directory, "twist.log")
            out = open(path, "a")  # as twist's --log-file opens it
            self.addCleanup(out.close)
            stop = self.observed_as_twist(out, log_format)
            self.addCleanup(stop)
            Logger().info("before the rotation")
            os.rename(path, path + ".1")
            reopen_log_file()  # logrotate's create, or the path gone: created
            Logger().info("after the rotation")
            rotated = FilePath(path + ".1").getContent().decode()
            current = FilePath(path).getContent().decode()
            self.assertIn("before the rotation", rotated)
            self.assertNotIn("after the rotation", rotated)
            self.assertNotIn("SIGHUP", rotated)
            self.assertIn("SIGHUP: reopened the log file", current)
            self.assertIn(path, current)
            self.assertIn("after the rotation", current)
            self.assertLess(current.index("SIGHUP"), current.index("after the rotation"))
            # Its directory gone: the lines go on to the file opened before.
            moved = directory + ".moved"
            os.rename(directory, moved)
            reopen_log_file()
            Logger().info("still logged")
            kept = FilePath(os.path.join(moved, "twist.log")).getContent().decode()
            self.assertIn("SIGHUP: could not reopen the log file", kept)
            self.assertIn("still logged", kept)
            stop()

    def test_twist_standard_output_not_reopened(self) -> None:
        """twist logging to standard output or error (--log-file - or +, its default), even
        when it is a regular file (a supervisor's redirection): nothing to reopen, one line
        says so."""
        path = os.path.abspath(self.mktemp())
        for stream in ("stdout", "stderr"):
            out = open(path, "a")
            self.addCleanup(out.close)
            self.patch(sys, stream, out)
            stop = self.observed_as_twist(out, "json")
            reopen_log_file()
            stop()
            out.flush()
        content = FilePath(path).getContent().decode()
        self.assertEqual(content.count("SIGHUP: no log file to reopen"), 2, content)
        self.assertNotIn("SIGHUP: reopened", content)

    def rotated_log_file(self) -> tuple[str, LogFile]:
        """Helper: a log file observed as twistd's is, never written to, then moved away
        and a new file created at its path (logrotate's create mode)."""
        path, logfile = self.observed_log_file()
        os.rename(path, path + ".1")
        FilePath(path).setContent(b"")
        return path, logfile

    def test_log_file_never_written_to_reopened(self) -> None:
        """A log file nothing was written to yet (so without the lock Twisted creates at
        its first write) is reopened all the same."""
        path, logfile = self.rotated_log_file()
        self.assertNotIn("_threadable_lock", vars(logfile))
        reopen_log_file()
        self.assertEqual(FilePath(path + ".1").getContent(), b"")
        self.assertIn("SIGHUP: reopened the log file", FilePath(path).getContent().decode())

    def test_log_file_reopened_under_its_lock(self) -> None:
        """The file is reopened holding the lock its write and rotate hold: a thread
        logging meanwhile waits, rather than writing to the file being closed."""
        path, logfile = self.rotated_log_file()
        logfile.write("")  # Twisted creates the lock at the first write
        lock = vars(logfile)["_threadable_lock"]

        def free_elsewhere() -> bool:
            """Whether another thread can take the lock now."""
            free: list[bool] = []

            def try_lock() -> None:
                free.append(lock.acquire(blocking=False))
                if free[0]:
                    lock.release()

            other = threading.Thread(target=try_lock)
            other.start()
            other.join()
            return free[0]

        free_while_reopening: list[bool] = []
        original = logfile.reopen

        def reopen() -> None:
            free_while_reopening.append(free_elsewhere())
            original()

        logfile.reopen = reopen  # type: ignore[method-assign]
        reopen_log_file()
        self.assertEqual(free_while_reopening, [False])
        self.assertTrue(free_elsewhere())  # released
        self.assertIn("SIGHUP: reopened the log file", FilePath(path).getContent().decode())


class _FakeResource:
    """A stand-in for the ``resource`` module: RLIMIT_NOFILE's limits, setrlimit recorded."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse
        self.set: list[tuple[int, tuple[int, int]]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.set.append((which, limits))
        self.limits = limits


class OpenFileLimitTests(SynchronousTestCase):
    """The daemon raises its soft RLIMIT_NOFILE to the hard limit at start, as Synapse does:
    each outbound request in flight holds a socket, and 1024 (systemd's soft default) is
    soon reached by a bridge's burst of invites."""

    def capture(self) -> list[dict[str, object]]:
        from twisted.logger import globalLogPublisher

        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def limit_lines(self, events: list[dict[str, object]]) -> list[str]:
        from twisted.logger import formatEvent

        return [line for line in map(formatEvent, events) if "RLIMIT_NOFILE" in line]

    def test_make_service_raises_the_soft_limit_to_the_hard_one(self) -> None:
        """makeService (twistd, twist) sets the soft limit to the hard one and logs it once."""
        import federation_invite.tap as tap

        fake = _FakeResource(1024, 524288)
        self.patch(tap, "resource", fake)
        events = self.capture()
        options = Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--listen", "tcp:0"])
        self.patch(sys, "excepthook", sys.excepthook)  # makeService replaces it
        makeService(options)
        self.assertEqual(fake.set, [(fake.RLIMIT_NOFILE, (524288, 524288))])
        self.assertEqual(
            self.limit_lines(events),
            ["Open file limit (RLIMIT_NOFILE) raised from 1024 to 524288"],
        )

    def test_limit_already_at_the_hard_one_or_refused(self) -> None:
        """A soft limit already at the hard one is only logged; one the system refuses to
        raise is logged as a warning, the start going on; no resource module (Windows):
        nothing."""
        from federation_invite.tap import raise_open_file_limit

        events = self.capture()
        same = _FakeResource(4096, 4096)
        raise_open_file_limit(same)
        self.assertEqual(same.set, [])
        refused = _FakeResource(1024, _FakeResource.RLIM_INFINITY, refuse=True)
        raise_open_file_limit(refused)
        self.assertEqual(refused.limits, (1024, -1))
        self.assertEqual(
            self.limit_lines(events),
            [
                "Open file limit (RLIMIT_NOFILE): 4096",
                "Open file limit (RLIMIT_NOFILE) left at 1024: raising it to unlimited"
                " failed: not allowed",
            ],
        )

    def test_real_limit_raised_in_a_subprocess(self) -> None:
        """With the real resource module (in a child process, whose soft limit is set to 256
        first), the soft limit ends at the hard one."""
        import subprocess

        code = (
            "import resource\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
            "from federation_invite.tap import raise_open_file_limit\n"
            "raise_open_file_limit()\n"
            "print(resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        self.assertEqual(result.stdout.strip(), "True", result.stderr)
