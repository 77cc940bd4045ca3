"""Celery's first steps, with await, against the real RabbitMQ and Redis (and rpc://)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from aioqueue import AioQueue, NotRegistered, ResultUnavailableError, Task, TimeoutError
from aioqueue.worker import Worker

from .conftest import eventually

pytestmark = pytest.mark.integration


class CustomError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)


def register(app: AioQueue) -> dict[str, Task[Any, Any]]:
    @app.task(name="e2e.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="e2e.fail")
    async def fail(code: int) -> None:
        raise CustomError(code, "bad")

    @app.task(name="e2e.sync")
    def sync_mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="e2e.wait", bind=True)
    async def wait(self: Task[Any, Any], seconds: float) -> str:
        await anyio.sleep(seconds)
        return str(self.request.id)

    @app.task(name="e2e.fire", ignore_result=True)
    async def fire() -> None:
        return None

    return {"add": add, "fail": fail, "sync": sync_mul, "wait": wait, "fire": fire}


@pytest.fixture
def tasks(real_app: AioQueue) -> dict[str, Task[Any, Any]]:
    return register(real_app)


async def test_first_steps(real_app: AioQueue, tasks: dict[str, Task[Any, Any]],
                           real_worker: Worker) -> None:
    r = await tasks["add"].delay(4, 4)
    assert await r.get(timeout=10) == 8
    assert await r.ready() and await r.successful() and not await r.failed()
    assert await r.state() == "SUCCESS"
    assert await r == 8
    assert await (await tasks["sync"].delay(6, 7)).get(timeout=10) == 42


async def test_failure_keeps_its_type(
    tasks: dict[str, Task[Any, Any]], real_worker: Worker
) -> None:
    r = await tasks["fail"].delay(7)
    with pytest.raises(CustomError) as info:
        await r.get(timeout=10)
    assert info.value.args == (7, "bad")
    exc = await r.get(propagate=False)
    assert isinstance(exc, CustomError)
    assert await r.state() == "FAILURE"
    tb = await r.traceback()
    assert tb is not None and "CustomError" in tb


async def test_concurrent_tasks_run_at_once(
    tasks: dict[str, Task[Any, Any]], real_worker: Worker
) -> None:
    with anyio.fail_after(8):  # 20 x 0.5 s one after another would take 10 s
        results = [await tasks["wait"].delay(0.5) for _ in range(20)]
        for r in results:
            assert await r.get(timeout=8) == r.id


async def test_send_task_and_unknown_task(real_app: AioQueue, real_worker: Worker) -> None:
    r = await real_app.send_task("e2e.nope", [1])
    with pytest.raises(NotRegistered):
        await r.get(timeout=10)


async def test_timeout_and_ignore_result(
    real_app: AioQueue, tasks: dict[str, Task[Any, Any]], real_worker: Worker
) -> None:
    with pytest.raises(TimeoutError):
        await real_app.AsyncResult("never-sent-" + real_worker.queues[0]).get(timeout=0.2)
    r = await tasks["fire"].delay()
    with pytest.raises(ResultUnavailableError):
        await r.get(timeout=1)


async def test_track_started(real_app: AioQueue, tasks: dict[str, Task[Any, Any]]) -> None:
    real_app.conf.task_track_started = True
    worker = Worker(real_app, concurrency=2, shutdown_timeout=5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        r = await tasks["wait"].delay(1.0)

        async def started() -> bool:
            return await r.state() == "STARTED"

        await eventually(started)
        assert await r.get(timeout=10) == r.id
        worker.stop()


async def test_concurrency_bounds_tasks_running_at_once(real_app: AioQueue) -> None:
    # Deliveries go to handlers straight from the connection's reader: still one permit each.
    now = peak = 0

    @real_app.task(name="e2e.count")
    async def count() -> None:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await anyio.sleep(0.05)
        now -= 1

    worker = Worker(real_app, concurrency=3, prefetch_multiplier=4, shutdown_timeout=5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        with anyio.fail_after(10):
            await worker.started.wait()
            results = [await count.delay() for _ in range(15)]
            for r in results:
                await r.get(timeout=8)
        worker.stop()
    assert peak == 3 and worker.running == 0
