"""Quorum queues, delivery limits, dead letters and broker-side delays on the real RabbitMQ.

Every queue and exchange is named after the test's ``unique`` name, the delay levels too
(``broker_transport_options["delay_prefix"]``), and deleted at teardown. Counts are read
from the outside with passive declares; RabbitMQ dead-letters and expires in its queue
processes, a moment after the call that caused it, so such counts are polled (bounded).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import aiormq
import anyio
import pytest

from aioqueue import AioQueue, states
from aioqueue.brokers import delay as delays
from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.brokers.base import Delivery
from aioqueue.config import Settings
from aioqueue.protocol import Envelope
from aioqueue.routing import declarations
from aioqueue.worker import Worker

from .conftest import ready_count, wait_ready_count

pytestmark = pytest.mark.integration


class Rabbit:
    """The outside view: message counts, declarations, and the cleanup of a test's names."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, unique: str) -> None:
        self.connection = connection
        self.work = unique
        self.dead = f"{unique}.dead"
        self.prefix = f"{unique}.delay"

    async def count(self, queue: str) -> int:
        return await ready_count(self.connection, queue)

    async def wait_count(self, queue: str, expected: int, timeout: float = 5.0) -> None:
        await wait_ready_count(self.connection, queue, expected, timeout)

    async def redeclare(self, queue: str, arguments: dict[str, Any]) -> None:
        """Declare ``queue`` again: RabbitMQ accepts it only with exactly its arguments."""
        async with self.connection.channel() as channel:
            await channel.declare_queue(queue, durable=True, arguments=arguments)

    async def cleanup(self) -> None:
        levels = [f"{self.prefix}.{n}" for n in range(delays.LEVELS)]
        async with self.connection.channel() as channel:
            underlay = await channel.get_underlay_channel()
            # Deleting a queue or exchange that does not exist is no error in RabbitMQ.
            for name in [self.work, self.dead, *levels]:
                await underlay.queue_delete(name)
                await underlay.exchange_delete(name)  # Celery-style exchanges, the levels
            await underlay.exchange_delete(self.prefix)


@pytest.fixture
async def rabbit(amqp_url: str, unique: str) -> AsyncIterator[Rabbit]:
    connection = await aio_pika.connect(amqp_url)
    r = Rabbit(connection, unique)
    try:
        yield r
    finally:
        await r.cleanup()
        await connection.close()


def quorum_settings(rabbit: Rabbit, **extra: Any) -> dict[str, Any]:
    return {
        "task_default_queue": rabbit.work,
        "task_default_queue_type": "quorum",
        "task_dead_letter_queue": rabbit.dead,
        "task_queue_delivery_limit": 2,
        "broker_transport_options": {"delay_prefix": rabbit.prefix},
        **extra,
    }


@pytest.fixture
async def broker(amqp_url: str, rabbit: Rabbit) -> AsyncIterator[AmqpBroker]:
    """A broker with the work queue (quorum, limit 2) and its dead-letter queue declared."""
    settings = Settings()
    settings.update(quorum_settings(rabbit))
    b = AmqpBroker(amqp_url, settings)
    await b.connect()
    for spec in declarations(settings, rabbit.work):
        await b.declare(spec)
    yield b
    await b.close()


@asynccontextmanager
async def running(app: AioQueue) -> AsyncIterator[Worker]:
    worker = Worker(app, concurrency=5, shutdown_timeout=5)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(worker.run)
        with anyio.fail_after(10):
            await worker.started.wait()
        try:
            yield worker
        finally:
            worker.stop()


async def receive(consumer: Any) -> Delivery:
    with anyio.fail_after(5):
        delivery: Delivery = await consumer.receive()
        return delivery


def message(task_id: str) -> Envelope:
    return Envelope(b"[[], {}, {}]", {"task": "t", "id": task_id})


async def test_client_and_worker_declare_the_same_quorum_queue(
    amqp_url: str, redis_url: str, rabbit: Rabbit
) -> None:
    app = AioQueue("itest", broker=amqp_url, backend=redis_url, **quorum_settings(rabbit))

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    try:
        sent = await add.delay(2, 3)  # the client declares first, then the worker
        unknown = await app.send_task("itest.not_registered")
        async with running(app):  # consuming a quorum queue: per-consumer QoS
            assert await sent.get(timeout=5) == 5
            # Rejected without requeue by the worker: kept in the dead-letter queue.
            await rabbit.wait_count(rabbit.dead, 1)
            assert await unknown.state() == states.FAILURE
    finally:
        await app.close()
    expected = {
        "x-queue-type": "quorum", "x-delivery-limit": 2,
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": rabbit.dead,
        "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish",
    }
    await rabbit.redeclare(rabbit.work, expected)
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="inequivalent arg"):
        await rabbit.redeclare(rabbit.work, {"x-queue-type": "quorum"})


