"""Invite logs: structured fields for every outcome, JSON lines, and no secrets."""

from __future__ import annotations

import io
import json
import pickle
from typing import Any

from twisted.internet.defer import fail
from twisted.logger import (
    InvalidLogLevelError,
    LegacyLogObserverWrapper,
    LogLevel,
    capturedLogs,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    formatEventAsClassicLogText,
    textFileLogObserver,
)
from twisted.logger import Logger as TwistedLogger
from twisted.python.failure import Failure
from twisted.python.log import FileLogObserver
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import encode_base64

from federation_invite.auth import ServerAcl
from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
from federation_invite.inbound import _log_outcome
from federation_invite.logs import Logger, escape_log_text, json_file_observer, json_observer
from federation_invite.store import InviteRule, StoreError
from federation_invite.web.site import FederationSite

from .invites import (
    BOB,
    THEM,
    US,
    InviteScenario,
    build_create_event,
    build_invite,
    event_id_of,
    stripped,
)
from .support import make_key
from .test_hostile_slow import Connection

#: A room ID (valid in room versions 1 to 11: any code point but ":" and NUL
#: before the server name) that would end the line, forge another and colour
#: the terminal red.
EVIL_ROOM_ID = (
    "!evil\r\n[federation_invite.inbound#info] Invite $x in !r from a.example for @bob"
    " accepted (pending)\x1b[31m\u2028\x85:remote.example"
)
#: How EVIL_ROOM_ID reads in a text line.
EVIL_ROOM_ID_TEXT = (
    "!evil\\r\\n[federation_invite.inbound#info] Invite $x in !r from a.example for @bob"
    " accepted (pending)\\x1b[31m\\u2028\\x85:remote.example"
)


def send_logged(
    case: SynchronousTestCase, scenario: InviteScenario, room_version: Any, event: dict[str, Any]
) -> tuple[list[dict[str, Any]], Any]:
    """Send ``event`` as a v2 invite, with its room's create event as invite_room_state (so
    that nothing is to be warned of); the log events emitted meanwhile and the response."""
    create = build_create_event(room_version, scenario.their_key, room_id=event["room_id"])
    with capturedLogs() as events:
        deferred = scenario.send(
            2,
            scenario.v2_body(room_version, event, [create]),
            room_id=event["room_id"],
            event_id=event_id_of(room_version, event),
        )
        scenario.client.flush()
        response = case.successResultOf(deferred)
    return list(events), response


