"""A task that kills its worker process every time is dead-lettered after the delivery limit.

With late acks, a task that crashes its worker is redelivered to the next worker, which it
crashes too: without a limit, for ever. On a quorum queue (``task_default_queue_type =
"quorum"``) RabbitMQ counts the deliveries; past ``task_queue_delivery_limit`` it moves the
message to ``task_dead_letter_queue``. The test plays the process supervisor: it restarts
the worker each time it dies, until the message is dead-lettered.

Run: ``scripts/test tests/faults -v -k crash_loop``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from .conftest import (
    Project,
    WorkerProcess,
    assert_queue_settled,
    get_all,
    make_project,
    send_all,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

LIMIT = 3
CRASHER = 99_999
GOOD = 50


@pytest.fixture
def crash_project(
    tmp_path: Path, amqp_url: str, redis_url: str, unique: str
) -> Iterator[Project]:
    """Its queue is a quorum queue with a delivery limit of LIMIT and a dead-letter queue."""
    yield from make_project(tmp_path, amqp_url, redis_url, unique, delivery_limit=LIMIT)


async def dead_letter(project: Project) -> aio_pika.abc.AbstractIncomingMessage:
    assert project.dlq is not None
    connection = await aio_pika.connect(project.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(project.dlq, passive=True)
        message = await queue.get(no_ack=True, fail=True, timeout=10)
        assert message is not None
        return message


async def died_or_dead_lettered(project: Project, worker: WorkerProcess) -> bool:
    return not worker.alive or await project.ready(project.dlq) >= 1


async def test_crash_loop_is_dead_lettered_after_the_delivery_limit(
    crash_project: Project, figures: dict[str, object]
) -> None:
    project = crash_project
    assert project.dlq is not None
    started = time.monotonic()
    async with project.client() as app:
        crasher = await app.send_task("proj.crash", [CRASHER])
        good = await send_all(app, [("proj.work", [n, 0.01]) for n in range(GOOD)])
        # One message at a time (-c 1, prefetch 1): a crash hands back only the crasher, so
        # only its delivery count grows (prefetched messages returned by a dying worker
        # count as deliveries too).
        options = ("-c", "1", "--prefetch-multiplier", "1")
        crashes = 0
        while True:
            assert crashes <= LIMIT + 2, "the crashing task was never dead-lettered"
            worker = project.start_worker(*options)
            await wait_until(lambda w=worker: died_or_dead_lettered(project, w), 30,
                             "a crash or a dead letter", worker)
            if worker.alive:
                break
            assert worker.proc.wait() == 1, worker.tail()  # os._exit(1) in the task
            crashes += 1
        assert await get_all(good, timeout=45) == list(range(GOOD))
        await assert_queue_settled(project, worker)
        assert await crasher.state() == "PENDING"  # it never finished, so never stored
        worker.send(signal.SIGTERM)
        assert await worker.exited(30) == 0
    elapsed = time.monotonic() - started

    message = await dead_letter(project)
    assert message.headers["id"] == crasher.id
    deaths = message.headers["x-death"]
    assert isinstance(deaths, list)
    death = deaths[0]
    assert isinstance(death, dict)
    assert death["reason"] == "delivery_limit"
    assert death["queue"] == project.queue
    assert await project.ready(project.dlq) == 0
    runs = project.executions()
    assert runs[CRASHER] == crashes
    assert crashes == LIMIT + 1  # delivered once, then redelivered LIMIT times
    assert all(runs[n] == 1 for n in range(GOOD))
    figures.update(
        delivery_limit=LIMIT, crashes=crashes, worker_starts=crashes + 1,
        dead_lettered=1, dead_letter_reason=death["reason"], good_sent=GOOD,
        good_completed=GOOD, lost=0, total_s=elapsed,
    )
