"""Remote control (``aioqueue.control``) on ``memory://`` and ``sqlite://``: Celery's revoke
broadcast as sent by ``app.control``, the worker-side ``ControlListener`` and ``Revoked``.

Negative checks (a command that must *not* reach ``on_revoke``) are followed by a command
that must; a single queue delivers in order, so once that one arrived the other was handled.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from aioqueue import AioQueue
from aioqueue.brokers import memory as memory_broker
from aioqueue.brokers.base import Broker, Delivery
from aioqueue.config import Queue
from aioqueue.control import (
    PIDBOX_EXCHANGE,
    ControlListener,
    Revoked,
    pidbox_queue,
)
from aioqueue.protocol import Envelope
from aioqueue.result import EagerResult

VECTOR = Path(__file__).parent.parent / "vectors" / "amqp_pidbox_revoke_broadcast.json"

Revocation = tuple[list[str], bool]


@pytest.fixture(params=["memory", "sqlite"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path, unique: str) -> Iterator[str]:
    if request.param == "memory":
        url = f"memory://{unique}"
        yield url
        memory_broker.reset(url)
    else:
        yield f"sqlite:///{tmp_path / 'control.db'}"


@pytest.fixture
async def client(broker_url: str) -> AsyncIterator[AioQueue]:
    """The sending side: its own app (and broker connection) on the same URL."""
    app = AioQueue("client", broker=broker_url)
    yield app
    await app.close()


@pytest.fixture
async def worker_app(broker_url: str) -> AsyncIterator[AioQueue]:
    app = AioQueue("worker", broker=broker_url)
    yield app
    await app.close()


class Recorder:
    """An ``on_revoke`` that hands every call to the test through a stream."""

    def __init__(self) -> None:
        self._send: MemoryObjectSendStream[Revocation]
        self._receive: MemoryObjectReceiveStream[Revocation]
        self._send, self._receive = anyio.create_memory_object_stream[Revocation](100)

    def __call__(self, ids: list[str], terminate: bool) -> None:
        self._send.send_nowait((ids, terminate))

    async def next(self) -> Revocation:
        with anyio.fail_after(5):
            return await self._receive.receive()

    def close(self) -> None:
        self._send.close()
        self._receive.close()


@asynccontextmanager
async def listening(app: AioQueue, hostname: str, **options: Any) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    listener = ControlListener(app, hostname, recorder, **options)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(listener.run)
            yield recorder
            tg.cancel_scope.cancel()
    finally:
        recorder.close()


async def bound_queue(broker: Broker, name: str) -> None:
    """A queue of the test's own on the pidbox exchange, to read commands as workers get them."""
    await broker.declare_exchange(PIDBOX_EXCHANGE, "fanout", durable=False)
    await broker.declare(Queue(name, exchange=PIDBOX_EXCHANGE, exchange_type="fanout",
                               routing_key="", durable=False, auto_delete=True))


async def receive_one(broker: Broker, name: str) -> Delivery:
    async with broker.consume([name], prefetch=1, no_ack=True) as consumer:
        with anyio.fail_after(5):
            return await consumer.receive()


def command(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"method": "revoke", "arguments": {"task_id": "x"},
                            "destination": None, "pattern": None, "matcher": None}
    body.update(fields)
    return body


def raw(body: Any, *, content_type: str = "application/json", **headers: Any) -> Envelope:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers.setdefault("clock", 1)
    headers.setdefault("expires", time.time() + 1)
    return Envelope(body=data, headers=headers, content_type=content_type)


async def send_raw(app: AioQueue, envelope: Envelope) -> None:
    broker = await app.get_broker()
    await broker.declare_exchange(PIDBOX_EXCHANGE, "fanout", durable=False)
    await broker.publish(envelope, routing_key="", exchange=PIDBOX_EXCHANGE)


# -- what app.control sends -------------------------------------------------------------


async def test_revoke_sends_celerys_broadcast(client: AioQueue, unique: str) -> None:
    vector = json.loads(VECTOR.read_text())["messages"][0]
    broker = await client.get_broker()
    await bound_queue(broker, unique)
    task_id = str(uuid.uuid4())
    before = time.time()
    await client.control.revoke(task_id)
    delivery = await receive_one(broker, unique)
    envelope = delivery.envelope
    assert json.loads(envelope.body) == {**vector["body_decoded"], "arguments": {
        **vector["body_decoded"]["arguments"], "task_id": task_id}}
    assert list(json.loads(envelope.body)) == list(vector["body_decoded"])  # same key order
    assert set(envelope.headers) == set(vector["headers"]) == {"clock", "expires"}
    assert isinstance(envelope.headers["clock"], int) and envelope.headers["clock"] >= 1
    assert isinstance(envelope.headers["expires"], float)
    assert before + 1 <= envelope.headers["expires"] <= time.time() + 1
    properties = vector["properties"]
    assert envelope.content_type == properties["content_type"]
    assert envelope.content_encoding == properties["content_encoding"]
    assert envelope.delivery_mode == properties["delivery_mode"]
    assert envelope.priority == properties["priority"]
    assert delivery.routing_key == vector["routing_key"] == ""


async def test_revoke_many_with_terminate_and_destination(client: AioQueue, unique: str) -> None:
    broker = await client.get_broker()
    await bound_queue(broker, unique)
    await client.control.revoke(("a", "b"), terminate=True, signal="SIGKILL",
                                destination=["w1@h", "w2@h"])
    await client.control.revoke("c")
    first = await receive_one(broker, unique)
    assert json.loads(first.envelope.body) == {
        "method": "revoke",
        "arguments": {"task_id": ["a", "b"], "terminate": True, "signal": "SIGKILL"},
        "destination": ["w1@h", "w2@h"], "pattern": None, "matcher": None,
    }
    second = await receive_one(broker, unique)
    assert second.envelope.headers["clock"] == first.envelope.headers["clock"] + 1


async def test_broadcast_is_the_generic_primitive(client: AioQueue, unique: str) -> None:
    broker = await client.get_broker()
    await bound_queue(broker, unique)
    await client.control.broadcast("ping", destination=["w@h"], timeout=30)
    delivery = await receive_one(broker, unique)
    assert json.loads(delivery.envelope.body) == {
        "method": "ping", "arguments": {}, "destination": ["w@h"], "pattern": None,
        "matcher": None,
    }
    assert delivery.envelope.headers["expires"] > time.time() + 25
    with pytest.raises(TypeError):
        await client.control.broadcast("ping", destination="w@h")


async def test_fanout_reaches_every_bound_queue(client: AioQueue, unique: str) -> None:
    broker = await client.get_broker()
    for suffix in ("-a", "-b"):
        await bound_queue(broker, unique + suffix)
    await broker.declare_exchange(PIDBOX_EXCHANGE, "fanout", durable=False)  # idempotent
    await client.control.revoke("t1")
    for suffix in ("-a", "-b"):
        delivery = await receive_one(broker, unique + suffix)
        assert json.loads(delivery.envelope.body)["arguments"]["task_id"] == "t1"


# -- the listener -----------------------------------------------------------------------


async def test_listener_hears_a_broadcast(
    client: AioQueue, worker_app: AioQueue, unique: str
) -> None:
    async with listening(worker_app, f"{unique}@h") as heard:
        await client.control.revoke("t1")
        assert await heard.next() == (["t1"], False)
        await client.control.revoke(["t2", "t3"], terminate=True)
        assert await heard.next() == (["t2", "t3"], True)
        await client.AsyncResult("t4").revoke()
        assert await heard.next() == (["t4"], False)


async def test_every_listener_hears_a_broadcast(
    client: AioQueue, worker_app: AioQueue, unique: str
) -> None:
    async with listening(worker_app, f"a-{unique}@h") as a, \
            listening(worker_app, f"b-{unique}@h") as b:
        await client.control.revoke("t1")
        assert await a.next() == (["t1"], False)
        assert await b.next() == (["t1"], False)


async def test_destination_selects_listeners(
    client: AioQueue, worker_app: AioQueue, unique: str
) -> None:
    me = f"{unique}@h"
    async with listening(worker_app, me) as heard:
        await client.control.revoke("other", destination=[f"other-{unique}@h"])
        await client.control.revoke("mine", destination=[f"other-{unique}@h", me])
        assert await heard.next() == (["mine"], False)
        await send_raw(client, raw(command(arguments={"task_id": "str"}, destination=me)))
        assert await heard.next() == (["str"], False)


async def test_pattern_and_matcher_as_kombu(
    client: AioQueue, worker_app: AioQueue, unique: str
) -> None:
    async with listening(worker_app, f"{unique}@host1") as heard:
        for task_id, pattern, matcher in [
            ("no-glob", "*@host2", "glob"), ("glob", f"{unique}@host*", "glob"),
            ("no-pcre", "^other", "pcre"), ("pcre", f"^{unique}@host\\d$", "pcre"),
        ]:
            await send_raw(client, raw(command(
                arguments={"task_id": task_id}, pattern=pattern, matcher=matcher)))
        assert await heard.next() == (["glob"], False)
        assert await heard.next() == (["pcre"], False)


async def test_expired_commands_are_ignored(
    client: AioQueue, worker_app: AioQueue, unique: str
) -> None:
    now = time.time()
    async with listening(worker_app, f"{unique}@h", expires_grace=10) as heard:
        await send_raw(client, raw(command(arguments={"task_id": "old"}), expires=now - 60))
        await send_raw(client, raw(command(arguments={"task_id": "late"}), expires=now - 1))
        assert await heard.next() == (["late"], False)  # within the grace
        await send_raw(client, raw(command(arguments={"task_id": "never"}), expires=0))
        assert await heard.next() == (["never"], False)  # kombu's "no expiry"
    async with listening(worker_app, f"{unique}@h", expires_grace=0) as heard:
        await send_raw(client, raw(command(arguments={"task_id": "late"}), expires=now - 1))
        await send_raw(client, raw(command(arguments={"task_id": "fresh"})))
        assert await heard.next() == (["fresh"], False)


