"""Identifier grammars: server names, user IDs, room IDs and event IDs.

Everything here follows appendices.md "Identifier Grammar" and the room version
fragments for the version-dependent forms (rooms/fragments/v1-event-ids.md,
v4-event-ids.md, rooms/v3.md "Event IDs", v12-event-format.md). The predicates
never raise: any object that is not a valid identifier simply answers False,
so they are safe on untrusted JSON.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import string

from .roomversions import EventIdFormat, RoomVersion, room_version_of

__all__ = [
    "MAX_ID_BYTES",
    "host_ends_in_dot",
    "is_valid_event_id",
    "is_valid_room_id",
    "is_valid_server_name",
    "is_valid_user_id",
    "parse_server_name",
    "server_name_key",
    "server_name_of",
]

#: User IDs, room IDs and event IDs MUST NOT exceed 255 bytes (appendices,
#: "User Identifiers", "Room IDs", "Event IDs"), measured as UTF-8.
MAX_ID_BYTES = 255

_SIGILS = "@!$#"

# appendices, "Server Name": dns-name = 1*255dns-char, dns-char = DIGIT / ALPHA / "-" / "."
_DNS_NAME_RE = re.compile(r"[0-9A-Za-z.\-]{1,255}\Z")
# IPv4address = 1*3DIGIT "." 1*3DIGIT "." 1*3DIGIT "." 1*3DIGIT
_IPV4_RE = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\Z")
# IPv6address = 2*45IPv6char; IPv6char = DIGIT / A-F / a-f / ":" / "."
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]{2,45}\Z")
# port = 1*5DIGIT (ASCII digits only: no sign, no Unicode digits)
_PORT_RE = re.compile(r"[0-9]{1,5}\Z")

# appendices, "User Identifiers": user_id_char = DIGIT / a-z / "-" / "." / "=" / "_" / "/" / "+"
_STRICT_LOCALPART_RE = re.compile(r"[a-z0-9._=\-/+]+\Z")

# rooms/v3.md "Event IDs": "$" + unpadded standard base64 of a sha256 hash (43 characters).
_V3_HASH_RE = re.compile(r"[A-Za-z0-9+/]{43}\Z")
# rooms/fragments/v4-event-ids.md: the same with the URL-safe alphabet.
_V4_HASH_RE = re.compile(r"[A-Za-z0-9\-_]{43}\Z")


def parse_server_name(server_name: object) -> tuple[str, int | None]:
    """Split a server name into ``(host, port)``, raising ``ValueError`` if invalid.

    Answers for valid names are memoised (the same few names recur in every
    request, ID and key lookup); invalid ones are checked every time.

    The grammar is appendices, "Server Name": a DNS name, a dotted-quad IPv4
    literal or a bracketed IPv6 literal, then an optional ``:port`` in
    1..65535. IPv6 hosts are returned with their brackets, as they appear in
    the name. Case is preserved: server names are case-sensitive.
    """
    if not isinstance(server_name, str):
        raise ValueError("server name is not a string")
    return _parse_server_name(server_name)


@functools.lru_cache(maxsize=4096)
def _parse_server_name(server_name: str) -> tuple[str, int | None]:
    if not server_name:
        raise ValueError("server name is empty")
    if server_name.startswith("["):
        close = server_name.find("]")
        if close == -1:
            raise ValueError("unterminated IPv6 literal in server name")
        host, rest = server_name[: close + 1], server_name[close + 1 :]
        _check_ipv6_literal(host[1:-1])
    else:
        host, colon, port_text = server_name.partition(":")
        rest = colon + port_text
        _check_host(host)
    port: int | None = None
    if rest:
        if not rest.startswith(":"):
            raise ValueError("unexpected characters after the host in server name")
        port = _parse_port(rest[1:])
    return host, port


def _check_ipv6_literal(literal: str) -> None:
    # The spec's character class keeps out zone IDs ("%eth0") that ipaddress accepts.
    if not _IPV6_RE.match(literal):
        raise ValueError("invalid IPv6 literal in server name")
    try:
        ipaddress.IPv6Address(literal)
    except ValueError:
        raise ValueError("invalid IPv6 literal in server name") from None


def _check_host(host: str) -> None:
    quad = _IPV4_RE.match(host)
    if quad is not None:
        # A dotted quad of digits is an IPv4 literal and must be in range; the
        # dns-name rule would also match "256.1.1.1", but no such name can be
        # meant as a DNS name, so we refuse the ambiguity.
        if any(int(part) > 255 for part in quad.groups()):
            raise ValueError("IPv4 literal in server name is out of range")
        return
    if not _DNS_NAME_RE.match(host):
        raise ValueError("invalid host in server name")


def _parse_port(text: str) -> int:
    if not _PORT_RE.match(text):
        raise ValueError("invalid port in server name")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError("port in server name is out of range")
    return port


def is_valid_server_name(server_name: object) -> bool:
    """True when ``server_name`` matches the appendices' "Server Name" grammar."""
    try:
        parse_server_name(server_name)
    except ValueError:
        return False
    return True


