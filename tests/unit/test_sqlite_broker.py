"""``sqlite://`` broker: the whole broker contract, across brokers and across real processes.

Two ``SqliteBroker`` instances on one file stand for two processes (each has its own
connection and thread); the multi-process and SIGKILL tests use real subprocesses.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from aioqueue import AioQueue
from aioqueue.brokers import sqlite as sqlite_broker
from aioqueue.brokers.base import Delivery
from aioqueue.brokers.sqlite import SqliteBroker
from aioqueue.config import Queue, Settings
from aioqueue.exceptions import BrokerConnectionError, BrokerError, ConfigurationError
from aioqueue.protocol import Envelope
from aioqueue.registry import broker_class, result_store_class
from aioqueue.results.sqlite import SqliteResultStore
from aioqueue.sqlite_db import database_path

from .conftest import running_worker

PROJECT = str(Path(__file__).resolve().parents[2])

MakeBroker = Callable[..., Awaitable[SqliteBroker]]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sub' / 'q.db'}"  # four slashes: an absolute path


@pytest.fixture
async def make_broker(url: str) -> AsyncIterator[MakeBroker]:
    """Connected brokers on the test's file (each like another process); closed at the end."""
    brokers: list[SqliteBroker] = []

    async def make(**transport_options: Any) -> SqliteBroker:
        settings = Settings()
        settings.task_queue_max_priority = transport_options.pop("task_queue_max_priority", None)
        settings.broker_transport_options = transport_options
        broker = SqliteBroker(url, settings)
        await broker.connect()
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        await broker.close()


def envelope(n: int | str, **fields: Any) -> Envelope:
    return Envelope(body=f'[[{n}], {{}}, {{}}]'.encode(), headers={"id": str(n), "task": "t"},
                    **fields)


async def receive(consumer: Any, timeout: float = 5) -> Delivery:
    with anyio.fail_after(timeout):
        delivery: Delivery = await consumer.receive()
        return delivery


async def nothing_within(consumer: Any, seconds: float = 0.1) -> bool:
    with anyio.move_on_after(seconds) as scope:
        await consumer.receive()
    return scope.cancelled_caught


def ident(delivery: Delivery) -> str:
    return str(delivery.envelope.headers["id"])


# -- URLs and registration ------------------------------------------------------------------


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert database_path("sqlite:///rel/q.db") == str(tmp_path / "rel" / "q.db")
    assert database_path("sqlite:////abs/q.db") == "/abs/q.db"
    for bad in ("sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite://host/q.db"):
        with pytest.raises(ConfigurationError):
            database_path(bad)
    assert broker_class("sqlite:///q.db") is SqliteBroker
    assert result_store_class("sqlite:///q.db") is SqliteResultStore


async def test_relative_url_creates_parent_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with SqliteBroker("sqlite:///a/b/q.db", Settings()) as broker:
        await broker.declare(Queue("q"))
    assert (tmp_path / "a" / "b" / "q.db").exists()
    assert sqlite3.connect(tmp_path / "a" / "b" / "q.db").execute(
        "PRAGMA journal_mode").fetchone() == ("wal",)


# -- the contract ---------------------------------------------------------------------------


