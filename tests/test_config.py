"""Tests for federation_invite.config: defaults, file loading, overrides, refusals."""

from __future__ import annotations

import os
import re
import stat
import tomllib

from signedjson.key import generate_signing_key
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.config import OPTIONS, Config, ConfigError, load_config, render_config
from federation_invite.metrics import metrics_available
from federation_invite.store import parse_database_uri
from federation_invite.store._dialect import SQLiteDialect
from federation_invite.web.keys import server_keys_document

from .support import hide_module, source_tree_file

VERIFY_KEY = "l8Hft5qXKn1vfHrg3p4+W8gELQVo8N13JkluMfmn2sQ"


def sqlite_path(uri: str) -> str:
    """The file an SQLite database URI names, as the store reads it."""
    dialect = parse_database_uri(uri)
    assert isinstance(dialect, SQLiteDialect)
    return dialect.path


class LoadConfigTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    def assertRefused(self, text: str, key: str) -> ConfigError:
        """Helper: loading ``text`` fails with a message that names ``key``."""
        error = self.assertRaises(ConfigError, load_config, self.write(text))
        self.assertIn(repr(key), str(error))
        return error

    def test_defaults(self) -> None:
        """With no file the embedded default runs on localhost with SQLite in the data dir."""
        config = load_config()
        self.assertEqual(config.server_name, "localhost:8448")
        self.assertEqual(config.listen, ("tcp:8448:interface=127.0.0.1",))
        data_dir = os.path.join(os.getcwd(), "federation-invite-data")
        self.assertEqual(config.data_dir, data_dir)
        self.assertEqual(
            sqlite_path(config.database), os.path.join(data_dir, "federation-invite.db")
        )
        self.assertEqual(config.signing_key_path, os.path.join(data_dir, "signing.key"))
        self.assertEqual(config.get("inbound.max_body_bytes"), 1048576)
        self.assertIsNone(config.path)

    def test_booleans_kept(self) -> None:
        """A boolean key gives back the value given: outbound.verify_tls is true by default
        (TLS certificates checked unless the file turns it off), and false only when set."""
        self.assertIs(load_config().get("outbound.verify_tls"), True)
        self.assertIs(load_config().get("inbound.strict_invite_room_state"), False)
        config = load_config(
            self.write(
                "[outbound]\nverify_tls = true\n[inbound]\nstrict_invite_room_state = true\n"
            )
        )
        self.assertIs(config.get("outbound.verify_tls"), True)
        self.assertIs(config.get("inbound.strict_invite_room_state"), True)
        config = Config({"outbound.verify_tls": False, "inbound.strict_invite_room_state": False})
        self.assertIs(config.get("outbound.verify_tls"), False)
        self.assertIs(config.get("inbound.strict_invite_room_state"), False)

    def test_file_values_and_sections(self) -> None:
        """Top-level keys and [section] keys are read from the TOML file."""
        path = self.write(
            'server_name = "example.org"\n'
            'database = "postgresql://postgres@127.0.0.1/test"\n'
            "[inbound]\nmax_body_bytes = 2048\nserver_deny = ['*.evil.example']\n"
        )
        config = load_config(path)
        self.assertEqual(config.server_name, "example.org")
        self.assertEqual(config.database, "postgresql://postgres@127.0.0.1/test")
        self.assertEqual(config.get("inbound.max_body_bytes"), 2048)
        self.assertEqual(config.get("inbound.server_deny"), ("*.evil.example",))
        self.assertEqual(config.path, path)

    def test_glob_brackets_are_literal(self) -> None:
        """Brackets in a glob list are literal, not a character class: an IPv6 server name,
        with or without a port, loads as written, and so does a lone bracket."""
        patterns = ["[2001:db8::1]", "[::1]:8448", "@*:[2001:db8::1]", "[2001:db8:*", "a]"]
        for key in ("inbound.server_allow", "inbound.server_deny", "inbound.user_deny"):
            config = load_config(None, {"server_name": "example.org", key: patterns})
            self.assertEqual(config.get(key), tuple(patterns))

    def test_overrides_win(self) -> None:
        """Command-line overrides replace the file's values."""
        path = self.write('server_name = "example.org"\n')
        config = load_config(path, {"server_name": "other.example", "listen": ["tcp:0"]})
        self.assertEqual(config.server_name, "other.example")
        self.assertEqual(config.listen, ("tcp:0",))

    def test_config_from_values_validated(self) -> None:
        """Config(values) validates and fills the defaults as load_config does (flat
        "section.key" names or nested tables), so an embedder's Config has every key."""
        config = Config({"server_name": "example.org", "inbound": {"max_body_bytes": 2048}})
        self.assertEqual(
            config.values,
            load_config(
                None, {"server_name": "example.org", "inbound.max_body_bytes": 2048}
            ).values,
        )
        self.assertEqual(config.data_dir, os.path.join(os.getcwd(), "federation-invite-data"))
        self.assertEqual(config.get("inbound.server_allow"), ("*",))
        self.assertIsNone(config.path)
        self.assertEqual(Config().values, load_config().values)
        error = self.assertRaises(ConfigError, Config, {"inbound.max_body": 1})
        self.assertIn("'inbound.max_body'", str(error))
        error = self.assertRaises(ConfigError, Config, {"server_name": "bad name"})
        self.assertIn("'server_name'", str(error))

    def test_key_given_flat_and_nested_refused(self) -> None:
        """A key given both flat ("inbound.user_deny") and nested ({"inbound": {"user_deny":
        ...}}) in one mapping is refused by name, whichever comes first: keeping either
        value would drop the other (a deny list) without a word."""
        for values in (
            {"inbound": {"user_deny": ["@spammer:*"]}, "inbound.user_deny": ["@troll:*"]},
            {"inbound.user_deny": ["@troll:*"], "inbound": {"user_deny": ["@spammer:*"]}},
            {"inbound.user_deny": [], "inbound": {"user_deny": []}},
        ):
            error = self.assertRaises(ConfigError, Config, values)
            self.assertEqual(
                str(error),
                "configuration key 'inbound.user_deny' is given twice (flat and nested): "
                "give it once",
            )
        error = self.assertRaises(
            ConfigError,
            load_config,
            None,
            {"keys": {"validity_period": 3600}, "keys.validity_period": 7200},
        )
        self.assertIn("'keys.validity_period' is given twice", str(error))

    def test_overrides_nested_replace_the_files_flat_keys(self) -> None:
        """load_config's overrides replace the file's values, nested or flat: only a key
        given twice in one mapping is refused."""
        path = self.write('[inbound]\nuser_deny = ["@a:*"]\n')
        config = load_config(path, {"inbound": {"user_deny": ["@b:*"]}})
        self.assertEqual(config.get("inbound.user_deny"), ("@b:*",))
        config = load_config(path, {"inbound.user_deny": ["@c:*"]})
        self.assertEqual(config.get("inbound.user_deny"), ("@c:*",))

    def test_unknown_key(self) -> None:
        """An unknown key, top-level or in a section, is refused by name."""
        self.assertRefused('sever_name = "x"\n', "sever_name")
        self.assertRefused("[inbound]\nmax_body = 1\n", "inbound.max_body")

    def test_bad_values_named(self) -> None:
        """Each kind of bad value is refused with a message naming its key."""
        cases = {
            'server_name = "not a server"\n': "server_name",
            "server_name = 5\n": "server_name",
            "listen = []\n": "listen",
            "listen = [1]\n": "listen",
            'database = "mysql://x"\n': "database",
            'well_known_server = "not a name"\n': "well_known_server",
            "[keys]\nvalidity_period = 5\n": "keys.validity_period",
            "[keys]\nvalidity_period = 3599\n": "keys.validity_period",
            "[keys]\nvalidity_period = true\n": "keys.validity_period",
            "[outbound]\nverify_tls = 'no'\n": "outbound.verify_tls",
            "[outbound]\nip_allowlist = ['localhost']\n": "outbound.ip_allowlist",
            "[outbound]\ntimeout = 0\n": "outbound.timeout",
            "[outbound]\ntimeout = nan\n": "outbound.timeout",
            "[inbound]\nrequest_timeout = inf\n": "inbound.request_timeout",
            "[ratelimit]\norigin_per_second = nan\n": "ratelimit.origin_per_second",
            "[ratelimit]\ninvitee_per_second = 5e-324\n": "ratelimit.invitee_per_second",
            "[inbound]\npolicy_cache_seconds = inf\n": "inbound.policy_cache_seconds",
            "[keys]\nvalidity_period = 9000000000000\n": "keys.validity_period",
            'database = "sqlite:///"\n': "database",
            'database = "postgresql://u:secret@h:notaport/db"\n': "database",
            "[inbound]\nserver_deny = ['']\n": "inbound.server_deny",
            "[inbound]\nuser_deny = [1]\n": "inbound.user_deny",
            "[inbound]\nlocal_users = 'ldap'\n": "inbound.local_users",
            "[ratelimit]\norigin_burst = 0\n": "ratelimit.origin_burst",
            "[keys]\nold_verify_keys = 'x'\n": "keys.old_verify_keys",
            "[keys]\nold_verify_keys = [{key_id = 'ed25519:a'}]\n": "keys.old_verify_keys",
            "[keys]\nnotaries = [{server_name = 'matrix.org', verify_keys = {}}]\n": "keys.notaries",
            "[keys]\nnotaries = 3\n": "keys.notaries",
        }
        for text, key in cases.items():
            self.assertRefused(text, key)

    def test_data_dir_and_signing_key_strings(self) -> None:
        """data_dir must be a non-empty string and signing_key a string (empty: the default
        in the data dir): anything else is refused naming the key, not crashed on at start."""
        for text, key in {
            'data_dir = ""\n': "data_dir",
            "data_dir = 5\n": "data_dir",
            "data_dir = ['a']\n": "data_dir",
            "signing_key = 5\n": "signing_key",
            "signing_key = false\n": "signing_key",
        }.items():
            error = self.assertRefused(text, key)
            self.assertIn("must be a non-empty string", str(error))
        config = load_config(self.write('signing_key = ""\n'))
        self.assertEqual(config.signing_key_path, os.path.join(config.data_dir, "signing.key"))

    def test_list_keys_refuse_a_plain_string(self) -> None:
        """A string where a list is expected (an easy slip: server_deny = "evil.example") is
        refused, not read as a list of its characters (globs that would deny nothing)."""
        for text, key in {
            'listen = "tcp:8448"\n': "listen",
            '[inbound]\nserver_deny = "evil.example"\n': "inbound.server_deny",
            '[inbound]\nuser_deny = "@spam:evil.example"\n': "inbound.user_deny",
            '[inbound]\nserver_allow = "*"\n': "inbound.server_allow",
            "[outbound]\nip_blocklist = '10.0.0.0/8'\n": "outbound.ip_blocklist",
            "[outbound]\nip_allowlist = '127.0.0.1'\n": "outbound.ip_allowlist",
        }.items():
            error = self.assertRefused(text, key)
            self.assertIn("must be a list of non-empty strings", str(error))

    def test_endpoint_strings_parsed_at_load(self) -> None:
        """A listen or metrics.listen value Twisted cannot parse as a server endpoint is
        refused at load with its key and value, not at start after the database opened."""
        for value, reason in (
            ("garbage", "Unknown endpoint type: 'garbage'"),
            ("tcp:notaport", "invalid literal for int()"),
            ("tcp:99999", "port must be from 0 to 65535"),
            ("tcp:8448:bogus=1", "unexpected keyword argument 'bogus'"),
            ("ssl:notaport:privateKey=k.pem", "invalid literal for int()"),
            ("ssl:8448:privateKey=k.pem:colour=blue", "unexpected keyword argument 'colour'"),
            ("ssl:8448:backlog=many", "invalid literal for int()"),
            ("unix:/run/fi.sock:mode=rw", "invalid literal for int()"),
            ("le:/etc/certs:tcp:443", "Unknown endpoint type: 'le'"),
        ):
            error = self.assertRaises(ConfigError, load_config, None, {"listen": [value]})
            self.assertIn(f"'listen': {value!r} is not a Twisted server endpoint", str(error))
            self.assertIn(reason, str(error))
            error = self.assertRaises(ConfigError, load_config, None, {"metrics.listen": value})
            self.assertIn(
                f"'metrics.listen': {value!r} is not a Twisted server endpoint", str(error)
            )
        error = self.assertRaises(
            ConfigError, load_config, None, {"listen": ["tcp:8448", "tcp:x\x1b[31m"]}
        )
        self.assertIn("'tcp:x\\x1b[31m'", str(error))

    def test_documented_endpoint_forms_accepted(self) -> None:
        """The endpoint forms the README shows load, an ssl: one whose files do not exist
        yet (nothing is read at load) and a systemd: one outside systemd included."""
        listen = [
            "tcp:8448",
            "tcp:8448:interface=127.0.0.1",
            "tcp:0:interface=127.0.0.1:backlog=10",
            "ssl:8448:privateKey=/nonexistent/key.pem:certKey=/nonexistent/cert.pem",
            "ssl:8448:interface=127.0.0.1:privateKey=C\\:/key.pem",
            "systemd:domain=INET:index=0",
            "unix:/run/federation-invite.sock:mode=660",
            "tcp6:8448:interface=\\:\\:1",
        ]
        config = load_config(None, {"listen": listen, "metrics.listen": "tcp:9100"})
        expected = list(listen)
        if not os.path.isabs("C:/key.pem"):  # on POSIX, a relative path: resolved at load
            from federation_invite.config import _endpoint_quote

            key = _endpoint_quote(os.path.join(os.getcwd(), "C:/key.pem"))
            expected[4] = f"ssl:8448:interface=127.0.0.1:privateKey={key}"
        self.assertEqual(config.listen, tuple(expected))
        self.assertEqual(config.get("metrics.listen"), "tcp:9100")

    def test_endpoint_port_bounds(self) -> None:
        """An endpoint's port is from 0 to 65535, both ends included (tcp: and ssl:, in
        listen and metrics.listen): 65536 is refused at load, not left for bind to fail."""
        for endpoint in ("tcp:0", "tcp:65535", "ssl:65535:privateKey=/k.pem"):
            self.assertEqual(Config({"listen": [endpoint]}).listen, (endpoint,))
        for endpoint in ("tcp:65536", "ssl:65536:privateKey=/k.pem", "tcp:-1"):
            for key, value in (("listen", [endpoint]), ("metrics.listen", endpoint)):
                error = self.assertRaises(ConfigError, Config, {key: value})
                self.assertIn(
                    f"{endpoint!r} is not a Twisted server endpoint: port must be from 0 to 65535",
                    str(error),
                )

    def test_old_keys_and_notaries(self) -> None:
        """Old verify keys and notaries are parsed and their keys checked."""
        path = self.write(
            "[keys]\n"
            f"old_verify_keys = [{{key_id = 'ed25519:old', key = '{VERIFY_KEY}', expired_ts = 5}}]\n"
            f"notaries = [{{server_name = 'matrix.org', verify_keys = {{'ed25519:auto' = '{VERIFY_KEY}'}}}}]\n"
        )
        config = load_config(path)
        (old,) = config.get("keys.old_verify_keys")
        self.assertEqual((old.key_id, old.key, old.expired_ts), ("ed25519:old", VERIFY_KEY, 5))
        (notary,) = config.get("keys.notaries")
        self.assertEqual(notary.server_name, "matrix.org")
        self.assertEqual(notary.verify_keys, (("ed25519:auto", VERIFY_KEY),))

    def test_old_keys_published_in_unpadded_standard_base64(self) -> None:
        """An old key written padded, URL-safe or with whitespace is kept and published in
        unpadded standard base64, the only form the spec allows (gomatrixserverlib refuses
        the whole key document otherwise)."""
        spellings = [
            VERIFY_KEY + "=",
            VERIFY_KEY.replace("+", "-").replace("/", "_"),
            VERIFY_KEY.replace("+", "-") + "=",
            VERIFY_KEY[:20] + " \n" + VERIFY_KEY[20:],
        ]
        for spelling in spellings:
            config = Config(
                {
                    "keys.old_verify_keys": [
                        {"key_id": "ed25519:old", "key": spelling, "expired_ts": 5}
                    ]
                }
            )
            (old,) = config.get("keys.old_verify_keys")
            self.assertEqual(old.key, VERIFY_KEY, spelling)
            document = server_keys_document(
                "example.org", [generate_signing_key("1")], [old], 1_000, 3_600_000
            )
            self.assertEqual(
                document["old_verify_keys"],
                {"ed25519:old": {"key": VERIFY_KEY, "expired_ts": 5}},
                spelling,
            )

    def test_old_key_ids_once(self) -> None:
        """An old key ID listed twice is refused: the key document could keep only one."""
        entry = f"{{key_id = 'ed25519:old', key = '{VERIFY_KEY}', expired_ts = 5}}"
        error = self.assertRefused(
            f"[keys]\nold_verify_keys = [{entry}, {entry}]\n", "keys.old_verify_keys"
        )
        self.assertIn("entry 1: key_id 'ed25519:old' is already entry 0", str(error))

    def test_old_key_with_the_signing_key_id_refused(self) -> None:
        """An old key with the ID of the key we sign with is refused once that key is known: our
        key document would list it as current and old, which Synapse reads as expired."""
        config = load_config(
            self.write(
                "[keys]\nold_verify_keys = ["
                f"{{key_id = 'ed25519:old', key = '{VERIFY_KEY}', expired_ts = 5}}, "
                f"{{key_id = 'ed25519:a_1', key = '{VERIFY_KEY}', expired_ts = 5}}]\n"
            )
        )
        config.check_signing_key_id("ed25519:b_2")
        error = self.assertRaises(ConfigError, config.check_signing_key_id, "ed25519:a_1")
        self.assertIn("'keys.old_verify_keys': entry 1 has key_id 'ed25519:a_1'", str(error))
        load_config().check_signing_key_id("ed25519:a_1")

    def test_old_key_expired_ts_checked(self) -> None:
        """An old key's expired_ts must be an integer from 0 to 2**53-1 (milliseconds, as
        canonical JSON can carry them): a string, a negative, a boolean, a float or 2**53 is
        refused naming the entry; 2**53-1 is kept."""

        def old_key(expired_ts: object) -> dict[str, object]:
            entry = {"key_id": "ed25519:old", "key": VERIFY_KEY, "expired_ts": expired_ts}
            return {"keys.old_verify_keys": [entry]}

        for bad in ("yesterday", -1, True, 1.5, 2**53):
            error = self.assertRaises(ConfigError, Config, old_key(bad))
            self.assertEqual(
                str(error),
                "configuration key 'keys.old_verify_keys': "
                "entry 0: expired_ts must be milliseconds since the epoch",
                bad,
            )
        (old,) = Config(old_key(2**53 - 1)).get("keys.old_verify_keys")
        self.assertEqual(old.expired_ts, 2**53 - 1)

    def test_notary_refusals(self) -> None:
        """A notary with no verify_keys, or with one that is not an ed25519 key, is refused
        naming the entry and the key ID."""
        for verify_keys, message in (
            ({}, "entry 1: verify_keys must map key IDs to keys"),
            ({"ed25519:a": "bad"}, "entry 1: key 'ed25519:a' is not a valid ed25519 key"),
        ):
            notaries = [
                {"server_name": "matrix.org", "verify_keys": {"ed25519:auto": VERIFY_KEY}},
                {"server_name": "n.example", "verify_keys": verify_keys},
            ]
            error = self.assertRaises(ConfigError, Config, {"keys.notaries": notaries})
            self.assertEqual(str(error), f"configuration key 'keys.notaries': {message}")

    def test_malformed_entries_refused_with_their_reason(self) -> None:
        """database, keys.old_verify_keys and keys.notaries values of the wrong shape are
        refused, each with its own reason, not crashed on nor accepted (a notary named by a
        non-name) nor refused for a later check's reason."""
        notary_key = {"ed25519:a": VERIFY_KEY}
        for key, value, message in (
            ("database", "mysql://x", "must be 'sqlite:///path.db' or 'postgresql://user@host/db'"),
            ("keys.old_verify_keys", "x", "must be a list of tables {key_id, key, expired_ts}"),
            ("keys.old_verify_keys", [5], "entry 0 must have exactly key_id, key and expired_ts"),
            (
                "keys.old_verify_keys",
                [{"key_id": "rsa:abc", "key": VERIFY_KEY, "expired_ts": 5}],
                "entry 0: key_id must look like 'ed25519:abc'",
            ),
            ("keys.notaries", 3, "must be a list of tables {server_name, verify_keys}"),
            ("keys.notaries", [5], "entry 0 must have exactly server_name and verify_keys"),
            (
                "keys.notaries",
                [{"server_name": "matrix.org"}],
                "entry 0 must have exactly server_name and verify_keys",
            ),
            (
                "keys.notaries",
                [{"server_name": "matrix.org", "verify_keys": "x"}],
                "entry 0: verify_keys must map key IDs to keys",
            ),
            (
                "keys.notaries",
                [{"server_name": 5, "verify_keys": notary_key}],
                "entry 0: server_name is not a server name",
            ),
            (
                "keys.notaries",
                [{"server_name": "not a name", "verify_keys": notary_key}],
                "entry 0: server_name is not a server name",
            ),
        ):
            error = self.assertRaises(ConfigError, Config, {key: value})
            self.assertEqual(str(error), f"configuration key {key!r}: {message}")

    def test_integer_bounds(self) -> None:
        """Integer keys take values up to 2**53-1 (what canonical JSON and the store carry)
        and no further; ratelimit.origin_sleep_after takes 0 (no request of a burst served
        at once: each is slowed)."""
        config = Config({"inbound.max_body_bytes": 2**53 - 1, "ratelimit.origin_sleep_after": 0})
        self.assertEqual(config.get("inbound.max_body_bytes"), 2**53 - 1)
        self.assertEqual(config.get("ratelimit.origin_sleep_after"), 0)
        for key, value, minimum in (
            ("inbound.max_body_bytes", 2**53, 1024),
            ("ratelimit.origin_sleep_after", -1, 0),
        ):
            error = self.assertRaises(ConfigError, Config, {key: value})
            self.assertEqual(
                str(error),
                f"configuration key {key!r}: must be an integer from {minimum} to {2**53 - 1}",
            )

    def test_numbers_parsed_and_bounded(self) -> None:
        """Number keys take an integer or a float from 0.001 to 1e12, or from 0 where zero
        means off (inbound.policy_cache_seconds, inbound.shutdown_grace_period), both ends
        included, and give it back as a float; a boolean, a string or a value past either
        end is refused with the range, not crashed on. The rate limits' integer keys
        refuse 0 but ratelimit.origin_sleep_ms ("0: never slowed")."""
        given = {
            "outbound.timeout": 5,
            "ratelimit.invitee_per_second": 0.001,
            "inbound.request_timeout": 1e12,
            "inbound.policy_cache_seconds": 0,
            "inbound.shutdown_grace_period": 1e12,
            "ratelimit.origin_sleep_ms": 0,
        }
        config = Config(given)
        for key, value in given.items():
            kind = int if key == "ratelimit.origin_sleep_ms" else float
            self.assertEqual((key, config.get(key), type(config.get(key))), (key, value, kind))
        above_zero = "must be a number from 0.001 to 1e+12"
        at_least_zero = "must be a number from 0 to 1e+12"
        for key, value, message in (
            ("outbound.timeout", True, above_zero),
            ("outbound.timeout", "5", above_zero),
            ("outbound.timeout", 1.0000001e12, above_zero),
            ("outbound.timeout", 0.000999, above_zero),
            ("ratelimit.origin_per_second", -1, above_zero),
            ("inbound.policy_cache_seconds", False, at_least_zero),
            ("inbound.policy_cache_seconds", "5", at_least_zero),
            ("inbound.policy_cache_seconds", -0.001, at_least_zero),
            ("inbound.shutdown_grace_period", -1, at_least_zero),
            ("inbound.shutdown_grace_period", 1.0000001e12, at_least_zero),
            ("ratelimit.origin_concurrent", 0, f"must be an integer from 1 to {2**53 - 1}"),
            ("ratelimit.invitee_burst", 0, f"must be an integer from 1 to {2**53 - 1}"),
            ("ratelimit.origin_sleep_ms", -1, f"must be an integer from 0 to {2**53 - 1}"),
        ):
            error = self.assertRaises(ConfigError, Config, {key: value})
            self.assertEqual(str(error), f"configuration key {key!r}: {message}", value)

    def test_database_pool_size(self) -> None:
        """database_pool_size: 5 by default, an integer from 1 to 100."""
        self.assertEqual(Config({}).get("database_pool_size"), 5)
        self.assertEqual(Config({"database_pool_size": 2}).get("database_pool_size"), 2)
        for value in (0, 101, "5", 2.0, True):
            error = self.assertRaises(ConfigError, Config, {"database_pool_size": value})
            self.assertEqual(
                str(error),
                "configuration key 'database_pool_size': must be an integer from 1 to 100",
            )

    def test_destination_concurrent(self) -> None:
        """outbound.destination_concurrent: 8 by default (as ratelimit.origin_concurrent, what
        our own inbound side serves at once from one origin), an integer from 1 to 10,000."""
        self.assertEqual(Config({}).get("outbound.destination_concurrent"), 8)
        config = Config({"outbound.destination_concurrent": 3})
        self.assertEqual(config.get("outbound.destination_concurrent"), 3)
        for value in (0, 10_001, "8", 8.0, True):
            error = self.assertRaises(
                ConfigError, Config, {"outbound.destination_concurrent": value}
            )
            self.assertEqual(
                str(error),
                "configuration key 'outbound.destination_concurrent': must be an integer from 1"
                " to 10000",
            )

    def test_documented_ranges(self) -> None:
        """The ranges the reference gives (each key's doc) are those enforced: each end
        accepted, one past it refused in one line giving the range (inbound.max_body_bytes
        at least 1024, keys.validity_period from an hour to ten years)."""
        docs = {option.key: option.doc for option in OPTIONS}
        for key, low, high, documented in (
            ("database_pool_size", 1, 100, "from 1 to 100"),
            ("outbound.destination_concurrent", 1, 10_000, "from 1 to 10000"),
            ("inbound.max_body_bytes", 1024, 2**53 - 1, "at least 1024"),
            ("keys.validity_period", 3600, 315_360_000, "from 3600 to 315360000"),
        ):
            self.assertIn(documented, docs[key])
            for value in (low, high):
                self.assertEqual(Config({key: value}).get(key), value)
            for value in (low - 1, high + 1):
                error = self.assertRaises(ConfigError, Config, {key: value})
                self.assertEqual(
                    str(error),
                    f"configuration key {key!r}: must be an integer from {low} to {high}",
                )

    def test_network_with_host_bits_accepted(self) -> None:
        """An IP range written with host bits set ('127.0.0.1/8') is accepted as written, as
        the client reads it (its network, 127.0.0.0/8), not refused."""
        for key in ("outbound.ip_allowlist", "outbound.ip_blocklist"):
            config = Config({key: ["127.0.0.1/8", "2001:db8::1/32"]})
            self.assertEqual(config.get(key), ("127.0.0.1/8", "2001:db8::1/32"))

    def test_metrics_listen_without_the_extra_refused(self) -> None:
        """Without prometheus-client (the 'metrics' extra), metrics.listen is refused at load
        in one line naming the extra; with no metrics.listen nothing needs it."""
        hide_module(self, "prometheus_client")
        self.assertIs(metrics_available(), False)
        error = self.assertRaises(ConfigError, Config, {"metrics.listen": "tcp:9100"})
        self.assertEqual(
            str(error),
            "configuration key 'metrics.listen': needs the 'metrics' extra: "
            "pip install 'federation-invite[metrics]'",
        )
        self.assertIsNone(Config().get("metrics.listen"))

    def test_database_errors_do_not_quote_passwords(self) -> None:
        """A refused database URI is named without echoing its password."""
        error = self.assertRefused('database = "postgresql://u:s3cr#etpw@h:5432/db"\n', "database")
        self.assertNotIn("s3cr", str(error))
        self.assertNotIn("etpw", str(error))

    def test_database_refusal_quotes_no_part_of_the_uri(self) -> None:
        """A database URI the store cannot use is refused in words of our own, quoting none
        of it: the store's message quotes the URI with only its userinfo password masked (here
        a fragment refused, and the password in the query shown), which check-config would
        print and twistd log."""
        error = self.assertRaises(
            ConfigError, Config, {"database": "postgres://u:hunter2@h/db?password%3Dhunter2#f"}
        )
        self.assertNotIn("hunter2", str(error))
        self.assertEqual(
            str(error),
            "configuration key 'database': is not a usable database URI "
            "(e.g. 'sqlite:///path/to.db', 'postgresql://user@host:5432/dbname')",
        )

    def test_database_password_with_unencoded_at_refused(self) -> None:
        """A password with an unencoded '@' (libpq would connect to the host "etpw@h") is
        refused at load, without echoing it."""
        error = self.assertRefused('database = "postgresql://u:s3cr@etpw@h:5432/db"\n', "database")
        self.assertNotIn("s3cr", str(error))
        self.assertNotIn("etpw", str(error))

    def test_postgres_database_without_the_extra_refused(self) -> None:
        """Without psycopg2 (the 'postgres' extra), a PostgreSQL database is refused at load in
        one line naming the extra, as metrics.listen is without its extra; SQLite is not."""
        hide_module(self, "psycopg2")
        for uri in ("postgresql://postgres@127.0.0.1/db", "postgres:///db"):
            error = self.assertRaises(ConfigError, load_config, self.write(f'database = "{uri}"\n'))
            self.assertEqual(
                str(error),
                "configuration key 'database': needs the 'postgres' extra: "
                "pip install 'federation-invite[postgres]'",
            )
        error = self.assertRaises(ConfigError, load_config, None, {"database": "postgres:///db"})
        self.assertIn("needs the 'postgres' extra", str(error))
        self.assertEqual(
            load_config(self.write('database = "sqlite:///:memory:"\n')).database,
            "sqlite:///:memory:",
        )

    def test_bad_old_key_material(self) -> None:
        """An old key that is not a 32-byte base64 ed25519 key is refused."""
        error = self.assertRefused(
            "[keys]\nold_verify_keys = [{key_id = 'ed25519:old', key = 'abc', expired_ts = 5}]\n",
            "keys.old_verify_keys",
        )
        self.assertIn("entry 0", str(error))

    def test_unreadable_and_invalid_toml(self) -> None:
        """A missing file and a file that is not TOML are refused with the path."""
        missing = self.mktemp()
        self.assertIn(missing, str(self.assertRaises(ConfigError, load_config, missing)))
        path = self.write("server_name = \n")
        self.assertIn("not valid TOML", str(self.assertRaises(ConfigError, load_config, path)))

    def test_config_file_not_utf8(self) -> None:
        """A file that is not UTF-8 (saved as Latin-1) is refused with its path and where the
        first byte that is not UTF-8 is (it was a UnicodeDecodeError: a traceback under
        twistd, a line naming no file from check-config)."""
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(b'# caf\xc3\xa9\nserver_name = "caf\xe9.example"\n')
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(
            str(error),
            f"config file {path} is not UTF-8 (TOML must be): byte 0xe9 at offset 26 (line 2)",
        )
        # Lines are counted from the file's first byte: a newline there ends line 1.
        with open(path, "wb") as handle:
            handle.write(b"\n\xe9 = 1\n")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(
            str(error),
            f"config file {path} is not UTF-8 (TOML must be): byte 0xe9 at offset 1 (line 2)",
        )