def host_ends_in_dot(server_name: str) -> bool:
    """True when ``server_name`` is valid and its host ends in a dot: ``example.org.``,
    ``example.org.:8448``.

    Valid by the grammar, but no certificate can match such a name (TLS checks it
    against the certificate of the name without the dot, and fails), so its keys can
    never be fetched. Only a name ending in a dot or holding ".:" is parsed (memoised).
    """
    if server_name[-1:] != "." and ".:" not in server_name:
        return False
    try:
        host, _ = parse_server_name(server_name)
    except ValueError:
        return False
    return host[-1:] == "."


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def server_name_key(server_name: str) -> str:
    """One key for the spellings of a server name that name the same server.

    The host in ASCII lower case (DNS names are case-insensitive, RFC 4343),
    an IPv6 literal in its RFC 5952 form (``[2001:db8::1]`` for
    ``[2001:0DB8:0::1]``: discovery connects to the address, and TLS matches
    the certificate by address), and the port as a number (``08448`` is port
    8448). The grammar (appendices, "Server Name") admits all these spellings,
    as Synapse does, so they are accepted and merged here rather than refused.
    A trailing dot is kept: ``example.org.`` is another name to TLS, which
    checks it against a certificate for ``example.org`` and fails (rules, which
    only refuse, drop it: ``core.globs``). A string that is no valid server
    name is only lower-cased.

    For the per-origin rate limits of authenticated origins and for rules, never
    for fetch or back-off tables (the keyring's, the client's): those are keyed
    by the name as fetched, since a fetch can fail for one spelling where the
    server's own succeeds (its key document names it as it spells itself), and
    anyone can name any spelling in a forged request. Never for signatures,
    which name a server as it spells itself.
    """
    key = server_name.translate(_ASCII_LOWER)
    # The usual name, a DNS name with no port or a port without a leading zero, is its
    # own key: a translate and two scans of a short string, no parsing.
    if key[:1] == "[" or ":0" in key:
        try:
            return _canonical_server_name(key)
        except ValueError:
            return key
    return key


@functools.lru_cache(maxsize=1024)
def _canonical_server_name(name: str) -> str:
    # Memoised (an IPv6 literal takes about 10 us to parse and write out); a name that
    # is not valid raises, so only valid names, of at most 261 characters, are kept.
    host, port = parse_server_name(name)
    if host[:1] == "[":
        host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
    return host if port is None else f"{host}:{port}"


def server_name_of(identifier: object) -> str:
    """The server part of a ``@user:server``, ``!room:server``, ``$event:server`` or alias ID.

    The localpart cannot contain ``:`` (appendices, "Common Identifier
    Format"), so the split is on the first colon after the sigil and the rest,
    which may carry a port or an IPv6 literal, is the server name. Raises
    ``ValueError`` for anything without a sigil, a colon or a valid server name
    (so it also rejects v3+ event IDs and v12 room IDs, which have no server).
    """
    if not isinstance(identifier, str):
        raise ValueError("identifier does not start with a sigil")
    if len(identifier) > MAX_ID_BYTES:
        # No valid ID is this long: split it, but keep it out of the memo (see _split_namespaced).
        return _server_name_of_text.__wrapped__(identifier)
    return _server_name_of_text(identifier)


@functools.lru_cache(maxsize=8192)
def _server_name_of_text(identifier: str) -> str:
    # Memoised: an invite asks for its sender's and invitee's servers several
    # times (membership, policy); invalid identifiers raise and are not cached,
    # and the caller keeps out identifiers over 255 characters, so an entry is
    # at most 1020 bytes of UTF-8.
    if not identifier or identifier[0] not in _SIGILS:
        raise ValueError("identifier does not start with a sigil")
    _, colon, server = identifier[1:].partition(":")
    if not colon:
        raise ValueError("identifier has no server name")
    if not is_valid_server_name(server):
        raise ValueError("identifier has an invalid server name")
    return server


