"""The daemon's configuration: a TOML file, command-line overrides, validated at start.

Every key is declared once in ``OPTIONS`` with its default, its check and its
documentation; the same table validates files, produces the commented file that
``federation-invite generate-config`` writes, and the README's reference. Unknown
keys and bad values are refused with a message naming the key.
"""

from __future__ import annotations

import inspect
import ipaddress
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, unquote

import attrs

from .client.iprange import DEFAULT_IP_BLOCKLIST
from .core.ids import is_valid_server_name
from .core.keys import decode_verify_key, encode_verify_key, is_valid_key_id
from .keyring import Notary, OldKey

__all__ = [
    "DEFAULT_IP_BLOCKLIST",
    "OPTIONS",
    "Config",
    "ConfigError",
    "Notary",
    "OldKey",
    "Option",
    "load_config",
    "render_config",
]


#: Bounds for numeric settings: finite, and small or large enough that the
#: arithmetic done with them (timers, token buckets) stays meaningful.
_MIN_POSITIVE = 0.001
_MAX_NUMBER = 1e12


class ConfigError(ValueError):
    """A configuration problem, naming the offending key."""


# -- value checkers: each takes the raw TOML value and returns the parsed one or
# raises ValueError with a short reason (the key is added by the caller).


def _string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _optional_string(value: object) -> str | None:
    if value == "":
        return None
    return _string(value)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _int_at_least(minimum: int, maximum: int = 2**53 - 1) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise ValueError(f"must be an integer from {minimum} to {maximum}")
        return value

    return check


def _number_above_zero(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not _MIN_POSITIVE <= value <= _MAX_NUMBER
    ):
        raise ValueError(f"must be a number from {_MIN_POSITIVE} to {_MAX_NUMBER:.0e}")
    return float(value)


def _number_at_least_zero(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= _MAX_NUMBER
    ):
        raise ValueError(f"must be a number from 0 to {_MAX_NUMBER:.0e}")
    return float(value)


def _server_name(value: object) -> str:
    if not isinstance(value, str) or not is_valid_server_name(value):
        raise ValueError("must be a Matrix server name (host, IPv4, [IPv6], optional :port)")
    return value


def _optional_delegation(value: object) -> str | None:
    text = _optional_string(value)
    if text is not None and not is_valid_server_name(text):
        raise ValueError("must be a server name to delegate to, e.g. 'matrix.example.org:443'")
    return text


def _server_endpoint(description: str) -> str:
    """``description``, once Twisted's endpoint string parser accepts it; nothing is opened.

    ``tcp:`` and ``unix:`` are parsed whole. An ``ssl:`` string is checked for
    its syntax only (keywords, port and backlog): Twisted's parser would read
    the key and certificate files, which may not exist yet where the
    configuration is checked. Plugin types (``systemd:``, ``tcp6:``...) must
    exist; their own parsers may need the running environment (systemd's
    inherited sockets), so their arguments are checked when the daemon listens.
    """
    from twisted.internet import endpoints

    try:
        args, keywords = endpoints._parse(description)
        kind, positional = args[0], args[1:]
        if kind == "ssl":
            inspect.signature(endpoints._parseSSL).bind(None, *positional, **keywords)
            port = int(positional[0] if positional else keywords["port"])
            int(keywords.get("backlog", 50))
        else:
            parsed = endpoints._parseServer(description, None)
            port = parsed[1][0] if kind == "tcp" else 0
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"{description!r} is not a Twisted server endpoint: {exc}") from None
    if not 0 <= port <= 65535:
        raise ValueError(
            f"{description!r} is not a Twisted server endpoint: port must be from 0 to 65535"
        )
    return description


