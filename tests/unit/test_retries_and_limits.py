"""Retries (self.retry, autoretry_for, backoff), time limits, and revocation in the worker."""

from __future__ import annotations

import itertools
import time
from typing import Any

import anyio
import pytest

from aioqueue import AioQueue, Task, TaskRevokedError
from aioqueue.exceptions import MaxRetriesExceededError, SoftTimeLimitExceeded, TimeLimitExceeded

from .conftest import running_worker


async def test_self_retry_runs_again_with_retries_counted(app: AioQueue) -> None:
    seen: list[int] = []

    @app.task(bind=True)
    async def flaky(self: Task[Any, Any], n: int) -> list[int]:
        seen.append(self.request.retries)
        if self.request.retries < 2:
            raise self.retry(exc=KeyError("transient"), countdown=0)
        return [n, self.request.retries]

    async with running_worker(app):
        r = await flaky.delay(7)
        assert await r.get(timeout=5) == [7, 2]
    assert seen == [0, 1, 2]


async def test_retry_state_is_visible(app: AioQueue) -> None:
    @app.task(bind=True)
    async def later(self: Task[Any, Any]) -> str:
        if self.request.retries == 0:
            raise self.retry(exc=KeyError("not yet"), countdown=30)
        return "done"

    async with running_worker(app, shutdown_timeout=0):
        r = await later.delay()
        store = await app.get_result_store()
        assert store is not None
        with pytest.raises(TimeoutError):  # RETRY is not a ready state: wait() goes on
            await store.wait(r.id, timeout=0.3)
        meta = await store.get(r.id)
        assert meta is not None and meta["status"] == "RETRY" and await r.state() == "RETRY"
        assert meta["children"] == [[[r.id, None], None]]
        info = await r.info()
        assert isinstance(info, KeyError)


async def test_max_retries_exceeded(app: AioQueue) -> None:
    @app.task(bind=True, max_retries=2)
    async def never(self: Task[Any, Any]) -> None:
        raise self.retry(countdown=0)

    @app.task(bind=True, max_retries=1)
    async def with_exc(self: Task[Any, Any]) -> None:
        raise self.retry(exc=ValueError("original"), countdown=0)

    async with running_worker(app):
        with pytest.raises(MaxRetriesExceededError):
            await (await never.delay()).get(timeout=5)
        with pytest.raises(ValueError, match="original"):
            await (await with_exc.delay()).get(timeout=5)


async def test_autoretry_for_with_backoff(app: AioQueue) -> None:
    attempts: list[float] = []

    @app.task(autoretry_for=(ConnectionError,), retry_backoff=0.05, retry_jitter=False,
              max_retries=3)
    async def connect() -> int:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionError("down")
        return len(attempts)

    @app.task(autoretry_for=(ConnectionError,), max_retries=1, retry_kwargs={"countdown": 0})
    async def hopeless() -> None:
        raise ConnectionError("always")

    @app.task(autoretry_for=(ConnectionError,))
    async def other_error() -> None:
        raise ValueError("not retried")

    async with running_worker(app):
        assert await (await connect.delay()).get(timeout=5) == 3
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert gaps[0] >= 0.04 and gaps[1] >= 0.09  # 0.05 * 2**0, then 0.05 * 2**1
        with pytest.raises(ConnectionError):
            await (await hopeless.delay()).get(timeout=5)
        with pytest.raises(ValueError):
            await (await other_error.delay()).get(timeout=5)


async def test_eager_retries() -> None:
    app = AioQueue("t", broker="memory://unused", task_always_eager=True)
    calls = 0

    @app.task(bind=True)
    def flaky(self: Task[Any, Any]) -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise self.retry(countdown=60)
        return calls

    assert await (await flaky.delay()).get() == 3


async def test_soft_limit_is_raised_inside_the_coroutine(app: AioQueue) -> None:
    @app.task(soft_time_limit=0.1, time_limit=5)
    async def careful() -> str:
        try:
            await anyio.sleep(10)
        except SoftTimeLimitExceeded:
            await anyio.sleep(0.01)  # it may still await while it cleans up
            return "cleaned up"
        return "finished"

    async with running_worker(app):
        assert await (await careful.delay()).get(timeout=5) == "cleaned up"


async def test_hard_limit_stops_the_task(app: AioQueue) -> None:
    @app.task(time_limit=0.1)
    async def stuck() -> None:
        await anyio.sleep(10)

    @app.task
    async def quick() -> int:
        return 1

    async with running_worker(app):
        r = await stuck.delay()
        with pytest.raises(TimeLimitExceeded):
            await r.get(timeout=5)
        assert await r.state() == "FAILURE"
        assert await (await quick.delay()).get(timeout=5) == 1


async def test_limits_from_apply_async_and_settings(app: AioQueue) -> None:
    @app.task
    async def nap(seconds: float) -> None:
        await anyio.sleep(seconds)

    async with running_worker(app):
        with pytest.raises(TimeLimitExceeded):
            await (await nap.apply_async((10,), time_limit=0.1)).get(timeout=5)
        app.conf.task_time_limit = 0.1
        with pytest.raises(TimeLimitExceeded):
            await (await nap.delay(10)).get(timeout=5)


async def test_limits_in_threads(app: AioQueue) -> None:
    @app.task(soft_time_limit=0.1, time_limit=5)
    def busy_python() -> str:
        deadline = time.monotonic() + 5
        try:
            while time.monotonic() < deadline:  # Python code: interrupted at once
                pass
        except SoftTimeLimitExceeded:
            return "interrupted"
        return "ran to the end"

    @app.task(time_limit=0.1)
    def blocked() -> None:
        time.sleep(0.5)  # a C call: the thread cannot be stopped, the worker stops waiting

    async with running_worker(app):
        assert await (await busy_python.delay()).get(timeout=5) == "interrupted"
        started = time.monotonic()
        with pytest.raises(TimeLimitExceeded):
            await (await blocked.delay()).get(timeout=5)
        assert time.monotonic() - started < 0.45


async def test_revoked_task_is_skipped_and_running_one_terminated(app: AioQueue) -> None:
    started = anyio.Event()

    @app.task
    async def long() -> None:
        started.set()
        await anyio.sleep(30)

    @app.task
    async def short() -> int:
        return 1

    async with running_worker(app) as worker:
        skip = await short.apply_async(countdown=0.3)
        worker.revoke([skip.id])
        with pytest.raises(TaskRevokedError, match="revoked"):
            await skip.get(timeout=5)
        r = await long.delay()
        await started.wait()
        worker.revoke([r.id], terminate=True)
        with pytest.raises(TaskRevokedError, match="terminated"):
            await r.get(timeout=5)
        assert await r.state() == "REVOKED"


async def test_revoke_through_remote_control(app: AioQueue) -> None:
    started = anyio.Event()

    @app.task
    async def long() -> None:
        started.set()
        await anyio.sleep(30)

    @app.task
    async def short() -> int:
        return 1

    async with running_worker(app):
        later = await short.apply_async(countdown=0.5)
        await later.revoke()
        with pytest.raises(TaskRevokedError, match="revoked"):
            await later.get(timeout=5)
        r = await long.delay()
        await started.wait()
        await app.control.revoke(r.id, terminate=True)
        with pytest.raises(TaskRevokedError, match="terminated"):
            await r.get(timeout=5)
        assert await (await short.delay()).get(timeout=5) == 1
