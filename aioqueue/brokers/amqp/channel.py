"""Connection and channel plumbing shared by the AMQP broker and its consumers.

* ``connection_url()`` turns Celery's broker URL into the one aiormq wants;
* ``Channel`` holds one of the broker's own robust channels and waits out aio-pika's reopen;
* ``declare_on()`` declares a queue with plain aiormq calls (a consumer's restore);
* error translation: aio-pika, aiormq and pamqp exceptions never leave the AMQP modules
  (:mod:`aioqueue.brokers.amqp`, :mod:`aioqueue.brokers.amqp.consumer`): connection problems
  become ``BrokerConnectionError``, everything else the broker refuses becomes ``BrokerError``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import aiormq
import anyio
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import AbstractChannel
from yarl import URL

from ...exceptions import BrokerConnectionError, BrokerError, reason

if TYPE_CHECKING:
    from ...config import Queue

__all__ = (
    "AMQP_ERRORS",
    "CONNECTION_ERRORS",
    "PUBLISH_ERRORS",
    "Channel",
    "close_quietly",
    "connection_url",
    "declare_on",
    "is_rabbitmq_3",
    "translate",
)

# The name the AMQP broker has always logged under, for all of its modules.
logger = logging.getLogger("aioqueue.brokers.amqp")

# Errors that mean "the connection or channel is gone" rather than "the broker said no".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,  # includes TimeoutError
)
AMQP_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
)
# ValueError: e.g. a routing key over 255 bytes
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (*AMQP_ERRORS, ValueError)


def translate(exc: BaseException, what: str) -> BrokerError:
    if isinstance(exc, CONNECTION_ERRORS):
        return BrokerConnectionError(f"{what}: {reason(exc)}")
    return BrokerError(f"{what}: {reason(exc)}")


# -- URL ------------------------------------------------------------------------------------


def connection_url(url: str) -> URL:
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


# -- connection and channels ----------------------------------------------------------------


def is_rabbitmq_3(connection: AbstractRobustConnection) -> bool:
    transport = connection.transport
    if transport is None:
        return False
    properties = transport.connection.server_properties
    version = str(properties.get("version", ""))
    return properties.get("product") == "RabbitMQ" and version.split(".", 1)[0] == "3"


class Channel:
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


async def declare_on(
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


async def close_quietly(channel: AbstractRobustChannel) -> None:
    with anyio.CancelScope(shield=True):
        try:
            await channel.close()
        except Exception as exc:  # closing is best effort; the connection close covers it
            logger.debug("closing AMQP channel failed: %s", exc)
