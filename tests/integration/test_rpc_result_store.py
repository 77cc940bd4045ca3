"""``RpcResultStore`` over the real RabbitMQ (``AmqpBroker``) and the in-process ``MemoryBroker``.

The same behaviour is checked on both brokers; what only RabbitMQ can show (the reply queue's
declaration, the AMQP properties of a reply, stock Celery on the other side) is checked on
RabbitMQ alone, with aio-pika or stock Celery as the independent observer.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import json
import threading
import time
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import aio_pika.exceptions
import pytest

from aioqueue import exceptions
from aioqueue.brokers import memory
from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.brokers.base import Broker
from aioqueue.config import Settings
from aioqueue.meta import make_meta
from aioqueue.protocol import Envelope
from aioqueue.results.rpc import RpcResultStore

pytestmark = pytest.mark.integration

MakeBroker = Callable[[], Awaitable[Broker]]


@pytest.fixture(params=["amqp", "memory"])
async def make_broker(
    request: pytest.FixtureRequest, amqp_url: str, settings: Settings, unique: str
) -> AsyncIterator[MakeBroker]:
    """Connected brokers of one kind; several share one RabbitMQ / one memory hub."""
    made: list[Broker] = []
    memory_url = f"memory://{unique}"

    async def make() -> Broker:
        if request.param == "amqp":
            broker: Broker = AmqpBroker(amqp_url, settings)
        else:
            broker = memory.MemoryBroker(memory_url, settings)
        await broker.connect()
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.close()
    memory.reset(memory_url)


@pytest.fixture
async def client(make_broker: MakeBroker, settings: Settings) -> AsyncIterator[RpcResultStore]:
    store = RpcResultStore("rpc://", settings, await make_broker())
    await store.prepare_client()
    yield store
    await store.close()


@pytest.fixture
async def worker(make_broker: MakeBroker, settings: Settings) -> AsyncIterator[RpcResultStore]:
    """The worker's side: its own broker connection, only ever calls ``store()``."""
    store = RpcResultStore("rpc://", settings, await make_broker())
    yield store
    await store.close()


