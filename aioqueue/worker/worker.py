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
import dataclasses
import logging
import os
import socket
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio

from .. import canvas, routing, states
from ..brokers import delay
from ..control import ControlListener, Revoked
from ..exceptions import (
    AioQueueError,
    NotRegistered,
    Reject,
    ResultStoreError,
    Retry,
    SerializationError,
    TaskRevokedError,
)
from ..meta import exception_to_dict, make_meta
from ..protocol import TaskMessage, decode_task
from ..serialization import accepted_types
from ..task import Request, SendOptions

if TYPE_CHECKING:
    from ..app import AioQueue
    from ..brokers.base import Delivery
    from ..results.base import ResultStore
    from ..task import Task

__all__ = ("Worker", "default_hostname")

logger = logging.getLogger("aioqueue.worker")

# Headers RabbitMQ adds on dead-lettering and redelivery; a republished message starts afresh.
_BROKER_HEADERS = frozenset(
    {"x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
     "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason", "x-delivery-count"}
)


def default_hostname() -> str:
    return f"aioqueue@{socket.gethostname()}"


class Worker:
    """Runs an app's tasks. ``await worker.run()`` until ``worker.stop()`` is called."""

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

    # -- one message ---------------------------------------------------------------------

    async def _handle(self, delivery: Delivery, limit: asyncio.Semaphore) -> None:
        """The whole path of one message (docs/design.md, steps 1 to 10).

        While the task runs, only this coroutine's frame and the task's own are held (not
        one per step): a thousand tasks in flight hold a thousand of each.
        """
        permit = True  # False while an ETA is awaited without the permit
        early_ack: asyncio.Task[None] | None = None
        try:
            admitted = await self._admit(delivery)
            if admitted is None:
                return  # settled already
            message, task = admitted
            del admitted  # not held for as long as the task runs
            if message.eta is not None and message.eta > datetime.now(UTC):
                # Wait for the ETA without the permit (the message stays unacked).
                logger.info("Task %s[%s] received, ETA %s", message.task, message.id,
                            message.eta)
                permit = False
                limit.release()
                await asyncio.sleep((message.eta - datetime.now(UTC)).total_seconds())
                await limit.acquire()
                permit = True
                if message.id in self.revoked:
                    await self._discard_revoked(delivery, message, task)
                    return
                if message.expires is not None and message.expires <= datetime.now(UTC):
                    await self._discard_expired(delivery, message, task)
                    return
            acks_late = task.acks_late
            if not acks_late:
                # Sent while the task starts, not awaited first: the task's first step runs
                # before the ack can leave, so a worker killed in between has at least
                # started what RabbitMQ forgets (awaited in the finally below).
                early_ack = asyncio.ensure_future(delivery.ack())
            # Checked once: the extra= dicts are built even when the record is dropped.
            info = logger.isEnabledFor(logging.INFO)
            if info:
                logger.info(
                    "Task %s[%s] received", message.task, message.id,
                    extra={"task_id": message.id, "task_name": message.task},
                )
            if self.app.conf.task_track_started and not self._ignored(message, task):
                started = {"pid": os.getpid(), "hostname": self.hostname}
                await self._store_record(
                    message, task, make_meta(message.id, states.STARTED, started)
                )
            request = Request(
                id=message.id,
                task=message.task,
                args=message.args,
                kwargs=message.kwargs,
                retries=message.retries,
                eta=message.eta,
                expires=message.expires,
                root_id=message.root_id,
                parent_id=message.parent_id,
                group=message.group,
                reply_to=message.reply_to,
                correlation_id=message.correlation_id,
                delivery_info={
                    "routing_key": delivery.routing_key, "priority": message.priority
                },
                hostname=self.hostname,
                headers=message.headers,
            )
            hard, soft = self._time_limits(message, task)
            started_at = time.perf_counter()
            current = asyncio.current_task()
            assert current is not None
            task_id = message.id
            running = self._running
            running[task_id] = current  # revoke(terminate=True) cancels it
            try:
                try:
                    if hard is None and soft is None and task.is_coroutine:
                        # The task's own coroutine, awaited right here: no frame of
                        # Task.execute held while it runs (see Task.start).
                        value = await task.start(request, message.args, message.kwargs)
                    else:
                        value = await task.execute(
                            request, message.args, message.kwargs, self._thread_limiter, hard,
                            soft,
                        )
                except asyncio.CancelledError:
                    if not self._terminated(task_id, current):
                        raise
                    raise TaskRevokedError("terminated") from None
                finally:
                    running.pop(task_id, None)
                    if task_id in self._terminating:  # terminated, but the task swallowed it
                        self._terminated(task_id, current)
            except asyncio.CancelledError:
                if acks_late:
                    with anyio.CancelScope(shield=True):
                        await delivery.reject(requeue=True)
                logger.warning("Task %s[%s] cancelled; message requeued",
                               message.task, message.id)
                raise
            except Reject as rejection:
                logger.info("Task %s[%s] rejected: %s", message.task, message.id, rejection)
                if acks_late:
                    await delivery.reject(requeue=rejection.requeue)
                return
            except Exception as exc:
                outcome = exc if isinstance(exc, Retry) else task.retry_for(exc, request)
                if isinstance(outcome, Retry):
                    await self._retry(delivery, message, task, outcome, (hard, soft))
                else:
                    await self._fail(message, task, outcome, time.perf_counter() - started_at)
            else:
                runtime = time.perf_counter() - started_at
                embed = message.embed
                if embed.get("callbacks") or embed.get("errbacks") or embed.get("chain"):
                    children = await self._follow_up(
                        message, lambda: canvas.send_callbacks(self.app, message, value)
                    )
                else:
                    children = []
                await self._store_success(message, task, value, children)
                if info:
                    logger.info(
                        "Task %s[%s] succeeded in %.6fs: %r", message.task, message.id, runtime,
                        value, extra={"task_id": message.id, "task_name": message.task},
                    )
            if acks_late:
                await delivery.ack()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never let one message stop the worker; the message goes back to the queue.
            logger.exception("Unexpected error while handling a message; requeued")
            with anyio.CancelScope(shield=True):
                await delivery.reject(requeue=True)
        finally:
            if early_ack is not None:
                await _settled(early_ack)
            if permit:
                limit.release()
            self.running -= 1
            if self.running == 0 and self._stop_requested:
                self._idle.set()

    async def _admit(self, delivery: Delivery) -> tuple[TaskMessage, Task[Any, Any]] | None:
        """Steps 1 to 5 but the wait for an ETA: decode and check the message. None when it
        was settled here (undecodable, unregistered, revoked, expired, parked in the broker).
        """
        envelope = delivery.envelope
        try:
            message = decode_task(envelope, self.accept)
        except AioQueueError as exc:
            headers = envelope.headers
            task_id = headers.get("id") if isinstance(headers, dict) else None
            logger.error(
                "Rejecting message %s: %s", task_id or "(no id)", exc,
                extra={"task_id": task_id},
            )
            await delivery.reject(requeue=False)
            return None
        task = self.app.tasks.get(message.task)
        if task is None:
            logger.error(
                "Received unregistered task of type %r (id %s); rejected",
                message.task, message.id, extra={"task_id": message.id},
            )
            await self._store_exception(message, None, states.FAILURE, NotRegistered(message.task))
            await delivery.reject(requeue=False)
            return None
        if message.id in self.revoked:
            await self._discard_revoked(delivery, message, task)
            return None
        if message.expires is not None or message.eta is not None:  # else no clock read
            now = datetime.now(UTC)
            if message.expires is not None and message.expires <= now:
                logger.info("Task %s[%s] expired; discarded", message.task, message.id)
                await self._discard_expired(delivery, message, task)
                return None
            if (message.eta is not None and message.eta > now
                    and await self._delay_in_broker(delivery, message, now)):
                return None
        return message, task

    async def _discard_revoked(
        self, delivery: Delivery, message: TaskMessage, task: Task[Any, Any]
    ) -> None:
        logger.info("Task %s[%s] revoked; discarded", message.task, message.id)
        await self._store_exception(message, task, states.REVOKED, TaskRevokedError("revoked"))
        await delivery.ack()

    async def _discard_expired(
        self, delivery: Delivery, message: TaskMessage, task: Task[Any, Any]
    ) -> None:
        expired = TaskRevokedError("expired")
        await self._store_exception(message, task, states.REVOKED, expired)
        await delivery.ack()

    async def _delay_in_broker(
        self, delivery: Delivery, message: TaskMessage, now: datetime
    ) -> bool:
        """A task due far in the future goes back to the broker's delay queues instead of
        waiting here, unacknowledged, in worker memory (a stock client sends such tasks
        straight to the work queue). Published before the ack: at worst it runs twice."""
        wait = delay.broker_delay(self.app.conf, message.eta, now)
        if wait is None or delivery.routing_key not in self.queues:
            return False
        envelope = delivery.envelope
        headers = {k: v for k, v in envelope.headers.items() if k not in _BROKER_HEADERS}
        again = dataclasses.replace(envelope, headers=headers, expiration=None)
        broker = await self.app.get_broker()
        if not await broker.publish_delayed(again, queue=delivery.routing_key, delay=wait):
            return False
        logger.info("Task %s[%s] due at %s: parked in the broker", message.task, message.id,
                    message.eta)
        await delivery.ack()
        return True

    def _terminated(self, task_id: str, current: asyncio.Task[Any]) -> bool:
        """Whether the cancellation being handled is ``revoke(terminate=True)``'s alone (then
        it is withdrawn: the task fails as REVOKED); False for shutdown's."""
        if task_id not in self._terminating:
            return False
        self._terminating.discard(task_id)
        if current.cancelling() > 1:
            return False  # shut down as well: the message goes back
        current.uncancel()
        return True

    def _time_limits(
        self, message: TaskMessage, task: Task[Any, Any]
    ) -> tuple[float | None, float | None]:
        """(hard, soft): the message's, else the task's, else the app's settings."""
        conf = self.app.conf
        hard, soft = message.timelimit
        if hard is None:
            hard = task.time_limit if task.time_limit is not None else conf.task_time_limit
        if soft is None:
            soft = (
                task.soft_time_limit if task.soft_time_limit is not None
                else conf.task_soft_time_limit
            )
        return hard, soft

    async def _fail(
        self, message: TaskMessage, task: Task[Any, Any], exc: BaseException, runtime: float
    ) -> None:
        revoked = isinstance(exc, TaskRevokedError)
        if revoked:
            logger.warning("Task %s[%s] %s", message.task, message.id, exc)
        else:
            logger.error(
                "Task %s[%s] raised unexpected: %r (after %.6fs)",
                message.task, message.id, exc, runtime, exc_info=exc,
                extra={"task_id": message.id, "task_name": message.task},
            )
        children = await self._follow_up(
            message, lambda: canvas.send_errbacks(self.app, message)
        )
        status = states.REVOKED if revoked else states.FAILURE
        await self._store_exception(message, task, status, exc, children)
        for step_id in canvas.chain_ids(message):  # later chain steps will never run
            await self._store_record(message, task, make_meta(
                step_id, states.FAILURE, exception_to_dict(exc), parent_id=message.id
            ), task_id=step_id)

    async def _retry(
        self,
        delivery: Delivery,
        message: TaskMessage,
        task: Task[Any, Any],
        retry: Retry,
        limits: tuple[float | None, float | None],
    ) -> None:
        """Send the call again (same id, retries + 1, later), as Celery does; store RETRY."""
        options: SendOptions = {
            "task_id": message.id,
            "retries": message.retries + 1,
            "parent_id": message.id,
            "root_id": message.root_id or message.id,
            "queue": delivery.routing_key,  # back to where it came from
            "priority": message.priority,
            "expires": message.expires,
            "time_limit": limits[0],
            "soft_time_limit": limits[1],
        }
        if isinstance(retry.when, datetime):
            options["eta"] = retry.when
        else:
            options["countdown"] = retry.when or 0
        options.update(retry.options)  # type: ignore[typeddict-item]
        await self.app.dispatch(
            message.task, message.args, message.kwargs, options,
            embed=message.embed, group=message.group, group_index=message.group_index,
            reply_to=message.reply_to,
        )
        logger.info("Task %s[%s] retry: %s", message.task, message.id, retry)
        reason = retry.exc if retry.exc is not None else retry
        tb = "".join(traceback.format_exception(reason)) if reason.__traceback__ else None
        await self._store_record(message, task, make_meta(
            message.id, states.RETRY, exception_to_dict(reason), traceback=tb,
            children=[canvas.child(message.id)], parent_id=message.parent_id,
        ))

    def revoke(self, task_ids: Sequence[str], terminate: bool = False) -> None:
        """Skip these tasks when their messages arrive; cancel them where they run if asked."""
        self.revoked.update(task_ids)
        if terminate:
            for task_id in task_ids:
                handler = self._running.get(task_id)
                if handler is not None and task_id not in self._terminating:
                    logger.warning("Terminating task %s (revoked)", task_id)
                    self._terminating.add(task_id)
                    handler.cancel()  # _execute tells this cancel from a shutdown's

    # -- results -------------------------------------------------------------------------

    def _ignored(self, message: TaskMessage, task: Task[Any, Any] | None) -> bool:
        if message.ignore_result is not None:
            return message.ignore_result
        return task.ignore_result if task is not None else self.app.conf.task_ignore_result

    async def _follow_up(
        self, message: TaskMessage, send: Callable[[], Awaitable[list[Any]]]
    ) -> list[Any]:
        """Send a task's callbacks or errbacks; a failure there is logged, not the task's."""
        embed = message.embed
        if not (embed.get("callbacks") or embed.get("errbacks") or embed.get("chain")):
            return []
        try:
            return await send()
        except (AioQueueError, OSError) as exc:
            logger.error("Task %s[%s]: could not send its follow-up tasks: %s",
                         message.task, message.id, exc, extra={"task_id": message.id})
            return []

    async def _store_record(
        self,
        message: TaskMessage,
        task: Task[Any, Any] | None,
        meta: dict[str, Any],
        task_id: str | None = None,
    ) -> None:
        if self._store is None or self._ignored(message, task):
            return
        # The task has run: while the store is unreachable, keep the result in hand (and the
        # message unacknowledged, and this permit) rather than requeue and run it again.
        delay = 0.1
        while True:
            try:
                await self._store.store(task_id or message.id, meta, reply_to=message.reply_to)
                return
            except ResultStoreError as exc:
                logger.warning(
                    "Cannot store the result of %s[%s] (%s); trying again in %.1fs",
                    message.task, message.id, exc, delay, extra={"task_id": message.id},
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _store_success(
        self, message: TaskMessage, task: Task[Any, Any], value: Any, children: list[Any]
    ) -> None:
        meta = make_meta(
            message.id, states.SUCCESS, value, children=children, parent_id=message.parent_id
        )
        try:
            await self._store_record(message, task, meta)
        except SerializationError as exc:
            logger.error(
                "Task %s[%s] returned a value that cannot be stored: %s",
                message.task, message.id, exc,
            )
            await self._store_exception(
                message, task, states.FAILURE,
                SerializationError(f"result of {message.task} cannot be serialized: {exc}"),
            )

    async def _store_exception(
        self,
        message: TaskMessage,
        task: Task[Any, Any] | None,
        status: str,
        exc: BaseException,
        children: list[Any] | None = None,
    ) -> None:
        tb = "".join(traceback.format_exception(exc)) if exc.__traceback__ else None
        meta = make_meta(
            message.id, status, exception_to_dict(exc), traceback=tb, children=children,
            parent_id=message.parent_id,
        )
        await self._store_record(message, task, meta)


async def _settled(ack: asyncio.Task[None]) -> None:
    """Wait for an early ack started by ``_handle``, even while being cancelled; its
    failure is logged (the message may then be delivered again)."""
    if not ack.done():
        with anyio.CancelScope(shield=True):
            await asyncio.wait([ack])
    if not ack.cancelled() and (exc := ack.exception()) is not None:
        logger.error("acknowledging a message failed: %s", exc)

