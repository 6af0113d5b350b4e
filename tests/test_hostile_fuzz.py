"""Fuzzing the whole HTTP stack (issue #10, point 1): raw-byte mutations of v1 and v2 bodies,
X-Matrix header variants, path variants and v1 structure mutations, sent as raw HTTP through the
daemon's FederationSite to the real resource tree: never a 500, never a hang, never a 200 for
anything that changes what was signed, and the exact refusal where the layer is known; plus
explicit deep-nesting, huge-number, long-string and odd-body cases.

Longer, coverage-guided campaigns: docs/fuzzing.md (atheris).
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any
from urllib.parse import quote, unquote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
from federation_invite.core.xmatrix import XMatrixError, parse_xmatrix
from federation_invite.inbound import InviteLimits
from federation_invite.web.site import FederationSite

from .figures import AnswerTally
from .invites import (
    THEM,
    US,
    InviteScenario,
    _sign_request_lax,
    build_invite,
    event_id_of,
    stripped,
    v12_room,
)
from .test_hostile_slow import Connection
from .test_inbound_fuzz import UNCOVERED, mutate

MAX_BODY = 1_048_576
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Request:
    """One valid request: API version, room and event IDs, body (parsed and as sent)."""

    def __init__(self, api: int, room_version: str, body: Any, room_id: str, event_id: str) -> None:
        self.api = api
        self.room_version = room_version
        self.body = body
        self.data = json.dumps(body).encode()
        self.room_id = room_id
        self.event_id = event_id

    def event(self, body: Any) -> Any:
        return body if self.api == 1 else body.get("event") if isinstance(body, dict) else None


class Fixtures:
    def __init__(self) -> None:
        self.s = InviteScenario(
            limits=InviteLimits(origin_burst=10**7, origin_per_second=10**7, invitee_burst=10**7)
        )
        self.site = FederationSite(self.s.root, reactor=self.s.clock, max_body_bytes=MAX_BODY)
        self.requests: list[Request] = []
        key = self.s.their_key
        for identifier in ("1", "3", "10", "12"):
            room_version = KNOWN_ROOM_VERSIONS[identifier]
            if room_version.room_id_is_create_event_hash:
                _, create, room_id = v12_room(key)
                event = build_invite(room_version, key, room_id=room_id)
                state = [create, stripped("m.room.join_rules", "", {"join_rule": "invite"})]
            else:
                event = build_invite(room_version, key)
                state = [stripped("m.room.name", "", {"name": "Room \u00e9\u2603"})]
            body = {"room_version": identifier, "event": event, "invite_room_state": state}
            self.requests.append(
                Request(2, identifier, body, event["room_id"], event_id_of(room_version, event))
            )
        for identifier in ("1", "2"):
            room_version = KNOWN_ROOM_VERSIONS[identifier]
            event = build_invite(
                room_version,
                key,
                extra={
                    "event_id": f"$v1{identifier}:{THEM}",
                    "unsigned": {"invite_room_state": [stripped("m.room.name", "", {"n": 1})]},
                },
            )
            self.requests.append(Request(1, identifier, event, event["room_id"], event["event_id"]))
        for request in self.requests:
            status, body = self.exchange(self.raw(request))[0]
            assert status == 200, body

    def path(self, request: Request) -> str:
        return self.s.path(request.api, request.room_id, request.event_id)

    def raw(
        self,
        request: Request,
        *,
        data: bytes | None = None,
        content: Any = None,
        path: str | None = None,
        method: str = "PUT",
        headers: list[bytes] | None = None,
    ) -> bytes:
        """The request as HTTP bytes, signed over ``content`` (default: the request's body)."""
        path = path or self.path(request)
        data = request.data if data is None else data
        if headers is None:
            signed = request.body if content is None else content
            headers = [
                b"Authorization: "
                + _sign_request_lax(self.s.their_key, THEM, method, path, signed).encode()
            ]
        return (
            f"{method} {path} HTTP/1.1\r\nHost: {US}\r\n".encode()
            + b"".join(h + b"\r\n" for h in headers)
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data)
            + data
        )

    def exchange(self, raw: bytes) -> list[tuple[int, Any]]:
        connection = Connection(self.site)
        connection.send(raw)
        self.s.client.flush()
        if not connection.transport.value():
            # A key ID the origin's key server does not list makes the keyring pause
            # fetches of it for 5 s; the next unknown key ID waits for the pause to
            # end (then one fetch). The fixtures are shared, so let the pause pass.
            self.s.clock.advance(5)
            self.s.client.flush()
        answers = [(status, body) for status, _, body in connection.responses()]
        connection.close()
        return answers


