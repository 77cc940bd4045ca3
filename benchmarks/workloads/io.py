"""Workload 4, I/O-bound: ``n`` tasks that each wait 10 ms, with Redis results.

The asyncio systems ``await asyncio.sleep(0.01)``; Celery and Dramatiq call
``time.sleep(0.01)`` (monkeypatched by Celery's gevent pool, so it yields). Timed like the
no-op workload, from the first publish to the last result read. Each worker keeps its
configured concurrency: 1000 coroutines for the asyncio systems, Celery's 2 processes / 64
threads / 256 greenlets, Dramatiq's 64 threads.
"""

from __future__ import annotations

import time

from benchmarks.signals import SignalCounter
from benchmarks.systems.base import Driver
from benchmarks.workloads import Metric, Workload, rate

SLEEP = 0.01


def warmup(driver: Driver, signals: SignalCounter, n: int, quick: bool) -> dict[str, float]:
    driver.collect(driver.submit("sleep", 20, SLEEP), timeout=60)
    return {}


def measure(driver: Driver, signals: SignalCounter, n: int, quick: bool) -> dict[str, float]:
    start = time.perf_counter()
    handles = driver.submit("sleep", n, SLEEP)
    driver.collect(handles)
    seconds = time.perf_counter() - start
    return {"throughput": rate(n, seconds), "seconds": seconds}


WORKLOAD = Workload(
    name="io",
    title="I/O-bound: tasks that each wait 10 ms, Redis results (first publish to last result)",
    metrics=(Metric("throughput", "throughput", "tasks/s", True),),
    default_n=2_000,
    quick_n=100,
    results=True,
    worker="shared",
    warmup=warmup,
    measure=measure,
)
