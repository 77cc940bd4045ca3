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

The connection thread, URL parsing and in-process wake-ups live in :mod:`aioqueue.sqlite_db`,
shared with :mod:`aioqueue.results.sqlite`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from ..exceptions import BrokerConnectionError, BrokerError, SerializationError
from ..protocol import Envelope
from ..sqlite_db import (
    MIN_POLL_INTERVAL,
    SqliteThread,
    database_path,
    immediate,
    notify,
    open_database,
    polling_options,
    unwatch,
    watch,
)
from .base import Broker, Consumer, Delivery

if TYPE_CHECKING:
    from ..config import Queue, Settings

__all__ = ("SqliteBroker",)

logger = logging.getLogger(__name__)

#: Messages claimed per transaction at most (within the free prefetch slots).
_CLAIM_BATCH = 100

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS aioqueue_messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: (id, delivery_count) is a claim
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,   -- effective: clamped to the queue's max priority
        body BLOB NOT NULL,
        headers BLOB NOT NULL,                 -- JSON
        properties BLOB NOT NULL,              -- JSON: the Envelope's other fields
        routing_key TEXT NOT NULL,
        exchange TEXT NOT NULL,
        created REAL NOT NULL,
        not_before REAL NOT NULL DEFAULT 0,    -- for delayed delivery (publish writes 0)
        expires_at REAL,                       -- from the per-message expiration
        delivered_at REAL,
        lease_until REAL,                      -- NULL or past: visible (past: abandoned)
        delivery_count INTEGER NOT NULL DEFAULT 0,
        redelivered INTEGER NOT NULL DEFAULT 0,
        consumer_tag TEXT                      -- who holds the lease (host:pid:id), for inspection
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS aioqueue_messages_order
        ON aioqueue_messages (queue, priority DESC, id)
    """,
    """
    CREATE INDEX IF NOT EXISTS aioqueue_messages_expiry
        ON aioqueue_messages (queue, expires_at) WHERE expires_at IS NOT NULL
    """,
    """
    CREATE TABLE IF NOT EXISTS aioqueue_queues (
        name TEXT PRIMARY KEY,
        arguments BLOB NOT NULL,               -- JSON, as declared
        max_priority INTEGER,
        dead_letter_exchange TEXT,
        dead_letter_routing_key TEXT
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS aioqueue_exchanges (name TEXT PRIMARY KEY, type TEXT NOT NULL)
    """,
    """
    CREATE TABLE IF NOT EXISTS aioqueue_bindings (
        exchange TEXT NOT NULL,
        binding_key TEXT NOT NULL,
        queue TEXT NOT NULL,
        PRIMARY KEY (exchange, binding_key, queue)
    )
    """,
)


# -- broker operations: they run in the broker's thread -------------------------------------


class _Row(NamedTuple):
    id: int
    priority: int
    claim: int  # delivery_count after this claim
    queue: str
    body: bytes
    headers: bytes
    properties: bytes
    routing_key: str
    redelivered: int


_COLUMNS = ("id, priority, delivery_count, queue, body, headers, properties, routing_key, "
            "redelivered")


def _topic_matches(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":  # zero or more words
        return any(_topic_matches(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _topic_matches(rest, words[1:])


def _matches(kind: str, binding: str, routing_key: str) -> bool:
    if kind == "fanout":
        return True
    if kind == "topic":
        return _topic_matches(binding.split("."), routing_key.split("."))
    return binding == routing_key


def _route(conn: sqlite3.Connection, exchange: str, key: str) -> list[tuple[str, int | None]]:
    """(queue, max priority) of every queue a message to ``exchange`` with ``key`` reaches."""
    if exchange == "":
        return conn.execute(
            "SELECT name, max_priority FROM aioqueue_queues WHERE name = ?", (key,)
        ).fetchall()
    kind = conn.execute("SELECT type FROM aioqueue_exchanges WHERE name = ?", (exchange,))
    found = kind.fetchall()
    if not found:
        raise BrokerError(f"no exchange {exchange!r} (NOT_FOUND)")
    targets: dict[str, int | None] = {}
    for binding, queue, max_priority in conn.execute(
        "SELECT b.binding_key, q.name, q.max_priority FROM aioqueue_bindings b "
        "JOIN aioqueue_queues q ON q.name = b.queue WHERE b.exchange = ?",
        (exchange,),
    ).fetchall():
        if _matches(found[0][0], binding, key):
            targets.setdefault(queue, max_priority)
    return list(targets.items())


def _insert(
    conn: sqlite3.Connection,
    targets: list[tuple[str, int | None]],
    message: tuple[bytes, bytes, bytes],
    priority: int | None,
    routing_key: str,
    exchange: str,
    now: float,
    expires_at: float | None,
    not_before: float = 0.0,
) -> None:
    body, headers, properties = message
    for queue, max_priority in targets:
        # As RabbitMQ: priorities count only on a queue with a maximum, clamped to it.
        effective = 0 if max_priority is None else max(0, min(priority or 0, max_priority))
        conn.execute(
            "INSERT INTO aioqueue_messages (queue, priority, body, headers, properties, "
            "routing_key, exchange, created, expires_at, not_before) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (queue, effective, body, headers, properties, routing_key, exchange, now, expires_at,
             not_before),
        )


def _publish(
    message: tuple[bytes, bytes, bytes],
    priority: int | None,
    ttl: float | None,
    exchange: str,
    routing_key: str,
    conn: sqlite3.Connection,
    *,
    delay: float = 0.0,
) -> None:
    now = time.time()
    with immediate(conn):
        targets = _route(conn, exchange, routing_key)
        expires_at = None if ttl is None else now + ttl
        not_before = now + delay if delay > 0 else 0.0
        _insert(conn, targets, message, priority, routing_key, exchange, now, expires_at,
                not_before)


def _dead_letter(conn: sqlite3.Connection, message_id: int, now: float) -> None:
    """Drop a message, first copying it to its queue's dead-letter exchange if it has one."""
    row = conn.execute(
        "SELECT m.body, m.headers, m.properties, m.routing_key, q.dead_letter_exchange, "
        "q.dead_letter_routing_key FROM aioqueue_messages m "
        "LEFT JOIN aioqueue_queues q ON q.name = m.queue WHERE m.id = ?",
        (message_id,),
    ).fetchall()
    conn.execute("DELETE FROM aioqueue_messages WHERE id = ?", (message_id,))
    if not row or row[0][4] is None:
        return
    body, headers, properties, routing_key, exchange, dl_key = row[0]
    key = dl_key or routing_key
    try:
        targets = _route(conn, exchange, key)
    except BrokerError:
        logger.warning("dead-letter exchange %r does not exist; message dropped", exchange)
        return
    priority = orjson.loads(properties).get("priority")
    # The copy does not expire: RabbitMQ strips the per-message TTL when dead-lettering.
    _insert(conn, targets, (body, headers, properties), priority, key, exchange, now, None)


def _expire(conn: sqlite3.Connection, marks: str, queues: Sequence[str], now: float) -> None:
    for (message_id,) in conn.execute(
        f"SELECT id FROM aioqueue_messages WHERE queue IN ({marks}) AND expires_at <= ? "
        "AND (lease_until IS NULL OR lease_until <= ?)",
        (*queues, now, now),
    ).fetchall():
        _dead_letter(conn, message_id, now)


def _claim(
    queues: Sequence[str],
    limit: int,
    tag: str,
    visibility: float,
    no_ack: bool,
    conn: sqlite3.Connection,
) -> list[_Row]:
    now = time.time()
    marks = ",".join("?" * len(queues))
    visible = (
        f"queue IN ({marks}) AND (lease_until IS NULL OR lease_until <= ?) AND not_before <= ?"
    )
    # A read first: an idle poll never takes the write lock other processes need.
    if not conn.execute(
        f"SELECT 1 FROM aioqueue_messages WHERE {visible} LIMIT 1", (*queues, now, now)
    ).fetchall():
        return []
    pick = (
        f"SELECT id FROM aioqueue_messages WHERE {visible} "
        "AND (expires_at IS NULL OR expires_at > ?) ORDER BY priority DESC, id LIMIT ?"
    )
    with immediate(conn):
        _expire(conn, marks, queues, now)
        if no_ack:
            rows = conn.execute(
                f"DELETE FROM aioqueue_messages WHERE id IN ({pick}) RETURNING {_COLUMNS}",
                (*queues, now, now, now, limit),
            ).fetchall()
        else:
            # SET expressions see the old row: a lease still set here was abandoned.
            rows = conn.execute(
                "UPDATE aioqueue_messages SET lease_until = ?, delivered_at = ?, "
                "delivery_count = delivery_count + 1, consumer_tag = ?, "
                "redelivered = (redelivered OR lease_until IS NOT NULL) "
                f"WHERE id IN ({pick}) RETURNING {_COLUMNS}",
                (now + visibility, now, tag, *queues, now, now, now, limit),
            ).fetchall()
            claimed = [_Row(*r) for r in rows]  # claim - 1: times given back before
            over = _over_delivery_limit(conn, [(r.id, r.queue, r.claim - 1) for r in claimed], now)
            rows = [r for r in claimed if r.id not in over]
    # RETURNING has no defined order.
    return sorted((_Row(*r) for r in rows), key=lambda r: (-r.priority, r.id))


def _over_delivery_limit(
    conn: sqlite3.Connection, messages: Sequence[tuple[int, str, int]], now: float
) -> set[int]:
    """Dead-letter (or drop) those of ``messages`` (id, queue, times given back) given back
    more often than their quorum queue's ``x-delivery-limit``, as RabbitMQ does; their ids.

    A requeue or release is seen at once; a lease that ran out (a killed consumer) only at
    the message's next claim, which changes when it is dead-lettered, not whether.
    """
    again = [m for m in messages if m[2] > 1]  # a limit is at least 1
    if not again:
        return set()
    names = sorted({queue for _, queue, _ in again})
    limits: dict[str, int] = {}
    for name, raw in conn.execute(
        f"SELECT name, arguments FROM aioqueue_queues WHERE name IN ({','.join('?' * len(names))})",
        names,
    ).fetchall():
        arguments = orjson.loads(raw)
        if arguments.get("x-queue-type") == "quorum" and arguments.get("x-delivery-limit"):
            limits[name] = int(arguments["x-delivery-limit"])
    over = {mid for mid, queue, returns in again if queue in limits and returns > limits[queue]}
    for message_id in over:
        _dead_letter(conn, message_id, now)
    return over


def _release(
    claims: Sequence[tuple[int, int]], redelivered: bool, conn: sqlite3.Connection
) -> None:
    with immediate(conn):
        # Each claim given back counts, as on RabbitMQ (delivery_count: all given back now).
        owned = [
            (message_id, row[0], count) for message_id, count in claims if count > 1
            for row in conn.execute(
                "SELECT queue FROM aioqueue_messages WHERE id = ? AND delivery_count = ?",
                (message_id, count),
            ).fetchall()
        ]
        _over_delivery_limit(conn, owned, time.time())
        conn.executemany(
            "UPDATE aioqueue_messages SET lease_until = NULL, consumer_tag = NULL, "
            "redelivered = (redelivered OR ?) WHERE id = ? AND delivery_count = ?",
            [(redelivered, message_id, count) for message_id, count in claims],
        )


def _settle(message_id: int, count: int, dead_letter: bool, conn: sqlite3.Connection) -> bool:
    """Ack (delete) or reject without requeue (dead-letter); False if the claim was lost."""
    with immediate(conn):
        if dead_letter:
            owned = conn.execute(
                "SELECT 1 FROM aioqueue_messages WHERE id = ? AND delivery_count = ?",
                (message_id, count),
            ).fetchall()
            if owned:
                _dead_letter(conn, message_id, time.time())
            return bool(owned)
        cursor = conn.execute(
            "DELETE FROM aioqueue_messages WHERE id = ? AND delivery_count = ?",
            (message_id, count),
        )
        return cursor.rowcount > 0


def _declare(
    name: str,
    arguments: bytes,
    max_priority: int | None,
    dead_letter: tuple[str | None, str | None],
    exchange: tuple[str, str, str] | None,
    conn: sqlite3.Connection,
) -> None:
    with immediate(conn):
        # As the memory broker: the first declaration of a queue wins.
        conn.execute(
            "INSERT OR IGNORE INTO aioqueue_queues VALUES (?, ?, ?, ?, ?)",
            (name, arguments, max_priority, *dead_letter),
        )
        if exchange is not None:
            exchange_name, kind, key = exchange
            conn.execute("INSERT OR IGNORE INTO aioqueue_exchanges VALUES (?, ?)",
                         (exchange_name, kind))
            conn.execute("INSERT OR IGNORE INTO aioqueue_bindings VALUES (?, ?, ?)",
                         (exchange_name, key, name))


def _declare_exchange(name: str, kind: str, conn: sqlite3.Connection) -> None:
    with immediate(conn):
        conn.execute("INSERT OR IGNORE INTO aioqueue_exchanges VALUES (?, ?)", (name, kind))


def _missing_queues(names: Sequence[str], conn: sqlite3.Connection) -> list[str]:
    marks = ",".join("?" * len(names))
    found = {
        n for (n,) in conn.execute(
            f"SELECT name FROM aioqueue_queues WHERE name IN ({marks})", tuple(names)
        ).fetchall()
    }
    return [n for n in names if n not in found]


# -- the async side --------------------------------------------------------------------------


def _json(value: Any, what: str) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as exc:
        raise SerializationError(f"message {what} cannot be stored as JSON: {exc}") from exc


class _SqliteDelivery(Delivery):
    __slots__ = ("_consumer", "_count", "_id", "_settled")

    def __init__(self, row: _Row, consumer: _SqliteConsumer) -> None:
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
        self._buffer: deque[_Row] = deque()  # claimed, not yet handed out
        self._claims: set[asyncio.Future[list[_Row]]] = set()
        self._wake = asyncio.Event()
        self._waker: Callable[[], None] | None = None
        self._running = False

    async def start(self) -> None:
        db = self.broker.db()
        missing = await db.run(partial(_missing_queues, self.queue_names))
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
        if not await db.run(partial(_settle, message_id, count, dead_letter)):
            logger.warning(
                "message %d on %s: lease expired and it was delivered again; %s ignored",
                message_id, db.path, "reject" if dead_letter else "ack",
            )
        elif dead_letter:
            notify(db.path)

    def _adopt(self, claim: asyncio.Future[list[_Row]]) -> None:
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
                _claim, self.queue_names, free, self.tag, broker.visibility_timeout, self.no_ack
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
                self.path, _SCHEMA, name="aioqueue-sqlite-broker",
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
        await db.run(partial(_release, list(claims), redelivered))
        notify(db.path)

    async def declare(self, queue: Queue) -> None:
        args = dict(queue.queue_arguments)
        max_priority = args.get("x-max-priority", self.settings.task_queue_max_priority)
        dead_letter = (args.get("x-dead-letter-exchange"), args.get("x-dead-letter-routing-key"))
        exchange = None
        if queue.exchange_name:
            exchange = (queue.exchange_name, queue.exchange_type, queue.binding_key)
        await self.db().run(partial(
            _declare, queue.name, _json(args, "queue arguments"), max_priority, dead_letter,
            exchange,
        ))

    async def declare_exchange(self, name: str, type: str, *, durable: bool = True) -> None:
        """Declare an exchange (every one is durable in the file); the first one wins."""
        await self.db().run(partial(_declare_exchange, name, type))

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
            _publish, message, envelope.priority, ttl, exchange, routing_key, delay=delay
        ))
        notify(db.path)

    def consume(self, queues: Sequence[str], *, prefetch: int, no_ack: bool = False) -> Consumer:
        return _SqliteConsumer(self, queues, prefetch, no_ack)
