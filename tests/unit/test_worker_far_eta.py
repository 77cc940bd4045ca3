"""A task that arrives long before its ETA is parked in the broker, not held in memory."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from aioqueue import AioQueue
from aioqueue.protocol import encode_task

from .conftest import running_worker


async def test_far_eta_goes_back_to_the_broker(
    app: AioQueue, caplog: pytest.LogCaptureFixture
) -> None:
    app.conf.broker_delay_threshold = 0.5

    @app.task(name="far.add")
    async def add(x: int, y: int) -> int:
        return x + y

    task_id = str(uuid.uuid4())
    eta = datetime.now(UTC) + timedelta(seconds=1.2)
    # As a stock client sends it: straight to the work queue, with only the eta header.
    envelope = encode_task(task="far.add", task_id=task_id, args=[2, 3], kwargs={}, eta=eta)
    broker = await app.get_broker()
    await broker.declare(app.queue_spec("celery"))
    await broker.publish(envelope, routing_key="celery")
    with caplog.at_level(logging.INFO, logger="aioqueue.worker"):
        async with running_worker(app) as worker:
            assert await app.AsyncResult(task_id).get(timeout=5) == 5
            assert time.time() >= eta.timestamp() - 0.01
    assert "parked in the broker" in caplog.text
    assert worker.running == 0
