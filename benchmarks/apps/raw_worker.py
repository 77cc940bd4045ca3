"""The raw floor's worker: aio-pika consume + ack, no task framework at all.

Each message body is ``{"s": seconds, "sig": 0|1}``: sleep that long (concurrently, one
asyncio task per sleeping message), acknowledge, then signal completion and/or reply to
``reply_to``. Prefetch equals the asyncio systems' concurrency (1000), and acknowledging after
the work bounds it to that many in flight, as for them. Run as
``python -m benchmarks.apps.raw_worker``; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import json
import signal

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.common import ASYNC_CONCURRENCY, AppSettings
from benchmarks.signals import signal_done


async def main() -> None:
    settings = AppSettings.from_env()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=ASYNC_CONCURRENCY)
        queue = await channel.declare_queue(settings.queue, durable=True)
        running: set[asyncio.Task[None]] = set()

        async def finish(message: AbstractIncomingMessage, spec: dict[str, float]) -> None:
            if spec.get("s"):
                await asyncio.sleep(spec["s"])
            await message.ack()
            if spec.get("sig"):
                signal_done()
            if message.reply_to:
                await channel.default_exchange.publish(
                    aio_pika.Message(b"", correlation_id=message.correlation_id),
                    routing_key=message.reply_to,
                )

        async def on_message(message: AbstractIncomingMessage) -> None:
            spec = json.loads(message.body)
            if spec.get("s"):
                task = asyncio.create_task(finish(message, spec))
                running.add(task)
                task.add_done_callback(running.discard)
            else:
                await finish(message, spec)

        await queue.consume(on_message)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
