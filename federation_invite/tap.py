"""``twistd federation-invite``: options and ``makeService`` (the plugin file only points here)."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from typing import Any, NoReturn, cast

from twisted.application.service import IService
from twisted.python import usage

from .config import Config, ConfigError, load_config
from .logs import Logger

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

__all__ = ["Options", "makeService"]

log = Logger(namespace="federation_invite.tap")


class Options(usage.Options):
    """Command-line options; each overrides the same key of the config file."""

    synopsis = "[--config FILE] [options]"
    longdesc = (
        "Serve the Matrix federation invite endpoints. With no --config it runs on an embedded "
        "default: server name localhost:8448, a generated key and an SQLite database in "
        "./federation-invite-data, listening on 127.0.0.1:8448."
    )

    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["server-name", None, None, "Our server name (overrides server_name)."],
        ["signing-key", None, None, "Signing key file (overrides signing_key)."],
        ["database", None, None, "Database URI (overrides database)."],
        ["data-dir", None, None, "Data directory (overrides data_dir)."],
        [
            "metrics-listen",
            None,
            None,
            "Endpoint for the Prometheus /metrics listener (overrides metrics.listen; '' turns "
            "it off): each worker sharing a config file needs a port of its own.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Endpoint to listen on, repeatable (e.g. tcp:8448, ssl:8448:privateKey=key.pem)."""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        overrides: dict[str, Any] = {}
        for option, key in (
            ("server-name", "server_name"),
            ("signing-key", "signing_key"),
            ("database", "database"),
            ("data-dir", "data_dir"),
            ("metrics-listen", "metrics.listen"),
        ):
            if self[option] is not None:
                overrides[key] = self[option]
        if self["listen"]:
            overrides["listen"] = list(self["listen"])
        try:
            self["loaded"] = load_config(self["config"], overrides)
        except ConfigError as exc:
            # Not a UsageError: twistd would print its whole usage text on stdout, the
            # problem last, on stdout too. One line on stderr, exit status 1, as below.
            _refuse(exc)


def makeService(options: Options) -> IService:
    """Build the daemon's service tree from parsed options.

    A problem found here (the data directory, the signing key file, twistd's
    ``--uid``/``--gid``) ends the process with one line (naming the key) and exit
    status 1, as a bad value or an unknown key does when the options are
    parsed, instead of a traceback; so does one the start finds at once (a port
    in use: ``_StartErrorInOneLine``). While it runs, SIGHUP reopens twistd's log
    file (``reopen_log_file``), then reads each ``ssl:`` listener's certificate again
    (``FederationInviteService.reload_tls``), instead of ending the process. The
    process's soft limit of open files is raised to its hard limit
    (``raise_open_file_limit``): the daemon's process is its own, an embedder's is not.
    """
    from twisted.internet import reactor

    from .service import make_service

    _refuse_privilege_switch(options)
    _refuse_lost_json_logs(options)
    config: Config = options["loaded"]
    try:
        service = make_service(config, reactor, on_hangup=reopen_log_file)
    except ConfigError as exc:
        _refuse(exc)
    if not isinstance(sys.excepthook, _StartErrorInOneLine):
        sys.excepthook = _StartErrorInOneLine(sys.excepthook)
    raise_open_file_limit()
    return service


