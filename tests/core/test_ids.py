"""Tests for federation_invite.core.ids: the identifier grammars of the appendices."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.core.errors import MatrixError
from federation_invite.core.ids import (
    host_ends_in_dot,
    is_valid_event_id,
    is_valid_room_id,
    is_valid_server_name,
    is_valid_user_id,
    parse_server_name,
    server_name_key,
    server_name_of,
)
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS

V3_EVENT_ID = "$CD66HAED5npg6074c6pDtLKalHjVfYb2q4Q3LZgrW6o"  # rooms/v3.md example
V3_EVENT_ID_SLASH = "$acR1l0raoZnm60CBwAVgqbZqoO/mYU81xysh1u7XcJk"  # rooms/v3.md example
V4_EVENT_ID = "$Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3a5lr5Zg"  # v4-event-ids.md example
V12_ROOM_ID = "!Nhcu5BS-UMnFX7hBVfVSoXiD7OgH6iRT-xyIuqDnpYQ"  # room_id_v12.yaml example


class ParseServerNameTests(SynchronousTestCase):
    """appendices.md, "Server Name"."""

    def test_spec_examples(self) -> None:
        """Every example of a valid server name in the appendix parses to (host, port)."""
        cases = {
            "matrix.org": ("matrix.org", None),
            "matrix.org:8888": ("matrix.org", 8888),
            "1.2.3.4": ("1.2.3.4", None),
            "1.2.3.4:1234": ("1.2.3.4", 1234),
            "[1234:5678::abcd]": ("[1234:5678::abcd]", None),
            "[1234:5678::abcd]:5678": ("[1234:5678::abcd]", 5678),
        }
        for name, expected in cases.items():
            self.assertEqual(parse_server_name(name), expected, name)
            self.assertTrue(is_valid_server_name(name), name)

    def test_dns_names(self) -> None:
        """dns-name is 1*255 of DIGIT / ALPHA / "-" / "."; case is kept (it is significant)."""
        for name in ["localhost", "MATRIX.ORG", "a-b.c", "x" * 255, "example.org.", "1.2.3"]:
            self.assertEqual(parse_server_name(name), (name, None), name)

    def test_dns_name_too_long(self) -> None:
        """dns-name allows at most 255 characters."""
        self.assertFalse(is_valid_server_name("x" * 256))

    def test_bad_dns_characters(self) -> None:
        """Characters outside dns-char are refused (underscore, space, slash, non-ASCII, @)."""
        for name in ["ex_ample.org", "ex ample.org", "a/b", "exämple.org", "a@b", "é", "a\x00"]:
            self.assertFalse(is_valid_server_name(name), name)

    def test_ports(self) -> None:
        """port = 1*5DIGIT, in 1..65535."""
        self.assertEqual(parse_server_name("h:1"), ("h", 1))
        self.assertEqual(parse_server_name("h:65535"), ("h", 65535))
        self.assertEqual(parse_server_name("h:00080"), ("h", 80))

    def test_bad_ports(self) -> None:
        """A port must be 1 to 5 ASCII digits in 1..65535: no sign, no empty, no extra colon."""
        bad = ["h:", "h:0", "h:65536", "h:99999", "h:123456", "h:+80", "h:-1", "h: 80", "h:8a"]
        bad += ["h:\uff18\uff10", "h:80:80", "[::1]:", "[::1]:0", "[::1]x"]
        for name in bad:
            with self.assertRaises(ValueError, msg=name):
                parse_server_name(name)

    def test_port_at_most_five_digits(self) -> None:
        """port = 1*5DIGIT: six digits are refused even when their value is in range."""
        for name in ["h:000080", "h:008448", "1.2.3.4:000001", "[::1]:000080"]:
            with self.assertRaises(ValueError, msg=name):
                parse_server_name(name)

    def test_ipv4_literal_range(self) -> None:
        """IPv4 literals are four decimal numbers in 0..255."""
        self.assertTrue(is_valid_server_name("255.255.255.255:8448"))
        self.assertTrue(is_valid_server_name("0.0.0.0"))
        self.assertFalse(is_valid_server_name("256.1.1.1"))
        self.assertFalse(is_valid_server_name("1.2.3.999"))

    def test_ipv4_literal_range_every_part(self) -> None:
        """Each of the four parts of a dotted quad is checked for 0..255, the middle ones too."""
        for name in ["1.256.1.1", "1.1.256.1", "1.1.1.256:8448"]:
            self.assertFalse(is_valid_server_name(name), name)
        # IPv4address = 1*3DIGIT per part, so a part of four digits makes no IPv4 literal:
        # "1000.1.1.1" is then a dns-name (1*255 of DIGIT / ALPHA / "-" / "."), which the
        # grammar allows (no range check applies to a dns-name).
        for name in ["1000.1.1.1", "1.1000.1.1", "1.1.1000.1", "1.1.1.1000"]:
            self.assertEqual(parse_server_name(name), (name, None), name)

    def test_ipv6_literals(self) -> None:
        """IPv6 literals (RFC 3513 section 2.2) in brackets, including the IPv4-suffixed form."""
        for name in ["[::1]", "[::]", "[::ffff:1.2.3.4]", "[FE80::1]:8448"]:
            self.assertTrue(is_valid_server_name(name), name)

    def test_bad_ipv6_literals(self) -> None:
        """Unbracketed, unterminated, zone-scoped or non-address IPv6 literals are refused."""
        for name in ["::1", "[::1", "[]", "[:::]", "[1::2::3]", "[fe80::1%eth0]", "[g::1]"]:
            self.assertFalse(is_valid_server_name(name), name)
        self.assertFalse(is_valid_server_name("[" + "1:" * 30 + "1]"))

    def test_not_a_string(self) -> None:
        """Empty strings and non-strings are not server names and raise ValueError."""
        for value in ["", None, 42, b"matrix.org", ["matrix.org"]]:
            with self.assertRaises(ValueError):
                parse_server_name(value)
            self.assertFalse(is_valid_server_name(value))

    @settings(max_examples=200)
    @given(st.text())
    def test_never_raises_other_errors(self, text: str) -> None:
        """Arbitrary text is either a server name or a ValueError, never another exception."""
        try:
            parse_server_name(text)
        except ValueError:
            pass


class HostEndsInDotTests(SynchronousTestCase):
    """Names valid by the grammar whose keys no certificate can let us fetch."""

    def test_host_ending_in_a_dot(self) -> None:
        """The host ends in a dot, with a port or without; not an IPv6 literal, a name whose
        dot is elsewhere, or an invalid name."""
        for name in (
            "example.org.",
            "example.org.:8448",
            "Example.Org.:1",
            "1.2.3.4.:80",
            "a.",
            ".",
        ):
            self.assertTrue(host_ends_in_dot(name), name)
        for name in (
            "example.org",
            "example.org:8448",
            "1.2.3.4:80",
            "[::1]:8448",
            "[::ffff:1.2.3.4]",
            "example.org.:",
            "example.org.:99999",
            "exa mple.org.:8448",
            "",
        ):
            self.assertFalse(host_ends_in_dot(name), name)


class ServerNameOfTests(SynchronousTestCase):
    """appendices.md, "Common Identifier Format"."""

    def test_sigils(self) -> None:
        """User, room, event and alias IDs all yield their domain."""
        self.assertEqual(server_name_of("@alice:example.org"), "example.org")
        self.assertEqual(server_name_of("!room:example.org"), "example.org")
        self.assertEqual(server_name_of("$event:example.org"), "example.org")
        self.assertEqual(server_name_of("#alias:example.org"), "example.org")

    def test_split_on_first_colon(self) -> None:
        """The localpart has no colon, so everything after the first one is the server name."""
        self.assertEqual(server_name_of("@alice:example.org:8448"), "example.org:8448")
        self.assertEqual(server_name_of("@a:[1234:5678::abcd]:5678"), "[1234:5678::abcd]:5678")
        self.assertEqual(server_name_of("@:example.org"), "example.org")

    def test_rejects(self) -> None:
        """No sigil, no colon, an invalid server or a non-string raise ValueError."""
        for value in [
            "alice:example.org",
            "%alice:example.org",
            "@alice",
            "@alice:",
            "@alice:exa mple.org",
            V4_EVENT_ID,
            V12_ROOM_ID,
            "",
            None,
            7,
        ]:
            with self.assertRaises(ValueError, msg=repr(value)):
                server_name_of(value)
            # Refusals are never remembered: the same bad value is refused again.
            with self.assertRaises(ValueError, msg=repr(value)):
                server_name_of(value)

    def test_answers_memoised(self) -> None:
        """A valid identifier's server is worked out once, then remembered."""
        from federation_invite.core import ids

        ids._server_name_of_text.cache_clear()
        for _ in range(3):
            self.assertEqual(server_name_of("@memo:example.org"), "example.org")
        info = ids._server_name_of_text.cache_info()
        self.assertEqual((info.misses, info.hits), (1, 2))


