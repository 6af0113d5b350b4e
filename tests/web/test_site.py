"""Tests for federation_invite.web.site's access log: invites are logged once, by their handler."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.server import Request, Site

from ..invites import THEM, _sign_request_lax, event_id_of
from ..test_hostile_slow import SiteTestCase, put_request


class AccessLogTests(SiteTestCase):
    """The access log skips requests whose handler logged their outcome, and only those."""

    def setUp(self) -> None:
        super().setUp()
        self.logged: list[bytes] = []

        def record(site: Any, request: Request) -> None:
            if site is self.site:  # not the fake origin's key server
                self.logged.append(request.uri)

        self.patch(Site, "log", record)

    def signed_invite(self, *, bad_signature: bool = False) -> tuple[str, bytes]:
        room_version, event = self.s.invite()
        body = self.s.v2_body(room_version, event)
        path = self.s.path(2, event["room_id"], event_id_of(room_version, event))
        header = _sign_request_lax(self.s.their_key, THEM, "PUT", path, body)
        if bad_signature:
            header = header.replace('sig="', 'sig="AAAA')
        return path, put_request(path, json.dumps(body).encode(), header)

    def test_accepted_and_refused_invites_not_in_access_log(self) -> None:
        """An accepted invite and one refused by authentication have only the handler's line."""
        for bad in (False, True):
            _, data = self.signed_invite(bad_signature=bad)
            connection = self.connect()
            connection.send(data)
            ((status, _, _),) = connection.responses()
            self.assertEqual(status, 401 if bad else 200)
        self.assertEqual(self.logged, [])

    def test_other_requests_in_access_log(self) -> None:
        """Refusals before the handler (bad JSON) and other paths keep their access-log line."""
        path, _ = self.signed_invite()
        connection = self.connect()
        connection.send(
            put_request(path, b"not json", 'X-Matrix origin="a",key="ed25519:a",sig="a"')
        )
        connection.send(b"GET /_matrix/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual([status for status, _, _ in connection.responses()], [400, 404])
        self.assertEqual(self.logged, [path.encode(), b"/_matrix/nothing"])


class LocalAddressTests(SiteTestCase):
    """The connection's local address is asked of the transport once, not per request."""

    def test_one_local_address_lookup_per_connection(self) -> None:
        """Two invites on one keep-alive connection: one lookup of the local address,
        and each request still sees it."""
        connection = self.connect()
        real = connection.transport.getHost
        lookups: list[object] = []
        hosts: list[object] = []

        def get_host() -> Any:
            lookups.append(1)
            return real()

        connection.transport.getHost = get_host  # type: ignore[method-assign]
        original = Request.process

        def process(request: Request) -> Any:
            if request.channel is connection.protocol:  # not the origin's key server
                hosts.append(request.getHost())
            return original(request)

        self.patch(Request, "process", process)
        connection.send(self.valid_request(depth=1))
        connection.send(self.valid_request(depth=2))
        self.assertEqual([status for status, _, _ in connection.responses()], [200, 200])
        self.assertEqual(lookups, [1])
        self.assertEqual(hosts, [real(), real()])
