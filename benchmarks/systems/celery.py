"""Stock Celery adapter: three pools, the same app and the same blocking client.

Fairness to Celery:

* every pool runs with ``--without-heartbeat --without-gossip --without-mingle``: under
  ``-P gevent`` on RabbitMQ the heartbeat/gossip machinery stalls about 100 ms per message
  otherwise, and the three flags only remove start-up and background traffic in the other
  pools, so all three get them;
* ``delay()`` is called in a plain loop: with confirms off (Celery's default) it returns
  without waiting, and client threads only made it slower (5,300/s in one thread against
  2,600-3,000/s with 8-32 threads when tried). With ``confirm_publish`` on each call blocks
  until its confirm, so there the client uses 8 threads (2,500/s against 1,100/s sequential
  and 1,700/s with 32 threads);
* results are read with ``ResultSet(...).get()``, Celery's native Redis join (one ``MGET``
  of every pending key per poll), with a 50 ms poll instead of its 0.5 s default so the last
  result is not read up to half a second late. One ``get()`` per task and 10 ms polls were
  tried as well: at 5,000 tasks all were within noise of each other, the worker being the
  bottleneck;
* the enqueue table shows Celery twice: ``confirm_publish`` off (default, not comparable to a
  confirmed ``delay()``) and on (comparable).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.common import Context
from benchmarks.systems.base import Driver as BaseDriver
from benchmarks.systems.base import task_args
from benchmarks.systems.spec import System

POOLS = {"prefork": 2, "threads": 64, "gevent": 256}
CONFIRM_THREADS = 8
JOIN_INTERVAL = 0.05  # ResultSet.get()'s Redis join polls MGET this often (default 0.5 s)


def _argv(pool: str) -> Any:
    def worker_argv(ctx: Context) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", "benchmarks.apps.celery_app:app", "worker",
            "-P", pool, "-c", str(POOLS[pool]), "-Q", ctx.queue, "-n", f"{ctx.queue}@%h",
            "-l", "WARNING", "--without-heartbeat", "--without-gossip", "--without-mingle",
        ]

    return worker_argv


class Driver(BaseDriver):
    def start(self) -> None:
        from celery.result import ResultSet

        from benchmarks.apps import celery_app

        self.app = celery_app.app
        self.tasks = celery_app.TASKS
        self.result_set = ResultSet
        confirm = self.app.conf.broker_transport_options.get("confirm_publish")
        self.threads = ThreadPoolExecutor(CONFIRM_THREADS) if confirm else None

    def submit(self, task: str, n: int, arg: float | None = None) -> list[Any]:
        fn, args = self.tasks[task], task_args(task, arg)
        if self.threads is not None:
            return list(self.threads.map(lambda _: fn.delay(*args), range(n)))
        return [fn.delay(*args) for _ in range(n)]

    def collect(self, handles: list[Any], timeout: float = 300.0) -> None:
        self.result_set(handles, app=self.app).get(timeout=timeout, interval=JOIN_INTERVAL)

    def roundtrip(self, timeout: float = 300.0) -> None:
        self.tasks["noop"].delay().get(timeout=timeout)

    def close(self) -> None:
        if self.threads is not None:
            self.threads.shutdown()
        self.app.close()


_ENQUEUE_ROWS = (
    ("celery (confirm off)", (("confirm", "0"),)),
    ("celery (confirm on)", (("confirm", "1"),)),
)

SYSTEMS = [
    System(
        name=f"celery-{pool}", label=f"Celery -P {pool} -c {count}", family="celery",
        worker_argv=_argv(pool), driver=Driver,
        requires=("celery", "gevent") if pool == "gevent" else ("celery",),
        queues=lambda ctx: [ctx.queue], exchanges=lambda ctx: [ctx.queue],
        enqueue_rows=_ENQUEUE_ROWS, confirms=False,  # Celery's default; see the enqueue rows
    )
    for pool, count in POOLS.items()
]
