"""The real daemon as a user runs it: ``twistd -n federation-invite`` in a subprocess.

A fake remote server (TLS on loopback, in this process) publishes its key; the
daemon fetches it, accepts and co-signs a signed invite for a local user,
``federation-invite invites list`` shows it, and it survives SIGTERM and a restart.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import treq
from twisted.internet.defer import Deferred, ensureDeferred

from federation_invite.core.keys import decode_verify_key
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
from federation_invite.core.signing import ServerVerifyKey, verify_event_signature

from .daemon_harness import BIN, DaemonHarness, free_port


class DaemonTests(DaemonHarness):
    timeout = 120
    extra_config = "[outbound]\nverify_tls = false\nip_allowlist = ['127.0.0.1/32']\n"

    def test_invite_through_the_daemon_and_restart(self) -> Deferred[None]:
        """Keys published, a signed invite co-signed and stored, listed by the CLI, kept across restarts."""

        async def go() -> None:
            self.cli("users", "add", f"@bob:{self.server_name}")
            await self.start_daemon()
            response = await treq.get(self.url("/_matrix/key/v2/server"), persistent=False)
            keys = json.loads(await response.content())
            self.assertEqual(keys["server_name"], self.server_name)
            event_id, path, body, header = self.signed_invite(invitee=f"@bob:{self.server_name}")
            code, answer = await self.put(path, body, header, persistent=False)
            self.assertEqual(code, 200, (answer, self.read_log()))
            cosigned = answer["event"]
            ((key_id, entry),) = keys["verify_keys"].items()
            our_key = ServerVerifyKey(
                self.server_name, key_id, decode_verify_key(key_id, entry["key"]), 2**53 - 1
            )
            verify_event_signature(
                KNOWN_ROOM_VERSIONS["10"],
                cosigned,
                self.server_name,
                {(self.server_name, key_id): our_key},
            )
            listed = self.stored()
            self.assertEqual(
                [(r["event_id"], r["status"]) for r in listed], [(event_id, "pending")]
            )
            self.assertEqual(listed[0]["event"], cosigned)

            await self.stop_daemon()
            await self.start_daemon()
            self.assertEqual([r["event_id"] for r in self.stored()], [event_id])
            code, again = await self.put(path, body, header, persistent=False)
            self.assertEqual((code, again), (200, answer))
            self.assertIn("Loaded signing key", self.read_log())

        return ensureDeferred(go())


class FailedStartTests(DaemonHarness):
    timeout = 60
    extra_config = 'database = "sqlite:////nonexistent/directory/x.db"\n'

    def test_failed_start_exits_non_zero(self) -> None:
        """A daemon that cannot open its database exits with status 1 (not a silent hang)."""
        import os
        import subprocess

        from .daemon_harness import BIN

        # The config's extra line comes after listen; TOML allows top-level keys only
        # before any table, which holds here (no tables in this config).
        result = subprocess.run(
            [
                os.path.join(BIN, "twistd"),
                "-n",
                "--pidfile=",
                "federation-invite",
                "-c",
                self.config,
            ],
            capture_output=True,
            timeout=30,
            cwd=self.dir,
        )
        self.assertEqual(result.returncode, 1, result.stdout[-2000:])
        self.assertIn(b"could not start", result.stdout)


class FailedStartPidfileTests(DaemonHarness):
    """What a supervisor sees of a start that fails, with ``twistd -n`` and daemonized
    (``--pidfile`` in the test's directory): exit status 1 where it can be seen, and no
    pidfile left behind; a failure found at once (a port in use) is one line, and a
    daemon's launcher reports it."""

    timeout = 90

    def setUp(self) -> None:
        super().setUp()
        self.pidfile = os.path.join(self.dir, "twistd.pid")
        self.logfile = os.path.join(self.dir, "daemon.log")
        self.addCleanup(self.kill_daemonized)

    def kill_daemonized(self) -> None:
        """A daemonized twistd still running at the end (a failed test): killed."""
        try:
            with open(self.pidfile) as handle:
                os.kill(int(handle.read()), signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def occupy_port(self) -> None:
        busy = socket.socket()
        busy.bind(("127.0.0.1", self.port))
        busy.listen()
        self.addCleanup(busy.close)

    def twistd(self, *args: str, daemonize: bool = False) -> subprocess.CompletedProcess[str]:
        """Run twistd with our pidfile (and, daemonized, our log file); its result."""
        options = ["--logfile", self.logfile] if daemonize else ["-n"]
        command = [os.path.join(BIN, "twistd"), *options, "--pidfile", self.pidfile]
        return subprocess.run(
            [*command, "federation-invite", "-c", self.config, *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=self.dir,
        )

    def daemon_log_once_pidfile_gone(self, ending: str = "could not start: ") -> str:
        """The daemonized process's log, once it has removed its pidfile and logged ``ending``.

        The launcher may return before the daemon has written its pidfile (a failure
        reported through twistd's pipe), so a missing pidfile alone does not mean the
        daemon has ended: wait for its last line as well.
        """
        deadline = time.monotonic() + 30
        while True:
            gone = not os.path.exists(self.pidfile)
            try:
                with open(self.logfile) as handle:
                    log = handle.read()
            except FileNotFoundError:
                log = ""
            if gone and ending in log:
                return log
            self.assertLess(time.monotonic(), deadline, f"the daemon has not ended: {log}")
            time.sleep(0.05)

    def test_port_in_use(self) -> None:
        """twistd -n: status 1, no pidfile, one log line saying why and no traceback."""
        self.occupy_port()
        result = self.twistd()
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertFalse(os.path.exists(self.pidfile))
        (line,) = [line for line in output.splitlines() if "could not start" in line]
        self.assertTrue(
            line.endswith(
                "federation-invite could not start: configuration key 'listen': cannot listen "
                f"on 'tcp:{self.port}:interface=127.0.0.1': Address already in use"
            ),
            line,
        )
        self.assertNotIn("Traceback", output)

    def test_port_in_use_daemonized(self) -> None:
        """Daemonized: the launcher exits with status 1 and says why; the daemon removes its
        pidfile and logs one line, no traceback."""
        self.occupy_port()
        result = self.twistd(daemonize=True)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("An error has occurred", result.stderr)
        self.assertIn("cannot listen on", result.stderr)
        log = self.daemon_log_once_pidfile_gone()
        self.assertEqual(log.count("federation-invite could not start: "), 1, log)
        self.assertIn("Address already in use", log)
        self.assertNotIn("Traceback", log)

    def test_database_failure(self) -> None:
        """A database that cannot be opened (found after the start, asynchronously), twistd
        -n: status 1 and the pidfile removed."""
        result = self.twistd("--database", "sqlite:////nonexistent/directory/x.db")
        self.assertEqual(result.returncode, 1, result.stdout[-2000:])
        self.assertIn("could not start", result.stdout)
        self.assertFalse(os.path.exists(self.pidfile))

    def test_database_failure_daemonized(self) -> None:
        """Daemonized, a database that cannot be opened is found after the launcher has
        exited with status 0 (twistd tells it once the service has started); the daemon
        logs why and removes its pidfile."""
        result = self.twistd("--database", "sqlite:////nonexistent/directory/x.db", daemonize=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        log = self.daemon_log_once_pidfile_gone()
        self.assertIn("could not start", log)


class HangupTests(DaemonHarness):
    """SIGHUP, as logrotate's usual ``postrotate kill -HUP`` or systemd's ExecReload send
    it, to the daemonized twistd (``--logfile``, ``--pidfile``): it ended the process at
    once (no drain, no shutdown line, its pidfile left); it now reopens the log file."""

    timeout = 90

    def wait_for(self, path: str, text: str) -> str:
        """The file at ``path`` once it holds ``text`` (30 s at most)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                with open(path, "rb") as handle:
                    content = handle.read().decode(errors="replace")
            except FileNotFoundError:
                content = ""
            if text in content:
                return content
            self.assertLess(time.monotonic(), deadline, f"no {text!r} in {path}: {content}")
            time.sleep(0.05)

    def start_daemonized(self, *options: str) -> tuple[int, str, str]:
        """twistd daemonized with ``--pidfile`` and ``--logfile`` in the test's directory
        (and the plugin's ``options``), once listening: its PID, pidfile and log file."""
        pidfile = os.path.join(self.dir, "fi.pid")
        logfile = os.path.join(self.dir, "fi.log")
        result = subprocess.run(
            [
                os.path.join(BIN, "twistd"),
                "--pidfile",
                pidfile,
                "--logfile",
                logfile,
                "federation-invite",
                "-c",
                self.config,
                *options,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=self.dir,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.wait_for(pidfile, "")
        with open(pidfile) as handle:
            pid = int(handle.read())

        def kill() -> None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        self.addCleanup(kill)
        self.wait_for(logfile, "listening on")
        return pid, pidfile, logfile

    def test_hangup_reopens_the_log_file_and_the_daemon_goes_on(self) -> None:
        """After logrotate's ``create`` (the file moved away, a new one created) and a
        SIGHUP, the daemon logs one line saying it reopened the file, in the new file, and
        goes on; a SIGTERM then drains and stops it as usual, in the new file, and its
        pidfile is removed."""
        pid, pidfile, logfile = self.start_daemonized()
        os.rename(logfile, logfile + ".1")
        open(logfile, "w").close()
        os.kill(pid, signal.SIGHUP)
        reopened = self.wait_for(logfile, "SIGHUP: reopened the log file")
        self.assertEqual(len(reopened.splitlines()), 1, reopened)
        self.assertTrue(
            reopened.rstrip("\n").endswith(f"SIGHUP: reopened the log file {logfile}"), reopened
        )
        os.kill(pid, 0)  # still running
        os.kill(pid, signal.SIGTERM)
        log = self.wait_for(logfile, "Server Shut Down.")
        self.assertIn("Stopping: no longer accepting connections", log)
        deadline = time.monotonic() + 30
        while os.path.exists(pidfile):
            self.assertLess(time.monotonic(), deadline, "the pidfile was not removed")
            time.sleep(0.05)
        with open(logfile + ".1") as handle:
            self.assertNotIn("SIGHUP", handle.read())

    def test_hangup_reloads_the_tls_certificate(self) -> None:
        """An ssl: listener's key and certificate renewed (new files renamed over the old,
        as a certbot deploy hook does), the log file rotated, then SIGHUP: the new log file
        says the log file was reopened, then that the listener reloaded its certificate
        (serial, notAfter), and a new connection gets the new certificate."""
        import ssl

        from cryptography import x509

        from federation_invite.tlscert import write_self_signed_certificate

        key_path, cert_path = (os.path.join(self.dir, name) for name in ("tls.key", "tls.crt"))
        write_self_signed_certificate("localhost", key_path, cert_path)
        port = free_port()
        listen = f"ssl:{port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
        pid, _, logfile = self.start_daemonized("--listen", listen)

        def certificate_in(path: str) -> x509.Certificate:
            with open(path, "rb") as handle:
                return x509.load_pem_x509_certificate(handle.read())

        def served() -> x509.Certificate:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                with context.wrap_socket(sock) as tls:
                    der = tls.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der)

        before = certificate_in(cert_path)
        self.assertEqual(served(), before)
        renewed_key, renewed_cert = key_path + ".new", cert_path + ".new"
        write_self_signed_certificate("localhost", renewed_key, renewed_cert)
        os.replace(renewed_key, key_path)
        os.replace(renewed_cert, cert_path)
        after = certificate_in(cert_path)
        self.assertNotEqual(after.serial_number, before.serial_number)
        os.rename(logfile, logfile + ".1")
        open(logfile, "w").close()
        os.kill(pid, signal.SIGHUP)
        lines = self.wait_for(logfile, "Reloaded TLS").splitlines()
        not_after = after.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].endswith(f"SIGHUP: reopened the log file {logfile}"), lines)
        self.assertTrue(
            lines[1].endswith(
                f"Reloaded TLS for listener {listen!r}: certificate {cert_path}, serial "
                f"{after.serial_number:X}, notAfter {not_after}"
            ),
            lines,
        )
        self.assertEqual(served(), after)
        os.kill(pid, signal.SIGTERM)
        self.wait_for(logfile, "Server Shut Down.")
