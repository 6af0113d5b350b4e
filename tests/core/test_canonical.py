"""Tests for canonical JSON encoding and strict parsing (appendices, "Canonical JSON")."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from functools import partial
from types import FrameType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.core import canonical
from federation_invite.core.canonical import (
    MAX_NESTING,
    MAX_SAFE_INTEGER,
    MIN_SAFE_INTEGER,
    CanonicalJSONError,
    EncodedDict,
    EncodedList,
    check_canonical_json,
    encode_canonical_json,
    parse_json,
    parse_json_with_numbers,
)
from federation_invite.core.errors import MatrixError

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(MIN_SAFE_INTEGER, MAX_SAFE_INTEGER)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


class EncodeTests(SynchronousTestCase):
    def test_spec_examples(self) -> None:
        """The appendix's canonical JSON examples encode exactly as published."""
        cases: list[tuple[Any, bytes]] = [
            ({}, b"{}"),
            ({"one": 1, "two": "Two"}, b'{"one":1,"two":"Two"}'),
            ({"b": "2", "a": "1"}, b'{"a":"1","b":"2"}'),
            (
                {
                    "auth": {
                        "success": True,
                        "mxid": "@john.doe:example.com",
                        "profile": {
                            "display_name": "John Doe",
                            "three_pids": [
                                {"medium": "email", "address": "john.doe@example.org"},
                                {"medium": "msisdn", "address": "123456789"},
                            ],
                        },
                    }
                },
                b'{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":[{"address":"john.doe@example.org","medium":"email"},{"address":"123456789","medium":"msisdn"}]},"success":true}}',
            ),
            ({"a": "日本語"}, '{"a":"日本語"}'.encode()),
            ({"本": 2, "日": 1}, '{"日":1,"本":2}'.encode()),
            ({"a": "\u65e5"}, '{"a":"日"}'.encode()),
            ({"a": None}, b'{"a":null}'),
            ({"a": -0}, b'{"a":0}'),
            ({"a": '\u0000\u007f\b\t\n\f\r"\\'}, b'{"a":"\\u0000\x7f\\b\\t\\n\\f\\r\\"\\\\"}'),
        ]
        for value, expected in cases:
            self.assertEqual(encode_canonical_json(value), expected)

    def test_spec_number_example_parsed_from_text(self) -> None:
        """The appendix's last example, ``{"a": -0, "b": 1e10}``, read from JSON text.

        ``-0`` parses as the integer 0 and encodes as ``0``. ``1e10`` is a float:
        refused where numbers are strict (our output, rooms v6+), and kept as
        ``10000000000.0`` in lax mode (rooms v1-5), as Synapse's canonicaljson
        encodes it, not as the appendix's ``10000000000``: agreeing with Synapse's
        hashes of old rooms matters more than the example.
        """
        self.assertEqual(encode_canonical_json(parse_json(b'{"a": -0}')), b'{"a":0}')
        parsed = parse_json(b'{"a": -0, "b": 1e10}')
        self.assertRaises(CanonicalJSONError, encode_canonical_json, parsed)
        self.assertEqual(encode_canonical_json(parsed, strict=False), b'{"a":0,"b":10000000000.0}')

    def test_integer_range(self) -> None:
        """Integers in [-(2**53)+1, 2**53-1] are fine; outside is refused when strict."""
        self.assertEqual(
            encode_canonical_json([MAX_SAFE_INTEGER, MIN_SAFE_INTEGER]),
            b"[9007199254740991,-9007199254740991]",
        )
        for value in (MAX_SAFE_INTEGER + 1, MIN_SAFE_INTEGER - 1):
            self.assertRaises(CanonicalJSONError, encode_canonical_json, {"a": [value]})
            self.assertEqual(encode_canonical_json(value, strict=False), str(value).encode())

    def test_floats(self) -> None:
        """Floats are refused when strict (v6+ and our output) and kept otherwise; NaN never."""
        self.assertRaises(CanonicalJSONError, encode_canonical_json, {"a": 1.5})
        self.assertEqual(encode_canonical_json({"a": 1.5}, strict=False), b'{"a":1.5}')
        for bad in (float("nan"), float("inf"), float("-inf")):
            self.assertRaises(CanonicalJSONError, check_canonical_json, [bad], strict=False)

    def test_non_json(self) -> None:
        """Non-string keys, lone surrogates and non-JSON types are always refused."""
        self.assertRaises(CanonicalJSONError, check_canonical_json, {1: "a"})
        self.assertRaises(CanonicalJSONError, check_canonical_json, {"\ud800": 1}, strict=False)
        self.assertRaises(CanonicalJSONError, check_canonical_json, ["\udfff"])
        self.assertRaises(CanonicalJSONError, check_canonical_json, {"a": object()})
        self.assertRaises(CanonicalJSONError, check_canonical_json, {"a": {1, 2}})
        check_canonical_json(("tuple", True, None))

    def test_deep_nesting_does_not_exhaust_stack(self) -> None:
        """The check walks iteratively: very deep values are checked without recursion."""
        value: Any = "x"
        for _ in range(100_000):
            value = [value]
        check_canonical_json(value)
        value = [1.5]
        for _ in range(100_000):
            value = [value]
        self.assertRaises(CanonicalJSONError, check_canonical_json, value)

    @settings(max_examples=200)
    @given(st.dictionaries(st.text(max_size=6), json_values, max_size=6))
    def test_key_order_irrelevant(self, value: dict[str, Any]) -> None:
        """Canonical output does not depend on key insertion order and parses back equal."""
        reversed_value = dict(reversed(list(value.items())))
        encoded = encode_canonical_json(value)
        self.assertEqual(encoded, encode_canonical_json(reversed_value))
        self.assertEqual(json.loads(encoded), value)
        self.assertEqual(parse_json(encoded), value)


