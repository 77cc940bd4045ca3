"""aio-celery: another asyncio implementation of Celery's protocol; Redis results.

Its inspection HTTP server is bound (not served) even when disabled, so it gets port 0 (any
free port) instead of the fixed default. With no result backend, results are ignored.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

from aio_celery import Celery

from benchmarks.common import AppSettings
from benchmarks.signals import signal_done

S = AppSettings.from_env()

app = Celery("bench")
app.conf.update(
    broker_url=S.amqp_url,
    result_backend=S.redis_url if S.results else None,
    task_ignore_result=not S.results,
    task_default_queue=S.queue,
    result_expires=datetime.timedelta(hours=1),
    inspection_http_server_port=0,
)


@app.task(name="bench.noop")
async def noop() -> None:
    return None


@app.task(name="bench.noop_sig")
async def noop_sig() -> None:
    signal_done()


@app.task(name="bench.sleep")
async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


@app.task(name="bench.sleep_sig")
async def sleep_sig(seconds: float) -> None:
    await asyncio.sleep(seconds)
    signal_done()


TASKS: dict[str, Any] = {"noop": noop, "noop_sig": noop_sig, "sleep": sleep,
                         "sleep_sig": sleep_sig}
