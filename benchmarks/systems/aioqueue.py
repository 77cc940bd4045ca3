"""aioqueue adapters: ``-c 1000`` coroutines in one or two worker processes, on the standard
asyncio loop or on uvloop; clients ``await delay()``.

Five configurations, so that each effect shows on its own: ``aioqueue`` (one process, plain
asyncio: what ``pip install aioqueue`` runs; the targets are checked on it), ``aioqueue-p2``
(``--processes 2``, each process 500 of the 1,000 slots: how throughput grows with a second
core), ``aioqueue-uvloop`` and ``aioqueue-uvloop-p2`` (``aioqueue[uvloop]``, worker
``--loop uvloop`` and the client on uvloop too, as under uvicorn), and ``aioqueue-nofast``:
``aioqueue`` with the setting ``fast_paths`` off in worker and client (``app.conf.fast_paths
= False`` in the app module both import, plus ``AIOQUEUE_FAST_PATHS=0`` for the worker CLI),
so aioqueue's own wire code is out and only aio-pika/aiormq/redis-py's public API is used.
Its driver refuses to run if the client's setting is not what the row says, and the app
module writes "fast_paths off" to the worker's and the client's logs.

Fairness: the client issues calls with ``asyncio.gather`` and reads results with
``asyncio.gather(r.get())``, the documented way; ``delay()`` returns only after RabbitMQ
confirmed the message, which the blocking clients of Celery and Dramatiq do not wait for by
default (see the enqueue table). Log level WARNING, like every other worker here.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

from benchmarks.common import ASYNC_CONCURRENCY, Context
from benchmarks.systems.base import AsyncDriver, task_args
from benchmarks.systems.spec import System


def _worker_argv(processes: int, loop: str) -> Callable[[Context], list[str]]:
    def argv(ctx: Context) -> list[str]:
        return [
            sys.executable, "-m", "aioqueue.worker", "-A", "benchmarks.apps.aioqueue_app:app",
            "-c", str(ASYNC_CONCURRENCY), "-Q", ctx.queue, "-n", f"{ctx.queue}@%h",
            "-l", "WARNING", "--processes", str(processes), "--loop", loop,
        ]

    return argv


NOFAST = "aioqueue-nofast"


class Driver(AsyncDriver):
    #: What ``app.conf.fast_paths`` must be in this row's client (checked before connecting).
    fast_paths = True

    async def astart(self) -> None:
        from benchmarks.apps import aioqueue_app

        self.app = aioqueue_app.app
        self.tasks = aioqueue_app.TASKS
        if self.app.conf.fast_paths is not self.fast_paths:
            raise RuntimeError(f"client has fast_paths={self.app.conf.fast_paths}, "
                               f"the row wants {self.fast_paths}")
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


class UvloopDriver(Driver):
    use_uvloop = True


class NoFastDriver(Driver):
    fast_paths = False


def _system(name: str, label: str, processes: int, uvloop: bool,
            fast_paths: bool = True) -> System:
    driver: type[Driver] = UvloopDriver if uvloop else Driver
    if not fast_paths:
        driver = NoFastDriver
    return System(
        name=name, label=label, family="aioqueue",
        worker_argv=_worker_argv(processes, "uvloop" if uvloop else "asyncio"),
        driver=driver,
        requires=("aioqueue", "uvloop") if uvloop else ("aioqueue",),
        queues=lambda ctx: [ctx.queue], exchanges=lambda ctx: [ctx.queue],
        options=() if fast_paths else (("fast_paths", "0"),),
        env=() if fast_paths else (("AIOQUEUE_FAST_PATHS", "0"),),
        skip=("enqueue",) if processes > 1 else (),
    )


SYSTEMS = [
    _system("aioqueue", "aioqueue (-c 1000, 1 process, asyncio loop)", 1, False),
    _system(NOFAST, "aioqueue with fast_paths off (-c 1000, 1 process, asyncio loop)", 1, False,
            fast_paths=False),
    _system("aioqueue-p2", "aioqueue (-c 1000, --processes 2, asyncio loop)", 2, False),
    _system("aioqueue-uvloop", "aioqueue (-c 1000, 1 process, uvloop)", 1, True),
    _system("aioqueue-uvloop-p2", "aioqueue (-c 1000, --processes 2, uvloop)", 2, True),
]
