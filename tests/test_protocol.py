"""Wire format: every message round-trips, frames split correctly, bad bodies fail cleanly."""

from __future__ import annotations

import itertools
import struct
import typing
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evcharge.wire import protocol as p
from evcharge.wire.protocol import (
    HEADER,
    MAX_FRAME,
    AnyMessage,
    FrameBuffer,
    FrameTooLarge,
    Message,
    UndecodableMessage,
    decode_body,
    encode_frame,
)

T0 = datetime(2024, 5, 17, 8, 30, 15, 123456, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


CP_1 = p.ChargePointInfo(
    id="A-BOS-1/2",
    power_kw=150.0,
    connector="CCS2",
    price_per_kwh=0.49,
    status="reserved",
    free_at=at(45),
    busy=[p.Interval(at(10), at(45)), p.Interval(at(60), at(90))],
)
CP_2 = p.ChargePointInfo(
    id="A-BOS-1/3",
    power_kw=22.0,
    connector="Type2",
    price_per_kwh=0.31,
    status="faulted",
)
STATION = p.StationInfo(
    id="A-BOS-1",
    operator_id="A",
    name="Boston Seaport Hub",
    city="Boston",
    lat=42.3519,
    lon=-71.0446,
    charge_points=[CP_1, CP_2],
    distance_km=3.75,
)
STATION_2 = p.StationInfo(
    id="B-NYC-4",
    operator_id="B",
    name="Hudson Yards",
    city="New York",
    lat=40.7536,
    lon=-74.0012,
    charge_points=[CP_2],
    as_of=at(-5),
)
RESERVATION = p.ReservationInfo(
    id="A-r-000042",
    operator_id="A",
    station_id="A-BOS-1",
    charge_point_id="A-BOS-1/2",
    vehicle_id="V007",
    start=at(10),
    end=at(45),
    state="charging",
    trip_id="trip-9",
    kwh=12.5,
    cost=6.125,
)
RESERVATION_2 = p.ReservationInfo(
    id="B-r-000003",
    operator_id="B",
    station_id="B-NYC-4",
    charge_point_id="A-BOS-1/3",
    vehicle_id="V007",
    start=at(300),
    end=at(330),
    state="held",
    hold_deadline=1_800_000_005.25,
    as_of=at(-5),
)
SESSION = p.SessionInfo(
    reservation_id="A-r-000040",
    operator_id="A",
    station_id="A-BOS-1",
    city="Boston",
    charge_point_id="A-BOS-1/2",
    started=at(-120),
    ended=at(-80),
    kwh=31.25,
    price_per_kwh=0.49,
    cost=15.3125,
)
STOP_1 = p.TripStop(
    city="Hartford",
    operator_id="B",
    station_id="B-HFD-2",
    station_name="Hartford Union Station",
    charge_point_id="B-HFD-2/1",
    power_kw=150.0,
    drive_km=165.5,
    arrival=at(110),
    slot_start=at(115),
    slot_end=at(145),
    soc_in=0.18,
    soc_out=0.8,
    kwh=37.2,
    cost=18.6,
    reservation_id="B-r-000017",
    lost="withdrawn by operator B: charge point B-HFD-2/1 is faulted",
)
STOP_2 = p.TripStop(
    city="New Haven",
    operator_id="A",
    station_id="A-NHV-1",
    station_name="New Haven Green",
    charge_point_id="A-NHV-1/4",
    power_kw=50.0,
    drive_km=60.25,
    arrival=at(190),
    slot_start=at(190),
    slot_end=at(220),
    soc_in=0.55,
    soc_out=0.7,
    kwh=9.0,
    cost=4.5,
)
TRIP = p.TripInfo(
    id="A-t-000009",
    vehicle_id="V007",
    state="committed",
    origin="Boston",
    destination="New York",
    depart=T0,
    arrival=at(330),
    distance_km=346.0,
    soc_at_arrival=0.21,
    total_kwh=46.2,
    total_cost=23.1,
    stops=[STOP_1, STOP_2],
    home_operator_id="A",
)
TRIP_2 = p.TripInfo(
    id="A-t-000010",
    vehicle_id="V007",
    state="cancelled",
    origin="Boston",
    destination="Providence",
    depart=at(1440),
    arrival=at(1520),
    distance_km=80.0,
    soc_at_arrival=0.62,
    total_kwh=0.0,
    total_cost=0.0,
)
PEER = p.PeerInfo(operator_id="B", address="127.0.0.1:7402", up=False, last_seen=at(-3), last_error="timed out")
PEER_2 = p.PeerInfo(operator_id="C", address="127.0.0.1:7403", up=True)
QUERY = p.TripQuery(
    origin="Boston",
    destination="New York",
    soc_pct=64.5,
    depart=at(30),
    min_arrival_soc_pct=15.0,
    max_charge_soc_pct=90.0,
    prefer="cheap",
)

# One instance of every message class, with every defaulted field set to something
# other than its default (so omit_defaults cannot hide a field that fails to round-trip).
SAMPLES: list[Message] = [
    p.Hello(id=1, version=p.PROTOCOL_VERSION, role="vehicle", ident="V007", credential="s3cret-token"),
    p.Welcome(
        id=1,
        version=1,
        operator_id="A",
        operator_name="Atlantic Charge",
        server_time=T0,
        time_scale=60.0,
        idle_timeout=600.0,
    ),
    p.Error(id=7, code="conflict", message="slot taken", next_free=at(45)),
    p.Ok(id=8),
    p.ListStations(id=9, city="Boston", lat=42.36, lon=-71.06, limit=5),
    p.StationList(id=9, stations=[STATION, STATION_2]),
    p.FindNearest(id=10, lat=42.36, lon=-71.06, min_power_kw=50.0),
    p.NearestResult(id=10, station=STATION, charge_point_id="A-BOS-1/2", distance_km=3.75),
    p.GetStationStatus(id=11, station_id="A-BOS-1"),
    p.StationStatus(id=11, station=STATION, server_time=T0),
    p.Reserve(id=12, charge_point_id="A-BOS-1/2", start=at(60), minutes=30, key="k-reserve-1"),
    p.ListReservations(id=13, include_past=True),
    p.ReservationList(id=13, reservations=[RESERVATION, RESERVATION_2]),
    p.CancelReservation(id=14, reservation_id="A-r-000042", key="k-cancel-1"),
    p.StartCharging(id=15, reservation_id="A-r-000042", key="k-start-1"),
    p.StopCharging(id=16, reservation_id="A-r-000042", key="k-stop-1"),
    p.ReservationReply(id=12, reservation=RESERVATION, unchanged=True),
    p.GetHistory(id=17),
    p.History(id=17, sessions=[SESSION, SESSION], total_kwh=62.5, total_cost=30.625),
    p.UpdatePosition(id=18, lat=41.82, lon=-71.41),
    p.Inspect(id=19, cursor="5e1f0c2a9b7d3e61"),
    p.InspectResult(
        id=19,
        operator_id="A",
        server_time=T0,
        stations=[STATION, STATION_2],
        reservations=[RESERVATION],
        trips=[TRIP, TRIP_2],
        peers=[PEER, PEER_2],
        requests_served=1234,
        connections={"vehicle": 3, "station": 12},
        more="5e1f0c2a9b7d3e61",
    ),
    p.StatusNotification(id=20, status="faulted", info="ground fault on connector 1"),
    p.Heartbeat(id=21),
    p.HeartbeatAck(id=21, server_time=T0),
    p.MeterValues(reservation_id="A-r-000042", kwh=7.75),
    p.SessionComplete(id=22, reservation_id="A-r-000042", kwh=28.5, reason="vehicle full"),
    p.Authorize(id=35, vehicle_id="V007"),
    p.RemoteStart(id=23, reservation_id="A-r-000042", vehicle_id="V007", until=at(45)),
    p.RemoteStop(id=24, reservation_id="A-r-000042"),
    p.SessionReport(id=24, reservation_id="A-r-000042", kwh=28.5),
    p.ReservationChanged(reservation=RESERVATION_2, reason="charge point faulted"),
    p.ChargingProgress(reservation_id="A-r-000042", kwh=9.5, cost=4.655),
    p.ChargePointChanged(station_id="A-BOS-1", charge_point_id="A-BOS-1/3", status="charging"),
    p.PeerChanged(peer=PEER),
    p.TripChanged(trip=TRIP, reason="stop lost", offer=p.TripOffer(query=QUERY, plan=TRIP_2)),
    p.PlanTrip(id=25, query=QUERY),
    p.BookTrip(
        id=26, query=p.TripQuery(origin="Boston", destination="Hartford"), plan_id="A-P0a1b2c3d4e", key="k-book-1"
    ),
    p.TripReply(id=26, trip=TRIP, attempts=3, as_shown=True, unchanged=True),
    p.ListTrips(id=27, include_cancelled=True),
    p.TripList(id=27, trips=[TRIP, TRIP_2]),
    p.CancelTrip(id=28, trip_id="A-t-000009", key="k-cancel-trip-1"),
    p.PeerChallenge(id=2, nonce="6f1c0a9e3b5d", proof="9a8b7c6d5e4f"),
    p.PeerProof(id=3, proof="0f1e2d3c4b5a"),
    p.GetCatalog(id=29),
    p.Catalog(id=29, operator_id="B", stations=[STATION_2]),
    p.GetAvailability(id=30, start=T0, end=at(1440)),
    p.Availability(
        id=30,
        charge_points=[
            p.CpBusy("B-HFD-2/1", [p.Interval(at(115), at(145))]),
            p.CpBusy("B-HFD-2/2", []),
        ],
    ),
    p.Prepare(
        id=31,
        txn_id="A-x-000004",
        trip_id="A-t-000009",
        vehicle_id="V007",
        stops=[
            p.StopRequest(charge_point_id="B-HFD-2/1", start=at(115), end=at(145)),
            p.StopRequest(charge_point_id="B-HFD-2/2", start=at(400), end=at(430)),
        ],
        deadline=1715934615.25,
    ),
    p.Vote(
        id=31,
        txn_id="A-x-000004",
        yes=False,
        reservation_ids=["B-r-000017"],
        conflicts=[p.StopConflict(charge_point_id="B-HFD-2/2", next_free=at(430))],
        reason="slot taken",
    ),
    p.Decide(id=32, txn_id="A-x-000004", trip_id="A-t-000009", commit=True),
    p.QueryDecision(id=33, txn_id="A-x-000004"),
    p.Decision(id=33, txn_id="A-x-000004", outcome="pending"),
    p.ReleaseTrip(id=34, trip_id="A-t-000009"),
    p.TwoPhaseBatch(
        id=34,
        items=[
            p.Prepare(
                txn_id="A-x-000005",
                trip_id="A-t-000010",
                vehicle_id="V007",
                stops=[p.StopRequest(charge_point_id="B-HFD-2/1", start=at(500), end=at(530))],
                deadline=1715934616.5,
            ),
            p.Decide(txn_id="A-x-000004", trip_id="A-t-000009", commit=False),
            p.ReleaseTrip(trip_id="A-t-000008"),
        ],
    ),
    p.TwoPhaseResults(
        id=34,
        results=[
            p.Vote(txn_id="A-x-000005", yes=True, reservation_ids=["B-r-000018"]),
            p.Ok(),
            p.Error(code="forbidden", message="trip A-t-000008 is not a trip of operator A"),
        ],
    ),
    p.Roam(id=35, vehicle_id="V007", request=p.Reserve(charge_point_id="B-HFD-2/1", start=at(60), minutes=30)),
    p.DeliverChargeRecord(id=36, record=p.ChargeRecordInfo(vehicle_id="V007", home_operator_id="A", session=SESSION)),
    p.GetSettlement(id=37),
    p.Settlement(
        id=37,
        operator_id="B",
        charged=[p.ChargeRecordInfo(vehicle_id="V007", home_operator_id="A", session=SESSION, delivered=True)],
        received=[],
    ),
    p.StationChanged(station=STATION_2),
    p.ForVehicle(vehicle_id="V007", event=p.ChargingProgress(reservation_id="B-r-000003", kwh=3.5, cost=1.75)),
    p.StopWithdrawn(id=38, trip_id="A-t-000009", reservation_id="B-r-000017", reason="charge point faulted"),
]


def _defaulted_fields(obj: msgspec.Struct) -> list[tuple[str, object]]:
    out = []
    for field in msgspec.structs.fields(obj):
        if field.default is not msgspec.NODEFAULT:
            out.append((field.name, field.default))
        elif field.default_factory is not msgspec.NODEFAULT:
            out.append((field.name, field.default_factory()))
    return out


def _nested_structs(obj: object) -> typing.Iterator[msgspec.Struct]:
    if isinstance(obj, msgspec.Struct):
        yield obj
        for field in msgspec.structs.fields(obj):
            yield from _nested_structs(getattr(obj, field.name))
    elif isinstance(obj, list):
        for item in obj:
            yield from _nested_structs(item)


def _leaf_message_classes(cls: type) -> set[type]:
    out: set[type] = set()
    for sub in cls.__subclasses__():
        out |= _leaf_message_classes(sub) if sub.__subclasses__() else {sub}
    return out


def test_every_message_class_has_a_sample() -> None:
    sampled = [type(m) for m in SAMPLES]
    assert len(sampled) == len(set(sampled)), "a message class is sampled twice"
    assert set(sampled) == set(typing.get_args(AnyMessage))


def test_every_concrete_message_class_is_decodable() -> None:
    # A Message subclass left out of AnyMessage could be sent but never decoded.
    defined = {c for c in _leaf_message_classes(Message) if c.__module__ == p.__name__}
    assert defined == set(typing.get_args(AnyMessage))


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_sample_sets_every_defaulted_field(message: Message) -> None:
    for name, default in _defaulted_fields(message):
        assert getattr(message, name) != default, f"{name} left at its default"


def test_nested_shapes_set_every_defaulted_field_somewhere() -> None:
    # Nested shapes may use their defaults (to cover omission), but across all samples
    # each defaulted field of each shape is set to something else at least once.
    unset: dict[tuple[str, str], bool] = {}
    for obj in _nested_structs(SAMPLES):
        if isinstance(obj, Message):
            continue
        for name, default in _defaulted_fields(obj):
            key = (type(obj).__name__, name)
            unset[key] = unset.get(key, True) and getattr(obj, name) == default
    assert unset, "no nested shapes sampled"
    assert [key for key, never_set in unset.items() if never_set] == []


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    frame = encode_frame(message)
    (length,) = struct.unpack(">I", frame[:4])
    body = frame[4:]
    assert length == len(body) > 0
    decoded = decode_body(body)
    assert type(decoded) is type(message)
    assert decoded == message
    assert encode_frame(decoded) == frame  # nothing lost that __eq__ might overlook
    # Tagged by class name, so a peer can dispatch on it.
    assert msgspec.msgpack.decode(body)["type"] == type(message).__name__


def test_datetimes_come_back_tz_aware_utc() -> None:
    decoded = decode_body(encode_frame(p.HeartbeatAck(id=3, server_time=T0))[4:])
    assert isinstance(decoded, p.HeartbeatAck)
    assert decoded.server_time == T0
    assert decoded.server_time.utcoffset() == timedelta(0)


def test_decode_body_accepts_memoryview() -> None:
    frame = encode_frame(SAMPLES[0])
    assert decode_body(memoryview(frame)[4:]) == SAMPLES[0]


# --- FrameBuffer ------------------------------------------------------------------------


def _drain(buf: FrameBuffer) -> list[bytes]:
    out = []
    while (body := buf.next_body()) is not None:
        out.append(body)
    return out


STREAM_MESSAGES = SAMPLES[:12]
STREAM = b"".join(encode_frame(m) for m in STREAM_MESSAGES)
STREAM_BODIES = [encode_frame(m)[4:] for m in STREAM_MESSAGES]


def test_byte_by_byte() -> None:
    buf = FrameBuffer()
    got: list[bytes] = []
    for i in range(len(STREAM)):
        buf.feed(STREAM[i : i + 1])
        got += _drain(buf)
    assert got == STREAM_BODIES
    assert buf.buffered == 0
    assert [decode_body(b) for b in got] == STREAM_MESSAGES


def test_whole_stream_at_once() -> None:
    buf = FrameBuffer()
    buf.feed(STREAM)
    assert buf.buffered == len(STREAM)
    assert _drain(buf) == STREAM_BODIES
    assert buf.buffered == 0
    assert buf.next_body() is None


def test_no_body_until_frame_complete() -> None:
    frame = encode_frame(SAMPLES[1])
    buf = FrameBuffer()
    buf.feed(frame[:-1])
    assert buf.next_body() is None
    assert buf.next_body() is None  # asking again does not consume anything
    assert buf.buffered == len(frame) - 1
    buf.feed(frame[-1:])
    assert buf.next_body() == frame[4:]
    assert buf.next_body() is None


def test_empty_body_frame() -> None:
    buf = FrameBuffer()
    buf.feed(HEADER.pack(0) + HEADER.pack(0))
    assert buf.next_body() == b""
    assert buf.next_body() == b""
    assert buf.next_body() is None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=10),
    cuts=st.sets(st.integers(min_value=1, max_value=20_000), max_size=40),
    drain_every_chunk=st.booleans(),
)
def test_any_chunking(messages: list[Message], cuts: set[int], drain_every_chunk: bool) -> None:
    stream = b"".join(encode_frame(m) for m in messages)
    bounds = [0, *sorted(c for c in cuts if c < len(stream)), len(stream)]
    buf = FrameBuffer()
    got: list[bytes] = []
    for lo, hi in itertools.pairwise(bounds):
        buf.feed(stream[lo:hi])
        if drain_every_chunk:
            got += _drain(buf)
    got += _drain(buf)
    assert got == [encode_frame(m)[4:] for m in messages]
    assert [decode_body(b) for b in got] == messages
    assert buf.buffered == 0


