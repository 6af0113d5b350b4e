"""The ``X-Matrix`` Authorization header: parse, format, sign and verify.

server-server-api.md, "Request Authentication": the sending server signs the
JSON object ``{method, uri, origin, destination, content}`` with its server key
and sends ``Authorization: X-Matrix origin=...,destination=...,key=...,sig=...``.
The header grammar is RFC 9110's ``auth-scheme 1*SP #auth-param``; on top of
that the spec asks recipients to accept colons in unquoted values.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
from nacl.signing import VerifyKey
from signedjson.types import SigningKey

from .canonical import CanonicalJSONError, encode_canonical_json
from .keys import sign_with_key_id, verify_bytes

__all__ = [
    "XMatrixAuth",
    "XMatrixError",
    "check_destination",
    "format_xmatrix",
    "parse_xmatrix",
    "request_json",
    "sign_request",
    "verify_request",
]

#: Longest header we are willing to parse; a real one is a few hundred bytes.
MAX_HEADER_LENGTH = 8192

_SCHEME = "x-matrix"
_WS = " \t"
# RFC 9110 section 5.6.2: tchar.
_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Unquoted values: tchar plus ":" (the spec's compatibility rule: "the recipient
# should allow colons to be included in values without requiring the value to
# be enclosed in quotes") and the rest of token68 ("/", "="), which senders put
# unquoted in base64 signatures.
_VALUE_CHARS = _TCHARS | frozenset(":/=")


class XMatrixError(ValueError):
    """An ``X-Matrix`` header that is malformed or whose signature does not verify.

    The web edge answers it with 401 ``M_UNAUTHORIZED``.
    """


@attrs.frozen
class XMatrixAuth:
    """The parameters of one ``X-Matrix`` Authorization header."""

    origin: str
    #: Absent in headers from servers older than spec v1.3.
    destination: str | None
    key_id: str
    signature: str


def parse_xmatrix(header: str | bytes) -> XMatrixAuth:
    """Parse an ``Authorization`` header value, raising ``XMatrixError`` if malformed.

    Accepts what server-server-api "Request Authentication" and RFC 9110
    section 11.4 allow: a case-insensitive ``X-Matrix`` scheme, one or more
    spaces, then comma-separated ``name=value`` pairs with optional spaces or
    tabs around commas and ``=``; names case-insensitive; values tokens (which
    may contain ``:``) or quoted strings with backslash escapes. Unknown
    parameters are ignored, any repeated parameter is an error, and ``origin``,
    ``key`` and ``sig`` are required and non-empty. Values are returned
    unvalidated: callers check the origin's server-name grammar and the key ID.
    """
    if isinstance(header, bytes):
        # Header bytes are ISO-8859-1 on the wire; anything outside ASCII is
        # refused below anyway, so this decoding cannot fail or mislead.
        header = header.decode("latin-1")
    if not isinstance(header, str):
        raise XMatrixError("Authorization header is not text")
    if len(header) > MAX_HEADER_LENGTH:
        raise XMatrixError("Authorization header is too long")
    params = _parse_common_form(header)
    if params is None:
        params = _parse_any_form(header)
    for required in ("origin", "key", "sig"):
        if required not in params:
            raise XMatrixError(f"X-Matrix header has no {required!r} parameter")
    for name in ("origin", "destination", "key", "sig"):
        if params.get(name) == "":
            raise XMatrixError(f"X-Matrix parameter {name!r} is empty")
    return XMatrixAuth(
        origin=params["origin"],
        destination=params.get("destination"),
        key_id=params["key"],
        signature=params["sig"],
    )


# The form every known sender uses (the spec's own example): one space after
# the scheme, no other whitespace, every value quoted without escapes. A strict
# subset of what ``_parse_any_form`` accepts, parsed with two regexes.
_QUOTED_PARAM = r'[A-Za-z_]+="[ !#-\[\]-~]*"'
# The scheme's letters spelled out: re.IGNORECASE would also let non-ASCII
# look-alikes (U+0130, U+0131) through.
_COMMON_FORM = re.compile(rf"[Xx]-[Mm][Aa][Tt][Rr][Ii][Xx] ({_QUOTED_PARAM}(?:,{_QUOTED_PARAM})*)")
_COMMON_PARAM = re.compile(r'([A-Za-z_]+)="([^"]*)"')


def _parse_common_form(header: str) -> dict[str, str] | None:
    """The parameters of a header in the common form, or None for anything else
    (including a repeated parameter, whose error ``_parse_any_form`` words)."""
    match = _COMMON_FORM.fullmatch(header)
    if match is None:
        return None
    pairs = _COMMON_PARAM.findall(match.group(1))
    params = {name.lower(): value for name, value in pairs}
    return params if len(params) == len(pairs) else None


def _parse_any_form(header: str) -> dict[str, str]:
    """The parameters of any header the grammar allows (see ``parse_xmatrix``)."""
    for char in header:
        if not (" " <= char <= "~" or char == "\t"):
            raise XMatrixError("Authorization header contains a character outside printable ASCII")
    text = header.strip(_WS)
    scheme_end = 0
    while scheme_end < len(text) and text[scheme_end] in _TCHARS:
        scheme_end += 1
    if text[:scheme_end].lower() != _SCHEME:
        raise XMatrixError("Authorization header does not use the X-Matrix scheme")
    if scheme_end < len(text) and text[scheme_end] != " ":
        raise XMatrixError("X-Matrix scheme must be followed by a space")
    return _parse_params(text, scheme_end)


def _skip(text: str, index: int, chars: str = _WS) -> int:
    length = len(text)
    while index < length and text[index] in chars:
        index += 1
    return index


def _parse_params(text: str, index: int) -> dict[str, str]:
    """Parse ``#auth-param`` from ``index`` to the end of ``text``.

    Empty list elements (``a=1,,b=2``) are tolerated, as RFC 9110 section
    5.6.1.2 asks of recipients.
    """
    params: dict[str, str] = {}
    length = len(text)
    index = _skip(text, index)
    while index < length:
        if text[index] == ",":
            index = _skip(text, index + 1)
            continue
        start = index
        while index < length and text[index] in _TCHARS:
            index += 1
        if index == start:
            raise XMatrixError(f"X-Matrix header: expected a parameter name at offset {start}")
        name = text[start:index].lower()
        index = _skip(text, index)
        if index >= length or text[index] != "=":
            raise XMatrixError(f"X-Matrix header: parameter {name[:32]!r} has no '='")
        index = _skip(text, index + 1)
        if index < length and text[index] == '"':
            value, index = _parse_quoted(text, index + 1)
        else:
            start = index
            while index < length and text[index] in _VALUE_CHARS:
                index += 1
            if index == start:
                raise XMatrixError(f"X-Matrix header: parameter {name[:32]!r} has no value")
            value = text[start:index]
        if name in params:
            raise XMatrixError(f"X-Matrix header repeats the parameter {name[:32]!r}")
        params[name] = value
        index = _skip(text, index)
        if index < length and text[index] != ",":
            raise XMatrixError(f"X-Matrix header: expected ',' at offset {index}")
    return params


def _parse_quoted(text: str, index: int) -> tuple[str, int]:
    """Read a quoted-string body starting after the opening quote; return (value, end)."""
    chars: list[str] = []
    length = len(text)
    while index < length:
        char = text[index]
        if char == '"':
            return "".join(chars), index + 1
        if char == "\\":
            index += 1
            if index >= length:
                break
            char = text[index]
        chars.append(char)
        index += 1
    raise XMatrixError("X-Matrix header has an unterminated quoted string")


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def format_xmatrix(auth: XMatrixAuth) -> str:
    """The header value in the form the spec recommends senders use.

    ``X-Matrix origin="...",destination="...",key="...",sig="..."``: one space,
    lower-case names, no whitespace around commas, every value quoted (``"``
    and ``\\`` escaped, though real values never contain them). ``destination``
    is left out only when it is None.
    """
    parts = [f"origin={_quote(auth.origin)}"]
    if auth.destination is not None:
        parts.append(f"destination={_quote(auth.destination)}")
    parts.append(f"key={_quote(auth.key_id)}")
    parts.append(f"sig={_quote(auth.signature)}")
    return "X-Matrix " + ",".join(parts)


def request_json(
    method: str, uri: str, origin: str, destination: str, content: Any = None
) -> dict[str, Any]:
    """The object a request signature covers (server-server-api, "Request Authentication").

    ``uri`` is the path and query exactly as sent, without scheme or host;
    ``content`` is included only when the request has a body (is not None).
    """
    signed: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        signed["content"] = content
    return signed


def sign_request(
    signing_key: SigningKey,
    origin: str,
    destination: str,
    method: str,
    uri: str,
    content: Any = None,
) -> str:
    """Sign a request we are about to send and return its ``Authorization`` header value."""
    data = encode_canonical_json(request_json(method, uri, origin, destination, content))
    key_id, signature = sign_with_key_id(signing_key, data)
    return format_xmatrix(
        XMatrixAuth(origin=origin, destination=destination, key_id=key_id, signature=signature)
    )


def check_destination(auth: XMatrixAuth, server_name: str) -> None:
    """Raise ``XMatrixError`` if the header names a destination other than ``server_name``.

    The spec says a receiver MUST answer 401 when ``destination`` is present
    and does not match its name; a header without ``destination`` (older
    senders) passes.
    """
    if auth.destination is not None and auth.destination != server_name:
        raise XMatrixError("X-Matrix destination does not name this server")


def verify_request(
    auth: XMatrixAuth,
    verify_key: VerifyKey,
    method: str,
    uri: str,
    content: Any,
    destination: str,
) -> None:
    """Raise ``XMatrixError`` unless ``auth.signature`` signs this request.

    ``verify_key`` is ``auth.origin``'s key ``auth.key_id`` (fetching it is the
    keyring's job); ``uri`` is the raw path and query exactly as received;
    ``destination`` is our own server name, which the signed object always
    carries even when the header omits it (call ``check_destination`` first).
    ``content`` is the parsed body or None. Received bodies may hold floats or
    large integers from old room versions, so they are encoded non-strictly.
    """
    try:
        data = encode_canonical_json(
            request_json(method, uri, auth.origin, destination, content), strict=False
        )
    except CanonicalJSONError:
        raise XMatrixError("invalid signature: request has no canonical JSON form") from None
    if not verify_bytes(verify_key, data, auth.signature):
        raise XMatrixError(f"invalid signature for request from {auth.origin[:255]!r}")
