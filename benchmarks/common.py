"""What the parent, the workers and the clients share: URLs, the run context, environment.

A worker and its client learn everything about a run from ``BENCH_*`` environment variables
(set by the parent from a :class:`Context`), so every app module reads the same names and no
system gets a differently tuned configuration by accident.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

#: Loopback only. Redis database 13 is the suite's own; it never flushes it (see cleanup.py).
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")

#: Coroutine/greenlet/thread slots per worker. The asyncio workers (aioqueue, aio-celery,
#: taskiq, raw) all get the same number; Celery's pools use the issue's settings.
ASYNC_CONCURRENCY = 1000
#: Messages a worker may hold unacknowledged, as a multiple of its concurrency (Celery's and
#: aioqueue's default ``worker_prefetch_multiplier``); peers are configured to match.
PREFETCH_MULTIPLIER = 4


@dataclass(frozen=True)
class Context:
    """One worker + client pairing: its own queue, key prefix and completion socket."""

    system: str
    workload: str
    queue: str
    prefix: str  # Redis key prefix / namespace, unique per suite run
    signal_path: str  # AF_UNIX datagram socket the client counts completions on
    results: bool  # configure a Redis result backend
    amqp_url: str = AMQP_URL
    redis_url: str = REDIS_URL
    options: dict[str, str] = field(default_factory=dict)  # app knobs (e.g. confirm)
    extra_env: dict[str, str] = field(default_factory=dict)  # the system's own variables

    def env(self) -> dict[str, str]:
        """The environment a worker or client of this context runs with."""
        env = dict(os.environ)
        # Only a system that asks for it runs with aioqueue's fast paths off: a value in the
        # caller's environment must not change the other aioqueue rows.
        env.pop("AIOQUEUE_FAST_PATHS", None)
        env.update(
            BENCH_SYSTEM=self.system,
            BENCH_WORKLOAD=self.workload,
            BENCH_QUEUE=self.queue,
            BENCH_PREFIX=self.prefix,
            BENCH_SIGNAL=self.signal_path,
            BENCH_RESULTS="1" if self.results else "0",
            BENCH_AMQP_URL=self.amqp_url,
            BENCH_REDIS_URL=self.redis_url,
            BENCH_OPTIONS=json.dumps(self.options),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Context:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class AppSettings:
    """What an app module (imported by a worker or a client) needs, read from the environment."""

    queue: str
    prefix: str
    results: bool
    amqp_url: str
    redis_url: str
    options: dict[str, str]

    @classmethod
    def from_env(cls) -> AppSettings:
        return cls(
            queue=os.environ.get("BENCH_QUEUE", "bench-default"),
            prefix=os.environ.get("BENCH_PREFIX", "bench-default:"),
            results=os.environ.get("BENCH_RESULTS", "1") == "1",
            amqp_url=os.environ.get("BENCH_AMQP_URL", AMQP_URL),
            redis_url=os.environ.get("BENCH_REDIS_URL", REDIS_URL),
            options=json.loads(os.environ.get("BENCH_OPTIONS", "{}")),
        )