_FIXTURES: Fixtures | None = None


def fixtures() -> Fixtures:
    global _FIXTURES
    if _FIXTURES is None:
        _FIXTURES = Fixtures()
    return _FIXTURES


def _event_rules(room_version: Any) -> Any:
    """What a v2 body's room version decides about its invite: the event's rules. Versions that
    differ only in auth rules an invite never meets (v1 and v2; v6 and v7; v9 and v10) are the
    same invite under either name, so a request signed with the other name is rightly accepted."""
    known = KNOWN_ROOM_VERSIONS.get(room_version) if isinstance(room_version, str) else None
    if known is None:
        return ("unknown", repr(room_version))
    return (
        known.event_format,
        known.event_id_format,
        known.redaction_rules,
        known.strict_canonical_json,
        known.enforce_key_validity,
        known.check_event_id_server_signature,
        known.room_id_is_create_event_hash,
    )


def covered(request: Request, body: Any) -> Any:
    """What hashes and signatures cover in ``body`` (plus the v2 room version's event rules)."""
    event = request.event(body)
    if not isinstance(event, dict):
        return ("not an event", repr(event))
    strip = {k: v for k, v in event.items() if k not in UNCOVERED}
    return (_event_rules(body.get("room_version")) if request.api == 2 else None, strip)


class AnswerChecks(SynchronousTestCase):
    def setUp(self) -> None:
        self.answers = AnswerTally()

    def check(self, answers: list[tuple[int, Any]]) -> tuple[int, Any]:
        """Exactly one answer, never 500, always a JSON Matrix error or a well-formed 200."""
        self.assertEqual(len(answers), 1, answers)
        ((status, body),) = answers
        self.answers.count(status)
        self.assertNotEqual(status, 500, body)
        self.assertLess(status, 500, body)
        if status == 200:
            return status, body
        self.assertRegex(body["errcode"], r"^M_[A-Z_]+$")
        self.assertIsInstance(body["error"], str)
        return status, body


def _strict_parse(data: bytes) -> tuple[str, Any]:
    """An independent oracle for rows 2 and 3: ('ok', value), ('M_NOT_JSON', _), ('M_BAD_JSON', _).

    Row 2 comes first: a duplicate key is M_BAD_JSON only in a body that is a JSON object.
    """
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in items}) != len(items):
            duplicates.append("dup")
        return dict(items)

    def constant(name: str) -> Any:
        raise ValueError(name)

    try:
        text = data.decode("utf-8")
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, RecursionError):
        return "M_NOT_JSON", None
    if duplicates:
        return ("M_BAD_JSON" if isinstance(value, dict) else "M_NOT_JSON"), None
    return "ok", value


NASTY = [
    b"\\ud800",
    b"\\udfff\\ud800",
    b"\\u0000",
    b'\\"',
    b"\\\\",
    b"\\x41",
    b"1e400",
    b"-0",
    b"1.0",
    b"123456789012345678901234567890",
    b"9" * 5000,
    b"NaN",
    b"-Infinity",
    b"[" * 50,
    b"{",
    b"}",
    b",",
    b":",
    b'"',
    b"\xef\xbb\xbf",
    b"\x00",
    b"\xff",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b'"type":"m.room.member",',
    b'"room_version":"10",',
    b" \t\r\n",
    "\u202e\U0001f600".encode(),
]


