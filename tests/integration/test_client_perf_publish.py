"""The batching publisher (``amqp.publisher``) against the real RabbitMQ.

Thousands of concurrent publishes are confirmed and queued in call order; what goes on the
wire is what aiormq's ``basic_publish`` sent, byte for byte; a publish cancelled before its
batch is written never reaches RabbitMQ (and later delivery tags still match); a nack, a big
body and a broker closed under load behave as before.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from yarl import URL

from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.brokers.amqp import publisher as amqp_publisher
from aioqueue.config import Queue, Settings
from aioqueue.exceptions import BrokerConnectionError, BrokerError
from aioqueue.protocol import Envelope, encode_task

from ..unit.test_client_perf_encoding import MAX_BODY, aiormq_frames
from .conftest import Rabbit
from .test_amqp_broker import Proxy, receive

pytestmark = pytest.mark.integration


def numbered(i: int) -> Envelope:
    return Envelope(body=str(i).encode(), headers={"n": i}, correlation_id=str(i))


async def test_concurrent_publishes_are_confirmed_and_queued_in_order(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name))
    count = 3000
    await asyncio.gather(*(broker.publish(numbered(i), routing_key=name) for i in range(count)))
    assert await rabbit.count(name) == count
    async with broker.consume([name], prefetch=count, no_ack=True) as consumer:
        bodies = [(await receive(consumer)).envelope.body for _ in range(count)]
    assert bodies == [str(i).encode() for i in range(count)]


async def test_unconfirmed_messages_are_bounded(
    broker: AmqpBroker, rabbit: Rabbit, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(amqp_publisher, "_MAX_UNCONFIRMED", 7)
    monkeypatch.setattr(amqp_publisher, "_CHUNK", 64)  # a few messages per chunk
    name = rabbit.name()
    await broker.declare(Queue(name))
    publishes = [asyncio.create_task(broker.publish(numbered(i), routing_key=name))
                 for i in range(500)]
    await asyncio.sleep(0)
    for task in publishes[100:110]:  # some give up before being written: never sent
        task.cancel()
    await asyncio.wait_for(asyncio.gather(*publishes, return_exceptions=True), 20)
    sent = [i for i, task in enumerate(publishes) if not task.cancelled()]
    assert len(sent) == 490
    async with broker.consume([name], prefetch=500, no_ack=True) as consumer:
        bodies = [(await receive(consumer)).envelope.body for _ in range(490)]
    assert bodies == [str(i).encode() for i in sent]


async def test_a_publish_cancelled_before_its_batch_is_never_sent(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name))
    await broker.publish(numbered(0), routing_key=name)  # the channel is open and current
    # The first goes to the writer at once (nothing else is being written); the second
    # waits for the batch the first one started.
    lone = asyncio.create_task(broker.publish(numbered(1), routing_key=name))
    cancelled = asyncio.create_task(broker.publish(numbered(2), routing_key=name))
    await asyncio.sleep(0)  # both ran up to their confirm; the batch is not written yet
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await lone
    # Later delivery tags still match RabbitMQ's count, or these confirms would never come.
    await asyncio.wait_for(
        asyncio.gather(*(broker.publish(numbered(i), routing_key=name) for i in range(3, 50))),
        10,
    )
    async with broker.consume([name], prefetch=100, no_ack=True) as consumer:
        bodies = [(await receive(consumer)).envelope.body for _ in range(49)]
    assert b"2" not in bodies and b"1" in bodies
    assert await rabbit.count(name) == 0


async def test_a_nack_is_a_broker_error_and_publishing_goes_on(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name, queue_arguments={
        "x-max-length": 1, "x-overflow": "reject-publish",
    }))
    await broker.publish(numbered(1), routing_key=name)
    with pytest.raises(BrokerError, match="nack"):
        await broker.publish(numbered(2), routing_key=name)
    await rabbit.get(name)  # room again
    await broker.publish(numbered(3), routing_key=name)
    assert (await rabbit.get(name)).body == b"3"


async def test_a_body_larger_than_a_frame_arrives_whole(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name))
    body = uuid.uuid4().bytes * 40_000  # 640 KB: several body frames
    await broker.publish(Envelope(body=body, headers={"a": 1}), routing_key=name)
    assert (await rabbit.get(name)).body == body


async def test_closing_the_broker_fails_publishes_in_flight(
    amqp_url: str, settings: Settings, rabbit: Rabbit
) -> None:
    name = rabbit.name()
    b = AmqpBroker(amqp_url, settings)
    await b.connect()
    await b.declare(Queue(name))
    for turns in (0, 1, 2, 3, 5, 8):
        publishes = [asyncio.create_task(b.publish(numbered(i), routing_key=name))
                     for i in range(300)]
        for _ in range(turns):
            await asyncio.sleep(0)
        await b.close()
        results = await asyncio.wait_for(asyncio.gather(*publishes, return_exceptions=True), 10)
        assert all(r is None or isinstance(r, BrokerConnectionError) for r in results), {
            type(r) for r in results
        }
        await b.connect()
    await b.close()


async def test_the_wire_holds_what_aiormq_sent(
    amqp_url: str, settings: Settings, rabbit: Rabbit
) -> None:
    name = rabbit.name()
    target = URL(amqp_url)
    envelopes = [
        encode_task(task="t.add", task_id=str(uuid.uuid4()), args=(4, 4), kwargs={},
                    reply_to="r", priority=0, timelimit=(300, 240)),
        encode_task(task="t.other", task_id=str(uuid.uuid4()), args=(), kwargs={"k": "ü"},
                    headers={"custom": [1, 2.5, None]}),
    ]
    async with Proxy(target.host or "127.0.0.1", target.port or 5672) as proxy:
        async with AmqpBroker(str(target.with_port(proxy.port)), settings) as b:
            await b.declare(Queue(name))
            assert b._publish is not None
            channel = (await b._publish.current(5)).number
            await asyncio.gather(*(b.publish(e, routing_key=name) for e in envelopes))
    for sent in envelopes:
        received = await rabbit.get(name)
        message_id = received.header.properties.message_id
        assert isinstance(message_id, str)
        assert aiormq_frames(channel, "", name, sent, message_id, MAX_BODY) in proxy.sent
