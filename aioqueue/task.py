"""``Task[P, R]``: a registered function whose ``delay()`` is typed by its own signature."""

from __future__ import annotations

import functools
import inspect
import uuid
from collections.abc import Callable, Coroutine, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypedDict, TypeVar, Unpack

import anyio

from .result import EagerResult

if TYPE_CHECKING:
    from .app import AioQueue
    from .result import AsyncResult

__all__ = ("AsyncTask", "Request", "SendOptions", "SyncTask", "Task")

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(slots=True)
class Request:
    """What a running task knows about its own call (``self.request`` in a bound task)."""

    id: str
    task: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    eta: datetime | None = None
    expires: datetime | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    delivery_info: dict[str, Any] = field(default_factory=dict)
    hostname: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    is_eager: bool = False


_current_request: ContextVar[Request | None] = ContextVar("aioqueue_request", default=None)


class SendOptions(TypedDict, total=False):
    """The options of ``apply_async()`` and ``send_task()``, with Celery's names."""

    countdown: float | None  # seconds from now: becomes the ``eta`` header
    eta: datetime | None  # do not run before
    expires: float | datetime | None  # seconds from now, or a time: do not run after
    queue: str | None
    routing_key: str | None
    exchange: str | None
    priority: int | None
    task_id: str | None
    headers: dict[str, Any] | None  # merged into the message headers
    serializer: str | None
    ignore_result: bool | None
    time_limit: float | None
    soft_time_limit: float | None
    compression: str | None  # gzip, zlib, bzip2, lzma
    shadow: str | None  # the name shown in logs
    retries: int
    parent_id: str | None
    root_id: str | None


class Task(Generic[P, R]):
    """A task registered on an app. Created by ``@app.task``; never subclassed per task."""

    def __init__(
        self,
        app: AioQueue,
        fn: Callable[..., Any],
        *,
        name: str,
        bind: bool = False,
        queue: str | None = None,
        priority: int | None = None,
        ignore_result: bool | None = None,
        acks_late: bool | None = None,
        serializer: str | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
    ) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.bind = bind
        self.queue = queue
        self.priority = priority
        self._ignore_result = ignore_result
        self._acks_late = acks_late
        self.serializer = serializer
        self.time_limit = time_limit
        self.soft_time_limit = soft_time_limit
        self.is_coroutine = inspect.iscoroutinefunction(fn)
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__module__ = fn.__module__
        self.__wrapped__ = fn
        self._signature: inspect.Signature | None = None

    def __repr__(self) -> str:
        return f"<@task: {self.name} of {self.app.main or 'aioqueue'}>"

    @property
    def ignore_result(self) -> bool:
        if self._ignore_result is not None:
            return self._ignore_result
        return self.app.conf.task_ignore_result

    @property
    def acks_late(self) -> bool:
        return self._acks_late if self._acks_late is not None else self.app.conf.task_acks_late

    @property
    def request(self) -> Request:
        """The request of the call running in this context (bound tasks read it as self.request)."""
        request = _current_request.get()
        if request is None:
            return Request(id="", task=self.name, is_eager=True)
        return request

    def check_arguments(self, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> None:
        """Raise ``TypeError`` at the call if the arguments cannot bind to the signature."""
        if self._signature is None:
            self._signature = inspect.signature(self.fn)
        if self.bind:
            self._signature.bind(None, *args, **kwargs)
        else:
            self._signature.bind(*args, **kwargs)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function (with ``self`` first when bound); a coroutine for async tasks."""
        if self.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    async def execute(
        self,
        request: Request,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        limiter: anyio.CapacityLimiter | None = None,
    ) -> Any:
        """Run one call with ``request`` current: coroutines on the loop, functions in a thread."""
        token = _current_request.set(request)
        try:
            if self.is_coroutine:
                return await self.run(*args, **kwargs)
            # anyio copies the context into the thread, so self.request works there too.
            call = functools.partial(self.run, *args, **kwargs)
            return await anyio.to_thread.run_sync(call, limiter=limiter)
        finally:
            _current_request.reset(token)

    async def apply(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        task_id: str | None = None,
        **options: Any,
    ) -> EagerResult[R]:
        """Run the task here and now (as ``task_always_eager`` does); same result API.

        With ``task_eager_propagates`` an exception is raised here; otherwise ``get()`` raises it.
        """
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        self.check_arguments(args, kwargs)
        task_id = task_id or str(uuid.uuid4())
        request = Request(id=task_id, task=self.name, args=list(args), kwargs=kwargs, is_eager=True)
        try:
            value = await self.execute(request, args, kwargs)
        except Exception as exc:
            if self.app.conf.task_eager_propagates:
                raise
            return EagerResult(task_id, self.app, task_name=self.name, exception=exc)
        return EagerResult(task_id, self.app, task_name=self.name, value=value)

    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Send the task with these arguments; returns once the broker confirmed it."""
        return await self.apply_async(args, kwargs)

    async def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Unpack[SendOptions],
    ) -> AsyncResult[R]:
        """Send the task with options, as Celery's ``apply_async`` (see ``SendOptions``).

        Returns once the broker confirmed the message. Arguments that do not fit the
        signature raise ``TypeError``, ones that cannot be serialized ``SerializationError``;
        nothing is sent then.
        """
        if self.app.conf.task_always_eager:
            return await self.apply(args, kwargs, task_id=options.get("task_id"))
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        self.check_arguments(args, kwargs)
        result: AsyncResult[R] = await self.app.dispatch(self.name, args, kwargs, options, self)
        return result


class AsyncTask(Task[P, R]):
    """A task made from an ``async def``: calling it locally returns the coroutine."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        coro: Coroutine[Any, Any, R] = self.run(*args, **kwargs)
        return coro


class SyncTask(Task[P, R]):
    """A task made from a plain ``def``: calling it locally runs it; the worker uses a thread."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        value: R = self.run(*args, **kwargs)
        return value
