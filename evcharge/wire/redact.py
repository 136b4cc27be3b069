"""Secrets never reach a log: one logging filter for every process we ship.

Installed on the root logger's handlers (``install``), it rewrites each record before any
handler writes it -- ours and every library's, at any level: the ``websockets`` debug
logger prints every request header, ``Authorization: Basic …`` included, right passwords
and wrong ones alike. It takes out

* the credentials of HTTP headers (``Authorization``, ``Proxy-Authorization``, ``Cookie``,
  ``Set-Cookie``) and any ``Basic``/``Bearer`` token, whoever's they are;
* the password of a URL (``ws://id:password@host``) and query parameters named like a secret;
* fields named like one (``credential='…'``, ``"token": "…"``, ``secret = "…"``);
* every secret it was given (the world file's), as it is and base64-encoded, alone or as
  ``id:secret`` -- wherever it appears.

Here, at the bottom of the layers, so that the server, the gateway, the dashboard and any
later edge install the same one.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterable

MASK = "[redacted]"

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # Authorization: Basic dXNlcjpwYXNz -> Authorization: Basic [redacted]
    (
        re.compile(r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)([A-Za-z][\w.+-]*\s+)?[^\s\"',;]+"),
        rf"\1\2{MASK}",
    ),
    (re.compile(r"(?i)\b((?:set-)?cookie[\"']?\s*[:=]\s*)[^\r\n]+"), rf"\1{MASK}"),
    (re.compile(r"(?i)\b(basic|bearer)\s+[A-Za-z0-9+/=._~-]{6,}"), rf"\1 {MASK}"),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@"), rf"\1{MASK}@"),
    (
        re.compile(r"(?i)([?&](?:token|secret|password|passwd|pwd|key|auth|credential|access_token)=)[^&\s#\"']+"),
        rf"\1{MASK}",
    ),
    (
        re.compile(r"(?i)(\b(?:credential|secret|token|password|passwd)[\"']?\s*[:=]\s*)([\"'])[^\"'\r\n]*\2"),
        rf"\1\2{MASK}\2",
    ),
]
_MIN_SECRET = 4  # shorter "secrets" would blank out ordinary words


class RedactSecrets(logging.Filter):
    """Rewrites a record's message, traceback and stack so that no secret is left in them."""

    def __init__(self, secrets: Iterable[str] = (), *, pairs: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__()
        self._literals: set[str] = set()
        self._literal: re.Pattern[str] | None = None
        self.add(secrets, pairs=pairs)

    def add(self, secrets: Iterable[str] = (), *, pairs: Iterable[tuple[str, str]] = ()) -> None:
        """More secrets to take out; ``pairs`` are (user, secret), as Basic auth encodes them."""
        pairs = list(pairs)
        forms: set[str] = set()
        for secret in [*secrets, *(secret for _, secret in pairs)]:
            forms |= {secret, _b64(secret), _b64(secret).rstrip("=")}
        for user, secret in pairs:
            forms |= {_b64(f"{user}:{secret}"), _b64(f"{user}:{secret}").rstrip("=")}
        self._literals |= {form for form in forms if len(form) >= _MIN_SECRET}
        if self._literals:
            # Longest first, so that a secret inside another's encoding is not cut in half.
            alternatives = sorted(self._literals, key=len, reverse=True)
            self._literal = re.compile("|".join(re.escape(form) for form in alternatives))

    def redact(self, text: str) -> str:
        if self._literal is not None:
            text = self._literal.sub(MASK, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True  # a broken format string: the handler reports it, with nothing of its arguments
        clean = self.redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def install(secrets: Iterable[str] = (), *, pairs: Iterable[tuple[str, str]] = ()) -> RedactSecrets:
    """Put one filter on every handler of the root logger (again: add the secrets to it)."""
    handlers = logging.getLogger().handlers
    found = next((f for h in handlers for f in h.filters if isinstance(f, RedactSecrets)), None)
    redactor = found or RedactSecrets()
    redactor.add(secrets, pairs=pairs)
    for handler in handlers:
        if redactor not in handler.filters:
            handler.addFilter(redactor)
    return redactor
