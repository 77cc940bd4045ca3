"""``System``: how the runner starts, drives and cleans up after one system."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.common import Context


@dataclass(frozen=True)
class System:
    """One measured configuration (Celery's pools are three of them)."""

    name: str  # what --systems selects and the table shows
    label: str  # longer description for the report
    family: str  # "aioqueue", "celery", "peer" or "raw": what ratios compare against
    worker_argv: Callable[[Context], list[str]]
    driver: Callable[[], Any]  # a benchmarks.systems.base.Driver factory (client process only)
    queues: Callable[[Context], list[str]]  # AMQP queues to delete after a run
    exchanges: Callable[[Context], list[str]] = lambda ctx: []
    redis_patterns: Callable[[Context], list[str]] = lambda ctx: [f"{ctx.prefix}*"]
    #: Options every workload gives the worker's and the client's app module (``BENCH_OPTIONS``;
    #: an enqueue row's own options are added to them), e.g. ``(("confirm", "1"),)``.
    options: tuple[tuple[str, str], ...] = ()
    #: Environment variables set for the worker and the client, e.g. the worker CLI's own.
    env: tuple[tuple[str, str], ...] = ()
    #: The client's publish returns only after RabbitMQ's publisher confirm, as aioqueue's
    #: ``delay()`` does; the like-for-like latency target compares only with such peers.
    confirms: bool = True
    #: Rows of the enqueue table, each (row name, client options); Celery has two.
    enqueue_rows: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    #: Modules the worker and client import; checked before a run starts.
    requires: tuple[str, ...] = ()
    #: Workloads not run: they would repeat another row (enqueue runs no worker, so a
    #: two-process row would measure the same client as its one-process row).
    skip: tuple[str, ...] = ()

    def enqueue_variants(self) -> list[tuple[str, dict[str, str]]]:
        if not self.enqueue_rows:
            return [(self.name, {})]
        return [(row, dict(options)) for row, options in self.enqueue_rows]
