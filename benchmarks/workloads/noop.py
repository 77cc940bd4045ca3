"""Workload 2, end-to-end throughput of a no-op task with Redis results.

The client issues ``n`` calls concurrently, then reads every result; timed from the first
publish to the last result read. The worker has been consuming (and warmed up) before the
clock starts. Each system reads results its idiomatic bulk way (see its adapter).
"""

from __future__ import annotations

import time

from benchmarks.signals import SignalCounter
from benchmarks.systems.base import Driver
from benchmarks.workloads import Metric, Workload, rate


def warmup(driver: Driver, signals: SignalCounter, n: int, quick: bool) -> dict[str, float]:
    driver.collect(driver.submit("noop", 50), timeout=60)
    return {}


def measure(driver: Driver, signals: SignalCounter, n: int, quick: bool) -> dict[str, float]:
    start = time.perf_counter()
    handles = driver.submit("noop", n)
    published = time.perf_counter() - start
    driver.collect(handles)
    seconds = time.perf_counter() - start
    return {"throughput": rate(n, seconds), "seconds": seconds, "publish_seconds": published}


WORKLOAD = Workload(
    name="noop",
    title="End-to-end throughput, no-op task, Redis results (first publish to last result)",
    metrics=(Metric("throughput", "throughput", "tasks/s", True),),
    default_n=10_000,
    quick_n=300,
    results=True,
    worker="shared",
    warmup=warmup,
    measure=measure,
)
