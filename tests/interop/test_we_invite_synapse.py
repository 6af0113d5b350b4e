"""We invite a Synapse user: ``federation-invite send-invite`` against the real Synapse.

Synapse accepts an invite into a room it does not know only if it can verify
the event: it fetches our keys from our daemon (``/_matrix/key/v2/server``) to
check the sender's signature, validates the ``invite_room_state`` PDUs it is
given, co-signs, and persists the invite as an out-of-band membership, which its
user then sees in ``/sync``.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from twisted.internet.defer import Deferred, ensureDeferred

from federation_invite.core.events import compute_event_id
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS

from ._cases import InteropCase


class WeInviteSynapseTests(InteropCase):
    """Invites from our ``send-invite`` command to a Synapse user, per room version."""

    async def invite_to_synapse(self, room_version: str) -> None:
        await self.require_room_version(room_version)
        sender = self.ours("alice")
        dave = await self.synapse.user("dave")
        since = await self.synapse.sync_token(dave)
        result = self.daemon.cli(
            "send-invite",
            "--room-version",
            room_version,
            "--sender",
            sender,
            "--invitee",
            dave.user_id,
        )
        self.assertEqual(result.returncode, 0, f"{result.stdout}\n{result.stderr}{self.logs()}")
        answer = json.loads(result.stdout)
        event = answer["event"]
        room_id = answer["room_id"]
        version = KNOWN_ROOM_VERSIONS[room_version]
        self.assertEqual(
            (answer["room_version"], event["room_id"], event["state_key"], event["sender"]),
            (room_version, room_id, dave.user_id, sender),
        )
        self.assertEqual(compute_event_id(version, event), answer["event_id"])
        # Synapse co-signed, and the event carries our signature too.
        await self.assert_signed_by_both(room_version, event)

        invite = await self.synapse.sync_invite(dave, since, room_id)
        self.assertIsNotNone(invite, f"{room_id} not in {dave.user_id}'s /sync{self.logs()}")
        members = [
            e
            for e in invite["invite_state"]["events"]
            if e["type"] == "m.room.member" and e["state_key"] == dave.user_id
        ]
        self.assertEqual([m["content"]["membership"] for m in members], ["invite"])
        self.assertEqual(members[0]["sender"], sender)

    def test_room_version_1(self) -> Deferred[None]:
        """Room version 1: Synapse co-signs, we verify it, dave sees the invite in /sync."""
        return ensureDeferred(self.invite_to_synapse("1"))

    def test_room_version_5(self) -> Deferred[None]:
        """Room version 5: Synapse co-signs, we verify it, dave sees the invite in /sync."""
        return ensureDeferred(self.invite_to_synapse("5"))

    def test_room_version_9(self) -> Deferred[None]:
        """Room version 9: Synapse co-signs, we verify it, dave sees the invite in /sync."""
        return ensureDeferred(self.invite_to_synapse("9"))

    def test_room_version_10(self) -> Deferred[None]:
        """Room version 10: Synapse co-signs, we verify it, dave sees the invite in /sync."""
        return ensureDeferred(self.invite_to_synapse("10"))

    def test_room_version_11(self) -> Deferred[None]:
        """Room version 11: Synapse co-signs, we verify it, dave sees the invite in /sync."""
        return ensureDeferred(self.invite_to_synapse("11"))

    def test_room_version_12(self) -> Deferred[None]:
        """Room version 12: Synapse co-signs, we verify it, dave sees the invite in /sync."""
        return ensureDeferred(self.invite_to_synapse("12"))

    def test_refusal_reaches_our_command(self) -> Deferred[None]:
        """erin blocks all invites (``m.invite_permission_config``): send-invite reports 403 M_INVITE_BLOCKED."""

        async def go() -> None:
            erin = await self.synapse.user("erin")
            code, body = await self.synapse.client(
                "PUT",
                f"/_matrix/client/v3/user/{quote(erin.user_id, safe='')}"
                "/account_data/m.invite_permission_config",
                erin,
                {"default_action": "block"},
            )
            self.assertEqual(code, 200, body)
            result = self.daemon.cli(
                "send-invite", "--sender", self.ours("alice"), "--invitee", erin.user_id
            )
            self.assertEqual(result.returncode, 1, f"{result.stdout}\n{result.stderr}")
            self.assertTrue(
                result.stderr.startswith("refused: 403 M_INVITE_BLOCKED: "), result.stderr
            )
            self.assertEqual(result.stdout, "")

        return ensureDeferred(go())