def test_oversized_length_raises_as_soon_as_header_is_in() -> None:
    buf = FrameBuffer(max_frame=100)
    header = HEADER.pack(101)
    buf.feed(header[:3])
    assert buf.next_body() is None
    buf.feed(header[3:])  # no body byte fed at all
    with pytest.raises(FrameTooLarge) as info:
        buf.next_body()
    assert info.value.length == 101
    assert info.value.limit == 100


def test_default_limit_is_max_frame() -> None:
    buf = FrameBuffer()
    assert buf.max_frame == MAX_FRAME
    buf.feed(HEADER.pack(MAX_FRAME + 1))
    with pytest.raises(FrameTooLarge) as info:
        buf.next_body()
    assert (info.value.length, info.value.limit) == (MAX_FRAME + 1, MAX_FRAME)


def test_oversized_frame_after_good_frames() -> None:
    good = encode_frame(SAMPLES[3])
    buf = FrameBuffer(max_frame=len(good))
    buf.feed(good + HEADER.pack(0xFFFFFFFF))
    assert buf.next_body() == good[4:]
    with pytest.raises(FrameTooLarge):
        buf.next_body()


def test_frame_exactly_at_limit_is_accepted() -> None:
    body = bytes(range(256)) * 4
    buf = FrameBuffer(max_frame=len(body))
    buf.feed(HEADER.pack(len(body)) + body)
    assert buf.next_body() == body
    assert buf.buffered == 0


