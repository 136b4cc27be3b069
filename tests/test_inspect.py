"""An operator's whole state, even when it does not fit in one frame."""

from __future__ import annotations

from pathlib import Path

import pytest

from evcharge.wire import protocol as p
from evcharge.wire.errors import BadRequestError
from tools.bench import bench_world

from .conftest import operator, running_server

pytestmark = pytest.mark.timeout(120)


async def test_a_big_operator_is_inspected_in_parts_of_one_snapshot(tmp_path: Path) -> None:
    world = bench_world(tmp_path / "world.toml", operators=("A",), scale_charge_points=12_000)
    charge_points = sum(len(s.charge_points) for s in world.stations)
    async with running_server(world, tmp_path / "data") as server, operator(server) as c:
        first = await c.call(p.Inspect(), p.InspectResult)
        assert first.more, "12,000 charge points fit in one frame: this test no longer tests paging"
        whole = await c.inspect()
        assert not whole.more
        assert sorted(s.id for s in whole.stations) == sorted(s.id for s in world.stations)
        assert sum(len(s.charge_points) for s in whole.stations) == charge_points
        # A cursor is good for one snapshot, part by part: a newer Inspect replaces it.
        with pytest.raises(BadRequestError, match="inspect cursor"):
            await c.call(p.Inspect(cursor=first.more), p.InspectResult)
        with pytest.raises(BadRequestError, match="inspect cursor"):
            await c.call(p.Inspect(cursor="made-up"), p.InspectResult)
        assert len((await c.inspect()).stations) == len(world.stations)  # the connection still works
