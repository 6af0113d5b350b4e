"""Shared test helpers: keys, an in-memory key store, a fake federation of servers."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from signedjson.key import generate_signing_key
from signedjson.types import SigningKey
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.resource import Resource

from federation_invite.config import OldKey
from federation_invite.core.keys import key_id_of, verify_key_of
from federation_invite.core.signing import ServerVerifyKey
from federation_invite.store import ServerKeyRecord
from federation_invite.web.keys import KeyServerResource

#: 2023-11-14T22:13:20Z: a fixed "now" for Clock-driven tests.
NOW_S = 1_700_000_000


#: The source tree the tests are in: a checkout, or an unpacked sdist.
SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_tree_file(*parts: str) -> str:
    """The path of a file of the source tree beside ``tests/`` (``README.md``, say).

    Raises ``SkipTest`` naming it when it is absent: the suite run against an installed
    package from a directory holding only ``tests/``. A checkout and an unpacked sdist have
    every such file, so there the tests reading them always run.
    """
    path = os.path.join(SOURCE_TREE, *parts)
    if not os.path.exists(path):
        raise SkipTest(
            f"{os.path.join(*parts)} is not beside tests/ (a run against an installed package "
            f"from a directory without the source tree): {path}"
        )
    return path


def make_clock() -> Clock:
    clock = Clock()
    clock.advance(NOW_S)
    return clock


def make_key(version: str = "k1") -> SigningKey:
    key: SigningKey = generate_signing_key(version)
    return key


def local_verify_key(
    server_name: str, key: SigningKey, valid_until_ts: int = 2**53 - 1
) -> ServerVerifyKey:
    return ServerVerifyKey(server_name, key_id_of(key), verify_key_of(key), valid_until_ts)


class MemoryKeyStore:
    """The key half of the store, in memory, with call counting."""

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self.keys: dict[tuple[str, str], ServerKeyRecord] = {}
        self.reads = 0
        self.fail_writes = False
        #: As DatabaseStore's reactor: a key stored as fetched after now is replaceable.
        self._clock = clock

    def store_server_keys(self, records: Iterable[ServerKeyRecord]) -> Deferred[None]:
        if self.fail_writes:
            return fail(RuntimeError("disk full"))
        for record in records:
            stored = self.keys.get((record.server_name, record.key_id))
            # As DatabaseStore: the record fetched last wins, the later write on a tie, or
            # any write over one stored as fetched after now, except a notary's current
            # key over one stored as old.
            revives = (
                stored is not None
                and stored.expired_ts is not None
                and record.expired_ts is None
                and record.source != record.server_name
            )
            future = (
                stored is not None
                and self._clock is not None
                and stored.fetched_ts > int(self._clock.seconds() * 1000)
            )
            if stored is None or (
                (stored.fetched_ts <= record.fetched_ts or future) and not revives
            ):
                self.keys[(record.server_name, record.key_id)] = record
        return succeed(None)

    def get_server_keys(
        self, server_name: str, key_ids: Iterable[str] | None = None
    ) -> Deferred[dict[str, ServerKeyRecord]]:
        self.reads += 1
        wanted = None if key_ids is None else set(key_ids)
        return succeed(
            {
                key_id: record
                for (name, key_id), record in self.keys.items()
                if name == server_name and (wanted is None or key_id in wanted)
            }
        )


class Tarpit(Resource):
    """A peer that accepts every request and never answers; it records each request, and
    counts those whose connection was lost (the client gave up, or was closed)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []
        self.lost = 0

    def render(self, request: Any) -> Any:
        from twisted.web.server import NOT_DONE_YET

        self.requests.append(request)
        request.notifyFinish().addErrback(self._lost)
        return NOT_DONE_YET

    def _lost(self, _: object) -> None:
        self.lost += 1


class Unreachable(Exception):
    """Stands in for the federation client's transport failure."""


