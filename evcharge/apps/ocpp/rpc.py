"""OCPP-J's RPC framework, each version by its own book: frames in, CallErrors out.

The ``ocpp`` library routes and validates, but its error codes are its own mix of the two
versions: it answers an action it does not know ``NotSupported`` (OCPP-J says
``NotImplemented``: *not known by receiver*; ``NotSupported`` is for one it knows and does
not support), and a schema violation ``FormatViolation`` in 1.6 too (2.0.1's name; OCPP-J 1.6
and its errata keep ``FormationViolation``). So every frame a charge point sends is read,
checked and answered here, and every CallError carries the code and description of the
version its connection speaks (OCPP-J 1.6 §4.2.3; OCPP-J 2.0.1 §4.3).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from enum import Enum
from typing import Any

from jsonschema.exceptions import ValidationError as SchemaError
from ocpp.charge_point import ChargePoint as OcppChargePoint
from ocpp.charge_point import camel_to_snake_case, remove_nones, serialize_as_dict, snake_to_camel_case
from ocpp.exceptions import GenericError, OCPPError, UnknownCallErrorCodeError
from ocpp.messages import Call, CallError, CallResult, MessageType, get_validator, validate_payload
from websockets.exceptions import ConnectionClosed

log = logging.getLogger(__name__)

V16 = "1.6"
V201 = "2.0.1"
MAX_UNIQUE_ID = 36  # both versions: a message id is at most 36 characters
MAX_CAUSE = 200  # characters of the cause told back in errorDetails
# OCPP's deepest messages (charging profiles) nest about 8 levels; far deeper ones would only
# exhaust the recursion of the schema check and the key conversion.
MAX_DEPTH = 32


class Fault(Enum):
    """What was wrong with a charge point's frame, whatever the version calls it."""

    NOT_JSON = "not JSON"
    NOT_RPC = "not an OCPP-J message"
    MESSAGE_TYPE = "unknown message type"
    PAYLOAD_NOT_OBJECT = "payload is not an object"
    UNKNOWN_ACTION = "action not known"
    UNSUPPORTED_ACTION = "action not supported here"
    SYNTAX = "unknown field or value"  # a field the schema does not have, a value outside an enum
    MISSING = "required field missing"
    WRONG_TYPE = "field of the wrong type"
    INTERNAL = "internal error"


# Each fault's code, (OCPP-J 1.6, OCPP-J 2.0.1). 2.0.1 has codes of its own for frames that
# are no RPC at all (RpcFrameworkError, MessageTypeNotSupported) and for occurrences.
CODES: dict[Fault, tuple[str, str]] = {
    Fault.NOT_JSON: ("FormationViolation", "RpcFrameworkError"),
    Fault.NOT_RPC: ("ProtocolError", "RpcFrameworkError"),
    Fault.MESSAGE_TYPE: ("PropertyConstraintViolation", "MessageTypeNotSupported"),
    Fault.PAYLOAD_NOT_OBJECT: ("ProtocolError", "FormatViolation"),
    Fault.UNKNOWN_ACTION: ("NotImplemented", "NotImplemented"),
    Fault.UNSUPPORTED_ACTION: ("NotSupported", "NotSupported"),
    Fault.SYNTAX: ("FormationViolation", "FormatViolation"),
    Fault.MISSING: ("ProtocolError", "OccurrenceConstraintViolation"),
    Fault.WRONG_TYPE: ("TypeConstraintViolation", "TypeConstraintViolation"),
    Fault.INTERNAL: ("InternalError", "InternalError"),
}