async def test_requeued_past_the_delivery_limit_is_dead_lettered(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    await broker.publish(message("poison"), routing_key=rabbit.work)
    async with broker.consume([rabbit.work], prefetch=1) as consumer:
        assert consumer._global_qos is False  # a quorum queue refuses channel-wide QoS
        counts = []
        for _ in range(3):  # limit 2: three deliveries, then RabbitMQ dead-letters it
            delivery = await receive(consumer)
            # RabbitMQ counts deliveries given back; the first may come without the header.
            counts.append(delivery.envelope.headers.get("x-delivery-count", 0))
            await delivery.reject(requeue=True)
        await rabbit.wait_count(rabbit.dead, 1)
    assert counts == [0, 1, 2]
    assert await rabbit.count(rabbit.work) == 0


async def test_consumer_dying_with_the_message_counts_towards_the_limit(
    amqp_url: str, broker: AmqpBroker, rabbit: Rabbit
) -> None:
    await broker.publish(message("kills-workers"), routing_key=rabbit.work)
    for attempt in range(3):
        doomed = AmqpBroker(amqp_url, broker.settings)
        await doomed.connect()
        consumer = doomed.consume([rabbit.work], prefetch=1)
        await consumer.start()
        delivery = await receive(consumer)
        assert delivery.envelope.headers.get("x-delivery-count", 0) == attempt
        await doomed.close()  # the connection goes with the message unsettled
    await rabbit.wait_count(rabbit.dead, 1)
    assert await rabbit.count(rabbit.work) == 0


async def test_rejected_from_a_classic_queue_is_dead_lettered(
    amqp_url: str, rabbit: Rabbit
) -> None:
    settings = Settings()
    settings.update(task_default_queue=rabbit.work, task_dead_letter_queue=rabbit.dead)
    async with AmqpBroker(amqp_url, settings) as broker:
        for spec in declarations(settings, rabbit.work):
            await broker.declare(spec)
        await broker.publish(message("bad"), routing_key=rabbit.work)
        async with broker.consume([rabbit.work], prefetch=1) as consumer:
            assert consumer._global_qos is True  # RabbitMQ 3, classic: Celery's channel-wide
            await (await receive(consumer)).reject(requeue=False)
        await rabbit.wait_count(rabbit.dead, 1)


async def test_far_countdown_waits_in_the_broker_not_in_the_work_queue(
    amqp_url: str, rabbit: Rabbit
) -> None:
    app = AioQueue(
        "itest", broker=amqp_url, task_default_queue=rabbit.work, broker_delay_threshold=1,
        broker_transport_options={"delay_prefix": rabbit.prefix},
    )
    try:
        started = time.monotonic()
        await app.send_task("itest.later", countdown=2.5)  # through levels 1 (2 s) and 0
        await app.send_task("itest.soon", countdown=0.5)  # below the threshold: held by workers
        assert await rabbit.count(rabbit.work) == 1
        await rabbit.wait_count(rabbit.work, 2, timeout=5)
        # Whole seconds, rounded down: it arrives up to 1 s early and a worker holds it.
        assert 1.9 <= time.monotonic() - started <= 3.0
    finally:
        await app.close()


async def test_worker_runs_a_delayed_task_on_time(
    amqp_url: str, redis_url: str, rabbit: Rabbit
) -> None:
    app = AioQueue(
        "itest", broker=amqp_url, backend=redis_url,
        **quorum_settings(rabbit, broker_delay_threshold=1),  # quorum levels, too
    )

    @app.task
    async def stamp() -> float:
        return time.time()

    try:
        async with running(app):
            eta = time.time() + 2.5
            delayed = await stamp.apply_async(countdown=2.5)
            ran_at = await delayed.get(timeout=6)
            assert await delayed.state() == states.SUCCESS
        assert eta <= ran_at <= eta + 0.5
    finally:
        await app.close()
