"""An aioqueue client sends to a stock Celery worker and reads its results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from aioqueue import AioQueue, TaskRevokedError

from .conftest import StockWorker, celery_54, start_stock_worker, stop_stock_worker

pytestmark = pytest.mark.integration


async def test_send_task_and_apply_options(client: AioQueue, stock_worker: StockWorker) -> None:
    assert await (await client.send_task("interop.add", [2, 3])).get(timeout=20) == 5
    r = await client.send_task(
        "interop.describe", [1, "two"], {"k": [3]}, countdown=1, expires=60, priority=7,
        time_limit=300, soft_time_limit=240, retries=2,
    )
    seen = await r.get(timeout=20)
    assert seen["args"] == [1, "two"] and seen["kwargs"] == {"k": [3]}
    assert seen["priority"] == 7 and seen["retries"] == 2
    assert seen["timelimit"] == [300, 240]
    assert seen["eta"] is not None
    assert await r.state() == "SUCCESS"


async def test_exception_keeps_its_type_and_message(
    client: AioQueue, stock_worker: StockWorker
) -> None:
    r = await client.send_task("interop.fail", [1, "two"])
    with pytest.raises(Exception) as info:
        await r.get(timeout=20)
    stockapp = sys.modules["stockapp"]
    assert type(info.value) is stockapp.CustomError
    assert info.value.args == (1, "two")
    assert await r.state() == "FAILURE"
    tb = await r.traceback()
    assert tb is not None and "CustomError" in tb


async def test_expired_task_is_revoked(client: AioQueue, stock_worker: StockWorker) -> None:
    # Delivered at once and held for its ETA, by when it has expired: the worker revokes it.
    r = await client.send_task("interop.add", [1, 1], countdown=2, expires=1)
    with pytest.raises(TaskRevokedError, match="expired"):
        await r.get(timeout=20)
    assert await r.state() == "REVOKED"


async def test_typed_task_object_to_a_stock_worker(
    client: AioQueue, stock_worker: StockWorker
) -> None:
    @client.task(name="interop.mul")
    async def mul(x: int, y: int) -> int:  # the body runs on the stock worker, not here
        raise NotImplementedError

    assert await (await mul.delay(6, 7)).get(timeout=20) == 42


async def test_old_stock_worker_reads_our_integers(
    client: AioQueue, tmp_path: Path, stock_env: dict[str, str]
) -> None:
    """Celery 5.4 on py-amqp 5.3.1 misreads small AMQP integers; ours are written as it reads."""
    old = start_stock_worker(tmp_path, stock_env, celery_54())
    try:
        r = await client.send_task(
            "interop.describe", [-1, 300], countdown=1, expires=60, priority=3,
            time_limit=300, soft_time_limit=240, retries=1,
        )
        seen = await r.get(timeout=30)
        assert seen["timelimit"] == [300, 240] and seen["retries"] == 1
        assert seen["args"] == [-1, 300]
        assert "FrameSyntaxError" not in old.output()
    finally:
        stop_stock_worker(old)
