"""Checked by mypy in tests/unit/test_typing.py: delay() is typed by the task's signature."""

from __future__ import annotations

from typing import Any

from aioqueue import AioQueue, AsyncResult, Task

app = AioQueue("typing", broker="memory://")


@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task
def resize(path: str) -> str:
    return path


@app.task(bind=True, name="typing.bound")
async def bound(self: Task[Any, Any], n: int) -> list[int]:
    return [n]


async def ok() -> None:
    r = await add.delay(4, 4)
    reveal_type(r)  # reveal: AsyncResult[int]
    value = await r.get()
    reveal_type(value)  # reveal: int
    reveal_type(await (await add.delay(4, 4)).get())  # reveal: int
    reveal_type(await resize.delay("a.png"))  # reveal: AsyncResult[str]
    reveal_type(await bound.delay(3))  # reveal: AsyncResult[list[int]]
    reveal_type(await add(1, 2))  # reveal: int
    reveal_type(resize("x"))  # reveal: str
    result: AsyncResult[int] = await add.apply_async((1, 2), countdown=1)
    reveal_type(await result)  # reveal: int


async def wrong() -> None:
    await add.delay(4, "x")  # error: arg-type
    await add.delay(4)  # error: call-arg
    await resize.delay(1)  # error: arg-type
    await bound.delay("3")  # error: arg-type