def ssl_endpoint_files(description: str) -> tuple[str, str] | None:
    """The ``(privateKey, certKey)`` files a TLS endpoint string names, as Twisted reads
    them (``certKey`` defaults to ``privateKey``, ``privateKey`` to ``server.pem``; either may
    be given positionally): an ``ssl:`` endpoint, or a ``systemd:`` one given ``ssl:``'s
    TLS arguments (the daemon serves TLS on its socket, reading them alike); None for any
    other endpoint. ``description`` must be valid (``listen`` has checked it).
    """
    from twisted.internet import endpoints

    args, keywords = endpoints._parse(description)
    if args[0] == "systemd":
        given = {key: keywords[key] for key in _SYSTEMD_TLS_ARGUMENTS if key in keywords}
        if not given:
            return None
        # As the daemon reads them (service._server_endpoint): a port to parse, unused.
        args, keywords = ["ssl", "0"], given
    elif args[0] != "ssl":
        return None
    bound = inspect.signature(endpoints._parseSSL).bind(None, *args[1:], **keywords)
    bound.apply_defaults()
    private_key = bound.arguments["privateKey"]
    cert_key = bound.arguments["certKey"]
    return private_key, private_key if cert_key is None else cert_key


def _metrics_listen(value: object) -> str | None:
    text = _optional_string(value)
    if text is not None:
        _server_endpoint(text)
        from .metrics import metrics_available

        if not metrics_available():
            raise ValueError("needs the 'metrics' extra: pip install 'federation-invite[metrics]'")
    return text


def _string_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("must be a list of non-empty strings")
    return tuple(value)


def _listen_list(value: object) -> tuple[str, ...]:
    items = _string_list(value)
    if not items:
        raise ValueError("must name at least one endpoint, e.g. 'tcp:8448'")
    for item in items:
        _server_endpoint(item)
    return items


def _glob_list(value: object) -> tuple[str, ...]:
    # Only '*' and '?' are wildcards (core.globs), so any non-empty string is a pattern:
    # brackets are literal ('[2001:db8::1]' is an IPv6 server name, '[2001:db8:*' a prefix).
    return _string_list(value)


def _network_list(value: object) -> tuple[str, ...]:
    items = _string_list(value)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network (e.g. '10.0.0.0/8')") from None
    return items


def _database(value: object) -> str | None:
    text = _optional_string(value)
    if text is None:
        return None
    if not text.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ValueError("must be 'sqlite:///path.db' or 'postgresql://user@host/db'")
    from .store import parse_database_uri

    try:
        parse_database_uri(text)
    except ValueError:
        # The driver-level message may quote parts of a password: say less.
        raise ValueError(
            "is not a usable database URI (e.g. 'sqlite:///path/to.db', "
            "'postgresql://user@host:5432/dbname')"
        ) from None
    if not text.startswith("sqlite:///"):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise ValueError(
                "needs the 'postgres' extra: pip install 'federation-invite[postgres]'"
            ) from None
    return text


def _local_users(value: object) -> str:
    if value not in ("database", "any"):
        raise ValueError("must be 'database' or 'any'")
    assert isinstance(value, str)
    return value


def _old_keys(value: object) -> tuple[OldKey, ...]:
    if not isinstance(value, list):
        raise ValueError("must be a list of tables {key_id, key, expired_ts}")
    keys: list[OldKey] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"key_id", "key", "expired_ts"}:
            raise ValueError(f"entry {index} must have exactly key_id, key and expired_ts")
        key_id, key, expired_ts = item["key_id"], item["key"], item["expired_ts"]
        if not is_valid_key_id(key_id):
            raise ValueError(f"entry {index}: key_id must look like 'ed25519:abc'")
        for earlier, old in enumerate(keys):
            if old.key_id == key_id:
                # The key document can list a key ID once: one entry would be lost.
                raise ValueError(f"entry {index}: key_id {key_id!r} is already entry {earlier}")
        try:
            # Kept as we publish it: unpadded standard base64 (appendices,
            # "Unpadded Base64"). The decoder also takes padding, the URL-safe
            # alphabet and some whitespace, which gomatrixserverlib (Dendrite)
            # refuses, failing to read our whole key document.
            key = encode_verify_key(decode_verify_key(key_id, key))
        except (ValueError, TypeError):
            raise ValueError(f"entry {index}: key is not an unpadded base64 ed25519 key") from None
        if (
            isinstance(expired_ts, bool)
            or not isinstance(expired_ts, int)
            or not 0 <= expired_ts <= 2**53 - 1
        ):
            raise ValueError(f"entry {index}: expired_ts must be milliseconds since the epoch")
        keys.append(OldKey(key_id=key_id, key=key, expired_ts=expired_ts))
    return tuple(keys)