def test_message_exactly_at_limit_is_accepted() -> None:
    message = SAMPLES[-1]
    frame = encode_frame(message)
    buf = FrameBuffer(max_frame=len(frame) - 4)
    buf.feed(frame)
    assert decode_body(buf.next_body() or b"") == message


def test_default_limit_frame_exactly_at_limit() -> None:
    body = b"\xab" * MAX_FRAME
    buf = FrameBuffer()
    buf.feed(HEADER.pack(MAX_FRAME))
    buf.feed(body)
    assert buf.next_body() == body


def test_consumed_bytes_are_released_when_fed_in_pieces() -> None:
    frame = encode_frame(SAMPLES[5])
    buf = FrameBuffer()
    for _ in range(5000):
        buf.feed(frame)
        assert buf.next_body() == frame[4:]
        assert buf.buffered == 0
    # White-box: the internal buffer must not have accumulated 5000 frames.
    assert len(buf._buf) <= 2 * len(frame)


def test_consumed_bytes_are_released_when_fed_at_once() -> None:
    frame = encode_frame(SAMPLES[5])
    count = 3 * 65536 // len(frame) + 10  # well over the compaction threshold
    buf = FrameBuffer()
    buf.feed(frame * count)
    for _ in range(count):
        assert buf.next_body() == frame[4:]
    assert buf.next_body() is None
    assert buf.buffered == 0
    # White-box: at most the compaction threshold of consumed bytes is still held...
    assert len(buf._buf) <= 65536 + len(frame)
    # ...and the next feed drops it entirely.
    buf.feed(frame)
    assert len(buf._buf) == len(frame)
    assert buf.next_body() == frame[4:]


