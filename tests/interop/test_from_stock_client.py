"""A stock Celery client sends to an aioqueue worker and reads the results with Celery's API."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import anyio
import pytest

from aioqueue import AioQueue
from aioqueue.worker import Worker

pytestmark = pytest.mark.integration

T = TypeVar("T")


class Refused(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)


@pytest.fixture
async def our_worker(stock_env: dict[str, str]) -> AsyncIterator[AioQueue]:
    app = AioQueue("ours", broker=stock_env["T_BROKER"], backend=stock_env["T_BACKEND"],
                   task_default_queue=stock_env["T_QUEUE"])

    @app.task(name="interop.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="interop.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="interop.fail")
    async def fail(code: int, text: str) -> None:
        raise Refused(code, text)

    worker = Worker(app, concurrency=10, shutdown_timeout=5)
    running = asyncio.create_task(worker.run())
    with anyio.fail_after(10):
        await worker.started.wait()
    yield app
    worker.stop()
    await running
    await app.close()


@pytest.fixture
def stock(stock_env: dict[str, str]) -> Iterator[Any]:
    from celery import Celery

    app = Celery("stockclient", broker=stock_env["T_BROKER"], backend=stock_env["T_BACKEND"])
    app.conf.update(
        task_default_queue=stock_env["T_QUEUE"],
        broker_transport_options={"confirm_publish": True},  # nothing lost when we close it
    )

    @app.task(name="interop.add", shared=False)
    def add(x: int, y: int) -> int:  # a stub: the aioqueue worker runs the real one
        raise NotImplementedError

    @app.task(name="interop.mul", shared=False)
    def mul(x: int, y: int) -> int:
        raise NotImplementedError

    # Celery's backend (with its sockets) is per thread: every stock call runs on this one
    # thread, which closes what it opened before it ends (see blocking()).
    thread = ThreadPoolExecutor(1, thread_name_prefix="stock-client")
    _stock_threads.append(thread)
    try:
        yield app
    finally:
        _stock_threads.remove(thread)
        thread.submit(close_stock_client, app).result(timeout=30)
        thread.shutdown(wait=True)
        close_stock_client(app)  # and the main thread's, then what the thread left to the GC


def close_stock_client(app: Any) -> None:
    """Celery's client leaves sockets (made in our helper threads) for the GC to find; close
    what it lets us, then collect the rest here with its ResourceWarnings silenced, so they
    do not surface later in some other test."""
    from kombu import pools

    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is not None and getattr(consumer, "_connection", None) is not None:
        consumer.stop()
        consumer._connection.close()
    app.close()
    pools.reset()  # kombu's process-wide connection pools, closed and forgotten
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


# The thread of the current test's stock client (a list so the fixture can set it).
_stock_threads: list[ThreadPoolExecutor] = []


async def blocking(call: Callable[[], T]) -> T:
    """Celery's client API blocks: run it on the stock client's thread, off the loop the
    worker runs on."""
    return await asyncio.get_running_loop().run_in_executor(_stock_threads[-1], call)


async def test_delay_apply_async_send_task(our_worker: AioQueue, stock: Any) -> None:
    add = stock.tasks["interop.add"]
    r = await blocking(lambda: add.delay(2, 3))
    assert await blocking(lambda: r.get(timeout=20)) == 5
    assert r.state == "SUCCESS"
    r = await blocking(lambda: add.apply_async((4, 4), countdown=1, expires=60, priority=5))
    assert await blocking(lambda: r.get(timeout=20)) == 8
    r = await blocking(lambda: stock.send_task("interop.mul", args=[6, 7]))
    assert await blocking(lambda: r.get(timeout=20)) == 42


async def test_stock_client_sees_our_exception(our_worker: AioQueue, stock: Any) -> None:
    r = await blocking(lambda: stock.send_task("interop.fail", args=[1, "two"]))
    with pytest.raises(Refused) as info:
        await blocking(lambda: r.get(timeout=20))
    assert info.value.args == (1, "two")
    assert r.state == "FAILURE"
    assert "Refused" in (r.traceback or "")
    assert isinstance(await blocking(lambda: r.get(timeout=5, propagate=False)), Refused)


async def test_unknown_task_fails_with_not_registered(our_worker: AioQueue, stock: Any) -> None:
    from celery.exceptions import NotRegistered

    r = await blocking(lambda: stock.send_task("interop.nope", args=[1]))
    with pytest.raises(NotRegistered):
        await blocking(lambda: r.get(timeout=20))


async def test_stock_link_and_chain_run_on_our_worker(our_worker: AioQueue, stock: Any) -> None:
    from celery import chain

    add, mul = stock.tasks["interop.add"], stock.tasks["interop.mul"]
    r = await blocking(lambda: chain(add.s(2, 2), mul.s(10), add.s(1)).apply_async())
    assert await blocking(lambda: r.get(timeout=20)) == 41
    linked = await blocking(lambda: add.apply_async((1, 2), link=mul.s(100)))
    assert await blocking(lambda: linked.get(timeout=20)) == 3
    if stock.conf.result_backend.startswith("redis"):  # rpc results are read by one client
        children = await blocking(lambda: linked.children)
        assert children and await blocking(lambda: children[0].get(timeout=20)) == 300
