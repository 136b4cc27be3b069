"""Hypothesis against a live server: bad frames get a typed error or a close, nothing else.

Each test runs one real server on a loopback port and throws generated frames
at it from fresh raw connections: messages of every type in the protocol's
union, built from the msgspec types themselves, with values of the right shape
but wrong content (out of range, NaN, far dates, unknown ids, huge strings) or
of the wrong type, missing and extra fields; random bytes; values or whole
bodies nested thousands of arrays or maps deep; truncated frames;
length prefixes over the cap; bodies just under and just over the cap; Hello
with wrong versions. Before the handshake and after one as each role.

After every example a long-lived well-behaved vehicle and charge point still
get right answers, no connection or task is left behind, the event loop saw no
unhandled exception, nothing was logged as an error, and the operator's books
are as they were, except for what the fuzzing identity may legitimately do to
its own data (the fuzzed vehicle may book for itself; the fuzzed peer may hold
slots for its trips; the fuzzed charge point may report itself faulted).

Runs are derandomized (CI sees the same examples every time) and keep no
example database. ``EVCHARGE_FUZZ_EXAMPLES`` sets the examples per test for a
longer hunt; ``EVCHARGE_FUZZ_TRACE=1`` prints each example with its outcome and
timing, and what the server answered (how deep the requests got).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec import inspect as mi

from evcharge.apps import invariants
from evcharge.domain.world import World
from evcharge.links.client import Client, connect
from evcharge.operator.server import Server
from evcharge.wire import protocol as p

from .conftest import running_server
from .raw import LoopWatch, RawPeer, raw

pytestmark = pytest.mark.timeout(180)

EXAMPLES = int(os.environ.get("EVCHARGE_FUZZ_EXAMPLES", "200"))  # per test; ~15 ms each
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    # One server serves every example on purpose: its state must survive them all.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

EXCHANGE_TIMEOUT = 15.0  # real seconds an answer (or the close) may take: generous, for loaded CI machines
# The server shares our event loop: no frame may make it hold everyone else up this long (a hang,
# not a speed: handling any one frame takes milliseconds).
LOOP_HELD_LIMIT = 1.5
MARKER_ID = 7_777_777_777  # the Heartbeat sent after the fuzzed frames; its ack means they were all handled

# Who the fuzzing connections are, and who must not notice them.
FUZZ_VEHICLE, FUZZ_CP, FUZZ_PEER = "V07", "FOR-1-1", "B"
GOOD_VEHICLE, GOOD_CP, OTHER_VEHICLE = "V04", "NAT-PN-1", "V10"

MESSAGE_TYPES: dict[str, mi.StructType] = {
    t.cls.__name__: t
    for t in msgspec.inspect.type_info(p.AnyMessage).types  # type: ignore[attr-defined]
}


# --- placeholders, resolved against the running server --------------------------------------


@dataclass(frozen=True)
class Known:
    """A value only known once the server runs (a reservation id, a credential)."""

    name: str


@dataclass(frozen=True)
class Repeat:
    """A long string, built only when sent (so Hypothesis's reports stay short)."""

    text: str
    times: int


@dataclass(frozen=True)
class SoonUtc:
    """Server time plus this many seconds, so some requests are in range and go deep."""

    seconds: int
    offset_hours: int = 0
    as_text: bool = False


# --- values for every msgspec type: mostly right shape with wrong content, sometimes wrong type ----

TEXT_IDS = [
    "",
    "NAT-PN",
    "NAT-PN-1",
    "NAT-PN-2",
    FUZZ_CP,
    "FOR-1",
    "REC-BV-1",
    "V01",
    FUZZ_VEHICLE,
    GOOD_VEHICLE,
    "A",
    "B",
    "C",
    "Natal",
    "Mossoró",
    "joao pessoa",
    "Feira de Santana",
    "A-0000000000",
    "A-T0000000000",
    "\x00",
    "🔌" * 3,
    "Ω" * 40,
]

any_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=12),
)
wrong_value = st.one_of(
    any_scalar,
    st.lists(any_scalar, max_size=3),
    st.dictionaries(st.text(max_size=4), any_scalar, max_size=3),
    st.datetimes(timezones=st.just(UTC)),
)
big_ints = st.sampled_from([-1, 0, 1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1])


