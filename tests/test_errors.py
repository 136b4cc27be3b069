"""The typed errors: one class per wire code, and back again."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import get_args

import pytest

from evcharge.wire import errors
from evcharge.wire.errors import (
    BY_CODE,
    ConflictError,
    ConnectionLostError,
    EvchargeError,
    InternalError,
    UnavailableError,
    error_class,
    error_from_reply,
)
from evcharge.wire.protocol import Error, ErrorCode


def test_every_code_of_the_protocol_has_exactly_one_class() -> None:
    assert set(BY_CODE) == set(get_args(ErrorCode))
    for code, cls in BY_CODE.items():
        assert cls.code == code and issubclass(cls, EvchargeError)


def test_a_subclass_that_keeps_its_parents_code_does_not_replace_it() -> None:
    assert ConnectionLostError.code == "unavailable"
    assert BY_CODE["unavailable"] is UnavailableError
    assert type(error_from_reply(Error(id=1, code="unavailable", message="down"))) is UnavailableError


def test_a_second_class_for_a_code_is_refused() -> None:
    with pytest.raises(TypeError, match="conflict"):

        class AnotherConflict(EvchargeError):
            code = "conflict"

    assert BY_CODE["conflict"] is ConflictError


def test_reply_comes_back_as_the_same_class() -> None:
    for code, cls in BY_CODE.items():
        exc = cls("why", next_free=datetime(2026, 11, 23, 14, 30, tzinfo=UTC))
        back = error_from_reply(exc.to_reply(7))
        assert type(back) is cls and back.code == code
        assert (back.message, back.next_free) == ("why", exc.next_free)


def test_an_unknown_code_from_the_wire_is_an_internal_error() -> None:
    reply = Error(id=3, code="from_a_newer_server", message="something new")  # type: ignore[arg-type]
    exc = error_from_reply(reply)
    assert type(exc) is InternalError and exc.message == "something new"
    assert error_class("") is InternalError


def test_the_registry_cannot_be_changed_from_outside() -> None:
    with pytest.raises(TypeError):
        errors.BY_CODE["conflict"] = InternalError  # type: ignore[index]
