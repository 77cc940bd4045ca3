"""The Broker contract, the same tests for memory://, sqlite:// and amqp://."""

from __future__ import annotations

import anyio
import pytest

from aioqueue.brokers.base import Broker, Consumer, Delivery
from aioqueue.config import Queue
from aioqueue.protocol import Envelope

from .conftest import BrokerFactory


def envelope(n: int, **properties: object) -> Envelope:
    return Envelope(
        body=f'[[{n}], {{}}, {{}}]'.encode(),
        headers={"task": "c.t", "id": f"id-{n}", "retries": 0, "eta": None, "flag": True,
                 "timelimit": [300, 240], "stamps": {"k": "v"}, "text": "ünï"},
        correlation_id=f"id-{n}", reply_to="reply-q", **properties,  # type: ignore[arg-type]
    )


async def receive(consumer: Consumer, timeout: float = 5) -> Delivery:
    with anyio.fail_after(timeout):
        return await consumer.receive()


async def nothing_more(consumer: Consumer) -> bool:
    with anyio.move_on_after(0.1) as scope:
        await consumer.receive()
    return scope.cancelled_caught


async def test_roundtrip_keeps_every_field(new_broker: BrokerFactory, unique: str) -> None:
    broker = await new_broker()
    await broker.declare(Queue(unique))
    sent = envelope(1, priority=0, content_type="application/json", content_encoding="utf-8")
    await broker.publish(sent, routing_key=unique)
    async with broker.consume([unique], prefetch=1) as consumer:
        delivery = await receive(consumer)
        got = delivery.envelope
        assert got.body == sent.body
        for key, value in sent.headers.items():
            assert got.headers[key] == value, key
        assert (got.correlation_id, got.reply_to, got.content_type, got.content_encoding) == (
            "id-1", "reply-q", "application/json", "utf-8"
        )
        assert got.delivery_mode == 2
        assert delivery.routing_key == unique and not delivery.redelivered
        await delivery.ack()


async def test_ack_removes_and_prefetch_limits(new_broker: BrokerFactory, unique: str) -> None:
    broker = await new_broker()
    await broker.declare(Queue(unique))
    for n in range(3):
        await broker.publish(envelope(n), routing_key=unique)
    async with broker.consume([unique], prefetch=2) as consumer:
        first, second = await receive(consumer), await receive(consumer)
        assert await nothing_more(consumer)  # two unsettled: the third must wait
        await first.ack()
        third = await receive(consumer)
        await second.ack()
        await third.ack()
        assert await nothing_more(consumer)
    async with (await new_broker()).consume([unique], prefetch=5) as again:
        assert await nothing_more(again)


async def test_reject_requeue_redelivers(new_broker: BrokerFactory, unique: str) -> None:
    broker = await new_broker()
    await broker.declare(Queue(unique))
    await broker.publish(envelope(7), routing_key=unique)
    async with broker.consume([unique], prefetch=1) as consumer:
        await (await receive(consumer)).reject(requeue=True)
        again = await receive(consumer)
        assert again.redelivered and again.envelope.headers["id"] == "id-7"
        await again.ack()


async def test_reject_without_requeue_dead_letters(new_broker: BrokerFactory, unique: str) -> None:
    broker = await new_broker()
    dead = unique + "-dead"
    await broker.declare(Queue(dead))
    await broker.declare(Queue(unique, queue_arguments={
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead,
    }))
    await broker.publish(envelope(3), routing_key=unique)
    async with broker.consume([unique], prefetch=1) as consumer:
        await (await receive(consumer)).reject(requeue=False)
        assert await nothing_more(consumer)
    async with broker.consume([dead], prefetch=1) as consumer:
        letter = await receive(consumer)
        assert letter.envelope.headers["id"] == "id-3"
        await letter.ack()


async def test_close_gives_unsettled_back(new_broker: BrokerFactory, unique: str) -> None:
    first = await new_broker()
    await first.declare(Queue(unique))
    await first.publish(envelope(9), routing_key=unique)
    consumer = first.consume([unique], prefetch=1)
    await consumer.start()
    await receive(consumer)  # taken, never settled: then the "process" goes away
    await first.close()
    second = await new_broker()
    async with second.consume([unique], prefetch=1) as again:
        delivery = await receive(again)
        assert delivery.redelivered and delivery.envelope.headers["id"] == "id-9"
        await delivery.ack()


