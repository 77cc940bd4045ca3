"""Celery's Redis result backend (``redis://``, ``rediss://``), on ``redis.asyncio``.

Wire format (reference/celery-protocol.md §4): each record is the string key
``[<global_keyprefix>]celery-task-meta-<task_id>`` holding the serialized meta, written with its
TTL (``result_expires``) and published on the pub/sub channel named like the key, in one atomic
step, so stock Celery clients waiting on that channel wake up, and stock workers' records wake
ours. Stock Celery does SET+PUBLISH in a MULTI/EXEC after a GET that refuses to overwrite a
SUCCESS; here one small Lua script does all three in one round trip (measured: not slower
than the MULTI/EXEC alone), so the guard also holds against concurrent writers.

Waiting never polls. A store owns one pub/sub connection and one listener task (started by
the first ``wait()``, cancelled and awaited by ``close()``): :mod:`aioqueue.results.redis_listener`
explains how waits, subscriptions made when a task is sent (``expect()``) and reconnecting
(``retry_policy`` from ``result_backend_transport_options``, Celery's defaults) work.

Only redis-py's public API is used. The pub/sub connection and the result writer's connection
are our own (:mod:`aioqueue.results.redis_wire`), made from the parameters of the store's
redis-py pool (``connection_class``, ``connection_kwargs``), unless ``settings.fast_paths`` is
off or the pool asks for something the wire does not speak: then redis-py's ``PubSub`` and
pipelines serve instead (``paths`` says which).

Redis exceptions never reach callers: they are turned into ``ResultStoreError`` here (and a
URL with options redis-py rejects into ``ConfigurationError``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import RedisError

from .. import states
from ..exceptions import ConfigurationError, ResultStoreError, SerializationError
from ..registry import mask_password
from .base import ResultStore, cancel_and_wait, raise_timeout
from .redis_listener import Listener
from .redis_subscriber import PubSubSubscriber, Subscriber, WireSubscriber
from .redis_wire import RedisWire, WireParams, open_wire, wire_params
from .redis_writer import ResultWriter

if TYPE_CHECKING:
    from ..brokers.base import Broker
    from ..config import Settings

__all__ = ("RedisResultStore",)

logger = logging.getLogger(__name__)

TASK_KEYPREFIX = "celery-task-meta-"

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
        #: The result writer's connection's CLIENT SETNAME (see redis_writer.py).
        self.writer_client_name = f"aioqueue-writer-{uuid.uuid4().hex[:12]}"
        #: Our own connections for the listener and the writer (docs/design.md, "What we
        #: rely on in our dependencies"); False: redis-py's public API only.
        self.fast_paths = settings.fast_paths
        self._client: Redis | None = None
        self._wire: WireParams | None = None  # set by connect() when our connections serve
        self._pubsub_client: Redis | None = None  # redis-py's path: the PubSub's own client
        self._writer: ResultWriter | None = None  # store()'s pipeline, made by the first one
        self._connect_lock = asyncio.Lock()
        self._waiting = Listener(self)  # waits, subscriptions, the listener task

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
                    mask_password(f"invalid redis result backend URL {self.url!r}: {exc}")
                ) from exc
            if self.fast_paths:
                try:
                    self._wire = wire_params(pool.connection_class, pool.connection_kwargs)
                except (OSError, ValueError, KeyError) as exc:  # TLS files and options
                    raise ConfigurationError(
                        mask_password(f"invalid TLS options in {self.url!r}: {exc!r}")
                    ) from exc
                if self._wire is None:
                    logger.info("redis result store: the connection options of %s need "
                                "redis-py's own connections; fast paths off",
                                mask_password(self.url))
            with _translate("connect"):
                client = Redis.from_pool(pool)
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        await client.ping()
                except BaseException:
                    await client.aclose()
                    raise
            self._client = client
            return client

    async def close(self) -> None:
        """Wake pending waits with ``ResultStoreError``, stop the listener, disconnect."""
        self._fail_waiters(ResultStoreError("the result store was closed"))
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.close()  # stores not answered yet fail with ResultStoreError
        listener, self._listener = self._listener, None
        if listener is not None:
            await cancel_and_wait(listener, "redis result store: listener")
        for client in (self._pubsub_client, self._client):
            if client is not None:
                with suppress(RedisError, OSError):
                    await client.aclose()
        self._pubsub_client = self._client = None

    @property
    def paths(self) -> dict[str, str | None]:
        """Which connections serve the waits and the writes: ``"own-wire"`` (ours) or
        ``"redis-py"`` (its public API); None for one not made yet."""
        return {
            "listener": self._waiting.path,
            "writer": None if self._writer is None else self._writer.path,
        }

    # -- records ---------------------------------------------------------------------------

    def key_for(self, task_id: str) -> str:
        """The Redis key (and pub/sub channel) of a task's record."""
        return self.key_prefix + task_id

    async def store(
        self, task_id: str, meta: dict[str, Any], *, reply_to: str | None = None
    ) -> None:
        value = self.encode(meta)  # SerializationError here means nothing was written
        client = self._client or await self._ensure_client()
        key = self.key_for(task_id)
        if self.serializer in _SCRIPT_READABLE:
            # Pipelined with the other stores of this loop iteration (redis_writer.py).
            writer = self._writer
            if writer is None:
                if self._wire is not None:
                    writer = ResultWriter(_STORE_SCRIPT, self.ttl, _SOCKET_TIMEOUT,
                                          connect=self._open_writer)
                else:
                    writer = ResultWriter(_STORE_SCRIPT, self.ttl, _SOCKET_TIMEOUT, client=client)
                self._writer = writer
            written = await writer.store(key.encode(), value)
        else:
            with _translate("store"):
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

    async def _open_writer(self) -> RedisWire:
        """A connection of the result writer's own (CLIENT SETNAME ``writer_client_name``).

        Raises ``WireError`` (an ``OSError``): the writer turns it into ``ResultStoreError``.
        The writer decides what to send again and bounds each batch's round trip itself."""
        assert self._wire is not None
        async with asyncio.timeout(self.connect_timeout):
            return await open_wire(self._wire, self.writer_client_name)

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
        self._waiting.forget(self.key_for(task_id).encode())  # drop a record kept for get()
        client = await self._ensure_client()
        with _translate("forget"):
            await client.delete(self.key_for(task_id))

    # -- waiting (redis_listener.py does the work) ---------------------------------------

    async def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        key = self.key_for(task_id).encode()
        listener = self._waiting
        kept = listener.take_kept(key)  # arrived before anyone waited (see expect())
        if kept is not None:
            return kept
        if not listener.running:
            # Starting connects to Redis, and the timeout covers that too: anyio's scope
            # around all of it, as once per store its cost does not matter.
            with raise_timeout(task_id, timeout):
                await listener.start()
                return await self.wait(task_id, None)
        waiter, timer = listener.begin_wait(key, task_id, timeout)
        try:
            return await waiter
        finally:
            listener.end_wait(key, waiter, timer)

    def expect(self, task_id: str) -> asyncio.Future[None] | None:
        """Subscribe to the result's channel now, if this store's listener runs (it has
        waited before): the ``get()`` that follows then costs no round trip, and the future
        returned completes when the ready record arrives (None if not subscribed)."""
        return self._waiting.expect(self.key_for(task_id).encode())

    def spare_task_id(self) -> str | None:
        """A new id whose result channel is subscribed already (see ``Listener.take_spare``)."""
        return self._waiting.take_spare()

    def unexpect(self, task_id: str) -> None:
        self._waiting.unexpect(self.key_for(task_id).encode())

    @property
    def _listener(self) -> asyncio.Task[None] | None:
        """The listener task (``close()`` cancels it)."""
        return self._waiting.task

    @_listener.setter
    def _listener(self, task: asyncio.Task[None] | None) -> None:
        self._waiting.task = task

    def _fail_waiters(self, error: ResultStoreError) -> None:
        self._waiting.fail(error)

    # -- the listener's connection and reads -------------------------------------------

    async def open_subscriber(self) -> Subscriber:
        """A new pub/sub connection for the listener (CLIENT SETNAME ``pubsub_client_name``),
        with no retries or socket timeout of redis-py's: the listener reconnects by itself
        and its health check bounds its reads. Raises ``ResultStoreError``."""
        await self._ensure_client()
        interval = self.health_check_interval
        with _translate("connect (pub/sub)"):
            if self._wire is not None:
                async with asyncio.timeout(self.connect_timeout):
                    wire = await open_wire(self._wire, self.pubsub_client_name)
                return WireSubscriber(wire, interval)
            if self._pubsub_client is None:
                # A pool of one connection, named, beside the store's.
                self._pubsub_client = Redis.from_url(
                    self.url, max_connections=1, client_name=self.pubsub_client_name,
                    retry=Retry(NoBackoff(), 0), socket_timeout=None,
                    socket_connect_timeout=self.connect_timeout,
                )
            pubsub = self._pubsub_client.pubsub()
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await pubsub.connect()  # type: ignore[no-untyped-call]
            except BaseException:
                await pubsub.aclose()
                raise
            return PubSubSubscriber(pubsub, interval)

    async def read_keys(self, keys: list[bytes]) -> list[Any]:
        """MGET on the store's pool (the listener reads keys after subscribing)."""
        client = self._client or await self._ensure_client()
        return list(await client.mget(keys))
