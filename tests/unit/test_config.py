from __future__ import annotations

import logging
import sys
import types
from datetime import timedelta

import pytest

from aioqueue import AioQueue, ConfigurationError, Queue
from aioqueue.config import Settings


def test_defaults_follow_celery_names() -> None:
    conf = Settings()
    assert conf.task_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.task_default_queue == "celery"
    assert conf.exchange == "celery" and conf.routing_key == "celery"
    assert conf.result_expires == 86400
    assert conf.task_acks_late is True  # deliberate difference from Celery
    assert conf.worker_prefetch_multiplier == 4


def test_update_and_attribute_access() -> None:
    app = AioQueue("t", broker="memory://")
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json",
        timezone="Asia/Seoul", enable_utc=True,
    )
    app.conf.task_default_priority = 5
    assert app.conf.timezone == "Asia/Seoul"
    assert app.conf["task_default_priority"] == 5
    app.conf["result_expires"] = timedelta(hours=1)
    assert app.conf.result_expires == 3600


def test_settings_as_app_keywords() -> None:
    app = AioQueue("t", broker="memory://", backend="memory://", task_track_started=True)
    assert app.conf.task_track_started is True
    assert app.conf.broker_url == "memory://"
    assert app.conf.result_backend == "memory://"


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("task_serialiser", "task_serializer"), ("result_backen", "result_backend"),
     ("worker_concurency", "worker_concurrency")],
)
def test_misspelt_setting_suggests_the_right_name(name: str, suggestion: str) -> None:
    app = AioQueue("t", broker="memory://")
    with pytest.raises(ConfigurationError, match=f"did you mean '{suggestion}'"):
        app.conf.update({name: "x"})
    with pytest.raises(ConfigurationError, match=suggestion):
        setattr(app.conf, name, "x")
    with pytest.raises(ConfigurationError, match=suggestion):
        AioQueue("t", **{name: "x"})


def test_update_checks_every_name_before_changing_any() -> None:
    conf = Settings()
    with pytest.raises(ConfigurationError):
        conf.update(task_default_queue="other", nonsense=1)
    assert conf.task_default_queue == "celery"


@pytest.mark.parametrize(
    ("name", "value"),
    [("worker_concurrency", 0), ("worker_concurrency", "10"), ("task_acks_late", "yes"),
     ("result_expires", "1d"), ("accept_content", [1]), ("task_default_priority", -1)],
)
def test_bad_values_are_refused(name: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings().update({name: value})


def test_config_from_module_name(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("celeryconfig_for_test")
    module.broker_url = "memory://"  # type: ignore[attr-defined]
    module.result_backend = "rpc://"  # type: ignore[attr-defined]
    module.task_serializer = "json"  # type: ignore[attr-defined]
    module.timezone = "Europe/Oslo"  # type: ignore[attr-defined]
    module.enable_utc = True  # type: ignore[attr-defined]
    module.Queue = Queue  # type: ignore[attr-defined]  # imported names are not settings
    module.os = sys  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "celeryconfig_for_test", module)
    app = AioQueue("t")
    app.config_from_object("celeryconfig_for_test")
    assert app.conf.result_backend == "rpc://"
    assert app.conf.timezone == "Europe/Oslo"
    assert app.broker_url == "memory://"


def test_config_from_object_and_dict() -> None:
    class Config:
        task_default_queue = "jobs"
        worker_concurrency = 7

    app = AioQueue("t", broker="memory://")
    app.config_from_object(Config)
    assert app.conf.task_default_queue == "jobs"
    app.config_from_object({"worker_concurrency": 3})
    assert app.conf.worker_concurrency == 3


def test_config_from_missing_module() -> None:
    with pytest.raises(ConfigurationError, match="no_such_config_module"):
        AioQueue("t").config_from_object("no_such_config_module")


def test_unsupported_celery_setting_is_accepted_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conf = Settings()
    with caplog.at_level(logging.WARNING, logger="aioqueue"):
        conf.update(worker_max_tasks_per_child=100)
    assert conf.unsupported == {"worker_max_tasks_per_child": 100}
    assert "worker_max_tasks_per_child" in caplog.text and "does not implement" in caplog.text


def test_unknown_url_scheme_names_the_known_ones() -> None:
    from aioqueue.registry import broker_class

    with pytest.raises(ConfigurationError, match="amqp"):
        broker_class("kafka://localhost")


def test_password_masking() -> None:
    from aioqueue.registry import mask_password

    assert mask_password("amqp://guest:secret@localhost:5672//") == "amqp://guest:**@localhost:5672//"
    assert mask_password("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert mask_password("redis://:pw@host/1") == "redis://:**@host/1"


def test_celery_sqlalchemy_urls_are_refused_not_reinterpreted() -> None:
    from aioqueue.registry import broker_class, result_store_class

    with pytest.raises(ConfigurationError, match="db\\+sqlite"):
        result_store_class("db+sqlite:///results.db")
    with pytest.raises(ConfigurationError, match="sqla\\+sqlite"):
        broker_class("sqla+sqlite:///queue.db")
