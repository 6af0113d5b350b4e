"""Tests for federation_invite.core.xmatrix: the X-Matrix Authorization header."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from signedjson.key import decode_signing_key_base64, generate_signing_key
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.core.canonical import encode_canonical_json
from federation_invite.core.keys import sign_bytes, verify_key_of
from federation_invite.core.xmatrix import (
    XMatrixAuth,
    XMatrixError,
    check_destination,
    format_xmatrix,
    parse_xmatrix,
    request_json,
    sign_request,
    verify_request,
)

# server-server-api.md, "Request Authentication", step 2.
SPEC_HEADER = (
    'X-Matrix origin="origin.hs.example.com",destination="destination.hs.example.com",'
    'key="ed25519:key1",sig="ABCDEF..."'
)
SPEC_AUTH = XMatrixAuth(
    origin="origin.hs.example.com",
    destination="destination.hs.example.com",
    key_id="ed25519:key1",
    signature="ABCDEF...",
)

# appendices.md, "Cryptographic Test Vectors": the seed of ed25519:1.
SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"

printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1)


class ParseTests(SynchronousTestCase):
    """server-server-api.md, "Request Authentication" (RFC 9110 section 11.4 grammar)."""

    def assertParseError(self, header: str | bytes, message: str) -> None:
        with self.assertRaises(XMatrixError) as caught:
            parse_xmatrix(header)
        self.assertEqual(str(caught.exception), message)

    def test_spec_example(self) -> None:
        """The spec's example header parses to its four parameters."""
        self.assertEqual(parse_xmatrix(SPEC_HEADER), SPEC_AUTH)

    def test_bytes(self) -> None:
        """A header given as bytes parses the same as text."""
        self.assertEqual(parse_xmatrix(SPEC_HEADER.encode("ascii")), SPEC_AUTH)

    def test_case_insensitive_scheme_and_names(self) -> None:
        """Scheme and parameter names are case-insensitive; order does not matter."""
        header = 'x-matrix SIG="ABCDEF...",Key="ed25519:key1",ORIGIN="origin.hs.example.com"'
        header += ',DeStInAtIoN="destination.hs.example.com"'
        self.assertEqual(parse_xmatrix(header), SPEC_AUTH)

    def test_quoted_escapes(self) -> None:
        """Backslash-character pairs in quoted values are replaced by the character."""
        auth = parse_xmatrix(r'X-Matrix origin="a\"b\\c\d",key="k",sig="s"')
        self.assertEqual(auth.origin, 'a"b\\cd')

    def test_quoted_value_keeps_commas_and_spaces(self) -> None:
        """Commas, '=' and whitespace inside quotes belong to the value."""
        auth = parse_xmatrix('X-Matrix origin="a, b=c\td",key="k",sig="s"')
        self.assertEqual(auth.origin, "a, b=c\td")

    def test_unquoted_values_with_colons(self) -> None:
        """Recipients allow colons in unquoted values, for compatibility with older servers."""
        header = "X-Matrix origin=example.org:8448,key=ed25519:a_b,sig=Ab+/9="
        self.assertEqual(
            parse_xmatrix(header),
            XMatrixAuth(
                origin="example.org:8448",
                destination=None,
                key_id="ed25519:a_b",
                signature="Ab+/9=",
            ),
        )

    def test_unquoted_values_of_every_token_character(self) -> None:
        """An unquoted value may hold every tchar of RFC 9110 section 5.6.2 (``!#$%&'*+-.^_`|~``,
        digits, letters of both cases), plus the spec's ':' and token68's '/' and '='."""
        tchars = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
        for value in (tchars, tchars[::-1] + ":/=", "Z", "z", "~", "!"):
            auth = parse_xmatrix(f"X-Matrix origin={value},key={value},sig={value}")
            self.assertEqual(auth, XMatrixAuth(value, None, value, value))

    def test_whitespace_around_commas_and_equals(self) -> None:
        """Spaces and tabs around commas (and BWS around '=') are allowed."""
        header = (
            'X-Matrix  origin = "origin.hs.example.com" ,\tdestination="destination.hs.example.com"'
            ' \t, key="ed25519:key1",  sig\t=\t"ABCDEF..."  '
        )
        self.assertEqual(parse_xmatrix(header), SPEC_AUTH)

    def test_empty_list_elements(self) -> None:
        """Empty list elements are ignored, as RFC 9110 section 5.6.1.2 asks of recipients."""
        header = 'X-Matrix ,origin="o",, key="k",sig="s",'
        self.assertEqual(parse_xmatrix(header), XMatrixAuth("o", None, "k", "s"))

    def test_unknown_parameters_ignored(self) -> None:
        """Unknown parameters are ignored ("Unknown parameters are ignored.")."""
        header = 'X-Matrix realm="x",origin=o,foo=bar,key=k,sig=s,signature="other"'
        self.assertEqual(parse_xmatrix(header), XMatrixAuth("o", None, "k", "s"))

    def test_destination_optional(self) -> None:
        """Headers from servers older than v1.3 may omit destination."""
        auth = parse_xmatrix('X-Matrix origin="o",key="k",sig="s"')
        self.assertIsNone(auth.destination)

    def test_signature_param_is_not_sig(self) -> None:
        """Only 'sig' carries the signature: the spec's example, example code and peers use it."""
        self.assertParseError(
            'X-Matrix origin="o",key="k",signature="s"', "X-Matrix header has no 'sig' parameter"
        )

    def test_missing_parameters(self) -> None:
        """origin, key and sig are each required."""
        self.assertParseError(
            'X-Matrix key="k",sig="s"', "X-Matrix header has no 'origin' parameter"
        )
        self.assertParseError(
            'X-Matrix origin="o",sig="s"', "X-Matrix header has no 'key' parameter"
        )
        self.assertParseError(
            'X-Matrix origin="o",key="k"', "X-Matrix header has no 'sig' parameter"
        )
        self.assertParseError("X-Matrix", "X-Matrix header has no 'origin' parameter")
        self.assertParseError("X-Matrix   ", "X-Matrix header has no 'origin' parameter")

    def test_empty_values(self) -> None:
        """Empty quoted values of the known parameters are refused, each naming it."""
        self.assertParseError(
            'X-Matrix origin="",key="k",sig="s"', "X-Matrix parameter 'origin' is empty"
        )
        self.assertParseError(
            'X-Matrix origin="o",destination="",key="k",sig="s"',
            "X-Matrix parameter 'destination' is empty",
        )
        self.assertParseError(
            'X-Matrix origin="o",key="",sig="s"', "X-Matrix parameter 'key' is empty"
        )
        self.assertParseError(
            'X-Matrix origin="o",key="k",sig=""', "X-Matrix parameter 'sig' is empty"
        )

    def test_duplicate_parameters(self) -> None:
        """A repeated parameter, in any case, is an error (RFC 9110: each name only once)."""
        self.assertParseError(
            'X-Matrix origin="a",ORIGIN="b",key="k",sig="s"',
            "X-Matrix header repeats the parameter 'origin'",
        )
        self.assertParseError(
            'X-Matrix origin="a",key="k",sig="s",x=1,x=1',
            "X-Matrix header repeats the parameter 'x'",
        )

    def test_long_names_cut_in_messages(self) -> None:
        """A message naming a peer's parameter quotes at most its first 32 characters."""
        name, cut = "n" * 40, repr("n" * 32)
        self.assertParseError(f"X-Matrix {name}", f"X-Matrix header: parameter {cut} has no '='")
        self.assertParseError(f"X-Matrix {name}=", f"X-Matrix header: parameter {cut} has no value")
        self.assertParseError(
            f"X-Matrix {name}=a,{name}=b", f"X-Matrix header repeats the parameter {cut}"
        )

    def test_wrong_scheme(self) -> None:
        """Other schemes, and X-Matrix glued to its parameters, are refused."""
        for header in ["Bearer abc", 'X-Matrixx origin="o"', "Basic", "", "   ", "=", "X-"]:
            self.assertParseError(header, "Authorization header does not use the X-Matrix scheme")
        self.assertParseError(
            'X-Matrix\torigin="o",key="k",sig="s"', "X-Matrix scheme must be followed by a space"
        )
        self.assertParseError(
            'X-Matrix,origin="o",key="k",sig="s"', "X-Matrix scheme must be followed by a space"
        )

    def test_garbage(self) -> None:
        """Malformed parameter lists give a message saying what was expected where."""
        cases = {
            'X-Matrix origin="o" key="k"': "X-Matrix header: expected ',' at offset 20",
            "X-Matrix origin": "X-Matrix header: parameter 'origin' has no '='",
            "X-Matrix origin,key=k": "X-Matrix header: parameter 'origin' has no '='",
            "X-Matrix origin=,key=k": "X-Matrix header: parameter 'origin' has no value",
            "X-Matrix origin=": "X-Matrix header: parameter 'origin' has no value",
            'X-Matrix ="o"': "X-Matrix header: expected a parameter name at offset 9",
            'X-Matrix origin="o': "X-Matrix header has an unterminated quoted string",
            'X-Matrix origin="o\\': "X-Matrix header has an unterminated quoted string",
            'X-Matrix origin="o"x': "X-Matrix header: expected ',' at offset 19",
            "X-Matrix origin=a@b": "X-Matrix header: expected ',' at offset 17",
            "X-Matrix abc==": "X-Matrix header has no 'origin' parameter",
        }
        for header, message in cases.items():
            self.assertParseError(header, message)

    def test_non_ascii_and_controls(self) -> None:
        """Characters outside printable ASCII (and tab) are refused, in text or bytes."""
        message = "Authorization header contains a character outside printable ASCII"
        self.assertParseError('X-Matrix origin="é",key="k",sig="s"', message)
        self.assertParseError('X-Matrix origin="é",key="k",sig="s"'.encode(), message)
        self.assertParseError('X-Matrix origin="a\nb",key="k",sig="s"', message)
        self.assertParseError("X-Matrix origin=\x00", message)

    def test_too_long(self) -> None:
        """Headers over 8 KiB are refused before parsing; one of exactly 8192 characters parses."""
        header = 'X-Matrix origin="o",key="k",sig="' + "s" * 9000 + '"'
        self.assertParseError(header, "Authorization header is too long")
        prefix = 'X-Matrix origin="o",key="k",sig="'
        signature = "s" * (8192 - len(prefix) - 1)
        self.assertEqual(parse_xmatrix(prefix + signature + '"').signature, signature)
        self.assertParseError(prefix + signature + 's"', "Authorization header is too long")

    def test_not_text(self) -> None:
        """A value that is neither str nor bytes is an XMatrixError, not a crash."""
        self.assertParseError(None, "Authorization header is not text")  # type: ignore[arg-type]

    @settings(max_examples=200)
    @given(st.one_of(st.text(), st.binary()))
    def test_arbitrary_input(self, header: str | bytes) -> None:
        """Arbitrary input parses or raises XMatrixError, never anything else."""
        try:
            parse_xmatrix(header)
        except XMatrixError:
            pass

    @settings(max_examples=200)
    @given(
        st.lists(
            st.sampled_from(
                [
                    *("X-Matrix", "x-matrix", " ", "\t", ",", "=", '"', "\\"),
                    *("origin", "destination", "key", "sig", "o", "k:1", "s/+="),
                ]
            ),
            max_size=30,
        )
    )
    def test_near_miss_input(self, pieces: list[str]) -> None:
        """Headers assembled from grammar fragments parse or raise XMatrixError only."""
        try:
            parse_xmatrix("".join(pieces))
        except XMatrixError:
            pass


