"""Every message on the wire, and how it is framed. No I/O here.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
msgpack. Each message is a msgspec Struct tagged by its class name in the
``type`` field, so one decoder turns any frame into the right class.

Three kinds of message:

* ``Request`` carries an ``id``; the other side answers with a ``Reply`` that
  echoes it (``Error`` is a reply too). Either side may send requests: the
  server sends commands to charge points the same way clients send queries.
* ``Reply`` answers one request.
* ``Event`` is pushed without an id and is never answered.
"""

from __future__ import annotations

import struct
from datetime import datetime
from typing import Annotated, Literal, TypeVar, get_args

import msgspec

from evcharge.wire.wording import explain

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20  # 1 MiB: the default cap, checked before the body is read

T = TypeVar("T")
HEADER = struct.Struct(">I")

Role = Literal["vehicle", "station", "operator", "peer"]
ErrorCode = Literal[
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "unavailable",
    "timeout",
    "too_large",
    "unsupported_version",
    "internal",
]
ReservationState = Literal["held", "booked", "charging", "completed", "cancelled", "expired", "aborted"]
# Times in requests must say their offset; a bare "14:30" means nothing across operators.
UtcTime = Annotated[datetime, msgspec.Meta(tz=True)]
Latitude = Annotated[float, msgspec.Meta(ge=-90, le=90)]
Longitude = Annotated[float, msgspec.Meta(ge=-180, le=180)]
Kwh = Annotated[float, msgspec.Meta(ge=0, le=100_000)]  # a meter reading (no NaN, no infinity)
Amount = Annotated[float, msgspec.Meta(ge=0, le=1e9)]  # a price or a cost (no NaN, no infinity)
# `unknown`: another operator's charge point whose live status we have not heard yet.
ChargePointStatus = Literal["available", "reserved", "charging", "faulted", "unavailable", "offline", "unknown"]
# What a charge point may say about itself; the server derives the rest. `unavailable` is out of
# service on purpose (maintenance, OCPP's Unavailable), `faulted` is broken: neither can be used.
ReportedStatus = Literal["available", "faulted", "unavailable"]
# A client's name for one intent of a state-changing request: the server keeps the outcome
# under it, so a request sent again after a lost reply is answered, not done twice. No NUL
# character: it is stored as text, and PostgreSQL's text cannot hold one.
IdempotencyKey = Annotated[str, msgspec.Meta(max_length=64, pattern="^[^\x00]*$")]


