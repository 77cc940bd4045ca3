"""Remote control on the real RabbitMQ: Celery's pidbox broadcast both ways.

``app.control.revoke()`` is compared with the captured Celery broadcast, ``ControlListener``
hears our commands and a stock Celery client's, a stock Celery worker (5.7, and 5.4 on
py-amqp 5.3.1) hears ours, and the listener keeps hearing after its connection was cut.

The exchange ``celery.pidbox`` is shared by every worker on the vhost, so it is never
deleted; every listener has a hostname of its own (its queue is auto-delete), commands are
addressed to it where the test allows, and revoked ids are fresh uuids, meaningless to any
other worker that hears them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from yarl import URL

from aioqueue import AioQueue
from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.config import Settings
from aioqueue.control import PIDBOX_EXCHANGE, ControlListener

from ..interop.conftest import STOCK_APP, celery_54, start_stock_worker, stop_stock_worker
from ..interop.test_from_stock_client import close_stock_client
from .conftest import delete_queues, eventually
from .test_amqp_broker import Proxy

pytestmark = pytest.mark.integration

VECTOR = Path(__file__).parent.parent / "vectors" / "amqp_pidbox_revoke_broadcast.json"

Revocation = tuple[list[str], bool]


class Recorder:
    """An ``on_revoke`` that hands every call to the test through a stream."""

    def __init__(self) -> None:
        self._send: MemoryObjectSendStream[Revocation]
        self._receive: MemoryObjectReceiveStream[Revocation]
        self._send, self._receive = anyio.create_memory_object_stream[Revocation](100)

    def __call__(self, ids: list[str], terminate: bool) -> None:
        self._send.send_nowait((ids, terminate))

    async def next(self, timeout: float = 10) -> Revocation:
        with anyio.fail_after(timeout):
            return await self._receive.receive()

    def close(self) -> None:
        self._send.close()
        self._receive.close()


@asynccontextmanager
async def listening(app: AioQueue, hostname: str) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(ControlListener(app, hostname, recorder).run)
            yield recorder
            tg.cancel_scope.cancel()
    finally:
        recorder.close()


@pytest.fixture
async def raw(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A plain connection of the test's own, for looking from the outside."""
    connection = await aio_pika.connect(amqp_url)
    yield connection
    await connection.close()


@pytest.fixture
async def client(amqp_url: str) -> AsyncIterator[AioQueue]:
    app = AioQueue("client", broker=amqp_url)
    yield app
    await app.close()


@pytest.fixture
async def worker_app(amqp_url: str) -> AsyncIterator[AioQueue]:
    app = AioQueue("worker", broker=amqp_url)
    yield app
    await app.close()


@pytest.fixture
def hostname(unique: str) -> str:
    return f"{unique}@aioqueue-test"


async def tap(connection: aio_pika.abc.AbstractConnection) -> aio_pika.abc.AbstractQueue:
    """An exclusive queue of the test's own bound to celery.pidbox (gone with the connection)."""
    channel = await connection.channel()
    exchange = await channel.declare_exchange(PIDBOX_EXCHANGE, "fanout", durable=False)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key="")
    return queue


async def publish_raw(
    connection: aio_pika.abc.AbstractConnection, body: bytes, headers: dict[str, Any]
) -> None:
    async with connection.channel() as channel:
        exchange = await channel.get_exchange(PIDBOX_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(body, headers=headers, content_type="application/json",
                             content_encoding="utf-8"),
            routing_key="",
        )


def command(task_id: str, destination: list[str] | None, **fields: Any) -> bytes:
    body = {"method": "revoke", "arguments": {"task_id": task_id, "terminate": False,
                                              "signal": "SIGTERM"},
            "destination": destination, "pattern": None, "matcher": None, **fields}
    return json.dumps(body).encode()


# -- what we send ---------------------------------------------------------------------------