def weighted(*choices: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One of ``choices``, each about equally likely (repeat one to weigh it more)."""
    return st.sampled_from(range(len(choices))).flatmap(lambda k: choices[k])


known_ids = st.sampled_from(TEXT_IDS)
text_values = weighted(
    known_ids,
    known_ids,
    st.text(max_size=24),
    # Long strings, of letters that grow when escaped, case-folded or normalized.
    st.builds(
        Repeat,
        st.sampled_from(["x", "é", "\U0010ffff", "\n", "\x01", "\ufdfa", "\ufb03", "\u0390"]),
        st.one_of(st.integers(1, 70_000), st.integers(200_000, 340_000)),
    ),
)
offsets = st.sampled_from([0, 0, 5, -3, 14, -12])
datetime_values = st.one_of(
    st.builds(SoonUtc, st.integers(-7200, 40 * 86400), offsets, st.booleans()),
    st.builds(SoonUtc, st.sampled_from([-(10**12), -(10**9), 10**9, 10**11]), offsets, st.booleans()),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)),
    st.sampled_from(["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "2030-01-01T00:00:00", "soon"]),
)


# Values a well-meaning client might send: real ids, times near now, small numbers. Messages
# made of these get past the checks of content and into the books.
PLAUSIBLE_TEXT = [
    "NAT-PN-1",
    "NAT-PN-3",
    "FOR-1-1",
    "FOR-1-2",
    "NAT-PN",
    "FOR-1",
    "Natal",
    "Mossoró",
    "Fortaleza",
    "João Pessoa",
    FUZZ_VEHICLE,
    "A",
    "B",
]
plausible_times = st.builds(SoonUtc, st.integers(-600, 3 * 86400), st.sampled_from([0, -3]), st.just(False))


def valid_value(t: mi.Type, role: str | None, mode: str) -> st.SearchStrategy[Any]:
    """A value msgspec accepts for ``t`` (mostly): the server must judge its content.

    ``mode`` "plausible" keeps to values a real client would send; otherwise anything of the type goes.
    """
    plausible = mode == "plausible"
    match t:
        case mi.IntType():
            # msgpack carries -2**63 .. 2**64 - 1; anything else could not even be sent.
            lo = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else -(2**63))
            hi = 2**64 - 1 if t.le is None else t.le
            if plausible:
                return st.integers(min_value=max(lo, 0), max_value=min(hi, 500))
            return weighted(
                st.integers(min_value=max(lo, -10), max_value=min(hi, 1000)),
                st.integers(min_value=lo, max_value=hi),
                big_ints.filter(lambda n: lo <= n <= hi),
            )
        case mi.FloatType():
            lo = t.ge if t.ge is not None else t.gt
            hi = t.le if t.le is not None else t.lt
            if plausible:
                return st.floats(min_value=lo if lo is not None else -40.0, max_value=hi if hi is not None else 400.0)
            if lo is None and hi is None:
                return st.one_of(st.floats(), st.sampled_from([0.0, -1.0, 1e308, 5e-324]))
            return st.floats(min_value=lo, max_value=hi, allow_nan=False)
        case mi.StrType():
            # An operator may cancel anything: it gets no real reservation ids.
            ours = [Known("mine"), Known("credential")] + (
                [Known("kept"), Known("other")] if role != "operator" else []
            )
            if plausible:
                return st.sampled_from(PLAUSIBLE_TEXT + ours)
            return st.one_of(text_values, st.sampled_from(ours))
        case mi.BoolType():
            return st.booleans()
        case mi.NoneType():
            return st.none()
        case mi.DateTimeType():
            return plausible_times if plausible else datetime_values
        case mi.LiteralType():
            if plausible:
                return st.sampled_from(t.values)
            return st.one_of(st.sampled_from(t.values), st.text(max_size=10))
        case mi.ListType():
            return st.lists(valid_value(t.item_type, role, mode), max_size=4)
        case mi.DictType():
            return st.dictionaries(
                valid_value(t.key_type, role, mode), valid_value(t.value_type, role, mode), max_size=3
            )
        case mi.UnionType():
            return st.one_of(*(valid_value(member, role, mode) for member in t.types))
        case mi.StructType():
            return struct_fields(t, role, "plausible" if plausible else "wrong-content")
    return wrong_value


def one_in(n: int) -> st.SearchStrategy[bool]:
    # Hypothesis tries the simplest choice (index 0) often and shrinks toward it: make that the common case.
    return st.sampled_from(range(n)).map(lambda k: k == n - 1)


MODES = ["plausible", "wrong-content", "wrong-type"]


@st.composite
def struct_fields(draw: st.DrawFn, t: mi.StructType, role: str | None, mode: str) -> dict[str, Any]:
    """The fields of ``t``: plausible; of the right type but wrong content; or with wrong types and gaps."""
    noisy = mode == "wrong-type"
    body: dict[str, Any] = {}
    for f in t.fields:
        if f.required:
            if noisy and draw(one_in(10)):
                continue  # a required field missing
        elif draw(st.booleans()):
            continue  # an optional one left out
        if f.name == "id":
            body[f.encode_name] = draw(st.one_of(st.integers(1, 1000), big_ints, wrong_value if noisy else big_ints))
        elif noisy and draw(one_in(5)):
            body[f.encode_name] = draw(wrong_value)
        else:
            body[f.encode_name] = draw(valid_value(f.type, role, mode))
    if mode != "plausible" and draw(one_in(10)):
        body[draw(st.text(min_size=1, max_size=8))] = draw(wrong_value)  # extra fields are ignored
    return body


# What each role may send: most messages are of these, so they reach the handlers.
ROLE_REQUESTS: dict[str | None, list[str]] = {
    None: ["Hello"],
    "vehicle": [
        "Heartbeat",
        "ListStations",
        "FindNearest",
        "GetStationStatus",
        "Reserve",
        "ListReservations",
        "CancelReservation",
        "StartCharging",
        "StopCharging",
        "GetHistory",
        "UpdatePosition",
        "PlanTrip",
        "BookTrip",
        "ListTrips",
        "CancelTrip",
    ],
    "station": ["Heartbeat", "StatusNotification", "SessionComplete", "MeterValues", "SessionReport", "Error", "Ok"],
    "operator": ["Heartbeat", "Inspect", "CancelReservation", "ListStations", "FindNearest", "GetStationStatus"],
    "peer": [
        "Heartbeat",
        "GetCatalog",
        "GetAvailability",
        "Prepare",
        "Decide",
        "QueryDecision",
        "ReleaseTrip",
        "StopWithdrawn",
    ],
}


def message_dicts(role: str | None) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        names = sorted(MESSAGE_TYPES) if draw(one_in(4)) else ROLE_REQUESTS[role]
        name = draw(st.sampled_from(names))
        body = draw(struct_fields(MESSAGE_TYPES[name], role, draw(st.sampled_from(MODES))))
        match draw(st.sampled_from(range(30))):
            case 28:
                pass  # no type at all
            case 29:
                body["type"] = draw(st.one_of(st.text(max_size=20), wrong_value))
            case _:
                body["type"] = name
        return body

    return build()


hellos = st.fixed_dictionaries(
    {
        "type": st.just("Hello"),
        "id": st.one_of(st.integers(1, 100), big_ints),
        "version": st.one_of(st.just(p.PROTOCOL_VERSION), big_ints, st.integers(-5, 5), wrong_value),
        "role": st.one_of(st.sampled_from(["vehicle", "station", "operator", "peer"]), st.text(max_size=8)),
        "ident": st.one_of(st.sampled_from([FUZZ_VEHICLE, FUZZ_CP, "A", FUZZ_PEER, GOOD_VEHICLE, "V02"]), text_values),
        "credential": st.one_of(st.just(Known("credential")), text_values),
    }
)


# --- frames ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bodies:
    """Whole frames, sent in one write."""

    bodies: tuple[Any, ...]  # a message dict (placeholders resolved on sending) or raw bytes


@dataclass(frozen=True)
class Truncated:
    """A frame cut short, then the client closes its side."""

    body: Any
    keep: float  # fraction of the frame's bytes sent


@dataclass(frozen=True)
class Oversized:
    """A length prefix over the cap, and some bytes after it."""

    length: int
    tail: bytes


@dataclass(frozen=True)
class Huge:
    """One message whose body is ``MAX_FRAME + delta`` bytes, padding a string or list field."""

    message: str
    delta: int
    pad: str  # "str", "list" or "map"


@dataclass(frozen=True)
class Nested:
    """A message with one value (or the whole body) nested ``depth`` levels deep, built when sent."""

    message: Any  # a message dict; None: the body is the nesting itself
    field: str  # the field whose value is replaced (an unknown one is ignored, but still decoded)
    kind: str  # "array", "map", "map-key" (maps in the keys), "mixed"
    depth: int


Case = Bodies | Truncated | Oversized | Huge | Nested


def frames(role: str | None) -> st.SearchStrategy[Case]:
    garbage = one_in(6).flatmap(lambda rare: st.binary(max_size=64) if rare else message_dicts(role))
    if role is None:
        whole: st.SearchStrategy[Any] = st.one_of(hellos, message_dicts(None), garbage)
        many = st.builds(lambda body: Bodies((body,)), whole)  # the server reads one frame, then judges
    else:
        whole = st.one_of(message_dicts(role), garbage)
        many = st.builds(Bodies, st.lists(whole, min_size=1, max_size=3).map(tuple))
    truncated = st.builds(Truncated, whole, st.floats(0.0, 0.99))
    oversized = st.builds(
        Oversized,
        st.one_of(st.integers(p.MAX_FRAME + 1, p.MAX_FRAME + 100), st.just(2**32 - 1)),
        st.binary(max_size=32),
    )
    huge = st.builds(
        Huge,
        st.sampled_from(["Hello", "Reserve", "ListStations", "Prepare", "CancelReservation", "LaunchRockets"]),
        st.one_of(st.integers(-64, 0), st.integers(1, 64)),
        st.sampled_from(["str", "list", "map"]),
    )
    nesting = st.builds(
        Nested,
        st.one_of(st.none(), message_dicts(role)),
        st.sampled_from(["id", "type", "stops", "query", "zz"]),
        st.sampled_from(["array", "map", "map-key", "mixed"]),
        st.sampled_from([1, 40, 600, 1000, 3000, 100_000]),
    )
    # Mostly whole frames: they are what reaches the request handlers.
    return st.sampled_from(range(13)).flatmap(
        lambda k: truncated if k == 9 else oversized if k == 10 else huge if k == 11 else nesting if k == 12 else many
    )


# --- the live target -------------------------------------------------------------------------


@dataclass
class Target:
    server: Server
    good: Client
    good_cp: Client
    op: Client
    values: dict[str, str]
    kept: list[p.ReservationInfo]
    before: p.InspectResult
    unhandled: list[dict[str, Any]]
    errors: list[logging.LogRecord]
    watch: LoopWatch
    role: str | None = None
    baseline_sessions: int = 0
    examples: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)  # what the fuzzed requests got: shows how deep they went

    def now(self) -> datetime:
        return self.server.clock.now_dt()


class _ErrorRecords(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


@contextlib.asynccontextmanager
async def live_target(world: World, data_dir: Path, role: str | None) -> AsyncIterator[Target]:
    loop = asyncio.get_running_loop()
    # Time runs at real speed: the books must not change by themselves while we fuzz.
    async with running_server(world, data_dir, time_scale=1.0, hello_timeout=5.0) as server:
        chained = loop.get_exception_handler()
        unhandled: list[dict[str, Any]] = []

        def on_unhandled(the_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            unhandled.append(context)
            if chained is not None:
                chained(the_loop, context)

        loop.set_exception_handler(on_unhandled)
        errors: list[logging.LogRecord] = []
        handler = _ErrorRecords(errors)
        logging.getLogger("evcharge").addHandler(handler)
        v, o = world.vehicle(GOOD_VEHICLE), world.vehicle(OTHER_VEHICLE)
        cp = server.books.charge_points[GOOD_CP].config
        try:
            async with (
                LoopWatch() as watch,
                connect("127.0.0.1", server.port, role="vehicle", ident=v.id, secret=v.token) as good,
                connect("127.0.0.1", server.port, role="station", ident=cp.id, secret=cp.secret) as good_cp,
                connect("127.0.0.1", server.port, role="vehicle", ident=o.id, secret=o.token) as other,
                connect(
                    "127.0.0.1", server.port, role="operator", ident=server.operator.id, secret=server.operator.secret
                ) as op,
            ):
                # Far enough ahead that none expires during a long hunt (time runs at real speed).
                now = server.clock.now_dt()
                kept = [
                    await good.reserve(GOOD_CP, now + timedelta(hours=3), 60),
                    await good.reserve("NAT-PN-2", now + timedelta(hours=2), 30),
                ]
                # Another vehicle's reservation on the fuzzed charge point: that charge point may not end it.
                other_r = await other.reserve(FUZZ_CP, now + timedelta(hours=1), 30)
                # And one of the fuzzed vehicle's own, soon enough to start, so requests about it go deep.
                f = world.vehicle(FUZZ_VEHICLE)
                async with connect("127.0.0.1", server.port, role="vehicle", ident=f.id, secret=f.token) as fuzzed:
                    mine = await fuzzed.reserve("FOR-1-2", now + timedelta(minutes=5), 30)
                credential = {
                    "vehicle": world.vehicle(FUZZ_VEHICLE).token,
                    "station": server.books.charge_points[FUZZ_CP].config.secret,
                    "operator": server.operator.secret,
                    "peer": "f" * 32,
                }
                values = {
                    "kept": kept[0].id,
                    "other": other_r.id,
                    "mine": mine.id,
                    "credential": credential.get(role or "vehicle", "x"),
                }
                await other.close()
                async with asyncio.timeout(EXCHANGE_TIMEOUT):
                    while server.online.vehicles.get(OTHER_VEHICLE) or server.online.vehicles.get(FUZZ_VEHICLE):
                        await asyncio.sleep(0.005)
                target = Target(
                    server=server,
                    good=good,
                    good_cp=good_cp,
                    op=op,
                    values=values,
                    kept=[*kept],
                    before=await op.inspect(),
                    unhandled=unhandled,
                    errors=errors,
                    watch=watch,
                    role=role,
                    baseline_sessions=len(server.online.everyone),
                )
                yield target
        finally:
            logging.getLogger("evcharge").removeHandler(handler)
            loop.set_exception_handler(chained)


async def wait_for_sessions(target: Target) -> None:
    """Every fuzzing connection is gone and forgotten: nothing leaks per connection."""
    server = target.server
    async with asyncio.timeout(EXCHANGE_TIMEOUT):
        while len(server.online.everyone) != target.baseline_sessions or server._handshakes:
            await asyncio.sleep(0.005)


def resolve(value: Any, target: Target) -> Any:
    match value:
        case Known(name=name):
            return target.values[name]
        case Repeat(text=text, times=times):
            return text * times
        case SoonUtc(seconds=seconds, offset_hours=hours, as_text=as_text):
            try:
                moment = (target.now() + timedelta(seconds=seconds)).astimezone(timezone(timedelta(hours=hours)))
            except OverflowError:
                return "0001-01-01T00:00:00Z" if seconds < 0 else "9999-12-31T23:59:59Z"
            return moment.isoformat() if as_text else moment
        case dict():
            return {resolve(k, target): resolve(v, target) for k, v in value.items()}
        case list() | tuple():
            return [resolve(v, target) for v in value]
    return value


def encode(value: Any, target: Target) -> bytes:
    if isinstance(value, bytes):
        return value
    resolved = resolve(value, target)
    try:
        return msgspec.msgpack.encode(resolved)
    except (msgspec.EncodeError, OverflowError, ValueError):
        # A datetime msgpack cannot carry (e.g. year 1 at +05:00): send it as text instead.
        return msgspec.msgpack.encode(msgspec.to_builtins(resolved, builtin_types=(bytes,)))


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def huge_body(case: Huge, target: Target) -> bytes:
    """A message whose encoded body is exactly ``MAX_FRAME + delta`` bytes."""
    size = p.MAX_FRAME + case.delta
    base: dict[str, Any] = {"type": case.message, "id": 5}
    key = {"Hello": "ident", "Reserve": "charge_point_id", "ListStations": "city"}.get(case.message, "reservation_id")
    if case.message == "Hello":
        base |= {"version": 1, "role": "vehicle", "credential": "x"}
    if case.message == "Reserve":
        base |= {"start": target.now() + timedelta(hours=1), "minutes": 30}
    if case.message == "Prepare":
        key = "stops"
        base |= {"txn_id": "t", "trip_id": "T", "vehicle_id": FUZZ_VEHICLE, "deadline": time.time() + 5}
    if case.pad == "list" or key == "stops":
        item: Any = {"charge_point_id": FUZZ_CP, "start": target.now(), "end": target.now()} if key == "stops" else 7
        pad: Callable[[int], Any] = lambda n: [item] * n  # noqa: E731
    elif case.pad == "map":
        pad = lambda n: {f"k{i:07d}": 0 for i in range(n)}  # noqa: E731
    else:
        pad = lambda n: "\x01" * n  # noqa: E731 (each char escapes to 4 in a repr: an error quoting it overflows)

    def encoded(n: int, filler: int | None = None) -> bytes:
        message = {**base, key: pad(n)}
        if filler is not None:
            message["zz"] = "z" * filler  # an unknown field: ignored, but it counts
        return msgspec.msgpack.encode(message)

    one, more = len(encoded(1)), len(encoded(1001))
    n = max(0, int((size - one - 64) * 1000 / (more - one)))
    while len(encoded(n)) > size - 8:
        n -= 1 + n // 1000
    # Top up to the exact size with the unknown field: 3 bytes of key, a str header, the filler.
    while n >= 0:
        short = size - len(encoded(n))
        for header in (1, 2, 3, 5):
            filler = short - 3 - header
            if filler >= 0 and header == (1 if filler < 32 else 2 if filler < 256 else 3 if filler < 65536 else 5):
                body = encoded(n, filler)
                assert len(body) == size, (len(body), size)
                return body
        n -= 1
    raise AssertionError(f"cannot build a body of {size} bytes for {case}")


def nesting(kind: str, depth: int) -> bytes:
    """``depth`` levels of msgpack arrays or maps around one value (raw: msgspec would not encode it)."""
    match kind:
        case "array":
            return b"\x91" * depth + b"\x01"
        case "map":
            return b"\x81\xa1k" * depth + b"\x01"
        case "map-key":
            return b"\x81" * depth + b"\x01" + b"\x01" * depth
        case "mixed":
            return b"\x91\x81\xa1k" * (depth // 2) + b"\x01"
    raise AssertionError(kind)


SPLICE = "\x00nested here\x00"


def nested_body(case: Nested, target: Target) -> bytes:
    deep = nesting(case.kind, case.depth)
    if case.message is None:
        return deep
    marker = msgspec.msgpack.encode(SPLICE)
    body = encode({**case.message, case.field: SPLICE}, target)
    assert body.count(marker) == 1, case
    return body.replace(marker, deep)


# --- one example --------------------------------------------------------------------------------


def expected_answer(body: bytes) -> tuple[int, str | None] | None:
    """The id the server must answer a whole frame with after the handshake, and the error code if known."""
    try:
        message = p.decode_body(body)
    except p.UndecodableMessage as exc:
        return exc.request_id, "bad_request"
    if isinstance(message, p.Request):
        return message.id, "bad_request" if isinstance(message, p.Hello) else None
    return None  # replies and events are never answered


async def exchange_after_hello(peer: RawPeer, bodies: list[bytes], target: Target) -> str:
    owed: Counter[tuple[int, str | None]] = Counter()  # (id, the error code it must get, if known)
    for body in bodies:
        answer = expected_answer(body)
        if answer is not None:
            owed[answer] += 1
    owed[MARKER_ID, None] += 1
    await peer.send_raw(b"".join(frame(b) for b in bodies) + p.encode_frame(p.Heartbeat(id=MARKER_ID)))
    outcome = "answered"
    while +owed:
        message = await peer.receive(timeout=EXCHANGE_TIMEOUT)
        assert message is not None, "the server closed a connection that sent whole frames within the cap"
        if not isinstance(message, p.Reply):
            continue  # a push, or a command to the charge point
        code = message.code if isinstance(message, p.Error) else None
        if message.id != MARKER_ID:
            target.replies[type(message).__name__ + (f":{code}" if code else "")] += 1
            if code and os.environ.get("EVCHARGE_FUZZ_TRACE"):
                target.replies["  " + message.message[:60]] += 1
        key = (message.id, code) if owed[message.id, code] > 0 else (message.id, None)
        assert owed[key] > 0, f"an unexpected reply: {message!r} (expected {dict(+owed)})"[:1000]
        owed[key] -= 1
        if isinstance(message, p.Error):
            assert message.code != "internal", message
            assert len(message.message) < 10_000, f"an error quoting a huge value: {len(message.message)} chars"
            outcome = f"error:{message.code}"
    return outcome


async def exchange_before_hello(peer: RawPeer, body: bytes, target: Target) -> str:
    await peer.send_raw(frame(body))
    reply = await peer.receive(timeout=EXCHANGE_TIMEOUT)
    assert reply is not None, "a first frame was neither answered nor refused"
    try:
        hello: p.Message | None = p.decode_body(body)
    except p.UndecodableMessage:
        hello = None
    if isinstance(reply, p.Error):
        assert reply.code != "internal", reply
        assert len(reply.message) < 10_000, f"an error quoting a huge value: {len(reply.message)} chars"
        if not isinstance(hello, p.Hello):
            assert reply.code == "bad_request", reply
        elif hello.version != p.PROTOCOL_VERSION:
            assert reply.code == "unsupported_version", reply
        assert await peer.closed_by_server(EXCHANGE_TIMEOUT), "a refused handshake must close the connection"
        return f"refused:{reply.code}"
    assert isinstance(hello, p.Hello) and hello.version == p.PROTOCOL_VERSION, (hello, reply)
    if isinstance(reply, p.PeerChallenge):
        assert hello.role == "peer"
        # A proof made up by someone who does not know the secret.
        await peer.send(p.PeerProof(id=2, proof=reply.proof))
        error = await peer.receive(timeout=EXCHANGE_TIMEOUT)
        assert isinstance(error, p.Error) and error.code == "unauthorized", error
        assert await peer.closed_by_server(EXCHANGE_TIMEOUT)
        return "refused:peer-proof"
    assert isinstance(reply, p.Welcome), reply
    # Only the fuzzing identities' own credentials are ever offered.
    assert hello.credential == target.values["credential"], hello
    return "welcome"


async def run_case(case: Case, role: str | None, target: Target) -> str:
    # Everything is built before the clock on the event loop starts: only the server's work counts.
    match case:
        case Bodies(bodies=bodies):
            payload = [encode(b, target) for b in bodies]
        case Truncated(body=body):
            payload = [encode(body, target)]
        case Huge():
            payload = [huge_body(case, target)]
        case Nested():
            payload = [nested_body(case, target)]
        case Oversized():
            payload = []
    if isinstance(case, Bodies | Truncated | Nested) and any(len(b) > p.MAX_FRAME for b in payload):
        return "skipped:too-big-by-chance"
    async with raw(target.server) as peer:
        if role is not None:
            ident = {"vehicle": FUZZ_VEHICLE, "station": FUZZ_CP, "operator": "A", "peer": FUZZ_PEER}[role]
            await peer.hello(target.server, role, ident)  # type: ignore[arg-type]
        target.watch.reset()
        outcome = await exchange(case, payload, role, peer, target)
    assert target.watch.longest < LOOP_HELD_LIMIT, f"the event loop was held for {target.watch.longest:.2f} s"
    return outcome


async def exchange(case: Case, payload: list[bytes], role: str | None, peer: RawPeer, target: Target) -> str:
    match case:
        case Bodies() | Nested():
            if role is None:
                return await exchange_before_hello(peer, payload[0], target)
            return await exchange_after_hello(peer, payload, target)
        case Truncated(keep=keep):
            data = frame(payload[0])
            await peer.send_raw(data[: int(len(data) * keep) if len(data) > 1 else 0])
            peer.writer.write_eof()
            assert await peer.closed_by_server(EXCHANGE_TIMEOUT), "a half frame then EOF must end the connection"
            return "closed:truncated"
        case Oversized(length=length, tail=tail):
            await peer.send_raw(struct.pack(">I", length) + tail)
            reply = await peer.receive(timeout=EXCHANGE_TIMEOUT)
            assert isinstance(reply, p.Error) and reply.code == "too_large", reply
            assert await peer.closed_by_server(EXCHANGE_TIMEOUT)
            return "refused:too_large"
        case Huge():
            body = payload[0]
            if len(body) > p.MAX_FRAME:
                with contextlib.suppress(ConnectionError, OSError):
                    await peer.send_raw(frame(body))
                reply = await peer.receive(timeout=EXCHANGE_TIMEOUT)
                # The reset of a connection closed with unread bytes may beat the Error to us.
                assert reply is None or (isinstance(reply, p.Error) and reply.code == "too_large"), reply
                assert await peer.closed_by_server(EXCHANGE_TIMEOUT)
                return "refused:too_large"
            if role is None:
                return await exchange_before_hello(peer, body, target)
            return await exchange_after_hello(peer, [body], target)
    raise AssertionError(case)


async def check_unharmed(target: Target, role: str | None) -> None:
    """Others still get right answers and the books hold only what the fuzzing identity may do."""
    await wait_for_sessions(target)
    # Taken, not just looked at: one bad example must not fail every example after it.
    unhandled, target.unhandled[:] = [*target.unhandled], []
    errors, target.errors[:] = [r.getMessage()[:300] for r in target.errors], []
    assert not unhandled, f"unhandled exceptions in the event loop: {unhandled}"
    assert not errors, f"errors logged: {errors}"
    server, before = target.server, target.before
    async with asyncio.timeout(EXCHANGE_TIMEOUT):
        assert await target.good.heartbeat()
        assert await target.good_cp.heartbeat()
        mine = await target.good.reservations()
        assert sorted((r.id, r.state) for r in mine) == sorted((r.id, r.state) for r in target.kept)
        status = await target.good.station_status("NAT-PN")
        assert [cp.id for cp in status.charge_points] == ["NAT-PN-1", "NAT-PN-2", "NAT-PN-3"]
        after = await target.op.inspect()
    assert not target.good.closed.is_set() and not target.good_cp.closed.is_set()

    by_id = {r.id: r for r in after.reservations}
    for r in before.reservations:
        if r.vehicle_id == FUZZ_VEHICLE:
            continue  # its own books are the fuzzed vehicle's business
        assert by_id.get(r.id) == r, f"reservation changed: {r} -> {by_id.get(r.id)}"
    for r in after.reservations:
        if r.id not in {b.id for b in before.reservations}:
            # New books only for the fuzzed vehicle itself, or a fuzzed peer's trip stops.
            assert r.vehicle_id == FUZZ_VEHICLE or (role == "peer" and r.trip_id is not None), r

    found = invariants.violations({server.operator.id: after}, allow_holds=True)
    if role == "peer":
        # The fuzzed peer's trips live at that peer, which is not running: only overlaps count here.
        found = [v for v in found if v.startswith("overlap")]
    assert not found, found

    def shape(state: p.InspectResult) -> list[Any]:
        return [
            (s.id, s.name, s.city, s.lat, s.lon, [(cp.id, cp.power_kw, cp.price_per_kwh) for cp in s.charge_points])
            for s in state.stations
        ]

    def down(state: p.InspectResult) -> dict[str, bool]:
        # Whether a charge point is offline or faulted is the charge point's own say only.
        return {
            cp.id: cp.status in ("offline", "faulted")
            for s in state.stations
            for cp in s.charge_points
            if cp.id != FUZZ_CP
        }

    assert shape(after) == shape(before)
    assert down(after) == down(before)
    assert [t for t in after.trips if t.vehicle_id != FUZZ_VEHICLE] == [
        t for t in before.trips if t.vehicle_id != FUZZ_VEHICLE
    ]
    assert sorted(after.connections.items()) == sorted(before.connections.items())


ROLES = [None, "vehicle", "station", "operator", "peer"]
FRAMES = {role: frames(role) for role in ROLES}


@pytest.fixture(params=ROLES, ids=["before-hello", *ROLES[1:]])
async def target(request: pytest.FixtureRequest, world: World, tmp_path: Path) -> AsyncIterator[Target]:
    async with live_target(world, tmp_path / "data", request.param) as target:
        yield target
        print(f"{target.role or 'before-hello'}: {target.examples} examples: {dict(target.outcomes)}")
        print(f"  replies: {dict(target.replies.most_common())}")
    assert target.examples >= min(EXAMPLES, 20), "too few examples ran to mean anything"


@FUZZ_SETTINGS
@given(data=st.data())
async def test_fuzzed_frames_get_a_typed_error_or_a_close_and_harm_nobody(target: Target, data: st.DataObject) -> None:
    case = data.draw(FRAMES[target.role], label="case")
    started = time.monotonic()
    outcome = await run_case(case, target.role, target)
    if os.environ.get("EVCHARGE_FUZZ_TRACE"):
        print(f"{time.monotonic() - started:.3f} s {outcome} {case!r:.200}")
    target.outcomes[outcome] += 1
    target.examples += 1
    await check_unharmed(target, target.role)
