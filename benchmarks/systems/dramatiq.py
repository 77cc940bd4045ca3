"""Dramatiq adapter: one worker process with 64 threads (as Celery's ``-P threads -c 64``).

Fairness: Dramatiq's ``send()`` does not wait for a publisher confirm by default
(``confirm_delivery=False``), so its enqueue rate is not comparable to a confirmed
``delay()``; the table says so. Its blocking result wait (``BRPOPLPUSH``) is push-based, so
results are read one after the other with ``get_result(block=True)``, which returns as soon as
each is there. One process like the asyncio workers (Dramatiq defaults to one per CPU);
``dramatiq-p2`` runs two, to set beside ``aioqueue-p2``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from benchmarks.common import Context
from benchmarks.systems.base import Driver as BaseDriver
from benchmarks.systems.base import task_args
from benchmarks.systems.spec import System

THREADS = 64


def _worker_argv(processes: int) -> Callable[[Context], list[str]]:
    def argv(ctx: Context) -> list[str]:
        return [
            sys.executable, "-m", "dramatiq", "benchmarks.apps.dramatiq_app",
            "--processes", str(processes), "--threads", str(THREADS), "--queues", ctx.queue,
        ]

    return argv


class Driver(BaseDriver):
    def start(self) -> None:
        from benchmarks.apps import dramatiq_app

        self.tasks = dramatiq_app.TASKS
        self.backend = dramatiq_app.backend
        self.broker = dramatiq_app.broker

    def submit(self, task: str, n: int, arg: float | None = None) -> list[Any]:
        actor, args = self.tasks[task], task_args(task, arg)
        return [actor.send(*args) for _ in range(n)]

    def collect(self, handles: list[Any], timeout: float = 300.0) -> None:
        for message in handles:
            message.get_result(backend=self.backend, block=True, timeout=int(timeout * 1000))

    def roundtrip(self, timeout: float = 300.0) -> None:
        message = self.tasks["noop"].send()
        message.get_result(backend=self.backend, block=True, timeout=int(timeout * 1000))

    def close(self) -> None:
        self.broker.close()


def _system(name: str, processes: int) -> System:
    return System(
        name=name, label=f"Dramatiq ({processes} x {THREADS} threads)",
        family="peer", worker_argv=_worker_argv(processes), driver=Driver,
        requires=("dramatiq", "pika"),
        queues=lambda ctx: [ctx.queue, f"{ctx.queue}.DQ", f"{ctx.queue}.XQ"],
        skip=("enqueue",) if processes > 1 else (),
    )


# The two-process row is there because aioqueue is also measured with --processes 2: a
# second core is compared with a second core (each Dramatiq process gets its 64 threads).
SYSTEMS = [_system("dramatiq", 1), _system("dramatiq-p2", 2)]
