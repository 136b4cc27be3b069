"""The OCPI HTTP interface: routes, the envelope, authorization, limits, pagination.

Every answer is an OCPI envelope (``data``, ``status_code``, ``status_message``,
``timestamp``), whatever went wrong: malformed JSON is HTTP 400 with 2001, a body
that is JSON but not the object asked for is 2001 (HTTP 200, as OCPI asks of a
request that reached the OCPI layer), an unknown location 2003, an unknown token
2004, a missing or unknown token HTTP 401. Bad input changes nothing and is never
a 500. ``X-Request-ID`` and ``X-Correlation-ID`` are echoed (made up when absent),
and the answer names us as its ``OCPI-from-*`` party and the caller as ``OCPI-to-*``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlencode

import msgspec
from aiohttp import web

from evcharge.apps.ocpi import VERSION
from evcharge.apps.ocpi import mapping as m
from evcharge.apps.ocpi import objects as o
from evcharge.apps.ocpi.edge import Edge, OcpiError, RateLimiter
from evcharge.apps.ocpi.store import Registration

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

EDGE: web.AppKey[Edge] = web.AppKey("edge", Edge)
LIMITER: web.AppKey[RateLimiter] = web.AppKey("limiter", RateLimiter)
MAX_BODY = 64 * 1024  # OCPI objects are small; a bigger body is refused before it is read
RATE = 50.0  # requests a second per caller (token, or address when it has none)
BURST = 100
BODY_TIMEOUT = 10.0  # real seconds for a request's body to arrive

_encoder = msgspec.json.Encoder()

MODULES: list[tuple[str, str, str]] = [  # identifier, our role, path under the version
    ("credentials", "SENDER", "credentials"),
    ("credentials", "RECEIVER", "credentials"),
    ("locations", "SENDER", "locations"),
    ("tariffs", "SENDER", "tariffs"),
    ("sessions", "SENDER", "sessions"),
    ("cdrs", "SENDER", "cdrs"),
    ("tokens", "RECEIVER", "tokens"),
    ("commands", "RECEIVER", "commands"),
    ("bookings", "SENDER", "bookings"),
]


def envelope(
    data: Any, status_code: int = 1000, message: str = "Success", *, http_status: int = 200, edge: Edge | None = None
) -> web.Response:
    timestamp = edge.now_text() if edge is not None else o.ocpi_time(datetime.now(UTC))
    body = {"data": data, "status_code": status_code, "status_message": message, "timestamp": timestamp}
    return web.Response(body=_encoder.encode(body), status=http_status, content_type="application/json")


async def read_body(request: web.Request) -> bytes:
    """The whole body, within ``BODY_TIMEOUT``: a caller trickling it holds nothing for long."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            return await request.read()
    except TimeoutError:
        raise OcpiError(2001, f"the body did not arrive within {BODY_TIMEOUT:g} s", 408) from None


