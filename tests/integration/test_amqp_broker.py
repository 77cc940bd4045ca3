"""``AmqpBroker`` against the real RabbitMQ.

Every queue and exchange a test uses is named after the test's ``unique`` name and deleted at
teardown (with the exchange ``declare()`` names after each queue) by the ``rabbit`` fixture,
a plain aio-pika connection also used to look at queues from the outside (message counts by
passive declare, raw ``basic.get`` for wire properties).
RabbitMQ settles requeues and dead-lettering in its queue processes, a moment after the
client's call returns, so counts that follow such an event are polled for a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import Any

import anyio
import pamqp.encode
import pytest
from yarl import URL

from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.brokers.amqp.channel import connection_url
from aioqueue.brokers.base import Delivery
from aioqueue.config import Queue, Settings
from aioqueue.exceptions import BrokerConnectionError, BrokerError
from aioqueue.protocol import Envelope

from .conftest import Rabbit

pytestmark = pytest.mark.integration


def envelope(body: bytes = b"[[], {}, {}]", **fields: Any) -> Envelope:
    return Envelope(body=body, headers=fields.pop("headers", {"task": "t", "id": "1"}), **fields)


async def receive(consumer: Any, timeout: float = 5.0) -> Delivery:
    with anyio.fail_after(timeout):
        delivery: Delivery = await consumer.receive()
        return delivery


async def test_roundtrip_keeps_every_envelope_field(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name))
    sent = Envelope(
        body=b'[[1, "zwei"], {"drei": 3.0}, {}]',
        headers={
            "task": "proj.add", "id": "4a6c1f0e", "none": None, "yes": True, "no": False,
            "small": 1, "negative": -1, "medium": 300, "big": 2**40, "ratio": 1.5,
            "timelimit": [300, None], "nested": [1, "x", {"k": [None, 2.5, {"deep": "ß"}]}],
            "stamps": {}, "table": {"a": 1, "b": {"c": "d"}}, "text": "ünïcødé ☃ 漢字",
        },
        content_type="application/x-msgpack",
        content_encoding="binary",
        correlation_id="4a6c1f0e",
        reply_to="c2f1a0b4-reply",
        priority=3,
        delivery_mode=2,
        expiration="60000",
    )
    await broker.publish(sent, routing_key=name)
    async with broker.consume([name], prefetch=1) as consumer:
        delivery = await receive(consumer)
        assert delivery.envelope == sent
        assert type(delivery.envelope.headers["text"]) is str
        assert delivery.routing_key == name
        assert delivery.redelivered is False
        await delivery.ack()
    # The wire: expiration as RabbitMQ passes it on, a persistent message, no default priority.
    await broker.publish(envelope(expiration="60000"), routing_key=name)
    raw = (await rabbit.get(name)).header.properties
    assert raw.expiration == "60000"
    assert raw.delivery_mode == 2
    assert raw.priority is None


async def test_publish_returns_after_the_queue_has_it(broker: AmqpBroker, rabbit: Rabbit) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name))
    await broker.declare(Queue(name))  # cached: no second declaration
    for i in range(3):
        await broker.publish(envelope(correlation_id=str(i)), routing_key=name)
    assert await rabbit.count(name) == 3


async def test_publish_through_a_named_exchange(broker: AmqpBroker, rabbit: Rabbit) -> None:
    name, exchange = rabbit.name(), rabbit.exchange(".topic")
    await broker.declare(Queue(name, exchange=exchange, exchange_type="topic", routing_key="a.#"))
    await broker.publish(envelope(), routing_key="a.b", exchange=exchange)
    await broker.publish(envelope(), routing_key="other", exchange=exchange)  # unroutable: dropped
    assert await rabbit.count(name) == 1
    with pytest.raises(BrokerError, match="does not exist"):
        await broker.publish(envelope(), routing_key=name, exchange=f"{rabbit.unique}.missing")
    await broker.publish(envelope(), routing_key=name)  # the publish channel is unharmed
    assert await rabbit.count(name) == 2


async def test_prefetch_limits_unsettled_deliveries(broker: AmqpBroker, rabbit: Rabbit) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name))
    for i in range(5):
        await broker.publish(envelope(correlation_id=str(i)), routing_key=name)
    async with broker.consume([name], prefetch=2) as consumer:
        first = await receive(consumer)
        second = await receive(consumer)
        with anyio.move_on_after(0.3) as wait:
            await consumer.receive()
        assert wait.cancelled_caught, "a third delivery arrived with two unsettled"
        await first.ack()
        third = await receive(consumer)
        assert [d.envelope.correlation_id for d in (first, second, third)] == ["0", "1", "2"]
        await second.ack()
        await third.ack()
    await rabbit.wait_count(name, 2)


async def test_prefetch_covers_all_queues_of_a_consumer(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    # Classic queues on RabbitMQ 3.x: channel-wide QoS, as Celery does.
    names = [rabbit.name(".1"), rabbit.name(".2")]
    for name in names:
        await broker.declare(Queue(name))
        for _ in range(2):
            await broker.publish(envelope(), routing_key=name)
    async with broker.consume(names, prefetch=2) as consumer:
        held = [await receive(consumer), await receive(consumer)]
        with anyio.move_on_after(0.3) as wait:
            await consumer.receive()
        assert wait.cancelled_caught, "more than `prefetch` deliveries over two queues"
        for delivery in held:
            await delivery.ack()
        for _ in range(2):
            await (await receive(consumer)).ack()


async def test_quorum_queue_is_consumed_with_per_consumer_prefetch(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    # Global QoS on a quorum queue would be a connection error (540 NOT_IMPLEMENTED).
    name = rabbit.name()
    await broker.declare(Queue(name, queue_arguments={"x-queue-type": "quorum"}))
    for _ in range(2):
        await broker.publish(envelope(), routing_key=name)
    async with broker.consume([name], prefetch=1) as consumer:
        delivery = await receive(consumer)
        with anyio.move_on_after(0.3) as wait:
            await consumer.receive()
        assert wait.cancelled_caught
        await consumer.set_prefetch(2)  # cannot apply to a running per-consumer window
        await delivery.ack()
        await (await receive(consumer)).ack()
    assert await rabbit.count(name) == 0


async def test_set_prefetch_raises_the_limit(broker: AmqpBroker, rabbit: Rabbit) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name))
    for _ in range(2):
        await broker.publish(envelope(), routing_key=name)
    async with broker.consume([name], prefetch=1) as consumer:
        held = await receive(consumer)
        await consumer.set_prefetch(2)  # e.g. while an ETA task is held
        other = await receive(consumer)
        await held.ack()
        await other.ack()


async def test_reject_with_requeue_redelivers(broker: AmqpBroker, rabbit: Rabbit) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name))
    await broker.publish(envelope(correlation_id="again"), routing_key=name)
    async with broker.consume([name], prefetch=1) as consumer:
        delivery = await receive(consumer)
        assert delivery.redelivered is False
        await delivery.reject(requeue=True)
        again = await receive(consumer)
        assert again.redelivered is True
        assert again.envelope.correlation_id == "again"
        await again.ack()
        await again.ack()  # settling twice is a no-op, not a channel error
    assert await rabbit.count(name) == 0


async def test_a_channel_closed_by_rabbitmq_for_an_error_is_a_warning(
    broker: AmqpBroker, rabbit: Rabbit, caplog: pytest.LogCaptureFixture
) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name))
    await broker.publish(envelope(), routing_key=name)
    async with broker.consume([name], prefetch=1) as consumer:
        delivery = await receive(consumer)
        channel = consumer._underlay
        assert channel is not None
        await channel.basic_ack(999)  # a tag RabbitMQ never gave: it closes the channel
        await asyncio.wait([channel.closing], timeout=5)
        assert channel.is_closed
        await delivery.ack()  # lost with the channel: logged, redelivered
        again = await receive(consumer)  # on the channel aio-pika reopened
        assert again.redelivered is True
        await again.ack()
    assert await rabbit.count(name) == 0
    [warning] = [r for r in caplog.records if "RabbitMQ closed the channel" in r.message]
    assert warning.levelname == "WARNING"
    assert "PRECONDITION_FAILED" in warning.message and name in warning.message


async def test_reject_without_requeue_dead_letters(broker: AmqpBroker, rabbit: Rabbit) -> None:
    name, dead = rabbit.name(), rabbit.name(".dead")
    dlx = rabbit.exchange(".dlx")
    await broker.declare(Queue(dead, exchange=dlx))
    await broker.declare(Queue(name, queue_arguments={
        "x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": dead,
    }))
    await broker.publish(envelope(headers={"task": "t", "id": "dl"}), routing_key=name)
    async with broker.consume([name], prefetch=1) as consumer:
        await (await receive(consumer)).reject(requeue=False)
    await rabbit.wait_count(dead, 1)
    assert await rabbit.count(name) == 0
    async with broker.consume([dead], prefetch=1) as consumer:
        delivery = await receive(consumer)
        # RabbitMQ's own table arrives as plain Python values too.
        death = delivery.envelope.headers["x-death"]
        assert isinstance(death, list) and death[0]["queue"] == name
        assert death[0]["reason"] == "rejected"
        assert delivery.envelope.headers["id"] == "dl"
        await delivery.ack()


async def test_stop_gives_back_prefetched_messages(broker: AmqpBroker, rabbit: Rabbit) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name))
    for _ in range(5):
        await broker.publish(envelope(), routing_key=name)
    consumer = broker.consume([name], prefetch=5)
    await consumer.start()
    handed_out = await receive(consumer)
    await rabbit.wait_count(name, 0)  # all five are at the consumer
    await consumer.stop()
    await rabbit.wait_count(name, 4)  # the four never handed out are back at once
    with pytest.raises(BrokerConnectionError):
        await consumer.receive()
    await handed_out.ack()  # still possible after stop(); then the channel closes
    assert await rabbit.count(name) == 4


async def test_close_gives_back_unsettled_deliveries(
    amqp_url: str, settings: Settings, rabbit: Rabbit, caplog: pytest.LogCaptureFixture
) -> None:
    name = rabbit.name()
    b = AmqpBroker(amqp_url, settings)
    await b.connect()
    await b.declare(Queue(name))
    for _ in range(3):
        await b.publish(envelope(), routing_key=name)
    consumer = b.consume([name], prefetch=3)
    await consumer.start()
    unsettled = [await receive(consumer), await receive(consumer)]
    await rabbit.wait_count(name, 0)
    await b.close()
    await b.close()  # idempotent
    await rabbit.wait_count(name, 3)
    with caplog.at_level(logging.WARNING, logger="aioqueue.brokers.amqp"):
        await unsettled[0].ack()  # the channel is gone: logged, not raised
        await unsettled[1].reject(requeue=True)
    ours = [r for r in caplog.records if r.name == "aioqueue.brokers.amqp"]
    assert [r.levelno for r in ours] == [logging.WARNING, logging.WARNING]
    with pytest.raises(BrokerConnectionError):
        await consumer.receive()


async def test_no_ack_consumer(broker: AmqpBroker, rabbit: Rabbit) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name))
    await broker.publish(envelope(), routing_key=name)
    async with broker.consume([name], prefetch=1, no_ack=True) as consumer:
        delivery = await receive(consumer)
        await delivery.ack()  # no-op
        await delivery.reject(requeue=True)  # no-op
    assert await rabbit.count(name) == 0


async def test_max_priority_queue_delivers_highest_first(
    amqp_url: str, settings: Settings, rabbit: Rabbit
) -> None:
    name = rabbit.name()
    settings.task_queue_max_priority = 10
    async with AmqpBroker(amqp_url, settings) as b:
        await b.declare(Queue(name))
        for priority in (1, 9, 5):
            await b.publish(envelope(priority=priority), routing_key=name)
        async with b.consume([name], prefetch=1) as consumer:
            order = []
            for _ in range(3):
                delivery = await receive(consumer)
                order.append(delivery.envelope.priority)
                await delivery.ack()
    assert order == [9, 5, 1]
    # The queue carries x-max-priority 10: the same declaration is accepted, another refused.
    async with rabbit.connection.channel() as channel:
        await channel.declare_queue(name, durable=True, arguments={"x-max-priority": 10})


async def test_declare_conflict_is_a_broker_error(broker: AmqpBroker, rabbit: Rabbit) -> None:
    name = rabbit.name()
    async with rabbit.connection.channel() as channel:
        await channel.declare_queue(name, durable=True, arguments={"x-max-priority": 5})
    with pytest.raises(BrokerError, match=rf"{name}.*x-max-priority") as caught:
        await broker.declare(Queue(name))
    assert not isinstance(caught.value, BrokerConnectionError)
    other = rabbit.name(".ok")  # the broker is still usable
    await broker.declare(Queue(other))
    await broker.publish(envelope(), routing_key=other)
    assert await rabbit.count(other) == 1


async def test_consume_from_missing_queue_is_a_broker_error(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    consumer = broker.consume([f"{rabbit.unique}.missing"], prefetch=1)
    with pytest.raises(BrokerError, match="missing"):
        await consumer.start()


async def test_deleted_queue_ends_consuming_with_a_broker_error(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name))
    async with broker.consume([name], prefetch=1) as consumer:
        async with rabbit.connection.channel() as channel:
            await (await channel.get_underlay_channel()).queue_delete(name)
        with pytest.raises(BrokerError, match=name):
            await receive(consumer)


async def test_connect_to_closed_port_fails_fast(settings: Settings) -> None:
    settings.broker_connection_timeout = 1.0
    b = AmqpBroker("amqp://guest:guest@127.0.0.1:1//", settings)
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError, match=r"127\.0\.0\.1:1"):
        await b.connect()
    assert time.monotonic() - started < 1.5
    await b.close()
    with pytest.raises(BrokerConnectionError):
        await b.publish(envelope(), routing_key="x")


async def test_pyamqp_scheme_connects(amqp_url: str, settings: Settings) -> None:
    url = str(URL(amqp_url).with_scheme("pyamqp"))
    async with AmqpBroker(url, settings):
        pass


@pytest.mark.parametrize(("url", "expected"), [
    ("amqp://guest:guest@localhost:5672//", "amqp://guest:guest@localhost:5672//"),
    ("pyamqp://u:p@h//", "amqp://u:p@h//"),
    ("amqps://u:p@h:5671/vh", "amqps://u:p@h:5671/vh"),
    ("amqp://", "amqp://localhost/"),
])
def test_connection_url(url: str, expected: str) -> None:
    assert str(connection_url(url)) == expected


# -- the header integer tags (celery-protocol.md section 1.7), checked on the wire ---------


class Proxy:
    """A TCP relay to RabbitMQ that records what the client sends and can cut connections."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.sent = bytearray()
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.accepted = 0

    async def __aenter__(self) -> Proxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer, record=True)),
            asyncio.create_task(self._pipe(up_reader, writer, record=False)),
        ):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if record:
                    self.sent += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> None:
        """Drop every relayed connection at once, as a network failure would."""
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        self.cut()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


