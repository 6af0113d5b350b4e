"""Add local users u0..u(N-1) on SERVER_NAME to the database of a config (for run.py)."""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from federation_invite.config import load_config
from federation_invite.store import open_store


async def seed(reactor: Any, config_path: str, count: int) -> None:
    config = load_config(config_path)
    config.ensure_data_dir()
    store = await open_store(config.database, reactor=reactor)
    try:
        for index in range(count):
            await store.add_local_user(f"@u{index}:{config.server_name}")
    finally:
        await store.close()


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(seed(reactor, sys.argv[1], int(sys.argv[2]))))
