"""``federation-invite``: the operator's command line.

Sub-commands grow with the services; each one is a small function over the
same configuration the daemon reads.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import shlex
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

import attrs
from twisted.python.failure import Failure
from unpaddedbase64 import encode_base64

from .config import Config, ConfigError, load_config, render_config, ssl_endpoint_files
from .core.ids import is_valid_user_id, parse_server_name, server_name_of
from .core.keys import encode_verify_key, key_id_of, verify_key_of
from .signingkey import SigningKeyError, load_or_create_signing_key, read_signing_keys
from .store import (
    INVITE_STATUSES,
    InviteRecord,
    InviteRule,
    IStore,
    StoreError,
    parse_database_uri,
    run_migrations,
)
from .store._dialect import SQLiteDialect
from .tlscert import write_self_signed_certificate

__all__ = ["main"]


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="TOML configuration file (default: built-in)")
    # The daemon's overrides of the same keys (tap.Options): a daemon started with them is
    # worked on with them (without, a command would quietly open the file's database, take
    # the file's server name for its users, or show the file's signing key instead).
    for option, _key, help_text in _OVERRIDES:
        parser.add_argument(option, help=help_text)


#: The daemon's options overriding a key of the file (as ``tap.Options.postOptions`` maps
#: them), which every command taking ``-c`` takes too: (option, key, help).
_OVERRIDES = (
    ("--server-name", "server_name", "our server name (overrides server_name)"),
    ("--signing-key", "signing_key", "signing key file (overrides signing_key)"),
    ("--database", "database", "database URI (overrides database)"),
    ("--data-dir", "data_dir", "data directory (overrides data_dir)"),
)


def _load(args: argparse.Namespace) -> Config:
    """The configuration a command works with: ``-c``'s file (or the built-in defaults),
    with ``--server-name``, ``--signing-key``, ``--database`` and ``--data-dir``
    overriding it, as they do for the daemon."""
    overrides = {
        key: value
        for option, key, _help in _OVERRIDES
        if (value := getattr(args, option[2:].replace("-", "_"), None)) is not None
    }
    return load_config(args.config, overrides)


def _cmd_generate_config(args: argparse.Namespace, out: TextIO) -> int:
    # An absolute data directory: the daemon resolves relative paths against its
    # own working directory, and must find this very key wherever it is started.
    data_dir = os.path.abspath(args.data_dir)
    settings: dict[str, Any] = {"server_name": args.server_name, "data_dir": data_dir}
    if args.listen:
        settings["listen"] = args.listen
    tls_key = os.path.join(data_dir, "tls.key")
    tls_cert = os.path.join(data_dir, "tls.crt")
    if args.tls_cert and not args.listen:
        host, port = parse_server_name(args.server_name)
        # The loopback of the name's address family: an IPv6 literal leads to ::1.
        loopback = "::1" if host.startswith("[") else "127.0.0.1"
        settings["listen"] = [
            f"ssl:{port or 8448}:interface={_escape_endpoint(loopback)}"
            f":privateKey={_escape_endpoint(tls_key)}:certKey={_escape_endpoint(tls_cert)}"
        ]
    # Validate what we are about to write with the same checks the daemon applies.
    config = load_config(None, settings)
    # An endpoint's relative file names are resolved as --data-dir was: from this directory.
    wanted = (tls_key, tls_cert)
    if (
        args.tls_cert
        and args.listen
        and not any(
            files is not None and tuple(map(os.path.abspath, files)) == wanted
            for files in map(ssl_endpoint_files, config.listen)
        )
    ):
        # The certificate would be written, and announced, for no listener at all.
        raise ConfigError(
            "--tls-cert writes a certificate for a TLS listener, but no --listen endpoint is an "
            "ssl: (or TLS systemd:) endpoint naming it; leave out --listen (for an ssl: listener "
            "on the server name's port) or give an ssl: or systemd: endpoint with "
            f"privateKey={_escape_endpoint(tls_key)}:certKey={_escape_endpoint(tls_cert)}"
        )
    if os.path.exists(args.output) and not args.force:
        raise ConfigError(f"{args.output} exists; use --force to overwrite it")
    # Key and certificate first: the config is written only once they exist.
    config.ensure_data_dir()
    key, created = load_or_create_signing_key(config.signing_key_path)
    tls_state = None
    if args.tls_cert:
        if os.path.exists(tls_key) and os.path.exists(tls_cert):
            tls_state = "Kept the existing"
        else:
            write_self_signed_certificate(args.server_name, tls_key, tls_cert)
            tls_state = "Wrote a"
    with open(args.output, "w", encoding="utf-8") as handle:
        handle.write(render_config(settings))
    out.write(f"Wrote {args.output}\n")
    if tls_state is not None:
        out.write(
            f"{tls_state} self-signed TLS certificate {tls_cert} (key {tls_key}, mode 0600): "
            "for local testing only; peers must turn certificate verification off\n"
        )
    state = "Generated" if created else "Kept existing"
    out.write(f"{state} signing key {key_id_of(key)} at {config.signing_key_path}\n")
    return 0


def _escape_endpoint(path: str) -> str:
    """Escape a path for a Twisted endpoint string (``:`` and ``\\`` are special there)."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


