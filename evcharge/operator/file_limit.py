"""How many connections this process can hold: caps derived from its file limit (RLIMIT_NOFILE).

Every connection is a file descriptor. A server whose caps exceed what the
process may open runs out of descriptors first: then it cannot accept anyone,
and connections that only trickle bytes keep real clients out for as long as
their attacker keeps them coming. So at start the soft limit is raised as far
as the hard limit allows (no further than the caps need), the descriptors in
use and some headroom (the store, peer links, TLS files, logs) are set aside,
and the rest is shared: at most a quarter for connections still in their
handshake, the rest for clients. Each cap is at most ``--max-connections``.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

log = logging.getLogger(__name__)

HEADROOM = 64  # descriptors kept for everything but connections: store (with WAL), logs, TLS files, DNS...
PER_PEER = 2  # our link to each other operator, and one being made again
HANDSHAKE_SHARE = 4  # one descriptor in this many is for connections that have not said Hello yet
MIN_HANDSHAKES = 8


@dataclass(frozen=True, slots=True)
class ConnectionCaps:
    clients: int  # connections past their handshake
    handshakes: int  # connections still in it
    file_limit: int  # the soft limit, once raised
    hard_limit: int

    def describe(self) -> str:
        hard = "unlimited" if self.hard_limit == resource.RLIM_INFINITY else str(self.hard_limit)
        return (
            f"file limit {self.file_limit} (hard {hard}): at most {self.clients} clients "
            f"and {self.handshakes} connections in their handshake at once"
        )


def open_descriptors() -> int:
    """Descriptors this process has open now (Linux: /proc; elsewhere a guess)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 32


def raise_file_limit(wanted: int) -> tuple[int, int]:
    """Raise the soft file limit toward ``wanted`` as far as the hard limit allows; (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. above the kernel's nr_open
            log.warning("cannot raise the file limit from %d to %d: %s", soft, target, exc)
    return soft, hard


def connection_caps(max_connections: int, peers: int) -> ConnectionCaps:
    """The caps this process can keep, for ``max_connections`` clients (and as many handshakes)."""
    reserved = open_descriptors() + HEADROOM + PER_PEER * peers
    soft, hard = raise_file_limit(reserved + 2 * max_connections)
    budget = (2**31 if soft == resource.RLIM_INFINITY else soft) - reserved
    handshakes = min(max_connections, max(MIN_HANDSHAKES, budget // HANDSHAKE_SHARE))
    clients = min(max_connections, max(1, budget - handshakes))
    return ConnectionCaps(clients, handshakes, soft, hard)


class CapLog:
    """A warning when a cap bites, then at most one per ``every`` seconds with how often it bit meanwhile."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last = -every
        self._since = 0

    def bit(self, clock: float, message: str, *args: object) -> None:
        self._since += 1
        if clock - self._last >= self.every:
            times = f" ({self._since} times in the last {self.every:g} s)" if self._since > 1 else ""
            log.warning(message + times, *args)
            self._last, self._since = clock, 0
