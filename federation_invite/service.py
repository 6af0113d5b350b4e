"""The composition root: the only place concrete classes are wired together.

The twistd plugin, the CLI and the embedding API all come through here:

- ``build_components(...)`` assembles a ``FederationInvite`` from ready parts
  (store, signing key, optionally your own signer, client, hooks, listeners);
- ``build_from_config(config, reactor)`` loads the key, opens (and migrates)
  the store and assembles everything a configuration describes;
- ``FederationInvite.matrix_resource()`` is the ``/_matrix`` subtree to
  ``putChild(b"_matrix", ...)`` into any ``twisted.web`` ``Site``;
- ``make_service(config, reactor)`` is the daemon: the same, plus listeners.
"""

from __future__ import annotations

import atexit
import gc
import inspect
import math
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import attrs
from signedjson.types import SigningKey
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from zope.interface import implementer

from .auth import RequestAuthenticator, ServerAcl
from .client import FederationClient
from .client.errors import CancelledBeforeSending
from .config import Config, ConfigError, load_config
from .core.ids import server_name_of
from .core.keys import key_id_of
from .core.roomversions import KNOWN_ROOM_VERSIONS, RoomVersion
from .core.signing import ServerVerifyKey, verify_event_signature
from .inbound import InviteHandler, InviteLimits, InviteListener
from .keyring import Keyring, OldKey, local_verify_keys
from .logs import Logger
from .metrics import InviteMetrics, metrics_available
from .outbound import (
    InvalidInviteAnswer,
    InviteNotSendable,
    InviteRefused,
    InviteSender,
    InviteTransportError,
)
from .policy import InvitePolicy, InvitePolicyHook
from .signer import ISigner, LocalSigner, check_signer
from .signingkey import SigningKeyError, load_or_create_signing_keys
from .store import IStore, StoreError, open_store
from .web._base import MatrixResource
from .web.invite import InviteResource
from .web.keys import KeyServerResource
from .web.metrics import MetricsResource, build_metrics_root
from .web.site import FederationSite
from .web.tree import WellKnownServerResource, build_matrix_tree

__all__ = [
    "FederationInvite",
    "FederationInviteService",
    "build_components",
    "build_from_config",
    "build_site_root",
    "make_service",
]

log = Logger(namespace="federation_invite.service")

#: The daemon's threshold for the cyclic collector's youngest generation (Python's: 700).
GEN0_THRESHOLD = 10_000

#: Seconds after which a database still opening at start is worth a warning.
SLOW_OPEN_WARNING_SECONDS = 5.0

#: The room version of the event a signer signs at start (``_probe_signer``): a stable one.
_PROBE_ROOM_VERSION = "10"

#: How long ``build_from_config`` waits for a signer's answer to its probe event (a
#: remote signer or an HSM answering later) before failing with ``ConfigError``.
SIGNER_PROBE_TIMEOUT_SECONDS = 30.0


def settle_gc() -> None:
    """Tune the cyclic collector for serving, once start-up is done.

    What exists now (modules, the composed services, configuration) lives as
    long as the process: it is moved out of the collector's way, so full
    collections under load walk only what requests create (as Synapse does
    after start-up). Measured: about 25 us less per invite under load
    (benchmarks/README.md).

    The invites in flight together hold thousands of young objects, and leave
    next to no cyclic garbage: at Python's default (700) the youngest
    generation was collected about every 12 invites, each time walking all of
    them and finding nothing, 10-13 us per invite in-process
    (benchmarks/README.md). Cyclic garbage (a refusal's traceback) still
    triggers a collection once ``GEN0_THRESHOLD`` objects of it pile up.
    """
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, *gc.get_threshold()[1:])


def build_site_root(matrix: Resource) -> Resource:
    """A site root that serves ``/_matrix`` and answers everything else with JSON 404."""
    root = MatrixResource()
    root.putChild(b"_matrix", matrix)
    return root


@attrs.define
class FederationInvite:
    """Everything assembled: mount ``matrix_resource()``, register hooks and listeners."""

    config: Config
    clock: IReactorTime
    signing_key: SigningKey
    store: IStore
    client: Any
    keyring: Keyring
    signer: ISigner
    policy: InvitePolicy
    handler: InviteHandler
    key_server: KeyServerResource
    metrics: InviteMetrics
    sender: InviteSender
    #: The ``send_invite`` calls in flight, cancelled by ``close``.
    _sending: set[Deferred[dict[str, Any]]] = attrs.field(factory=set, init=False)
    #: Set by ``close``: ``send_invite`` refuses at once.
    _closed: bool = attrs.field(default=False, init=False)

    @property
    def server_name(self) -> str:
        return self.config.server_name

    def matrix_resource(self) -> Resource:
        """The ``_matrix`` subtree: key server, version and the v1/v2 invite endpoints."""
        max_body = self.config.get("inbound.max_body_bytes")
        return build_matrix_tree(
            self.key_server,
            {
                (b"federation", b"v1", b"invite"): InviteResource(self.handler, 1, max_body),
                (b"federation", b"v2", b"invite"): InviteResource(self.handler, 2, max_body),
            },
        )

    def site_root(self) -> Resource:
        """A whole site: ``/_matrix``, ``/.well-known/matrix/server`` if configured, JSON 404s."""
        root = build_site_root(self.matrix_resource())
        delegated = self.config.get("well_known_server")
        if delegated:
            well_known = MatrixResource()
            matrix = MatrixResource()
            well_known.putChild(b"matrix", matrix)
            matrix.putChild(b"server", WellKnownServerResource(delegated))
            root.putChild(b".well-known", well_known)
        return root

    def site(self, root: Resource) -> FederationSite:
        """A ``FederationSite`` serving ``root`` with the ``inbound.*`` connection limits
        (body cap, request deadline, idle timeout): what the daemon listens with.

        Every resource under ``root`` gets these limits and JSON answers for
        malformed HTTP, an embedding application's own resources included.
        """
        return FederationSite(root, reactor=self.clock, **_site_limits(self.config))

    def metrics_resource(self) -> Resource:
        """``GET`` (and ``HEAD``): the metrics in Prometheus' text format, to mount where
        you like (``root.putChild(b"metrics", ...)``); other methods and child paths get
        JSON 405 and 404 ``M_UNRECOGNIZED``. A ``RuntimeError`` saying why when the metrics
        are off (built without ``metrics=True``, or without the ``metrics`` extra)."""
        self.metrics.check_enabled()
        return MetricsResource(self.metrics)

    async def send_invite(
        self,
        room_version: RoomVersion | str,
        event: Mapping[str, Any],
        invite_room_state: Sequence[Mapping[str, Any]] = (),
        *,
        destination: str | None = None,
    ) -> dict[str, Any]:
        """Invite a remote user: ``InviteSender.send_invite``, counted in the metrics.

        Returns the event signed by both servers, verified; raises an
        ``outbound.InviteError`` (``InviteRefused``, ``InviteTransportError``,
        ``InvalidInviteAnswer``, ``InviteNotSendable``) otherwise. ``close`` abandons
        the invites in flight (``InviteTransportError``, "not answered: the service is
        stopping", ``not_sent`` false: they may have been sent; "not sent: the service is
        stopping", ``not_sent`` true, for those still waiting for their turn behind the
        invites in flight to their server); after it, nothing is sent ("not sent: the
        service is closed", ``not_sent`` true).
        """
        try:
            if self._closed:
                raise InviteTransportError(
                    _invite_destination(event, destination),
                    "not sent: the service is closed",
                    not_sent=True,
                )
            sending = self.sender.send_invite(
                room_version, event, invite_room_state, destination=destination
            )
            self._sending.add(sending)
            sending.addBoth(_forget, self._sending, sending)
            try:
                signed = await sending
            except CancelledError as exc:
                if not self._closed:
                    raise  # our caller cancelled
                if isinstance(exc, CancelledBeforeSending):  # waiting for its turn
                    raise InviteTransportError(
                        _invite_destination(event, destination),
                        "not sent: the service is stopping",
                        not_sent=True,
                    ) from None
                raise InviteTransportError(
                    _invite_destination(event, destination),
                    "not answered: the service is stopping",
                ) from None
        except InviteRefused as exc:
            self.metrics.outbound("refused", exc.errcode)
            raise
        except InviteTransportError:
            self.metrics.outbound("transport")
            raise
        except InvalidInviteAnswer:
            self.metrics.outbound("invalid_answer")
            raise
        except InviteNotSendable:
            self.metrics.outbound("not_sent")
            raise
        self.metrics.outbound("accepted")
        return signed

    def add_listener(self, listener: InviteListener) -> None:
        """Be told (after the commit) of every invite accepted and not ignored.

        ``TypeError`` for an object that is not callable.
        """
        self.handler.add_listener(listener)

    def add_policy_hook(self, hook: InvitePolicyHook) -> None:
        """Let ``hook.check_invite(invite)`` refuse invites with its own reason.

        ``TypeError`` for an object without a callable ``check_invite``.
        """
        self.policy.add_hook(hook)

    async def close(self, timeout: float = 5.0) -> None:
        """Release outbound connections and the database, once the invites being stored
        are (each wait at most ``timeout`` seconds).

        The outbound requests still in flight then are abandoned, their timers and
        connections with them: ``send_invite`` calls fail with ``InviteTransportError``,
        key fetches (``Keyring.close``) fail their lookups with ``KeyringClosed`` and
        store nothing. ``send_invite`` refuses at once from the start of the close.
        """
        self._closed = True
        settled = self.handler.settle()
        settled.addTimeout(timeout, self.clock)
        try:
            await settled
        except defer.TimeoutError:
            log.warn(
                "Closing the database with {count} invite(s) still being stored, not done"
                " after waiting {timeout} s for them",
                count=self.handler.storing,
                timeout=timeout,
            )
        except Exception as exc:
            log.warn("Closing the database with invites still being stored: {reason}", reason=exc)
        for sending in list(self._sending):
            sending.cancel()  # each caller gets InviteTransportError (``send_invite``)
        self.keyring.close()
        close_client = getattr(self.client, "close", None)
        if close_client is not None:
            closing: Deferred[None] = close_client()
            # A peer that never completes the TLS close must not hold up shutdown.
            closing.addTimeout(timeout, self.clock)
            try:
                await closing
            except Exception as exc:
                log.warn("Outbound connections not closed cleanly: {reason}", reason=str(exc))
        await self.store.close()


