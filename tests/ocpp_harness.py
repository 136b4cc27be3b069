"""What the OCPP tests share: credentials, a gateway in-process or as a process, waiting for a condition."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evcharge.apps.ocpp import mapping as m
from evcharge.apps.ocpp.gateway import Gateway
from evcharge.apps.ocpp.throttle import LoginThrottle
from evcharge.domain.world import World
from evcharge.operator.server import Server
from tools.harness import ROOT


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def secret_of(world: World, cp_id: str) -> str:
    known = {cp.id: cp.secret for s in world.stations for cp in s.charge_points}
    return known.get(cp_id, "some-secret")


@asynccontextmanager
async def running_gateway(
    server: Server, port: int = 0, server_port: int | None = None, **options: Any
) -> AsyncIterator[Gateway]:
    # Failed logins answered at once, unless a test is about how long they take.
    options.setdefault("throttle", LoginThrottle(first_delay=0.0))
    gateway = Gateway(
        server.world,
        server.operator.id,
        host="127.0.0.1",
        port=port,
        server_host="127.0.0.1",
        server_port=server_port or server.port,
        **options,
    )
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


def now_text() -> str:
    return m.ocpp_time(datetime.now(UTC))


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def status(server: Server, cp_id: str) -> str:
    cp = server.books.charge_points[cp_id]
    return server.views.status_of(cp, server.clock.now())


class GatewayProcess:
    """``evcharge ocpp-gateway`` as a child process, through the command line."""

    def __init__(self, world_path: Path, server_port: int, port: int, tmp_path: Path, extra: tuple[str, ...]) -> None:
        self.args = [
            sys.executable,
            "-m",
            "evcharge",
            "ocpp-gateway",
            "--world",
            str(world_path),
            "--operator",
            "A",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--server",
            f"127.0.0.1:{server_port}",
            "--log-level",
            "info",
            *extra,
        ]
        self.tmp_path = tmp_path
        self.log_path = tmp_path / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _launch(self) -> Path:
        ready = self.tmp_path / f"gateway.{time.monotonic_ns()}.ready"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.args, "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ
            )
        return ready

    async def start(self, timeout: float = 20.0) -> None:
        ready = self._launch()
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            while not ready.exists():
                assert self.proc.poll() is None, self.log_path.read_text()
                await asyncio.sleep(0.05)

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            while self.proc.poll() is None:
                await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
