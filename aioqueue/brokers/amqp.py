"""``amqp://`` (also ``pyamqp://``, ``amqps://``): RabbitMQ through aio-pika, as Celery uses it.

One robust connection (aio-pika reconnects it by itself) with three kinds of channel:

* a *publish* channel with publisher confirms: ``publish()`` returns once RabbitMQ has the
  message;
* a *declare* channel for queue/exchange declarations. aio-pika re-declares them after a
  reconnect; keeping them off the publish channel means a refused declaration (which makes
  RabbitMQ close the channel) cannot fail publishes that are waiting for their confirms;
* one channel per consumer, so its ``basic.qos`` prefetch applies to that consumer only.

Per-message paths (publish, deliver, ack) use the underlying aiormq channel directly:
aio-pika's ``Message``/``IncomingMessage`` wrappers and its extra task per delivery cost
about a quarter of the consume throughput (measured locally), and the raw AMQP properties
are what the ``Envelope`` holds anyway (``expiration`` stays the millisecond string Celery
sent). aio-pika's robust consumers cannot be used that way, so a consumer subscribes again
by itself when aio-pika reopens its channel.

aio-pika, aiormq and pamqp exceptions never leave this module: connection problems become
``BrokerConnectionError``, everything else the broker refuses becomes ``BrokerError``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import aio_pika
import aiormq
import anyio
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands as spec
from yarl import URL

from ..exceptions import BrokerConnectionError, BrokerError, SerializationError
from ..protocol import Envelope
from ..registry import mask_password
from . import delay as delays
from .amqp_headers import use_pyamqp_compatible_field_tables
from .base import Broker, Consumer, Delivery

if TYPE_CHECKING:
    from ..config import Queue, Settings

__all__ = ("AmqpBroker", "AmqpConsumer", "AmqpDelivery")

logger = logging.getLogger(__name__)

# Errors that mean "the connection or channel is gone" rather than "the broker said no".
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,  # includes TimeoutError
)
_AMQP_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
)
# ValueError: e.g. a routing key over 255 bytes
_PUBLISH_ERRORS: tuple[type[BaseException], ...] = (*_AMQP_ERRORS, ValueError)


def _translate(exc: BaseException, what: str) -> BrokerError:
    if isinstance(exc, _CONNECTION_ERRORS):
        return BrokerConnectionError(f"{what}: {exc or type(exc).__name__}")
    return BrokerError(f"{what}: {exc or type(exc).__name__}")


# -- URL ------------------------------------------------------------------------------------


def _connection_url(url: str) -> URL:
    """Celery's broker URL as aiormq wants it.

    ``pyamqp://`` is ``amqp://``; a missing host is localhost (Celery's default). The vhost
    follows kombu: ``amqp://host//`` and ``amqp://host/`` are ``/``, ``amqp://host/x`` is x,
    which is also how aiormq reads the path.
    """
    parsed = URL(url)
    scheme = parsed.scheme.rsplit("+", 1)[-1]
    if scheme == "pyamqp":
        scheme = "amqp"
    return URL.build(
        scheme=scheme,
        user=parsed.user,
        password=parsed.password,
        host=parsed.host or "localhost",
        port=parsed.explicit_port,
        path=parsed.path or "/",
        query=parsed.query,
    )


# -- channels -------------------------------------------------------------------------------


class _Channel:
    """A robust channel and its current aiormq channel, for the broker's own channels.

    When RabbitMQ closes a channel (a refused declaration, a lost connection) aio-pika opens
    a new one, but not at once: for a moment the closed one is still current. ``current()``
    waits for the new one (at most ``timeout``) instead of failing the next call.
    """

    __slots__ = ("_current", "_reopened", "robust")

    def __init__(self, robust: AbstractRobustChannel) -> None:
        self.robust = robust
        self._current: AbstractChannel | None = None
        self._reopened = asyncio.Event()
        robust.reopen_callbacks.add(self._on_reopen)

    def _on_reopen(self, _channel: object) -> None:
        self._current = None
        self._reopened.set()

    async def current(self, timeout: float) -> AbstractChannel:
        channel = self._current
        if channel is not None and not channel.is_closed:
            return channel
        try:
            with anyio.fail_after(timeout):
                while self.robust.is_closed:
                    self._reopened.clear()
                    await self._reopened.wait()
                await self.robust.ready()
                channel = self._current = await self.robust.get_underlay_channel()
        except TimeoutError:
            raise BrokerConnectionError(
                f"no AMQP channel available within {timeout}s (connection lost?)"
            ) from None
        return channel


async def _declare_on(
    channel: AbstractChannel, queue: Queue, arguments: dict[str, Any],
    exchange_durable: bool = True,
) -> None:
    """Declare ``queue``, its exchange and binding with plain aiormq calls (consumer restore)."""
    await channel.queue_declare(
        queue.name, durable=queue.durable, auto_delete=queue.auto_delete,
        arguments=arguments or None,
    )
    if queue.exchange_name:
        await channel.exchange_declare(
            queue.exchange_name, exchange_type=queue.exchange_type, durable=exchange_durable
        )
        await channel.queue_bind(queue.name, queue.exchange_name, routing_key=queue.binding_key)


# -- consuming ------------------------------------------------------------------------------


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
        except _AMQP_ERRORS as exc:
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
            await _close_quietly(channel)
            raise _translate(exc, f"cannot consume from {', '.join(self._queues)}") from exc
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
                    await _declare_on(channel, *declared, exchange_durable=durable)
            await self._subscribe(channel)
        except Exception as exc:
            lost = isinstance(exc, _CONNECTION_ERRORS) or self._broker._connection_lost()
            if lost and (channel is None or channel.is_closed):
                # Lost again while subscribing: after the next reconnect the broker's
                # _on_reconnect reopens this channel, which calls this again.
                logger.warning("connection lost again while consuming from %s after a "
                               "reconnect (%s); subscribing after the next one",
                               ", ".join(self._queues), exc)
                return
            logger.error("could not consume again from %s after reconnecting: %s",
                         ", ".join(self._queues), exc)
            self._fail(_translate(exc, "consumer lost after reconnecting"))

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
        except _AMQP_ERRORS as exc:
            if not channel.is_closed:
                raise _translate(exc, "cannot change prefetch") from exc

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
                except _AMQP_ERRORS as exc:  # TimeoutError is an OSError
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
            await _close_quietly(channel)


async def _requeue(message: DeliveredMessage) -> None:
    tag = message.delivery_tag
    if tag is None or message.channel.is_closed:
        return  # the closed channel gave it back already
    try:
        await message.channel.basic_reject(tag, requeue=True, wait=False)
    except _AMQP_ERRORS as exc:
        logger.debug("could not requeue delivery %d: %s", tag, exc)


def _is_rabbitmq_3(connection: AbstractRobustConnection) -> bool:
    transport = connection.transport
    if transport is None:
        return False
    properties = transport.connection.server_properties
    version = str(properties.get("version", ""))
    return properties.get("product") == "RabbitMQ" and version.split(".", 1)[0] == "3"


async def _close_quietly(channel: AbstractRobustChannel) -> None:
    with anyio.CancelScope(shield=True):
        try:
            await channel.close()
        except Exception as exc:  # closing is best effort; the connection close covers it
            logger.debug("closing AMQP channel failed: %s", exc)


# -- the broker -----------------------------------------------------------------------------


class AmqpBroker(Broker):
    """RabbitMQ (or any AMQP 0-9-1 broker) through aio-pika; see the module docstring."""

    def __init__(self, url: str, settings: Settings) -> None:
        super().__init__(url, settings)
        use_pyamqp_compatible_field_tables()
        self._connection: AbstractRobustConnection | None = None
        self._publish: _Channel | None = None
        self._declare: _Channel | None = None
        # name -> (queue, arguments), also read by consumers to re-declare after a reconnect
        self._declared: dict[str, tuple[Queue, dict[str, Any]]] = {}
        self._exchanges: set[str] = set()  # exchanges known to exist, for publish()
        self._declared_exchanges: dict[str, bool] = {}  # by declare_exchange(): name -> durable
        self._consumers: set[AmqpConsumer] = set()
        self._rabbitmq_3 = False  # channel-wide (global) QoS is safe there; see AmqpConsumer
        self._delay_levels = 0  # delay levels 0 … n-1 declared (see publish_delayed)
        self._delay_bound: set[str] = set()  # queues bound to the final delay exchange

    def _require_connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise BrokerConnectionError(f"{mask_password(self.url)} is not connected")
        return self._connection

    def _global_qos_safe(self, queues: Sequence[str]) -> bool:
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
        connection = aio_pika.RobustConnection(_connection_url(self.url))
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
                raise BrokerConnectionError(
                    f"cannot connect to {mask_password(self.url)}: "
                    f"{exc or type(exc).__name__}"
                ) from exc
            raise
        self._connection = connection
        self._rabbitmq_3 = _is_rabbitmq_3(connection)
        self._publish = _Channel(publish)
        self._declare = _Channel(declare)
        connection.reconnect_callbacks.add(self._on_reconnect)

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
        owners += [(c._channel, c) for c in self._consumers
                   if c._channel is not None and not c._stopped]
        for channel, consumer in owners:
            if not channel.is_closed:
                continue
            if self._connection_lost():
                return
            try:
                await channel.reopen()
            except Exception as exc:
                if isinstance(exc, _CONNECTION_ERRORS) or self._connection_lost():
                    logger.warning("could not reopen an AMQP channel after reconnecting "
                                   "(%s); trying again after the next reconnect", exc)
                    return
                logger.error("could not reopen an AMQP channel after reconnecting: %s", exc)
                if consumer is not None:
                    consumer._fail(_translate(exc, "consumer lost after reconnecting"))

    def _connection_lost(self) -> bool:
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
        self._declared.clear()
        self._exchanges.clear()
        self._declared_exchanges.clear()
        self._delay_levels = 0
        self._delay_bound.clear()
        for consumer in self._consumers:
            consumer._terminate()
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
        except _AMQP_ERRORS as exc:
            raise _translate(exc, f"cannot declare queue {queue.name!r}") from exc
        if queue.exchange_name:
            durable = self._exchange_durable(queue.exchange_name)
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
            except _AMQP_ERRORS as exc:
                raise _translate(
                    exc, f"cannot declare exchange {queue.exchange_name!r} for {queue.name!r}"
                ) from exc
            self._exchanges.add(queue.exchange_name)
        self._declared[queue.name] = (queue, arguments)

    def _exchange_durable(self, name: str) -> bool:
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
        except _AMQP_ERRORS as exc:
            raise _translate(exc, f"cannot declare exchange {name!r}") from exc
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
        except _AMQP_ERRORS as exc:
            raise _translate(exc, f"cannot check exchange {name!r}") from exc
        self._exchanges.add(name)

    async def publish(self, envelope: Envelope, *, routing_key: str, exchange: str = "") -> None:
        """Publish and wait for RabbitMQ's confirm; ``exchange=""`` is the default exchange.

        A message RabbitMQ cannot route is dropped silently (``mandatory`` off, as Celery).
        """
        if self._publish is None:
            raise BrokerConnectionError(f"{mask_password(self.url)} is not connected")
        if exchange and exchange not in self._exchanges:
            await self._check_exchange(exchange)
        channel = await self._publish.current(self._timeout)
        try:
            await channel.basic_publish(
                envelope.body,
                exchange=exchange,
                routing_key=routing_key,
                properties=spec.Basic.Properties(
                    content_type=envelope.content_type or None,
                    content_encoding=envelope.content_encoding or None,
                    headers=envelope.headers or None,
                    delivery_mode=envelope.delivery_mode,
                    priority=envelope.priority,
                    correlation_id=envelope.correlation_id,
                    reply_to=envelope.reply_to,
                    expiration=envelope.expiration,  # already milliseconds, as AMQP wants
                ),
            )
        except aiormq.exceptions.DeliveryError as exc:
            raise BrokerError(
                f"RabbitMQ refused the message for {exchange!r}/{routing_key!r} (nack)"
            ) from exc
        except TypeError as exc:
            raise SerializationError(f"message properties cannot be sent over AMQP: {exc}") from exc
        except _PUBLISH_ERRORS as exc:
            raise _translate(exc, f"cannot publish to {exchange!r}/{routing_key!r}") from exc

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
        except _AMQP_ERRORS as exc:
            raise _translate(exc, f"cannot declare the delay levels {prefix!r}") from exc

    def consume(
        self, queues: Sequence[str], *, prefetch: int, no_ack: bool = False
    ) -> AmqpConsumer:
        """A consumer of ``queues`` (which must exist); ``start()`` subscribes."""
        return AmqpConsumer(self, queues, prefetch, no_ack)
