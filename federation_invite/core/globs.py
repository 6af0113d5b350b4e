"""Glob lists for operator and per-user rules (``*.example.org``, ``@spam*:*``).

Patterns use ``*`` (any run of characters, including none) and ``?`` (one
character); every other character stands for itself, brackets included, so
``[2001:db8::1]`` names that IPv6 server. This is the glob of Synapse's server
ACLs (``glob_to_regex``), not ``fnmatch``'s, whose ``[...]`` is a character
class. Case is kept unless ``ignore_case``; the deny lists and invitee rules
pass it for user IDs as well as server names, as Synapse's ACLs and invite
rules match in any case.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

__all__ = ["GlobList", "server_for_matching", "user_for_matching"]


def server_for_matching(server_name: str) -> str:
    """A server name as rules see it: the host only, lower case, no trailing dot.

    Ports are dropped (as ``m.room.server_acl`` does) so that ``evil.example``
    cannot slip past a rule as ``evil.example:8448`` or ``EVIL.example.``.
    """
    if server_name.startswith("["):
        host = server_name[: server_name.find("]") + 1] or server_name
    else:
        host = server_name.partition(":")[0]
    return host.rstrip(".").lower()


def user_for_matching(user_id: str) -> str:
    """A user ID as rules see it: the localpart as is, the server part as a host."""
    localpart, colon, server = user_id.partition(":")
    return localpart + colon + server_for_matching(server) if colon else user_id


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


@attrs.frozen
class GlobList:
    """A compiled list of globs; ``matches`` is one regular-expression match."""

    patterns: tuple[str, ...] = attrs.field(converter=_patterns)
    ignore_case: bool = False
    _regex: re.Pattern[str] | None = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_regex", _compile(self.patterns, self.ignore_case))

    @classmethod
    def of(cls, patterns: Iterable[str], *, ignore_case: bool = False) -> GlobList:
        """Compile ``patterns``, a list (any iterable) of str; a single str is a TypeError."""
        return cls(patterns, ignore_case)

    def matches(self, value: str) -> bool:
        """True when any pattern matches the whole of ``value``."""
        return self._regex is not None and self._regex.match(value) is not None

    def matches_server(self, server_name: str) -> bool:
        """True when a pattern matches the name as written or its host (``server_for_matching``).

        ``evil.example`` thus also catches ``evil.example:8448`` and ``EVIL.example.``,
        while a pattern written with a port still matches that exact name.
        """
        if self._regex is None:  # the usual empty deny list: no need to normalise the name
            return False
        return self.matches(server_name) or self.matches(server_for_matching(server_name))

    def matches_user(self, user_id: str) -> bool:
        """As ``matches_server``, for user IDs (the localpart compared as written)."""
        if self._regex is None:
            return False
        return self.matches(user_id) or self.matches(user_for_matching(user_id))

    def __bool__(self) -> bool:
        return bool(self.patterns)
