"""``IStore``: what the services may ask of storage, whatever the database."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from twisted.internet.defer import Deferred
from zope.interface import Interface

from ._records import InviteRecord, InviteRule, ServerKeyRecord

__all__ = ["IStore"]


class IStore(Interface):
    """Durable state shared by every worker: invites, remote keys, local users, rules.

    Every method returns a ``Deferred``; each runs as one database transaction.
    Invalid arguments raise ``ValueError`` at call time, before the database is
    touched; database failures arrive as a failed ``Deferred`` with a ``StoreError``.
    """

    def store_invite(record: InviteRecord) -> Deferred[tuple[InviteRecord, bool]]:
        """Store an invite once per ``event_id``: fire with the stored row and whether
        this call created it.

        When the ``event_id`` is already stored (a retry, or another worker that
        got the same request at the same moment) the EXISTING row comes back
        unchanged; the caller decides whether it is the same event.
        """

    def get_invite(event_id: str) -> Deferred[InviteRecord | None]:
        """The invite stored under ``event_id``, or None."""

    def list_invites(
        *,
        invitee: str | None = None,
        room_id: str | None = None,
        status: str | None = None,
        limit: int = 100,
        before_ts: int | None = None,
        before_event_id: str | None = None,
    ) -> Deferred[list[InviteRecord]]:
        """Invites matching every filter given, newest ``received_ts`` first
        (``event_id`` descending among equal ones); ``limit`` is 1 to 1000.

        ``before_ts`` alone keeps only invites received strictly before it.
        To page, give the last invite of the previous page's ``received_ts`` and
        ``event_id`` as ``before_ts`` and ``before_event_id``: the next page
        starts right after it, so invites received in the same millisecond are
        neither skipped nor repeated. ``before_event_id`` without ``before_ts``
        raises ``ValueError``.
        """

    def set_invite_status(event_id: str, status: str) -> Deferred[bool]:
        """Set an invite's status; fire with False when there is no such invite."""

    def store_server_keys(records: Iterable[ServerKeyRecord]) -> Deferred[None]:
        """Upsert remote keys on (server_name, key_id), all in one transaction.

        A record replaces the stored one unless the stored one was fetched later
        (greater ``fetched_ts``), so a slow worker cannot overwrite a newer fetch;
        a stored one fetched after now (a clock that ran ahead) is always replaced.
        """

    def get_server_keys(
        server_name: str, key_ids: Iterable[str] | None = None
    ) -> Deferred[dict[str, ServerKeyRecord]]:
        """The stored keys of ``server_name`` by key ID (only ``key_ids`` if given)."""

    def add_local_user(user_id: str) -> Deferred[bool]:
        """Mark ``user_id`` as ours; fire with False if it already was (idempotent)."""

    def remove_local_user(user_id: str) -> Deferred[bool]:
        """Forget a local user; fire with False if it was not one."""

    def is_local_user(user_id: str) -> Deferred[bool]:
        """Whether ``user_id`` is one of ours, so invites for it are accepted."""

    def invitee_states(
        user_ids: Sequence[str],
    ) -> Deferred[dict[str, tuple[bool, list[InviteRule]]]]:
        """For each user ID: ``(is_local_user(u), list_invite_rules(u))``, all read in one
        transaction (the policy's cache refreshes many invitees at once)."""

    def list_local_users() -> Deferred[list[str]]:
        """Every local user, sorted by code point."""

    def add_invite_rule(rule: InviteRule) -> Deferred[bool]:
        """Store a rule; fire with False if the same rule was already there (idempotent)."""

    def remove_invite_rule(rule: InviteRule) -> Deferred[bool]:
        """Remove a rule; fire with False if there was no such rule."""

    def list_invite_rules(user_id: str) -> Deferred[list[InviteRule]]:
        """The rules of ``user_id``, sorted by kind, pattern and action."""

    def schema_version() -> Deferred[int]:
        """The database's schema version (0 for an empty database)."""

    def close() -> Deferred[None]:
        """Close the connections; the store must not be used afterwards.

        Fires once the queries in progress have ended or, after a few seconds, been
        cancelled where the database allows and abandoned; never blocks the reactor."""
