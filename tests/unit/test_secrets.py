"""Credentials are never printed: reprs, censored tables, the banner and error texts."""

from __future__ import annotations

import pytest

from aioqueue import AioQueue, ConfigurationError
from aioqueue.config import MASK, Settings
from aioqueue.registry import broker_class, mask_password
from aioqueue.sqlite_db import database_path
from aioqueue.worker.banner import render_banner
from aioqueue.worker.worker import Worker

SECRETS = ("s3cret", "t0ken", "sentinelpw", "hunter2", "k3y", "qpw")


def configured() -> AioQueue:
    app = AioQueue("secrets")
    app.conf.update(
        broker_url="amqp://guest:s3cret@h1:5672//;amqp://guest:s3cret@h2:5672//",
        result_backend="redis://:t0ken@cache:6379/0?password=qpw",
        broker_transport_options={
            "visibility_timeout": 60,
            "sentinel_kwargs": {"password": "sentinelpw"},
            "client_secret": "hunter2",
        },
        result_backend_transport_options={"api_key": "k3y", "retry_policy": {"max": 3}},
        redis_password="hunter2",  # accepted, not implemented: still never printed
    )
    return app


def assert_clean(text: str) -> None:
    leaked = [secret for secret in SECRETS if secret in text]
    assert not leaked, f"{leaked} in {text!r}"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:secret@localhost:5672//", "amqp://guest:**@localhost:5672//"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:pw@host/1", "redis://:**@host/1"),
        ("redis://t0ken@host/1", "redis://**@host/1"),  # user-info alone: a token
        ("amqp://u:p@h1//;amqp://u:p2@h2//", "amqp://u:**@h1//;amqp://u:**@h2//"),
        ("amqp://u:p@h1;amqp://v:p2@h2", "amqp://u:**@h1;amqp://v:**@h2"),
        ("amqp://u:p@ss;w@host//", "amqp://u:**@host//"),  # '@' and ';' inside a password
        ("redis://h/0?db=1&password=x", "redis://h/0?db=1&password=**"),
        ("sqs://h?aws_secret_access_key=abc&region=eu", "sqs://h?aws_secret_access_key=**&region=eu"),
        ("sqlite:///data/a@b.db", "sqlite:///data/a@b.db"),
        ("memory://", "memory://"),
        ("cannot connect to amqp://a:b@c//: refused", "cannot connect to amqp://a:**@c//: refused"),
        ("amqp://[::1", "amqp://[::1"),
        ("", ""),
    ],
)
def test_mask_password(url: str, masked: str) -> None:
    assert mask_password(url) == masked


def test_mask_password_never_raises() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert mask_password(None) == "None"
    assert mask_password(["amqp://u:p@h//"]) == "['amqp://u:**@h//']"
    assert mask_password(Unprintable()) == "<unprintable Unprintable>"


def test_repr_and_str_of_settings_and_app_mask_secrets() -> None:
    app = configured()
    for text in (repr(app.conf), str(app.conf), repr(app), str(app)):
        assert_clean(text)
    shown = repr(app.conf)
    assert "amqp://guest:**@h1:5672//;amqp://guest:**@h2:5672//" in shown
    assert "'visibility_timeout': 60" in shown and "'max': 3" in shown
    assert "worker_concurrency=100" in shown


def test_as_dict_keeps_real_values() -> None:
    conf = configured().conf.as_dict()
    assert conf["broker_url"].startswith("amqp://guest:s3cret@h1")
    assert conf["broker_transport_options"]["sentinel_kwargs"] == {"password": "sentinelpw"}


def test_table_and_humanize_are_censored_and_only_changes_by_default() -> None:
    conf = configured().conf
    table = conf.table()
    assert set(table) == {
        "broker_url", "result_backend", "broker_transport_options",
        "result_backend_transport_options", "redis_password",
    }
    assert table["broker_transport_options"] == {
        "visibility_timeout": 60, "sentinel_kwargs": {"password": MASK}, "client_secret": MASK,
    }
    assert table["result_backend_transport_options"]["api_key"] == MASK
    assert table["redis_password"] == MASK
    assert table["result_backend"] == "redis://:**@cache:6379/0?password=**"
    assert_clean(repr(table))
    text = conf.humanize()
    assert_clean(text)
    assert "broker_url: 'amqp://guest:**@h1:5672//;amqp://guest:**@h2:5672//'" in text.splitlines()

    full = conf.table(with_defaults=True)
    assert full["worker_concurrency"] == 100 and full["task_default_queue"] == "celery"
    assert_clean(repr(full) + conf.humanize(with_defaults=True))
    # As Celery: a setting whose name says "key" is masked whatever it holds.
    conf.task_default_routing_key = "tasks"
    assert conf.table()["task_default_routing_key"] == MASK


def test_uncensored_only_when_asked() -> None:
    conf = configured().conf
    assert conf.table(censored=False)["redis_password"] == "hunter2"
    assert "s3cret" in conf.humanize(censored=False)
    assert Settings().table() == {}
    assert Settings().humanize() == ""


def test_banner_masks_passwords() -> None:
    app = configured()
    banner = render_banner(Worker(app), "0")
    assert_clean(banner)
    assert "amqp://guest:**@h1:5672//;amqp://guest:**@h2:5672//" in banner
    assert "redis://:**@cache:6379/0?password=**" in banner


def test_error_texts_mask_passwords() -> None:
    conf = Settings()
    with pytest.raises(ConfigurationError) as info:
        conf.broker_url = ["amqp://guest:s3cret@h1//"]  # type: ignore[assignment]  # Celery's list
    assert_clean(str(info.value))
    with pytest.raises(ConfigurationError) as info:
        conf.broker_transport_options = "redis://:s3cret@h/0"  # type: ignore[assignment]
    assert_clean(str(info.value))
    with pytest.raises(ConfigurationError) as info:
        broker_class("kafka://u:s3cret@localhost")
    assert_clean(str(info.value))
    with pytest.raises(ConfigurationError) as info:
        database_path("sqlite://u:s3cret@host/x.db")
    assert_clean(str(info.value))
