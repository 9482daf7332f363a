"""The bind rule and the Host/Origin policy."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydantic import SecretStr

from clipdex import cli
from shared.errors import ConfigError
from tests.conftest import tiny_settings_for
from tools.auth import HostPolicy, check_bind, is_loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_other_addresses_are_not_loopback(host: str) -> None:
    assert not is_loopback(host)


def test_a_public_bind_needs_a_token_or_insecure(tmp_path: Path) -> None:
    public = tiny_settings_for(tmp_path, host="0.0.0.0")
    with pytest.raises(ConfigError, match=r"CLIPDEX_API_TOKEN.*--insecure"):
        check_bind(public, insecure=False)
    check_bind(public, insecure=True)
    check_bind(public.model_copy(update={"api_token": SecretStr("t")}), insecure=False)
    check_bind(tiny_settings_for(tmp_path), insecure=False)


def test_clipdex_serve_refuses_a_public_address_without_a_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)  # keep pytest's log capture
    code = cli.main(["--data-dir", str(tmp_path), "serve", "--host", "0.0.0.0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0" in err and "CLIPDEX_API_TOKEN" in err
    assert not (tmp_path / "clipdex.sqlite3").exists()  # refused before anything was opened


def test_host_policy_for_loopback_accepts_local_names_on_any_port() -> None:
    policy = HostPolicy.for_bind("127.0.0.1")
    for host in ("127.0.0.1:8765", "localhost:1", "[::1]:8765", "LOCALHOST:8765", "localhost"):
        assert policy.host_ok(host), host
    for host in ("evil.example:8765", "127.0.0.1.evil.example:80", "localhost:80x", "", None):
        assert not policy.host_ok(host), host


def test_host_policy_for_a_named_address_and_extra_hosts() -> None:
    policy = HostPolicy.for_bind("10.1.2.3", ["search.example.com", "proxy.example.com:8443"])
    assert policy.host_ok("10.1.2.3:8765")
    assert policy.host_ok("search.example.com") and policy.host_ok("search.example.com:8765")
    assert policy.host_ok("proxy.example.com:8443") and not policy.host_ok("proxy.example.com:9000")
    assert not policy.host_ok("10.1.2.4:8765")


def test_host_policy_for_a_wildcard_bind_adds_the_machine_name() -> None:
    policy = HostPolicy.for_bind("0.0.0.0")
    assert policy.host_ok(f"{socket.gethostname().lower()}:8765")
    assert not policy.host_ok("0.0.0.0:8765")


def test_origins_follow_the_hosts() -> None:
    policy = HostPolicy.for_bind("127.0.0.1", ["app.example.com"])
    assert policy.origin_ok(None)  # not a browser, or same-origin
    assert policy.origin_ok("http://localhost:3000") and policy.origin_ok("https://app.example.com")
    assert not policy.origin_ok("https://evil.example") and not policy.origin_ok("null")
    security = policy.transport_security()
    assert security.enable_dns_rebinding_protection and "localhost:*" in security.allowed_hosts