class ServerNameKeyTests(SynchronousTestCase):
    def test_host_lower_cased(self) -> None:
        """The key is the name in ASCII lower case, port kept: spellings of one server agree."""
        self.assertEqual(server_name_key("ExAmple.ORG:8448"), "example.org:8448")
        self.assertEqual(server_name_key("[FE80::1]:8448"), "[fe80::1]:8448")
        self.assertEqual(server_name_key("example.org"), "example.org")

    def test_spellings_of_one_server_share_a_key(self) -> None:
        """IPv6 literals in RFC 5952 form, ports as numbers: every spelling the grammar admits
        of one address and port (discovery connects to the address, the TLS check compares
        addresses, 08448 is port 8448) is one key, as a rate-limited server must not return
        as [2a01:04f8::1] or evil.example:08448. A trailing dot is kept: evil.example. is
        another name to TLS, which checks it against evil.example's certificate and fails."""
        spellings = {
            "[2a01:4f8::1]": [
                "[2a01:4f8::1]",
                "[2A01:4F8::1]",
                "[2a01:04f8::1]",
                "[2a01:4f8:0::1]",
                "[2a01:4f8:0:0:0:0:0:1]",
                "[2a01:04f8:0000:0000:0000:0000:0000:0001]",
                "[2a01:4f8::0:1]",
                "[2a01:4f8::01]",
            ],
            "[2a01:4f8::1]:8448": ["[2a01:04f8::1]:8448", "[2A01:4F8:0::1]:08448"],
            "[::1]": ["[::1]", "[0:0:0:0:0:0:0:1]", "[::0001]"],
            "evil.example:8448": [
                "evil.example:8448",
                "EVIL.example:8448",
                "evil.example:08448",
            ],
            "evil.example.:8448": ["evil.example.:08448", "EVIL.example.:8448"],
            "evil.example": ["evil.example", "Evil.Example"],
            "evil.example.": ["Evil.Example.", "evil.example."],
            "1.2.3.4:80": ["1.2.3.4:80", "1.2.3.4:080", "1.2.3.4:00080"],
        }
        for key, names in spellings.items():
            for name in names:
                self.assertEqual(server_name_key(name), key, name)
        for different in ("[2a01:4f8::1:0]", "[2a01:4f8::2]", "[2a01:4f8::1]:8449"):
            self.assertNotEqual(server_name_key(different), "[2a01:4f8::1]", different)
        # Not a valid server name: lower-cased, nothing else (never raises).
        from federation_invite.core import ids

        ids._canonical_server_name.cache_clear()
        long = "[" + "1:" * 50_000 + "]:08448"
        for invalid in ("[2A01:4F8::1", "[zz]:08448", "a b:08448", "a.example:008448", "", long):
            self.assertEqual(server_name_key(invalid), invalid.lower())
        # Only valid names are memoised: a peer cannot pin strings of its choosing.
        self.assertEqual(ids._canonical_server_name.cache_info().currsize, 0)