class FormatTests(SynchronousTestCase):
    """The recommended sender form (server-server-api.md, "Request Authentication")."""

    def test_spec_example(self) -> None:
        """Formatting the spec example's values gives the spec's example header exactly."""
        self.assertEqual(format_xmatrix(SPEC_AUTH), SPEC_HEADER)

    def test_without_destination(self) -> None:
        """A None destination is left out."""
        self.assertEqual(
            format_xmatrix(XMatrixAuth("o", None, "k", "s")), 'X-Matrix origin="o",key="k",sig="s"'
        )

    def test_escapes(self) -> None:
        """Quotes and backslashes are escaped inside the quoted values."""
        header = format_xmatrix(XMatrixAuth('a"b', "c\\d", "k", "s"))
        self.assertEqual(header, r'X-Matrix origin="a\"b",destination="c\\d",key="k",sig="s"')

    @settings(max_examples=200)
    @given(printable, st.none() | printable, printable, printable)
    def test_round_trip(
        self, origin: str, destination: str | None, key_id: str, signature: str
    ) -> None:
        """format then parse is the identity for printable values, quotes and backslashes too."""
        auth = XMatrixAuth(origin, destination, key_id, signature)
        self.assertEqual(parse_xmatrix(format_xmatrix(auth)), auth)