# The error tables, word for word (1.6 with the spelling its errata keep).
DESCRIPTIONS: dict[str, dict[str, str]] = {
    V16: {
        "NotImplemented": "Requested Action is not known by receiver",
        "NotSupported": "Requested Action is recognized but not supported by the receiver",
        "InternalError": "An internal error occurred and the receiver was not able to process the requested "
        "Action successfully",
        "ProtocolError": "Payload for Action is incomplete",
        "SecurityError": "During the processing of Action a security issue occurred preventing receiver from "
        "completing the Action successfully",
        "FormationViolation": "Payload for Action is syntactically incorrect or not conform the PDU structure "
        "for Action",
        "PropertyConstraintViolation": "Payload is syntactically correct but at least one field contains an "
        "invalid value",
        "OccurenceConstraintViolation": "Payload for Action is syntactically correct but at least one of the "
        "fields violates occurence constraints",
        "TypeConstraintViolation": "Payload for Action is syntactically correct but at least one of the fields "
        'violates data type constraints (e.g. "somestring": 12)',
        "GenericError": "Any other error not covered by the previous ones",
    },
    V201: {
        "FormatViolation": "Payload for Action is syntactically incorrect",
        "GenericError": "Any other error not covered by the more specific error codes in this table",
        "InternalError": "An internal error occurred and the receiver was not able to process the requested "
        "Action successfully",
        "MessageTypeNotSupported": "A message with an Message Type Number received that is not supported by "
        "this implementation.",
        "NotImplemented": "Requested Action is not known by receiver",
        "NotSupported": "Requested Action is recognized but not supported by the receiver",
        "OccurrenceConstraintViolation": "Payload for Action is syntactically correct but at least one of the "
        "fields violates occurrence constraints",
        "PropertyConstraintViolation": "Payload is syntactically correct but at least one field contains an "
        "invalid value",
        "ProtocolError": "Payload for Action is not conform the PDU structure",
        "RpcFrameworkError": "Content of the call is not a valid RPC Request, for example: MessageId could not "
        "be read.",
        "SecurityError": "During the processing of Action a security issue occurred preventing receiver from "
        "completing the Action successfully",
        "TypeConstraintViolation": "Payload for Action is syntactically correct but at least one of the fields "
        'violates data type constraints (e.g. "somestring": 12)',
    },
}

# JSON-schema keywords -> the fault a violation of them is.
SCHEMA_FAULTS: dict[str, Fault] = {
    "type": Fault.WRONG_TYPE,
    "maxLength": Fault.WRONG_TYPE,  # a string too long for its CiString type
    "required": Fault.MISSING,
    "minItems": Fault.MISSING,
    "maxItems": Fault.MISSING,
}


class RpcFault(Exception):
    """A frame refused: the fault, and what exactly (told back as errorDetails.cause)."""

    def __init__(self, fault: Fault, cause: str, unique_id: str = "-1") -> None:
        super().__init__(f"{fault.value}: {cause}")
        self.fault = fault
        self.cause = cause[:MAX_CAUSE]
        self.unique_id = unique_id  # "-1": OCPP's id for a message whose own could not be read


def error_code(version: str, fault: Fault) -> str:
    return CODES[fault][0 if version == V16 else 1]


def call_error(version: str, fault: RpcFault) -> CallError:
    code = error_code(version, fault.fault)
    return CallError(fault.unique_id, code, DESCRIPTIONS[version][code], {"cause": fault.cause})