class InviteLogTests(SynchronousTestCase):
    def run_invite(
        self, scenario: InviteScenario, invite: Any = None, **kwargs: Any
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Send one invite (a new one unless ``invite`` is given); the log events and the answer."""
        room_version, event = invite or scenario.invite(**kwargs)
        events, response = send_logged(self, scenario, room_version, event)
        return events, json.loads(self.successResultOf(response.content()))

    def test_accepted_and_refused_fields(self) -> None:
        """Accepted and refused invites are logged with origin, room, event, outcome (and errcode)."""
        scenario = InviteScenario()
        events, _ = self.run_invite(scenario)
        accepted = [e for e in events if e.get("outcome") == "accepted"]
        self.assertEqual(len(accepted), 1)
        self.assertEqual(accepted[0]["origin"], THEM)
        self.assertIsInstance(accepted[0]["peer"], str)
        self.assertTrue(accepted[0]["event_id"].startswith("$"))
        events, _ = self.run_invite(scenario, invitee="@nobody:us.example")
        (refused,) = [e for e in events if e.get("outcome") == "refused"]
        self.assertEqual((refused["status"], refused["errcode"]), (404, "M_NOT_FOUND"))
        self.assertEqual(refused["peer"], accepted[0]["peer"])

    def test_lines_name_our_server_last(self) -> None:
        """Every invite's line (accepted, ignored, repeated, refused) names the server that
        received it, ours (``server_name``, the last field), so that the lines of several
        FederationInvites in one process (tenants) can be told apart; the other fields
        keep their order."""
        scenario = InviteScenario()
        invite = scenario.invite()
        events, _ = self.run_invite(scenario, invite)
        events += self.run_invite(scenario, invite)[0]
        events += self.run_invite(scenario, invitee="@nobody:us.example")[0]
        scenario.store.rules.append(InviteRule(BOB, "server", THEM, "ignore"))
        events += self.run_invite(scenario, room_id="!other:remote.example")[0]
        lines = {e["outcome"]: e for e in events if e.get("outcome")}
        common = ["event_id", "room_id", "origin"]
        accepted = [*common, "invitee", "outcome", "status", "peer", "server_name"]
        self.assertEqual(
            {outcome: list(line)[: list(line).index("text")] for outcome, line in lines.items()},
            {
                "accepted": accepted,
                "repeated": accepted,
                "ignored": accepted,
                "refused": [
                    *common,
                    "claimed_origin",
                    "invitee",
                    "status",
                    "errcode",
                    "reason",
                    "outcome",
                    "peer",
                    "server_name",
                ],
            },
        )
        for line in lines.values():
            self.assertEqual(line["server_name"], US)
            out = io.StringIO()
            json_file_observer(out)(line)
            self.assertEqual(json.loads(out.getvalue())["server_name"], US)

    def test_refused_line_names_the_invitee_once_known(self) -> None:
        """A refusal after the event named a valid local-form invitee (policy, limits,
        signatures...) carries it, in the fields and the text; one before (a malformed
        event) carries invitee None."""
        scenario = InviteScenario()
        events, _ = self.run_invite(scenario, invitee="@nobody:us.example")
        (refused,) = [e for e in events if e.get("outcome") == "refused"]
        self.assertEqual(refused["invitee"], "@nobody:us.example")
        self.assertIn(" for @nobody:us.example refused: 404 M_NOT_FOUND", formatEvent(refused))
        room_version, event = scenario.invite()
        event["type"] = "m.room.message"
        events, _ = self.run_invite(scenario, (room_version, event))
        (refused,) = [e for e in events if e.get("outcome") == "refused"]
        self.assertIsNone(refused["invitee"])
        self.assertNotIn(" for ", formatEvent(refused))

    def test_field_types_do_not_change_with_the_outcome(self) -> None:
        """``status`` is always the integer HTTP status answered, in the JSON observer's lines
        too: 200 on the accepted, ignored and repeated lines, as on a refusal its status; an
        invite stored as ignored is logged with outcome ``ignored``, as the metrics count it."""

        def as_json(event: dict[str, Any]) -> dict[str, Any]:
            out = io.StringIO()
            json_file_observer(out)(event)
            parsed: dict[str, Any] = json.loads(out.getvalue())
            return parsed

        scenario = InviteScenario()
        invite = scenario.invite()
        events, _ = self.run_invite(scenario, invite)
        (accepted,) = [as_json(e) for e in events if e.get("outcome") == "accepted"]
        self.assertEqual(accepted["status"], 200)
        self.assertNotIn("errcode", accepted)
        events, _ = self.run_invite(scenario, invite)
        (repeated,) = [as_json(e) for e in events if e.get("outcome") == "repeated"]
        self.assertEqual(repeated["status"], 200)
        scenario.store.rules.append(InviteRule(BOB, "server", THEM, "ignore"))
        events, answer = self.run_invite(scenario, room_id="!other:remote.example")
        self.assertIn("event", answer)
        (ignored,) = [e for e in events if e.get("outcome") == "ignored"]
        self.assertEqual(as_json(ignored)["status"], 200)
        self.assertIn("accepted (ignored)", formatEvent(ignored))
        events, _ = self.run_invite(scenario, invitee="@nobody:us.example")
        (refused,) = [as_json(e) for e in events if e.get("outcome") == "refused"]
        self.assertEqual(refused["status"], 404)

    def test_outcome_lines_read_as_text(self) -> None:
        """The text observer's line names the event, room, origin and invitee, braces and all."""
        scenario = InviteScenario()
        events, _ = self.run_invite(scenario)
        (accepted,) = [e for e in events if e.get("outcome") == "accepted"]
        self.assertIs(accepted["log_level"], LogLevel.info)
        self.assertEqual(accepted["log_namespace"], "federation_invite.inbound")
        self.assertIsInstance(accepted["log_time"], float)
        self.assertEqual(accepted["log_system"], "federation_invite.inbound#info")
        self.assertEqual(
            formatEvent(accepted),
            f"Invite {accepted['event_id']} in {accepted['room_id']} from {THEM}"
            " for @bob:us.example accepted (pending)",
        )
        events, _ = self.run_invite(scenario, invitee="@nobody:us.example")
        (refused,) = [e for e in events if e.get("outcome") == "refused"]
        self.assertTrue(formatEvent(refused).endswith(" refused: 404 M_NOT_FOUND Unknown user"))
        # Peer-chosen text with braces is printed as it is, never read as a format.
        with capturedLogs() as captured:
            _log_outcome("Invite $a{0}{event_id} refused: {x", event_id="$a", outcome="refused")
        self.assertEqual(formatEvent(captured[0]), "Invite $a{0}{event_id} refused: {x")
        self.assertEqual(captured[0]["text"], "Invite $a{0}{event_id} refused: {x")
        # The format is the text itself (no field for Twisted to look up), and a
        # JSON observer's line reads back as the same text.
        self.assertEqual(captured[0]["log_format"], "Invite $a{{0}}{{event_id}} refused: {{x")
        read_back = eventFromJSON(eventAsJSON(captured[0]))
        self.assertEqual(formatEvent(read_back), "Invite $a{0}{event_id} refused: {x")
        self.assertEqual(read_back["text"], "Invite $a{0}{event_id} refused: {x")

    def test_stripped_room_state_warned_on_the_one_line(self) -> None:
        """Row 13: stripped invite_room_state accepted (strict mode off) is warned of, on the
        invite's one outcome line, which then has the warn level and a stripped_state count."""
        scenario = InviteScenario()
        room_version, event = scenario.invite("9")
        state = [stripped("m.room.name", "", {"name": "x"}), stripped("m.room.topic", "", {})]
        with capturedLogs() as captured:
            deferred = scenario.send(
                2,
                scenario.v2_body(room_version, event, state),
                room_id=event["room_id"],
                event_id=event_id_of(room_version, event),
            )
            scenario.client.flush()
            self.assertEqual(self.successResultOf(deferred).code, 200)
        (line,) = [e for e in captured if e.get("outcome")]
        self.assertIs(line["log_level"], LogLevel.warn)
        self.assertEqual(line["stripped_state"], 2)
        self.assertIn("holds 2 stripped entries", formatEvent(line))
        # The system is given with the event (as the text observer would work it out).
        self.assertEqual(line["log_system"], "federation_invite.inbound#warn")
        self.assertIn(
            " [federation_invite.inbound#warn] Invite ", formatEventAsClassicLogText(line)
        )
        events, _ = self.run_invite(scenario, extra={"depth": 7})
        (plain,) = [e for e in events if e.get("outcome")]
        self.assertIs(plain["log_level"], LogLevel.info)
        self.assertNotIn("stripped_state", plain)

    def test_repeated_invite_logged_with_fields(self) -> None:
        """The same invite again is logged as 'repeated' with its fields."""
        scenario = InviteScenario()
        invite = scenario.invite()
        self.run_invite(scenario, invite)
        events, _ = self.run_invite(scenario, invite)
        (repeated,) = [e for e in events if e.get("outcome") == "repeated"]
        self.assertEqual((repeated["origin"], repeated["invitee"]), (THEM, "@bob:us.example"))

    def test_no_keys_or_signatures_logged(self) -> None:
        """Nothing logged during an invite contains a signature, a signing key or its seed."""
        scenario = InviteScenario()
        events, answer = self.run_invite(scenario)
        text = "\n".join(eventAsJSON(event) for event in events)
        for server_signatures in answer["event"]["signatures"].values():
            for signature in server_signatures.values():
                self.assertNotIn(signature, text)
                self.assertNotIn(signature[:20], text)
        for key in (scenario.our_key, scenario.their_key):
            self.assertNotIn(encode_base64(key.encode()), text)

    def test_json_lines(self) -> None:
        """The JSON observer writes one parseable object per line, fields included."""
        out = io.StringIO()
        observer = json_file_observer(out)
        scenario = InviteScenario()
        events, _ = self.run_invite(scenario)
        for event in events:
            observer(event)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), len(events))
        parsed = [json.loads(line) for line in lines]
        self.assertIn("accepted", [p.get("outcome") for p in parsed])
        self.assertIsNotNone(json_observer())


