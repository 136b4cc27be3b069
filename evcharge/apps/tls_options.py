"""The TLS options every client command takes (--tls-ca, --tls-cert, --tls-key), defined once."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

from evcharge.domain.world import OperatorConfig
from evcharge.wire.tls import client_context


def client_tls_parser() -> argparse.ArgumentParser:
    """A parent parser for the commands that connect to a server."""
    client_tls = argparse.ArgumentParser(add_help=False)
    group = client_tls.add_argument_group("TLS (when the server's listener speaks it)")
    group.add_argument(
        "--tls-ca",
        type=Path,
        help="connect with TLS, trusting this CA bundle (PEM); the server's certificate must name the "
        "operator's tls_name from the world file, else the host connected to",
    )
    group.add_argument("--tls-cert", type=Path, help="client certificate chain (PEM), for a +mtls listener")
    group.add_argument("--tls-key", type=Path, help="its private key (PEM), if not inside --tls-cert")
    return client_tls


def client_tls(args: argparse.Namespace, op: OperatorConfig) -> tuple[ssl.SSLContext | None, str | None]:
    """The TLS context and the name to verify for a client of ``op`` (no TLS without --tls-*)."""
    if args.tls_ca is None and args.tls_cert is None:
        return None, None
    return client_context(args.tls_ca, args.tls_cert, args.tls_key), op.tls_name or None