def _notaries(value: object) -> tuple[Notary, ...]:
    if not isinstance(value, list):
        raise ValueError("must be a list of tables {server_name, verify_keys}")
    notaries = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"server_name", "verify_keys"}:
            raise ValueError(f"entry {index} must have exactly server_name and verify_keys")
        name, verify_keys = item["server_name"], item["verify_keys"]
        if not isinstance(name, str) or not is_valid_server_name(name):
            raise ValueError(f"entry {index}: server_name is not a server name")
        if not isinstance(verify_keys, dict) or not verify_keys:
            raise ValueError(f"entry {index}: verify_keys must map key IDs to keys")
        for key_id, key in verify_keys.items():
            try:
                decode_verify_key(key_id, key)
            except (ValueError, TypeError):
                raise ValueError(
                    f"entry {index}: key {key_id!r} is not a valid ed25519 key"
                ) from None
        notaries.append(Notary(server_name=name, verify_keys=tuple(sorted(verify_keys.items()))))
    return tuple(notaries)


@attrs.frozen
class Option:
    """One configuration key: where it lives, its default, its check and its meaning."""

    key: str
    default: Any
    check: Callable[[Any], Any]
    doc: str
    #: The TOML text of the default in the generated file (when repr is not TOML).
    example: str | None = None


