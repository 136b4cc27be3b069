"""A framed, pipelined connection over asyncio streams, and its dispatch.

``Connection`` is shared by the server and every client. It reads frames into
messages, matches replies to the requests that are waiting for them (many may be
in flight, answered in any order), and writes with a deadline so a peer that
stops reading cannot stall us forever. ``Connection.serve`` dispatches for both
sides: replies go to their waiting requests, events and requests to a
``Responder`` (the server's role handlers, a client's callbacks).

Bytes do not go through a ``StreamReader``: the transport hands them to the
connection (``FramedProtocol``), which splits and dispatches them in that same
callback, so a reply wakes only the request waiting for it -- no read loop task
in between. Streams open with ``open_connection`` and ``start_server`` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from evcharge.wire.errors import (
    BadRequestError,
    ConnectionLostError,
    EvchargeError,
    ForbiddenError,
    InternalError,
    RequestTimeoutError,
    TooLargeError,
    error_from_reply,
)
from evcharge.wire.protocol import (
    MAX_FRAME,
    Error,
    Event,
    FrameBuffer,
    FrameTooLarge,
    Hello,
    Message,
    Reply,
    Request,
    UndecodableMessage,
    decode_body,
    encode_frame,
)

log = logging.getLogger(__name__)

# Bytes buffered, not yet taken by ``receive`` (before serving), above which we stop reading.
RECEIVE_BUFFER = 2 * MAX_FRAME
DEFAULT_REQUEST_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
# Above this many unsent bytes we wait for the peer to read before writing more.
WRITE_HIGH_WATER = 256 * 1024
CLOSE_GRACE = 2.0  # seconds a close waits for buffered bytes to leave before it drops them
MAX_IN_FLIGHT = 64  # requests per connection served (or their replies being sent) at once; then we stop reading


class ConnectionClosed(Exception):
    """The peer closed the connection (or we did)."""


class FrameTimeout(TimeoutError):
    """A frame began but did not arrive whole in time (a slowloris, or a peer that died mid-frame)."""


class _Expired(Exception):
    """A request's reply did not come in time (set on its future by its timer)."""


def _expire(future: asyncio.Future[Reply]) -> None:
    if not future.done():
        future.set_exception(_Expired())


class Responder:
    """What ``Connection.serve`` hands the peer's requests and events to."""

    internal_error = "internal error; the log has the details"  # what the peer is told of a bug of ours

    async def handle(self, request: Request) -> Reply:
        raise ForbiddenError(f"{type(request).__name__} is not a request this side accepts")

    def handle_event(self, event: Event) -> None:
        log.debug("ignoring %s", type(event).__name__)

    def replied(self, request: Request, reply: Reply) -> None:
        """The reply to ``request`` was handed to the connection (or could not be)."""


class FramedProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol (its writer, drain and close as they are), whose bytes go to a ``Connection``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.receiver: Connection | None = None
        self.early = bytearray()  # what came before the connection was made (a moment, usually nothing)
        self.ended_early = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self.receiver is not None:
            self.receiver._data_received(data)
            return
        self.early += data
        if len(self.early) > RECEIVE_BUFFER and self.transport is not None:
            self.transport.pause_reading()  # the connection resumes it

    def eof_received(self) -> bool:
        keep_open = bool(super().eof_received())
        self._ended()
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._ended()

    def _ended(self) -> None:
        if self.receiver is not None:
            self.receiver._ended()
        else:
            self.ended_early = True


