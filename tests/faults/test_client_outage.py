"""delay() during a broker outage: it succeeds after reconnecting or raises
BrokerConnectionError within broker_connection_timeout; it never reports success without a
broker confirm."""

from __future__ import annotations

import time

import aio_pika
import anyio
import pytest

from aioqueue import AioQueue, BrokerConnectionError

from ..integration.conftest import delete_queues, ready_count
from .proxy import tcp_proxy
from .test_connection_faults import port_of, through

pytestmark = [pytest.mark.integration, pytest.mark.faults]


async def test_delay_during_an_outage(amqp_url: str, unique: str) -> None:
    async with tcp_proxy(port_of(amqp_url, 5672)) as proxy:
        url = through(amqp_url, proxy) + "?reconnect_interval=0.2"
        app = AioQueue("client", broker=url, task_default_queue=unique,
                       broker_connection_timeout=1.0)
        try:
            await app.send_task("x.before", [1])
            proxy.pause()
            await proxy.cut()
            started = time.monotonic()
            with pytest.raises(BrokerConnectionError):
                await app.send_task("x.during", [2])
            assert time.monotonic() - started < 1.0 + 1.5  # the timeout, plus slack
            proxy.resume()
            with anyio.fail_after(10):  # reconnects by itself; then publishes are confirmed
                while True:
                    try:
                        await app.send_task("x.after", [3])
                        break
                    except BrokerConnectionError:
                        continue
        finally:
            await app.close()
    # Exactly what was confirmed is in the queue: "before" and "after", not "during".
    async with await aio_pika.connect(amqp_url) as connection:
        assert await ready_count(connection, unique) == 2
    await delete_queues(amqp_url, [unique])
