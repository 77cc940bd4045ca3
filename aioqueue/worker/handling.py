"""The path of one message through the worker: docs/design.md, "The path of a message".

``MessageHandling`` is a base class of ``Worker``; its ``_handle`` is the coroutine of the
asyncio task the worker starts per delivery, and reads as the numbered steps there. The
worker owns the state used here (the app, the result store, the revoked ids, the handlers
running a task) and sets it up in ``Worker.__init__`` and ``Worker.run``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio

from .. import canvas, states
from ..brokers import delay
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
from ..protocol import MessageLimits, TaskMessage, decode_task
from ..task import Request, SendOptions

if TYPE_CHECKING:
    from ..app import AioQueue
    from ..brokers.base import Delivery
    from ..control import Revoked
    from ..results.base import ResultStore
    from ..task import Task

__all__ = ("MessageHandling",)

logger = logging.getLogger("aioqueue.worker")

# Headers RabbitMQ adds on dead-lettering and redelivery; a republished message starts afresh.
_BROKER_HEADERS = frozenset(
    {"x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
     "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason", "x-delivery-count"}
)


class MessageHandling:
    """The steps of handling one delivery, from decoding it to acknowledging it.

    Step 8 (the task runs) is in ``_handle`` itself; every other step is a method that returns
    before the task starts or after it ended, so a task in flight holds no frame of them.
    """

    # Set by Worker.__init__ (and the store by Worker.run).
    app: AioQueue
    hostname: str
    queues: list[str]
    accept: frozenset[str]
    limits: MessageLimits
    revoked: Revoked
    running: int  # messages being handled right now
    _idle: anyio.Event  # set when the last one ends after stop()
    _stop_requested: bool
    _thread_limiter: anyio.CapacityLimiter
    _running: dict[str, asyncio.Task[Any]]  # task id -> its handler, to terminate
    _terminating: set[str]  # ids whose handler revoke(terminate) cancelled
    _store: ResultStore | None

    async def _handle(self, delivery: Delivery, limit: asyncio.Semaphore) -> None:
        """The path of one message: docs/design.md's steps 1 to 10, in that order.

        The task runs in this coroutine's own frame (step 8): a task in flight holds only this
        frame and its own, not one per step. The ``finally`` gives back what the steps took.
        """
        permit = True  # False while an ETA is awaited without the permit
        early_ack: asyncio.Task[None] | None = None
        try:
            if (admitted := await self._admit(delivery)) is None:  # steps 1 to 5
                return  # settled already
            message, task = admitted
            del admitted  # not held for as long as the task runs
            if message.eta is not None and message.eta > datetime.now(UTC):  # step 5
                permit = False
                await self._wait_for_eta(message, message.eta, limit)
                permit = True
                if await self._withdrawn_meanwhile(delivery, message, task):  # 3 and 4 again
                    return
            acks_late = task.acks_late
            early_ack = None if acks_late else _ack_early(delivery)  # step 6
            info = _log_received(message)
            if self.app.conf.task_track_started and not self._ignored(message, task):
                await self._store_record(message, task, self._started_meta(message))  # 7
            request = self._request(delivery, message)
            limits = self._time_limits(message, task)
            started_at = time.perf_counter()
            try:
                try:
                    value = await self._start_call(task, request, message, limits)  # step 8
                except asyncio.CancelledError:
                    if not self._terminated(message.id):
                        raise  # a shutdown's: the message goes back
                    raise TaskRevokedError("terminated") from None  # fails as REVOKED
                finally:
                    self._end_call(message.id)
            except asyncio.CancelledError:
                await _requeue_cancelled(delivery, message, acks_late)
                raise
            except Reject as rejection:
                return await _rejected(delivery, message, rejection, acks_late)
            except Exception as exc:  # step 9
                await self._retry_or_fail(delivery, message, task, request, limits, exc, started_at)
            else:
                await self._succeed(message, task, value, started_at, info)
            if acks_late:  # step 10
                await delivery.ack()
        except Exception:
            await _requeue_after_error(delivery)
        finally:
            if early_ack is not None:
                await _settled(early_ack)
            self._finished(limit, permit)

    # -- steps 1 to 5: admission -----------------------------------------------------------

    async def _admit(self, delivery: Delivery) -> tuple[TaskMessage, Task[Any, Any]] | None:
        """Steps 1 to 5 but the wait for an ETA: decode and check the message. None when it
        was settled here (undecodable, unregistered, revoked, expired, parked in the broker).
        """
        envelope = delivery.envelope
        try:
            message = decode_task(envelope, self.accept, self.limits)
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

    async def _wait_for_eta(
        self, message: TaskMessage, eta: datetime, limit: asyncio.Semaphore
    ) -> None:
        """Step 5 for an ETA kept here: wait for it with the permit given back, so other
        messages run meanwhile (this one stays unacked); then take a permit again."""
        logger.info("Task %s[%s] received, ETA %s", message.task, message.id, eta)
        limit.release()
        await asyncio.sleep((eta - datetime.now(UTC)).total_seconds())
        await limit.acquire()

    async def _withdrawn_meanwhile(
        self, delivery: Delivery, message: TaskMessage, task: Task[Any, Any]
    ) -> bool:
        """Steps 3 and 4 again after the wait for an ETA: True when the task was revoked or
        expired meanwhile (then settled here)."""
        if message.id in self.revoked:
            await self._discard_revoked(delivery, message, task)
            return True
        if message.expires is not None and message.expires <= datetime.now(UTC):
            await self._discard_expired(delivery, message, task)
            return True
        return False

    # -- steps 7 and 8: the run -------------------------------------------------------------

    def _started_meta(self, message: TaskMessage) -> dict[str, Any]:
        """Step 7's record (with ``task_track_started``)."""
        started = {"pid": os.getpid(), "hostname": self.hostname}
        return make_meta(message.id, states.STARTED, started)

    def _request(self, delivery: Delivery, message: TaskMessage) -> Request:
        """What the task sees as ``self.request``."""
        return Request(
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

    def _start_call(
        self,
        task: Task[Any, Any],
        request: Request,
        message: TaskMessage,
        limits: tuple[float | None, float | None],
    ) -> Awaitable[Any]:
        """Step 8: note this handler as running the task (``revoke(terminate=True)`` cancels
        it) and return the call for ``_handle`` to await: no frame of this method is held."""
        current = asyncio.current_task()
        assert current is not None
        self._running[message.id] = current
        hard, soft = limits
        if hard is None and soft is None and task.is_coroutine:
            # The task's own coroutine, awaited right in _handle: no frame of Task.execute
            # held while it runs (see Task.start).
            return task.start(request, message.args, message.kwargs)
        return task.execute(
            request, message.args, message.kwargs, self._thread_limiter, hard, soft
        )

    def _end_call(self, task_id: str) -> None:
        """The task is no longer running here; a ``revoke(terminate=True)`` that came too
        late (the task swallowed its cancel and finished) is withdrawn."""
        self._running.pop(task_id, None)
        if task_id in self._terminating:
            self._terminated(task_id)

    def _terminated(self, task_id: str) -> bool:
        """Whether the cancellation being handled is ``revoke(terminate=True)``'s alone (then
        it is withdrawn: the task fails as REVOKED); False for shutdown's."""
        if task_id not in self._terminating:
            return False
        self._terminating.discard(task_id)
        current = asyncio.current_task()
        assert current is not None
        if current.cancelling() > 1:
            return False  # shut down as well: the message goes back
        current.uncancel()
        return True

    # -- step 9: the outcome ----------------------------------------------------------------

    async def _succeed(
        self, message: TaskMessage, task: Task[Any, Any], value: Any, started_at: float,
        info: bool,
    ) -> None:
        """Step 9 for a value: the callbacks and the next chain step are sent (their ids become
        the result's children) and SUCCESS is stored (a FAILURE if the value cannot be)."""
        runtime = time.perf_counter() - started_at
        embed = message.embed
        if embed.get("callbacks") or embed.get("errbacks") or embed.get("chain"):
            children = await self._follow_up(
                message, lambda: canvas.send_callbacks(self.app, message, value)
            )
        else:
            children = []
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
        if info:
            logger.info(
                "Task %s[%s] succeeded in %.6fs: %r", message.task, message.id, runtime,
                value, extra={"task_id": message.id, "task_name": message.task},
            )

    def _retry_or_fail(
        self,
        delivery: Delivery,
        message: TaskMessage,
        task: Task[Any, Any],
        request: Request,
        limits: tuple[float | None, float | None],
        exc: Exception,
        started_at: float,
    ) -> Coroutine[Any, Any, None]:
        """Step 9 for an exception: a ``Retry`` (raised, or made by ``autoretry_for``) sends
        the call again, anything else fails it. Returns that step for ``_handle`` to await,
        so no frame of this method is added."""
        outcome = exc if isinstance(exc, Retry) else task.retry_for(exc, request)
        if isinstance(outcome, Retry):
            return self._retry(delivery, message, task, outcome, limits)
        return self._fail(message, task, outcome, time.perf_counter() - started_at)

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

    async def _fail(
        self, message: TaskMessage, task: Task[Any, Any], exc: BaseException, runtime: float
    ) -> None:
        """Errbacks sent, FAILURE (REVOKED if terminated) stored, later chain steps failed."""
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

    def _finished(self, limit: asyncio.Semaphore, permit: bool) -> None:
        """The permit back (if held); the last message handled after ``stop()`` wakes it."""
        if permit:
            limit.release()
        self.running -= 1
        if self.running == 0 and self._stop_requested:
            self._idle.set()

    # -- results ---------------------------------------------------------------------------

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


def _ack_early(delivery: Delivery) -> asyncio.Task[None]:
    """Step 6 without ``acks_late``: the ack is sent while the task starts, not awaited first.
    The task's first step runs before the ack can leave, so a worker killed in between has at
    least started what RabbitMQ forgets. ``_handle`` awaits it in its ``finally``."""
    return asyncio.ensure_future(delivery.ack())


def _log_received(message: TaskMessage) -> bool:
    """Log the message as received; whether INFO is on, checked once per message (the
    ``extra=`` dicts are built even when the record is dropped)."""
    info = logger.isEnabledFor(logging.INFO)
    if info:
        logger.info(
            "Task %s[%s] received", message.task, message.id,
            extra={"task_id": message.id, "task_name": message.task},
        )
    return info


async def _requeue_cancelled(delivery: Delivery, message: TaskMessage, acks_late: bool) -> None:
    """Step 8 cut short by a shutdown: the message goes back (unless acked early), even while
    this task is being cancelled."""
    if acks_late:
        with anyio.CancelScope(shield=True):
            await delivery.reject(requeue=True)
    logger.warning("Task %s[%s] cancelled; message requeued", message.task, message.id)


async def _rejected(
    delivery: Delivery, message: TaskMessage, rejection: Reject, acks_late: bool
) -> None:
    """Step 9 for ``Reject``: the message is rejected (with ``acks_late``), requeued if asked,
    and nothing is stored."""
    logger.info("Task %s[%s] rejected: %s", message.task, message.id, rejection)
    if acks_late:
        await delivery.reject(requeue=rejection.requeue)


async def _requeue_after_error(delivery: Delivery) -> None:
    """Never let one message stop the worker: an unexpected error sends it back to the queue
    (logged with the error being handled)."""
    logger.exception("Unexpected error while handling a message; requeued")
    with anyio.CancelScope(shield=True):
        await delivery.reject(requeue=True)


async def _settled(ack: asyncio.Task[None]) -> None:
    """Wait for an early ack started by ``_handle``, even while being cancelled; its
    failure is logged (the message may then be delivered again)."""
    if not ack.done():
        with anyio.CancelScope(shield=True):
            await asyncio.wait([ack])
    if not ack.cancelled() and (exc := ack.exception()) is not None:
        logger.error("acknowledging a message failed: %s", exc)
