"""What the OCPI tests share: an eMSP of our own making (its HTTP side and a client of the edge) and waiting.

``Emsp`` is a small real eMSP: an aiohttp server on port 0 that serves its versions
and endpoints, takes every push of the edge (locations, sessions, CDRs, bookings,
command results) and answers real-time authorizations; and a client that speaks
OCPI to the edge with its token. Nothing of ours is mocked: the edge and the
operator's server run as processes.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from . import ocpi_schemas as s

_parties = itertools.count(1)


def token_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Token {base64.b64encode(token.encode()).decode()}"}


def ok(data: Any = None) -> web.Response:
    return web.json_response(
        {"data": data, "status_code": 1000, "status_message": "OK", "timestamp": "2026-01-01T00:00:00Z"}
    )


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def data(self) -> Any:
        return self.body.get("data")

    @property
    def code(self) -> int:
        return int(self.body["status_code"])


@dataclass
class Emsp:
    edge_url: str
    country_code: str = "NL"
    party_id: str = field(default_factory=lambda: f"E{next(_parties):02d}")
    token_b: str = field(default_factory=lambda: f"emsp-token-{next(_parties)}")
    token_c: str = ""
    allow: dict[str, str] = field(default_factory=dict)  # token uid -> AllowedType for real-time authorization
    received: list[tuple[str, str, Any]] = field(default_factory=list)  # (method, path, body)
    addressed: list[tuple[str, str]] = field(default_factory=list)  # (path, its OCPI-to-party-id), as received
    base: str = ""
    hang: asyncio.Event | None = None  # set: pushes wait until it is set
    _runner: web.AppRunner | None = None
    _http: aiohttp.ClientSession | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Emsp:
        app = web.Application()
        app.router.add_get("/ocpi/versions", self._versions)
        app.router.add_get("/ocpi/2.2.1", self._details)
        app.router.add_route("*", "/emsp/{module}/{tail:.*}", self._take)
        app.router.add_route("*", "/emsp/{module}", self._take)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self.hang is not None:
            self.hang.set()
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- its HTTP side (what the edge calls) ---------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == token_header(self.token_b)["Authorization"]

    async def _versions(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"status_code": 2000, "timestamp": "2026-01-01T00:00:00Z"}, status=401)
        return ok(
            [
                {"version": "2.1.1", "url": f"{self.base}/ocpi/2.1.1"},
                {"version": "2.2.1", "url": f"{self.base}/ocpi/2.2.1"},
            ]
        )

    async def _details(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"status_code": 2000, "timestamp": "2026-01-01T00:00:00Z"}, status=401)
        endpoints = [
            ("credentials", "SENDER", "credentials"),
            ("locations", "RECEIVER", "locations"),
            ("sessions", "RECEIVER", "sessions"),
            ("cdrs", "RECEIVER", "cdrs"),
            ("tokens", "SENDER", "tokens"),
            ("commands", "SENDER", "commands"),
            ("bookings", "RECEIVER", "bookings"),
        ]
        return ok(
            {
                "version": "2.2.1",
                "endpoints": [{"identifier": i, "role": r, "url": f"{self.base}/emsp/{p}"} for i, r, p in endpoints],
            }
        )

    async def _take(self, request: web.Request) -> web.Response:
        if self.hang is not None:  # an eMSP that takes connections and never answers
            await self.hang.wait()
        if not self._authorized(request):
            return web.json_response({"status_code": 2000, "timestamp": "2026-01-01T00:00:00Z"}, status=401)
        body = await request.json() if request.can_read_body else None
        path = request.path.removeprefix("/emsp/")
        self.received.append((request.method, path, body))
        self.addressed.append((path, request.headers.get("OCPI-to-party-id", "")))
        self._changed.set()
        if path.startswith("tokens/") and path.endswith("/authorize"):
            uid = path.split("/")[1]
            return ok({"allowed": self.allow.get(uid, "ALLOWED"), "token": {"uid": uid}})
        return ok()

    def results(self, name: str) -> list[Any]:
        return [b for m, p, b in self.received if m == "POST" and p == f"commands/{name}"]

    async def wait_for(self, what: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Until ``what()`` is truthy (checked on every push received, and every 0.2 s)."""
        async with asyncio.timeout(timeout):
            while not (found := what()):
                self._changed.clear()
                try:
                    async with asyncio.timeout(0.2):
                        await self._changed.wait()
                except TimeoutError:
                    pass
        return found

    # --- its client side (what it asks the edge) ------------------------------------------

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> Answer:
        assert self._http is not None
        url = path if path.startswith("http") else f"{self.edge_url}{path}"
        sent = {**token_header(token if token is not None else self.token_c), **(headers or {})}
        sent.setdefault("OCPI-from-country-code", self.country_code)
        sent.setdefault("OCPI-from-party-id", self.party_id)
        kwargs: dict[str, Any] = {"headers": sent, "params": {k: str(v) for k, v in params.items()}}
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["json"] = body
        async with self._http.request(method, url, **kwargs) as response:
            payload = await response.json(content_type=None)
            s.check(s.ENVELOPE, payload)
            return Answer(response.status, dict(response.headers), payload)

    async def register(self, token_a: str, *, also: tuple[str, ...] = ()) -> Answer:
        """The credentials handshake; ``also``: more party ids it speaks for (a hub)."""
        roles = [
            {
                "role": "EMSP",
                "business_details": {"name": f"eMSP {party}"},
                "party_id": party,
                "country_code": self.country_code,
            }
            for party in (self.party_id, *also)
        ]
        credentials = {"token": self.token_b, "url": f"{self.base}/ocpi/versions", "roles": roles}
        answer = await self.call("POST", "/ocpi/2.2.1/credentials", credentials, token=token_a)
        if answer.code == 1000:
            self.token_c = answer.data["token"]
        return answer

    def token(self, uid: str, *, whitelist: str = "ALLOWED", valid: bool = True) -> dict[str, Any]:
        return {
            "country_code": self.country_code,
            "party_id": self.party_id,
            "uid": uid,
            "type": "APP_USER",
            "contract_id": f"{self.country_code}-{self.party_id}-C{uid}",
            "issuer": f"eMSP {self.party_id}",
            "valid": valid,
            "whitelist": whitelist,
            "last_updated": "2026-01-01T00:00:00Z",
        }

    async def all_pages(self, path: str, **params: Any) -> list[Any]:
        """Every object of a paginated list, following ``Link``."""
        found: list[Any] = []
        answer = await self.call("GET", path, **params)
        while True:
            assert answer.code == 1000, answer.body
            found += answer.data
            link = answer.headers.get("Link")
            if not link:
                return found
            answer = await self.call("GET", link.partition("<")[2].partition(">")[0])
