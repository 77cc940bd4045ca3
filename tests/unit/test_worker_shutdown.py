"""Stopping a worker: running tasks finish or go back; nothing acknowledged is lost."""

from __future__ import annotations

import anyio

from aioqueue import AioQueue

from .conftest import running_worker


async def test_running_task_finishes_within_the_shutdown_timeout(app: AioQueue) -> None:
    started = anyio.Event()
    release = anyio.Event()

    @app.task
    async def slow() -> str:
        started.set()
        await release.wait()
        return "done"

    async with running_worker(app, shutdown_timeout=5) as worker:
        r = await slow.delay()
        await started.wait()
        worker.stop()
        release.set()
    assert await r.get(timeout=1) == "done"


async def test_task_past_the_timeout_is_cancelled_and_requeued(app: AioQueue) -> None:
    attempts = 0
    first_started = anyio.Event()

    @app.task
    async def stubborn() -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            first_started.set()
            await anyio.sleep_forever()
        return attempts

    async with running_worker(app, shutdown_timeout=0.05) as worker:
        r = await stubborn.delay()
        await first_started.wait()
        worker.stop()
    assert await r.state() == "PENDING"
    async with running_worker(app):
        assert await r.get(timeout=5) == 2


async def test_prefetched_messages_go_back_and_all_run(app: AioQueue) -> None:
    started = anyio.Event()
    seen: list[int] = []

    @app.task
    async def job(n: int) -> int:
        seen.append(n)
        if n == 0:
            started.set()
            await anyio.sleep_forever()
        return n

    async with running_worker(app, concurrency=1, prefetch_multiplier=4, shutdown_timeout=0):
        results = [await job.delay(n) for n in range(6)]
        await started.wait()
    assert seen == [0]
    seen.clear()

    @app.task(name=job.name)
    async def job_fixed(n: int) -> int:
        seen.append(n)
        return n

    async with running_worker(app, concurrency=2):
        for n, r in enumerate(results):
            assert await r.get(timeout=5) == n
    assert sorted(seen) == list(range(6))


async def test_immediate_stop_cancels_at_once(app: AioQueue) -> None:
    started = anyio.Event()

    @app.task
    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    with anyio.fail_after(3):
        async with running_worker(app, shutdown_timeout=60) as worker:
            await forever.delay()
            await started.wait()
            worker.stop(immediate=True)


async def test_early_ack_task_is_not_redelivered(app: AioQueue) -> None:
    started = anyio.Event()
    runs = 0

    @app.task(acks_late=False)
    async def once() -> None:
        nonlocal runs
        runs += 1
        started.set()
        await anyio.sleep_forever()

    async with running_worker(app, shutdown_timeout=0) as worker:
        await once.delay()
        await started.wait()
        worker.stop()
    broker = await app.get_broker()
    async with broker.consume(["celery"], prefetch=1) as consumer:
        with anyio.move_on_after(0.05) as nothing_left:
            await consumer.receive()
    assert nothing_left.cancelled_caught
    assert runs == 1