def raise_open_file_limit(resource_module: Any = None) -> None:
    """Raise the soft limit of open files (``RLIMIT_NOFILE``) to the hard limit, as Synapse
    does at start, and log the limit (info) once.

    Each outbound request in flight holds a socket (and inbound connections, idle pooled
    ones, the database's and log files hold theirs): the soft limit a systemd service gets
    by default, 1024 (``LimitNOFILE=1024:524288``), is soon reached by a bridge's burst
    of invites, which then fail as not sent (``EMFILE``). A system refusing (a hard limit
    of ``RLIM_INFINITY`` on macOS, say) leaves the limit as it was, with a warning.
    ``resource_module`` is for tests (the ``resource`` module by default; none on
    Windows: nothing is done).
    """
    module = resource if resource_module is None else resource_module
    if module is None:
        return
    soft, hard = module.getrlimit(module.RLIMIT_NOFILE)

    def shown(limit: int) -> str:
        return "unlimited" if limit == module.RLIM_INFINITY else str(limit)

    if soft == hard:
        log.info("Open file limit (RLIMIT_NOFILE): {limit}", limit=shown(soft))
        return
    try:
        module.setrlimit(module.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warn(
            "Open file limit (RLIMIT_NOFILE) left at {soft}: raising it to {hard} failed: {error}",
            soft=shown(soft),
            hard=shown(hard),
            error=exc,
        )
        return
    log.info(
        "Open file limit (RLIMIT_NOFILE) raised from {soft} to {hard}",
        soft=shown(soft),
        hard=shown(hard),
    )


def reopen_log_file() -> None:
    """SIGHUP under twistd or twist: reopen the log file (twistd's ``--logfile``, twist's
    ``--log-file``) at its path, as Synapse does, after an external rotation (logrotate's
    ``create``: the file moved away, a new one created); one line says so, or why not.

    Neither keeps a reference to it but its observer's (``FileLogObserver._outFile``), which
    is found among the global log publisher's observers (twist's wrapped in a
    ``FilteringLogObserver``). twistd's is a ``LogFile``; twist's a plain file opened by
    path, reopened by putting a descriptor of the path in place of the file's own
    (``os.dup2``), so that a thread writing meanwhile writes whole lines to one file or the
    other. Logging to standard output (``-n`` without ``--logfile``, twist's default), to
    syslog or through a ``--logger`` observer, there is none: one line says there is nothing
    to reopen. A ``LogFile`` is reopened under its own lock (the one its ``write`` and
    ``rotate`` hold: threads log too); either only once its path can be opened: else the
    lines go on to the file opened before.
    """
    from twisted.python.logfile import BaseLogFile

    outs = _observed_files()
    if not outs:
        log.info(
            "SIGHUP: no log file to reopen (logging to standard output, syslog or a --logger "
            "observer)"
        )
    for out in outs:
        if isinstance(out, BaseLogFile):
            _reopen_twistd_log_file(out)
        else:
            _reopen_plain_file(out)


def _observed_files() -> list[Any]:
    """The log files the global log publisher's observers write to: ``LogFile``s (twistd's)
    and regular files opened by path (twist's ``--log-file``), not standard output or error."""
    from twisted.logger import globalLogPublisher
    from twisted.python.logfile import BaseLogFile

    found: list[Any] = []
    for observer in getattr(globalLogPublisher, "_observers", ()):
        for _ in range(4):  # twist's FilteringLogObserver around its FileLogObserver
            out = getattr(observer, "_outFile", None)
            if out is not None:
                if (isinstance(out, BaseLogFile) or _plain_file_path(out) is not None) and all(
                    out is not known for known in found
                ):
                    found.append(out)
                break
            observer = getattr(observer, "_observer", None)
            if observer is None:
                break
    return found


def _plain_file_path(out: Any) -> str | None:
    """The path ``out`` was opened at, if it is a regular file opened by path (twist's
    ``open(FILE, "a")``), not standard output or error, nor a descriptor wrapped."""
    if any(out is std for std in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)):
        return None
    path = getattr(out, "name", None)
    if not isinstance(path, str) or not path:
        return None
    try:
        descriptor = out.fileno()
        mode = os.fstat(descriptor).st_mode
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation included
        return None
    if descriptor <= 2 or not stat.S_ISREG(mode):
        return None
    return path


