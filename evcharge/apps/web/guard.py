"""Who may read the dashboard: the names it is served under (``Host``), and a login beyond loopback.

A page elsewhere can make the operator's browser ask ``http://127.0.0.1:8080/``
under a name of its own (DNS rebinding: ``evil.example`` resolving to
127.0.0.1) and read the answer, since to the browser that is the page's own
origin. The ``Host`` header gives it away: only the names the dashboard is
served under are answered (loopback's, the machine's, the listen address, and
``--allow-host``); an address typed as such is always fine, since no page
but the dashboard's own has that origin. Anything else gets 421.

Bound beyond loopback (or with ``--login``), every request needs the login:
HTTP Basic (any user name, the password is the operator's secret from the
world file, or the token of ``--token-file``) or ``Authorization: Bearer``
with the same. Without TLS in front, that password crosses the network in
clear, as the bookings do.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
WILDCARDS = {"", "0.0.0.0", "::"}


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_names(listen_host: str, extra: Iterable[str] = ()) -> set[str]:
    """The host names (no port) the dashboard answers to, lower case."""
    names = {"localhost", listen_host, *extra}
    if listen_host in WILDCARDS or not is_loopback(listen_host):
        hostname = socket.gethostname()
        names |= {hostname, socket.getfqdn(hostname)}
    return {n.lower().strip("[]") for n in names if n and n not in WILDCARDS}


def _host_name(header: str) -> str:
    """``Host`` without its port: ``[::1]:8080`` -> ``::1``, ``example:80`` -> ``example``."""
    if header.startswith("["):
        return header[1 : header.find("]")].lower() if "]" in header else ""
    return header.rsplit(":", 1)[0].lower() if header.count(":") == 1 else header.lower()


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def guard(
    allowed: set[str], password: str | None, realm: str
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The middleware: a ``Host`` check, and with ``password`` the login."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        name = _host_name(request.headers.get("Host", ""))
        if name not in allowed and not _is_address(name):
            log.warning("refused a request for host %r from %s (not a name of this dashboard)", name, request.remote)
            return web.Response(
                status=421,
                text="This dashboard is not served under that name (see evcharge web --allow-host).\n",
                headers={"Cache-Control": "no-store"},
            )
        if password is not None and not _logged_in(request.headers.get("Authorization", ""), password):
            if "Authorization" in request.headers:
                log.warning("wrong login to the dashboard from %s", request.remote)
            return web.Response(
                status=401,
                text="Log in: any user name, the operator's secret (or the dashboard's token) as password.\n",
                headers={"WWW-Authenticate": f'Basic realm="{realm}", charset="UTF-8"', "Cache-Control": "no-store"},
            )
        return await handler(request)

    return check


def _logged_in(authorization: str, password: str) -> bool:
    scheme, _, value = authorization.partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    return bool(given) and hmac.compare_digest(given.encode(), password.encode())