@st.composite
def raw_body_mutations(draw: st.DrawFn) -> tuple[Request, bytes]:
    request = draw(st.sampled_from(fixtures().requests))
    data = bytearray(request.data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                ["flip", "insert", "delete", "truncate", "duplicate", "nasty", "number", "ws"]
            )
        )
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "duplicate":
            span = bytes(data[at : at + draw(st.integers(1, 64))])
            data[at:at] = span
        elif kind == "nasty":
            data[at:at] = draw(st.sampled_from(NASTY))
        elif kind == "number":
            numbers = [m.span() for m in re.finditer(rb"-?\d+", bytes(data))]
            if numbers:
                start, end = draw(st.sampled_from(numbers))
                replacement = draw(
                    st.sampled_from([b"1e400", b"2.5", b"9007199254740992", b"-0", b"1E2", b"0x10"])
                    | st.integers(-(2**70), 2**70).map(lambda n: str(n).encode())
                )
                data[start:end] = replacement
        elif kind == "ws":
            # Whitespace between tokens changes nothing that is signed.
            positions = [i for i, b in enumerate(data) if b in b",:"]
            if positions:
                where = draw(st.sampled_from(positions)) + 1
                data[where:where] = draw(st.sampled_from([b" ", b"\n", b"\t", b"\r\n  "]))
    return request, bytes(data)


class RawBodyTests(AnswerChecks):
    def test_raw_body_mutations(self) -> None:
        """Byte-level body mutations (v1 and v2): rows 2 and 3 refuse exactly what a strict
        parser refuses (400 M_NOT_JSON / M_BAD_JSON); others never 500, and a 200 only when
        nothing covered by hashes and signatures changed."""
        self.raw_body_mutation()  # hypothesis runs every example
        # Valid JSON that is not an object, which no mutation above happens to draw.
        for request in fixtures().requests:
            for data in (b"[]", b"[{}]", b"1", b'"x"', b"null", b"true"):
                with self.subTest(api=request.api, room_version=request.room_version, data=data):
                    self.check_raw_body(request, data)
        self.answers.report("fuzz-raw-body")

    @FAST
    @given(raw_body_mutations())
    def raw_body_mutation(self, case: tuple[Request, bytes]) -> None:
        """One generated request for ``test_raw_body_mutations``."""
        self.check_raw_body(*case)

    def check_raw_body(self, request: Request, data: bytes) -> None:
        """Send ``data`` as ``request``'s body; check the answer as the docstring of
        ``test_raw_body_mutations`` says."""
        f = fixtures()
        verdict, value = _strict_parse(data)
        content: Any = None
        if verdict == "ok":
            try:
                f.raw(request, data=b"", content=value)  # can it be signed at all?
                content = value
            except Exception:
                content = None
        status, body = self.check(f.exchange(f.raw(request, data=data, content=content)))
        if verdict != "ok":
            self.assertEqual((status, body["errcode"]), (400, verdict))
        elif not isinstance(value, dict):
            self.assertEqual((status, body["errcode"]), (400, "M_NOT_JSON"))
        elif status == 200:
            self.assertEqual(covered(request, value), covered(request, request.body))

    def test_whitespace_only_changes_are_accepted(self) -> None:
        """Pretty-printed JSON with the same content is the same invite: 200 (v1 and v2)."""
        f = fixtures()
        for request in f.requests:
            data = json.dumps(request.body, indent=2).encode()
            status, _ = self.check(f.exchange(f.raw(request, data=data)))
            self.assertEqual(status, 200, request.room_version)


_HEADER_FIELDS = ("origin", "destination", "key", "sig")


def _same_signature(text: str, signature: str) -> bool:
    """Whether ``text`` is ``signature`` as a sender may also write it: the same bytes in the
    standard or URL-safe alphabet, unpadded or padded with "==" (appendices, "Unpadded Base64"),
    nothing else in it (decoded here by the standard library, in strict mode)."""
    try:
        spelled = base64.b64decode(text.removesuffix("==") + "==", b"-_", validate=True)
    except ValueError:  # binascii.Error too
        return False
    return spelled == base64.b64decode(signature + "==")


