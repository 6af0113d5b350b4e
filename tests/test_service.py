"""Tests for the composition root: assembled components and the site they serve."""

from __future__ import annotations

import json
import os
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from federation_invite.config import load_config
from federation_invite.service import build_components, build_from_config

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


class BuildFromConfigPathTests(TestCase):
    """The key, the data directory and the real SQLite database end up together."""

    async def build_and_close(self, config: Any) -> None:
        from twisted.internet import reactor

        components = await build_from_config(config, reactor)
        await components.close()

    def test_after_a_chdir(self) -> Deferred[None]:
        """A config with a relative data_dir, loaded in one directory, builds there after a chdir."""
        start, elsewhere = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        os.makedirs(start)
        os.makedirs(elsewhere)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(start)
        config = load_config(None, {"data_dir": "data"})
        os.chdir(elsewhere)

        async def go() -> None:
            await self.build_and_close(config)
            files = os.listdir(os.path.join(start, "data"))
            self.assertIn("signing.key", files)
            self.assertIn("federation-invite.db", files)
            self.assertEqual(os.listdir(elsewhere), [])

        return ensureDeferred(go())

    def test_uri_syntax_in_data_dir(self) -> Deferred[None]:
        """Data dirs named with %20, ?, # or a space hold their own key and database."""

        async def go() -> None:
            for name in ("fi%20data", "fi?test", "fi#1", "fi data"):
                base = os.path.abspath(self.mktemp())
                data_dir = os.path.join(base, name)
                await self.build_and_close(load_config(None, {"data_dir": data_dir}))
                self.assertEqual(os.listdir(base), [name])
                files = os.listdir(data_dir)
                self.assertIn("signing.key", files, name)
                self.assertIn("federation-invite.db", files, name)

        return ensureDeferred(go())
