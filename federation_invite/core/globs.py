"""Glob lists for operator and per-user rules (``*.example.org``, ``@spam*:*``).

Patterns use ``*`` (any run of characters, including none) and ``?`` (one
character); every other character stands for itself, brackets included, so
``[2001:db8::1]`` names that IPv6 server. This is the glob of Synapse's server
ACLs (``glob_to_regex``), not ``fnmatch``'s, whose ``[...]`` is a character
class. Case is kept unless ``ignore_case``; the deny lists and invitee rules
pass it for user IDs as well as server names, as Synapse's ACLs and invite
rules match in any case.

Server names (and the server part of user IDs) are matched as written, in the
form ``server_name_key`` gives them (IPv6 literal in RFC 5952 form, port as a
number, lower case) without a trailing dot (``_rule_key``: rules only refuse, so
``evil.example.`` is refused as ``evil.example``, though it is another name to TLS
and to the keyring) and as that form's host alone; patterns
are also compiled in that form where they name one host or port
(``[2001:0DB8:0::1]``, ``evil.example:08448``), so every spelling of a denied
server is caught, however the rule spells it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable

import attrs

from .ids import is_valid_server_name, server_name_key

__all__ = ["GlobList", "server_for_matching", "user_for_matching"]


def _host_of(key: str) -> str:
    if key.startswith("["):
        return key[: key.find("]") + 1] or key
    # A trailing dot is gone from a valid name's _rule_key, not from an invalid one's.
    return key.partition(":")[0].rstrip(".")


def _rule_key(server_name: str) -> str:
    """``server_name_key`` without the trailing dot of a valid name's host (``evil.example.``,
    ``evil.example.:8448``): one name with ``evil.example`` to rules, which only refuse,
    though another to TLS, so ``server_name_key`` (the rate limits' key) keeps the dot."""
    key = server_name_key(server_name)
    if (key[-1:] == "." or ".:" in key) and key[:1] != "[" and is_valid_server_name(key):
        host, colon, port = key.partition(":")
        return (host.rstrip(".") or host) + colon + port
    return key


def server_for_matching(server_name: str) -> str:
    """A server name as rules see it: the host only, as ``server_name_key`` writes it
    (lower case, an IPv6 literal in RFC 5952 form), without a trailing dot.

    Ports are dropped (as ``m.room.server_acl`` does) so that ``evil.example``
    cannot slip past a rule as ``evil.example:8448`` or ``EVIL.example.``, nor
    ``[2001:db8::1]`` as ``[2001:0db8:0::1]``.
    """
    return _host_of(_rule_key(server_name))


def user_for_matching(user_id: str) -> str:
    """A user ID as rules see it: the localpart as is, the server part as a host."""
    localpart, colon, server = user_id.partition(":")
    return localpart + colon + server_for_matching(server) if colon else user_id


def _server_pattern(pattern: str) -> str:
    """``pattern`` with what it spells of one host or port as ``_rule_key`` would:
    an IPv6 literal without wildcards in RFC 5952 form, a port of digits as a number, a
    host without wildcards without its trailing dot. Wildcards are kept as written (an
    IPv6 prefix such as ``[2001:db8:*`` has no RFC 5952 form to be put in)."""
    if pattern.startswith("["):
        close = pattern.find("]")
        if close == -1:
            return pattern
        host, rest = pattern[: close + 1], pattern[close + 1 :]
        if "*" not in host and "?" not in host:
            try:
                host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
            except ValueError:
                pass
    else:
        host, colon, port = pattern.partition(":")
        rest = colon + port
        if "*" not in host and "?" not in host:
            host = host.rstrip(".") or host
    if rest[:1] == ":" and rest[1:].isdigit() and rest.isascii():
        rest = f":{int(rest[1:])}"
    return host + rest


def _user_pattern(pattern: str) -> str:
    """``pattern`` with its server part (after the first colon) as ``_server_pattern``."""
    localpart, colon, server = pattern.partition(":")
    return localpart + colon + _server_pattern(server) if colon else pattern


def _patterns(patterns: Iterable[object]) -> tuple[str, ...]:
    """``patterns`` as a tuple of strings; a lone str is refused rather than split into
    one-character globs (``"evil.example"`` would deny next to nothing, ``"*.a.org"``
    allow everything)."""
    if isinstance(patterns, str | bytes):
        raise TypeError(f"glob patterns must be a list of patterns, not {type(patterns).__name__}")
    items: list[str] = []
    for item in patterns:
        if not isinstance(item, str):
            raise TypeError(f"a glob pattern must be a str, not {type(item).__name__}")
        items.append(item)
    return tuple(items)


def _translate(pattern: str) -> str:
    """The regular expression matching the whole of a value against one glob.

    As ``fnmatch.translate`` does, each star but the last matches up to the first place where
    the text after it (of fixed length) fits, in an atomic group: a pattern such as
    ``*a*a*a*b`` thus fails on a long name in linear time instead of trying every split.
    """
    first, *rest = (
        "".join("." if char == "?" else re.escape(char) for char in segment)
        for segment in re.split(r"\*+", pattern)
    )
    if not rest:  # no star: the pattern is a fixed-length text
        return rf"(?s:{first})\Z"
    *middle, last = rest
    atomic = "".join(f"(?>.*?{segment})" for segment in middle)
    return rf"(?s:{first}{atomic}.*{last})\Z"


def _compile(patterns: tuple[str, ...], ignore_case: bool) -> re.Pattern[str] | None:
    if not patterns:
        return None
    flags = re.IGNORECASE if ignore_case else 0
    return re.compile("|".join(f"(?:{_translate(p)})" for p in patterns), flags)


def _compile_with(
    patterns: tuple[str, ...],
    ignore_case: bool,
    regex: re.Pattern[str] | None,
    normalise: Callable[[str], str],
) -> re.Pattern[str] | None:
    """The regex of ``patterns`` and their ``normalise``d forms (``regex`` if all are theirs)."""
    extra = tuple(
        normal for normal in dict.fromkeys(map(normalise, patterns)) if normal not in patterns
    )
    return _compile(patterns + extra, ignore_case) if extra else regex


@attrs.frozen
class GlobList:
    """A compiled list of globs; ``matches`` is one regular-expression match."""

    patterns: tuple[str, ...] = attrs.field(converter=_patterns)
    ignore_case: bool = False
    _regex: re.Pattern[str] | None = attrs.field(init=False, repr=False, eq=False)
    #: The patterns and their forms as server names (``_server_pattern``), as user IDs.
    _server_regex: re.Pattern[str] | None = attrs.field(init=False, repr=False, eq=False)
    _user_regex: re.Pattern[str] | None = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        regex = _compile(self.patterns, self.ignore_case)
        object.__setattr__(self, "_regex", regex)
        for name, normalise in (("_server_regex", _server_pattern), ("_user_regex", _user_pattern)):
            compiled = _compile_with(self.patterns, self.ignore_case, regex, normalise)
            object.__setattr__(self, name, compiled)

    @classmethod
    def of(cls, patterns: Iterable[str], *, ignore_case: bool = False) -> GlobList:
        """Compile ``patterns``, a list (any iterable) of str; a single str is a TypeError."""
        return cls(patterns, ignore_case)

    def matches(self, value: str) -> bool:
        """True when any pattern matches the whole of ``value``."""
        return self._regex is not None and self._regex.match(value) is not None

    def matches_server(self, server_name: str) -> bool:
        """True when a pattern, as written or in ``_rule_key``'s form, matches the name as
        written, its ``_rule_key`` or that key's host (``server_for_matching``).

        ``evil.example`` thus also catches ``evil.example:8448`` and ``EVIL.example.``,
        ``[2001:db8::1]`` catches ``[2001:0db8:0::1]``, while a pattern written with a port
        still matches that name only, its port written as ``8448`` or ``08448``.
        """
        regex = self._server_regex
        if regex is None:  # the usual empty deny list: no need to normalise the name
            return False
        if regex.match(server_name) is not None:
            return True
        key = _rule_key(server_name)
        if key != server_name and regex.match(key) is not None:
            return True
        host = _host_of(key)
        return host != key and regex.match(host) is not None

    def matches_user(self, user_id: str) -> bool:
        """As ``matches_server``, for user IDs (the localpart compared as written)."""
        regex = self._user_regex
        if regex is None:
            return False
        if regex.match(user_id) is not None:
            return True
        localpart, colon, server = user_id.partition(":")
        if not colon:
            return False
        key = _rule_key(server)
        if key != server and regex.match(f"{localpart}:{key}") is not None:
            return True
        host = _host_of(key)
        return host != key and regex.match(f"{localpart}:{host}") is not None

    def __bool__(self) -> bool:
        return bool(self.patterns)
