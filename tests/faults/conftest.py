"""Fault-injection fixtures: a task module, real worker processes, ledgers, queue counters.

Every scenario works on a fresh project in ``tmp_path``: ``proj.py`` (below) with its own
uuid-named queue and Redis key prefix (database 12 by default), so nothing shared is seen or
flushed; the fixture's teardown kills any worker it started (by PID), deletes its queues and
deletes the Redis keys under its own prefix.

Tasks keep two ledgers, files opened in append mode with one line per call: ``runs`` gets
the task's argument when an execution starts, ``done`` when the task body has finished. A
task that ran twice has two lines in ``runs``; a task that never ran has none.

The tests wait for other processes by polling their state (``eventually``), never with
fixed sleeps, and never block the event loop (a test's proxy runs on it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import pytest
from redis.asyncio import Redis

from aioqueue import AioQueue, AsyncResult, Queue

from ..integration.conftest import delete_queues, eventually

TASKS = textwrap.dedent(
    """
    import os

    import anyio

    from aioqueue import AioQueue, Queue

    env = os.environ
    app = AioQueue(
        "proj",
        broker=env["T_BROKER"],
        backend=env["T_BACKEND"],
        task_default_queue=env["T_QUEUE"],
        result_expires=3600,  # keys expire even if a teardown never runs
        result_backend_transport_options={"global_keyprefix": env["T_PREFIX"]},
    )
    if env.get("T_DLQ"):
        app.conf.task_queues = [Queue(env["T_QUEUE"], queue_arguments={
            "x-dead-letter-exchange": "", "x-dead-letter-routing-key": env["T_DLQ"],
        })]
    if env.get("T_DELIVERY_LIMIT"):
        app.conf.update(
            task_default_queue_type="quorum",
            task_queue_delivery_limit=int(env["T_DELIVERY_LIMIT"]),
            task_dead_letter_queue=env["T_DEAD"],
        )


    def record(path: str, n: int) -> None:
        with open(path, "a") as ledger:  # one line per call; O_APPEND keeps lines whole
            ledger.write(f"{n}\\n")


    @app.task
    async def work(n: int, delay: float) -> int:
        record(env["T_RUNS"], n)
        await anyio.sleep(delay)
        record(env["T_DONE"], n)
        return n


    @app.task(acks_late=False)
    async def early(n: int, delay: float) -> int:
        \"\"\"``work`` with early acknowledgement: the message is acked before it runs.\"\"\"
        record(env["T_RUNS"], n)
        await anyio.sleep(delay)
        record(env["T_DONE"], n)
        return n


    @app.task
    async def hold(n: int) -> int:
        \"\"\"While the file T_HOLD exists, takes a minute (longer than any shutdown timeout).\"\"\"
        record(env["T_RUNS"], n)
        if os.path.exists(env["T_HOLD"]):
            await anyio.sleep(60)
        record(env["T_DONE"], n)
        return n


    @app.task
    async def crash(n: int) -> int:
        \"\"\"Kills the worker process that runs it, every time.\"\"\"
        record(env["T_RUNS"], n)
        os._exit(1)
    """
)

# -- figures: what each scenario measured, printed at the end of the run ---------------------

_FIGURES: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A dict a scenario fills with its counts and times; shown under "fault figures"."""
    data: dict[str, Any] = {}
    _FIGURES.append((request.node.nodeid, data))
    return data


def pytest_terminal_summary(terminalreporter: Any) -> None:
    shown = [(nodeid, data) for nodeid, data in _FIGURES if data]
    if not shown:
        return
    terminalreporter.section("fault figures")
    for nodeid, data in shown:
        text = ", ".join(
            f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}"
            for key, value in data.items()
        )
        terminalreporter.write_line(f"{nodeid.rsplit('::', 1)[-1]}: {text}")


# -- waiting ---------------------------------------------------------------------------------


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]], timeout: float, what: str,
    *workers: WorkerProcess,
) -> float:
    """``eventually(check)``, failing with ``what`` and the workers' logs; returns seconds."""
    started = time.monotonic()
    try:
        await eventually(check, timeout=timeout)
    except TimeoutError:
        logs = "\n".join(f"--- {w.describe()}:\n{w.tail()}" for w in workers)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}") from None
    return time.monotonic() - started


# -- worker processes ------------------------------------------------------------------------


