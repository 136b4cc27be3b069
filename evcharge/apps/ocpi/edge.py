"""The OCPI edge of one operator: what OCPI parties may see and do, and what is pushed to them.

The edge follows its operator's server as one of the operator's own tools (the
``operator`` role, ``OperatorFeed``: a snapshot fetched after every push) and acts
for a foreign eMSP's driver with ``Roam`` on that connection: the driver is
``ocpi:<CC>-<PID>:<token uid>`` in the ledger, owns its reservations as a vehicle
does, and every change carries an idempotency key made from the OCPI request
(its party, the eMSP's request or reservation id), so a repeated OCPI request
never acts twice and a lost reply is asked for again, never guessed.

The rules are the ledger's: a booking and an evcharge trip racing for one slot
meet in the same ``Reserve``, and exactly one wins. Only what OCPI adds is
decided here: an offline charge point is ``UNKNOWN`` and is not reserved for an
OCPI party.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import ssl
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec

from evcharge.apps.ocpi import VERSION
from evcharge.apps.ocpi import mapping as m
from evcharge.apps.ocpi import objects as o
from evcharge.apps.ocpi.store import BookingRow, EdgeStore, Registration
from evcharge.domain.world import OcpiConfig, World
from evcharge.links.feed import OperatorFeed
from evcharge.wire import protocol as p
from evcharge.wire.errors import (
    BadRequestError,
    ConflictError,
    EvchargeError,
    NotFoundError,
    RequestTimeoutError,
    UnavailableError,
)

log = logging.getLogger(__name__)

R = TypeVar("R", bound=p.Reply)

PUSH_TIMEOUT = 10.0  # real seconds an eMSP has to answer one push
REGISTER_TIMEOUT = 10.0  # each GET of the registration handshake
ANSWER_WITHIN = 20.0  # real seconds a change is asked for again (same key) when its reply is lost
COMMAND_TIMEOUT = 30  # the CommandResponse's timeout: our CommandResult comes within it
SESSION_MINUTES = 60  # START_SESSION without a booking reserves this long from now
CALENDAR_DAYS = 7  # how far ahead a booking calendar shows free timeslots
SYNC_EVERY = 2.0  # real seconds between looks at what is still to push (besides every change)
PROGRESS_EVERY = 10.0  # real seconds between a charging session's kWh updates to its eMSP


class OcpiError(Exception):
    """An OCPI-level refusal: its status code, message and HTTP status."""

    def __init__(self, status_code: int, message: str, http_status: int = 200) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.http_status = http_status


class PushError(Exception):
    """An eMSP did not take what we sent (unreachable, an HTTP error, or an OCPI status not 1xxx)."""


def key(*parts: str) -> str:
    """An idempotency key for one OCPI intent: the same request again makes the same key."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:48]


def encode_token(token: str) -> str:
    """OCPI 2.2.1 sends tokens base64-encoded in ``Authorization: Token …``."""
    return base64.b64encode(token.encode()).decode()


