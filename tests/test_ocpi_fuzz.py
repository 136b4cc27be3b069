"""Hypothesis against a running ``evcharge ocpi``: bad bodies, headers, tokens and queries.

Whatever arrives, the answer is an OCPI envelope with a 2xxx status (never a 500,
never a dropped connection), and nothing changes: the party's bookings and
sessions, and the server's reservations, are what they were.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tools.harness import OcpiEdgeProcess, ServerProcess

from . import ocpi_schemas as s
from .ocpi_harness import Emsp, token_header

pytestmark = pytest.mark.timeout(120)

V = "/ocpi/2.2.1"
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclass
class Edge:
    url: str
    token: str
    party_id: str


@pytest.fixture(scope="module")
def edge(world_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("ocpi-fuzz")
    (tmp / "tokens").write_text("fuzz-token-a\n")
    server = ServerProcess(world_path, "A", tmp / "data-A", tmp / "server.log")
    process = OcpiEdgeProcess(
        world_path,
        "A",
        0,
        tmp / "edge",
        tmp / "edge.log",
        registration_tokens=tmp / "tokens",
        extra=("--rate-limit", "0"),
    )
    try:
        server.start()
        process.server_port = server.port
        process.start()

        async def register() -> tuple[str, str]:
            async with Emsp(process.url) as emsp:
                assert (await emsp.register("fuzz-token-a")).code == 1000
                return emsp.token_c, emsp.party_id

        token, party = asyncio.run(register())
        yield Edge(process.url, token, party)
    finally:
        process.kill()
        server.kill()


def call(
    edge: Edge, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    sent = {**token_header(edge.token), **(headers or {})}
    request = urllib.request.Request(f"{edge.url}{path}", data=body, method=method, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, answer_headers, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, answer_headers, raw = exc.code, dict(exc.headers), exc.read()
    envelope = json.loads(raw)
    s.check(s.ENVELOPE, envelope)
    assert status != 500 and envelope["status_code"] < 3000, (method, path, body, envelope)
    return status, answer_headers, envelope


def state(edge: Edge) -> tuple[Any, ...]:
    bookings = call(edge, "GET", f"{V}/bookings?limit=100")[2]["data"]
    sessions = call(edge, "GET", f"{V}/sessions?limit=100")[2]["data"]
    token = call(edge, "GET", f"{V}/tokens/NL/{edge.party_id}/FUZZ?type=RFID")[2]
    return json.dumps(bookings, sort_keys=True), json.dumps(sessions, sort_keys=True), token["status_code"]


KEYS = [
    "country_code", "party_id", "request_id", "location_id", "evse_uid", "period", "start_from", "end_before",
    "tokens", "uid", "type", "token", "response_url", "reservation_id", "expiry_date", "session_id",
    "authorization_reference", "canceled", "valid", "whitelist", "contract_id", "issuer", "last_updated", "roles",
    "url",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.sampled_from(["NL", "BR", "POT", "NAT-PN", "NAT-PN-1", "2026-12-03T10:00:00Z", "RFID", "ALLOWED", "x" * 300]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=6),
    ),
    max_leaves=20,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=100).map(str.encode),
    st.just(b'{"period": {"start_from": "yesterday"}}'),
    st.just(b"\xff\xfe{}"),
)
mutating = st.sampled_from(
    [
        ("POST", f"{V}/bookings"),
        ("POST", f"{V}/commands/RESERVE_NOW"),
        ("POST", f"{V}/commands/START_SESSION"),
        ("POST", f"{V}/commands/CANCEL_RESERVATION"),
        ("POST", f"{V}/commands/UNLOCK_CONNECTOR"),
        ("POST", f"{V}/commands/NONSENSE"),
        ("PUT", f"{V}/credentials"),
        ("PUT", f"{V}/tokens/NL/PID/FUZZ?type=RFID"),
        ("PATCH", f"{V}/tokens/NL/PID/FUZZ?type=RFID"),
    ]
)


@FUZZ
@given(where=mutating, body=bodies)
def test_bad_bodies_change_nothing(edge: Edge, where: tuple[str, str], body: bytes) -> None:
    method, path = where
    before = state(edge)
    _status, _headers, envelope = call(edge, method, path.replace("/PID/", f"/{edge.party_id}/"), body)
    if not path.startswith(f"{V}/commands/"):  # a command's answer may be 1000 with a refusal inside
        assert envelope["status_code"] >= 2000, (path, body, envelope)
    assert state(edge) == before


printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60)


@FUZZ
@given(
    authorization=st.one_of(printable, printable.map(lambda t: f"Token {t}"), st.just("Token "), st.just("Basic abc")),
    request_id=printable,
    party=printable,
)
def test_bad_tokens_and_headers_are_401_and_echoed(edge: Edge, authorization: str, request_id: str, party: str) -> None:
    headers = {"Authorization": authorization, "X-Request-ID": request_id, "OCPI-from-party-id": party}
    status, answer_headers, envelope = call(edge, "GET", f"{V}/locations", headers=headers)
    assert (status, envelope["status_code"]) == (401, 2000)
    if request_id:
        assert answer_headers["X-Request-ID"] == request_id[:100]
    assert answer_headers["OCPI-from-party-id"] == "POT"


@FUZZ
@given(
    path=st.sampled_from([f"{V}/locations", f"{V}/bookings", f"{V}/bookings/booking_locations", f"{V}/cdrs"]),
    name=st.sampled_from(["offset", "limit", "date_from", "date_to"]),
    value=printable,
)
def test_bad_queries_are_2001_or_a_page(edge: Edge, path: str, name: str, value: str) -> None:
    query = urllib.request.quote(value, safe="")
    _status, headers, envelope = call(edge, "GET", f"{path}?{name}={query}")
    assert envelope["status_code"] in (1000, 2001)
    if envelope["status_code"] == 1000:
        assert int(headers["X-Total-Count"]) >= len(envelope["data"])