OPTIONS: tuple[Option, ...] = (
    Option(
        "server_name",
        "localhost:8448",
        _server_name,
        "Our Matrix server name: the part after the colon in our users' IDs.",
    ),
    Option(
        "data_dir",
        "federation-invite-data",
        _string,
        "Directory for the generated signing key and the SQLite database, created with mode "
        "0700 (and any missing parent) if missing; a relative path is "
        "relative to the working directory at start (twistd's --rundir does not change it).",
    ),
    Option(
        "listen",
        ["tcp:8448:interface=127.0.0.1"],
        _listen_list,
        "Twisted endpoint strings to serve federation on, e.g. 'tcp:8448', "
        "'ssl:8448:privateKey=key.pem:certKey=cert.pem', 'systemd:domain=INET:index=0' (with "
        "ssl:'s privateKey, certKey, extraCertChain, dhParameters and sslmethod, a systemd: "
        "socket serves TLS). "
        "Parsed when the configuration is loaded (check-config too); an ssl: string's files "
        "are read, and a plugin type's (systemd:) arguments checked, only at start. Relative "
        "files (privateKey, its default server.pem, certKey, extraCertChain, dhParameters; a "
        "unix: socket) are relative to the working directory at start, as data_dir is; a "
        "unix: socket whose absolute path is over the 107 bytes a socket address holds (103 "
        "on macOS and BSD) is bound relative to the working directory at listen (the start "
        "directory, or twistd's --rundir if it is above it), or if not under it fails to "
        "start naming the limit.",
    ),
    Option(
        "signing_key",
        "",
        _optional_string,
        "Signing key file in Synapse's format ('ed25519 <version> <seed>'); "
        "empty: <data_dir>/signing.key, created with mode 0600 if missing.",
        '""',
    ),
    Option(
        "database",
        "",
        _database,
        "Database URI: 'sqlite:///path.db', 'postgresql://user@host/db', or over a Unix "
        "socket 'postgresql://user@/db?host=/var/run/postgresql' (PostgreSQL needs the "
        "'postgres' extra); empty: sqlite:///<data_dir>/federation-invite.db. A relative "
        "SQLite path is relative to the working directory at start, as data_dir is. "
        "PostgreSQL: a connection "
        "attempt gives up after 10 s unless the URI ('?connect_timeout=N', 0: wait for ever) "
        "or PGCONNECT_TIMEOUT sets another limit; a statement waits at most 10 s for a lock "
        "(lock_timeout) and runs at most 30 s (statement_timeout) unless the server's "
        "configuration, the database's or role's settings, the URI's options or PGOPTIONS set "
        "them (schema migrations are exempt); TCP keepalives (after 10 s idle, 3 probes 5 s "
        "apart) and tcp_user_timeout (30 s) notice a server gone silent on an open connection, "
        "unless the URI sets them. The database should be federation-invite's own, or on "
        "PostgreSQL a schema of its own named by the URI ('?options=-csearch_path%3D<schema>'): "
        "one holding another's table, index or view under one of its table names is refused "
        "at start.",
        '""',
    ),
    Option(
        "database_pool_size",
        5,
        _int_at_least(1, 100),
        "PostgreSQL: the most connections the daemon opens (each worker), as many "
        "operations running at once, from 1 to 100; fewer, if the server refuses more, cost "
        "parallelism, not invites. Budget this per worker, plus one per CLI command while it "
        "runs. SQLite: unused (one connection).",
    ),
    Option(
        "well_known_server",
        "",
        _optional_delegation,
        "Serve /.well-known/matrix/server delegating federation to this 'host[:port]' "
        "(server-server-api, 'Resolving server names'); empty: not served.",
        '""',
    ),
    Option(
        "metrics.listen",
        "",
        _metrics_listen,
        "Endpoint string for a Prometheus /metrics listener, e.g. 'tcp:9100:interface=127.0.0.1' "
        "(needs the 'metrics' extra; parsed at load, its relative files resolved, as listen's "
        "are); empty: off.",
        '""',
    ),
    Option(
        "keys.validity_period",
        86400,
        # At least an hour: servers "should avoid returning responses that
        # expire in less than an hour" (server-server-api, keys_server.yaml).
        _int_at_least(3600, 10 * 365 * 86400),
        "Seconds our published keys are valid for (valid_until_ts = now + this), from 3600 to "
        "315360000 (an hour to ten years).",
    ),
    Option(
        "keys.old_verify_keys",
        [],
        _old_keys,
        "Keys we no longer sign with, published as old_verify_keys: "
        "[{key_id = 'ed25519:old', key = '<base64>', expired_ts = <ms>}]; each key ID once, "
        "never that of the key we sign with (checked by check-config and at start). They also "
        "verify events we signed with them up to expired_ts (its own millisecond included), "
        "never requests.",
    ),
    Option(
        "keys.notaries",
        [],
        _notaries,
        "Trusted key servers for POST /_matrix/key/v2/query: "
        "[{server_name = 'matrix.org', verify_keys = {'ed25519:auto' = '<base64>'}}].",
    ),
    Option(
        "outbound.verify_tls",
        True,
        _bool,
        "Verify peers' TLS certificates: the chain against the platform's trust store (TLS 1.2 "
        "or later), then the certificate against the name discovery settled on (a DNS SAN, a "
        "wildcard standing for exactly one label; an IP literal needs an IP address SAN). A "
        "certificate without SAN, or with one SAN entry that cannot be parsed (such as a DNS "
        "SAN '10.0.0.1', '*.org' or '*.*.example.org'), is refused for every name. Off, any "
        "certificate is accepted (SNI is still sent); turn off only for test deployments "
        "(logged loudly).",
    ),
    Option(
        "outbound.ip_blocklist",
        list(DEFAULT_IP_BLOCKLIST),
        _network_list,
        "IP ranges never connected to, checked on every resolved address.",
    ),
    Option(
        "outbound.ip_allowlist",
        [],
        _network_list,
        "IP ranges allowed even inside the blocklist (e.g. '127.0.0.1/32' for tests).",
    ),
    Option(
        "outbound.timeout",
        60.0,
        _number_above_zero,
        "Seconds before an outbound request is abandoned.",
    ),
    Option(
        "outbound.destination_concurrent",
        8,
        _int_at_least(1, 10_000),
        "Requests in flight at once to one server (each holds a connection), from 1 to 10000; "
        "more wait their turn, in order, within outbound.timeout (one still waiting then fails "
        "as not sent, without backing the server off). Key requests (key fetches, notary "
        "queries) have as many turns again of their own, so that none waits behind a burst "
        "of invites.",
    ),
    Option(
        "inbound.max_body_bytes",
        1048576,
        _int_at_least(1024),
        "Largest request body accepted, at least 1024; larger gets 413 M_TOO_LARGE.",
    ),
    Option(
        "inbound.server_allow",
        ["*"],
        _glob_list,
        "Origin servers allowed to send invites (globs); others get 403 M_FORBIDDEN.",
    ),
    Option(
        "inbound.server_deny",
        [],
        _glob_list,
        "Origin or sender servers refused (globs), checked after the allow list.",
    ),
    Option("inbound.user_deny", [], _glob_list, "Sender user IDs refused (globs)."),
    Option(
        "inbound.strict_invite_room_state",
        False,
        _bool,
        "Validate every invite_room_state entry kept as a full PDU (the spec's SHOULD for v12; "
        "full entries past the create event and 50 others are dropped, on the v1 endpoint "
        "refused); "
        "off accepts stripped state (older Synapse releases, Dendrite) with a logged warning.",
    ),
    Option(
        "inbound.local_users",
        "database",
        _local_users,
        "Who our users are: 'database' (managed with 'federation-invite users') or "
        "'any' (every user ID on our server name, for bridges and bots).",
    ),
    Option(
        "inbound.request_timeout",
        30.0,
        _number_above_zero,
        "Seconds a peer has to send a whole request (request line, headers and body) from its "
        "first byte; slower requests (slowloris) get 408 M_UNKNOWN and the connection is closed.",
    ),
    Option(
        "inbound.idle_timeout",
        60.0,
        _number_above_zero,
        "Seconds a connection may stay open with no request in progress and nothing received.",
    ),
    Option(
        "inbound.shutdown_grace_period",
        10.0,
        _number_at_least_zero,
        "Seconds a stopping daemon (SIGTERM) waits for the requests in progress to be answered, "
        "after it stops accepting connections and closes idle ones; requests not answered in "
        "full then (unanswered, or their answer not all sent) are abandoned (logged) before the "
        "database is closed. Also the longest a stop waits for a start still opening the "
        "database.",
    ),
    Option(
        "inbound.policy_cache_seconds",
        5.0,
        _number_at_least_zero,
        "Seconds an invitee's local-user status and invite rules are cached in memory "
        "(read again in the background while in use); CLI changes take effect within this "
        "time. 0: ask the database every time. At most 100,000 invitees are held "
        "(a few hundred bytes each); past that the cache is emptied and filled again.",
    ),
    Option(
        "ratelimit.origin_per_second",
        10.0,
        _number_above_zero,
        "Sustained invite requests per second allowed from one origin server.",
    ),
    Option(
        "ratelimit.origin_burst",
        50,
        _int_at_least(1),
        "Requests one origin may send in a burst before 429 M_LIMIT_EXCEEDED.",
    ),
    Option(
        "ratelimit.origin_concurrent",
        8,
        _int_at_least(1),
        "Requests from one origin processed at once; more get 429.",
    ),
    Option(
        "ratelimit.origin_sleep_after",
        25,
        _int_at_least(0),
        "Requests of one origin's burst served at once; the rest of the burst is slowed "
        "(each delayed by origin_sleep_ms) before 429 M_LIMIT_EXCEEDED.",
    ),
    Option(
        "ratelimit.origin_sleep_ms",
        500,
        _int_at_least(0),
        "Milliseconds each slowed request waits before it is processed; 0: never slowed.",
    ),
    Option(
        "ratelimit.invitee_per_second",
        0.05,
        _number_above_zero,
        "Sustained invites per second one local user may receive.",
    ),
    Option(
        "ratelimit.invitee_burst",
        10,
        _int_at_least(1),
        "Invites one local user may receive in a burst.",
    ),
)

