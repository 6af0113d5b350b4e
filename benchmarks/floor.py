"""The floor: the unavoidable work for the benchmark's invites, in-process, no I/O.

Parse the body, verify the request signature, verify the event signature,
compute the event ID and hashes, sign, encode the answer: microseconds per
invite. Used by run.py; runnable alone:  python benchmarks/floor.py [N]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from benchlib import build_invite, make_origin_key
from servers import unavoidable_work
from signedjson.types import SigningKey

from federation_invite.core.keys import key_id_of, verify_key_of
from federation_invite.core.signing import ServerVerifyKey


def floor_microseconds(
    requests: Sequence[tuple[str, str, bytes]],
    server_name: str,
    our_key: SigningKey,
    origin: str,
    origin_key: SigningKey,
    rounds: int = 3,
) -> float:
    """Best of ``rounds`` passes over ``requests``: microseconds per invite."""
    keys = {
        (origin, key_id_of(origin_key)): ServerVerifyKey(
            origin, key_id_of(origin_key), verify_key_of(origin_key), 2**53 - 1
        )
    }
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for path, header, body in requests:
            unavoidable_work(server_name, our_key, keys, "PUT", path, header.encode(), body)[0]
        best = min(best, (time.process_time() - started) / len(requests) * 1e6)
    return best


if __name__ == "__main__":
    from signedjson.key import generate_signing_key

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    origin_key = make_origin_key()
    origin = "127.0.0.1:9999"
    requests = [build_invite(origin_key, origin, "localhost:8448", i, 1000) for i in range(count)]
    ours = generate_signing_key("us")
    print(
        f"floor: {floor_microseconds(requests, 'localhost:8448', ours, origin, origin_key):.0f} us per invite"
    )
