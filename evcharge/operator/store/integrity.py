"""Whether books read from a store make sense, row by row, before anyone is served from them.

Any store (SQLite's, or another) returns a ``StoredState``; ``problems`` names
every row that cannot be what this server wrote: a state it never uses, an end
before its start, two live reservations on one charge point at once, a session
of a reservation that is not there, a trip that does not decode. Each problem
is one sentence naming the table and the row, so an operator can find it with
``sqlite3`` (or restore a backup). SQLite's own damage (pages, indexes) is the
SQLite store's check, not this one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterator

import msgspec

from evcharge.domain.model import LIVE_STATES, RESERVATION_STATES, TRIP_STATES, Reservation, Withdrawal
from evcharge.operator.store.base import StoredState
from evcharge.wire import protocol as p

# Meta values the server reads back as numbers (its clock across restarts).
NUMERIC_META = ("clock_anchor_sim", "clock_anchor_real", "time_scale")
WITHDRAWN_META = "withdrawn:"  # keys of stops an operator withdrew from trips (evcharge.operator.trips.participant)
_WITHDRAWAL_FIELDS = {f.name for f in dataclasses.fields(Withdrawal)}
_trip_info = msgspec.json.Decoder(p.TripInfo)


def problems(state: StoredState) -> list[str]:
    """Every row that makes no sense, as one sentence each (empty: the books are sound)."""
    return [*_reservations(state.reservations), *_sessions(state), *_trips(state), *_meta(state.meta)]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _reservations(reservations: list[Reservation]) -> Iterator[str]:
    sound: list[Reservation] = []
    for r in reservations:
        row = f"table reservations, row {r.id!r}"
        if not _is_text(r.id) or not _is_text(r.charge_point_id) or not _is_text(r.vehicle_id):
            yield f"{row}: its id, charge point or vehicle is not a name"
        elif not all(_is_int(t) for t in (r.start, r.end, r.created)):
            yield f"{row}: start, end and created must be whole seconds"
        elif r.end <= r.start:
            yield f"{row}: ends ({r.end}) before it starts ({r.start})"
        elif r.state not in RESERVATION_STATES:
            yield f"{row}: state {r.state!r} is not one of {', '.join(sorted(RESERVATION_STATES))}"
        elif r.state == "held" and not (
            isinstance(r.hold_deadline, int | float) and _is_text(r.txn_id) and _is_text(r.coordinator)
        ):
            yield f"{row}: held, but without the deadline, transaction and coordinator of a trip booking"
        elif r.trip_id is not None and not (_is_text(r.trip_id) and _is_text(r.coordinator)):
            yield f"{row}: a trip stop without its trip's id and coordinator"
        else:
            sound.append(r)
    live = sorted((r for r in sound if r.state in LIVE_STATES), key=lambda r: (r.charge_point_id, r.start))
    for cp, rows in itertools.groupby(live, key=lambda r: r.charge_point_id):
        for a, b in itertools.pairwise(rows):
            if b.start < a.end:
                yield (
                    f"table reservations, rows {a.id!r} and {b.id!r}: both {a.state}/{b.state} on charge point "
                    f"{cp} at once ([{a.start}, {a.end}) and [{b.start}, {b.end}))"
                )


def _sessions(state: StoredState) -> Iterator[str]:
    reservations = {r.id: r for r in state.reservations}
    for s in state.sessions:
        row = f"table charging_sessions, row {s.reservation_id!r}"
        r = reservations.get(s.reservation_id)
        if r is None:
            yield f"{row}: its reservation is not in table reservations"
        elif s.charge_point_id != r.charge_point_id or s.vehicle_id != r.vehicle_id:
            yield f"{row}: its charge point or vehicle is not its reservation's"
        elif not _is_int(s.started) or not (s.ended is None or (_is_int(s.ended) and s.ended >= s.started)):
            yield f"{row}: started and ended must be whole seconds, the end after the start"
        elif not all(isinstance(x, int | float) and math.isfinite(x) and x >= 0 for x in (s.kwh, s.price_per_kwh)):
            yield f"{row}: kWh and price must be numbers of at least 0"


def _trips(state: StoredState) -> Iterator[str]:
    for t in state.trips:
        row = f"table trips, row {t.id!r}"
        if t.state not in TRIP_STATES:
            yield f"{row}: state {t.state!r} is not one of {', '.join(sorted(TRIP_STATES))}"
        elif not _is_text(t.txn_id) or not _is_text(t.vehicle_id):
            yield f"{row}: its transaction or vehicle is not a name"
        elif not all(isinstance(x, list) and all(_is_text(o) for o in x) for x in (t.participants, t.unacked)):
            yield f"{row}: participants and unacked must be lists of operator ids"
        else:
            try:
                _trip_info.decode(t.info)
            except msgspec.DecodeError as exc:
                yield f"{row}: info is not a trip ({exc})"


def _meta(meta: dict[str, str]) -> Iterator[str]:
    for key in NUMERIC_META:
        if key in meta:
            try:
                if not math.isfinite(float(meta[key])):
                    raise ValueError
            except ValueError:
                yield f"table meta, row {key!r}: {meta[key]!r} is not a number"
    for key, value in meta.items():
        if key.startswith(WITHDRAWN_META):
            try:
                withdrawal = json.loads(value)
                ok = isinstance(withdrawal, dict) and set(withdrawal) == _WITHDRAWAL_FIELDS
            except ValueError:
                ok = False
            if not ok:
                yield f"table meta, row {key!r}: not a withdrawn stop"
