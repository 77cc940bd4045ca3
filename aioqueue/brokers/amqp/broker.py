"""``amqp://`` (also ``pyamqp://``, ``amqps://``): RabbitMQ through aio-pika, as Celery uses it.

One robust connection (aio-pika reconnects it by itself) with three kinds of channel:

* a *publish* channel with publisher confirms: ``publish()`` returns once RabbitMQ has the
  message;
* a *declare* channel for queue/exchange declarations. aio-pika re-declares them after a
  reconnect; keeping them off the publish channel means a refused declaration (which makes
  RabbitMQ close the channel) cannot fail publishes that are waiting for their confirms;
* one channel per consumer (:mod:`aioqueue.brokers.amqp.consumer`), so its ``basic.qos``
  prefetch applies to that consumer only.

Per-message paths use the underlying aiormq channel directly, not aio-pika's ``Message``
wrappers (see the consumer module for why). Our connections run over our own frame stream
(:mod:`aioqueue.brokers.amqp.stream`), which hands deliveries and confirms over as they are
read; deliver and ack in the consumer module; publish through
:mod:`aioqueue.brokers.amqp.publisher`, which writes the messages of one loop iteration
together (frames from :mod:`aioqueue.brokers.amqp.frames`). With ``fast_paths`` off, all of
that is aio-pika's and aiormq's public API: their own socket, ``basic_publish``,
``basic_ack``. The connection and channel plumbing, and the translation of aio-pika, aiormq
and pamqp exceptions into ``BrokerConnectionError``/``BrokerError``, are in
:mod:`aioqueue.brokers.amqp.channel`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq
import anyio
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from ...exceptions import BrokerConnectionError, BrokerError, SerializationError, reason
from ...protocol import Envelope
from ...registry import mask_password
from .. import delay as delays
from ..base import Broker
from .channel import (
    AMQP_ERRORS,
    CONNECTION_ERRORS,
    PUBLISH_ERRORS,
    Channel,
    connection_url,
    is_rabbitmq_3,
    translate,
)
from .consumer import AmqpConsumer, AmqpDelivery
from .frames import pamqp_properties
from .publisher import ChannelPublisher
from .stream import FrameStream, FrameStreamFactory, WireConnection, fast_stream_supported

if TYPE_CHECKING:
    from ...config import Queue, Settings

__all__ = ("AmqpBroker", "AmqpConsumer", "AmqpDelivery")

logger = logging.getLogger(__name__)


class AmqpBroker(Broker):
    """RabbitMQ (or any AMQP 0-9-1 broker) through aio-pika; see the module docstring."""

    def __init__(self, url: str, settings: Settings) -> None:
        super().__init__(url, settings)
        # Our own frame stream under aiormq (stream.py), made for each connection.
        self._streams: FrameStreamFactory | None = None
        self._connection: AbstractRobustConnection | None = None
        self._publish: Channel | None = None
        self._publisher: ChannelPublisher | None = None  # for the publish channel's current one
        self._declare: Channel | None = None
        # name -> (queue, arguments), also read by consumers to re-declare after a reconnect
        self._declared: dict[str, tuple[Queue, dict[str, Any]]] = {}
        self._exchanges: set[str] = set()  # exchanges known to exist, for publish()
        self._declared_exchanges: dict[str, bool] = {}  # by declare_exchange(): name -> durable
        self._consumers: set[AmqpConsumer] = set()
        self._rabbitmq_3 = False  # channel-wide (global) QoS is safe there; see AmqpConsumer
        self._delay_levels = 0  # delay levels 0 … n-1 declared (see publish_delayed)
        self._delay_bound: set[str] = set()  # queues bound to the final delay exchange

    def require_connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise BrokerConnectionError(f"{mask_password(self.url)} is not connected")
        return self._connection

    def global_qos_safe(self, queues: Sequence[str]) -> bool:
        """Whether a consumer of ``queues`` may use channel-wide QoS (see AmqpConsumer)."""
        if not self._rabbitmq_3:
            return False
        for name in queues:
            declared = self._declared.get(name)
            if declared is None or declared[1].get("x-queue-type", "classic") != "classic":
                return False
        return True

    @property
    def _timeout(self) -> float:
        return self.settings.broker_connection_timeout

    async def connect(self) -> None:
        if self._connection is not None:
            return
        # Built by hand rather than with aio_pika.connect_robust(), so a connection that
        # fails or times out can be closed: otherwise its reconnect task keeps running.
        connection = self._new_connection()
        try:
            with anyio.fail_after(self._timeout):
                await connection.connect(timeout=self._timeout)
                publish = connection.channel(publisher_confirms=True)
                await publish.initialize()
                declare = connection.channel(publisher_confirms=False)
                await declare.initialize()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                try:
                    await connection.close()
                except Exception as close_exc:
                    logger.debug("closing a failed AMQP connection: %s", close_exc)
            if isinstance(exc, Exception):
                why = (f"no answer within {self._timeout:g} s (broker_connection_timeout)"
                       if isinstance(exc, TimeoutError) else reason(exc))
                # The library's text may quote the URL too: the whole message is masked.
                raise BrokerConnectionError(
                    mask_password(f"cannot connect to the broker at {self.url}: {why}")
                ) from exc
            raise
        self._connection = connection
        self._rabbitmq_3 = is_rabbitmq_3(connection)
        self._publish = Channel(publish)
        self._declare = Channel(declare)
        connection.reconnect_callbacks.add(self._on_reconnect)

    def _new_connection(self) -> aio_pika.RobustConnection:
        """aio-pika's robust connection; with the fast paths on, over our frame stream."""
        url = connection_url(self.url)
        if not self.settings.fast_paths:
            return aio_pika.RobustConnection(url)
        if not fast_stream_supported():
            _warn_once("the installed pamqp is not the one aioqueue's frame readers were "
                       "written for: deliveries take aiormq's path (slower)")
            return aio_pika.RobustConnection(url)
        self._streams = FrameStreamFactory()
        return WireConnection(url, transport_factory=self._streams)

    def frame_stream(self) -> FrameStream | None:
        """The frame stream of the current connection, for its consumers and publisher;
        None with the fast paths off."""
        return None if self._streams is None else self._streams.stream

    async def _on_reconnect(self, _connection: object) -> None:
        """aio-pika reconnected and restored its channels: reopen any it left closed.

        aio-pika marks a channel restored once its restore has run, even when the connection
        dropped again meanwhile, and later restores skip it: it would stay closed for good.
        A consumer's restore (declarations, ``basic.qos``, ``basic.consume``: several round
        trips) is where a second drop lands in practice. Reopening runs the channel's reopen
        callbacks, so a consumer subscribes again. A drop during this brings us back here
        after the next reconnect.
        """
        owners: list[tuple[AbstractRobustChannel, AmqpConsumer | None]] = [
            (c.robust, None) for c in (self._publish, self._declare) if c is not None
        ]
        owners += [(channel, c) for c in self._consumers
                   if (channel := c.channel_to_reopen()) is not None]
        for channel, consumer in owners:
            if not channel.is_closed:
                continue
            if self.connection_lost():
                return
            try:
                await channel.reopen()
            except Exception as exc:
                if isinstance(exc, CONNECTION_ERRORS) or self.connection_lost():
                    logger.warning("could not reopen an AMQP channel after reconnecting "
                                   "(%s); trying again after the next reconnect", exc)
                    return
                logger.error("could not reopen an AMQP channel after reconnecting: %s", exc)
                if consumer is not None:
                    consumer.fail(translate(exc, "consumer lost after reconnecting"))

    def connection_lost(self) -> bool:
        """Whether the connection is down right now (aio-pika reconnects it)."""
        connection = self._connection
        if connection is None:
            return True
        transport = connection.transport
        return transport is None or transport.connection.is_closed

    async def close(self) -> None:
        """Close the connection; RabbitMQ requeues every delivery not settled. Idempotent."""
        connection, self._connection = self._connection, None
        self._publish = self._declare = None
        self._publisher = None
        self._streams = None
        self._declared.clear()
        self._exchanges.clear()
        self._declared_exchanges.clear()
        self._delay_levels = 0
        self._delay_bound.clear()
        for consumer in self._consumers:
            consumer.terminate()
        self._consumers.clear()
        if connection is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                await connection.close()
            except Exception as exc:
                logger.warning("closing the AMQP connection failed: %s", exc)

    async def declare(self, queue: Queue) -> None:
        """Declare ``queue`` like Celery (durable, not auto-delete by default), its exchange
        (durable) and the binding. Declarations are kept and redone after a reconnect."""
        if queue.name in self._declared:
            return
        arguments = dict(queue.queue_arguments)
        max_priority = self.settings.task_queue_max_priority
        # Quorum (and stream) queues refuse x-max-priority.
        if (max_priority is not None and "x-max-priority" not in arguments
                and arguments.get("x-queue-type", "classic") == "classic"):
            arguments["x-max-priority"] = max_priority
        if self._declare is None:
            raise BrokerConnectionError(f"{mask_password(self.url)} is not connected")
        await self._declare.current(self._timeout)
        channel = self._declare.robust
        try:
            declared = await channel.declare_queue(
                queue.name, durable=queue.durable, auto_delete=queue.auto_delete,
                arguments=arguments or None,
            )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise BrokerError(
                f"queue {queue.name!r} exists with other settings than requested "
                f"(durable={queue.durable}, auto_delete={queue.auto_delete}, "
                f"arguments={arguments}); RabbitMQ says: {exc}"
            ) from exc
        except AMQP_ERRORS as exc:
            raise translate(exc, f"cannot declare queue {queue.name!r}") from exc
        if queue.exchange_name:
            durable = self.exchange_durable(queue.exchange_name)
            try:
                exchange = await channel.declare_exchange(
                    queue.exchange_name, queue.exchange_type, durable=durable
                )
                await declared.bind(exchange, routing_key=queue.binding_key)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise BrokerError(
                    f"exchange {queue.exchange_name!r} exists with other settings than "
                    f"requested (type={queue.exchange_type!r}, durable={durable}); "
                    f"RabbitMQ says: {exc}"
                ) from exc
            except AMQP_ERRORS as exc:
                raise translate(
                    exc, f"cannot declare exchange {queue.exchange_name!r} for {queue.name!r}"
                ) from exc
            self._exchanges.add(queue.exchange_name)
        self._declared[queue.name] = (queue, arguments)

    def declared(self, name: str) -> tuple[Queue, dict[str, Any]] | None:
        """How this broker declared queue ``name`` (the queue, its arguments), if it did: a
        consumer declares it again after a reconnect."""
        return self._declared.get(name)

    def attach(self, consumer: AmqpConsumer) -> None:
        """A started consumer: reopened after reconnects, stopped by ``close()``."""
        self._consumers.add(consumer)

    def detach(self, consumer: AmqpConsumer) -> None:
        self._consumers.discard(consumer)

    def exchange_durable(self, name: str) -> bool:
        """As ``declare_exchange()`` declared it; durable (Celery's default) otherwise."""
        return self._declared_exchanges.get(name, True)

    async def declare_exchange(self, name: str, type: str, *, durable: bool = True) -> None:
        """Declare an exchange once per connection; aio-pika re-declares it after a reconnect.

        Queues bound to it by a later ``declare()`` declare it with the same durability, so
        a non-durable exchange (Celery's ``celery.pidbox``) is not re-declared as durable.
        """
        if name in self._declared_exchanges:
            return
        if self._declare is None:
            raise BrokerConnectionError(f"{mask_password(self.url)} is not connected")
        await self._declare.current(self._timeout)
        try:
            await self._declare.robust.declare_exchange(name, type, durable=durable)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise BrokerError(
                f"exchange {name!r} exists with other settings than requested "
                f"(type={type!r}, durable={durable}); RabbitMQ says: {exc}"
            ) from exc
        except AMQP_ERRORS as exc:
            raise translate(exc, f"cannot declare exchange {name!r}") from exc
        self._declared_exchanges[name] = durable
        self._exchanges.add(name)

    async def _check_exchange(self, name: str) -> None:
        """Publishing to a missing exchange would close the publish channel (and fail every
        publish waiting for a confirm), so check it once on the declare channel."""
        if self._declare is None:
            raise BrokerConnectionError(f"{mask_password(self.url)} is not connected")
        channel = await self._declare.current(self._timeout)
        try:
            await channel.exchange_declare(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise BrokerError(f"cannot publish: exchange {name!r} does not exist") from None
        except AMQP_ERRORS as exc:
            raise translate(exc, f"cannot check exchange {name!r}") from exc
        self._exchanges.add(name)

    async def publish(
        self, envelope: Envelope, *, routing_key: str, exchange: str = "",
        proof: asyncio.Future[None] | None = None,
    ) -> None:
        """Publish and wait for RabbitMQ's confirm, or for ``proof`` if that comes first;
        ``exchange=""`` is the default exchange.

        ``proof`` matters for a task that finishes at once: RabbitMQ confirms a persistent
        message it delivers straight away only once the consumer acks it (or it is on
        disk), and a worker acks after storing the result, so the result reaches the
        client before the confirm does. A message RabbitMQ cannot route is dropped silently
        (``mandatory`` off, as Celery). Past ``broker_publish_timeout`` without either (a
        connection gone silent), ``BrokerConnectionError``: never reported sent unconfirmed.
        """
        if self._publish is None:
            raise BrokerConnectionError(f"{mask_password(self.url)} is not connected")
        if exchange and exchange not in self._exchanges:
            await self._check_exchange(exchange)
        channel = await self._publish.current(self._timeout)
        limit = self.settings.broker_publish_timeout
        try:
            with anyio.move_on_after(limit) as waited:
                publisher = self._publisher
                if publisher is None or publisher.channel is not channel:
                    publisher = self._publisher = self._new_publisher(channel)
                if publisher is not None:
                    confirmation = publisher.send(
                        envelope, exchange=exchange, routing_key=routing_key)
                    if proof is None:
                        await confirmation
                    else:
                        await _confirmed_or_proven(confirmation, proof)
                else:
                    await _publish_through_aiormq(channel, envelope, exchange, routing_key)
            if waited.cancelled_caught:
                raise BrokerConnectionError(
                    f"the broker at {mask_password(self.url)} did not confirm a message for "
                    f"{exchange!r}/{routing_key!r} within {limit:g} s "
                    "(broker_publish_timeout): the connection may have gone silent; the "
                    "message may or may not have arrived"
                )
        except aiormq.exceptions.DeliveryError as exc:
            raise BrokerError(
                f"RabbitMQ refused the message for {exchange!r}/{routing_key!r} (nack)"
            ) from exc
        except TypeError as exc:
            raise SerializationError(f"message properties cannot be sent over AMQP: {exc}") from exc
        except PUBLISH_ERRORS as exc:
            raise translate(exc, f"cannot publish to {exchange!r}/{routing_key!r}") from exc

    def _new_publisher(self, channel: aiormq.abc.AbstractChannel) -> ChannelPublisher | None:
        """Our batching publisher for the publish channel's current aiormq channel; None
        (aiormq's ``basic_publish``) with the fast paths off."""
        if not self.settings.fast_paths:
            return None
        if not ChannelPublisher.supports(channel):
            _warn_once("aiormq's channel lacks what aioqueue's publisher relies on: "
                       "publishing through aiormq's basic_publish (slower)")
            return None
        return ChannelPublisher(channel, self.frame_stream())

    async def publish_delayed(self, envelope: Envelope, *, queue: str, delay: float) -> bool:
        """Publish into the delay levels (see :mod:`aioqueue.brokers.delay`), declaring what
        the delay needs once per connection; the message reaches ``queue`` after ``delay``
        seconds, rounded down to whole seconds and capped at ``delays.MAX_DELAY``."""
        seconds = min(int(delay), delays.MAX_DELAY)
        if seconds < 1 or not delays.delayable(queue):
            return False
        prefix = str(self.settings.broker_transport_options.get("delay_prefix",
                                                                delays.DEFAULT_PREFIX))
        top = delays.top_level(seconds)
        await self._declare_delay(prefix, top, queue)
        await self.publish(
            dataclasses.replace(envelope, expiration=None),  # would expire in every level
            routing_key=delays.routing_key(seconds, queue),
            exchange=f"{prefix}.{top}",
        )
        return True

    async def _declare_delay(self, prefix: str, top: int, queue: str) -> None:
        """Levels 0 … ``top`` (each dead-letters into the one below, which must exist first)
        and the final exchange's binding of ``queue``; durable, so declared once."""
        if self._delay_levels > top and queue in self._delay_bound:
            return
        if self._declare is None:
            raise BrokerConnectionError(f"{mask_password(self.url)} is not connected")
        queue_type = self.settings.task_default_queue_type
        try:
            channel = await self._declare.current(self._timeout)
            if self._delay_levels == 0:
                await channel.exchange_declare(prefix, exchange_type="topic", durable=True)
            for number in range(self._delay_levels, top + 1):
                level = delays.level(prefix, number, queue_type)
                await self.declare(level.queue)  # the queue, its exchange, the digit-1 binding
                channel = await self._declare.current(self._timeout)
                await channel.exchange_bind(
                    level.next_exchange, level.queue.exchange_name, routing_key=level.skip_key
                )
                # max(): a concurrent publish may be declaring the same levels (idempotent).
                self._delay_levels = max(self._delay_levels, number + 1)
            if queue not in self._delay_bound:
                await channel.queue_bind(queue, prefix, routing_key=delays.final_binding_key(queue))
                self._delay_bound.add(queue)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise BrokerError(
                f"the delay exchanges {prefix!r} exist with other settings than requested "
                f"(queue type {queue_type!r}); RabbitMQ says: {exc}"
            ) from exc
        except AMQP_ERRORS as exc:
            raise translate(exc, f"cannot declare the delay levels {prefix!r}") from exc

    def consume(
        self, queues: Sequence[str], *, prefetch: int, no_ack: bool = False
    ) -> AmqpConsumer:
        """A consumer of ``queues`` (which must exist); ``start()`` subscribes."""
        return AmqpConsumer(self, queues, prefetch, no_ack)


async def _publish_through_aiormq(
    channel: aiormq.abc.AbstractChannel, envelope: Envelope, exchange: str, routing_key: str
) -> None:
    """aiormq's ``basic_publish`` (the fast paths off). When the connection closes, aiormq
    fails a message waiting for its confirm with a bare ``Exception``, or cancels the wait
    although nobody cancelled the caller: both mean the message may not have arrived."""
    try:
        await channel.basic_publish(
            envelope.body, exchange=exchange, routing_key=routing_key,
            properties=pamqp_properties(envelope),
        )
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        raise BrokerConnectionError(
            "the AMQP channel closed before RabbitMQ confirmed the message") from None
    except Exception as exc:
        if type(exc) is Exception or channel.is_closed:
            raise BrokerConnectionError(
                f"the AMQP channel closed before RabbitMQ confirmed the message: {exc!r}"
            ) from exc
        raise


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A fast path that cannot apply with the installed dependencies: said, once."""
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s; pin the versions pyproject allows", message)


async def _confirmed_or_proven(
    confirmation: asyncio.Future[Any], proof: asyncio.Future[None]
) -> None:
    """Wait for the first of the broker's confirm and ``proof`` (see ``publish``).

    The wait is on ``proof`` itself, which the confirm completes too: the result's arrival,
    usually the later of the two, wakes this task directly. The confirm's own outcome
    counts when it is there; after a proof it is only logged. Cancelling the wait cancels
    the confirm's future, as awaiting that directly does (a message not written yet then
    stays out).
    """
    if not confirmation.done() and not proof.done():
        confirmation.add_done_callback(functools.partial(_prove, proof))
        try:
            await proof
        except asyncio.CancelledError:
            confirmation.cancel()
            raise
    if confirmation.done():
        confirmation.result()  # a nack or a closed channel raises here
    else:
        confirmation.add_done_callback(_late_confirm)


def _prove(proof: asyncio.Future[None], _: asyncio.Future[Any]) -> None:
    if not proof.done():
        proof.set_result(None)


def _late_confirm(confirmation: asyncio.Future[Any]) -> None:
    """The confirm of a message whose result came first: nothing waits for it any more."""
    if confirmation.cancelled():
        return
    exc = confirmation.exception()
    if isinstance(exc, aiormq.exceptions.DeliveryError):  # a nack: odd, so said
        logger.warning("a message whose task already has a result was not confirmed: %s", exc)
    elif exc is not None:  # the channel closed first (app.close()): nothing to say
        logger.debug("no confirm for a message whose task already has a result: %s", exc)

