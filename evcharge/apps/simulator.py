"""Charge-point simulator: each charge point a coroutine speaking the station role.

A charge point connects with its secret, reports itself available, heartbeats,
obeys RemoteStart/RemoteStop, and while charging sends meter values at its
power (scaled by the server's time scale). It reconnects with backoff when the
server goes away.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from datetime import datetime

from evcharge.domain.world import ChargePointConfig, World
from evcharge.links.client import Backoff, Client, open_client
from evcharge.wire import protocol as p
from evcharge.wire.errors import ConflictError, EvchargeError

log = logging.getLogger(__name__)

METER_INTERVAL = 0.5  # real seconds between meter values
MAX_BACKOFF = 5.0


class ChargePointSim:
    def __init__(
        self,
        cp: ChargePointConfig,
        host: str,
        port: int,
        *,
        heartbeat_s: float = 30.0,
        fault_rate: float = 0.0,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.cp = cp
        self.host = host
        self.port = port
        self.ssl_context, self.server_hostname = ssl_context, server_hostname
        self.heartbeat_s = heartbeat_s
        self.fault_rate = fault_rate
        self.client: Client | None = None
        self.charging: str | None = None
        self.kwh = 0.0
        self._meter: asyncio.Task[None] | None = None
        self.sessions_completed = 0

    async def run(self) -> None:
        """Stay connected until cancelled."""
        backoff = Backoff(cap=MAX_BACKOFF)
        while True:
            try:
                self.client = await open_client(
                    self.host,
                    self.port,
                    role="station",
                    ident=self.cp.id,
                    secret=self.cp.secret,
                    ssl_context=self.ssl_context,
                    server_hostname=self.server_hostname,
                )
            except EvchargeError as exc:
                log.info("%s: %s; retrying in %.1f s", self.cp.id, exc.message, backoff.delay)
                await backoff.sleep()
                continue
            backoff.reset()
            try:
                await self._connected(self.client)
            except EvchargeError as exc:
                log.info("%s: connection lost: %s", self.cp.id, exc.message)
            finally:
                await self._stop_meter()
                self.charging = None  # the server ends a session whose charge point went away
                await self.client.close()
                self.client = None

    async def _connected(self, client: Client) -> None:
        client.on_request = self._handle
        await client.report_status("available")
        log.info("%s: online at %s:%d", self.cp.id, self.host, self.port)
        closed = asyncio.ensure_future(client.closed.wait())
        try:
            while not client.closed.is_set():
                done, _ = await asyncio.wait({closed}, timeout=self.heartbeat_s)
                if not done:
                    await client.heartbeat()
        finally:
            closed.cancel()

    async def _handle(self, request: p.Request) -> p.Reply:
        match request:
            case p.RemoteStart(reservation_id=rid, vehicle_id=vehicle, until=until):
                if self.charging is not None and self.charging != rid:
                    raise ConflictError(f"{self.cp.id} is charging {self.charging}")
                if self.charging is None:
                    self.charging, self.kwh = rid, 0.0
                    self._meter = asyncio.get_running_loop().create_task(self._run_meter(rid, until))
                    log.info("%s: charging %s for %s", self.cp.id, rid, vehicle)
                return p.Ok()
            case p.RemoteStop(reservation_id=rid):
                kwh = self.kwh if self.charging == rid else 0.0
                if self.charging == rid:
                    await self._stop_meter()
                    self.charging = None
                    self.sessions_completed += 1
                    log.info("%s: stopped %s at %.2f kWh", self.cp.id, rid, kwh)
                return p.SessionReport(reservation_id=rid, kwh=round(kwh, 4))
        raise ConflictError(f"{self.cp.id} does not handle {type(request).__name__}")

    async def _run_meter(self, reservation_id: str, until: datetime) -> None:
        """Meter at full power until stopped, faulted, or the slot ends (then report it ourselves)."""
        assert self.client is not None
        client = self.client
        began = time.monotonic()
        rate = self.cp.power_kw * client.time_scale / 3600.0  # kWh per real second
        while True:
            await asyncio.sleep(METER_INTERVAL)
            self.kwh = (time.monotonic() - began) * rate
            if self.fault_rate and random.random() < self.fault_rate * METER_INTERVAL:
                log.warning("%s: simulated fault while charging %s", self.cp.id, reservation_id)
                self.charging = None
                await client.report_status("faulted", "simulated fault")
                await asyncio.sleep(2.0)
                await client.report_status("available")
                return
            if client.server_now() >= until:
                self.charging = None
                self.sessions_completed += 1
                log.info("%s: slot of %s ended at %.2f kWh", self.cp.id, reservation_id, self.kwh)
                await client.session_complete(reservation_id, round(self.kwh, 4), "reservation ended")
                return
            client.send_meter(reservation_id, round(self.kwh, 4))

    async def _stop_meter(self) -> None:
        if self._meter is not None:
            self._meter.cancel()
            await asyncio.gather(self._meter, return_exceptions=True)
            self._meter = None


async def run_stations(
    world: World,
    operator_id: str,
    *,
    host: str | None = None,
    port: int | None = None,
    only: list[str] | None = None,
    fault_rate: float = 0.0,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> None:
    """Run every charge point of an operator (or just ``only``) until cancelled."""
    op = world.operator(operator_id)
    cps = [cp for s in world.stations_of(operator_id) for cp in s.charge_points if not only or cp.id in only]
    if only:
        missing = set(only) - {cp.id for cp in cps}
        if missing:
            raise ValueError(f"operator {operator_id} has no charge point {', '.join(sorted(missing))}")
    sims = [
        ChargePointSim(
            cp,
            host or op.host,
            port if port is not None else op.port,
            heartbeat_s=world.rules.heartbeat_s,
            fault_rate=fault_rate,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
        )
        for cp in cps
    ]
    log.info("simulating %d charge points of operator %s", len(sims), operator_id)
    await asyncio.gather(*(sim.run() for sim in sims))