def token_candidates(header: str) -> list[str]:
    """What an ``Authorization`` header may carry: the token, or (2.2.1) its base64."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.casefold() != "token" or not value.strip():
        return []
    value = value.strip()
    found = [value]
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        decoded = base64.b64decode(value, validate=True).decode()
        if decoded and decoded.isprintable():
            found.append(decoded)
    return found


@dataclass(slots=True)
class Caller:
    """Who sent an OCPI request: a registered party, or one holding a registration token (token A)."""

    registration: Registration | None
    token_a: str | None
    token_c: str = ""  # the token C shown, when it is a registered party's


class Edge:
    def __init__(
        self,
        world: World,
        operator_id: str,
        *,
        host: str,
        port: int,
        public_url: str | None,
        server_host: str,
        server_port: int,
        data_dir: Path,
        registration_tokens: Path | None,
        page_limit: int = 100,
        progress_every: float = PROGRESS_EVERY,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.world = world
        self.operator = world.operator(operator_id)
        if self.operator.ocpi is None:
            raise ValueError(
                f"operator {operator_id} has no [operators.ocpi] table (country_code, party_id) in the world file"
            )
        self.ocpi: OcpiConfig = self.operator.ocpi
        self.rules = world.rules
        self.host = host
        self.port = port
        self._public_url = public_url.rstrip("/") if public_url else None
        self.page_limit = page_limit
        self.progress_every = progress_every
        self.registration_tokens_file = registration_tokens
        self.store = EdgeStore(data_dir / f"ocpi-{operator_id}.sqlite3")
        self.feed = OperatorFeed(
            self.operator,
            server_host,
            server_port,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            reserved_soon_min=world.rules.reserved_soon_min,
        )
        self.me = m.party_key(self.ocpi.country_code, self.ocpi.party_id)
        self.registrations: dict[str, Registration] = {r.id: r for r in self.store.registrations()}
        self._by_token: dict[bytes, Registration] = {}
        self._reindex()
        self._tokens_a: set[str] = set()
        self._tokens_a_mtime: float | None = None
        self._register_lock = asyncio.Lock()
        self._book_lock: dict[tuple[str, str], asyncio.Lock] = {}
        self._cancelling: set[str] = set()  # bookings the eMSP is cancelling: not "cancelled by the CPO"
        self.bookings: dict[str, BookingRow] = {b.id: b for b in self.store.bookings()}
        self._booking_of_request = {(b.party, b.request_id): b.id for b in self.bookings.values()}
        # Each charge point's OCPI status as last seen, with when it changed (OCPI time).
        self.evse_status: dict[str, tuple[o.EvseStatus, str]] = {
            uid: (status, updated)  # type: ignore[misc]
            for uid, (status, updated) in self.store.evse_statuses().items()
        }
        self._busy_seen: dict[str, tuple[tuple[float, float], ...]] = {}
        self.calendar_updated: dict[str, str] = {}
        self._status_patches: dict[str, dict[tuple[str, str], o.EvseStatusPatch]] = {}  # per registration
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http: aiohttp.ClientSession | None = None
        self._dirty = asyncio.Event()
        self._pushing: dict[str, asyncio.Task[None]] = {}  # per registration: its pusher, while it runs
        self._progress_pushed: dict[str, tuple[float, float]] = {}  # session -> (kWh pushed, when: monotonic)
        self.counters = {"pushes": 0, "push_failures": 0}

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def public_url(self) -> str:
        return self._public_url or f"http://{self.host}:{self.port}"

    @property
    def versions_url(self) -> str:
        return f"{self.public_url}/ocpi/versions"

    @property
    def version_url(self) -> str:
        return f"{self.public_url}/ocpi/{VERSION}"

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PUSH_TIMEOUT))
        original = self.feed.pushed

        def pushed(event: p.Event) -> None:
            original(event)
            self._heard(event)

        self.feed.pushed = pushed  # type: ignore[method-assign]
        self._spawn(self.feed.run())
        self._spawn(self._sync_loop())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        await self.store.close()

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def ready(self, timeout: float) -> None:
        """Until the first snapshot of the operator's state is in."""
        async with asyncio.timeout(timeout):
            while self.feed.snapshot is None:
                await self.feed.wait_change(self.feed.version, 1.0)

    # --- time and state -------------------------------------------------------------------------

    def now(self) -> datetime:
        now = self.feed.now()
        if now is None:
            raise OcpiError(3000, "the operator's server has not been reached yet; try again shortly", 503)
        return now

    def now_text(self) -> str:
        now = self.feed.now()
        return o.ocpi_time(now if now is not None else datetime.now().astimezone())

    async def server_now(self) -> datetime:
        """The server's simulated now, asked (a reservation "from now" must not start in its past).

        The feed's estimate lags by a snapshot's transit, times the clock's scale."""
        try:
            return (await self.feed.link.call(p.Heartbeat(), p.HeartbeatAck, 5.0)).server_time
        except EvchargeError:
            return self.now()

    def snapshot(self) -> p.InspectResult:
        snap = self.feed.snapshot
        if snap is None:
            raise OcpiError(3000, "the operator's server has not been reached yet; try again shortly", 503)
        return snap

    def station(self, location_id: str) -> p.StationInfo:
        for s in self.snapshot().stations:
            if s.id == location_id:
                return s
        raise OcpiError(2003, f"unknown location {location_id!r}", 404)

    def reservation(self, reservation_id: str) -> p.ReservationInfo | None:
        for r in self.snapshot().reservations:
            if r.id == reservation_id:
                return r
        return None

    # --- authorization ----------------------------------------------------------------------------

    def _reindex(self) -> None:
        self._by_token = {bytes.fromhex(r.token_c): r for r in self.registrations.values()}

    def _registration_tokens(self) -> set[str]:
        """Token A values from the operator's file, re-read when it changes; used ones are gone."""
        path = self.registration_tokens_file
        if path is None:
            return set()
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return set()
        if mtime != self._tokens_a_mtime:
            try:
                lines = path.read_text().splitlines()
            except OSError:
                return self._tokens_a
            self._tokens_a = {t.strip() for t in lines if t.strip() and not t.strip().startswith("#")}
            self._tokens_a_mtime = mtime
        return self._tokens_a

    def caller(self, header: str | None) -> Caller:
        """Who holds the token of this ``Authorization`` header; ``OcpiError`` (HTTP 401) for nobody.

        Tokens are looked up by their SHA-256 and then compared in constant time."""
        for candidate in token_candidates(header or ""):
            presented = hashlib.sha256(candidate.encode()).digest()
            reg = self._by_token.get(presented)
            if reg is not None and hmac.compare_digest(bytes.fromhex(reg.token_c), presented):
                return Caller(reg, None, candidate)
        tokens_a = self._registration_tokens()
        for candidate in token_candidates(header or ""):
            matched = any(hmac.compare_digest(t.encode(), candidate.encode()) for t in tokens_a)
            if matched and not self.store.registration_token_used(candidate):
                return Caller(None, candidate)
        raise OcpiError(2000, "missing or unknown token (Authorization: Token …)", 401)

    def registered(self, header: str | None) -> Registration:
        caller = self.caller(header)
        if caller.registration is None:
            raise OcpiError(2000, "register first: this token is only for the credentials handshake", 401)
        return caller.registration

    def registration_of_party(self, party: str) -> Registration | None:
        for reg in self.registrations.values():
            if party in reg.parties:
                return reg
        return None

    # --- credentials --------------------------------------------------------------------------------

    def credentials(self, token_c: str) -> o.Credentials:
        return o.Credentials(
            token=token_c,
            url=self.versions_url,
            roles=[
                o.CredentialsRole(
                    role="CPO",
                    business_details=o.BusinessDetails(name=self.operator.name[:100]),
                    party_id=self.ocpi.party_id,
                    country_code=self.ocpi.country_code,
                )
            ],
        )

    async def register(self, caller: Caller, theirs: o.Credentials, *, update: bool) -> tuple[Registration, str]:
        """The handshake: their versions and endpoints fetched with their token, then our new token."""
        async with self._register_lock:
            if caller.token_a is not None and self.store.registration_token_used(caller.token_a):
                raise OcpiError(2000, "this registration token has been used already", 401)
            if update and caller.registration is None:
                raise OcpiError(2000, "register first (POST), then update (PUT)", 405)
            if not update and caller.registration is not None:
                raise OcpiError(2000, "already registered: update with PUT, or unregister with DELETE", 405)
            versions = await self._get_theirs(theirs.url, theirs.token, list[o.Version])
            chosen = next((v for v in versions if v.version == VERSION), None)
            if chosen is None:
                raise OcpiError(3002, f"no version {VERSION} among {[v.version for v in versions]}")
            details = await self._get_theirs(chosen.url, theirs.token, o.VersionDetails)
            endpoints = {f"{e.identifier}.{e.role}": e.url for e in details.endpoints}
            if not endpoints:
                raise OcpiError(3003, "no endpoints in common")
            for role in theirs.roles:
                party = m.party_key(role.country_code, role.party_id)
                other = self.registration_of_party(party)
                if party == self.me or (other is not None and other is not caller.registration):
                    raise OcpiError(2001, f"party {party} is registered already")
            token_c = secrets.token_urlsafe(32)
            reg = Registration(
                id=caller.registration.id if caller.registration is not None else f"R-{secrets.token_hex(6)}",
                token_c=hashlib.sha256(token_c.encode()).hexdigest(),
                token_b=theirs.token,
                versions_url=theirs.url,
                endpoints=endpoints,
                roles=[msgspec.to_builtins(r) for r in theirs.roles],
            )
            await self.store.save_registration(reg, caller.token_a)
            self.registrations[reg.id] = reg
            self._reindex()
            log.info("registered %s (%s) for OCPI %s", reg.id, ", ".join(sorted(reg.parties)), VERSION)
            return reg, token_c

    async def unregister(self, reg: Registration) -> None:
        await self.store.delete_registration(reg.id)
        self.registrations.pop(reg.id, None)
        self._status_patches.pop(reg.id, None)
        self._reindex()
        log.info("unregistered %s (%s)", reg.id, ", ".join(sorted(reg.parties)))

    async def _get_theirs(self, url: str, token: str, expect: Any) -> Any:
        try:
            data = await self._call(None, "GET", url, None, token=token, timeout=REGISTER_TIMEOUT)
            return msgspec.convert(data, expect)
        except (PushError, msgspec.ValidationError) as exc:
            raise OcpiError(3001, f"cannot use your API at {url}: {exc}") from None

    # --- outgoing requests ----------------------------------------------------------------------------

    def _headers(self, reg: Registration | None, token: str, to_party: str | None = None) -> dict[str, str]:
        """Ours; ``to_party`` ("CC-PID") addresses one of a hub's parties, else its first role."""
        request_id = str(uuid.uuid4())
        headers = {
            "Authorization": f"Token {encode_token(token)}",
            "X-Request-ID": request_id,
            "X-Correlation-ID": request_id,
            "OCPI-from-country-code": self.ocpi.country_code,
            "OCPI-from-party-id": self.ocpi.party_id,
        }
        if to_party is not None:
            headers["OCPI-to-country-code"], _, headers["OCPI-to-party-id"] = to_party.partition("-")
        elif reg is not None and reg.roles:
            headers["OCPI-to-country-code"] = str(reg.roles[0]["country_code"])
            headers["OCPI-to-party-id"] = str(reg.roles[0]["party_id"])
        return headers

    async def _call(
        self,
        reg: Registration | None,
        method: str,
        url: str,
        body: Any,
        *,
        token: str | None = None,
        timeout: float,
        to_party: str | None = None,
    ) -> Any:
        """One request to a party; its envelope's ``data``. ``PushError`` unless it says 1xxx."""
        assert self._http is not None
        headers = self._headers(reg, token if token is not None else (reg.token_b if reg else ""), to_party)
        payload = msgspec.json.encode(body) if body is not None else None
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with asyncio.timeout(timeout):
                async with self._http.request(method, url, data=payload, headers=headers) as response:
                    text = await response.read()
                    if response.status >= 300:
                        raise PushError(f"HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PushError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
        try:
            envelope = msgspec.json.decode(text)
        except msgspec.DecodeError:
            raise PushError("the answer is not JSON") from None
        if not isinstance(envelope, dict) or not isinstance(envelope.get("status_code"), int):
            raise PushError("the answer is not an OCPI response")
        if not 1000 <= envelope["status_code"] < 2000:
            raise PushError(f"status {envelope['status_code']}: {envelope.get('status_message', '')}")
        return envelope.get("data")

    async def push(self, reg: Registration, method: str, url: str, body: Any, to_party: str | None = None) -> bool:
        self.counters["pushes"] += 1
        try:
            await self._call(reg, method, url, body, timeout=PUSH_TIMEOUT, to_party=to_party)
            return True
        except PushError as exc:
            self.counters["push_failures"] += 1
            log.warning("%s %s to %s failed: %s", method, url, reg.id, exc)
            return False

    # --- the ledger, through the operator connection ---------------------------------------------------

    async def roam(self, driver: str, request: p.RoamedRequest, timeout: float | None = None) -> p.ReservationReply:
        """Ask our server for the roaming driver; its refusal is raised as the ``EvchargeError`` it is."""
        deadline = asyncio.get_running_loop().time() + ANSWER_WITHIN
        return await self.feed.link.call(
            p.Roam(vehicle_id=driver, request=request), p.ReservationReply, timeout, again_until=deadline
        )

    async def caught_up(self, reply: p.ReservationReply) -> None:
        """Our own change, written into the snapshot at once: a party reads its writes.

        The server's push brings a fresh snapshot a moment later, which has it too."""
        snap = self.feed.snapshot
        if snap is None:
            return
        r = reply.reservation
        for i, known in enumerate(snap.reservations):
            if known.id == r.id:
                snap.reservations[i] = r
                break
        else:
            snap.reservations.append(r)
        self._dirty.set()

    # --- locations -------------------------------------------------------------------------------------

    def locations(self) -> list[o.Location]:
        snap = self.snapshot()
        updated = {cp: when for cp, (_status, when) in self.evse_status.items()}
        default = o.ocpi_time(snap.server_time)
        return [m.location(self.operator, self.ocpi, s, updated, default) for s in snap.stations]

    def location(self, location_id: str) -> o.Location:
        snap = self.snapshot()
        updated = {cp: when for cp, (_status, when) in self.evse_status.items()}
        return m.location(self.operator, self.ocpi, self.station(location_id), updated, o.ocpi_time(snap.server_time))

    def tariffs(self) -> list[o.Tariff]:
        snap = self.snapshot()
        return m.tariffs(self.ocpi, snap.stations, o.ocpi_time(snap.server_time))

    # --- sessions and CDRs -------------------------------------------------------------------------------

    def _heard(self, event: p.Event) -> None:
        """A reservation change, as the server pushes it: when a roaming driver's session began or ended."""
        if isinstance(event, p.ReservationChanged) and p.is_roaming_driver(event.reservation.vehicle_id):
            r = event.reservation
            now = self.now_text()
            if r.state == "charging":
                self._spawn(self._seen(r.id, started=now))
                return
            if r.state == "completed":
                self._spawn(self._seen(r.id, started=o.ocpi_time(r.start), ended=now))
                return
        self._dirty.set()

    async def _seen(self, reservation_id: str, *, started: str, ended: str = "") -> None:
        """A session's times stored (off the loop, in order), then pushed from there."""
        await self.store.session_seen(reservation_id, started=started, ended=ended)
        self._dirty.set()

    def _cdr_token(self, driver: str) -> tuple[o.CdrToken, str, str | None]:
        known = self.store.driver(driver)
        party = m.party_of_driver(driver) or "XX-XXX"
        cc, _, pid = party.partition("-")
        uid = driver.rpartition(":")[2]
        if known is None:
            return o.CdrToken(country_code=cc, party_id=pid, uid=uid, type="OTHER", contract_id=uid), "COMMAND", None
        token, method, reference = known
        cdr_token = o.CdrToken(
            country_code=str(token.get("country_code", cc)),
            party_id=str(token.get("party_id", pid)),
            uid=str(token.get("uid", uid)),
            type=token.get("type", "OTHER"),
            contract_id=str(token.get("contract_id", uid)),
        )
        return cdr_token, method, reference

    def _session_rows(self, parties: set[str]) -> list[tuple[p.ReservationInfo, str, str]]:
        """Roaming drivers' sessions of these parties: (reservation, started, ended)."""
        seen = self.store.sessions()
        found = []
        for r in self.snapshot().reservations:
            if r.state not in ("charging", "completed") or m.party_of_driver(r.vehicle_id) not in parties:
                continue
            started, ended, _pushed, _cdr = seen.get(r.id, ("", "", "", False))
            started = started or o.ocpi_time(r.start)
            if r.state == "completed":
                ended = ended or o.ocpi_time(min(r.end, self.now()))
            found.append((r, started, ended))
        return found

    def session(self, r: p.ReservationInfo, started: str, ended: str) -> o.Session:
        cdr_token, method, reference = self._cdr_token(r.vehicle_id)
        return o.Session(
            country_code=self.ocpi.country_code,
            party_id=self.ocpi.party_id,
            id=r.id,
            start_date_time=started,
            end_date_time=ended or None,
            kwh=r.kwh,
            cdr_token=cdr_token,
            auth_method=method,  # type: ignore[arg-type]
            authorization_reference=reference,
            location_id=r.station_id,
            evse_uid=r.charge_point_id,
            connector_id=m.CONNECTOR_ID,
            currency=self.ocpi.currency,
            total_cost=o.Price(excl_vat=r.cost),
            status="COMPLETED" if r.state == "completed" else "ACTIVE",
            last_updated=ended or started,
        )

    def sessions(self, reg: Registration) -> list[o.Session]:
        return [self.session(*row) for row in self._session_rows(reg.parties)]

    def cdr(self, r: p.ReservationInfo, started: str, ended: str) -> o.Cdr:
        cdr_token, method, reference = self._cdr_token(r.vehicle_id)
        station = self.station(r.station_id)
        cp = next(c for c in station.charge_points if c.id == r.charge_point_id)
        standard, fmt, power_type, _volts = m.connector_kind(cp.connector, cp.power_kw)
        began, finished = datetime.fromisoformat(started), datetime.fromisoformat(ended)
        hours = max(0.0, (finished - began).total_seconds() / 3600)
        return o.Cdr(
            country_code=self.ocpi.country_code,
            party_id=self.ocpi.party_id,
            id=r.id,
            start_date_time=started,
            end_date_time=ended,
            session_id=r.id,
            cdr_token=cdr_token,
            auth_method=method,  # type: ignore[arg-type]
            authorization_reference=reference,
            cdr_location=o.CdrLocation(
                id=station.id,
                name=station.name,
                address=station.name,
                city=station.city,
                country=self.ocpi.country,
                coordinates=m.geo(station),
                evse_uid=cp.id,
                evse_id=m.evse_id(self.ocpi, cp.id),
                connector_id=m.CONNECTOR_ID,
                connector_standard=standard,
                connector_format=fmt,
                connector_power_type=power_type,
            ),
            currency=self.ocpi.currency,
            tariffs=m.tariffs(self.ocpi, [msgspec.structs.replace(station, charge_points=[cp])], started),
            charging_periods=[
                o.ChargingPeriod(
                    start_date_time=started,
                    dimensions=[
                        o.CdrDimension(type="ENERGY", volume=r.kwh),
                        o.CdrDimension(type="TIME", volume=round(hours, 4)),
                    ],
                )
            ],
            total_cost=o.Price(excl_vat=r.cost),
            total_energy=r.kwh,
            total_time=round(hours, 4),
            last_updated=ended,
        )

    def cdrs(self, reg: Registration) -> list[o.Cdr]:
        return [self.cdr(r, s, e) for r, s, e in self._session_rows(reg.parties) if r.state == "completed"]

    # --- tokens ------------------------------------------------------------------------------------------

    def check_party(self, reg: Registration, country_code: str, party_id: str) -> str:
        party = m.party_key(country_code, party_id)
        if party not in reg.parties:
            raise OcpiError(2001, f"party {party} is not one of yours ({', '.join(sorted(reg.parties))})")
        return party

    async def authorize(self, reg: Registration, token: o.Token) -> str | None:
        """None if the token may charge; else why not. Real-time with the eMSP unless whitelisted here."""
        party = self.check_party(reg, token.country_code, token.party_id)
        stored = self.store.token(party, token.uid, token.type)
        if stored is not None:
            if not stored.get("valid", False):
                return f"token {token.uid} is not valid"
            if stored.get("whitelist") != "NEVER":
                return None
        elif not token.valid:
            return f"token {token.uid} is not valid"
        url = reg.endpoint("tokens", "SENDER")
        if url is None:
            return None  # the eMSP sent the command with its own token: it vouches for it
        try:
            data = await self._call(
                reg, "POST", f"{url.rstrip('/')}/{token.uid}/authorize?type={token.type}", None, timeout=PUSH_TIMEOUT
            )
            info = msgspec.convert(data, o.AuthorizationInfo)
        except (PushError, msgspec.ValidationError) as exc:
            return f"token {token.uid} could not be authorized: {exc}"
        return None if info.allowed == "ALLOWED" else f"token {token.uid} is {info.allowed}"

    # --- commands ------------------------------------------------------------------------------------------

    def _charge_points(self, location_id: str, evse_uid: str | None) -> list[p.ChargePointInfo]:
        station = self.station(location_id)
        cps = [cp for cp in station.charge_points if evse_uid is None or cp.id == evse_uid]
        if not cps:
            raise OcpiError(2003, f"unknown EVSE {evse_uid!r} at location {location_id!r}", 404)
        return cps

    def command(self, reg: Registration, name: str, body: Any) -> o.CommandResponse:
        """Answer at once; the outcome follows as a ``CommandResult`` POSTed to ``response_url``."""
        match body:
            case o.ReserveNow() | o.StartSession():
                self.check_party(reg, body.token.country_code, body.token.party_id)
                cps = self._charge_points(body.location_id, body.evse_uid)
                usable = [cp for cp in cps if m.EVSE_STATUS.get(cp.status, "UNKNOWN") in m.BOOKABLE]
                if not usable:
                    status = m.EVSE_STATUS.get(cps[0].status, "UNKNOWN")
                    return self._refused(f"EVSE {cps[0].id} is {status}: it cannot be reserved or started now")
                if isinstance(body, o.ReserveNow):
                    self._spawn(self._finish(reg, body.response_url, self._reserve_now(reg, body, usable)))
                else:
                    self._spawn(self._finish(reg, body.response_url, self._start_session(reg, body, usable)))
            case o.CancelReservation():
                self._spawn(self._finish(reg, body.response_url, self._cancel_reservation(reg, body)))
            case o.StopSession():
                r = self.reservation(body.session_id)
                if r is None or m.party_of_driver(r.vehicle_id) not in reg.parties:
                    return o.CommandResponse(
                        result="UNKNOWN_SESSION",
                        timeout=0,
                        message=o.text(f"no session {body.session_id!r}"),
                    )
                self._spawn(self._finish(reg, body.response_url, self._stop_session(reg, body, r)))
            case _:
                return o.CommandResponse(result="NOT_SUPPORTED", timeout=0, message=o.text(f"{name} is not supported"))
        return o.CommandResponse(result="ACCEPTED", timeout=COMMAND_TIMEOUT)

    @staticmethod
    def _refused(why: str) -> o.CommandResponse:
        return o.CommandResponse(result="REJECTED", timeout=0, message=o.text(why))

    async def _finish(self, reg: Registration, url: str, work: Coroutine[Any, Any, o.CommandResult]) -> None:
        try:
            result = await work
        except Exception:
            log.exception("command for %s failed", reg.id)
            result = o.CommandResult(result="FAILED", message=o.text("the command failed"))
        for attempt in range(3):
            if await self.push(reg, "POST", url, result):
                return
            await asyncio.sleep(1.0 + attempt)

    @staticmethod
    def _result(result: o.CommandResultType, why: str = "") -> o.CommandResult:
        return o.CommandResult(result=result, message=o.text(why) if why else None)

    def _failed(self, exc: EvchargeError) -> o.CommandResult:
        match exc:
            case ConflictError():
                return self._result("EVSE_OCCUPIED", exc.message)
            case UnavailableError():
                return self._result("EVSE_INOPERATIVE" if "charge point" in exc.message else "FAILED", exc.message)
            case RequestTimeoutError():
                return self._result("TIMEOUT", exc.message)
            case NotFoundError():
                return self._result("UNKNOWN_RESERVATION", exc.message)
        return self._result("REJECTED", exc.message)

    async def _reserve_now(self, reg: Registration, cmd: o.ReserveNow, cps: list[p.ChargePointInfo]) -> o.CommandResult:
        refused = await self.authorize(reg, cmd.token)
        if refused is not None:
            return self._result("REJECTED", refused)
        party = m.party_key(cmd.token.country_code, cmd.token.party_id)
        driver = m.driver_id(cmd.token.country_code, cmd.token.party_id, cmd.token.uid)
        known = self.store.reservation_of(party, cmd.reservation_id)
        if known is not None and known[0]:
            return self._result("ACCEPTED")
        # The same reservation id asked again reserves from the same start: its key finds the first outcome.
        start = (
            datetime.fromisoformat(known[2]) if known is not None else (await self.server_now()).replace(microsecond=0)
        )
        minutes = m.minutes_between(start, o.utc(cmd.expiry_date))
        if not 1 <= minutes <= self.rules.max_reservation_min:
            return self._result("REJECTED", f"expiry_date must be 1..{self.rules.max_reservation_min} minutes ahead")
        await self.store.map_reservation(party, cmd.reservation_id, "", driver, o.ocpi_time(start))
        await self.store.remember_driver(driver, msgspec.to_builtins(cmd.token), "COMMAND", cmd.authorization_reference)
        last: o.CommandResult = self._result("REJECTED")
        for cp in cps:
            request = p.Reserve(
                charge_point_id=cp.id,
                start=start,
                minutes=minutes,
                key=key(party, "RESERVE_NOW", cmd.reservation_id, cp.id),
            )
            try:
                reply = await self.roam(driver, request)
                await self.caught_up(reply)
            except EvchargeError as exc:
                last = self._failed(exc)
                if last.result in ("EVSE_OCCUPIED", "EVSE_INOPERATIVE"):
                    continue
                return last
            ours = reply.reservation.id
            await self.store.map_reservation(party, cmd.reservation_id, ours, driver, o.ocpi_time(start))
            return self._result("ACCEPTED")
        return last

    async def _cancel_reservation(self, reg: Registration, cmd: o.CancelReservation) -> o.CommandResult:
        for party in sorted(reg.parties):
            known = self.store.reservation_of(party, cmd.reservation_id)
            if known is None or not known[0]:
                continue
            rid, driver, _start = known
            try:
                cancel = p.CancelReservation(reservation_id=rid, key=key(party, "CANCEL", cmd.reservation_id))
                await self.caught_up(await self.roam(driver, cancel))
            except ConflictError as exc:
                return self._result("REJECTED", exc.message)
            except EvchargeError as exc:
                return self._failed(exc)
            return self._result("ACCEPTED")
        return self._result("UNKNOWN_RESERVATION", f"no reservation {cmd.reservation_id!r}")

    async def _start_session(
        self, reg: Registration, cmd: o.StartSession, cps: list[p.ChargePointInfo]
    ) -> o.CommandResult:
        refused = await self.authorize(reg, cmd.token)
        if refused is not None:
            return self._result("REJECTED", refused)
        party = m.party_key(cmd.token.country_code, cmd.token.party_id)
        driver = m.driver_id(cmd.token.country_code, cmd.token.party_id, cmd.token.uid)
        await self.store.remember_driver(driver, msgspec.to_builtins(cmd.token), "COMMAND", cmd.authorization_reference)
        now = await self.server_now()
        early = timedelta(minutes=self.rules.early_start_min)
        ids = {cp.id for cp in cps}
        # The driver's own booking (a RESERVE_NOW or a Booking) here, if it may start now.
        mine = [
            r
            for r in self.snapshot().reservations
            if r.vehicle_id == driver
            and r.state == "booked"
            and r.charge_point_id in ids
            and r.start - early <= now < r.end
        ]
        reserved_here = False
        if mine:
            rid = min(mine, key=lambda r: r.start).id
        else:
            rid = ""
            last: o.CommandResult = self._result("EVSE_OCCUPIED")
            minutes = min(SESSION_MINUTES, self.rules.max_reservation_min)
            for cp in cps:
                request = p.Reserve(
                    charge_point_id=cp.id,
                    start=now.replace(microsecond=0),
                    minutes=minutes,
                    key=key(party, "START_SESSION", cmd.response_url, cp.id),
                )
                try:
                    rid = (await self.roam(driver, request)).reservation.id
                    reserved_here = True
                    break
                except EvchargeError as exc:
                    last = self._failed(exc)
                    if last.result not in ("EVSE_OCCUPIED", "EVSE_INOPERATIVE"):
                        return last
            if not rid:
                return last
        try:
            start = p.StartCharging(reservation_id=rid, key=key(party, "START", cmd.response_url))
            await self.caught_up(await self.roam(driver, start, 15.0))
        except EvchargeError as exc:
            if reserved_here and not isinstance(exc, RequestTimeoutError):
                # The slot was taken only to charge now: give it back.
                with contextlib.suppress(EvchargeError):
                    await self.roam(driver, p.CancelReservation(reservation_id=rid, key=key(party, "UNDO", rid)))
            return self._failed(exc)
        return self._result("ACCEPTED")

    async def _stop_session(self, reg: Registration, cmd: o.StopSession, r: p.ReservationInfo) -> o.CommandResult:
        party = m.party_of_driver(r.vehicle_id) or ""
        try:
            stop = p.StopCharging(reservation_id=r.id, key=key(party, "STOP", r.id))
            await self.caught_up(await self.roam(r.vehicle_id, stop, 15.0))
        except ConflictError as exc:
            return self._result("REJECTED", exc.message)
        except EvchargeError as exc:
            return self._failed(exc)
        return self._result("ACCEPTED")

    # --- bookings --------------------------------------------------------------------------------------------

    def busy(self, cp_id: str) -> list[tuple[datetime, datetime]]:
        return [
            (r.start, r.end) for r in self.snapshot().reservations if r.charge_point_id == cp_id and r.state in m.LIVE
        ]

    def calendar(self, cp: p.ChargePointInfo) -> o.Calendar | None:
        if m.EVSE_STATUS.get(cp.status, "UNKNOWN") not in m.BOOKABLE:
            return None  # offline or out of service: nothing is bookable on it now
        now = self.now()
        begin = (now + timedelta(seconds=59)).replace(second=0, microsecond=0)
        end = begin + timedelta(days=min(CALENDAR_DAYS, self.rules.max_advance_days))
        slots = m.free_slots(self.busy(cp.id), begin, end, timedelta(minutes=1))
        if not slots:
            return None
        return o.Calendar(
            id=cp.id,
            begin_from=o.ocpi_time(begin),
            end_before=o.ocpi_time(end),
            step_size=1,
            available_timeslots=[
                o.SentTimeslot(start_from=o.ocpi_time(a), end_before=o.ocpi_time(b), max_power=cp.power_kw * 1000)
                for a, b in slots
            ],
            last_updated=self.calendar_updated.get(cp.id, o.ocpi_time(self.snapshot().server_time)),
        )

    def booking_location(self, station: p.StationInfo, cp: p.ChargePointInfo) -> o.BookingLocation:
        calendar = self.calendar(cp)
        default = o.ocpi_time(self.snapshot().server_time)
        updated = max(self.calendar_updated.get(cp.id, default), self.evse_status.get(cp.id, ("", default))[1])
        return o.BookingLocation(
            country_code=self.ocpi.country_code,
            party_id=self.ocpi.party_id,
            id=cp.id,
            location_id=station.id,
            evse_uid=cp.id,
            connector_id=m.CONNECTOR_ID,
            bookable=o.Bookable(reservation_required=False),
            tariff_id=[m.tariff_id(cp.price_per_kwh)],
            booking_terms=[m.booking_terms(self.rules)],
            calendars=[calendar] if calendar is not None else [],
            last_updated=updated,
        )

    def booking_locations(self) -> list[o.BookingLocation]:
        return [self.booking_location(s, cp) for s in self.snapshot().stations for cp in s.charge_points]

    def booking_location_by_id(self, bl_id: str) -> o.BookingLocation:
        for s in self.snapshot().stations:
            for cp in s.charge_points:
                if cp.id == bl_id:
                    return self.booking_location(s, cp)
        raise OcpiError(2003, f"unknown booking location {bl_id!r}", 404)

    def booking(self, row: BookingRow) -> o.Booking:
        cp = None
        if row.evse_uid:
            with contextlib.suppress(OcpiError):
                cp = next(
                    (c for c in self.station(row.request["location_id"]).charge_points if c.id == row.evse_uid), None
                )
        period = row.request["period"]
        return o.Booking(
            id=row.id,
            country_code=self.ocpi.country_code,
            party_id=self.ocpi.party_id,
            request_id=row.request_id,
            location_id=row.request["location_id"],
            evse_uid=row.evse_uid or None,
            connector_id=m.CONNECTOR_ID if row.evse_uid else None,
            booking_tokens=list(row.request.get("tokens", [])),
            tariff_id=[m.tariff_id(cp.price_per_kwh)] if cp is not None else [],
            period=o.SentTimeslot(start_from=period["start_from"], end_before=period["end_before"]),
            reservation_status=row.status,  # type: ignore[arg-type]
            canceled=row.canceled,
            access_methods=[o.AccessMethod(location_access="OPEN")],
            authorization_reference=row.request["authorization_reference"],
            booking_terms=m.booking_terms(self.rules),
            booking_requests=[o.BookingRequestStatus(**r) for r in row.requests],
            last_updated=row.last_updated,
        )

    def bookings_of(self, reg: Registration) -> list[o.Booking]:
        return [self.booking(b) for b in self.bookings.values() if b.party in reg.parties]

    async def _save(self, row: BookingRow) -> None:
        await self.store.put_booking(row)
        self.bookings[row.id] = row
        self._booking_of_request[(row.party, row.request_id)] = row.id

    async def book(self, reg: Registration, req: o.BookingRequest) -> tuple[o.Booking, str]:
        """A booking request: a new booking, the same one again, or its cancellation. (booking, message)."""
        party = self.check_party(reg, req.country_code, req.party_id)
        for t in req.tokens:
            self.check_party(reg, t.country_code, t.party_id)
        lock = self._book_lock.setdefault((party, req.request_id), asyncio.Lock())
        async with lock:
            try:
                return await self._book(party, req)
            finally:
                if not lock._waiters:
                    self._book_lock.pop((party, req.request_id), None)

    async def _book(self, party: str, req: o.BookingRequest) -> tuple[o.Booking, str]:
        now_text = self.now_text()
        sent = msgspec.to_builtins(req)
        sent["period"] = {
            "start_from": o.ocpi_time(o.utc(req.period.start_from)),
            "end_before": o.ocpi_time(o.utc(req.period.end_before)),
        }
        existing_id = self._booking_of_request.get((party, req.request_id))
        if existing_id is not None:
            row = self.bookings[existing_id]
            if req.canceled is not None:
                return await self._cancel_booking(row, req, sent, now_text)
            same = {k: sent.get(k) for k in ("location_id", "evse_uid", "period")}
            if same == {k: row.request.get(k) for k in ("location_id", "evse_uid", "period")}:
                return self.booking(row), "the same booking request again: nothing changed"
            row.requests.append({"request_status": "DECLINED", "booking_request": sent, "request_received": now_text})
            row.last_updated = now_text
            await self._save(row)
            return self.booking(row), "changes are not allowed (booking terms): cancel it and book again"
        if req.canceled is not None:
            raise OcpiError(2001, f"no booking with request_id {req.request_id!r} to cancel")
        start, end = o.utc(req.period.start_from), o.utc(req.period.end_before)
        if end <= start:
            raise OcpiError(2001, "period.end_before must be after period.start_from")
        minutes = m.minutes_between(start, end)
        cps = self._charge_points(req.location_id, req.evse_uid)
        uid = req.tokens[0].uid if req.tokens else f"ref:{req.authorization_reference}"
        cc, _, pid = party.partition("-")
        driver = m.driver_id(cc, pid, uid)
        if req.tokens:
            t = req.tokens[0]
            token = {
                "country_code": t.country_code,
                "party_id": t.party_id,
                "uid": t.uid,
                "type": t.type,
                "contract_id": t.contract_id,
            }
            await self.store.remember_driver(driver, token, "COMMAND", req.authorization_reference)
        row = BookingRow(
            id=f"BK-{secrets.token_hex(6)}",
            party=party,
            request_id=req.request_id,
            request=sent,
            reservation_id="",
            driver=driver,
            status="REJECTED",
            canceled=None,
            requests=[],
            received=now_text,
            last_updated=now_text,
            pushed="",
            evse_uid=req.evse_uid or "",
        )
        why = ""
        usable = [cp for cp in cps if m.EVSE_STATUS.get(cp.status, "UNKNOWN") in m.BOOKABLE]
        if not usable:
            why = f"EVSE {cps[0].id} is {m.EVSE_STATUS.get(cps[0].status, 'UNKNOWN')}: it cannot be booked now"
        for cp in usable:
            request = p.Reserve(
                charge_point_id=cp.id, start=start, minutes=minutes, key=key(party, "BOOK", req.request_id, cp.id)
            )
            try:
                reply = await self.roam(m.driver_id(cc, pid, uid), request)
            except (ConflictError, UnavailableError) as exc:
                why = exc.message  # taken, or out of service: the next charge point of the location may fit
                continue
            except BadRequestError as exc:
                why = exc.message
                break
            except RequestTimeoutError as exc:
                # Not known whether it was booked: nothing stored, so the same request_id again learns it.
                raise OcpiError(3000, f"not known yet whether it was booked ({exc.message}); send it again") from None
            except EvchargeError as exc:
                why = exc.message
                break
            await self.caught_up(reply)
            row.reservation_id, row.status, row.evse_uid = reply.reservation.id, "RESERVED", cp.id
            why = ""
            break
        accepted = row.status == "RESERVED"
        row.requests.append(
            {
                "request_status": "ACCEPTED" if accepted else "DECLINED",
                "booking_request": sent,
                "request_received": now_text,
            }
        )
        row.pushed = row.status  # the eMSP hears this status in the reply
        await self._save(row)
        return self.booking(row), why

    async def _cancel_booking(
        self, row: BookingRow, req: o.BookingRequest, sent: dict[str, Any], now_text: str
    ) -> tuple[o.Booking, str]:
        if row.status in m.FINAL_BOOKING:
            return self.booking(row), f"the booking is {row.status} already"
        try:
            unbook = p.CancelReservation(
                reservation_id=row.reservation_id, key=key(row.party, "UNBOOK", row.request_id)
            )
            self._cancelling.add(row.id)
            await self.caught_up(await self.roam(row.driver, unbook))
        except ConflictError as exc:
            row.requests.append({"request_status": "DECLINED", "booking_request": sent, "request_received": now_text})
            await self._save(row)
            return self.booking(row), exc.message
        except RequestTimeoutError as exc:
            raise OcpiError(3000, f"not known yet whether it was cancelled ({exc.message}); send it again") from None
        except EvchargeError as exc:
            raise OcpiError(3000, exc.message) from None
        finally:
            self._cancelling.discard(row.id)
        assert req.canceled is not None
        row.status = "CANCELED"
        row.canceled = {
            "cancellation_reason": req.canceled.cancellation_reason,
            "who_canceled": req.canceled.who_canceled,
        }
        row.requests.append({"request_status": "ACCEPTED", "booking_request": sent, "request_received": now_text})
        row.last_updated = now_text
        row.pushed = row.status
        await self._save(row)
        return self.booking(row), ""

    # --- what changed, pushed to whom it concerns --------------------------------------------------------------

    async def _sync_loop(self) -> None:
        seen = -1
        while True:
            seen = await self.feed.wait_change(seen, SYNC_EVERY)
            self._dirty.clear()
            if self.feed.snapshot is None:
                continue
            try:
                await self.sync()
            except OcpiError:
                continue
            except Exception:
                log.exception("pushing changes to OCPI parties failed; trying again")
                await asyncio.sleep(SYNC_EVERY)

    async def sync(self) -> None:
        snap = self.snapshot()
        now_text = self.now_text()
        changed: list[tuple[str, str, str]] = []
        for station in snap.stations:
            for cp in station.charge_points:
                status = m.EVSE_STATUS.get(cp.status, "UNKNOWN")
                before = self.evse_status.get(cp.id)
                if before is None or before[0] != status:
                    self.evse_status[cp.id] = (status, now_text)
                    changed.append((cp.id, status, now_text))
                    if before is not None:
                        patch = o.EvseStatusPatch(status=status, last_updated=now_text)
                        for reg in self.registrations.values():
                            if reg.endpoint("locations") is not None:
                                self._status_patches.setdefault(reg.id, {})[(station.id, cp.id)] = patch
                busy = tuple(sorted((a.timestamp(), b.timestamp()) for a, b in self.busy(cp.id)))
                if self._busy_seen.get(cp.id) != busy:
                    self._busy_seen[cp.id] = busy
                    self.calendar_updated[cp.id] = now_text
        if changed:
            await self.store.save_evse_statuses(changed)
        await self._update_bookings(snap, now_text)
        self._push_all()

    async def _update_bookings(self, snap: p.InspectResult, now_text: str) -> None:
        by_id = {r.id: r for r in snap.reservations}
        for row in list(self.bookings.values()):
            if row.status in m.FINAL_BOOKING or not row.reservation_id or row.id in self._cancelling:
                continue
            r = by_id.get(row.reservation_id)
            if r is None:
                continue
            status = m.BOOKING_STATUS.get(r.state, "UNKNOWN")
            if status != row.status:
                row.status = status
                row.last_updated = now_text
                if status == "CANCELED" and row.canceled is None:
                    row.canceled = {
                        "cancellation_reason": "UNKNOWN",
                        "who_canceled": "CPO",
                    }
                await self._save(row)

    async def _push_progress(self, reg: Registration, sessions_url: str, r: p.ReservationInfo) -> bool:
        """A charging session's kWh and cost as they grow, to its eMSP: a PATCH every ``progress_every`` at most.

        False if the eMSP did not take it."""
        kwh, when = self._progress_pushed.get(r.id, (0.0, 0.0))
        if r.kwh == kwh or time.monotonic() - when < self.progress_every:
            return True
        target = f"{sessions_url.rstrip('/')}/{self.ocpi.country_code}/{self.ocpi.party_id}/{r.id}"
        patch = o.SessionPatch(kwh=r.kwh, total_cost=o.Price(excl_vat=r.cost), last_updated=self.now_text())
        if not await self.push(reg, "PATCH", target, patch, m.party_of_driver(r.vehicle_id)):
            return False
        self._progress_pushed[r.id] = (r.kwh, time.monotonic())
        return True

    def _push_all(self) -> None:
        """One pusher per party at a time: a party that does not answer holds up no one else."""
        for reg in list(self.registrations.values()):
            running = self._pushing.get(reg.id)
            if running is None or running.done():
                self._pushing[reg.id] = self._spawn(self._push_guarded(reg))

    async def _push_guarded(self, reg: Registration) -> None:
        try:
            await self._push_to(reg)
        except OcpiError:
            pass  # the server's state is not in yet: the next look pushes
        except Exception:
            log.exception("pushing to %s failed; trying again at the next look", reg.id)

    async def _push_to(self, reg: Registration) -> None:
        """Everything this party has not heard yet: EVSE status, sessions, CDRs, booking status.

        The first push it does not take ends the round: the rest waits for the next look."""
        patches = self._status_patches.pop(reg.id, {})
        url = reg.endpoint("locations")
        if url is not None and patches:
            base = f"{url.rstrip('/')}/{self.ocpi.country_code}/{self.ocpi.party_id}"
            results = await asyncio.gather(
                *(self.push(reg, "PATCH", f"{base}/{lid}/{uid}", patch) for (lid, uid), patch in patches.items())
            )
            for (where, patch), ok in zip(patches.items(), results, strict=True):
                if not ok:  # again at the next look, unless a newer status came meanwhile
                    self._status_patches.setdefault(reg.id, {}).setdefault(where, patch)
            if not all(results):
                return
        seen = self.store.sessions()
        sessions_url, cdrs_url = reg.endpoint("sessions"), reg.endpoint("cdrs")
        for r, started, ended in self._session_rows(reg.parties):
            _s, _e, pushed, cdr_pushed = seen.get(r.id, ("", "", "", False))
            if r.id not in seen:
                await self.store.session_seen(r.id, started=started, ended=ended)
            status = "COMPLETED" if r.state == "completed" else "ACTIVE"
            party = m.party_of_driver(r.vehicle_id)
            if sessions_url is not None and pushed != status:
                target = f"{sessions_url.rstrip('/')}/{self.ocpi.country_code}/{self.ocpi.party_id}/{r.id}"
                if not await self.push(reg, "PUT", target, self.session(r, started, ended), party):
                    return
                await self.store.session_pushed(r.id, status)
                self._progress_pushed[r.id] = (r.kwh, time.monotonic())
            elif (
                sessions_url is not None and status == "ACTIVE" and not await self._push_progress(reg, sessions_url, r)
            ):
                return
            if status == "COMPLETED":
                self._progress_pushed.pop(r.id, None)
                if cdrs_url is not None and not cdr_pushed:
                    if not await self.push(reg, "POST", cdrs_url, self.cdr(r, started, ended), party):
                        return
                    await self.store.cdr_pushed(r.id)
        bookings_url = reg.endpoint("bookings")
        for row in list(self.bookings.values()):
            if row.party not in reg.parties or row.pushed == row.status or bookings_url is None:
                continue
            target = f"{bookings_url.rstrip('/')}/{self.ocpi.country_code}/{self.ocpi.party_id}/{row.id}"
            news = o.BookingPatch(
                reservation_status=row.status,  # type: ignore[arg-type]
                canceled=row.canceled,
                last_updated=row.last_updated,
            )
            if not await self.push(reg, "PATCH", target, news, row.party):
                return
            row.pushed = row.status
            await self._save(row)


class RateLimiter:
    """Token buckets per caller: ``rate`` requests a second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, who: str, share: int = 1) -> float | None:
        """None if it may go now; else the seconds until it may. ``share``: this bucket is that many callers'."""
        if self.rate <= 0:
            return None
        rate, burst = self.rate * share, float(self.burst * share)
        now = self.clock()
        tokens, then = self._buckets.get(who, (burst, now))
        tokens = min(burst, tokens + (now - then) * rate)
        if tokens < 1.0:
            self._buckets[who] = (tokens, now)
            return (1.0 - tokens) / rate
        self._buckets[who] = (tokens - 1.0, now)
        if len(self._buckets) > 10_000:  # forget the buckets of callers long gone (refilled by now)
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < burst / rate}
        return None
