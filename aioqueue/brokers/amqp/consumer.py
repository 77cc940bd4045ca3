"""Consuming from RabbitMQ: ``AmqpConsumer`` and the ``AmqpDelivery`` it hands out.

Each consumer has a channel of its own, so its ``basic.qos`` prefetch applies to that
consumer only.

Per-message paths (deliver, ack) use the underlying aiormq channel directly: aio-pika's
``IncomingMessage`` wrapper and its extra task per delivery cost about a quarter of the
consume throughput (measured locally), and the raw AMQP properties are what the ``Envelope``
holds anyway (``expiration`` stays the millisecond string Celery sent). aio-pika's robust
consumers cannot be used that way, so a consumer subscribes again by itself when aio-pika
reopens its channel. Deliveries come to ``_on_delivery`` straight from the connection's frame
stream when they can (:mod:`aioqueue.brokers.amqp.stream`), else through aiormq's channel.

Acks and rejects go through the consumer's ``Settler`` (:mod:`aioqueue.brokers.amqp.acks`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, cast, overload

from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.exceptions import AMQPChannelError, ChannelClosed
from pamqp import commands as spec

from ...exceptions import BrokerConnectionError, BrokerError
from ...protocol import Envelope
from ..base import Consumer, Delivery
from .acks import Settler, Tags
from .channel import AMQP_ERRORS, CONNECTION_ERRORS, close_quietly, declare_on, translate

if TYPE_CHECKING:
    from .broker import AmqpBroker

__all__ = ("AmqpConsumer", "AmqpDelivery")

# The name the AMQP broker has always logged under, for all of its modules.
logger = logging.getLogger("aioqueue.brokers.amqp")


# Header names, and the values of a few headers, that repeat in every message: Celery sends
# the same ~20 names, and pamqp decodes a new str for each name of each message. A worker
# holds thousands of messages (prefetched or running), so keeping one copy of each saves
# about 1.2 KiB per message for ~2 µs. Bounded, so odd traffic cannot grow it for ever.
_NAMES: dict[str, str] = {}
_NAMES_MAX = 1024
_SHARED_VALUES = frozenset({"lang", "task", "origin", "kwargsrepr"})  # few distinct values
_VALUES: dict[str, str] = {}
_VALUES_MAX = 1024


def _shared_names(headers: dict[str, Any]) -> dict[str, Any]:
    names, values = _NAMES, _VALUES
    shared: dict[str, Any] = {}
    for name, value in headers.items():
        known = names.get(name)
        if known is None:
            if len(names) < _NAMES_MAX:
                names[name] = name
            known = name
        if known in _SHARED_VALUES and type(value) is str:
            same = values.get(value)
            if same is None:
                if len(values) >= _VALUES_MAX:
                    values.clear()
                values[value] = value
            else:
                value = same
        shared[known] = value
    root_id = shared.get("root_id")
    if root_id is not None and root_id == shared.get("id"):
        shared["root_id"] = shared["id"]  # a task sent by a client is its own root
    return shared


@overload
def _shared(value: str) -> str: ...


@overload
def _shared(value: str | None) -> str | None: ...


def _shared(value: str | None) -> str | None:
    """One copy of a property value that repeats (content type, the client's reply queue)."""
    if not value:
        return value
    same = _VALUES.get(value)
    if same is not None:
        return same
    if len(_VALUES) >= _VALUES_MAX:
        _VALUES.clear()
    _VALUES[value] = value
    return value


async def _nothing() -> None:
    """What ``AmqpConsumer._on_message`` gives aiormq to run: the work is done already."""


class AmqpDelivery(Delivery):
    """A message delivered by RabbitMQ; ``ack``/``reject`` never raise for a lost channel."""

    __slots__ = ("_consumer", "_tag", "_tags")

    def __init__(
        self, envelope: Envelope, routing_key: str, redelivered: bool,
        tags: Tags | None, tag: int, consumer: AmqpConsumer | None,
    ) -> None:
        super().__init__(envelope, routing_key, redelivered)
        self._tags = tags
        self._tag = tag
        self._consumer = consumer  # None: nothing to settle (no_ack, or settled already)

    async def ack(self) -> None:
        await self._settle(None)

    async def reject(self, requeue: bool) -> None:
        await self._settle(requeue)

    async def _settle(self, requeue: bool | None) -> None:
        consumer = self._consumer
        if consumer is None or self._tags is None:
            return
        self._consumer = None
        await consumer.settle(self._tags, self._tag, requeue)


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
        self._settler = Settler(broker.settings.fast_paths)
        # Per aiormq channel (a reconnect brings a new one, numbering from 1 again): the tags
        # delivered to us, to know which acks may be merged into one.
        self._delivered: dict[AbstractChannel, Tags] = {}
        self._last: Tags | None = None  # the channel of the latest delivery, looked up once
        # While receive_into() waits with nothing buffered: who takes the next delivery, and
        # the future that tells receive_into() it was taken (True) or buffered (False).
        self._taker: Callable[[Delivery], None] | None = None
        self._taken: asyncio.Future[bool] | None = None

    async def start(self) -> None:
        if self._channel is not None or self._stopped:
            raise BrokerError("an AMQP consumer can be started only once")
        connection = self._broker.require_connection()
        channel = connection.channel(publisher_confirms=False)
        try:
            await channel.initialize()
            self._global_qos = self._broker.global_qos_safe(self._queues)
            await self._subscribe(await channel.get_underlay_channel())
        except Exception as exc:
            await close_quietly(channel)
            raise translate(exc, f"cannot consume from {', '.join(self._queues)}") from exc
        self._channel = channel
        channel.reopen_callbacks.add(self._on_reopen)
        self._broker.attach(self)

    async def _subscribe(self, channel: AbstractChannel) -> None:
        # basic.qos on the aiormq channel, not RobustChannel.set_qos: that one waits for the
        # channel's restore to finish, which waits for this very call in _on_reopen.
        await channel.basic_qos(prefetch_count=self._prefetch, global_=self._global_qos)
        self._underlay = channel
        channel.closing.add_done_callback(self._on_channel_closed)
        channel.on_consumer_cancel_callbacks.add(self._on_cancelled)
        stream = self._broker.frame_stream()  # None with the fast paths off
        for name in self._queues:
            tag = self._tags[name]
            # Before the basic.consume: its first deliveries may come right behind the reply.
            if stream is not None:
                stream.deliver_directly(tag, channel, self._on_delivery)
            await channel.basic_consume(
                name, self._on_message, no_ack=self._no_ack, consumer_tag=tag
            )

    def _on_channel_closed(self, closing: asyncio.Future[Any]) -> None:
        """Said when RabbitMQ closes the channel for an error (a plain close or a lost
        connection is not): every delivery not acknowledged on it runs again."""
        if closing.cancelled():
            return
        exc = closing.exception()
        if isinstance(exc, AMQPChannelError) and type(exc) is not ChannelClosed:
            logger.warning("RabbitMQ closed the channel consuming from %s: %s; its "
                           "unacknowledged deliveries go back to the queue",
                           ", ".join(self._queues), exc)

    def _on_message(self, message: DeliveredMessage) -> Coroutine[Any, Any, None]:
        """aiormq's consumer callback, for deliveries that take aiormq's path.

        aiormq runs it in a task of its own (its ``awaitable`` wrapper), a loop iteration
        after its channel reader assembled the delivery; the coroutine returned is awaited
        there and does nothing.
        """
        self._on_delivery(message)
        return _nothing()

    def _on_delivery(self, message: DeliveredMessage) -> None:
        """Every delivery, from our frame stream (``FrameStream.deliver_directly``) or from
        aiormq's channel reader (``_on_message``): keep it minimal. It must not raise: an
        exception here would end aiormq's reader."""
        try:
            if not self._no_ack:
                # Registered first, whatever happens next: a multiple ack must know every tag.
                tags = self._tags_of(message.channel)
                if self._settler.fast:
                    tags.open.append(message.delivery_tag or 0)
                if self._stopped:
                    self._requeue(tags, message)  # written by the settler, in order
                    return
            taker = self._taker
            if taker is not None and self._buffer.empty():  # none waiting ahead of it
                waiter = self._taken
                self._taker = self._taken = None
                delivery = self._delivery_of(message)
                try:
                    if delivery is not None:
                        taker(delivery)
                finally:  # receive_into() returns even if take() failed (logged below)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(delivery is not None)
                return
            self._buffer.put_nowait(message)
            self._wake_taker()
        except Exception:  # a bug; the message stays unacknowledged until the channel closes
            logger.exception("could not buffer an AMQP delivery")

    def _tags_of(self, channel: AbstractChannel) -> Tags:
        tags = self._last
        if tags is not None and tags.channel is channel:
            return tags
        tags = self._delivered.get(channel)
        if tags is None:
            tags = self._delivered[channel] = Tags(channel)
            channel.closing.add_done_callback(lambda _: self._forget(channel))
        self._last = tags
        return tags

    def _forget(self, channel: AbstractChannel) -> None:
        tags = self._delivered.pop(channel, None)
        if tags is not None and self._last is tags:
            self._last = None

    def _requeue(self, tags: Tags, message: DeliveredMessage) -> asyncio.Future[None]:
        """Give back a delivery never handed out (the consumer stopped)."""
        return self._settler.settle(tags, message.delivery_tag or 0, True)

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
                declared = self._broker.declared(name)
                if declared is not None:
                    durable = self._broker.exchange_durable(declared[0].exchange_name)
                    await declare_on(channel, *declared, exchange_durable=durable)
            await self._subscribe(channel)
        except Exception as exc:
            lost = isinstance(exc, CONNECTION_ERRORS) or self._broker.connection_lost()
            if lost and (channel is None or channel.is_closed):
                # Lost again while subscribing: after the next reconnect the broker's
                # _on_reconnect reopens this channel, which calls this again.
                logger.warning("connection lost again while consuming from %s after a "
                               "reconnect (%s); subscribing after the next one",
                               ", ".join(self._queues), exc)
                return
            logger.error("could not consume again from %s after reconnecting: %s",
                         ", ".join(self._queues), exc)
            self.fail(translate(exc, "consumer lost after reconnecting"))

    def _on_cancelled(self, frame: spec.Basic.Cancel) -> None:
        # RabbitMQ cancelled a consumer by itself: its queue was deleted.
        queue = next((q for q, tag in self._tags.items() if tag == frame.consumer_tag), "?")
        self.fail(BrokerError(f"RabbitMQ stopped delivering from queue {queue!r} (deleted?)"))

    def fail(self, error: BrokerError) -> None:
        if self._error is None:
            self._error = error
        self._buffer.put_nowait(None)  # wake every receive()
        self._wake_taker()

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
            delivery = self._delivery_of(message)
            if delivery is not None:
                return delivery

    async def receive_into(self, take: Callable[[Delivery], None]) -> None:
        """With nothing buffered, the next delivery goes to ``take`` right where it is read
        (in ``_on_delivery``), not through ``receive()``: the receiver's task would wake a
        loop iteration later only to pass it on. Only one call may wait at a time."""
        while self._buffer.empty():
            if self._taker is not None:
                raise BrokerError("receive_into() is already waiting on this consumer")
            waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._taker, self._taken = take, waiter
            try:
                if await waiter:
                    return  # take() had it
            finally:
                if self._taken is waiter:
                    self._taker = self._taken = None
        take(await self.receive())

    def _wake_taker(self) -> None:
        """Something was buffered (or the consumer failed): ``receive_into`` reads it."""
        waiter = self._taken
        if waiter is not None:
            self._taker = self._taken = None
            if not waiter.done():
                waiter.set_result(False)

    def _delivery_of(self, message: DeliveredMessage) -> AmqpDelivery | None:
        """The delivery handed out for ``message``; None if it came over a channel lost
        since (RabbitMQ delivers it again)."""
        channel = message.channel
        if channel.is_closed:
            return None
        props = message.header.properties
        deliver = cast(spec.Basic.Deliver, message.delivery)
        table = props.headers
        # pamqp already decodes tables to plain Python (str, int, bool, None, list, dict),
        # which is what the protocol decoder expects; repeated strings are swapped for
        # shared ones (see _shared_names).
        headers = _shared_names(table) if table else {}
        correlation_id = props.correlation_id
        if correlation_id is not None and correlation_id == headers.get("id"):
            correlation_id = headers["id"]  # Celery sets it to the task id: keep one
        envelope = Envelope(
            body=message.body,
            headers=headers,
            content_type=_shared(props.content_type or ""),
            content_encoding=_shared(props.content_encoding or ""),
            correlation_id=correlation_id,
            reply_to=_shared(props.reply_to),  # one per client
            priority=props.priority,
            delivery_mode=props.delivery_mode or 1,
            expiration=props.expiration,
        )
        if self._no_ack:
            return AmqpDelivery(envelope, deliver.routing_key or "", deliver.redelivered,
                                None, 0, None)
        self._outstanding += 1
        return AmqpDelivery(envelope, deliver.routing_key or "", deliver.redelivered,
                            self._tags_of(channel), deliver.delivery_tag or 0, self)

    async def settle(self, tags: Tags, tag: int, requeue: bool | None) -> None:
        """Ack (``requeue`` None) or reject a delivery this consumer handed out; the channel
        of a stopped consumer closes after its last one."""
        try:
            await self._settler.settle(tags, tag, requeue, self._outstanding <= 1)
        finally:
            self._outstanding -= 1
        if self._stopped and not self._outstanding:
            await self._close_channel()

    def channel_to_reopen(self) -> AbstractRobustChannel | None:
        """The channel to reopen after a reconnect, if this consumer still consumes."""
        return None if self._stopped else self._channel

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
        self._broker.detach(self)
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
        written: asyncio.Future[None] | None = None
        while not buffer.empty():
            message = buffer.get_nowait()
            if message is not None and not self._no_ack and not message.channel.is_closed:
                written = self._requeue(self._tags_of(message.channel), message)
        buffer.put_nowait(None)
        self._wake_taker()
        if written is not None:
            await written  # settles are written in order: all of them are out
        if self._outstanding == 0:
            await self._close_channel()

    def terminate(self) -> None:
        """The broker is closing the connection: wake receivers, no network calls."""
        self._stopped = True
        self._undirect()
        self._channel = None  # closed with the connection
        self._settler.abandon()  # nothing should be pending: settles are awaited
        self._buffer.put_nowait(None)
        self._wake_taker()

    def _undirect(self) -> None:
        stream = self._broker.frame_stream()
        if stream is not None:
            for tag in self._tags.values():
                stream.stop_delivering_directly(tag)

    async def _close_channel(self) -> None:
        self._undirect()
        channel, self._channel = self._channel, None
        if channel is not None:
            await self._settler.written()  # the channel's last settles go out before it closes
            await close_quietly(channel)