class WorkerProcess:
    """A ``python -m aioqueue.worker`` process this test started, its output in a file."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log
        self._read = bytearray()  # the log so far: polled often, so read incrementally

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def describe(self) -> str:
        state = "running" if self.alive else f"exited {self.proc.returncode}"
        return f"worker pid {self.proc.pid} ({state})"

    def _bytes(self) -> bytearray:
        with self.log.open("rb") as handle:
            handle.seek(len(self._read))
            self._read += handle.read()
        return self._read

    def output(self) -> str:
        return self._bytes().decode(errors="replace")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def count(self, text: str) -> int:
        return self._bytes().count(text.encode())

    def send(self, signum: signal.Signals) -> None:
        if self.alive:
            self.proc.send_signal(signum)  # by PID: only ever our own child

    async def exited(self, timeout: float) -> int:
        """Wait (without blocking the loop) for the process to end; its exit code."""
        await wait_until(lambda: not self.alive, timeout, "the worker to exit", self)
        return self.proc.wait()


class Project:
    """A task module in a temporary directory, its queue, ledgers and worker processes."""

    def __init__(
        self, root: Path, amqp_url: str, redis_url: str, unique: str, *, dlq: bool = False,
        delivery_limit: int | None = None,
    ) -> None:
        """``dlq``: the queue dead-letters to ``self.dlq`` (task_queues with x-dead-letter-*);
        ``delivery_limit``: the queue is a quorum queue with that limit and
        ``task_dead_letter_queue = self.dlq``."""
        self.root = root
        self.amqp_url = amqp_url
        self.redis_url = redis_url
        self.queue = unique
        self.dlq = f"{unique}-dead" if dlq or delivery_limit else None
        self.delivery_limit = delivery_limit
        self.prefix = f"{unique}-"
        self.runs = root / "runs.txt"
        self.done = root / "done.txt"
        self.hold = root / "hold"
        self.workers: list[WorkerProcess] = []
        (root / "proj.py").write_text(TASKS)
        self.env = {
            **os.environ,
            "PYTHONPATH": str(root),
            "T_BROKER": amqp_url,
            "T_BACKEND": redis_url,
            "T_QUEUE": self.queue,
            "T_PREFIX": self.prefix,
            "T_RUNS": str(self.runs),
            "T_DONE": str(self.done),
            "T_HOLD": str(self.hold),
            "T_DLQ": self.dlq if dlq else "",
            "T_DELIVERY_LIMIT": str(delivery_limit or ""),
            "T_DEAD": self.dlq or "",
        }

    # the worker side

    def start_worker(
        self, *args: str, broker: str | None = None, backend: str | None = None
    ) -> WorkerProcess:
        env = {**self.env, "T_BROKER": broker or self.amqp_url,
               "T_BACKEND": backend or self.redis_url}
        number = len(self.workers) + 1
        log = self.root / f"worker-{number}.log"
        # A node name of its own: its remote-control queue (<name>.celery.pidbox) is then
        # its own too, not shared with other workers on this host.
        name = f"{self.queue}-{number}@%h"
        with log.open("wb") as handle:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", "aioqueue.worker", "-A", "proj", "--loglevel=INFO",
                 "-n", name, *args],
                cwd=self.root, env=env, stdout=handle, stderr=subprocess.STDOUT,
            )
        worker = WorkerProcess(proc, log)
        self.workers.append(worker)
        return worker

    def kill_workers(self) -> None:
        for worker in self.workers:
            if worker.alive:
                worker.proc.kill()
            worker.proc.wait(timeout=30)

    # the client side

    def queues(self) -> list[Queue]:
        if self.dlq is None or self.delivery_limit:
            return []
        return [
            Queue(self.queue, queue_arguments={
                "x-dead-letter-exchange": "", "x-dead-letter-routing-key": self.dlq,
            }),
            Queue(self.dlq, exchange=""),
        ]

    def client(self) -> AioQueue:
        """An app for the test itself, straight to RabbitMQ and Redis (no proxy)."""
        app = AioQueue(
            "proj", broker=self.amqp_url, backend=self.redis_url,
            task_default_queue=self.queue, result_expires=3600,
            result_backend_transport_options={"global_keyprefix": self.prefix},
            task_queues=self.queues() or None,
        )
        if self.delivery_limit:
            app.conf.update(
                task_default_queue_type="quorum", task_queue_delivery_limit=self.delivery_limit,
                task_dead_letter_queue=self.dlq,
            )
        return app

    # ledgers

    def executions(self) -> Counter[int]:
        """How many times each task started (one line per execution)."""
        return _ledger(self.runs)

    def completions(self) -> Counter[int]:
        return _ledger(self.done)

    async def wait_done(self, count: int, worker: WorkerProcess, timeout: float = 30) -> None:
        def progressed() -> bool:
            if not worker.alive:
                raise AssertionError(f"{worker.describe()}:\n{worker.tail()}")
            return sum(self.completions().values()) >= count

        await wait_until(progressed, timeout, f"{count} tasks done", worker)

    # RabbitMQ's view

    async def ready(self, name: str | None = None) -> int:
        """Messages ready in a queue (passive declare)."""
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(name or self.queue, passive=True)
            count = declared.declaration_result.message_count
        return count or 0

    async def nothing_unacked(self) -> bool:
        """Whether RabbitMQ counts no unacknowledged message in the queue (True if unknown)."""
        counts = await ready_and_unacked(self.queue)
        return counts is None or counts[1] == 0

    async def cleanup(self) -> None:
        await delete_queues(self.amqp_url, [self.queue, *([self.dlq] if self.dlq else [])])
        redis = Redis.from_url(self.redis_url)
        async with redis:
            keys = [key async for key in redis.scan_iter(match=f"{self.prefix}*", count=1000)]
            if keys:
                await redis.delete(*keys)


def _ledger(path: Path) -> Counter[int]:
    if not path.exists():
        return Counter()
    # A line being written may be cut short; only whole lines count.
    text = path.read_text()
    lines = text.split("\n")[:-1]
    return Counter(int(line) for line in lines)


RABBITMQCTL = shutil.which("rabbitmqctl")


async def ready_and_unacked(queue: str) -> tuple[int, int] | None:
    """``messages_ready`` and ``messages_unacknowledged`` from rabbitmqctl; None if we cannot.

    Only the server knows how many messages are delivered but unacknowledged (a passive
    declare counts the ready ones only), so this asks ``rabbitmqctl list_queues``.
    """
    if RABBITMQCTL is None:
        return None
    with anyio.fail_after(30):
        result = await anyio.run_process(
            [RABBITMQCTL, "-q", "list_queues", "--no-table-headers",
             "name", "messages_ready", "messages_unacknowledged"],
            check=False,
        )
    if result.returncode != 0:
        return None
    for line in result.stdout.decode().splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"queue {queue!r} not listed by rabbitmqctl")


async def assert_queue_settled(project: Project, worker: WorkerProcess) -> bool:
    """Wait until the work queue holds nothing ready and nothing unacknowledged (while the
    worker is still connected: a message whose ack was lost stays unacknowledged).
    Returns False when rabbitmqctl is not usable here (then only the ready count is checked
    after the worker exits, when anything it still held would be back in the queue)."""
    counts: list[tuple[int, int] | None] = []

    async def settled() -> bool:
        counts.append(await ready_and_unacked(project.queue))
        return counts[-1] is None or counts[-1] == (0, 0)

    await wait_until(settled, 20, f"0 ready / 0 unacked (last: {counts[-1:]})", worker)
    return counts[-1] is not None


# -- sending and collecting ------------------------------------------------------------------


async def send_all(
    app: AioQueue, calls: Sequence[tuple[str, list[Any]]], parallel: int = 32
) -> list[AsyncResult[Any]]:
    """Send every ``(task name, args)``, ``parallel`` at a time; their results, in order."""
    results: list[AsyncResult[Any] | None] = [None] * len(calls)
    limit = anyio.Semaphore(parallel)

    async def send(i: int, name: str, args: list[Any]) -> None:
        async with limit:
            results[i] = await app.send_task(name, args)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i, (name, args) in enumerate(calls):
                tg.start_soon(send, i, name, args)
    return [r for r in results if r is not None]


async def get_all(
    results: Sequence[AsyncResult[Any]], timeout: float, *, propagate: bool = True
) -> list[Any]:
    """``await r.get()`` for every result at once, all within ``timeout`` seconds."""
    values: list[Any] = [None] * len(results)

    async def get(i: int, result: AsyncResult[Any]) -> None:
        values[i] = await result.get(timeout=timeout, propagate=propagate)

    with anyio.fail_after(timeout + 5):
        async with anyio.create_task_group() as tg:
            for i, result in enumerate(results):
                tg.start_soon(get, i, result)
    return values


# -- fixtures --------------------------------------------------------------------------------


def make_project(
    tmp_path: Path, amqp_url: str, redis_url: str, unique: str, *, dlq: bool = False,
    delivery_limit: int | None = None,
) -> Iterator[Project]:
    project = Project(
        tmp_path, amqp_url, redis_url, unique, dlq=dlq, delivery_limit=delivery_limit
    )
    try:
        yield project
    finally:
        project.kill_workers()
        anyio.run(project.cleanup)


@pytest.fixture
def project(tmp_path: Path, amqp_url: str, redis_url: str, unique: str) -> Iterator[Project]:
    yield from make_project(tmp_path, amqp_url, redis_url, unique, dlq=False)


@pytest.fixture
def dlq_project(
    tmp_path: Path, amqp_url: str, redis_url: str, unique: str
) -> Iterator[Project]:
    """A project whose queue dead-letters to ``<queue>-dead`` (``project.dlq``)."""
    yield from make_project(tmp_path, amqp_url, redis_url, unique, dlq=True)