def _fits(identifier: str) -> bool:
    """True when ``identifier`` is valid Unicode and at most 255 bytes of UTF-8."""
    try:
        return len(identifier.encode("utf-8")) <= MAX_ID_BYTES
    except UnicodeEncodeError:  # lone surrogates: never valid in an identifier
        return False


def _is_historical_localpart(localpart: str) -> bool:
    # appendices, "Historical User IDs" and "Room IDs": any non-surrogate code
    # point except ":" and NUL. Surrogates are refused by _fits, and ":" cannot
    # occur because the localpart ends at the first colon.
    return "\x00" not in localpart


def _split_namespaced(identifier: object, sigil: str) -> tuple[str, str] | None:
    """``(localpart, server)`` of a ``<sigil>localpart:server`` ID within limits, else None.

    Memoised for strings: one invite checks its sender and invitee several
    times (format, membership, policy), and the answer never changes. More
    than 255 characters is always more than 255 bytes: such a string is
    refused before the memo sees it, since the memo keeps what it is asked
    about, refused or not (8192 prev_events IDs near the 1 MiB body cap, each
    in an invite refused 400, would otherwise pin 8 GiB).
    """
    if (
        not isinstance(identifier, str)
        or len(identifier) > MAX_ID_BYTES
        or not identifier.startswith(sigil)
    ):
        return None
    return _split_namespaced_text(identifier)


@functools.lru_cache(maxsize=8192)
def _split_namespaced_text(identifier: str) -> tuple[str, str] | None:
    if not _fits(identifier):
        return None
    localpart, colon, server = identifier[1:].partition(":")
    if not colon or not is_valid_server_name(server):
        return None
    return localpart, server


def is_valid_user_id(user_id: object, *, strict: bool = False) -> bool:
    """True for ``@localpart:server_name`` within 255 bytes (appendices, "User Identifiers").

    By default the localpart follows "Historical User IDs", which servers MUST
    accept over federation: any code point except ``:`` and NUL, even empty.
    With ``strict`` it must match the current grammar ``[a-z0-9._=\\-/+]+``,
    which is what we require of users we create ourselves.
    """
    parts = _split_namespaced(user_id, "@")
    if parts is None:
        return False
    localpart = parts[0]
    if strict:
        return _STRICT_LOCALPART_RE.match(localpart) is not None
    return _is_historical_localpart(localpart)


def is_valid_room_id(room_id: object, room_version: RoomVersion | str) -> bool:
    """True for a room ID valid in ``room_version`` (appendices, "Room IDs").

    v1 to v11: ``!opaque:server_name``, the opaque part any code point but
    ``:`` and NUL. v12: the create event's ID with ``!`` for ``$``, i.e. ``!``
    plus 43 URL-safe unpadded base64 characters and no server part
    (rooms/fragments/v12-event-format.md). Raises ``MatrixError`` only for an
    unknown room version given by name.
    """
    version = room_version if type(room_version) is RoomVersion else room_version_of(room_version)
    if version.room_id_is_create_event_hash:
        return (
            isinstance(room_id, str)
            and room_id.startswith("!")
            and _V4_HASH_RE.match(room_id, 1) is not None
        )
    parts = _split_namespaced(room_id, "!")
    return parts is not None and _is_historical_localpart(parts[0])


def is_valid_event_id(event_id: object, room_version: RoomVersion | str) -> bool:
    """True for an event ID valid in ``room_version`` (appendices, "Event IDs").

    v1/v2: ``$opaque:server_name`` (rooms/fragments/v1-event-ids.md); v3: ``$``
    plus 43 standard unpadded base64 characters (rooms/v3.md "Event IDs");
    v4+: ``$`` plus 43 URL-safe characters (rooms/fragments/v4-event-ids.md).
    Always at most 255 bytes. Raises ``MatrixError`` only for an unknown room
    version given by name.
    """
    version = room_version if type(room_version) is RoomVersion else room_version_of(room_version)
    id_format = version.event_id_format
    if id_format is EventIdFormat.V1_OPAQUE:
        parts = _split_namespaced(event_id, "$")
        return parts is not None and _is_historical_localpart(parts[0])
    if not isinstance(event_id, str) or not event_id.startswith("$"):
        return False
    pattern = _V3_HASH_RE if id_format is EventIdFormat.V3_BASE64 else _V4_HASH_RE
    return pattern.match(event_id, 1) is not None
