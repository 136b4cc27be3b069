"""Failed logins cost time: the OCPP gateway's answer to password guessing (docs/security.md).

Every failed Basic-auth handshake is counted against the charge point id it tried and
against the address it came from (an IPv6 address by its /64, which one customer usually
has whole). Its refusal waits ``first_delay`` for the first failure in a row, twice as long
for each next one, at most ``max_delay``; a failure-free ``forget_after`` starts the count
again, and a right password forgets the id's count.

Waiting alone would not slow a guesser who tries in parallel, so at most one failing
attempt per charge point id is held at a time, and ``max_waiting_per_address`` per address
(and ``max_waiting`` in all): past that, attempts are turned away unheard (HTTP 429) --
their password is not even looked at, so parallel tries learn nothing. A right password
is never delayed: a charge point from the same address (a site behind one router) logs in
while a neighbour keeps failing; but while its own id is being guessed, a charge point may
be turned away until the guessing stops.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

FIRST_DELAY = 0.25  # seconds before the first failure's refusal
MAX_DELAY = 8.0  # below the handshake's own 10 s deadline, so the refusal still arrives
FORGET_AFTER = 900.0  # a quarter of an hour without failure, and the count starts again
MAX_WAITING_PER_ADDRESS = 8
MAX_WAITING = 512
MAX_TRACKED = 10_000  # ids and addresses remembered; the longest untouched go first
REPORT_EVERY = 10.0  # seconds between the log lines that count attempts turned away


@dataclass(slots=True)
class Failures:
    count: int = 0
    last: float = 0.0
    waiting: int = 0  # failing attempts being held right now


def address_key(host: str) -> str:
    """Whom an address stands for: an IPv4 address itself, an IPv6 address its /64."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class LoginThrottle:
    def __init__(
        self,
        *,
        first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
        forget_after: float = FORGET_AFTER,
        max_waiting_per_address: int = MAX_WAITING_PER_ADDRESS,
        max_waiting: int = MAX_WAITING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.max_waiting_per_address = max_waiting_per_address
        self.max_waiting = max_waiting
        self.clock = clock
        self._failures: collections.OrderedDict[tuple[str, str], Failures] = collections.OrderedDict()
        self._waiting = 0
        self._turned_away = 0
        self._reported = clock()

    def delay(self, failures: int) -> float:
        """How long the refusal of the ``failures``-th failure in a row waits."""
        if failures <= 0:
            return 0.0
        return min(self.max_delay, self.first_delay * 2.0 ** min(failures - 1, 60))

    def _get(self, kind: str, name: str) -> Failures:
        key = (kind, name)
        record = self._failures.get(key)
        if record is None:
            record = self._failures[key] = Failures()
            while len(self._failures) > MAX_TRACKED:
                self._failures.popitem(last=False)
        self._failures.move_to_end(key)
        if record.count and self.clock() - record.last > self.forget_after:
            record.count = 0
        return record

    def _peek(self, kind: str, name: str) -> Failures | None:
        return self._failures.get((kind, name))

    def turned_away(self, cp_id: str | None, host: str) -> int | None:
        """Seconds to come back after if this attempt must be refused unheard; None: hear it now."""
        address = address_key(host)
        by_id = self._peek("id", cp_id) if cp_id is not None else None
        by_address = self._peek("address", address)
        if by_id is not None and by_id.waiting:
            busy = by_id
        elif by_address is not None and by_address.waiting >= self.max_waiting_per_address:
            busy = by_address
        elif self._waiting >= self.max_waiting:
            busy = by_address or Failures(count=1)
        else:
            return None
        self._turned_away += 1
        now = self.clock()
        if now - self._reported >= REPORT_EVERY:
            log.warning(
                "%d login attempts turned away unheard in %.0f s: too many failing at once (latest: %s from %s)",
                self._turned_away,
                now - self._reported,
                f"charge point {cp_id}" if cp_id is not None else "an unknown id",
                address,
            )
            self._turned_away, self._reported = 0, now
        return max(1, math.ceil(self.delay(busy.count)))

    async def failed(self, cp_id: str | None, host: str, what: str) -> None:
        """Count a failed login (``what`` went wrong) and wait out its delay before it is refused."""
        address = address_key(host)
        records = [self._get("address", address)]
        if cp_id is not None:
            records.append(self._get("id", cp_id))
        now = self.clock()
        for record in records:
            record.count += 1
            record.last = now
        delay = max(self.delay(record.count) for record in records)
        in_a_row = f"{records[1].count} in a row for this id, " if cp_id is not None else ""
        log.warning(
            "login %s from %s refused: %s (failures: %s%d from this address); answering in %.2f s",
            f"of charge point {cp_id}" if cp_id is not None else "with an unknown id",
            address,
            what,
            in_a_row,
            records[0].count,
            delay,
        )
        for record in records:
            record.waiting += 1
        self._waiting += 1
        try:
            await asyncio.sleep(delay)
        finally:
            for record in records:
                record.waiting -= 1
            self._waiting -= 1

    def succeeded(self, cp_id: str) -> None:
        """A right password: the id's failures are forgotten (its address's are not)."""
        record = self._peek("id", cp_id)
        if record is not None:
            record.count = 0