class UserIdTests(SynchronousTestCase):
    """appendices.md, "User Identifiers" and "Historical User IDs"."""

    def test_current_grammar(self) -> None:
        """Localparts of a-z, 0-9 and ._=-/+ are valid in both modes."""
        for user_id in ["@alice:example.org", "@a.b_c=d-e/f+g:example.org:8448", "@0:[::1]"]:
            self.assertTrue(is_valid_user_id(user_id), user_id)
            self.assertTrue(is_valid_user_id(user_id, strict=True), user_id)

    def test_strict_rejects_historical(self) -> None:
        """The current grammar refuses upper case, other punctuation, non-ASCII and empty."""
        for user_id in ["@Alice:example.org", "@a b:example.org", "@a!:example.org", "@é:h", "@:h"]:
            self.assertFalse(is_valid_user_id(user_id, strict=True), user_id)

    def test_historical_accepted(self) -> None:
        """Servers MUST accept any code point but ':' and NUL, control characters and empty too."""
        for user_id in ["@Alice:example.org", "@a b:h", "@é☃:h", "@\x01\x7f:h", "@:h", "@[]!:h"]:
            self.assertTrue(is_valid_user_id(user_id), user_id)

    def test_historical_rejects_nul_and_surrogates(self) -> None:
        """NUL and lone surrogates are never part of a localpart."""
        self.assertFalse(is_valid_user_id("@a\x00b:example.org"))
        self.assertFalse(is_valid_user_id("@a\ud800:example.org"))

    def test_length_limit_in_bytes(self) -> None:
        """The whole ID is at most 255 bytes of UTF-8, sigil and domain included."""
        server = ":example.org"
        fits = "@" + "a" * (255 - 1 - len(server)) + server
        self.assertEqual(len(fits), 255)
        self.assertTrue(is_valid_user_id(fits, strict=True))
        self.assertFalse(is_valid_user_id("@a" + fits[1:], strict=True))
        # 2-byte characters: 127 of them already exceed 255 bytes with the rest.
        self.assertFalse(is_valid_user_id("@" + "é" * 122 + server))
        self.assertTrue(is_valid_user_id("@" + "é" * 121 + server))

    def test_shape_rejects(self) -> None:
        """Wrong sigil, missing or invalid server, and non-strings are not user IDs."""
        for value in ["alice:h", "!alice:h", "@alice", "@alice:", "@alice:bad_host", None, 1]:
            self.assertFalse(is_valid_user_id(value), repr(value))


