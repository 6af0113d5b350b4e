"""Whom we accept invites for, and from whom: local users, operator rules, per-user rules, hooks.

Decided in this order (the inbound issue's table, rows 14 to 16):

1. the invitee must be one of our users (``inbound.local_users``: the store's
   list, or any user ID on our server name): else 404 ``M_NOT_FOUND``;
2. the operator's rules: sender's server in ``inbound.server_deny``, sender in
   ``inbound.user_deny``, or an embedder's ``IInvitePolicy`` hook refusing:
   403 ``M_FORBIDDEN``;
3. the invitee's own rules (the spec's invite permission, client-server API
   "Invite permission", and per-user allow/block/ignore lists of users and
   servers): an ``allow`` match wins; else a ``block`` match gives 403
   ``M_INVITE_BLOCKED``; else an ``ignore`` match stores the invite as
   ``ignored`` without handing it over. The spec's ``default_action: block``
   is the rule ``server *  block``.

What the store says about an invitee (whether it is local, and its rules) is
cached for ``cache_seconds`` (``inbound.policy_cache_seconds``), so a flood of
invites costs no database round trip each; a change made through the CLI or
by another worker takes effect within that time. An answer used in the second
half of its life is read again in the background, with others, so invitees
invited steadily never wait for the store; no answer older than
``cache_seconds``, or read "after" now (the wall clock stepped back since), is
ever used.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import Interface

from ._clock import in_window
from .core.errors import Codes, MatrixError, error_answer
from .core.globs import GlobList
from .core.ids import server_name_of
from .core.roomversions import RoomVersion
from .store import InviteRule

__all__ = ["IInvitePolicy", "InboundInvite", "InvitePolicy", "InvitePolicyHook"]

#: Invitees whose store answers are remembered at once (the cache is emptied beyond).
_CACHE_SIZE = 100_000
#: Background refreshes are read together: once this many are queued, or once the
#: first queued has waited this fraction of the cache's lifetime.
_REFRESH_GROUP = 256
_REFRESH_WAIT = 0.05


@attrs.frozen
class InboundInvite:
    """What policy decisions and listeners see of an invite that passed every protocol check."""

    origin: str
    room_version: RoomVersion
    room_id: str
    event_id: str
    sender: str
    invitee: str
    event: dict[str, Any] = attrs.field(repr=False)
    invite_room_state: list[Any] = attrs.field(repr=False)


class IInvitePolicy(Interface):
    """An embedder's hook: may refuse an invite with its own reason."""

    def check_invite(
        invite: InboundInvite,
    ) -> Deferred[str | None] | Awaitable[str | None] | str | None:
        """Fire with None to let the invite through, or a reason to refuse it (403 M_FORBIDDEN).

        A Deferred, a coroutine (``async def``) or the plain value will do.
        Raising (or failing with) a ``MatrixError`` answers with that error
        instead; any other error, or a ``MatrixError`` the web edge cannot
        answer (``core.errors.error_answer``: a status that is no int in 100-599,
        a ``retry_after_ms`` that is no number, a body with no JSON form),
        answers 500 ``M_UNKNOWN`` and is logged.
        """


class InvitePolicyHook(Protocol):
    """The type of a policy hook: any object with ``IInvitePolicy``'s ``check_invite``,
    declared ``@implementer(IInvitePolicy)`` or not (the policy calls it positionally)."""

    def check_invite(
        self, invite: InboundInvite, /
    ) -> Deferred[str | None] | Awaitable[str | None] | str | None: ...


class _PolicyStore(Protocol):
    def invitee_states(
        self, user_ids: Sequence[str]
    ) -> Deferred[dict[str, tuple[bool, list[InviteRule]]]]: ...


def _check_answerable(hook: InvitePolicyHook, error: MatrixError) -> None:
    """Raise ``TypeError`` if the web edge cannot answer a hook's ``error`` (the same
    ``error_answer`` it writes fails: a status that is no int in 100-599, a
    ``retry_after_ms`` that is no number, an extra field or a message with no JSON form):
    the invite is then a hook failure, logged and answered 500 ``M_UNKNOWN``, and
    counted and logged as such rather than as the refusal the hook meant."""
    try:
        error_answer(error)
    except Exception as exc:
        raise TypeError(
            f"policy hook {type(hook).__name__} raised {error!r}, which cannot be answered: {exc}"
        ) from exc


