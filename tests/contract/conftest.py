"""One set of contract tests, run against every broker and every result store.

Brokers: memory, SQLite (no server), RabbitMQ. Result stores: memory, SQLite, Redis, rpc
(over RabbitMQ). The real servers are used as they are, with names of this test's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aio_pika
import pytest

from aioqueue.brokers import memory as memory_broker
from aioqueue.brokers.base import Broker
from aioqueue.config import Settings
from aioqueue.registry import broker_class, result_store_class
from aioqueue.results import memory as memory_store
from aioqueue.results.base import ResultStore

BrokerFactory = Callable[[], Awaitable[Broker]]

BROKERS = ["memory", "sqlite", pytest.param("amqp", marks=pytest.mark.integration)]
STORES = [
    "memory", "sqlite",
    pytest.param("redis", marks=pytest.mark.integration),
    pytest.param("rpc", marks=pytest.mark.integration),
]


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest, tmp_path: Path, amqp_url: str, unique: str) -> str:
    kind = request.param
    if kind == "memory":
        return f"memory://{unique}"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'broker.db'}"
    return amqp_url


@pytest.fixture
async def new_broker(
    broker_url: str, settings: Settings, unique: str, amqp_url: str
) -> AsyncIterator[BrokerFactory]:
    """Makes connected brokers on the same URL (several, to stand for several processes)."""
    made: list[Broker] = []

    async def make() -> Broker:
        broker = broker_class(broker_url)(broker_url, settings)
        await broker.connect()
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.close()
    if broker_url.startswith("memory://"):
        memory_broker.reset(broker_url)
    if broker_url == amqp_url:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            for suffix in ("", "-dead", "-prio", "-topic"):
                await channel.queue_delete(unique + suffix)
                await channel.exchange_delete(unique + suffix)


@pytest.fixture(params=STORES)
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, settings: Settings, redis_url: str,
    amqp_url: str, unique: str,
) -> AsyncIterator[ResultStore]:
    kind = request.param
    broker: Broker | None = None
    url = {
        "memory": f"memory://{unique}", "sqlite": f"sqlite:///{tmp_path / 'results.db'}",
        "redis": redis_url, "rpc": "rpc://",
    }[kind]
    if kind == "rpc":
        broker = broker_class(amqp_url)(amqp_url, settings)
        await broker.connect()
    result_store = result_store_class(url)(url, settings, broker)
    await result_store.connect()
    await result_store.prepare_client()
    yield result_store
    await result_store.close()
    if broker is not None:
        await broker.close()
    if kind == "memory":
        memory_store.reset(url)
