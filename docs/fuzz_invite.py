"""Coverage-guided fuzzing of the invite endpoints with atheris (see docs/fuzzing.md).

Each input is one request sent as raw HTTP through the daemon's ``FederationSite`` to the real
resource tree (in memory, no sockets). The first byte picks one of the valid fixture requests of
``tests/test_hostile_fuzz.py`` (v1 and v2, several room versions) and what the rest replaces:
the body, the ``Authorization`` header value, or the path. The oracle is the test suite's: one
answer, never 5xx, a JSON Matrix error unless 200, and a 200 only when what was signed is
unchanged.

    python docs/fuzz_invite.py make-corpus fuzz-corpus      # seed inputs: the valid requests
    python docs/fuzz_invite.py fuzz-corpus -max_total_time=3600 -rss_limit_mb=4096

Without atheris installed the script runs a plain random mutator over the same seeds instead
(``python docs/fuzz_invite.py --random 20000``), which needs nothing beyond the dev extra.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any
from urllib.parse import unquote

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

try:
    import atheris
except ImportError:  # pragma: no cover - optional
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["federation_invite"]):
        import federation_invite.web.site  # noqa: F401

from federation_invite.core.xmatrix import XMatrixError, parse_xmatrix
from tests.invites import THEM, _sign_request_lax
from tests.test_hostile_fuzz import _strict_parse, covered, fixtures

TARGETS = ("body", "header", "path")


def seeds() -> list[bytes]:
    """One input per (fixture request, target): the unmodified valid request."""
    f = fixtures()
    inputs = []
    for index, request in enumerate(f.requests):
        header = _sign_request_lax(f.s.their_key, THEM, "PUT", f.path(request), request.body)
        for target, data in enumerate((request.data, header.encode(), f.path(request).encode())):
            inputs.append(bytes([index * len(TARGETS) + target]) + data)
    return inputs


def one_input(data: bytes) -> None:
    """Send one fuzzed request and check the oracle; raise AssertionError on a finding."""
    if not data:
        return
    f = fixtures()
    choice = data[0] % (len(f.requests) * len(TARGETS))
    request = f.requests[choice // len(TARGETS)]
    target = TARGETS[choice % len(TARGETS)]
    payload = data[1:]
    expect_200: bool | None = None
    if target == "body":
        verdict, value = _strict_parse(payload)
        content: Any = None
        if verdict == "ok":
            try:
                f.raw(request, data=b"", content=value)
                content = value
            except Exception:
                content = None
        raw = f.raw(request, data=payload, content=content)
    elif target == "header":
        header = payload.replace(b"\r", b"").replace(b"\n", b"")
        raw = f.raw(request, headers=[b"Authorization: " + header])
        original = parse_xmatrix(
            _sign_request_lax(f.s.their_key, THEM, "PUT", f.path(request), request.body)
        )
        try:
            parsed = parse_xmatrix(header)
            expect_200 = (parsed.origin, parsed.key_id, parsed.signature) == (
                original.origin,
                original.key_id,
                original.signature,
            ) and parsed.destination in (None, original.destination)
        except XMatrixError:
            expect_200 = False
    else:
        path = payload.decode("latin-1")
        if not path.startswith("/") or any(c in path for c in " \r\n\t") or not path.isprintable():
            return
        raw = f.raw(request, path=path)
    answers = f.exchange(raw)
    assert len(answers) == 1, answers
    ((status, body),) = answers
    assert status < 500, (status, body)
    if status != 200:
        assert isinstance(body.get("errcode"), str) and body["errcode"].startswith("M_"), body
        if target == "body" and _strict_parse(payload)[0] != "ok":
            assert body["errcode"] == _strict_parse(payload)[0], body
        assert expect_200 is not True, ("refused a valid header", payload, body)
        return
    if target == "body":
        verdict, value = _strict_parse(payload)
        assert verdict == "ok" and covered(request, value) == covered(request, request.body)
    elif target == "header":
        assert expect_200, ("accepted a different header", payload)
    else:
        segments = path.split("?", 1)[0].split("/")
        assert len(segments) == 7 and f.path(request).split("/")[:5] == segments[:5], path
        assert unquote(segments[5]) == request.room_id and unquote(segments[6]) == request.event_id


def random_mutations(count: int, seed: int = 0) -> None:
    """The atheris-free fallback: byte-level mutations of the seeds, checked the same way."""
    rng = random.Random(seed)
    corpus = seeds()
    for n in range(count):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(1, max(2, len(data)))
            action = rng.randrange(4)
            if action == 0 and len(data) > 1:
                data[at % len(data)] = rng.randrange(256)
            elif action == 1:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif action == 2:
                del data[at : at + rng.randint(1, 16)]
            else:
                data[at:at] = data[at : at + rng.randint(1, 64)]
        one_input(bytes(data))
        if n and n % 5000 == 0:
            print(f"{n} inputs, no finding", flush=True)
    print(f"{count} inputs, no finding")


def main(argv: list[str]) -> None:
    if len(argv) >= 3 and argv[1] == "make-corpus":
        os.makedirs(argv[2], exist_ok=True)
        for index, data in enumerate(seeds()):
            with open(os.path.join(argv[2], f"seed-{index:03d}"), "wb") as handle:
                handle.write(data)
        return
    if atheris is None or (len(argv) >= 2 and argv[1] == "--random"):
        count = int(argv[2]) if len(argv) >= 3 and argv[1] == "--random" else 20_000
        if atheris is None:
            print("atheris is not installed (pip install atheris); running random mutations")
        random_mutations(count)
        return
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
