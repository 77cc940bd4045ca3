"""aio-celery adapter: one worker process, ``-c 1000``, the same prefetch as aioqueue.

Fairness: aio-celery's ``AsyncResult.get()`` polls Redis every ``interval`` seconds (0.5 by
default), which would turn every latency into a multiple of half a second. The client passes
1 ms for the single round trip and 10 ms when collecting many results (read one after the
other: once the first is ready the rest mostly are, and 10,000 concurrent pollers would only
load Redis). Its ``delay()`` waits for the publisher confirm, as aioqueue's does.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from benchmarks.common import ASYNC_CONCURRENCY, Context
from benchmarks.systems.base import AsyncDriver, task_args
from benchmarks.systems.spec import System

ROUNDTRIP_POLL = 0.001
COLLECT_POLL = 0.01


def worker_argv(ctx: Context) -> list[str]:
    return [
        sys.executable, "-m", "aio_celery", "worker", "benchmarks.apps.aio_celery_app:app",
        "-c", str(ASYNC_CONCURRENCY), "-Q", ctx.queue, "-l", "WARNING",
    ]


class Driver(AsyncDriver):
    async def astart(self) -> None:
        from benchmarks.apps import aio_celery_app

        self.app = aio_celery_app.app
        self.tasks = aio_celery_app.TASKS
        self.setup = self.app.setup()
        await self.setup.__aenter__()

    async def asubmit(self, task: str, n: int, arg: float | None) -> list[Any]:
        fn, args = self.tasks[task], task_args(task, arg)
        return list(await asyncio.gather(*(fn.delay(*args) for _ in range(n))))

    async def acollect(self, handles: list[Any], timeout: float) -> None:
        for handle in handles:
            await handle.get(timeout=timeout, interval=COLLECT_POLL)

    async def aroundtrip(self, timeout: float) -> None:
        r = await self.tasks["noop"].delay()
        await r.get(timeout=timeout, interval=ROUNDTRIP_POLL)

    async def aclose(self) -> None:
        await self.setup.__aexit__(None, None, None)


SYSTEMS = [
    System(
        name="aio-celery", label="aio-celery (-c 1000)", family="peer",
        worker_argv=worker_argv, driver=Driver,
        requires=("aio_celery",),
        queues=lambda ctx: [ctx.queue],
        redis_patterns=lambda ctx: ["celery-task-meta-*"],
    ),
]
