"""The world file: one TOML document describing a whole deployment.

Operators (who runs a server where), their stations and charge points, the
vehicles with their home operator, the cities trips go between, and the rules
every operator applies (reservations, and what a trip plan weighs).
``load_world`` checks it completely and reports the first problem as
``file: key: problem`` (TOML syntax errors carry their line and column).
"""

from __future__ import annotations

import difflib
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated

import msgspec

from evcharge.domain import geo

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
Secret = Annotated[str, msgspec.Meta(min_length=8, max_length=256)]
Latitude = Annotated[float, msgspec.Meta(ge=-90, le=90)]
Longitude = Annotated[float, msgspec.Meta(ge=-180, le=180)]
Positive = Annotated[float, msgspec.Meta(gt=0)]


class ChargePointConfig(msgspec.Struct, forbid_unknown_fields=True):
    id: Id
    power_kw: Annotated[float, msgspec.Meta(gt=0, le=1000)]
    connector: str
    price_per_kwh: Annotated[float, msgspec.Meta(ge=0)]
    secret: Secret


class StationConfig(msgspec.Struct, forbid_unknown_fields=True):
    id: Id
    operator: Id
    name: str
    city: str
    lat: Latitude
    lon: Longitude
    charge_points: Annotated[list[ChargePointConfig], msgspec.Meta(min_length=1)]


class OcpiConfig(msgspec.Struct, forbid_unknown_fields=True):
    """How the operator appears on OCPI roaming platforms (``evcharge ocpi``): its party and its locations."""

    country_code: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")]  # ISO 3166-1 alpha-2, of the party
    party_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Z0-9]{3}$")]
    country: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")] = "BRA"  # ISO 3166-1 alpha-3, of its locations
    time_zone: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "America/Fortaleza"
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")] = "BRL"  # ISO 4217, of price_per_kwh


class OperatorConfig(msgspec.Struct, forbid_unknown_fields=True):
    id: Id
    name: str
    host: str
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)]
    secret: Secret
    # Where other operators connect, when the operator runs a listener for peers apart
    # from the one at `port` (see `evcharge server --listen`).
    peer_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    # Other operators connect to it with TLS, verify its certificate, and show theirs.
    peer_tls: bool = False
    # The name its certificate carries, when not `host` (e.g. a server reached by IP).
    tls_name: str = ""
    # More places to reach it, "host:port" each, tried in turn after host:port by every client
    # and peer: where its standby server listens once it has taken over (same roles, same port
    # for peers).
    addresses: list[str] = []
    # Where its books are kept when `evcharge server` is given no --store: a postgresql:// URL
    # (empty: SQLite in the server's --data-dir).
    store: str = ""
    # Its party in OCPI (country code, party id), for `evcharge ocpi`.
    ocpi: OcpiConfig | None = None

    def __post_init__(self) -> None:
        for address in self.addresses:
            _host_port(address)  # a ValueError here is reported as the world file's error

    @property
    def peer_address(self) -> tuple[str, int]:
        return self.host, self.peer_port if self.peer_port is not None else self.port

    @property
    def fallbacks(self) -> list[tuple[str, int]]:
        """``addresses`` as (host, port), in order."""
        return [_host_port(a) for a in self.addresses]

    @property
    def certificate_name(self) -> str:
        return self.tls_name or self.host


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host, int(port)


class VehicleConfig(msgspec.Struct, forbid_unknown_fields=True):
    id: Id
    home: Id
    token: Secret
    battery_kwh: Positive
    consumption_kwh_per_km: Positive


