"""Unit-test fixtures: an app on memory:// and an in-process worker running the real loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from aioqueue import AioQueue
from aioqueue.brokers import memory as memory_broker
from aioqueue.results import memory as memory_store
from aioqueue.worker import Worker


@pytest.fixture
async def app(unique: str) -> AsyncIterator[AioQueue]:
    url = f"memory://{unique}"
    application = AioQueue("tests", broker=url, backend=url)
    yield application
    await application.close()
    memory_broker.reset(url)
    memory_store.reset(url)


@pytest.fixture
async def worker(app: AioQueue) -> AsyncIterator[Worker]:
    """A worker consuming the app's default queue for the duration of the test.

    pytest-asyncio runs a fixture's setup and teardown in different tasks, so a task group
    cannot span them; the fixture owns a plain task and awaits it at teardown.
    """
    w = Worker(app, concurrency=10, shutdown_timeout=2)
    running = asyncio.create_task(w.run())
    with anyio.fail_after(5):
        await w.started.wait()
    yield w
    w.stop()
    with anyio.fail_after(10):
        await running


@asynccontextmanager
async def running_worker(app: AioQueue, **options: Any) -> AsyncIterator[Worker]:
    """Run a worker inside the test's own task group; stops it on exit."""
    options.setdefault("shutdown_timeout", 2)
    w = Worker(app, **options)
    async with anyio.create_task_group() as tg:
        tg.start_soon(w.run)
        with anyio.fail_after(5):
            await w.started.wait()
        try:
            yield w
        finally:
            w.stop()