class ParseTests(SynchronousTestCase):
    def refused(self, body: bytes) -> MatrixError:
        return self.assertRaises(MatrixError, parse_json, body)

    def test_valid(self) -> None:
        """JSON with surrounding whitespace parses; so do scalars."""
        self.assertEqual(parse_json(b' \n{"a": [1, 2.5]}\t'), {"a": [1, 2.5]})
        self.assertEqual(parse_json(b"3"), 3)

    def test_not_json(self) -> None:
        """Non-UTF-8, invalid JSON, trailing data, NaN/Infinity and empty bodies: 400 M_NOT_JSON."""
        for body in (b"\xff", b"{", b"{} {}", b"[NaN]", b"Infinity", b"-Infinity", b"", b"  "):
            error = self.refused(body)
            self.assertEqual((error.http_status, error.errcode), (400, "M_NOT_JSON"), body)

    def test_body_not_bytes(self) -> None:
        """A body given as str (or anything without bytes' decode) is a TypeError saying
        bytes are wanted, not an AttributeError; bytearray is accepted."""
        for body in ("{}", None, memoryview(b"{}")):
            for parse in (parse_json, parse_json_with_numbers):
                with self.assertRaises(TypeError) as raised:
                    parse(body)  # type: ignore[arg-type]
                self.assertIn("bytes", str(raised.exception))
        self.assertEqual(parse_json(bytearray(b"{}")), {})

    def test_duplicate_keys(self) -> None:
        """A duplicate key at any depth: 400 M_BAD_JSON naming the key."""
        for body in (b'{"a":1,"a":2}', b'{"x":[{"b":1,"c":2,"b":3}]}'):
            error = self.refused(body)
            self.assertEqual((error.http_status, error.errcode), (400, "M_BAD_JSON"))
        self.assertIn("'b'", self.refused(b'{"x":{"b":1,"b":1}}').message)

    def test_not_json_wins_over_duplicate_keys(self) -> None:
        """A duplicate key is M_BAD_JSON only in a body that is JSON (rows 2 before 3):
        trailing data, an unterminated body or NaN after the duplicate is M_NOT_JSON, and
        with require_object so is a top-level array holding one."""
        for parse in (parse_json, parse_json_with_numbers):
            for body in (
                b'{"a":1,"a":2} trailing',
                b'[{"a":1,"a":2}',
                b'{"a":{"b":1,"b":2},"c":NaN}',
                b'{"a":1,"a":2}{"a":1,"a":2}',
            ):
                error = self.assertRaises(MatrixError, parse, body)
                self.assertEqual((error.http_status, error.errcode), (400, "M_NOT_JSON"), body)
            body = b'[{"a":1,"a":2}]'
            error = self.assertRaises(MatrixError, parse, body, require_object=True)
            self.assertEqual((error.http_status, error.errcode), (400, "M_NOT_JSON"))
            error = self.assertRaises(MatrixError, parse, body)
            self.assertEqual((error.http_status, error.errcode), (400, "M_BAD_JSON"))
            error = self.assertRaises(
                MatrixError, parse, b'{"x":{"b":1,"b":2}}', require_object=True
            )
            self.assertEqual(
                (error.errcode, error.message), ("M_BAD_JSON", "Duplicate key 'b' in JSON")
            )
            # A refused duplicate leaves nothing behind for the next parse.
            self.assertEqual(parse(b'{"a":1}', require_object=True), parse(b'{"a":1}'))

    def test_refused_body_leaves_no_duplicate_behind(self) -> None:
        """A duplicate key noted in a body then refused as M_NOT_JSON (trailing data,
        unterminated, NaN, not an object) is forgotten: each parse starts with no duplicate
        noted, so the next body, which has none, parses rather than being refused
        400 M_BAD_JSON for the last body's key."""
        for parse in (parse_json, parse_json_with_numbers):
            for body, require_object in (
                (b'{"a":1,"a":2} trailing', False),
                (b'[{"a":1,"a":2}', False),
                (b'{"a":{"b":1,"b":2},"c":NaN}', False),
                (b'[{"a":1,"a":2}]', True),
            ):
                error = self.assertRaises(MatrixError, parse, body, require_object=require_object)
                self.assertEqual((error.http_status, error.errcode), (400, "M_NOT_JSON"), body)
                self.assertEqual(parse_json(b'{"b":1}'), {"b": 1}, body)
                self.assertEqual(parse_json_with_numbers(b'{"b":1}'), ({"b": 1}, True), body)

    def test_duplicate_noted_per_thread(self) -> None:
        """A duplicate seen by a parse in another thread does not refuse this thread's parse."""
        from federation_invite.core import canonical

        def other() -> None:
            canonical._no_duplicates([("k", 1), ("k", 2)])  # as if mid-parse

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        self.assertIsNone(canonical._duplicates.key)
        self.assertEqual(parse_json(b'{"a":1}'), {"a": 1})

    def test_deep_nesting(self) -> None:
        """JSON nested beyond the parser's recursion limit is refused, not a crash."""
        error = self.refused(b"[" * 200_000 + b"]" * 200_000)
        self.assertEqual((error.http_status, error.errcode), (400, "M_NOT_JSON"))