class FakeFederation:
    """A federation client whose servers are in-memory resources (through StubTreq).

    ``servers[name]`` is a resource tree serving ``/_matrix/...``; a name that
    is missing is unreachable; ``hold`` makes calls to a name wait on a
    Deferred the test fires. Every call is recorded in ``calls``.
    """

    def __init__(self) -> None:
        self.servers: dict[str, Resource] = {}
        self.calls: list[tuple[str, str, str, Any]] = []
        self.hold: dict[str, Deferred[None]] = {}

    def add_key_server(
        self,
        clock: Clock,
        server_name: str,
        keys: list[SigningKey],
        validity_ms: int = 86_400_000,
        old_keys: Sequence[OldKey] = (),
    ) -> KeyServerResource:
        """Serve ``server_name``'s key document (replacing any served before: a rotation)."""
        from federation_invite.service import build_site_root
        from federation_invite.web.tree import build_matrix_tree

        resource = KeyServerResource(clock, server_name, keys, old_keys, validity_ms=validity_ms)
        self.servers[server_name] = build_site_root(build_matrix_tree(resource))
        return resource

    def _request(self, method: str, destination: str, path: str, body: Any = None) -> Deferred[Any]:
        self.calls.append((method, destination, path, body))
        if destination in self.hold:
            held = self.hold[destination]
            return held.addCallback(lambda _: self._now(method, destination, path, body))
        return self._now(method, destination, path, body)

    def _now(self, method: str, destination: str, path: str, body: Any) -> Deferred[Any]:
        resource = self.servers.get(destination)
        if resource is None:
            return fail(Unreachable(destination))
        client = StubTreq(resource)
        data = None if body is None else json.dumps(body).encode()
        # The resource is chosen by name above; the URL's host is a placeholder, since treq
        # cannot put an IPv6 literal in other than RFC 5952 form ([2001:0db8::1]) in a URL.
        response = client.request(method, f"https://peer.invalid{path}", data=data)

        async def read() -> Any:
            answer = await response
            content = await answer.content()
            if answer.code != 200:
                raise Unreachable(f"{destination} answered {answer.code}")
            return json.loads(content)

        return Deferred.fromCoroutine(read())

    def get_json(
        self,
        destination: str,
        path: str,
        *,
        args: Any = None,
        signed: bool = True,
        ignore_backoff: bool = False,
    ) -> Deferred[Any]:
        return self._request("GET", destination, path)

    def post_json(
        self, destination: str, path: str, body: Any, *, signed: bool = True, backoff: bool = True
    ) -> Deferred[Any]:
        return self._request("POST", destination, path, body)

    def count(self, destination: str) -> int:
        return sum(1 for call in self.calls if call[1] == destination)


class MemoryStore(MemoryKeyStore):
    """An in-memory store with the invite, user and rule parts the handler uses.

    Behaves like the real store (idempotent ``store_invite`` returning the
    existing row); the real SQLite/PostgreSQL stores are exercised by
    tests/store and by the inbound integration tests.
    """

    def __init__(self) -> None:
        super().__init__()
        from federation_invite.store import InviteRecord, InviteRule

        self.invites: dict[str, InviteRecord] = {}
        self.users: set[str] = set()
        self.rules: list[InviteRule] = []
        self.fail_invites = False
        self.policy_reads = 0

    def store_invite(self, record: Any) -> Deferred[Any]:
        from federation_invite.store import StoreError

        if self.fail_invites:
            return fail(StoreError("store_invite", "database is locked"))
        existing = self.invites.get(record.event_id)
        if existing is not None:
            return succeed((existing, False))
        self.invites[record.event_id] = record
        return succeed((record, True))

    def get_invite(self, event_id: str) -> Deferred[Any]:
        return succeed(self.invites.get(event_id))

    def is_local_user(self, user_id: str) -> Deferred[bool]:
        return succeed(user_id in self.users)

    def list_invite_rules(self, user_id: str) -> Deferred[list[Any]]:
        return succeed([rule for rule in self.rules if rule.user_id == user_id])

    def invitee_states(self, user_ids: Any) -> Deferred[dict[str, tuple[bool, list[Any]]]]:
        self.policy_reads += 1
        return succeed(
            {
                user_id: (
                    user_id in self.users,
                    [rule for rule in self.rules if rule.user_id == user_id],
                )
                for user_id in user_ids
            }
        )


def hide_module(case: SynchronousTestCase, name: str) -> None:
    """Make ``import name`` (and of its submodules) raise ``ImportError`` until ``case`` ends,
    as when the extra that installs it is not installed."""
    missing = object()
    saved = sys.modules.get(name, missing)
    sys.modules[name] = None  # type: ignore[assignment]

    def restore() -> None:
        if saved is missing:
            del sys.modules[name]
        else:
            sys.modules[name] = saved  # type: ignore[assignment]

    case.addCleanup(restore)