def expected_table() -> bytes:
    """The headers of the tag test as py-amqp encodes them: ints I/l, floats d."""
    def key(k: str) -> bytes:
        return bytes([len(k)]) + k.encode()
    array = b"I" + struct.pack(">i", 300) + b"I" + struct.pack(">i", 240)
    items = (
        key("a") + b"I" + struct.pack(">i", 1)
        + key("b") + b"I" + struct.pack(">i", 300)
        + key("c") + b"I" + struct.pack(">i", -1)
        + key("d") + b"A" + struct.pack(">I", len(array)) + array
        + key("e") + b"l" + struct.pack(">q", 2**40)
        + key("f") + b"d" + struct.pack(">d", 1.5)
    )
    return struct.pack(">I", len(items)) + items


TAG_HEADERS: dict[str, Any] = {"a": 1, "b": 300, "c": -1, "d": [300, 240], "e": 2**40, "f": 1.5}


async def test_header_numbers_use_pyamqp_tags_on_the_wire(
    amqp_url: str, settings: Settings, rabbit: Rabbit
) -> None:
    name = rabbit.name()
    target = URL(amqp_url)
    async with Proxy(target.host or "127.0.0.1", target.port or 5672) as proxy:
        async with AmqpBroker(str(target.with_port(proxy.port)), settings) as b:
            # Our encoding is ours: pamqp, for everyone else in the process, is unchanged.
            assert pamqp.encode.field_table(TAG_HEADERS) != expected_table()
            assert pamqp.encode.field_table({"a": 1}).endswith(b"\x01ab\x01")
            await b.declare(Queue(name))
            await b.publish(envelope(headers=TAG_HEADERS), routing_key=name)
    assert expected_table() in proxy.sent
    for tag in (b"b", b"s", b"u", b"f"):  # none of pamqp's own choices went out
        assert b"\x01a" + tag not in proxy.sent
    received = (await rabbit.get(name)).header.properties.headers
    assert received == TAG_HEADERS


