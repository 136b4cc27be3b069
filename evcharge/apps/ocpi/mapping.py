"""Our model in OCPI's words: stations as Locations, charge points as EVSEs, reservations as sessions and bookings.

Every table here is one decision, written once (docs/ocpi.md shows them).
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta

from evcharge.apps.ocpi import objects as o
from evcharge.domain.world import OcpiConfig, OperatorConfig, Rules
from evcharge.wire import protocol as p

# Our charge-point status -> OCPI EvseStatus. Offline is UNKNOWN: nobody can say, and it cannot be reserved.
EVSE_STATUS: dict[str, o.EvseStatus] = {
    "available": "AVAILABLE",
    "reserved": "RESERVED",
    "charging": "CHARGING",
    "faulted": "OUTOFORDER",
    "unavailable": "INOPERATIVE",
    "offline": "UNKNOWN",
    "unknown": "UNKNOWN",
}
BOOKABLE = frozenset({"AVAILABLE", "RESERVED", "CHARGING"})  # online and in service

# Our connector names -> (OCPI ConnectorType, format, power type, volts).
CONNECTORS: dict[str, tuple[str, str, str, int]] = {
    "ccs2": ("IEC_62196_T2_COMBO", "CABLE", "DC", 500),
    "ccs1": ("IEC_62196_T1_COMBO", "CABLE", "DC", 500),
    "chademo": ("CHADEMO", "CABLE", "DC", 500),
    "type2": ("IEC_62196_T2", "SOCKET", "AC_3_PHASE", 230),
    "type1": ("IEC_62196_T1", "CABLE", "AC_1_PHASE", 230),
}
CONNECTOR_ID = "1"  # each of our charge points has one connector

# A roaming driver's reservation state -> the OCPI Booking's ReservationStatus.
BOOKING_STATUS: dict[str, o.ReservationStatus] = {
    "held": "RESERVED",
    "booked": "RESERVED",
    "charging": "FULFILLED",
    "completed": "FULFILLED",
    "expired": "NO_SHOW",
    "cancelled": "CANCELED",
    "aborted": "CANCELED",
}
FINAL_BOOKING = frozenset({"CANCELED", "NO_SHOW", "REJECTED", "FAILED", "FULFILLED"})
LIVE = frozenset({"held", "booked", "charging"})


def connector_kind(connector: str, power_kw: float) -> tuple[str, str, str, int]:
    known = CONNECTORS.get(re.sub(r"[^a-z0-9]", "", connector.casefold()))
    if known is not None:
        return known
    return (
        ("IEC_62196_T2_COMBO", "CABLE", "DC", 500) if power_kw >= 50 else ("IEC_62196_T2", "SOCKET", "AC_3_PHASE", 230)
    )


def tariff_id(price_per_kwh: float) -> str:
    """One tariff per price: a charge point's tariff says only its price per kWh."""
    return f"KWH-{price_per_kwh:.4f}".rstrip("0").rstrip(".")


def evse_id(ocpi: OcpiConfig, cp_id: str) -> str:
    """The eMI3 EVSE ID: country * operator * E + the charge point id in its alphabet."""
    return f"{ocpi.country_code}*{ocpi.party_id}*E" + re.sub(r"[^A-Z0-9]", "*", cp_id.upper())


def driver_id(country_code: str, party_id: str, uid: str) -> str:
    """The roaming driver a token of an eMSP is in our ledger (``evcharge.wire.protocol.ROAMING_DRIVER_PREFIX``)."""
    return f"{p.ROAMING_DRIVER_PREFIX}{country_code.upper()}-{party_id.upper()}:{uid}"


def party_of_driver(driver: str) -> str | None:
    """ "CC-PID" of a roaming driver id, or None for anyone else (a vehicle of the world)."""
    if not p.is_roaming_driver(driver):
        return None
    party, sep, _uid = driver[len(p.ROAMING_DRIVER_PREFIX) :].partition(":")
    return party if sep else None


def party_key(country_code: str, party_id: str) -> str:
    return f"{country_code.upper()}-{party_id.upper()}"


