"""The TLS options every client command takes (--tls-ca, --tls-cert, --tls-key), and the OCPP gateway's."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

from evcharge.domain.world import OperatorConfig
from evcharge.wire.tls import TlsConfigError, TlsFiles, client_context, server_context


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


def gateway_tls_parser() -> argparse.ArgumentParser:
    """The OCPP gateway's: one certificate of its own, served to charge points and shown to the server."""
    gateway_tls = argparse.ArgumentParser(add_help=False)
    group = gateway_tls.add_argument_group("TLS")
    group.add_argument(
        "--tls-cert",
        type=Path,
        help="the gateway's certificate chain (PEM): charge points connect with wss:// (OCPP security profile 2: "
        "TLS and Basic auth), and it is shown to a +mtls station listener of the server",
    )
    group.add_argument("--tls-key", type=Path, help="its private key (PEM), if not inside --tls-cert")
    group.add_argument(
        "--tls-ca",
        type=Path,
        help="connect to the server with TLS, trusting this CA bundle (PEM); the server's certificate must name "
        "the operator's tls_name from the world file, else the host connected to",
    )
    group.add_argument(
        "--plain-listener",
        action="store_true",
        help="charge points connect with ws:// even with --tls-cert (a TLS proxy in front serves wss://)",
    )
    return gateway_tls


def gateway_tls(
    args: argparse.Namespace, op: OperatorConfig
) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None, str | None]:
    """The gateway's listener context, its context toward the server, and the name to verify there."""
    listener = None
    if args.tls_cert is not None and not args.plain_listener:
        listener = server_context(TlsFiles(args.tls_cert, args.tls_key), require_client_cert=False)
    elif args.tls_key is not None and args.tls_cert is None:
        raise TlsConfigError("--tls-key needs --tls-cert")
    if args.tls_ca is None:
        return listener, None, None
    return listener, client_context(args.tls_ca, args.tls_cert, args.tls_key), op.tls_name or None
