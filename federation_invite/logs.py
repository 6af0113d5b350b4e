"""Logs for log shippers: one JSON object per line.

Every invite accepted or refused is logged with the fields ``origin``,
``room_id``, ``event_id``, ``outcome`` (``accepted``/``refused``) and, for
refusals, ``status``, ``errcode`` and ``reason``, and ``server_name`` (ours: the
receiving server's, telling tenants apart); keys and signatures are never
logged. Use the JSON form with twistd's own option::

    twistd -n --logger federation_invite.logs.json_observer federation-invite ...

Every logger of this package is a ``logs.Logger``: where a line's rendered
text would hold a control character (peer-chosen IDs and remote servers'
error messages may hold CR, LF or ESC), the text form is escaped, so that one
event stays one line of a text log and cannot forge another or drive a
terminal; the fields keep their exact values for JSON observers. A failure's
traceback (``log.failure``) keeps its own lines, but what each line holds
(the exception's message above all) is escaped too; its JSON form
(``log_failure``) carries the exception's raw message as ``message``.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from string import Formatter
from time import time
from typing import IO, Any, cast

from twisted.logger import ILogObserver, LogLevel, formatEvent, jsonFileLogObserver
from twisted.logger import Logger as _TwistedLogger
from twisted.logger._flatten import KeyFlattener
from twisted.logger._format import CallMapping, formatUnformattableEvent
from twisted.python.failure import Failure

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


#: One field of a format: its name, conversion and spec as written, the keys
#: Twisted's flattening files its text and its value under
#: (``name!s:spec``, ``name!:spec``), and whether the name is a plain key.
_Field = tuple[str, str | None, str, str, str, bool]

_LEVELS = frozenset(LogLevel.iterconstants())
_FORMATTER = Formatter()


@lru_cache(maxsize=1024)
def _parse(format: str) -> tuple[tuple[str, _Field | None], ...] | None:
    """``format`` as pairs of a literal text and the field after it (``None`` after the last).

    ``None`` if the format is one ``Logger.emit`` leaves to Twisted to render:
    malformed, a spec holding fields (``{x:{width}}``) or a conversion other
    than ``!s`` and ``!r`` (Twisted's flattening files ``!a`` under another
    key than its formatting looks up).
    """
    keys = KeyFlattener()
    parts: list[tuple[str, _Field | None]] = []
    try:
        for literal, name, written_spec, conversion in _FORMATTER.parse(format):
            spec = written_spec or ""
            if name is None:
                parts.append((literal, None))
                continue
            if conversion not in (None, "s", "r") or "{" in spec or "}" in spec:
                return None
            # Computed in the order flattenEvent computes them, so that they
            # are the keys it and flatFormat use (a repeated field gets "/2").
            text_key = keys.flatKey(name, spec, conversion or "s")
            value_key = keys.flatKey(name, spec, "")
            parts.append(
                (literal, (name, conversion, spec, text_key, value_key, name.isidentifier()))
            )
    except ValueError:
        return None
    return tuple(parts)


def _render(
    parts: tuple[tuple[str, _Field | None], ...], event: dict[str, Any]
) -> tuple[str, dict[str, object]]:
    """The text of a parsed format, and its fields as Twisted's ``log_flattened`` holds them.

    Rendered as ``formatEvent`` renders it (``formatWithCall``: ``{f()}`` calls
    ``f``), each field's text filed under its key, so that ``flatFormat``
    reprints the same text without looking anything up or calling anything
    again. Raises what a field's lookup, call or formatting raises.
    """
    pieces: list[str] = []
    flattened: dict[str, object] = {}
    for literal, field in parts:
        pieces.append(literal)
        if field is None:
            continue
        name, conversion, spec, text_key, value_key, plain = field
        if plain:
            value = event[name]
        else:
            # Dotted, indexed or called (``{f()}``, ``{a.b()}``): Twisted's own lookup.
            value = _FORMATTER.get_field(name, (), CallMapping(event))[0]._wrapped
        shown = repr(value) if conversion == "r" else str(value) if conversion else value
        text = shown if not spec and type(shown) is str else format(shown, spec)
        pieces.append(text)
        flattened[text_key] = text
        flattened[value_key] = value
    return "".join(pieces), flattened


class _EscapingWriter:
    """A file for ``Failure.printTraceback`` that escapes each write but its final newline.

    Each write of ``printTraceback`` is one line of the traceback (the
    preamble, a frame's location, its source line, a local's ``repr``, the
    exception's type and message), so the traceback keeps its lines while a
    newline inside one (in an exception's message) is escaped like any other
    control. Were Twisted to write several lines at once, they would read as
    one escaped line: uglier, never forged.
    """

    def __init__(self, file: IO[str]) -> None:
        self._file = file

    def write(self, text: str) -> None:
        if text.endswith("\n"):
            self._file.write(escape_log_text(text[:-1]) + "\n")
        else:
            self._file.write(escape_log_text(text))


class _EscapedFailure(Failure):
    """A copy of a ``Failure`` whose printed tracebacks have their controls escaped.

    Text observers print a ``log_failure`` with ``getTraceback()`` (twistd's
    ``formatEventAsClassicLogText``, the legacy ``textFromEventDict``), which
    prints with ``printTraceback``. Everything else is the original's state:
    the type, the exception, the frames (JSON's ``failureAsJSON`` serialises
    that state, ``flushLoggedErrors`` checks the type), and a pickle is a
    plain ``Failure``. ``message`` is the exception's message, unescaped:
    Twisted's JSON form holds the exception itself as ``unpersistable``.
    """

    message: str

    def printTraceback(
        self, file: Any = None, elideFrameworkCode: Any = False, detail: str = "default"
    ) -> None:
        if file is None:
            from twisted.python import log

            file = log.logerr
        super().printTraceback(_EscapingWriter(file), elideFrameworkCode, detail)


def _escaped_failure(failure: Failure) -> _EscapedFailure:
    """``failure`` as an ``_EscapedFailure``, sharing its state."""
    escaped = _EscapedFailure(failure)  # A Failure of a Failure copies its state.
    escaped.message = failure.getErrorMessage()
    return escaped


class Logger(_TwistedLogger):
    """A ``twisted.logger.Logger`` whose events render as one printable line.

    ``emit`` renders the format with the event's fields once, as a text
    observer would. If the text is printable, the event keeps its format and
    carries the text of each field in ``log_flattened``, which Twisted's
    ``formatEvent`` reprints from (``flatFormat``) without looking up or
    calling anything again (a format's ``{f()}`` runs once), and which the
    JSON observer's flattening keeps. Otherwise the format is replaced by the
    escaped text, read literally; the fields keep their values. A format
    Twisted renders in ways ``log_flattened`` cannot hold (a spec holding a
    field, ``!a``) is replaced by its text, escaped if need be, in every case.

    A ``log_failure`` is handed on as an ``_EscapedFailure``: its traceback
    keeps its lines, but what each line holds is escaped.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        """Twisted's ``emit``, rendering the text from the very event the observer gets."""
        if level not in _LEVELS:
            super().emit(level, format, **kwargs)  # Twisted's complaint about the level.
            return
        event = kwargs
        event.update(
            log_logger=self,
            log_level=level,
            log_namespace=self.namespace,
            log_source=self.source,
            log_format=format,
            log_time=time(),
        )
        failure = event.get("log_failure")
        if isinstance(failure, Failure) and not isinstance(failure, _EscapedFailure):
            event["log_failure"] = _escaped_failure(failure)
        if format is not None:
            parts = _parse(format) if type(format) is str and "log_flattened" not in event else None
            if parts is None:
                text = formatEvent(event)
                flattened = None
            else:
                try:
                    text, flattened = _render(parts, event)
                except BaseException as error:  # As formatEvent does: an event is never lost.
                    text, flattened = formatUnformattableEvent(event, error), None
            if flattened is not None and text.isprintable():
                if flattened:
                    event["log_flattened"] = flattened
            else:
                event["log_format"] = literal_format(escape_log_text(text))
        if "log_trace" in event:
            cast("list[Any]", event["log_trace"]).append((self, self.observer))
        self.observer(event)


def json_file_observer(out: IO[str]) -> ILogObserver:
    """An observer writing each event as one line of JSON (newline-delimited, no RS byte)."""
    observer: ILogObserver = jsonFileLogObserver(out, recordSeparator="")
    return observer


def json_observer() -> ILogObserver:
    """twistd ``--logger`` entry point: newline-delimited JSON on standard output (so the
    plugin refuses it daemonized, or with ``--logfile``: ``tap._refuse_lost_json_logs``)."""
    return json_file_observer(sys.stdout)
