"""Integration fixtures: apps on the real RabbitMQ and Redis, each test on its own queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import anyio
import pytest
import redis.asyncio as aioredis
from aiormq.abc import DeliveredMessage

from aioqueue import AioQueue
from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.config import Settings
from aioqueue.results.redis import RedisResultStore
from aioqueue.worker import Worker


@pytest.fixture(params=["redis", "rpc"])
def backend_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    return redis_url if request.param == "redis" else "rpc://"


@pytest.fixture
async def real_app(amqp_url: str, backend_url: str, unique: str) -> AsyncIterator[AioQueue]:
    """An app on RabbitMQ and Redis (or rpc://) whose default queue is this test's own."""
    app = AioQueue("itest", broker=amqp_url, backend=backend_url, task_default_queue=unique)
    yield app
    await app.close()
    await delete_queues(amqp_url, [unique])


async def delete_queues(amqp_url: str, names: list[str]) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)
            await channel.exchange_delete(name)


@pytest.fixture
async def real_worker(real_app: AioQueue) -> AsyncIterator[Worker]:
    worker = Worker(real_app, concurrency=20, shutdown_timeout=5)
    running = asyncio.create_task(worker.run())
    with anyio.fail_after(10):
        await worker.started.wait()
    yield worker
    worker.stop()
    with anyio.fail_after(15):
        await running


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 10) -> None:
    """Wait until ``check()`` is true: for state in another process, which sends no event."""
    with anyio.fail_after(timeout):
        while True:
            outcome = check()
            if outcome if isinstance(outcome, bool) else await outcome:
                return
            await anyio.sleep(0.01)


async def ready_count(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    """Messages ready in ``queue`` (a passive declare: RabbitMQ's own count)."""
    async with connection.channel() as channel:
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


async def wait_ready_count(
    connection: aio_pika.abc.AbstractConnection, queue: str, expected: int, timeout: float = 5.0
) -> None:
    """Poll the ready count until it is ``expected``: a queue's count has no event to wait on."""
    count = -1
    with anyio.move_on_after(timeout):
        while (count := await ready_count(connection, queue)) != expected:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    assert count == expected, f"{queue}: {count} ready messages, expected {expected}"


class Rabbit:
    """Outside view of RabbitMQ, and cleanup of what a test created."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, unique: str) -> None:
        self.connection = connection
        self.unique = unique
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()

    def name(self, suffix: str = "") -> str:
        name = f"{self.unique}{suffix}"
        self.queues.add(name)
        return name

    def exchange(self, suffix: str) -> str:
        name = f"{self.unique}{suffix}"
        self.exchanges.add(name)
        return name

    async def count(self, queue: str) -> int:
        return await ready_count(self.connection, queue)

    async def wait_count(self, queue: str, expected: int, timeout: float = 5.0) -> None:
        await wait_ready_count(self.connection, queue, expected, timeout)

    async def get(self, queue: str) -> DeliveredMessage:
        """``basic.get`` with no-ack: the message exactly as RabbitMQ hands it out."""
        async with self.connection.channel() as channel:
            underlay = await channel.get_underlay_channel()
            message = await underlay.basic_get(queue, no_ack=True)
            assert message.delivery_tag is not None, f"{queue} is empty"
            return message


@pytest.fixture
async def rabbit(amqp_url: str, unique: str) -> AsyncIterator[Rabbit]:
    connection = await aio_pika.connect(amqp_url)
    r = Rabbit(connection, unique)
    yield r
    async with connection.channel() as channel:
        underlay = await channel.get_underlay_channel()
        for queue in r.queues:
            await underlay.queue_delete(queue)
        # declare() also makes a direct exchange named after each queue, as Celery does;
        # RabbitMQ deletes a missing exchange without complaint.
        for exchange in r.exchanges | r.queues:
            await underlay.exchange_delete(exchange)
    await connection.close()


@pytest.fixture
async def broker(amqp_url: str, settings: Settings, rabbit: Rabbit) -> AsyncIterator[AmqpBroker]:
    b = AmqpBroker(amqp_url, settings)
    await b.connect()
    yield b
    await b.close()


@pytest.fixture
async def raw(redis_url: str, unique: str) -> AsyncIterator[aioredis.Redis]:
    """A plain Redis client; at teardown it deletes every key holding this test's unique name."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    keys = [key async for key in client.scan_iter(match=f"*{unique}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def store(
    redis_url: str, settings: Settings, raw: aioredis.Redis
) -> AsyncIterator[RedisResultStore]:
    s = RedisResultStore(redis_url, settings)
    await s.connect()
    yield s
    await s.close()