def _check_data_dir(config: Config) -> None:
    """Refuse a ``data_dir`` that is not a directory, as the commands creating it do."""
    if os.path.lexists(config.data_dir) and not os.path.isdir(config.data_dir):
        raise ConfigError(
            f"configuration key 'data_dir': {config.data_dir} exists and is not a directory"
        )


def _cmd_check_config(args: argparse.Namespace, out: TextIO) -> int:
    config = _load(args)
    _check_data_dir(config)
    if os.path.lexists(config.signing_key_path):
        # What only the key can tell: that it reads, and that no old key has its ID.
        # A missing key is no error: the daemon creates it. Anything else at the
        # path is read, a dangling symlink included: the daemon cannot create a
        # key there, nor read one.
        try:
            keys = read_signing_keys(config.signing_key_path)
        except SigningKeyError as exc:
            raise ConfigError(f"configuration key 'signing_key': {exc}") from None
        config.check_signing_key_id(key_id_of(keys[0]))
    out.write(f"OK: {config.path or 'built-in defaults'} (server name {config.server_name})\n")
    return 0


def _cmd_keys_show(args: argparse.Namespace, out: TextIO) -> int:
    config = _load(args)
    for key in read_signing_keys(config.signing_key_path):
        verify_key = verify_key_of(key)
        fingerprint = encode_base64(hashlib.sha256(verify_key.encode()).digest())
        out.write(
            f"{key_id_of(key)} {encode_verify_key(verify_key)} (sha256 fingerprint {fingerprint})\n"
        )
    return 0


# -- commands that need the database: each is ``(args, out, config) -> action``, which checks
# the arguments (refusing them before any database is opened, or created), and the action
# ``async (store) -> exit code`` does the command with the store.

_StoreAction = Callable[[IStore], Awaitable[int]]


async def _cmd_migrate(args: argparse.Namespace, out: TextIO, reactor: Any) -> int:
    config = _load(args)
    config.ensure_data_dir()
    result = await run_migrations(config.database, reactor=reactor)
    if result.moved_bookkeeping:
        out.write(
            "Moved the record of applied schema versions from schema_migrations"
            " to federation_invite_schema\n"
        )
    if result.applied:
        out.write(
            f"Migrated from schema {result.before} to {result.after}: {', '.join(result.applied)}\n"
        )
    else:
        out.write(f"Schema is at version {result.after}; nothing to do\n")
    return 0


def _local_user(config: Config, user_id: str) -> str:
    if not is_valid_user_id(user_id) or server_name_of(user_id) != config.server_name:
        raise ConfigError(f"{user_id!r} is not a user ID on this server ({config.server_name})")
    return user_id


