"""Workload 5, round-trip latency: one ``delay()`` then ``get()``, ``n`` times in sequence.

Each sample is one call plus reading its result, with nothing else in flight; reported as the
median (p50) and 99th percentile in milliseconds. Async clients are timed inside their running
event loop, blocking clients around each call (``Driver.roundtrips``). Systems whose ``get()``
polls (aio-celery, taskiq) are given a 1 ms poll interval instead of their 0.5 s / 0.2 s
defaults.
"""

from __future__ import annotations

import statistics

from benchmarks.signals import SignalCounter
from benchmarks.systems.base import Driver
from benchmarks.workloads import Metric, Workload


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def warmup(driver: Driver, signals: SignalCounter, n: int, quick: bool) -> dict[str, float]:
    driver.roundtrips(10, timeout=30)
    return {}


def measure(driver: Driver, signals: SignalCounter, n: int, quick: bool) -> dict[str, float]:
    samples = [seconds * 1000 for seconds in driver.roundtrips(n, timeout=30)]
    return {
        "p50": statistics.median(samples),
        "p99": percentile(samples, 0.99),
        "mean": statistics.fmean(samples),
    }


WORKLOAD = Workload(
    name="latency",
    title="Round-trip latency of one delay() + get(), sequential",
    metrics=(
        Metric("p50", "p50", "ms", False, 2),
        Metric("p99", "p99", "ms", False, 2),
    ),
    default_n=500,
    quick_n=20,
    results=True,
    worker="shared",
    warmup=warmup,
    measure=measure,
)
