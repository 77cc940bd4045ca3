"""Dramatiq adapter: one worker process with 64 threads (as Celery's ``-P threads -c 64``).

Two clients, so that the table says which is which:

* ``dramatiq`` (and ``dramatiq-p2``): Dramatiq's defaults. ``send()`` does not wait for a
  publisher confirm (``confirm_delivery=False``), so its enqueue rate and its round trip are
  not like for like with a confirmed ``delay()``; the table marks these rows;
* ``dramatiq-confirm``: the same worker and client with ``RabbitmqBroker(...,
  confirm_delivery=True)``, so every ``send()`` returns after RabbitMQ's confirm, as
  aioqueue's ``delay()`` does. Each such ``send()`` blocks until its confirm, so ``submit``
  issues them from 8 threads (each with its own channel: Dramatiq's broker keeps one per
  thread), as the Celery client does with ``confirm_publish`` on (when tried with 3,000
  calls: 2,800 sends/s against 1,000/s in one thread, and 1,190 against 740 no-op tasks/s
  end to end); the round trip is one ``send()`` in the calling thread. Its worker is the
  same as ``dramatiq``'s (the broker option only changes how messages are published), so it
  skips ``rss``, which measures only the worker.

Dramatiq's blocking result wait (``BRPOPLPUSH``) is push-based, so results are read one after
the other with ``get_result(block=True)``, which returns as soon as each is there. One process
like the asyncio workers (Dramatiq defaults to one per CPU); ``dramatiq-p2`` runs two, to set
beside ``aioqueue-p2``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.common import Context
from benchmarks.systems.base import Driver as BaseDriver
from benchmarks.systems.base import task_args
from benchmarks.systems.spec import System

THREADS = 64
CONFIRM_THREADS = 8


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
        confirm = self.broker.confirm_delivery
        self.threads = ThreadPoolExecutor(CONFIRM_THREADS) if confirm else None

    def submit(self, task: str, n: int, arg: float | None = None) -> list[Any]:
        actor, args = self.tasks[task], task_args(task, arg)
        if self.threads is not None:
            return list(self.threads.map(lambda _: actor.send(*args), range(n)))
        return [actor.send(*args) for _ in range(n)]

    def collect(self, handles: list[Any], timeout: float = 300.0) -> None:
        for message in handles:
            message.get_result(backend=self.backend, block=True, timeout=int(timeout * 1000))

    def roundtrip(self, timeout: float = 300.0) -> None:
        message = self.tasks["noop"].send()
        message.get_result(backend=self.backend, block=True, timeout=int(timeout * 1000))

    def close(self) -> None:
        if self.threads is not None:
            self.threads.shutdown()
        self.broker.close()


def _system(name: str, processes: int, confirm: bool = False) -> System:
    client = "send() waits for confirms" if confirm else "send() without confirms"
    skip: tuple[str, ...] = ("enqueue",) if processes > 1 else ()
    if confirm:
        skip += ("rss",)
    return System(
        name=name, label=f"Dramatiq ({processes} x {THREADS} threads; {client})",
        family="peer", worker_argv=_worker_argv(processes), driver=Driver,
        requires=("dramatiq", "pika"),
        queues=lambda ctx: [ctx.queue, f"{ctx.queue}.DQ", f"{ctx.queue}.XQ"],
        options=(("confirm", "1"),) if confirm else (),
        confirms=confirm, skip=skip,
    )


# The two-process row is there because aioqueue is also measured with --processes 2: a
# second core is compared with a second core (each Dramatiq process gets its 64 threads).
SYSTEMS = [_system("dramatiq", 1), _system("dramatiq-confirm", 1, confirm=True),
           _system("dramatiq-p2", 2)]
