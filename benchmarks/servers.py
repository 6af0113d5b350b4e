"""Benchmark helper servers, run as subprocesses by run.py (TLS on 127.0.0.1 only).

python benchmarks/servers.py origin PORT SERVER_NAME ORIGIN_SEED CERT KEY
    the fake origin: serves its key at /_matrix/key/v2/server
python benchmarks/servers.py calibration PORT SERVER_NAME OUR_SEED ORIGIN_SEED CERT KEY
    the same twisted.web + TLS stack answering invites with only the unavoidable work
python benchmarks/servers.py durable PORT SERVER_NAME OUR_SEED ORIGIN_SEED CERT KEY ORIGIN_PORT DB
    the calibration's work plus the invite stored durably (SQLite) and one log line
python benchmarks/servers.py trivial PORT CERT KEY
    a static answer: the TLS + HTTP cost alone
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from benchlib import ROOM_VERSION  # noqa: F401  (same room version as the load)
from signedjson.key import decode_signing_key_base64
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from federation_invite.core.canonical import encode_canonical_json, parse_json
from federation_invite.core.events import check_content_hash, prepare_event
from federation_invite.core.keys import key_id_of, verify_key_of
from federation_invite.core.roomversions import get_room_version
from federation_invite.core.signing import ServerVerifyKey, sign_event, verify_event_signatures
from federation_invite.core.xmatrix import parse_xmatrix, verify_request
from federation_invite.service import build_site_root
from federation_invite.store import InviteRecord, open_store
from federation_invite.web.keys import KeyServerResource
from federation_invite.web.tree import build_matrix_tree

_log = Logger(namespace="bench.durable")


def tls_options(cert: str, key: str) -> Any:
    with open(key, "rb") as handle:
        key_pem = handle.read()
    with open(cert, "rb") as handle:
        cert_pem = handle.read()
    return ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()


def unavoidable_work(
    server_name: str,
    our_key: Any,
    origin_keys: dict[tuple[str, str], ServerVerifyKey],
    method: str,
    uri: str,
    authorization: bytes,
    body_bytes: bytes,
) -> tuple[bytes, dict[str, Any], str, dict[str, Any]]:
    """Parse, verify the request, verify the event, event ID and hashes, sign, encode.

    Returns the encoded answer, and for the durable calibration the body, the
    event ID and the co-signed event.
    """
    body = parse_json(body_bytes)
    auth = parse_xmatrix(authorization)
    request_key = origin_keys[(auth.origin, auth.key_id)]
    verify_request(auth, request_key.verify_key, method, uri, body, server_name)
    room_version = get_room_version(body["room_version"])
    event = body["event"]
    prepared = prepare_event(room_version, event)
    _ = prepared.event_id
    verify_event_signatures(room_version, event, origin_keys, prepared=prepared)
    if not check_content_hash(room_version, event):
        raise ValueError("bad hash")
    signed = sign_event(room_version, event, server_name, our_key, prepared=prepared)
    return encode_canonical_json({"event": signed}, strict=False), body, prepared.event_id, signed


class Calibration(Resource):
    isLeaf = True

    def __init__(
        self, server_name: str, our_key: Any, origin_keys: dict[tuple[str, str], ServerVerifyKey]
    ) -> None:
        super().__init__()
        self.args = (server_name, our_key, origin_keys)

    def work(self, request: Request) -> tuple[bytes, dict[str, Any], str, dict[str, Any]]:
        assert request.content is not None
        return unavoidable_work(
            *self.args,
            "PUT",
            request.uri.decode(),
            request.getHeader(b"authorization") or b"",
            request.content.read(),
        )

    def render_PUT(self, request: Request) -> bytes:
        answer = self.work(request)[0]
        request.setHeader(b"Content-Type", b"application/json")
        return answer


class Durable(Calibration):
    """The calibration's work, then what every invite needs beyond it whatever the code:
    the invite stored durably (our store: SQLite, group commit, synchronous=FULL) and
    one log line. No validation, policy or routing: the daemon's cost above this
    server is what those cost."""

    def __init__(
        self,
        server_name: str,
        our_key: Any,
        origin_keys: dict[tuple[str, str], ServerVerifyKey],
        store: Any,
    ) -> None:
        super().__init__(server_name, our_key, origin_keys)
        self.store = store

    def render_PUT(self, request: Request) -> int:  # type: ignore[override]
        encoded, body, event_id, signed = self.work(request)
        event = body["event"]
        record = InviteRecord(
            event_id=event_id,
            room_id=event["room_id"],
            room_version=body["room_version"],
            invitee=event["state_key"],
            sender=event["sender"],
            origin=event["origin"],
            event=signed,
            invite_room_state=body.get("invite_room_state", []),
            received_ts=int(time.time() * 1000),
        )

        def stored(_: object) -> None:
            _log.info(
                "{text}",
                text=f"Invite {event_id} in {record.room_id} from {record.origin} stored",
                event_id=event_id,
            )
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", b"%d" % len(encoded))
            request.write(encoded)
            request.finish()

        self.store.store_invite(record).addCallback(stored)
        return NOT_DONE_YET


class Trivial(Resource):
    isLeaf = True

    def render_PUT(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"event":{}}'


def _keys(argv: list[str]) -> tuple[str, Any, dict[tuple[str, str], ServerVerifyKey]]:
    """SERVER_NAME OUR_SEED ORIGIN_SEED CERT KEY ORIGIN_PORT: our name, key, the origin's key."""
    server_name, our_seed, origin_seed = argv[2:5]
    our_key = decode_signing_key_base64("ed25519", "us", our_seed)
    origin_key = decode_signing_key_base64("ed25519", "bench", origin_seed)
    origin = f"127.0.0.1:{argv[7]}"
    origin_keys = {
        (origin, key_id_of(origin_key)): ServerVerifyKey(
            origin, key_id_of(origin_key), verify_key_of(origin_key), 2**53 - 1
        )
    }
    return server_name, our_key, origin_keys


def main(argv: list[str]) -> None:
    mode = argv[0]
    port = int(argv[1])
    ready: Deferred[Any] = succeed(None)
    if mode == "trivial":
        cert, key = argv[2:4]
        site = Site(Trivial())
    elif mode == "origin":
        server_name, seed, cert, key = argv[2:6]
        origin_key = decode_signing_key_base64("ed25519", "bench", seed)
        resource = KeyServerResource(reactor, server_name, [origin_key])  # type: ignore[arg-type]
        site = Site(build_site_root(build_matrix_tree(resource)))
    elif mode == "durable":
        cert, key = argv[5:7]
        durable = Durable(*_keys(argv), store=None)
        site = Site(durable)
        globalLogBeginner.beginLoggingTo(
            [textFileLogObserver(open("durable-invites.log", "a"))],
            redirectStandardIO=False,
        )
        ready = open_store(f"sqlite:///{os.path.abspath(argv[8])}", reactor=reactor)
        ready.addCallback(lambda store: setattr(durable, "store", store))
    else:
        cert, key = argv[5:7]
        site = Site(Calibration(*_keys(argv)))
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log: pure cost
    ready.addCallback(
        lambda _: reactor.listenSSL(  # type: ignore[attr-defined]
            port, site, tls_options(cert, key), interface="127.0.0.1"
        )
    )
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1:])
