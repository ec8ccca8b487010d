"""Command line: `fileproxy [serve|dev] --upstream URL [flags]` (Config fields) and `fileproxy sign URL`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from fileproxy import __version__
from fileproxy.compat import UntestedVersion, check_versions
from fileproxy.config import (
    CONFIG_FILE_ENV,
    SETTINGS,
    Config,
    ConfigError,
    env_name,
    flag_name,
    load_config,
    parse_bool,
    parse_seconds,
    positive,
    setting_values,
)
from fileproxy.features.signing import signed_link, signing_secrets
from fileproxy.server.run import run_dev, run_gunicorn
from fileproxy.server.tls import CertificateError, server_context

COMMANDS = ("serve", "dev", "sign")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fileproxy", argument_default=argparse.SUPPRESS,
        description="Streaming HTTP reverse proxy for large files over poor networks. "
                    "serve (default): gunicorn with the package's settings; dev: one process; "
                    "sign: print a signed link (fileproxy sign --help).",
        epilog=f"Every flag can also come from an env var (FILEPROXY_<NAME>) or a TOML file "
               f"(--config or {CONFIG_FILE_ENV}); the command line wins, then env, then file.")
    parser.add_argument("command", nargs="?", choices=COMMANDS, default="serve",
                        help="serve (gunicorn, several workers), dev (one process) or sign "
                             "(first, with its own flags: fileproxy sign URL)")
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings")
    parser.add_argument("--version", action="version", version=f"fileproxy {__version__}")
    for name, spec in SETTINGS.items():
        add_setting_flag(parser, name, spec.metadata, spec.default)
    legacy = parser.add_argument_group("flags of the services fileproxy replaces")
    legacy.add_argument("--target-host", metavar="HOST", help="upstream host (with --target-port)")
    legacy.add_argument("--target-port", metavar="PORT", help="upstream port (default 80)")
    legacy.add_argument("--listen-host", metavar="HOST", help="listen host (with --listen-port)")
    legacy.add_argument("--listen-port", metavar="PORT", help="listen port (default 8080)")
    return parser


def add_setting_flag(parser: argparse.ArgumentParser, name: str, meta: Any, default: Any) -> None:
    flags = [flag_name(name), *meta["aliases"]]
    shown_default = "none" if default in ((), "") else default
    help_text = f"{meta['help']} [env {env_name(name)}; default {shown_default}]"
    if meta["parse"] is parse_bool:
        parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                            help=help_text)
    elif meta["repeat"]:
        parser.add_argument(*flags, dest=name, action="append", metavar=meta["metavar"],
                            help=help_text)
    else:
        parser.add_argument(*flags, dest=name, metavar=meta["metavar"] or None, help=help_text)


def legacy_values(args: dict[str, Any]) -> dict[str, Any]:
    """--target-host/--target-port and --listen-host/--listen-port as upstream and bind."""
    values: dict[str, Any] = {}
    target_host, target_port = args.pop("target_host", None), args.pop("target_port", None)
    if target_host:
        values["upstream"] = [f"http://{target_host}:{target_port or 80}"]
    elif target_port:
        raise ConfigError("--target-port needs --target-host")
    listen_host, listen_port = args.pop("listen_host", None), args.pop("listen_port", None)
    if listen_host or listen_port:
        values["bind"] = f"{listen_host or '0.0.0.0'}:{listen_port or 8080}"
    return values


def parse_args(argv: Sequence[str] | None) -> tuple[str, Config]:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command", "serve")
    if command == "sign":
        raise ConfigError("sign comes first and takes its own flags: fileproxy sign URL [--key ID] "
                          "[--expires 1h] [--method GET]")
    config_file = args.pop("config", None)
    cli_values = legacy_values(args)
    cli_values.update(args)
    return command, load_config(cli_values, config_file)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["sign"]:
        return sign(arguments[1:])
    try:
        command, config = parse_args(arguments)
    except ConfigError as error:
        print(f"fileproxy: error: {error}", file=sys.stderr)
        return 2
    try:
        check_versions()
        server_context(config)  # (a certificate that cannot be used stops start-up here)
    except (UntestedVersion, CertificateError) as error:
        print(f"fileproxy: error: {error}", file=sys.stderr)
        return 2
    if command == "dev":
        return run_dev(config)
    return run_gunicorn(config)


# ---------------------------------------------------------------- fileproxy sign

def build_sign_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fileproxy sign",
        description="Print a signed link (fp-expires, fp-key, fp-signature) for paths under "
                    "--require-signature, with a key of the server's own settings.",
        epilog=f"The keys come from --signing-key, {env_name('signing_key')} or the TOML file "
               f"(--config or {CONFIG_FILE_ENV}), as for the server; no upstream is needed.")
    parser.add_argument("url", help="what to sign: http://proxy:8080/path?query, or /path?query")
    parser.add_argument("--key", metavar="ID", help="id of the signing key (needed when several "
                                                    "are set)")
    parser.add_argument("--expires", metavar="DURATION", type=duration, default=3600.0,
                        help="how long the link works: 90, 15m, 1h, ... (default 1h)")
    parser.add_argument("--method", default="GET", type=str.upper,
                        help="the method the link is for (default GET)")
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings")
    parser.add_argument(flag_name("signing_key"), dest="signing_key", action="append",
                        metavar="ID=SECRET", help="a signing key (repeat)")
    return parser


def duration(text: str) -> float:
    try:
        return float(positive(parse_seconds)(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def signing_keys(cli_keys: list[str] | None, config_file: str | None) -> dict[str, str]:
    """--signing-key by id, with the server's precedence (command line, env, TOML file) but
    without building a whole Config (which needs an upstream)."""
    values = setting_values({"signing_key": cli_keys} if cli_keys else {}, config_file)
    return signing_secrets(values.get("signing_key", ()))


def chosen_key(keys: dict[str, str], key_id: str | None) -> tuple[str, str]:
    """(id, secret) of --key, or of the only key set."""
    if not keys:
        raise ConfigError(f"--signing-key: no key to sign with (--signing-key ID=SECRET, "
                          f"{env_name('signing_key')} or signing-key in --config)")
    if key_id is None and len(keys) > 1:
        raise ConfigError(f"--key: several signing keys are set ({', '.join(keys)}); choose one")
    key_id = key_id or next(iter(keys))
    if key_id not in keys:
        raise ConfigError(f"--key: no signing key {key_id!r} is set (set: {', '.join(keys)})")
    return key_id, keys[key_id]


def sign(argv: Sequence[str]) -> int:
    """`fileproxy sign URL`: print the signed link on stdout."""
    args = build_sign_parser().parse_args(argv)
    try:
        key_id, secret = chosen_key(signing_keys(args.signing_key, args.config), args.key)
        link = signed_link(args.url, key_id, secret, int(time.time() + args.expires), args.method)
    except ValueError as error:  # (ConfigError too)
        print(f"fileproxy sign: error: {error}", file=sys.stderr)
        return 2
    print(link)
    return 0
