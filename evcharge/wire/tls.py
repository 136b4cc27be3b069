"""TLS for the server's listeners, for clients, and for the links between operators.

A server opens one or more *listeners*. Each accepts some roles and is plain
TCP, TLS (the server proves who it is) or mutual TLS (a client must also show a
certificate signed by the operator's CA). One certificate per operator serves
both ends: its listeners present it, and its peer links present it as their
client certificate. Certificates are checked by name, exactly (no wildcards):
an operator's name is its world file ``tls_name``, else its ``host``.

Everything here is the standard library's ``ssl``; nothing is read until a
listener or a client needs it, and a file that cannot be used is a
``TlsConfigError`` naming it.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from evcharge.wire.address import parse_host_port
from evcharge.wire.protocol import Role

ROLES: tuple[Role, ...] = get_args(Role)
Security = Literal["plain", "tls", "mtls"]
SECURITIES: tuple[Security, ...] = get_args(Security)


class TlsConfigError(ValueError):
    """A listener or TLS option that cannot work (bad syntax, missing or unusable file)."""


@dataclass(frozen=True, slots=True)
class Listen:
    """One listening socket: who may connect there, and how."""

    roles: frozenset[Role]
    host: str
    port: int
    security: Security = "plain"

    def accepts(self, role: str) -> bool:
        return role in self.roles

    def describe(self) -> str:
        roles = "all" if self.roles == frozenset(ROLES) else ",".join(r for r in ROLES if r in self.roles)
        host = f"[{self.host}]" if ":" in self.host else self.host
        suffix = "" if self.security == "plain" else f"+{self.security}"
        return f"{roles}={host}:{self.port}{suffix}"


def every_role(host: str, port: int) -> Listen:
    """The default: one plaintext listener for everyone."""
    return Listen(frozenset(ROLES), host, port)


def parse_listen(text: str) -> Listen:
    """``ROLES=HOST:PORT[+tls|+mtls]``; ROLES is ``all`` or a comma list (``vehicle,station``)."""
    roles_text, eq, address = text.partition("=")
    if not eq:
        raise TlsConfigError(f"{text!r}: expected ROLES=HOST:PORT[+tls|+mtls], e.g. peer=0.0.0.0:7411+mtls")
    address, plus, security = address.partition("+")
    if plus and security not in ("tls", "mtls"):
        raise TlsConfigError(f"{text!r}: after + comes tls or mtls, not {security!r}")
    names = [r.strip() for r in roles_text.split(",") if r.strip()]
    if names == ["all"]:
        roles = frozenset(ROLES)
    else:
        unknown = [r for r in names if r not in ROLES]
        if unknown or not names:
            raise TlsConfigError(f"{text!r}: roles are all or some of {', '.join(ROLES)} (got {roles_text!r})")
        roles = frozenset(r for r in ROLES if r in names)
    try:
        host, port = parse_host_port(address, allow_zero=True)
    except ValueError as exc:
        raise TlsConfigError(f"{text!r}: {exc}") from None
    return Listen(roles, host, port, security if plus else "plain")  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """An operator's TLS material, as PEM files."""

    cert: Path | None = None  # its certificate chain: served by listeners, shown by its peer links
    key: Path | None = None  # the certificate's private key (may also be inside ``cert``)
    ca: Path | None = None  # whom it trusts: verifies clients on +mtls listeners, and peers' servers


def server_context(files: TlsFiles, *, require_client_cert: bool) -> ssl.SSLContext:
    if files.cert is None:
        raise TlsConfigError("a +tls or +mtls listener needs --tls-cert (and --tls-key)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, files)
    if require_client_cert:
        if files.ca is None:
            raise TlsConfigError("a +mtls listener needs --tls-ca to verify its clients' certificates")
        _load_ca(context, files.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Verify the server (against ``ca``, else the system's CAs) by name; show ``cert`` if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        _load_ca(context, ca)
    if cert is not None:
        _load_chain(context, TlsFiles(cert=cert, key=key))
    elif key is not None:
        raise TlsConfigError("--tls-key needs --tls-cert")
    return context


def _load_chain(context: ssl.SSLContext, files: TlsFiles) -> None:
    assert files.cert is not None
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        # Deliberately no detail from the key file itself: only which files and why.
        where = f"{files.cert}" + (f" / {files.key}" if files.key else "")
        raise TlsConfigError(f"cannot use certificate {where}: {_reason(exc)}") from None


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot use CA bundle {ca}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def describe_ssl_failure(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    return _reason(exc)


def certificate_names(peercert: dict[str, Any] | None) -> list[str]:
    """The DNS names and IP addresses a verified certificate is for (its subjectAltName)."""
    if not peercert:
        return []
    return [str(value).strip() for kind, value in peercert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]


def names_include(names: Iterable[str], wanted: str) -> bool:
    """Whether ``wanted`` (a host name or an IP address) is one of ``names``, exactly."""
    try:
        address = ipaddress.ip_address(wanted)
    except ValueError:
        return any(name.lower() == wanted.lower() for name in names)
    for name in names:
        try:
            if ipaddress.ip_address(name) == address:
                return True
        except ValueError:
            continue
    return False
