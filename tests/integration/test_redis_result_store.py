"""``RedisResultStore`` against the real Redis (db 12), and against stock Celery reading/writing.

Every key a test creates contains the test's ``unique`` name and is deleted afterwards.
Where a test must know that the store's subscription is in place (to prove a message, not a
read of the key, woke the wait) it waits for Redis to report the subscriber
(``PUBSUB NUMSUB``): Redis's own view is the only outside sign of it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from aioqueue import exceptions
from aioqueue.config import Settings
from aioqueue.meta import make_meta
from aioqueue.results.redis import RedisResultStore
from aioqueue.results.redis_wire import OWN_WIRE, REDIS_PY

from ..conftest import FAST_PATHS

pytestmark = pytest.mark.integration

VECTOR = json.loads(
    (Path(__file__).resolve().parent.parent / "vectors" / "redis_result_success.json").read_text()
)


def new_id(unique: str) -> str:
    return f"{unique}-{uuid.uuid4()}"


async def until_numsub(raw: aioredis.Redis, channel: str, expected: int) -> None:
    """Wait until Redis counts ``expected`` subscribers on ``channel``."""
    with anyio.fail_after(5):
        while True:
            [(_, subscribers)] = await raw.pubsub_numsub(channel)
            if subscribers == expected:
                return
            await asyncio.sleep(0.002)


async def until_subscribed(raw: aioredis.Redis, channel: str) -> None:
    await until_numsub(raw, channel, 1)


async def pubsub_connection_id(raw: aioredis.Redis, store: RedisResultStore) -> int:
    clients = await raw.client_list()
    [client] = [c for c in clients if c.get("name") == store.pubsub_client_name]
    return int(client["id"])


# -- the record on the wire ------------------------------------------------------------------


async def test_record_matches_stock_format_and_ttl(
    redis_url: str, raw: aioredis.Redis, unique: str
) -> None:
    settings = Settings(result_expires=3600)
    task_id = new_id(unique)
    async with RedisResultStore(redis_url, settings) as store:
        await store.store(task_id, make_meta(task_id, "SUCCESS", 8))
    key = f"celery-task-meta-{task_id}"
    assert await raw.type(key) == b"string"
    record = json.loads(await raw.get(key))
    stock = VECTOR["stored"]["decoded"]
    assert list(record) == list(stock)  # status, result, traceback, children, date_done, task_id
    assert {k: v for k, v in record.items() if k not in ("date_done", "task_id")} == {
        k: v for k, v in stock.items() if k not in ("date_done", "task_id")
    }
    assert record["task_id"] == task_id
    assert record["date_done"].endswith("+00:00")
    assert 3590 <= await raw.ttl(key) <= 3600


async def test_no_ttl_when_result_expires_is_off(
    redis_url: str, raw: aioredis.Redis, unique: str
) -> None:
    task_id = new_id(unique)
    async with RedisResultStore(redis_url, Settings(result_expires=None)) as store:
        await store.store(task_id, make_meta(task_id, "SUCCESS", 1))
    assert await raw.ttl(f"celery-task-meta-{task_id}") == -1


async def test_store_publishes_the_record_on_the_key_channel(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    task_id = new_id(unique)
    key = store.key_for(task_id)
    pubsub = raw.pubsub()
    await pubsub.subscribe(key)
    with anyio.fail_after(5):
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        await store.store(task_id, make_meta(task_id, "SUCCESS", 8))
        message = await pubsub.get_message(timeout=5)
    await pubsub.aclose()
    assert message is not None
    assert message["channel"] == key.encode()
    assert message["data"] == await raw.get(key)


async def test_unserializable_record_writes_nothing(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    task_id = new_id(unique)
    with pytest.raises(exceptions.SerializationError):
        await store.store(task_id, make_meta(task_id, "SUCCESS", object()))
    assert await raw.exists(store.key_for(task_id)) == 0


@pytest.mark.parametrize("serializer", ["json", "msgpack", "pickle"])
async def test_success_is_never_overwritten(
    redis_url: str, raw: aioredis.Redis, unique: str, serializer: str
) -> None:
    settings = Settings(
        result_serializer=serializer, result_accept_content=["json", "msgpack", "pickle"]
    )
    task_id = new_id(unique)
    async with RedisResultStore(redis_url, settings) as store:
        await store.store(task_id, make_meta(task_id, "STARTED", {"pid": 1}))
        await store.store(task_id, make_meta(task_id, "SUCCESS", 8))  # STARTED is replaced
        await store.store(task_id, make_meta(task_id, "FAILURE", {"exc_type": "X"}))
        meta = await store.get(task_id)
    assert meta is not None
    assert (meta["status"], meta["result"]) == ("SUCCESS", 8)


async def test_get_and_forget(store: RedisResultStore, raw: aioredis.Redis, unique: str) -> None:
    task_id = new_id(unique)
    assert await store.get(task_id) is None
    await store.store(task_id, make_meta(task_id, "RETRY", {"exc_type": "KeyError"}))
    meta = await store.get(task_id)
    assert meta is not None and meta["status"] == "RETRY"
    await store.forget(task_id)
    assert await store.get(task_id) is None
    assert await raw.exists(store.key_for(task_id)) == 0


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("{u}", "{u}_celery-task-meta-"), ("{u}:", "{u}:celery-task-meta-"),
     ("{u}.", "{u}.celery-task-meta-")],
)
async def test_global_keyprefix(
    redis_url: str, raw: aioredis.Redis, unique: str, prefix: str, expected: str
) -> None:
    settings = Settings(
        result_backend_transport_options={"global_keyprefix": prefix.format(u=unique)}
    )
    task_id = new_id(unique)
    async with RedisResultStore(redis_url, settings) as store:
        waiting = asyncio.create_task(store.wait(task_id, timeout=5))
        await until_subscribed(raw, expected.format(u=unique) + task_id)
        await store.store(task_id, make_meta(task_id, "SUCCESS", 3))
        assert (await waiting)["result"] == 3
    assert await raw.exists(expected.format(u=unique) + task_id) == 1
    assert await raw.exists(f"celery-task-meta-{task_id}") == 0


# -- waiting ---------------------------------------------------------------------------------


async def test_wait_returns_a_result_stored_before(store: RedisResultStore, unique: str) -> None:
    task_id = new_id(unique)
    await store.store(task_id, make_meta(task_id, "SUCCESS", 8))
    with anyio.fail_after(5):
        meta = await store.wait(task_id, timeout=5)
    assert (meta["status"], meta["result"]) == ("SUCCESS", 8)


async def test_wait_is_woken_by_the_message(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    task_id = new_id(unique)
    waiting = asyncio.create_task(store.wait(task_id, timeout=5))
    await until_subscribed(raw, store.key_for(task_id))
    # Published only, never SET: only the pub/sub path can deliver this.
    await raw.publish(store.key_for(task_id), store.encode(make_meta(task_id, "SUCCESS", 7)))
    assert (await waiting)["result"] == 7


async def test_wait_returns_a_result_stored_during_the_wait(
    store: RedisResultStore, redis_url: str, settings: Settings, raw: aioredis.Redis, unique: str
) -> None:
    task_id = new_id(unique)
    subscribed = asyncio.Event()

    async def worker() -> None:
        await subscribed.wait()
        async with RedisResultStore(redis_url, settings) as other:
            await other.store(task_id, make_meta(task_id, "SUCCESS", 8))

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(worker())
        waiting = tasks.create_task(store.wait(task_id, timeout=5))
        await until_subscribed(raw, store.key_for(task_id))
        subscribed.set()
    assert waiting.result()["result"] == 8


async def test_wait_skips_started_and_returns_the_later_success(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    task_id = new_id(unique)
    waiting = asyncio.create_task(store.wait(task_id, timeout=5))
    await until_subscribed(raw, store.key_for(task_id))
    # Messages reach the listener in publish order: had STARTED or RETRY woken the wait,
    # it would have returned that record, not the SUCCESS.
    await store.store(task_id, make_meta(task_id, "STARTED", {"pid": 1, "hostname": "h"}))
    await store.store(task_id, make_meta(task_id, "RETRY", {"exc_type": "KeyError"}))
    await store.store(task_id, make_meta(task_id, "SUCCESS", 9))
    meta = await waiting
    assert (meta["status"], meta["result"]) == ("SUCCESS", 9)


async def test_wait_times_out_quickly(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    task_id = new_id(unique)
    started = time.monotonic()
    with pytest.raises(exceptions.TimeoutError) as info:
        await store.wait(task_id, timeout=0.2)
    assert isinstance(info.value, builtins.TimeoutError)
    assert task_id in str(info.value)
    assert time.monotonic() - started < 1.5
    await until_numsub(raw, store.key_for(task_id), 0)  # let go once nobody waits on it


async def test_two_waiters_on_one_id(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    task_id = new_id(unique)
    first = asyncio.create_task(store.wait(task_id, timeout=5))
    second = asyncio.create_task(store.wait(task_id, timeout=5))
    await until_subscribed(raw, store.key_for(task_id))
    await store.store(task_id, make_meta(task_id, "FAILURE", {"exc_type": "ValueError"}))
    assert (await first)["status"] == (await second)["status"] == "FAILURE"


async def test_a_wait_joining_a_subscribed_channel_reads_the_key(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    task_id = new_id(unique)
    key = store.key_for(task_id)
    first = asyncio.create_task(store.wait(task_id, timeout=5))
    await until_subscribed(raw, key)
    # Written without a message, after the first wait read the key: only a read made for
    # the second wait can find it (and it settles the first one too).
    await raw.set(key, store.encode(make_meta(task_id, "SUCCESS", 4)))
    second = await store.wait(task_id, timeout=5)
    assert second["result"] == (await first)["result"] == 4


async def test_many_concurrent_waits_on_one_connection(
    store: RedisResultStore, redis_url: str, settings: Settings, raw: aioredis.Redis, unique: str
) -> None:
    ids = [new_id(unique) for _ in range(2000)]
    # Half are stored before the waits begin, half while they run.
    async with RedisResultStore(redis_url, settings) as other:
        await asyncio.gather(*(other.store(i, make_meta(i, "SUCCESS", n)) for n, i in
                               enumerate(ids[:1000])))
        with anyio.fail_after(20):
            waits = [asyncio.create_task(store.wait(i, timeout=15)) for i in ids]
            await asyncio.gather(*(other.store(i, make_meta(i, "SUCCESS", n + 1000)) for n, i
                                   in enumerate(ids[1000:])))
            results = await asyncio.gather(*waits)
    assert [m["result"] for m in results] == list(range(2000))
    clients = await raw.client_list()
    assert sum(c.get("name") == store.pubsub_client_name for c in clients) == 1


async def test_close_wakes_pending_waits(
    redis_url: str, settings: Settings, raw: aioredis.Redis, unique: str
) -> None:
    store = RedisResultStore(redis_url, settings)
    ids = [new_id(unique) for _ in range(3)]
    waits = [asyncio.create_task(store.wait(i)) for i in ids]  # no timeout at all
    for i in ids:
        await until_subscribed(raw, store.key_for(i))
    with anyio.fail_after(5):
        await store.close()
        results = await asyncio.gather(*waits, return_exceptions=True)
    assert all(isinstance(r, exceptions.ResultStoreError) for r in results)
    await store.close()  # idempotent


async def test_connect_and_close_are_idempotent(redis_url: str, settings: Settings) -> None:
    store = RedisResultStore(redis_url, settings)
    await store.connect()
    await store.connect()
    await store.close()
    await store.close()


# -- failures --------------------------------------------------------------------------------


async def test_unreachable_redis_raises_result_store_error(settings: Settings) -> None:
    store = RedisResultStore("redis://127.0.0.1:1/12", settings)
    with anyio.fail_after(5):
        with pytest.raises(exceptions.ResultStoreError):
            await store.connect()
        with pytest.raises(exceptions.ResultStoreError):
            await store.get("x")
        with pytest.raises(exceptions.ResultStoreError):
            await store.store("x", make_meta("x", "SUCCESS", 1))
        with pytest.raises(exceptions.ResultStoreError):
            await store.wait("x", timeout=3)
    await store.close()


async def test_bad_url_option_is_a_configuration_error(settings: Settings) -> None:
    store = RedisResultStore("redis://127.0.0.1:6379/12?no_such_option=1", settings)
    with pytest.raises(exceptions.ConfigurationError, match="no_such_option"):
        await store.connect()
    await store.close()


async def test_listener_reconnects_and_reads_the_key_again(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    task_id = new_id(unique)
    key = store.key_for(task_id)
    waiting = asyncio.create_task(store.wait(task_id, timeout=10))
    await until_subscribed(raw, key)
    # The record lands without a message (as if it was published while nobody listened),
    # then the listener's connection is killed: only the re-read after reconnecting finds it.
    await raw.set(key, store.encode(make_meta(task_id, "SUCCESS", 5)))
    await raw.client_kill_filter(_id=await pubsub_connection_id(raw, store))
    meta = await waiting
    assert meta["result"] == 5
    # And the new connection serves new waits.
    other = new_id(unique)
    waiting = asyncio.create_task(store.wait(other, timeout=5))
    await until_subscribed(raw, store.key_for(other))
    await store.store(other, make_meta(other, "SUCCESS", 6))
    assert (await waiting)["result"] == 6


class Proxy:
    """A TCP relay to Redis that a test can freeze (half-open) or shut (refused), for real."""

    def __init__(self, target: tuple[str, int], tls: ssl.SSLContext | None = None) -> None:
        self.target = target
        self.tls = tls
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{port}/12"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                await self.flowing.wait()
                dst.write(data)
                await dst.drain()

    async def shut(self) -> None:
        """Refuse new connections and drop the open ones."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for writer in self.writers:
            writer.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    relay = Proxy(("127.0.0.1", 6379))
    yield relay
    relay.flowing.set()
    await relay.shut()