def _cmd_users(args: argparse.Namespace, out: TextIO, config: Config) -> _StoreAction:
    if args.users_command == "list":

        async def list_users(store: IStore) -> int:
            for user_id in await store.list_local_users():
                out.write(_printable(user_id) + "\n")
            return 0

        return list_users
    user_id = _local_user(config, args.user_id)
    if args.users_command == "add":

        async def add_user(store: IStore) -> int:
            changed = await store.add_local_user(user_id)
            out.write(f"{'Added' if changed else 'Already present:'} {user_id}\n")
            return 0

        return add_user

    async def remove_user(store: IStore) -> int:
        changed = await store.remove_local_user(user_id)
        out.write(f"{'Removed' if changed else 'Not present:'} {user_id}\n")
        return 0 if changed else 1

    return remove_user


def _cmd_rules(args: argparse.Namespace, out: TextIO, config: Config) -> _StoreAction:
    user_id = _local_user(config, args.user_id)
    if args.rules_command == "list":

        async def list_rules(store: IStore) -> int:
            for rule in await store.list_invite_rules(user_id):
                out.write(_printable(f"{rule.kind} {rule.pattern} {rule.action}") + "\n")
            return 0

        return list_rules
    # ``is not None``: an empty --user is refused as empty (InviteRule), not taken for --server.
    kind, pattern = ("user", args.user) if args.user is not None else ("server", args.server)
    rule = InviteRule(user_id, kind, pattern, args.action)
    said = f"{kind} {pattern} {args.action}"
    if args.rules_command == "add":

        async def add_rule(store: IStore) -> int:
            changed = await store.add_invite_rule(rule)
            out.write(f"{'Added' if changed else 'Already present:'} {said}\n")
            return 0

        return add_rule

    async def remove_rule(store: IStore) -> int:
        changed = await store.remove_invite_rule(rule)
        out.write(f"{'Removed' if changed else 'Not present:'} {said}\n")
        return 0 if changed else 1

    return remove_rule


