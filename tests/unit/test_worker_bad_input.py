"""Bad input is logged and dead-lettered; the worker keeps running and loses nothing."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from aioqueue import AioQueue, NotRegistered, Queue
from aioqueue.brokers.base import Broker
from aioqueue.protocol import Envelope, decode_task, encode_task
from aioqueue.results.base import ResultStore

from .conftest import running_worker

DEAD = "dead"


def with_dead_letters(app: AioQueue) -> None:
    app.conf.task_queues = [
        Queue("celery", queue_arguments={
            "x-dead-letter-exchange": "", "x-dead-letter-routing-key": DEAD,
        }),
        Queue(DEAD, exchange=""),
    ]


async def dead_letters(app: AioQueue, count: int) -> list[Envelope]:
    broker = await app.get_broker()
    found = []
    async with broker.consume([DEAD], prefetch=count + 1) as consumer:
        for _ in range(count):
            with anyio.fail_after(3):
                delivery = await consumer.receive()
            found.append(delivery.envelope)
            await delivery.ack()
        with anyio.move_on_after(0.05) as scope:
            await consumer.receive()
        assert scope.cancelled_caught, "more dead letters than expected"
    return found


async def adding_app(app: AioQueue) -> tuple[Broker, ResultStore]:
    """``t.add`` registered, the app's queues declared: its broker and result store."""

    @app.task(name="t.add")
    async def add(x: int, y: int) -> int:
        return x + y

    broker = await app.get_broker()
    for spec in app.conf.task_queues or []:
        await broker.declare(spec)
    store = await app.get_result_store()
    assert store is not None
    return broker, store


def good_envelope(task: str, task_id: str, args: list[Any]) -> Envelope:
    return encode_task(task=task, task_id=task_id, args=args, kwargs={})


BAD: list[tuple[str, Envelope]] = [
    ("undecodable-json", Envelope(b"[[1, 2], {}, {", {"task": "t.add", "id": "bad-1"})),
    ("not-a-list", Envelope(b'{"a": 1}', {"task": "t.add", "id": "bad-2"})),
    ("two-elements", Envelope(b"[[1], {}]", {"task": "t.add", "id": "bad-3"})),
    ("missing-id", Envelope(b"[[1, 2], {}, {}]", {"task": "t.add"})),
    ("wrong-header-type", Envelope(b"[[1, 2], {}, {}]", {"task": 5, "id": "bad-5"})),
    ("bad-eta", Envelope(b"[[1, 2], {}, {}]", {"task": "t.add", "id": "bad-6", "eta": "soon"})),
    ("pickle", Envelope(b"\x80\x04K\x01.", {"task": "t.add", "id": "bad-7"},
                        content_type="application/x-python-serialize", content_encoding="binary")),
    ("unknown-type", Envelope(b"x", {"task": "t.add", "id": "bad-8"}, content_type="text/plain")),
]


async def test_bad_messages_are_dead_lettered_and_good_ones_run(
    app: AioQueue, caplog: pytest.LogCaptureFixture
) -> None:
    with_dead_letters(app)

    broker, store = await adding_app(app)
    with caplog.at_level(logging.ERROR, logger="aioqueue"):
        async with running_worker(app, concurrency=4, queues=["celery"]):
            for i, (_, envelope) in enumerate(BAD):
                good = good_envelope("t.add", f"good-{i}", [i, 1])
                await broker.publish(good, routing_key="celery")
                await broker.publish(envelope, routing_key="celery")
            for i in range(len(BAD)):
                meta = await store.wait(f"good-{i}", timeout=5)
                assert meta["result"] == i + 1
            letters = await dead_letters(app, len(BAD))
    assert sorted(e.body for e in letters) == sorted(e.body for _, e in BAD)
    assert caplog.text.count("Rejecting message") == len(BAD)
    assert "bad-6" in caplog.text  # the task id is logged


async def test_unknown_task_is_stored_as_not_registered_and_dead_lettered(app: AioQueue) -> None:
    with_dead_letters(app)
    await (await app.get_broker()).declare(app.queue_spec(DEAD))
    async with running_worker(app, queues=["celery"]):
        r = await app.send_task("no.such.task", [1])
        with pytest.raises(NotRegistered, match=r"no\.such\.task"):
            await r.get(timeout=5)
        assert await r.state() == "FAILURE"
        [letter] = await dead_letters(app, 1)
    assert decode_task(letter).id == r.id