def test_partial_frame_survives_compaction() -> None:
    frame = encode_frame(SAMPLES[5])
    count = 3 * 65536 // len(frame) + 10
    stream = frame * count
    buf = FrameBuffer()
    buf.feed(stream + frame[:7])
    assert _drain(buf) == [frame[4:]] * count
    assert buf.buffered == 7
    buf.feed(frame[7:])
    assert buf.next_body() == frame[4:]
    assert buf.buffered == 0


# --- undecodable bodies ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"", b"\xc1", b"\xff\xfe garbage \x00", b"\x93\x01\x02\x03", b"\xa5hello", b"\x81\xa4type"],
    ids=["empty", "never-used-byte", "garbage", "array", "string", "truncated-map"],
)
def test_garbage_body(body: bytes) -> None:
    with pytest.raises(UndecodableMessage) as info:
        decode_body(body)
    assert info.value.request_id == 0
    assert info.value.reason


def test_wrong_field_type_keeps_request_id() -> None:
    body = msgspec.msgpack.encode(
        {"type": "Reserve", "id": 4242, "charge_point_id": "A-BOS-1/2", "start": T0, "minutes": "ten"}
    )
    with pytest.raises(UndecodableMessage) as info:
        decode_body(body)
    assert info.value.request_id == 4242
    assert "minutes" in info.value.reason
    assert str(info.value) == info.value.reason


