"""The SQLite broker's queue: its schema and the SQL operations on it.

Routing, priorities, expiry, dead-lettering, delivery limits, claims (leases) and settlement
are decided here, each operation one transaction. Every function takes the broker's
``sqlite3.Connection`` last (the broker binds the rest with ``functools.partial``) and runs on
the broker's connection thread, never on the event loop. It is apart from
:mod:`aioqueue.brokers.sqlite`, the async side (broker, consumer, delivery) whose docstring
describes the behaviour, so that each module has one job: this one is synchronous SQL only.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from typing import NamedTuple

import orjson

from ..exceptions import BrokerError
from ..sqlite_db import immediate

__all__ = (
    "SCHEMA",
    "Row",
    "claim",
    "declare",
    "declare_exchange",
    "missing_queues",
    "publish",
    "release",
    "settle",
)

# The broker's logger: its records keep the name they had before this module was split off.
logger = logging.getLogger("aioqueue.brokers.sqlite")

SCHEMA = (
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


class Row(NamedTuple):
    """A claimed message, as ``claim`` returns it."""

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


def publish(
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


def claim(
    queues: Sequence[str],
    limit: int,
    tag: str,
    visibility: float,
    no_ack: bool,
    conn: sqlite3.Connection,
) -> list[Row]:
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
            claimed = [Row(*r) for r in rows]  # claim - 1: times given back before
            over = _over_delivery_limit(conn, [(r.id, r.queue, r.claim - 1) for r in claimed], now)
            rows = [r for r in claimed if r.id not in over]
    # RETURNING has no defined order.
    return sorted((Row(*r) for r in rows), key=lambda r: (-r.priority, r.id))


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


def release(
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


def settle(message_id: int, count: int, dead_letter: bool, conn: sqlite3.Connection) -> bool:
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


def declare(
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


def declare_exchange(name: str, kind: str, conn: sqlite3.Connection) -> None:
    with immediate(conn):
        conn.execute("INSERT OR IGNORE INTO aioqueue_exchanges VALUES (?, ?)", (name, kind))


def missing_queues(names: Sequence[str], conn: sqlite3.Connection) -> list[str]:
    marks = ",".join("?" * len(names))
    found = {
        n for (n,) in conn.execute(
            f"SELECT name FROM aioqueue_queues WHERE name IN ({marks})", tuple(names)
        ).fetchall()
    }
    return [n for n in names if n not in found]
