"""``--processes N``: one parent that runs N worker processes and keeps them running.

One event loop uses one core, so N processes use N. Each child is an ordinary worker
(``python -m aioqueue.worker`` with the same options) with its own loop, its own node name
(``name.1@host``, ``name.2@host``: remote control needs distinct names) and its share of the
concurrency. The parent replaces a child that dies (with a growing pause if it keeps dying
at once), passes SIGTERM/SIGINT on to every child — they drain as a single worker does, and
a second signal stops them at once — and exits when all of them have.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from collections.abc import Sequence

import anyio
import anyio.abc

__all__ = ("child_commands", "supervise")

logger = logging.getLogger("aioqueue.worker")

_STEADY = 10.0  # a child that ran this long was healthy: restart it at once if it dies


def child_commands(
    argv: Sequence[str], processes: int, concurrency: int, hostname: str
) -> list[list[str]]:
    """The command line of each child: the parent's options, one process, its own name."""
    name, _, host = hostname.partition("@")
    share = math.ceil(concurrency / processes)
    base = [sys.executable, "-m", "aioqueue.worker", *argv, "--processes", "1", "--no-banner",
            "-c", str(share)]
    return [[*base, "-n", f"{name}.{i}@{host}" if host else f"{name}.{i}"]
            for i in range(1, processes + 1)]


async def supervise(commands: list[list[str]]) -> int:
    """Run the children until a signal stops them; returns 0 if every child exited cleanly."""
    children: dict[int, anyio.abc.Process] = {}
    codes: dict[int, int] = {}
    stopping = anyio.Event()

    async def keep(index: int, command: list[str]) -> None:
        pause = 0.5
        while not stopping.is_set():
            started = time.monotonic()
            process = await anyio.open_process(command, stdin=None, stdout=None, stderr=None)
            children[index] = process
            code = await process.wait()
            codes[index] = code
            if stopping.is_set():
                return
            pause = 0.5 if time.monotonic() - started > _STEADY else min(pause * 2, 30.0)
            logger.error(
                "Worker process %d (pid %d) exited with %s; starting another in %.1fs",
                index, process.pid, code, pause,
            )
            with anyio.move_on_after(pause):
                await stopping.wait()

    async def relay_signals(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                logger.warning("%s received: passing it on to %d worker process(es)",
                               signal.Signals(signum).name, len(children))
                stopping.set()
                for process in children.values():
                    if process.returncode is None:
                        process.send_signal(signum)

    async with anyio.create_task_group() as tg:
        await tg.start(relay_signals)
        async with anyio.create_task_group() as workers:
            for index, command in enumerate(commands, start=1):
                workers.start_soon(keep, index, command)
        tg.cancel_scope.cancel()
    return 0 if all(code == 0 for code in codes.values()) else 1