def connector(cp: p.ChargePointInfo, updated: str) -> o.Connector:
    standard, fmt, power_type, volts = connector_kind(cp.connector, cp.power_kw)
    watts = round(cp.power_kw * 1000)
    phases = 3 if power_type == "AC_3_PHASE" else 1
    return o.Connector(
        id=CONNECTOR_ID,
        standard=standard,
        format=fmt,  # type: ignore[arg-type]
        power_type=power_type,  # type: ignore[arg-type]
        max_voltage=volts,
        max_amperage=max(1, math.ceil(watts / (volts * phases))),
        max_electric_power=watts,
        tariff_ids=[tariff_id(cp.price_per_kwh)],
        last_updated=updated,
    )


def geo(station: p.StationInfo) -> o.GeoLocation:
    return o.GeoLocation(latitude=f"{station.lat:.6f}", longitude=f"{station.lon:.6f}")


def evse(ocpi: OcpiConfig, station: p.StationInfo, cp: p.ChargePointInfo, updated: str) -> o.Evse:
    return o.Evse(
        uid=cp.id,
        evse_id=evse_id(ocpi, cp.id),
        status=EVSE_STATUS.get(cp.status, "UNKNOWN"),
        capabilities=["RESERVABLE", "REMOTE_START_STOP_CAPABLE"],
        connectors=[connector(cp, updated)],
        coordinates=geo(station),
        last_updated=updated,
    )


def location(
    operator: OperatorConfig, ocpi: OcpiConfig, station: p.StationInfo, updated: dict[str, str], default: str
) -> o.Location:
    """A station as a Location; ``updated`` has each charge point's last change (OCPI time strings)."""
    evses = [evse(ocpi, station, cp, updated.get(cp.id, default)) for cp in station.charge_points]
    return o.Location(
        country_code=ocpi.country_code,
        party_id=ocpi.party_id,
        id=station.id,
        publish=True,
        name=station.name,
        address=station.name,  # the world file has no street address: the station's name stands for it
        city=station.city,
        country=ocpi.country,
        coordinates=geo(station),
        evses=evses,
        operator=o.OperatorDetails(name=operator.name),
        time_zone=ocpi.time_zone,
        last_updated=max((e.last_updated for e in evses), default=default),
    )


def tariffs(ocpi: OcpiConfig, stations: list[p.StationInfo], updated: str) -> list[o.Tariff]:
    prices = sorted({cp.price_per_kwh for s in stations for cp in s.charge_points})
    return [
        o.Tariff(
            country_code=ocpi.country_code,
            party_id=ocpi.party_id,
            id=tariff_id(price),
            currency=ocpi.currency,
            type="REGULAR",
            elements=[o.TariffElement(price_components=[o.PriceComponent(type="ENERGY", price=price, step_size=1)])],
            last_updated=updated,
        )
        for price in prices
    ]


def booking_terms(rules: Rules) -> o.BookingTerms:
    """Our own rules, as booking terms: what a vehicle of ours may do, a foreign driver may do."""
    return o.BookingTerms(
        RFID_auth_required=False,
        token_groups_supported=False,
        remote_auth_supported=True,
        supported_access_methods=["OPEN"],
        change_until_minutes=0,
        cancel_until_minutes=0,  # a booked slot may be cancelled until charging starts
        change_not_allowed=True,  # cancel and book again: a change could lose the slot it replaces
        early_start_allowed=rules.early_start_min > 0,
        early_start_time=rules.early_start_min,
        noshow_timeout=rules.no_show_grace_min,
        noshow_fee=False,
        late_stop_allowed=False,
        overlapping_bookings_allowed=True,
    )


def free_slots(
    busy: list[tuple[datetime, datetime]], begin: datetime, end: datetime, min_len: timedelta
) -> list[tuple[datetime, datetime]]:
    """The gaps of ``[begin, end)`` between busy intervals, each at least ``min_len`` long."""
    gaps: list[tuple[datetime, datetime]] = []
    at = begin
    for start, stop in sorted(busy):
        if stop <= at:
            continue
        if start >= end:
            break
        if start - at >= min_len:
            gaps.append((at, start))
        at = max(at, stop)
    if end - at >= min_len:
        gaps.append((at, end))
    return gaps


def minutes_between(start: datetime, end: datetime) -> int:
    """A booking's length in our whole minutes: a part of a minute counts as a minute."""
    return max(0, math.ceil((end - start).total_seconds() / 60))
