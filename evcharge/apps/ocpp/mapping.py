"""How OCPP 1.6 and 2.0.1 meet evcharge's model: statuses, id tags, ids, meter readings, times.

Pure functions and tables, no I/O; the gateway's version classes (``v16``, ``v201``) do the
talking. The README's "OCPP" section shows the same mapping as tables.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from evcharge.domain.world import Rules, VehicleConfig
from evcharge.wire import protocol as p

# OCPP 1.6's idTag is a CiString20: at most 20 characters, compared without regard to case
# (2.0.1's idToken takes 36; the same tag serves both).
ID_TAG_MAX = 20

# What an OCPP connector status says about the charge point being usable. Only Faulted and
# Unavailable take it out of service; the rest are moments of normal use, and the server
# derives `charging` and `reserved` from its own books (sessions and reservations), which
# are what users see.
OCPP_STATUS: dict[str, p.ReportedStatus] = {
    "Available": "available",
    "Preparing": "available",  # plugged in or driver authorized, no transaction yet
    "Charging": "available",  # in a transaction: the server shows its session as `charging`
    "SuspendedEV": "available",  # in a transaction, the car takes no energy for now
    "SuspendedEVSE": "available",  # in a transaction, the charger gives no energy for now
    "Finishing": "available",  # transaction over, cable still in
    "Reserved": "available",  # the server shows `reserved` from its ledger
    "Occupied": "available",  # 2.0.1: a cable in or a transaction; the server shows its session as `charging`
    "Unavailable": "unavailable",  # out of service on purpose
    "Faulted": "faulted",
}
_SEVERITY: dict[str, int] = {"available": 0, "unavailable": 1, "faulted": 2}


def reported_status(connectors: Mapping[int, tuple[str, str]]) -> tuple[p.ReportedStatus, str] | None:
    """Our status from the last OCPP status of each connector that is ours.

    In 1.6 those are connector 0 (the whole charge point) and 1; in 2.0.1 the connectors of
    EVSE 1. The worst wins: a charge point whose controller is Faulted is faulted whatever
    its connector says. None until the charge point has said anything.
    """
    if not connectors:
        return None
    mapped = [(OCPP_STATUS.get(status, "available"), info) for status, info in connectors.values()]
    return max(mapped, key=lambda pair: _SEVERITY[pair[0]])


def status_info(status: str, error_code: str, info: str | None, vendor_error_code: str | None) -> str:
    """A StatusNotification's details as one line for the operator (``OCPP Faulted GroundFailure: ...``)."""
    text = f"OCPP {status}"
    if error_code and error_code != "NoError":
        text += f" {error_code}"
    if vendor_error_code:
        text += f" (vendor {vendor_error_code})"
    if info:
        text += f": {info}"
    return text


# --- identities ----------------------------------------------------------------------------


def id_tag(vehicle_id: str) -> str:
    """The idTag that stands for a vehicle: its id, or a token derived from it if too long."""
    if len(vehicle_id) <= ID_TAG_MAX:
        return vehicle_id
    return "EV" + hashlib.sha256(vehicle_id.encode()).hexdigest()[: ID_TAG_MAX - 2].upper()


class IdTags:
    """idTag -> vehicle id, for every vehicle of the world (trip stops bring other operators' vehicles)."""

    def __init__(self, vehicles: Iterable[VehicleConfig]) -> None:
        self._vehicles: dict[str, str] = {}
        for vehicle in vehicles:
            self._vehicles.setdefault(id_tag(vehicle.id).casefold(), vehicle.id)

    def vehicle(self, tag: str) -> str | None:
        return self._vehicles.get(tag.casefold())


# --- authorization ------------------------------------------------------------------------

# What the server says about a tag at this charge point now, before either version names it.
Verdict = Literal["accepted", "charging", "unknown", "not here", "not now", "refused", "unchecked"]

# 1.6 has few words for it; 2.0.1 tells a driver why (no reservation here, its slot is not now).
AUTHORIZATION_16: dict[Verdict, str] = {
    "accepted": "Accepted",
    "charging": "ConcurrentTx",
    "unknown": "Invalid",
    "not here": "Blocked",
    "not now": "Blocked",
    "refused": "Blocked",
    "unchecked": "Invalid",  # the server cannot be asked: nobody charges unchecked
}
AUTHORIZATION_201: dict[Verdict, str] = {
    "accepted": "Accepted",
    "charging": "ConcurrentTx",
    "unknown": "Unknown",
    "not here": "NotAtThisLocation",
    "not now": "NotAtThisTime",
    "refused": "Blocked",
    "unchecked": "Invalid",
}


def refusal_verdict(error_code: str) -> Verdict:
    """The verdict for the server's refusal of an Authorize (its error code)."""
    if error_code == "not_found":
        return "not here"  # no reservation of this vehicle on this charge point
    if error_code == "conflict":
        return "not now"  # its slot has not begun, has ended, or someone is still charging
    return "refused"