class LogForgingTests(SynchronousTestCase):
    """Peer-chosen strings cannot split, forge or colour a line of the text log."""

    def send(
        self, scenario: InviteScenario, room_version_id: str = "10", **kwargs: Any
    ) -> tuple[list[dict[str, Any]], int]:
        """Send one invite (``kwargs`` for ``build_invite``); the log events and the status."""
        room_version = KNOWN_ROOM_VERSIONS[room_version_id]
        event = build_invite(room_version, scenario.their_key, **kwargs)
        events, response = send_logged(self, scenario, room_version, event)
        return events, response.code

    def assertOneLine(self, event: dict[str, Any], text: str) -> None:
        """The event reads as ``text``, one line of the classic text log with nothing to hide."""
        self.assertEqual(formatEvent(event), text)
        line = formatEventAsClassicLogText(event)
        self.assertEqual(line.count("\n"), 1)
        self.assertTrue(line.endswith(text + "\n"), line)
        self.assertTrue(line[:-1].isprintable(), line)

    def test_escape_log_text(self) -> None:
        """Controls, C1, line and paragraph separators are escaped; printable text is kept."""
        plain = "Invite $abc/+_-{0}\\x1b in !room:remote.example from remote.example refused"
        self.assertIs(escape_log_text(plain), plain)
        self.assertEqual(
            escape_log_text("a\rb\nc\td\x1b[31me\x00f\x7fg\x85h\u2028i\u2029j\u202ek\xa0l\ud800"),
            "a\\rb\\nc\\td\\x1b[31me\\x00f\\x7fg\\x85h\\u2028i\\u2029j\\u202ek\\xa0l\\ud800",
        )
        self.assertEqual(escape_log_text("\u00e9\u4e2d \U0001f600"), "\u00e9\u4e2d \U0001f600")

    def test_logger_escapes_rendered_text(self) -> None:
        """A package Logger's line whose fields hold controls (a remote server's error
        text) renders as one escaped line; the fields keep the raw values."""
        events: list[dict[str, Any]] = []
        logger = Logger(namespace="federation_invite.keyring", observer=events.append)
        reason = ValueError("bad key\r\n[federation_invite.inbound#info] forged\x1b[31m")
        logger.info("Fetching keys from {server} failed: {reason}", server="a\nb", reason=reason)
        self.assertOneLine(
            events[0],
            "Fetching keys from a\\nb failed: bad key\\r\\n"
            "[federation_invite.inbound#info] forged\\x1b[31m",
        )
        self.assertEqual(events[0]["server"], "a\nb")
        self.assertIs(events[0]["reason"], reason)

    def test_logger_renders_the_keys_emit_adds(self) -> None:
        """A format naming a key ``emit`` adds (``{log_namespace}``) is rendered with it, so
        its other fields' controls are escaped too."""
        events: list[dict[str, Any]] = []
        logger = Logger(namespace="federation_invite.test", observer=events.append)
        logger.info("[{log_namespace}] bad peer {peer}", peer="a\r\nFORGED")
        self.assertOneLine(events[0], "[federation_invite.test] bad peer a\\r\\nFORGED")

    def test_logger_keeps_printable_format(self) -> None:
        """An event whose text is printable keeps its format (fields looked up as usual),
        and a failure's traceback keeps its own lines."""
        events: list[dict[str, Any]] = []
        logger = Logger(namespace="federation_invite.test", observer=events.append)
        logger.info("SRV lookup for {name} failed: {error!r}", name="a.example", error="{x}")
        self.assertEqual(events[0]["log_format"], "SRV lookup for {name} failed: {error!r}")
        self.assertEqual(formatEvent(events[0]), "SRV lookup for a.example failed: '{x}'")
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            logger.failure("Listener failed for {event_id}", event_id="$e\r")
        line = formatEventAsClassicLogText(events[1])
        self.assertIn("Listener failed for $e\\r\n", line)
        self.assertIn("ZeroDivisionError: boom", line)

    def test_every_package_logger_escapes(self) -> None:
        """Every module-level logger of the package is a ``logs.Logger``."""
        import importlib
        from pathlib import Path

        from twisted.logger import Logger as TwistedLogger

        import federation_invite

        # A file walk over the sources (pkgutil.walk_packages would list the same modules).
        package = Path(federation_invite.__file__).parent
        found = []
        for source in sorted(package.rglob("*.py")):
            parts = source.relative_to(package.parent).with_suffix("").parts
            module = importlib.import_module(".".join(p for p in parts if p != "__init__"))
            for name, value in vars(module).items():
                if isinstance(value, TwistedLogger):
                    found.append(f"{module.__name__}.{name}")
                    self.assertIsInstance(value, Logger, found[-1])
        self.assertIn("federation_invite.web.site.log", found)
        self.assertGreaterEqual(len(found), 11)

    def test_refused_path_ids_escaped_fields_raw(self) -> None:
        """A refusal for path IDs holding CR, LF, ESC, U+2028 and U+0085 is one escaped line;
        the fields, and a JSON observer's line, keep the raw IDs."""
        scenario = InviteScenario()
        room_version, event = scenario.invite()
        event_id = "$forged\x1b[2J\r\n:remote.example"
        with capturedLogs() as events:
            deferred = scenario.send(
                2, scenario.v2_body(room_version, event), room_id=EVIL_ROOM_ID, event_id=event_id
            )
            scenario.client.flush()
            self.assertEqual(self.successResultOf(deferred).code, 400)
        (refused,) = [e for e in events if e.get("outcome")]
        self.assertOneLine(
            refused,
            f"Invite $forged\\x1b[2J\\r\\n:remote.example in {EVIL_ROOM_ID_TEXT} from {THEM}"
            " refused: 400 M_INVALID_PARAM The event's room_id is not the room in the request path",
        )
        self.assertEqual((refused["room_id"], refused["event_id"]), (EVIL_ROOM_ID, event_id))
        read_back = json.loads(eventAsJSON(refused))
        self.assertEqual((read_back["room_id"], read_back["event_id"]), (EVIL_ROOM_ID, event_id))

    def test_accepted_room_id_escaped(self) -> None:
        """An accepted invite to a room ID holding controls is logged on one escaped line."""
        scenario = InviteScenario()
        events, code = self.send(scenario, room_id=EVIL_ROOM_ID)
        self.assertEqual(code, 200)
        (accepted,) = [e for e in events if e.get("outcome")]
        self.assertOneLine(
            accepted,
            f"Invite {accepted['event_id']} in {EVIL_ROOM_ID_TEXT} from {THEM} for {BOB}"
            " accepted (pending)",
        )
        self.assertEqual(accepted["room_id"], EVIL_ROOM_ID)

    def test_unauthenticated_refusal_names_the_peer(self) -> None:
        """A request without an X-Matrix header is refused "from an unauthenticated peer at" its
        address, not "from None"; the origin field stays None."""
        scenario = InviteScenario()
        room_version, event = scenario.invite()
        event_id = event_id_of(room_version, event)
        with capturedLogs() as events:
            deferred = scenario.send(
                2,
                scenario.v2_body(room_version, event),
                room_id=event["room_id"],
                event_id=event_id,
                headers=[],
            )
            scenario.client.flush()
            self.assertEqual(self.successResultOf(deferred).code, 401)
        (refused,) = [e for e in events if e.get("outcome")]
        self.assertOneLine(
            refused,
            f"Invite {event_id} in {event['room_id']} from an unauthenticated peer at 127.0.0.1"
            " refused: 401 M_UNAUTHORIZED Missing X-Matrix Authorization header",
        )
        self.assertIsNone(refused["origin"])
        self.assertEqual(refused["peer"], "127.0.0.1")

    def test_store_failure_lines_escaped(self) -> None:
        """A v1 event ID holding controls is escaped in the store failure's error line too."""
        scenario = InviteScenario()
        scenario.store.fail_invites = True
        event_id = "$evil\x1b]0;pwned\x07\u2029:remote.example"
        events, code = self.send(scenario, "1", extra={"event_id": event_id})
        self.assertEqual(code, 500)
        (error,) = [e for e in events if e["log_level"] is LogLevel.error]
        self.assertOneLine(
            error,
            "Could not store invite $evil\\x1b]0;pwned\\x07\\u2029:remote.example:"
            " store_invite failed: database is locked",
        )
        self.assertEqual(error["event_id"], event_id)
        self.assertEqual(error["server_name"], US)

    def test_listener_failure_line_escaped(self) -> None:
        """A failing listener's line names the event ID escaped (the traceback follows it)."""
        scenario = InviteScenario()

        def broken(record: Any) -> None:
            raise RuntimeError("listener bug")

        scenario.handler.add_listener(broken)
        event_id = "$evil\r\n:remote.example"
        events, code = self.send(scenario, "1", extra={"event_id": event_id})
        self.assertEqual(code, 200)
        (failed,) = [e for e in events if e["log_level"] is LogLevel.critical]
        self.assertEqual(
            formatEvent(failed), "Invite listener failed for $evil\\r\\n:remote.example"
        )
        self.assertEqual(failed["event_id"], event_id)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class LoggerRenderingTests(SynchronousTestCase):
    """``logs.Logger`` renders each event's text once, as Twisted's formatEvent would."""

    def emit(self, format: str, **fields: Any) -> dict[str, Any]:
        """The event a package Logger emits for ``format`` and ``fields``."""
        events: list[dict[str, Any]] = []
        Logger(namespace="federation_invite.test", observer=events.append).info(format, **fields)
        (event,) = events
        return event

    def test_text_as_twisted_renders_it(self) -> None:
        """Formats of every kind (conversions, specs, dotted, indexed and called fields, emit's
        own keys) read as Twisted's Logger renders them, in text and read back from JSON."""
        fields = {
            "x": "s",
            "n": 2.5,
            "o": complex(3, 4),
            "d": {"k": ["v"]},
            "f": lambda: "called",
            "w": 6,
            "b": b"\x00{",
        }
        for format in [
            "",
            "no fields, {{braces}}",
            "{x} {x!r} {x!s:>4} {x!r:^7} {x}{x}",
            "{n:.2f} {n!r} {n:>8.1e}",
            "{o.real} {o.imag!r} {d[k]} {d[k][0]!r} {o.conjugate()}",
            "{f()} {f()!r:>10}",
            "{log_namespace} {log_level.name} {log_source}",
            "{b} {b!r}",
            "{x!a} {n:{w}}",
        ]:
            twisted_events: list[dict[str, Any]] = []
            TwistedLogger(namespace="federation_invite.test", observer=twisted_events.append).info(
                format, **fields
            )
            event = self.emit(format, **fields)
            self.assertEqual(formatEvent(event), formatEvent(twisted_events[0]), format)
            self.assertEqual(formatEvent(eventFromJSON(eventAsJSON(event))), formatEvent(event))

    def test_fields_rendered_once(self) -> None:
        """A printable event's fields are rendered once, in ``emit``: text observers reprint the
        text from ``log_flattened``, which a JSON observer keeps; the format is kept."""
        rendered: list[str] = []

        class Peer:
            def __str__(self) -> str:
                rendered.append("str")
                return "remote.example"

        event = self.emit("Fetching keys from {server} failed: {reason}", server=Peer(), reason=1)
        self.assertEqual(rendered, ["str"])
        self.assertEqual(event["log_format"], "Fetching keys from {server} failed: {reason}")
        self.assertEqual(event["log_flattened"]["server!s:"], "remote.example")
        text = "Fetching keys from remote.example failed: 1"
        self.assertEqual(formatEvent(event), text)
        self.assertTrue(formatEventAsClassicLogText(event).endswith(" " + text + "\n"))
        read_back = eventFromJSON(eventAsJSON(event))
        self.assertEqual(formatEvent(read_back), text)
        self.assertEqual(read_back["log_flattened"]["reason!:"], 1)
        self.assertEqual(rendered, ["str"])

    def test_call_syntax_runs_once(self) -> None:
        """A format's ``{f()}`` runs once per event, whatever the observers and whether the text
        is escaped, left to Twisted (``!a``) or unformattable after the call."""
        for format, result, text in [
            ("{f()} ok", "x", "x ok"),
            ("{f()} ok", "x\r\n", "x\\r\\n ok"),
            ("{f()!a} ok", "\xe9", "'\\xe9' ok"),
        ]:
            calls: list[None] = []

            def f(result: str = result, calls: list[None] = calls) -> str:
                calls.append(None)
                return result

            event = self.emit(format, f=f)
            self.assertEqual(formatEvent(event), text)
            formatEventAsClassicLogText(event)
            eventAsJSON(event)
            self.assertEqual(len(calls), 1, format)
        calls = []
        event = self.emit("{f()} {missing}", f=lambda: calls.append(None))
        self.assertTrue(formatEvent(event).startswith("Unable to format event {"))
        self.assertTrue(formatEvent(event).endswith(": 'missing'"))
        self.assertEqual(len(calls), 1)

    def test_event_with_log_flattened_renders_from_it(self) -> None:
        """An event emitted with a ``log_flattened`` of its own (one read back from a JSON log,
        emitted again) reads as that holds it, as Twisted renders it: the format's fields,
        which the event need not carry, are not looked up in the event."""
        flattened = {"peer!s:": "a.example", "peer!:": "a.example", "what!s:": "hi", "what!:": "hi"}
        event = self.emit("peer {peer} said {what}", log_flattened=flattened)
        self.assertEqual(formatEvent(event), "peer a.example said hi")

    def test_emit_keeps_twisted_behaviour(self) -> None:
        """``emit`` adds Twisted's keys, reports an invalid level as Twisted does, and traces."""
        trace: list[Any] = []
        event = self.emit("{log_time:.0f}", log_trace=trace)
        self.assertIsInstance(event["log_time"], float)
        self.assertEqual(formatEvent(event), f"{event['log_time']:.0f}")
        self.assertEqual(len(trace), 1)
        events: list[dict[str, Any]] = []
        Logger(observer=events.append).emit("bogus", "x")  # type: ignore[arg-type]
        (invalid,) = events
        self.assertIs(invalid["log_level"], LogLevel.critical)
        self.assertTrue(invalid["log_failure"].check(InvalidLogLevelError))