async def test_stop_gives_prefetched_back(new_broker: BrokerFactory, unique: str) -> None:
    broker = await new_broker()
    await broker.declare(Queue(unique))
    for n in range(4):
        await broker.publish(envelope(n), routing_key=unique)
    async with broker.consume([unique], prefetch=4) as consumer:
        taken = await receive(consumer)
        await taken.ack()
    other = await new_broker()
    async with other.consume([unique], prefetch=10) as again:
        ids = sorted([(await receive(again)).envelope.headers["id"] for _ in range(3)])
        assert await nothing_more(again)
    assert ids == ["id-1", "id-2", "id-3"]


async def test_priorities(new_broker: BrokerFactory, unique: str) -> None:
    broker = await new_broker()
    queue = unique + "-prio"
    await broker.declare(Queue(queue, queue_arguments={"x-max-priority": 10}))
    for n, priority in enumerate([1, 9, 5]):
        await broker.publish(envelope(n, priority=priority), routing_key=queue)
    async with broker.consume([queue], prefetch=3) as consumer:
        order = []
        for _ in range(3):
            delivery = await receive(consumer)
            order.append(delivery.envelope.priority)
            await delivery.ack()
    assert order == [9, 5, 1]


async def test_expired_message_is_not_delivered(new_broker: BrokerFactory, unique: str) -> None:
    broker = await new_broker()
    await broker.declare(Queue(unique))
    await broker.publish(envelope(1, expiration="0"), routing_key=unique)
    await broker.publish(envelope(2), routing_key=unique)
    async with broker.consume([unique], prefetch=5) as consumer:
        delivery = await receive(consumer)
        assert delivery.envelope.headers["id"] == "id-2"
        await delivery.ack()
        assert await nothing_more(consumer)


async def test_topic_exchange_routing(new_broker: BrokerFactory, unique: str) -> None:
    broker = await new_broker()
    queue = unique + "-topic"
    await broker.declare(Queue(queue, exchange=queue, exchange_type="topic",
                               routing_key="jobs.#"))
    await broker.publish(envelope(1), routing_key="jobs.email.send", exchange=queue)
    await broker.publish(envelope(2), routing_key="other.thing", exchange=queue)
    async with broker.consume([queue], prefetch=5) as consumer:
        delivery = await receive(consumer)
        assert delivery.envelope.headers["id"] == "id-1"
        await delivery.ack()
        assert await nothing_more(consumer)


async def test_consuming_an_undeclared_queue_is_an_error(
    new_broker: BrokerFactory, unique: str
) -> None:
    from aioqueue.exceptions import BrokerError

    broker: Broker = await new_broker()
    with pytest.raises(BrokerError):
        async with broker.consume([unique + "-never-declared"], prefetch=1) as consumer:
            await receive(consumer, timeout=2)


async def test_receive_into_hands_over_every_delivery_in_order(
    new_broker: BrokerFactory, unique: str
) -> None:
    broker = await new_broker()
    await broker.declare(Queue(unique))
    for n in range(3):  # buffered before the consumer waits
        await broker.publish(envelope(n), routing_key=unique)
    taken: list[Delivery] = []
    async with broker.consume([unique], prefetch=10) as consumer:
        for _ in range(3):
            with anyio.fail_after(5):
                await consumer.receive_into(taken.append)
        async with anyio.create_task_group() as tasks:
            async def wait_for_three() -> None:  # waiting while they are published
                for _ in range(3):
                    with anyio.fail_after(5):
                        await consumer.receive_into(taken.append)

            tasks.start_soon(wait_for_three)
            await anyio.wait_all_tasks_blocked()  # the consumer waits
            for n in range(3, 6):
                await broker.publish(envelope(n), routing_key=unique)
        assert [d.envelope.headers["id"] for d in taken] == [f"id-{n}" for n in range(6)]
        for delivery in taken:
            await delivery.ack()
        assert await nothing_more(consumer)


async def test_a_cancelled_receive_into_takes_nothing(
    new_broker: BrokerFactory, unique: str
) -> None:
    broker = await new_broker()
    await broker.declare(Queue(unique))
    taken: list[Delivery] = []
    async with broker.consume([unique], prefetch=10) as consumer:
        with anyio.move_on_after(0.1) as scope:
            await consumer.receive_into(taken.append)
        assert scope.cancelled_caught and not taken
        await broker.publish(envelope(1), routing_key=unique)
        delivery = await receive(consumer)  # the next one is for receive(), not the old take
        assert delivery.envelope.headers["id"] == "id-1" and not taken
        await delivery.ack()
