"""Acks and rejects of one loop iteration are written together (``amqp.acks.Settler``).

A run of acks becomes one ``basic.ack multiple=True``, which must never cover a delivery that
is not settled, nor one being rejected. These tests settle deliveries of one channel out of
order, many in the same loop iteration and in waves, leave some unsettled on purpose, and
then look at RabbitMQ from the outside: exactly the acked messages are gone, the requeued
ones (and the never-settled ones, once the connection closed) are back in the queue, and the
rejected ones are in the dead-letter queue.
"""

from __future__ import annotations

import asyncio
import random

import anyio
import pytest

from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.brokers.base import Delivery
from aioqueue.config import Queue, Settings

from .conftest import Rabbit
from .test_amqp_broker import envelope, receive

pytestmark = pytest.mark.integration

COUNT = 60


async def declare_with_dead_letters(broker: AmqpBroker, rabbit: Rabbit, suffix: str = "") -> str:
    name, dead = rabbit.name(suffix), rabbit.name(f"{suffix}.dead")
    dlx = rabbit.exchange(f"{suffix}.dlx")
    await broker.declare(Queue(dead, exchange=dlx))
    await broker.declare(Queue(name, queue_arguments={
        "x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": dead,
    }))
    return name


async def publish(broker: AmqpBroker, queue: str, ids: list[str]) -> None:
    for task_id in ids:
        await broker.publish(envelope(headers={"task": "t", "id": task_id}), routing_key=queue)


async def drain_ids(rabbit: Rabbit, queue: str) -> list[str]:
    """Every message left in ``queue`` (taken with no-ack), by id."""
    ids = []
    for _ in range(await rabbit.count(queue)):
        message = await rabbit.get(queue)
        headers = message.header.properties.headers or {}
        ids.append(str(headers["id"]))
    return ids


def plan(ids: list[str], seed: int) -> dict[str, str]:
    """What happens to each message: ack, requeue, dead (reject without requeue) or keep
    (never settled). Two in the middle are kept, so runs of acks below them can be merged
    while the ones above must not reach over them; rejects sit among the acks."""
    rng = random.Random(seed)
    fates = {}
    for index, task_id in enumerate(ids):
        if index in (20, 41):
            fates[task_id] = "keep"
        else:
            fates[task_id] = rng.choice(["ack", "ack", "ack", "requeue", "dead", "keep"])
    return fates


async def settle(delivery: Delivery, fate: str) -> None:
    if fate == "ack":
        await delivery.ack()
    elif fate == "requeue":
        await delivery.reject(requeue=True)
    elif fate == "dead":
        await delivery.reject(requeue=False)


async def ended_as_planned(rabbit: Rabbit, queue: str, fates: dict[str, str]) -> None:
    """Each message of ``fates`` is back in ``queue`` (requeued or kept unsettled) or in
    its dead-letter queue, as planned, and nothing else is in either."""
    back = sorted(i for i, fate in fates.items() if fate in ("requeue", "keep"))
    dead = sorted(i for i, fate in fates.items() if fate == "dead")
    await rabbit.wait_count(queue, len(back))
    await rabbit.wait_count(f"{queue}.dead", len(dead))
    assert sorted(await drain_ids(rabbit, queue)) == back
    assert sorted(await drain_ids(rabbit, f"{queue}.dead")) == dead


