"""Waiting for Redis results: one pub/sub connection and one listener task per store.

Waiting never polls. Each wait registers a future under its channel (the record's key); the
listener subscribes (batched: up to ``BATCH`` channels per command) and reads the key once
the subscription is in effect, so a record written before it took effect is not missed. On
our own RESP3 connection (redis-py's default protocol) the read is an MGET sent on the
pub/sub connection right behind the SUBSCRIBE: Redis runs a connection's commands in order,
so it reads after subscribing, and no other connection or round trip is involved. On RESP2
(and on redis-py's ``PubSub``), where a subscribed connection takes no other command, the
listener waits for Redis to *confirm* the subscription and then reads the key on a pooled
connection. From then on every message on the channel goes to all waiters of that id;
non-ready states (STARTED, RETRY) are skipped. When the connection drops, the listener
reconnects (``retry_policy``), subscribes again to every channel still wanted and reads each
key again; if it cannot reconnect, every waiter gets ``ResultStoreError`` instead of hanging.

Subscribing when the task is sent (``expect``), as stock Celery's Redis backend does: a
client whose listener runs (it has waited before) subscribes to a task's channel while the
task is published, so by the time ``get()`` comes the subscription is confirmed, the key has
been read after the confirmation, and often the record has already arrived: no round trip is
left on the path. Ready records that arrive before anyone waits are kept for the ``get()``
that usually follows (at most ``KEPT`` records and ``KEPT_BYTES`` bytes, oldest dropped
first); a channel is unsubscribed as soon as its ready record arrives, so a client that never
calls ``get()`` holds a subscription only while its task runs. At most ``EXPECTED`` channels
are held for sends nobody waits on yet (the oldest are let go). Whatever is dropped only costs
speed: the wait then subscribes and reads the key itself.

Costs per wait are kept small because thousands run at once: the timeout is a timer that
fails the waiter's future (not a cancel scope), an UNSUBSCRIBE waits up to
``UNSUBSCRIBE_DELAY`` to share a write with other commands, and, on our own connection
(:mod:`aioqueue.results.redis_wire`), replies are parsed in bulk in the transport's read
callback, so a ready record reaches its waiters in the loop iteration its bytes arrive in.
Channels for new task ids are subscribed ahead, ``SPARES`` at a time (``take_spare``), so a
task sent with one has nothing left to subscribe.

The connection itself is a subscriber of :mod:`aioqueue.results.redis_subscriber`: our own
RESP connection (``settings.fast_paths``, the default), or redis-py's ``PubSub`` (its public
API only; keys are then always read on a pooled connection, as on RESP2). This module keeps
the bookkeeping, which is the same for both, and talks to the subscriber through
``take_commands`` (what to write), ``on_reply``/``on_values``/``on_message``/``on_subscribed``
(what came) and ``queue_ping`` (the health check).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from .. import states
from ..exceptions import ResultStoreError, SerializationError, reason
from ..protocol import new_task_id
from .base import resolve, timeout_error
from .redis_wire import WireError
from .resp import ReplyError

if TYPE_CHECKING:
    from .redis import RedisResultStore
    from .redis_subscriber import Subscriber

__all__ = ("MGET", "PING", "SUBSCRIBE", "UNSUBSCRIBE", "Listener", "raise_if_cancelled")

logger = logging.getLogger("aioqueue.results.redis")

# Channels per SUBSCRIBE/UNSUBSCRIBE command and keys per MGET: large enough that 10,000
# waits cost a handful of round trips, small enough that one command never stalls Redis.
BATCH = 1000
# Ready records kept for a get() that has not come yet, and their total size.
KEPT = 10_000
KEPT_BYTES = 32 * 1024 * 1024
# Channels subscribed for sent tasks nobody waits on yet.
EXPECTED = 20_000
# Channels subscribed ahead for new task ids (``take_spare``): refilled, one command for
# them all, when fewer than ``SPARES_LOW`` are left.
SPARES = 32
SPARES_LOW = 16
# Seconds an UNSUBSCRIBE may wait for other commands to share its write.
UNSUBSCRIBE_DELAY = 0.05

SUBSCRIBE = b"SUBSCRIBE"
UNSUBSCRIBE = b"UNSUBSCRIBE"
PING = b"PING"
MGET = b"MGET"  # on the pub/sub connection itself (our own RESP3 connection only)

Waiter = asyncio.Future[dict[str, Any]]


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library call swallowed.

    redis-py guards socket I/O with ``asyncio.wait_for``, which on Python 3.11 can return
    normally when the task is cancelled just as the I/O completes; a loop that owns a
    connection would then run on after ``close()`` cancelled it.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _expire(waiter: Waiter, task_id: str, timeout: float | None, listener: Listener) -> None:
    if not waiter.done():
        error = timeout_error(task_id, timeout)
        if listener.outage is not None:  # say why, when the store was out of reach
            error = type(error)(f"{error}; the result store was unreachable: {listener.outage}")
        waiter.set_exception(error)


class Listener:
    """Who waits for which key, and the task that listens for them (module docstring)."""

    def __init__(self, store: RedisResultStore) -> None:
        self._store = store
        self.task: asyncio.Task[None] | None = None
        #: Why the pub/sub connection is down, while it is (for the timeout's message).
        self.outage: str | None = None
        self._start_lock = asyncio.Lock()
        # Channel (= key, bytes) -> the future of the wait on it, or a list when several
        # wait (rare: one object less per wait, thousands of which may be pending).
        self.waiters: dict[bytes, Waiter | list[Waiter]] = {}
        # Channels subscribed for sent tasks nobody waits on yet, oldest first. A channel is
        # subscribed exactly while it is in ``waiters`` or here (never in both).
        self._expected: dict[bytes, None] = {}
        # The futures expect() returned, completed when the ready record arrives; only for
        # channels in ``_expected`` or ``waiters`` (dropped, unresolved, when they leave).
        self._arrivals: dict[bytes, asyncio.Future[None]] = {}
        # Channel -> task id: subscribed ahead for ids not handed out yet, oldest first.
        self._spares: dict[bytes, str] = {}
        # Records as Redis sent them, oldest first: bytes are no work for the cyclic GC,
        # decoded records (dicts, lists) would be, thousands at a time.
        self._kept: dict[bytes, bytes | str] = {}
        self._kept_bytes = 0
        # SUBSCRIBEs queued or sent on the current connection whose confirmation has not come
        # back yet, per channel: a channel counts as subscribed only when this reaches 0, so an
        # old confirmation cannot vouch for a newer SUBSCRIBE after an UNSUBSCRIBE.
        self._pending_subs: dict[bytes, int] = {}
        self._confirmed: set[bytes] = set()
        self._ops: list[tuple[bytes, bytes]] = []
        self._ops_ready = asyncio.Event()
        self._ops_timer: asyncio.TimerHandle | None = None
        self._ops_soon = False  # _wake_writer is scheduled
        self._to_fetch: set[bytes] = set()
        self._fetch_ready = asyncio.Event()
        # Our own RESP3 connection: keys are read on the pub/sub connection (module docstring).
        self._inline = False
        #: Which connection serves the waits: "own-wire" or "redis-py" (None before the first).
        self.path: str | None = None
        # The timers' callback reads no context variable: one empty context spares a copy of
        # the caller's per timer (call_later's default). Per store, so per event loop: a
        # context cannot be entered by two threads at once.
        self._timer_context = contextvars.Context()

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def start(self) -> None:
        """Start the listener task unless it runs; raises ``ResultStoreError`` if Redis is away."""
        if self.running:
            return
        async with self._start_lock:
            if self.running:
                return
            store = self._store
            await store.connect()
            # The first connection is made here so that an unreachable Redis fails the wait.
            subscriber = await store.open_subscriber()
            self.task = asyncio.create_task(
                self._supervise(subscriber),
                name=f"aioqueue redis results {store.pubsub_client_name}",
            )

    # -- waits -------------------------------------------------------------------------

    def take_kept(self, key: bytes) -> dict[str, Any] | None:
        """A ready record that arrived before anyone waited (and forget it), else None.

        Raises ``SerializationError`` for a record that cannot be decoded, as the wait would.
        """
        data = self._kept.pop(key, None)
        if data is None:
            return None
        self._kept_bytes -= len(data)
        return self._store.decode(data)

    def begin_wait(
        self, key: bytes, task_id: str, timeout: float | None
    ) -> tuple[Waiter, asyncio.TimerHandle | None]:
        """Register a wait on ``key``: the future to await, and its timer for ``end_wait``.

        The timeout is a timer that fails the future with the wait's ``TimeoutError``: a
        fraction of the cost of a cancel scope (``anyio.fail_after``), which mattered with
        thousands of waits. The caller awaits the future itself (one coroutine less per
        wait), so a cancellation reaches it as with any await.
        """
        loop = asyncio.get_running_loop()
        waiter: Waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(
            timeout, _expire, waiter, task_id, timeout, self, context=self._timer_context
        )
        self._add_waiter(key, waiter)
        return waiter, timer

    def end_wait(self, key: bytes, waiter: Waiter, timer: asyncio.TimerHandle | None) -> None:
        """Undo ``begin_wait`` however the wait ended."""
        if timer is not None:
            timer.cancel()
        self._remove_waiter(key, waiter)
        if waiter.done() and not waiter.cancelled():
            waiter.exception()  # mark retrieved even if a cancellation beat the result

    def _add_waiter(self, key: bytes, waiter: Waiter) -> None:
        current = self.waiters.get(key)
        if current is not None:
            if isinstance(current, list):
                current.append(waiter)
            else:
                self.waiters[key] = [current, waiter]
            # The others may have read the key before this wait began: read it again.
            if self._inline:
                self._queue_op(MGET, key)  # behind the SUBSCRIBE, wherever that is
            elif key in self._confirmed:
                self._schedule_fetch(key)
            return
        self.waiters[key] = waiter
        if key in self._expected:
            # Subscribed when the task was sent, and read after Redis confirmed that (or
            # about to be): the same footing a new subscription gives, one round trip ago.
            del self._expected[key]
        else:
            self._queue_op(SUBSCRIBE, key)  # its confirmation schedules the read of the key

    def _remove_waiter(self, key: bytes, waiter: Waiter) -> None:
        current = self.waiters.get(key)
        if current is waiter or (isinstance(current, list) and waiter in current):
            if isinstance(current, list) and len(current) > 1:
                current.remove(waiter)
            else:
                del self.waiters[key]
                self._arrivals.pop(key, None)
                self._queue_op(UNSUBSCRIBE, key)

    def expect(self, key: bytes) -> asyncio.Future[None] | None:
        """A task with this result key is being sent: subscribe now if the listener runs.

        Returns a future completed when the ready record arrives (see
        ``ResultStore.expect``), or None when not subscribing for the send.
        """
        if key in self._expected:  # an id from take_spare (or one sent twice at once)
            return self._arrivals.get(key)
        if not self.running or key in self.waiters:
            return None
        self._drop_kept(key)  # the same id sent again: an old record is stale
        # Written one loop iteration later: the task's publish, queued right after this
        # call, goes out first (the SUBSCRIBE has the whole run of the task to take effect,
        # and the MGET behind it covers a record that is faster).
        self._queue_op(SUBSCRIBE, key, soon=True)
        return self._hold(key)

    def take_spare(self) -> str | None:
        """A new task id whose channel is subscribed (confirmed by Redis), now held as for
        ``expect``, which returns its arrival future; None if none is ready.

        A task sent with it has nothing of its wait left to do while the message travels:
        no SUBSCRIBE to write, no reply to read. On two cores, that traffic during the
        flight slowed RabbitMQ's delivery to the worker by about 60 µs. Spares are
        subscribed ``SPARES`` at a time in one command (with the MGET that follows it on
        RESP3: one reply of nils), so even a burst that uses them up costs no more
        subscriptions than it would without. A fresh uuid4 has no record to read first.
        """
        if not self.running:
            return None
        spares = self._spares
        task_id = None
        if spares:
            key = next(iter(spares))
            if key in self._confirmed:  # the oldest is confirmed first
                task_id = spares.pop(key)
                self._hold(key)
        if len(spares) < SPARES_LOW and (not spares or next(iter(spares)) in self._confirmed):
            key_for = self._store.key_for
            while len(spares) < SPARES:
                new_id = new_task_id()
                key = key_for(new_id).encode()
                spares[key] = new_id
                self._queue_op(SUBSCRIBE, key, soon=True)
        return task_id

    def _hold(self, key: bytes) -> asyncio.Future[None]:
        """Hold ``key`` (subscribed) for a task being sent; the future of its arrival."""
        self._expected[key] = None
        arrival: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._arrivals[key] = arrival
        if len(self._expected) > EXPECTED:
            self.unexpect(next(iter(self._expected)))
        return arrival

    def unexpect(self, key: bytes) -> None:
        """Stop holding ``key`` for a send (failed, forgotten or too old)."""
        if key in self._expected:
            del self._expected[key]
            self._arrivals.pop(key, None)
            self._queue_op(UNSUBSCRIBE, key)

    def forget(self, key: bytes) -> None:
        """The record was deleted: neither hold a subscription for it nor keep a copy."""
        self.unexpect(key)
        self._drop_kept(key)

    def fail(self, error: ResultStoreError) -> None:
        """Fail every pending wait (closed, or the listener gave up); drop what is held."""
        waiting, self.waiters = self.waiters, {}  # a fresh dict: callers may be iterating
        self._expected.clear()
        self._spares.clear()
        self._arrivals.clear()
        self._kept.clear()
        self._kept_bytes = 0
        for current in waiting.values():
            resolve(current if isinstance(current, list) else (current,), None, error)
        if self._ops_timer is not None:
            self._ops_timer.cancel()
            self._ops_timer = None

    # -- bookkeeping -------------------------------------------------------------------

    def _wanted(self, key: bytes) -> bool:
        return key in self.waiters or key in self._expected

    def _queue_op(self, op: bytes, key: bytes, soon: bool = False) -> None:
        """Queue a command for the writer; ``soon``: wake it in the next loop iteration."""
        self._ops.append((op, key))
        if op == UNSUBSCRIBE:
            self._confirmed.discard(key)
            # Nothing waits on an UNSUBSCRIBE: let it share the next write (the next wait's
            # SUBSCRIBE, usually), unless enough are queued to fill a command.
            if len(self._ops) < BATCH:
                if self._ops_timer is None and not self._ops_ready.is_set():
                    self._ops_timer = asyncio.get_running_loop().call_later(
                        UNSUBSCRIBE_DELAY, self._ops_ready.set
                    )
                return
        elif op == SUBSCRIBE:
            self._pending_subs[key] = self._pending_subs.get(key, 0) + 1
        if not soon:
            self._ops_ready.set()
        elif not self._ops_soon and not self._ops_ready.is_set():
            self._ops_soon = True
            asyncio.get_running_loop().call_soon(self._wake_writer, context=self._timer_context)

    def _wake_writer(self) -> None:
        self._ops_soon = False
        self._ops_ready.set()

    def _schedule_fetch(self, key: bytes) -> None:
        self._to_fetch.add(key)
        self._fetch_ready.set()

    def _settle(
        self, key: bytes, meta: dict[str, Any] | None, error: SerializationError | None,
        data: bytes | str,
    ) -> None:
        """Hand a ready record (or a decoding error) to every wait on ``key``, or keep it."""
        arrival = self._arrivals.pop(key, None)
        if arrival is not None and not arrival.done():
            arrival.set_result(None)
        current = self.waiters.pop(key, None)
        if current is not None:
            self._queue_op(UNSUBSCRIBE, key)
            resolve(current if isinstance(current, list) else (current,), meta, error)
        elif key in self._expected:
            del self._expected[key]
            self._queue_op(UNSUBSCRIBE, key)
            self._keep(key, data)

    def _keep(self, key: bytes, data: bytes | str) -> None:
        self._drop_kept(key)
        self._kept[key] = data
        self._kept_bytes += len(data)
        while self._kept and (len(self._kept) > KEPT or self._kept_bytes > KEPT_BYTES):
            self._drop_kept(next(iter(self._kept)))

    def _drop_kept(self, key: bytes) -> None:
        data = self._kept.pop(key, None)
        if data is not None:
            self._kept_bytes -= len(data)

    # -- what the subscriber calls -------------------------------------------------------

    @property
    def inline(self) -> bool:
        """Keys are read by MGETs behind the SUBSCRIBEs, on the pub/sub connection itself."""
        return self._inline

    @property
    def ops_ready(self) -> asyncio.Event:
        """Set when ``take_commands`` has something to write."""
        return self._ops_ready

    def queue_ping(self) -> None:
        """Ask for a PING (the health check); written with the next commands."""
        self._ops.append((PING, b""))
        self._ops_ready.set()

    def take_commands(self) -> list[tuple[bytes, ...]]:
        """The commands queued since the last call, merged and cut into batches.

        Consecutive runs of the same command merge into one (the order between SUBSCRIBE and
        UNSUBSCRIBE of a channel must be kept, so only neighbours merge); when ``inline``, an
        MGET of the same keys follows each SUBSCRIBE."""
        self._ops_ready.clear()
        if self._ops_timer is not None:
            self._ops_timer.cancel()
            self._ops_timer = None
        ops, self._ops = self._ops, []
        commands: list[tuple[bytes, ...]] = []
        for op, run in itertools.groupby(ops, key=lambda item: item[0]):
            if op == PING:
                commands.append((PING,))
                continue
            channels = [key for _, key in run]
            for start in range(0, len(channels), BATCH):
                part = channels[start:start + BATCH]
                if op != MGET:
                    commands.append((op, *part))
                if op == MGET or (op == SUBSCRIBE and self._inline):
                    commands.append((MGET, *part))  # runs once the SUBSCRIBE is in effect
        return commands

    def on_message(self, key: bytes, data: bytes | str) -> None:
        """A message on a channel: a record, ready or not."""
        if key not in self.waiters and key not in self._expected:
            return
        try:
            meta = self._store.decode(data)
        except SerializationError as exc:
            self._settle(key, None, exc, data)  # get() would raise the same
            return
        if meta.get("status") in states.READY_STATES:
            self._settle(key, meta, None, data)

    def on_subscribed(self, key: bytes) -> None:
        """Redis confirmed a SUBSCRIBE of ``key``."""
        left = self._pending_subs.get(key, 0) - 1
        if left > 0:
            self._pending_subs[key] = left
            return
        self._pending_subs.pop(key, None)
        if self._wanted(key):
            self._confirmed.add(key)
            if not self._inline:  # else an MGET followed the SUBSCRIBE already
                self._schedule_fetch(key)
        elif key in self._spares:
            self._confirmed.add(key)

    def on_values(self, keys: Sequence[bytes], reply: Any) -> None:
        """The reply to an MGET of ``keys`` on the pub/sub connection."""
        if isinstance(reply, ReplyError):
            raise WireError(f"MGET on the pub/sub connection failed: {reply}")
        if isinstance(reply, list):
            for key, value in zip(keys, reply, strict=False):
                if value is not None:
                    self.on_message(key, value)

    def on_reply(self, reply: Any) -> None:
        """A pushed reply (RESP3), or any reply of a subscribed RESP2 connection."""
        if isinstance(reply, ReplyError):
            raise WireError(f"error on the pub/sub connection: {reply}")
        if not isinstance(reply, list) or len(reply) < 2:
            return  # a PONG outside subscribed mode
        kind = reply[0]
        if kind == b"message" and len(reply) > 2:
            self.on_message(reply[1], reply[2])
        elif kind == b"subscribe":
            self.on_subscribed(reply[1])
        # unsubscribe confirmations and PONGs need nothing

    # -- the listener task -------------------------------------------------------------

    async def _supervise(self, subscriber: Subscriber) -> None:
        """Serve one connection at a time until cancelled; reconnect when one drops."""
        try:
            while True:
                try:
                    await self._serve(subscriber)
                except* (RedisError, OSError) as group:
                    self.outage = f"pub/sub connection lost ({reason(group.exceptions[0])})"
                    logger.warning("redis result store: pub/sub connection lost (%s); reconnecting",
                                   group.exceptions[0])
                finally:
                    await subscriber.close()
                subscriber = await self._reconnect()
        except ResultStoreError as exc:
            logger.error("%s", exc)
            self.fail(exc)
        except Exception:  # a bug: log it here, nobody awaits this task until close()
            logger.exception("redis result store: the pub/sub listener failed")
        finally:
            self.fail(ResultStoreError("the result store listener stopped"))

    async def _reconnect(self) -> Subscriber:
        policy = self._store.retry_policy
        max_retries = policy["max_retries"]
        interval = float(policy["interval_start"])
        attempts = itertools.count(1) if max_retries is None else range(1, int(max_retries) + 1)
        error: ResultStoreError | None = None
        for attempt in attempts:
            await asyncio.sleep(interval)  # backoff between attempts, as Celery's retry_policy
            try:
                return await self._store.open_subscriber()
            except ResultStoreError as exc:
                error = exc
                self.outage = reason(exc)
                logger.warning("redis result store: reconnect attempt %d failed: %s", attempt, exc)
            interval = min(interval + float(policy["interval_step"]), float(policy["interval_max"]))
        raise ResultStoreError(
            f"redis result store: gave up reconnecting the pub/sub connection: {error}"
        )

    async def _serve(self, subscriber: Subscriber) -> None:
        # A new connection has no subscriptions: start the bookkeeping afresh and subscribe to
        # every channel still wanted. Each confirmation triggers a read of the key, which
        # recovers records published while no connection was listening.
        self._ops.clear()
        if self._ops_timer is not None:
            self._ops_timer.cancel()
            self._ops_timer = None
        self._pending_subs.clear()
        self._confirmed.clear()
        self._to_fetch.clear()
        self._spares.clear()  # new ones are subscribed when asked for
        self._inline = subscriber.inline
        self.path = subscriber.path
        self.outage = None
        for key in itertools.chain(self.waiters, self._expected):
            self._queue_op(SUBSCRIBE, key)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(subscriber.serve(self))
            tasks.create_task(self._fetch())

    async def _fetch(self) -> None:
        while True:
            await self._fetch_ready.wait()
            self._fetch_ready.clear()
            while self._to_fetch:
                count = min(BATCH, len(self._to_fetch))
                popped = (self._to_fetch.pop() for _ in range(count))
                batch = [key for key in popped if self._wanted(key)]
                if not batch:
                    continue
                values = await self._store.read_keys(batch)
                raise_if_cancelled()
                for key, value in zip(batch, values, strict=True):
                    if value is not None:
                        self.on_message(key, value)
