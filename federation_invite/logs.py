"""Logs for log shippers: one JSON object per line.

Every invite accepted or refused is logged with the fields ``origin``,
``room_id``, ``event_id``, ``outcome`` (``accepted``/``refused``) and, for
refusals, ``status``, ``errcode`` and ``reason``; keys and signatures are never
logged. Use the JSON form with twistd's own option::

    twistd -n --logger federation_invite.logs.json_observer federation-invite ...

Every logger of this package is a ``logs.Logger``: where a line's rendered
text would hold a control character (peer-chosen IDs and remote servers'
error messages may hold CR, LF or ESC), the text form is escaped, so that one
event stays one line of a text log and cannot forge another or drive a
terminal; the fields keep their exact values for JSON observers.
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import ILogObserver, LogLevel, formatEvent, jsonFileLogObserver
from twisted.logger import Logger as _TwistedLogger

__all__ = ["json_file_observer", "json_observer"]


def escape_log_text(text: str) -> str:
    r"""``text`` with its non-printable characters escaped, for a line of a text log.

    Peer-chosen strings (the path's room and event IDs, historical user IDs,
    error messages quoting them) may hold CR, LF, ESC, other C0 and C1
    controls, U+2028 or U+2029. Escaped as Python escapes them (``\r``,
    ``\x1b``, ``\x85``, ``\u2028``), a line stays one line and can neither
    forge another nor drive the reader's terminal. Backslashes are left as
    they are: a literal ``\x1b`` in an ID reads like an escaped ESC but forges
    nothing, and the fields keep the exact values. Printable text (every
    ordinary ID) is returned as it is, after one C call.
    """
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def literal_format(text: str) -> str:
    """``text`` as a Twisted log format that renders as exactly ``text`` (braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")


class Logger(_TwistedLogger):
    """A ``twisted.logger.Logger`` whose events render as one printable line.

    ``emit`` renders the format with the event's fields, as a text observer
    would; only if that text holds a non-printable character is the format
    replaced by the escaped text (read literally), the fields left as they are.
    Tracebacks (``failure``) are the observer's and keep their lines. A
    format's call syntax (``{f()}``) is run twice: none of ours uses it.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if format is not None:
            # Rendered from what the observer will have: the fields and the
            # keys ``emit`` adds (a format may name ``{log_namespace}``).
            text = formatEvent(
                {
                    **kwargs,
                    "log_logger": self,
                    "log_level": level,
                    "log_namespace": self.namespace,
                    "log_source": self.source,
                    "log_format": format,
                }
            )
            if not text.isprintable():
                format = literal_format(escape_log_text(text))
        super().emit(level, format, **kwargs)


def json_file_observer(out: IO[str]) -> ILogObserver:
    """An observer writing each event as one line of JSON (newline-delimited, no RS byte)."""
    observer: ILogObserver = jsonFileLogObserver(out, recordSeparator="")
    return observer


def json_observer() -> ILogObserver:
    """twistd ``--logger`` entry point: newline-delimited JSON on standard output."""
    return json_file_observer(sys.stdout)