class RoomIdTests(SynchronousTestCase):
    """appendices.md, "Room IDs"; rooms/fragments/v12-event-format.md."""

    def test_v1_to_v11(self) -> None:
        """Room versions 1 to 11 use !opaque:server_name, opaque any code point but ':'/NUL."""
        for identifier in [str(n) for n in range(1, 12)]:
            self.assertTrue(is_valid_room_id("!abc123:matrix.org", identifier))
            self.assertTrue(is_valid_room_id("!Ünïcode stuff:h:8448", identifier))
            self.assertFalse(is_valid_room_id(V12_ROOM_ID, identifier))
            self.assertFalse(is_valid_room_id("!a\x00b:h", identifier))
            self.assertFalse(is_valid_room_id("!abc:bad host", identifier))
            self.assertFalse(is_valid_room_id("$abc:h", identifier))

    def test_v12(self) -> None:
        """v12 room IDs are '!' + 43 URL-safe unpadded base64 characters and no server."""
        self.assertTrue(is_valid_room_id(V12_ROOM_ID, "12"))
        self.assertTrue(is_valid_room_id(V12_ROOM_ID, KNOWN_ROOM_VERSIONS["12"]))
        for bad in [
            "!abc123:matrix.org",
            V12_ROOM_ID + ":matrix.org",
            V12_ROOM_ID[:-1],
            V12_ROOM_ID + "A",
            "!" + V3_EVENT_ID_SLASH[1:],
            "$" + V12_ROOM_ID[1:],
            V12_ROOM_ID[1:],
            None,
        ]:
            self.assertFalse(is_valid_room_id(bad, "12"), repr(bad))

    def test_length_limit(self) -> None:
        """Localpart, domain and sigil together MUST NOT exceed 255 bytes."""
        fits = "!" + "a" * 252 + ":h"
        self.assertTrue(is_valid_room_id(fits, "11"))
        self.assertFalse(is_valid_room_id("!a" + fits[1:], "11"))

    def test_unknown_room_version(self) -> None:
        """An unknown room version given by name raises 400 M_INCOMPATIBLE_ROOM_VERSION."""
        with self.assertRaises(MatrixError) as caught:
            is_valid_room_id("!a:h", "99")
        self.assertEqual(caught.exception.errcode, "M_INCOMPATIBLE_ROOM_VERSION")