def _forget(result: object, calls: set[Deferred[Any]], call: Deferred[Any]) -> object:
    """Drop ``call``, ended, from ``calls``, and pass its ``result`` on."""
    calls.discard(call)
    return result


def _invite_destination(event: Mapping[str, Any], destination: str | None) -> str:
    """The server ``send_invite`` sends ``event`` to: ``destination`` if given, else the
    invitee's (its ``state_key``'s; ``?`` for an event without one)."""
    if destination is not None:
        return destination
    try:
        return server_name_of(event.get("state_key"))
    except (AttributeError, ValueError):
        return "?"


def _site_limits(config: Config) -> dict[str, Any]:
    """``FederationSite``'s keyword arguments for the configured ``inbound.*`` limits."""
    return {
        "max_body_bytes": config.get("inbound.max_body_bytes"),
        "request_timeout": config.get("inbound.request_timeout"),
        "idle_timeout": config.get("inbound.idle_timeout"),
    }


def _limits(config: Config) -> InviteLimits:
    return InviteLimits(
        origin_per_second=config.get("ratelimit.origin_per_second"),
        origin_burst=config.get("ratelimit.origin_burst"),
        origin_concurrent=config.get("ratelimit.origin_concurrent"),
        invitee_per_second=config.get("ratelimit.invitee_per_second"),
        invitee_burst=config.get("ratelimit.invitee_burst"),
        origin_sleep_after=config.get("ratelimit.origin_sleep_after"),
        origin_sleep_ms=config.get("ratelimit.origin_sleep_ms"),
    )


def build_components(
    config: Config,
    reactor: Any,
    store: IStore,
    signing_key: SigningKey,
    *,
    client: Any = None,
    agent: IAgent | None = None,
    signer: ISigner | None = None,
    hooks: Sequence[InvitePolicyHook] = (),
    listeners: Iterable[InviteListener] = (),
    metrics: bool | None = None,
) -> FederationInvite:
    """Assemble the services from ready parts (``client`` defaults to a ``FederationClient``).

    ``metrics``: count in ``FederationInvite.metrics`` (True; a ``ConfigError`` without the
    ``metrics`` extra), not (False), or only when ``metrics.listen`` is set (None, the
    daemon's way: it listens there).

    ``agent`` (an ``IAgent``; not with ``client``) is what that default client sends
    through instead of server discovery and TLS: tests give a
    ``federation_invite.testing.FakePeersAgent`` serving their fake homeservers.

    A ``signer`` given must provide ``ISigner`` (``server_name``, ``sign_event``
    and ``hash_and_sign_event``): else ``TypeError``, before anything is built;
    its ``server_name`` must be the configured one: else ``ConfigError``. It
    must sign with ``signing_key``, the key the key server publishes: it signs
    a probe event (``_probe_signer``), and a signature that does not verify is
    a ``ConfigError`` raised here when the signer answers at once; when it
    answers later (a remote signer), it is logged as critical then, and
    ``build_from_config`` waits for that answer and raises it instead.
    """
    components, probing = _assemble(
        config,
        reactor,
        store,
        signing_key,
        client=client,
        agent=agent,
        signer=signer,
        hooks=hooks,
        listeners=listeners,
        metrics=metrics,
    )

    def refused(failure: Failure) -> None:
        reason = _failure_reason(cast(BaseException, failure.value))
        log.critical("The signer cannot be used: {reason}", reason=reason)

    probing.addErrback(refused)
    return components


def _assemble(
    config: Config,
    reactor: Any,
    store: IStore,
    signing_key: SigningKey,
    *,
    client: Any = None,
    agent: IAgent | None = None,
    signer: ISigner | None = None,
    hooks: Sequence[InvitePolicyHook] = (),
    listeners: Iterable[InviteListener] = (),
    metrics: bool | None = None,
) -> tuple[FederationInvite, Deferred[None]]:
    """``build_components``, with the signer's probe still to be waited for if it did not
    answer at once (a probe that failed at once is raised before anything is built)."""
    if client is not None and agent is not None:
        raise TypeError("give build_components a client or an agent, not both")
    counting = _counting(config, metrics)
    if signer is not None:
        _check_signer_for(config, signer)
    server_name = config.server_name
    config.check_signing_key_id(key_id_of(signing_key))
    if signer is None:
        signer = LocalSigner(server_name, signing_key)
    # Our old keys verify the events we signed with them (not requests), as for any server.
    local_keys = local_verify_keys(server_name, signing_key, config.get("keys.old_verify_keys"))
    probing = _probe_signer(reactor, config, signer, local_keys)
    if probing.called:
        failed: list[Failure] = []
        probing.addErrback(failed.append)
        if failed:
            failed[0].raiseException()
    if client is None:
        client = FederationClient(
            reactor,
            server_name,
            signing_key,
            verify_tls=config.get("outbound.verify_tls"),
            ip_blocklist=config.get("outbound.ip_blocklist"),
            ip_allowlist=config.get("outbound.ip_allowlist"),
            timeout=config.get("outbound.timeout"),
            agent=agent,
            concurrent_per_destination=config.get("outbound.destination_concurrent"),
        )
    keyring = Keyring(
        reactor, store, client, local_keys=local_keys, notaries=config.get("keys.notaries")
    )
    acl = ServerAcl.of(config.get("inbound.server_allow"), config.get("inbound.server_deny"))
    policy = InvitePolicy(
        server_name,
        store,
        local_users=config.get("inbound.local_users"),
        server_deny=config.get("inbound.server_deny"),
        user_deny=config.get("inbound.user_deny"),
        hooks=hooks,
        clock=reactor,
        cache_seconds=config.get("inbound.policy_cache_seconds"),
    )
    invite_metrics = InviteMetrics(enabled=counting)
    invite_metrics.watch_key_fetches(lambda: (keyring.fetches, keyring.fetch_failures))
    handler = InviteHandler(
        reactor,
        server_name,
        RequestAuthenticator(reactor, server_name, keyring, acl),
        keyring,
        signer,
        store,
        policy,
        limits=_limits(config),
        strict_invite_room_state=config.get("inbound.strict_invite_room_state"),
        listeners=listeners,
        metrics=invite_metrics,
    )
    key_server = KeyServerResource(
        reactor,
        server_name,
        [signing_key],
        config.get("keys.old_verify_keys"),
        validity_ms=config.get("keys.validity_period") * 1000,
    )
    components = FederationInvite(
        config,
        reactor,
        signing_key,
        store,
        client,
        keyring,
        signer,
        policy,
        handler,
        key_server,
        invite_metrics,
        InviteSender(signer, client, keyring),
    )
    return components, probing


