"""aioqueue adapter: one worker process, ``-c 1000`` coroutines, clients ``await delay()``.

Fairness: the client issues calls with ``asyncio.gather`` and reads results with
``asyncio.gather(r.get())``, the documented way; ``delay()`` returns only after RabbitMQ
confirmed the message, which the blocking clients of Celery and Dramatiq do not wait for by
default (see the enqueue table). Log level WARNING, like every other worker here.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from benchmarks.common import ASYNC_CONCURRENCY, Context
from benchmarks.systems.base import AsyncDriver, task_args
from benchmarks.systems.spec import System


def worker_argv(ctx: Context) -> list[str]:
    return [
        sys.executable, "-m", "aioqueue.worker", "-A", "benchmarks.apps.aioqueue_app:app",
        "-c", str(ASYNC_CONCURRENCY), "-Q", ctx.queue, "-n", f"{ctx.queue}@%h", "-l", "WARNING",
    ]


class Driver(AsyncDriver):
    async def astart(self) -> None:
        from benchmarks.apps import aioqueue_app

        self.app = aioqueue_app.app
        self.tasks = aioqueue_app.TASKS
        await self.app.connect()

    async def asubmit(self, task: str, n: int, arg: float | None) -> list[Any]:
        fn, args = self.tasks[task], task_args(task, arg)
        return list(await asyncio.gather(*(fn.delay(*args) for _ in range(n))))

    async def acollect(self, handles: list[Any], timeout: float) -> None:
        await asyncio.gather(*(h.get(timeout=timeout) for h in handles))

    async def aroundtrip(self, timeout: float) -> None:
        r = await self.tasks["noop"].delay()
        await r.get(timeout=timeout)

    async def aclose(self) -> None:
        await self.app.close()


SYSTEMS = [
    System(
        name="aioqueue", label="aioqueue (-c 1000)", family="aioqueue",
        worker_argv=worker_argv, driver=Driver, requires=("aioqueue",),
        queues=lambda ctx: [ctx.queue], exchanges=lambda ctx: [ctx.queue],
    ),
]
