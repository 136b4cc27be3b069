"""One exception hierarchy for every typed error of the protocol.

The server raises these where a request fails; the connection turns them into
an ``Error`` reply; the client turns that reply back into the same class, so
callers catch ``ConflictError`` (or the base ``EvchargeError``) on either side.

Each class names its wire ``code`` once, and defining it registers it as the
class for that code. The codes themselves are the ``ErrorCode`` Literal of the
protocol (the decoder needs them there); a test keeps the two the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType

from evcharge.wire.protocol import Error, ErrorCode

# Messages may quote what a client sent (an id, a city); a huge one must not make the
# error itself too large to send, nor flood the log.
MAX_MESSAGE = 1000


# Each subclass that names a ``code`` of its own is the class for that code (see ``__init_subclass__``).
_BY_CODE: dict[str, type[EvchargeError]] = {}
BY_CODE: Mapping[str, type[EvchargeError]] = MappingProxyType(_BY_CODE)


class EvchargeError(Exception):
    code: ErrorCode = "internal"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        code = cls.__dict__.get("code")
        if code is None:
            return  # it keeps its parent's code (ConnectionLostError): the parent stays the class for it
        if code in _BY_CODE:
            raise TypeError(f"{cls.__qualname__}: error code {code!r} already belongs to {_BY_CODE[code].__qualname__}")
        _BY_CODE[code] = cls

    def __init__(self, message: str, *, next_free: datetime | None = None) -> None:
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + f"… ({len(message) - MAX_MESSAGE} more characters)"
        super().__init__(message)
        self.message = message
        self.next_free = next_free

    def to_reply(self, request_id: int) -> Error:
        return Error(id=request_id, code=self.code, message=self.message, next_free=self.next_free)


class BadRequestError(EvchargeError):
    code = "bad_request"


class UnauthorizedError(EvchargeError):
    code = "unauthorized"


class ForbiddenError(EvchargeError):
    code = "forbidden"


class NotFoundError(EvchargeError):
    code = "not_found"


class ConflictError(EvchargeError):
    code = "conflict"


class UnavailableError(EvchargeError):
    code = "unavailable"


class ConnectionLostError(UnavailableError):
    """The connection closed before the reply came."""


class RequestTimeoutError(EvchargeError):
    """No answer in time: the request may or may not have been done (ask again with its key)."""

    code = "timeout"


class OutcomeUnknownError(RequestTimeoutError):
    """A keyed request was sent but no answer came before the deadline, even when asked again."""


class TooLargeError(EvchargeError):
    code = "too_large"


class UnsupportedVersionError(EvchargeError):
    code = "unsupported_version"


class InternalError(EvchargeError):
    code = "internal"


def error_class(code: str) -> type[EvchargeError]:
    """The class for a code; a code this side does not know is an ``InternalError``."""
    return _BY_CODE.get(code, InternalError)


def error_from_reply(reply: Error) -> EvchargeError:
    return error_class(reply.code)(reply.message, next_free=reply.next_free)