@st.composite
def header_variants(draw: st.DrawFn) -> tuple[Request, list[bytes], bool]:
    """A request with a rewritten Authorization header, and whether it should authenticate."""
    f = fixtures()
    request = draw(st.sampled_from(f.requests))
    header = _sign_request_lax(f.s.their_key, THEM, "PUT", f.path(request), request.body)
    auth = parse_xmatrix(header)
    values = {
        "origin": auth.origin,
        "destination": auth.destination,
        "key": auth.key_id,
        "sig": auth.signature,
    }
    names = list(_HEADER_FIELDS)
    if draw(st.booleans()):
        names.remove("destination")
    names = draw(st.permutations(names))
    parts = []
    for name in names:
        value = values[name]
        assert value is not None
        shown = draw(st.sampled_from([name, name.upper(), name.capitalize()]))
        quoted = draw(st.booleans()) or (
            name in ("origin",) and ":" in value and draw(st.booleans())
        )
        text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' if quoted else value
        equals = draw(st.sampled_from(["=", " = ", "\t=", "= "]))
        parts.append(f"{shown}{equals}{text}")
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), 'extra="ignored, really"')
    separator = draw(st.sampled_from([",", ", ", " ,\t", ",  "]))
    scheme = draw(st.sampled_from(["X-Matrix", "x-matrix", "X-MATRIX"]))
    text = f"{scheme} {separator.join(parts)}".encode()
    mutation = draw(st.sampled_from(["none", "none", "byte", "insert", "delete", "sig", "dest"]))
    data = bytearray(text)
    at = draw(st.integers(0, len(data) - 1))
    if mutation == "byte":
        data[at] = draw(st.integers(0x20, 0xFF))
    elif mutation == "insert":
        data[at:at] = (
            draw(st.binary(min_size=1, max_size=4)).replace(b"\r", b"").replace(b"\n", b"")
        )
    elif mutation == "delete":
        del data[at : at + draw(st.integers(1, 6))]
    elif mutation == "sig":
        data = bytearray(
            bytes(data).replace(auth.signature.encode(), auth.signature[::-1].encode())
        )
    elif mutation == "dest":
        data = bytearray(bytes(data).replace(b"us.example", b"them.example"))
    try:
        parsed = parse_xmatrix(bytes(data))
        valid = (
            parsed.origin == auth.origin
            and parsed.key_id == auth.key_id
            and _same_signature(parsed.signature, auth.signature)
            and parsed.destination in (None, US)
        )
    except XMatrixError:
        valid = False
    # Header bytes Twisted refuses as malformed HTTP (NUL) never reach us.
    return request, [b"Authorization: " + bytes(data)], valid


