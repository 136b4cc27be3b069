"""One exception hierarchy for every typed error of the protocol.

The server raises these where a request fails; the connection turns them into
an ``Error`` reply; the client turns that reply back into the same class, so
callers catch ``ConflictError`` (or the base ``EvchargeError``) on either side.
"""

from __future__ import annotations

from datetime import datetime

from evcharge.wire.protocol import Error, ErrorCode

# Messages may quote what a client sent (an id, a city); a huge one must not make the
# error itself too large to send, nor flood the log.
MAX_MESSAGE = 1000


class EvchargeError(Exception):
    code: ErrorCode = "internal"

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
    code = "timeout"


class TooLargeError(EvchargeError):
    code = "too_large"


class UnsupportedVersionError(EvchargeError):
    code = "unsupported_version"


class InternalError(EvchargeError):
    code = "internal"


_BY_CODE: dict[str, type[EvchargeError]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        UnauthorizedError,
        ForbiddenError,
        NotFoundError,
        ConflictError,
        UnavailableError,
        RequestTimeoutError,
        TooLargeError,
        UnsupportedVersionError,
        InternalError,
    )
}


def error_from_reply(reply: Error) -> EvchargeError:
    return _BY_CODE.get(reply.code, InternalError)(reply.message, next_free=reply.next_free)
