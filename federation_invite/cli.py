"""``federation-invite``: the operator's command line.

Sub-commands grow with the services; each one is a small function over the
same configuration the daemon reads.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from unpaddedbase64 import encode_base64

from .config import ConfigError, load_config, render_config
from .core.keys import encode_verify_key, key_id_of, verify_key_of
from .signingkey import SigningKeyError, load_or_create_signing_key, read_signing_keys

__all__ = ["main"]


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="TOML configuration file (default: built-in)")


def _cmd_generate_config(args: argparse.Namespace, out: TextIO) -> int:
    settings = {"server_name": args.server_name, "data_dir": args.data_dir}
    if args.listen:
        settings["listen"] = args.listen
    # Validate what we are about to write with the same checks the daemon applies.
    config = load_config(None, settings)
    if os.path.exists(args.output) and not args.force:
        raise ConfigError(f"{args.output} exists; use --force to overwrite it")
    with open(args.output, "w", encoding="utf-8") as handle:
        handle.write(render_config(settings))
    key, created = load_or_create_signing_key(config.signing_key_path)
    out.write(f"Wrote {args.output}\n")
    state = "Generated" if created else "Kept existing"
    out.write(f"{state} signing key {key_id_of(key)} at {config.signing_key_path}\n")
    return 0


def _cmd_check_config(args: argparse.Namespace, out: TextIO) -> int:
    config = load_config(args.config)
    out.write(f"OK: {config.path or 'built-in defaults'} (server name {config.server_name})\n")
    return 0


def _cmd_keys_show(args: argparse.Namespace, out: TextIO) -> int:
    config = load_config(args.config)
    for key in read_signing_keys(config.signing_key_path):
        verify_key = verify_key_of(key)
        fingerprint = encode_base64(hashlib.sha256(verify_key.encode()).digest())
        out.write(
            f"{key_id_of(key)} {encode_verify_key(verify_key)} (sha256 fingerprint {fingerprint})\n"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="federation-invite", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate-config", help="write a commented config and a key")
    generate.add_argument("--server-name", required=True)
    generate.add_argument("--data-dir", default="federation-invite-data")
    generate.add_argument("--listen", action="append", help="endpoint string, repeatable")
    generate.add_argument("-o", "--output", default="federation-invite.toml")
    generate.add_argument("--force", action="store_true", help="overwrite an existing file")
    generate.set_defaults(run=_cmd_generate_config)

    check = commands.add_parser("check-config", help="validate a configuration file")
    _config_arg(check)
    check.set_defaults(run=_cmd_check_config)

    keys = commands.add_parser("keys", help="our signing keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    show = key_commands.add_parser("show", help="our key IDs, public keys and fingerprints")
    _config_arg(show)
    show.set_defaults(run=_cmd_keys_show)
    return parser


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run one command; problems are reported as one line on stderr with exit status 1."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args, out)
    except (ConfigError, SigningKeyError) as exc:
        err.write(f"federation-invite: {exc}\n")
        return 1
    return code
