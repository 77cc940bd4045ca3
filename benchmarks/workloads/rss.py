"""Workload 6, worker memory with ``n`` sleeping tasks in flight, and worker cold start.

Every repetition starts a fresh worker. Cold start is from ``Popen`` to RabbitMQ reporting a
consumer on the worker's queue (polled every 5 ms), which is when the worker can receive.
Then the client publishes ``n`` tasks that each sleep 1 s (Redis results on) and waits for
their completion signals, at most 5 s (Celery's prefork pool would need minutes); the parent
samples the worker's whole process tree every 50 ms and reports the peak RSS (summed over
processes; PSS, which counts pages shared between forked processes once, is in the JSON).
"In flight" means held by the worker: running, or prefetched and waiting for a slot, so a
worker with fewer slots holds fewer tasks, which is the point of the comparison.
"""

from __future__ import annotations

from benchmarks.signals import SignalCounter
from benchmarks.systems.base import Driver
from benchmarks.workloads import Metric, Workload

SLEEP, CAP = 1.0, 5.0
QUICK_SLEEP, QUICK_CAP = 0.2, 3.0


def warmup(driver: Driver, signals: SignalCounter, n: int, quick: bool) -> dict[str, float]:
    target = signals.count + 10
    driver.submit("sleep_sig", 10, 0.0)
    signals.wait_for(target, 30)
    return {}


def measure(driver: Driver, signals: SignalCounter, n: int, quick: bool) -> dict[str, float]:
    sleep, cap = (QUICK_SLEEP, QUICK_CAP) if quick else (SLEEP, CAP)
    base = signals.count
    driver.submit("sleep_sig", n, sleep)
    done = signals.wait_for(base + n, cap) - base
    return {"completed_within_cap": float(done)}


WORKLOAD = Workload(
    name="rss",
    title="Worker peak RSS with tasks sleeping in flight; worker cold start",
    metrics=(
        Metric("peak_rss_mib", "peak RSS", "MiB", False, 1),
        Metric("cold_start_s", "cold start", "s", False, 3),
    ),
    default_n=1_000,
    quick_n=50,
    results=True,
    worker="fresh",
    warmup=warmup,
    measure=measure,
    parent_metrics=("peak_rss_mib", "peak_pss_mib", "cold_start_s"),
)