_BY_KEY = {option.key: option for option in OPTIONS}


def _sqlite_uri(path: str) -> str:
    """The ``sqlite:///`` URI of the database file ``path``, percent-encoded.

    The store's URI parser unquotes the path: unencoded, a ``%20`` in a
    directory name would name another directory, and a ``?`` or ``#`` would be
    refused as a query or fragment.
    """
    return "sqlite:///" + quote(path, safe="/")


@attrs.frozen(init=False)
class Config:
    """A validated configuration: ``get("inbound.max_body_bytes")`` and typed shortcuts.

    ``Config(values)`` validates ``values`` (keys as in the file: flat
    ``"inbound.max_body_bytes"`` or nested ``{"inbound": {...}}`` tables) over
    the defaults, as ``load_config`` does for a file and its overrides; it
    raises ``ConfigError`` naming the first unknown key or bad value. Its
    paths (``data_dir``, ``signing_key``, an SQLite database) are made
    absolute: a later change of directory moves none of them.
    """

    #: Every key, checked and parsed.
    values: Mapping[str, Any]
    #: Where the file came from (None: built-in defaults only).
    path: str | None = None

    def __init__(self, values: Mapping[str, Any] | None = None, path: str | None = None) -> None:
        self.__attrs_init__(_validated(_flatten(values or {})), path)

    def get(self, key: str) -> Any:
        return self.values[key]

    @property
    def server_name(self) -> str:
        return str(self.values["server_name"])

    @property
    def data_dir(self) -> str:
        return str(self.values["data_dir"])

    @property
    def signing_key_path(self) -> str:
        path = self.values["signing_key"]
        return str(path) if path else os.path.join(self.data_dir, "signing.key")

    @property
    def database(self) -> str:
        uri = self.values["database"]
        if uri:
            return str(uri)
        return _sqlite_uri(os.path.join(self.data_dir, "federation-invite.db"))

    @property
    def listen(self) -> tuple[str, ...]:
        return tuple(self.values["listen"])

    def check_signing_key_id(self, key_id: str) -> None:
        """Refuse a ``keys.old_verify_keys`` entry with ``key_id``, the key we sign with.

        Our key document would list that ID both as current and as old, and
        Synapse, reading old keys last, would take our current key as expired.
        Checked once the signing key is read (it may not exist when the
        configuration is loaded); raises ``ConfigError``.
        """
        for index, old in enumerate(self.values["keys.old_verify_keys"]):
            if old.key_id == key_id:
                raise ConfigError(
                    f"configuration key 'keys.old_verify_keys': entry {index} has key_id "
                    f"{key_id!r}, the ID of the key we sign with; a key is either current or "
                    "old: remove the entry, or sign with a key of another ID"
                )

    def ensure_data_dir(self) -> None:
        """Create the data directory, and each missing parent, with mode 0700 (whatever
        the umask) if it is missing; existing directories keep their mode. One that
        cannot be created (a file in its place, no permission) is a ``ConfigError``
        naming the key, the original error as its cause."""
        from .signingkey import make_private_directories

        try:
            make_private_directories(self.data_dir)
        except OSError as exc:
            if isinstance(exc, FileExistsError):
                reason = f"{exc.filename or self.data_dir} exists and is not a directory"
            else:
                reason = f"cannot create directory {self.data_dir}: {exc.strerror or exc}"
            raise ConfigError(f"configuration key 'data_dir': {reason}") from exc


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``table``'s keys as ``section.key``: nested tables and flat names alike.

    A key given both ways (``{"inbound": {"user_deny": ...}, "inbound.user_deny": ...}``,
    which only the Python API can write) is a ``ConfigError``: keeping either value
    would drop the other without a word.
    """
    flat: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and key not in _BY_KEY:
            items = list(_flatten(value, key + ".").items())
        else:
            items = [(key, value)]
        for full, item in items:
            if full in flat:
                raise ConfigError(
                    f"configuration key {full!r} is given twice (flat and nested): give it once"
                )
            flat[full] = item
    return flat


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read, merge and validate: defaults, then the TOML file, then ``overrides``.

    Raises ``ConfigError`` naming the first unknown key or bad value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            raw = _flatten(tomllib.loads(data.decode("utf-8")))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise ConfigError(
                f"config file {path} is not UTF-8 (TOML must be): byte 0x{data[exc.start]:02x} "
                f"at offset {exc.start} (line {line})"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    raw.update(_flatten(overrides or {}))  # replacing the file's values, nested or flat
    return Config(raw, path)


def _validated(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Every key of ``OPTIONS``: ``raw``'s value checked, or the default; paths absolute."""
    values: dict[str, Any] = {}
    for key in raw:
        if key not in _BY_KEY:
            raise ConfigError(f"unknown configuration key {key!r}")
    for option in OPTIONS:
        value = raw.get(option.key, option.default)
        try:
            values[option.key] = option.check(value)
        except ValueError as exc:
            raise ConfigError(f"configuration key {option.key!r}: {exc}") from None
    _resolve_paths(values)
    return values