class RequestJsonTests(SynchronousTestCase):
    """The signed object of server-server-api.md, "Request Authentication", step 1."""

    def test_with_content(self) -> None:
        """A request with a body signs method, uri, origin, destination and content."""
        self.assertEqual(
            request_json("PUT", "/_matrix/x?a=1", "o", "d", {"k": 1}),
            {"method": "PUT", "uri": "/_matrix/x?a=1", "origin": "o", "destination": "d"}
            | {"content": {"k": 1}},
        )

    def test_without_content(self) -> None:
        """content is omitted when there is no body (None), but kept when empty."""
        self.assertNotIn("content", request_json("GET", "/x", "o", "d"))
        self.assertEqual(request_json("PUT", "/x", "o", "d", {})["content"], {})
        self.assertEqual(request_json("PUT", "/x", "o", "d", [])["content"], [])


class SignVerifyTests(SynchronousTestCase):
    """sign_request and verify_request agree, and any change breaks the signature."""

    def setUp(self) -> None:
        self.signing_key = decode_signing_key_base64("ed25519", "1", SEED)
        self.verify_key = verify_key_of(self.signing_key)

    def test_header_shape(self) -> None:
        """sign_request gives the recommended header with our key ID and a valid signature."""
        header = sign_request(self.signing_key, "origin.example", "dest.example", "GET", "/x")
        auth = parse_xmatrix(header)
        self.assertEqual(auth.origin, "origin.example")
        self.assertEqual(auth.destination, "dest.example")
        self.assertEqual(auth.key_id, "ed25519:1")
        expected = sign_bytes(
            self.signing_key,
            encode_canonical_json(request_json("GET", "/x", "origin.example", "dest.example")),
        )
        self.assertEqual(auth.signature, expected)
        self.assertEqual(header, format_xmatrix(auth))

    def test_key_of_the_wrong_kind(self) -> None:
        """sign_request given a verify key, and verify_request given a signing key, are
        TypeErrors naming both kinds, not AttributeErrors."""
        auth = parse_xmatrix(sign_request(self.signing_key, "o.example", "d.example", "GET", "/x"))
        with self.assertRaises(TypeError) as raised:
            sign_request(self.verify_key, "o.example", "d.example", "GET", "/x")  # type: ignore[arg-type]
        self.assertIn("a SigningKey", str(raised.exception))
        self.assertIn("not a VerifyKey", str(raised.exception))
        with self.assertRaises(TypeError) as raised:
            verify_request(auth, self.signing_key, "GET", "/x", None, "d.example")  # type: ignore[arg-type]
        self.assertIn("a VerifyKey", str(raised.exception))
        self.assertIn("not a SigningKey", str(raised.exception))

    def test_verify_without_header_destination(self) -> None:
        """An older header without destination still verifies against our own name."""
        auth = parse_xmatrix(sign_request(self.signing_key, "o.example", "d.example", "GET", "/x"))
        old_style = XMatrixAuth(auth.origin, None, auth.key_id, auth.signature)
        verify_request(old_style, self.verify_key, "GET", "/x", None, "d.example")

    def test_wrong_key(self) -> None:
        """A signature by another key does not verify."""
        other = verify_key_of(generate_signing_key("2"))
        auth = parse_xmatrix(sign_request(self.signing_key, "o.example", "d.example", "GET", "/x"))
        with self.assertRaises(XMatrixError) as caught:
            verify_request(auth, other, "GET", "/x", None, "d.example")
        self.assertEqual(str(caught.exception), "invalid signature for request from 'o.example'")

    def test_long_origin_cut_in_message(self) -> None:
        """The failure message quotes at most the first 255 characters of the origin."""
        other = verify_key_of(generate_signing_key("2"))
        origin = "o" * 300 + ".example"
        auth = parse_xmatrix(sign_request(self.signing_key, origin, "d.example", "GET", "/x"))
        with self.assertRaises(XMatrixError) as caught:
            verify_request(auth, other, "GET", "/x", None, "d.example")
        self.assertEqual(str(caught.exception), f"invalid signature for request from {'o' * 255!r}")

    def test_malformed_signature(self) -> None:
        """A signature that is not base64 of 64 bytes fails verification cleanly."""
        for signature in ["ABCDEF...", "AAAA", "!" * 86]:
            auth = XMatrixAuth("o.example", "d.example", "ed25519:1", signature)
            with self.assertRaises(XMatrixError):
                verify_request(auth, self.verify_key, "GET", "/x", None, "d.example")

    def test_noncanonical_content(self) -> None:
        """Content with no JSON form (NaN) fails as an invalid signature, not a crash."""
        auth = parse_xmatrix(sign_request(self.signing_key, "o", "d", "PUT", "/x", {}))
        with self.assertRaises(XMatrixError) as caught:
            verify_request(auth, self.verify_key, "PUT", "/x", {"a": float("nan")}, "d")
        self.assertEqual(
            str(caught.exception), "invalid signature: request has no canonical JSON form"
        )

    def test_old_room_version_floats(self) -> None:
        """Received content with floats (room versions 1-5) is encoded non-strictly to verify."""
        content = {"event": {"content": {"x": 1.5}, "depth": 2**60}}
        data = encode_canonical_json(request_json("PUT", "/x", "o", "d", content), strict=False)
        auth = XMatrixAuth("o", "d", "ed25519:1", sign_bytes(self.signing_key, data))
        verify_request(auth, self.verify_key, "PUT", "/x", content, "d")

    @settings(max_examples=50, deadline=None)
    @given(
        method=st.sampled_from(["GET", "PUT", "POST"]),
        uri=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1),
        content=st.none() | st.dictionaries(st.text(max_size=5), st.integers(0, 10), max_size=3),
        change=st.sampled_from(["method", "uri", "content", "origin", "destination"]),
    )
    def test_sign_verify_and_tamper(self, method: str, uri: str, content: Any, change: str) -> None:
        """A signed request verifies, and changing any signed field breaks it."""
        header = sign_request(self.signing_key, "o.example", "d.example", method, uri, content)
        auth = parse_xmatrix(header)
        request = {"method": method, "uri": uri, "content": content, "destination": "d.example"}
        verify_request(auth, self.verify_key, **request)
        if change == "method":
            request["method"] = method.lower()
        elif change == "uri":
            request["uri"] = uri + "?"
        elif change == "content":
            request["content"] = {"tampered": True} if content is None else None
        elif change == "destination":
            request["destination"] = "e.example"
        else:
            auth = XMatrixAuth("p.example", auth.destination, auth.key_id, auth.signature)
        with self.assertRaises(XMatrixError):
            verify_request(auth, self.verify_key, **request)


