"""Tests for ``federation-invite send-invite`` (real SQLite and reactor, in-memory peers)."""

from __future__ import annotations

import io
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from federation_invite.cli import build_parser, run_async
from federation_invite.client import FederationClient
from federation_invite.client.testing import FakePeersAgent
from federation_invite.config import ConfigError
from federation_invite.core.events import compute_event_id, room_id_for_create_event
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
from federation_invite.core.signing import verify_event_signature
from federation_invite.outbound import InvalidInviteAnswer
from federation_invite.service import FederationInvite
from federation_invite.signingkey import load_or_create_signing_key
from federation_invite.store import open_store

from .support import local_verify_key
from .test_outbound import ALICE, BOB, OURS, PEER, FakePeer


class SendInviteCommandTests(TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "federation-invite.toml")
        with open(self.config, "w") as handle:
            handle.write(f'server_name = "{OURS}"\ndata_dir = "{self.dir}"\n')
        self.key, _ = load_or_create_signing_key(os.path.join(self.dir, "signing.key"))
        self.peer = FakePeer(reactor)  # type: ignore[arg-type]
        self.agent = FakePeersAgent({PEER: self.peer.root})

    async def run_cli(self, *argv: str) -> tuple[int, str]:
        """Exit status and output: the JSON on stdout, or the one error line on stderr."""
        out, err = io.StringIO(), io.StringIO()
        args = build_parser().parse_args(["send-invite", *argv, "-c", self.config])
        self.assertIsNone(args.federation_client)
        args.federation_client = FederationClient(reactor, OURS, self.key, agent=self.agent)
        code = await run_async(args, out, reactor, err)
        if code == 0:
            self.assertEqual(err.getvalue(), "")
            return code, out.getvalue()
        self.assertEqual(out.getvalue(), "", "errors go to stderr, not to the JSON on stdout")
        return code, err.getvalue()

    def check_printed(self, out: str, room_version: str) -> dict[str, Any]:
        """The printed JSON is the event both servers signed, with its IDs."""
        printed = json.loads(out)
        version = KNOWN_ROOM_VERSIONS[room_version]
        event = printed["event"]
        self.assertEqual(printed["room_version"], room_version)
        self.assertEqual(printed["event_id"], compute_event_id(version, event))
        self.assertEqual(printed["room_id"], event["room_id"])
        self.assertEqual((event["sender"], event["state_key"]), (ALICE, BOB))
        keys = {
            (OURS, "ed25519:" + self.key.version): local_verify_key(OURS, self.key),
            (PEER, "ed25519:peer1"): local_verify_key(PEER, self.peer.key),
        }
        verify_event_signature(version, event, OURS, keys)
        verify_event_signature(version, event, PEER, keys)
        return printed

    def test_success(self) -> Deferred[None]:
        """A v10 invite (the default) is sent, co-signed, printed as JSON; exit status 0."""

        async def go() -> None:
            code, out = await self.run_cli("--sender", ALICE, "--invitee", BOB)
            self.assertEqual(code, 0, out)
            printed = self.check_printed(out, "10")
            self.assertEqual(self.peer.received[0][2]["event"]["room_id"], printed["room_id"])
            # The peer's key was fetched through the keyring and kept in the database.
            store = await open_store(f"sqlite:///{self.dir}/federation-invite.db", reactor=reactor)
            try:
                self.assertIn("ed25519:peer1", await store.get_server_keys(PEER))
            finally:
                await store.close()

        return ensureDeferred(go())

    def test_v12_builds_the_room(self) -> Deferred[None]:
        """v12: a create event is built and sent in invite_room_state; the room ID is its hash."""

        async def go() -> None:
            code, out = await self.run_cli(
                "--room-version", "12", "--sender", ALICE, "--invitee", BOB
            )
            self.assertEqual(code, 0, out)
            printed = self.check_printed(out, "12")
            [create] = self.peer.received[0][2]["invite_room_state"]
            self.assertEqual(
                room_id_for_create_event(KNOWN_ROOM_VERSIONS["12"], create), printed["room_id"]
            )

        return ensureDeferred(go())

    def test_room_and_destination(self) -> Deferred[None]:
        """--room chooses the room (v1-11), --destination the server; v1 rooms fall back to v1."""

        async def go() -> None:
            self.peer.canned[2] = (404, b"<html>Not Found</html>")
            self.agent.add_peer("alias.example", self.peer.root)
            code, out = await self.run_cli(
                "--room-version", "1", "--room", "!test:origin.example",
                "--sender", ALICE, "--invitee", BOB, "--destination", "alias.example",
            )  # fmt: skip
            self.assertEqual(code, 0, out)
            self.assertEqual(self.check_printed(out, "1")["room_id"], "!test:origin.example")
            self.assertEqual([api for api, _, _ in self.peer.received], [2, 1])
            self.assertTrue(self.agent.requests[0][1].startswith(b"https://alias.example/"))

        return ensureDeferred(go())

    def test_refused(self) -> Deferred[None]:
        """A refusal prints "refused: <status> <errcode>: <message>", exit status 1."""

        async def go() -> None:
            self.peer.canned[2] = (403, {"errcode": "M_FORBIDDEN", "error": "User cannot invite"})
            self.assertEqual(
                await self.run_cli("--sender", ALICE, "--invitee", BOB),
                (1, "refused: 403 M_FORBIDDEN: User cannot invite\n"),
            )
            self.peer.canned[2] = (404, b"<html>Not Found</html>")
            self.assertEqual(
                await self.run_cli("--sender", ALICE, "--invitee", BOB),
                (1, "refused: 404 (no errcode): HTTP 404 Not Found: body is not JSON\n"),
            )

        return ensureDeferred(go())

    def test_peer_chosen_text_escaped(self) -> Deferred[None]:
        """The peer's words reach the operator's terminal escaped, on the one line: its
        refusal's error text, and an InviteError's description (which may quote its answer),
        control characters shown as \\x1b, \\r and \\n (printed raw, an ESC[2J would clear the
        screen and a CR LF forge the next line)."""

        async def go() -> None:
            self.peer.canned[2] = (403, {"errcode": "M_FORBIDDEN", "error": "no\x1b[2J\r\nFORGED"})
            self.assertEqual(
                await self.run_cli("--sender", ALICE, "--invitee", BOB),
                (1, "refused: 403 M_FORBIDDEN: no\\x1b[2J\\r\\nFORGED\n"),
            )

            async def invalid(*args: object, **kwargs: object) -> dict[str, Any]:
                raise InvalidInviteAnswer(PEER, "the answer's sender is '\x1b[2J\r\nFORGED'")

            self.patch(FederationInvite, "send_invite", invalid)
            self.assertEqual(
                await self.run_cli("--sender", ALICE, "--invitee", BOB),
                (1, f"invalid answer from {PEER}: the answer's sender is "
                    "'\\x1b[2J\\r\\nFORGED'\n"),
            )  # fmt: skip

        return ensureDeferred(go())

    def test_invalid_answer_and_not_sendable(self) -> Deferred[None]:
        """Other failures print their one-line description, exit status 1."""

        async def go() -> None:
            self.peer.sign = False
            self.assertEqual(
                await self.run_cli("--sender", ALICE, "--invitee", BOB),
                (1, f"invalid answer from {PEER}: the answer carries no signature by {PEER}\n"),
            )
            code, out = await self.run_cli(
                "--room-version", "12", "--room", "!x:y", "--sender", ALICE, "--invitee", BOB
            )
            self.assertEqual(code, 1)
            self.assertEqual(
                out,
                "invite not sent: in room version 12 the room ID is the create event's hash: "
                "it cannot be chosen\n",
            )
            self.assertEqual(len(self.peer.received), 1)

        return ensureDeferred(go())

    def test_bad_options(self) -> Deferred[None]:
        """A sender not on our server, or an unknown room version, is a usage error: a
        ConfigError (cli.main prints it on one line, exit status 1) saying what is wrong, the
        room versions known listed."""

        async def go() -> None:
            with self.assertRaises(ConfigError) as raised:
                await self.run_cli("--sender", "@eve:evil.example", "--invitee", BOB)
            self.assertEqual(
                str(raised.exception),
                f"'@eve:evil.example' is not a user ID on this server ({OURS})",
            )
            with self.assertRaises(ConfigError) as raised:
                await self.run_cli("--room-version", "99", "--sender", ALICE, "--invitee", BOB)
            known = ", ".join(KNOWN_ROOM_VERSIONS)
            self.assertEqual(str(raised.exception), f"unknown room version '99' (known: {known})")
            self.assertIn("1, 2, ", known)
            self.assertEqual(self.peer.received, [])

        return ensureDeferred(go())