def unpack(raw: str | bytes) -> Call | CallResult | CallError:
    """One frame as a message, or the RpcFault that says what it is not."""
    try:
        frame = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RpcFault(Fault.NOT_JSON, "the frame is not JSON") from None
    if not isinstance(frame, list) or not frame:
        raise RpcFault(Fault.NOT_RPC, "an OCPP-J message is a JSON array")
    unique_id = frame[1][:MAX_UNIQUE_ID] if len(frame) > 1 and isinstance(frame[1], str) else "-1"
    if _deeper_than(frame, MAX_DEPTH):
        raise RpcFault(Fault.SYNTAX, f"nested deeper than {MAX_DEPTH} levels", unique_id)
    kind = frame[0]
    if type(kind) is not int:
        raise RpcFault(Fault.NOT_RPC, "its first element, the message type, is not a number", unique_id)
    if kind not in (MessageType.Call, MessageType.CallResult, MessageType.CallError):
        raise RpcFault(Fault.MESSAGE_TYPE, f"message type {kind} is none of 2, 3, 4", unique_id)
    if unique_id == "-1" or len(frame[1]) > MAX_UNIQUE_ID:
        raise RpcFault(Fault.NOT_RPC, "its message id is not a string of at most 36 characters", unique_id)
    if kind == MessageType.Call:
        if len(frame) != 4 or not isinstance(frame[2], str):
            raise RpcFault(Fault.NOT_RPC, "a Call is [2, id, action, payload]", unique_id)
        if not isinstance(frame[3], dict):
            raise RpcFault(Fault.PAYLOAD_NOT_OBJECT, "a Call's payload is a JSON object", unique_id)
        return Call(frame[1], frame[2], frame[3])
    if kind == MessageType.CallResult:
        if len(frame) != 3:
            raise RpcFault(Fault.NOT_RPC, "a CallResult is [3, id, payload]", unique_id)
        return CallResult(frame[1], frame[2])
    if len(frame) not in (4, 5) or not all(isinstance(part, str) for part in frame[2:4]):
        raise RpcFault(Fault.NOT_RPC, "a CallError is [4, id, code, description, details]", unique_id)
    return CallError(*frame[1:])


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` levels (no recursion: any depth is safe)."""
    level: list[Any] = [value]
    for _ in range(limit):
        level = [
            child
            for item in level
            if isinstance(item, list | dict)
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, list | dict)
        ]
        if not level:
            return False
    return True


def check_payload(version: str, call: Call) -> None:
    """The Call's payload against the official schema of its action (RpcFault if it breaks it)."""
    try:
        get_validator(MessageType.Call, call.action, version).validate(call.payload)
    except SchemaError as exc:
        fault = SCHEMA_FAULTS.get(str(exc.validator), Fault.SYNTAX)
        where = ".".join(str(part) for part in exc.absolute_path)
        cause = f"{where}: {exc.message}" if where else exc.message
        raise RpcFault(fault, cause, call.unique_id) from None


class OcppEndpoint(OcppChargePoint):
    """One charge point's OCPP-J connection: frames read and answered by its version's rules.

    Subclasses set the version (``_ocpp_version``, ``_call``, ``_call_result``, as the library's
    own ``v16``/``v201`` classes do) and ``actions``, every action name of that version; their
    ``@on`` handlers answer what the charge point sends. A handler never calls the charge
    point itself (the library reads one message at a time, so the answer could not be read).
    """

    actions: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return f"charge point {self.id}"

    @property
    def version(self) -> str:
        return str(self._ocpp_version)

    async def route_message(self, raw_msg: str | bytes) -> None:
        """One frame from the charge point. A malformed one is answered with a CallError, never fatal."""
        try:
            msg = unpack(raw_msg)
        except RpcFault as fault:
            log.info("%s: malformed frame refused: %s", self, fault)
            await self._send(call_error(self.version, fault).to_json())
            return
        if isinstance(msg, Call):
            try:
                await self._answer(msg)
            except RpcFault as fault:
                log.info("%s: %s refused: %s", self, msg.action, fault)
                await self._send(call_error(self.version, fault).to_json())
            except ConnectionClosed:
                raise
            except Exception:
                log.exception("%s: %s failed", self, msg.action)
                internal = RpcFault(Fault.INTERNAL, f"{msg.action} could not be handled", msg.unique_id)
                await self._send(call_error(self.version, internal).to_json())
        elif self._call_lock.locked():
            self._response_queue.put_nowait(msg)
        else:
            # Nobody waits for it; queued, it would only confuse our next call.
            log.info("%s: dropped an answer to no call of ours", self)

    async def _answer(self, msg: Call) -> None:
        handlers: Mapping[str, Any] | None = self.route_map.get(msg.action)
        if handlers is None or "_on_action" not in handlers:
            known = msg.action in self.actions
            fault = Fault.UNSUPPORTED_ACTION if known else Fault.UNKNOWN_ACTION
            what = "is not supported here" if known else f"is not an action of OCPP {self.version}"
            raise RpcFault(fault, f"{msg.action[:64]} {what}", msg.unique_id)
        # Schemas are small; checked off the loop all the same, as the library does.
        await asyncio.get_running_loop().run_in_executor(None, check_payload, self.version, msg)
        response = handlers["_on_action"](**camel_to_snake_case(msg.payload))
        if asyncio.iscoroutine(response):
            response = await response
        result = msg.create_call_result(snake_to_camel_case(remove_nones(serialize_as_dict(response))))
        await validate_payload(result, self.version)  # an answer of ours that breaks its schema is our bug
        await self._send(result.to_json())

    async def ask(self, request: Any) -> Any:
        """Call the charge point: its answer, or an OCPPError for its CallError -- any code, even one
        the library has no class for (2.0.1's RpcFrameworkError, a vendor's own)."""
        try:
            return await self.call(request, suppress=False)
        except UnknownCallErrorCodeError as exc:
            raise GenericError(description=str(exc)) from None


def is_not_taken(exc: OCPPError) -> bool:
    """Whether a charge point's CallError says it does not do that action at all."""
    return exc.code in ("NotImplemented", "NotSupported")
