"""Crash points for the crash tests: die like ``kill -9`` at an exact moment.

``EVCHARGE_CRASH_AT=<name>`` in a server's environment makes it SIGKILL itself
when it reaches ``crash_point(<name>)``. Unset (always, outside tests), a
crash point does nothing. The named points:

* ``participant-voted``: a participant has stored its holds and sent YES.
* ``coordinator-committed``: a coordinator has stored the COMMIT record and
  told nobody yet.
* ``change-stored``: a change (reserve, cancel, charge, release, book,
  cancel a trip -- a vehicle's own, or one its home forwarded) is stored (with
  its outcome, when it has a key), and its reply is not sent yet.
"""

from __future__ import annotations

import os
import signal

_CRASH_AT = os.environ.get("EVCHARGE_CRASH_AT", "")


def crash_point(name: str) -> None:
    if name == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)
