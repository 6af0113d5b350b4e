"""The keyring: other servers' verify keys, from memory, the store, the server, or notaries.

``Keyring.get_server_keys(server_name, key_ids, valid_at_ms)`` answers from
memory, then from the store, then by fetching ``GET /_matrix/key/v2/server``
from that server (checking ``server_name`` and that a listed verify key
signed the answer; entries we cannot use are skipped, see
``parse_key_response``), then from the configured notaries through
``POST /_matrix/key/v2/query`` (checking the origin's self-signatures and the
notary's signature with a key configured for it). Concurrent asks for the same
server share one fetch: the server's own answer serves them all, and the
notaries are asked for the key IDs still missing among those every caller
asked for (callers joining add theirs, up to ``_MAX_KEYS_PER_DOCUMENT`` key IDs).
A server whose fetch failed is not asked again until its back-off has
passed (none when its answer, or a notary's, timed out only while our address lookups
waited for a resolver thread, ``TransportError.resolver_busy``, or when our client's ``close()``
abandoned its request or a notary's, ``TransportError.abandoned``, or one was not sent for
want of our own file descriptors or memory, ``TransportError.not_sent``: not its fault); one that
answered (or a notary did for it), with every key asked for or not, not for 5 s
(the pause: a server may list fresh key IDs at each fetch, which requests naming the
next ones would otherwise have fetched one by one). A server that failed to answer while a
notary answered for it is only paused (one whose notary query was not sent, or abandoned,
or timed out while our address lookups waited, for a cause of ours, not even that), but its
own key server is not asked again until its back-off (1 min, doubling up to 1 h, per name
as fetched) has passed: until then its fetches ask the notaries alone, once per pause (but
for the sender's answer check, below: a fetch it joins asks the server too, once the
notaries have answered without a key); its own answer ends that back-off. These are the
keyring's own, the only per-server limits on its fetches:
the federation client's back-off of the server, set by other requests (our invites to
it while it was down), is passed by (``ignore_backoff``, as Synapse fetches keys), so
it never holds up the key of a request the server sends once back; a fetch's outcome
still counts in it (a success ends it). A client refusing a fetch all the same
(``BackoffError``: no request made) is not the server's failure: the keyring waits as
long as the client will, without doubling its back-off. Anyone can name any server and a made-up
key ID, so the pause bounds the fetches anyone can cause to one per 5 s; but a
lookup within it of key IDs that fetch did not ask for (a key the server has
just rotated to, one only a notary has, or a caller's that joined the fetch
after the notaries were asked or past that bound) is not refused: it waits for
the pause to end, and then one fetch is made for all the key IDs that waited
(up to ``_MAX_KEYS_PER_DOCUMENT``; a lookup that would add more gets what memory
has at once). Sharing, pauses and back-off are per name as fetched, never shared by
other spellings of it (another case, an IPv6 literal or a port written otherwise,
a trailing dot), although these reach the same server: a fetch can fail for one
spelling where the server's own succeeds (its key document names it as it spells
itself; ``example.org.`` fails TLS against the certificate of ``example.org``), and
anyone can name any spelling in a forged request, which must not stop the
server's own lookups. Names whose host ends in a dot (``example.org.``,
``example.org.:8448``) are never fetched at all (no certificate can match them):
they have no keys. Only the sender, checking an answer
the server has just signed, fetches regardless of pauses and back-off
(``ignore_backoff``).
At most ``_MAX_FETCHES_IN_FLIGHT`` (64) fetches of servers we hold no key of are
in flight at once, over all servers (each holds sockets until it ends, up to
``outbound.timeout``: its ``.well-known`` and SRV discovery, the server's answer,
the notaries'), and at most ``_MAX_REFRESHES_IN_FLIGHT`` (64) refreshes of servers
we hold a key of (in memory, or in the store under a key ID the lookup names: only those
are read; current or not: a key's ``valid_until_ts`` passes daily), so that forged
origins naming unknown servers on tarpits cannot starve the refreshes of known peers. A
lookup that would start one more fetch in its pool (no fetch for its server under way to
join) is refused at once with ``KeyFetchBusy``, 429 ``M_LIMIT_EXCEEDED`` with ``retry_after_ms``
(5 s), without asking anyone and without backing the server off: the server is
not at fault, we are busy. So is a lookup waiting for a pause to end when the
pause ends at its pool's cap. Anyone who first gets us to store keys of many
names of their own (each serving a valid key document once) can still fill the
refreshes' pool by having those names hang. Only the
sender's answer check (``ignore_backoff``) is never refused (our own user asked
for that invite, and the server has just answered us); its fetch counts all the same.
Key IDs that are not ed25519 key IDs of at most 255 characters are not looked
for (no key document we accept lists one). A pause is forgotten once over, with
the key IDs it holds; a failure's back-off is kept past its end, to double the next.
Fetched keys are stored with their validity, capped at seven days after the fetch
(rooms/fragments/v5-signing-requirements.md). Of two answers for the same key,
the one fetched last wins, in memory as in the store: after a rotation the
refetch turns a current key old (valid for events sent before its
``expired_ts``), and an event check gets the same verdict from memory as from
the store (after a restart).

``Keyring.close()`` (the service stopping) abandons every fetch in flight, notary queries
included: the client request under way is cancelled (its timer and connection with it), the
lookups waiting for it fail with ``KeyringClosed`` (a ``MatrixError``, 500 ``M_UNKNOWN``), and
nothing it fetched is stored (the store is closed next), no back-off recorded. From then on a
lookup that memory cannot answer fails with ``KeyringClosed`` at once, without reading the
store or fetching.

Server names are attacker-chosen (any request can name a fresh origin whose
self-signed keys it serves), so memory holds the keys of at most
``_MEMORY_SIZE`` (10,000) servers: beyond that, the least recently loaded or
fetched servers are dropped, down to half the bound, and reloaded from the store
when next asked for. Our own keys and servers with a fetch under way are never
dropped. Key IDs are attacker-chosen too (a server's document may list 64 fresh ones
at each fetch), so memory holds at most ``_MAX_KEYS_PER_SERVER`` (64, a whole document)
keys of each server: beyond, those fetched least recently (no longer listed) are dropped,
and the store answers them again when a lookup names them. A lookup reads from the store
only the key IDs it asks for that memory does not answer (at most 64), never every key a
server ever listed; memory takes from a notary's answer only the keys asked for and those
it holds (so that a notary's copy never makes a key the store holds as old current).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from nacl.signing import VerifyKey
from signedjson.types import SigningKey
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from ._backoff import is_failure_status, make_room
from ._clock import in_window
from .client.errors import BackoffError, RemoteError, TransportError
from .core.errors import Codes, MatrixError
from .core.ids import host_ends_in_dot, is_valid_server_name
from .core.keys import decode_verify_key, is_valid_key_id, key_id_of, verify_key_of
from .core.signing import (
    ServerVerifyKey,
    SignatureError,
    cap_valid_until_ts,
    signing_bytes,
    verify_json_with_one_of,
)
from .logs import Logger
from .store import ServerKeyRecord, StoreError

__all__ = [
    "IKeyFetchClient",
    "IKeyStore",
    "KeyFetchBusy",
    "KeyFetchError",
    "Keyring",
    "KeyringClosed",
    "Notary",
    "OldKey",
    "local_verify_keys",
]

log = Logger(namespace="federation_invite.keyring")

_MIN_BACKOFF_MS = 60_000
_MAX_BACKOFF_MS = 3_600_000
#: After a server answered without the key asked for, the wait before asking it again.
_ANSWERED_REFETCH_MS = 5_000
#: Servers in back-off remembered at once (beyond, those over or ending soonest are
#: dropped: ``make_room``).
_BACKOFF_TABLE_SIZE = 10_000
#: Servers whose keys are kept in memory at once (beyond, the least recently
#: loaded are dropped down to half this, to be reloaded from the store).
_MEMORY_SIZE = 10_000
#: The most ``verify_keys`` and ``old_verify_keys`` entries (together) a key document may
#: list. Real servers publish one current key and the few they rotated out (Synapse: its
#: signing key plus the ``old_signing_keys`` an admin configured), so 64 leaves room for
#: years of rotations; a document listing thousands (1 MiB holds about 10,000) only costs
#: decoding, memory and store rows that nobody needs.
_MAX_KEYS_PER_DOCUMENT = 64
#: The most keys of one server kept in memory: as many as one document may list, so that a
#: server's latest document fits whole. Beyond, those fetched least recently (a key the
#: server no longer lists) are dropped from memory (not from the store, which answers them
#: again by key ID): a server listing fresh key IDs at each fetch cannot grow memory.
_MAX_KEYS_PER_SERVER = _MAX_KEYS_PER_DOCUMENT
#: Key fetches in flight at once of servers we hold no key of, over all servers (the
#: default of ``Keyring``'s ``max_fetches_in_flight``). Anyone can make us fetch the keys
#: of a server they name (a forged request's origin), and a fetch of a server that never
#: answers holds its sockets for ``outbound.timeout``: unbounded, a few dozen forged
#: requests a second use up the daemon's file descriptors. 64 is far more than the new
#: servers a real invite server meets at once, and a few hundred descriptors at worst.
_MAX_FETCHES_IN_FLIGHT = 64
#: Key fetches in flight at once of servers we hold a key of (refreshes), over all servers
#: (the default of ``Keyring``'s ``max_refreshes_in_flight``): a pool of their own, so that
#: fetches of servers named by forged requests cannot starve them. Anyone who first gets
#: us to store keys of many names of their own (each serving a valid key document once)
#: can still fill it by having those names hang.
_MAX_REFRESHES_IN_FLIGHT = 64
#: ``retry_after_ms`` of a lookup refused at that cap.
_BUSY_RETRY_AFTER_MS = 5_000


@attrs.frozen
class OldKey:
    """A key we used to sign with, published in ``old_verify_keys`` (``keys.old_verify_keys``)."""

    key_id: str
    key: str
    expired_ts: int


@attrs.frozen
class Notary:
    """A trusted key server and the keys we check its answers with (``keys.notaries``)."""

    server_name: str
    verify_keys: tuple[tuple[str, str], ...]


class IKeyFetchClient(Protocol):
    """The part of the federation client the keyring uses."""

    def get_json(
        self,
        destination: str,
        path: str,
        *,
        args: Any = None,
        signed: bool = True,
        ignore_backoff: bool = False,
    ) -> Deferred[Any]: ...

    def post_json(
        self, destination: str, path: str, body: Any, *, signed: bool = True, backoff: bool = True
    ) -> Deferred[Any]: ...


class IKeyStore(Protocol):
    """The part of the store the keyring uses."""

    def store_server_keys(self, records: Iterable[ServerKeyRecord]) -> Deferred[None]: ...

    def get_server_keys(
        self, server_name: str, key_ids: Iterable[str] | None = None
    ) -> Deferred[dict[str, ServerKeyRecord]]: ...


class KeyFetchError(ValueError):
    """A key answer we refuse (wrong server, bad signature, malformed)."""


class KeyFetchBusy(MatrixError):
    """A lookup refused because it would start a key fetch beyond the cap on fetches in flight:
    429 ``M_LIMIT_EXCEEDED`` with ``retry_after_ms``, as a request needing it is answered."""

    def __init__(self, server_name: str) -> None:
        super().__init__(
            429,
            Codes.LIMIT_EXCEEDED,
            f"Too many key fetches in progress to fetch the keys of {server_name[:255]};"
            " retry later",
            retry_after_ms=_BUSY_RETRY_AFTER_MS,
        )


class KeyringClosed(MatrixError):
    """A lookup that needed a key fetch after or during ``Keyring.close()`` (the service
    stopping): the fetch was abandoned, or never made. 500 ``M_UNKNOWN``, as a request needing
    it is answered (the peer retries later), as for a database that fails."""

    def __init__(self, server_name: str) -> None:
        super().__init__(
            500,
            Codes.UNKNOWN,
            f"The server is stopping: the keys of {server_name[:255]} were not fetched;"
            " retry later",
        )


class _FetchAbandoned(Exception):
    """Raised in a fetch once the keyring is closed: the fetch stops, storing nothing."""


def parse_key_response(
    response: object,
    server_name: str,
    fetched_ts: int,
    source: str,
    *,
    signed_bytes: bytes | None = None,
) -> list[ServerKeyRecord]:
    """Check a ``/_matrix/key/v2/server`` document for ``server_name`` and turn it into records.

    The document must be "signed using the verify_keys" (server-server-api,
    "Publishing Keys"): the first signature by a listed verify key must hold
    (later ones are not checked, as in Synapse's ``process_v2_response``). A
    listed key that did not sign (one published ahead of use) is kept all the
    same, as Synapse does. A document listing more than ``_MAX_KEYS_PER_DOCUMENT``
    (64) keys, current and old together, is refused. Entries we
    cannot use are skipped, not the whole document (as Synapse skips unsupported
    algorithms): key IDs that are not ``ed25519:`` and a version of
    ``[a-zA-Z0-9_]`` (definitions/keys.yaml; ``curve25519:x``, ``ed25519:old-1``),
    undecodable keys, old keys without an integer ``expired_ts``. Current keys'
    ``valid_until_ts`` is capped at seven days after ``fetched_ts``. ``signed_bytes``: the
    document's ``signing_bytes``, when the caller has encoded it already (a notary's copy,
    whose notary signature covers the same bytes).
    """
    if not isinstance(response, dict):
        raise KeyFetchError("key response is not a JSON object")
    if response.get("server_name") != server_name:
        raise KeyFetchError(f"key response is for {str(response.get('server_name'))[:64]!r}")
    valid_until_ts = response.get("valid_until_ts")
    if isinstance(valid_until_ts, bool) or not isinstance(valid_until_ts, int):
        raise KeyFetchError("key response has no integer valid_until_ts")
    verify_keys = response.get("verify_keys")
    old_verify_keys = response.get("old_verify_keys", {})
    if not isinstance(verify_keys, dict) or not verify_keys:
        raise KeyFetchError("key response has no verify_keys")
    if not isinstance(old_verify_keys, dict):
        raise KeyFetchError("old_verify_keys is not an object")
    listed = len(verify_keys) + len(old_verify_keys)
    if listed > _MAX_KEYS_PER_DOCUMENT:
        raise KeyFetchError(f"key document lists {listed} keys, more than {_MAX_KEYS_PER_DOCUMENT}")
    skipped: list[str] = []
    current: dict[str, VerifyKey] = {}
    for key_id, entry in verify_keys.items():
        try:
            current[key_id] = _decode_entry(key_id, entry)
        except KeyFetchError as exc:
            skipped.append(str(exc))
    _check_self_signed(response, server_name, current, signed_bytes)
    capped = cap_valid_until_ts(valid_until_ts, fetched_ts)
    records = [
        ServerKeyRecord(
            server_name, key_id, verify_keys[key_id]["key"], capped, None, fetched_ts, source
        )
        for key_id in current
    ]
    for key_id, entry in old_verify_keys.items():
        if key_id in verify_keys:
            continue  # a key cannot be both current and old; the current entry wins
        try:
            _decode_entry(key_id, entry)
        except KeyFetchError as exc:
            skipped.append(str(exc))
            continue
        expired_ts = entry.get("expired_ts")
        if isinstance(expired_ts, bool) or not isinstance(expired_ts, int) or expired_ts < 0:
            skipped.append(f"old key {key_id[:64]!r} has no valid expired_ts")
            continue
        records.append(
            ServerKeyRecord(server_name, key_id, entry["key"], None, expired_ts, fetched_ts, source)
        )
    if skipped:
        log.info(
            "Skipped {count} unusable key(s) in the key document of {server} from {source}: "
            "{reasons}",
            count=len(skipped),
            server=server_name,
            source=source,
            reasons="; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else ""),
        )
    return records


def _check_self_signed(
    response: dict[str, Any],
    server_name: str,
    current: Mapping[str, VerifyKey],
    signed_bytes: bytes | None = None,
) -> None:
    """The first signature of ``response`` by one of ``current`` holds (see
    ``verify_json_with_one_of``: one encoding and one check, however many keys are listed).

    Signatures by key IDs not in ``current`` (a notary's, an old key's) are not ours to check.
    """
    keys = {
        key_id: ServerVerifyKey(server_name, key_id, verify_key, None)
        for key_id, verify_key in current.items()
    }
    try:
        verify_json_with_one_of(response, server_name, keys, data=signed_bytes)
    except SignatureError as exc:
        raise KeyFetchError(f"key response not self-signed: {exc}") from None


def _decode_entry(key_id: object, entry: object) -> VerifyKey:
    if not isinstance(key_id, str) or not is_valid_key_id(key_id):
        raise KeyFetchError(f"unsupported key ID {str(key_id)[:64]!r}")
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
        raise KeyFetchError(f"key {key_id} has no 'key'")
    try:
        return decode_verify_key(key_id, entry["key"])
    except ValueError as exc:
        raise KeyFetchError(f"key {key_id}: {exc}") from None


def local_verify_keys(
    server_name: str, signing_key: SigningKey, old_keys: Iterable[OldKey] = ()
) -> list[ServerVerifyKey]:
    """Our own keys for ``Keyring(local_keys=...)``, as peers read them in our key document.

    The key we sign with, with no end (we would publish it again), and each
    old key (config ``keys.old_verify_keys``) with its ``expired_ts``: it
    verifies events we signed before then (a room's create event relayed back
    to us in ``invite_room_state``), never a request (``auth`` refuses old
    keys). Synapse likewise adds its old signing keys to its own verify keys.
    """
    keys = [
        ServerVerifyKey(server_name, key_id_of(signing_key), verify_key_of(signing_key), 2**53 - 1)
    ]
    for old in old_keys:
        verify_key = decode_verify_key(old.key_id, old.key)
        keys.append(ServerVerifyKey(server_name, old.key_id, verify_key, None, old.expired_ts))
    return keys


def _to_verify_key(record: ServerKeyRecord) -> ServerVerifyKey:
    return ServerVerifyKey(
        record.server_name,
        record.key_id,
        decode_verify_key(record.key_id, record.verify_key),
        record.valid_until_ts,
        record.expired_ts,
    )


@attrs.define(eq=False)
class _Fetch:
    """A fetch in flight for one server: its callers and the key IDs they want."""

    #: The lookups waiting for it, in order (a dict as an ordered set: a lookup cancelled
    #: leaves it at once, ``Keyring._waiter``).
    waiters: dict[Deferred[None], None] = attrs.Factory(dict)
    #: Key ID -> the latest ``valid_at_ms`` a caller wants it for.
    wanted: dict[str, int] = attrs.Factory(dict)
    #: Key ID -> the ``minimum_valid_until_ts`` a notary was asked for it with.
    asked: dict[str, int] = attrs.Factory(dict)
    #: Started or joined by the sender's answer check: the server is asked directly even
    #: in its direct back-off (joined after the fetch skipped it: once the notaries have
    #: answered, for the keys still missing); started so, the keyring's back-off, pause and
    #: cap on fetches in flight were passed by (every fetch passes the client's back-off).
    ignore_backoff: bool = False
    #: Counted in the refreshes' pool (its server had a key in memory when it started).
    refresh: bool = False
    #: The server's own request, or a notary's, timed out only while our address lookups
    #: waited for a resolver thread (``TransportError.resolver_busy``): not its fault (nor
    #: the notary's). Kept apart, as ``direct_not_sent`` and ``notary_not_sent``: a notary's
    #: query timing out so does not excuse the server's own request failing.
    direct_resolver_busy: bool = False
    notary_resolver_busy: bool = False
    #: The server's request, or a notary's, was abandoned by our client's ``close()`` at
    #: its server discovery or address lookup (``TransportError.abandoned``): never sent,
    #: so no failure of the server's (nor a notary's).
    direct_abandoned: bool = False
    notary_abandoned: bool = False
    #: Why the server's request, or a notary's, was not sent, for a cause of ours (out of
    #: file descriptors, or its timeout while it waited for its turn: ``TransportError.not_sent``;
    #: or it timed out once sent late, ``waited``): no failure of the server's either. Kept
    #: apart, as ``direct_abandoned`` and ``notary_abandoned``: a notary's query not sent
    #: does not excuse the server's own request failing (its direct back-off).
    direct_not_sent: str | None = None
    notary_not_sent: str | None = None
    #: The client request under way (the server's, then each notary's), cancelled by
    #: ``Keyring.close``.
    request: Deferred[Any] | None = None
    #: Our client refused to send the server's request (``BackoffError``, no request
    #: made), until then (ms): not the server's failure.
    client_refused_until_ms: int | None = None

    def want(self, wanted: Mapping[str, int]) -> None:
        """Add a caller's key IDs (key ID -> valid at), as long as ``_MAX_KEYS_PER_DOCUMENT``
        are not wanted yet (no document may list more; beyond, made-up key IDs would only
        swell the notary queries)."""
        _merge_wanted(self.wanted, wanted)

    def asked_for(self, key_ids: Iterable[str], valid_at_ms: int) -> bool:
        """Whether a notary was asked for each of ``key_ids``, valid at ``valid_at_ms``."""
        return all(self.asked.get(key_id, -1) >= valid_at_ms for key_id in key_ids)


def _merge_wanted(into: dict[str, int], wanted: Mapping[str, int]) -> None:
    """Add ``wanted`` (key ID -> valid at) to ``into``, keeping the latest time of each key ID
    and at most ``_MAX_KEYS_PER_DOCUMENT`` key IDs."""
    for key_id, valid_at_ms in wanted.items():
        if key_id in into:
            into[key_id] = max(into[key_id], valid_at_ms)
        elif len(into) < _MAX_KEYS_PER_DOCUMENT:
            into[key_id] = valid_at_ms


@attrs.define(eq=False)
class _PauseWait:
    """Lookups waiting for a server's pause to end, and the key IDs they want then."""

    timer: IDelayedCall
    #: As ``_Fetch.waiters``.
    waiters: dict[Deferred[None], None] = attrs.Factory(dict)
    #: Key ID -> the latest ``valid_at_ms`` a caller wants it for.
    wanted: dict[str, int] = attrs.Factory(dict)