class InvitePolicy:
    """The operator's and the invitees' rules (see the module doc)."""

    def __init__(
        self,
        server_name: str,
        store: _PolicyStore,
        *,
        local_users: str = "database",
        server_deny: Sequence[str] = (),
        user_deny: Sequence[str] = (),
        hooks: Sequence[InvitePolicyHook] = (),
        clock: IReactorTime | None = None,
        cache_seconds: float = 0.0,
    ) -> None:
        if local_users not in ("database", "any"):
            raise ValueError("local_users must be 'database' or 'any'")
        if cache_seconds > 0 and clock is None:
            raise ValueError("caching needs a clock")
        self._clock = clock
        self._cache_seconds = cache_seconds
        #: invitee -> (is local, rules, time of the read in seconds)
        self._cache: dict[str, tuple[bool, list[InviteRule], float]] = {}
        #: invitee -> the callers waiting for its store read (queued or in flight)
        self._reading: dict[str, list[Deferred[tuple[bool, list[InviteRule]]]]] = {}
        #: invitees missed while a read was in flight: the next read's
        self._queued: list[str] = []
        self._read_in_flight = False
        #: cached invitees to read again in the background (an ordered set), since when
        self._refresh: dict[str, None] = {}
        self._refresh_since = 0.0
        self._refresh_in_flight = False
        #: bumped by forget(): reads started before then are not cached
        self._generation = 0
        self._server_name = server_name
        self._store = store
        self._local_users = local_users
        # Globs match in any case, user IDs too, as Synapse's server ACLs and invite rules do.
        self._server_deny = GlobList.of(server_deny, ignore_case=True)
        self._user_deny = GlobList.of(user_deny, ignore_case=True)
        self._hooks: list[InvitePolicyHook] = []
        for hook in hooks:
            self.add_hook(hook)

    def add_hook(self, hook: InvitePolicyHook) -> None:
        """Register an ``IInvitePolicy`` provider; hooks run in registration order.

        An object without a callable ``check_invite`` (a plain function, say)
        is refused with ``TypeError`` here, not by failing every invite later.
        """
        if not callable(getattr(hook, "check_invite", None)):
            raise TypeError(
                f"a policy hook must provide IInvitePolicy (a check_invite(invite) method); "
                f"{type(hook).__name__} has none"
            )
        self._hooks.append(hook)

    async def check(self, invite: InboundInvite) -> str:
        """Return the status to store the invite with (``pending`` or ``ignored``), or raise."""
        rules = await self._check_local(invite.invitee)
        # Rules match names as written and as hosts (no port or trailing dot, any
        # case), so a denied server cannot return under another port.
        sender_server = server_name_of(invite.sender)
        if self._server_deny.matches_server(sender_server) or self._server_deny.matches_server(
            invite.origin
        ):
            raise MatrixError(
                403, Codes.FORBIDDEN, "This server does not accept invites from yours"
            )
        if self._user_deny.matches_user(invite.sender):
            raise MatrixError(403, Codes.FORBIDDEN, "This server does not accept invites from you")
        for hook in self._hooks:
            # maybeDeferred: a Deferred, a coroutine or a plain value (None included).
            try:
                reason = await maybeDeferred(hook.check_invite, invite)
            except MatrixError as error:
                _check_answerable(hook, error)
                raise
            if reason is not None:
                raise MatrixError(403, Codes.FORBIDDEN, str(reason)[:500])
        return self._invitee_rules(rules, invite.sender, sender_server)

    def _invitee(self, invitee: str) -> Deferred[tuple[bool, list[InviteRule]]]:
        """Whether ``invitee`` is one of ours, and its rules: from the cache or the store.

        Misses are read in groups, as invites are written: while one read is in
        flight, the invitees missed meanwhile queue, and the next read takes
        them all in one transaction (a storm of invites for many users whose
        entries expired together costs a few reads, not one each). Concurrent
        misses for one invitee share its read; each caller waits on its own
        Deferred, so a cancelled request cancels no other.
        """
        now = self._clock.seconds() if self._clock is not None else 0.0
        cached = self._cache.get(invitee)
        if cached is not None and self._is_fresh(cached[2], now):
            if now - cached[2] > self._cache_seconds / 2:
                self._refresh_soon(invitee, now)
            return succeed((cached[0], cached[1]))
        waiter: Deferred[tuple[bool, list[InviteRule]]] = Deferred()
        waiters = self._reading.get(invitee)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._reading[invitee] = [waiter]
        self._queued.append(invitee)
        if not self._read_in_flight:
            self._read_queued()
        return waiter

    def _is_fresh(self, read_at: float, now: float) -> bool:
        """Whether an answer read at ``read_at`` may still be used at ``now`` (``_clock``)."""
        return in_window(read_at, now, read_at + self._cache_seconds)

    def _refresh_soon(self, invitee: str, now: float) -> None:
        """Queue a cached invitee for a background read; start one when enough have waited.

        No timer: the queue is looked at as invites arrive. Should none arrive,
        the entries simply expire and the next invite waits for a read.
        """
        if not self._refresh:
            self._refresh_since = now
        self._refresh[invitee] = None
        if self._refresh_in_flight:
            return
        # A queue started "in the future" (the clock stepped back since) has
        # waited for an unknown time: read it now rather than after the step.
        waited = now - self._refresh_since
        if (
            len(self._refresh) >= _REFRESH_GROUP
            or waited < 0
            or waited >= self._cache_seconds * _REFRESH_WAIT
        ):
            self._read_refresh(now)

    def _due_refreshes(self, now: float) -> list[str]:
        """Take the queued refreshes still worth a read, and empty the queue.

        An invitee queued while a read of it was on its way (a refresh, or a
        miss's read it rode along with) was renewed by that read: reading it
        again would only repeat it. Nor is one forgotten or evicted since worth
        a read: its next invite reads it anyway. One read "after" now (the clock
        stepped back since) is due: it is stale, like an expired one.
        """
        half_life = self._cache_seconds / 2
        due = []
        for invitee in self._refresh:
            cached = self._cache.get(invitee)
            if (
                cached is not None
                and not 0.0 <= now - cached[2] <= half_life
                and invitee not in self._reading
            ):
                due.append(invitee)
        self._refresh.clear()
        return due

    def _read_refresh(self, started: float) -> None:
        batch = self._due_refreshes(started)
        if not batch:
            return
        self._refresh_in_flight = True
        generation = self._generation

        def done(result: dict[str, tuple[bool, list[InviteRule]]] | Failure) -> None:
            self._refresh_in_flight = False
            # A failed refresh answers nobody: the entries expire as they would
            # have, and the invitee's next invite reads (and reports) again.
            if not isinstance(result, Failure):
                self._remember(batch, result, started, generation)

        self._read_states(batch).addBoth(done)

    def _read_states(self, batch: list[str]) -> Deferred[dict[str, tuple[bool, list[InviteRule]]]]:
        # A store that raises at once (closed, say) fails this read like any
        # other, so the read-in-flight flags are reset and nobody waits forever.
        reading = maybeDeferred(self._store.invitee_states, batch)
        if self._local_users == "any":
            reading.addCallback(
                lambda states: {user: (True, rules) for user, (_, rules) in states.items()}
            )
        return reading

    def _remember(
        self,
        batch: list[str],
        result: dict[str, tuple[bool, list[InviteRule]]],
        started: float,
        generation: int,
    ) -> None:
        """Cache a read's answers, unless forget() was called after it started."""
        if self._cache_seconds <= 0 or generation != self._generation:
            return
        if len(self._cache) + len(batch) > _CACHE_SIZE:
            self._cache.clear()
        for invitee in batch:
            is_local, rules = result.get(invitee, (False, []))
            self._cache[invitee] = (is_local, rules, started)

    def _read_queued(self) -> None:
        misses, self._queued = self._queued, []
        started = self._clock.seconds() if self._clock is not None else 0.0
        # Background refreshes waiting to be read ride along.
        batch = misses + self._due_refreshes(started)
        self._read_in_flight = True
        generation = self._generation

        def done(result: dict[str, tuple[bool, list[InviteRule]]] | Failure) -> None:
            # Take every waiter out before answering any: an answered caller may
            # ask again at once (and must then queue a new read).
            answering = [(invitee, self._reading.pop(invitee)) for invitee in misses]
            if not isinstance(result, Failure):
                self._remember(batch, result, started, generation)
            for invitee, waiters in answering:
                for each in waiters:
                    if each.called:
                        continue
                    if isinstance(result, Failure):
                        each.errback(result)
                    else:
                        each.callback(result.get(invitee, (False, [])))
            self._read_in_flight = False
            if self._queued:
                self._read_queued()

        self._read_states(batch).addBoth(done)

    def forget(self, invitee: str | None = None) -> None:
        """Drop cached answers (for one invitee, or all) after changing users or rules.

        Reads already on their way answer their callers but are not cached.
        """
        self._generation += 1
        if invitee is None:
            self._cache.clear()
        else:
            self._cache.pop(invitee, None)

    async def _check_local(self, invitee: str) -> list[InviteRule]:
        if server_name_of(invitee) != self._server_name:
            raise MatrixError(404, Codes.NOT_FOUND, "The invitee is not a user of this server")
        is_local, rules = await self._invitee(invitee)
        if not is_local:
            raise MatrixError(404, Codes.NOT_FOUND, "Unknown user")
        return rules

    @staticmethod
    def _invitee_rules(rules: list[InviteRule], sender: str, sender_server: str) -> str:
        if not rules:
            return "pending"
        matched = set()
        for rule in rules:
            if rule.kind == "user":
                hit = GlobList.of([rule.pattern], ignore_case=True).matches_user(sender)
            else:
                hit = GlobList.of([rule.pattern], ignore_case=True).matches_server(sender_server)
            if hit:
                matched.add(rule.action)
        if "allow" in matched:
            return "pending"
        if "block" in matched:
            raise MatrixError(
                403, Codes.INVITE_BLOCKED, "The invitee does not accept invites from you"
            )
        if "ignore" in matched:
            return "ignored"
        return "pending"
