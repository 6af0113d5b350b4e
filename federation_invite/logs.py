"""Logs for log shippers: one JSON object per line.

Every invite accepted or refused is logged with the fields ``origin``,
``room_id``, ``event_id``, ``outcome`` (``accepted``/``refused``) and, for
refusals, ``status``, ``errcode`` and ``reason``; keys and signatures are never
logged. Use the JSON form with twistd's own option::

    twistd -n --logger federation_invite.logs.json_observer federation-invite ...
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import ILogObserver, jsonFileLogObserver

__all__ = ["json_file_observer", "json_observer"]


def json_file_observer(out: IO[str]) -> ILogObserver:
    """An observer writing each event as one line of JSON (newline-delimited, no RS byte)."""
    observer: ILogObserver = jsonFileLogObserver(out, recordSeparator="")
    return observer


def json_observer() -> ILogObserver:
    """twistd ``--logger`` entry point: newline-delimited JSON on standard output."""
    return json_file_observer(sys.stdout)
