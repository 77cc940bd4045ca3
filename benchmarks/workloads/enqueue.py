"""Workload 1, enqueue rate: ``n`` ``delay()`` calls issued concurrently from one client.

Timed from the first call to the return of the last; no worker runs, so the client, RabbitMQ
and nothing else share the machine, and no result backend is configured (Celery's ``delay()``
would otherwise also subscribe to each result's channel). The messages are purged afterwards.
What "returned" means differs, and the table shows it: aioqueue, aio-celery, taskiq and the
raw floor return after RabbitMQ's publisher confirm; stock Celery is shown with
``confirm_publish`` off (its default: the call returns once the bytes are written) and on;
Dramatiq's default does not wait for confirms. The raw floor is aio-pika publishing
concurrently on one confirmed channel ("batched-confirm publish rate").
"""

from __future__ import annotations

import time

from benchmarks.signals import SignalCounter
from benchmarks.systems.base import Driver
from benchmarks.workloads import Metric, Workload, rate


def warmup(driver: Driver, signals: SignalCounter, n: int, quick: bool) -> dict[str, float]:
    driver.submit("noop", 20)
    return {}


def measure(driver: Driver, signals: SignalCounter, n: int, quick: bool) -> dict[str, float]:
    start = time.perf_counter()
    driver.submit("noop", n)
    seconds = time.perf_counter() - start
    return {"rate": rate(n, seconds), "seconds": seconds}


WORKLOAD = Workload(
    name="enqueue",
    title="Enqueue rate: delay() calls issued concurrently from one client",
    metrics=(Metric("rate", "enqueue rate", "calls/s", True),),
    default_n=10_000,
    quick_n=300,
    results=False,
    worker="none",
    warmup=warmup,
    measure=measure,
)
