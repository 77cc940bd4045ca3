"""Queue arguments from the settings (one place for every broker), the delay-level plan, and
the delivery limit and delayed delivery as the memory and SQLite brokers emulate them."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from aioqueue import AioQueue, ConfigurationError, Queue
from aioqueue.brokers import delay as delays
from aioqueue.brokers import memory as memory_broker
from aioqueue.brokers.base import Broker
from aioqueue.brokers.memory import MemoryBroker
from aioqueue.brokers.sqlite import SqliteBroker
from aioqueue.config import Settings
from aioqueue.protocol import Envelope
from aioqueue.results import memory as memory_store
from aioqueue.routing import DEFAULT_DELIVERY_LIMIT, declarations, queue_arguments, queue_spec

from .conftest import running_worker

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


def conf(**settings: Any) -> Settings:
    result = Settings()
    result.update(settings)
    return result


# -- queue arguments -------------------------------------------------------------------------


def test_classic_queues_have_no_arguments_as_celery_declares_them() -> None:
    assert queue_spec(conf(), "celery") == Queue("celery", exchange="celery", routing_key="celery")
    assert queue_spec(conf(), "other").queue_arguments == {}


def test_quorum_default_queue_is_declared_as_the_stock_client_does() -> None:
    vector = json.loads((VECTORS / "amqp_quorum_queue_client.json").read_text())
    declared = vector["queue_declaration"][0]
    spec = queue_spec(conf(task_default_queue="quorum_q", task_default_queue_type="quorum"),
                      "quorum_q")
    assert spec.durable is declared["durable"] and spec.auto_delete is declared["auto_delete"]
    # Without a dead-letter queue no limit is added: the plain declaration Celery makes.
    assert spec.queue_arguments == {k: v for k, _, v in declared["arguments"]}


def test_queue_types_follow_celery_default_and_missing_queue_settings() -> None:
    settings = conf(task_default_queue_type="quorum")
    assert queue_spec(settings, "celery").queue_arguments == {"x-queue-type": "quorum"}
    assert queue_spec(settings, "elsewhere").queue_arguments == {}
    settings.task_create_missing_queue_type = "quorum"
    assert queue_spec(settings, "elsewhere").queue_arguments == {"x-queue-type": "quorum"}


def test_dead_letter_queue_and_automatic_delivery_limit() -> None:
    settings = conf(task_default_queue_type="quorum", task_dead_letter_queue="celery.dead")
    assert queue_spec(settings, "celery").queue_arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": DEFAULT_DELIVERY_LIMIT,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "celery.dead",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    # Classic queues dead-letter too, and get no limit (RabbitMQ has none for them).
    assert queue_spec(settings, "classic_one").queue_arguments == {
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "celery.dead",
    }
    # The dead-letter queue keeps what it holds: no limit, no dead-lettering of its own.
    assert queue_spec(settings, "celery.dead").queue_arguments == {}
    assert [q.name for q in declarations(settings, "celery")] == ["celery.dead", "celery"]
    assert [q.name for q in declarations(settings, "celery.dead")] == ["celery.dead"]
    assert [q.name for q in declarations(conf(), "celery")] == ["celery"]


def test_explicit_delivery_limits() -> None:
    settings = conf(task_default_queue_type="quorum", task_queue_delivery_limit=5)
    assert queue_spec(settings, "celery").queue_arguments == {
        "x-queue-type": "quorum", "x-delivery-limit": 5,
    }
    settings.update(task_queue_delivery_limit=0, task_dead_letter_queue="dead")
    assert "x-delivery-limit" not in queue_spec(settings, "celery").queue_arguments


def test_a_queue_own_arguments_win() -> None:
    own = Queue("own", queue_arguments={
        "x-queue-type": "quorum", "x-delivery-limit": 3, "x-dead-letter-exchange": "elsewhere",
    })
    settings = conf(task_queues=[own], task_dead_letter_queue="dead",
                    task_queue_delivery_limit=9)
    assert queue_arguments(settings, own) == dict(own.queue_arguments)
    assert queue_spec(settings, "own") is own


@pytest.mark.parametrize(
    ("name", "value"),
    [("task_default_queue_type", "stream"), ("task_create_missing_queue_type", None),
     ("task_queue_delivery_limit", -1), ("task_queue_delivery_limit", "5"),
     ("task_dead_letter_queue", ""), ("task_dead_letter_queue", 3),
     ("broker_delay_threshold", -1), ("broker_delay_threshold", "60")],
)
def test_bad_values_are_refused(name: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings().update({name: value})


def test_queue_type_settings_are_no_longer_unsupported() -> None:
    settings = conf(task_default_queue_type="quorum", task_create_missing_queue_type="quorum")
    assert settings.unsupported == {}
    assert settings.broker_delay_threshold == 60 and settings.task_dead_letter_queue is None
    assert conf(broker_delay_threshold=timedelta(minutes=2)).broker_delay_threshold == 120


# -- the delay plan --------------------------------------------------------------------------


def test_broker_delay_only_beyond_the_threshold() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    settings = conf(broker_delay_threshold=60)
    assert delays.broker_delay(settings, None, now) is None
    assert delays.broker_delay(settings, now + timedelta(seconds=60), now) is None
    assert delays.broker_delay(settings, now + timedelta(seconds=61), now) == 61
    naive = (now + timedelta(hours=1)).replace(tzinfo=None)  # naive is UTC
    assert delays.broker_delay(settings, naive, now) == 3600
    for disabled in (0, None):
        settings.broker_delay_threshold = disabled
        assert delays.broker_delay(settings, now + timedelta(days=1), now) is None


def test_routing_keys_and_queue_names() -> None:
    assert delays.routing_key(5, "q") == "0." * 25 + "1.0.1.q"
    assert delays.top_level(1) == 0 and delays.top_level(5) == 2
    assert delays.top_level(delays.MAX_DELAY) == delays.LEVELS - 1
    assert delays.final_binding_key("a.b") == "*." * 28 + "a.b"
    assert delays.delayable("celery") and delays.delayable("a.b-c")
    assert not delays.delayable("a.#") and not delays.delayable("*")
    assert not delays.delayable("") and not delays.delayable("x" * 200)


def test_level_declarations() -> None:
    level = delays.level("p", 3, "classic")
    assert level.queue.name == level.queue.exchange_name == "p.3"
    assert level.queue.exchange_type == "topic" and level.queue.durable
    assert level.queue.binding_key == "*." * 24 + "1.#"
    assert level.skip_key == "*." * 24 + "0.#"
    assert level.next_exchange == "p.2"
    assert level.queue.queue_arguments == {"x-message-ttl": 8000, "x-dead-letter-exchange": "p.2"}
    bottom = delays.level("p", 0, "quorum")
    assert bottom.next_exchange == "p" and bottom.queue.queue_arguments == {
        "x-message-ttl": 1000, "x-dead-letter-exchange": "p", "x-queue-type": "quorum",
        "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish",
    }


def _topic(pattern: str, key: str) -> bool:
    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and p[0] in ("*", k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


def test_a_message_waits_exactly_its_delay_and_reaches_only_its_queue() -> None:
    """Walk the ladder as RabbitMQ routes it: the queues passed add up to the delay."""
    queues = ["work", "a.work", "work.b"]
    rng = random.Random(7)
    for seconds in [1, 2, 3, 60, 61, 86400, delays.MAX_DELAY, *rng.sample(range(1, 10**7), 50)]:
        key = delays.routing_key(seconds, "work")
        exchange, waited = f"p.{delays.top_level(seconds)}", 0
        while exchange != "p":
            level = delays.level("p", int(exchange.rsplit(".", 1)[1]), "classic")
            if _topic(level.queue.binding_key, key):  # into the level's queue, then down
                assert not _topic(level.skip_key, key)
                waited += level.queue.queue_arguments["x-message-ttl"] // 1000
            else:
                assert _topic(level.skip_key, key)
            exchange = level.next_exchange
        assert waited == seconds
        assert [q for q in queues if _topic(delays.final_binding_key(q), key)] == ["work"]


# -- memory and SQLite: delivery limit and delayed delivery -----------------------------------


QUORUM = conf(task_default_queue="work", task_default_queue_type="quorum",
              task_queue_delivery_limit=2, task_dead_letter_queue="work.dead")


@pytest.fixture(params=["memory", "sqlite"])
async def broker(
    request: pytest.FixtureRequest, unique: str, tmp_path: Path
) -> AsyncIterator[Broker]:
    url = f"memory://{unique}" if request.param == "memory" else f"sqlite:///{tmp_path}/q.db"
    instance: Broker = (MemoryBroker if request.param == "memory" else SqliteBroker)(url, QUORUM)
    await instance.connect()
    for spec in declarations(QUORUM, "work"):
        await instance.declare(spec)
    yield instance
    await instance.close()
    memory_broker.reset(url)


async def _receive_ids(broker: Broker, queue: str, count: int) -> list[str]:
    ids = []
    async with broker.consume([queue], prefetch=10) as consumer:
        for _ in range(count):
            with anyio.fail_after(2):
                delivery = await consumer.receive()
            ids.append(delivery.envelope.headers["id"])
            await delivery.ack()
    return ids


async def test_requeued_past_the_delivery_limit_is_dead_lettered(broker: Broker) -> None:
    await broker.publish(Envelope(b"[]", {"id": "poison"}), routing_key="work")
    await broker.publish(Envelope(b"[]", {"id": "fine"}), routing_key="work")
    deliveries = 0
    async with broker.consume(["work"], prefetch=1) as consumer:
        while True:  # as on RabbitMQ with limit 2: delivered 3 times, then dead-lettered
            with anyio.fail_after(2):
                delivery = await consumer.receive()
            if delivery.envelope.headers["id"] == "fine":
                await delivery.ack()
                break
            deliveries += 1
            await delivery.reject(requeue=True)
    assert deliveries == 3
    assert await _receive_ids(broker, "work.dead", 1) == ["poison"]


async def test_a_consumer_gone_with_the_message_counts_as_a_delivery(
    broker: Broker, unique: str, tmp_path: Path
) -> None:
    await broker.publish(Envelope(b"[]", {"id": "kills-workers"}), routing_key="work")
    for _ in range(3):  # limit 2: the third consumer to die with it is the last
        other: Broker = type(broker)(broker.url, QUORUM)
        await other.connect()
        consumer = other.consume(["work"], prefetch=1)
        await consumer.start()
        with anyio.fail_after(2):
            await consumer.receive()
        await other.close()  # unsettled: given back, as when a connection drops
    assert await _receive_ids(broker, "work.dead", 1) == ["kills-workers"]


async def test_rejected_without_requeue_is_dead_lettered(broker: Broker) -> None:
    await broker.publish(Envelope(b"[]", {"id": "bad"}), routing_key="work")
    async with broker.consume(["work"], prefetch=1) as consumer:
        with anyio.fail_after(2):
            await (await consumer.receive()).reject(requeue=False)
    assert await _receive_ids(broker, "work.dead", 1) == ["bad"]


async def test_publish_delayed_keeps_the_message_back(broker: Broker) -> None:
    started = time.monotonic()
    assert await broker.publish_delayed(
        Envelope(b"[]", {"id": "later"}, expiration="1"), queue="work", delay=0.3
    )
    await broker.publish(Envelope(b"[]", {"id": "now"}), routing_key="work")
    assert await _receive_ids(broker, "work", 2) == ["now", "later"]
    assert time.monotonic() - started >= 0.29  # and its expiration did not drop it


async def test_the_app_delays_far_etas_in_the_broker_and_the_worker_runs_them(
    unique: str,
) -> None:
    url = f"memory://{unique}"
    app = AioQueue("tests", broker=url, backend=url, broker_delay_threshold=0.2)
    ran_at: list[float] = []

    @app.task
    async def stamp() -> None:
        ran_at.append(time.time())

    try:
        eta = time.time() + 0.5
        far = await stamp.apply_async(countdown=0.5)
        await stamp.apply_async(countdown=0.1)  # below the threshold: straight to the queue
        hub = memory_broker._HUBS[url]
        assert len(hub.queues["celery"].items) == 1
        async with running_worker(app):
            await far.get(timeout=3)
        assert len(ran_at) == 2 and ran_at[1] >= eta - 0.01
    finally:
        await app.close()
        memory_broker.reset(url)
        memory_store.reset(url)
