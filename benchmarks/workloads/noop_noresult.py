"""Workload 3, end-to-end throughput of a no-op task without a result backend.

Neither the worker's app nor the client's has a result backend. Completion is seen through
``signals.py``: each task sends one datagram as its last statement (the same system call in
every system), and the clock stops at the ``n``-th. Timed from the first publish.
"""

from __future__ import annotations

import time

from benchmarks.signals import SignalCounter
from benchmarks.systems.base import Driver
from benchmarks.workloads import Metric, Workload, rate, wait_signals


def warmup(driver: Driver, signals: SignalCounter, n: int, quick: bool) -> dict[str, float]:
    target = signals.count + 50
    driver.submit("noop_sig", 50)
    wait_signals(signals, target, 60, "warm-up")
    return {}


def measure(driver: Driver, signals: SignalCounter, n: int, quick: bool) -> dict[str, float]:
    target = signals.count + n
    start = time.perf_counter()
    driver.submit("noop_sig", n)
    published = time.perf_counter() - start
    wait_signals(signals, target, 300, "noop-noresult")
    seconds = time.perf_counter() - start
    return {"throughput": rate(n, seconds), "seconds": seconds, "publish_seconds": published}


WORKLOAD = Workload(
    name="noop-noresult",
    title="End-to-end throughput, no-op task, no result backend (first publish to last done)",
    metrics=(Metric("throughput", "throughput", "tasks/s", True),),
    default_n=10_000,
    quick_n=300,
    results=False,
    worker="shared",
    warmup=warmup,
    measure=measure,
)
