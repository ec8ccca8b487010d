"""Signed links: checked before any upstream on every server path, taken off the target, signed by
`fileproxy sign` and the Python client; refusals (403, 410) never reach the upstream."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from yarl import URL

from fileproxy.cli import main as fileproxy_main
from fileproxy.client import AsyncClient, sign_url
from fileproxy.features.signing import canonical_string, signed_target
from tests.conftest import MATRIX, MATRIX_IDS

KEY_ONE = ("k1", "first-secret-0123456789")
KEY_TWO = ("k2", "second-secret-0123456789")
GONE_KEY = ("k0", "retired-secret-0123456789")
PROTECTED = "/echo/private/"


def keys(*pairs: tuple[str, str]) -> tuple[str, ...]:
    return tuple(f"{key_id}={secret}" for key_id, secret in pairs)


def link(target: str, key: tuple[str, str] = KEY_ONE, expires_in: float = 300,
         method: str = "GET") -> str:
    return signed_target(method, target, *key, int(time.time() + expires_in))


def exactly(url: str) -> URL:
    """url sent byte for byte (aiohttp would spell `%2F` in a query as `/`, for one)."""
    return URL(url, encoded=True)


def untouched(origin) -> bool:
    """The origin saw no request and no connection."""
    return not origin.events() and origin.connections() == 0


@pytest.fixture(params=MATRIX, ids=MATRIX_IDS)
async def signing_proxy(origin, make_proxy, request):
    """The proxy on every server path and upstream client, with two keys and one protected
    prefix."""
    fast_path, lean_client = request.param
    return await make_proxy(origin.url, fast_path=fast_path, lean_client=lean_client,
                            signing_key=keys(KEY_ONE, KEY_TWO), require_signature=(PROTECTED,))


async def fetch(client, url: str | URL, method: str = "GET", **kwargs) -> tuple[int, str]:
    """The answer to url sent as spelled (a str: as aiohttp spells it, as a client would)."""
    async with client.request(method, url, **kwargs) as response:
        return response.status, await response.text()


async def echoed_target(client, url: str | URL, method: str = "GET", **kwargs) -> str:
    status, text = await fetch(client, url, method, **kwargs)
    assert status == 200, text
    return str(json.loads(text)["raw_path"])


# ---------------------------------------------------------------- the canonical string

def test_canonical_string_is_method_path_sorted_query_and_expiry():
    target = "/a%20b/c?z=1&fp-key=x&a=2&&b&a=1&fp-signature=y"
    # Sorted by name; repeated names (a) keep their order in the link; fp- and empty items out.
    assert canonical_string("GET", target, 1700000000) == "GET\n/a%20b/c\na=2&a=1&b&z=1\n1700000000"


def test_signature_is_hex_hmac_sha256_of_the_canonical_string():
    signed = signed_target("PUT", "/x/y?q=1", *KEY_ONE, 1700000000)
    query = parse_qs(urlsplit(signed).query)
    expected = hmac.new(KEY_ONE[1].encode(), b"PUT\n/x/y\nq=1\n1700000000",
                        hashlib.sha256).hexdigest()
    assert query == {"q": ["1"], "fp-expires": ["1700000000"], "fp-key": ["k1"],
                     "fp-signature": [expected]}


# ---------------------------------------------------------------- on every server path

async def test_signed_link_is_proxied_without_its_parameters(origin, signing_proxy, client):
    target = f"{PROTECTED}file?b=2&a=%2F&b=1"
    assert await echoed_target(client, exactly(signing_proxy.url + link(target))) == target
    only = f"{PROTECTED}only"
    assert await echoed_target(client, signing_proxy.url + link(only, KEY_TWO)) == only


async def test_signed_link_for_another_method_carries_a_body(origin, signing_proxy, client):
    target = f"{PROTECTED}upload"
    status, text = await fetch(client, signing_proxy.url + link(target, method="PUT"), "PUT",
                               data=b"x" * 1000)
    assert status == 200 and json.loads(text)["body_length"] == 1000
    assert json.loads(text)["raw_path"] == target


def tampered_path(target: str) -> str:
    return link(target).replace("/file", "/other")


def tampered_query(target: str) -> str:
    return link(target + "?n=1").replace("n=1", "n=2")


def added_query(target: str) -> str:
    return link(target) + "&extra=1"


def unknown_key(target: str) -> str:
    return link(target, GONE_KEY)


def bad_signature(target: str) -> str:
    signed = link(target)
    return signed[:-1] + ("0" if signed[-1] != "0" else "1")


def malformed_signature(target: str) -> str:
    return link(target).rsplit("=", 1)[0] + "=not-hex"


def repeated_parameter(target: str) -> str:
    signed = link(target)
    return signed + "&fp-key=k1"


REFUSED = {
    "missing": (lambda target: target, "GET", 403),
    "expired": (lambda target: link(target, expires_in=-120), "GET", 410),
    "tampered path": (tampered_path, "GET", 403),
    "tampered query": (tampered_query, "GET", 403),
    "added query": (added_query, "GET", 403),
    "other method": (link, "DELETE", 403),
    "head for get": (link, "HEAD", 403),
    "unknown key": (unknown_key, "GET", 403),
    "bad signature": (bad_signature, "GET", 403),
    "malformed signature": (malformed_signature, "GET", 403),
    "repeated parameter": (repeated_parameter, "GET", 403),
    "percent-encoded prefix": (lambda target: "/echo/%70rivate/file", "GET", 403),
    "dot-segments into the prefix": (lambda target: "/echo/public/../private/file", "GET", 403),
    "doubled slash": (lambda target: "/echo//private/file", "GET", 403),
    "prefix without its slash": (lambda target: "/echo/private", "GET", 403),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
async def test_refused_links_never_reach_the_upstream(origin, signing_proxy, client, case):
    make_target, method, status = REFUSED[case]
    # Sent as spelled, as a client trying its luck would (dot-segments, escapes and all).
    async with client.request(method, exactly(signing_proxy.url + make_target(
            f"{PROTECTED}file"))) as response:
        body = await response.text()
        assert response.status == status, body
    if method != "HEAD":
        assert body.startswith(f"{status} {'Gone' if status == 410 else 'Forbidden'}: "), body
    assert untouched(origin)


async def test_paths_outside_the_prefixes_are_unaffected(origin, signing_proxy, client):
    public = "/echo/public?fp-note=1&a=1"
    assert await echoed_target(client, signing_proxy.url + public) == public
    forged = "/echo/public?a=1&fp-expires=1&fp-key=k1&fp-signature=" + "0" * 64
    assert await echoed_target(client, signing_proxy.url + forged) == forged
    # A link that verifies is fileproxy's own: its parameters are taken off there too.
    assert await echoed_target(client, signing_proxy.url + link("/echo/public?a=1")) \
        == "/echo/public?a=1"


async def test_without_signing_settings_fp_parameters_pass(origin, proxy, client):
    target = "/echo/private/x?fp-expires=1&fp-key=k1&fp-signature=abc"
    assert await echoed_target(client, proxy.url + target) == target


# ---------------------------------------------------------------- keys and clocks

async def test_rotated_keys_both_work_and_a_removed_one_fails(origin, make_proxy, client):
    both = await make_proxy(origin.url, signing_key=keys(KEY_ONE, KEY_TWO),
                            require_signature=(PROTECTED,))
    for key in (KEY_ONE, KEY_TWO):
        assert (await fetch(client, both.url + link(f"{PROTECTED}f", key)))[0] == 200
    rotated = await make_proxy(origin.url, signing_key=keys(KEY_TWO),
                               require_signature=(PROTECTED,))
    status, text = await fetch(client, rotated.url + link(f"{PROTECTED}f", KEY_ONE))
    assert status == 403 and "'k1' is not known" in text
    assert (await fetch(client, rotated.url + link(f"{PROTECTED}f", KEY_TWO)))[0] == 200


async def test_skew_is_honoured(origin, make_proxy, client):
    lenient = await make_proxy(origin.url, signing_key=keys(KEY_ONE),
                               require_signature=(PROTECTED,))  # the default skew: 60 s
    strict = await make_proxy(origin.url, signing_key=keys(KEY_ONE),
                              require_signature=(PROTECTED,), signature_skew=0.0)
    lately_expired = link(f"{PROTECTED}f", expires_in=-30)
    assert (await fetch(client, lenient.url + lately_expired))[0] == 200
    assert (await fetch(client, lenient.url + link(f"{PROTECTED}f", expires_in=-90)))[0] == 410
    assert (await fetch(client, strict.url + lately_expired))[0] == 410
    assert (await fetch(client, strict.url + link(f"{PROTECTED}f", expires_in=30)))[0] == 200


async def test_async_task_on_a_signed_link_runs_without_its_parameters(origin, make_proxy):
    proxy = await make_proxy(origin.url, signing_key=keys(KEY_ONE),
                             require_signature=(PROTECTED,))
    async with AsyncClient(proxy.url, sign_key=KEY_ONE) as signing:
        task_id = await signing.submit("POST", f"{PROTECTED}task?x=1", body=b"body")
        assert (await signing.wait(task_id, timeout=10, poll=0.05))["status"] == "completed"
        result = await signing.result(task_id)
        assert json.loads(result.body)["raw_path"] == f"{PROTECTED}task?x=1"
    async with AsyncClient(proxy.url) as unsigned:
        with pytest.raises(aiohttp.ClientResponseError, match="403"):
            await unsigned.submit("POST", f"{PROTECTED}task", body=b"body")


# ---------------------------------------------------------------- signers: CLI and client

async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """A command in its own process, while this loop keeps serving the proxy."""
    process = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_fileproxy_sign_prints_a_link_the_proxy_takes(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, signing_key=keys(KEY_ONE, KEY_TWO),
                             require_signature=(PROTECTED,))
    code, out, err = await run(
        sys.executable, "-m", "fileproxy", "sign", f"{proxy.url}{PROTECTED}cli?a=1",
        "--key", "k2", "--expires", "1h", "--method", "get",
        "--signing-key", keys(KEY_ONE)[0], "--signing-key", keys(KEY_TWO)[0])
    assert code == 0 and not err and len(out.splitlines()) == 1, (out, err)
    signed = out.strip()
    expires = int(parse_qs(urlsplit(signed).query)["fp-expires"][0])
    assert abs(expires - (time.time() + 3600)) < 60
    assert await echoed_target(client, signed) == f"{PROTECTED}cli?a=1"


async def test_fileproxy_sign_reads_keys_from_env_and_config_file(origin, make_proxy, client,
                                                                  tmp_path, monkeypatch, capsys):
    proxy = await make_proxy(origin.url, signing_key=keys(KEY_ONE, KEY_TWO),
                             require_signature=(PROTECTED,))
    monkeypatch.delenv("FILEPROXY_UPSTREAM", raising=False)
    monkeypatch.delenv("FILEPROXY_CONFIG", raising=False)
    monkeypatch.setenv("FILEPROXY_SIGNING_KEY", keys(KEY_ONE)[0])
    assert fileproxy_main(["sign", f"{proxy.url}{PROTECTED}env", "--expires", "90"]) == 0
    from_env = capsys.readouterr().out.strip()
    monkeypatch.delenv("FILEPROXY_SIGNING_KEY")
    config_file = tmp_path / "fileproxy.toml"
    config_file.write_text(f'signing-key = ["{keys(KEY_TWO)[0]}"]\n')
    assert fileproxy_main(["sign", f"{proxy.url}{PROTECTED}file", "--config",
                           str(config_file)]) == 0
    from_file = capsys.readouterr().out.strip()
    assert "fp-key=k1" in from_env and "fp-key=k2" in from_file
    assert await echoed_target(client, from_env) == f"{PROTECTED}env"
    assert await echoed_target(client, from_file) == f"{PROTECTED}file"


@pytest.mark.parametrize(("args", "named"), [
    ([], "--signing-key"),
    (["--signing-key", keys(KEY_ONE)[0], "--signing-key", keys(KEY_TWO)[0]], "--key"),
    (["--signing-key", keys(KEY_ONE)[0], "--key", "k9"], "'k9'"),
    (["--signing-key", "k1=short"], "--signing-key"),
])
def test_fileproxy_sign_errors_are_one_line(args, named, monkeypatch, capsys):
    for name in ("FILEPROXY_SIGNING_KEY", "FILEPROXY_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    assert fileproxy_main(["sign", "/x", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert not captured.out and len(lines) == 1 and named in lines[0], captured


async def test_client_sign_url_and_signing_client(origin, make_proxy, client, tmp_path):
    proxy = await make_proxy(origin.url, signing_key=keys(KEY_ONE),
                             require_signature=(PROTECTED, "/bytes/"))
    signed = sign_url(f"{proxy.url}{PROTECTED}client?q=a b", *KEY_ONE, 60, method="POST")
    assert await echoed_target(client, signed, "POST") == f"{PROTECTED}client?q=a+b"
    async with AsyncClient(sign_key=KEY_ONE) as signing:
        assert await signing.download(f"{proxy.url}/bytes/5000", tmp_path / "a.bin",
                                      progress=False) == 5000


async def test_client_cli_signs_with_sign_key(origin, make_proxy, tmp_path):
    proxy = await make_proxy(origin.url, signing_key=keys(KEY_ONE),
                             require_signature=("/bytes/",))
    out = tmp_path / "cli.bin"
    code, stdout, err = await run(sys.executable, "-m", "fileproxy.client", "--sign-key",
                                  keys(KEY_ONE)[0], "get", f"{proxy.url}/bytes/4096", "-o",
                                  str(out), "--retries", "0")
    assert code == 0 and stdout.strip() == "4096", err
    code, _, err = await run(sys.executable, "-m", "fileproxy.client", "get",
                             f"{proxy.url}/bytes/4096", "-o", str(tmp_path / "no.bin"),
                             "--retries", "0")
    assert code == 1 and "HTTP 403" in err


def test_bad_signing_key_stops_start_up_with_one_line():
    result = subprocess.run([sys.executable, "-m", "fileproxy", "dev", "--upstream",
                             "http://127.0.0.1:9", "--signing-key", "bad"],
                            capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--signing-key" in lines[0], result.stderr
