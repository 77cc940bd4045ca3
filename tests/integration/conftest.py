"""Integration fixtures: apps on the real RabbitMQ and Redis, each test on its own queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import anyio
import pytest

from aioqueue import AioQueue
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
