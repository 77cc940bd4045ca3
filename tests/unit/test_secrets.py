"""Credentials are never printed: URLs in error texts."""

from __future__ import annotations

import pytest

from aioqueue import ConfigurationError
from aioqueue.registry import broker_class, mask_password
from aioqueue.sqlite_db import database_path


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


def test_error_texts_mask_passwords() -> None:
    with pytest.raises(ConfigurationError) as info:
        broker_class("kafka://u:s3cret@localhost")
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        database_path("sqlite://u:s3cret@host/x.db")
    assert "s3cret" not in str(info.value)
