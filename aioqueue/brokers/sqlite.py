"""``sqlite:///path.db``: a durable broker in one SQLite file, shared by processes on one machine.

No server: producers and workers in any number of processes open the same file. The schema is
aioqueue's own (tables ``aioqueue_messages``, ``aioqueue_queues``, ``aioqueue_exchanges``,
``aioqueue_bindings``); stock Celery cannot read it. The whole broker contract holds, as on
RabbitMQ and ``memory://``: prefetch, ack, reject with or without requeue, priorities (with
``x-max-priority`` or ``task_queue_max_priority``), per-message expiration and dead-lettering
(``x-dead-letter-exchange`` / ``x-dead-letter-routing-key``), ``x-delivery-limit`` on quorum
queues (a message given back more often is dead-lettered), direct, topic and fanout exchanges.
``publish_delayed`` writes ``not_before``: no consumer can claim the row before then.

Claiming. A consumer claims messages atomically (``BEGIN IMMEDIATE``, then one ``UPDATE ...
RETURNING``) by giving them a lease, ``lease_until = now + visibility_timeout``
(``broker_transport_options["visibility_timeout"]``, Celery's name, default 3600 s). Ack deletes
the row; reject(requeue=True) clears the lease and marks the message redelivered. A message
whose lease ran out (its worker was killed) is claimed again, with ``redelivered`` set. As with
Celery's Redis transport, a task (or an ETA wait) that outlives the visibility timeout is
delivered again, so the timeout must exceed the longest task. Settling a delivery whose lease
ran out and that another consumer has claimed since does nothing (the other consumer owns it).

Waiting. A consumer polls with an adaptive interval: 5 ms after activity, doubling while idle
up to ``broker_transport_options["polling_interval"]`` (default 0.1 s). An idle poll is a read,
which never blocks writers under WAL. Publishes, requeues and settlements in the same process
wake consumers at once, so in-process latency is one thread hop; a message from another process
is seen within the current interval (typically 5 ms when busy, at most 0.1 s when idle).

Threads. sqlite3 connections are not thread-safe and their calls block, so each broker owns one
thread holding its one connection; every SQLite call runs there and the event loop only awaits
it. ``close()`` gives back unsettled deliveries and stops the thread.

Durability: WAL mode with ``synchronous=NORMAL``: a committed message survives a process crash;
a power loss may lose the last transactions. The file must be on a local disk (WAL needs shared
memory, so not NFS). Leases use the wall clock, shared by every process on the machine.

The schema and the SQL of every operation live in :mod:`aioqueue.brokers.sqlite_queue`. The
connection thread, URL parsing and in-process wake-ups live in :mod:`aioqueue.sqlite_db`,
shared with :mod:`aioqueue.results.sqlite`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from ..exceptions import BrokerConnectionError, BrokerError, SerializationError
from ..protocol import Envelope
from ..sqlite_db import (
    MIN_POLL_INTERVAL,
    SqliteThread,
    database_path,
    notify,
    open_database,
    polling_options,
    unwatch,
    watch,
)
from . import sqlite_queue
from .base import Broker, Consumer, Delivery

if TYPE_CHECKING:
    from ..config import Queue, Settings

__all__ = ("SqliteBroker",)

logger = logging.getLogger(__name__)

#: Messages claimed per transaction at most (within the free prefetch slots).
_CLAIM_BATCH = 100

def _json(value: Any, what: str) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as exc:
        raise SerializationError(f"message {what} cannot be stored as JSON: {exc}") from exc


class _SqliteDelivery(Delivery):
    __slots__ = ("_consumer", "_count", "_id", "_settled")

    def __init__(self, row: sqlite_queue.Row, consumer: _SqliteConsumer) -> None:
        props = orjson.loads(row.properties)
        envelope = Envelope(body=row.body, headers=orjson.loads(row.headers), **props)
        super().__init__(envelope, row.routing_key, bool(row.redelivered))
        self._consumer = consumer
        self._id = row.id
        self._count = row.claim
        self._settled = consumer.no_ack

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self._consumer.settled(self)
        return True

    async def ack(self) -> None:
        if self._settle():
            await self._consumer.settle(self._id, self._count, dead_letter=False)

    async def reject(self, requeue: bool) -> None:
        if not self._settle():
            return
        if requeue:
            await self._consumer.broker.release([(self._id, self._count)], redelivered=True)
        else:
            await self._consumer.settle(self._id, self._count, dead_letter=True)


class _SqliteConsumer(Consumer):
    def __init__(
        self, broker: SqliteBroker, queues: Sequence[str], prefetch: int, no_ack: bool
    ) -> None:
        self.broker = broker
        self.queue_names = list(queues)
        self.prefetch = prefetch
        self.no_ack = no_ack
        self.tag = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.unsettled: set[_SqliteDelivery] = set()
        self._buffer: deque[sqlite_queue.Row] = deque()  # claimed, not yet handed out
        self._claims: set[asyncio.Future[list[sqlite_queue.Row]]] = set()
        self._wake = asyncio.Event()
        self._waker: Callable[[], None] | None = None
        self._running = False

    async def start(self) -> None:
        db = self.broker.db()
        missing = await db.run(partial(sqlite_queue.missing_queues, self.queue_names))
        if missing:
            raise BrokerError(f"cannot consume from undeclared queue(s): {', '.join(missing)}")
        self._waker = watch(db.path, self._wake)
        self.broker.consumers.add(self)
        self._running = True

    async def stop(self) -> None:
        self._running = False
        self._wake.set()
        if self._waker is not None:
            unwatch(self.broker.path, self._waker)
            self._waker = None
        if self._claims:  # a claim may finish after its receive() was cancelled
            await asyncio.wait(list(self._claims))
            for claim in list(self._claims):
                self._adopt(claim)
        rows, self._buffer = list(self._buffer), deque()
        if rows:
            await self.broker.release([(r.id, r.claim) for r in rows], redelivered=False)
        if not self.unsettled:
            self.broker.consumers.discard(self)

    def take_unsettled(self) -> list[tuple[int, int]]:
        """Mark every handed-out delivery settled; the broker gives them back."""
        claims = [(d._id, d._count) for d in self.unsettled]
        for delivery in self.unsettled:
            delivery._settled = True
        self.unsettled.clear()
        return claims

    def settled(self, delivery: _SqliteDelivery) -> None:
        self.unsettled.discard(delivery)
        self._wake.set()  # a prefetch slot is free
        if not self._running and not self.unsettled:
            self.broker.consumers.discard(self)

    async def settle(self, message_id: int, count: int, *, dead_letter: bool) -> None:
        db = self.broker.db()
        if not await db.run(partial(sqlite_queue.settle, message_id, count, dead_letter)):
            logger.warning(
                "message %d on %s: lease expired and it was delivered again; %s ignored",
                message_id, db.path, "reject" if dead_letter else "ack",
            )
        elif dead_letter:
            notify(db.path)

    def _adopt(self, claim: asyncio.Future[list[sqlite_queue.Row]]) -> None:
        """Take a finished claim's rows into the buffer, once (stop() gives them back)."""
        if claim not in self._claims:
            return
        self._claims.discard(claim)
        if not claim.cancelled() and claim.exception() is None:
            self._buffer.extend(claim.result())

    async def receive(self) -> Delivery:
        broker = self.broker
        interval = MIN_POLL_INTERVAL
        while True:
            if not self._running:
                raise BrokerConnectionError("consumer stopped")
            if self._buffer:
                delivery = _SqliteDelivery(self._buffer.popleft(), self)
                if not self.no_ack:
                    self.unsettled.add(delivery)
                return delivery
            # no_ack deletes on claim, so claim one at a time: nothing to give back on stop.
            free = 1 if self.no_ack else min(self.prefetch - len(self.unsettled), _CLAIM_BATCH)
            self._wake.clear()
            if free <= 0:
                await self._wake.wait()  # only a settlement frees a slot; no need to poll
                continue
            claim = broker.db().submit(partial(
                sqlite_queue.claim, self.queue_names, free, self.tag, broker.visibility_timeout,
                self.no_ack,
            ))
            self._claims.add(claim)
            claim.add_done_callback(self._adopt)
            await asyncio.shield(claim)
            self._adopt(claim)
            if self._buffer:
                continue
            try:
                async with asyncio.timeout(interval):
                    await self._wake.wait()
                interval = MIN_POLL_INTERVAL
            except TimeoutError:
                interval = min(interval * 2, broker.polling_interval)