@pytest.fixture
async def amqp_channel(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(amqp_url)
    yield await connection.channel()
    await connection.close()


async def sent_after(client: RpcResultStore, worker: RpcResultStore) -> None:
    """Returns once every reply sent to ``client`` so far has been consumed.

    Replies on one queue arrive in order: once a sentinel sent last is in, so is the rest.
    """
    sentinel = f"sentinel-{uuid.uuid4()}"
    await worker.store(sentinel, make_meta(sentinel, "SUCCESS", None), reply_to=client.reply_to)
    await client.wait(sentinel, timeout=5)


# -- behaviour on every broker ---------------------------------------------------------------


async def test_wait_for_a_reply(client: RpcResultStore, worker: RpcResultStore) -> None:
    task_id = str(uuid.uuid4())
    waiting = asyncio.create_task(client.wait(task_id, timeout=5))
    await worker.store(task_id, make_meta(task_id, "SUCCESS", 8), reply_to=client.reply_to)
    meta = await waiting
    assert (meta["status"], meta["result"], meta["task_id"]) == ("SUCCESS", 8, task_id)
    # A later wait or get finds the kept record.
    assert (await client.wait(task_id, timeout=1))["result"] == 8
    assert (await client.get(task_id)) == meta


async def test_reply_that_arrived_before_the_wait(
    client: RpcResultStore, worker: RpcResultStore
) -> None:
    task_id = str(uuid.uuid4())
    await worker.store(task_id, make_meta(task_id, "FAILURE", {"exc_type": "ValueError",
                       "exc_message": ["boom"], "exc_module": "builtins"}),
                       reply_to=client.reply_to)
    await sent_after(client, worker)
    meta = await client.wait(task_id, timeout=5)
    assert meta["status"] == "FAILURE"


async def test_wait_times_out_quickly(client: RpcResultStore) -> None:
    task_id = str(uuid.uuid4())
    started = time.monotonic()
    with pytest.raises(exceptions.TimeoutError) as info:
        await client.wait(task_id, timeout=0.2)
    assert isinstance(info.value, builtins.TimeoutError)
    assert time.monotonic() - started < 1.5


async def test_started_then_success(client: RpcResultStore, worker: RpcResultStore) -> None:
    task_id = str(uuid.uuid4())
    waiting = asyncio.create_task(client.wait(task_id, timeout=5))
    await worker.store(task_id, make_meta(task_id, "STARTED", {"pid": 1, "hostname": "w"}),
                       reply_to=client.reply_to)
    await sent_after(client, worker)
    assert not waiting.done()
    started = await client.get(task_id)
    assert started is not None and started["status"] == "STARTED"
    await worker.store(task_id, make_meta(task_id, "SUCCESS", 5), reply_to=client.reply_to)
    assert (await waiting)["result"] == 5
    latest = await client.get(task_id)
    assert latest is not None and latest["status"] == "SUCCESS"


async def test_store_without_reply_to_sends_nothing(
    client: RpcResultStore, worker: RpcResultStore
) -> None:
    task_id = str(uuid.uuid4())
    await worker.store(task_id, make_meta(task_id, "SUCCESS", 1), reply_to=None)
    await sent_after(client, worker)
    assert await client.get(task_id) is None


async def test_two_waiters_and_many_waits(client: RpcResultStore, worker: RpcResultStore) -> None:
    ids = [str(uuid.uuid4()) for _ in range(500)]
    waits = [asyncio.create_task(client.wait(i, timeout=10)) for i in ids]
    twin = asyncio.create_task(client.wait(ids[0], timeout=10))
    await asyncio.gather(*(
        worker.store(i, make_meta(i, "SUCCESS", n), reply_to=client.reply_to)
        for n, i in enumerate(ids)
    ))
    assert [m["result"] for m in await asyncio.gather(*waits)] == list(range(500))
    assert (await twin)["result"] == 0


async def test_task_id_from_the_body_when_no_correlation_id(
    client: RpcResultStore, worker: RpcResultStore
) -> None:
    task_id = str(uuid.uuid4())
    assert worker.broker is not None
    await worker.broker.publish(
        Envelope(client.encode(make_meta(task_id, "SUCCESS", 3)), {}, delivery_mode=1),
        routing_key=client.reply_to,
    )
    assert (await client.wait(task_id, timeout=5))["result"] == 3


async def test_forget_and_the_bound_on_kept_records(
    client: RpcResultStore, worker: RpcResultStore
) -> None:
    client.max_records = 3
    ids = [str(uuid.uuid4()) for _ in range(5)]
    for i in ids:
        await worker.store(i, make_meta(i, "SUCCESS", i), reply_to=client.reply_to)
    await client.wait(ids[-1], timeout=5)
    assert await client.get(ids[0]) is None  # dropped: oldest beyond max_records
    assert await client.get(ids[-1]) is not None
    await client.forget(ids[-1])
    assert await client.get(ids[-1]) is None


async def test_close_wakes_pending_waits(make_broker: MakeBroker, settings: Settings) -> None:
    store = RpcResultStore("rpc://", settings, await make_broker())
    waits = [asyncio.create_task(store.wait(str(uuid.uuid4()))) for _ in range(3)]  # no timeout
    await store.prepare_client()
    # One turn of the loop runs each new task up to its first real suspension, which for a
    # wait on a prepared store is awaiting its future (deterministic, not a timing guess).
    await asyncio.sleep(0)
    await asyncio.wait_for(store.close(), 5)
    results = await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 5)
    assert all(isinstance(r, exceptions.ResultStoreError) for r in results)
    await store.close()  # idempotent


async def test_broker_errors_become_result_store_errors(
    make_broker: MakeBroker, settings: Settings
) -> None:
    broker = await make_broker()
    store = RpcResultStore("rpc://", settings, broker)
    await broker.close()
    with pytest.raises(exceptions.ResultStoreError):
        await store.store("x", make_meta("x", "SUCCESS", 1), reply_to=str(uuid.uuid4()))
    with pytest.raises(exceptions.ResultStoreError):
        await store.prepare_client()
    await store.close()


async def test_rpc_needs_a_broker(settings: Settings) -> None:
    store = RpcResultStore("rpc://", settings)
    with pytest.raises(exceptions.ConfigurationError):
        await store.connect()
    with pytest.raises(exceptions.ConfigurationError):
        await store.prepare_client()


# -- RabbitMQ as stock Celery sees it --------------------------------------------------------


async def test_reply_queue_declared_like_stock(
    amqp_url: str, amqp_channel: aio_pika.abc.AbstractChannel
) -> None:
    settings = Settings(result_expires=60)
    broker = AmqpBroker(amqp_url, settings)
    await broker.connect()
    store = RpcResultStore("rpc://", settings, broker)
    try:
        await store.prepare_client()
        await store.prepare_client()  # idempotent
        queue = await amqp_channel.declare_queue(store.reply_to, passive=True)
        assert queue.declaration_result.consumer_count == 1
        # RabbitMQ accepts a re-declaration only with the same properties: this is stock's.
        same: dict[str, Any] = {
            "durable": True, "auto_delete": True, "arguments": {"x-expires": 60000},
        }
        await amqp_channel.declare_queue(store.reply_to, **same)
        for differing in ({"durable": False}, {"auto_delete": False},
                          {"arguments": {"x-expires": 86400000}}):
            raw = await aio_pika.connect(amqp_url)  # a refused declare closes the channel
            try:
                with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
                    await (await raw.channel()).declare_queue(
                        store.reply_to, **{**same, **differing}
                    )
            finally:
                await raw.close()
    finally:
        await store.close()
        await broker.close()


