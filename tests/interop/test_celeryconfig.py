"""A celeryconfig.py written for stock Celery loads unchanged, and says what it ignores."""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import pytest

from aioqueue import AioQueue, Queue

CELERYCONFIG = textwrap.dedent(
    """
    from datetime import timedelta

    from kombu import Exchange, Queue

    broker_url = "amqp://guest:guest@localhost:5672//"
    result_backend = "redis://localhost:6379/0"
    task_serializer = "json"
    result_serializer = "json"
    accept_content = ["json"]
    timezone = "Europe/Oslo"
    enable_utc = True
    task_default_queue = "default"
    task_queues = (
        Queue("default", Exchange("default"), routing_key="default"),
        Queue("low-priority", Exchange("low-priority"), routing_key="low-priority"),
    )
    task_routes = {"tasks.add": {"queue": "low-priority"}, "feed.*": "feeds"}
    task_acks_late = True
    task_track_started = True
    result_expires = timedelta(hours=2)
    worker_concurrency = 8
    worker_prefetch_multiplier = 1
    task_queue_max_priority = 10
    task_default_priority = 5
    # Settings aioqueue recognises but does not implement:
    worker_max_tasks_per_child = 100
    task_reject_on_worker_lost = True
    beat_schedule = {"every-minute": {"task": "tasks.add", "schedule": 60.0, "args": (1, 2)}}
    broker_connection_retry_on_startup = True
    """
)


def test_stock_celeryconfig_loads_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "celeryconfig.py").write_text(CELERYCONFIG)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "celeryconfig", raising=False)
    app = AioQueue("tasks")
    with caplog.at_level(logging.WARNING, logger="aioqueue"):
        app.config_from_object("celeryconfig")
    conf = app.conf
    assert conf.broker_url == "amqp://guest:guest@localhost:5672//"
    assert conf.result_backend == "redis://localhost:6379/0"
    assert conf.timezone == "Europe/Oslo" and conf.task_default_queue == "default"
    assert conf.result_expires == 7200 and conf.worker_concurrency == 8
    assert conf.task_queue_max_priority == 10 and conf.task_default_priority == 5
    assert [q.name for q in conf.task_queues or ()] == ["default", "low-priority"]
    for name in ("worker_max_tasks_per_child", "task_reject_on_worker_lost", "beat_schedule"):
        assert name in conf.unsupported
        assert f"setting '{name}' is a Celery setting aioqueue does not implement" in caplog.text
    # The routes work as Celery's do.
    from aioqueue.routing import route

    assert route(conf, "tasks.add", (), {}) == {"queue": "low-priority"}
    assert route(conf, "feed.fetch", (), {}) == {"queue": "feeds"}
    # And the very same module configures stock Celery.
    from celery import Celery

    stock = Celery("tasks")
    stock.config_from_object("celeryconfig")
    assert stock.conf.task_default_queue == "default"
    stock.close()


def test_kombu_queues_in_task_queues_are_read() -> None:
    from kombu import Exchange
    from kombu import Queue as KombuQueue

    from aioqueue import ConfigurationError

    app = AioQueue("tasks")
    app.conf.task_queues = (
        KombuQueue("default", Exchange("default"), routing_key="default"),
        KombuQueue("feeds", Exchange("media", type="topic"), routing_key="media.#",
                   queue_arguments={"x-max-priority": 10}),
        Queue("ours"),
        "plain",
    )
    default, feeds, ours, plain = app.conf.task_queues
    assert (default.name, default.exchange_name, default.exchange_type, default.binding_key) == (
        "default", "default", "direct", "default")
    assert (feeds.exchange_name, feeds.exchange_type, feeds.binding_key) == (
        "media", "topic", "media.#")
    assert feeds.queue_arguments == {"x-max-priority": 10}
    assert (ours.name, plain.name) == ("ours", "plain")
    with pytest.raises(ConfigurationError, match="task_queues"):
        app.conf.task_queues = [42]
