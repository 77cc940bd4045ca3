"""taskiq with taskiq-aio-pika (RabbitMQ) and taskiq-redis (results).

Two settings differ from taskiq-aio-pika's defaults, both in taskiq's favour or for parity:
classic queues instead of its default quorum queues (every other system here uses classic
durable queues; quorum queues replicate through a Raft log and are slower on one node), and
``qos`` (RabbitMQ prefetch) of concurrency x 4 like aioqueue's instead of 10. Ack after the
result is saved (taskiq's default), like aioqueue's late ack.
"""

from __future__ import annotations

import asyncio
from typing import Any

from taskiq_aio_pika import AioPikaBroker, Exchange, Queue, QueueType
from taskiq_redis import RedisAsyncResultBackend

from benchmarks.common import ASYNC_CONCURRENCY, PREFETCH_MULTIPLIER, AppSettings
from benchmarks.signals import signal_done

S = AppSettings.from_env()

broker = AioPikaBroker(
    url=S.amqp_url,
    qos=ASYNC_CONCURRENCY * PREFETCH_MULTIPLIER,
    exchange=Exchange(name=S.queue),
    task_queues=[Queue(name=S.queue, type=QueueType.CLASSIC)],
    dead_letter_queue=Queue(name=f"{S.queue}.dead_letter", type=QueueType.CLASSIC),
)
if S.results:
    broker = broker.with_result_backend(
        RedisAsyncResultBackend(S.redis_url, prefix_str=f"{S.prefix}taskiq", result_ex_time=3600)
    )


@broker.task(task_name="bench.noop")
async def noop() -> None:
    return None


@broker.task(task_name="bench.noop_sig")
async def noop_sig() -> None:
    signal_done()


@broker.task(task_name="bench.sleep")
async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


@broker.task(task_name="bench.sleep_sig")
async def sleep_sig(seconds: float) -> None:
    await asyncio.sleep(seconds)
    signal_done()


TASKS: dict[str, Any] = {"noop": noop, "noop_sig": noop_sig, "sleep": sleep,
                         "sleep_sig": sleep_sig}