def _reopen_twistd_log_file(logfile: Any) -> None:
    """Reopen twistd's ``LogFile`` at its path, if the path opens."""
    try:
        with open(logfile.path, "ab"):
            pass
    except OSError as exc:
        _not_reopened(logfile.path, exc)
        return
    lock = getattr(logfile, "_threadable_lock", None)
    if lock is None:
        logfile.reopen()
    else:
        with lock:
            logfile.reopen()
    log.info("SIGHUP: reopened the log file {path}", path=logfile.path)


def _reopen_plain_file(out: Any) -> None:
    """Reopen twist's ``--log-file`` (a file opened in append mode) at its path, if the
    path opens: a descriptor of the path replaces the file object's own."""
    path = cast(str, _plain_file_path(out))
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags, 0o666)
    except OSError as exc:
        _not_reopened(path, exc)
        return
    try:
        out.flush()  # what was written before goes to the file it was written to
        os.dup2(descriptor, out.fileno(), inheritable=False)
    finally:
        os.close(descriptor)
    log.info("SIGHUP: reopened the log file {path}", path=path)


def _not_reopened(path: str, exc: OSError) -> None:
    log.error(
        "SIGHUP: could not reopen the log file {path}: {reason}; still logging to the file "
        "opened before",
        path=path,
        reason=exc.strerror or str(exc),
    )


class _StartErrorInOneLine:
    """twistd's and twist's ``sys.excepthook``: a ``ConfigError`` that ends the process is
    printed as one line on stderr (twistd's log), not as a traceback.

    The service's start raises one for what it finds at once (a port in use, a
    TLS file that cannot be read), and twistd lets it end the process once it
    has told a daemon's launcher and removed its pidfile. Any other error goes
    to the hook this one replaced. It holds no error, and is installed once.
    """

    def __init__(self, previous: Callable[..., Any]) -> None:
        self._previous = previous

    def __call__(self, kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if isinstance(value, ConfigError):
            print(f"federation-invite could not start: {value}", file=sys.stderr)
        else:
            self._previous(kind, value, tb)


def _refuse_privilege_switch(options: Options) -> None:
    """Refuse twistd's ``--uid``/``--gid`` naming another user or group than our own.

    They cannot work: twistd switches after ``makeService``, which creates the
    data directory and the signing key as the user it starts as (root, for a
    switch), and before the service opens the database, as the other user.
    """
    twistd = getattr(options, "parent", None) or {}
    uid, gid = twistd.get("uid"), twistd.get("gid")
    if (uid is not None and uid != os.getuid()) or (gid is not None and gid != os.getgid()):
        _refuse(
            ConfigError(
                "--uid and --gid are not supported (the data directory and the signing key "
                "would be created as this user, the database opened as the other): run "
                "twistd as the user to serve as (ports below 1024: a systemd: "
                "socket-activated endpoint, or a proxy)"
            )
        )


def _refuse_lost_json_logs(options: Options) -> None:
    """Refuse twistd's ``--logger federation_invite.logs.json_observer`` where its lines
    would be lost: it writes to standard output, which a daemonized twistd (no ``-n``) has
    sent to /dev/null by the time anything is logged, and which twistd's ``--logger``
    puts in place of a ``--logfile`` (the file would stay empty)."""
    from .logs import json_observer

    twistd = getattr(options, "parent", None) or {}
    if twistd.get("logger") is not json_observer:
        return
    if not twistd.get("nodaemon") or twistd.get("logfile") not in (None, "", "-"):
        _refuse(
            ConfigError(
                "--logger federation_invite.logs.json_observer writes to standard output, "
                "which a daemon sends to /dev/null and which replaces --logfile: run twistd "
                "with -n and without --logfile (a supervisor such as systemd keeps standard "
                "output)"
            )
        )


def _refuse(error: ConfigError) -> NoReturn:
    """End the process: ``error`` on one line of stderr, prefixed with the command's name
    (Python prints a ``SystemExit``'s message there), exit status 1."""
    command = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "twistd"
    raise SystemExit(f"{command}: {error}") from None