class ParseWithNumbersTests(SynchronousTestCase):
    def test_numbers_flag(self) -> None:
        """The flag is True only when no float and no out-of-range integer occurs anywhere;
        the range's ends, 2**53-1 and -(2**53)+1, are in it (appendices, "Canonical JSON":
        integers in [-(2**53)+1, (2**53)-1])."""
        cases = [
            (b'{"a": [1, -2, {"b": 9007199254740991}]}', True),
            (b'{"a": "1.5 in a string"}', True),
            (b'{"a": 1.0}', False),
            (b'{"a": [1e2]}', False),
            (b'{"a": {"b": 9007199254740992}}', False),
            (b"[-9007199254740992]", False),
            (b"[9007199254740991, -9007199254740991]", True),
            (b"{}", True),
        ]
        for body, clean in cases:
            value, numbers_strict = parse_json_with_numbers(body)
            self.assertEqual(value, json.loads(body))
            self.assertEqual(numbers_strict, clean, body)

    def test_numbers_flag_is_per_thread(self) -> None:
        """Each thread has its own decoder and flag: a float parsed in one thread does not
        mark another thread's parse."""
        from federation_invite.core import canonical

        seen: dict[str, Any] = {}
        parse_json_with_numbers(b"[1]")

        def other() -> None:
            seen["result"] = parse_json_with_numbers(b'{"a": 1.5}')
            seen["decoder"] = canonical._numbers.decoder
            canonical._numbers.clean = False  # left dirty: must not leak to the main thread

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        self.assertEqual(seen["result"], ({"a": 1.5}, False))
        self.assertIsNot(seen["decoder"], canonical._numbers.decoder)
        self.assertTrue(canonical._numbers.clean)
        self.assertEqual(parse_json_with_numbers(b'{"a": 1}'), ({"a": 1}, True))

    def test_same_errors_as_parse_json(self) -> None:
        """Refusals are those of parse_json (duplicate keys, NaN, trailing data)."""
        for body, errcode in (
            (b'{"a":1,"a":2}', "M_BAD_JSON"),
            (b"[NaN]", "M_NOT_JSON"),
            (b"{} 1", "M_NOT_JSON"),
        ):
            error = self.assertRaises(MatrixError, parse_json_with_numbers, body)
            self.assertEqual(error.errcode, errcode)

    @settings(max_examples=100)
    @given(json_values)
    def test_lax_encoding_equals_strict_when_numbers_clean(self, value: Any) -> None:
        """For values without floats or large integers, lax and strict encodings are equal."""
        self.assertEqual(encode_canonical_json(value, strict=False), encode_canonical_json(value))

    def test_lax_encoding_refusals(self) -> None:
        """The lax encoding still refuses NaN, lone surrogates and non-JSON types, precisely."""
        self.assertIn(
            "NaN",
            str(
                self.assertRaises(
                    CanonicalJSONError, encode_canonical_json, [float("nan")], strict=False
                )
            ),
        )
        self.assertIn(
            "surrogate",
            str(
                self.assertRaises(
                    CanonicalJSONError, encode_canonical_json, ["\ud800"], strict=False
                )
            ),
        )
        self.assertRaises(CanonicalJSONError, encode_canonical_json, [object()], strict=False)