class HeaderTests(AnswerChecks):
    def test_header_variants(self) -> None:
        """X-Matrix header variants (case, order, quoting, spacing, unknown and missing
        parameters, byte damage): exactly those naming the same origin, key and signature (as
        _same_signature spells it) (and our name or no destination) are accepted; all others 401
        M_UNAUTHORIZED (or a JSON 400 for bytes HTTP forbids)."""
        self.header_variant()  # hypothesis runs every example
        self.answers.report("fuzz-headers")

    @FAST
    @given(header_variants())
    def header_variant(self, case: tuple[Request, list[bytes], bool]) -> None:
        """One generated request for ``test_header_variants``."""
        request, headers, valid = case
        f = fixtures()
        status, body = self.check(f.exchange(f.raw(request, headers=headers)))
        if valid:
            self.assertEqual(status, 200, (headers, body))
            return
        self.assertNotEqual(status, 200, ("accepted with a different header", headers))
        if b"\x00" in headers[0] or b"\x7f" in headers[0]:
            self.assertIn((status, body["errcode"]), [(400, "M_UNKNOWN"), (401, "M_UNAUTHORIZED")])
        else:
            self.assertEqual((status, body["errcode"]), (401, "M_UNAUTHORIZED"), headers)

    def test_header_edge_cases(self) -> None:
        """No header, a non-X-Matrix scheme, two headers naming different origins, a forged origin,
        an unknown key and an 9 KiB header: 401 M_UNAUTHORIZED; a NUL byte: JSON 400."""
        f = fixtures()
        request = f.requests[2]
        good = _sign_request_lax(f.s.their_key, THEM, "PUT", f.path(request), request.body)
        cases = [
            [],
            [b"Authorization: Bearer abc"],
            [
                b"Authorization: " + good.encode(),
                b"Authorization: " + good.replace(THEM, "b.example").encode(),
            ],
            [
                b"Authorization: "
                + good.replace(f'origin="{THEM}"', 'origin="evil.example"').encode()
            ],
            [b"Authorization: " + good.replace("ed25519:them1", "ed25519:nope").encode()],
            [b"Authorization: " + good.encode() + b"," + b"x" * 9000],
        ]
        for headers in cases:
            status, body = self.check(f.exchange(f.raw(request, headers=headers)))
            self.assertEqual((status, body["errcode"]), (401, "M_UNAUTHORIZED"), headers)
        status, body = self.check(
            f.exchange(f.raw(request, headers=[b"Authorization: " + good.encode() + b"\x00"]))
        )
        self.assertEqual((status, body["errcode"]), (400, "M_UNKNOWN"))

    def test_signature_spellings(self) -> None:
        """A valid signature with characters outside base64 added (as test_header_variants once
        drew: a tab, a space and ":" before it), or wrongly padded: 401 M_UNAUTHORIZED, though base64 decoding that
        dropped them would verify it; the same signature URL-safe or padded with "==": 200."""
        f = fixtures()
        request = f.requests[2]
        good = _sign_request_lax(f.s.their_key, THEM, "PUT", f.path(request), request.body)
        sig = parse_xmatrix(good).signature
        for bad in ("\t :" + sig, sig[:20] + "!!::" + sig[20:], " " + sig + " ", sig + "="):
            self.assertFalse(_same_signature(bad, sig))
            header = good.replace(f'sig="{sig}"', f'sig="{bad}"').encode()
            status, body = self.check(
                f.exchange(f.raw(request, headers=[b"Authorization: " + header]))
            )
            self.assertEqual((status, body["errcode"]), (401, "M_UNAUTHORIZED"), header)
        for spelling in (sig.translate(str.maketrans("+/", "-_")), sig + "=="):
            self.assertTrue(_same_signature(spelling, sig))
            header = good.replace(f'sig="{sig}"', f'sig="{spelling}"').encode()
            status, body = self.check(
                f.exchange(f.raw(request, headers=[b"Authorization: " + header]))
            )
            self.assertEqual(status, 200, (header, body))


def _encode_segment(value: str, style: str) -> str:
    if style == "lower":
        return quote(value, safe="").lower().replace("%", "%")  # hex digits lower-case
    if style == "loose":
        return quote(value, safe="!:$@")
    if style == "double":
        return quote(quote(value, safe=""), safe="")
    if style == "raw":
        return value
    return quote(value, safe="")


