"""Synapse invites a user of ours: its client API, its federation sender, our daemon.

A Synapse user creates a room and invites one of our users; Synapse must see
success, our store must hold the invite signed by both servers, and the room's
state on Synapse must show it. Refusals (unknown user, our policy, a denied
server) must reach Synapse's client as errors, with nothing stored here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred

from federation_invite.core.events import compute_event_id
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS

from ._cases import InteropCase
from ._harness import SynapseServer


class SynapseInvitesUsTests(InteropCase):
    """Invites from Synapse's client API to our daemon, per room version."""

    async def invite_from_synapse(self, room_version: str) -> None:
        await self.require_room_version(room_version)
        alice = await self.synapse.user("alice")
        bob = self.ours("bob")
        room_id = await self.synapse.create_room(alice, room_version)

        code, answer = await self.synapse.invite(alice, room_id, bob)
        self.assertEqual((code, answer), (200, {}), self.logs())

        (record,) = self.daemon.invites(room_id)
        self.assertEqual(
            (record["invitee"], record["sender"], record["origin"], record["room_version"]),
            (bob, alice.user_id, self.synapse.server_name, room_version),
        )
        self.assertEqual(record["status"], "pending")
        # Synapse 1.163 sends the room's state as full PDUs (MSC4311), the create event first.
        self.assertIn("m.room.create", [e.get("type") for e in record["invite_room_state"]])
        event = record["event"]
        self.assertEqual(
            compute_event_id(KNOWN_ROOM_VERSIONS[room_version], event), record["event_id"]
        )
        await self.assert_signed_by_both(room_version, event)

        member = await self.synapse.member_state(alice, room_id, bob)
        self.assertIsNotNone(member, f"Synapse's room state has no member event for {bob}")
        self.assertEqual(member["content"]["membership"], "invite")
        self.assertEqual(member["event_id"], record["event_id"])
        self.assertEqual(member["sender"], alice.user_id)

    def test_room_version_1(self) -> Deferred[None]:
        """Room version 1 (own event IDs): accepted, co-signed, stored, shown by Synapse."""
        return ensureDeferred(self.invite_from_synapse("1"))

    def test_room_version_5(self) -> Deferred[None]:
        """Room version 5 (key validity enforced): accepted, co-signed, stored, shown."""
        return ensureDeferred(self.invite_from_synapse("5"))

    def test_room_version_9(self) -> Deferred[None]:
        """Room version 9: accepted, co-signed, stored, shown by Synapse."""
        return ensureDeferred(self.invite_from_synapse("9"))

    def test_room_version_10(self) -> Deferred[None]:
        """Room version 10 (strict integers): accepted, co-signed, stored, shown."""
        return ensureDeferred(self.invite_from_synapse("10"))

    def test_room_version_11(self) -> Deferred[None]:
        """Room version 11 (v11 redaction, no creator): accepted, co-signed, stored, shown."""
        return ensureDeferred(self.invite_from_synapse("11"))

    def test_room_version_12(self) -> Deferred[None]:
        """Room version 12 (room ID from the create event): accepted, co-signed, stored, shown."""
        return ensureDeferred(self.invite_from_synapse("12"))


class RefusalMixin:
    """Synapse's client gets our refusal as an error, promptly; we store nothing."""

    async def assert_refused(
        self: Any, invitee: str, expected: tuple[int, str], inviter: str = "alice"
    ) -> None:
        user = await self.synapse.user(inviter)
        room_id = await self.synapse.create_room(user, "10")
        started = time.monotonic()
        code, answer = await self.synapse.invite(user, room_id, invitee)
        elapsed = time.monotonic() - started
        self.assertEqual(
            (code, answer.get("errcode") if isinstance(answer, dict) else answer),
            expected,
            f"{answer!r}{self.logs()}",
        )
        self.assertLess(elapsed, 20.0, "the refusal took too long to reach Synapse's client")
        self.assertEqual(self.daemon.invites(room_id), [])
        self.assertIsNone(await self.synapse.member_state(user, room_id, invitee))


class RefusalTests(RefusalMixin, InteropCase):
    """Our refusals cross the wire intact."""

    def test_unknown_user(self) -> Deferred[None]:
        """An invite to a user we do not have: Synapse's client gets our 404 M_NOT_FOUND."""
        return ensureDeferred(self.assert_refused(self.ours("nobody"), (404, "M_NOT_FOUND")))

    def test_blocked_by_the_invitees_rule(self) -> Deferred[None]:
        """carol blocks every server: Synapse's client gets our 403 M_INVITE_BLOCKED."""

        async def go() -> None:
            carol = self.ours("carol")
            rules = self.daemon.cli("rules", "list", carol).stdout
            if "block" not in rules:
                self.daemon.cli_ok("rules", "add", carol, "--server", "*", "--action", "block")
            await self.assert_refused(carol, (403, "M_INVITE_BLOCKED"))

        return ensureDeferred(go())

    def test_sender_denied_by_our_policy(self) -> Deferred[None]:
        """A sender in ``inbound.user_deny``: Synapse's client gets our 403 M_FORBIDDEN."""
        return ensureDeferred(
            self.assert_refused(self.ours("bob"), (403, "M_FORBIDDEN"), inviter="mallory")
        )


class DeniedServerTests(RefusalMixin, InteropCase):
    """A daemon whose ``inbound.server_deny`` names the Synapse."""

    daemon_name = "denies-synapse"
    local_users = ("bob",)

    def daemon_settings(self, synapse: SynapseServer) -> Mapping[str, Mapping[str, Any]]:
        settings = dict(super().daemon_settings(synapse))
        settings["inbound"] = {"server_deny": [synapse.server_name]}
        return settings

    def test_denied_server(self) -> Deferred[None]:
        """Synapse is denied: its client gets our 403 M_FORBIDDEN, nothing is stored."""
        return ensureDeferred(self.assert_refused(self.ours("bob"), (403, "M_FORBIDDEN")))