async def test_rediss_url_speaks_tls(tmp_path: Path, raw: aioredis.Redis, unique: str) -> None:
    """``rediss://`` through a TLS-terminating relay with a throwaway self-signed certificate."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await anyio.run_process([
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", str(key), "-out", str(cert),
    ])
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    relay = Proxy(("127.0.0.1", 6379), tls)
    url = await relay.start() + f"?ssl_ca_certs={cert}"
    task_id = new_id(unique)
    try:
        async with RedisResultStore(url, Settings()) as store:
            waiting = asyncio.create_task(store.wait(task_id, timeout=5))
            await until_subscribed(raw, store.key_for(task_id))
            await store.store(task_id, make_meta(task_id, "SUCCESS", "over tls"))
            assert (await waiting)["result"] == "over tls"
            path = OWN_WIRE if FAST_PATHS else REDIS_PY  # our own TLS, or redis-py's
            assert store.paths == {"listener": path, "writer": path}
        # A plain client cannot talk to the TLS relay: the store really used TLS.
        plain = RedisResultStore(url.replace("rediss://", "redis://").split("?")[0], Settings())
        plain.connect_timeout = 0.5
        with pytest.raises(exceptions.ResultStoreError):
            await plain.connect()
        await plain.close()
    finally:
        await relay.shut()


async def test_waits_fail_instead_of_hanging_when_redis_stays_away(
    proxy: Proxy, raw: aioredis.Redis, unique: str
) -> None:
    settings = Settings(result_backend_transport_options={
        "retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.05,
                         "interval_max": 0.05},
    })
    store = RedisResultStore(await proxy.start(), settings)
    task_id = new_id(unique)
    waiting = asyncio.create_task(store.wait(task_id))  # no timeout
    await until_subscribed(raw, store.key_for(task_id))
    await proxy.shut()
    with anyio.fail_after(5), pytest.raises(exceptions.ResultStoreError):
        await waiting
    await store.close()


async def test_a_silent_connection_is_detected_by_ping(
    proxy: Proxy, raw: aioredis.Redis, unique: str
) -> None:
    settings = Settings(result_backend_transport_options={
        "retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0,
                         "interval_max": 0},
    })
    store = RedisResultStore(await proxy.start(), settings)
    store.health_check_interval = 0.1
    store.connect_timeout = 0.3
    task_id = new_id(unique)
    waiting = asyncio.create_task(store.wait(task_id))  # no timeout
    await until_subscribed(raw, store.key_for(task_id))
    proxy.flowing.clear()  # half-open: sockets stay up, nothing gets through
    with anyio.fail_after(5), pytest.raises(exceptions.ResultStoreError):
        await waiting
    await store.close()


# -- stock Celery on the other side ----------------------------------------------------------


def stock_app(redis_url: str, **conf: Any) -> Any:
    from celery import Celery

    app = Celery("interop", backend=redis_url, broker="memory://")
    app.conf.update(conf)
    return app


async def test_stock_celery_client_waits_for_our_result(
    store: RedisResultStore, redis_url: str, raw: aioredis.Redis, unique: str
) -> None:
    from celery.result import AsyncResult

    app = stock_app(redis_url)
    task_id = new_id(unique)

    def stock_get() -> Any:
        try:
            return AsyncResult(task_id, app=app).get(timeout=5)
        finally:
            app.backend.result_consumer.stop()
            app.close()

    async with asyncio.TaskGroup() as tasks:
        getting = tasks.create_task(anyio.to_thread.run_sync(stock_get))
        await until_subscribed(raw, store.key_for(task_id))
        await store.store(task_id, make_meta(task_id, "SUCCESS", {"answer": [4, 2]}))
    assert getting.result() == {"answer": [4, 2]}


# Celery's backend still calls redis-py's deprecated SETEX.
@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
async def test_we_wait_for_a_stock_celery_result(
    store: RedisResultStore, redis_url: str, raw: aioredis.Redis, unique: str
) -> None:
    app = stock_app(redis_url)
    task_id = new_id(unique)

    def stock_store() -> None:
        try:
            app.backend.store_result(task_id, 8, "STARTED")
            app.backend.store_result(task_id, 8, "SUCCESS")
        finally:
            app.close()

    waiting = asyncio.create_task(store.wait(task_id, timeout=5))
    await until_subscribed(raw, store.key_for(task_id))
    await anyio.to_thread.run_sync(stock_store)
    meta = await waiting
    assert (meta["status"], meta["result"], meta["task_id"]) == ("SUCCESS", 8, task_id)
