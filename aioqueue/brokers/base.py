"""The contract every broker fulfils: publish confirmed, consume with prefetch, ack or reject."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Self

from ..protocol import Envelope

if TYPE_CHECKING:
    from ..config import Queue, Settings

__all__ = ("Broker", "Consumer", "Delivery")


class Delivery(ABC):
    """One received message; settle it exactly once with ``ack()`` or ``reject()``."""

    __slots__ = ("envelope", "redelivered", "routing_key")

    def __init__(self, envelope: Envelope, routing_key: str, redelivered: bool) -> None:
        self.envelope = envelope
        self.routing_key = routing_key
        self.redelivered = redelivered

    @abstractmethod
    async def ack(self) -> None:
        """The message is done with; the broker forgets it."""

    @abstractmethod
    async def reject(self, requeue: bool) -> None:
        """Give the message back (``requeue=True``) or drop it / dead-letter it."""


class Consumer(ABC):
    """An async iterator of deliveries, used as ``async with broker.consume(...) as c``.

    Leaving the block stops consumption; messages the broker sent ahead (prefetched) but
    that were never handed out go back to their queue.
    """

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Delivery:
        return await self.receive()

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    async def receive(self) -> Delivery:
        """Wait for the next delivery."""

    async def receive_into(self, take: Callable[[Delivery], None]) -> None:
        """Wait for the next delivery and call ``take`` with it (``take`` must not block).

        A consumer may call ``take`` as soon as the delivery is read, from the code reading
        it, a loop iteration before this returns. So if this raises (cancelled, the
        consumer failed), ``take`` may or may not have been called: count in ``take``.
        """
        take(await self.receive())


class Broker(ABC):
    """A message broker: connect, declare queues, publish with confirmation, consume."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.settings = settings

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @abstractmethod
    async def connect(self) -> None:
        """Connect; raises ``BrokerConnectionError`` within ``broker_connection_timeout``."""

    @abstractmethod
    async def close(self) -> None:
        """Close; unsettled deliveries go back to their queues."""

    @abstractmethod
    async def declare(self, queue: Queue) -> None:
        """Declare a queue (and its exchange and binding) unless already declared."""

    @abstractmethod
    async def declare_exchange(self, name: str, type: str, *, durable: bool = True) -> None:
        """Declare an exchange of ``type`` (direct, topic, fanout) unless already declared.

        A later ``declare(queue)`` bound to ``name`` binds to it as declared here (on AMQP,
        with this durability: Celery's ``celery.pidbox`` is a non-durable fanout). A
        message published to a fanout exchange reaches every queue bound to it.
        """

    @abstractmethod
    async def publish(
        self, envelope: Envelope, *, routing_key: str, exchange: str = "",
        proof: asyncio.Future[None] | None = None,
    ) -> None:
        """Publish; returns once the broker has taken responsibility for the message.

        ``proof``, when given, completes once the message's task has a result: a worker
        received the message, which proves the broker has it as well as a confirm does.
        A broker that waits for confirms may return then, without the confirm.
        """

    async def publish_delayed(self, envelope: Envelope, *, queue: str, delay: float) -> bool:
        """Publish to ``queue`` (through the default exchange) so the message becomes
        deliverable about ``delay`` seconds from now, kept by the broker meanwhile.

        Returns False, having published nothing, when this broker cannot do that; the caller
        then publishes normally and the worker holds the message until its ETA. See
        :mod:`aioqueue.brokers.delay`.
        """
        return False

    @abstractmethod
    def consume(
        self, queues: Sequence[str], *, prefetch: int, no_ack: bool = False
    ) -> Consumer:
        """Consume from ``queues`` with at most ``prefetch`` unsettled deliveries."""