def _resolve_paths(values: dict[str, Any]) -> None:
    """Make ``data_dir``, ``signing_key``, an SQLite database path and the files the
    ``listen`` and ``metrics.listen`` endpoints name absolute.

    Relative paths mean the working directory now, as they always did; but the
    daemon loads its key here and opens its database, TLS files and Unix sockets
    after twistd has changed to its ``--rundir``, so they are resolved once, here,
    for every later use.
    """
    values["data_dir"] = _absolute("data_dir", values["data_dir"])
    values["listen"] = tuple(_absolute_endpoint("listen", item) for item in values["listen"])
    if values["metrics.listen"] is not None:
        values["metrics.listen"] = _absolute_endpoint("metrics.listen", values["metrics.listen"])
    if values["signing_key"] is not None:
        values["signing_key"] = _absolute("signing_key", values["signing_key"])
    database = values["database"]
    if database is None:  # the default, in data_dir: check now that a URI can name it
        _sqlite_uri_of("data_dir", os.path.join(values["data_dir"], "federation-invite.db"))
    elif database.startswith("sqlite:///"):
        # _database accepted it: "sqlite:///" and the quoted path, as _parse_sqlite reads it.
        path = unquote(database.removeprefix("sqlite:///"))
        if path != ":memory:" and not os.path.isabs(path):
            values["database"] = _sqlite_uri_of("database", _absolute("database", path))


