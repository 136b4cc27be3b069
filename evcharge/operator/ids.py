"""Ids of what an operator makes: reservations, trips, plans.

Unique, not secret: whoever names an id is checked against what it belongs to
(someone else's is ``not_found``), so a guessed one gets nobody anything. A
seeded generator then makes them without a system call each, as ``secrets``
would: a booking makes several.
"""

from __future__ import annotations

import random

_random = random.Random()  # seeded from os.urandom: another sequence in every process


def new_id(prefix: str) -> str:
    """``prefix`` and 10 hex digits (40 random bits)."""
    return f"{prefix}{_random.getrandbits(40):010x}"
