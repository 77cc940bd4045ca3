"""The fast paths are active on the versions pyproject pins, and ``fast_paths=False`` turns
them off: a fast path that stops applying after an upgrade fails here, not silently.

With the fast paths on, a round trip on the real RabbitMQ has its delivery handed over and
its confirm settled by our frame stream (``FrameStream.handled``), with no warning that a
fast path could not apply; off, the broker has no frame stream at all (aio-pika's and
aiormq's own socket, ``basic_publish``, ``basic_ack``) and the round trip works the same.
"""

from __future__ import annotations

import logging

import anyio
import pytest

from aioqueue import AioQueue
from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.config import Queue, Settings
from aioqueue.protocol import encode_task, new_task_id
from aioqueue.worker import Worker

from .conftest import delete_queues

pytestmark = pytest.mark.integration


async def round_trip(broker: AmqpBroker, queue: str) -> None:
    await broker.declare(Queue(queue))
    consumer = broker.consume([queue], prefetch=10)
    await consumer.start()
    envelope = encode_task(task="t.add", task_id=new_task_id(), args=(1, 2), kwargs={},
                           timelimit=(300, 240))
    await broker.publish(envelope, routing_key=queue)
    delivery = await consumer.receive()
    assert delivery.envelope.headers["timelimit"] == [300, 240]
    await delivery.ack()
    await consumer.stop()


@pytest.mark.parametrize("fast", [True, False])
async def test_fast_paths_on_and_off(
    amqp_url: str, unique: str, fast: bool, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings()
    settings.fast_paths = fast
    with caplog.at_level(logging.WARNING, logger="aioqueue"):
        async with AmqpBroker(amqp_url, settings) as broker:
            await round_trip(broker, unique)
            stream = broker.frame_stream()
            if fast:
                assert stream is not None
                assert stream.handled >= 2  # the delivery and its publisher confirm
            else:
                assert stream is None
    assert not [r for r in caplog.records if "fast path" in r.getMessage()
                or "slower" in r.getMessage()]
    await delete_queues(amqp_url, [unique])


def test_a_round_trip_on_uvloop(amqp_url: str, redis_url: str, unique: str) -> None:
    """uvloop's transports are not asyncio's classes: our own protocols (the AMQP frame
    stream, the Redis store's wire) must work on them as the worker CLI runs them."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> int:
        app = AioQueue("uvloop", broker=amqp_url, backend=redis_url, task_default_queue=unique)

        @app.task
        async def add(x: int, y: int) -> int:
            return x + y

        worker = Worker(app, concurrency=4, shutdown_timeout=5)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(worker.run)
                with anyio.fail_after(10):
                    await worker.started.wait()
                    result = await (await add.delay(2, 3)).get(timeout=5)
                worker.stop()
            broker = await app.get_broker()
            assert isinstance(broker, AmqpBroker)
            stream = broker.frame_stream()
            if app.conf.fast_paths:  # else the public path, which must work on uvloop too
                assert stream is not None and stream.handled >= 2
        finally:
            await app.close()
            await delete_queues(amqp_url, [unique])
        return result

    assert uvloop.run(main()) == 5
