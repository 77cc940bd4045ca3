"""``AsyncResult[R]``: an awaitable handle on a task's result, read from the result store."""

from __future__ import annotations

from collections.abc import Generator
from traceback import format_exception
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast, overload

from . import states
from .exceptions import ResultUnavailableError
from .meta import exception_from_dict, exception_to_dict, make_meta

if TYPE_CHECKING:
    from .app import AioQueue
    from .results.base import ResultStore

__all__ = ("AsyncResult", "EagerResult")

R = TypeVar("R")


class AsyncResult(Generic[R]):
    """The result of a task sent with ``delay()``/``apply_async()``.

    ``await r`` is ``await r.get()``. Every query is a coroutine, since each may ask the
    store; once a ready state has been seen it is kept, so later queries cost nothing.
    """

    __slots__ = ("_app", "_ignored", "_meta", "id", "task_name")

    def __init__(
        self, id: str, app: AioQueue, *, task_name: str | None = None, ignored: bool = False
    ) -> None:
        self.id = id
        self.task_name = task_name
        self._app = app
        self._ignored = ignored
        self._meta: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __await__(self) -> Generator[Any, None, R]:
        return self.get().__await__()

    async def _store(self) -> ResultStore:
        if self._ignored:
            raise ResultUnavailableError(
                f"task {self.id} was sent with ignore_result=True: no result will be stored"
            )
        store = await self._app.get_result_store()
        if store is None:
            raise ResultUnavailableError(
                "no result backend is configured: set backend= or result_backend "
                "(for example 'redis://localhost:6379/0' or 'rpc://')"
            )
        return store

    async def _read(self) -> dict[str, Any] | None:
        if self._meta is not None:
            return self._meta
        meta = await (await self._store()).get(self.id)
        if meta is not None and meta.get("status") in states.READY_STATES:
            self._meta = meta
        return meta

    @overload
    async def get(self, timeout: float | None = None, propagate: Literal[True] = True) -> R: ...

    @overload
    async def get(
        self, timeout: float | None = None, *, propagate: bool
    ) -> R | BaseException: ...

    async def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        """Wait for the task to finish and return its value.

        A failed task's exception is raised (with its original type where it can be
        imported), or returned with ``propagate=False``. After ``timeout`` seconds,
        ``aioqueue.exceptions.TimeoutError`` is raised (also a builtin ``TimeoutError``).
        """
        meta = self._meta
        if meta is None:
            # Connected already (the usual case): no awaits before the wait itself.
            store = None if self._ignored else self._app._ready_result_store()
            if store is None:
                store = await self._store()
            meta = await store.wait(self.id, timeout)
            self._meta = meta
        status = meta.get("status")
        if status in states.EXCEPTION_STATES:
            exc = self._exception(meta)
            if propagate and status in states.PROPAGATE_STATES:
                raise exc
            return exc
        return meta.get("result")

    @staticmethod
    def _exception(meta: dict[str, Any]) -> BaseException:
        exc = exception_from_dict(meta.get("result"))
        traceback = meta.get("traceback")
        if traceback:
            exc.add_note(f"Remote traceback:\n{traceback}")
        return exc

    async def state(self) -> str:
        """PENDING, STARTED, SUCCESS, FAILURE, RETRY or REVOKED."""
        meta = await self._read()
        return cast(str, meta["status"]) if meta else states.PENDING

    status = state

    async def ready(self) -> bool:
        """True once the task succeeded, failed or was revoked."""
        return await self.state() in states.READY_STATES

    async def successful(self) -> bool:
        return await self.state() == states.SUCCESS

    async def failed(self) -> bool:
        return await self.state() == states.FAILURE

    async def traceback(self) -> str | None:
        """The formatted remote traceback of a failed task, else None."""
        meta = await self._read()
        return meta.get("traceback") if meta else None

    async def info(self) -> Any:
        """The value, the exception, or the progress data of the current state; no waiting."""
        meta = await self._read()
        if meta is None:
            return None
        if meta.get("status") in states.EXCEPTION_STATES:
            return self._exception(meta)
        return meta.get("result")

    async def forget(self) -> None:
        """Delete the stored result."""
        self._meta = None
        await (await self._store()).forget(self.id)

    async def revoke(self, *, terminate: bool = False, signal: str = "SIGTERM") -> None:
        """Tell every worker to skip this task (Celery's broadcast, ``app.control.revoke``).

        Returns once the broker has the command. A worker that receives the task later
        stores REVOKED instead of running it; ``terminate=True`` also cancels it on the
        worker running it. Revocations live in the workers' memory, as in Celery.
        """
        await self._app.control.revoke(self.id, terminate=terminate, signal=signal)


class EagerResult(AsyncResult[R]):
    """The result of a task run in this process (``task_always_eager`` or ``Task.apply()``).

    Same API as ``AsyncResult``; nothing is stored, and ``get()`` raises the original
    exception object.
    """

    __slots__ = ("_error", "_value")

    def __init__(
        self,
        id: str,
        app: AioQueue,
        *,
        task_name: str | None = None,
        value: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        super().__init__(id, app, task_name=task_name)
        self._value = value
        self._error = exception
        if exception is None:
            self._meta = make_meta(id, states.SUCCESS, value)
        else:
            tb = "".join(format_exception(exception))
            self._meta = make_meta(
                id, states.FAILURE, exception_to_dict(exception), traceback=tb
            )

    def __repr__(self) -> str:
        return f"<EagerResult: {self.id}>"

    async def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        if self._error is not None:
            if propagate:
                raise self._error
            return self._error
        return self._value

    async def info(self) -> Any:
        return self._error if self._error is not None else self._value

    async def forget(self) -> None:
        pass

    async def revoke(self, *, terminate: bool = False, signal: str = "SIGTERM") -> None:
        """Nothing to revoke: the task has run already (and no broker is needed)."""
