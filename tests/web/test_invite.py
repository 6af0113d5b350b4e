"""The invite endpoints' own checks (rows 1 to 3 of the inbound table) and their counting."""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from federation_invite.core.errors import MatrixError
from federation_invite.web.invite import _read_body

from ..invites import InviteScenario


class BodyRowsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.s = InviteScenario()

    def put(self, data: bytes, api_version: int = 2) -> tuple[int, Any]:
        path = self.s.path(api_version, "!room:remote.example", "$x")
        deferred: Deferred[Any] = self.s.put_raw(path, data, content={"x": 1})
        self.s.client.flush()
        response = self.successResultOf(deferred)
        return response.code, json.loads(self.successResultOf(response.content()))

    def test_not_json_before_duplicate_keys(self) -> None:
        """Row 2 before row 3: a duplicate key in a body that is not JSON (trailing data,
        unterminated) or not an object is 400 M_NOT_JSON; in an object, 400 M_BAD_JSON."""
        for api_version in (1, 2):
            for data in (
                b'[{"a":1,"a":2}]',
                b'{"a":1,"a":2} trailing',
                b'[{"a":1,"a":2}',
                b'"x" {"a":1,"a":2}',
            ):
                code, body = self.put(data, api_version)
                self.assertEqual((code, body["errcode"]), (400, "M_NOT_JSON"), data)
            code, body = self.put(b'{"e":{"a":1,"a":2}}', api_version)
            self.assertEqual(
                (code, body), (400, {"errcode": "M_BAD_JSON", "error": "Duplicate key 'a' in JSON"})
            )
        self.assertEqual(self.s.store.invites, {})


class ReadBodyTests(SynchronousTestCase):
    def test_body_without_content_length_at_the_cap(self) -> None:
        """Row 1 without a Content-Length (a chunked body, in a plain Site that does not cap
        it): a body of exactly the cap is read, one byte more is 413 M_TOO_LARGE."""
        request = DummyRequest([])
        request.content = BytesIO(b"x" * 10)
        self.assertEqual(_read_body(request, 10), b"x" * 10)
        request.content = BytesIO(b"x" * 11)
        with self.assertRaises(MatrixError) as caught:
            _read_body(request, 10)
        self.assertEqual(
            (caught.exception.http_status, caught.exception.errcode), (413, "M_TOO_LARGE")
        )