class PathTests(SynchronousTestCase):
    """Paths are resolved once, at load: twistd changes directory (--rundir) after it."""

    def chdir(self, path: str) -> None:
        """Helper: make ``path`` (created if missing) the working directory for this test."""
        os.makedirs(path, exist_ok=True)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(path)

    def test_relative_paths_stay_where_loaded(self) -> None:
        """Relative data_dir, signing_key and SQLite paths name the loading directory after a chdir."""
        start, elsewhere = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        self.chdir(start)
        config = load_config(
            None,
            {"data_dir": "data", "signing_key": "keys/s.key", "database": "sqlite:///db/x%20y.db"},
        )
        default = load_config(None, {"data_dir": "data"})
        self.chdir(elsewhere)
        self.assertEqual(config.data_dir, os.path.join(start, "data"))
        self.assertEqual(config.signing_key_path, os.path.join(start, "keys", "s.key"))
        self.assertEqual(sqlite_path(config.database), os.path.join(start, "db", "x y.db"))
        self.assertEqual(default.signing_key_path, os.path.join(start, "data", "signing.key"))
        self.assertEqual(
            sqlite_path(default.database), os.path.join(start, "data", "federation-invite.db")
        )
        default.ensure_data_dir()
        self.assertTrue(os.path.isdir(os.path.join(start, "data")))
        self.assertEqual(os.listdir(elsewhere), [])

    def test_relative_endpoint_files_stay_where_loaded(self) -> None:
        """Relative files in listen and metrics.listen endpoints (ssl:'s privateKey, certKey,
        extraCertChain, dhParameters, its default server.pem; a systemd: endpoint's TLS
        arguments; a unix: socket) name the loading directory after a chdir, ':' and '=' in
        the directory escaped as Twisted's endpoint strings escape them; absolute paths and
        other endpoints are kept as written."""
        from twisted.internet import endpoints

        start = os.path.join(os.path.abspath(self.mktemp()), "a:b=c")
        self.chdir(start)
        config = load_config(
            None,
            {
                "listen": [
                    "ssl:8448:privateKey=k.pem:certKey=tls/c.pem:extraCertChain=ch.pem"
                    ":dhParameters=dh.pem:interface=127.0.0.1",
                    "ssl:8449:k.pem:c.pem",
                    "ssl:port=8450",
                    "systemd:domain=INET:index=0:privateKey=k.pem:certKey=c.pem",
                    "systemd:domain=INET:index=1",
                    "unix:fi.sock:mode=660",
                    "unix:address=fi2.sock",
                    "tcp:8451:interface=127.0.0.1",
                    "ssl:8452:privateKey=/etc/fi/k.pem",
                    "unix:/run/f\\i.sock",  # absolute: kept, its needless escape too
                ],
                "metrics.listen": "unix:metrics.sock",
            },
        )
        self.chdir(os.path.abspath(self.mktemp()))

        def parsed(description: str) -> tuple[list[str], dict[str, str]]:
            args, keywords = endpoints._parse(description)
            return list(args), keywords

        def at(name: str) -> str:
            return os.path.join(start, name)

        self.assertEqual(
            [parsed(description) for description in config.listen],
            [
                (
                    ["ssl", "8448"],
                    {
                        "privateKey": at("k.pem"),
                        "certKey": at("tls/c.pem"),
                        "extraCertChain": at("ch.pem"),
                        "dhParameters": at("dh.pem"),
                        "interface": "127.0.0.1",
                    },
                ),
                (["ssl", "8449", at("k.pem"), at("c.pem")], {}),
                (["ssl"], {"port": "8450", "privateKey": at("server.pem")}),
                (
                    ["systemd"],
                    {
                        "domain": "INET",
                        "index": "0",
                        "privateKey": at("k.pem"),
                        "certKey": at("c.pem"),
                    },
                ),
                (["systemd"], {"domain": "INET", "index": "1"}),
                (["unix", at("fi.sock")], {"mode": "660"}),
                (["unix"], {"address": at("fi2.sock")}),
                (["tcp", "8451"], {"interface": "127.0.0.1"}),
                (["ssl", "8452"], {"privateKey": "/etc/fi/k.pem"}),
                (["unix", "/run/fi.sock"], {}),
            ],
        )
        self.assertEqual(config.listen[4], "systemd:domain=INET:index=1")  # untouched
        self.assertEqual(config.listen[7], "tcp:8451:interface=127.0.0.1")
        self.assertEqual(config.listen[8], "ssl:8452:privateKey=/etc/fi/k.pem")
        self.assertEqual(config.listen[9], "unix:/run/f\\i.sock")
        self.assertEqual(parsed(config.get("metrics.listen")), (["unix", at("metrics.sock")], {}))

    def test_relative_path_without_a_working_directory_refused(self) -> None:
        """A relative path when the working directory has been deleted (os.getcwd fails) is
        refused naming its key, not an OSError traceback."""
        gone = os.path.abspath(self.mktemp())
        self.chdir(gone)
        os.rmdir(gone)
        error = self.assertRaises(ConfigError, Config, {"data_dir": "rel"})
        self.assertEqual(
            str(error),
            "configuration key 'data_dir': relative path 'rel' needs a working directory "
            "(No such file or directory)",
        )
        # An absolute path needs no working directory: it is kept, not refused.
        self.assertEqual(Config({"data_dir": "/srv/fi"}).data_dir, "/srv/fi")

    def test_data_dir_created_0700_whatever_the_umask(self) -> None:
        """ensure_data_dir creates every missing directory of data_dir with mode 0700, under
        umask 0 too (os.makedirs left the intermediate ones 0777); existing ones keep theirs."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "srv"))
        os.chmod(os.path.join(base, "srv"), 0o751)
        config = load_config(None, {"data_dir": os.path.join(base, "srv", "fi", "data")})
        old_umask = os.umask(0)
        try:
            config.ensure_data_dir()
            config.ensure_data_dir()  # again: nothing changes
        finally:
            os.umask(old_umask)
        modes = [
            stat.S_IMODE(os.stat(os.path.join(base, *parts)).st_mode)
            for parts in (("srv",), ("srv", "fi"), ("srv", "fi", "data"))
        ]
        self.assertEqual(modes, [0o751, 0o700, 0o700])

    def test_absolute_memory_and_postgres_databases_kept(self) -> None:
        """Database URIs that do not name a relative file are kept exactly as written."""
        for uri in (
            "sqlite:///:memory:",
            "sqlite:////srv/fi%20data/x.db",
            "sqlite:////srv/fi%2Ddata/x.db",  # "-" needs no quoting: kept, not re-encoded
            "postgresql://user@host/db",
            "postgresql://user@/db?host=/var/run/postgresql",
        ):
            self.assertEqual(load_config(None, {"database": uri}).database, uri)

    def test_default_database_escapes_data_dir(self) -> None:
        """The default SQLite URI names the file in data_dir whatever URI syntax its name holds."""
        base = os.path.abspath(self.mktemp())
        for name in (
            "fi%20data",
            "fi?test",
            "fi#1",
            "fi data",
            "100%",
            "fi;x=1&y",
            "d\u00e9j\u00e0",
        ):
            data_dir = os.path.join(base, name)
            config = load_config(None, {"data_dir": data_dir})
            self.assertEqual(
                sqlite_path(config.database), os.path.join(data_dir, "federation-invite.db"), name
            )

    def test_data_dir_no_uri_can_name_refused(self) -> None:
        """A data_dir the default database URI cannot name (a NUL) is refused by key, at load."""
        error = self.assertRaises(ConfigError, load_config, None, {"data_dir": "/srv/a\x00b"})
        self.assertIn("'data_dir'", str(error))


class RenderConfigTests(SynchronousTestCase):
    def test_rendered_file_loads_and_documents_everything(self) -> None:
        """The generated file is valid TOML, loads cleanly and mentions every key, each
        with its doc as a comment line."""
        text = render_config({"server_name": "example.org", "listen": ["tcp:8448"]})
        tomllib.loads(text)
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        config = load_config(path)
        self.assertEqual(config.server_name, "example.org")
        self.assertEqual(config.listen, ("tcp:8448",))
        for option in OPTIONS:
            self.assertIn(option.key.rpartition(".")[2] + " = ", text)
            self.assertIn(f"\n# {option.doc}\n", text)

    def load_text(self, text: str) -> Config:
        """Helper: ``load_config`` of a file holding ``text``."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return load_config(path)

    def test_uncommented_defaults_round_trip(self) -> None:
        """Uncommenting every default at once, or any one alone, gives the default config
        (the IP blocklist is written out whole, not as a placeholder)."""
        lines = render_config().splitlines()
        defaults = [i for i, line in enumerate(lines) if re.match(r"# [a-z_]+ = ", line)]
        self.assertEqual(len(defaults), len(OPTIONS))
        every = [line[2:] if i in defaults else line for i, line in enumerate(lines)]
        self.assertEqual(self.load_text("\n".join(every)).values, load_config().values)
        for i in defaults:
            alone = [line[2:] if j == i else line for j, line in enumerate(lines)]
            self.assertEqual(
                self.load_text("\n".join(alone)).values, load_config().values, lines[i]
            )

    def test_control_characters_round_trip(self) -> None:
        """Strings holding control characters (U+0000-U+001F, U+007F), quotes and
        backslashes are written as TOML basic strings that load back unchanged."""
        data_dir = '/srv/fi\b\t\n\f\r\x01\x1b[31m\x1f\x7f"q"\\d\u00e9\u2028'
        listen = ["tcp:8448:interface=127.0.0.1", "unix:/run/a\x02\x7fb.sock"]
        text = render_config({"data_dir": data_dir, "listen": listen})
        config = self.load_text(text)
        self.assertEqual((config.data_dir, config.listen), (data_dir, tuple(listen)))
        self.assertNotRegex(text, "[\x00-\x08\x0b-\x1f\x7f]")
        # Only control characters are escaped: a space is written as it is.
        self.assertIn('data_dir = "/srv/fi data"', render_config({"data_dir": "/srv/fi data"}))