async def test_reply_properties_on_the_wire(
    amqp_url: str, settings: Settings, amqp_channel: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    queue = await amqp_channel.declare_queue(unique, arguments={"x-expires": 60000})
    task_id = str(uuid.uuid4())
    meta = make_meta(task_id, "SUCCESS", 5)
    async with AmqpBroker(amqp_url, settings) as broker:
        await RpcResultStore("rpc://", settings, broker).store(task_id, meta, reply_to=unique)
    message = await queue.get(timeout=5)
    assert message is not None
    await queue.delete(if_unused=False, if_empty=False)
    assert message.correlation_id == task_id
    assert message.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT  # 1
    assert (message.content_type, message.content_encoding) == ("application/json", "utf-8")
    assert message.priority == 0
    assert message.reply_to is None
    assert not message.headers
    assert message.routing_key == unique and message.exchange == ""
    body = json.loads(message.body)
    assert list(body) == ["status", "result", "traceback", "children", "date_done", "task_id"]
    assert body == meta


def _close_stock(app: Any) -> None:
    """Close what stock Celery leaves open (it would surface as ResourceWarnings)."""
    from kombu import pools

    consumer = app.backend.result_consumer
    if getattr(consumer, "_connection", None) is not None:
        consumer.stop()
        consumer._connection.close()
    app.close()
    pools.reset()  # kombu's process-wide connection pools, closed and forgotten


async def test_stock_celery_client_reads_our_replies(
    amqp_url: str, settings: Settings
) -> None:
    from celery import Celery
    from celery.result import AsyncResult

    loop = asyncio.get_running_loop()
    oid: asyncio.Future[str] = loop.create_future()
    got: asyncio.Future[Any] = loop.create_future()
    task_id = str(uuid.uuid4())
    app = Celery("interop", broker=amqp_url, backend="rpc://")

    def stock_client() -> None:
        # Celery's backend and its oid are per thread: everything stock happens here.
        try:
            loop.call_soon_threadsafe(oid.set_result, app.backend.oid)
            value = AsyncResult(task_id, app=app).get(timeout=5)
            loop.call_soon_threadsafe(got.set_result, value)
        except BaseException as exc:
            loop.call_soon_threadsafe(got.set_exception, exc)
        finally:
            _close_stock(app)

    thread = threading.Thread(target=stock_client)
    thread.start()
    try:
        async with AmqpBroker(amqp_url, settings) as broker:
            worker = RpcResultStore("rpc://", settings, broker)
            reply_to = await asyncio.wait_for(oid, 5)
            # Declared as we declare our own reply queue; stock declares it again when it
            # starts consuming, which RabbitMQ refuses unless the properties are identical.
            await broker.declare(dataclasses.replace(worker.reply_queue, name=reply_to))
            await worker.store(task_id, make_meta(task_id, "STARTED", {"pid": 1,
                               "hostname": "w"}), reply_to=reply_to)
            await worker.store(task_id, make_meta(task_id, "SUCCESS", [4, 2]),
                               reply_to=reply_to)
            assert await asyncio.wait_for(got, 10) == [4, 2]
    finally:
        await asyncio.to_thread(thread.join, 10)


async def test_we_read_stock_celery_worker_replies(amqp_url: str, settings: Settings) -> None:
    from celery import Celery

    task_id = str(uuid.uuid4())
    async with AmqpBroker(amqp_url, settings) as broker:
        client = RpcResultStore("rpc://", settings, broker)
        await client.prepare_client()
        app = Celery("interop", broker=amqp_url, backend="rpc://")
        # Closing a stock client right after a publish can lose it (kombu does not wait):
        # with publisher confirms each publish returns only once RabbitMQ has it.
        app.conf.broker_transport_options = {"confirm_publish": True}
        request = types.SimpleNamespace(
            id=task_id, reply_to=client.reply_to, correlation_id=task_id, ignore_result=False,
            group=None, chord=None, delivery_info={}, parent_id=None, root_id=None,
        )

        def stock_worker() -> None:
            try:
                app.backend.store_result(task_id, {"pid": 1}, "STARTED", request=request)
                app.backend.store_result(task_id, 9, "SUCCESS", request=request)
            finally:
                _close_stock(app)

        try:
            await asyncio.to_thread(stock_worker)
            meta = await client.wait(task_id, timeout=5)
        finally:
            await client.close()
    assert (meta["status"], meta["result"], meta["task_id"]) == ("SUCCESS", 9, task_id)