#: An exception message holding a remote server's error text, with a forged line.
FORGED_MESSAGE = (
    "bad key\r\n2026-01-01T00:00:00+0000 [federation_invite.inbound#info] forged\x1b[31m"
    "\u2028\x85\x0b"
)
#: How FORGED_MESSAGE reads in a text log.
FORGED_MESSAGE_TEXT = (
    "bad key\\r\\n2026-01-01T00:00:00+0000 [federation_invite.inbound#info] forged\\x1b[31m"
    "\\u2028\\x85\\x0b"
)


class FailureEscapingTests(SynchronousTestCase):
    """A logged failure's traceback cannot forge a line of a text log; JSON keeps the failure."""

    def log_failure(self, **kwargs: Any) -> dict[str, Any]:
        """The event of ``log.failure`` for a ValueError holding FORGED_MESSAGE."""
        events: list[dict[str, Any]] = []
        logger = Logger(namespace="federation_invite.keyring", observer=events.append)
        try:
            raise ValueError(FORGED_MESSAGE)
        except ValueError:
            logger.failure("Key fetch from {server} crashed", server="a.example", **kwargs)
        (event,) = events
        return event

    def assertNoForgedLine(self, text: str) -> None:
        """``text`` holds the message escaped, and no line of it a control or the forged line."""
        self.assertIn(FORGED_MESSAGE_TEXT, text)
        for line in text.splitlines():
            self.assertTrue(line.removeprefix("\t").isprintable(), repr(line))
            self.assertFalse(line.lstrip().startswith("2026-01-01"), repr(line))

    def test_text_observer_escapes_traceback(self) -> None:
        """twistd's text observer prints the traceback on its own lines, the message escaped."""
        event = self.log_failure()
        out = io.StringIO()
        textFileLogObserver(out)(event)
        text = out.getvalue()
        self.assertEqual(text, formatEventAsClassicLogText(event))
        self.assertNoForgedLine(text)
        lines = text.splitlines()
        self.assertTrue(lines[0].endswith(" Key fetch from a.example crashed"), lines[0])
        self.assertEqual(lines[1], "\tTraceback (most recent call last):")
        self.assertTrue(lines[2].startswith('\t  File "'), lines[2])
        self.assertEqual(lines[-2], "\tbuiltins.ValueError: " + FORGED_MESSAGE_TEXT)
        self.assertEqual(lines[-1], "\t")

    def test_every_traceback_form_escaped(self) -> None:
        """Brief and verbose (a local's repr) tracebacks, and the legacy observers' text, are
        escaped too."""
        event = self.log_failure()
        failure = event["log_failure"]
        self.assertNoForgedLine(failure.getBriefTraceback())
        self.assertNoForgedLine(str(failure))

        class Peer:
            def __repr__(self) -> str:
                return "peer\r\n[forged] line"

        peer = Peer()
        try:
            raise ValueError(FORGED_MESSAGE, peer)
        except ValueError:
            captured = Failure(captureVars=True)
        events: list[dict[str, Any]] = []
        Logger(observer=events.append).failure("crashed", captured)
        verbose = events[0]["log_failure"].getTraceback(detail="verbose")
        self.assertIn("  peer : peer\\r\\n[forged] line\n", verbose)
        self.assertTrue(all(line.isprintable() for line in verbose.splitlines()))
        # A legacy observer (twisted.python.log's, syslog's) prints the failure it is handed.
        legacy = io.StringIO()
        LegacyLogObserverWrapper(FileLogObserver(legacy).emit)(event)
        self.assertIn(" Key fetch from a.example crashed\n", legacy.getvalue())
        self.assertNoForgedLine(legacy.getvalue())

    def test_failure_without_frames_escaped(self) -> None:
        """A failure never raised (no frames) prints its type and message as Twisted prints
        them, "Failure: " and the message written apart (a write not ending a line), the
        message escaped."""
        events: list[dict[str, Any]] = []
        Logger(observer=events.append).failure("crashed", Failure(ValueError("x\ry")))
        failure = events[0]["log_failure"]
        self.assertEqual(
            failure.getTraceback(),
            "Traceback (most recent call last):\nFailure: builtins.ValueError: x\\ry\n",
        )
        self.assertIn(
            "\n\tFailure: builtins.ValueError: x\\ry\n", formatEventAsClassicLogText(events[0])
        )

    def test_json_observer_keeps_failure(self) -> None:
        """A JSON observer's line carries the failure's type, exception message and frames; the
        failure is the original's state, picklable, and trial still sees its type."""
        event = self.log_failure()
        out = io.StringIO()
        json_file_observer(out)(event)
        self.assertEqual(out.getvalue().count("\n"), 1)
        self.assertTrue(out.getvalue()[:-1].isprintable())
        read_back = eventFromJSON(out.getvalue())
        failure = read_back["log_failure"]
        self.assertEqual(failure.type.__name__, "ValueError")
        self.assertEqual(failure.type.__module__, "builtins")
        self.assertEqual(failure.message, FORGED_MESSAGE)
        self.assertEqual(failure.frames[-1][0], "log_failure")
        self.assertEqual(read_back["server"], "a.example")
        logged = event["log_failure"]
        self.assertIsInstance(logged, Failure)
        self.assertIsInstance(logged.value, ValueError)
        self.assertEqual(logged.getErrorMessage(), FORGED_MESSAGE)
        unpickled = pickle.loads(pickle.dumps(logged))
        self.assertIs(type(unpickled), Failure)
        self.assertEqual(unpickled.value.args, (FORGED_MESSAGE,))
        self.assertEqual(
            unpickled.getTraceback().count("\n"), logged.getTraceback().count("\n") + 1
        )
        self.assertIs(logged.check(KeyError, ValueError), ValueError)

    def test_given_failure_left_as_it_is(self) -> None:
        """The Failure handed to ``log.failure`` is not changed; the event carries an escaped copy."""
        try:
            raise ValueError(FORGED_MESSAGE)
        except ValueError:
            original = Failure()
        raw = original.getTraceback()
        events: list[dict[str, Any]] = []
        Logger(observer=events.append).failure("crashed", original)
        self.assertEqual(original.getTraceback(), raw)
        self.assertIn(FORGED_MESSAGE, raw)
        self.assertIsNot(events[0]["log_failure"], original)
        self.assertIs(events[0]["log_failure"].value, original.value)