def readme_config_rows() -> list[tuple[str, str, str]]:
    """The README's configuration reference: ``(key, default, meaning)`` per row, in order."""
    with open(source_tree_file("README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    table = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_.]+)` \| `(.*?)` \| (.*) \|$", table, re.MULTILINE)


#: README defaults that summarise a value too long for the table (generate-config
#: writes the whole of it).
README_SUMMARISED_DEFAULTS = {
    "outbound.ip_blocklist": "(loopback, private, link-local, CGNAT, multicast, documentation, ...)"
}


class ReadmeTests(SynchronousTestCase):
    def test_every_key_documented_in_readme(self) -> None:
        """The README's configuration reference names every key (and no removed one), in the
        order generate-config writes them."""
        documented = [key for key, _, _ in readme_config_rows()]
        self.assertEqual(documented, [option.key for option in OPTIONS])

    def test_readme_rows_match_options(self) -> None:
        """Each README row's default and meaning are those generate-config writes (OPTIONS:
        the TOML text of the default, the doc word for word; a README code span stands for
        the doc's single quotes, as a '*' outside one would be Markdown emphasis)."""
        from federation_invite.config import _toml_value

        rows = {key: (default, doc) for key, default, doc in readme_config_rows()}
        differ = []
        for option in OPTIONS:
            default, doc = rows[option.key]
            expected = README_SUMMARISED_DEFAULTS.get(option.key, _toml_value(option))
            if default != expected:
                differ.append(f"{option.key} default: README {default!r}, OPTIONS {expected!r}")
            if re.sub(r"`([^`]*)`", r"'\1'", doc) != option.doc:
                differ.append(f"{option.key} meaning: README {doc!r}, OPTIONS {option.doc!r}")
        if differ:
            self.fail("\n".join(differ))
