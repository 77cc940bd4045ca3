"""Replies on the pub/sub connection, handled in the event loop's read callback.

Read through redis-py's stream, a reply costs a loop iteration before anything happens to
it: the bytes reach the ``StreamReader``, which wakes the task reading it, which then parses
them. The listener wants every ready record handed to its waiters as early as possible (the
``get()`` behind it needs another loop iteration anyway), so ``ReplyReader`` takes the
transport's place of redis-py's protocol once the connection is set up: ``data_received``
parses what came (:func:`aioqueue.results.resp.parse`, replies split across reads joined)
and gives each reply to a callback at once. Everything else still reaches redis-py's
protocol (``connection_lost``, ``pause_writing``, ``resume_writing``), so its writer keeps
working (``drain()``, closing) as before.

The listener task only awaits ``failed``: it holds the first error (the connection lost or
closed by the server, bytes that are not RESP, an exception from the callback, which ends
the reading there), and the listener reconnects on it as on any read error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from .resp import parse

__all__ = ("ReplyReader",)


class ReplyReader(asyncio.Protocol):
    """Parses replies as they arrive and hands each to ``on_reply`` (module docstring)."""

    def __init__(
        self, on_reply: Callable[[Any], None], inner: asyncio.BaseProtocol,
        transport: asyncio.Transport, leftover: bytes = b"",
    ) -> None:
        self._on_reply = on_reply
        self._inner = inner
        self._transport = transport
        loop = asyncio.get_running_loop()
        self.failed: asyncio.Future[None] = loop.create_future()
        self.failed.add_done_callback(_retrieved)  # may come after the listener stopped
        self.last_data = loop.time()  # when bytes last came: the listener's health check
        self._time = loop.time
        self._rest = b""
        self._parts: list[bytes] = []
        self._have = self._needed = 0
        if leftover:
            self.data_received(leftover)

    def data_received(self, data: bytes) -> None:
        if self.failed.done():
            return  # the connection is being dropped: nothing more is read from it
        self.last_data = self._time()
        if self._rest or self._parts:  # the end of a reply that started in an earlier read
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._needed:
                return
            data = self._rest + b"".join(self._parts)
            self._parts.clear()
        try:
            replies, self._rest, self._needed = parse(data)
        except ValueError as exc:  # not RESP: start afresh on a new connection
            self._fail(RedisConnectionError(f"unreadable reply from Redis: {exc}"))
            return
        self._have = len(self._rest)
        for reply in replies:
            try:
                self._on_reply(reply)
            except Exception as exc:
                self._fail(exc)
                return

    def eof_received(self) -> bool:
        self._fail(RedisConnectionError("the pub/sub connection was closed by the server"))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"the pub/sub connection was lost: {exc}"
                                        if exc else "the pub/sub connection was closed"))
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _fail(self, exc: Exception) -> None:
        if not self.failed.done():
            self.failed.set_exception(exc)
            self._transport.pause_reading()  # nothing more until the listener drops it


def _retrieved(failed: asyncio.Future[None]) -> None:
    if not failed.cancelled():
        failed.exception()
