"""Stock Celery: plain ``def`` tasks, Redis results, Celery's defaults otherwise.

``time.sleep`` is the I/O stand-in; under ``-P gevent`` Celery monkeypatches it at start-up,
so it yields to other greenlets. Publisher confirms follow the client's ``confirm`` option
(off is Celery's default). Queue and exchange are the run's own, as Celery would name them.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from benchmarks.common import AppSettings
from benchmarks.signals import signal_done

S = AppSettings.from_env()

app = Celery("bench", broker=S.amqp_url, backend=S.redis_url if S.results else None)
app.conf.update(
    task_default_queue=S.queue,
    task_default_exchange=S.queue,
    task_default_routing_key=S.queue,
    result_expires=3600,
    result_backend_transport_options={"global_keyprefix": S.prefix},
    broker_transport_options={"confirm_publish": S.options.get("confirm") == "1"},
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.noop")
def noop() -> None:
    return None


@app.task(name="bench.noop_sig")
def noop_sig() -> None:
    signal_done()


@app.task(name="bench.sleep")
def sleep(seconds: float) -> None:
    time.sleep(seconds)


@app.task(name="bench.sleep_sig")
def sleep_sig(seconds: float) -> None:
    time.sleep(seconds)
    signal_done()


TASKS: dict[str, Any] = {"noop": noop, "noop_sig": noop_sig, "sleep": sleep,
                         "sleep_sig": sleep_sig}
