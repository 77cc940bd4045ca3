"""The parent's own broker and Redis connection: wait for consumers, purge, delete, clean up.

It only ever touches names that carry the run's id (queues, exchanges) and keys in the
suite's own Redis database that match the run's patterns; it never flushes anything.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import aio_pika.exceptions
import redis
from yarl import URL

from benchmarks.procs import WorkerProcess


class WorkerDied(RuntimeError):
    pass


class Admin:
    def __init__(self, amqp_url: str, redis_url: str) -> None:
        # No heartbeats: this loop only runs during our calls, and sits idle for minutes.
        self.url = str(URL(amqp_url).update_query(heartbeat="0"))
        self.loop = asyncio.new_event_loop()
        self.connection: Any = self.loop.run_until_complete(aio_pika.connect(self.url))
        self.channel: Any = None
        self.redis = redis.Redis.from_url(redis_url)

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _channel(self) -> Any:
        if self.connection.is_closed:
            self.connection, self.channel = await aio_pika.connect(self.url), None
        if self.channel is None or self.channel.is_closed:
            self.channel = await self.connection.channel()
        return self.channel

    async def _consumers(self, queue: str) -> int | None:
        channel = await self._channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            self.channel = None  # RabbitMQ closed the channel; open another next time
            return None
        return int(declared.declaration_result.consumer_count)

    def wait_consuming(self, worker: WorkerProcess, queue: str, timeout: float = 90.0) -> float:
        """Seconds from the worker's start until RabbitMQ reports a consumer on ``queue``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if worker.exited() is not None:
                raise WorkerDied(f"worker exited with {worker.exited()}:\n{worker.log_tail()}")
            if self._run(self._consumers(queue)):
                return time.monotonic() - worker.started_at
            time.sleep(0.005)
        raise WorkerDied(f"no consumer on {queue} after {timeout}s:\n{worker.log_tail()}")

    def delete(self, queues: list[str], exchanges: list[str]) -> None:
        """Delete our queues (purging them) and exchanges; missing ones are fine."""
        async def go() -> None:
            for name in queues:
                channel = await self._channel()
                try:
                    await channel.queue_delete(name)
                except aio_pika.exceptions.AMQPError:
                    self.channel = None
            for name in exchanges:
                channel = await self._channel()
                try:
                    await channel.exchange_delete(name)
                except aio_pika.exceptions.AMQPError:
                    self.channel = None

        self._run(go())

    def delete_keys(self, patterns: list[str]) -> int:
        """Delete keys matching our run's patterns in our Redis database; returns how many."""
        deleted = 0
        for pattern in patterns:
            batch: list[bytes] = []
            for key in self.redis.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += int(self.redis.unlink(*batch))
                    batch.clear()
            if batch:
                deleted += int(self.redis.unlink(*batch))
        return deleted

    def close(self) -> None:
        try:
            self._run(self.connection.close())
        finally:
            self.loop.close()
            self.redis.close()
