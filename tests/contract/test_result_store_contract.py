"""The ResultStore contract, the same tests for memory, sqlite, redis and rpc."""

from __future__ import annotations

import uuid

import anyio
import pytest

from aioqueue import TimeoutError
from aioqueue.exceptions import SerializationError
from aioqueue.meta import make_meta
from aioqueue.results.base import ResultStore


def new_id() -> str:
    return str(uuid.uuid4())


async def test_store_get_forget(store: ResultStore) -> None:
    task_id = new_id()
    assert await store.get(task_id) is None
    meta = make_meta(task_id, "SUCCESS", {"a": [1, 2]})
    await store.store(task_id, meta, reply_to=store.reply_to)
    meta = await store.wait(task_id, timeout=5)
    assert meta["status"] == "SUCCESS" and meta["result"] == {"a": [1, 2]}
    assert meta["task_id"] == task_id and meta["date_done"]
    got = await store.get(task_id)
    assert got is not None and got["result"] == {"a": [1, 2]}
    await store.forget(task_id)
    assert await store.get(task_id) is None


async def test_wait_sees_a_later_store_and_skips_started(store: ResultStore) -> None:
    task_id = new_id()
    waiting = anyio.Event()
    found: dict[str, object] = {}

    async def waiter() -> None:
        waiting.set()
        found.update(await store.wait(task_id, timeout=10))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await waiting.wait()
        await store.store(task_id, make_meta(task_id, "STARTED", {"pid": 1}),
                          reply_to=store.reply_to)
        await store.store(task_id, make_meta(task_id, "FAILURE", {
            "exc_type": "ValueError", "exc_message": ["x"], "exc_module": "builtins"},
            traceback="tb"), reply_to=store.reply_to)
    assert found["status"] == "FAILURE" and found["traceback"] == "tb"


async def test_wait_times_out(store: ResultStore) -> None:
    with pytest.raises(TimeoutError):
        await store.wait(new_id(), timeout=0.1)


async def test_many_concurrent_waits(store: ResultStore) -> None:
    ids = [new_id() for _ in range(200)]
    results: dict[str, int] = {}

    async def waiter(task_id: str) -> None:
        results[task_id] = (await store.wait(task_id, timeout=20))["result"]

    async with anyio.create_task_group() as tg:
        for task_id in ids:
            tg.start_soon(waiter, task_id)
        for n, task_id in enumerate(ids):
            await store.store(task_id, make_meta(task_id, "SUCCESS", n), reply_to=store.reply_to)
    assert [results[task_id] for task_id in ids] == list(range(200))


async def test_unserializable_record_raises_and_writes_nothing(store: ResultStore) -> None:
    task_id = new_id()
    with pytest.raises(SerializationError):
        await store.store(task_id, make_meta(task_id, "SUCCESS", object()),
                          reply_to=store.reply_to)
    assert await store.get(task_id) is None


async def test_success_is_never_overwritten(store: ResultStore) -> None:
    task_id = new_id()
    await store.store(task_id, make_meta(task_id, "SUCCESS", 1), reply_to=store.reply_to)
    await store.wait(task_id, timeout=5)
    await store.store(task_id, make_meta(task_id, "STARTED", {"pid": 2}), reply_to=store.reply_to)
    sentinel = new_id()  # stores deliver in order: once this is seen, so was the STARTED
    await store.store(sentinel, make_meta(sentinel, "SUCCESS", 0), reply_to=store.reply_to)
    await store.wait(sentinel, timeout=5)
    meta = await store.get(task_id)
    assert meta is not None and meta["status"] == "SUCCESS" and meta["result"] == 1
