"""HOST:PORT as typed on the command line: one parser for --server, --listen and the web command."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from evcharge.wire.address import host_port_argument, parse_host_port
from evcharge.wire.tls import TlsConfigError, parse_listen

from .conftest import run_cli


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7401", ("127.0.0.1", 7401)),
        ("operator-a:7401", ("operator-a", 7401)),
        ("localhost:1", ("localhost", 1)),
        ("example.org:65535", ("example.org", 65535)),
        ("[::1]:7401", ("::1", 7401)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
    ],
)
def test_good_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected
    assert host_port_argument(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("nohost", "has no port"),
        ("", "has no port"),
        ("[::1]", "has no port"),
        ("[::1]7401", "has no port"),
        ("[::1:7401", "no closing ']'"),
        (":7401", "has no host"),
        ("[]:7401", "has no host"),
        ("::1:7401", "IPv6 address goes in brackets"),
        ("host:", "is not a number"),
        ("host:http", "is not a number"),
        ("host:-1", "is not a number"),
        ("host: 80", "is not a number"),
        ("host:٣", "is not a number"),
        ("host:0", "must be 1-65535"),
        ("host:65536", "must be 1-65535"),
        ("host:99999999999999999999", "must be 1-65535"),
    ],
)
def test_bad_addresses_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as raised:
        parse_host_port(text)
    assert repr(text) in str(raised.value)  # the message quotes what was typed
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        host_port_argument(text)


def test_port_zero_is_for_listeners_only() -> None:
    assert parse_host_port("0.0.0.0:0", allow_zero=True) == ("0.0.0.0", 0)
    with pytest.raises(ValueError, match=r"must be 0-65535 \(0: any free port\)"):
        parse_host_port("0.0.0.0:65536", allow_zero=True)
    assert parse_listen("all=0.0.0.0:0").port == 0
    with pytest.raises(TlsConfigError, match="has no host"):
        parse_listen("peer=:7411+mtls")
    with pytest.raises(TlsConfigError, match="is not a number"):
        parse_listen("peer=host:x")


def test_a_bad_server_option_is_a_usage_error(world_path: Path) -> None:
    done = run_cli("vehicle", "--world", str(world_path), "--id", "V01", "--server", "nohost", "history")
    assert done.returncode == 2 and done.stdout == ""
    assert "argument --server: 'nohost' has no port: expected HOST:PORT" in done.stderr, done.stderr
    assert done.stderr.startswith("usage: ") and "Traceback" not in done.stderr
    done = run_cli("web", "--world", str(world_path), "--operator", "A", "--server", "127.0.0.1:0")
    assert done.returncode == 2 and "argument --server: '127.0.0.1:0': the port must be 1-65535" in done.stderr
    assert "Traceback" not in done.stderr