class EncodedValueTests(SynchronousTestCase):
    def test_encoded_containers_hold_their_value(self) -> None:
        """EncodedDict and EncodedList hold the value they were built from, its encoding
        beside it: whoever reads the value rather than the bytes (an embedder calling
        on_invite, v1's ``[200, {...}]`` answer) sees what the bytes say, not an empty
        container."""
        value = {"event": {"b": [1, 2], "a": None}}
        encoded = EncodedDict(value, encode_canonical_json(value))
        self.assertEqual(encoded, value)
        self.assertEqual(json.loads(encoded.canonical), encoded)
        wrapped = EncodedList([200, encoded], b"[200," + encoded.canonical + b"]")
        self.assertEqual(wrapped, [200, value])
        self.assertEqual(json.loads(wrapped.canonical), wrapped)


class NestingTests(SynchronousTestCase):
    def test_nesting_limit(self) -> None:
        """Bodies nested deeper than MAX_NESTING are 400 M_NOT_JSON; at the limit they parse."""
        from federation_invite.core.canonical import MAX_NESTING

        at_limit = b"[" * MAX_NESTING + b"]" * MAX_NESTING
        self.assertEqual(len(str(parse_json(at_limit))), 2 * MAX_NESTING)
        for body in (
            b"[" * (MAX_NESTING + 1) + b"]" * (MAX_NESTING + 1),
            b'{"a":' * 600 + b"1" + b"}" * 600,
        ):
            for parse in (parse_json, parse_json_with_numbers):
                error = self.assertRaises(MatrixError, parse, body)
                self.assertEqual((error.http_status, error.errcode), (400, "M_NOT_JSON"))

    def test_many_brackets_but_shallow(self) -> None:
        """Many brackets side by side are not deep: a wide body parses."""
        body = b"[" + b",".join([b"[]"] * 2000) + b"]"
        self.assertEqual(len(parse_json(body)), 2000)

    def test_nesting_limit_exactly(self) -> None:
        """Arrays, objects and both mixed: nested exactly MAX_NESTING (512) deep they parse,
        one level more is 400 M_NOT_JSON, alone or after 600 shallow brackets."""
        self.assertEqual(MAX_NESTING, 512)
        shallow = ",".join(["[]", "{}", '{"a":[]}'] * 200)  # 1,000 brackets, depth 2
        self.assertEqual(len(parse_json(f"[{shallow}]".encode())), 600)
        for pattern in (["["], ['{"a":'], ["[", '{"a":'], ['{"a":', "[", "["]):
            at_limit = _nested(MAX_NESTING, pattern)
            over = _nested(MAX_NESTING + 1, pattern)
            # Inside the wide array, one level less makes the same depth.
            inside_at_limit = f"[{shallow},{_nested(MAX_NESTING - 1, pattern)}]"
            inside_over = f"[{shallow},{at_limit}]"
            for parse in (parse_json, parse_json_with_numbers):
                for body in (at_limit, inside_at_limit):
                    parse(body.encode())
                for body in (over, inside_over):
                    error = self.assertRaises(MatrixError, parse, body.encode())
                    self.assertEqual(
                        (error.http_status, error.errcode, error.message),
                        (400, "M_NOT_JSON", "JSON is nested deeper than 512 levels"),
                        (pattern, body[:20]),
                    )

    def test_nesting_limit_of_its_own(self) -> None:
        """max_nesting sets a lower limit for one parse (an invite body's: a PDU's): at it
        the body parses, one level more is 400 M_NOT_JSON naming it; the default stays 512."""
        for parse in (parse_json, parse_json_with_numbers):
            for pattern in (["["], ['{"a":'], ["[", '{"a":']):
                parse(_nested(127, pattern).encode(), max_nesting=127)
                error = self.assertRaises(
                    MatrixError, parse, _nested(128, pattern).encode(), max_nesting=127
                )
                self.assertEqual(
                    (error.http_status, error.errcode, error.message),
                    (400, "M_NOT_JSON", "JSON is nested deeper than 127 levels"),
                )
                parse(_nested(128, pattern).encode())

    def test_nesting_rule_of_the_callers(self) -> None:
        """nesting_problem replaces the max_nesting rule: asked only of a body with more
        brackets than max_nesting (a shallow one is not walked), its answer is the
        MatrixError raised; the whole value stays bounded by 512 (M_NOT_JSON)."""
        asked: list[Any] = []

        def problem(value: Any) -> MatrixError | None:
            asked.append(value)
            if value == [[[[]]]]:
                return MatrixError(400, "M_BAD_JSON", "too deep for me")
            return None

        for parse in (parse_json, parse_json_with_numbers):
            del asked[:]
            parse(b"[[[]]]", max_nesting=3, nesting_problem=problem)
            self.assertEqual(asked, [])
            parse(b"[[],[]]", max_nesting=2, nesting_problem=problem)
            self.assertEqual(asked, [[[], []]])
            error = self.assertRaises(
                MatrixError, parse, b"[[[[]]]]", max_nesting=3, nesting_problem=problem
            )
            self.assertEqual(
                (error.http_status, error.errcode, error.message),
                (400, "M_BAD_JSON", "too deep for me"),
            )
            error = self.assertRaises(
                MatrixError,
                parse,
                _nested(513, ["["]).encode(),
                max_nesting=3,
                nesting_problem=lambda value: None,
            )
            self.assertEqual(
                (error.http_status, error.errcode, error.message),
                (400, "M_NOT_JSON", "JSON is nested deeper than 512 levels"),
            )
            parse(_nested(512, ["["]).encode(), max_nesting=3, nesting_problem=lambda value: None)

    def test_nesting_rule_that_bounds_the_value_itself(self) -> None:
        """problem_bounds_nesting: the caller's rule bounds the value by 512 too (in its own
        walk), so the value is not walked apart for it: its answer is final."""
        walks: list[int] = []
        self.patch(canonical, "nesting_depth", lambda value, limit=512: walks.append(limit) or 1)
        deep = _nested(513, ["["]).encode()
        for parse in (parse_json, parse_json_with_numbers):
            del walks[:]
            parse(
                deep, max_nesting=3, nesting_problem=lambda value: None, problem_bounds_nesting=True
            )
            self.assertEqual(walks, [])
            error = self.assertRaises(
                MatrixError,
                parse,
                deep,
                max_nesting=3,
                nesting_problem=lambda value: MatrixError(400, "M_BAD_JSON", "mine"),
                problem_bounds_nesting=True,
            )
            self.assertEqual(
                (error.http_status, error.errcode, error.message), (400, "M_BAD_JSON", "mine")
            )
            self.assertEqual(walks, [])
            # Without it, the value is walked apart for the 512 first.
            parse(deep, max_nesting=3, nesting_problem=lambda value: None)
            self.assertEqual(walks, [512])

    def test_depth_walk_does_not_grow_with_width(self) -> None:
        """Checking the depth of a body with many brackets takes Python-level work per level,
        not per value: 2,000 or 20,000 arrays side by side cost the same lines."""
        narrow, wide = (b"[" + b",".join([b"[[],0]"] * count) + b"]" for count in (2_000, 20_000))
        self.assertEqual(
            _python_lines(lambda: parse_json(narrow)), _python_lines(lambda: parse_json(wide))
        )

    def test_whitespace_skip_does_not_grow_with_length(self) -> None:
        """Whitespace around the value is skipped at C speed: 1,000 or 100,000 spaces, tabs and
        newlines before and after it cost the same Python lines."""
        short, long = (b" \t\r\n" * count + b"{}" + b"\n \t\r" * count for count in (250, 25_000))
        self.assertEqual(parse_json(long), {})
        self.assertEqual(
            _python_lines(lambda: parse_json(short)), _python_lines(lambda: parse_json(long))
        )

    def test_recursion_in_encoding_is_an_error(self) -> None:
        """A value too deep for the encoder gives CanonicalJSONError, never RecursionError:
        100,000 levels (Python 3.13's C encoder copes with 5,000)."""
        value: Any = 1
        for _ in range(100_000):
            value = [value]
        self.assertRaises(CanonicalJSONError, encode_canonical_json, value, strict=False)

    def test_recursion_from_a_deep_stack_is_not_blamed_on_the_value(self) -> None:
        """Encoding or parsing a value nested a few levels, called with the stack nearly
        exhausted: the RecursionError is the caller's, raised as such, not an error of the
        value (a valid invite was refused as 'nested too deeply to encode', storemodel SM1),
        nor a 400 M_NOT_JSON of the body; at MAX_NESTING levels it still encodes."""
        value = {"a": [{"b": [1, "c"]}], "d": None}
        body = json.dumps(value).encode()
        self.assertEqual(parse_json(body), value)
        self.assertEqual(_at_every_depth(lambda: parse_json(body)), {"ok", "RecursionError"})
        for strict in (True, False):
            encode = partial(encode_canonical_json, value, strict=strict)
            self.assertEqual(_at_every_depth(encode), {"ok", "RecursionError"})
        deep: Any = 1
        for _ in range(MAX_NESTING):
            deep = [deep]
        self.assertEqual(encode_canonical_json(deep, strict=False)[:2], b"[[")


