"""aioqueue: ``async def`` tasks on RabbitMQ, Redis results, library defaults otherwise.

Defaults kept: late acknowledgement (ack after the result is stored), publisher confirms on
every ``delay()``, prefetch = concurrency x 4. Concurrency is set on the command line.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aioqueue import AioQueue
from benchmarks.common import AppSettings
from benchmarks.signals import signal_done

S = AppSettings.from_env()

app = AioQueue(
    "bench",
    broker=S.amqp_url,
    backend=S.redis_url if S.results else None,
    task_default_queue=S.queue,
    result_expires=3600,
    result_backend_transport_options={"global_keyprefix": S.prefix},
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
