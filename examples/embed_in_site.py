"""Serve federation-invite's ``/_matrix`` tree beside your own resources in one Twisted site.

Run it:  python examples/embed_in_site.py [config.toml]
Then:    curl http://127.0.0.1:8448/            (your app)
         curl http://127.0.0.1:8448/_matrix/key/v2/server   (federation-invite)
         curl http://127.0.0.1:8448/.well-known/matrix/server   (if well_known_server is set)

The site is ``federation.site(root)``: a ``FederationSite`` with the configuration's
``inbound.*`` limits (body cap, request deadline, idle timeout), which then apply to
your own resources too. A plain ``Site(root)`` would serve the same tree without them.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import react
from twisted.web.resource import Resource
from twisted.web.static import Data

from federation_invite import FederationInvite, InviteRecord, build_from_config


def print_invite(record: InviteRecord) -> None:
    """A listener: called after each accepted invite is stored."""
    print(f"{record.invitee} was invited to {record.room_id} by {record.sender}")


def make_app(federation: FederationInvite) -> Resource:
    """Your application's resource tree, built on federation-invite's: ``site_root()`` serves
    /_matrix, /.well-known/matrix/server when ``well_known_server`` is set, and a JSON 404
    for any path not put into it. (With a root of your own, put
    ``federation.matrix_resource()`` at /_matrix instead; no /.well-known is served then.)"""
    root = federation.site_root()
    root.putChild(b"", Data(b"my application\n", "text/plain"))
    federation.add_listener(print_invite)
    return root


async def main(reactor: Any, config_path: str | None = None) -> None:
    federation = await build_from_config(config_path, reactor)
    endpoint = serverFromString(reactor, "tcp:8448:interface=127.0.0.1")
    await endpoint.listen(federation.site(make_app(federation)))
    await Deferred()  # serve until the process is stopped


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, *sys.argv[1:2])))
