"""Tests for federation_invite.core.globs."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from federation_invite.core.globs import GlobList


class GlobListTests(SynchronousTestCase):
    def test_empty_matches_nothing(self) -> None:
        """An empty list matches nothing and is falsy."""
        globs = GlobList.of([])
        self.assertFalse(globs)
        self.assertFalse(globs.matches("anything"))
        self.assertFalse(globs.matches_server("EVIL.example.:8448"))
        self.assertFalse(globs.matches_user("@a:EVIL.example:8448"))

    def test_star_and_question(self) -> None:
        """'*' matches any run (including none) and '?' one character, on the whole value."""
        globs = GlobList.of(["*.evil.example", "spam?.org"])
        self.assertTrue(globs.matches("a.evil.example"))
        self.assertTrue(globs.matches(".evil.example"))
        self.assertFalse(globs.matches("evil.example"))
        self.assertTrue(globs.matches("spam1.org"))
        self.assertFalse(globs.matches("spam12.org"))
        self.assertFalse(globs.matches("xspam1.org.uk"))

    def test_case(self) -> None:
        """ignore_case=True matches in any case; without it, case is kept."""
        self.assertTrue(GlobList.of(["EVIL.example"], ignore_case=True).matches("evil.EXAMPLE"))
        self.assertFalse(GlobList.of(["@Spam:*"]).matches("@spam:x"))

    def test_regex_characters_are_literal(self) -> None:
        """Characters special to regular expressions match literally."""
        globs = GlobList.of(["a+b.(c)"])
        self.assertTrue(globs.matches("a+b.(c)"))
        self.assertFalse(globs.matches("aab.(c)"))
        self.assertFalse(globs.matches("a+bx(c)"))

    def test_a_single_string_is_refused(self) -> None:
        """A str (or bytes) given for the list is refused, not split into one-character
        patterns (which would allow or deny nearly everything); so is a pattern not a str."""
        for patterns in ("*.evil.example", b"*.evil.example"):
            with self.assertRaises(TypeError) as raised:
                GlobList.of(patterns)  # type: ignore[arg-type]
            self.assertIn("list of patterns", str(raised.exception))
            with self.assertRaises(TypeError):
                GlobList(patterns)
        for item in (1, None, b"evil.example"):
            with self.assertRaises(TypeError) as raised:
                GlobList.of(["ok.example", item])  # type: ignore[list-item]
            self.assertIn("str", str(raised.exception))
        self.assertTrue(GlobList.of(("a", "b")).matches("b"))
        self.assertTrue(GlobList.of(iter(["a"])).matches("a"))


class MatchingFormTests(SynchronousTestCase):
    def test_server_for_matching(self) -> None:
        """Ports, trailing dots and case never let a server past a rule (as m.room.server_acl)."""
        from federation_invite.core.globs import server_for_matching

        for name in ("evil.example", "evil.example:8448", "EVIL.example.", "Evil.Example.:443"):
            self.assertEqual(server_for_matching(name), "evil.example")
        self.assertEqual(server_for_matching("[::1]:8448"), "[::1]")
        self.assertEqual(server_for_matching("1.2.3.4:80"), "1.2.3.4")

    def test_user_for_matching(self) -> None:
        """User IDs keep their localpart; their server part is matched as a host."""
        from federation_invite.core.globs import user_for_matching

        self.assertEqual(user_for_matching("@Alice:EVIL.example:8448"), "@Alice:evil.example")
        self.assertEqual(user_for_matching("nocolon"), "nocolon")

    def test_matches_server_and_user(self) -> None:
        """Patterns match names as written (ports included) and as hosts (port-less, any case)."""
        with_port = GlobList.of(["localhost:1234"], ignore_case=True)
        self.assertTrue(with_port.matches_server("localhost:1234"))
        self.assertFalse(with_port.matches_server("localhost:9"))
        host = GlobList.of(["evil.example"], ignore_case=True)
        for name in ("evil.example", "evil.example:8448", "EVIL.example."):
            self.assertTrue(host.matches_server(name), name)
        users = GlobList.of(["@mallory:evil.example", "@bob:localhost:1234"])
        self.assertTrue(users.matches_user("@mallory:EVIL.example:8448"))
        self.assertTrue(users.matches_user("@bob:localhost:1234"))
        self.assertFalse(users.matches_user("@bob:localhost:9"))

    def test_user_id_without_server(self) -> None:
        """A user ID without ':' matches only a pattern matching it as written: there is no
        server name to compare as a host."""
        users = GlobList.of(["@mallory:evil.example", "@eve"], ignore_case=True)
        self.assertFalse(users.matches_user("@mallory"))
        self.assertTrue(users.matches_user("@eve"))
        self.assertFalse(users.matches_user("@eve2"))


class LiteralBracketTests(SynchronousTestCase):
    """Only '*' and '?' are wildcards, as in Synapse's server ACL globs: '[' and ']' stand for
    themselves, so an IPv6 server name can be listed."""

    def test_ipv6_server_name(self) -> None:
        """'[2001:db8::1]' matches that server (any port, any case), not single characters."""
        globs = GlobList.of(["[2001:db8::1]"], ignore_case=True)
        for name in ("[2001:db8::1]", "[2001:db8::1]:8448", "[2001:DB8::1]"):
            self.assertTrue(globs.matches_server(name), name)
        for name in ("2", "d", ":", "[", "]", "[2001:db8::2]", "2001:db8::1"):
            self.assertFalse(globs.matches_server(name), name)

    def test_ipv6_server_name_with_port(self) -> None:
        """'[::1]:8448' matches that exact name, not another port nor a single character."""
        globs = GlobList.of(["[::1]:8448"], ignore_case=True)
        self.assertTrue(globs.matches_server("[::1]:8448"))
        for name in ("[::1]:9", "[::1]", ":", "1", "[::2]:8448"):
            self.assertFalse(globs.matches_server(name), name)

    def test_ipv6_user_server_part(self) -> None:
        """A user glob with an IPv6 server part matches users of that server."""
        globs = GlobList.of(["@*:[2001:db8::1]"])
        self.assertTrue(globs.matches_user("@spam:[2001:db8::1]"))
        self.assertTrue(globs.matches_user("@spam:[2001:db8::1]:8448"))
        self.assertFalse(globs.matches_user("@spam:2"))
        self.assertFalse(globs.matches_user("@spam:[2001:db8::2]"))

    def test_ipv6_spellings_of_one_address(self) -> None:
        """A name matches as it is written and in server_name_key's form (IPv6 in RFC 5952
        form, port as a number): '[2001:db8::1]' also catches [2001:0DB8:0::1] and
        [2001:db8:0:0:0:0:0:1]:08448, and so does the pattern written in any of those ways;
        a user glob's server part likewise."""
        spellings = [
            "[2001:db8::1]",
            "[2001:DB8::1]",
            "[2001:0db8::1]",
            "[2001:db8:0::1]",
            "[2001:db8:0:0:0:0:0:1]",
            "[2001:0DB8:0000::0001]:08448",
        ]
        for pattern in [*spellings[:5], "[2001:0db8:0::1]"]:
            globs = GlobList.of([pattern], ignore_case=True)
            users = GlobList.of([f"@*:{pattern}"], ignore_case=True)
            for name in spellings:
                self.assertTrue(globs.matches_server(name), (pattern, name))
                self.assertTrue(users.matches_user(f"@spam:{name}"), (pattern, name))
            for name in ("[2001:db8::2]", "[2001:db8::1:0]", "[2001:db8::10]", "2001:db8::1"):
                self.assertFalse(globs.matches_server(name), (pattern, name))
                self.assertFalse(users.matches_user(f"@spam:{name}"), (pattern, name))

    def test_port_spellings(self) -> None:
        """A pattern with a port matches that port however it is written (08448 is 8448), as
        the pattern itself may be written; its host in any case, with or without a trailing
        dot."""
        for pattern in ("evil.example:8448", "evil.example:08448", "Evil.Example.:8448"):
            globs = GlobList.of([pattern], ignore_case=True)
            users = GlobList.of([f"@mallory:{pattern}"], ignore_case=True)
            for name in ("evil.example:8448", "EVIL.example:08448", "evil.example.:08448"):
                self.assertTrue(globs.matches_server(name), (pattern, name))
                self.assertTrue(users.matches_user(f"@mallory:{name}"), (pattern, name))
            for name in ("evil.example:8449", "evil.example:84480", "evil.example"):
                self.assertFalse(globs.matches_server(name), (pattern, name))
                self.assertFalse(users.matches_user(f"@mallory:{name}"), (pattern, name))
        v6 = GlobList.of(["[::1]:08448"], ignore_case=True)
        self.assertTrue(v6.matches_server("[0::1]:8448"))
        self.assertFalse(v6.matches_server("[::1]:9"))

    def test_wildcard_patterns_keep_their_spelling(self) -> None:
        """A pattern with wildcards in its host is not rewritten (its IPv6 prefix cannot be
        put in RFC 5952 form); names are matched as written and in that form, so a prefix
        written in that form catches every spelling, a port of digits is still a number."""
        globs = GlobList.of(["[2001:db8:*", "*.evil.example:08448"], ignore_case=True)
        for name in ("[2001:db8::1]", "[2001:0DB8::1]:8448", "[2001:db8:0:0:0:0:0:1]"):
            self.assertTrue(globs.matches_server(name), name)
        self.assertTrue(globs.matches_server("a.evil.example:8448"))
        self.assertFalse(globs.matches_server("[2001:db9::1]"))
        self.assertFalse(globs.matches_server("a.evil.example:8449"))

    def test_wildcards_inside_brackets(self) -> None:
        """'*' and '?' keep their meaning between brackets; '!' and '^' are literal."""
        globs = GlobList.of(["[2001:db8::*]", "[!a]", "[^b]"], ignore_case=True)
        self.assertTrue(globs.matches_server("[2001:db8::beef]:8448"))
        self.assertFalse(globs.matches_server("[2001:db9::1]"))
        self.assertTrue(globs.matches("[!a]"))
        self.assertTrue(globs.matches("[^b]"))
        self.assertFalse(globs.matches("c"))
        self.assertTrue(GlobList.of(["?[?]"]).matches("x[y]"))
        self.assertTrue(GlobList.of(["a\\*"]).matches("a\\bc"))
        self.assertFalse(GlobList.of(["a\\*"]).matches("a*"))

    def test_many_stars_do_not_backtrack(self) -> None:
        """A pattern of many stars against a long name that fails at its end answers at once
        (each star's literal is matched at its first place, as fnmatch does), not after
        trying every way of splitting the name."""
        globs = GlobList.of(["*a*a*a*a*a*a*a*a*b"], ignore_case=True)
        self.assertFalse(globs.matches("a" * 255))
        self.assertTrue(globs.matches("a" * 255 + "b"))
        self.assertTrue(GlobList.of(["*a?b*"]).matches("xxaxbyy"))
        self.assertFalse(GlobList.of(["*a?b*"]).matches("xxabyy"))
