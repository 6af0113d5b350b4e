"""Canonical JSON (appendices, "Canonical JSON") and strict JSON parsing.

``encode_canonical_json`` produces the exact bytes that hashes and signatures
are computed over: keys sorted by code point, no insignificant whitespace,
UTF-8, only the escapes JSON requires. Matrix additionally restricts numbers to
integers in ``[-(2**53)+1, 2**53-1]``; ``canonicaljson`` does not enforce that,
so we do, always for our own output and for received data in room versions
whose rules make it strict (v6+, "v6-canonical-json").
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from itertools import chain, compress
from operator import call
from typing import Any

import canonicaljson

from .errors import Codes, MatrixError

__all__ = [
    "MAX_SAFE_INTEGER",
    "MIN_SAFE_INTEGER",
    "CanonicalJSONError",
    "EncodedDict",
    "EncodedList",
    "check_canonical_json",
    "encode_canonical_json",
    "nesting_depth",
    "parse_json",
    "parse_json_with_numbers",
]

#: Deepest nesting of arrays and objects accepted in a parsed body, unless the
#: caller sets a lower one (``max_nesting``: an invite body's is a PDU's, see
#: ``format.MAX_PDU_NESTING``). Matrix events nest a handful of levels; this
#: bound keeps every later encoding (which recurses once per level) far from
#: Python's recursion limit, whatever the stack depth it runs at.
MAX_NESTING = 512

MAX_SAFE_INTEGER = 2**53 - 1
MIN_SAFE_INTEGER = -(2**53) + 1


class CanonicalJSONError(ValueError):
    """A value that has no canonical JSON form under the strict Matrix rules."""


def check_canonical_json(value: Any, *, strict: bool = True) -> None:
    """Raise ``CanonicalJSONError`` unless ``value`` can be encoded as canonical JSON.

    Always refused: non-string object keys, strings that are not valid Unicode
    (lone surrogates), NaN/Infinity, and types JSON does not have. With
    ``strict`` (room versions 6+ and all of our own output) floats and integers
    outside the interoperable range are refused too. The walk is iterative, so
    deep nesting cannot exhaust the stack.
    """
    stack: list[Any] = [value]
    pop = stack.pop
    push = stack.append
    while stack:
        item = pop()
        kind = type(item)
        if kind is str:
            _check_string(item)
        elif kind is dict:
            for key, child in item.items():
                if type(key) is not str:
                    raise CanonicalJSONError(f"object key {key!r} is not a string")
                _check_string(key)
                push(child)
        elif kind is list or kind is tuple:
            stack.extend(item)
        elif kind is bool or item is None:
            continue
        elif kind is int:
            if strict and not MIN_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                raise CanonicalJSONError(f"integer {item} is outside [-(2**53)+1, 2**53-1]")
        elif kind is float:
            if strict:
                raise CanonicalJSONError("floats are not allowed in canonical JSON")
            if item != item or item in (float("inf"), float("-inf")):
                raise CanonicalJSONError("NaN and Infinity are not JSON")
        else:
            raise CanonicalJSONError(f"{kind.__name__} is not a JSON type")


def _check_string(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CanonicalJSONError("string is not valid Unicode (lone surrogate)") from None


def encode_canonical_json(value: Any, *, strict: bool = True) -> bytes:
    """Encode ``value`` as canonical JSON bytes.

    ``strict`` (the default, for our own output and v6+ data) first checks the
    value with ``check_canonical_json``. ``strict=False`` admits floats and
    large integers, as old room versions (1 to 5) tolerate them in received
    events, and is meant for data parsed from JSON: it skips the walk and
    relies on the encoder, which still refuses NaN/Infinity, lone surrogates
    and non-JSON types (``CanonicalJSONError``).
    """
    if strict:
        check_canonical_json(value, strict=True)
    try:
        encoded: bytes = canonicaljson.encode_canonical_json(value)
    except RecursionError:
        # The value's fault only if it is nested deeper than any parsed body may be:
        # one within MAX_NESTING encodes at any sane stack depth, so this is the
        # caller's stack running out, which is no reason to refuse a valid value.
        if nesting_depth(value) <= MAX_NESTING:
            raise
        raise CanonicalJSONError("value is nested too deeply to encode") from None
    except (ValueError, TypeError):  # UnicodeEncodeError is a ValueError
        if strict:  # pragma: no cover - the strict check above refuses these first
            raise
        # Only on failure: walk the value to say exactly what is wrong.
        check_canonical_json(value, strict=False)
        raise CanonicalJSONError("value has no canonical JSON form") from None  # pragma: no cover
    return encoded


class EncodedDict(dict[str, Any]):
    """A JSON object that carries its canonical encoding, worked out once by its builder.

    ``canonical`` is ``encode_canonical_json(self, strict=False)``, computed
    when the value was built (e.g. from an encoding made for another purpose);
    ``federation_invite.web`` sends it instead of encoding again. Do not change
    the value afterwards: the bytes would no longer be its encoding.
    """

    __slots__ = ("canonical",)

    def __init__(self, value: dict[str, Any], canonical: bytes) -> None:
        super().__init__(value)
        self.canonical = canonical


class EncodedList(list[Any]):
    """A JSON array that carries its canonical encoding (see ``EncodedDict``)."""

    __slots__ = ("canonical",)

    def __init__(self, value: list[Any], canonical: bytes) -> None:
        super().__init__(value)
        self.canonical = canonical


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _Duplicates(threading.local):
    """The first duplicate key seen by the current parse, one per thread.

    The object hook only notes it: refusing at once would answer ``M_BAD_JSON``
    for bodies that turn out not to be JSON at all (trailing data, unterminated)
    or not an object, which the inbound table's row 2 makes ``M_NOT_JSON``.
    """

    key: str | None = None


_duplicates = _Duplicates()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs) and _duplicates.key is None:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                _duplicates.key = key
                break
            seen.add(key)
    return result


_decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)


def parse_json(
    body: bytes,
    *,
    require_object: bool = False,
    max_nesting: int = MAX_NESTING,
    nesting_problem: Callable[[Any], MatrixError | None] | None = None,
    problem_bounds_nesting: bool = False,
) -> Any:
    """Parse a request body strictly.

    Raises ``MatrixError`` 400 ``M_NOT_JSON`` for anything that is not UTF-8
    JSON (including NaN/Infinity and nesting deeper than ``max_nesting``, at
    most ``MAX_NESTING``), or with
    ``require_object`` that is not a JSON object, and otherwise 400
    ``M_BAD_JSON`` for an object with a duplicate key, whose meaning differs
    between parsers and so must never be signed. The duplicate is reported only
    once the body is known to be JSON (and an object, if required). ``body``
    is bytes (or a bytearray); a str is a ``TypeError``.

    ``nesting_problem`` replaces the ``max_nesting`` rule with one of the
    caller's, which may count only parts of the value: it is called with the
    value, only for a body with more than ``max_nesting`` arrays and objects
    (brackets counted, so it must find a problem only in a value nested
    deeper than that), and its answer, if not None, is the ``MatrixError``
    raised (the invite's is 400 ``M_BAD_JSON`` for an event nested too deep:
    valid JSON, but no well-formed event); the whole value stays bounded by
    ``MAX_NESTING`` (400 ``M_NOT_JSON``), walked apart
    for it first unless ``problem_bounds_nesting`` says that ``nesting_problem``
    finds a problem in any value nested deeper than that too (in the same walk,
    as ``inbound.invite_body_nesting_problem`` does, with the same answer:
    400 ``M_NOT_JSON`` ``JSON is nested deeper than 512 levels``).
    """
    return _parse(
        body, _decoder, require_object, max_nesting, nesting_problem, problem_bounds_nesting
    )


def parse_json_with_numbers(
    body: bytes,
    *,
    require_object: bool = False,
    max_nesting: int = MAX_NESTING,
    nesting_problem: Callable[[Any], MatrixError | None] | None = None,
    problem_bounds_nesting: bool = False,
) -> tuple[Any, bool]:
    """``parse_json``, also telling whether every number is strictly canonical.

    The second value is True when the body holds no float and no integer
    outside the interoperable range, i.e. nothing that strict canonical JSON
    (room versions 6+) refuses: callers can then skip walking the value again
    before hashing it. Found while parsing, at the cost of one call per number.
    """
    numbers = _numbers
    numbers.clean = True
    value = _parse(
        body,
        numbers.decoder,
        require_object,
        max_nesting,
        nesting_problem,
        problem_bounds_nesting,
    )
    return value, numbers.clean


class _NumbersDecoder(threading.local):
    """A decoder whose number hooks note any non-canonical number, one per thread.

    Building a ``JSONDecoder`` (and its C scanner) costs more than parsing a
    small invite, so each thread keeps one and resets its flag per parse.
    """

    def __init__(self) -> None:
        self.clean = True
        self.decoder = json.JSONDecoder(
            object_pairs_hook=_no_duplicates,
            parse_constant=_refuse_constant,
            parse_int=self._parse_int,
            parse_float=self._parse_float,
        )

    def _parse_int(self, text: str) -> int:
        value = int(text)
        if not MIN_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            self.clean = False
        return value

    def _parse_float(self, text: str) -> float:
        self.clean = False
        return float(text)


_numbers = _NumbersDecoder()


def _parse(
    body: bytes,
    decoder: json.JSONDecoder,
    require_object: bool,
    max_nesting: int,
    nesting_problem: Callable[[Any], MatrixError | None] | None,
    problem_bounds_nesting: bool,
) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MatrixError(400, Codes.NOT_JSON, "Body is not UTF-8") from None
    except AttributeError:  # no decode: a str, say (caught here to cost nothing per request)
        raise TypeError(f"the body to parse must be bytes, not {type(body).__name__}") from None
    duplicates = _duplicates
    duplicates.key = None
    try:
        value, end = decoder.raw_decode(text, _skip_ws(text, 0))
    except RecursionError:
        # As in encode_canonical_json: with no more brackets than MAX_NESTING, the
        # body is not what is too deep (our stack is), so it is no 400 of the peer's.
        if text.count("[") + text.count("{") <= MAX_NESTING:
            raise
        raise MatrixError(400, Codes.NOT_JSON, "JSON is nested too deeply") from None
    except ValueError:
        raise MatrixError(400, Codes.NOT_JSON, "Body is not valid JSON") from None
    if _skip_ws(text, end) != len(text):
        raise MatrixError(400, Codes.NOT_JSON, "Body is not valid JSON")
    # Nesting can only be as deep as there are brackets: count them at C speed
    # and walk the value only when there are many.
    limit = min(max_nesting, MAX_NESTING)
    brackets = text.count("[") + text.count("{")
    if brackets > limit:
        if nesting_problem is None:
            if nesting_depth(value, limit) > limit:
                raise MatrixError(400, Codes.NOT_JSON, f"JSON is nested deeper than {limit} levels")
        else:
            if not problem_bounds_nesting and brackets > MAX_NESTING:
                if nesting_depth(value) > MAX_NESTING:
                    raise MatrixError(
                        400, Codes.NOT_JSON, f"JSON is nested deeper than {MAX_NESTING} levels"
                    )
            problem = nesting_problem(value)
            if problem is not None:
                raise problem
    if require_object and not isinstance(value, dict):
        raise MatrixError(400, Codes.NOT_JSON, "The body must be a JSON object")
    if duplicates.key is not None:
        key = duplicates.key
        duplicates.key = None
        raise MatrixError(400, Codes.BAD_JSON, f"Duplicate key {key[:64]!r} in JSON")
    return value


#: What a value's arrays and objects hold, by type (``list`` is its own iterable). Parsed
#: JSON has no tuples, but values built to be encoded may (encoded as arrays).
_CHILDREN: dict[type, Callable[[Any], Iterable[Any]]] = {dict: dict.values, list: iter, tuple: iter}
_children_of = _CHILDREN.__getitem__
_is_container = frozenset(_CHILDREN).__contains__


def nesting_depth(value: Any, limit: int = MAX_NESTING) -> int:
    """The nesting depth of arrays and objects in parsed ``value`` (1 for ``[]``),
    counted up to ``limit + 1``.

    Level by level, keeping only the containers of each: every step is a
    C-level iteration (``map``, ``chain``, ``compress``), so the Python work
    grows with the depth, not with the number of values (a body of 1 MiB of
    ``[]`` is walked in ~35 ms, as against ~290 ms value by value).
    """
    level = [value] if _is_container(type(value)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            break
        children = list(chain.from_iterable(map(call, map(_children_of, map(type, level)), level)))
        level = list(compress(children, map(_is_container, map(type, children))))
    return depth


_JSON_WS = " \t\n\r"


def _skip_ws(text: str, index: int) -> int:
    """The index of the first character at or after ``index`` that is not JSON whitespace."""
    if index < len(text) and text[index] in _JSON_WS:
        # At C speed (whitespace is rare here): 1 MiB of it costs ~3 ms, not ~45.
        return len(text) - len(text[index:].lstrip(_JSON_WS))
    return index
