"""Ids an operator makes are unique by construction and keep their shape."""

from __future__ import annotations

import re

from evcharge.operator import ids
from evcharge.operator.ids import new_id


def test_an_id_already_taken_is_drawn_again() -> None:
    state = ids._random.getstate()
    first = new_id("A-")
    ids._random.setstate(state)  # the same draw again: that id is taken now
    again = new_id("A-", {first}, set())
    assert again != first and re.fullmatch(r"A-[0-9a-f]{10}", again)