@pytest.mark.parametrize("waves", [1, 4], ids=["one-tick", "waves"])
async def test_out_of_order_settles_end_exactly_where_they_should(
    amqp_url: str, settings: Settings, rabbit: Rabbit, waves: int
) -> None:
    broker = AmqpBroker(amqp_url, settings)
    await broker.connect()
    try:
        name = await declare_with_dead_letters(broker, rabbit)
        ids = [f"m{i}" for i in range(COUNT)]
        await publish(broker, name, ids)
        fates = plan(ids, seed=waves)
        consumer = broker.consume([name], prefetch=COUNT)
        await consumer.start()
        deliveries = [await receive(consumer) for _ in ids]
        assert [d.envelope.headers["id"] for d in deliveries] == ids  # delivery (tag) order
        shuffled = deliveries[:]
        random.Random(99).shuffle(shuffled)
        # Settled concurrently: each wave's settles are queued in one loop iteration and
        # written in one flush; later waves merge into runs earlier ones left open.
        for wave in range(waves):
            part = shuffled[wave::waves]
            await asyncio.gather(*(settle(d, fates[d.envelope.headers["id"]]) for d in part))
    finally:
        # Closing the connection gives back what is unsettled: the kept ones, and the
        # requeued ones that were delivered to this consumer again.
        await broker.close()
    await ended_as_planned(rabbit, name, fates)


async def test_a_run_of_acks_below_an_unsettled_delivery_leaves_it_alone(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    """Acks above an unsettled tag go out one by one; when the gap is filled by an ack,
    one multiple ack settles the rest, and the consumer keeps working afterwards."""
    name = rabbit.name()
    await broker.declare(Queue(name))
    ids = [f"g{i}" for i in range(10)]
    await publish(broker, name, ids)
    async with broker.consume([name], prefetch=10) as consumer:
        deliveries = [await receive(consumer) for _ in ids]
        await asyncio.gather(*(d.ack() for d in deliveries[3:]))  # 0-2 unsettled
        await deliveries[1].reject(requeue=True)  # back in the queue, redelivered to us
        again = await receive(consumer)
        assert again.envelope.headers["id"] == "g1" and again.redelivered
        await asyncio.gather(deliveries[2].ack(), deliveries[0].ack())
        await again.ack()
    await rabbit.wait_count(name, 0)
    # Nothing is left unacknowledged either: a second consumer gets nothing.
    async with broker.consume([name], prefetch=10) as consumer:
        with anyio.move_on_after(0.3):
            await consumer.receive()
            pytest.fail("a message came back")


async def test_two_queues_on_one_channel_share_the_tags(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    """One consumer of two queues has one channel: tags interleave between the queues,
    and an ack of one queue's messages must not cover the other's unsettled ones."""
    first = await declare_with_dead_letters(broker, rabbit, ".a")
    second = await declare_with_dead_letters(broker, rabbit, ".b")
    await publish(broker, first, [f"a{i}" for i in range(20)])
    await publish(broker, second, [f"b{i}" for i in range(20)])
    consumer = broker.consume([first, second], prefetch=40)
    await consumer.start()
    deliveries = [await receive(consumer) for _ in range(40)]
    # Ack every message of the first queue, dead-letter every third of the second, keep
    # the rest of the second unsettled; all in one iteration.
    fates = {}
    for d in deliveries:
        task_id = d.envelope.headers["id"]
        fates[task_id] = "ack" if task_id[0] == "a" else (
            "dead" if int(task_id[1:]) % 3 == 0 else "keep")
    await asyncio.gather(*(settle(d, fates[d.envelope.headers["id"]]) for d in deliveries))
    await consumer.stop()
    await broker.close()
    await rabbit.wait_count(first, 0)
    await ended_as_planned(rabbit, second, {i: f for i, f in fates.items() if f != "ack"})


async def test_settles_after_stop_are_written_before_the_channel_closes(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    """The worker's shutdown order: stop consuming, then settle what ran. The channel
    closes after the last settle, and that settle is on the wire before the close."""
    name = rabbit.name()
    await broker.declare(Queue(name))
    ids = [f"s{i}" for i in range(30)]
    await publish(broker, name, ids)
    consumer = broker.consume([name], prefetch=10)
    await consumer.start()
    running = [await receive(consumer) for _ in range(10)]
    await consumer.stop()  # 20 never delivered, the prefetched rest given back
    await asyncio.gather(*(d.ack() for d in running))
    await rabbit.wait_count(name, 20)
    await broker.close()
    await rabbit.wait_count(name, 20)  # no ack lost with the channel: nothing came back
    assert sorted(await drain_ids(rabbit, name)) == sorted(ids[10:])
