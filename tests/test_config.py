"""Settings: CLI beats env beats file beats defaults; bad values stop start-up with one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fileproxy.cli import build_parser, parse_args
from fileproxy.config import SETTINGS, Config, ConfigError, flag_name, load_config, parse_seconds, parse_size

UP = "http://127.0.0.1:9000"


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path):
    config_file = tmp_path / "fileproxy.toml"
    config_file.write_text('upstream = ["http://file:1"]\nread-size = "1MiB"\n'
                           'read_timeout = "5m"\nconnect_timeout = 7\n')
    env = {"FILEPROXY_READ_TIMEOUT": "90", "FILEPROXY_CONNECT_TIMEOUT": "3"}
    config = load_config({"connect_timeout": "1.5"}, str(config_file), env)
    assert config.upstream == ("http://file:1",)
    assert config.read_size == 1024 * 1024  # file
    assert config.read_timeout == 90.0  # env beats file
    assert config.connect_timeout == 1.5  # CLI beats env
    assert config.bind == "0.0.0.0:8080"  # default


def test_every_setting_has_a_documented_flag():
    help_text = build_parser().format_help()
    for name in SETTINGS:
        assert flag_name(name) in help_text
    for legacy in ("--target-host", "--target-port", "--listen-host", "--listen-port"):
        assert legacy in help_text


def test_old_services_flags_are_aliases():
    command, config = parse_args(["--target-host", "10.1.2.3", "--target-port", "8888",
                                  "--listen-host", "127.0.0.1", "--listen-port", "9999"])
    assert command == "serve"
    assert config.upstream == ("http://10.1.2.3:8888",) and config.bind == "127.0.0.1:9999"


def test_repeated_upstreams_and_env_list():
    _, config = parse_args(["dev", "--upstream", UP, "--upstream", "https://b.example/prefix/"])
    assert config.upstream == (UP, "https://b.example/prefix")
    assert load_config(environ={"FILEPROXY_UPSTREAM": f"{UP},http://c:2"}).upstream == \
        (UP, "http://c:2")


def test_units():
    assert parse_size("256k") == 262144 and parse_size("2GiB") == 2 << 30
    assert parse_seconds("500ms") == 0.5 and parse_seconds("2h") == 7200


@pytest.mark.parametrize(("args", "named"), [
    (["--upstream", "ftp://x"], "--upstream"),
    (["--upstream", UP, "--read-size", "-1"], "--read-size"),
    (["--upstream", UP, "--read-timeout", "0"], "--read-timeout"),
    (["--upstream", UP, "--bind", "nowhere"], "--bind"),
    (["--upstream", UP, "--host-header", "mine"], "--host-header"),
    (["--upstream", UP, "--tcp-congestion", "warp-drive"], "--tcp-congestion"),
    ([], "--upstream"),
])
def test_bad_values_name_the_setting(args, named):
    with pytest.raises(ConfigError, match=named):
        parse_args(args)


def test_unknown_key_in_file_is_an_error(tmp_path):
    config_file = tmp_path / "bad.toml"
    config_file.write_text(f'upstream = "{UP}"\nread_sise = 5\n')
    with pytest.raises(ConfigError, match="read_sise"):
        load_config(config_file=str(config_file), environ={})


def test_bad_value_stops_start_up_with_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "fileproxy", "--upstream", UP,
                             "--read-size", "lots"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--read-size" in lines[0] and "lots" in lines[0]


def test_env_value_errors_say_where_they_came_from():
    with pytest.raises(ConfigError, match="FILEPROXY_WORKERS"):
        load_config(environ={"FILEPROXY_UPSTREAM": UP, "FILEPROXY_WORKERS": "many"})


def test_config_requires_an_upstream():
    with pytest.raises(ConfigError):
        Config()


def test_signing_keys_are_checked_together_and_never_echoed():
    with pytest.raises(ConfigError, match="given twice"):
        load_config({"upstream": ["http://u"], "signing_key": ["a=" + "s" * 16, "a=" + "t" * 16]},
                    environ={})
    with pytest.raises(ConfigError, match="needs at least one --signing-key"):
        load_config({"upstream": ["http://u"], "require_signature": ["/private/"]}, environ={})
    with pytest.raises(ConfigError) as refused:
        load_config({"upstream": ["http://u"], "signing_key": ["k=tooshortsecret"]}, environ={})
    assert "tooshortsecret" not in str(refused.value)


def test_https_needs_a_certificate_and_its_key(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="needs both"):
        load_config({"upstream": ["http://u"], "certfile": str(cert)}, environ={})
    with pytest.raises(ConfigError, match=r"--keyfile.*does not exist"):
        load_config({"upstream": ["http://u"], "certfile": str(cert),
                     "keyfile": str(tmp_path / "missing.key")}, environ={})
