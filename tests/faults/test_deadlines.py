"""Every wait has a deadline, and says what was unreachable and why.

* ``delay()`` on a connection that went silent (no RST: the proxy forwards nothing and
  closes nothing) raises ``BrokerConnectionError`` within ``broker_publish_timeout``, not
  after the heartbeat expires minutes later, and the message is not reported sent.
* Connecting to an address that accepts and then never answers fails within
  ``broker_connection_timeout`` with a message that says so (it used to end in an empty
  string: a bare ``TimeoutError()``).
* ``get(timeout=...)`` while Redis is out of reach times out saying the result store was
  unreachable, and why, not only that no result came.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.config import Queue, Settings
from aioqueue.exceptions import BrokerConnectionError, TimeoutError
from aioqueue.protocol import encode_task, new_task_id
from aioqueue.results.redis import RedisResultStore

from ..integration.conftest import delete_queues
from .proxy import tcp_proxy

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def envelope() -> object:
    return encode_task(task="t.noop", task_id=new_task_id(), args=(), kwargs={})


async def test_delay_on_a_silent_connection_fails_within_the_publish_timeout(
    amqp_url: str, unique: str, figures: dict[str, Any]
) -> None:
    settings = Settings()
    settings.broker_publish_timeout = 1.0
    async with tcp_proxy(5672) as proxy:
        broker = AmqpBroker(f"amqp://guest:guest@127.0.0.1:{proxy.port}//", settings)
        await broker.connect()
        try:
            await broker.declare(Queue(unique))
            await broker.publish(envelope(), routing_key=unique)  # type: ignore[arg-type]
            proxy.freeze()
            started = time.monotonic()
            with pytest.raises(BrokerConnectionError) as raised:
                with anyio.fail_after(10):
                    await broker.publish(envelope(), routing_key=unique)  # type: ignore[arg-type]
            waited = time.monotonic() - started
        finally:
            proxy.thaw()
            with anyio.move_on_after(5, shield=True):
                await broker.close()
    figures.update(publish_timeout_s=1.0, failed_after_s=round(waited, 2))
    assert 0.9 <= waited < 5
    assert "did not confirm" in str(raised.value) and "broker_publish_timeout" in str(raised.value)
    await delete_queues(amqp_url, [unique])


async def test_connecting_to_an_address_that_never_answers_says_so(
    figures: dict[str, Any]
) -> None:
    held: list[SocketStream] = []

    async def hold(stream: SocketStream) -> None:  # accept, then say nothing
        held.append(stream)
        await anyio.sleep_forever()

    settings = Settings()
    settings.broker_connection_timeout = 0.5
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, hold)
        broker = AmqpBroker(f"amqp://guest:secret@127.0.0.1:{port}//", settings)
        started = time.monotonic()
        with pytest.raises(BrokerConnectionError) as raised:
            await broker.connect()
        waited = time.monotonic() - started
        group.cancel_scope.cancel()
    for stream in held:
        await stream.aclose()
    message = str(raised.value)
    figures.update(connection_timeout_s=0.5, failed_after_s=round(waited, 2))
    assert waited < 5
    assert message.endswith("no answer within 0.5 s (broker_connection_timeout)"), message
    assert "secret" not in message


async def test_a_result_wait_while_redis_is_out_of_reach_says_so(
    unique: str, figures: dict[str, Any]
) -> None:
    settings = Settings()
    settings.result_backend_transport_options = {
        "retry_policy": {"max_retries": None, "interval_start": 0.05, "interval_step": 0.05,
                         "interval_max": 0.2}}
    async with tcp_proxy(6379) as proxy:
        async with RedisResultStore(f"redis://127.0.0.1:{proxy.port}/12", settings) as store:
            with pytest.raises(TimeoutError):  # the listener is up: a plain timeout
                await store.wait(f"{unique}-1", 0.2)
            proxy.pause()
            await proxy.cut()
            with pytest.raises(TimeoutError) as raised:
                await store.wait(f"{unique}-2", 1.0)
            proxy.resume()
    message = str(raised.value)
    figures.update(wait_s=1.0)
    assert "the result store was unreachable" in message, message
