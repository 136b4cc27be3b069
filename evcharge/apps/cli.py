"""The ``evcharge`` command: server, charge point simulator, vehicle commands, inspect.

Exit codes follow one rule, ``EXIT_CODES`` (also in ``evcharge --help``): 0 done,
1 the server said no or the operation failed, 2 the command cannot run as typed,
3 outcome unknown (no answer, even asked again with the change's idempotency key).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
from rich.console import Console

from evcharge.apps import render, stores
from evcharge.apps.ocpi import DEFAULT_PORT as OCPI_PORT
from evcharge.apps.ocpp import DEFAULT_PORT as OCPP_PORT
from evcharge.apps.tls_options import client_tls, client_tls_parser, gateway_tls, gateway_tls_parser
from evcharge.apps.vehicle import (
    POSITION_EVERY,
    START_SOC,
    VEHICLE_EXAMPLES,
    UsageError,
    add_vehicle_commands,
    check_command,
    parse_position,
    percent,
    vehicle_command,
)
from evcharge.apps.web import command as webcmd
from evcharge.domain.world import SHIPPED, World, WorldError, load_world
from evcharge.links.client import connect
from evcharge.links.link import ANSWER_DEADLINE, Link, world_fallbacks
from evcharge.links.requests import Requests
from evcharge.operator.handlers import PUSH_BUFFER_LIMIT
from evcharge.operator.server import (
    FRAME_TIMEOUT,
    HELLO_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    ClockMismatch,
    Server,
)
from evcharge.operator.store import STORE_ENV, StoreError
from evcharge.wire import redact
from evcharge.wire.address import host_port_argument, listen_port_argument
from evcharge.wire.connection import MAX_IN_FLIGHT, WRITE_TIMEOUT
from evcharge.wire.errors import EvchargeError, OutcomeUnknownError
from evcharge.wire.tls import Listen, TlsConfigError, TlsFiles, parse_listen

log = logging.getLogger("evcharge")

EXIT_OUTCOME_UNKNOWN = 3
EXIT_CODES = """\
exit codes (every command):
  0    done
  1    the server said no, or the operation failed: one line names the error's code and why
       (with --json: {"error": {"code": ..., "message": ...}}); also a server that cannot be reached
  2    the command cannot run as typed: bad usage or option value, an unknown id or city, a bad world
       or TLS file, a data directory kept for another clock, a listen address already in use
  3    outcome unknown: a change was asked for and no answer came, even when asked again with its
       idempotency key, within --answer-within; the message names the command that shows what happened
  130  interrupted (Ctrl-C)
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    # Not a default of --log-level itself: argparse shares that option among the subcommands.
    args.log_level = args.log_level or getattr(args, "default_log_level", "warning")
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    redactor = redact.install()  # every process we ship logs through here: no secret in any line
    try:
        world = load_world(args.world)
    except WorldError as exc:
        print(f"evcharge: bad world file: {exc}", file=sys.stderr)
        return 2
    redactor.add(pairs=world.credentials())
    try:
        code: int = uvloop.run(args.run(world, args))
        return code
    except KeyboardInterrupt:
        return 130
    except (WorldError, TlsConfigError, UsageError) as exc:
        print(f"evcharge {args.command_name}: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evcharge",
        description="Book EV charging across companies. Each operator runs a server; "
        "charge points, vehicles and operator tools connect to it.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--world",
        default=os.environ.get("EVCHARGE_WORLD", SHIPPED),
        help=f"world file (TOML) or a shipped world's name (default: $EVCHARGE_WORLD, else {SHIPPED})",
    )
    common.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: info for the long-running processes (server, station, gateway), warning for the rest",
    )
    client_tls = client_tls_parser()
    sub = parser.add_subparsers(title="subcommands", metavar="COMMAND", dest="command_name")

    server = sub.add_parser(
        "server",
        parents=[common],
        help="run one operator's server",
        description="Run one operator's server: its stations in memory, its store on disk (SQLite) or in "
        "PostgreSQL (--store). "
        "SIGTERM/SIGINT stop it cleanly (in-flight requests finish, queued changes are committed).",
    )
    server.add_argument("--operator", required=True, help="operator id from the world file")
    server.add_argument("--data-dir", type=Path, default=Path("data"), help="where the store lives (default: ./data)")
    server.add_argument(
        "--store",
        metavar="URL",
        help="keep the books in PostgreSQL instead: postgresql://USER:PASSWORD@HOST:PORT/DATABASE (default: "
        f"${STORE_ENV}, else the world file's `store` of the operator, else SQLite in --data-dir). A second "
        "server of the operator on the same database stands by and takes over when the first dies",
    )
    server.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="simulated seconds per real second, e.g. 60 (default: %(default)s)",
    )
    server.add_argument("--host", help="listen address (default: the world file's)")
    server.add_argument(
        "--port", type=listen_port_argument, help="listen port, 0 for any free one (default: the world file's)"
    )
    server.add_argument(
        "--listen",
        action="append",
        type=_listen,
        metavar="ROLES=HOST:PORT[+tls|+mtls]",
        help="a listener for some roles (vehicle, station, operator, peer; or all), instead of --host/--port; "
        "repeatable. +tls: TLS with --tls-cert; +mtls: clients must also show a certificate from --tls-ca. "
        "A client of another role is refused (forbidden). E.g. --listen vehicle,station,operator=0.0.0.0:7401 "
        "--listen peer=0.0.0.0:7411+mtls",
    )
    server.add_argument(
        "--tls-cert", type=Path, help="the operator's certificate chain (PEM): served by TLS listeners, shown to peers"
    )
    server.add_argument("--tls-key", type=Path, help="its private key (PEM), if not inside --tls-cert")
    server.add_argument(
        "--tls-ca",
        type=Path,
        help="CA bundle (PEM) that verifies clients on +mtls listeners and the peers whose world entry has "
        "peer_tls (default for those: the system's CAs)",
    )
    server.add_argument("--ready-file", type=Path, help="write {host, port, pid} as JSON here once listening")
    server.add_argument("--store-limit-mb", type=float, help="refuse changes once the store would grow past this")
    server.add_argument(
        "--max-connections",
        type=int,
        help="refuse new clients beyond this many, and keep at most as many in their handshake; fewer if the "
        "file limit (ulimit -n, raised at start as far as allowed) cannot hold them, with a warning "
        f"(default: as many as the file limit holds, at most {MAX_CONNECTIONS})",
    )
    server.add_argument(
        "--idle-timeout",
        type=float,
        default=IDLE_TIMEOUT,
        help="close a vehicle or operator silent this long, s (default: %(default)s)",
    )
    server.add_argument(
        "--hello-timeout",
        type=float,
        default=HELLO_TIMEOUT,
        help="close a connection without a whole Hello by then, s (default: %(default)s)",
    )
    server.add_argument(
        "--frame-timeout",
        type=float,
        default=FRAME_TIMEOUT,
        help="close a connection whose begun frame is not whole by then, s (default: %(default)s)",
    )
    server.add_argument(
        "--write-timeout",
        type=float,
        default=WRITE_TIMEOUT,
        help="close a connection that does not take our replies for this long, s (default: %(default)s)",
    )
    server.add_argument(
        "--max-in-flight",
        type=int,
        default=MAX_IN_FLIGHT,
        help="requests per connection served at once; beyond, stop reading it (default: %(default)s)",
    )
    server.add_argument(
        "--push-buffer-kb",
        type=int,
        default=PUSH_BUFFER_LIMIT // 1024,
        help="drop a client this far behind on pushed events, KiB (default: %(default)s)",
    )
    server.add_argument(
        "--clock-anchor",
        type=float,
        help="epoch seconds where simulated and real time meet; give every federated server the same one",
    )
    server.set_defaults(run=run_server, default_log_level="info")

    simulator = sub.add_parser(
        "station",
        parents=[common, client_tls],
        help="simulate an operator's charge points",
        description="Simulate charge points of an operator, each connected to its server in the station role.",
    )
    simulator.add_argument("--operator", required=True)
    simulator.add_argument("--id", action="append", dest="ids", help="only this charge point (repeatable)")
    simulator.add_argument(
        "--except",
        action="append",
        dest="skip",
        metavar="ID",
        help="all but this charge point (repeatable): one that a real charge point or another simulator "
        "(say through the OCPP gateway) already speaks for",
    )
    simulator.add_argument(
        "--server", type=host_port_argument, help="HOST:PORT of the operator's server (default: the world file's)"
    )
    simulator.add_argument(
        "--fault-rate", type=float, default=0.0, help="chance per second of a simulated fault (default: %(default)s)"
    )
    simulator.set_defaults(run=run_simulator, default_log_level="info")

    gateway = sub.add_parser(
        "ocpp-gateway",
        parents=[common, gateway_tls_parser()],
        help="let real OCPP 1.6J and 2.0.1 charge points join an operator",
        description="Accept OCPP charge points on ws://HOST:PORT/<charge point id> (wss:// with --tls-cert), "
        "subprotocol ocpp2.0.1 or ocpp1.6, HTTP Basic auth with the charge point's secret (failed logins are "
        "answered ever later), and speak for them to the operator's server.",
    )
    gateway.add_argument("--operator", required=True, help="operator id from the world file")
    gateway.add_argument("--host", help="listen address (default: the world file's host of the operator)")
    gateway.add_argument(
        "--port",
        type=listen_port_argument,
        default=OCPP_PORT,
        help="listen port, 0 for any free one (default: %(default)s)",
    )
    gateway.add_argument(
        "--server", type=host_port_argument, help="HOST:PORT of the operator's server (default: the world file's)"
    )
    gateway.add_argument("--ready-file", type=Path, help="write {host, port, pid} as JSON here once listening")
    gateway.set_defaults(run=run_ocpp_gateway, default_log_level="info")

    ocpi = sub.add_parser(
        "ocpi",
        parents=[common, client_tls],
        help="appear on OCPI roaming platforms: the CPO interface of OCPI 2.2.1, and Bookings",
        description="Serve the operator's CPO interface of OCPI 2.2.1 over HTTP (versions at /ocpi/versions): "
        "Credentials, Locations, Tariffs, Sessions, CDRs (sent and pushed), Tokens and Commands (received), "
        "and the Bookings module of OCPI 2.3.0. It speaks to the operator's server as one of its tools and "
        "books in the same ledger as everyone else. An eMSP or a hub registers with a token the operator "
        "gave it out of --registration-tokens (token A), then uses the token it gets back (token C).",
        epilog="The world file's [operators.ocpi] table names the operator's party (country_code, party_id) and "
        "its locations' country, time zone and currency. README.md, section OCPI, says how to register.",
    )
    ocpi.add_argument("--operator", required=True, help="operator id from the world file")
    ocpi.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s)")
    ocpi.add_argument(
        "--port",
        type=listen_port_argument,
        default=OCPI_PORT,
        help="listen port, 0 for any free one (default: %(default)s)",
    )
    ocpi.add_argument(
        "--public-url",
        help="the URL eMSPs reach this edge at, as advertised in versions and credentials (default: http://HOST:PORT)",
    )
    ocpi.add_argument(
        "--registration-tokens",
        type=Path,
        metavar="FILE",
        help="tokens (token A) the operator gave to parties, one a line ('#' starts a comment); each is usable "
        "for the credentials handshake until its party has registered. The file is read again when it changes.",
    )
    ocpi.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help="where the edge keeps its parties and bookings (default: ./data)",
    )
    ocpi.add_argument(
        "--server", type=host_port_argument, help="HOST:PORT of the operator's server (default: the world file's)"
    )
    ocpi.add_argument("--page-limit", type=int, default=100, help="most objects on one page (default: %(default)s)")
    ocpi.add_argument(
        "--session-updates",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a charging session's kWh and cost are pushed to its eMSP at most this often (default: %(default)s)",
    )
    ocpi.add_argument("--max-body-kb", type=int, default=64, help="largest request body, KiB (default: %(default)s)")
    ocpi.add_argument(
        "--rate-limit",
        type=float,
        default=50.0,
        help="requests a second per token (and four times that per address), bursts of twice that; 0: no limit "
        "(default: %(default)s)",
    )
    ocpi.add_argument("--ready-file", type=Path, help="write {host, port, pid} as JSON here once listening")
    ocpi.set_defaults(run=run_ocpi, default_log_level="info")

    vehicle = sub.add_parser(
        "vehicle",
        parents=[common, client_tls],
        help="act as a vehicle: interactively, or one command (find, reserve, charge, trips...)",
        description="Act as a vehicle connected to its home operator. Without a COMMAND, an interactive "
        "prompt opens (commands with completion, live pushes, battery monitor); with one, it runs and exits.",
        epilog=VEHICLE_EXAMPLES + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    vehicle.add_argument("--id", required=True, help="vehicle id from the world file")
    vehicle.add_argument(
        "--server", type=host_port_argument, help="HOST:PORT of the home operator (default: the world file's)"
    )
    vehicle.add_argument("--json", action="store_true", help="machine-readable output")
    vehicle.add_argument(
        "--answer-within",
        type=float,
        default=ANSWER_DEADLINE,
        metavar="SECONDS",
        help="a change whose reply is lost (the connection broke, the server restarted) is asked for again "
        "with its idempotency key for this long before the outcome is called unknown, exit 3 "
        "(default: %(default)s)",
    )
    vehicle.add_argument(
        "--soc",
        dest="start_soc",
        type=percent,
        default=START_SOC * 100,
        help="interactive: SoC at start, %% (default: %(default)s)",
    )
    vehicle.add_argument("--at", dest="position", help="interactive: where the vehicle is (CITY or LAT,LON)")
    vehicle.add_argument(
        "--position-every",
        type=float,
        default=POSITION_EVERY,
        help="interactive: seconds between position reports (default: %(default)s)",
    )
    add_vehicle_commands(vehicle.add_subparsers(title="commands", metavar="COMMAND", dest="command"))
    vehicle.set_defaults(run=run_vehicle)

    monitor = sub.add_parser(
        "monitor",
        parents=[common, client_tls],
        help="live view of an operator: stations, reservations, trips, peers",
        description="A live terminal view of one operator, updated when its server pushes changes.",
    )
    monitor.add_argument("--operator", required=True)
    monitor.add_argument("--server", type=host_port_argument, help="HOST:PORT (default: the world file's)")
    monitor.set_defaults(run=run_monitor)

    check = sub.add_parser(
        "check",
        parents=[common, client_tls],
        help="check the invariants across every operator (no double booking, trips whole or absent)",
        description="Inspect every operator of the world (with their secrets) and check the design's invariants.",
    )
    check.add_argument(
        "--allow-holds",
        action="store_true",
        help="do not count holds of bookings in progress (holds well past their deadline still count)",
    )
    check.add_argument(
        "--data-dir",
        type=Path,
        help="check the stores in this data directory instead (servers stopped or not; nothing is changed): "
        "what each server would refuse at start, then the invariants across them",
    )
    check.add_argument(
        "--store",
        action="append",
        default=[],
        metavar="OPERATOR=URL",
        help="with --data-dir: this operator's books are in PostgreSQL at URL (repeatable; default: the world "
        "file's `store` of each operator)",
    )
    check.set_defaults(run=run_check)

    settle = sub.add_parser(
        "settlement",
        parents=[common, client_tls],
        help="what an operator charged other operators' vehicles, and what its own were charged (with its secret)",
        description="Per other operator and month: sessions and R$ charged to its vehicles at our chargers, and "
        "charged to our vehicles at its chargers. `evcharge check` verifies that both sides agree.",
    )
    settle.add_argument("--operator", required=True)
    settle.add_argument("--server", type=host_port_argument, help="HOST:PORT (default: the world file's)")
    settle.add_argument("--json", action="store_true")
    settle.set_defaults(run=run_settlement)

    stores.add_backup_parser(sub, [common])
    stores.add_migrate_parser(sub, [common])

    webcmd.add_parser(sub, [common, client_tls])

    inspect = sub.add_parser(
        "inspect",
        parents=[common, client_tls],
        help="an operator's whole state (with its secret)",
        description="Print every station, charge point and reservation of an operator.",
    )
    inspect.add_argument("--operator", required=True)
    inspect.add_argument("--server", type=host_port_argument, help="HOST:PORT (default: the world file's)")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(run=run_inspect)
    return parser


def _listen(text: str) -> Listen:
    try:
        return parse_listen(text)
    except TlsConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _address(world: World, operator_id: str, override: tuple[str, int] | None) -> tuple[str, int]:
    if override is not None:
        return override
    op = world.operator(operator_id)
    return op.host, op.port


# --- server and charge points ------------------------------------------------------------


async def run_server(world: World, args: argparse.Namespace) -> int:
    limit = int(args.store_limit_mb * 1024 * 1024) if args.store_limit_mb else None
    if args.listen and (args.host is not None or args.port is not None):
        print("evcharge server: give either --listen or --host/--port, not both", file=sys.stderr)
        return 2
    store = args.store or os.environ.get(STORE_ENV) or world.operator(args.operator).store or None
    try:
        server = Server(
            world,
            args.operator,
            args.data_dir,
            store=store,
            time_scale=args.time_scale,
            host=args.host,
            port=args.port,
            store_max_bytes=limit,
            clock_anchor=args.clock_anchor,
            max_connections=args.max_connections,
            idle_timeout=args.idle_timeout,
            listen=args.listen or (),
            tls=TlsFiles(args.tls_cert, args.tls_key, args.tls_ca),
            hello_timeout=args.hello_timeout,
            frame_timeout=args.frame_timeout,
            write_timeout=args.write_timeout,
            max_in_flight=args.max_in_flight,
            push_buffer_limit=args.push_buffer_kb * 1024,
        )
    except StoreError as exc:  # a store that cannot be: not a URL, a limit PostgreSQL does not take, no driver
        print(f"evcharge server: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        # A standby waits in start() until the active server lets go of the store; SIGTERM ends the wait.
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await server.stop()
            return 0
        await starting
    except StoreError as exc:  # damaged, emptied, another's, newer, unreachable: one line, never served from
        await server.stop()
        print(f"evcharge server: {exc}", file=sys.stderr)
        return 1
    except (OSError, ClockMismatch) as exc:
        await server.stop()
        print(f"evcharge server: {_start_failure(exc, args.operator)}", file=sys.stderr)
        return 2
    if args.ready_file:
        listeners = [
            {
                "roles": sorted(listener.roles),
                "host": listener.host,
                "port": listener.port,
                "security": listener.security,
            }
            for listener in server.listen
        ]
        ready = {"host": server.host, "port": server.port, "pid": os.getpid(), "listeners": listeners}
        _write_atomically(args.ready_file, json.dumps(ready))
    lost = asyncio.ensure_future(server.lost.wait())
    try:
        await asyncio.wait({stopping, lost}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
        stopping.cancel()
        await server.stop()
    if server.lost.is_set():
        print(f"evcharge server: another server of operator {args.operator} took over its store", file=sys.stderr)
        return 1
    return 0


def _start_failure(exc: OSError | ClockMismatch, operator_id: str) -> str:
    """Why a server could not start, in one line."""
    if isinstance(exc, ClockMismatch):
        return str(exc)
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen: the address is already in use (is one for operator {operator_id} running already?)"
    return f"cannot start: {exc.strerror or exc}"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def run_simulator(world: World, args: argparse.Namespace) -> int:
    from evcharge.apps.simulator import run_stations

    host, port = _address(world, args.operator, args.server)
    context, name = client_tls(args, world.operator(args.operator))
    task = asyncio.ensure_future(
        run_stations(
            world,
            args.operator,
            host=host,
            port=port,
            only=args.ids,
            skip=args.skip,
            fault_rate=args.fault_rate,
            ssl_context=context,
            server_hostname=name,
        )
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        replaced = await task
    except asyncio.CancelledError:
        return 0
    except ValueError as exc:
        print(f"evcharge station: {exc}", file=sys.stderr)
        return 2
    except EvchargeError as exc:
        print(f"evcharge station: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    print(
        "evcharge station: nothing left to simulate, every charge point was taken over: "
        + next(iter(replaced.values())),
        file=sys.stderr,
    )
    return 1


async def run_ocpp_gateway(world: World, args: argparse.Namespace) -> int:
    from evcharge.apps.ocpp.gateway import Gateway

    if args.log_level != "debug":
        logging.getLogger("ocpp").setLevel(logging.WARNING)  # it logs every frame at info
    server_host, server_port = _address(world, args.operator, args.server)
    listener, context, name = gateway_tls(args, world.operator(args.operator))
    gateway = Gateway(
        world,
        args.operator,
        host=args.host,
        port=args.port,
        server_host=server_host,
        server_port=server_port,
        ssl_context=context,
        server_hostname=name,
        listener_ssl=listener,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
    except OSError as exc:
        print(f"evcharge ocpp-gateway: {_start_failure(exc, args.operator)}", file=sys.stderr)
        return 2
    if args.ready_file:
        _write_atomically(args.ready_file, json.dumps({"host": gateway.host, "port": gateway.port, "pid": os.getpid()}))
    try:
        await stop.wait()
    finally:
        await gateway.stop()
    return 0


async def run_ocpi(world: World, args: argparse.Namespace) -> int:
    from aiohttp import web

    from evcharge.apps.ocpi.app import make_app
    from evcharge.apps.ocpi.edge import Edge

    op = world.operator(args.operator)
    if op.ocpi is None:
        print(
            f"evcharge ocpi: operator {op.id} has no [operators.ocpi] table in the world file "
            '(country_code = "BR", party_id = "ABC" under its [[operators]] entry)',
            file=sys.stderr,
        )
        return 2
    if args.registration_tokens is not None and not args.registration_tokens.is_file():
        print(f"evcharge ocpi: no file {args.registration_tokens} (--registration-tokens)", file=sys.stderr)
        return 2
    server_host, server_port = _address(world, op.id, args.server)
    context, name = client_tls(args, op)
    edge = Edge(
        world,
        op.id,
        host=args.host,
        port=args.port,
        public_url=args.public_url,
        server_host=server_host,
        server_port=server_port,
        data_dir=args.data_dir,
        registration_tokens=args.registration_tokens,
        page_limit=max(1, args.page_limit),
        progress_every=max(0.1, args.session_updates),
        ssl_context=context,
        server_hostname=name,
    )
    app = make_app(
        edge, max_body=max(1, args.max_body_kb) * 1024, rate=args.rate_limit, burst=max(1, int(2 * args.rate_limit))
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await edge.store.close()
        print(f"evcharge ocpi: {_start_failure(exc, op.id)}", file=sys.stderr)
        return 2
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    edge.port = sockets[0].getsockname()[1] if sockets else args.port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await edge.start()
    try:
        await edge.ready(10.0)  # ready means serving what the server has, when it can be reached
    except TimeoutError:
        logging.getLogger(__name__).warning("operator %s's server not reached yet; serving meanwhile", op.id)
    logging.getLogger(__name__).info(
        "OCPI %s edge of operator %s (party %s) at %s, server %s:%d",
        "2.2.1",
        op.id,
        edge.me,
        edge.versions_url,
        server_host,
        server_port,
    )
    if args.ready_file:
        _write_atomically(args.ready_file, json.dumps({"host": args.host, "port": edge.port, "pid": os.getpid()}))
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await edge.stop()
    return 0


async def run_monitor(world: World, args: argparse.Namespace) -> int:
    from evcharge.apps.monitor import run_monitor as monitor
    from evcharge.links.feed import OperatorFeed

    op = world.operator(args.operator)
    host, port = _address(world, op.id, args.server)
    context, name = client_tls(args, op)
    feed = OperatorFeed(
        op, host, port, ssl_context=context, server_hostname=name, reserved_soon_min=world.rules.reserved_soon_min
    )
    return await monitor(feed)


async def run_check(world: World, args: argparse.Namespace) -> int:
    from evcharge.apps.invariants import in_transit, settlement_violations, summary, violations

    if args.data_dir is not None:
        urls = dict(item.split("=", 1) for item in args.store if "=" in item)
        if len(urls) != len(args.store):
            print("evcharge check: give --store as OPERATOR=postgresql://...", file=sys.stderr)
            return 2
        return await stores.check_stores(world, args.data_dir, urls)

    states = {}
    settlements = {}
    for op in world.operators:
        context, name = client_tls(args, op)
        addresses = [(op.host, op.port), *op.fallbacks]  # its standby, where the world file names one
        for i, (host, port) in enumerate(addresses):
            try:
                async with connect(
                    host,
                    port,
                    role="operator",
                    ident=op.id,
                    secret=op.secret,
                    ssl_context=context,
                    server_hostname=name,
                ) as c:
                    states[op.id] = await c.inspect()
                    if len(world.operators) > 1:
                        settlements[op.id] = await c.settlement()
                break
            except EvchargeError as exc:
                if exc.code == "unavailable" and i + 1 < len(addresses):
                    continue
                print(f"operator {op.id}: {exc.code}: {exc.message}")
                return 1
    broken = violations(states, allow_holds=args.allow_holds, now=time.time()) + settlement_violations(settlements)
    for problem in broken:
        print(f"VIOLATION: {problem}")
    transit = in_transit(settlements)
    records = f", {transit} charge records on their way home" if transit else ""
    print(f"{summary(states)}{records}: {'invariants hold' if not broken else f'{len(broken)} violations'}")
    return 1 if broken else 0


def _operator_connector(world: World, args: argparse.Namespace) -> Callable[[], Any]:
    """Connects as the operator's own tool (``--operator``, ``--server``, TLS options)."""
    op = world.operator(args.operator)
    host, port = _address(world, op.id, args.server)
    context, name = client_tls(args, op)

    fallbacks = world_fallbacks(op, host, port)

    def connector() -> Any:
        if fallbacks:  # its standby may be the one serving: a link tries each address in turn
            link = Link(
                host,
                port,
                role="operator",
                ident=op.id,
                secret=op.secret,
                ssl_context=context,
                server_hostname=name,
                what=f"operator {op.id}",
                fallbacks=fallbacks,
            )
            return link.running()
        return connect(
            host, port, role="operator", ident=op.id, secret=op.secret, ssl_context=context, server_hostname=name
        )

    return connector


async def run_settlement(world: World, args: argparse.Namespace) -> int:
    async def settlement(c: Requests, args: argparse.Namespace, out: Console) -> Any:
        result = await c.settlement()
        if not args.json:
            out.print(render.settlement_table(result))
        return result

    return await _run_client(args, _operator_connector(world, args), settlement)


# --- vehicles and inspect -------------------------------------------------------------------


async def run_vehicle(world: World, args: argparse.Namespace) -> int:
    vehicle = world.vehicle(args.id)
    check_command(args, world)
    host, port = _address(world, vehicle.home, args.server)
    context, name = client_tls(args, world.operator(vehicle.home))
    if args.command is None:
        from evcharge.apps.repl import VehicleRepl

        position = parse_position(args.position, world.gazetteer()) if args.position else None
        repl = VehicleRepl(
            world,
            vehicle,
            host,
            port,
            start_soc=args.start_soc / 100,
            position=position,
            position_every=args.position_every,
            ssl_context=context,
            server_hostname=name,
        )
        return await repl.run()

    if args.log_level != "debug":  # a one-shot command prints its answer, not its connection's life
        logging.getLogger("evcharge.links").setLevel(logging.WARNING)

    def connector() -> Any:
        # A link, not one connection: a reply lost to a broken connection is asked for again
        # (with the request's idempotency key) once it is back, and the truth reported.
        link = Link(
            host,
            port,
            role="vehicle",
            ident=vehicle.id,
            secret=vehicle.token,
            ssl_context=context,
            server_hostname=name,
            what=f"operator {vehicle.home}",
            answer_within=args.answer_within,
            fallbacks=world_fallbacks(world.operator(vehicle.home), host, port),
        )
        return link.running()

    return await _run_client(args, connector, functools.partial(vehicle_command, cities=world.gazetteer()))


async def run_inspect(world: World, args: argparse.Namespace) -> int:
    return await _run_client(args, _operator_connector(world, args), inspect)


async def _run_client(
    args: argparse.Namespace,
    connector: Callable[[], Any],
    command: Callable[[Requests, argparse.Namespace, Console], Awaitable[Any]],
) -> int:
    # Tables need room; a pipe or a log file gets a generous width, not 80.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    try:
        async with connector() as client:
            result = await command(client, args, console)
    except OutcomeUnknownError as exc:
        settle = "trips --all" if args.command in ("book", "cancel-trip") else "reservations --all"
        hint = f"evcharge vehicle --id {args.id} {settle}" if getattr(args, "id", None) else "evcharge inspect"
        if args.json:
            print(render.to_json({"error": {"code": "outcome_unknown", "message": exc.message, "settle": hint}}))
        else:
            console.print(f"[red]outcome unknown[/]: {exc.message}. See what happened with: {hint}")
        return EXIT_OUTCOME_UNKNOWN
    except EvchargeError as exc:
        if args.json:
            error: dict[str, Any] = {"code": exc.code, "message": exc.message}
            if exc.next_free is not None:
                error["next_free"] = exc.next_free
            print(render.to_json({"error": error}))
        else:
            console.print(f"[red]{exc.code}[/]: {exc.message}")
        return 1
    except UsageError as exc:
        print(f"evcharge {args.command_name}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(render.to_json(result))
    return 0


async def inspect(c: Requests, args: argparse.Namespace, out: Console) -> Any:
    result = await c.inspect()
    if not args.json:
        out.print(render.stations_table(result.stations, result.server_time, title=f"Operator {result.operator_id}"))
        out.print(render.reservations_table(result.reservations, result.server_time))
    return {
        "operator_id": result.operator_id,
        "server_time": result.server_time,
        "stations": result.stations,
        "reservations": result.reservations,
    }