class CityConfig(msgspec.Struct, forbid_unknown_fields=True):
    """A city trips may start or end in (and "near CITY" may name)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=geo.MAX_CITY_NAME)]
    lat: Latitude
    lon: Longitude
    state: str = ""
    population: Annotated[int, msgspec.Meta(ge=0)] = 0


class Rules(msgspec.Struct, forbid_unknown_fields=True):
    """Operating rules shared by every operator: `_min` in simulated minutes, `_s` in real seconds."""

    no_show_grace_min: Annotated[int, msgspec.Meta(ge=1)] = 15
    # A charge point shows `reserved` when its next reservation starts this soon.
    reserved_soon_min: Annotated[int, msgspec.Meta(ge=0)] = 30
    # How early before its start a reservation may begin charging.
    early_start_min: Annotated[int, msgspec.Meta(ge=0)] = 10
    max_reservation_min: Annotated[int, msgspec.Meta(ge=1)] = 480
    # How far ahead a reservation may start.
    max_advance_days: Annotated[int, msgspec.Meta(ge=1)] = 30
    heartbeat_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # What each stop of a planned trip costs besides charging: leaving the road, parking, plugging in.
    stop_overhead_min: Annotated[int, msgspec.Meta(ge=0, le=120)] = 5
    # A planned stop charges at least this much (percentage points of the battery): no stop for a sip.
    min_stop_charge_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 10.0
    # Money an hour of the driver's time is worth when they prefer cheap plans (`--prefer cheap`).
    cheap_hour_value: Annotated[float, msgspec.Meta(gt=0)] = 20.0


class World(msgspec.Struct, forbid_unknown_fields=True):
    operators: Annotated[list[OperatorConfig], msgspec.Meta(min_length=1)]
    stations: list[StationConfig] = []
    vehicles: list[VehicleConfig] = []
    # The cities trips go between; a world without any uses the Northeast's of `geo.CITIES`.
    cities: list[CityConfig] = []
    rules: Rules = msgspec.field(default_factory=Rules)
    source: str = ""

    def operator(self, operator_id: str) -> OperatorConfig:
        for op in self.operators:
            if op.id == operator_id:
                return op
        known = ", ".join(op.id for op in self.operators)
        raise WorldError(
            f"{self.source}: no operator {operator_id!r}{_hint(operator_id, [op.id for op in self.operators])} "
            f"(known: {known})"
        )

    def vehicle(self, vehicle_id: str) -> VehicleConfig:
        for vehicle in self.vehicles:
            if vehicle.id == vehicle_id:
                return vehicle
        raise WorldError(f"{self.source}: no vehicle {vehicle_id!r}{_hint(vehicle_id, [v.id for v in self.vehicles])}")

    def credentials(self) -> list[tuple[str, str]]:
        """(identity, secret) of every operator, charge point and vehicle: what a log must never show."""
        found = [(op.id, op.secret) for op in self.operators]
        found += [(cp.id, cp.secret) for s in self.stations for cp in s.charge_points]
        return found + [(v.id, v.token) for v in self.vehicles]

    def stations_of(self, operator_id: str) -> list[StationConfig]:
        return [s for s in self.stations if s.operator == operator_id]

    def gazetteer(self) -> geo.Gazetteer:
        if not self.cities:
            return geo.NORTHEAST
        return geo.Gazetteer({c.name: (c.lat, c.lon) for c in self.cities})

    def charge_point(self, cp_id: str) -> tuple[StationConfig, ChargePointConfig]:
        for station in self.stations:
            for cp in station.charge_points:
                if cp.id == cp_id:
                    return station, cp
        every = [cp.id for station in self.stations for cp in station.charge_points]
        raise WorldError(f"{self.source}: no charge point {cp_id!r}{_hint(cp_id, every)}")


def _hint(wanted: str, known: list[str]) -> str:
    """ "; did you mean V01?" for an id typed in another case or nearly right; "" if nothing is close."""
    folded = wanted.casefold()
    same = [k for k in known if k.casefold() == folded]
    close = same or difflib.get_close_matches(wanted, known, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


class WorldError(Exception):
    pass


SHIPPED = "northeast"


def resolve_world_path(name_or_path: str) -> Path:
    """A path, or the name of a world shipped with evcharge (e.g. ``northeast``)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix == ".toml" or "/" in name_or_path:
        return path
    shipped = resources.files("evcharge") / "worlds" / f"{name_or_path}.toml"
    return Path(str(shipped))


def load_world(name_or_path: str) -> World:
    path = resolve_world_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorldError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise WorldError(f"{path}: {exc}") from None
    try:
        world = msgspec.convert(raw, World)
    except msgspec.ValidationError as exc:
        raise WorldError(f"{path}: {_readable(str(exc))}") from None
    world.source = str(path)
    _check_references(world)
    return world


def _readable(message: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.operators[0].port`";
    # lead with the key, as people read a config error.
    if " - at `$" in message:
        problem, _, where = message.rpartition(" - at `$")
        return f"{where.rstrip('`').lstrip('.')}: {problem}"
    return message


def _check_references(world: World) -> None:
    src = world.source

    def unique(kind: str, ids: list[tuple[str, str]]) -> None:
        seen: set[str] = set()
        for key, ident in ids:
            if ident in seen:
                raise WorldError(f"{src}: {key}: duplicate {kind} id {ident!r}")
            seen.add(ident)

    unique("operator", [(f"operators[{i}].id", op.id) for i, op in enumerate(world.operators)])
    unique("station", [(f"stations[{i}].id", s.id) for i, s in enumerate(world.stations)])
    unique(
        "charge point",
        [
            (f"stations[{i}].charge_points[{j}].id", cp.id)
            for i, s in enumerate(world.stations)
            for j, cp in enumerate(s.charge_points)
        ],
    )
    unique("vehicle", [(f"vehicles[{i}].id", v.id) for i, v in enumerate(world.vehicles)])
    unique("city", [(f"cities[{i}].name", c.name) for i, c in enumerate(world.cities)])
    operator_ids = {op.id for op in world.operators}
    for i, station in enumerate(world.stations):
        if station.operator not in operator_ids:
            raise WorldError(f"{src}: stations[{i}].operator: unknown operator {station.operator!r}")
    for i, vehicle in enumerate(world.vehicles):
        if vehicle.home not in operator_ids:
            raise WorldError(f"{src}: vehicles[{i}].home: unknown operator {vehicle.home!r}")
