"""A pytest plugin for your own tests: your tasks, a real worker loop, no servers.

Registered as the ``aioqueue`` pytest plugin (entry point ``pytest11``), so these fixtures are
available as soon as aioqueue is installed. Override ``aioqueue_app`` to return your app::

    # conftest.py
    import pytest
    from tasks import app

    @pytest.fixture
    def aioqueue_app():
        return app

    # test_tasks.py
    async def test_add(aioqueue_worker):
        r = await add.delay(1, 2)
        assert await r.get(timeout=5) == 3

Fixtures:

- ``aioqueue_config``: settings applied to the app for the test (restored afterwards).
- ``aioqueue_app``: the app under test (a fresh ``AioQueue`` unless you override it).
- ``aioqueue_worker``: points the app at a private ``memory://`` broker and result store and
  runs an in-process worker (the real consume loop) around the test.
- ``aioqueue_eager``: runs tasks inline instead (``task_always_eager``), no worker at all.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import pytest

try:
    from pytest_asyncio import fixture as async_fixture
except ImportError:  # pragma: no cover - with anyio's pytest plugin, plain fixtures do
    async_fixture = pytest.fixture  # type: ignore[assignment]

from .app import AioQueue
from .brokers import memory as memory_broker
from .results import memory as memory_store
from .worker import Worker

__all__ = (
    "aioqueue_app",
    "aioqueue_config",
    "aioqueue_eager",
    "aioqueue_worker",
    "aioqueue_worker_parameters",
    "configured",
    "in_memory",
)


@contextmanager
def configured(app: AioQueue, settings: dict[str, Any]) -> Iterator[AioQueue]:
    """Apply settings to the app for the duration of the block, then restore them."""
    saved = {name: app.conf[name] for name in settings}
    app.conf.update(settings)
    try:
        yield app
    finally:
        app.conf.update(saved)


@asynccontextmanager
async def in_memory(app: AioQueue) -> AsyncIterator[AioQueue]:
    """Point the app at a private ``memory://`` broker and result store, then restore it."""
    url = f"memory://aioqueue-test-{uuid.uuid4().hex}"
    broker = app._broker_instance or app.conf.broker_url
    backend = app._store_instance or app.conf.result_backend
    await app.use(broker=url, backend=url)
    try:
        yield app
    finally:
        await app.use(broker=broker, backend=backend)
        memory_broker.reset(url)
        memory_store.reset(url)


@pytest.fixture
def aioqueue_config() -> dict[str, Any]:
    """Settings for the app under test; override to change them."""
    return {}


@pytest.fixture
def aioqueue_worker_parameters() -> dict[str, Any]:
    """Keyword arguments for the in-process ``Worker``; override to change them."""
    return {"concurrency": 10, "shutdown_timeout": 5.0}


@pytest.fixture
def aioqueue_app(aioqueue_config: dict[str, Any]) -> Iterator[AioQueue]:
    """The app under test. Override it to return your own app."""
    app = AioQueue("aioqueue-test", broker="memory://")
    with configured(app, aioqueue_config):
        yield app


@async_fixture
async def aioqueue_worker(
    aioqueue_app: AioQueue,
    aioqueue_config: dict[str, Any],
    aioqueue_worker_parameters: dict[str, Any],
) -> AsyncIterator[Worker]:
    """A worker running the app's tasks on a private ``memory://`` broker for the test."""
    with configured(aioqueue_app, aioqueue_config):
        async with in_memory(aioqueue_app):
            worker = Worker(aioqueue_app, **aioqueue_worker_parameters)
            # pytest-asyncio runs setup and teardown in different tasks, so no task group can
            # span them: the fixture owns this task and awaits it at teardown.
            running = asyncio.create_task(worker.run())
            started = asyncio.create_task(worker.started.wait())
            await asyncio.wait({running, started}, return_when=asyncio.FIRST_COMPLETED)
            if running.done():
                started.cancel()
                running.result()  # the worker failed to start: raise why
            try:
                yield worker
            finally:
                worker.stop()
                with anyio.fail_after(worker.shutdown_timeout + 5):
                    await running


@pytest.fixture
def aioqueue_eager(
    aioqueue_app: AioQueue, aioqueue_config: dict[str, Any]
) -> Iterator[AioQueue]:
    """Run tasks inline on ``delay()`` (``task_always_eager``) for the test."""
    with configured(aioqueue_app, {**aioqueue_config, "task_always_eager": True}):
        yield aioqueue_app