class SqliteBroker(Broker):
    """A broker in one SQLite file; see the module docstring.

    ``broker_transport_options``: ``visibility_timeout`` (s, default 3600), ``polling_interval``
    (longest idle poll, s, default 0.1), ``busy_timeout`` (s to wait for another process's
    write lock, default 5).
    """

    def __init__(self, url: str, settings: Settings) -> None:
        super().__init__(url, settings)
        self.path = database_path(url)
        options = settings.broker_transport_options
        self.visibility_timeout = float(options.get("visibility_timeout", 3600))
        self.polling_interval, self.busy_timeout = polling_options(options)
        self.consumers: set[_SqliteConsumer] = set()
        self._db: SqliteThread | None = None

    def db(self) -> SqliteThread:
        if self._db is None:
            raise BrokerConnectionError(f"{self.url} is not connected")
        return self._db

    async def connect(self) -> None:
        if self._db is None:
            self._db = await open_database(
                self.path, sqlite_queue.SCHEMA, name="aioqueue-sqlite-broker",
                busy_timeout=self.busy_timeout, error=BrokerError,
                connect_error=BrokerConnectionError,
            )

    async def close(self) -> None:
        if self._db is None:
            return
        try:
            for consumer in list(self.consumers):
                await consumer.stop()
                claims = consumer.take_unsettled()
                if claims:
                    await self.release(claims, redelivered=True)
        finally:
            self.consumers.clear()
            db, self._db = self._db, None
            await db.close()

    async def release(self, claims: Sequence[tuple[int, int]], *, redelivered: bool) -> None:
        db = self.db()
        await db.run(partial(sqlite_queue.release, list(claims), redelivered))
        notify(db.path)

    async def declare(self, queue: Queue) -> None:
        args = dict(queue.queue_arguments)
        max_priority = args.get("x-max-priority", self.settings.task_queue_max_priority)
        dead_letter = (args.get("x-dead-letter-exchange"), args.get("x-dead-letter-routing-key"))
        exchange = None
        if queue.exchange_name:
            exchange = (queue.exchange_name, queue.exchange_type, queue.binding_key)
        await self.db().run(partial(
            sqlite_queue.declare, queue.name, _json(args, "queue arguments"), max_priority,
            dead_letter, exchange,
        ))

    async def declare_exchange(self, name: str, type: str, *, durable: bool = True) -> None:
        """Declare an exchange (every one is durable in the file); the first one wins."""
        await self.db().run(partial(sqlite_queue.declare_exchange, name, type))

    async def publish(
        self, envelope: Envelope, *, routing_key: str, exchange: str = "",
        proof: asyncio.Future[None] | None = None,
    ) -> None:
        # Taken at once (no confirm to wait for): ``proof`` is not needed.
        await self._send(envelope, routing_key, exchange, 0.0)

    async def publish_delayed(self, envelope: Envelope, *, queue: str, delay: float) -> bool:
        """A row no consumer may claim for ``delay`` seconds (``not_before``). As on RabbitMQ,
        it carries no per-message TTL meanwhile (the worker checks ``expires``)."""
        await self._send(replace(envelope, expiration=None), queue, "", delay)
        return True

    async def _send(
        self, envelope: Envelope, routing_key: str, exchange: str, delay: float
    ) -> None:
        message = (
            bytes(envelope.body),
            _json(envelope.headers, "headers"),
            _json({
                "content_type": envelope.content_type,
                "content_encoding": envelope.content_encoding,
                "correlation_id": envelope.correlation_id,
                "reply_to": envelope.reply_to,
                "priority": envelope.priority,
                "delivery_mode": envelope.delivery_mode,
                "expiration": envelope.expiration,
            }, "properties"),
        )
        ttl = None
        if envelope.expiration is not None:
            try:
                ttl = int(envelope.expiration) / 1000
            except ValueError:
                raise BrokerError(f"expiration must be milliseconds, got {envelope.expiration!r}"
                                  ) from None
        db = self.db()
        await db.run(partial(
            sqlite_queue.publish, message, envelope.priority, ttl, exchange, routing_key,
            delay=delay,
        ))
        notify(db.path)

    def consume(self, queues: Sequence[str], *, prefetch: int, no_ack: bool = False) -> Consumer:
        return _SqliteConsumer(self, queues, prefetch, no_ack)