class CheckDestinationTests(SynchronousTestCase):
    """A destination that does not match the receiver MUST give 401."""

    def test_matching_or_absent(self) -> None:
        """A matching destination, or none (older senders), passes."""
        check_destination(XMatrixAuth("o", "me.example", "k", "s"), "me.example")
        check_destination(XMatrixAuth("o", None, "k", "s"), "me.example")

    def test_mismatch(self) -> None:
        """A destination naming another server (even by case) raises XMatrixError."""
        for destination in ["other.example", "ME.example", "me.example:8448"]:
            with self.assertRaises(XMatrixError) as caught:
                check_destination(XMatrixAuth("o", destination, "k", "s"), "me.example")
            self.assertEqual(
                str(caught.exception), "X-Matrix destination does not name this server"
            )


def _general_parse(header: str) -> XMatrixAuth | str:
    """parse_xmatrix with the common-form shortcut turned off: the auth, or the error text."""
    from federation_invite.core import xmatrix

    original = xmatrix._parse_common_form
    xmatrix._parse_common_form = lambda header: None  # type: ignore[assignment]
    try:
        return parse_xmatrix(header)
    except XMatrixError as exc:
        return str(exc)
    finally:
        xmatrix._parse_common_form = original


def _parse_or_error(header: str) -> XMatrixAuth | str:
    try:
        return parse_xmatrix(header)
    except XMatrixError as exc:
        return str(exc)


