"""The base of the interop test classes: both servers up, keys and users at hand."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
from federation_invite.core.signing import ServerVerifyKey, verify_event_signature

from ._harness import (
    SKIP_UNLESS_ENABLED,
    Daemon,
    SynapseServer,
    fetch_server_keys,
    shared_daemon,
    shared_synapse,
    tls_agent,
)

#: The room versions of issue #9; each is tested where the Synapse supports it.
ROOM_VERSIONS = ("1", "5", "9", "10", "11", "12")


def now_ms() -> int:
    return int(reactor.seconds() * 1000)  # type: ignore[attr-defined]


class InteropCase(TestCase):
    """Starts (once) the shared Synapse and our daemon named ``daemon_name``."""

    skip = SKIP_UNLESS_ENABLED
    timeout = 240

    #: Our daemon for this class, and its config sections beyond the server's own.
    daemon_name = "ours"
    local_users: tuple[str, ...] = ("alice", "bob", "carol")

    synapse: SynapseServer
    daemon: Daemon

    def daemon_settings(self, synapse: SynapseServer) -> Mapping[str, Mapping[str, Any]]:
        return {
            # Loopback peers with self-signed certificates: for this test only.
            "outbound": {"verify_tls": False, "ip_allowlist": ["127.0.0.1/32"]},
            "inbound": {"user_deny": [f"@mallory:{synapse.server_name}"]},
            # Many invites in a few seconds, to the same users.
            "ratelimit": {
                "origin_per_second": 100.0,
                "origin_burst": 1000,
                "invitee_per_second": 100.0,
                "invitee_burst": 1000,
            },
        }

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        self.agent = tls_agent()
        self.synapse = await shared_synapse()
        self.daemon = await shared_daemon(
            self.daemon_name, self.agent, self.daemon_settings(self.synapse), self.local_users
        )

    def ours(self, localpart: str) -> str:
        return f"@{localpart}:{self.daemon.server_name}"

    def logs(self) -> str:
        """Both servers' recent logs, for failure messages."""
        return (
            f"\n--- synapse log tail ---\n{self.synapse.log_tail()}"
            f"\n--- daemon log tail ---\n{self.daemon.log_tail()}"
        )

    async def require_room_version(self, room_version: str) -> None:
        user = await self.synapse.user("alice")
        if room_version not in await self.synapse.room_versions(user):
            self.skipTest(
                f"Synapse {self.synapse.version} does not support room version {room_version}"
            )

    async def both_keys(self) -> dict[tuple[str, str], ServerVerifyKey]:
        """Synapse's and our daemon's published keys, fetched over TLS."""
        keys = await fetch_server_keys(self.synapse.server_name, self.agent, now_ms())
        keys.update(await fetch_server_keys(self.daemon.server_name, self.agent, now_ms()))
        return keys

    async def assert_signed_by_both(self, room_version: str, event: dict[str, Any]) -> None:
        """The event carries a valid signature of each server, by our core's verification."""
        version = KNOWN_ROOM_VERSIONS[room_version]
        keys = await self.both_keys()
        for server_name in (self.synapse.server_name, self.daemon.server_name):
            # Raises SignatureError naming the server and the reason.
            verify_event_signature(version, event, server_name, keys)