async def open_connection(host: str, port: int, **kwargs: Any) -> asyncio.StreamWriter:
    """``asyncio.open_connection`` for a ``Connection``: only its writer (the bytes go to the connection)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = FramedProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, host, port, **kwargs)
    return asyncio.StreamWriter(transport, protocol, reader, loop)


async def start_server(
    connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: str,
    port: int,
    **kwargs: Any,
) -> asyncio.Server:
    """``asyncio.start_server`` for ``Connection``s."""
    loop = asyncio.get_running_loop()

    def factory() -> FramedProtocol:
        return FramedProtocol(asyncio.StreamReader(loop=loop), connected, loop=loop)

    return await loop.create_server(factory, host, port, **kwargs)


class Connection:
    def __init__(self, writer: asyncio.StreamWriter, *, max_frame: int = MAX_FRAME) -> None:
        """Over the streams of ``open_connection`` or ``start_server`` (the reader is not used: see the module)."""
        protocol = writer.transport.get_protocol()
        if not isinstance(protocol, FramedProtocol):
            raise TypeError("a Connection needs the streams of open_connection or start_server (evcharge.wire)")
        assert protocol.transport is not None  # connection_made came before the streams
        self._transport = protocol.transport  # writer.transport, typed for reading too (pause, resume)
        self._writer = writer
        self._frames = FrameBuffer(max_frame)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._ended_reading = False  # the peer closed its side, or the connection broke
        self._data_waiter: asyncio.Future[None] | None = None  # a receive() waiting for bytes
        self._reading_paused = False
        # Once a frame's first bytes are in, all of it must arrive within this (None: no limit);
        # an idle timeout alone is reset by every byte, so a trickle would hold the connection forever.
        self.frame_timeout: float | None = None
        self._frame_started: float | None = None
        self._frame_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0  # when bytes last came (monotonic), while serving with an idle timeout
        # While serving: where requests and events go, how many requests at once, why it ended.
        self._responder: Responder | None = None
        self._max_in_flight = MAX_IN_FLIGHT
        self._requests = 0  # the peer's requests being handled, their replies not yet handed over
        self._ending: asyncio.Future[str] | None = None
        self.write_timeout = WRITE_TIMEOUT
        self._loop = asyncio.get_running_loop()
        self.last_sent = self._loop.time()  # when we last wrote a frame (monotonic)
        self._serving: set[asyncio.Task[None]] = set()  # requests of the peer's being handled
        # The last error the peer sent unasked (id 0): if it then closes, why (say, replaced by a newer connection).
        self.farewell: Error | None = None
        self._out: list[bytes] = []  # frames of this turn of the event loop, written together at its end
        self._out_bytes = 0
        self._flush_due = False
        self._transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = writer.get_extra_info("peername")
        self.peername = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        protocol.receiver = self
        if protocol.early:
            self._frames.feed(bytes(protocol.early))
            protocol.early.clear()
            if self._frames.buffered > RECEIVE_BUFFER:
                self._pause_reading()
        if protocol.ended_early:
            self._ended_reading = True

    @property
    def closed(self) -> bool:
        return self._closed

    async def receive(self, timeout: float | None = None) -> Message:
        """The next message from the peer (before ``serve``: the handshake).

        Raises ``ConnectionClosed`` at end of stream, ``TimeoutError`` when no
        byte arrives within ``timeout``, ``FrameTimeout`` when a begun frame is
        not whole within ``frame_timeout``, ``FrameTooLarge`` for an oversized
        frame (fatal) and ``UndecodableMessage`` for a bad body (not fatal:
        the next call reads the next frame).
        """
        while True:
            body = self._frames.next_body()
            if body is not None:
                # The clock runs only while we wait for the peer, never while we are busy elsewhere.
                self._frame_started = None
                if self._reading_paused and self._frames.buffered <= RECEIVE_BUFFER:
                    self._resume_reading()
                return decode_body(body)
            if self._ended_reading or self._closed:
                raise ConnectionClosed
            wait, frame_deadline = timeout, False
            if self.frame_timeout is not None and self._frames.buffered:
                now = self._loop.time()
                if self._frame_started is None:
                    self._frame_started = now
                left = self._frame_started + self.frame_timeout - now
                if wait is None or left < wait:
                    wait, frame_deadline = max(left, 0.0), True
            self._data_waiter = waiter = self._loop.create_future()
            try:
                if wait is None:
                    await waiter
                else:
                    async with asyncio.timeout(wait):
                        await waiter
            except TimeoutError:
                if frame_deadline:
                    raise FrameTimeout(f"a frame was not complete within {self.frame_timeout:g} s") from None
                raise
            finally:
                self._data_waiter = None

    # --- bytes from the transport (FramedProtocol) ---------------------------------------

    def _data_received(self, data: bytes) -> None:
        self._frames.feed(data)
        if self._ending is not None:  # serving
            if self._idle_timer is not None:
                self._last_data = self._loop.time()
            self._dispatch()
            return
        if self._frames.buffered > RECEIVE_BUFFER:
            self._pause_reading()
        self._wake_receive()

    def _ended(self) -> None:
        self._ended_reading = True
        if self._ending is not None:
            self._dispatch()  # what is buffered still counts; then serve ends
        else:
            self._wake_receive()

    def _wake_receive(self) -> None:
        waiter = self._data_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            with contextlib.suppress(RuntimeError):  # uvloop: closing meanwhile
                self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            with contextlib.suppress(RuntimeError):
                self._transport.resume_reading()

    def _watch_idle(self, idle: float) -> None:
        """Serve's idle timeout: one timer per connection, looked at when due, not one per read."""
        now = self._loop.time()
        if self._reading_paused:  # we are not reading (too busy): the peer is not idle
            self._last_data = now
        elif now - self._last_data >= idle:
            self._end(f"idle for {idle:g} s")
            return
        self._idle_timer = self._loop.call_at(self._last_data + idle, self._watch_idle, idle)

    def _frame_overdue(self) -> None:
        self._frame_timer = None
        self._end(f"a frame was not complete within {self.frame_timeout:g} s")

    def _end(self, why: str) -> None:
        """Serving ends (``serve`` then closes the connection)."""
        if self._ending is not None and not self._ending.done():
            self._ending.set_result(why)

    def resolve(self, reply: Reply) -> None:
        """Hand a reply to the request waiting for it (late replies are dropped)."""
        if reply.id == 0 and isinstance(reply, Error):
            self.farewell = reply
            return
        future = self._pending.get(reply.id)
        if future is not None and not future.done():
            future.set_result(reply)

    def fail_request(self, request_id: int, exc: Exception) -> bool:
        """Fail a waiting request (e.g. its reply could not be decoded)."""
        future = self._pending.get(request_id)
        if future is None or future.done():
            return False
        future.set_exception(exc)
        return True

    @property
    def buffered_out(self) -> int:
        """Bytes written but not yet taken by the peer."""
        return self._transport.get_write_buffer_size() + self._out_bytes

    def write_nowait(self, message: Message) -> None:
        """Queue a frame without waiting for the peer to read (for pushes)."""
        if self._closed or self._transport.is_closing():
            raise ConnectionLostError("connection is closed")
        self._queue(encode_frame(message))

    def _queue(self, frame: bytes) -> None:
        """Send ``frame`` with the others of this turn of the event loop.

        Replies and pushes made in one turn (a batch's replies, a reservation's events
        and its reply) leave in one write: one system call, not one per frame.
        """
        self._out.append(frame)
        self._out_bytes += len(frame)
        self.last_sent = self._loop.time()
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self._flush_due = False
        if not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        if self._transport.is_closing():
            return  # aborted meanwhile: what was queued goes nowhere, as a write after the abort would
        try:
            self._transport.write(data)
        except (ConnectionError, OSError, RuntimeError):  # uvloop: RuntimeError once aborted
            log.debug("%s: write failed; dropping the connection", self.peername, exc_info=True)
            self.abort()

    async def send(self, message: Message) -> None:
        self._send_frame(encode_frame(message), message)
        if self.buffered_out > WRITE_HIGH_WATER:
            await self._drain()

    def _send_frame(self, frame: bytes, message: Message) -> None:
        if self._closed or self._transport.is_closing():
            raise ConnectionLostError("connection is closed")
        if len(frame) - 4 > self._frames.max_frame:
            # The peer would refuse it and drop the connection: say so instead of sending it.
            raise TooLargeError(f"{type(message).__name__} of {len(frame) - 4} bytes is over the frame limit")
        self._queue(frame)

    async def _drain(self) -> None:
        self._flush_out()  # what waits for the next turn counts as written: hand it over first
        if self._closed:
            raise ConnectionLostError("connection lost")
        try:
            async with asyncio.timeout(self.write_timeout):
                await self._writer.drain()
        except TimeoutError:
            # A peer that does not read for this long is gone for our purposes. Abort, not
            # close: a close would keep what it never read buffered here until it did.
            self.abort()
            raise ConnectionLostError("peer stopped reading; connection closed") from None
        except (ConnectionError, OSError, RuntimeError) as exc:  # uvloop: RuntimeError once aborted
            await self.close()
            raise ConnectionLostError(f"connection lost: {exc}") from None

    async def request(self, message: Request, timeout: float = DEFAULT_REQUEST_TIMEOUT) -> Reply:
        """Send a request and wait for its reply; an ``Error`` reply is raised."""
        if self._closed:
            raise ConnectionLostError("connection is closed")
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._pending[request_id] = future
        # One timer handle on the future, not a timeout context (its task bookkeeping) per request.
        timer = loop.call_later(timeout, _expire, future)
        try:
            # Our id goes on the caller's message only for as long as encoding it takes (no
            # await in between): it may be in flight on other connections too, with theirs.
            previous = message.id
            message.id = request_id
            try:
                frame = encode_frame(message)
            finally:
                message.id = previous
            self._send_frame(frame, message)
            if self.buffered_out > WRITE_HIGH_WATER:
                await self._drain()
            reply = await future
        except _Expired:
            raise RequestTimeoutError(f"no reply to {type(message).__name__} within {timeout:g} s") from None
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)
        if isinstance(reply, Error):
            raise error_from_reply(reply)
        return reply

    async def reply_error(self, request_id: int, exc: EvchargeError) -> None:
        with contextlib.suppress(ConnectionLostError):
            await self.send(exc.to_reply(request_id))

    def _mark_closed(self) -> None:
        self._closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLostError("connection closed before the reply"))
        self._pending.clear()

    async def close(self) -> None:
        """Close once; every request still waiting fails with ConnectionLostError."""
        if self._closed:
            return
        self._mark_closed()
        self._flush_out()  # the last replies (a farewell Error, say) go before the close
        self._writer.close()
        try:
            async with asyncio.timeout(CLOSE_GRACE):
                await self._writer.wait_closed()
        except TimeoutError:
            # The peer is not taking what is still buffered; do not keep it for the peer's sake.
            self._transport.abort()
        except Exception:  # wait_closed re-raises whatever broke the connection: it is closed all the same
            log.debug("closing %s", self.peername, exc_info=True)

    def abort(self) -> None:
        """Drop the connection now, without waiting for buffered writes."""
        if not self._closed:
            self._mark_closed()
        self._out.clear()
        self._out_bytes = 0
        self._transport.abort()

    # --- the receive loop ------------------------------------------------------------

    async def serve(
        self, responder: Responder, *, idle_timeout: float | None = None, max_in_flight: int = MAX_IN_FLIGHT
    ) -> str:
        """Dispatch the peer's messages until the connection ends; close it; return why it ended.

        Replies resolve our requests; events go to ``responder.handle_event``; requests are
        handled concurrently, at most ``max_in_flight`` at a time: a slot is held until
        the reply is handed over, so a peer that does not read its replies runs out of
        slots and then we stop reading its requests (backpressure) instead of piling up
        replies it will never take. ``idle_timeout``: close when nothing arrives that long.
        """
        self._responder = responder
        self._max_in_flight = max_in_flight
        ending: asyncio.Future[str] = self._loop.create_future()
        self._ending = ending
        if idle_timeout is not None:
            self._last_data = self._loop.time()
            self._idle_timer = self._loop.call_later(idle_timeout, self._watch_idle, idle_timeout)
        try:
            self._resume_reading()
            self._dispatch()  # what came before (during the handshake, say)
            return await ending
        finally:
            for timer in (self._idle_timer, self._frame_timer):
                if timer is not None:
                    timer.cancel()
            self._idle_timer = self._frame_timer = None
            await self.close()

    def _dispatch(self) -> None:
        """Hand every whole message buffered to where it goes, as long as requests have slots."""
        responder, ending = self._responder, self._ending
        assert responder is not None and ending is not None
        frames = self._frames
        whole = 0  # frames taken now: the one begun after them gets its own time
        while True:
            if ending.done():
                return
            if self._requests >= self._max_in_flight:
                self._pause_reading()  # _request_done resumes, and dispatches what waits
                self._frame_clock(running=False)  # we are not reading: the peer is not slow
                return
            try:
                body = frames.next_body()
                if body is None:
                    break
                whole += 1
                message = decode_body(body)
            except FrameTooLarge as exc:
                with contextlib.suppress(ConnectionLostError):
                    self.write_nowait(TooLargeError(str(exc)).to_reply(0))
                self._end(str(exc))
                return
            except UndecodableMessage as exc:
                self._answer_undecodable(exc)
                continue
            if isinstance(message, Reply):
                self.resolve(message)
            elif isinstance(message, Event):
                try:
                    responder.handle_event(message)
                except Exception:  # one bad handler must not end the connection
                    log.exception("%s: handling %s failed", responder, type(message).__name__)
            else:
                assert isinstance(message, Request)
                self._requests += 1
                task = self._loop.create_task(self._answer(responder, message))
                self._serving.add(task)
                task.add_done_callback(self._serving.discard)
        if self._ended_reading or self._closed:
            self._end("closed")
        elif self.frame_timeout is not None:
            if not frames.buffered:
                self._frame_clock(running=False)
            elif whole or self._frame_timer is None:  # a frame begun now
                self._frame_clock(running=True)

    def _frame_clock(self, *, running: bool) -> None:
        """A begun frame must be whole within ``frame_timeout``: (re)start its clock, or stop it."""
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None
        if running and self.frame_timeout is not None:
            self._frame_timer = self._loop.call_later(self.frame_timeout, self._frame_overdue)

    def _answer_undecodable(self, exc: UndecodableMessage) -> None:
        error = BadRequestError(exc.reason if exc.in_user_words else f"undecodable message: {exc.reason}")
        if exc.request_id and self.fail_request(exc.request_id, error):
            return  # it was the reply to one of our own requests
        log.info("%s: bad message: %s", self.peername, exc.reason)
        with contextlib.suppress(ConnectionLostError):
            self.write_nowait(error.to_reply(exc.request_id))

    async def _answer(self, responder: Responder, request: Request) -> None:
        try:
            try:
                if isinstance(request, Hello):
                    raise BadRequestError("already said Hello")
                reply = await responder.handle(request)
                reply.id = request.id
            except EvchargeError as exc:
                reply = exc.to_reply(request.id)
            except Exception:
                log.exception("%s: %s failed", responder, type(request).__name__)
                reply = InternalError(responder.internal_error).to_reply(request.id)
            with contextlib.suppress(ConnectionLostError):
                try:
                    await self.send(reply)
                except TooLargeError as exc:
                    await self.send(exc.to_reply(request.id))
        finally:
            self._request_done()
        responder.replied(request, reply)

    def _request_done(self) -> None:
        self._requests -= 1
        if self._reading_paused and self._requests < self._max_in_flight and self._ending is not None:
            self._resume_reading()
            self._dispatch()

    @property
    def in_flight(self) -> int:
        """The peer's requests being handled or answered right now (their replies not yet handed over)."""
        return self._requests

    async def wait_served(self) -> None:
        """Wait for the peer's requests being handled (at shutdown)."""
        if self._serving:
            await asyncio.gather(*self._serving, return_exceptions=True)

    async def cancel_serving(self) -> None:
        for task in list(self._serving):
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)
