"""``delay()`` returns at the first proof that RabbitMQ has the message: its publisher
confirm, or the task's result arriving at a client that subscribed when it sent the task.

RabbitMQ confirms a persistent message it delivers at once only when the consumer acks it
(or it is on disk), and the worker acks after storing the result, so on a quick task the
result is the earlier proof. The confirms are held back here (the real ones are kept and
handed over later) so the order is certain; RabbitMQ and Redis are real.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pytest
import redis.asyncio as aioredis
from pamqp.commands import Basic

from aioqueue import AioQueue
from aioqueue.brokers.amqp.publisher import ChannelPublisher
from aioqueue.meta import make_meta
from aioqueue.protocol import Envelope
from aioqueue.results.redis import RedisResultStore

from ..conftest import fast_paths_only
from .conftest import delete_queues, eventually
from .test_client_perf_results import listening
from .test_redis_result_store import until_numsub, until_subscribed

pytestmark = pytest.mark.integration


class HeldConfirms:
    """Publishes go out as usual; the futures ``delay()`` waits on complete only when the
    test says so, from the real confirms."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held: dict[str, tuple[asyncio.Future[Any], asyncio.Future[Any]]] = {}
        real_send = ChannelPublisher.send

        def send(publisher: ChannelPublisher, envelope: Envelope, **kw: str) -> Any:
            confirmation = real_send(publisher, envelope, **kw)
            late: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.held[str(envelope.correlation_id)] = (confirmation, late)
            return late

        monkeypatch.setattr(ChannelPublisher, "send", send)

    async def release(self, task_id: str, error: BaseException | None = None) -> None:
        confirmation, late = self.held.pop(task_id)
        frame = await confirmation  # RabbitMQ did confirm it
        if error is not None:
            late.set_exception(error)
        else:
            late.set_result(frame)


@pytest.fixture
async def app(amqp_url: str, redis_url: str, unique: str) -> AsyncIterator[AioQueue]:
    app = AioQueue("proof", broker=amqp_url, backend=redis_url, task_default_queue=unique)
    try:
        yield app
    finally:
        await app.close()
        await delete_queues(amqp_url, [unique])


async def started(app: AioQueue, unique: str) -> RedisResultStore:
    """The app connected, with its store listening (it has waited once, as a client does)."""
    store = await app.get_result_store()
    assert isinstance(store, RedisResultStore)
    await listening(store, unique)
    return store


async def sending_task(
    app: AioQueue, raw: aioredis.Redis, unique: str, monkeypatch: pytest.MonkeyPatch,
    task_id: str | None = None,
) -> tuple[asyncio.Task[Any], HeldConfirms, RedisResultStore, str]:
    """A task being sent with its confirm held back, once its result's channel is subscribed:
    (the delay() in flight, the held confirms, the store, the task id)."""

    @app.task(name=f"{unique}.answer")
    async def answer() -> int:
        return 42

    store = await started(app, unique)
    confirms = HeldConfirms(monkeypatch)
    sending = asyncio.create_task(answer.apply_async(task_id=task_id))
    await eventually(lambda: bool(confirms.held))
    [sent_id] = confirms.held
    await until_subscribed(raw, store.key_for(sent_id))
    return sending, confirms, store, sent_id


@fast_paths_only
async def test_delay_returns_when_the_result_arrives_before_the_confirm(
    app: AioQueue, raw: aioredis.Redis, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sending, confirms, store, task_id = await sending_task(app, raw, unique, monkeypatch)
    await asyncio.sleep(0.1)
    assert not sending.done()  # neither proof yet
    await store.store(task_id, make_meta(task_id, "SUCCESS", 42))  # as the worker would
    result = await asyncio.wait_for(sending, 5)
    assert result.id == task_id
    assert await result.get(timeout=5) == 42
    await confirms.release(task_id)  # the confirm that comes later is simply let go


@fast_paths_only
async def test_a_given_task_id_waits_for_the_confirm(
    app: AioQueue, raw: aioredis.Redis, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An id the caller chose may carry an older record: only the confirm counts then."""
    sending, confirms, store, task_id = await sending_task(
        app, raw, unique, monkeypatch, task_id=f"{unique}-given"
    )
    await store.store(task_id, make_meta(task_id, "SUCCESS", 42))
    await until_numsub(raw, store.key_for(task_id), 0)  # the record arrived and was kept
    await asyncio.sleep(0.1)
    assert not sending.done()
    await confirms.release(task_id)
    result = await asyncio.wait_for(sending, 5)
    assert await result.get(timeout=5) == 42


@fast_paths_only
async def test_a_failed_confirm_after_the_result_is_logged(
    app: AioQueue, raw: aioredis.Redis, unique: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sending, confirms, store, task_id = await sending_task(app, raw, unique, monkeypatch)
    await store.store(task_id, make_meta(task_id, "SUCCESS", 42))
    result = await asyncio.wait_for(sending, 5)
    with caplog.at_level(logging.WARNING, logger="aioqueue.brokers.amqp"):
        nack = aiormq.exceptions.DeliveryError(None, Basic.Nack(delivery_tag=1))
        await confirms.release(task_id, nack)
        await eventually(lambda: "already has a result was not confirmed" in caplog.text)
    assert await result.get(timeout=5) == 42


async def test_a_quick_task_round_trip_on_a_real_worker(
    app: AioQueue, unique: str
) -> None:
    """No confirms held: many round trips end to end, each proof counted once."""
    from aioqueue.worker import Worker

    @app.task(name=f"{unique}.double")
    async def double(x: int) -> int:
        return 2 * x

    worker = Worker(app, concurrency=4, shutdown_timeout=5)
    running = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started.wait(), 10)
        store = await started(app, unique)
        for i in range(50):
            result = await double.delay(i)
            assert await result.get(timeout=5) == 2 * i
        assert not store._waiting._arrivals and not store._waiting._expected
    finally:
        worker.stop()
        await running