def decode(body: bytes, kind: type[T]) -> T:
    """The request body as ``kind``; ``OcpiError`` 2001 for anything else (HTTP 400 if it is not JSON)."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise OcpiError(2001, f"invalid or missing field: {exc}") from None
    except msgspec.DecodeError as exc:
        raise OcpiError(2001, f"the body is not JSON: {exc}", 400) from None


def _query_time(request: web.Request, name: str) -> str | None:
    text = request.query.get(name)
    if text is None:
        return None
    try:
        return o.ocpi_time(o.utc(datetime.fromisoformat(text.replace(" ", "+"))))
    except ValueError:
        raise OcpiError(2001, f"{name} must be a DateTime (RFC 3339), not {text[:40]!r}") from None


def _query_int(request: web.Request, name: str, default: int, low: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise OcpiError(2001, f"{name} must be a whole number, not {text[:40]!r}") from None
    if value < low:
        raise OcpiError(2001, f"{name} must be at least {low}, not {value}")
    return value


def paginated(request: web.Request, items: list[Any], *, stamp: Callable[[Any], str] | None = None) -> web.Response:
    """OCPI pagination: ``offset``, ``limit`` (at most the edge's), ``date_from``/``date_to`` on ``last_updated``."""
    edge = request.app[EDGE]
    offset = _query_int(request, "offset", 0, 0)
    limit = min(_query_int(request, "limit", edge.page_limit, 1), edge.page_limit)
    date_from, date_to = _query_time(request, "date_from"), _query_time(request, "date_to")
    when = stamp or (lambda item: item.last_updated)
    if date_from is not None:
        items = [i for i in items if when(i) >= date_from]
    if date_to is not None:
        items = [i for i in items if when(i) < date_to]
    page = items[offset : offset + limit]
    response = envelope(page, edge=edge)
    response.headers["X-Total-Count"] = str(len(items))
    response.headers["X-Limit"] = str(edge.page_limit)
    if offset + limit < len(items):
        query = {k: v for k, v in request.query.items() if k not in ("offset", "limit")}
        query.update(offset=str(offset + limit), limit=str(limit))
        response.headers["Link"] = f'<{edge.public_url}{request.path}?{urlencode(query)}>; rel="next"'
    return response


@web.middleware
async def ocpi_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    edge, limiter = request.app[EDGE], request.app[LIMITER]
    request_id = request.headers.get("X-Request-ID", "")[:100] or str(uuid.uuid4())
    correlation_id = request.headers.get("X-Correlation-ID", "")[:100] or request_id
    response: web.StreamResponse
    # Per token, and per address at four times that: a caller making up tokens gets no fresh buckets.
    token = request.headers.get("Authorization", "")[:200]
    wait = limiter.allow(f"address {request.remote}", share=4) or (limiter.allow(token) if token else None)
    if wait is not None:
        response = envelope(None, 2000, "too many requests; slow down", http_status=429, edge=edge)
        response.headers["Retry-After"] = str(max(1, round(wait)))
    else:
        try:
            response = await handler(request)
        except OcpiError as exc:
            response = envelope(None, exc.status_code, exc.message, http_status=exc.http_status, edge=edge)
        except web.HTTPException as exc:
            # No such path (404), method (405), or a body over the limit (413): still an OCPI answer.
            code = 2001 if exc.status in (400, 413) else 2000
            response = envelope(None, code, exc.reason or "refused", http_status=exc.status, edge=edge)
            if exc.status == 405 and "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
        except Exception:
            log.exception("OCPI %s %s failed", request.method, request.path)
            response = envelope(
                None, 3000, "internal error; the edge's log has the details", http_status=500, edge=edge
            )
    response.headers["X-Request-ID"] = request_id
    response.headers["X-Correlation-ID"] = correlation_id
    response.headers["OCPI-from-country-code"] = edge.ocpi.country_code
    response.headers["OCPI-from-party-id"] = edge.ocpi.party_id
    for ours, theirs in (
        ("OCPI-to-country-code", "OCPI-from-country-code"),
        ("OCPI-to-party-id", "OCPI-from-party-id"),
    ):
        value = request.headers.get(theirs, "")
        if value.isalnum() and len(value) <= 3:
            response.headers[ours] = value
    return response


@contextlib.contextmanager
def reached_ocpi() -> Iterator[None]:
    """A request that names something unknown in its body got to the OCPI layer: HTTP 200 with the code."""
    try:
        yield
    except OcpiError as exc:
        if exc.http_status == 404:
            exc.http_status = 200
        raise


def _registered(request: web.Request) -> Registration:
    return request.app[EDGE].registered(request.headers.get("Authorization"))


# --- versions and credentials --------------------------------------------------------------------


async def versions(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    edge.caller(request.headers.get("Authorization"))
    return envelope([o.Version(version=VERSION, url=edge.version_url)], edge=edge)


async def version_details(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    edge.caller(request.headers.get("Authorization"))
    endpoints = [o.Endpoint(identifier=i, role=role, url=f"{edge.version_url}/{path}") for i, role, path in MODULES]  # type: ignore[arg-type]
    return envelope(o.VersionDetails(version=VERSION, endpoints=endpoints), edge=edge)


async def get_credentials(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    caller = edge.caller(request.headers.get("Authorization"))
    # Their token with us is the one they just showed: we keep only its hash.
    token = caller.token_c if caller.registration is not None else (caller.token_a or "")
    return envelope(edge.credentials(token), edge=edge)


async def post_credentials(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    caller = edge.caller(request.headers.get("Authorization"))
    theirs = decode(await read_body(request), o.Credentials)
    _reg, token_c = await edge.register(caller, theirs, update=request.method == "PUT")
    return envelope(edge.credentials(token_c), edge=edge)


async def delete_credentials(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    caller = edge.caller(request.headers.get("Authorization"))
    if caller.registration is None:
        raise OcpiError(2000, "not registered", 405)
    await edge.unregister(caller.registration)
    return envelope(None, edge=edge)


# --- locations, tariffs, sessions, CDRs ---------------------------------------------------------------


async def get_locations(request: web.Request) -> web.Response:
    _registered(request)
    return paginated(request, request.app[EDGE].locations())


async def get_location(request: web.Request) -> web.Response:
    _registered(request)
    edge = request.app[EDGE]
    location = edge.location(request.match_info["location_id"])
    evse_uid, connector_id = request.match_info.get("evse_uid"), request.match_info.get("connector_id")
    if evse_uid is None:
        return envelope(location, edge=edge)
    evse = next((e for e in location.evses or [] if e.uid == evse_uid), None)
    if evse is None:
        raise OcpiError(2003, f"unknown EVSE {evse_uid!r} at location {location.id!r}", 404)
    if connector_id is None:
        return envelope(evse, edge=edge)
    connector = next((c for c in evse.connectors if c.id == connector_id), None)
    if connector is None:
        raise OcpiError(2003, f"unknown connector {connector_id!r} of EVSE {evse_uid!r}", 404)
    return envelope(connector, edge=edge)


async def get_tariffs(request: web.Request) -> web.Response:
    _registered(request)
    return paginated(request, request.app[EDGE].tariffs())


async def get_sessions(request: web.Request) -> web.Response:
    reg = _registered(request)
    return paginated(request, request.app[EDGE].sessions(reg))


async def get_cdrs(request: web.Request) -> web.Response:
    reg = _registered(request)
    return paginated(request, request.app[EDGE].cdrs(reg))


# --- tokens (we receive the eMSP's) ------------------------------------------------------------------


def _token_path(request: web.Request, reg: Registration) -> tuple[str, str, str]:
    edge = request.app[EDGE]
    party = edge.check_party(reg, request.match_info["country_code"], request.match_info["party_id"])
    kind = request.query.get("type", "RFID")
    if kind not in ("AD_HOC_USER", "APP_USER", "OTHER", "RFID"):
        raise OcpiError(2001, f"type must be AD_HOC_USER, APP_USER, OTHER or RFID, not {kind[:40]!r}")
    return party, request.match_info["token_uid"], kind


async def get_token(request: web.Request) -> web.Response:
    reg = _registered(request)
    party, uid, kind = _token_path(request, reg)
    token = request.app[EDGE].store.token(party, uid, kind)
    if token is None:
        raise OcpiError(2004, f"unknown token {uid!r}", 404)
    return envelope(token, edge=request.app[EDGE])


async def put_token(request: web.Request) -> web.Response:
    reg = _registered(request)
    edge = request.app[EDGE]
    party, uid, kind = _token_path(request, reg)
    body = await read_body(request)
    if request.method == "PATCH":
        stored = edge.store.token(party, uid, kind)
        if stored is None:
            raise OcpiError(2004, f"unknown token {uid!r}: PUT it first", 404)
        patch = decode(body, dict[str, Any])
        if "last_updated" not in patch:
            raise OcpiError(2001, "a PATCH must have last_updated")
        body = msgspec.json.encode({**stored, **patch})
    token = decode(body, o.Token)
    if m.party_key(token.country_code, token.party_id) != party or token.uid != uid or token.type != kind:
        raise OcpiError(2001, "the token's country_code, party_id, uid and type must be those of the URL")
    updated = o.ocpi_time(o.utc(token.last_updated))
    created = await edge.store.put_token(party, uid, kind, msgspec.to_builtins(token), updated)
    return envelope(None, http_status=201 if created else 200, edge=edge)


# --- commands ---------------------------------------------------------------------------------------------


async def post_command(request: web.Request) -> web.Response:
    reg = _registered(request)
    edge = request.app[EDGE]
    name = request.match_info["command"]
    kind = o.COMMANDS.get(name)
    if kind is None:
        raise OcpiError(2001, f"unknown command {name[:40]!r} (one of {', '.join(o.COMMANDS)})")
    body = decode(await read_body(request), kind)
    with reached_ocpi():
        return envelope(edge.command(reg, name, body), edge=edge)


# --- bookings ---------------------------------------------------------------------------------------------


async def get_bookings(request: web.Request) -> web.Response:
    reg = _registered(request)
    return paginated(request, request.app[EDGE].bookings_of(reg))


async def post_booking(request: web.Request) -> web.Response:
    reg = _registered(request)
    edge = request.app[EDGE]
    booking_request = decode(await read_body(request), o.BookingRequest)
    with reached_ocpi():
        booking, why = await edge.book(reg, booking_request)
    return envelope(booking, 1000, why or "Success", edge=edge)


async def get_booking_locations(request: web.Request) -> web.Response:
    _registered(request)
    return paginated(request, request.app[EDGE].booking_locations())


async def get_booking_location(request: web.Request) -> web.Response:
    _registered(request)
    edge = request.app[EDGE]
    location = edge.booking_location_by_id(request.match_info["booking_location_id"])
    calendar_id = request.match_info.get("calendar_id")
    if calendar_id is None:
        return envelope(location, edge=edge)
    calendar = next((c for c in location.calendars if c.id == calendar_id), None)
    if calendar is None:
        raise OcpiError(
            2003,
            f"no calendar {calendar_id!r} of booking location {location.id!r} (none while it cannot be booked)",
            404,
        )
    return envelope(calendar, edge=edge)


def make_app(edge: Edge, *, max_body: int = MAX_BODY, rate: float = RATE, burst: int = BURST) -> web.Application:
    app = web.Application(middlewares=[ocpi_middleware], client_max_size=max_body)
    app[EDGE] = edge
    app[LIMITER] = RateLimiter(rate, burst)
    v = f"/ocpi/{VERSION}"
    app.router.add_get("/ocpi/versions", versions)
    app.router.add_get(v, version_details)
    app.router.add_get(f"{v}/credentials", get_credentials)
    app.router.add_post(f"{v}/credentials", post_credentials)
    app.router.add_put(f"{v}/credentials", post_credentials)
    app.router.add_delete(f"{v}/credentials", delete_credentials)
    app.router.add_get(f"{v}/locations", get_locations)
    app.router.add_get(f"{v}/locations/{{location_id}}", get_location)
    app.router.add_get(f"{v}/locations/{{location_id}}/{{evse_uid}}", get_location)
    app.router.add_get(f"{v}/locations/{{location_id}}/{{evse_uid}}/{{connector_id}}", get_location)
    app.router.add_get(f"{v}/tariffs", get_tariffs)
    app.router.add_get(f"{v}/sessions", get_sessions)
    app.router.add_get(f"{v}/cdrs", get_cdrs)
    token_path = f"{v}/tokens/{{country_code}}/{{party_id}}/{{token_uid}}"
    app.router.add_get(token_path, get_token)
    app.router.add_put(token_path, put_token)
    app.router.add_patch(token_path, put_token)
    app.router.add_post(f"{v}/commands/{{command}}", post_command)
    app.router.add_get(f"{v}/bookings/booking_locations", get_booking_locations)
    app.router.add_get(f"{v}/bookings/booking_locations/{{booking_location_id}}", get_booking_location)
    app.router.add_get(f"{v}/bookings/booking_locations/{{booking_location_id}}/{{calendar_id}}", get_booking_location)
    app.router.add_get(f"{v}/bookings", get_bookings)
    app.router.add_post(f"{v}/bookings", post_booking)
    return app
