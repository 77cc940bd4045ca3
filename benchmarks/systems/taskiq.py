"""taskiq adapter: one worker process (``--workers 1``), ``--max-async-tasks 1000``.

Fairness: taskiq's ``wait_result()`` polls Redis every ``check_interval`` (0.2 s by default);
the client passes 1 ms for the single round trip and 10 ms when collecting many results, read
one after the other (see aio_celery.py for why). ``kiq()`` waits for the publisher confirm
(aio-pika's default channel), as aioqueue's ``delay()`` does. One process like the other
asyncio workers (taskiq defaults to two).
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
        sys.executable, "-m", "taskiq", "worker", "benchmarks.apps.taskiq_app:broker",
        "--workers", "1", "--max-async-tasks", str(ASYNC_CONCURRENCY), "--log-level", "WARNING",
    ]


class Driver(AsyncDriver):
    async def astart(self) -> None:
        from benchmarks.apps import taskiq_app

        self.broker = taskiq_app.broker
        self.tasks = taskiq_app.TASKS
        await self.broker.startup()

    async def asubmit(self, task: str, n: int, arg: float | None) -> list[Any]:
        fn, args = self.tasks[task], task_args(task, arg)
        return list(await asyncio.gather(*(fn.kiq(*args) for _ in range(n))))

    async def acollect(self, handles: list[Any], timeout: float) -> None:
        for handle in handles:
            await handle.wait_result(check_interval=COLLECT_POLL, timeout=timeout)

    async def aroundtrip(self, timeout: float) -> None:
        handle = await self.tasks["noop"].kiq()
        await handle.wait_result(check_interval=ROUNDTRIP_POLL, timeout=timeout)

    async def aclose(self) -> None:
        await self.broker.shutdown()


SYSTEMS = [
    System(
        name="taskiq", label="taskiq (1 process, 1000 async tasks)", family="peer",
        worker_argv=worker_argv, driver=Driver,
        requires=("taskiq", "taskiq_aio_pika", "taskiq_redis"),
        queues=lambda ctx: [ctx.queue, f"{ctx.queue}.dead_letter"],
        exchanges=lambda ctx: [ctx.queue],
    ),
]