def _at_every_depth(call: Callable[[], object]) -> set[str]:
    """How ``call`` ends (``ok`` or its exception's name) from every depth of a stack
    recursing to Python's limit, the deepest frames included."""
    outcomes: set[str] = set()

    def descend() -> None:
        try:
            descend()
        except RecursionError:
            pass
        try:
            call()
        except (RecursionError, ValueError, MatrixError) as error:
            outcomes.add(type(error).__name__)
        else:
            outcomes.add("ok")

    descend()
    return outcomes


def _nested(depth: int, pattern: list[str]) -> str:
    """JSON nested ``depth`` deep: containers opened as ``pattern`` cycles (``[`` or
    ``{"a":``), around ``1``."""
    opens = [pattern[level % len(pattern)] for level in range(depth)]
    closes = ["]" if opened == "[" else "}" for opened in reversed(opens)]
    return "".join(opens) + "1" + "".join(closes)


#: The decoder's hooks, called from C once per object or number: not the parse's own work.
_DECODER_HOOKS = frozenset({"_no_duplicates", "_parse_int", "_parse_float"})


def _python_lines(call: Callable[[], object]) -> int:
    """How many lines of ``core/canonical.py`` ``call`` runs (the decoder's hooks aside): a
    measure of its Python-level work that, unlike time, does not vary from run to run."""
    lines = 0

    def trace(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal lines
        code = frame.f_code
        if code.co_filename != canonical.__file__ or code.co_name in _DECODER_HOOKS:
            return None
        if event == "line":
            lines += 1
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        call()
    finally:
        sys.settrace(previous)
    return lines