@attrs.define
class _Backoff:
    until_ms: int
    delay_ms: int
    #: When it was set.
    since_ms: int = 0
    #: For the pause after an answer (with every key asked for or not): the key IDs that
    #: fetch asked for (a lookup of others waits for the pause to end). None for a failure's.
    asked: frozenset[str] | None = None

    def waiting(self, now_ms: int) -> bool:
        return in_window(self.since_ms, now_ms, self.until_ms)


def _doubled_delay_ms(previous: _Backoff | None) -> int:
    """A failure's back-off: 1 min, then the last delay doubled, up to 1 h."""
    if previous is None:
        return _MIN_BACKOFF_MS
    return min(max(previous.delay_ms * 2, _MIN_BACKOFF_MS), _MAX_BACKOFF_MS)


def _keep_backoff(
    table: dict[str, _Backoff], server_name: str, backoff: _Backoff, now_ms: int
) -> None:
    """Record ``backoff`` for ``server_name`` in ``table``, which holds at most
    ``_BACKOFF_TABLE_SIZE`` (``make_room`` says what a new name in a full table drops)."""
    make_room(
        table,
        server_name,
        _BACKOFF_TABLE_SIZE,
        over=lambda other: not other.waiting(now_ms),
        ends=lambda other: other.until_ms,
    )
    table[server_name] = backoff