class Message(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    pass


class Request(Message):
    id: int = 0


class Reply(Message):
    id: int = 0


class Event(Message):
    pass


# --- shared data shapes (not messages themselves) ---------------------------


class Interval(msgspec.Struct, omit_defaults=True):
    start: datetime
    end: datetime


class ChargePointInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    power_kw: float
    connector: str
    price_per_kwh: float
    status: ChargePointStatus = "offline"
    # Earliest time from now at which the charge point is free (None: free now).
    free_at: datetime | None = None
    # Live reservations ahead, without who holds them (only in station status).
    busy: list[Interval] = []


class StationInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    operator_id: str
    name: str
    city: str
    lat: float
    lon: float
    charge_points: list[ChargePointInfo] = []
    distance_km: float | None = None
    # Another operator's station whose owner cannot be reached now: its status as last heard
    # at this time (None: live). A station never heard of has charge points "unknown".
    as_of: datetime | None = None


class ReservationInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    operator_id: str
    station_id: str
    charge_point_id: str
    vehicle_id: str
    start: datetime
    end: datetime
    state: ReservationState
    trip_id: str | None = None
    kwh: float = 0.0
    cost: float = 0.0
    hold_deadline: float | None = None  # held only: wall-clock epoch seconds by which the trip decides
    as_of: datetime | None = None  # at another operator that cannot be reached now: as last heard then


class SessionInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    reservation_id: str
    operator_id: str
    station_id: str
    city: str
    charge_point_id: str
    started: datetime
    ended: datetime
    kwh: Kwh
    price_per_kwh: Amount
    cost: Amount


class TripStop(msgspec.Struct, kw_only=True, omit_defaults=True):
    city: str
    operator_id: str
    station_id: str
    station_name: str
    charge_point_id: str
    power_kw: float
    drive_km: float
    arrival: datetime
    slot_start: datetime
    slot_end: datetime
    soc_in: float
    soc_out: float
    kwh: float
    cost: float
    reservation_id: str | None = None
    # Why its owner withdrew this stop (its charge point broke); empty while the stop stands.
    lost: str = ""


TripState = Literal["planned", "committed", "cancelled"]


class TripInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    vehicle_id: str
    state: TripState
    origin: str
    destination: str
    depart: datetime
    arrival: datetime
    distance_km: float
    soc_at_arrival: float
    total_kwh: float
    total_cost: float
    stops: list[TripStop] = []
    home_operator_id: str = ""


class PeerInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    operator_id: str
    address: str
    up: bool
    last_seen: datetime | None = None
    last_error: str = ""


# --- handshake -----------------------------------------------------------------


class Hello(Request, kw_only=True):
    version: int
    role: Role
    ident: str
    credential: str


class Welcome(Reply, kw_only=True):
    version: int
    operator_id: str
    operator_name: str
    server_time: datetime
    time_scale: float
    # Real seconds of silence after which the server closes this connection (0: never);
    # a client that may be quiet that long sends heartbeats well within it.
    idle_timeout: float = 0.0


# --- generic replies -----------------------------------------------------------


class Error(Reply, kw_only=True):
    code: ErrorCode
    message: str
    # For `conflict`: the next start time at which the asked-for slot fits.
    next_free: datetime | None = None


class Ok(Reply, kw_only=True):
    pass


# --- vehicle requests and their replies ----------------------------------------


class ListStations(Request, kw_only=True):
    city: str | None = None
    lat: Latitude | None = None
    lon: Longitude | None = None
    limit: Annotated[int, msgspec.Meta(ge=1)] | None = None


class StationList(Reply, kw_only=True):
    stations: list[StationInfo]


class FindNearest(Request, kw_only=True):
    lat: Latitude
    lon: Longitude
    min_power_kw: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class NearestResult(Reply, kw_only=True):
    station: StationInfo
    charge_point_id: str
    distance_km: float


class GetStationStatus(Request, kw_only=True):
    station_id: str


class StationStatus(Reply, kw_only=True):
    station: StationInfo
    server_time: datetime


class Reserve(Request, kw_only=True):
    charge_point_id: str
    start: UtcTime
    minutes: int
    key: IdempotencyKey = ""


class ListReservations(Request, kw_only=True):
    include_past: bool = False


class ReservationList(Reply, kw_only=True):
    reservations: list[ReservationInfo]


class CancelReservation(Request, kw_only=True):
    reservation_id: str
    key: IdempotencyKey = ""


class StartCharging(Request, kw_only=True):
    reservation_id: str
    key: IdempotencyKey = ""


class StopCharging(Request, kw_only=True):
    reservation_id: str
    key: IdempotencyKey = ""


class ReservationReply(Reply, kw_only=True):
    reservation: ReservationInfo
    unchanged: bool = False  # it was so already (a reservation cancelled twice): nothing was done now


class GetHistory(Request, kw_only=True):
    pass


class History(Reply, kw_only=True):
    sessions: list[SessionInfo]
    total_kwh: float
    total_cost: float


class UpdatePosition(Request, kw_only=True):
    lat: Latitude
    lon: Longitude


# --- operator requests -----------------------------------------------------------


class Inspect(Request, kw_only=True):
    # "": a fresh snapshot. Otherwise the `more` of the previous part: the next part of the
    # same snapshot (a big operator's does not fit in one frame).
    cursor: str = ""


class InspectResult(Reply, kw_only=True):
    operator_id: str
    server_time: datetime
    stations: list[StationInfo]
    reservations: list[ReservationInfo]
    trips: list[TripInfo] = []
    peers: list[PeerInfo] = []
    requests_served: int = 0  # since start, for request rates
    connections: dict[str, int] = {}  # connected clients by role
    more: str = ""  # not empty: the snapshot goes on; ask Inspect(cursor=more) for the next part


def split_to_fit(result: InspectResult, budget: int) -> list[InspectResult]:
    """The snapshot as parts whose lists, put together in order, are the snapshot's, each at most ``budget`` bytes."""
    size = len(_encoder.encode(result))
    longest = max(len(result.stations), len(result.reservations), len(result.trips), 1)
    count = min(-(-size // budget), longest)
    while True:
        parts = [
            msgspec.structs.replace(
                result,
                stations=_slice(result.stations, i, count),
                reservations=_slice(result.reservations, i, count),
                trips=_slice(result.trips, i, count),
            )
            for i in range(count)
        ]
        # One item per part is as fine as it gets: an item over the budget alone is refused
        # as too large when sent, not cut into a million parts.
        if count >= longest or all(len(_encoder.encode(part)) <= budget for part in parts):
            return [part for part in parts if part.stations or part.reservations or part.trips] or parts[:1]
        count = min(count * 2, longest)  # uneven items (a station with many charge points): cut finer


def _slice(items: list[T], i: int, count: int) -> list[T]:
    return items[len(items) * i // count : len(items) * (i + 1) // count]


# --- charge point (station role) -----------------------------------------------


class StatusNotification(Request, kw_only=True):
    status: ReportedStatus
    info: str = ""


class Heartbeat(Request, kw_only=True):
    pass


class HeartbeatAck(Reply, kw_only=True):
    server_time: datetime


class MeterValues(Event, kw_only=True):
    reservation_id: str
    kwh: Kwh


class Authorize(Request, kw_only=True):
    """May this vehicle start charging on this charge point now? (A driver at the charge point.)

    Answered with the reservation that allows it (``booked``, or ``charging`` if it already is).
    """

    vehicle_id: str


class SessionComplete(Request, kw_only=True):
    """The charge point ended a session itself (vehicle full, unplugged, fault)."""

    reservation_id: str
    kwh: Kwh
    reason: str = ""


# Server -> charge point commands.
class RemoteStart(Request, kw_only=True):
    reservation_id: str
    vehicle_id: str
    until: datetime


class RemoteStop(Request, kw_only=True):
    reservation_id: str


class SessionReport(Reply, kw_only=True):
    reservation_id: str
    kwh: Kwh


# --- trips (vehicle -> home operator) ------------------------------------------


Preference = Literal["fast", "cheap"]


class TripQuery(msgspec.Struct, kw_only=True, omit_defaults=True):
    origin: str
    destination: str
    soc_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 80.0
    depart: UtcTime | None = None  # default: now
    min_arrival_soc_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 10.0
    max_charge_soc_pct: Annotated[float, msgspec.Meta(ge=1, le=100)] = 80.0
    # "fast": the earliest arrival (money breaks ties); "cheap": time and money weighed at the
    # world's value of an hour (rules.cheap_hour_value).
    prefer: Preference = "fast"


class PlanTrip(Request, kw_only=True):
    query: TripQuery


class BookTrip(Request, kw_only=True):
    query: TripQuery
    # The id of a plan this server showed the vehicle (TripInfo.id of a PlanTrip answer) for
    # the same query: that plan is booked as shown, unless its slots were taken meanwhile.
    plan_id: str = ""
    key: IdempotencyKey = ""


class TripReply(Reply, kw_only=True):
    trip: TripInfo
    attempts: int = 1  # plans tried (more than one: re-planned around conflicts)
    as_shown: bool = False  # the trip is the plan BookTrip.plan_id named, booked as it was shown
    unchanged: bool = False  # it was so already (a trip cancelled twice): nothing was done now


class ListTrips(Request, kw_only=True):
    include_cancelled: bool = False


class TripList(Reply, kw_only=True):
    trips: list[TripInfo]


class CancelTrip(Request, kw_only=True):
    trip_id: str
    key: IdempotencyKey = ""


# --- federation (operator <-> operator) ----------------------------------------
#
# Handshake: Hello(role="peer", ident=<my operator>, credential=<my nonce>) is
# answered by PeerChallenge (the server's nonce and its proof); the client
# checks that proof and sends PeerProof; then Welcome. Proofs are HMAC-SHA256
# over both nonces with the connecting operator's secret, which never crosses
# the wire; fresh nonces make a replayed handshake fail.


class PeerChallenge(Reply, kw_only=True):
    nonce: str
    proof: str


class PeerProof(Request, kw_only=True):
    proof: str


class GetCatalog(Request, kw_only=True):
    pass


class Catalog(Reply, kw_only=True):
    operator_id: str
    stations: list[StationInfo]


class GetAvailability(Request, kw_only=True):
    start: UtcTime
    end: UtcTime


class CpBusy(msgspec.Struct, omit_defaults=True):
    charge_point_id: str
    busy: list[Interval]


class Availability(Reply, kw_only=True):
    charge_points: list[CpBusy]


class StopRequest(msgspec.Struct, kw_only=True):
    charge_point_id: str
    start: UtcTime
    end: UtcTime


class Prepare(Request, kw_only=True):
    txn_id: str
    trip_id: str
    vehicle_id: str
    stops: list[StopRequest]
    deadline: float  # real (wall-clock) epoch seconds: the coordinator decides before this


class StopConflict(msgspec.Struct, kw_only=True):
    charge_point_id: str
    next_free: datetime


class Vote(Reply, kw_only=True):
    txn_id: str
    yes: bool
    reservation_ids: list[str] = []  # with yes: one per stop, in order
    conflicts: list[StopConflict] = []  # with no
    reason: str = ""


class Decide(Request, kw_only=True):
    txn_id: str
    trip_id: str
    commit: bool


class QueryDecision(Request, kw_only=True):
    txn_id: str


Outcome = Literal["commit", "abort", "pending"]


class Decision(Reply, kw_only=True):
    txn_id: str
    outcome: Outcome


class ReleaseTrip(Request, kw_only=True):
    """Cancel every stop of a committed trip at this participant (idempotent)."""

    trip_id: str


# Items of one ``TwoPhaseBatch``: each is what it would be alone, to the letter.
TwoPhaseItem = Prepare | Decide | ReleaseTrip
MAX_BATCH_ITEMS = 64  # per TwoPhaseBatch; a coordinator sends more as further batches


class TwoPhaseBatch(Request, kw_only=True):
    """Several trips' PREPAREs, decisions and releases to one participant, in one frame.

    The participant takes them in order, in one writer section and one commit, and
    answers each as it would have answered it alone (a NO, or an error, for one item
    never touches another): ``TwoPhaseResults.results[i]`` answers ``items[i]``.
    """

    items: list[TwoPhaseItem]


class TwoPhaseResults(Reply, kw_only=True):
    results: list[Vote | Ok | Error]  # a Vote for a Prepare, Ok for a Decide or ReleaseTrip, or why not


# --- roaming (a home operator speaking for its vehicles at other operators) ------
#
# A vehicle talks only to its home operator. What it asks about another operator's
# charger the home forwards as ``Roam`` over its peer link; the owner checks its own
# rules and that the vehicle is the asking operator's, and answers as it would answer
# the vehicle. Owners push their stations' live status and their news for visiting
# vehicles back over the same connection, and deliver each finished session's charge
# record to the vehicle's home (stored there once, however often it is delivered).

RoamedRequest = Reserve | CancelReservation | StartCharging | StopCharging | ListReservations


class Roam(Request, kw_only=True):
    vehicle_id: str
    request: RoamedRequest


# A driver of a roaming platform outside evcharge (an OCPI eMSP's token), for whom the
# operator's own OCPI edge sends ``Roam`` over its operator connection: "ocpi:CC-PID:UID".
# Such a driver owns its reservations and its idempotency keys exactly as a vehicle does.
ROAMING_DRIVER_PREFIX = "ocpi:"


def is_roaming_driver(vehicle_id: str) -> bool:
    return vehicle_id.startswith(ROAMING_DRIVER_PREFIX) and len(vehicle_id) > len(ROAMING_DRIVER_PREFIX)


class ChargeRecordInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A session of a vehicle at an operator other than its home (an OCPI CDR, in spirit)."""

    vehicle_id: str
    home_operator_id: str
    session: SessionInfo  # its operator_id is the charger's owner
    delivered: bool = False  # (the owner's view) the home has stored it


class DeliverChargeRecord(Request, kw_only=True):
    record: ChargeRecordInfo


class GetSettlement(Request, kw_only=True):
    """The operator's own tools: what it charged other operators' vehicles, and what its vehicles were charged."""


class Settlement(Reply, kw_only=True):
    operator_id: str
    charged: list[ChargeRecordInfo]  # visiting vehicles at our chargers
    received: list[ChargeRecordInfo]  # our vehicles at other operators' chargers


class StopWithdrawn(Request, kw_only=True):
    """Owner -> coordinator: a committed trip's stop here was withdrawn (its charge point is out of service).

    Answered ``Ok`` once the trip shows the lost stop; sent again until then (idempotent).
    """

    trip_id: str
    reservation_id: str
    reason: str


# --- pushes to vehicles and operators ------------------------------------------


class ReservationChanged(Event, kw_only=True):
    reservation: ReservationInfo
    reason: str


class ChargingProgress(Event, kw_only=True):
    reservation_id: str
    kwh: float
    cost: float


class TripOffer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A plan shown to the vehicle (``plan.id``), booked as shown by ``BookTrip{query, plan_id: plan.id}``."""

    query: TripQuery
    plan: TripInfo


class TripChanged(Event, kw_only=True):
    trip: TripInfo
    reason: str
    offer: TripOffer | None = None  # a stop was lost: a fresh plan for the same route, if one was found


class PeerChanged(Event, kw_only=True):
    peer: PeerInfo


class ChargePointChanged(Event, kw_only=True):
    station_id: str
    charge_point_id: str
    status: ChargePointStatus


class StationChanged(Event, kw_only=True):
    """An owner's station as it is now (status, busy slots), pushed to the other operators."""

    station: StationInfo


class ForVehicle(Event, kw_only=True):
    """An owner's news for a visiting vehicle, pushed to its home operator, which passes it on."""

    vehicle_id: str
    event: ReservationChanged | ChargingProgress


AnyMessage = (
    Hello
    | Welcome
    | Error
    | Ok
    | ListStations
    | StationList
    | FindNearest
    | NearestResult
    | GetStationStatus
    | StationStatus
    | Reserve
    | ListReservations
    | ReservationList
    | CancelReservation
    | StartCharging
    | StopCharging
    | ReservationReply
    | GetHistory
    | History
    | UpdatePosition
    | Inspect
    | InspectResult
    | StatusNotification
    | Heartbeat
    | HeartbeatAck
    | MeterValues
    | SessionComplete
    | Authorize
    | RemoteStart
    | RemoteStop
    | SessionReport
    | ReservationChanged
    | ChargingProgress
    | ChargePointChanged
    | PeerChanged
    | TripChanged
    | PlanTrip
    | BookTrip
    | TripReply
    | ListTrips
    | TripList
    | CancelTrip
    | PeerChallenge
    | PeerProof
    | GetCatalog
    | Catalog
    | GetAvailability
    | Availability
    | Prepare
    | Vote
    | Decide
    | QueryDecision
    | Decision
    | ReleaseTrip
    | TwoPhaseBatch
    | TwoPhaseResults
    | Roam
    | DeliverChargeRecord
    | GetSettlement
    | Settlement
    | StationChanged
    | ForVehicle
    | StopWithdrawn
)


# --- codec and framing ---------------------------------------------------------


class FrameTooLarge(Exception):
    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes exceeds the {limit}-byte limit")
        self.length = length
        self.limit = limit


class UndecodableMessage(Exception):
    """A whole frame arrived but its body is not a valid message.

    The framing is still in step, so the connection can go on; ``request_id``
    is the id found in the body, if any, so the error can be answered.
    """

    def __init__(self, reason: str, request_id: int, *, in_user_words: bool = False) -> None:
        # msgspec quotes the offending value, which may be most of a 1 MiB frame.
        if len(reason) > 500:
            reason = reason[:500] + "…"
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id
        # A message of the right kind whose values do not fit (say a latitude of 999): ``reason`` says
        # it as users would (wire/wording.py); otherwise the frame was no message at all.
        self.in_user_words = in_user_words


class _IdProbe(msgspec.Struct):
    id: int = 0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)
_id_probe = msgspec.msgpack.Decoder(_IdProbe)


def encode_frame(message: Message) -> bytes:
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


_classes: dict[str, type[msgspec.Struct]] = {cls.__name__: cls for cls in get_args(AnyMessage)}

# msgspec decodes nested arrays and maps recursively, within the interpreter's recursion
# limit; a body nested deeper than that (a 1 KB frame holds a thousand levels) is refused.
_TOO_DEEP = "nested too deeply"


def decode_body(body: bytes | memoryview) -> Message:
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        reason = _TOO_DEEP if isinstance(exc, RecursionError) else str(exc)
        try:
            request_id = _id_probe.decode(body).id
        except (msgspec.DecodeError, RecursionError):
            request_id = 0
        if isinstance(exc, msgspec.ValidationError):
            raise UndecodableMessage(explain(str(exc), body, _classes), request_id, in_user_words=True) from None
        raise UndecodableMessage(reason, request_id) from None


class FrameBuffer:
    """Splits a byte stream into frame bodies (sans-I/O).

    Feed it bytes in any chunking; ``next_body`` returns each complete body
    once. An announced length above the limit raises ``FrameTooLarge`` as soon
    as the 4-byte header is in, before any of the body is buffered.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_frame = max_frame

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def next_body(self) -> bytes | None:
        available = len(self._buf) - self._pos
        if available < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buf, self._pos)
        if length > self.max_frame:
            raise FrameTooLarge(length, self.max_frame)
        if available < HEADER.size + length:
            return None
        start = self._pos + HEADER.size
        body = bytes(self._buf[start : start + length])
        self._pos = start + length
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            # Drop consumed bytes now and then so the buffer does not only grow.
            del self._buf[: self._pos]
            self._pos = 0
        return body

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos
