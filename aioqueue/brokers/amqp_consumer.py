"""Consuming from RabbitMQ: ``AmqpConsumer`` and the ``AmqpDelivery`` it hands out.

Each consumer has a channel of its own, so its ``basic.qos`` prefetch applies to that
consumer only.

Per-message paths (deliver, ack) use the underlying aiormq channel directly: aio-pika's
``IncomingMessage`` wrapper and its extra task per delivery cost about a quarter of the
consume throughput (measured locally), and the raw AMQP properties are what the ``Envelope``
holds anyway (``expiration`` stays the millisecond string Celery sent). aio-pika's robust
consumers cannot be used that way, so a consumer subscribes again by itself when aio-pika
reopens its channel.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands as spec

from ..exceptions import BrokerConnectionError, BrokerError
from ..protocol import Envelope
from .amqp_channel import AMQP_ERRORS, CONNECTION_ERRORS, close_quietly, declare_on, translate
from .base import Consumer, Delivery

if TYPE_CHECKING:
    from .amqp import AmqpBroker

__all__ = ("AmqpConsumer", "AmqpDelivery")

# The name the AMQP broker has always logged under, for all of its modules.
logger = logging.getLogger("aioqueue.brokers.amqp")


class AmqpDelivery(Delivery):
    """A message delivered by RabbitMQ; ``ack``/``reject`` never raise for a lost channel."""

    __slots__ = ("_channel", "_consumer", "_tag")

    def __init__(
        self, envelope: Envelope, routing_key: str, redelivered: bool,
        channel: AbstractChannel, tag: int, consumer: AmqpConsumer | None,
    ) -> None:
        super().__init__(envelope, routing_key, redelivered)
        self._channel = channel
        self._tag = tag
        self._consumer = consumer  # None: nothing to settle (no_ack, or settled already)

    async def ack(self) -> None:
        await self._settle(None)

    async def reject(self, requeue: bool) -> None:
        await self._settle(requeue)

    async def _settle(self, requeue: bool | None) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        self._consumer = None
        try:
            # wait=False: neither has a reply; queueing the frame is all there is to wait for.
            if requeue is None:
                await self._channel.basic_ack(self._tag, wait=False)
            else:
                await self._channel.basic_reject(self._tag, requeue=requeue, wait=False)
        except AMQP_ERRORS as exc:
            logger.warning(
                "could not %s delivery %d (%s); RabbitMQ will deliver it again",
                "ack" if requeue is None else "reject", self._tag, exc,
            )
        consumer._outstanding -= 1
        if consumer._stopped and not consumer._outstanding:
            await consumer._close_channel()


class AmqpConsumer(Consumer):
    """``basic.consume`` on each queue over a channel of its own, prefetch set by ``basic.qos``.

    Like Celery, the limit is channel-wide (``global=true``) on RabbitMQ 3.x when every queue
    was declared through this broker as a classic queue: then it covers all the queues
    together and ``set_prefetch()`` applies at once. Otherwise (RabbitMQ 4, quorum or stream
    queues, queues of unknown type) it is per consumer: quorum queues answer global QoS with
    a *connection* error, RabbitMQ 4 deprecates it. Per consumer, each queue has its own
    window of ``prefetch`` and a new limit applies only from the next subscription.
    """

    def __init__(
        self, broker: AmqpBroker, queues: Sequence[str], prefetch: int, no_ack: bool
    ) -> None:
        self._broker = broker
        self._queues = tuple(queues)
        self._prefetch = prefetch
        self._no_ack = no_ack
        self._tags = {name: f"aioqueue.{uuid.uuid4().hex}" for name in self._queues}
        self._buffer: asyncio.Queue[DeliveredMessage | None] = asyncio.Queue()
        self._channel: AbstractRobustChannel | None = None
        self._underlay: AbstractChannel | None = None
        self._stopped = False  # by stop() or the broker's close(); nothing new is accepted
        self._error: BrokerError | None = None
        self._outstanding = 0  # handed out by receive(), not yet settled
        self._global_qos = False

    async def start(self) -> None:
        if self._channel is not None or self._stopped:
            raise BrokerError("an AMQP consumer can be started only once")
        connection = self._broker._require_connection()
        channel = connection.channel(publisher_confirms=False)
        try:
            await channel.initialize()
            self._global_qos = self._broker._global_qos_safe(self._queues)
            await self._subscribe(await channel.get_underlay_channel())
        except Exception as exc:
            await close_quietly(channel)
            raise translate(exc, f"cannot consume from {', '.join(self._queues)}") from exc
        self._channel = channel
        channel.reopen_callbacks.add(self._on_reopen)
        self._broker._consumers.add(self)

    async def _subscribe(self, channel: AbstractChannel) -> None:
        # basic.qos on the aiormq channel, not RobustChannel.set_qos: that one waits for the
        # channel's restore to finish, which waits for this very call in _on_reopen.
        await channel.basic_qos(prefetch_count=self._prefetch, global_=self._global_qos)
        self._underlay = channel
        channel.on_consumer_cancel_callbacks.add(self._on_cancelled)
        for name in self._queues:
            await channel.basic_consume(
                name, self._on_message, no_ack=self._no_ack, consumer_tag=self._tags[name]
            )

    async def _on_message(self, message: DeliveredMessage) -> None:
        # Called by aiormq (in a task of its own) for every delivery: keep it minimal.
        if self._stopped:
            if not self._no_ack:
                await _requeue(message)
            return
        self._buffer.put_nowait(message)

    async def _on_reopen(self, _channel: object) -> None:
        """aio-pika reopened the channel (reconnect or channel error): subscribe again.

        Deliveries still buffered came over the old channel; ``receive()`` skips them and
        RabbitMQ delivers them again. Queues this broker declared are declared again first,
        so an auto-delete queue that went with the old connection is there before the
        ``basic.consume`` (the declare channel is restored in no particular order).
        """
        if self._stopped or self._channel is None:
            return
        channel: AbstractChannel | None = None
        try:
            channel = await self._channel.get_underlay_channel()
            for name in self._queues:
                declared = self._broker._declared.get(name)
                if declared is not None:
                    durable = self._broker._exchange_durable(declared[0].exchange_name)
                    await declare_on(channel, *declared, exchange_durable=durable)
            await self._subscribe(channel)
        except Exception as exc:
            lost = isinstance(exc, CONNECTION_ERRORS) or self._broker._connection_lost()
            if lost and (channel is None or channel.is_closed):
                # Lost again while subscribing: after the next reconnect the broker's
                # _on_reconnect reopens this channel, which calls this again.
                logger.warning("connection lost again while consuming from %s after a "
                               "reconnect (%s); subscribing after the next one",
                               ", ".join(self._queues), exc)
                return
            logger.error("could not consume again from %s after reconnecting: %s",
                         ", ".join(self._queues), exc)
            self._fail(translate(exc, "consumer lost after reconnecting"))

    def _on_cancelled(self, frame: spec.Basic.Cancel) -> None:
        # RabbitMQ cancelled a consumer by itself: its queue was deleted.
        queue = next((q for q, tag in self._tags.items() if tag == frame.consumer_tag), "?")
        self._fail(BrokerError(f"RabbitMQ stopped delivering from queue {queue!r} (deleted?)"))

    def _fail(self, error: BrokerError) -> None:
        if self._error is None:
            self._error = error
        self._buffer.put_nowait(None)  # wake every receive()

    async def receive(self) -> Delivery:
        buffer = self._buffer
        while True:
            try:
                message = buffer.get_nowait()
            except asyncio.QueueEmpty:
                message = await buffer.get()
            if message is None:
                buffer.put_nowait(None)  # leave the wake-up for other receivers
                if self._error is not None:
                    raise self._error
                raise BrokerConnectionError("consumer stopped")
            channel = message.channel
            if channel.is_closed:
                continue  # came over a channel lost since; RabbitMQ delivers it again
            props = message.header.properties
            deliver = cast(spec.Basic.Deliver, message.delivery)
            envelope = Envelope(
                body=message.body,
                # pamqp already decodes tables to plain Python (str, int, bool, None, list,
                # dict), which is what the protocol decoder expects: no copy, no walk.
                headers=props.headers if props.headers is not None else {},
                content_type=props.content_type or "",
                content_encoding=props.content_encoding or "",
                correlation_id=props.correlation_id,
                reply_to=props.reply_to,
                priority=props.priority,
                delivery_mode=props.delivery_mode or 1,
                expiration=props.expiration,
            )
            if self._no_ack:
                return AmqpDelivery(envelope, deliver.routing_key or "", deliver.redelivered,
                                    channel, 0, None)
            self._outstanding += 1
            return AmqpDelivery(envelope, deliver.routing_key or "", deliver.redelivered,
                                channel, deliver.delivery_tag or 0, self)

    async def set_prefetch(self, count: int) -> None:
        """Change the prefetch limit (e.g. +1 while an ETA task is held); see the class doc.

        Returns at once while reconnecting: the limit is set when the consumer subscribes
        again. With per-consumer QoS, RabbitMQ keeps the old limit until then.
        """
        self._prefetch = count
        channel = self._underlay
        if channel is None or channel.is_closed or self._stopped or not self._global_qos:
            return
        try:
            await channel.basic_qos(prefetch_count=count, global_=True)
        except AMQP_ERRORS as exc:
            if not channel.is_closed:
                raise translate(exc, "cannot change prefetch") from exc

    async def stop(self) -> None:
        """Cancel the subscriptions and give back what was prefetched but not handed out.

        Deliveries already handed out can still be settled; the channel is closed after the
        last of them (or by ``AmqpBroker.close()``, which gives back whatever is left).
        """
        if self._stopped:
            return
        self._stopped = True
        self._broker._consumers.discard(self)
        if self._channel is not None:
            self._channel.reopen_callbacks.discard(self._on_reopen)
        underlay = self._underlay
        if underlay is not None and not underlay.is_closed:
            timeout = self._broker.settings.broker_connection_timeout
            for tag in self._tags.values():
                try:
                    await underlay.basic_cancel(tag, timeout=timeout)
                except AMQP_ERRORS as exc:  # TimeoutError is an OSError
                    logger.debug("basic.cancel %s failed: %s", tag, exc)
                    break
        # Nothing more arrives for our tags now (anything late is requeued by _on_message).
        buffer = self._buffer
        while not buffer.empty():
            message = buffer.get_nowait()
            if message is not None and not self._no_ack:
                await _requeue(message)
        buffer.put_nowait(None)
        if self._outstanding == 0:
            await self._close_channel()

    def _terminate(self) -> None:
        """The broker is closing the connection: wake receivers, no network calls."""
        self._stopped = True
        self._channel = None  # closed with the connection
        self._buffer.put_nowait(None)

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await close_quietly(channel)


async def _requeue(message: DeliveredMessage) -> None:
    tag = message.delivery_tag
    if tag is None or message.channel.is_closed:
        return  # the closed channel gave it back already
    try:
        await message.channel.basic_reject(tag, requeue=True, wait=False)
    except AMQP_ERRORS as exc:
        logger.debug("could not requeue delivery %d: %s", tag, exc)
