"""Dramatiq: thread-pool actors on RabbitMQ, Redis results through the Results middleware.

Default middleware and defaults otherwise (prefetch = 2 x threads). ``confirm_delivery`` is
Dramatiq's default (off) unless the run's ``confirm`` option is "1" (``dramatiq-confirm``, in
worker and client alike). Result keys are namespaced with the run's prefix so the suite can
delete exactly its own.
"""

from __future__ import annotations

import time
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from benchmarks.common import AppSettings
from benchmarks.signals import signal_done

S = AppSettings.from_env()

# pika reads the vhost from the path: kombu's "//" spelling of "/" must be "/%2F" for it.
url = S.amqp_url[:-2] + "/%2F" if S.amqp_url.endswith("//") else S.amqp_url
broker = RabbitmqBroker(url=url, confirm_delivery=S.options.get("confirm") == "1")
backend: RedisBackend | None = None
if S.results:
    backend = RedisBackend(
        url=S.redis_url, namespace=f"{S.prefix}dramatiq", use_namespace_prefix_keys=True
    )
    broker.add_middleware(Results(backend=backend, result_ttl=3_600_000))
dramatiq.set_broker(broker)
options: dict[str, Any] = {"queue_name": S.queue}
if S.results:
    options["store_results"] = True


@dramatiq.actor(actor_name="bench_noop", **options)
def noop() -> None:
    return None


@dramatiq.actor(actor_name="bench_noop_sig", **options)
def noop_sig() -> None:
    signal_done()


@dramatiq.actor(actor_name="bench_sleep", **options)
def sleep(seconds: float) -> None:
    time.sleep(seconds)


@dramatiq.actor(actor_name="bench_sleep_sig", **options)
def sleep_sig(seconds: float) -> None:
    time.sleep(seconds)
    signal_done()


TASKS: dict[str, Any] = {"noop": noop, "noop_sig": noop_sig, "sleep": sleep,
                         "sleep_sig": sleep_sig}
