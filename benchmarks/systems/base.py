"""The client-side driver interface every system implements, and its asyncio adapter.

The workload modules measure through these five calls only, so every system is timed by the
same code around the same calls:

* ``submit(task, n, arg)`` issues ``n`` calls of one benchmark task as concurrently as the
  system's client allows (``asyncio.gather`` for async clients; a loop for blocking clients,
  whose calls return without waiting) and returns when every call has returned;
* ``collect(handles, timeout)`` waits until every result of a ``submit`` has been read;
* ``roundtrip(timeout)`` is one call plus reading its result; ``roundtrips(n, timeout)``
  times ``n`` of them in sequence and returns each one's seconds. A blocking client times
  each ``roundtrip()`` call; an async client times each round trip inside its running event
  loop, as an async application calls it, instead of starting and stopping the loop around
  every one (which cost an async client ~0.1-0.2 ms per call that no application pays);
* ``start()`` / ``close()`` connect and disconnect (never timed).

Task names are the same in every app: ``noop``, ``noop_sig`` (no-op, then a completion
signal), ``sleep(seconds)`` and ``sleep_sig(seconds)``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: Every wait is bounded: a stuck system fails its run instead of hanging the suite.
DEFAULT_TIMEOUT = 300.0


class Driver:
    """Blocking interface the workload code calls (see the module docstring)."""

    def start(self) -> None:
        """Connect; declare what the system declares on first use."""

    def submit(self, task: str, n: int, arg: float | None = None) -> list[Any]:
        raise NotImplementedError

    def collect(self, handles: list[Any], timeout: float = DEFAULT_TIMEOUT) -> None:
        raise NotImplementedError

    def roundtrip(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        raise NotImplementedError

    def roundtrips(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> list[float]:
        """Seconds of each of ``n`` sequential round trips."""
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            self.roundtrip(timeout)
            samples.append(time.perf_counter() - start)
        return samples

    def close(self) -> None:
        """Disconnect."""


class AsyncDriver(Driver):
    """A driver written with coroutines, run on one private event loop for its whole life.

    The same loop serves every call, so connections made in ``astart`` stay usable; the loop
    only runs inside a call, which is all the workloads time.
    """

    #: Run on uvloop instead of the standard loop (a system's uvloop variant sets this).
    use_uvloop = False

    def __init__(self) -> None:
        if self.use_uvloop:
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def astart(self) -> None:
        pass

    async def asubmit(self, task: str, n: int, arg: float | None) -> list[Any]:
        raise NotImplementedError

    async def acollect(self, handles: list[Any], timeout: float) -> None:
        raise NotImplementedError

    async def aroundtrip(self, timeout: float) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass

    def start(self) -> None:
        self.run(self.astart())

    def submit(self, task: str, n: int, arg: float | None = None) -> list[Any]:
        return self.run(self.asubmit(task, n, arg))

    def collect(self, handles: list[Any], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.run(asyncio.wait_for(self.acollect(handles, timeout), timeout))

    def roundtrip(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.run(asyncio.wait_for(self.aroundtrip(timeout), timeout))

    def roundtrips(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> list[float]:
        return self.run(self._timed_roundtrips(n, timeout))

    async def _timed_roundtrips(self, n: int, timeout: float) -> list[float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            async with asyncio.timeout(timeout):  # no task per call, unlike wait_for
                await self.aroundtrip(timeout)
            samples.append(time.perf_counter() - start)
        return samples

    def close(self) -> None:
        try:
            self.run(self.aclose())
        finally:
            self.loop.close()


def task_args(task: str, arg: float | None) -> tuple[Any, ...]:
    """Positional arguments of a benchmark task: the sleeps take their duration."""
    return (arg,) if task.startswith("sleep") else ()