async def test_revoke_on_the_wire_is_celerys(
    amqp_url: str, settings: Settings, raw: aio_pika.abc.AbstractConnection, hostname: str
) -> None:
    vector = json.loads(VECTOR.read_text())["messages"][0]
    queue = await tap(raw)
    task_id = str(uuid.uuid4())
    target = URL(amqp_url)
    async with Proxy(target.host or "127.0.0.1", target.port or 5672) as proxy:
        app = AioQueue("client", broker=str(target.with_port(proxy.port)))
        async with app:
            before = time.time()
            await app.control.revoke(task_id, destination=[hostname])
    with anyio.fail_after(10):
        async with queue.iterator() as messages:
            message = await anext(messages)
            await message.ack()
    assert json.loads(message.body) == {
        **vector["body_decoded"], "destination": [hostname],
        "arguments": {**vector["body_decoded"]["arguments"], "task_id": task_id},
    }
    assert message.exchange == vector["exchange"]
    assert message.routing_key == vector["routing_key"]
    properties = vector["properties"]
    assert message.content_type == properties["content_type"]
    assert message.content_encoding == properties["content_encoding"]
    assert message.delivery_mode == properties["delivery_mode"]
    assert message.priority == properties["priority"]
    headers = message.headers
    assert set(headers) == set(vector["headers"])
    clock, expires = headers["clock"], headers["expires"]
    assert isinstance(clock, int) and clock >= 1
    assert isinstance(expires, float) and before + 1 <= expires <= time.time() + 1
    # The field-table tags py-amqp writes and every py-amqp reads (vector: I and d).
    assert vector["header_wire_types"] == {"clock": "I", "expires": "d"}
    assert b"\x05clockI" + struct.pack(">i", clock) in proxy.sent
    assert b"\x07expiresd" + struct.pack(">d", expires) in proxy.sent


# -- the listener ---------------------------------------------------------------------------


async def test_listener_declares_celerys_queue_and_hears_only_its_commands(
    client: AioQueue, worker_app: AioQueue, raw: aio_pika.abc.AbstractConnection,
    hostname: str, caplog: pytest.LogCaptureFixture,
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(6)]
    with caplog.at_level(logging.WARNING, logger="aioqueue.control"):
        async with listening(worker_app, hostname) as heard:
            # Declared as Celery declares them: redeclaring with those settings is accepted
            # (RabbitMQ refuses a declaration that differs in any of them).
            async with raw.channel() as channel:
                await channel.declare_exchange(PIDBOX_EXCHANGE, "fanout", durable=False)
                queue = await channel.declare_queue(
                    f"{hostname}.celery.pidbox", durable=False, auto_delete=True,
                    arguments={"x-message-ttl": 300000, "x-expires": 10000},
                )
                assert queue.declaration_result.consumer_count == 1

            await client.control.revoke(ids[0], destination=[hostname])
            assert await heard.next() == ([ids[0]], False)
            await client.control.revoke([ids[1], ids[2]], terminate=True,
                                        destination=["someone-else@x", hostname])
            assert await heard.next() == ([ids[1], ids[2]], True)

            await client.control.revoke(ids[3], destination=[f"other-{hostname}"])
            now = time.time()
            await publish_raw(raw, command(ids[4], [hostname]),
                              {"clock": 1, "expires": now - 3600})
            await publish_raw(raw, b"{not json", {"clock": 1, "expires": now + 10})
            await publish_raw(raw, json.dumps([1, 2]).encode(), {})
            await publish_raw(raw, command(ids[5], [hostname]), {"clock": 2, "expires": 0.0})
            assert await heard.next() == ([ids[5]], False)  # none of the others got through
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "aioqueue.control" and r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and all("malformed" in m for m in warnings)


async def test_broadcast_and_async_result_revoke_reach_the_listener(
    client: AioQueue, worker_app: AioQueue, hostname: str
) -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    async with listening(worker_app, hostname) as heard:
        await client.control.revoke(first)  # everyone's: a fresh id means nothing elsewhere
        assert await heard.next() == ([first], False)
        await client.AsyncResult(second).revoke(terminate=True)
        assert await heard.next() == ([second], True)