#: The fields of an invite's log line.
_FIELDS = (
    "event_id",
    "room_id",
    "origin",
    "invitee",
    "outcome",
    "status",
    "errcode",
    "reason",
    "peer",
    "server_name",
)


class EarlyRefusalLogTests(SynchronousTestCase):
    """Invites refused before the handler runs (rows 1 to 3, a path ID that is not UTF-8, and
    the daemon's site's own refusals) get the invite line too, once, with the same fields."""

    def test_endpoint_refusals_logged(self) -> None:
        """Each refusal by the endpoint is one invite line: the path's IDs (None where not
        UTF-8), no origin (nothing was authenticated), the peer, status, errcode and reason."""
        scenario = InviteScenario(max_body_bytes=100)
        room = "!room:remote.example"
        path = scenario.path(2, room, "$x")
        not_utf8 = path[: -len("%24x")] + "%ff"
        cases = [
            (
                path,
                b"{" + b" " * 200 + b"}",
                "$x",
                413,
                "M_TOO_LARGE",
                "Request body exceeds 100 bytes",
            ),
            (path, b"nope", "$x", 400, "M_NOT_JSON", "Body is not valid JSON"),
            (path, b"[1]", "$x", 400, "M_NOT_JSON", "The body must be a JSON object"),
            (path, b'{"a":1,"a":1}', "$x", 400, "M_BAD_JSON", "Duplicate key 'a' in JSON"),
            (
                not_utf8,
                b"{}",
                None,
                400,
                "M_INVALID_PARAM",
                "The event ID in the path is not UTF-8",
            ),
        ]
        for request_path, data, event_id, status, errcode, reason in cases:
            with capturedLogs() as events:
                deferred = scenario.put_raw(request_path, data, content={"x": 1})
                scenario.client.flush()
                self.assertEqual(self.successResultOf(deferred).code, status)
            (line,) = [event for event in events if event.get("outcome")]
            self.assertEqual(
                {field: line.get(field) for field in _FIELDS},
                {
                    "event_id": event_id,
                    "room_id": room,
                    "origin": None,
                    "invitee": None,
                    "outcome": "refused",
                    "status": status,
                    "errcode": errcode,
                    "reason": reason,
                    "peer": "127.0.0.1",
                    "server_name": US,
                },
            )
            self.assertEqual(
                formatEvent(line),
                f"Invite {event_id or '?'} in {room} from an unauthenticated peer at 127.0.0.1"
                f" refused: {status} {errcode} {reason}",
            )

    def test_site_refusals_logged(self) -> None:
        """An invite request the daemon's site refuses itself (413 for a declared body over the
        cap) is one invite line, in place of the site's own line; another path keeps that, an
        invite path with an empty room ID or event ID segment (a path we do not serve) too."""
        scenario = InviteScenario(max_body_bytes=100)
        site = FederationSite(scenario.root, reactor=scenario.clock, max_body_bytes=100)
        room = "!room:remote.example"
        head = b" HTTP/1.1\r\nHost: us.example\r\nContent-Length: 200\r\n\r\n"
        for path, invite in (
            (scenario.path(2, room, "$x").encode(), True),
            (b"/nothing", False),
            (b"/_matrix/federation/v2/invite//%24x", False),
            (b"/_matrix/federation/v2/invite/%21room%3Aremote.example/", False),
        ):
            connection = Connection(site)
            self.addCleanup(connection.close)
            with capturedLogs() as events:
                connection.send(b"PUT " + path + head)
            self.assertEqual(connection.responses()[0][0], 413)
            (line,) = events
            if not invite:
                self.assertNotIn("outcome", line)
                self.assertIn("Refusing a request body over 100 bytes", formatEvent(line))
                continue
            self.assertEqual(
                {field: line.get(field) for field in _FIELDS},
                {
                    "event_id": "$x",
                    "room_id": room,
                    "origin": None,
                    "invitee": None,
                    "outcome": "refused",
                    "status": 413,
                    "errcode": "M_TOO_LARGE",
                    "reason": "Request body exceeds 100 bytes",
                    "peer": "203.0.113.9",
                    "server_name": US,
                },
            )

    def test_site_timeout_of_an_invite_logged(self) -> None:
        """An invite request whose headers did not arrive within the deadline (408) is one
        invite line too, and not the site's "not received" line; another path keeps that, as
        does a request whose request line did not arrive whole (no resource to hear of it)."""
        scenario = InviteScenario()
        site = FederationSite(scenario.root, reactor=scenario.clock, request_timeout=30)
        invite = scenario.path(2, "!room:remote.example", "$x").encode()
        for sent, invite_line in (
            (b"PUT " + invite + b" HTTP/1.1\r\nHost: us.example\r\n", True),
            (b"PUT /nothing HTTP/1.1\r\nHost: us.example\r\n", False),
            (b"PUT /_matrix/federation/v2/inv", False),
        ):
            connection = Connection(site)
            self.addCleanup(connection.close)
            with capturedLogs() as events:
                connection.send(sent)
                scenario.clock.advance(30)
            connection.close()  # gone, as a real socket would be: no abort timer left
            self.assertEqual(connection.responses()[0][0], 408)
            (line,) = events
            if invite_line:
                self.assertEqual(
                    (line.get("outcome"), line.get("status"), line.get("errcode")),
                    ("refused", 408, "M_UNKNOWN"),
                )
            else:
                self.assertIn("request not received within 30 s", formatEvent(line))


