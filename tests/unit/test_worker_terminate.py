"""``revoke(terminate=True)`` cancels the handler's task; the worker tells that cancel apart.

Handlers are plain asyncio tasks (not anyio task-group children), so termination is one
``Task.cancel()`` that ``Worker`` withdraws (``uncancel``) and turns into a REVOKED failure,
while a shutdown's cancel requeues the message. These run on memory://, in-process.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest

from aioqueue import AioQueue, TaskRevokedError

from .conftest import running_worker


async def test_a_task_that_swallows_the_cancel_finishes_and_the_worker_goes_on(
    app: AioQueue,
) -> None:
    started = anyio.Event()

    @app.task
    async def stubborn() -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # a task may refuse: it then finishes normally
        await asyncio.sleep(0.01)  # and can still await afterwards
        return "kept going"

    @app.task
    async def plain() -> int:
        return 2

    async with running_worker(app, concurrency=2) as worker:
        r = await stubborn.delay()
        await started.wait()
        worker.revoke([r.id], terminate=True)
        assert await r.get(timeout=5) == "kept going"
        assert await (await plain.delay()).get(timeout=5) == 2


async def test_terminating_twice_is_one_termination(app: AioQueue) -> None:
    started = anyio.Event()

    @app.task
    async def long() -> None:
        started.set()
        await asyncio.sleep(30)

    async with running_worker(app) as worker:
        r = await long.delay()
        await started.wait()
        worker.revoke([r.id], terminate=True)
        worker.revoke([r.id], terminate=True)
        with pytest.raises(TaskRevokedError, match="terminated"):
            await r.get(timeout=5)
