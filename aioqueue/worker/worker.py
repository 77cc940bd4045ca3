"""The worker: consume, run coroutine tasks concurrently under a semaphore, store, acknowledge.

One semaphore of ``concurrency`` permits is acquired before the next delivery is taken and
released in one ``finally``. Each message is handled in a plain asyncio task (an anyio
task-group child costs about 4 KiB more per message in flight), owned by ``run()``, which
cancels and awaits whatever is left on its way out; ``revoke(terminate=True)`` cancels one of
them and the handler tells that cancel from a shutdown's. Plain ``def`` tasks run in worker
threads, never on the loop. With late acknowledgement (the default) a message is
acknowledged only after its result is stored, so a worker that dies loses nothing. On
shutdown the worker stops consuming (the broker gets prefetched messages back), lets running
tasks finish within ``worker_shutdown_timeout``, then cancels the rest and returns their
messages to the queue.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from .. import routing
from ..control import ControlListener, Revoked
from ..protocol import MessageLimits
from ..serialization import accepted_types
from .handling import MessageHandling

if TYPE_CHECKING:
    from ..app import AioQueue
    from ..brokers.base import Delivery
    from ..results.base import ResultStore

__all__ = ("Worker", "default_hostname")

logger = logging.getLogger("aioqueue.worker")


def default_hostname() -> str:
    return f"aioqueue@{socket.gethostname()}"


class Worker(MessageHandling):
    """Runs an app's tasks. ``await worker.run()`` until ``worker.stop()`` is called.

    The path of each message is ``MessageHandling._handle`` (``handling.py``).
    """

    def __init__(
        self,
        app: AioQueue,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
        prefetch_multiplier: int | None = None,
        hostname: str | None = None,
        shutdown_timeout: float | None = None,
    ) -> None:
        conf = app.conf
        self.app = app
        # As Celery: -Q if given, else every queue in task_queues, else the default queue.
        self.queues = list(
            queues or [q.name for q in conf.task_queues or ()] or [conf.task_default_queue]
        )
        self.concurrency = concurrency or conf.worker_concurrency
        self.prefetch_multiplier = prefetch_multiplier or conf.worker_prefetch_multiplier
        self.hostname = hostname or default_hostname()
        self.shutdown_timeout = (
            shutdown_timeout if shutdown_timeout is not None else conf.worker_shutdown_timeout
        )
        self.accept = accepted_types(conf.accept_content)
        self.limits = MessageLimits.from_conf(conf)
        self.started = anyio.Event()
        self.running = 0  # tasks being handled right now
        self._started = 0  # deliveries handed to a handler, ever
        self._idle = anyio.Event()
        self._stop_requested = False
        self._consume_scope: anyio.CancelScope | None = None
        self._tasks_scope: anyio.CancelScope | None = None
        self._thread_limiter = anyio.CapacityLimiter(self.concurrency)
        self.revoked = Revoked()  # ids to skip, from remote-control revoke commands
        self._running: dict[str, asyncio.Task[Any]] = {}  # task id -> its handler, to terminate
        self._terminating: set[str] = set()  # ids whose handler revoke(terminate) cancelled
        self._handlers: set[asyncio.Task[None]] = set()  # one per message being handled
        self._shutdown_cancelled: set[asyncio.Task[None]] = set()  # cancelled by stopping
        self._store: ResultStore | None = None

    @property
    def prefetch(self) -> int:
        return self.concurrency * self.prefetch_multiplier

    # -- lifecycle -----------------------------------------------------------------------

    def stop(self, *, immediate: bool = False) -> None:
        """Stop consuming; running tasks get ``shutdown_timeout`` to finish (none if immediate)."""
        self._stop_requested = True
        if self._consume_scope is not None:
            self._consume_scope.cancel()
        if immediate:
            if self._tasks_scope is not None:
                self._tasks_scope.cancel()
            self._cancel_now()

    async def run(self) -> None:
        """Consume until ``stop()``; returns after running tasks finished or were requeued."""
        broker = await self.app.get_broker()
        self._store = await self.app.get_result_store()
        for name in self.queues:
            for spec in routing.declarations(self.app.conf, name):  # its dead-letter queue too
                await broker.declare(spec)
        # asyncio's semaphore, not anyio's: acquiring a free permit does not yield to the
        # loop (anyio's always checkpoints), so the loop hands out buffered deliveries at once.
        limit = asyncio.Semaphore(self.concurrency)
        loop = asyncio.get_running_loop()
        handlers = self._handlers
        discard = handlers.discard
        context = contextvars.Context()
        # Handlers start in a copy of this task's context, wherever start() is called from.
        base_context = contextvars.copy_context()

        def start(delivery: Delivery) -> None:
            """Handle ``delivery`` with the permit the loop below acquired for it."""
            self._started += 1
            self.running += 1
            # One plain asyncio task per message, owned here (this method cancels and
            # awaits whatever is left): anyio's start_soon costs several objects per task
            # (~4 KiB with 1,000 in flight).
            handler = loop.create_task(self._handle(delivery, limit),
                                       context=base_context.copy())
            handlers.add(handler)
            # Bound once, with a context of its own: no allocation per task.
            handler.add_done_callback(discard, context=context)
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks_scope = tasks.cancel_scope
                # Remote control first, so a revoke sent while we start is not missed.
                await tasks.start(ControlListener(self.app, self.hostname, self.revoke).run)
                consumer = broker.consume(self.queues, prefetch=self.prefetch)
                await consumer.start()
                try:
                    with anyio.CancelScope() as self._consume_scope:
                        if self._stop_requested:
                            self._consume_scope.cancel()
                        self.started.set()
                        while True:
                            await limit.acquire()
                            started = self._started
                            try:
                                # start() may run before this returns, from the code that
                                # read the delivery (a loop iteration sooner).
                                await consumer.receive_into(start)
                            except BaseException:
                                if self._started == started:  # the permit was not handed on
                                    limit.release()
                                raise
                finally:
                    with anyio.CancelScope(shield=True):
                        await consumer.stop()
                if self.running:
                    logger.info("Waiting up to %ss for %d running task(s)",
                                self.shutdown_timeout, self.running)
                    with anyio.move_on_after(self.shutdown_timeout):
                        await self._idle.wait()
                if self.running:
                    logger.warning("Cancelling %d task(s); their messages go back", self.running)
                tasks.cancel_scope.cancel()
        finally:
            await self._cancel_handlers()

    async def _cancel_handlers(self) -> None:
        """Cancel the handlers still running (each requeues its message) and wait for them,
        even if this task is cancelled meanwhile (then that is raised afterwards)."""
        self._cancel_now()
        cancelled = False
        handlers = self._handlers
        with anyio.CancelScope(shield=True):  # anyio re-delivers its cancels: wait them out
            while handlers:
                try:
                    await asyncio.wait(list(handlers))
                except asyncio.CancelledError:  # a plain Task.cancel() of ours
                    cancelled = True
        # A handler cancelled before its first step never ran its finally.
        self.running = 0
        self._shutdown_cancelled.clear()
        if cancelled:
            raise asyncio.CancelledError

    def _cancel_now(self) -> None:
        done = self._shutdown_cancelled
        for handler in self._handlers:
            # Once each: a second cancel would interrupt the requeue of the first.
            if handler not in done:
                done.add(handler)
                handler.cancel()

    # -- remote control ------------------------------------------------------------------

    def revoke(self, task_ids: Sequence[str], terminate: bool = False) -> None:
        """Skip these tasks when their messages arrive; cancel them where they run if asked."""
        self.revoked.update(task_ids)
        if terminate:
            for task_id in task_ids:
                handler = self._running.get(task_id)
                if handler is not None and task_id not in self._terminating:
                    logger.warning("Terminating task %s (revoked)", task_id)
                    self._terminating.add(task_id)
                    handler.cancel()  # _handle tells this cancel from a shutdown's
