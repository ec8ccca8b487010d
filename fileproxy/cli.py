"""Command line: `fileproxy [serve|dev] --upstream URL [flags]`; every flag is a Config field."""

from __future__ import annotations

import argparse
import sys
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
)
from fileproxy.server.run import run_dev, run_gunicorn

COMMANDS = ("serve", "dev")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fileproxy", argument_default=argparse.SUPPRESS,
        description="Streaming HTTP reverse proxy for large files over poor networks. "
                    "serve (default): gunicorn with gunicorn.conf.py; dev: one process.",
        epilog=f"Every flag can also come from an env var (FILEPROXY_<NAME>) or a TOML file "
               f"(--config or {CONFIG_FILE_ENV}); the command line wins, then env, then file.")
    parser.add_argument("command", nargs="?", choices=COMMANDS, default="serve",
                        help="serve (gunicorn, several workers) or dev (one process)")
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
    config_file = args.pop("config", None)
    cli_values = legacy_values(args)
    cli_values.update(args)
    return command, load_config(cli_values, config_file)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        command, config = parse_args(argv)
    except ConfigError as error:
        print(f"fileproxy: error: {error}", file=sys.stderr)
        return 2
    try:
        check_versions()
    except UntestedVersion as error:
        print(f"fileproxy: error: {error}", file=sys.stderr)
        return 2
    if command == "dev":
        return run_dev(config)
    return run_gunicorn(config)
