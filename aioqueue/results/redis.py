"""Celery's Redis result backend (``redis://``, ``rediss://``), on ``redis.asyncio``.

Wire format (reference/celery-protocol.md §4): each record is the string key
``[<global_keyprefix>]celery-task-meta-<task_id>`` holding the serialized meta, written with its
TTL (``result_expires``) and published on the pub/sub channel named like the key, in one atomic
step, so stock Celery clients waiting on that channel wake up, and stock workers' records wake
ours. Stock Celery does SET+PUBLISH in a MULTI/EXEC after a GET that refuses to overwrite a
SUCCESS; here one small Lua script does all three in one round trip (measured: not slower
than the MULTI/EXEC alone), so the guard also holds against concurrent writers.

Waiting never polls. A store owns one pub/sub connection and one listener task (started by
the first ``wait()``, cancelled and awaited by ``close()``). Each wait registers a future under
its channel; the listener subscribes (batched: up to ``_BATCH`` channels per command), and
once Redis *confirms* a subscription it reads the key (batched into MGETs), so a record
written before the subscription took effect is not missed. From then on every message on the
channel is routed to all waiters of that id; non-ready states (STARTED, RETRY) are skipped. The
channel is unsubscribed when its last waiter leaves. When the connection drops, the listener
reconnects (``retry_policy`` from ``result_backend_transport_options``, with Celery's
defaults), resubscribes every channel still waited on and reads each key again; if it cannot
reconnect, every waiter gets ``ResultStoreError`` instead of hanging.

Redis exceptions never reach callers: they are turned into ``ResultStoreError`` here (and a
URL with options redis-py rejects into ``ConfigurationError``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .. import states
from ..exceptions import ConfigurationError, ResultStoreError, SerializationError
from ..registry import mask_password
from .base import ResultStore, cancel_and_wait, fail_all, raise_timeout, resolve

if TYPE_CHECKING:
    from ..brokers.base import Broker
    from ..config import Settings

__all__ = ("RedisResultStore",)

logger = logging.getLogger(__name__)

TASK_KEYPREFIX = "celery-task-meta-"

# Channels per SUBSCRIBE/UNSUBSCRIBE command and keys per MGET: large enough that 10,000
# waits cost a handful of round trips, small enough that one command never stalls Redis.
_BATCH = 1000
# Seconds of silence on the pub/sub connection before the listener sends a PING; no answer
# within as long again means the connection is dead (a half-open TCP connection never errors).
_HEALTH_INTERVAL = 30.0
# Seconds to connect and finish the handshake; a frozen server must not hang a reconnect.
_CONNECT_TIMEOUT = 10.0
# Celery's default ``redis_socket_timeout``: no command waits for an answer longer than this.
_SOCKET_TIMEOUT = 120.0
# Connections for commands (not pub/sub). Bounded so that thousands of concurrent calls queue
# for a connection instead of opening thousands of sockets. ``?max_connections=`` in the URL wins.
_MAX_CONNECTIONS = 100
# Celery's redis backend default: retry at once, then every second, 20 times (~20 s).
_DEFAULT_RETRY_POLICY: dict[str, Any] = {
    "max_retries": 20,
    "interval_start": 0.0,
    "interval_step": 1.0,
    "interval_max": 1.0,
}
# Serializers whose records the store script can read to see whether SUCCESS is stored.
_SCRIPT_READABLE = frozenset({"json", "msgpack"})

# Writes a record unless the key already holds SUCCESS (Celery never overwrites a SUCCESS),
# then publishes it on the key's channel; atomic, and one round trip like a MULTI/EXEC.
# KEYS[1] = key (= channel); ARGV[1] = record; ARGV[2] = TTL in seconds, 0 for none.
# Returns 1 when written and published, 0 when skipped.
_STORE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if not ok or type(meta) ~= 'table' then
    ok, meta = pcall(cmsgpack.unpack, current)
  end
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""

_SUBSCRIBE = b"SUBSCRIBE"
_UNSUBSCRIBE = b"UNSUBSCRIBE"
_PING = b"PING"

_Waiter = asyncio.Future[dict[str, Any]]


def key_prefix(global_keyprefix: str | None) -> str:
    """Celery's task key prefix, behind ``global_keyprefix`` + ``_`` unless it ends in ``:_-.``."""
    prefix = global_keyprefix or ""
    if prefix and prefix[-1] not in ":_-.":
        prefix += "_"
    return prefix + TASK_KEYPREFIX


