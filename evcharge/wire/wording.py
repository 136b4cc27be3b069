"""A request that does not fit its message's shape, said in the words of whoever typed it.

msgspec says ``Expected `float` <= 90.0 - at `$.lat``` or ``... at `$.query.soc_pct```;
a driver who typed ``--near 999,999`` should read "latitude must be between -90
and 90, not 999". ``explain`` finds the field the error is about in the message's
type (its name in ``type``), takes its limits from the type's constraints, and
names it as people do (``FIELD_WORDS``). No I/O; the decoder calls it for every
request it cannot take.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from msgspec import inspect as mi

# The wire's field names as users know them (the CLI's options say the same).
FIELD_WORDS = {
    "lat": "latitude",
    "lon": "longitude",
    "soc_pct": "state of charge at departure (%)",
    "min_arrival_soc_pct": "lowest state of charge on arrival (%)",
    "max_charge_soc_pct": "highest state of charge to charge to (%)",
    "min_power_kw": "minimum power (kW)",
    "minutes": "length in minutes",
    "limit": "limit",
    "start": "start time",
    "end": "end time",
    "depart": "departure time",
    "origin": "origin city",
    "destination": "destination city",
    "charge_point_id": "charge point id",
    "station_id": "station id",
    "reservation_id": "reservation id",
    "trip_id": "trip id",
    "kwh": "energy (kWh)",
    "ident": "identity",
    "role": "role",
}
_KINDS = {
    "float": "a number",
    "int": "a whole number",
    "str": "text",
    "bool": "true or false",
    "datetime": "a time (e.g. 2026-11-23T14:30:00Z)",
    "array": "a list",
    "object": "an object",
    "null": "nothing",
}
_AT = re.compile(r"^(?P<what>.*?)(?: - at `(?P<path>\$[^`]*)`)?$", re.S)
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")
_QUOTE_MAX = 40  # characters of an offending value quoted back; the rest is "…"


class _Tag(msgspec.Struct):
    type: str = ""


_tag = msgspec.msgpack.Decoder(_Tag)


def explain(message: str, body: bytes | memoryview, classes: dict[str, type[msgspec.Struct]]) -> str:
    """msgspec's validation ``message`` about ``body`` as a sentence for users.

    ``classes`` maps a message's ``type`` to its class, to find the field's limits.
    """
    try:
        return _explain(message, body, classes)
    except Exception:  # a shape not foreseen here must not cost the answer: say it plainly instead
        return f"invalid request: {message}"


def _explain(message: str, body: bytes | memoryview, classes: dict[str, type[msgspec.Struct]]) -> str:
    found = _AT.match(message)
    assert found is not None  # the pattern matches any text
    what, path = found["what"], found["path"] or "$"
    steps = [name or int(index) for name, index in _STEP.findall(path)]
    try:
        tag = _tag.decode(body).type
    except msgspec.DecodeError:
        tag = ""
    cls = classes.get(tag)
    if steps == ["type"] or (cls is None and path == "$"):
        return f"unknown request {_quote(tag)}" if tag else "a request must say its type"
    if (missing := re.match(r"Object missing required field `(\w+)`", what)) is not None:
        return f"{_field(missing[1])} is missing"
    field = _field(str(next((s for s in reversed(steps) if isinstance(s, str)), "value")))
    info = _type_at(mi.type_info(cls), steps) if cls is not None else None
    value = _value_at(body, steps)
    said = "" if value is _NOTHING else f", not {_quote(value)}"
    if (literal := _literal(info)) is not None:
        return f"{field} must be one of {', '.join(map(str, literal))}{said}"
    if re.search(r"[<>]=? ", what) and isinstance(info, (mi.IntType, mi.FloatType)):
        return f"{field} must be {_bounds(info)}{said}"
    if "length" in what and isinstance(info, (mi.StrType, mi.ListType)):
        unit = "characters" if isinstance(info, mi.StrType) else "items"
        return f"{field} must be {_length(info, unit)}"
    if "timezone" in what:
        return f"{field} must say its offset from UTC (e.g. 2026-11-23T14:30:00Z){said}"
    if (kind := re.match(r"Expected `(\w+)(?: \| null)?`", what)) is not None:
        return f"{field} must be {_KINDS.get(kind[1], kind[1])}{said}"
    return f"{field}: {what[:1].lower()}{what[1:]}"


def _field(name: str) -> str:
    return FIELD_WORDS.get(name, name.replace("_", " "))


def _type_at(info: mi.Type, steps: list[str | int]) -> mi.Type | None:
    """The type the path leads to inside a message's type, if it can be followed."""
    for step in steps:
        info = _concrete(info)
        if isinstance(step, str) and isinstance(info, mi.StructType):
            fields = [f for f in info.fields if f.encode_name == step]
            if not fields:
                return None
            info = fields[0].type
        elif isinstance(step, int) and isinstance(info, (mi.ListType, mi.SetType, mi.VarTupleType)):
            info = info.item_type
        else:
            return None
    return _concrete(info)


def _concrete(info: mi.Type) -> mi.Type:
    """``X | None`` as ``X``: the error is about the value that is not None."""
    if isinstance(info, mi.UnionType):
        others = [t for t in info.types if not isinstance(t, mi.NoneType)]
        if len(others) == 1:
            return others[0]
    return info


def _literal(info: mi.Type | None) -> tuple[Any, ...] | None:
    return info.values if isinstance(info, mi.LiteralType) else None


def _bounds(info: mi.IntType | mi.FloatType) -> str:
    low = info.ge if info.ge is not None else info.gt
    high = info.le if info.le is not None else info.lt
    if low is not None and high is not None:
        return f"between {low:g} and {high:g}"
    if low is not None:
        return f"at least {low:g}" if info.ge is not None else f"more than {low:g}"
    if high is not None:
        return f"at most {high:g}" if info.le is not None else f"less than {high:g}"
    return "a finite number"


def _length(info: mi.StrType | mi.ListType, unit: str) -> str:
    if info.min_length is not None and info.max_length is not None:
        return f"{info.min_length}-{info.max_length} {unit}"
    if info.max_length is not None:
        return f"at most {info.max_length} {unit}"
    return f"at least {info.min_length} {unit}"


_NOTHING = object()


def _value_at(body: bytes | memoryview, steps: list[str | int]) -> Any:
    """The offending value, to quote it back; ``_NOTHING`` if the path does not lead to one."""
    try:
        value: Any = msgspec.msgpack.decode(body)
    except msgspec.DecodeError:
        return _NOTHING
    for step in steps:
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError):
            return _NOTHING
    return value


def _quote(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, str):
        text = repr(value[: _QUOTE_MAX + 1])
    elif isinstance(value, bool | int) or value is None:
        text = str(value)
    else:
        text = f"a {type(value).__name__}"  # a list or a map: its kind says enough
    return text if len(text) <= _QUOTE_MAX else text[:_QUOTE_MAX] + "…"