def _printable(value: object) -> str:
    """Text safe for a terminal: control and format characters (peer-chosen IDs may hold
    escape sequences, newlines or bidi overrides) shown as escapes."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def _received(received_ts: int) -> str:
    """When an invite was received, in UTC; milliseconds as stored when no date fits
    (the store takes any integer up to 2**53, and a library caller may write one)."""
    try:
        when = datetime.datetime.fromtimestamp(received_ts / 1000, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{received_ts} ms"
    return f"{when:%Y-%m-%d %H:%M:%S}"


def _is_shown(field: attrs.Attribute[Any], _value: object = None) -> bool:
    """Whether an ``InviteRecord`` field is the operator's: the record's value (what its
    equality compares), not ``event_json``, the store's copy of the event's encoding."""
    return bool(field.eq)


def _invite_json(record: InviteRecord) -> dict[str, Any]:
    return attrs.asdict(record, filter=_is_shown)


def _cmd_invites(args: argparse.Namespace, out: TextIO, config: Config) -> _StoreAction:
    async def invites(store: IStore) -> int:
        return await _invites(args, out, store)

    return invites


async def _invites(args: argparse.Namespace, out: TextIO, store: IStore) -> int:
    if args.invites_command == "show":
        record = await store.get_invite(args.event_id)
        if record is None:
            raise ConfigError(f"no invite with event ID {args.event_id!r}")
        if args.json:
            out.write(json.dumps(_invite_json(record), indent=2, sort_keys=True) + "\n")
        else:
            for field in attrs.fields(InviteRecord):
                if not _is_shown(field):
                    continue
                value = getattr(record, field.name)
                if field.name == "event" or field.name == "invite_room_state":
                    value = json.dumps(value, sort_keys=True)
                out.write(f"{field.name}: {_printable(value)}\n")
        return 0
    before_ts = before_event_id = None
    if args.after is not None:
        # Keyset paging: the next page starts right after this invite in the list's
        # order, so invites received in the same millisecond are neither skipped nor
        # repeated (an offset would shift under invites arriving meanwhile).
        last = await store.get_invite(args.after)
        if last is None:
            raise ConfigError(f"no invite with event ID {args.after!r}")
        before_ts, before_event_id = last.received_ts, last.event_id
    records = await store.list_invites(
        invitee=args.user,
        room_id=args.room,
        status=args.status,
        limit=args.limit,
        before_ts=before_ts,
        before_event_id=before_event_id,
    )
    if args.json:
        out.write(json.dumps([_invite_json(r) for r in records], indent=2, sort_keys=True) + "\n")
        return 0
    out.write(
        f"{'received (UTC)':<19} {'status':<8} {'invitee':<30} {'sender':<30} {'room':<30} event\n"
    )
    for r in records:
        invitee, sender, room_id, event_id = (
            _printable(v) for v in (r.invitee, r.sender, r.room_id, r.event_id)
        )
        out.write(
            f"{_received(r.received_ts):<19} {r.status:<8} {invitee:<30} {sender:<30} "
            f"{room_id:<30} {event_id}\n"
        )
    if records and len(records) == args.limit:
        # A full page: there may be more. (With --json, the last element's event_id
        # is what --after takes.)
        last_id = records[-1].event_id
        if last_id.isprintable():
            out.write(f"-- next page: --after {shlex.quote(last_id)}\n")
        else:
            # Shown escaped above, it would not name the invite: say where to find it.
            out.write("-- next page: --after the last event ID, as --json gives it\n")
    return 0


async def _cmd_send_invite(args: argparse.Namespace, out: TextIO, reactor: Any, err: TextIO) -> int:
    """Send a test invite and print the event both servers signed: federation's ``curl -v``.

    ``args.federation_client`` (None from the command line) replaces the
    federation client, so that tests can talk to in-memory peers.
    """
    from .core.events import compute_event_id
    from .core.roomversions import KNOWN_ROOM_VERSIONS
    from .outbound import InviteError, InviteRefused, build_test_invite
    from .service import build_from_config

    config = _load(args)
    sender = _local_user(config, args.sender)
    room_version = KNOWN_ROOM_VERSIONS.get(args.room_version)
    if room_version is None:
        known = ", ".join(KNOWN_ROOM_VERSIONS)
        raise ConfigError(f"unknown room version {args.room_version!r} (known: {known})")
    config.ensure_data_dir()
    components = await build_from_config(config, reactor, client=args.federation_client)
    try:
        now_ms = int(reactor.seconds() * 1000)
        try:
            event, room_state = await build_test_invite(
                components.signer, room_version, sender, args.invitee, now_ms, room_id=args.room
            )
            signed = await components.send_invite(
                room_version, event, room_state, destination=args.destination
            )
        except InviteRefused as exc:
            errcode = exc.errcode or "(no errcode)"
            err.write(_printable(f"refused: {exc.status} {errcode}: {exc.message}") + "\n")
            return 1
        except InviteError as exc:
            err.write(_printable(exc) + "\n")
            return 1
    finally:
        await components.close()
    result = {
        "room_version": room_version.identifier,
        "room_id": signed["room_id"],
        "event_id": compute_event_id(room_version, signed),
        "event": signed,
    }
    out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


_STORE_COMMANDS = {"users": _cmd_users, "rules": _cmd_rules, "invites": _cmd_invites}


async def run_async(
    args: argparse.Namespace, out: TextIO, reactor: Any, err: TextIO | None = None
) -> int:
    """Run a command that needs the reactor (the database); used by ``main`` and tests."""
    err = err or sys.stderr
    if args.command == "migrate":
        return await _cmd_migrate(args, out, reactor)
    if args.command == "send-invite":
        return await _cmd_send_invite(args, out, reactor, err)
    config = _load(args)
    action = _STORE_COMMANDS[args.command](args, out, config)
    missing = _missing_sqlite_file(config.database)
    if missing is not None:
        sub_command = getattr(args, f"{args.command}_command")
        if sub_command != "add":
            # A mistyped --database or --data-dir (or the daemon's overrides forgotten):
            # an empty answer from a new database would say "nothing there" (and there
            # is nothing to remove).
            _check_data_dir(config)
            raise ConfigError(
                f"no database at {missing}; give the daemon's --database or --data-dir,"
                " or create it with 'federation-invite migrate'"
            )
        # Users and rules may be set up before the daemon's first start, as migrate may
        # create it; said once it is there, so that a mistyped path shows.
        config.ensure_data_dir()
    from .service import open_configured_store

    try:
        store = await open_configured_store(config, reactor)
    finally:
        if missing is not None and os.path.exists(missing):
            err.write(f"Created a new database at {missing}\n")
    try:
        code = await action(store)
    finally:
        await store.close()
    return code


def _missing_sqlite_file(database: str) -> str | None:
    """The file of an SQLite ``database`` that does not exist (opening it creates it), else
    None (it exists, or the database is PostgreSQL's or in memory)."""
    dialect = parse_database_uri(database)
    if not isinstance(dialect, SQLiteDialect) or dialect.path == ":memory:":
        return None
    return None if os.path.exists(dialect.path) else dialect.path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="federation-invite", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate-config", help="write a commented config and a key")
    generate.add_argument("--server-name", required=True)
    generate.add_argument("--data-dir", default="federation-invite-data")
    generate.add_argument("--listen", action="append", help="endpoint string, repeatable")
    generate.add_argument("-o", "--output", default="federation-invite.toml")
    generate.add_argument("--force", action="store_true", help="overwrite an existing file")
    generate.add_argument(
        "--tls-cert",
        action="store_true",
        help="also write a self-signed TLS certificate (local testing) and listen with TLS "
        "(with --listen: one of them must be a TLS endpoint naming the certificate (ssl:, or "
        "systemd: given privateKey/certKey))",
    )
    generate.set_defaults(run=_cmd_generate_config)

    check = commands.add_parser("check-config", help="validate a configuration file")
    _config_arg(check)
    check.set_defaults(run=_cmd_check_config)

    keys = commands.add_parser("keys", help="our signing keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    show = key_commands.add_parser("show", help="our key IDs, public keys and fingerprints")
    _config_arg(show)
    show.set_defaults(run=_cmd_keys_show)

    migrate = commands.add_parser("migrate", help="apply pending database schema migrations")
    _config_arg(migrate)
    migrate.set_defaults(run_async=True)

    users = commands.add_parser("users", help="our local users (who can be invited)")
    user_commands = users.add_subparsers(dest="users_command", required=True)
    for name, text in (("add", "add a local user"), ("remove", "remove a local user")):
        sub = user_commands.add_parser(name, help=text)
        sub.add_argument("user_id", help="e.g. @bob:example.org")
        _config_arg(sub)
    _config_arg(user_commands.add_parser("list", help="list local users"))
    users.set_defaults(run_async=True)

    rules = commands.add_parser("rules", help="a local user's invite rules")
    rule_commands = rules.add_subparsers(dest="rules_command", required=True)
    for name, text in (("add", "add an invite rule"), ("remove", "remove an invite rule")):
        sub = rule_commands.add_parser(name, help=text)
        sub.add_argument("user_id")
        target = sub.add_mutually_exclusive_group(required=True)
        target.add_argument("--user", help="glob over sender user IDs, e.g. '@spam*:*'")
        target.add_argument("--server", help="glob over sender server names, e.g. '*.evil.example'")
        sub.add_argument("--action", required=True, choices=["allow", "block", "ignore"])
        _config_arg(sub)
    listing = rule_commands.add_parser("list", help="list a user's invite rules")
    listing.add_argument("user_id")
    _config_arg(listing)
    rules.set_defaults(run_async=True)

    invites = commands.add_parser("invites", help="received invites")
    invite_commands = invites.add_subparsers(dest="invites_command", required=True)
    listing = invite_commands.add_parser("list", help="list invites, newest first")
    listing.add_argument("--user", help="only invites for this invitee")
    listing.add_argument("--room", help="only invites to this room")
    listing.add_argument("--status", choices=sorted(INVITE_STATUSES))
    listing.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    listing.add_argument(
        "--after",
        metavar="EVENT_ID",
        help="the next page: the invites listed after this one (the last of the previous page)",
    )
    listing.add_argument("--json", action="store_true")
    _config_arg(listing)
    show_invite = invite_commands.add_parser("show", help="one invite in full")
    show_invite.add_argument("event_id")
    show_invite.add_argument("--json", action="store_true")
    _config_arg(show_invite)
    invites.set_defaults(run_async=True)

    send = commands.add_parser(
        "send-invite", help="send a test invite to a server and check its co-signed answer"
    )
    send.add_argument("--room-version", default="10", help="room version (default: 10)")
    send.add_argument("--room", help="room ID (v1-11; default: a new random room; v12: derived)")
    send.add_argument("--sender", required=True, help="one of our user IDs, e.g. @alice:our.name")
    send.add_argument("--invitee", required=True, help="the remote user ID to invite")
    send.add_argument(
        "--destination",
        help="server name to connect to instead of the invitee's (its discovery and TLS);"
        " the invite is still addressed to the invitee's server, which must co-sign it",
    )
    _config_arg(send)
    send.set_defaults(run_async=True, federation_client=None)
    return parser


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run one command; problems are reported as one line on stderr with exit status 1."""
    out = _buffered(out or sys.stdout)
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "run_async", False):
            code = _react(args, out, err)
        else:
            code = args.run(args, out)
        out.flush()  # here, not at the interpreter's exit: a closed pipe is told below
    except BrokenPipeError:
        # The reader stopped early (``| head``): no error of ours. Quiet, as a Unix tool
        # ended by SIGPIPE, whose status (128 + 13) a shell then reports.
        _discard_output(out)
        return 141
    # ImportError: PostgreSQL support without the 'postgres' extra (store._dialect).
    except (ConfigError, SigningKeyError, StoreError, ValueError, OSError, ImportError) as exc:
        err.write(f"federation-invite: {exc}\n")
        return 1
    return code


def _buffered(out: TextIO) -> TextIO:
    """``out``, or, when it writes straight to its descriptor (PYTHONUNBUFFERED set: no
    buffer under the text layer), ``out`` through a buffer of its own, flushed at each
    line. The text layer ignores how much a write wrote, so a long write that a reader
    closing the pipe cut short passed for done (exit status 0, the rest lost); a buffer
    writes on after a short write, and then fails as a closed pipe must."""
    if not isinstance(getattr(out, "buffer", None), io.RawIOBase):
        return out
    try:
        descriptor = out.fileno()
    except (OSError, ValueError):
        return out
    return io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(descriptor, "w", closefd=False)),
        encoding=out.encoding,
        errors=out.errors,
        line_buffering=True,
    )


def _discard_output(out: TextIO) -> None:
    """Point ``out``'s descriptor at /dev/null, so that the interpreter's last flush of
    what is still buffered for a closed pipe fails no more (Python's documented idiom)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no descriptor (a StringIO): nothing is flushed at exit
        pass


def _log_errors_to(err: TextIO) -> None:
    """Print the process's critical log events on ``err``, as Twisted does until logging
    begins, except adbapi's "Rollback failed": when a command's database connection is
    lost its rollback fails too, and adbapi logs a traceback for it (two) before the
    command's own error, which is then reported in one line."""
    import warnings

    from twisted.logger import (
        FileLogObserver,
        FilteringLogObserver,
        ILogFilterPredicate,
        LogLevel,
        LogLevelFilterPredicate,
        PredicateResult,
        eventAsText,
        globalLogBeginner,
    )
    from zope.interface import provider

    @provider(ILogFilterPredicate)
    def not_a_rollback_failure(event: dict[str, Any]) -> PredicateResult:
        if event.get("why") == "Rollback failed" and event.get("isError"):
            return PredicateResult.no
        return PredicateResult.maybe

    printed = FileLogObserver(
        err, lambda event: eventAsText(event, includeTimestamp=False, includeSystem=False) + "\n"
    )
    showwarning = warnings.showwarning  # warnings printed as before, not logged
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                printed,
                [
                    not_a_rollback_failure,
                    LogLevelFilterPredicate(defaultLogLevel=LogLevel.critical),
                ],
            )
        ],
        discardBuffer=True,
        redirectStandardIO=False,
    )
    warnings.showwarning = showwarning


