"""The contract every broker fulfils: publish confirmed, consume with prefetch, ack or reject."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
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
    async def publish(
        self, envelope: Envelope, *, routing_key: str, exchange: str = ""
    ) -> None:
        """Publish; returns once the broker has taken responsibility for the message."""

    @abstractmethod
    def consume(
        self, queues: Sequence[str], *, prefetch: int, no_ack: bool = False
    ) -> Consumer:
        """Consume from ``queues`` with at most ``prefetch`` unsettled deliveries."""
