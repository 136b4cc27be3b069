"""Charge-point simulator: each charge point a coroutine speaking the station role.

A charge point connects with its secret, reports itself available, heartbeats,
obeys RemoteStart/RemoteStop, and while charging sends meter values at its
power (scaled by the server's time scale). It reconnects with backoff when the
server goes away. One that the server replaced by a newer connection of the same
charge point (another simulator, or the OCPP gateway for a real one) says so and
stops, instead of taking it back and being replaced again, forever.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Sequence
from datetime import datetime

from evcharge.domain.world import ChargePointConfig, World
from evcharge.links.client import Client
from evcharge.links.link import Link, world_fallbacks
from evcharge.wire import protocol as p
from evcharge.wire.errors import ConflictError

log = logging.getLogger(__name__)

METER_INTERVAL = 0.5  # real seconds between meter values


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
        fallbacks: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.cp = cp
        self.fault_rate = fault_rate
        self.link = Link(
            host,
            port,
            role="station",
            ident=cp.id,
            secret=cp.secret,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            heartbeat=heartbeat_s,
            replaced_is_final=True,
            on_up=self._came_up,
            on_down=self._went_down,
            name=f"charge point {cp.id}",
            fallbacks=fallbacks,
        )
        self.charging: str | None = None
        self.kwh = 0.0
        self._meter: asyncio.Task[None] | None = None
        self.sessions_completed = 0
        self.replaced = ""  # why the server took this charge point from us, if it did

    @property
    def client(self) -> Client | None:
        return self.link.client

    async def run(self) -> None:
        """Stay connected until cancelled or replaced (or refused: that error is raised)."""
        try:
            await self.link.run()
        except ConflictError as exc:
            self.replaced = exc.message
            log.warning(
                "%s: no longer simulated: %s (leave it out with --except %s)", self.cp.id, exc.message, self.cp.id
            )

    async def _came_up(self, client: Client) -> None:
        client.on_request = self._handle
        await client.report_status("available")
        log.info("%s: online at %s", self.cp.id, self.link.address)

    def _went_down(self, reason: str) -> None:
        if self._meter is not None:
            self._meter.cancel()
            self._meter = None
        self.charging = None  # the server ends a session whose charge point went away

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
    skip: list[str] | None = None,
    fault_rate: float = 0.0,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> dict[str, str]:
    """Run every charge point of an operator (or just ``only``, less ``skip``) until cancelled.

    Returns when every one was replaced by another connection: their ids and why.
    """
    op = world.operator(operator_id)
    every = [cp for s in world.stations_of(operator_id) for cp in s.charge_points]
    missing = (set(only or ()) | set(skip or ())) - {cp.id for cp in every}
    if missing:
        raise ValueError(f"operator {operator_id} has no charge point {', '.join(sorted(missing))}")
    cps = [cp for cp in every if (not only or cp.id in only) and cp.id not in (skip or ())]
    if not cps:
        raise ValueError("no charge point left to simulate")
    host = host or op.host
    port = port if port is not None else op.port
    sims = [
        ChargePointSim(
            cp,
            host,
            port,
            fallbacks=world_fallbacks(op, host, port),
            heartbeat_s=world.rules.heartbeat_s,
            fault_rate=fault_rate,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
        )
        for cp in cps
    ]
    log.info("simulating %d charge points of operator %s", len(sims), operator_id)
    tasks = [asyncio.ensure_future(sim.run()) for sim in sims]
    try:
        await asyncio.gather(*tasks)  # until cancelled, or a charge point is refused (its error is raised)
        return {sim.cp.id: sim.replaced for sim in sims}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
