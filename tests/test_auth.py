"""Tests for request authentication: every rule of the keys issue's table, exact status and errcode."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from federation_invite.auth import RequestAuthenticator, ServerAcl
from federation_invite.core.keys import key_id_of
from federation_invite.core.xmatrix import XMatrixAuth, format_xmatrix, sign_request
from federation_invite.keyring import Keyring
from federation_invite.service import build_site_root
from federation_invite.web._base import MatrixResource, render_async
from federation_invite.web.tree import build_matrix_tree

from .support import FakeFederation, MemoryKeyStore, make_clock, make_key

US = "us.example"
THEM = "them.example"
PATH = "/_matrix/federation/v1/thing/%21room%3Aus.example?x=1"


class Echo(MatrixResource):
    """Authenticates the request and answers with the origin."""

    isLeaf = True

    def __init__(self, authenticator: RequestAuthenticator) -> None:
        super().__init__()
        self.authenticator = authenticator

    def _serve(self, request: Request) -> int:
        body = request.content.read()
        content = json.loads(body) if body else None

        async def work() -> tuple[int, Any]:
            origin = await self.authenticator.authenticate(request, content)
            return 200, {"origin": origin}

        return render_async(request, work)

    render_GET = render_PUT = _serve


class RequestAuthenticationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = make_clock()
        self.federation = FakeFederation()
        self.their_key = make_key("t1")
        self.federation.add_key_server(self.clock, THEM, [self.their_key])
        self.make_server()

    def make_server(self, acl: ServerAcl | None = None) -> None:
        self.store = MemoryKeyStore()
        keyring = Keyring(self.clock, self.store, self.federation)
        authenticator = RequestAuthenticator(self.clock, US, keyring, acl)
        matrix = build_matrix_tree(
            MatrixResource(), {(b"federation", b"v1", b"thing"): Echo(authenticator)}
        )
        self.client = StubTreq(build_site_root(matrix))

    def send(
        self,
        method: str = "PUT",
        content: Any = None,
        headers: list[str] | None = None,
        path: str = PATH,
    ) -> tuple[int, Any]:
        if content is None and method == "PUT":
            content = {"a": 1}
        if headers is None:
            headers = [sign_request(self.their_key, THEM, US, method, path, content)]
        data = None if content is None else json.dumps(content).encode()
        response = self.successResultOf(
            self.client.request(
                method, "https://us.example" + path, data=data, headers={"Authorization": headers}
            )
        )
        return response.code, json.loads(self.successResultOf(response.content()))

    def assertRefused(self, status: int, errcode: str, **kwargs: Any) -> str:
        code, body = self.send(**kwargs)
        self.assertEqual((code, body["errcode"]), (status, errcode), body)
        return str(body["error"])

    def header(self, **params: Any) -> str:
        auth = {
            "origin": THEM,
            "destination": US,
            "key_id": key_id_of(self.their_key),
            "signature": "x",
        }
        auth.update(params)
        return format_xmatrix(XMatrixAuth(**auth))

    def test_valid_put_and_get(self) -> None:
        """A correctly signed request (with and without a body) authenticates as its origin."""
        self.assertEqual(self.send("PUT"), (200, {"origin": THEM}))
        self.assertEqual(self.send("GET"), (200, {"origin": THEM}))

    def test_second_instance_fetches_our_published_key(self) -> None:
        """A fresh server fetches the key through /_matrix/key/v2/server and verifies our request."""
        self.assertEqual(self.send(), (200, {"origin": THEM}))
        self.assertEqual(self.federation.count(THEM), 1)
        self.assertIn((THEM, key_id_of(self.their_key)), self.store.keys)

    def test_missing_header(self) -> None:
        """No X-Matrix header: 401 M_UNAUTHORIZED."""
        self.assertRefused(401, "M_UNAUTHORIZED", headers=[])
        self.assertRefused(401, "M_UNAUTHORIZED", headers=["Bearer abc"])

    def test_unparseable_header(self) -> None:
        """An X-Matrix header we cannot parse: 401 M_UNAUTHORIZED."""
        error = self.assertRefused(401, "M_UNAUTHORIZED", headers=['X-Matrix origin="unterminated'])
        self.assertIn("Malformed", error)

    def test_wrong_destination(self) -> None:
        """A destination that is not our server name: 401 M_UNAUTHORIZED."""
        header = sign_request(self.their_key, THEM, "other.example", "PUT", PATH, {"a": 1})
        error = self.assertRefused(401, "M_UNAUTHORIZED", headers=[header])
        self.assertIn("not this server", error)

    def test_wrong_destination_quoted_in_part(self) -> None:
        """A long wrong destination: 401 M_UNAUTHORIZED quoting only its first 255 characters."""
        destination = "d" * 300 + ".example"
        header = sign_request(self.their_key, THEM, destination, "PUT", PATH, {"a": 1})
        error = self.assertRefused(401, "M_UNAUTHORIZED", headers=[header])
        self.assertIn(repr("d" * 255), error)
        self.assertNotIn("d" * 256, error)

    def test_no_destination_accepted(self) -> None:
        """A header without destination (older senders) is verified against our own name."""
        signed = sign_request(self.their_key, THEM, US, "PUT", PATH, {"a": 1})
        sig = signed.rsplit('sig="', 1)[1].rstrip('"')
        header = format_xmatrix(XMatrixAuth(THEM, None, key_id_of(self.their_key), sig))
        self.assertEqual(self.send(headers=[header]), (200, {"origin": THEM}))

    def test_invalid_origin(self) -> None:
        """An origin that is not a server name: 401 M_UNAUTHORIZED saying so, no fetch."""
        header = self.header(origin="bad origin!")
        error = self.assertRefused(401, "M_UNAUTHORIZED", headers=[header])
        self.assertIn("not a valid server name", error)
        self.assertEqual(self.federation.calls, [])

    def test_invalid_key_id(self) -> None:
        """A key that is not an ed25519 key ID: 401 M_UNAUTHORIZED saying so, no fetch."""
        error = self.assertRefused(401, "M_UNAUTHORIZED", headers=[self.header(key_id="rsa:1")])
        self.assertIn("not an ed25519 key ID", error)
        self.assertEqual(self.federation.calls, [])

    def test_denied_origin_before_key_fetch(self) -> None:
        """An origin denied by the server ACL: 403 M_FORBIDDEN, decided before any key fetch."""
        self.make_server(ServerAcl.of(deny=("*.EXAMPLE",)))
        self.assertRefused(403, "M_FORBIDDEN")
        self.assertEqual(self.federation.calls, [])

    def test_not_on_allow_list(self) -> None:
        """An origin outside a restrictive allow list: 403 M_FORBIDDEN."""
        self.make_server(ServerAcl.of(allow=("friend.example",)))
        self.assertRefused(403, "M_FORBIDDEN")

    def test_allow_list_ignores_case(self) -> None:
        """inbound.server_allow matches in any case, as server_deny does (README row 15): an
        origin allowed as ``Them.EXAMPLE`` or ``*.Example`` authenticates."""
        for pattern in ("Them.EXAMPLE", "*.Example"):
            self.make_server(ServerAcl.of(allow=(pattern,)))
            self.assertEqual(self.send(), (200, {"origin": THEM}), pattern)

    def test_acl_refuses_a_single_string(self) -> None:
        """ServerAcl.of with a str for allow or deny is a TypeError, not a list of one-character
        globs that allows (or denies) nearly everything."""
        with self.assertRaises(TypeError):
            ServerAcl.of(allow="*.trusted.example")  # type: ignore[arg-type]
        with self.assertRaises(TypeError):
            ServerAcl.of(deny="evil.example")  # type: ignore[arg-type]
        self.assertFalse(ServerAcl.of(deny=("evil.example",)).allows("evil.example"))

    def test_bad_signature(self) -> None:
        """A signature that does not verify: 401 M_UNAUTHORIZED saying so."""
        header = sign_request(self.their_key, THEM, US, "PUT", PATH, {"a": 2})
        error = self.assertRefused(401, "M_UNAUTHORIZED", headers=[header])
        self.assertIn("Invalid X-Matrix signature", error)

    def test_signature_with_other_characters(self) -> None:
        """A valid signature with whitespace, ":" or "!" added (base64 decoding that drops them
        would verify it): 401 M_UNAUTHORIZED as an invalid signature; URL-safe or padded, 200."""
        signed = sign_request(self.their_key, THEM, US, "PUT", PATH, {"a": 1})
        sig = signed.rsplit('sig="', 1)[1].rstrip('"')
        for bad in ("\t :" + sig, sig[:20] + "!!::" + sig[20:], " " + sig + " ", sig + "="):
            error = self.assertRefused(401, "M_UNAUTHORIZED", headers=[self.header(signature=bad)])
            self.assertIn("Invalid X-Matrix signature", error)
        for good in (sig.translate(str.maketrans("+/", "-_")), sig + "=="):
            self.assertEqual(
                self.send(headers=[self.header(signature=good)]), (200, {"origin": THEM})
            )

    def test_signature_covers_uri_and_method(self) -> None:
        """A signature for another path or method does not authenticate this request."""
        other_path = sign_request(self.their_key, THEM, US, "PUT", PATH + "&y=2", {"a": 1})
        self.assertRefused(401, "M_UNAUTHORIZED", headers=[other_path])
        other_method = sign_request(self.their_key, THEM, US, "POST", PATH, {"a": 1})
        self.assertRefused(401, "M_UNAUTHORIZED", headers=[other_method])

    def test_key_unobtainable(self) -> None:
        """The origin's key cannot be obtained: 401 M_UNAUTHORIZED saying so."""
        self.federation.servers.pop(THEM)
        error = self.assertRefused(401, "M_UNAUTHORIZED")
        self.assertIn("Could not obtain key", error)

    def test_origin_ending_in_a_dot(self) -> None:
        """An origin whose host ends in a dot (``them.example.``, valid by the grammar, or
        ``them.example.:8448``) can never be verified (TLS checks its name against the
        certificate of ``them.example``): 401 M_UNAUTHORIZED before any key lookup, whatever
        the signature, so that a forged one neither fetches nor backs ``them.example`` off,
        which authenticates at once after twelve of them, and a minute later."""
        for origin in (THEM + ".", "Them.Example.", THEM + ".:8448", "Them.Example.:443"):
            for _ in range(3):
                error = self.assertRefused(
                    401, "M_UNAUTHORIZED", headers=[self.header(origin=origin)]
                )
                self.assertIn("ends in a dot", error)
        self.assertEqual((self.federation.calls, self.store.reads), ([], 0))
        self.assertEqual(self.send(), (200, {"origin": THEM}))
        self.clock.advance(61)
        self.assertEqual(self.send(), (200, {"origin": THEM}))

    def test_origin_in_another_spelling(self) -> None:
        """A forged origin spelling a server otherwise (another case, an IPv6 literal not in RFC
        5952 form, its port with a leading zero) reaches the same server, whose key document
        names it as it spells itself: refused, 401 M_UNAUTHORIZED, and the server itself
        authenticates right after (its own key lookups are not paused by that fetch)."""
        servers = [(THEM, "THEM.example"), ("[2a01:4f8::1]", "[2a01:04f8::1]")]
        servers.append(("them.example:8448", "them.example:08448"))
        for real, variant in servers:
            self.federation.add_key_server(self.clock, real, [self.their_key])
            self.federation.servers[variant] = self.federation.servers[real]
            self.assertRefused(401, "M_UNAUTHORIZED", headers=[self.header(origin=variant)])
            signed = sign_request(self.their_key, real, US, "PUT", PATH, {"a": 1})
            self.assertEqual(self.send(headers=[signed]), (200, {"origin": real}), real)

    def test_key_fetches_at_their_cap(self) -> None:
        """An origin whose key would need a fetch while the keyring's fetches in flight are at
        their cap (forged requests claiming made-up origins, each a fetch): 429
        M_LIMIT_EXCEEDED with retry_after_ms and Retry-After, at once, without a fetch, and the
        origin not backed off; an origin whose key is held is served meanwhile."""
        from twisted.internet.defer import Deferred

        import federation_invite.keyring as keyring_module

        self.patch(keyring_module, "_MAX_FETCHES_IN_FLIGHT", 2)
        self.make_server()
        known_key = make_key("k1")
        self.federation.add_key_server(self.clock, "known.example", [known_key])
        known = [sign_request(known_key, "known.example", US, "PUT", PATH, {"a": 1})]
        self.assertEqual(self.send(headers=known), (200, {"origin": "known.example"}))
        gates: list[Deferred[None]] = [Deferred(), Deferred()]
        forged = []
        for n, gate in enumerate(gates):
            self.federation.hold[f"made-up{n}.example"] = gate
            header = self.header(origin=f"made-up{n}.example", key_id="ed25519:x")
            forged.append(
                self.client.request(
                    "PUT",
                    "https://us.example" + PATH,
                    data=b'{"a": 1}',
                    headers={"Authorization": [header]},
                )
            )
        for request in forged:
            self.assertNoResult(request)
        response = self.successResultOf(
            self.client.request(
                "PUT",
                "https://us.example" + PATH,
                data=b'{"a": 1}',
                headers={
                    "Authorization": [sign_request(self.their_key, THEM, US, "PUT", PATH, {"a": 1})]
                },
            )
        )
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(
            (response.code, body["errcode"], body["retry_after_ms"]),
            (429, "M_LIMIT_EXCEEDED", 5000),
        )
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["5"])
        self.assertEqual(self.federation.count(THEM), 0)
        self.assertEqual(self.send(headers=known), (200, {"origin": "known.example"}))
        for gate in gates:
            gate.callback(None)
        self.client.flush()
        for request in forged:
            self.assertEqual(self.successResultOf(request).code, 401)
        self.assertEqual(self.send(), (200, {"origin": THEM}))
        self.assertEqual(self.federation.count(THEM), 1)

    def test_unknown_key_id(self) -> None:
        """A key ID the origin does not publish: 401 M_UNAUTHORIZED (could not obtain)."""
        stranger = make_key("zz")
        header = sign_request(stranger, THEM, US, "PUT", PATH, {"a": 1})
        error = self.assertRefused(401, "M_UNAUTHORIZED", headers=[header])
        self.assertIn("Could not obtain key", error)

    def test_old_key_refused_for_requests(self) -> None:
        """A key the origin lists only in old_verify_keys never authenticates a request."""
        from federation_invite.core.keys import verify_key_of
        from federation_invite.core.signing import ServerVerifyKey

        old = make_key("old")
        keyring = Keyring(self.clock, MemoryKeyStore(), self.federation)
        keyring._memory[THEM] = {
            key_id_of(old): ServerVerifyKey(
                THEM, key_id_of(old), verify_key_of(old), None, expired_ts=2**40
            )
        }
        authenticator = RequestAuthenticator(self.clock, US, keyring)
        matrix = build_matrix_tree(
            MatrixResource(), {(b"federation", b"v1", b"thing"): Echo(authenticator)}
        )
        self.client = StubTreq(build_site_root(matrix))
        header = sign_request(old, THEM, US, "PUT", PATH, {"a": 1})
        error = self.assertRefused(401, "M_UNAUTHORIZED", headers=[header])
        self.assertIn("old key", error)

    def test_key_listed_current_again_authenticates(self) -> None:
        """A key the origin moved to old_verify_keys refuses requests (401 M_UNAUTHORIZED, old
        key); once the origin lists it as current again (a rotation rolled back), the next
        request after the keyring's 5 s pause fetches it and authenticates."""
        from federation_invite.config import OldKey
        from federation_invite.core.keys import encode_verify_key, verify_key_of

        self.assertEqual(self.send(), (200, {"origin": THEM}))
        self.clock.advance(2 * 86_400)
        old = OldKey(
            key_id_of(self.their_key),
            encode_verify_key(verify_key_of(self.their_key)),
            int(self.clock.seconds() * 1000),
        )
        self.federation.add_key_server(self.clock, THEM, [make_key("t2")], old_keys=[old])
        self.clock.advance(1)
        error = self.assertRefused(401, "M_UNAUTHORIZED")
        self.assertIn("is an old key (events only)", error)
        self.federation.add_key_server(self.clock, THEM, [self.their_key])
        error = self.assertRefused(401, "M_UNAUTHORIZED")
        self.assertIn("is an old key (events only)", error)
        self.assertEqual(self.federation.count(THEM), 2)
        self.clock.advance(5)
        self.assertEqual(self.send(), (200, {"origin": THEM}))
        self.assertEqual(self.federation.count(THEM), 3)

    def test_expired_key_refused(self) -> None:
        """A key whose validity has passed and that cannot be refreshed: 401 M_UNAUTHORIZED."""
        self.send()
        self.federation.servers.pop(THEM)
        self.clock.advance(2 * 86400)
        error = self.assertRefused(401, "M_UNAUTHORIZED")
        self.assertIn("expired", error)

    def test_key_valid_until_now_accepted(self) -> None:
        """A key whose valid_until_ts is this very millisecond still authenticates; one
        millisecond later it is 401 M_UNAUTHORIZED (expired)."""
        from federation_invite.core.keys import verify_key_of
        from federation_invite.core.signing import ServerVerifyKey

        now_ms = int(self.clock.seconds() * 1000)
        keyring = Keyring(self.clock, MemoryKeyStore(), self.federation)
        keyring._memory[THEM] = {
            key_id_of(self.their_key): ServerVerifyKey(
                THEM, key_id_of(self.their_key), verify_key_of(self.their_key), now_ms
            )
        }
        self.federation.servers.pop(THEM)  # no refresh: the key in memory is all there is
        authenticator = RequestAuthenticator(self.clock, US, keyring)
        matrix = build_matrix_tree(
            MatrixResource(), {(b"federation", b"v1", b"thing"): Echo(authenticator)}
        )
        self.client = StubTreq(build_site_root(matrix))
        self.assertEqual(self.send(), (200, {"origin": THEM}))
        self.clock.advance(0.001)
        error = self.assertRefused(401, "M_UNAUTHORIZED")
        self.assertIn("expired", error)

    def test_conflicting_headers(self) -> None:
        """Several X-Matrix headers naming different origins: 401 M_UNAUTHORIZED."""
        good = sign_request(self.their_key, THEM, US, "PUT", PATH, {"a": 1})
        self.assertRefused(401, "M_UNAUTHORIZED", headers=[good, self.header(origin="x.example")])

    def test_first_of_several_headers_is_checked(self) -> None:
        """Several X-Matrix headers of one origin: the first is the one checked (the others are
        ignored, as MSC4029's review suggests): a bad first one is 401 M_UNAUTHORIZED."""
        good = sign_request(self.their_key, THEM, US, "PUT", PATH, {"a": 1})
        bad = sign_request(self.their_key, THEM, US, "PUT", PATH, {"a": 2})
        self.assertEqual(self.send(headers=[good, bad]), (200, {"origin": THEM}))
        error = self.assertRefused(401, "M_UNAUTHORIZED", headers=[bad, good])
        self.assertIn("Invalid X-Matrix signature", error)
