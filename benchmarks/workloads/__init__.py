"""Workloads: what is measured, in how many tasks, and the client-side timing code.

Each module defines one :class:`Workload`. Its ``measure`` runs in the client process after an
untimed warm-up (connections open, queues declared, code paths imported on both sides), so a
figure never includes connecting or a worker's first-task imports. The parent adds the
metrics it measures itself (``parent_metrics``: memory, cold start).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.signals import SignalCounter
from benchmarks.systems.base import Driver

MeasureFn = Callable[[Driver, SignalCounter, int, bool], dict[str, float]]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 0  # decimals shown in the table


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    metrics: tuple[Metric, ...]
    default_n: int
    quick_n: int
    results: bool  # the worker's and client's apps have a Redis result backend
    worker: str  # "none", "shared" (one worker for all repetitions) or "fresh" (one per rep)
    warmup: MeasureFn
    measure: MeasureFn  # (driver, signals, n, quick) -> metric values
    parent_metrics: tuple[str, ...] = ()
    timeout: float = 600.0  # the parent kills a client running longer than this


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def wait_signals(signals: SignalCounter, target: int, timeout: float, what: str) -> None:
    got = signals.wait_for(target, timeout)
    if got < target:
        raise TimeoutError(f"{what}: {target - got} completions missing after {timeout}s")


def _load() -> dict[str, Workload]:
    from benchmarks.workloads import enqueue, io, latency, noop, noop_noresult, rss

    modules: list[Any] = [enqueue, noop, noop_noresult, io, latency, rss]
    return {m.WORKLOAD.name: m.WORKLOAD for m in modules}


WORKLOADS: dict[str, Workload] = _load()