async def test_unserializable_return_value_is_a_failure(app: AioQueue) -> None:
    @app.task
    async def weird() -> object:
        return object()

    @app.task
    async def fine() -> int:
        return 1

    async with running_worker(app):
        r = await weird.delay()
        with pytest.raises(Exception, match="cannot be serialized"):
            await r.get(timeout=5)
        assert await (await fine.delay()).get(timeout=5) == 1


async def test_expired_task_is_revoked_not_run(app: AioQueue) -> None:
    ran = False

    @app.task
    async def late() -> None:
        nonlocal ran
        ran = True

    from datetime import UTC, datetime, timedelta

    from aioqueue import TaskRevokedError

    # As a stock client older than 5.2 sends it: the header only, no AMQP expiration (with
    # the expiration the broker itself drops the message before any worker sees it).
    envelope = encode_task(
        task=late.name, task_id="expired-1", args=[], kwargs={},
        expires=datetime.now(UTC) - timedelta(seconds=1),
    )
    envelope.expiration = None
    broker = await app.get_broker()
    await broker.declare(app.queue_spec("celery"))
    await broker.publish(envelope, routing_key="celery")
    r = app.AsyncResult("expired-1")
    async with running_worker(app):
        with pytest.raises(TaskRevokedError, match="expired"):
            await r.get(timeout=5)
    assert await r.state() == "REVOKED"
    assert not ran


async def test_oversized_messages_are_dead_lettered_without_delaying_the_others(
    app: AioQueue, caplog: pytest.LogCaptureFixture
) -> None:
    """A gzip bomb (1 GiB from ~1 MB), an oversized body and header table mixed with
    ordinary tasks: each bad one is rejected once, logged once with its id and the limit,
    and every ordinary task completes promptly."""
    import time

    from .test_message_limits import gzip_bomb

    with_dead_letters(app)
    app.conf.worker_max_message_size = 4 << 20

    broker, store = await adding_app(app)
    bombs = [
        Envelope(gzip_bomb(1 << 30), {"task": "t.add", "id": "bomb-1",
                                     "compression": "application/x-gzip"}),
        Envelope(b"[[1, 2], {}, {}]" + b" " * (5 << 20), {"task": "t.add", "id": "huge-2"}),
        Envelope(b"[[1, 2], {}, {}]", {"task": "t.add", "id": "headers-3",
                                       **{f"x-{i}": i for i in range(1000)}}),
    ]
    with caplog.at_level(logging.ERROR, logger="aioqueue"):
        async with running_worker(app, concurrency=4, queues=["celery"]):
            started = time.perf_counter()
            for i, envelope in enumerate(bombs * 2):
                for j in range(5):
                    good = good_envelope("t.add", f"good-{i}-{j}", [i, j])
                    await broker.publish(good, routing_key="celery")
                await broker.publish(envelope, routing_key="celery")
            for i in range(len(bombs) * 2):
                for j in range(5):
                    meta = await store.wait(f"good-{i}-{j}", timeout=5)
                    assert meta["result"] == i + j
            took = time.perf_counter() - started
            letters = await dead_letters(app, len(bombs) * 2)
            for envelope in bombs:
                assert await store.get(envelope.headers["id"]) is None  # as undecodable ones
    print(f"30 ordinary tasks among 6 oversized messages: done in {took * 1000:.0f} ms")
    assert took < 5
    assert sorted(e.headers["id"] for e in letters) == sorted(
        e.headers["id"] for e in bombs * 2)
    lines = [r.getMessage() for r in caplog.records if "Rejecting message" in r.getMessage()]
    assert len(lines) == len(bombs) * 2
    for name, limit in (("bomb-1", "worker_max_decompressed_size"),
                        ("huge-2", "worker_max_message_size"),
                        ("headers-3", "worker_max_header_count")):
        assert sum(name in line and limit in line for line in lines) == 2, lines
