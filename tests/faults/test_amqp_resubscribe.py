"""The connection drops again while a consumer subscribes after a reconnect.

Found by cutting a worker's connection repeatedly: when the cut lands while the consumer is
re-declaring its queue and subscribing again (``AmqpConsumer._on_reopen``), the consumer
used to fail for good ("consumer lost after reconnecting"), which stopped the worker
process, although aio-pika reconnects once more and reopens the channel. The cut is placed
exactly there by wrapping ``_subscribe``, so the test does not depend on timing.
"""

from __future__ import annotations

import anyio
import pytest
from yarl import URL

from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.brokers.amqp.consumer import AmqpConsumer
from aioqueue.brokers.base import Delivery
from aioqueue.config import Queue, Settings
from aioqueue.protocol import Envelope

from ..integration.conftest import delete_queues
from .proxy import tcp_proxy

pytestmark = [pytest.mark.integration, pytest.mark.faults]


async def receive(consumer: AmqpConsumer) -> Delivery:
    with anyio.fail_after(20):
        return await consumer.receive()


async def test_consumer_survives_a_cut_while_it_subscribes_again(
    amqp_url: str, unique: str
) -> None:
    target = URL(amqp_url)
    try:
        async with tcp_proxy(target.port or 5672) as proxy, AmqpBroker(
            amqp_url, Settings()
        ) as direct:
            url = target.with_host("127.0.0.1").with_port(proxy.port)
            url = url.update_query(reconnect_interval="0.1")
            async with AmqpBroker(str(url), Settings()) as broker:
                await broker.declare(Queue(unique))
                consumer = broker.consume([unique], prefetch=4)
                subscribe = consumer._subscribe
                subscriptions = 0

                async def cut_during_first_resubscribe(channel: object) -> None:
                    nonlocal subscriptions
                    subscriptions += 1
                    if subscriptions == 2:  # the first one after a reconnect
                        await proxy.cut()
                    await subscribe(channel)  # type: ignore[arg-type]

                consumer._subscribe = cut_during_first_resubscribe  # type: ignore[method-assign]
                async with consumer:
                    await proxy.cut()
                    await direct.publish(Envelope(b"[]", {}), routing_key=unique)
                    delivery = await receive(consumer)
                    await delivery.ack()
                assert subscriptions == 3  # failed once, then subscribed again
                assert proxy.accepted == 3
    finally:
        await delete_queues(amqp_url, [unique])