class Keyring:
    """Finds, checks, caches and stores other servers' verify keys (see the module doc)."""

    def __init__(
        self,
        clock: IReactorTime,
        store: IKeyStore,
        client: IKeyFetchClient,
        *,
        local_keys: Sequence[ServerVerifyKey] = (),
        notaries: Sequence[Notary] = (),
        max_fetches_in_flight: int | None = None,
        max_refreshes_in_flight: int | None = None,
    ) -> None:
        """``max_fetches_in_flight``: the cap on fetches in flight of servers we hold no key
        of, and ``max_refreshes_in_flight`` of those we hold a key of (see the module doc);
        ``None`` for the defaults, ``_MAX_FETCHES_IN_FLIGHT`` and
        ``_MAX_REFRESHES_IN_FLIGHT`` (64 each)."""
        if max_fetches_in_flight is None:
            max_fetches_in_flight = _MAX_FETCHES_IN_FLIGHT
        if max_refreshes_in_flight is None:
            max_refreshes_in_flight = _MAX_REFRESHES_IN_FLIGHT
        if max_fetches_in_flight < 1:
            raise ValueError("max_fetches_in_flight must be >= 1")
        if max_refreshes_in_flight < 1:
            raise ValueError("max_refreshes_in_flight must be >= 1")
        self._max_fetches = max_fetches_in_flight
        self._max_refreshes = max_refreshes_in_flight
        #: Fetches in flight in each pool: [of unknown servers, refreshes].
        self._pool_in_flight = [0, 0]
        self._clock = clock
        self._store = store
        self._client = client
        self._notaries = tuple(notaries)
        #: server name -> key ID -> key, least recently loaded or fetched first.
        self._memory: dict[str, dict[str, ServerVerifyKey]] = {}
        #: server name -> key ID -> when the key in memory was fetched (for the keys
        #: that came from a fetch or the store; our own keys have none).
        self._fetched_ts: dict[str, dict[str, int]] = {}
        for key in local_keys:
            self._memory.setdefault(key.server_name, {})[key.key_id] = key
        self._local_servers = frozenset(key.server_name for key in local_keys)
        #: Fetches in flight and back-offs, keyed by the server name as fetched (each
        #: spelling apart: see the module doc), as memory and the store are.
        self._inflight: dict[str, _Fetch] = {}
        self._backoff: dict[str, _Backoff] = {}
        #: The back-off of each server's own key server (the direct request) after it
        #: failed to answer, whatever the notaries did: while it lasts, fetches ask only the
        #: notaries (``_fetch``). Its own answer ends it.
        self._direct_backoff: dict[str, _Backoff] = {}
        #: Lookups waiting for a server's pause to end (same keys).
        self._pause_waits: dict[str, _PauseWait] = {}
        #: (since, until, key) of each pause set, oldest first, to forget the pauses that
        #: are over (``_forget_ended_pauses``).
        self._pauses: deque[tuple[int, int, str]] = deque()
        #: Set by ``close``: no fetch is made, and those in flight are abandoned.
        self._closed = False
        #: Counters for tests, metrics and benchmarks.
        self.fetches = 0
        self.fetch_failures = 0

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def cached_keys(self, server_name: str) -> Mapping[str, ServerVerifyKey]:
        """The keys in memory for ``server_name`` (no I/O)."""
        return self._memory.get(server_name, {})

    def known_server_keys(
        self, server_name: str, key_ids: Iterable[str], valid_at_ms: int
    ) -> dict[str, ServerVerifyKey] | None:
        """What ``get_server_keys`` would answer, when it can answer from memory; else ``None``.

        For optional checks that are not worth a fetch (or a store read): no I/O.
        """
        wanted = frozenset(key_ids)
        if self._satisfied(server_name, wanted, valid_at_ms) or server_name in self._local_servers:
            return self._answer(server_name, wanted)
        return None

    def get_server_keys(
        self,
        server_name: str,
        key_ids: Iterable[str],
        valid_at_ms: int,
        *,
        fetch_if_store_fails: bool = False,
        ignore_backoff: bool = False,
    ) -> Deferred[dict[str, ServerVerifyKey]]:
        """The requested keys that could be found (a key may be missing: callers decide).

        A key is fetched when it is missing, when its (capped) ``valid_until_ts`` is
        before ``valid_at_ms``, or, for an old key, when its ``expired_ts`` is (as
        Synapse: the server may list it as current again; a notary's copy never makes
        it current again, ``_remember``); the old key is answered if that fetch does not.
        A failing store read fails with its ``StoreError`` (an inbound request
        is then answered 500: the database is unavailable), unless
        ``fetch_if_store_fails``: then it is logged and the keys are fetched as
        if none were stored (the sender's answer check, which needs no database).
        ``ignore_backoff``: fetch even while the server is backed off or in its
        5 s pause, its outcome counting as any fetch's (a success ends the
        back-off), as Synapse fetches keys (``ServerKeyFetcher``,
        ``ignore_backoff=True``), and even beyond the cap on fetches in flight.
        For the sender's answer check only, whose server has just answered us:
        the back-off is what bounds the fetches an inbound request can cause, so
        nothing an inbound request names may pass it.
        A lookup that would start a fetch beyond that cap fails with
        ``KeyFetchBusy`` (a ``MatrixError``, 429 ``M_LIMIT_EXCEEDED``) at once.
        """
        wanted = frozenset(key_ids)
        if self._satisfied(server_name, wanted, valid_at_ms) or server_name in self._local_servers:
            # The hot path (every request and event of a known peer): answered
            # from memory without running a coroutine.
            return succeed(self._answer(server_name, wanted))
        return Deferred.fromCoroutine(
            self._get(server_name, wanted, valid_at_ms, fetch_if_store_fails, ignore_backoff)
        )

    def _satisfied(self, server_name: str, key_ids: frozenset[str], valid_at_ms: int) -> bool:
        """Whether memory holds each of ``key_ids`` valid at ``valid_at_ms``: a current key
        valid until then, an old key expired no earlier (as Synapse keeps an old key, valid
        until its ``expired_ts``, bound included). Otherwise a lookup fetches: the server may
        list a key as current again that it once listed as old (a rotation rolled back)."""
        known = self._memory.get(server_name, {})
        for key_id in key_ids:
            key = known.get(key_id)
            if key is None:
                return False
            if key.expired_ts is not None:
                if key.expired_ts < valid_at_ms:
                    return False
            elif (key.valid_until_ts or 0) < valid_at_ms:
                return False
        return True

    def _answer(self, server_name: str, key_ids: frozenset[str]) -> dict[str, ServerVerifyKey]:
        known = self._memory.get(server_name, {})
        return {key_id: known[key_id] for key_id in key_ids if key_id in known}

    async def _get(
        self,
        server_name: str,
        key_ids: frozenset[str],
        valid_at_ms: int,
        fetch_if_store_fails: bool,
        ignore_backoff: bool,
    ) -> dict[str, ServerVerifyKey]:
        # A key ID that is not an ed25519 key ID of at most 255 characters is never in a key
        # document we accept, so it cannot verify anything: it is not looked for (anyone can
        # sign an event with thousands of such characters, which a fetch's pause would keep).
        key_ids = frozenset(key_id for key_id in key_ids if is_valid_key_id(key_id))
        if self._satisfied(server_name, key_ids, valid_at_ms) or server_name in self._local_servers:
            return self._answer(server_name, key_ids)
        if not is_valid_server_name(server_name) or host_ends_in_dot(server_name):
            # A name whose host ends in a dot (``example.org.``, ``example.org.:8448``) can
            # never be fetched (TLS checks it against the certificate of the name without
            # the dot, and fails): no fetch, no back-off.
            return {}
        if self._closed:
            raise KeyringClosed(server_name)  # the store is closed, or about to be
        try:
            await self._load_from_store(server_name, key_ids, valid_at_ms)
        except StoreError as exc:
            if not fetch_if_store_fails:
                raise
            log.warn(
                "Could not read the stored keys of {server}, fetching them: {reason}",
                server=server_name,
                reason=_describe(exc),
            )
        if self._satisfied(server_name, key_ids, valid_at_ms):
            return self._answer(server_name, key_ids)
        wanted = dict.fromkeys(key_ids, valid_at_ms)
        if ignore_backoff or not self._backing_off(server_name) or server_name in self._inflight:
            # A fetch under way despite a back-off (the sender's) is joined:
            # that costs no fetch more.
            waiter = self._waiter(server_name)
            fetch = self._shared_fetch(server_name, wanted, waiter, ignore_backoff)
            await waiter
            missing = self._missing(server_name, wanted)
            if not missing or not self._notaries or fetch.asked_for(missing, valid_at_ms):
                return self._answer(server_name, key_ids)
            # We joined the fetch after its notary queries went out (or past
            # the key IDs it takes), so no notary was asked for ours (an old
            # key the server no longer lists): one more try, no more.
            if ignore_backoff or not self._backing_off(server_name):
                waiter = self._waiter(server_name)
                self._shared_fetch(server_name, wanted, waiter, ignore_backoff)
                await waiter
                return self._answer(server_name, key_ids)
            # That fetch set the pause: wait for it to end, as below.
            pause_wait = self._wait_for_pause(server_name, missing, only_new=False)
        else:
            pause_wait = self._wait_for_pause(
                server_name, self._missing(server_name, wanted), only_new=True
            )
        if pause_wait is not None:
            await pause_wait
        return self._answer(server_name, key_ids)

    def _wait_for_pause(
        self, server_name: str, missing: Mapping[str, int], *, only_new: bool
    ) -> Deferred[None] | None:
        """Wait for the end of ``server_name``'s pause and the fetch then made for ``missing``
        (key ID -> valid at); None when the lookup is to be answered at once.

        At once: in a failure's back-off (the server is down); when ``only_new`` and the
        fetch that set the pause asked for every key ID of ``missing`` already (asking again
        within 5 s would get the same answer); and when more than
        ``_MAX_KEYS_PER_DOCUMENT`` key IDs would wait (made-up ones, likely). Waiting costs
        no fetch: the one made at the end of the pause serves every lookup that waited, so
        anyone still causes at most one fetch of a server per pause. The wait (at most the
        5 s pause) fits the inbound path: a request is being handled by then (the receive
        deadline has ended) and a fetch alone may take ``outbound.timeout``.
        """
        backoff = self._backoff.get(server_name)
        now_ms = self._now_ms()
        if self._closed:
            return None  # as the pause waits are answered by ``close``
        if backoff is None or backoff.asked is None or not backoff.waiting(now_ms):
            return None
        if only_new and backoff.asked.issuperset(missing):
            return None
        pause_wait = self._pause_waits.get(server_name)
        wanted = {} if pause_wait is None else pause_wait.wanted
        if len(wanted.keys() | missing.keys()) > _MAX_KEYS_PER_DOCUMENT:
            return None
        if pause_wait is None:
            timer = self._clock.callLater(
                (backoff.until_ms - now_ms) / 1000, self._pause_over, server_name
            )
            pause_wait = self._pause_waits[server_name] = _PauseWait(timer)
        _merge_wanted(pause_wait.wanted, missing)
        waiter = self._waiter(server_name)
        pause_wait.waiters[waiter] = None
        return waiter

    def _waiter(self, server_name: str) -> Deferred[None]:
        """A Deferred for a lookup to wait on, for ``server_name``'s fetch or pause: cancelled
        (the lookup's request gone), it leaves whichever holds it (the fetch runs on for the
        others), so that lookups coming and going while a fetch hangs cost nothing after."""

        def leave(waiter: Deferred[None]) -> None:
            fetch = self._inflight.get(server_name)
            if fetch is not None:
                fetch.waiters.pop(waiter, None)
            pause_wait = self._pause_waits.get(server_name)
            if pause_wait is not None:
                pause_wait.waiters.pop(waiter, None)

        return Deferred(leave)

    def close(self) -> None:
        """Stop fetching (the service is stopping, the store to be closed next).

        The lookups waiting for a pause to end are answered with what memory holds (the
        pause's timer cancelled). Every fetch in flight is abandoned: the lookups waiting
        for it fail with ``KeyringClosed``, its client request under way (the server's or
        a notary's) is cancelled, with its timer and connection, and nothing it fetched is
        stored, even an answer that arrives as it is cancelled; no back-off is recorded.
        Later lookups that memory cannot answer fail with ``KeyringClosed`` at once.
        """
        self._closed = True
        pause_waits = list(self._pause_waits.values())
        self._pause_waits.clear()
        for pause_wait in pause_waits:
            if pause_wait.timer.active():
                pause_wait.timer.cancel()
            for waiter in list(pause_wait.waiters):
                if not waiter.called:  # cancelled meanwhile (by an earlier one's caller)
                    waiter.callback(None)
        for server_name, fetch in list(self._inflight.items()):
            waiters, fetch.waiters = fetch.waiters, {}
            for waiter in waiters:
                if not waiter.called:
                    waiter.errback(KeyringClosed(server_name))
            if fetch.request is not None:
                # The fetch raises ``_FetchAbandoned`` when it resumes, and ends.
                fetch.request.cancel()

    def _pause_over(self, server_name: str) -> None:
        """The pause of ``server_name`` has ended: one fetch for the lookups that waited, or,
        at the cap on fetches in flight, their refusal (``KeyFetchBusy``)."""
        try:
            self._shared_fetch(server_name, {}, None)
        except KeyFetchBusy as busy:
            pause_wait = self._pause_waits.pop(server_name, None)
            if pause_wait is not None:
                for waiter in list(pause_wait.waiters):
                    if not waiter.called:  # cancelled meanwhile (by an earlier one's caller)
                        waiter.errback(busy)

    def _missing(self, server_name: str, wanted: Mapping[str, int]) -> dict[str, int]:
        """Those of ``wanted`` (key ID -> valid at) that memory cannot answer."""
        return {
            key_id: valid_at_ms
            for key_id, valid_at_ms in wanted.items()
            if not self._satisfied(server_name, frozenset((key_id,)), valid_at_ms)
        }

    def _backing_off(self, server_name: str) -> bool:
        backoff = self._backoff.get(server_name)
        return backoff is not None and backoff.waiting(self._now_ms())

    async def _load_from_store(
        self, server_name: str, key_ids: frozenset[str], valid_at_ms: int
    ) -> None:
        """Read from the store those of ``key_ids`` that memory does not answer valid at
        ``valid_at_ms`` (at most ``_MAX_KEYS_PER_DOCUMENT``, as many as a fetch looks for),
        never the server's every key: a server may have listed thousands over time."""
        wanted = sorted(self._missing(server_name, dict.fromkeys(key_ids, valid_at_ms)))
        records = await self._store.get_server_keys(server_name, wanted[:_MAX_KEYS_PER_DOCUMENT])
        self._remember(records.values())

    def _remember(self, records: Iterable[ServerKeyRecord]) -> None:
        """Keep ``records`` in memory (see below which answer wins), then drop the keys of
        their servers beyond ``_MAX_KEYS_PER_SERVER`` (``_drop_keys_beyond_the_cap``)."""
        now_ms = self._now_ms()
        # Server name -> the key IDs of ``records``: kept over the server's other keys.
        remembered: dict[str, set[str]] = {}
        for record in records:
            try:
                key = _to_verify_key(record)
            except ValueError:
                log.warn(
                    "Ignoring an undecodable stored key {key_id} of {server}",
                    key_id=record.key_id,
                    server=record.server_name,
                )
                continue
            known = self._loaded(record.server_name)
            fetched = self._fetched_ts.setdefault(record.server_name, {})
            remembered.setdefault(record.server_name, set()).add(record.key_id)
            # Of two answers for the same key, the one fetched last wins (the
            # later one on a tie), as in the store (``store_server_keys``): the
            # server's latest word, which is how a current key becomes old after
            # a rotation, or is revoked early. Only the server itself can make a
            # key known as old current again: a notary's copy may predate the
            # rotation. Memory and the store then give an event check the same
            # verdict, whichever of them answers. An answer held as fetched after now
            # (our clock ran ahead then) is stale, as ``_clock`` has it: any answer
            # replaces it, or none would until the clock caught up.
            held = known.get(record.key_id)
            if (
                held is not None
                and held.expired_ts is not None
                and record.expired_ts is None
                and record.source != record.server_name
            ):
                continue
            held_ts = fetched.get(record.key_id, record.fetched_ts)
            if record.fetched_ts >= held_ts or not in_window(held_ts, now_ms, math.inf):
                known[record.key_id] = key
                fetched[record.key_id] = record.fetched_ts
        for server_name, key_ids in remembered.items():
            self._drop_keys_beyond_the_cap(server_name, key_ids)

    def _drop_keys_beyond_the_cap(self, server_name: str, keep: set[str]) -> None:
        """Drop ``server_name``'s keys in memory beyond ``_MAX_KEYS_PER_SERVER``, those fetched
        least recently first (keys the server no longer lists; on a tie, those held longest),
        never those of ``keep`` (just remembered: a fetched document, at most
        ``_MAX_KEYS_PER_DOCUMENT`` keys, or a lookup's keys read from the store, as many).

        A key dropped stays in the store, which a lookup of it reads again (by key ID). Only
        a server listing more keys over time than a document may hold pays this (one that
        lists fresh key IDs at each fetch, made for lookups of key IDs we do not hold): a real
        server lists a key and the few it rotated out. O(n log n) in the keys held, at most
        twice the cap, and only when over it.
        """
        known = self._memory.get(server_name)
        if known is None or len(known) <= _MAX_KEYS_PER_SERVER:
            return
        fetched = self._fetched_ts.get(server_name, {})
        others = [key_id for key_id in known if key_id not in keep]
        excess = len(known) - _MAX_KEYS_PER_SERVER
        for key_id in heapq.nsmallest(excess, others, key=lambda key_id: fetched.get(key_id, 0)):
            del known[key_id]
            fetched.pop(key_id, None)

    def _loaded(self, server_name: str) -> dict[str, ServerVerifyKey]:
        """``server_name``'s keys in memory (made if new), moved last in the eviction order."""
        # The dict's order is the eviction order. Only loads and fetches move a
        # server, never the hot path's lookups, which stay plain dict reads: a
        # busy peer may be dropped and then costs one store read to reload.
        known = self._memory.pop(server_name, None)
        if known is None:
            known = {}
        self._memory[server_name] = known
        if len(self._memory) > _MEMORY_SIZE:
            self._evict(server_name)
        return known

    def _evict(self, keep: str) -> None:
        """Drop the least recently loaded servers, down to half ``_MEMORY_SIZE``.

        Dropping half at once makes the work amortised O(1) per server loaded.
        Kept: ``keep`` (being loaded now), our own keys (never in the store),
        and servers with a fetch under way (their callers read memory when it
        ends, after awaiting the network and the store).
        """
        excess = len(self._memory) - _MEMORY_SIZE // 2
        victims: list[str] = []
        for name in self._memory:
            if len(victims) >= excess:
                break
            if (
                name != keep
                and name not in self._local_servers
                and name not in self._inflight
                and name not in self._pause_waits
            ):
                victims.append(name)
        for name in victims:
            del self._memory[name]
            self._fetched_ts.pop(name, None)

    def _shared_fetch(
        self,
        server_name: str,
        wanted: Mapping[str, int],
        waiter: Deferred[None] | None,
        ignore_backoff: bool = False,
    ) -> _Fetch:
        """Join the fetch in flight for ``server_name`` (adding ``wanted``, key ID -> valid
        at) or start one; ``waiter`` fires when it ends.

        The fetch takes over the lookups waiting for the server's pause to end, if
        any: theirs is this fetch. Each caller waits on a Deferred of its own
        (``_waiter``), so one cancelled (its request abandoned) does not cancel the
        fetch, and leaves it.

        ``KeyFetchBusy``, with nothing changed, when a fetch would be started with its
        pool's cap in flight already (``max_refreshes_in_flight`` for a server with keys
        in memory, ``max_fetches_in_flight`` for any other; unless ``ignore_backoff``). A
        fetch's slot is freed when it ends, however it ends: every fetch ends within
        the client's timeouts (the server's answer, then each notary's).
        """
        if self._closed:
            raise KeyringClosed(server_name)
        fetch = self._inflight.get(server_name)
        joined = fetch is not None
        if fetch is None:
            # Memory holds the server's stored keys the lookups named by now (``_get`` loads
            # them first; a server waiting for its pause is never evicted), current or not.
            refresh = bool(self._memory.get(server_name))
            cap = self._max_refreshes if refresh else self._max_fetches
            if not ignore_backoff and self._pool_in_flight[refresh] >= cap:
                raise KeyFetchBusy(server_name)
            fetch = _Fetch(ignore_backoff=ignore_backoff, refresh=refresh)
        if ignore_backoff:
            # Joined by the sender's answer check: a fetch that skipped the server (its
            # direct back-off) asks it too once the notaries have answered (``_fetch``).
            fetch.ignore_backoff = True
        fetch.want(wanted)
        if waiter is not None:
            fetch.waiters[waiter] = None
        pause_wait = self._pause_waits.pop(server_name, None)
        if pause_wait is not None:
            if pause_wait.timer.active():
                pause_wait.timer.cancel()
            fetch.want(pause_wait.wanted)
            fetch.waiters.update(pause_wait.waiters)
        if joined:
            return fetch
        self._inflight[server_name] = fetch
        self._pool_in_flight[fetch.refresh] += 1

        def done(_: object) -> None:
            self._inflight.pop(server_name, None)
            self._pool_in_flight[fetch.refresh] -= 1
            waiters, fetch.waiters = fetch.waiters, {}
            for each in waiters:
                if not each.called:  # cancelled meanwhile (by an earlier one's caller)
                    each.callback(None)

        running = Deferred.fromCoroutine(self._fetch(server_name, fetch))
        running.addErrback(_log_crash)
        running.addBoth(done)
        return fetch

    async def _ask(self, fetch: _Fetch, request: Callable[[], Deferred[Any]]) -> Any:
        """The answer to ``request()``, a client request, made unless the keyring is closed;
        ``_FetchAbandoned`` once it is (``close`` cancels the request under way), whatever
        the request's outcome."""
        if self._closed:
            raise _FetchAbandoned()
        asking = fetch.request = request()
        try:
            answer = await asking
        except Exception:
            if self._closed:
                raise _FetchAbandoned() from None
            raise
        finally:
            fetch.request = None
        if self._closed:
            raise _FetchAbandoned()
        return answer

    async def _fetch(self, server_name: str, fetch: _Fetch) -> None:
        """Fetch directly, then from notaries; record success or back off."""
        self.fetches += 1
        # A server that failed to answer is not asked directly again before its own
        # back-off ends, even when a notary answered for it and so only paused it: the
        # notaries are still asked once per pause. The sender's answer check asks it anyway.
        direct = fetch.ignore_backoff or not self._direct_backing_off(server_name)
        listed = await self._fetch_direct(server_name, fetch) if direct else None
        answered = listed is not None
        for notary in self._notaries:
            # Read again for each notary: callers may have joined meanwhile.
            missing = self._missing(server_name, fetch.wanted)
            if not missing:
                break
            fetch.asked.update(missing)
            # The keys the server itself just listed keep its answer: a
            # notary's copy of them can only be as new or older.
            if await self._fetch_from_notary(
                notary, server_name, missing, fetch, listed or frozenset()
            ):
                answered = True
        if not direct and fetch.ignore_backoff and self._missing(server_name, fetch.wanted):
            # The sender's answer check joined this fetch after it skipped the server (its
            # direct back-off), and the notaries lacked a key: ask the server now, as the
            # check's own fetch would have (it has just signed that answer with its key).
            # Only that check passes the direct back-off so; other lookups joining do not.
            direct = True
            listed = await self._fetch_direct(server_name, fetch)
            answered = answered or listed is not None
        direct_failed = (
            direct
            and listed is None
            and not fetch.direct_resolver_busy
            and fetch.client_refused_until_ms is None
            and not fetch.direct_abandoned
            and fetch.direct_not_sent is None
        )
        if self._closed:
            raise _FetchAbandoned()  # closed while storing what it fetched: record nothing
        now_ms = self._now_ms()
        self._forget_ended_pauses(now_ms)
        if listed is not None:
            self._direct_backoff.pop(server_name, None)
        elif direct_failed:
            self._back_off_direct(server_name, now_ms)
        if not self._missing(server_name, fetch.wanted):
            if answered:
                # Every key asked for found: the pause all the same (with the failure's
                # back-off ended), for lookups of other key IDs. A server may list fresh key
                # IDs at each fetch, and anyone can send requests naming the next ones: without
                # it, each would cost a fetch (and the store its keys).
                self._pause(server_name, now_ms, frozenset(fetch.wanted.keys() | fetch.asked))
            else:
                self._backoff.pop(server_name, None)
            return
        self.fetch_failures += 1
        asked = None
        # The delay a next failure doubles, when not ``delay`` (none was doubled now).
        doubles: int | None = None
        if answered:
            # The server (or a notary) answered, just without the key asked
            # for: not a dead server. Anyone can name any server and a made-up
            # key ID, so do not back off on its behalf; only refrain from asking
            # again for a few seconds (bounding the fetches anyone can cause).
            # Lookups of other key IDs meanwhile wait for the pause to end.
            delay = _ANSWERED_REFETCH_MS
            # Without notaries the server's document was all there was to ask.
            asked = frozenset(fetch.asked if self._notaries else fetch.wanted)
        elif fetch.direct_resolver_busy or fetch.notary_resolver_busy:
            # No answer only because our address lookups waited for a resolver thread
            # (busy with lookups that hang, which anyone can cause): not the server's
            # fault, so no back-off (as the client records none). A notary's query alone
            # timing out so excuses only itself: the server's own request failing has backed
            # its key server off above. The fetch has taken the whole timeout, so this asks
            # the server (or the notary) at most once per timeout; the next lookup fetches
            # again.
            log.info(
                "Keys of {server} unavailable: our address lookups were waiting for a"
                " resolver thread; not backing it off",
                server=server_name,
            )
            return
        elif fetch.direct_abandoned or fetch.notary_abandoned:
            # No answer because our client was closed (``FederationClient.close()`` alone,
            # the keyring left open) while a request was finding its destination: never
            # sent, so not the server's failure (as the client records none); the next
            # lookup fetches again.
            log.info(
                "Keys of {server} unavailable: our federation client was closed while"
                " fetching them; not backing it off",
                server=server_name,
            )
            return
        elif fetch.direct_not_sent is not None or fetch.notary_not_sent is not None:
            # A request was not sent, our process or system out of file descriptors or
            # memory, or it timed out having waited for its turn among our requests in
            # flight to that server: not the server's failure (as the client records none);
            # the next lookup fetches again. A notary's query alone not sent excuses only
            # itself: the server's own request failing has backed its key server off above.
            log.info(
                "Keys of {server} unavailable for a cause of ours ({reason}); not backing it off",
                server=server_name,
                reason=fetch.direct_not_sent or fetch.notary_not_sent,
            )
            return
        elif fetch.client_refused_until_ms is not None:
            # Our client refused to send the request (its own back-off of the server): no
            # request was made, so not the server's failure, and its back-off is not
            # doubled. Wait as long as the client will (at least a pause, at most the
            # longest back-off), so that lookups meanwhile cost no fetch nor notary query.
            delay = min(
                max(fetch.client_refused_until_ms - now_ms, _ANSWERED_REFETCH_MS),
                _MAX_BACKOFF_MS,
            )
            previous = self._backoff.get(server_name)
            doubles = 0 if previous is None else previous.delay_ms
        else:
            # Doubling the last delay; after a 5 s pause for an answer without
            # the key, a failure still starts at the minimum.
            delay = _doubled_delay_ms(self._backoff.get(server_name))
        if asked is not None:
            self._pause(server_name, now_ms, asked)
        else:
            _keep_backoff(
                self._backoff,
                server_name,
                _Backoff(now_ms + delay, delay if doubles is None else doubles, now_ms),
                now_ms,
            )
        log.info(
            "Keys of {server} unavailable; not asking again for {seconds} s",
            server=server_name,
            seconds=delay // 1000,
        )

    def _pause(self, server_name: str, now_ms: int, asked: frozenset[str]) -> None:
        """Pause ``server_name`` for ``_ANSWERED_REFETCH_MS`` after a fetch it (or a notary)
        answered, ``asked`` being the key IDs that fetch asked for: a lookup of others meanwhile
        waits for the pause to end (``_wait_for_pause``). Ends a failure's back-off (a failure
        after the pause starts from the minimum again)."""
        delay = _ANSWERED_REFETCH_MS
        _keep_backoff(
            self._backoff, server_name, _Backoff(now_ms + delay, delay, now_ms, asked), now_ms
        )
        self._pauses.append((now_ms, now_ms + delay, server_name))

    def _direct_backing_off(self, server_name: str) -> bool:
        backoff = self._direct_backoff.get(server_name)
        return backoff is not None and backoff.waiting(self._now_ms())

    def _back_off_direct(self, server_name: str, now_ms: int) -> None:
        """Back off the server's own key server after it failed to answer: 1 min, doubling
        the last delay up to 1 h (kept past its end to double the next, as a fetch's)."""
        delay = _doubled_delay_ms(self._direct_backoff.get(server_name))
        _keep_backoff(
            self._direct_backoff, server_name, _Backoff(now_ms + delay, delay, now_ms), now_ms
        )

    def _forget_ended_pauses(self, now_ms: int) -> None:
        """Drop the pauses that are over from the back-off table, with the key IDs they hold.

        Over, a pause changes nothing (a failure's back-off after it starts from the
        minimum), so only the table's bound (``make_room``) would otherwise drop it. A
        failure's back-off stays past its end: the next failure doubles it. Pauses
        all last ``_ANSWERED_REFETCH_MS``, so ``_pauses`` is in the order they end: each
        entry is looked at once, O(1) amortised per pause. (After the clock stepped back,
        a pause still running may stop the scan before others set earlier, which are over:
        they are dropped at most one pause later.)
        """
        pauses = self._pauses
        while pauses:
            since_ms, until_ms, key = pauses[0]
            if in_window(since_ms, now_ms, until_ms):
                return
            pauses.popleft()
            backoff = self._backoff.get(key)
            if backoff is not None and backoff.asked is not None and not backoff.waiting(now_ms):
                del self._backoff[key]

    async def _fetch_direct(self, server_name: str, fetch: _Fetch) -> frozenset[str] | None:
        """Ask the server for its keys; the key IDs it listed, or None if it did not answer.

        An answer we refuse lists none but is an answer: the server is up (asked as
        ``EXAMPLE.org``, example.org answers for ``example.org``: that spelling is
        paused, not backed off). So is an error answer other than a 401, a 429 or a
        5xx (``is_failure_status``, the client's rule). No answer because our address
        lookups waited for a resolver thread marks ``fetch.direct_resolver_busy``; none because
        our client refused to send the request (``BackoffError``), the time it refuses
        until, ``fetch.client_refused_until_ms``; none because our client's ``close()``
        abandoned it (``TransportError.abandoned``), ``fetch.direct_abandoned``; none because
        it was not sent for want of our own file descriptors or memory
        (``TransportError.not_sent``, or ``waited``), ``fetch.direct_not_sent``.
        """
        try:
            # Past the client's back-off of the server (``ignore_backoff``), as Synapse
            # fetches keys: set by other requests (our invites to it while it was down), it
            # must not hold up a request the server sends us once back. The keyring's own
            # back-off and pause bound these fetches; the outcome still counts in the
            # client's back-off (a success ends it, as the server's request would in Synapse).
            response = await self._ask(
                fetch,
                lambda: self._client.get_json(
                    server_name, "/_matrix/key/v2/server", signed=False, ignore_backoff=True
                ),
            )
        except _FetchAbandoned:
            raise
        except Exception as exc:
            log.info(
                "Fetching keys from {server} failed: {reason}",
                server=server_name,
                reason=_describe(exc),
            )
            if isinstance(exc, RemoteError) and not is_failure_status(exc.status):
                # It answered (a 404, a 403): up, as the client judges it too.
                return frozenset()
            if isinstance(exc, BackoffError):
                # Our client refused to send it (a client that keeps its back-off even so):
                # no request was made, so not the server's failure.
                fetch.client_refused_until_ms = int(exc.retry_at * 1000)
            elif isinstance(exc, TransportError) and exc.resolver_busy:
                fetch.direct_resolver_busy = True
            elif isinstance(exc, TransportError) and exc.abandoned:
                fetch.direct_abandoned = True
            elif isinstance(exc, TransportError) and (exc.not_sent or exc.waited):
                fetch.direct_not_sent = exc.reason
            return None
        try:
            records = parse_key_response(response, server_name, self._now_ms(), server_name)
        except Exception as exc:
            log.info(
                "Refused the keys {server} sent: {reason}",
                server=server_name,
                reason=_describe(exc),
            )
            return frozenset()
        await self._keep(records)
        return frozenset(record.key_id for record in records)

    async def _fetch_from_notary(
        self,
        notary: Notary,
        server_name: str,
        wanted: Mapping[str, int],
        fetch: _Fetch,
        listed: frozenset[str] = frozenset(),
    ) -> bool:
        """Ask ``notary`` for ``server_name``'s keys ``wanted`` (key ID -> valid at), keeping
        those not in ``listed`` (the server's own answer of this fetch); whether it answered.

        A well-formed answer (of the server's documents in it, if any, one at least
        signed by the notary; those that are not are skipped) is an answer even
        without the server's document: Synapse's notary
        returns only the documents listing a key ID asked for, so a made-up one
        gets an empty list, and backing the server off for that would let anyone
        stop its lookups. A document of the server we refuse (not self-signed,
        too many keys) is skipped: a refused direct answer is an answer too.
        """
        body = {
            "server_keys": {
                server_name: {
                    key_id: {"minimum_valid_until_ts": valid_at_ms}
                    for key_id, valid_at_ms in wanted.items()
                }
            }
        }
        try:
            # Not through the client's per-server back-off: a notary must itself
            # reach the server asked about, so one slow about a tarpit anyone can
            # name would back off the notary's server name (invites to its users
            # included). Nor a back-off of our own: a failure cannot tell "the
            # notary is down" from "the notary waits on that server", and each
            # server's own back-off already bounds the queries made for it.
            response = await self._ask(
                fetch,
                lambda: self._client.post_json(
                    notary.server_name, "/_matrix/key/v2/query", body, backoff=False
                ),
            )
            documents = self._notary_documents(notary, server_name, response)
        except _FetchAbandoned:
            raise
        except Exception as exc:
            log.info(
                "Notary {notary} gave no keys for {server}: {reason}",
                notary=notary.server_name,
                server=server_name,
                reason=_describe(exc),
            )
            if isinstance(exc, TransportError) and exc.resolver_busy:
                fetch.notary_resolver_busy = True  # our resolver's threads busy: ours
            elif isinstance(exc, TransportError) and exc.abandoned:
                fetch.notary_abandoned = True  # our client's close(), not the server's fault
            elif isinstance(exc, TransportError) and (exc.not_sent or exc.waited):
                fetch.notary_not_sent = exc.reason  # ours (no file descriptors, a wait)
            return False
        records: list[ServerKeyRecord] = []
        now_ms = self._now_ms()
        for document, signed_bytes in documents:
            try:
                records.extend(
                    parse_key_response(
                        document,
                        server_name,
                        now_ms,
                        notary.server_name,
                        signed_bytes=signed_bytes,
                    )
                )
            except KeyFetchError as exc:
                log.info(
                    "Refused the keys of {server} notary {notary} sent: {reason}",
                    server=server_name,
                    notary=notary.server_name,
                    reason=_describe(exc),
                )
        kept = [record for record in records if record.key_id not in listed]
        if kept:
            # Memory takes only the keys asked for and those it holds: a notary's copy never
            # makes a key the store holds as old current (``_remember``), and memory holds
            # only some of the stored keys. Asked for by any lookup of this fetch (read now:
            # those that joined while this query was out too, whose key the notary's document
            # may list though the query did not name it); each read its stored copies first.
            held = self._memory.get(server_name, {})
            await self._keep(
                kept,
                [
                    record
                    for record in kept
                    if record.key_id in fetch.wanted or record.key_id in held
                ],
            )
        return True

    def _notary_documents(
        self, notary: Notary, server_name: str, response: object
    ) -> list[tuple[dict[str, Any], bytes]]:
        """The documents for ``server_name`` in a notary's answer signed by the notary, each
        with the bytes that signature covers (the server's self-signature covers them too).

        Each document is judged on its own, as Synapse does: one without the notary's
        signature is skipped with a log line, the others kept. ``KeyFetchError`` (no
        answer) when none of the server's documents bears it, the first one's reason."""
        if not isinstance(response, dict) or not isinstance(response.get("server_keys"), list):
            raise KeyFetchError("notary response has no server_keys list")
        documents = []
        refused: list[KeyFetchError] = []
        for document in response["server_keys"]:
            if not isinstance(document, dict) or document.get("server_name") != server_name:
                continue  # answers about other servers are not what we asked
            try:
                documents.append((document, self._check_notary_signature(notary, document)))
            except KeyFetchError as exc:
                refused.append(exc)
        if refused and not documents:
            raise refused[0]
        for error in refused:
            log.info(
                "Refused a copy of the keys of {server} notary {notary} sent: {reason}",
                server=server_name,
                notary=notary.server_name,
                reason=_describe(error),
            )
        return documents

    @staticmethod
    def _check_notary_signature(notary: Notary, document: dict[str, Any]) -> bytes:
        """The first signature of ``document`` by a key configured for ``notary`` holds; the
        document's ``signing_bytes`` (encoded once, for this check and the server's)."""
        keys = {
            key_id: ServerVerifyKey(
                notary.server_name, key_id, decode_verify_key(key_id, key), None
            )
            for key_id, key in notary.verify_keys
        }
        try:
            data = signing_bytes(document)
            verify_json_with_one_of(document, notary.server_name, keys, data=data)
        except SignatureError as exc:
            raise KeyFetchError(f"notary signature invalid: {exc}") from None
        return data

    async def _keep(
        self, records: list[ServerKeyRecord], remember: list[ServerKeyRecord] | None = None
    ) -> None:
        """Store ``records``, and keep ``remember`` (all of them if None) in memory."""
        self._remember(records if remember is None else remember)
        try:
            await self._store.store_server_keys(records)
        except Exception as exc:
            # The keys were checked and are usable now; failing to persist
            # them only costs a refetch later.
            log.warn("Could not store fetched keys: {reason}", reason=_describe(exc))


def _log_crash(failure: Failure) -> None:
    """A fetch's end by an exception: none expected but ``_FetchAbandoned`` (closed)."""
    if not failure.check(_FetchAbandoned):
        log.failure("Key fetch crashed", failure)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"