def _counting(config: Config, metrics: bool | None) -> bool:
    """Whether to count (``build_components``'s ``metrics``); ``ConfigError`` for True
    without the ``metrics`` extra."""
    if metrics is None:
        return bool(config.get("metrics.listen"))
    if metrics and not metrics_available():
        raise ConfigError(
            "metrics=True needs the 'metrics' extra (prometheus-client): "
            "pip install 'federation-invite[metrics]'"
        )
    return bool(metrics)


def _probe_signer(
    reactor: Any, config: Config, signer: ISigner, published: Sequence[ServerVerifyKey]
) -> Deferred[None]:
    """Have ``signer`` hash and sign a probe event (an ``m.room.member`` of ours), and check
    its signature with the keys the key server publishes (``published``, as the keyring
    has them): else a ``ConfigError``, as no peer could verify what it signs and
    ``send_invite`` would refuse it. A signer that fails fails this with its error.
    """
    server_name = config.server_name
    room_version = KNOWN_ROOM_VERSIONS[_PROBE_ROOM_VERSION]
    user = f"@signer-probe:{server_name}"
    event = {
        "type": "m.room.member",
        "state_key": user,
        "sender": user,
        "room_id": f"!signer-probe:{server_name}",
        "content": {"membership": "join"},
        "origin_server_ts": int(reactor.seconds() * 1000),
        "depth": 1,
        "prev_events": [],
        "auth_events": [],
    }
    keys = {(key.server_name, key.key_id): key for key in published}

    def check(signed: Any) -> None:
        try:
            verify_event_signature(room_version, signed, server_name, keys)
        except Exception as exc:
            try:
                used = ", ".join(sorted(signed["signatures"][server_name])) or "no key"
            except Exception:
                used = "no key"
            raise ConfigError(
                f"the signer signs with a key this server does not publish: its signature on "
                f"a probe event is by {used}, and the key document publishes {published[0].key_id}"
                f" (configuration key 'signing_key', {config.signing_key_path}), the key an "
                f"ISigner must sign with ({exc})"
            ) from exc

    probing: Deferred[None] = defer.maybeDeferred(
        signer.hash_and_sign_event, room_version, event
    ).addCallback(check)
    return probing


def _check_signer_for(config: Config, signer: object) -> None:
    """Refuse what is no ``ISigner`` (``TypeError``), and a signer for another server than
    the configured one (``ConfigError``, a ``ValueError``): every invite would fail."""
    check_signer(signer)
    name = cast(ISigner, signer).server_name
    if name != config.server_name:
        raise ConfigError(
            f"configuration key 'server_name': the signer signs for {name!r}, not for this "
            f"server, {config.server_name!r}"
        )


def _load_key(config: Config) -> SigningKey:
    keys, created = load_or_create_signing_keys(config.signing_key_path)
    key = keys[0]
    log.info(
        "{action} signing key {key_id} at {path}",
        action="Generated a new" if created else "Loaded",
        key_id=key_id_of(key),
        path=config.signing_key_path,
    )
    if not created:
        _warn_if_open_to_others(config.signing_key_path)
        _warn_of_unused_keys(config.signing_key_path, keys, config.get("keys.old_verify_keys"))
    return key


def _data_dir_and_key(config: Config) -> SigningKey:
    """Create the data directory if missing, then load (or create) the signing key and check
    its ID against ``keys.old_verify_keys``. What only the file system can tell (a data
    directory that cannot be one, a key file that cannot be read, created or parsed) is a
    ``ConfigError`` naming the key, the original error as its cause."""
    config.ensure_data_dir()
    try:
        key = _load_key(config)
    except SigningKeyError as exc:
        raise ConfigError(f"configuration key 'signing_key': {exc}") from exc
    except OSError as exc:
        raise ConfigError(
            f"configuration key 'signing_key': cannot create signing key file "
            f"{config.signing_key_path}: {exc.strerror or exc}"
        ) from exc
    config.check_signing_key_id(key_id_of(key))
    return key


def _warn_of_unused_keys(path: str, keys: list[SigningKey], old_keys: Iterable[OldKey]) -> None:
    """Warn when the key file holds keys after the one we use (a Synapse key file may) whose
    IDs are not under keys.old_verify_keys: they neither sign nor are published, so what they
    signed no longer verifies."""
    listed = {old.key_id for old in old_keys}
    unused = [key_id_of(other) for other in keys[1:] if key_id_of(other) not in listed]
    if unused:
        log.warn(
            "Signing key file {path} holds {count} keys: only the first, {key_id}, signs and is"
            " published; not used: {unused} (list them under keys.old_verify_keys to keep"
            " verifying what they signed)",
            path=path,
            count=len(keys),
            key_id=key_id_of(keys[0]),
            unused=", ".join(unused),
        )