@st.composite
def path_variants(draw: st.DrawFn) -> tuple[Request, str, str, bool, list[tuple[int, str]]]:
    """A request at a rewritten path, signed for that path; whether it names the right IDs."""
    f = fixtures()
    request = draw(st.sampled_from(f.requests))
    room_style = draw(st.sampled_from(["normal", "loose", "double", "raw", "lower"]))
    event_style = draw(st.sampled_from(["normal", "loose", "double", "raw", "lower"]))
    room = _encode_segment(request.room_id, room_style)
    event = _encode_segment(request.event_id, event_style)
    if room_style == "lower":
        room = re.sub(
            r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(request.room_id, safe="")
        )
    if event_style == "lower":
        event = re.sub(
            r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(request.event_id, safe="")
        )
    api = request.api
    extra = draw(
        st.sampled_from(
            ["", "", "", "/", "/x", "?a=b", "?", "#frag", "%00", "%ff", "%2F", "/.", "%20"]
        )
    )
    prefix = draw(
        st.sampled_from(
            [
                f"/_matrix/federation/v{api}/invite/",
                f"/_matrix/federation/v{api}/invite/",
                f"/_matrix/federation/v{3 - api}/invite/",
                f"/_matrix//federation/v{api}/invite/",
                f"/_matrix/federation/v{api}/./invite/",
                f"/_matrix/federation/v{api}/INVITE/",
                f"/_matrix/federation/v{api}/invite//",
                "/_matrix/federation/v9/invite/",
            ]
        )
    )
    method = draw(st.sampled_from(["PUT", "PUT", "PUT", "POST", "GET", "DELETE"]))
    path = f"{prefix}{room}/{event}{extra}"
    # Only a query is split off the path; a "#" is no delimiter in a request target.
    segments = path.split("?", 1)[0].split("/")
    right_place = prefix == f"/_matrix/federation/v{api}/invite/" and len(segments) == 7
    ids_match = (
        right_place
        and unquote(segments[5], errors="strict") == request.room_id
        and _decodes_to(segments[6], request.event_id)
    )
    allowed = [(404, "M_UNRECOGNIZED"), (405, "M_UNRECOGNIZED"), (400, "M_INVALID_PARAM")]
    if right_place and method != "PUT":
        allowed = [(405, "M_UNRECOGNIZED")]
    elif prefix == f"/_matrix/federation/v{3 - api}/invite/" and method == "PUT":
        # The other API version's body: a v2 body is no event, a v1 event has no room_version.
        allowed.append((400, "M_BAD_JSON") if api == 2 else (400, "M_MISSING_PARAM"))
    return request, path, method, right_place and method == "PUT" and ids_match, allowed


def _decodes_to(segment: str, value: str) -> bool:
    try:
        return unquote(segment, errors="strict") == value
    except UnicodeDecodeError:
        return False


class PathTests(AnswerChecks):
    def test_path_variants(self) -> None:
        """Path variants (encodings, double encoding, raw '/', extra or empty segments, dot
        segments, wrong API version, query, NUL, bad UTF-8, other methods), each signed for its own
        URI: 200 exactly when the decoded IDs are the event's; otherwise 404/405 M_UNRECOGNIZED or
        400 M_INVALID_PARAM."""
        self.path_variant()  # hypothesis runs every example
        self.answers.report("fuzz-paths")

    @FAST
    @given(path_variants())
    def path_variant(self, case: tuple[Request, str, str, bool, tuple[int, str] | None]) -> None:
        """One generated request for ``test_path_variants``."""
        request, path, method, valid, allowed = case
        f = fixtures()
        data = b"" if method == "GET" else request.data
        status, body = self.check(f.exchange(f.raw(request, path=path, method=method, data=data)))
        if valid:
            self.assertEqual(status, 200, (path, body))
            return
        self.assertNotEqual(status, 200, ("accepted at a path naming other IDs", path))
        self.assertIn((status, body["errcode"]), allowed, (path, method, body))


@st.composite
def v1_mutations(draw: st.DrawFn) -> tuple[Request, Any, bool]:
    """A v1 body (the event itself) with one structural change; whether covered data changed."""
    request = draw(st.sampled_from([r for r in fixtures().requests if r.api == 1]))
    body = mutate(draw, request.body)
    return request, body, covered(request, body) != covered(request, request.body)


