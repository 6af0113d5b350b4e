"""Benchmark helper servers, run as subprocesses by run.py (TLS on 127.0.0.1 only).

python benchmarks/servers.py origin PORT SERVER_NAME ORIGIN_SEED CERT KEY
    the fake origin: serves its key at /_matrix/key/v2/server
python benchmarks/servers.py calibration PORT SERVER_NAME OUR_SEED ORIGIN_SEED CERT KEY
    the same twisted.web + TLS stack answering invites with only the unavoidable work
python benchmarks/servers.py trivial PORT CERT KEY
    a static answer: the TLS + HTTP cost alone
"""

from __future__ import annotations

import sys
from typing import Any

from benchlib import ROOM_VERSION  # noqa: F401  (same room version as the load)
from signedjson.key import decode_signing_key_base64
from twisted.internet import reactor, ssl
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from federation_invite.core.canonical import encode_canonical_json, parse_json
from federation_invite.core.events import check_content_hash, prepare_event
from federation_invite.core.keys import key_id_of, verify_key_of
from federation_invite.core.roomversions import get_room_version
from federation_invite.core.signing import ServerVerifyKey, sign_event, verify_event_signatures
from federation_invite.core.xmatrix import parse_xmatrix, verify_request
from federation_invite.service import build_site_root
from federation_invite.web.keys import KeyServerResource
from federation_invite.web.tree import build_matrix_tree


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
) -> bytes:
    """Parse, verify the request, verify the event, event ID and hashes, sign, encode."""
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
    return encode_canonical_json({"event": signed}, strict=False)


class Calibration(Resource):
    isLeaf = True

    def __init__(
        self, server_name: str, our_key: Any, origin_keys: dict[tuple[str, str], ServerVerifyKey]
    ) -> None:
        super().__init__()
        self.args = (server_name, our_key, origin_keys)

    def render_PUT(self, request: Request) -> bytes:
        assert request.content is not None
        body = unavoidable_work(
            *self.args,
            "PUT",
            request.uri.decode(),
            request.getHeader(b"authorization") or b"",
            request.content.read(),
        )
        request.setHeader(b"Content-Type", b"application/json")
        return body


class Trivial(Resource):
    isLeaf = True

    def render_PUT(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"event":{}}'


def main(argv: list[str]) -> None:
    mode = argv[0]
    port = int(argv[1])
    if mode == "trivial":
        cert, key = argv[2:4]
        site = Site(Trivial())
    elif mode == "origin":
        server_name, seed, cert, key = argv[2:6]
        origin_key = decode_signing_key_base64("ed25519", "bench", seed)
        resource = KeyServerResource(reactor, server_name, [origin_key])  # type: ignore[arg-type]
        site = Site(build_site_root(build_matrix_tree(resource)))
    else:
        server_name, our_seed, origin_seed, cert, key = argv[2:7]
        our_key = decode_signing_key_base64("ed25519", "us", our_seed)
        origin_key = decode_signing_key_base64("ed25519", "bench", origin_seed)
        origin = f"127.0.0.1:{argv[7]}"
        origin_keys = {
            (origin, key_id_of(origin_key)): ServerVerifyKey(
                origin, key_id_of(origin_key), verify_key_of(origin_key), 2**53 - 1
            )
        }
        site = Site(Calibration(server_name, our_key, origin_keys))
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log: pure cost
    reactor.listenSSL(port, site, tls_options(cert, key), interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1:])
