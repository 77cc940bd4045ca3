"""``memory://``: a broker inside one process, with the whole broker contract.

Queues live in a hub named by the URL (``memory://`` and ``memory://other`` are separate),
so a client app and an in-process worker app with the same URL share queues. Prefetch,
acknowledgement, requeue on reject or close, priorities (with ``x-max-priority``),
per-message expiration, dead-lettering and ``x-delivery-limit`` on quorum queues behave as on
RabbitMQ, so tests that use it run the worker's real consume loop. ``publish_delayed`` holds
a message in a timer of the event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..exceptions import BrokerConnectionError, BrokerError
from ..protocol import Envelope
from .base import Broker, Consumer, Delivery

if TYPE_CHECKING:
    from ..config import Queue, Settings

__all__ = ("MemoryBroker", "reset")

logger = logging.getLogger(__name__)

_sequence = itertools.count()


@dataclass(order=True, slots=True)
class _Item:
    sort_key: tuple[int, int]
    envelope: Envelope = field(compare=False)
    routing_key: str = field(compare=False)
    queue: str = field(compare=False)
    deadline: float | None = field(compare=False, default=None)
    redelivered: bool = field(compare=False, default=False)
    returns: int = field(compare=False, default=0)  # deliveries given back, for x-delivery-limit


class _MemoryQueue:
    def __init__(self, spec: Queue, max_priority: int | None) -> None:
        self.spec = spec
        args = dict(spec.queue_arguments)
        self.max_priority: int | None = args.get("x-max-priority", max_priority)
        self.dead_letter_exchange: str | None = args.get("x-dead-letter-exchange")
        self.dead_letter_routing_key: str | None = args.get("x-dead-letter-routing-key")
        # RabbitMQ honours x-delivery-limit on quorum queues only.
        self.delivery_limit: int | None = (
            args.get("x-delivery-limit") if args.get("x-queue-type") == "quorum" else None
        )
        self.items: list[_Item] = []
        self.consumers: set[_MemoryConsumer] = set()

    def push(self, item: _Item) -> None:
        heapq.heappush(self.items, item)
        for consumer in self.consumers:
            consumer.wake.set()

    def pop(self) -> _Item | None:
        while self.items:
            item = heapq.heappop(self.items)
            if item.deadline is not None and item.deadline <= time.monotonic():
                continue  # expired in the queue, as RabbitMQ drops per-message TTLs
            return item
        return None

    def sort_key(self, envelope: Envelope, seq: int) -> tuple[int, int]:
        if self.max_priority is None:
            return (0, seq)
        return (-min(envelope.priority or 0, self.max_priority), seq)


@dataclass(slots=True)
class _Exchange:
    kind: str
    bindings: list[tuple[str, str]] = field(default_factory=list)  # (binding key, queue)


class _Hub:
    def __init__(self) -> None:
        self.queues: dict[str, _MemoryQueue] = {}
        self.exchanges: dict[str, _Exchange] = {}

    def route(self, exchange: str, routing_key: str) -> list[_MemoryQueue]:
        if exchange == "":
            queue = self.queues.get(routing_key)
            return [queue] if queue else []
        ex = self.exchanges.get(exchange)
        if ex is None:
            raise BrokerError(f"no exchange {exchange!r} (NOT_FOUND)")
        names = [q for key, q in ex.bindings if _matches(ex.kind, key, routing_key)]
        return [self.queues[n] for n in dict.fromkeys(names) if n in self.queues]


def _matches(kind: str, binding: str, routing_key: str) -> bool:
    if kind == "fanout":
        return True
    if kind == "topic":
        pattern = re.escape(binding).replace(r"\#", ".*").replace(r"\*", "[^.]+")
        return re.fullmatch(pattern, routing_key) is not None
    return binding == routing_key


_HUBS: dict[str, _Hub] = {}


class _MemoryDelivery(Delivery):
    __slots__ = ("_consumer", "_item", "_settled")

    def __init__(self, item: _Item, consumer: _MemoryConsumer) -> None:
        super().__init__(item.envelope, item.routing_key, item.redelivered)
        self._item = item
        self._consumer = consumer
        self._settled = consumer.no_ack

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self._consumer.unsettled.pop(id(self), None)
        self._consumer.wake.set()
        return True

    async def ack(self) -> None:
        self._settle()

    async def reject(self, requeue: bool) -> None:
        if not self._settle():
            return
        self._consumer.broker.give_back(self._item, self.routing_key, requeue)


class _MemoryConsumer(Consumer):
    def __init__(
        self, broker: MemoryBroker, queues: Sequence[str], prefetch: int, no_ack: bool
    ) -> None:
        self.broker = broker
        self.queue_names = list(queues)
        self.prefetch = prefetch
        self.no_ack = no_ack
        self.wake = asyncio.Event()
        self.unsettled: dict[int, _MemoryDelivery] = {}
        self.queues: list[_MemoryQueue] = []
        self.running = False

    async def start(self) -> None:
        hub = self.broker.hub()
        missing = [n for n in self.queue_names if n not in hub.queues]
        if missing:
            raise BrokerError(f"cannot consume from undeclared queue(s): {', '.join(missing)}")
        self.queues = [hub.queues[n] for n in self.queue_names]
        for queue in self.queues:
            queue.consumers.add(self)
        self.broker.consumers.add(self)
        self.running = True

    async def stop(self) -> None:
        self.running = False
        for queue in self.queues:
            queue.consumers.discard(self)
        self.wake.set()

    def requeue_unsettled(self) -> None:
        """The connection is gone: what was delivered but not settled goes back."""
        for delivery in list(self.unsettled.values()):
            delivery._settled = True
            self.broker.give_back(delivery._item, delivery.routing_key, True)
        self.unsettled.clear()

    async def receive(self) -> Delivery:
        while True:
            if not self.running:
                raise BrokerConnectionError("consumer stopped")
            self.wake.clear()
            if self.no_ack or len(self.unsettled) < self.prefetch:
                for queue in self.queues:
                    item = queue.pop()
                    if item is not None:
                        delivery = _MemoryDelivery(item, self)
                        if not self.no_ack:
                            self.unsettled[id(delivery)] = delivery
                        return delivery
            await self.wake.wait()


class MemoryBroker(Broker):
    """In-process broker; see the module docstring."""

    def __init__(self, url: str, settings: Settings) -> None:
        super().__init__(url, settings)
        self.consumers: set[_MemoryConsumer] = set()
        self._connected = False

    def hub(self) -> _Hub:
        if not self._connected:
            raise BrokerConnectionError(f"{self.url} is not connected")
        return _HUBS.setdefault(self.url, _Hub())

    async def connect(self) -> None:
        self._connected = True

    async def close(self) -> None:
        for consumer in list(self.consumers):
            await consumer.stop()
            consumer.requeue_unsettled()
        self.consumers.clear()
        self._connected = False

    async def declare(self, queue: Queue) -> None:
        hub = self.hub()
        if queue.name not in hub.queues:
            hub.queues[queue.name] = _MemoryQueue(queue, self.settings.task_queue_max_priority)
        if queue.exchange_name:
            exchange = hub.exchanges.setdefault(queue.exchange_name, _Exchange(queue.exchange_type))
            binding = (queue.binding_key, queue.name)
            if binding not in exchange.bindings:
                exchange.bindings.append(binding)

    async def declare_exchange(self, name: str, type: str, *, durable: bool = True) -> None:
        """Declare an exchange (durability means nothing in memory); the first one wins."""
        self.hub().exchanges.setdefault(name, _Exchange(type))

    async def publish(
        self, envelope: Envelope, *, routing_key: str, exchange: str = "",
        proof: asyncio.Future[None] | None = None,
    ) -> None:
        # Taken at once (no confirm to wait for): ``proof`` is not needed.
        hub = self.hub()
        deadline = None
        if envelope.expiration is not None:
            deadline = time.monotonic() + int(envelope.expiration) / 1000
        for queue in hub.route(exchange, routing_key):
            seq = next(_sequence)
            item = _Item(queue.sort_key(envelope, seq), envelope, routing_key, queue.spec.name,
                         deadline)
            queue.push(item)

    def give_back(self, item: _Item, routing_key: str, requeue: bool) -> None:
        hub = _HUBS.get(self.url)
        if hub is None:
            return
        queue = hub.queues.get(item.queue)
        if queue is None:
            return
        if requeue:
            item.returns += 1
            if queue.delivery_limit is None or item.returns <= queue.delivery_limit:
                item.redelivered = True
                queue.push(item)  # its original sort key puts it back where it was
                return
            # Given back more often than the limit: dead-lettered (or dropped), as RabbitMQ does.
        if queue.dead_letter_exchange is not None:
            key = queue.dead_letter_routing_key or routing_key
            for target in hub.route(queue.dead_letter_exchange, key):
                seq = next(_sequence)
                target.push(
                    _Item(target.sort_key(item.envelope, seq), item.envelope, key, target.spec.name)
                )
        else:
            logger.debug("message on %s rejected without a dead-letter exchange", queue.spec.name)

    async def publish_delayed(self, envelope: Envelope, *, queue: str, delay: float) -> bool:
        """Publish to ``queue`` after ``delay`` seconds, from a timer of this event loop.

        In-process like everything here, so a delayed message is lost with the loop. As on
        RabbitMQ, it carries no per-message TTL meanwhile (the worker checks ``expires``).
        """
        self.hub()  # connected?
        asyncio.get_running_loop().call_later(delay, self._arrive, envelope, queue)
        return True

    def _arrive(self, envelope: Envelope, queue: str) -> None:
        hub = _HUBS.get(self.url)
        target = hub.queues.get(queue) if hub is not None else None
        if target is not None:  # else unroutable: dropped, as RabbitMQ does
            target.push(_Item(target.sort_key(envelope, next(_sequence)), envelope, queue, queue))

    def consume(self, queues: Sequence[str], *, prefetch: int, no_ack: bool = False) -> Consumer:
        return _MemoryConsumer(self, queues, prefetch, no_ack)


def reset(url: str | None = None) -> None:
    """Forget the queues of one hub (or all of them); for tests."""
    if url is None:
        _HUBS.clear()
    else:
        _HUBS.pop(url, None)

