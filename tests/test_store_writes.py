"""Every kind of store write does the same on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from evcharge.domain.model import Trip
from evcharge.operator.store import put_trip, put_trip_unacked, store_for

from .conftest import NewStore


async def test_acknowledgements_change_a_stored_trips_unacked_alone(new_store: NewStore, tmp_path: Path) -> None:
    store = store_for(new_store(), tmp_path, "A")
    await asyncio.to_thread(store.open)
    store.start()
    try:
        trip = Trip("A-T1", "V01", "committed", "A-T1.1", ["A", "B", "C"], ["B", "C"], b'{"id": "A-T1"}', 7)
        await store.commit([put_trip(trip)])
        await store.commit([put_trip_unacked(replace(trip, unacked=["C"]))])
        assert (await store.reread()).trips == [replace(trip, unacked=["C"])]
        # Only what is stored is updated: a trip never stored stays unstored.
        await store.commit([put_trip_unacked(replace(trip, id="A-T2"))])
        assert [t.id for t in (await store.reread()).trips] == ["A-T1"]
    finally:
        await store.close()
