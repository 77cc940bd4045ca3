"""Time limits: a soft one raised inside the task, a hard one that stops it.

Coroutine tasks: at the soft limit ``SoftTimeLimitExceeded`` is raised inside the coroutine at
the ``await`` it is suspended on, so it can clean up (and may even finish); at the hard limit
the coroutine is cancelled and the task fails with ``TimeLimitExceeded``.

Plain ``def`` tasks run in a thread, and Python cannot stop a thread. The most that can be
done honestly is done: at either limit the exception is raised asynchronously in the thread
(``PyThreadState_SetAsyncExc``), which takes effect at its next Python bytecode — at once in
Python code, only after it returns from a blocking C call such as ``time.sleep`` or a socket
read. At the hard limit the worker also stops waiting: the task is stored as failed and its
permit freed, while the thread finishes in the background.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

import anyio

from .exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

__all__ = ("run_coroutine", "run_in_thread")

T = TypeVar("T")


class _SoftLimited:
    """Drives a coroutine and throws ``SoftTimeLimitExceeded`` into it at the deadline.

    The task awaiting this is cancelled at the deadline to wake it from whatever it waits on;
    that one cancellation is turned into ``SoftTimeLimitExceeded`` inside the coroutine and
    withdrawn (``uncancel``), so cancel scopes around it keep their own accounting.
    """

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro = coro
        self.due = False

    def fire(self, task: asyncio.Task[Any]) -> None:
        self.due = True
        task.cancel()

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self.coro
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                if error is not None:
                    pending, error = error, None
                    yielded = coro.throw(pending)
                else:
                    yielded = coro.send(value)
            except StopIteration as stop:
                return stop.value
            try:
                value = yield yielded
            except asyncio.CancelledError as cancelled:
                value = None
                if self.due:
                    self.due = False
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                    error = SoftTimeLimitExceeded("soft time limit exceeded")
                else:
                    error = cancelled
            except BaseException as other:  # passed on to the coroutine, as await would
                value = None
                error = other


async def run_coroutine(
    coro: Coroutine[Any, Any, T], hard: float | None, soft: float | None
) -> T:
    """Await ``coro`` under the limits (seconds; None means none)."""
    timer: asyncio.TimerHandle | None = None
    awaitable: Any = coro
    if soft is not None and (hard is None or soft < hard):
        limited = _SoftLimited(coro)
        task = asyncio.current_task()
        assert task is not None
        timer = asyncio.get_running_loop().call_later(soft, limited.fire, task)
        awaitable = limited
    try:
        if hard is None:  # a soft limit alone: no cancel scope needed
            result: T = await awaitable
            return result
        with anyio.move_on_after(hard):
            result = await awaitable
            return result
        raise TimeLimitExceeded(f"task exceeded its hard time limit of {hard}s")
    finally:
        if timer is not None:
            timer.cancel()


class _ThreadCall:
    """Runs a call in a worker thread and can raise an exception in it while it runs."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.lock = threading.Lock()
        self.ident: int | None = None
        self.done = False

    def __call__(self) -> Any:
        with self.lock:
            self.ident = threading.get_ident()
        try:
            return self.call()
        finally:
            # Under the lock: an exception set in this thread before this point arrives here,
            # inside this call, never later in another job the pooled thread picks up.
            with self.lock:
                self.done = True

    def interrupt(self, exc_type: type[BaseException]) -> None:
        import ctypes  # here: ~0.3 MiB a worker without time-limited threads never needs

        with self.lock:
            if self.ident is None or self.done:
                return
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self.ident), ctypes.py_object(exc_type)
            )


async def run_in_thread(
    call: Callable[[], T],
    hard: float | None,
    soft: float | None,
    limiter: anyio.CapacityLimiter | None,
) -> T:
    """Run a blocking call in a thread under the limits; see the module docstring."""
    threaded = _ThreadCall(call)
    loop = asyncio.get_running_loop()
    timer = None
    if soft is not None and (hard is None or soft < hard):
        timer = loop.call_later(soft, threaded.interrupt, SoftTimeLimitExceeded)
    try:
        with anyio.move_on_after(hard):
            # Abandoned when cancelled (hard limit, shutdown): a thread cannot be stopped.
            result: T = await anyio.to_thread.run_sync(
                threaded, limiter=limiter, abandon_on_cancel=True
            )
            return result
        threaded.interrupt(TimeLimitExceeded)
        raise TimeLimitExceeded(f"task exceeded its hard time limit of {hard}s")
    finally:
        if timer is not None:
            timer.cancel()