async def test_consumer_and_publisher_survive_a_lost_connection(
    amqp_url: str, settings: Settings, rabbit: Rabbit, caplog: pytest.LogCaptureFixture
) -> None:
    name = rabbit.name()
    target = URL(amqp_url)
    async with Proxy(target.host or "127.0.0.1", target.port or 5672) as proxy:
        url = target.with_port(proxy.port).update_query(reconnect_interval="0.1")
        async with AmqpBroker(str(url), settings) as b:
            await b.declare(Queue(name))
            await b.publish(envelope(correlation_id="before"), routing_key=name)
            async with b.consume([name], prefetch=1) as consumer:
                lost = await receive(consumer)
                connections = proxy.accepted
                proxy.cut()
                with caplog.at_level(logging.WARNING, logger="aioqueue.brokers.amqp"):
                    await lost.ack()  # the channel is gone: logged, not raised
                again = await receive(consumer)  # resubscribed after the reconnect
                assert proxy.accepted > connections
                assert again.envelope.correlation_id == "before"
                assert again.redelivered is True
                await again.ack()
                await b.publish(envelope(correlation_id="after"), routing_key=name)
                after = await receive(consumer)
                assert after.envelope.correlation_id == "after"
                await after.ack()
    await rabbit.wait_count(name, 0)