def test_missing_field_keeps_request_id() -> None:
    body = msgspec.msgpack.encode({"type": "Reserve", "id": 99, "charge_point_id": "A-BOS-1/2", "minutes": 10})
    with pytest.raises(UndecodableMessage) as info:
        decode_body(body)
    assert info.value.request_id == 99
    assert "start" in info.value.reason


def test_bad_literal_value_keeps_request_id() -> None:
    body = msgspec.msgpack.encode(
        {"type": "Hello", "id": 5, "version": 1, "role": "admin", "ident": "x", "credential": "y"}
    )
    with pytest.raises(UndecodableMessage) as info:
        decode_body(body)
    assert info.value.request_id == 5
    assert "role" in info.value.reason


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"type": "Reserve", "charge_point_id": "A-BOS-1/2", "start": "2024-05-17T08:30:00", "minutes": 30}, "start"),
        ({"type": "GetAvailability", "start": T0, "end": "2024-05-18T08:30:00"}, "end"),
        ({"type": "FindNearest", "lat": 91.0, "lon": 0.0}, "lat"),
        ({"type": "UpdatePosition", "lat": 0.0, "lon": -180.5}, "lon"),
        ({"type": "ListStations", "limit": 0}, "limit"),
    ],
    ids=["naive-start", "naive-end", "lat-out-of-range", "lon-out-of-range", "zero-limit"],
)
def test_constraint_violation_keeps_request_id(fields: dict[str, object], bad_field: str) -> None:
    with pytest.raises(UndecodableMessage) as info:
        decode_body(msgspec.msgpack.encode({**fields, "id": 77}))
    assert info.value.request_id == 77
    assert bad_field in info.value.reason