class EventIdTests(SynchronousTestCase):
    """appendices.md, "Event IDs"; rooms/fragments/v1-event-ids.md, rooms/v3.md, v4-event-ids.md."""

    def test_v1_v2(self) -> None:
        """v1/v2 event IDs are $opaque:server_name."""
        for version in ("1", "2"):
            self.assertTrue(is_valid_event_id("$a4ecee13e2accdadf56c1025:example.com", version))
            self.assertTrue(is_valid_event_id("$abc:[::1]:8448", version))
            self.assertFalse(is_valid_event_id(V4_EVENT_ID, version))
            self.assertFalse(is_valid_event_id("$abc", version))
            self.assertFalse(is_valid_event_id("$a\x00:h", version))
            self.assertFalse(is_valid_event_id("@abc:h", version))
            self.assertTrue(is_valid_event_id("$" + "a" * 252 + ":h", version))
            self.assertFalse(is_valid_event_id("$" + "a" * 253 + ":h", version))

    def test_v3(self) -> None:
        """v3 event IDs are $ + 43 characters of standard unpadded base64 ('+' and '/' allowed)."""
        self.assertTrue(is_valid_event_id(V3_EVENT_ID, "3"))
        self.assertTrue(is_valid_event_id(V3_EVENT_ID_SLASH, "3"))
        self.assertTrue(is_valid_event_id("$" + "+" * 43, "3"))
        self.assertFalse(is_valid_event_id(V4_EVENT_ID, "3"))  # '-' and '_' are URL-safe only
        self.assertFalse(is_valid_event_id("$abc:example.org", "3"))
        self.assertFalse(is_valid_event_id(V3_EVENT_ID + "=", "3"))

    def test_v4_onwards(self) -> None:
        """v4+ event IDs are $ + 43 characters of URL-safe unpadded base64."""
        for identifier in [str(n) for n in range(4, 13)]:
            self.assertTrue(is_valid_event_id(V4_EVENT_ID, identifier))
            self.assertTrue(is_valid_event_id(V3_EVENT_ID, identifier))  # no '+' or '/'
            self.assertFalse(is_valid_event_id(V3_EVENT_ID_SLASH, identifier))
            self.assertFalse(is_valid_event_id(V4_EVENT_ID[:-1], identifier))
            self.assertFalse(is_valid_event_id(V4_EVENT_ID + "a", identifier))
            self.assertFalse(is_valid_event_id("!" + V4_EVENT_ID[1:], identifier))
            self.assertFalse(is_valid_event_id("$abc:example.org", identifier))
            self.assertFalse(is_valid_event_id(None, identifier))

    def test_oversized_ids_are_not_memoised(self) -> None:
        """IDs over 255 characters are refused (or split) without entering a memo: a peer
        could otherwise pin up to 8192 strings of its choosing, each up to the body cap,
        through a refused invite's prev_events or auth_events."""
        from federation_invite.core import ids

        ids._split_namespaced_text.cache_clear()
        ids._server_name_of_text.cache_clear()
        for n in range(3):
            opaque = f"{n}" + "x" * 100_000
            for version in ("1", "2"):
                self.assertFalse(is_valid_event_id(f"${opaque}:example.org", version))
                self.assertFalse(is_valid_room_id(f"!{opaque}:example.org", version))
            self.assertFalse(is_valid_user_id(f"@{opaque}:example.org"))
            self.assertFalse(is_valid_user_id(f"@{opaque}:example.org", strict=True))
            # server_name_of splits, it does not judge lengths: its answer is unchanged.
            self.assertEqual(server_name_of(f"@{opaque}:example.org"), "example.org")
            with self.assertRaises(ValueError):
                server_name_of(f"@{opaque}:bad host")
        self.assertEqual(ids._split_namespaced_text.cache_info().currsize, 0)
        self.assertEqual(ids._server_name_of_text.cache_info().currsize, 0)
        # Up to 255 characters, IDs are memoised (refused ones too: at most 1020 bytes).
        self.assertTrue(is_valid_event_id("$" + "a" * 252 + ":h", "1"))
        self.assertFalse(is_valid_event_id("$" + "a" * 253 + ":h", "1"))
        self.assertFalse(is_valid_event_id("$" + "é" * 200 + ":h", "1"))
        self.assertEqual(ids._split_namespaced_text.cache_info().currsize, 2)

    @settings(max_examples=200)
    @given(st.text(), st.sampled_from(sorted(KNOWN_ROOM_VERSIONS)))
    def test_predicates_never_raise(self, text: str, identifier: str) -> None:
        """The predicates answer a bool for any text, including lone surrogates."""
        for candidate in (text, "@" + text, "!" + text, "$" + text):
            self.assertIsInstance(is_valid_user_id(candidate), bool)
            self.assertIsInstance(is_valid_user_id(candidate, strict=True), bool)
            self.assertIsInstance(is_valid_room_id(candidate, identifier), bool)
            self.assertIsInstance(is_valid_event_id(candidate, identifier), bool)
