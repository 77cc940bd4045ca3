"""The raw floor: aio-pika publish with confirms, consume, ack; no task framework at all.

It is what any RabbitMQ-based task queue costs at the least on this machine in this run, so
each system's figure is also given as a fraction of it. Its client publishes concurrently on
one channel with publisher confirms (RabbitMQ confirms in batches: the "batched-confirm
publish rate"); completion is the same datagram signal every ``*_sig`` task sends, since there
is no result store; the round trip is a reply on an exclusive reply queue.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Any

from benchmarks.common import Context
from benchmarks.systems.base import AsyncDriver
from benchmarks.systems.spec import System


def worker_argv(ctx: Context) -> list[str]:
    return [sys.executable, "-m", "benchmarks.apps.raw_worker"]


class Driver(AsyncDriver):
    signals: Any = None  # the client's SignalCounter, set before start()

    async def astart(self) -> None:
        import aio_pika

        from benchmarks.common import AppSettings

        self.aio_pika = aio_pika
        settings = AppSettings.from_env()
        self.connection = await aio_pika.connect(settings.amqp_url)
        self.channel = await self.connection.channel(publisher_confirms=True)
        await self.channel.declare_queue(settings.queue, durable=True)
        self.queue = settings.queue
        self.replies = await self.channel.declare_queue("", exclusive=True, auto_delete=True)
        self.waiting: dict[str, asyncio.Future[None]] = {}
        await self.replies.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: Any) -> None:
        future = self.waiting.pop(message.correlation_id, None)
        if future is not None and not future.done():
            future.set_result(None)

    async def _publish(self, body: bytes, **properties: Any) -> None:
        message = self.aio_pika.Message(body, delivery_mode=2, **properties)
        await self.channel.default_exchange.publish(message, routing_key=self.queue)

    async def asubmit(self, task: str, n: int, arg: float | None) -> list[Any]:
        # No result store: completion is always signalled, and collect() counts signals.
        body = json.dumps({"s": arg if task.startswith("sleep") else 0, "sig": 1}).encode()
        target = self.signals.count + n
        await asyncio.gather(*(self._publish(body) for _ in range(n)))
        return [target]

    async def acollect(self, handles: list[Any], timeout: float) -> None:
        target = handles[0]
        got = await asyncio.to_thread(self.signals.wait_for, target, timeout)
        if got < target:
            raise TimeoutError(f"raw: {got} of {target} completions")

    async def aroundtrip(self, timeout: float) -> None:
        correlation_id = uuid.uuid4().hex
        future = self.waiting[correlation_id] = asyncio.get_running_loop().create_future()
        body = json.dumps({"s": 0, "sig": 0}).encode()
        await self._publish(body, correlation_id=correlation_id, reply_to=self.replies.name)
        await future

    async def aclose(self) -> None:
        await self.connection.close()


SYSTEMS = [
    System(
        name="raw", label="raw aio-pika floor (prefetch 1000)", family="raw",
        worker_argv=worker_argv, driver=Driver,
        requires=("aio_pika",),
        queues=lambda ctx: [ctx.queue],
        redis_patterns=lambda ctx: [],
    ),
]