async def test_malformed_commands_are_logged_and_skipped(
    client: AioQueue, worker_app: AioQueue, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad = [
        raw(b"{not json"),
        raw(["revoke"]),
        raw({"arguments": {"task_id": "x"}}),
        raw(command(arguments=["x"])),
        raw(command(arguments={"task_id": 5})),
        raw(command(arguments={"task_id": ["x", None]})),
        raw(command(arguments={})),
        raw(command(destination=7)),
        raw(command(pattern="x", matcher="nosuch")),
        raw(command(pattern="(", matcher="pcre")),
        raw(b"\x80\x04K\x01.", content_type="application/x-python-serialize"),
    ]
    with caplog.at_level(logging.WARNING, logger="aioqueue.control"):
        async with listening(worker_app, f"{unique}@h") as heard:
            for envelope in bad:
                await send_raw(client, envelope)
            await client.control.revoke("good")
            assert await heard.next() == (["good"], False)
    warnings = [r for r in caplog.records
                if r.name == "aioqueue.control" and r.levelno >= logging.WARNING]
    assert len(warnings) == len(bad), [r.getMessage() for r in warnings]
    assert all("malformed" in r.getMessage() for r in warnings)


async def test_other_methods_and_failing_callbacks_do_not_stop_the_listener(
    client: AioQueue, worker_app: AioQueue, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[Revocation] = []
    done = anyio.Event()

    def on_revoke(ids: list[str], terminate: bool) -> None:
        calls.append((ids, terminate))
        if ids == ["boom"]:
            raise RuntimeError("boom")
        done.set()

    listener = ControlListener(worker_app, f"{unique}@h", on_revoke)
    with caplog.at_level(logging.DEBUG, logger="aioqueue.control"):
        async with anyio.create_task_group() as tg:
            await tg.start(listener.run)
            await send_raw(client, raw({
                "method": "hello", "arguments": {"from_node": "x@h", "revoked": []},
                "destination": None, "pattern": None, "matcher": None, "ticket": "t",
                "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "r"},
            }))
            await client.control.broadcast("ping")
            await client.control.revoke("boom")
            await client.control.revoke("after")
            with anyio.fail_after(5):
                await done.wait()
            tg.cancel_scope.cancel()
    assert calls == [(["boom"], False), (["after"], False)]
    messages = [r.getMessage() for r in caplog.records]
    assert any("'hello'" in m and "not supported" in m for m in messages)
    assert any("'ping'" in m and "not supported" in m for m in messages)
    assert any("revoke of boom failed" in m for m in messages)


async def test_listener_declares_celerys_queue_and_stops_consuming(
    client: AioQueue, worker_app: AioQueue, unique: str
) -> None:
    hostname = f"{unique}@h"
    queue = pidbox_queue(hostname)
    assert queue == Queue(
        f"{hostname}.celery.pidbox", exchange="celery.pidbox", exchange_type="fanout",
        routing_key="", durable=False, auto_delete=True,
        queue_arguments={"x-message-ttl": 300000, "x-expires": 10000},
    )
    async with listening(worker_app, hostname) as heard:
        await client.control.revoke("t1")
        assert await heard.next() == (["t1"], False)
    # Cancelled: the queue is left without a consumer, so a command stays there unread.
    await client.control.revoke("t2")
    broker = await client.get_broker()
    delivery = await receive_one(broker, queue.name)
    assert json.loads(delivery.envelope.body)["arguments"]["task_id"] == "t2"


async def test_eager_result_revoke_does_nothing(worker_app: AioQueue) -> None:
    result: EagerResult[int] = EagerResult("id", worker_app, value=1)
    await result.revoke(terminate=True)
    assert await result.get() == 1


# -- Revoked ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_revoked_defaults_are_celerys() -> None:
    revoked = Revoked()
    assert (revoked.maxlen, revoked.expires) == (50_000, 10_800)


def test_revoked_is_bounded_oldest_first() -> None:
    clock = FakeClock()
    revoked = Revoked(maxlen=3, expires=60, clock=clock)
    revoked.add("a")
    revoked.add(["b", "c"])
    assert "a" in revoked and "b" in revoked and "c" in revoked
    revoked.add("a")  # known again: now the newest
    revoked.add("d")
    assert "b" not in revoked
    assert all(i in revoked for i in "acd")
    assert len(revoked) == 3
    revoked.add(f"x{i}" for i in range(10))
    assert len(revoked) == 3 and "x9" in revoked and "x6" not in revoked


def test_revoked_ids_expire() -> None:
    clock = FakeClock()
    revoked = Revoked(maxlen=10, expires=60, clock=clock)
    revoked.add("a")
    clock.now += 30
    revoked.add("b")
    assert "a" in revoked and "b" in revoked
    clock.now += 30
    assert "a" not in revoked and "b" in revoked
    revoked.add("b")  # refreshed
    clock.now += 59
    assert "b" in revoked
    clock.now += 1
    assert "b" not in revoked
    assert len(revoked) == 0


def test_revoked_membership_of_other_types_and_bad_bound() -> None:
    revoked = Revoked()
    revoked.add("abc")  # one id, not three letters
    assert "abc" in revoked and "a" not in revoked
    revoked.update(["d", "e"])  # set's name for it
    assert "d" in revoked and "e" in revoked and len(revoked) == 3
    assert 1 not in revoked and ["abc"] not in revoked
    with pytest.raises(ValueError):
        Revoked(maxlen=0)


def test_revoked_at_full_size_stays_fast() -> None:
    revoked = Revoked()
    started = time.perf_counter()
    revoked.add(str(i) for i in range(200_000))
    for i in range(200_000, 260_000):
        revoked.add(str(i))
    assert len(revoked) == 50_000
    assert "259999" in revoked and "209999" not in revoked
    assert time.perf_counter() - started < 5  # linear, not quadratic