class V1Tests(AnswerChecks):
    def test_v1_mutations(self) -> None:
        """v1 (rooms 1 and 2, the event as the body): no mutation gives a 500, none touching
        covered data gives a 200."""
        self.v1_mutation()  # hypothesis runs every example
        self.answers.report("fuzz-v1")

    @FAST
    @given(v1_mutations())
    def v1_mutation(self, case: tuple[Request, Any, bool]) -> None:
        """One generated request for ``test_v1_mutations``."""
        request, body, changed = case
        f = fixtures()
        data = json.dumps(body).encode()
        status, answer = self.check(f.exchange(f.raw(request, data=data, content=body)))
        if changed:
            self.assertNotEqual(status, 200, (body, answer))
        if status == 200:
            self.assertEqual(answer[0], 200)
            self.assertIn("event", answer[1])

    def test_v2_body_on_v1_path(self) -> None:
        """A v2 body sent to the v1 endpoint is not an event: 400, never 200."""
        f = fixtures()
        v2, v1 = f.requests[0], f.requests[-1]
        path = f.path(v1)
        status, body = self.check(f.exchange(f.raw(v1, path=path, data=v2.data, content=v2.body)))
        self.assertEqual((status, body["errcode"]), (400, "M_BAD_JSON"))


class ExplicitCaseTests(AnswerChecks):
    """Deep nesting, huge numbers, long strings and odd bodies, each with its exact answer."""

    def send_body(self, data: bytes, request: Request | None = None) -> tuple[int, Any]:
        f = fixtures()
        request = request or f.requests[2]
        verdict, value = _strict_parse(data)
        content = value if verdict == "ok" else None
        try:
            raw = f.raw(request, data=data, content=content)
        except Exception:
            raw = f.raw(request, data=data)
        return self.check(f.exchange(raw))

    def assertAnswer(self, answer: tuple[int, Any], status: int, errcode: str) -> None:
        self.assertEqual((answer[0], answer[1].get("errcode")), (status, errcode), answer[1])

    def test_deep_nesting_body(self) -> None:
        """100 000 nested arrays or objects (within the size cap): 400 M_NOT_JSON, no crash."""
        depth = 100_000
        for data in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
            self.assertAnswer(self.send_body(data), 400, "M_NOT_JSON")

    def test_deep_nesting_inside_a_signed_event(self) -> None:
        """A correctly signed event nested as deep as a PDU may be (127 levels, the event
        counted: its content 125 below it) is handled (200, it is valid); 300 levels (which
        Synapse cannot parse) is 400 M_BAD_JSON (valid JSON, no well-formed event), and past
        the parser's limit 400 M_NOT_JSON, never 500."""
        f = fixtures()
        room_version = KNOWN_ROOM_VERSIONS["10"]
        too_deep: Any = 1
        for _ in range(300):
            too_deep = {"n": too_deep}
        event = build_invite(
            room_version,
            f.s.their_key,
            extra={"content": {"membership": "invite", "deep": too_deep}},
        )
        request = Request(
            2,
            "10",
            f.s.v2_body(room_version, event),
            event["room_id"],
            event_id_of(room_version, event),
        )
        self.assertAnswer(self.check(f.exchange(f.raw(request))), 400, "M_BAD_JSON")
        nested: Any = 1
        for _ in range(125):
            nested = {"n": nested}
        event = build_invite(
            room_version, f.s.their_key, extra={"content": {"membership": "invite", "deep": nested}}
        )
        request = Request(
            2,
            "10",
            f.s.v2_body(room_version, event),
            event["room_id"],
            event_id_of(room_version, event),
        )
        self.assertEqual(self.check(f.exchange(f.raw(request)))[0], 200)
        data = request.data.replace(b'"deep": ', b'"deep": ' + b"[" * 100_000, 1)
        data = data.replace(b'}}, "depth"', b"}}" + b"]" * 100_000 + b', "depth"', 1)
        self.assertAnswer(self.send_body(data, request), 400, "M_NOT_JSON")

    def test_huge_numbers(self) -> None:
        """A 5000-digit integer: 400 M_NOT_JSON; +-2**53 or a float depth in a v10 event: 400
        M_BAD_JSON; 1e400 (infinity has no canonical JSON, so no valid signature): 401
        M_UNAUTHORIZED; NaN: 400 M_NOT_JSON."""
        f = fixtures()
        request = f.requests[2]
        original = request.data
        self.assertIn(b'"depth": 12', original)
        self.assertAnswer(
            self.send_body(original.replace(b'"depth": 12', b'"depth": ' + b"9" * 5000)),
            400,
            "M_NOT_JSON",
        )
        self.assertAnswer(
            self.send_body(original.replace(b'"depth": 12', b'"depth": 1e400')),
            401,
            "M_UNAUTHORIZED",
        )
        for number in (b"9007199254740992", b"-9007199254740992", b"12.5"):
            self.assertAnswer(
                self.send_body(original.replace(b'"depth": 12', b'"depth": ' + number)),
                400,
                "M_BAD_JSON",
            )
        self.assertAnswer(
            self.send_body(original.replace(b'"depth": 12', b'"depth": NaN')), 400, "M_NOT_JSON"
        )

    def test_huge_number_in_a_v1_event(self) -> None:
        """Room v1 tolerates big integers and floats in events: the request is authenticated and
        the event judged (its content hash no longer matches: 400 M_INVALID_PARAM), not a 500."""
        f = fixtures()
        request = f.requests[-2]
        self.assertEqual(request.api, 1)
        data = request.data.replace(
            b'"membership": "invite"',
            b'"membership": "invite", "n": 1208925819614629174706176, "f": 0.5',
        )
        self.assertNotEqual(data, request.data)
        self.assertAnswer(self.send_body(data, request), 400, "M_INVALID_PARAM")

    def test_long_strings(self) -> None:
        """A 70 000-character display name: 413 M_TOO_LARGE (the PDU limit); a body over
        max_body_bytes: 413 M_TOO_LARGE from the site; 60 000 keys: 413 M_TOO_LARGE."""
        f = fixtures()
        request = f.requests[2]
        original = request.data
        long_name = original.replace(
            b'"displayname": "Bob"', b'"displayname": "' + b"B" * 70_000 + b'"'
        )
        self.assertAnswer(self.send_body(long_name), 413, "M_TOO_LARGE")
        huge = original.replace(
            b'"displayname": "Bob"', b'"displayname": "' + b"B" * MAX_BODY + b'"'
        )
        self.assertAnswer(self.send_body(huge), 413, "M_TOO_LARGE")
        keys = b", ".join(b'"k%d": 1' % i for i in range(60_000))
        many = original.replace(b'"displayname": "Bob"', b'"displayname": "Bob", ' + keys)
        self.assertAnswer(self.send_body(many), 413, "M_TOO_LARGE")

    def test_odd_bodies(self) -> None:
        """Empty, whitespace, scalars, arrays, two objects, a BOM, UTF-16, invalid UTF-8 and
        duplicate keys: each its exact 400; a lone surrogate (no canonical JSON, so no valid
        signature): 401 M_UNAUTHORIZED."""
        f = fixtures()
        original = f.requests[2].data
        cases = {
            b"": "M_NOT_JSON",
            b"   ": "M_NOT_JSON",
            b"null": "M_NOT_JSON",
            b"1": "M_NOT_JSON",
            b'"x"': "M_NOT_JSON",
            b"[]": "M_NOT_JSON",
            b"{}{}": "M_NOT_JSON",
            b"\xef\xbb\xbf" + original: "M_NOT_JSON",
            original.decode().encode("utf-16"): "M_NOT_JSON",
            original.replace(b"Bob", b"B\xffb"): "M_NOT_JSON",
            original.replace(b"Bob", b"B\xc0\x80b"): "M_NOT_JSON",
            original.replace(
                b'"displayname"', b'"membership": "join", "displayname"'
            ): "M_BAD_JSON",
            b'{"a": {"b": 1, "b": 2}}': "M_BAD_JSON",
        }
        for data, errcode in cases.items():
            self.assertAnswer(self.send_body(data), 400, errcode)
        self.assertAnswer(self.send_body(b"{}"), 400, "M_MISSING_PARAM")
        lone = original.replace(b'"Bob"', b'"\\ud800"')
        self.assertNotEqual(lone, original)
        self.assertAnswer(self.send_body(lone), 401, "M_UNAUTHORIZED")
