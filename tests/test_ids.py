"""Ids an operator makes are unique and keep their shape."""

from __future__ import annotations

import re

from evcharge.operator.ids import new_id


def test_ids_are_unique_and_shaped() -> None:
    ids = [new_id("A-T") for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"A-T[0-9a-f]{10}", i) for i in ids[:1000])