@contextmanager
def _translate(action: str) -> Iterator[None]:
    """Redis and socket errors leave this module as ``ResultStoreError``."""
    try:
        yield
    except (RedisError, OSError) as exc:
        detail = str(exc) or type(exc).__name__
        raise ResultStoreError(f"redis result store: {action} failed: {detail}") from exc


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library call swallowed.

    redis-py guards socket I/O with ``asyncio.wait_for``, which on Python 3.11 can return
    normally when the task is cancelled just as the I/O completes; a loop that owns a
    connection would then run on after ``close()`` cancelled it.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class RedisResultStore(ResultStore):
    """Results in Redis, readable and writable by stock Celery; ``wait()`` uses pub/sub."""

    def __init__(self, url: str, settings: Settings, broker: Broker | None = None) -> None:
        super().__init__(url, settings, broker)
        options = settings.result_backend_transport_options
        self.key_prefix = key_prefix(options.get("global_keyprefix"))
        self.retry_policy = {**_DEFAULT_RETRY_POLICY, **(options.get("retry_policy") or {})}
        self.ttl = int(self.expires) if self.expires else 0
        self.health_check_interval = _HEALTH_INTERVAL
        self.connect_timeout = _CONNECT_TIMEOUT
        #: The pub/sub connection's CLIENT SETNAME, to find it in CLIENT LIST.
        self.pubsub_client_name = f"aioqueue-results-{uuid.uuid4().hex[:12]}"
        self._client: Redis | None = None
        self._store_script: AsyncScript | None = None
        self._connect_lock = asyncio.Lock()
        self._listener_lock = asyncio.Lock()
        self._listener: asyncio.Task[None] | None = None
        # Channel (= key, bytes) -> futures of the waits on it. A channel is subscribed
        # exactly while it has waiters.
        self._waiters: dict[bytes, set[_Waiter]] = {}
        # SUBSCRIBEs queued or sent on the current connection whose confirmation has not come
        # back yet, per channel: a channel counts as subscribed only when this reaches 0, so an
        # old confirmation cannot vouch for a newer SUBSCRIBE after an UNSUBSCRIBE.
        self._pending_subs: dict[bytes, int] = {}
        self._confirmed: set[bytes] = set()
        self._ops: list[tuple[bytes, bytes]] = []
        self._ops_ready = asyncio.Event()
        self._to_fetch: set[bytes] = set()
        self._fetch_ready = asyncio.Event()

    # -- connection ------------------------------------------------------------------------

    async def connect(self) -> None:
        await self._ensure_client()

    async def _ensure_client(self) -> Redis:
        if self._client is not None:
            return self._client
        async with self._connect_lock:
            if self._client is not None:
                return self._client
            try:
                # Options given in the URL's query string take precedence over these.
                pool = BlockingConnectionPool.from_url(
                    self.url,
                    max_connections=_MAX_CONNECTIONS,
                    socket_timeout=_SOCKET_TIMEOUT,
                    socket_connect_timeout=self.connect_timeout,
                    # A stale pooled socket (Redis restarted) is retried on a fresh one.
                    retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
                )
                pool.make_connection()  # type: ignore[no-untyped-call]  # no I/O; checks options
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(
                    f"invalid redis result backend URL {mask_password(self.url)!r}: {exc}"
                ) from exc
            with _translate("connect"):
                client = Redis.from_pool(pool)
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        await client.ping()
                except BaseException:
                    await client.aclose()
                    raise
            self._client = client
            self._store_script = client.register_script(_STORE_SCRIPT)
            return client

    async def close(self) -> None:
        """Wake pending waits with ``ResultStoreError``, stop the listener, disconnect."""
        self._fail_waiters(ResultStoreError("the result store was closed"))
        listener, self._listener = self._listener, None
        if listener is not None:
            await cancel_and_wait(listener, "redis result store: listener")
        client, self._client = self._client, None
        if client is not None:
            with suppress(RedisError, OSError):
                await client.aclose()

    # -- records ---------------------------------------------------------------------------

    def key_for(self, task_id: str) -> str:
        """The Redis key (and pub/sub channel) of a task's record."""
        return self.key_prefix + task_id

    async def store(
        self, task_id: str, meta: dict[str, Any], *, reply_to: str | None = None
    ) -> None:
        value = self.encode(meta)  # SerializationError here means nothing was written
        client = await self._ensure_client()
        key = self.key_for(task_id)
        with _translate("store"):
            if self.serializer in _SCRIPT_READABLE and self._store_script is not None:
                written = await self._store_script(keys=[key], args=[value, self.ttl])
            else:
                # The script cannot read other formats: check first, as stock Celery does
                # (a concurrent SUCCESS between the two round trips can be overwritten).
                written = not await self._holds_success(client, key)
                if written:
                    async with client.pipeline(transaction=True) as pipe:
                        pipe.set(key, value, ex=self.ttl or None)
                        pipe.publish(key, value)
                        await pipe.execute()
        if not written:
            logger.debug("result of task %s already SUCCESS; not overwritten", task_id,
                         extra={"task_id": task_id})

    async def _holds_success(self, client: Redis, key: str) -> bool:
        current = await client.get(key)
        if current is None:
            return False
        try:
            return self.decode(current).get("status") == states.SUCCESS
        except SerializationError:
            return False

    async def get(self, task_id: str) -> dict[str, Any] | None:
        client = await self._ensure_client()
        with _translate("get"):
            data = await client.get(self.key_for(task_id))
        return None if data is None else self.decode(data)

    async def forget(self, task_id: str) -> None:
        client = await self._ensure_client()
        with _translate("forget"):
            await client.delete(self.key_for(task_id))

    # -- waiting ---------------------------------------------------------------------------

    async def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        key = self.key_for(task_id).encode()
        waiter: _Waiter = asyncio.get_running_loop().create_future()
        with raise_timeout(task_id, timeout):
            await self._ensure_listener()
            self._add_waiter(key, waiter)
            try:
                return await waiter
            finally:
                self._remove_waiter(key, waiter)
                if waiter.done() and not waiter.cancelled():
                    waiter.exception()  # mark retrieved even if a timeout beat the result

    async def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.done():
            return
        async with self._listener_lock:
            if self._listener is not None and not self._listener.done():
                return
            await self._ensure_client()
            # The first connection is made here so that an unreachable Redis fails the wait.
            conn = await self._open_pubsub()
            self._listener = asyncio.create_task(
                self._supervise(conn), name=f"aioqueue redis results {self.pubsub_client_name}"
            )

    def _add_waiter(self, key: bytes, waiter: _Waiter) -> None:
        futures = self._waiters.get(key)
        if futures is None:
            self._waiters[key] = {waiter}
            self._queue_op(_SUBSCRIBE, key)  # its confirmation schedules the read of the key
        else:
            futures.add(waiter)
            if key in self._confirmed:
                # The others may have read the key before this wait began: read it again.
                self._schedule_fetch(key)

    def _remove_waiter(self, key: bytes, waiter: _Waiter) -> None:
        futures = self._waiters.get(key)
        if futures is not None and waiter in futures:
            futures.discard(waiter)
            if not futures:
                del self._waiters[key]
                self._queue_op(_UNSUBSCRIBE, key)

    def _queue_op(self, op: bytes, key: bytes) -> None:
        self._ops.append((op, key))
        if op == _SUBSCRIBE:
            self._pending_subs[key] = self._pending_subs.get(key, 0) + 1
        elif op == _UNSUBSCRIBE:
            self._confirmed.discard(key)
        self._ops_ready.set()

    def _schedule_fetch(self, key: bytes) -> None:
        self._to_fetch.add(key)
        self._fetch_ready.set()

    def _settle(self, key: bytes, meta: dict[str, Any] | None, error: Exception | None) -> None:
        """Hand a ready record (or a decoding error) to every wait on ``key``."""
        futures = self._waiters.pop(key, None)
        if futures is None:
            return
        self._queue_op(_UNSUBSCRIBE, key)
        resolve(futures, meta, error)

    def _fail_waiters(self, error: ResultStoreError) -> None:
        waiting, self._waiters = self._waiters, {}  # a fresh dict: callers may be iterating
        fail_all(waiting, error)

    def _on_record(self, key: bytes, data: bytes | str) -> None:
        if key not in self._waiters:
            return
        try:
            meta = self.decode(data)
        except SerializationError as exc:
            self._settle(key, None, exc)  # get() would raise the same; do not wait forever
            return
        if meta.get("status") in states.READY_STATES:
            self._settle(key, meta, None)

    def _on_subscribed(self, key: bytes) -> None:
        left = self._pending_subs.get(key, 0) - 1
        if left > 0:
            self._pending_subs[key] = left
            return
        self._pending_subs.pop(key, None)
        if key in self._waiters:
            self._confirmed.add(key)
            self._schedule_fetch(key)

    # -- the listener ----------------------------------------------------------------------

    async def _open_pubsub(self) -> AbstractConnection:
        assert self._client is not None
        pool = self._client.connection_pool
        conn: AbstractConnection = pool.connection_class(
            **{
                **pool.connection_kwargs,
                "client_name": self.pubsub_client_name,
                "retry": Retry(NoBackoff(), 0),  # the listener does its own reconnecting
                "socket_timeout": None,  # reads carry their own timeout (health check)
            }
        )
        with _translate("connect (pub/sub)"):
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await conn.connect()  # type: ignore[no-untyped-call]
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
        return conn

    async def _supervise(self, conn: AbstractConnection) -> None:
        """Serve one connection at a time until cancelled; reconnect when one drops."""
        try:
            while True:
                try:
                    await self._serve(conn)
                except* (RedisError, OSError) as group:
                    logger.warning("redis result store: pub/sub connection lost (%s); reconnecting",
                                   group.exceptions[0])
                finally:
                    await conn.disconnect(nowait=True)
                conn = await self._reconnect()
        except ResultStoreError as exc:
            logger.error("%s", exc)
            self._fail_waiters(exc)
        except Exception:  # a bug: log it here, nobody awaits this task until close()
            logger.exception("redis result store: the pub/sub listener failed")
        finally:
            self._fail_waiters(ResultStoreError("the result store listener stopped"))

    async def _reconnect(self) -> AbstractConnection:
        policy = self.retry_policy
        max_retries = policy["max_retries"]
        interval = float(policy["interval_start"])
        attempts = itertools.count(1) if max_retries is None else range(1, int(max_retries) + 1)
        error: ResultStoreError | None = None
        for attempt in attempts:
            await asyncio.sleep(interval)  # backoff between attempts, as Celery's retry_policy
            try:
                return await self._open_pubsub()
            except ResultStoreError as exc:
                error = exc
                logger.warning("redis result store: reconnect attempt %d failed: %s", attempt, exc)
            interval = min(interval + float(policy["interval_step"]), float(policy["interval_max"]))
        raise ResultStoreError(
            f"redis result store: gave up reconnecting the pub/sub connection: {error}"
        )

    async def _serve(self, conn: AbstractConnection) -> None:
        # A new connection has no subscriptions: start the bookkeeping afresh and subscribe to
        # every channel still waited on. Each confirmation triggers a read of the key, which
        # recovers records published while no connection was listening.
        self._ops.clear()
        self._pending_subs.clear()
        self._confirmed.clear()
        self._to_fetch.clear()
        for key in self._waiters:
            self._queue_op(_SUBSCRIBE, key)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._read(conn))
            tasks.create_task(self._write(conn))
            tasks.create_task(self._fetch())

    async def _read(self, conn: AbstractConnection) -> None:
        ping_sent = False
        while True:
            reply = await conn.read_response(
                timeout=self.health_check_interval, push_request=True
            )
            _raise_if_cancelled()
            if reply is None:  # silence for a whole interval
                if ping_sent:
                    raise RedisConnectionError("no answer to PING on the pub/sub connection")
                ping_sent = True
                self._ops.append((_PING, b""))
                self._ops_ready.set()
                continue
            ping_sent = False
            if not isinstance(reply, list) or len(reply) < 2:
                continue  # a PONG outside subscribed mode
            kind = reply[0]
            if kind == b"message":
                self._on_record(reply[1], reply[2])
            elif kind == b"subscribe":
                self._on_subscribed(reply[1])
            # unsubscribe confirmations and PONGs need nothing

    async def _write(self, conn: AbstractConnection) -> None:
        while True:
            await self._ops_ready.wait()
            self._ops_ready.clear()
            ops, self._ops = self._ops, []
            commands: list[tuple[bytes, ...]] = []
            # Consecutive runs of the same command merge into one (order between SUBSCRIBE
            # and UNSUBSCRIBE of a channel must be kept, so only neighbours merge).
            for op, run in itertools.groupby(ops, key=lambda item: item[0]):
                if op == _PING:
                    commands.append((_PING,))
                    continue
                channels = [key for _, key in run]
                for start in range(0, len(channels), _BATCH):
                    commands.append((op, *channels[start:start + _BATCH]))
            if not conn.is_connected:
                raise RedisConnectionError("the pub/sub connection is closed")
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            _raise_if_cancelled()

    async def _fetch(self) -> None:
        client = self._client
        assert client is not None
        while True:
            await self._fetch_ready.wait()
            self._fetch_ready.clear()
            while self._to_fetch:
                count = min(_BATCH, len(self._to_fetch))
                popped = (self._to_fetch.pop() for _ in range(count))
                batch = [key for key in popped if key in self._waiters]
                if not batch:
                    continue
                values = await client.mget(batch)
                _raise_if_cancelled()
                for key, value in zip(batch, values, strict=True):
                    if value is not None:
                        self._on_record(key, value)
