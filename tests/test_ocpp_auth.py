"""Guessing a charge point's password costs time: each failed Basic-auth handshake is answered later.

Per charge point id and per source address (docs/security.md): the n-th failure in a row
waits twice as long as the one before, up to a cap; a guesser trying in parallel is turned
away unheard; a right password, from another id (even from the same address), is not slowed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from evcharge.apps.ocpp.throttle import LoginThrottle, address_key
from evcharge.domain.world import World
from evcharge.operator.server import Server

from .ocpp_harness import basic, running_gateway, secret_of

pytestmark = pytest.mark.timeout(90)


async def attempt(port: int, cp_id: str, password: str, *, source: str = "127.0.0.1") -> int:
    """One handshake: 101 if it got through, else the HTTP status it was refused with."""
    try:
        async with connect(
            f"ws://127.0.0.1:{port}/{cp_id}",
            subprotocols=["ocpp1.6"],  # type: ignore[list-item]
            additional_headers=basic(cp_id, password),
            local_addr=(source, 0),
            open_timeout=30,
            close_timeout=2,
        ):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


async def timed(port: int, cp_id: str, password: str, **options: Any) -> tuple[int, float]:
    began = time.monotonic()
    code = await attempt(port, cp_id, password, **options)
    return code, time.monotonic() - began


def test_the_delay_doubles_up_to_its_cap_and_is_forgotten() -> None:
    now = [1000.0]
    throttle = LoginThrottle(first_delay=0.5, max_delay=8.0, forget_after=60.0, clock=lambda: now[0])
    assert [throttle.delay(n) for n in range(8)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert throttle.delay(10_000) == 8.0
    assert address_key("127.0.0.1") == "127.0.0.1"
    assert address_key("::ffff:10.1.2.3") == "10.1.2.3"
    # One customer's IPv6 addresses are one address: its /64.
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")


async def test_the_nth_wrong_try_waits_longer_and_a_right_one_from_another_id_does_not(
    server: Server, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="evcharge.apps.ocpp")
    throttle = LoginThrottle(first_delay=0.5, max_delay=4.0)
    async with running_gateway(server, throttle=throttle) as gw:
        waited = []
        for _ in range(4):
            code, seconds = await timed(gw.port, "NAT-PN-2", "a-guess")
            assert code == 401
            waited.append(seconds)
        # Each refusal came no sooner than its delay: 0.5, 1, 2, 4 s.
        assert all(w >= d for w, d in zip(waited, [0.5, 1.0, 2.0, 4.0], strict=True)), waited
        assert waited[3] > waited[0] * 4, waited
        lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert any("charge point NAT-PN-2 from 127.0.0.1" in line and "4 in a row" in line for line in lines), lines

        # The 5th wrong try is held for 4 s; meanwhile another charge point logs in from the
        # same address at once, and a second try at NAT-PN-2 -- even the right password -- is
        # turned away unheard: guessing in parallel learns nothing.
        fifth = asyncio.create_task(timed(gw.port, "NAT-PN-2", "another-guess"))
        await asyncio.sleep(0.2)
        assert await attempt(gw.port, "NAT-PN-1", secret_of(world, "NAT-PN-1")) == 101
        assert not fifth.done(), "the right password of another id waited for a wrong one"
        assert await attempt(gw.port, "NAT-PN-2", secret_of(world, "NAT-PN-2")) == 429
        code, seconds = await fifth
        assert code == 401 and seconds >= 4.0

        # Once nothing is held, the right password gets in, and the id's count starts again.
        assert await attempt(gw.port, "NAT-PN-2", secret_of(world, "NAT-PN-2")) == 101
        caplog.clear()
        assert await attempt(gw.port, "NAT-PN-2", "wrong-again") == 401
        lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert any("1 in a row for this id" in line for line in lines), lines


async def test_failures_count_per_source_address_too(
    server: Server, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="evcharge.apps.ocpp")
    throttle = LoginThrottle(first_delay=0.2, max_delay=1.6, max_waiting_per_address=2)
    async with running_gateway(server, throttle=throttle) as gw:
        # One address trying many ids (and ids that do not exist) is slowed down as a whole.
        for cp_id in ("NAT-PN-1", "NAT-PN-2", "NO-SUCH-CP", "NAT-PN-3", "JPA-1-1"):
            assert await attempt(gw.port, cp_id, "a-guess", source="127.0.0.3") in (401, 404)
        lines = [r.getMessage() for r in caplog.records if "from 127.0.0.3" in r.getMessage()]
        assert "5 from this address); answering in 1.60 s" in lines[-1], lines
        # Another address starts from nothing.
        caplog.clear()
        assert await attempt(gw.port, "MOS-1-1", "a-guess", source="127.0.0.4") == 401
        [line] = [r.getMessage() for r in caplog.records if "from 127.0.0.4" in r.getMessage()]
        assert "1 from this address); answering in 0.20 s" in line
        # Past the failures an address may have held at once, its next tries are turned away unheard...
        held = [asyncio.create_task(attempt(gw.port, cp, "x", source="127.0.0.3")) for cp in ("FOR-1-1", "FOR-1-2")]
        await asyncio.sleep(0.3)
        assert await attempt(gw.port, "FOR-1-3", secret_of(world, "FOR-1-3"), source="127.0.0.3") == 429
        # ...but not those of another address.
        assert await attempt(gw.port, "FOR-1-4", secret_of(world, "FOR-1-4"), source="127.0.0.4") == 101
        assert await asyncio.gather(*held) == [401, 401]