def test_time_with_offset_is_accepted() -> None:
    body = msgspec.msgpack.encode(
        {"type": "Reserve", "id": 5, "charge_point_id": "cp", "start": "2024-05-17T10:30:15+02:00", "minutes": 30}
    )
    decoded = decode_body(body)
    assert isinstance(decoded, p.Reserve)
    assert decoded.start == datetime(2024, 5, 17, 8, 30, 15, tzinfo=UTC)


def test_unknown_type_tag() -> None:
    body = msgspec.msgpack.encode({"type": "LaunchMissiles", "id": 31})
    with pytest.raises(UndecodableMessage) as info:
        decode_body(body)
    assert info.value.request_id == 31
    assert "LaunchMissiles" in info.value.reason or "type" in info.value.reason


def test_shape_that_is_not_a_message_is_rejected() -> None:
    # StationInfo is a data shape, not a message: its name is not a valid tag.
    body = msgspec.msgpack.encode({"type": "StationInfo", "id": 2})
    with pytest.raises(UndecodableMessage) as info:
        decode_body(body)
    assert info.value.request_id == 2


def test_missing_type_tag() -> None:
    body = msgspec.msgpack.encode({"id": 12, "station_id": "A-BOS-1"})
    with pytest.raises(UndecodableMessage) as info:
        decode_body(body)
    assert info.value.request_id == 12


