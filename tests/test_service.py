"""Tests for the composition root: assembled components and the site they serve."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.config import load_config
from federation_invite.service import build_components

from .support import MemoryStore, make_clock, make_key


class SiteRootTests(SynchronousTestCase):
    def site(self, **settings: Any) -> StubTreq:
        config = load_config(None, {"server_name": "example.org", **settings})
        components = build_components(config, make_clock(), MemoryStore(), make_key("k"))  # type: ignore[arg-type]
        return StubTreq(components.site_root())

    def get(self, client: StubTreq, path: str) -> tuple[int, Any, Any]:
        response = self.successResultOf(client.get("https://example.org" + path))
        return response.code, json.loads(self.successResultOf(response.content())), response.headers

    def test_well_known_delegation(self) -> None:
        """With well_known_server set, /.well-known/matrix/server delegates, cacheable for an hour."""
        client = self.site(well_known_server="matrix.example.org:443")
        code, body, headers = self.get(client, "/.well-known/matrix/server")
        self.assertEqual((code, body), (200, {"m.server": "matrix.example.org:443"}))
        self.assertEqual(headers.getRawHeaders("cache-control"), ["max-age=3600"])
        code, body, _ = self.get(client, "/.well-known/matrix/client")
        self.assertEqual((code, body["errcode"]), (404, "M_UNRECOGNIZED"))

    def test_no_well_known_by_default(self) -> None:
        """Without delegation configured, /.well-known is a JSON 404 and /_matrix is served."""
        client = self.site()
        code, body, _ = self.get(client, "/.well-known/matrix/server")
        self.assertEqual((code, body["errcode"]), (404, "M_UNRECOGNIZED"))
        code, body, _ = self.get(client, "/_matrix/key/v2/server")
        self.assertEqual((code, body["server_name"]), (200, "example.org"))
