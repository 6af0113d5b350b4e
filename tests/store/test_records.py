"""Record validation: bad values are refused with ValueError before reaching a database."""

from __future__ import annotations

import attrs
from twisted.trial.unittest import SynchronousTestCase

import federation_invite.store as store
from federation_invite.store import InviteRecord, InviteRule, ServerKeyRecord, StoreError

from ._support import make_invite


class RecordTests(SynchronousTestCase):
    def test_invite_record_refusals(self) -> None:
        """InviteRecord refuses bad status, empty, NUL or lone-surrogate text, wrong types and huge
        timestamps."""
        cases = [
            ({"status": "done"}, "status must be one of ['accepted', 'ignored', 'pending',"),
            ({"event_id": ""}, "event_id must not be empty"),
            ({"invitee": "@a\x00:x"}, "invitee must not contain NUL characters"),
            ({"origin": "y\udc80"}, "origin must be valid Unicode (no lone surrogates)"),
            ({"event_id": "$\ud800x"}, "event_id must be valid Unicode (no lone surrogates)"),
            ({"event_json": '{"a":"\udfff"}'}, "event_json must be valid Unicode"),
            ({"room_id": None}, "room_id must be a string, not NoneType"),
            ({"room_id": 5}, "room_id must be a string, not int"),
            ({"sender": b"@a:x"}, "sender must be a string, not bytes"),
            ({"status": ["pending"]}, "status must be one of ['accepted', 'ignored', 'pending',"),
            ({"event": []}, "event must be a dict, not list"),
            ({"invite_room_state": {}}, "invite_room_state must be a list, not dict"),
            ({"received_ts": True}, "received_ts must be an integer, not bool"),
            ({"received_ts": 1.0}, "received_ts must be an integer, not float"),
            ({"received_ts": None}, "received_ts must be an integer, not NoneType"),
            ({"received_ts": 2**53}, "received_ts 9007199254740992 is outside the range"),
            ({"received_ts": -(2**53)}, "received_ts -9007199254740992 is outside the range"),
            ({"event_json": b"{}"}, "event_json must be a string, not bytes"),
            ({"event_json": ""}, "event_json must not be empty"),
        ]
        for changes, message in cases:
            with self.assertRaises(ValueError) as caught:
                make_invite(**changes)
            self.assertIn(message, str(caught.exception))

    def test_timestamps_at_the_bounds_accepted(self) -> None:
        """Timestamps from -(2**53 - 1) to 2**53 - 1 (Matrix's integer range) are kept."""
        for ts in (2**53 - 1, -(2**53 - 1), 0):
            self.assertEqual(make_invite(received_ts=ts).received_ts, ts)

    def test_event_json_is_not_compared(self) -> None:
        """event_json is a cache of the event's encoding: records compare by their fields."""
        self.assertEqual(make_invite(event_json="{}"), make_invite())
        self.assertNotIn("event_json", repr(make_invite(event_json="{}")))
        # Keyword only: a positional argument after status is refused, not taken for it.
        fields = attrs.astuple(make_invite(), recurse=False)[:-1]  # without event_json
        self.assertEqual(InviteRecord(*fields), make_invite())
        self.assertRaises(TypeError, InviteRecord, *fields, "{}")

    def test_invite_status_defaults_to_pending(self) -> None:
        """An invite is pending unless said otherwise."""
        record = make_invite()
        self.assertEqual(record.status, "pending")
        self.assertEqual(store.INVITE_STATUSES, {"pending", "ignored", "accepted", "rejected"})

    def test_server_key_and_rule_refusals(self) -> None:
        """Key validity may be None; rule kinds and actions are closed sets."""
        key = ServerKeyRecord("s", "ed25519:a", "AAAA", None, None, 0, "s")
        self.assertIsNone(key.valid_until_ts)
        with self.assertRaises(ValueError) as caught:
            ServerKeyRecord("s", "ed25519:a", "AAAA", "soon", None, 0, "s")
        self.assertEqual(str(caught.exception), "valid_until_ts must be an integer, not str")
        with self.assertRaises(ValueError) as caught:  # only the validity times may be None
            ServerKeyRecord("s", "ed25519:a", "AAAA", None, None, None, "s")
        self.assertEqual(str(caught.exception), "fetched_ts must be an integer, not NoneType")
        with self.assertRaises(ValueError) as caught:
            InviteRule("@a:x", "room", "*", "block")
        self.assertEqual(
            str(caught.exception), "kind must be one of ['server', 'user'], not 'room'"
        )
        with self.assertRaises(ValueError) as caught:
            InviteRule("@a:x", "user", "*", "deny")
        self.assertEqual(
            str(caught.exception), "action must be one of ['allow', 'block', 'ignore'], not 'deny'"
        )

    def test_store_error_names_operation(self) -> None:
        """StoreError's message starts with the failed operation, kept as an attribute."""
        error = StoreError("get_invite", "OperationalError: boom")
        self.assertEqual(str(error), "get_invite failed: OperationalError: boom")
        self.assertEqual(error.operation, "get_invite")

    def test_public_names(self) -> None:
        """Every name in the store package's __all__ exists."""
        for name in store.__all__:
            self.assertTrue(hasattr(store, name), name)
        self.assertIs(store.migrate, store.run_migrations)