async def test_receive_into_hands_a_delivery_over_as_it_is_read(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name))
    takers: list[asyncio.Task[Any] | None] = []
    async with broker.consume([name], prefetch=5) as consumer:
        receiving = asyncio.ensure_future(consumer.receive_into(
            lambda delivery: takers.append(asyncio.current_task())
        ))
        await anyio.wait_all_tasks_blocked()  # receive_into() waits
        with pytest.raises(BrokerError, match="already waiting"):
            await consumer.receive_into(lambda delivery: None)
        await broker.publish(envelope(), routing_key=name)
        with anyio.fail_after(5):
            await receiving
        # Called by the task reading the connection, not by the one waiting to receive.
        assert len(takers) == 1 and takers[0] is not receiving


async def test_receive_into_raises_when_the_consumer_stops(
    broker: AmqpBroker, rabbit: Rabbit
) -> None:
    name = rabbit.name()
    await broker.declare(Queue(name))
    consumer = broker.consume([name], prefetch=5)
    await consumer.start()
    taken: list[Delivery] = []
    receiving = asyncio.ensure_future(consumer.receive_into(taken.append))
    await anyio.wait_all_tasks_blocked()  # receive_into() waits
    await consumer.stop()
    with anyio.fail_after(5), pytest.raises(BrokerConnectionError):
        await receiving
    assert not taken