#: How long an interrupted command has to unwind (its request or query cancelled, its store
#: closed) before the process leaves without waiting for it: a query waiting on a lock or a
#: server that does not answer ends only with its own timeout (SQLite's busy timeout, libpq's
#: connect_timeout: 10 s), and a thread running it would hold the interpreter's exit.
INTERRUPT_GRACE_SECONDS = 2.0

#: The signals that interrupt a command: (message, exit status, 128 + the signal's number as
#: a shell reports a process it ended).
_INTERRUPTS = {"SIGINT": ("interrupted", 130), "SIGTERM": ("terminated", 143)}


def _react(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run an async command on the global reactor (the CLI's process owns it).

    SIGINT and SIGTERM cancel the command rather than stop the reactor under it (which
    left it suspended, its clean-up run by the interpreter's exit, for ever): it unwinds
    for at most ``INTERRUPT_GRACE_SECONDS``, and the command ends with one line and 130
    (SIGINT) or 143 (SIGTERM); if it has not ended by then, or a second signal comes, the
    process leaves at once (``os._exit``), its output flushed, its database transaction
    rolled back by the database.
    """
    import signal

    from twisted.internet import reactor as global_reactor
    from twisted.internet.defer import Deferred

    reactor: Any = global_reactor  # run(installSignalHandlers=...) and callFromThread
    _log_errors_to(err)
    outcome: list[Any] = []
    commands: list[Deferred[int]] = []
    interrupts: list[tuple[str, int]] = []

    def leave_now(code: int) -> None:
        for stream in (out, err):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    stopping: list[bool] = []

    def stop(_: object = None) -> None:
        if not stopping:  # the command's end or the grace's, whichever comes first
            stopping.append(True)
            reactor.stop()

    def interrupt(interruption: tuple[str, int]) -> None:
        if stopping or interrupts:
            return
        interrupts.append(interruption)
        reactor.callLater(INTERRUPT_GRACE_SECONDS, stop)
        if commands:
            commands[0].cancel()

    def on_signal(signum: int, frame: Any) -> None:
        interruption = _INTERRUPTS[signal.Signals(signum).name]
        if interrupts:  # a second signal: no more waiting
            err.write(f"federation-invite: {interrupts[0][0]}\n")
            leave_now(interrupts[0][1])
        reactor.callFromThread(interrupt, interruption)

    def run() -> None:
        d = Deferred.fromCoroutine(run_async(args, out, reactor, err))
        commands.append(d)
        d.addBoth(outcome.append).addBoth(stop)

    previous = {}
    for name in _INTERRUPTS:
        number = getattr(signal, name)
        handler = signal.getsignal(number)
        # As Twisted does: a SIGINT ignored by whoever started us (nohup, a background
        # job of a non-interactive shell) stays ignored.
        if handler is not signal.SIG_IGN:
            previous[number] = signal.signal(number, on_signal)
    reactor.callWhenRunning(run)
    try:
        # Twisted's own handlers would stop the reactor under the running command.
        reactor.run(installSignalHandlers=False)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if interrupts:
        message, code = interrupts[0]
        err.write(f"federation-invite: {message}\n")
        if not outcome:
            # Still waiting (a lock, a server): its threads would hold the exit.
            leave_now(code)
        return code
    result = outcome[0] if outcome else 1
    if isinstance(result, Failure):
        result.raiseException()
    return int(result)
