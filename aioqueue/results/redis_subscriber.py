"""The listener's pub/sub connection: our own RESP connection, or redis-py's ``PubSub``.

Both serve one :class:`~aioqueue.results.redis_listener.Listener` until the connection fails
(they raise; the listener reconnects) or the listener task is cancelled: they write what
``Listener.take_commands`` gives whenever ``Listener.ops_ready`` is set, hand what Redis
sends to the listener's ``on_*`` methods, and check the connection's health: after a whole
``interval`` without a byte from Redis they ask for a PING, and after another one without an
answer they take the connection for dead (a half-open TCP connection never errors).

* ``WireSubscriber`` (``settings.fast_paths``): :class:`~aioqueue.results.redis_wire.RedisWire`.
  Replies are parsed in the transport's read callback, each command batch is one write, and
  on RESP3 the keys are read by MGETs on the same connection (``inline``).
* ``PubSubSubscriber``: redis-py's public ``PubSub`` (``subscribe``, ``unsubscribe``,
  ``ping``, ``get_message``), one reply per read; keys are read on a pooled connection.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Protocol

from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError

from .redis_listener import MGET, PING, SUBSCRIBE, UNSUBSCRIBE, raise_if_cancelled
from .redis_wire import OWN_WIRE, REDIS_PY, RedisWire, WireError
from .resp import command

if TYPE_CHECKING:
    from .redis_listener import Listener

__all__ = ("PubSubSubscriber", "Subscriber", "WireSubscriber")

class Subscriber(Protocol):
    """What the listener needs of a pub/sub connection."""

    #: "own-wire" or "redis-py".
    path: str
    #: Keys can be read on this connection (MGET right behind SUBSCRIBE).
    inline: bool

    async def serve(self, listener: Listener) -> None: ...

    async def close(self) -> None: ...


class WireSubscriber:
    """The listener on our own connection (module docstring)."""

    path = OWN_WIRE

    def __init__(self, wire: RedisWire, interval: float) -> None:
        self._wire = wire
        self._interval = interval
        self.inline = wire.protocol == 3

    async def serve(self, listener: Listener) -> None:
        self._wire.on_push = listener.on_reply
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._watch(listener))
            tasks.create_task(self._write(listener))

    async def close(self) -> None:
        await self._wire.aclose()

    async def _watch(self, listener: Listener) -> None:
        """Raise when the connection ends; ask for PINGs when it is silent."""
        wire = self._wire
        interval = self._interval
        loop = asyncio.get_running_loop()
        ping_sent = False
        deadline = wire.last_data + interval
        while True:
            await asyncio.wait((wire.closed,), timeout=max(0.0, deadline - loop.time()))
            if wire.closed.done():
                wire.closed.result()  # raises: the listener reconnects
            now = loop.time()
            if wire.last_data + interval > now:  # heard from Redis within the interval
                ping_sent = False
                deadline = wire.last_data + interval
                continue
            if ping_sent:
                raise WireError("no answer to PING on the pub/sub connection")
            ping_sent = True
            deadline = now + interval
            listener.queue_ping()

    async def _write(self, listener: Listener) -> None:
        wire = self._wire
        inline = self.inline
        while True:
            await listener.ops_ready.wait()
            commands = listener.take_commands()
            if not commands:
                continue
            data = []
            for args in commands:
                if inline and args[0] == MGET:
                    wire.expect(1, functools.partial(listener.on_values, args[1:]))
                elif inline and args[0] == PING:
                    wire.expect(1)  # RESP3 answers a PING as a command even when subscribed
                data.append(command(*args))
            wire.write(data)
            await wire.drain()


class PubSubSubscriber:
    """The listener on redis-py's ``PubSub`` (module docstring)."""

    path = REDIS_PY
    inline = False

    def __init__(self, pubsub: PubSub, interval: float) -> None:
        self._pubsub = pubsub
        self._interval = interval

    async def serve(self, listener: Listener) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._read(listener))
            tasks.create_task(self._write(listener))

    async def close(self) -> None:
        await self._pubsub.aclose()

    def _check(self) -> None:
        # PubSub reconnects by itself when asked to read or write on a dropped connection;
        # the listener must know (it subscribes and reads every key again), so it never asks.
        connection = self._pubsub.connection
        if connection is None or not connection.is_connected:
            raise RedisConnectionError("the pub/sub connection is closed")

    async def _read(self, listener: Listener) -> None:
        ping_sent = False
        while True:
            self._check()
            message = await self._pubsub.get_message(timeout=self._interval)
            raise_if_cancelled()
            if message is None:  # silence for a whole interval
                if ping_sent:
                    raise RedisConnectionError("no answer to PING on the pub/sub connection")
                ping_sent = True
                listener.queue_ping()
                continue
            ping_sent = False
            kind = message["type"]
            if kind in ("message", "subscribe"):
                channel = message["channel"]
                if isinstance(channel, str):  # the URL asked redis-py to decode responses
                    channel = channel.encode()
                if kind == "message":
                    listener.on_message(channel, message["data"])
                else:
                    listener.on_subscribed(channel)

    async def _write(self, listener: Listener) -> None:
        pubsub = self._pubsub
        while True:
            await listener.ops_ready.wait()
            for args in listener.take_commands():
                self._check()
                if args[0] == SUBSCRIBE:
                    await pubsub.subscribe(*args[1:])
                elif args[0] == UNSUBSCRIBE:
                    await pubsub.unsubscribe(*args[1:])
                elif args[0] == PING:
                    await pubsub.ping()
                raise_if_cancelled()