def _absolute(key: str, path: str) -> str:
    """``path`` from the working directory; joined, not normalised, as the store does
    (the kernel follows a symlink before a "..")."""
    if os.path.isabs(path):
        return path
    try:
        return os.path.join(os.getcwd(), path)
    except OSError as exc:
        raise ConfigError(
            f"configuration key {key!r}: relative path {path!r} needs a working directory "
            f"({exc.strerror})"
        ) from None


#: The file arguments of ``ssl:`` (Twisted's ``_parseSSL``), which a ``systemd:`` endpoint
#: takes as keywords to serve TLS (``service.SYSTEMD_TLS_KEYWORDS``).
_TLS_FILE_ARGUMENTS = ("privateKey", "certKey", "extraCertChain", "dhParameters")
_SYSTEMD_TLS_ARGUMENTS = (*_TLS_FILE_ARGUMENTS, "sslmethod")


def _absolute_endpoint(key: str, description: str) -> str:
    """``description`` (a valid server endpoint string) with the relative files it names made
    absolute from the working directory: an ``ssl:`` endpoint's ``privateKey`` (its default
    ``server.pem`` too), ``certKey``, ``extraCertChain`` and ``dhParameters``, the same of a
    ``systemd:`` endpoint given TLS arguments, a ``unix:`` endpoint's ``address`` (not an
    abstract one). Written as Twisted's parser reads them (``\\``, ``\\:`` and ``\\=``
    escaped); a string with none is returned as it is."""
    from twisted.internet import endpoints

    args, keywords = endpoints._parse(description)
    kind, positional = args[0], list(args[1:])
    if kind == "ssl":
        parameters = list(inspect.signature(endpoints._parseSSL).parameters)[1:]
        names: tuple[str, ...] = _TLS_FILE_ARGUMENTS
    elif kind == "unix":
        parameters = list(inspect.signature(endpoints._parseUNIX).parameters)[1:]
        names = ("address",)
    elif kind == "systemd" and any(name in keywords for name in _SYSTEMD_TLS_ARGUMENTS):
        parameters, names = [], _TLS_FILE_ARGUMENTS  # systemd's positionals are its own
    else:
        return description
    changed = False
    if names is _TLS_FILE_ARGUMENTS and "privateKey" not in keywords:
        if "privateKey" not in parameters[: len(positional)]:
            keywords["privateKey"] = "server.pem"  # Twisted's default, relative too
    for name in names:
        index = parameters.index(name) if name in parameters else len(positional)
        if index < len(positional):
            path = positional[index]
        elif name in keywords:
            path = keywords[name]
        else:
            continue
        if not path or os.path.isabs(path) or path.startswith("\0"):
            continue  # "": Twisted's error at start; a NUL: an abstract Unix socket
        changed = True
        if index < len(positional):
            positional[index] = _absolute(key, path)
        else:
            keywords[name] = _absolute(key, path)
    if not changed:
        return description
    return ":".join(
        [kind]
        + [_endpoint_quote(value) for value in positional]
        + [f"{_endpoint_quote(name)}={_endpoint_quote(value)}" for name, value in keywords.items()]
    )