class SendInviteInterruptTests(TestCase):
    def test_sigint_while_waiting_for_the_peer(self) -> None:
        """Ctrl-C while send-invite waits for the peer's answer is reported as an interrupt
        (one line, exit status 130), not as the connection loss it causes, which blamed the
        peer ("cannot reach ...: Connection lost", exit status 1)."""
        import signal
        import socket
        import subprocess
        import time

        from .daemon_harness import BIN

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "federation-invite.toml")
        with open(config, "w") as handle:
            handle.write(
                f'server_name = "{OURS}"\ndata_dir = "{directory}"\n'
                '[outbound]\nverify_tls = false\nip_allowlist = ["127.0.0.1/32"]\n'
            )
        # A peer that accepts the connection and never answers.
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(30)
        port = listener.getsockname()[1]
        process = subprocess.Popen(
            [
                os.path.join(BIN, "federation-invite"),
                "send-invite",
                "--sender",
                ALICE,
                "--invitee",
                f"@bob:127.0.0.1:{port}",
                "-c",
                config,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        connection, _ = listener.accept()
        self.addCleanup(connection.close)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, err = process.communicate(timeout=30)
        self.assertEqual(
            (process.returncode, out, err), (130, b"", b"federation-invite: interrupted\n")
        )
        self.assertLess(time.monotonic() - sent, 5)