def test_id_of_wrong_type_falls_back_to_zero() -> None:
    body = msgspec.msgpack.encode({"type": "Heartbeat", "id": "seven"})
    with pytest.raises(UndecodableMessage) as info:
        decode_body(body)
    assert info.value.request_id == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_only_raise_undecodable(body: bytes) -> None:
    try:
        message = decode_body(body)
    except UndecodableMessage as exc:
        assert isinstance(exc.request_id, int)
    else:
        assert isinstance(message, typing.get_args(AnyMessage))


def test_a_snapshot_with_an_item_over_the_budget_is_cut_no_finer_than_one_item_per_part() -> None:
    big = p.StationInfo(id="BIG", operator_id="A", name="Site", city="Natal", lat=0, lon=0, charge_points=[CP_1] * 200)
    small = p.StationInfo(id="S", operator_id="A", name="Site", city="Natal", lat=0, lon=0, charge_points=[CP_1])
    whole = p.InspectResult(operator_id="A", server_time=T0, stations=[small, big, small], reservations=[])
    parts = p.split_to_fit(whole, 2_000)
    assert [s.id for part in parts for s in part.stations] == ["S", "BIG", "S"]
    assert len(parts) <= 3  # the big one goes alone (and is refused as too large when sent)


@given(
    stations=st.integers(0, 60),
    reservations=st.integers(0, 300),
    budget=st.sampled_from([600, 2_000, 20_000, MAX_FRAME]),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_snapshot_split_to_fit_puts_together_again(stations: int, reservations: int, budget: int) -> None:
    station = p.StationInfo(
        id="S", operator_id="A", name="Site", city="Natal", lat=-5.8, lon=-35.2, charge_points=[CP_1]
    )
    reservation = p.ReservationInfo(
        id="R",
        operator_id="A",
        station_id="S",
        charge_point_id="A-BOS-1/2",
        vehicle_id="V01",
        start=at(0),
        end=at(30),
        state="booked",
    )
    whole = p.InspectResult(
        operator_id="A",
        server_time=T0,
        stations=[msgspec.structs.replace(station, id=f"S{n}") for n in range(stations)],
        reservations=[msgspec.structs.replace(reservation, id=f"R{n}") for n in range(reservations)],
    )
    parts = p.split_to_fit(whole, budget)
    assert [s for part in parts for s in part.stations] == whole.stations
    assert [r for part in parts for r in part.reservations] == whole.reservations
    assert all(len(encode_frame(part)) - HEADER.size <= budget for part in parts)
    assert len(parts) == 1 or len(encode_frame(whole)) - HEADER.size > budget  # split only when needed
