"""Celery's ``rpc://`` result backend: results travel back as messages over the app's broker.

Wire format (reference/celery-protocol.md §5): every client has a reply queue named by its
``reply_to`` id (the "oid"), declared durable, auto-delete, with ``x-expires`` =
``result_expires`` in ms, on the default exchange. The client puts that id in every task's
``reply_to``; the worker publishes each state change (STARTED, RETRY, then the final state) to
exchange ``""`` with routing key = ``reply_to``, ``correlation_id`` = task id, ``delivery_mode``
1, no headers, the usual meta as body. Stock Celery clients and workers on either side work.

The client consumes its reply queue with no-ack in one task owned by the store (started by
``prepare_client()``, cancelled and awaited by ``close()``) and keeps the latest record per
task id in memory, so results arrive exactly once and only to the client that sent the task.
At most ``max_records`` (10,000) records are kept, the least recently updated dropped first,
so a client that never asks for its results does not grow without bound; a record dropped
that way reads as PENDING again. Waits are futures woken by the consumer, never polling.

Only the ``Broker`` contract is used, so any broker works (AMQP, memory). Broker errors leave
this module as ``ResultStoreError``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from .. import states
from ..config import Queue
from ..exceptions import BrokerError, ConfigurationError, ResultStoreError, SerializationError
from ..protocol import Envelope
from ..serialization import SERIALIZERS
from .base import ResultStore, cancel_and_wait, fail_all, raise_timeout, resolve

if TYPE_CHECKING:
    from ..brokers.base import Broker, Consumer
    from ..config import Settings

__all__ = ("RpcResultStore",)

logger = logging.getLogger(__name__)

_Waiter = asyncio.Future[dict[str, Any]]


class RpcResultStore(ResultStore):
    """Results as reply messages on the client's own queue; see the module docstring."""

    #: Records kept per client (the latest per task id); the oldest updated go first.
    max_records = 10_000

    def __init__(self, url: str, settings: Settings, broker: Broker | None = None) -> None:
        super().__init__(url, settings, broker)
        self.broker = broker
        #: This client's reply queue name ("oid"); the app puts it in every task's reply_to.
        self.reply_to: str = str(uuid.uuid4())
        self.content_encoding = SERIALIZERS[self.serializer].content_encoding
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._waiters: dict[str, set[_Waiter]] = {}
        self._lock = asyncio.Lock()
        self._consumer_task: asyncio.Task[None] | None = None

    @property
    def reply_queue(self) -> Queue:
        """The reply queue as stock Celery declares it (no exchange, no binding)."""
        arguments = {"x-expires": int(self.expires * 1000)} if self.expires else {}
        return Queue(
            name=self.reply_to, exchange="", durable=True, auto_delete=True,
            queue_arguments=arguments,
        )

    def _require_broker(self) -> Broker:
        if self.broker is None:
            raise ConfigurationError("the rpc:// result backend needs the app's broker")
        return self.broker

    async def connect(self) -> None:
        """Nothing to connect: the broker belongs to the app, which connects it."""
        self._require_broker()

    async def close(self) -> None:
        """Wake pending waits with ``ResultStoreError`` and stop consuming. Idempotent."""
        self._fail_waiters(ResultStoreError("the result store was closed"))
        task, self._consumer_task = self._consumer_task, None
        if task is not None:
            await cancel_and_wait(task, "rpc result store: reply consumer")

    # -- client side -----------------------------------------------------------------------

    async def prepare_client(self) -> None:
        """Declare the reply queue and start consuming it; idempotent."""
        if self._consumer_task is not None and not self._consumer_task.done():
            return
        async with self._lock:
            if self._consumer_task is not None and not self._consumer_task.done():
                return
            broker = self._require_broker()
            consumer = broker.consume([self.reply_to], prefetch=0, no_ack=True)
            try:
                await broker.declare(self.reply_queue)
                # Started here, not in the task, so that a failure reaches the caller.
                await consumer.start()
            except BrokerError as exc:
                raise ResultStoreError(
                    f"rpc result store: cannot consume reply queue {self.reply_to}: {exc}"
                ) from exc
            self._consumer_task = asyncio.create_task(
                self._consume(consumer), name=f"aioqueue rpc replies {self.reply_to}"
            )

    async def _consume(self, consumer: Consumer) -> None:
        try:
            while True:
                delivery = await consumer.receive()
                self._on_reply(delivery.envelope)
        except BrokerError as exc:
            # The broker reconnects consumers itself; reaching here means it gave up.
            logger.error("rpc result store: reply consumer stopped: %s", exc)
            self._fail_waiters(ResultStoreError(f"rpc result store: replies lost: {exc}"))
        except Exception:  # a bug: log it here, nobody awaits this task until close()
            logger.exception("rpc result store: the reply consumer failed")
            self._fail_waiters(ResultStoreError("rpc result store: the reply consumer failed"))
        finally:
            try:
                await consumer.stop()
            except BrokerError as exc:
                logger.debug("rpc result store: stopping the reply consumer: %s", exc)

    def _on_reply(self, envelope: Envelope) -> None:
        task_id = envelope.correlation_id
        try:
            meta = self.decode(envelope.body, envelope.content_type)
        except SerializationError as exc:
            logger.warning("rpc result store: unreadable reply for task %s: %s", task_id, exc,
                           extra={"task_id": task_id})
            if task_id:
                self._settle(task_id, None, exc)  # a get() would fail the same way
            return
        if not task_id:
            task_id = meta.get("task_id")
            if not isinstance(task_id, str) or not task_id:
                logger.warning("rpc result store: reply without a task id dropped")
                return
        records = self._records
        previous = records.get(task_id)
        if previous is not None and previous.get("status") == states.SUCCESS:
            return  # as every store: a SUCCESS is never overwritten (a late STARTED, say)
        records[task_id] = meta
        records.move_to_end(task_id)
        while len(records) > self.max_records:
            records.popitem(last=False)
        if meta.get("status") in states.READY_STATES:
            self._settle(task_id, meta, None)

    def _settle(self, task_id: str, meta: dict[str, Any] | None, error: Exception | None) -> None:
        resolve(self._waiters.pop(task_id, ()), meta, error)

    def _fail_waiters(self, error: ResultStoreError) -> None:
        waiting, self._waiters = self._waiters, {}  # a fresh dict: callers may be iterating
        fail_all(waiting, error)

    async def get(self, task_id: str) -> dict[str, Any] | None:
        """The latest record received for the task (None: nothing yet, i.e. PENDING)."""
        await self.prepare_client()
        return self._records.get(task_id)

    async def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        with raise_timeout(task_id, timeout):
            await self.prepare_client()
            meta = self._records.get(task_id)
            if meta is not None and meta.get("status") in states.READY_STATES:
                return meta
            waiter: _Waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(task_id, set()).add(waiter)
            try:
                return await waiter
            finally:
                futures = self._waiters.get(task_id)
                if futures is not None:
                    futures.discard(waiter)
                    if not futures:
                        del self._waiters[task_id]
                if waiter.done() and not waiter.cancelled():
                    waiter.exception()  # mark retrieved even if a timeout beat the result

    async def forget(self, task_id: str) -> None:
        self._records.pop(task_id, None)

    # -- worker side -----------------------------------------------------------------------

    async def store(
        self, task_id: str, meta: dict[str, Any], *, reply_to: str | None = None
    ) -> None:
        """Publish the record to the sender's reply queue; without ``reply_to``, do nothing."""
        if reply_to is None:
            logger.debug("task %s has no reply_to; rpc result not sent", task_id,
                         extra={"task_id": task_id})
            return
        body = self.encode(meta)  # SerializationError here means nothing was sent
        envelope = Envelope(
            body,
            headers={},
            content_type=self.content_type,
            content_encoding=self.content_encoding,
            correlation_id=task_id,
            reply_to=None,
            priority=0,
            delivery_mode=1,  # stock: transient unless result_persistent
        )
        try:
            await self._require_broker().publish(envelope, routing_key=reply_to, exchange="")
        except BrokerError as exc:
            raise ResultStoreError(
                f"rpc result store: cannot send the result of task {task_id}: {exc}"
            ) from exc
