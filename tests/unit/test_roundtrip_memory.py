from __future__ import annotations

import anyio
import pytest

from aioqueue import AioQueue
from aioqueue.worker import Worker


async def test_delay_get(app: AioQueue, worker: Worker) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    r = await add.delay(4, 4)
    assert await r.get(timeout=5) == 8
    assert await r.ready()
    assert await r.state() == "SUCCESS"
    assert await r == 8


async def test_sync_task_runs_in_thread(app: AioQueue, worker: Worker) -> None:
    import threading

    main = threading.get_ident()

    @app.task
    def ident() -> int:
        return threading.get_ident()

    r = await ident.delay()
    assert await r.get(timeout=5) != main


async def test_failure(app: AioQueue, worker: Worker) -> None:
    @app.task
    async def boom(msg: str) -> None:
        raise ValueError(msg)

    r = await boom.delay("bad")
    with pytest.raises(ValueError, match="bad"):
        await r.get(timeout=5)
    assert await r.failed()
    exc = await r.get(propagate=False)
    assert isinstance(exc, ValueError)
    tb = await r.traceback()
    assert tb is not None and "ValueError: bad" in tb


async def test_concurrency(app: AioQueue, worker: Worker) -> None:
    gate = anyio.Event()
    arrived = 0

    @app.task
    async def wait_gate() -> int:
        nonlocal arrived
        arrived += 1
        if arrived == 10:
            gate.set()
        await gate.wait()
        return 1

    results = [await wait_gate.delay() for _ in range(10)]
    for r in results:
        assert await r.get(timeout=5) == 1
