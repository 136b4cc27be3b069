"""The `evcharge web` command's definition, kept apart so the CLI does not import aiohttp."""

from __future__ import annotations

import argparse
from pathlib import Path

from evcharge.domain.world import World
from evcharge.wire.address import host_port_argument, listen_port_argument


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> None:
    cmd = sub.add_parser(
        "web",
        parents=parents,
        help="a read-only live web dashboard of one operator",
        description="Serve a read-only live web dashboard of one operator: cities, stations and charge points "
        'with their status and "free in N min", current and upcoming reservations, trips with their stops '
        "across operators, and the peer links. It runs as a separate process that connects to the operator's "
        "server over the evcharge protocol, as the operator's own tool (with the operator's secret from the "
        "world file, like `evcharge inspect`), and refreshes when that server pushes a change; it reconnects "
        "by itself if the server goes away, over TLS with --tls-ca when the server's listener speaks it. "
        "It never changes anything. Besides the page at /, /api/state is "
        "the state as JSON and /api/events a live Server-Sent Events stream. It answers only requests for its "
        "own names (loopback's, this machine's, --host, --allow-host; or an address), so that no other web page "
        "can read it through the operator's browser. Bound beyond loopback it asks for a login: any user name, "
        "and the operator's secret from the world file (or the token in --token-file) as password; put TLS in "
        "front of it on a real network.",
    )
    cmd.add_argument("--operator", required=True, help="operator id from the world file")
    cmd.add_argument("--host", default="127.0.0.1", help="address the dashboard listens on (default: %(default)s)")
    cmd.add_argument(
        "--port",
        type=listen_port_argument,
        default=8080,
        help="port the dashboard listens on, 0 for any free one (default: %(default)s)",
    )
    cmd.add_argument(
        "--server", type=host_port_argument, help="HOST:PORT of the operator's server (default: the world file's)"
    )
    cmd.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="answer requests for this host name too (a proxy's, a DNS name of this machine); repeatable",
    )
    cmd.add_argument(
        "--login", action="store_true", help="ask for the login on loopback too (always asked beyond loopback)"
    )
    cmd.add_argument(
        "--token-file",
        type=Path,
        help="the login's password is this file's content, not the operator's secret (keep it unreadable to others)",
    )
    cmd.set_defaults(run=_run_web, default_log_level="info")


async def _run_web(world: World, args: argparse.Namespace) -> int:
    from evcharge.apps.web.dashboard import run_web  # aiohttp only when the dashboard runs

    return await run_web(world, args)
