"""The real daemon as a user runs it: ``twistd -n federation-invite`` in a subprocess.

A fake remote server (TLS on loopback, in this process) publishes its key; the
daemon fetches it, accepts and co-signs a signed invite for a local user,
``federation-invite invites list`` shows it, and it survives SIGTERM and a restart.
"""

from __future__ import annotations

import json

import treq
from twisted.internet.defer import Deferred, ensureDeferred

from federation_invite.core.keys import decode_verify_key
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
from federation_invite.core.signing import ServerVerifyKey, verify_event_signature

from .daemon_harness import DaemonHarness


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