async def test_stock_celery_client_revoke_reaches_the_listener(
    amqp_url: str, worker_app: AioQueue, hostname: str
) -> None:
    from celery import Celery

    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    stock = Celery("stockclient", broker=amqp_url)
    # Closed right after it publishes: with confirms the revoke is in RabbitMQ by then.
    stock.conf.broker_transport_options = {"confirm_publish": True}
    try:
        async with listening(worker_app, hostname) as heard:
            await anyio.to_thread.run_sync(lambda: stock.control.revoke(first))
            assert await heard.next() == ([first], False)
            await anyio.to_thread.run_sync(lambda: stock.control.revoke(
                [second], terminate=True, signal="SIGKILL", destination=[hostname]))
            assert await heard.next() == ([second], True)
    finally:
        close_stock_client(stock)


async def test_listener_hears_again_after_a_lost_connection(
    amqp_url: str, settings: Settings, client: AioQueue, hostname: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    target = URL(amqp_url)
    async with Proxy(target.host or "127.0.0.1", target.port or 5672) as proxy:
        url = target.with_port(proxy.port).update_query(reconnect_interval="0.1")
        app = AioQueue("worker", broker=AmqpBroker(str(url), settings))
        try:
            with caplog.at_level(logging.WARNING, logger="aioqueue"):
                async with listening(app, hostname) as heard:
                    before = str(uuid.uuid4())
                    await client.control.revoke(before, destination=[hostname])
                    assert await heard.next() == ([before], False)
                    connections = proxy.accepted
                    proxy.cut()
                    # The auto-delete queue went with the old connection; commands sent
                    # before the new one re-declared it are lost (as with Celery). Send
                    # until one arrives: that proves the listener consumes again.
                    with anyio.fail_after(20):
                        while True:
                            probe = str(uuid.uuid4())
                            await client.control.revoke(probe, destination=[hostname])
                            with anyio.move_on_after(0.5):
                                assert await heard.next() == ([probe], False)
                                break
                    assert proxy.accepted > connections
                    after = str(uuid.uuid4())
                    await client.control.revoke(after, destination=[hostname])
                    assert await heard.next() == ([after], False)
        finally:
            await app.close()
    errors = [r.getMessage() for r in caplog.records
              if r.name.startswith("aioqueue") and r.levelno >= logging.ERROR]
    assert errors == []  # e.g. "could not consume again ... after reconnecting"


# -- a stock Celery worker hears us -----------------------------------------------------------


@pytest.fixture(params=["5.7", "5.4"])
def stock_celery(request: pytest.FixtureRequest) -> Path | None:
    """None: the Celery in this venv; else Celery 5.4 on py-amqp 5.3.1 (old header reader)."""
    return None if request.param == "5.7" else celery_54()


@pytest.fixture
def stock_env(
    tmp_path: Path, amqp_url: str, unique: str
) -> Iterator[dict[str, str]]:
    (tmp_path / "stockapp.py").write_text(STOCK_APP)
    yield {**os.environ, "T_BROKER": amqp_url, "T_BACKEND": "rpc://", "T_QUEUE": unique,
           "PYTHONPATH": str(tmp_path)}
    anyio.run(delete_queues, amqp_url, [unique])


async def test_control_revoke_reaches_a_stock_worker(
    tmp_path: Path, stock_env: dict[str, str], stock_celery: Path | None, client: AioQueue,
) -> None:
    worker = await anyio.to_thread.run_sync(
        lambda: start_stock_worker(tmp_path, stock_env, stock_celery)
    )
    try:
        node = f"stock-{stock_env['T_QUEUE']}@{socket.gethostname()}"
        task_id = str(uuid.uuid4())
        await client.control.revoke(task_id, destination=[node])
        # Another process: its log is all there is to watch.
        await eventually(lambda: f"Tasks flagged as revoked: {task_id}" in worker.output(),
                         timeout=20)
        assert "Traceback" not in worker.output()
    finally:
        await anyio.to_thread.run_sync(lambda: stop_stock_worker(worker))