def _warn_if_open_to_others(path: str) -> None:
    """Warn, as ssh does, about a key file that others than its owner may read or change.

    Loaded all the same: refusing would stop a daemon that ran yesterday.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return  # it was just read; nothing more to say about it
    if mode & 0o077:
        log.warn(
            "Signing key file {path} has mode {mode}: others than its owner may read or change "
            "it; chmod 600 it",
            path=path,
            mode=f"{mode:04o}",
        )


def open_configured_store(config: Config, reactor: Any) -> Deferred[IStore]:
    """Open (and migrate) ``config``'s database as its keys say (``database``,
    ``database_pool_size``): how the daemon, ``build_from_config`` and the operator's
    store commands open it, so that they cannot differ."""
    return open_store(config.database, reactor=reactor, pool_size=config.get("database_pool_size"))


async def build_from_config(
    config: Config | str | None, reactor: Any, **kwargs: Any
) -> FederationInvite:
    """Load the key, open and migrate the store, and assemble: the embedding entry point.

    ``config`` is a ``Config``, a path to a TOML file, or None for the built-in
    defaults; ``kwargs`` go to ``build_components`` (signer, hooks, listeners...).

    Raises ``ConfigError`` (a ``ValueError`` naming the key) for the configuration, the
    data directory, the signing key file and a signer that does not sign with our key, as
    ``make_service`` does; ``TypeError`` for a keyword argument ``build_components`` would
    refuse; ``StoreError`` (``SchemaVersionError`` among them) for the database. Nothing
    it opened is left open.
    """
    signer = kwargs.get("signer")
    if signer is not None:
        check_signer(signer)  # before any file or database is opened
    if not isinstance(config, Config):
        config = load_config(config)
    if signer is not None:
        _check_signer_for(config, signer)  # before any file or database is opened
    _check_arguments(config, kwargs)
    key = _data_dir_and_key(config)  # before the database is opened
    store = await open_configured_store(config, reactor)
    try:
        components, probing = _assemble(config, reactor, store, key, **kwargs)
    except Exception:
        await _close_after_failure(store)
        raise
    try:
        await _probe_answer(probing, reactor)  # a remote signer's answer to the probe
    except BaseException:
        try:
            await components.close()
        except Exception:
            log.failure("Could not close the components after failing to start")
        raise
    return components


async def _probe_answer(probing: Deferred[None], reactor: Any) -> None:
    """Wait for the signer's answer to the probe, for ``SIGNER_PROBE_TIMEOUT_SECONDS`` at
    most: then its Deferred is cancelled and ``ConfigError`` says the signer is silent."""
    if not probing.called:
        probing.addTimeout(SIGNER_PROBE_TIMEOUT_SECONDS, reactor)
    try:
        await probing
    except defer.TimeoutError:
        raise ConfigError(
            f"the signer did not answer a probe event within "
            f"{SIGNER_PROBE_TIMEOUT_SECONDS:g} s: it cannot sign invites"
        ) from None


def _check_arguments(config: Config, kwargs: dict[str, Any]) -> None:
    """Refuse, before a database is opened for nothing, what ``build_components`` would
    refuse of its keyword arguments: an unknown one, a hook without ``check_invite``
    (``TypeError`` both)."""
    inspect.signature(build_components).bind(config, None, None, None, **kwargs)
    _counting(config, kwargs.get("metrics"))
    if "hooks" in kwargs:
        hooks = kwargs["hooks"] = list(kwargs["hooks"])  # an iterator is read once
        # InvitePolicy.add_hook's own check; the policy reads no store until an invite.
        InvitePolicy(config.server_name, cast(Any, None), hooks=hooks)


async def _close_after_failure(store: IStore) -> None:
    """Close a store opened for components that could not be built (the caller then
    raises the build's error, which a failure to close must not replace)."""
    try:
        await store.close()
    except Exception:
        log.failure("Could not close the database after failing to start")


@implementer(IStreamServerEndpoint)
class _NotAcceptingYet:
    """``endpoint``, whose ports stop accepting as soon as they are bound.

    Each is added to ``ports``; until the service serves and has it accept
    (``startReading``), a connection made waits in the kernel's backlog (as on
    a socket systemd holds for us) instead of being accepted before there is
    anything to serve it with. Every port of the POSIX reactors (TCP, TLS, UNIX,
    adopted from systemd) can pause so; one that cannot (the Windows IOCP
    reactor's) accepts at once, and the placeholder root answers 404 until then.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        ports: list[Any],
        tls: _ReloadableTLS | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._ports = ports
        #: An ``ssl:`` (or TLS ``systemd:``) endpoint's TLS settings (``reload_tls``).
        self.tls = tls

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._endpoint.listen(factory).addCallback(self._pause)

    def _pause(self, port: IListeningPort) -> IListeningPort:
        pausable = cast(Any, port)
        if hasattr(pausable, "stopReading") and hasattr(pausable, "startReading"):
            pausable.stopReading()
            self._ports.append(pausable)
        return port


def _server_endpoint(
    reactor: Any, description: str, tls: list[_ReloadableTLS] | None = None
) -> IStreamServerEndpoint:
    """The endpoint ``description`` names, as Twisted's ``serverFromString`` builds it, except
    that an ``ssl:`` endpoint without ``extraCertChain`` serves the certificates of its
    ``certKey`` file after the first (a CA's ``fullchain.pem``: leaf, then intermediates) as
    the chain. Twisted would use the first alone, and send peers a leaf they cannot verify.

    An ``ssl:`` endpoint's TLS settings are a ``_ReloadableTLS``, added to ``tls`` if given,
    whose ``reload`` reads its files again for the connections accepted after it. A
    ``systemd:`` endpoint given ``ssl:``'s TLS arguments (``SYSTEMD_TLS_KEYWORDS``) serves
    TLS on systemd's socket with such settings too (``_TLSServerEndpoint``): socket
    activation is how a port below 1024 is served without root, and federation is TLS.
    """
    from twisted.internet import endpoints

    args, keywords = endpoints._parse(description)
    if args[0] == "systemd":
        given = {key: keywords.pop(key) for key in SYSTEMD_TLS_KEYWORDS if key in keywords}
        endpoint = _systemd_endpoint(reactor, args[1:], keywords)
        if not given:
            return endpoint
        # ssl:'s TLS arguments, read as Twisted's parser reads an ssl: endpoint's (a port
        # to parse, never listened on).
        bound = inspect.signature(endpoints._parseSSL).bind(None, "0", **given)
        bound.apply_defaults()
        _, options, _ = _tls_options(bound)
        settings = _ReloadableTLS(description, bound, options)
        if tls is not None:
            tls.append(settings)
        return _TLSServerEndpoint(endpoint, settings)
    if args[0] == "unix":
        return _unix_endpoint(reactor, description, args[1:], keywords)
    if args[0] != "ssl":
        return endpoints.serverFromString(reactor, description)
    bound = inspect.signature(endpoints._parseSSL).bind(None, *args[1:], **keywords)
    bound.apply_defaults()
    # Twisted's own parser reads and checks the files (its errors are the operator's).
    port, options, placement = _tls_options(bound)
    settings = _ReloadableTLS(description, bound, options)
    if tls is not None:
        tls.append(settings)
    return endpoints.SSL4ServerEndpoint(reactor, port, settings, **placement)


#: The longest path a Unix socket address holds: ``sun_path``'s size (Linux's 108 bytes,
#: the BSDs' and macOS's 104) less the terminating NUL Python's ``bind`` leaves room for
#: (a longer path: "AF_UNIX path too long").
UNIX_PATH_LONGEST = 103 if sys.platform == "darwin" or "bsd" in sys.platform else 107


def _unix_endpoint(
    reactor: Any, description: str, positional: Sequence[str], keywords: dict[str, str]
) -> IStreamServerEndpoint:
    """A ``unix:`` endpoint, as Twisted's ``serverFromString`` builds it, except that an
    address over ``UNIX_PATH_LONGEST`` bytes under the working directory is bound relative to
    it. The configuration makes a relative address absolute from the start directory (for
    twistd's ``--rundir``), which a deep start directory makes too long for the kernel:
    relative to the working directory (the start directory, unless ``--rundir`` named
    another) it is the same file. A long address not under it is a ``ConfigError``."""
    from twisted.internet import endpoints

    (address, _), arguments = endpoints._parseUNIX(None, *positional, **keywords)
    size = len(os.fsencode(address))
    if size <= UNIX_PATH_LONGEST or address.startswith("\0"):
        return endpoints.serverFromString(reactor, description)
    try:
        directory = os.path.join(os.getcwd(), "")
    except OSError:
        directory = None  # removed since: no path is under it
    relative = address[len(directory) :] if directory and address.startswith(directory) else ""
    if not relative:
        where = "not under the working directory"
    elif len(os.fsencode(relative)) > UNIX_PATH_LONGEST:
        where = "too long relative to the working directory too"
    else:
        return endpoints.UNIXServerEndpoint(reactor, relative, **arguments)
    raise ConfigError(
        f"the socket's path is {size} bytes, over the {UNIX_PATH_LONGEST} a Unix socket address "
        f"holds, and {where}: give a shorter absolute path"
    )


#: The ``ssl:`` arguments a ``systemd:`` endpoint takes to serve TLS on its socket.
SYSTEMD_TLS_KEYWORDS = ("privateKey", "certKey", "extraCertChain", "dhParameters", "sslmethod")


@implementer(IStreamServerEndpoint)
class _TLSServerEndpoint:
    """``endpoint`` (a ``systemd:`` socket's) serving TLS with ``tls``, as the reactor's
    ``listenSSL`` serves an ``ssl:`` port's: the factory wrapped in Twisted's TLS factory."""

    def __init__(self, endpoint: IStreamServerEndpoint, tls: _ReloadableTLS) -> None:
        self._endpoint = endpoint
        self._tls = tls

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return self._endpoint.listen(TLSMemoryBIOFactory(self._tls, False, factory))


def _tls_options(bound: inspect.BoundArguments) -> tuple[int, Any, dict[str, Any]]:
    """An ``ssl:`` endpoint's port, ``CertificateOptions`` read from its files, and where
    it listens, from its arguments to Twisted's ``_parseSSL`` (``_server_endpoint``)."""
    from cryptography import x509
    from OpenSSL import SSL
    from OpenSSL.crypto import X509
    from twisted.internet import endpoints
    from twisted.internet.ssl import CertificateOptions

    (port, _, options), placement = endpoints._parseSSL(*bound.args, **bound.kwargs)
    given = bound.arguments
    if given["extraCertChain"] is None:
        with open(given["certKey"] or given["privateKey"], "rb") as handle:
            chain = x509.load_pem_x509_certificates(handle.read())[1:]
        if chain:
            method = given["sslmethod"]
            options = CertificateOptions(
                privateKey=options.privateKey,
                certificate=options.certificate,
                extraCertChain=[X509.from_cryptography(cert) for cert in chain],
                dhParameters=options.dhParameters,
                **({} if method is None else {"method": getattr(SSL, method)}),
            )
    return port, options, placement


class _TLSFileError(Exception):
    """A TLS file that cannot be used: its path, and why (no key material)."""


def _check_tls_files(given: Mapping[str, Any]) -> None:
    """Read an ``ssl:`` endpoint's files (its ``_parseSSL`` arguments ``given``) and check
    what a reload needs of them, naming the file that fails: each can be read, the
    certificate file holds PEM certificates, the key file an unencrypted PEM private key
    that is the certificate's, ``extraCertChain`` a PEM certificate, ``dhParameters`` PEM
    Diffie-Hellman parameters.

    Twisted's parser reads them too, with errors that do not say which file (and would
    ask a terminal for the passphrase of an encrypted key).
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from OpenSSL import SSL

    key_path = given["privateKey"]
    cert_path = given["certKey"] or key_path
    chain_path, dh_path = given["extraCertChain"], given["dhParameters"]
    contents: dict[str, bytes] = {}
    for path in (key_path, cert_path, chain_path, dh_path):
        if path is None or path in contents:
            continue
        try:
            with open(path, "rb") as handle:
                contents[path] = handle.read()
        except OSError as exc:
            raise _TLSFileError(f"{path}: {exc.strerror or exc}") from exc
    try:
        leaf = x509.load_pem_x509_certificates(contents[cert_path])[0]
    except ValueError as exc:
        raise _TLSFileError(f"{cert_path}: holds no PEM certificate") from exc
    try:
        key = serialization.load_pem_private_key(contents[key_path], None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise _TLSFileError(f"{key_path}: holds no unencrypted PEM private key") from exc
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise _TLSFileError(
            f"{key_path}: the private key does not match the certificate in {cert_path}"
        )
    if chain_path is not None:
        try:
            x509.load_pem_x509_certificates(contents[chain_path])
        except ValueError as exc:
            raise _TLSFileError(f"{chain_path}: holds no PEM certificate") from exc
    if dh_path is not None:
        try:
            # As CertificateOptions loads them (cryptography deprecates finite-field DH).
            SSL.Context(SSL.TLS_SERVER_METHOD).load_tmp_dh(dh_path)
        except SSL.Error as exc:
            raise _TLSFileError(f"{dh_path}: holds no PEM Diffie-Hellman parameters") from exc


def _serial_and_not_after(certificate: Any) -> tuple[str, str]:
    """A certificate's serial number (hexadecimal, as ``openssl x509 -serial``) and its
    notAfter (UTC, ISO 8601)."""
    return (
        f"{certificate.serial_number:X}",
        certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


@implementer(IOpenSSLServerConnectionCreator)
class _ReloadableTLS:
    """An ``ssl:`` listener's TLS settings (``CertificateOptions``), read again from the same
    files by ``reload``.

    Twisted's TLS factory asks it for each connection accepted
    (``serverConnectionForTLS``): that connection gets the OpenSSL context of the settings
    held then, made once per load (no file is read per connection), and keeps it; a reload
    swaps the settings for the connections accepted after it.
    """

    def __init__(self, description: str, bound: inspect.BoundArguments, options: Any) -> None:
        self.description = description
        self._bound = bound
        #: The ``CertificateOptions`` new connections get.
        self.options = options

    def serverConnectionForTLS(self, protocol: Any) -> Any:
        return self.options.serverConnectionForTLS(protocol)

    def reload(self) -> bool:
        """Read the key, certificate and chain (and ``extraCertChain``, ``dhParameters``)
        again from their paths; new connections get them if they can be used, else the
        settings loaded before are kept. One line says which, naming the listener (and the
        file that failed). Returns whether the files were loaded."""
        given = self._bound.arguments
        try:
            _check_tls_files(given)
            try:
                _, options, _ = _tls_options(self._bound)
                options.getContext()  # made now, once, not by the next connection
            except Exception as exc:
                # The files changed again since they were checked, or OpenSSL refused them.
                raise _TLSFileError(
                    f"{given['certKey'] or given['privateKey']}: could not be loaded "
                    f"({type(exc).__name__})"
                ) from exc
        except _TLSFileError as exc:
            serial, _ = _serial_and_not_after(self.options.certificate.to_cryptography())
            log.error(
                "Could not reload TLS for listener {listener}: {reason}; still serving the "
                "certificate loaded before (serial {serial})",
                listener=repr(self.description),
                reason=str(exc),
                serial=serial,
            )
            return False
        self.options = options
        serial, not_after = _serial_and_not_after(options.certificate.to_cryptography())
        log.info(
            "Reloaded TLS for listener {listener}: certificate {path}, serial {serial}, "
            "notAfter {not_after}",
            listener=repr(self.description),
            path=given["certKey"] or given["privateKey"],
            serial=serial,
            not_after=not_after,
        )
        return True


def _systemd_endpoint(
    reactor: Any, args: Sequence[str], keywords: Mapping[str, str]
) -> IStreamServerEndpoint:
    """Twisted's ``systemd:`` endpoint of these arguments (its TLS ones taken out), or a
    ``ConfigError`` saying that systemd passed no socket at its ``index`` or of its
    ``name``, where Twisted's parser raises a bare ``IndexError`` or ``KeyError``."""
    from twisted.internet import endpoints

    unset = "LISTEN_FDS unset, as outside a systemd socket unit"
    try:
        return endpoints._SystemdParser().parseStreamServer(reactor, *args, **keywords)
    except IndexError:
        index = keywords.get("index", args[1] if len(args) > 1 else "")
        raise ConfigError(
            f"systemd passed no socket at index {index} ({unset}, or fewer sockets passed than "
            "index + 1)"
        ) from None
    except KeyError:
        name = keywords.get("name", args[2] if len(args) > 2 else "")
        raise ConfigError(
            f"systemd passed no socket named {name!r} ({unset}, or no FileDescriptorName={name} "
            "among LISTEN_FDNAMES)"
        ) from None


def _failure_reason(exc: BaseException) -> str:
    """Why an endpoint could not be listened on, or the start failed, in a line."""
    if isinstance(exc, (StoreError, ConfigError)):
        return str(exc)
    if isinstance(exc, CannotListenError) and isinstance(exc.socketError, OSError):
        exc = exc.socketError
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        # Of two file names, the second is the one made (a rename's or symlink's target):
        # a unix: port's lock file is a symlink to our PID, whose OSError.filename is the PID.
        filename = exc.filename2 or exc.filename
        if isinstance(filename, bytes):
            filename = os.fsdecode(filename)
        if filename and not os.path.isabs(filename):
            # A unix: socket bound relative to the working directory (_unix_endpoint).
            try:
                filename = os.path.join(os.getcwd(), filename)
            except OSError:
                pass
        return f"{reason}: {filename}" if filename else reason
    if type(exc).__module__.startswith("OpenSSL"):
        return f"the TLS key or certificate is not usable PEM ({exc})"
    return f"{type(exc).__name__}: {exc}"


def _exit_status_at_exit(status: int) -> None:
    """Have the process exit with ``status`` once it ends as it otherwise would, with 0.

    twistd has no exit status of its own but a signal's: after the reactor has
    stopped it removes its pidfile and returns. This atexit handler, the last
    registered and so the first run, flushes stdout and stderr and ends the
    process with ``status`` (the handlers registered before it, such as the
    standard library logging's, which we do not use, are skipped).
    """

    def exit_now() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)

    atexit.register(exit_now)


class FederationInviteService(service.MultiService):
    """The daemon: on start, listens on every configured endpoint, opens the store, then serves.

    The ports are bound at once (twistd: in ``privilegedStartService``), and a
    failure then (a port in use, a TLS file that cannot be read) is raised from
    the start, as a ``ConfigError``; they accept no connection until the store is
    open (a connection made before then waits in the kernel's backlog). ``ready``
    fires with the assembled ``FederationInvite`` once serving has begun (or
    fails, after logging, and the reactor is stopped). It is the latest start's:
    a start after the previous ``ready`` fired (stopped, then started again),
    or while the previous run is still stopping, gets a new one, with newly
    built components, so read ``ready`` after ``startService``. Each stop
    closes its run's ports and components, and forgets them; a start during a
    stop begins once that stop is over.

    With ``on_hangup`` (twistd's plugin: reopen its log file), SIGHUP calls it in
    the reactor thread, then ``reload_tls`` (each ``ssl:`` listener's certificate read
    again from its files), from each start until that run's stop is over (its drain
    included), instead of ending the process; the handler before is restored then. During
    a stop, a SIGTERM or SIGINT (after the one that began it) logs one line that it is
    already shutting down (``_handle_stop_signals``).
    Without it (an embedder's service), SIGHUP is left alone: call ``reload_tls``.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        signing_key: SigningKey,
        *,
        exit_on_failure: bool = False,
        freeze_gc: bool = False,
        on_hangup: Callable[[], object] | None = None,
    ) -> None:
        super().__init__()
        self._exit_on_failure = exit_on_failure
        self._freeze_gc = freeze_gc
        self._on_hangup = on_hangup
        #: SIGHUP's handler before ours, while ours is installed (``_handle_hangup``).
        self._hangup_before: Any = None
        #: SIGTERM's and SIGINT's before ours, during a stop (``_handle_stop_signals``).
        self._stop_signals_before: dict[int, Any] = {}
        self.config = config
        self.reactor = reactor
        self.signing_key = signing_key
        self.components: FederationInvite | None = None
        self.ready: Deferred[FederationInvite] = Deferred()
        #: The sites listened with (federation, metrics), drained on stop, and
        #: forgotten with their listening services (our children) after it.
        self._sites: list[FederationSite] = []
        #: This run's bound ports, not accepting until it serves (``_NotAcceptingYet``).
        self._paused_ports: list[Any] = []
        #: The start under way or done, and the stop (``stopService``) until the next start.
        self._starting: Deferred[Any] | None = None
        self._stopping: Deferred[None] | None = None
        #: That stop's outcome once over: [None] or [its failure] (``stopService``).
        self._stop_outcome: list[Failure | None] = []
        #: Whether a stop gave up waiting for the start (``_wait_for_start``).
        self._start_abandoned = False
        #: Whether a start waits for the stop under way to be over (``startService``).
        self._start_pending = False

    def privilegedStartService(self) -> None:
        if self._stop_under_way():
            return  # the startService that follows starts once the stop is over
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        """Start a run: listen (unless twistd's ``privilegedStartService`` did), open the
        store, then serve; read ``ready`` after this call.

        Started again while the last run is still stopping (its ``stopService``
        not waited for, as by a ``MultiService`` restarted at once), the new run
        starts once that stop is over: until then the old run holds its ports
        (the same ones, for a fixed port) and its database. Its ``ready`` is
        new at once; a failure to listen then is one of the run's failures
        (logged, ``ready`` fails), no longer raised from here. A stop before it
        has started cancels it (``ready`` fails with ``CancelledError``).
        """
        stopping = self._stopping
        if stopping is not None and not stopping.called:
            if not self._start_pending:
                self._start_pending = True
                self.ready = Deferred()
                stopping.addBoth(self._start_after_stop)
            return
        self._start_run()

    def _stop_under_way(self) -> bool:
        return self._stopping is not None and not self._stopping.called

    def _start_after_stop(self, result: object) -> object:
        """The stop a start waited for is over (whatever its outcome): start, unless a
        stop since has cancelled it."""
        if self._start_pending:
            self._start_pending = False
            try:
                self._start_run()
            except Exception:
                self._failed(Failure(), self.ready)
        return result

    def _start_run(self) -> None:
        if not self._sites:
            # Not started by twistd (twist, an embedder, a start after a stop).
            self._listen()
        super().startService()
        self._handle_hangup()
        if self.ready.called:
            # Started again after a stop: a new run, told of on a new Deferred.
            self.ready = Deferred()
        self.components = None
        self._stopping = None
        self._start_abandoned = False
        ready = self.ready
        starting = self._starting = Deferred.fromCoroutine(self._start())
        # This run's ready, even if a next run (started during this one's stop) has its own.
        starting.addCallbacks(ready.callback, self._failed, errbackArgs=(ready,))

    def _listen(self) -> None:
        """Bind every configured endpoint now, before the database is opened.

        What can be known at once fails the start at once, and under twistd
        before it tells a daemon's launcher that the start went well: an
        endpoint string Twisted cannot parse, a TLS key or certificate that
        cannot be read, a port in use or not ours to take. The ports bound are
        closed again, and ``ConfigError`` names the key and the endpoint.

        Bound, a port does not accept yet (``_NotAcceptingYet``): until the
        store is open, connections wait in the kernel's backlog to be served.
        """
        federation = FederationSite(
            MatrixResource(), reactor=self.reactor, **_site_limits(self.config)
        )
        wanted = [("listen", description, federation) for description in self.config.listen]
        sites = [federation]
        metrics_listen = self.config.get("metrics.listen")
        if metrics_listen:
            metrics = FederationSite(
                MatrixResource(), reactor=self.reactor, **_site_limits(self.config)
            )
            wanted.append(("metrics.listen", metrics_listen, metrics))
            sites.append(metrics)
        paused: list[Any] = []
        bound: list[StreamServerEndpointService] = []
        for key, description, site in wanted:
            try:
                tls: list[_ReloadableTLS] = []
                endpoint = _server_endpoint(self.reactor, description, tls)
                listener = StreamServerEndpointService(
                    _NotAcceptingYet(endpoint, paused, *tls), site
                )
                listener._raiseSynchronously = True  # as strports.service's do
                listener.privilegedStartService()  # so raises at once
            except Exception as exc:
                for done in bound:
                    done.stopService().addErrback(
                        lambda failure: log.failure("Could not close a port", failure)
                    )
                raise ConfigError(
                    f"configuration key {key!r}: cannot listen on {description!r}: "
                    f"{_failure_reason(exc)}"
                ) from exc
            bound.append(listener)
        for listener in bound:
            listener.setServiceParent(self)
        self._sites = sites
        self._paused_ports = paused

    async def _start(self) -> FederationInvite:
        try:
            return await self._open_and_serve()
        except BaseException:
            if self._stopping is None:
                # A failed start closes its ports before ready fails (a stop
                # under way closes them itself).
                await self._close_listeners()
            raise

    async def _close_listeners(self) -> None:
        """Close this run's ports, and forget them and their sites."""
        sites, self._sites = self._sites, []
        self._paused_ports = []
        closing: list[Deferred[Any]] = []
        for child in list(self):
            if any(getattr(child, "factory", None) is site for site in sites):
                # Disowned by a running parent, a child is stopped; else, stop it here.
                stopped = child.disownServiceParent()
                if stopped is None:
                    stopped = defer.maybeDeferred(child.stopService)
                closing.append(stopped)
        try:
            await gatherResults(closing, consumeErrors=True)
        except Exception:
            log.failure("Could not close the ports after failing to start")

    async def _open_and_serve(self) -> FederationInvite:
        database = _redact_uri(self.config.database)
        # libpq gives up on a silent server after its connect_timeout (10 s unless
        # the URI says otherwise); until then the operator sees why nothing is served.
        slow = self.reactor.callLater(
            SLOW_OPEN_WARNING_SECONDS,
            lambda: log.warn(
                "Still opening the database {database} after {seconds} s; not serving yet",
                database=database,
                seconds=SLOW_OPEN_WARNING_SECONDS,
            ),
        )
        try:
            store = await open_configured_store(self.config, self.reactor)
        finally:
            if slow.active():
                slow.cancel()
        if self._start_abandoned:
            # Opened after a stop gave up on it (the stop has finished): close it again.
            await store.close()
            raise CancelledError("the start was abandoned by a stop")
        try:
            components = build_components(self.config, self.reactor, store, self.signing_key)
        except Exception:
            await _close_after_failure(store)
            raise
        self.components = components
        if self._stopping is not None:
            # Stopped while the database was opening: serve nothing (the stop,
            # waiting for this start, closes the ports and the database).
            log.info("federation-invite stopped while starting; not serving")
            return components
        federation, *metrics = self._sites
        federation.resource = components.site_root()
        for site in metrics:
            site.resource = build_metrics_root(components.metrics)
        # Accept now, first the connections that waited in the backlog.
        for port in self._paused_ports:
            port.startReading()
        self._paused_ports = []
        log.info(
            "federation-invite for {server_name} listening on {listen}; database {database}; "
            "configuration {source}",
            server_name=self.config.server_name,
            listen=", ".join(self.config.listen),
            database=database,
            source=self.config.path or "built-in defaults (no --config given)",
        )
        if self._freeze_gc:
            settle_gc()
        return components

    def _failed(self, failure: Failure, ready: Deferred[FederationInvite]) -> None:
        if self._start_abandoned and failure.check(CancelledError):
            # A stop gave up on the start (logged there); the stop goes on.
            ready.errback(failure)
            return
        if failure.check(StoreError, OSError, CannotListenError, ConfigError):
            # What an operator can fix (a database, a file, a port): why, in one line.
            log.critical(
                "federation-invite could not start: {reason}",
                reason=_failure_reason(cast(BaseException, failure.value)),
            )
        else:
            log.failure("federation-invite could not start", failure)
        ready.errback(failure)
        if not self._exit_on_failure or self._stopping is not None:
            # Stopping already (the reactor too, under twistd): nothing to stop.
            return

        def stop() -> None:
            # A daemon that cannot serve must not look alive to its supervisor:
            # stop (twistd then removes its pidfile), and exit with status 1.
            _exit_status_at_exit(1)
            self.reactor.stop()

        # twistd starts services before the reactor runs: a failure that early
        # must wait for it to run before it can stop it.
        if self.reactor.running:
            stop()
        else:
            self.reactor.callWhenRunning(stop)

    def stopService(self) -> Deferred[None]:
        """Drain (see ``_stop``), then release the outbound connections and the database.

        Every call, during the stop or after it, waits for that one stop. A start
        still waiting for that stop to be over is cancelled (see ``startService``).
        """
        if self._start_pending:
            self._start_pending = False
            self.ready.errback(CancelledError("stopped before it could start again"))
        if self._stopping is None:
            outcome: list[Failure | None] = []
            self._handle_stop_signals()
            stopping = Deferred.fromCoroutine(self._stop())
            stopping.addBoth(self._release_hangup)
            stopping.addBoth(self._release_stop_signals)
            # The outcome is kept here, each waiter given its own copy (see ``_relay_stop``):
            # the stop's Deferred ends with None, so that a failed stop, handled by its
            # callers, is not logged again as unhandled when the service is collected.
            stopping.addCallbacks(lambda _: outcome.append(None), outcome.append)
            self._stopping = stopping
            self._stop_outcome = outcome
        waiter: Deferred[None] = Deferred()
        self._stopping.addCallback(_relay_stop, waiter, self._stop_outcome)
        return waiter

    def _handle_hangup(self) -> None:
        """Have SIGHUP call ``on_hangup`` (if given), then ``reload_tls``, in the reactor
        thread, until the stop."""
        hangup = getattr(signal, "SIGHUP", None)  # none on Windows
        if self._on_hangup is None or hangup is None or self._hangup_before is not None:
            return
        on_hangup, reactor = self._on_hangup, self.reactor

        def hung_up() -> None:
            try:
                on_hangup()
            finally:
                # After: its lines go to the log file reopened.
                self.reload_tls()

        def handler(signum: int, frame: Any) -> None:
            # As twistd's SIGUSR1 (log rotation): the work is done by the reactor, not
            # in the middle of whatever the signal interrupted.
            reactor.callFromThread(hung_up)

        before = signal.signal(hangup, handler)
        # None: a handler not set from Python, which cannot be put back; the default.
        self._hangup_before = signal.SIG_DFL if before is None else before

    def reload_tls(self) -> bool:
        """Read each ``ssl:`` listener's private key, certificate and chain (its ``certKey``
        file after the first certificate, or its ``extraCertChain``), and ``dhParameters``,
        again from the same paths: a renewed certificate is served to the connections
        accepted from now on; those already open keep theirs. SIGHUP calls it under twistd;
        an embedder's service (no ``on_hangup``) calls it when its certificates are renewed.

        Files that cannot be used (unreadable, not PEM, a key that is not the
        certificate's, a chain file without a certificate) leave that listener serving
        what it served before. Each listener's outcome is logged in one line: on success
        the certificate's serial and notAfter, else the file and why. Returns whether
        every ``ssl:`` listener was reloaded (True with none). A ``systemd:`` listener given
        TLS arguments is reloaded as an ``ssl:`` one is.
        """
        reloaded = True
        for child in list(self):
            tls = getattr(getattr(child, "endpoint", None), "tls", None)
            if isinstance(tls, _ReloadableTLS):
                reloaded = tls.reload() and reloaded
        return reloaded

    def _release_hangup(self, result: object) -> object:
        """Once a stop is over: SIGHUP's handler from before ``_handle_hangup``."""
        before, self._hangup_before = self._hangup_before, None
        if before is not None:
            signal.signal(signal.SIGHUP, before)
        return result

    def _handle_stop_signals(self) -> None:
        """With ``on_hangup`` (the daemon's process, whose signals twistd and the service
        own), from the stop's beginning until it is over: a SIGTERM or SIGINT logs that
        the daemon is already shutting down, and what it waits for, instead of reaching
        twistd's handler (the reactor's, whose second ``stop()`` would log a critical
        ``ReactorNotRunning`` traceback). The first signal, which began the stop, was
        twistd's to handle; the handlers before are restored once the stop is over."""
        if self._on_hangup is None or self._stop_signals_before:
            return
        reactor, began = self.reactor, self.reactor.seconds()
        grace_period = self.config.get("inbound.shutdown_grace_period")

        def already_stopping(name: str) -> None:
            in_progress = sum(site.requests_in_progress() for site in self._sites)
            if in_progress:
                left = max(0, math.ceil(grace_period - (reactor.seconds() - began)))
                log.info(
                    "Received {signal}: already shutting down, waiting up to {left} s more "
                    "for {in_progress} request(s) in progress",
                    signal=name,
                    left=left,
                    in_progress=in_progress,
                )
            else:
                log.info(
                    "Received {signal}: already shutting down, no request in progress left; "
                    "closing the outbound requests and the database",
                    signal=name,
                )

        def handler(signum: int, frame: Any) -> None:
            # As SIGHUP's: logged by the reactor, not in whatever the signal interrupted.
            reactor.callFromThread(already_stopping, signal.Signals(signum).name)

        for signum in (signal.SIGTERM, signal.SIGINT):
            before = signal.signal(signum, handler)
            # None: a handler not set from Python, which cannot be put back; the default.
            self._stop_signals_before[signum] = signal.SIG_DFL if before is None else before

    def _release_stop_signals(self, result: object) -> object:
        """Once a stop is over: SIGTERM's and SIGINT's handlers from before it."""
        before, self._stop_signals_before = self._stop_signals_before, {}
        for signum, handler in before.items():
            signal.signal(signum, handler)
        return result

    async def _stop(self) -> None:
        """Stop the way a peer can rely on: what we began, we answer, within a bound.

        New connections are refused and idle ones closed at once; each
        request in progress is answered (then its connection closed) for up
        to ``inbound.shutdown_grace_period`` seconds, so that an invite
        received whole gets its answer instead of a reset, or a 500 from a
        closed database. Only then are the outbound client and the store
        closed. Requests not answered in full at the deadline (answer
        unfinished, or finished but not all sent) are aborted: the peer sees
        the connection drop, and retries (storing is idempotent). Requests a
        peer pipelined behind one in progress are dropped unanswered, which
        its client must handle by retrying them (RFC 9112, section 9.3.2).
        The last log line counts all of these. A start still opening the
        database is waited for at most the grace period, then abandoned.
        """
        grace_period = self.config.get("inbound.shutdown_grace_period")
        if self._starting is not None and not self._starting.called:
            await self._wait_for_start(self._starting, grace_period)
        # This run's, read once: what the service holds may change while this waits.
        sites = list(self._sites)
        components = self.components
        in_progress = sum(site.requests_in_progress() for site in sites)
        # Synchronously, before the ports close: no connection accepted from now.
        draining = [site.drain(grace_period) for site in sites]
        if sites:
            log.info(
                "Stopping: no longer accepting connections; waiting up to {grace_period} s "
                "for {in_progress} request(s) in progress",
                grace_period=grace_period,
                in_progress=in_progress,
            )
        await super().stopService()  # the listening ports close
        results = await gatherResults(draining) if draining else []
        finished = sum(result.finished for result in results)
        abandoned = sum(result.abandoned for result in results)
        dropped = sum(result.dropped for result in results)
        if abandoned or dropped:
            log.warn(
                "Stopped serving: {finished} request(s) finished; {abandoned} abandoned, not "
                "answered in full within the {grace_period} s grace period; {dropped} pipelined "
                "behind them dropped unanswered",
                finished=finished,
                abandoned=abandoned,
                dropped=dropped,
                grace_period=grace_period,
            )
        elif sites:
            log.info(
                "Stopped serving: {finished} request(s) finished; 0 abandoned; 0 dropped",
                finished=finished,
                abandoned=0,
                dropped=0,
            )
        try:
            if components is not None:
                await components.close()
        finally:
            # This run is over (its ports closed): a next start listens anew.
            for child in list(self):
                if any(getattr(child, "factory", None) is site for site in sites):
                    child.disownServiceParent()
            self._sites = []
            self._paused_ports = []

    async def _wait_for_start(self, starting: Deferred[Any], grace_period: float) -> None:
        """Let a start still opening the database finish, for at most ``grace_period`` s.

        Opened in time, ``_start`` listens on nothing and the database is closed
        by the stop. Otherwise the start is cancelled and abandoned (logged): a
        database that accepts the connection and never answers must not keep
        the daemon from stopping.
        """
        started: Deferred[None] = Deferred()
        starting.addBoth(_relay, started)
        started.addTimeout(grace_period, self.reactor)
        try:
            await started
        except defer.TimeoutError:
            log.warn(
                "Stopping while the database {database} is still opening after {grace_period} "
                "s (the grace period): start abandoned, not serving",
                database=_redact_uri(self.config.database),
                grace_period=grace_period,
            )
            self._start_abandoned = True
            starting.cancel()


def _relay(result: object, waiter: Deferred[None]) -> object:
    """Give ``waiter`` the outcome (None or the failure) and pass ``result`` on."""
    if isinstance(result, Failure):
        waiter.errback(result)
    else:
        waiter.callback(None)
    return result


def _relay_stop(result: None, waiter: Deferred[None], outcome: list[Failure | None]) -> None:
    """Give ``waiter`` the stop's outcome (kept in ``outcome``): None, or its own copy
    of the failure (each waiter's failure is handled, or logged, once, by its caller)."""
    [failure] = outcome
    if failure is None:
        waiter.callback(None)
    else:
        waiter.errback(Failure(failure.value, failure.type, failure.getTracebackObject()))


def _redact_uri(uri: str) -> str:
    """A database URI fit for logs: any password (user info or ``?password=``) replaced."""
    from .store import parse_database_uri

    try:
        return parse_database_uri(uri).display
    except ValueError:
        return uri.partition("://")[0] + "://(unparsable)"


def make_service(
    config: Config,
    reactor: Any,
    *,
    exit_on_failure: bool = True,
    freeze_gc: bool = True,
    on_hangup: Callable[[], object] | None = None,
) -> FederationInviteService:
    """The daemon's service: the key is loaded (or generated) now, the store on start.

    A start that fails at once (a port in use, a TLS file that cannot be read)
    raises ``ConfigError`` from ``startService`` (``privilegedStartService``
    under twistd); twistd and twist print it as one line (``tap.makeService``
    has them do so). With ``exit_on_failure`` (the daemon's default) a start
    that fails later (the database) ends the process with status 1, so that a
    supervisor sees it: it stops the reactor and sets the exit status at exit,
    so that twistd still removes its pidfile. With
    ``freeze_gc`` (also the daemon's default; a process-wide setting, so off for
    services built by hand) the objects that exist once it listens are frozen
    out of the garbage collector's full passes (``gc.freeze``). ``on_hangup``
    (twistd's plugin only: an embedder's process owns its signals) is called on
    each SIGHUP while the service runs, before the TLS certificates are reloaded
    (``FederationInviteService``, ``reload_tls``).

    twistd calls this before it changes to its ``--rundir`` and starts the
    service after: the configuration's paths are absolute (``load_config``), so
    the key loaded now and the store opened then are in the same data directory.

    What only the file system can tell (a data directory that cannot be one,
    a key file that cannot be read, created or parsed, an old key with its ID)
    is a ``ConfigError`` naming the key, the original error as its cause.
    """
    key = _data_dir_and_key(config)
    return FederationInviteService(
        config,
        reactor,
        key,
        exit_on_failure=exit_on_failure,
        freeze_gc=freeze_gc,
        on_hangup=on_hangup,
    )