# The idToken type of the tokens we send (RequestStartTransaction, ReserveNow): one the CSMS made.
ID_TOKEN_TYPE = "Central"


def token_tag(id_token: Mapping[str, Any] | None) -> str | None:
    """The tag a 2.0.1 idToken carries; None for NoAuthorization (no token at all) or an empty one.

    Every other type (an RFID card, a key code, a contract id, a MAC address, ours) is looked
    up by its value: a vehicle's tag is whatever way the driver presents it.
    """
    if not id_token or id_token.get("type") == "NoAuthorization":
        return None
    return str(id_token.get("id_token") or "") or None


def ocpp_id(reservation_id: str) -> int:
    """The OCPP integer (reservationId, transactionId) that stands for one of our reservations.

    Derived, not counted, so it is the same after a gateway restart; 31 bits, as many charge
    points keep it in a signed 32-bit integer. One transaction per reservation, so the
    reservation's number serves for its transaction too.
    """
    number = int.from_bytes(hashlib.sha256(reservation_id.encode()).digest()[:4], "big") & 0x7FFFFFFF
    return number or 1


# --- meter readings -----------------------------------------------------------------------

ENERGY_REGISTER = "Energy.Active.Import.Register"


def energy_register_wh(meter_values: Iterable[Mapping[str, Any]]) -> float | None:
    """The latest total energy register reading, in Wh, from a MeterValues ``meterValue`` list.

    The payload's keys are snake_case (as the ``ocpp`` library hands them over). A sample
    without a measurand is the energy register (OCPP's default); per-phase and signed samples
    and values that are not a finite non-negative number are skipped.
    """
    found: float | None = None
    for entry in meter_values:
        for sample in entry.get("sampled_value") or ():
            if sample.get("measurand", ENERGY_REGISTER) != ENERGY_REGISTER:
                continue
            if sample.get("phase") or sample.get("format") == "SignedData":
                continue
            try:
                value = float(sample.get("value", ""))
            except (TypeError, ValueError):
                continue
            if not math.isfinite(value) or value < 0:
                continue
            unit = sample.get("unit", "Wh")
            if unit == "kWh":
                value *= 1000.0
            elif unit != "Wh":
                continue
            found = value
    return found


def energy_register_wh_201(meter_values: Iterable[Mapping[str, Any]]) -> float | None:
    """The same from a 2.0.1 ``meterValue`` list: values are numbers, units carry a power of ten.

    Readings of the EV's own meter (``location`` EV) are not the charge point's register.
    """
    found: float | None = None
    for entry in meter_values:
        for sample in entry.get("sampled_value") or ():
            if sample.get("measurand", ENERGY_REGISTER) != ENERGY_REGISTER or sample.get("phase"):
                continue
            if sample.get("location", "Outlet") == "EV":
                continue
            unit = sample.get("unit_of_measure") or {}
            multiplier = unit.get("multiplier", 0)
            value = sample.get("value")
            if not isinstance(value, int | float) or not isinstance(multiplier, int) or not -9 <= multiplier <= 9:
                continue
            value = float(value) * 10.0**multiplier
            if not math.isfinite(value) or value < 0:
                continue
            name = unit.get("unit", "Wh")
            if name == "kWh":
                value *= 1000.0
            elif name != "Wh":
                continue
            found = value
    return found


def session_kwh(register_wh: float, start_wh: float) -> float | None:
    """Energy of a session from the register now and at its start (None: not a plausible reading)."""
    kwh = round(max(0.0, (register_wh - start_wh) / 1000.0), 4)
    return kwh if kwh <= 100_000 else None


# --- time -------------------------------------------------------------------------------


def ocpp_time(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and a Z, as charge points expect."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def wall_clock(simulated: datetime, server_now: datetime, time_scale: float) -> datetime:
    """The real moment at which the server's simulated clock shows ``simulated``.

    Charge points live in real time; a server may run faster (``--time-scale``). At x1 with
    no anchor the two are the same.
    """
    return datetime.now(UTC) + (simulated - server_now) / time_scale


def reserve_window(
    reservation: p.ReservationInfo, live: Iterable[p.ReservationInfo], rules: Rules
) -> tuple[datetime, datetime]:
    """From when to when the charge point itself should hold a reservation (OCPP ReserveNow).

    OCPP reservations start at once and last until an expiry date, so a reservation is sent
    when its vehicle may begin charging -- ``early_start_min`` before its start, but not while
    someone else's slot is still open -- and expires when the server would call it a no-show.
    """
    due = reservation.start - timedelta(minutes=rules.early_start_min)
    for other in live:
        if other.id != reservation.id and other.start < reservation.start and other.end > due:
            due = max(due, other.end)
    deadline = min(reservation.start + timedelta(minutes=rules.no_show_grace_min), reservation.end)
    return due, deadline