async def test_roundtrip_preserves_every_envelope_field(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    await broker.declare(Queue("q"))
    sent = Envelope(
        body=b"\x00\xff binary \x80",
        headers={"id": "1", "task": "t", "nested": {"a": [1, 2.5, None, True]}, "s": "é"},
        content_type="application/x-test",
        content_encoding="binary",
        correlation_id="corr",
        reply_to="reply-queue",
        priority=3,
        delivery_mode=1,
        expiration="60000",
    )
    await broker.publish(sent, routing_key="q")
    async with broker.consume(["q"], prefetch=1) as consumer:
        delivery = await receive(consumer)
        assert delivery.envelope == sent
        assert delivery.routing_key == "q"
        assert delivery.redelivered is False
        await delivery.ack()


async def test_undeclared_queue_and_unknown_exchange(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    with pytest.raises(BrokerError, match="undeclared"):
        async with broker.consume(["nope"], prefetch=1):
            pass
    with pytest.raises(BrokerError, match="NOT_FOUND"):
        await broker.publish(envelope(1), routing_key="x", exchange="no-such-exchange")
    await broker.publish(envelope(1), routing_key="nope")  # default exchange: dropped, as AMQP


async def test_prefetch_limits_claims_and_hand_outs(make_broker: MakeBroker) -> None:
    first, second = await make_broker(), await make_broker()
    await first.declare(Queue("q"))
    for n in range(5):
        await first.publish(envelope(n), routing_key="q")
    async with first.consume(["q"], prefetch=2) as consumer:
        a, b = await receive(consumer), await receive(consumer)
        assert [ident(a), ident(b)] == ["0", "1"]
        assert await nothing_within(consumer)
        # The other three were never claimed: another consumer gets them.
        async with second.consume(["q"], prefetch=10) as other:
            got = [await receive(other) for _ in range(3)]
            assert [ident(d) for d in got] == ["2", "3", "4"]
            for d in got:
                await d.ack()
        await a.ack()  # a free slot lets the consumer take the next message
        await first.publish(envelope(5), routing_key="q")
        assert ident(await receive(consumer)) == "5"


async def test_ack_removes_for_good(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    await broker.declare(Queue("q"))
    await broker.publish(envelope(1), routing_key="q")
    async with broker.consume(["q"], prefetch=1) as consumer:
        await (await receive(consumer)).ack()
    await broker.close()
    again = await make_broker()
    async with again.consume(["q"], prefetch=1) as consumer:
        assert await nothing_within(consumer)


async def test_reject_with_requeue_redelivers(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    await broker.declare(Queue("q"))
    await broker.publish(envelope(1), routing_key="q")
    await broker.publish(envelope(2), routing_key="q")
    async with broker.consume(["q"], prefetch=1) as consumer:
        first = await receive(consumer)
        await first.reject(requeue=True)
        again = await receive(consumer)  # back in its place, ahead of message 2
        assert (ident(again), again.redelivered) == ("1", True)
        await again.ack()
        second = await receive(consumer)
        assert (ident(second), second.redelivered) == ("2", False)
        await second.ack()


async def test_reject_without_requeue_dead_letters(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    await broker.declare(Queue("dead", exchange="dlx", routing_key="dead-key"))
    await broker.declare(Queue("work", queue_arguments={
        "x-dead-letter-exchange": "dlx", "x-dead-letter-routing-key": "dead-key",
    }))
    await broker.declare(Queue("plain"))
    await broker.publish(envelope("w", priority=4), routing_key="work")
    await broker.publish(envelope("p"), routing_key="plain")
    async with broker.consume(["work", "plain"], prefetch=2) as consumer:
        for _ in range(2):
            await (await receive(consumer)).reject(requeue=False)
        assert await nothing_within(consumer)
    async with broker.consume(["dead"], prefetch=1) as consumer:
        delivery = await receive(consumer)
        assert ident(delivery) == "w"
        assert delivery.routing_key == "dead-key"
        assert delivery.envelope == envelope("w", priority=4)
        await delivery.ack()
        assert await nothing_within(consumer)  # the one without a dead-letter exchange is gone


async def test_stop_gives_back_claimed_but_not_handed_out(make_broker: MakeBroker) -> None:
    first, second = await make_broker(), await make_broker()
    await first.declare(Queue("q"))
    for n in range(3):
        await first.publish(envelope(n), routing_key="q")
    consumer = first.consume(["q"], prefetch=10)
    await consumer.start()
    handed_out = await receive(consumer)  # claims all three in one batch
    await consumer.stop()
    with pytest.raises(BrokerConnectionError):
        await consumer.receive()
    async with second.consume(["q"], prefetch=10) as other:
        got = [await receive(other) for _ in range(2)]
        assert [(ident(d), d.redelivered) for d in got] == [("1", False), ("2", False)]
        assert await nothing_within(other)  # the handed-out one is still held
        await handed_out.ack()  # settling after stop() works
        for d in got:
            await d.ack()


async def test_stop_wakes_a_waiting_receive(make_broker: MakeBroker) -> None:
    broker = await make_broker(polling_interval=30)
    await broker.declare(Queue("q"))
    consumer = broker.consume(["q"], prefetch=1)
    await consumer.start()
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            async def waiting() -> None:
                with pytest.raises(BrokerConnectionError):
                    await consumer.receive()

            tg.start_soon(waiting)
            await anyio.wait_all_tasks_blocked()  # receive() is waiting now
            await consumer.stop()


async def test_publish_in_this_process_wakes_a_consumer_at_once(
    make_broker: MakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Polls 30 s apart: only the in-process wake can deliver in time.
    monkeypatch.setattr(sqlite_broker, "MIN_POLL_INTERVAL", 30.0)
    consuming, publishing = await make_broker(), await make_broker()
    await consuming.declare(Queue("q"))
    async with consuming.consume(["q"], prefetch=1) as consumer:
        with anyio.fail_after(2):
            async with anyio.create_task_group() as tg:
                got: list[Delivery] = []

                async def take() -> None:
                    got.append(await consumer.receive())

                tg.start_soon(take)
                await publishing.publish(envelope(1), routing_key="q")
        assert ident(got[0]) == "1"


async def test_close_gives_back_unsettled(make_broker: MakeBroker) -> None:
    first, second = await make_broker(), await make_broker()
    await first.declare(Queue("q"))
    for n in range(2):
        await first.publish(envelope(n), routing_key="q")
    consumer = first.consume(["q"], prefetch=5)
    await consumer.start()
    held = [await receive(consumer) for _ in range(2)]
    await first.close()
    await held[0].ack()  # already given back: a no-op, as on a closed AMQP channel
    async with second.consume(["q"], prefetch=5) as other:
        got = [await receive(other) for _ in range(2)]
        assert [(ident(d), d.redelivered) for d in got] == [("0", True), ("1", True)]


async def test_priorities(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    await broker.declare(Queue("prio", queue_arguments={"x-max-priority": 5}))
    await broker.declare(Queue("fifo"))
    for n, priority in enumerate([1, 9, None, 5, 9, 0]):
        for queue in ("prio", "fifo"):
            await broker.publish(envelope(n, priority=priority), routing_key=queue)
    for queue, expected in (("prio", ["1", "3", "4", "0", "2", "5"]),  # 9 counts as 5
                            ("fifo", ["0", "1", "2", "3", "4", "5"])):
        async with broker.consume([queue], prefetch=1) as consumer:
            order = []
            for _ in range(6):
                delivery = await receive(consumer)
                order.append(ident(delivery))
                await delivery.ack()
        assert order == expected, queue


async def test_task_queue_max_priority_setting(make_broker: MakeBroker) -> None:
    broker = await make_broker(task_queue_max_priority=10)
    await broker.declare(Queue("q"))
    for n, priority in enumerate([0, 7, 3]):
        await broker.publish(envelope(n, priority=priority), routing_key="q")
    async with broker.consume(["q"], prefetch=3) as consumer:
        assert [ident(await receive(consumer)) for _ in range(3)] == ["1", "2", "0"]


async def test_expired_messages_are_dropped_or_dead_lettered(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    await broker.declare(Queue("dead"))
    await broker.declare(Queue("ttl", queue_arguments={"x-dead-letter-exchange": ""
                                                        , "x-dead-letter-routing-key": "dead"}))
    await broker.declare(Queue("plain"))
    for queue in ("ttl", "plain"):
        await broker.publish(envelope("gone", expiration="0"), routing_key=queue)
        await broker.publish(envelope("kept", expiration="60000"), routing_key=queue)
    async with broker.consume(["ttl", "plain"], prefetch=5) as consumer:
        got = [await receive(consumer) for _ in range(2)]
        assert [(ident(d), d.routing_key) for d in got] == [("kept", "ttl"), ("kept", "plain")]
        assert await nothing_within(consumer)
    async with broker.consume(["dead"], prefetch=5) as consumer:
        dead = await receive(consumer)
        assert (ident(dead), dead.routing_key) == ("gone", "dead")
        assert await nothing_within(consumer)


async def test_exchanges_direct_topic_fanout(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    await broker.declare(Queue("all-eu", exchange="events", exchange_type="topic",
                               routing_key="eu.#"))
    await broker.declare(Queue("one-word", exchange="events", exchange_type="topic",
                               routing_key="*.created"))
    await broker.declare(Queue("fan-a", exchange="fan", exchange_type="fanout"))
    await broker.declare(Queue("fan-b", exchange="fan", exchange_type="fanout"))
    await broker.publish(envelope("a"), routing_key="eu.user.created", exchange="events")
    await broker.publish(envelope("b"), routing_key="us.created", exchange="events")
    await broker.publish(envelope("c"), routing_key="eu", exchange="events")
    await broker.publish(envelope("d"), routing_key="anything", exchange="fan")
    expected = {"all-eu": ["a", "c"], "one-word": ["b"], "fan-a": ["d"], "fan-b": ["d"]}
    for queue, ids in expected.items():
        async with broker.consume([queue], prefetch=10) as consumer:
            assert [ident(await receive(consumer)) for _ in ids] == ids
            assert await nothing_within(consumer, 0.02)


async def test_no_ack_consumer_deletes_on_receipt(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    await broker.declare(Queue("q"))
    await broker.publish(envelope(1), routing_key="q")
    async with broker.consume(["q"], prefetch=1, no_ack=True) as consumer:
        delivery = await receive(consumer)
        await delivery.reject(requeue=True)  # nothing to settle
    await broker.close()
    again = await make_broker()
    async with again.consume(["q"], prefetch=1) as consumer:
        assert await nothing_within(consumer)


# -- visibility timeout -----------------------------------------------------------------------


async def test_abandoned_claim_comes_back_after_the_visibility_timeout(
    make_broker: MakeBroker,
) -> None:
    stale, fresh = await make_broker(visibility_timeout=0.3), await make_broker()
    await stale.declare(Queue("q"))
    await stale.publish(envelope(1), routing_key="q")
    consumer = stale.consume(["q"], prefetch=1)
    await consumer.start()
    abandoned = await receive(consumer)
    started = time.monotonic()
    async with fresh.consume(["q"], prefetch=1) as other:
        again = await receive(other)
        assert time.monotonic() - started >= 0.25
        assert (ident(again), again.redelivered) == ("1", True)
        await abandoned.ack()  # the lease was lost: the late ack must not take it away
        await stale.close()  # nor may giving back the stale claim
        assert await nothing_within(other)
        await again.ack()
    async with fresh.consume(["q"], prefetch=1) as other:
        assert await nothing_within(other)


CLAIM_AND_HANG = textwrap.dedent("""
    import asyncio, sys
    from aioqueue.brokers.sqlite import SqliteBroker
    from aioqueue.config import Settings

    async def main():
        settings = Settings(broker_transport_options={"visibility_timeout": 0.5})
        broker = SqliteBroker(sys.argv[1], settings)
        await broker.connect()
        consumer = broker.consume(["q"], prefetch=1)
        await consumer.start()
        delivery = await consumer.receive()
        print("claimed", delivery.envelope.headers["id"], flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_claim_of_a_killed_process_comes_back(make_broker: MakeBroker, url: str) -> None:
    broker = await make_broker()
    await broker.declare(Queue("q"))
    await broker.publish(envelope(7), routing_key="q")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLAIM_AND_HANG, url, cwd=PROJECT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        with anyio.fail_after(10):
            assert await process.stdout.readline() == b"claimed 7\n"
        process.send_signal(signal.SIGKILL)
        await process.wait()
        async with broker.consume(["q"], prefetch=1) as consumer:
            delivery = await receive(consumer, timeout=5)
            assert (ident(delivery), delivery.redelivered) == ("7", True)
            await delivery.ack()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# -- processes, threads, the event loop -------------------------------------------------------


PRODUCER = textwrap.dedent("""
    import asyncio, sys
    from aioqueue.brokers.sqlite import SqliteBroker
    from aioqueue.config import Queue, Settings
    from aioqueue.protocol import Envelope

    async def main(url, name, count):
        async with SqliteBroker(url, Settings()) as broker:
            await broker.declare(Queue("mp"))
            for n in range(count):
                await broker.publish(
                    Envelope(body=b"x", headers={"id": f"{name}-{n}"}), routing_key="mp")

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
""")

CONSUMER = textwrap.dedent("""
    import asyncio, sys
    from aioqueue.brokers.sqlite import SqliteBroker
    from aioqueue.config import Queue, Settings

    async def main(url):
        async with SqliteBroker(url, Settings()) as broker:
            await broker.declare(Queue("mp"))
            async with broker.consume(["mp"], prefetch=10) as consumer:
                print("ready", flush=True)
                while True:
                    delivery = await consumer.receive()
                    message_id = delivery.envelope.headers["id"]
                    if message_id == "stop":
                        await delivery.ack()
                        return
                    print(message_id, flush=False)
                    await delivery.ack()

    asyncio.run(main(sys.argv[1]))
""")


async def test_three_producers_two_consumers_exactly_once(
    make_broker: MakeBroker, url: str
) -> None:
    per_producer = 300
    broker = await make_broker()
    await broker.declare(Queue("mp"))

    async def spawn(script: str, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, url, *args, cwd=PROJECT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )

    consumers = [await spawn(CONSUMER) for _ in range(2)]
    producers: list[asyncio.subprocess.Process] = []
    try:
        with anyio.fail_after(30):
            for consumer in consumers:  # both consume before the first message is sent
                assert consumer.stdout is not None
                assert await consumer.stdout.readline() == b"ready\n"
            producers = [await spawn(PRODUCER, f"p{i}", str(per_producer)) for i in range(3)]
            for producer in producers:
                _, err = await producer.communicate()
                assert producer.returncode == 0, err.decode()
            for _ in consumers:  # FIFO: the stops come after every message
                await broker.publish(Envelope(body=b"x", headers={"id": "stop"}),
                                     routing_key="mp")
            outputs = []
            for consumer in consumers:
                out, err = await consumer.communicate()
                assert consumer.returncode == 0, err.decode()
                outputs.append(out.decode().split())
    finally:
        for process in consumers + producers:
            if process.returncode is None:
                process.kill()
                await process.wait()
    consumed = [message_id for output in outputs for message_id in output]
    expected = [f"p{i}-{n}" for i in range(3) for n in range(per_producer)]
    assert len(consumed) == len(expected)  # nothing twice
    assert sorted(consumed) == sorted(expected)  # nothing lost
    assert all(outputs), "both consumers took part"


async def test_sqlite_never_blocks_the_event_loop(make_broker: MakeBroker, url: str) -> None:
    broker = await make_broker(busy_timeout=10)
    await broker.declare(Queue("q"))
    assert any(t.name.startswith("aioqueue-sqlite-broker") for t in threading.enumerate())
    locked, release = threading.Event(), threading.Event()

    def hold_write_lock() -> None:
        # Another "process" holds the write lock: every publish must wait for it.
        conn = sqlite3.connect(database_path(url), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(5)
        conn.execute("COMMIT")
        conn.close()

    gaps: list[float] = []
    done = False

    async def heartbeat() -> None:
        last = time.monotonic()
        while not done:
            await anyio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def publish_all() -> None:
        for n in range(500):
            await broker.publish(envelope(n), routing_key="q")

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, hold_write_lock)
        tg.start_soon(heartbeat)
        await anyio.to_thread.run_sync(locked.wait, 5)
        publishing = time.monotonic()
        async with anyio.create_task_group() as publishers:
            publishers.start_soon(publish_all)
            await anyio.sleep(0.3)  # publishes are stuck behind the lock all this time
            release.set()
        elapsed = time.monotonic() - publishing
        done = True
    assert elapsed >= 0.3
    assert len(gaps) >= 20
    assert max(gaps) < 0.1, f"event loop stalled for {max(gaps):.3f}s"
    await broker.close()
    assert not any(t.name.startswith("aioqueue-sqlite") for t in threading.enumerate())


async def test_worker_end_to_end(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    app = AioQueue("tests", broker=url, backend=url)  # broker and results in one file

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    try:
        async with running_worker(app, concurrency=4):
            r = await add.delay(2, 3)
            assert await r.get(timeout=5) == 5
            results = [await add.delay(n, n) for n in range(20)]
            assert [await r.get(timeout=5) for r in results] == [2 * n for n in range(20)]
    finally:
        await app.close()

