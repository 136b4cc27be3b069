"""``HOST:PORT`` as people type it: for ``--server``, ``--listen`` and the like.

One parser, so every option says the same about the same mistake. An IPv6
address goes in brackets (``[::1]:7401``); the brackets are not part of the
host returned.
"""

from __future__ import annotations

import argparse


def parse_host_port(text: str, *, allow_zero: bool = False) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT``; a ``ValueError`` that says what is wrong otherwise.

    ``allow_zero`` is for listeners, where port 0 means any free port.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"{text!r}: the IPv6 address has no closing ']' (e.g. [::1]:7401)")
        if not rest.startswith(":"):
            raise ValueError(f"{text!r} has no port: expected [IPV6]:PORT, e.g. [::1]:7401")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"{text!r} has no port: expected HOST:PORT, e.g. 127.0.0.1:7401")
        if ":" in host:
            raise ValueError(f"{text!r}: an IPv6 address goes in brackets, e.g. [::1]:7401")
    if not host.strip():
        raise ValueError(f"{text!r} has no host before the port: expected HOST:PORT, e.g. 127.0.0.1:7401")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{text!r}: the port {port_text!r} is not a number")
    port = int(port_text)
    lowest = 0 if allow_zero else 1
    if not lowest <= port <= 65535:
        also = " (0: any free port)" if allow_zero else ""
        raise ValueError(f"{text!r}: the port must be {lowest}-65535{also}, not {port}")
    return host, port


def host_port_argument(text: str) -> tuple[str, int]:
    """``parse_host_port`` as an argparse ``type=``: a bad value is a usage error with the reason."""
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def listen_port_argument(text: str) -> int:
    """A port to listen on, as an argparse ``type=``: 0-65535, 0 meaning any free port."""
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a port is a number 0-65535 (0: any free port)")
    return int(text)
