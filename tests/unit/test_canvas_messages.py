"""Callbacks, errbacks and chains that arrive in a message (as a stock client sends them)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from aioqueue import AioQueue
from aioqueue.protocol import encode_task

from .conftest import running_worker


def sig(task: str, *args: Any, immutable: bool = False, **options: Any) -> dict[str, Any]:
    return {"task": task, "args": list(args), "kwargs": {}, "options": options,
            "subtask_type": None, "immutable": immutable}


def register(app: AioQueue) -> list[Any]:
    seen: list[Any] = []

    @app.task(name="c.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="c.mul")
    async def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="c.fail")
    async def fail(x: int) -> None:
        raise ValueError(f"bad {x}")

    @app.task(name="c.on_error")
    async def on_error(task_id: str) -> str:
        seen.append(task_id)
        return task_id

    return seen


async def send(app: AioQueue, task: str, args: list[Any], embed: dict[str, Any]) -> str:
    task_id = str(uuid.uuid4())
    envelope = encode_task(task=task, task_id=task_id, args=args, kwargs={},
                           embed={"callbacks": None, "errbacks": None, "chain": None,
                                  "chord": None, **embed})
    broker = await app.get_broker()
    await broker.declare(app.queue_spec("celery"))
    await broker.publish(envelope, routing_key="celery")
    return task_id


async def test_link_callback_gets_the_result_first(app: AioQueue) -> None:
    register(app)
    callback_id = str(uuid.uuid4())
    async with running_worker(app):
        first = await send(app, "c.add", [4, 4], {"callbacks": [
            sig("c.mul", 10, task_id=callback_id)]})
        assert await app.AsyncResult(callback_id).get(timeout=5) == 80
        store = await app.get_result_store()
        assert store is not None
        meta = await store.get(first)
        assert meta is not None and meta["children"] == [[[callback_id, None], None]]
        child = await store.get(callback_id)
        assert child is not None and child["parent_id"] == first


async def test_chain_runs_step_by_step(app: AioQueue) -> None:
    register(app)
    second, third = str(uuid.uuid4()), str(uuid.uuid4())
    # chain(add.s(1, 1), add.s(10), add.si(2, 2)): the rest travels reversed
    chain = [sig("c.add", 2, 2, immutable=True, task_id=third), sig("c.add", 10, task_id=second)]
    async with running_worker(app):
        await send(app, "c.add", [1, 1], {"chain": chain})
        assert await app.AsyncResult(second).get(timeout=5) == 12
        assert await app.AsyncResult(third).get(timeout=5) == 4


async def test_errback_gets_the_failed_task_id_and_chain_fails(app: AioQueue) -> None:
    seen = register(app)
    later = str(uuid.uuid4())
    async with running_worker(app):
        failed = await send(app, "c.fail", [1], {
            "errbacks": [sig("c.on_error")],
            "chain": [sig("c.add", 1, task_id=later)],
        })
        with pytest.raises(ValueError, match="bad 1"):
            await app.AsyncResult(failed).get(timeout=5)
        with pytest.raises(ValueError, match="bad 1"):
            await app.AsyncResult(later).get(timeout=5)
        store = await app.get_result_store()
        assert store is not None
        meta = await store.get(failed)
        assert meta is not None
        [[[errback_id, _], _]] = meta["children"]
        assert await app.AsyncResult(errback_id).get(timeout=5) == failed
    assert seen == [failed]


async def test_nested_chain_and_group_callbacks(app: AioQueue) -> None:
    register(app)
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    nested_chain = {"task": "celery.chain", "args": [], "options": {}, "immutable": False,
                    "subtask_type": "chain", "kwargs": {"tasks": [
                        sig("c.mul", 2, task_id=a), sig("c.add", 1, task_id=b)]}}
    group = {"task": "celery.group", "args": [], "options": {}, "immutable": False,
             "subtask_type": "group", "kwargs": {"tasks": [sig("c.mul", 3, task_id=c)]}}
    async with running_worker(app):
        await send(app, "c.add", [2, 3], {"callbacks": [nested_chain, group]})
        assert await app.AsyncResult(a).get(timeout=5) == 10
        assert await app.AsyncResult(b).get(timeout=5) == 11
        assert await app.AsyncResult(c).get(timeout=5) == 15


async def test_malformed_callbacks_do_not_fail_the_task(app: AioQueue) -> None:
    register(app)
    async with running_worker(app):
        task_id = await send(app, "c.add", [1, 2], {"callbacks": [{"no": "task"}]})
        assert await app.AsyncResult(task_id).get(timeout=5) == 3