def _send_captured(
    test: SynchronousTestCase,
    scenario: InviteScenario,
    room_version: Any,
    event: Any,
    **kwargs: Any,
) -> tuple[list[dict[str, Any]], int]:
    """Send ``event`` as a v2 invite (``kwargs`` to ``InviteScenario.send``); the events
    logged meanwhile and the status answered."""
    with capturedLogs() as events:
        deferred = scenario.send(
            2,
            scenario.v2_body(room_version, event),
            room_id=event["room_id"],
            event_id=event_id_of(room_version, event),
            **kwargs,
        )
        scenario.client.flush()
        code = test.successResultOf(deferred).code
    return list(events), code


class OriginClaimLogTests(SynchronousTestCase):
    """A line's ``origin`` is only ever an authenticated origin: a refusal before or at the
    signature check logs the X-Matrix header's origin as ``claimed_origin``, so that alerts or
    automatic deny lists keyed on ``origin`` cannot be pointed at a server by forging its name."""

    def send(
        self, scenario: InviteScenario, depth: int = 1, **kwargs: Any
    ) -> tuple[dict[str, Any], int]:
        """Send a v2 invite (``kwargs`` to ``InviteScenario.send``); its one outcome line and
        the status answered."""
        room_version, event = scenario.invite(extra={"depth": depth})
        events, code = _send_captured(self, scenario, room_version, event, **kwargs)
        (line,) = [e for e in events if e.get("outcome")]
        return line, code

    def assertClaimed(self, line: dict[str, Any], status: int, errcode: str) -> None:
        self.assertEqual(
            (line["outcome"], line["status"], line["errcode"]), ("refused", status, errcode)
        )
        self.assertIsNone(line["origin"])
        self.assertEqual(line["claimed_origin"], THEM)
        self.assertIn(
            f" from an unauthenticated peer at 127.0.0.1 claiming to be {THEM} refused: ",
            formatEvent(line),
        )
        self.assertNotIn(f" from {THEM} ", formatEvent(line))

    def test_forged_signature(self) -> None:
        """A signature by a key that is not the origin's (401): origin None, the claim apart."""
        line, code = self.send(InviteScenario(), key=make_key("them1"))
        self.assertEqual(code, 401)
        self.assertClaimed(line, 401, "M_UNAUTHORIZED")
        self.assertIn("Invalid X-Matrix signature", line["reason"])

    def test_key_not_obtained(self) -> None:
        """A key ID the origin does not have (401): origin None, the claim apart."""
        line, code = self.send(InviteScenario(), key=make_key("madeup"))
        self.assertEqual(code, 401)
        self.assertClaimed(line, 401, "M_UNAUTHORIZED")
        self.assertIn("Could not obtain key", line["reason"])

    def test_acl_refusal(self) -> None:
        """An origin the server ACL denies (403, before any key fetch): origin None (as
        before), and now the claim in claimed_origin."""
        line, code = self.send(InviteScenario(acl=ServerAcl.of(deny=(THEM,))))
        self.assertEqual(code, 403)
        self.assertClaimed(line, 403, "M_FORBIDDEN")

    def test_key_store_failure(self) -> None:
        """The key store failing while the origin's key is looked up (500): the error line and
        the refusal carry the claim only."""
        scenario = InviteScenario()

        def broken(*args: Any, **kwargs: Any) -> Any:
            return fail(StoreError("get_server_keys", "database is locked"))

        scenario.store.get_server_keys = broken  # type: ignore[method-assign]
        room_version, event = scenario.invite()
        events, code = _send_captured(self, scenario, room_version, event)
        self.assertEqual(code, 500)
        (error,) = [e for e in events if e["log_level"] is LogLevel.error]
        self.assertIsNone(error["origin"])
        self.assertEqual(error["claimed_origin"], THEM)
        self.assertEqual(error["server_name"], US)  # a tenant's error lines too
        self.assertIn(f"claiming to be {THEM}", formatEvent(error))
        (line,) = [e for e in events if e.get("outcome")]
        self.assertClaimed(line, 500, "M_UNKNOWN")

    def test_authenticated_lines_have_no_claim(self) -> None:
        """Once the signature verified, origin is the origin and claimed_origin None (refusals)
        or absent (accepted lines); without a header, both are None."""
        scenario = InviteScenario()
        line, code = self.send(scenario)
        self.assertEqual((code, line["outcome"], line["origin"]), (200, "accepted", THEM))
        self.assertNotIn("claimed_origin", line)
        scenario.store.users.clear()
        line, code = self.send(scenario, depth=2)
        self.assertEqual((code, line["origin"], line["claimed_origin"]), (404, THEM, None))
        self.assertIn(f" from {THEM} for {BOB} refused: 404", formatEvent(line))
        line, code = self.send(scenario, depth=3, headers=[])
        self.assertEqual((code, line["origin"], line["claimed_origin"]), (401, None, None))


class UnexpectedFailureLogTests(SynchronousTestCase):
    """An invite failing in our own code or an embedder's (a signer, a policy hook) is answered
    500 ``M_UNKNOWN`` and still gets its outcome line, with the usual fields, as a store
    failure does; the failure's traceback is logged once, apart."""

    def test_signer_failure(self) -> None:
        scenario = InviteScenario()

        def failing_sign(*args: Any) -> Any:
            raise RuntimeError("HSM unreachable")

        self.patch(scenario.handler._signer, "sign_event", failing_sign)
        room_version, event = scenario.invite()
        events, code = _send_captured(self, scenario, room_version, event)
        self.assertEqual(code, 500)
        (line,) = [e for e in events if e.get("outcome")]
        self.assertEqual(
            (line["outcome"], line["status"], line["errcode"], line["origin"], line["invitee"]),
            ("refused", 500, "M_UNKNOWN", THEM, event["state_key"]),
        )
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertIn("HSM unreachable", formatEvent(failures[0]) + str(failures[0]["log_failure"]))
        self.assertEqual(failures[0]["server_name"], US)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
