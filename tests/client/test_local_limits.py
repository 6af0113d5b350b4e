"""Outbound requests failing for want of our own resources, and the cap on requests in
flight to one destination (``FederationClient``)."""

from __future__ import annotations

import errno
from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet.defer import fail
from twisted.internet.error import ConnectBindError, ConnectError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived

from federation_invite.client import FederationClient, TransportError

ORIGIN = "local.example"
REMOTE = "remote.example"


class _RaisingAgent:
    """An ``IAgent`` whose every request fails with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.requests = 0

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Any:
        self.requests += 1
        return fail(self.error)


class LocalResourceErrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def client(self, error: Exception) -> FederationClient:
        return FederationClient(
            self.clock, ORIGIN, generate_signing_key("k1"), agent=_RaisingAgent(error)
        )

    def test_out_of_file_descriptors_does_not_back_the_destination_off(self) -> None:
        """A connection failing with EMFILE (our process out of file descriptors) fails as not
        sent, naming the cause, marked not_sent, without backing the destination off."""
        client = self.client(ConnectBindError(errno.EMFILE, "Too many open files"))
        error = self.failureResultOf(client.get_json(REMOTE, "/x"), TransportError).value
        self.assertEqual(error.reason, "not sent: out of file descriptors (EMFILE)")
        self.assertTrue(error.not_sent)
        self.assertEqual(client._backoff, {})
        # Not refused by a back-off: the next request is made.
        self.failureResultOf(client.get_json(REMOTE, "/x"), TransportError)
        self.assertEqual(client._agent.requests, 2)  # type: ignore[attr-defined]

    def test_each_local_resource_errno(self) -> None:
        """ENFILE, ENOBUFS and ENOMEM (as a ConnectError, an OSError, or wrapped in twisted.web's
        reasons) are ours too; another errno (ECONNREFUSED) is the destination's failure."""
        cases = [
            (ConnectError(errno.ENFILE, "x"), "out of file descriptors (ENFILE)"),
            (OSError(errno.ENOBUFS, "x"), "out of socket buffer memory (ENOBUFS)"),
            (
                ResponseNeverReceived([Failure(ConnectError(errno.ENOMEM, "x"))]),
                "out of memory (ENOMEM)",
            ),
        ]
        for exc, cause in cases:
            client = self.client(exc)
            error = self.failureResultOf(client.get_json(REMOTE, "/x"), TransportError).value
            self.assertEqual(error.reason, f"not sent: {cause}")
            self.assertTrue(error.not_sent)
            self.assertEqual(client._backoff, {})
        client = self.client(ConnectError(errno.ECONNREFUSED, "refused"))
        error = self.failureResultOf(client.get_json(REMOTE, "/x"), TransportError).value
        self.assertFalse(error.not_sent)
        self.assertEqual(list(client._backoff), [REMOTE])