def _endpoint_quote(value: str) -> str:
    """``value`` as one argument of a Twisted endpoint string (``\\``, ``:``, ``=`` escaped)."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _sqlite_uri_of(key: str, path: str) -> str:
    """``_sqlite_uri(path)``, checked to be a URI the store accepts (a NUL, or a name
    that is not UTF-8, cannot be written in one)."""
    from .store import parse_database_uri

    try:
        uri = _sqlite_uri(path)
        parse_database_uri(uri)
    except ValueError:
        raise ConfigError(
            f"configuration key {key!r}: {path!r} cannot be written as an SQLite URI"
        ) from None
    return uri


#: TOML basic-string escapes (TOML 1.0, "String"): the short form where there is one,
#: ``\uXXXX`` for every other control character (U+0000-U+001F, U+007F).
_TOML_ESCAPES = str.maketrans(
    {chr(code): f"\\u{code:04X}" for code in (*range(0x20), 0x7F)}
    | {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}
)


def _toml_string(value: str) -> str:
    """``value`` as a TOML basic string: quote, backslash and control characters escaped."""
    return '"' + value.translate(_TOML_ESCAPES) + '"'


def _toml_value(option: Option, override: Any = None) -> str:
    value = option.default if override is None else override
    if override is None and option.example is not None:
        return option.example
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(Option("", v, str, ""), v) for v in value) + "]"
    return repr(value)


def render_config(settings: Mapping[str, Any] | None = None) -> str:
    """The commented TOML file that documents every key, with ``settings`` filled in.

    Keys not in ``settings`` are written commented out with their default, so
    the file both works as is and documents everything.
    """
    settings = settings or {}
    lines = ["# federation-invite configuration. Every key is shown with its default.", ""]
    section = ""
    for option in OPTIONS:
        table, _, name = option.key.rpartition(".")
        if table != section:
            lines += ["", f"[{table}]"]
            section = table
        lines.append(f"# {option.doc}")
        if option.key in settings:
            lines.append(f"{name} = {_toml_value(option, settings[option.key])}")
        else:
            lines.append(f"# {name} = {_toml_value(option)}")
    return "\n".join(lines) + "\n"
