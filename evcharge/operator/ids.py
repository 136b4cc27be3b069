"""Ids of what an operator makes: reservations, trips, plans.

Unique by construction, not by luck: 40 random bits collide somewhere among a
million ids about every other time, so an id already taken is drawn again. Not
secret: whoever names an id is checked against what it belongs to (someone
else's is ``not_found``), so a seeded generator serves, without the system call
per id that ``secrets`` makes.
"""

from __future__ import annotations

import random
from collections.abc import Container

_random = random.Random()  # seeded from os.urandom: another sequence in every process


def new_id(prefix: str, *taken: Container[str]) -> str:
    """``prefix`` and 10 hex digits (40 random bits), in none of ``taken``."""
    while True:
        candidate = f"{prefix}{_random.getrandbits(40):010x}"
        if not any(candidate in ids for ids in taken):
            return candidate
