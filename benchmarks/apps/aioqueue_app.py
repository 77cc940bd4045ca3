"""aioqueue: ``async def`` tasks on RabbitMQ, Redis results, library defaults otherwise.

Defaults kept: late acknowledgement (ack after the result is stored), publisher confirms on
every ``delay()``, prefetch = concurrency x 4. Concurrency is set on the command line.

``fast_paths`` is the library default (on) unless the run's ``fast_paths`` option is "0"
(``aioqueue-nofast``: aio-pika, aiormq and redis-py public API only). It is set here, in the
module both the worker and the client import, so both sides of a row agree; the worker of
that row also gets ``AIOQUEUE_FAST_PATHS=0``, as a user would set it for the worker CLI. When
off, the module says so on stderr (the worker's and the client's logs).
"""

from __future__ import annotations

import asyncio
import sys
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
    fast_paths=S.options.get("fast_paths", "1") != "0",
)
if not app.conf.fast_paths:
    print("aioqueue_app: fast_paths off", file=sys.stderr, flush=True)


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
