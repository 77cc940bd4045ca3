"""The contract every result store fulfils: store, get, wait for a ready state, forget."""

from __future__ import annotations

import asyncio
import builtins
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio

from .. import states
from ..exceptions import SerializationError, TimeoutError
from ..serialization import SERIALIZERS, accepted_types, dumps, loads

if TYPE_CHECKING:
    from ..brokers.base import Broker
    from ..config import Settings

__all__ = (
    "ResultStore",
    "cancel_and_wait",
    "fail_all",
    "raise_timeout",
    "resolve",
    "timeout_error",
)

logger = logging.getLogger(__name__)


class ResultStore(ABC):
    """Where results live. Records are Celery's ``celery-task-meta`` dicts."""

    #: The name clients put in ``reply_to``; only the RPC store replies there.
    reply_to: str | None = None

    def __init__(self, url: str, settings: Settings, broker: Broker | None = None) -> None:
        self.url = url
        self.settings = settings
        self.serializer = settings.result_serializer
        self.content_type = SERIALIZERS[settings.result_serializer].content_type
        self.accept = accepted_types(settings.result_accept_content or settings.accept_content)
        self.expires = settings.result_expires

    def encode(self, meta: dict[str, Any]) -> bytes:
        """Serialize a record with ``result_serializer``; raises ``SerializationError``."""
        return dumps(meta, self.serializer)[0]

    def decode(self, data: bytes | str, content_type: str | None = None) -> dict[str, Any]:
        if isinstance(data, str):
            data = data.encode("utf-8")
        meta = loads(data, content_type or self.content_type, self.accept)
        if not isinstance(meta, dict) or "status" not in meta:
            raise SerializationError("result record is not an object with a 'status'")
        return meta

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def prepare_client(self) -> None:  # noqa: B027 - optional hook, most stores need none
        """Called before a client publishes its first task (the RPC store declares its queue)."""

    def expect(self, task_id: str) -> asyncio.Future[None] | None:
        """Called just before a client publishes a task whose result it may wait for.

        A store may get ready for that wait now (Redis subscribes to the result's channel),
        so ``wait()`` costs no round trip later. Must not block and must not fail.

        It may return a future that completes when the task's ready result has arrived
        here, without the client asking (it is kept for the ``wait()``): the publish can
        take that as proof the broker had the message (``Broker.publish``). The store
        completes it only with a result, never with an error, and may drop it unresolved.
        Returns None by default.
        """
        return None

    def spare_task_id(self) -> str | None:
        """A new task id whose wait this store got ready for in advance, or None.

        A client about to send a task (and not given its id) asks first; ``expect()`` is
        then called with the id as with any other, and ``unexpect()`` if it is not sent.
        Redis hands out ids whose result channels it subscribed to earlier, many per
        command, so no subscription is made while the message travels. Must not block and
        must not fail. Returns None by default.
        """
        return None

    def unexpect(self, task_id: str) -> None:  # noqa: B027 - optional hook
        """The publish announced by ``expect()`` failed: nothing will come."""

    @abstractmethod
    async def store(
        self, task_id: str, meta: dict[str, Any], *, reply_to: str | None = None
    ) -> None:
        """Write a record; raises ``SerializationError`` (and writes nothing) if it cannot."""

    @abstractmethod
    async def get(self, task_id: str) -> dict[str, Any] | None:
        """The latest record, or None when nothing is stored (PENDING)."""

    async def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the record is in a ready state. This default polls; real stores override."""
        delay = 0.005
        with raise_timeout(task_id, timeout):
            while True:
                meta = await self.get(task_id)
                if meta is not None and meta.get("status") in states.READY_STATES:
                    return meta
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.5)

    @abstractmethod
    async def forget(self, task_id: str) -> None:
        """Delete the record."""


def timeout_error(task_id: str, timeout: float | None) -> TimeoutError:
    """What a wait raises when ``timeout`` passed without a ready record."""
    return TimeoutError(f"no result for task {task_id} within {timeout} s")


@contextmanager
def raise_timeout(task_id: str, timeout: float | None) -> Iterator[None]:
    """``anyio.fail_after`` that raises our ``TimeoutError`` with a message naming the task."""
    try:
        with anyio.fail_after(timeout):
            yield
    except builtins.TimeoutError:
        raise timeout_error(task_id, timeout) from None


async def cancel_and_wait(task: asyncio.Task[Any], what: str) -> None:
    """Cancel a background task this store owns and wait until it has ended."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we are being cancelled ourselves, not just our child
    except Exception:
        logger.exception("%s failed", what)


Waiter = asyncio.Future[dict[str, Any]]


def resolve(
    waiters: Iterable[Waiter], meta: dict[str, Any] | None, error: BaseException | None = None
) -> None:
    """Hand a ready record (or the error that replaces it) to every pending wait."""
    for future in waiters:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            elif meta is not None:
                future.set_result(meta)


def fail_all(waiting: dict[Any, set[Waiter]], error: BaseException) -> None:
    """Fail every pending wait of a store (closed, or its listener gave up), and forget them."""
    for waiters in waiting.values():
        resolve(waiters, None, error)
    waiting.clear()