quoted_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
param_name = st.sampled_from(
    ["origin", "destination", "key", "sig", "Origin", "KEY", "Sig", "other", "x_y", "or1gin"]
)


class CommonFormShortcutTests(SynchronousTestCase):
    """The regex shortcut for the common header form parses exactly as the general parser."""

    @settings(max_examples=200)
    @given(
        scheme=st.sampled_from(["X-Matrix", "x-matrix", "X-MATRIX", "X-Matr\u0131x", "X-Matrix "]),
        params=st.lists(st.tuples(param_name, quoted_value), max_size=6),
        separator=st.sampled_from([",", ", ", ",,"]),
    )
    def test_same_answer_as_general_parser(
        self, scheme: str, params: list[tuple[str, str]], separator: str
    ) -> None:
        """Any quoted header (escapes, repeats, odd casing, spacing): same auth or same error."""
        quoted = [
            f'{name}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
            for name, value in params
        ]
        header = f"{scheme} {separator.join(quoted)}"
        self.assertEqual(_parse_or_error(header), _general_parse(header))

    def test_spec_example_and_repeats(self) -> None:
        """The spec's example takes the shortcut; a repeated parameter still names itself."""
        self.assertEqual(parse_xmatrix(SPEC_HEADER), SPEC_AUTH)
        self.assertEqual(
            _parse_or_error(SPEC_HEADER + ',Key="x"'),
            "X-Matrix header repeats the parameter 'key'",
        )
