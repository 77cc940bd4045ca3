"""``Task[P, R]``: a registered function whose ``delay()`` is typed by its own signature."""

from __future__ import annotations

import functools
import inspect
import random
import uuid
from collections.abc import Callable, Coroutine, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    NoReturn,
    ParamSpec,
    TypedDict,
    TypeVar,
    Unpack,
)

import anyio

from . import limits
from .exceptions import MaxRetriesExceededError, Retry
from .result import EagerResult

if TYPE_CHECKING:
    from .app import AioQueue
    from .result import AsyncResult

__all__ = ("AsyncTask", "Request", "SendOptions", "SyncTask", "Task", "TaskOptions")

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


class TaskOptions(TypedDict, total=False):
    """Options of ``@app.task(...)``: Celery's task attributes, with Celery's defaults."""

    queue: str | None
    priority: int | None
    ignore_result: bool | None  # None: task_ignore_result
    acks_late: bool | None  # None: task_acks_late (True by default in aioqueue)
    serializer: str | None
    time_limit: float | None  # hard: the task is stopped and fails with TimeLimitExceeded
    soft_time_limit: float | None  # SoftTimeLimitExceeded is raised inside the task
    max_retries: int | None  # 3; None retries for ever
    default_retry_delay: float  # 180 s
    autoretry_for: tuple[type[Exception], ...]
    retry_kwargs: dict[str, Any]  # retry() options for autoretry_for, e.g. max_retries
    retry_backoff: bool | float  # exponential backoff; a number is the factor in seconds
    retry_backoff_max: float  # 600 s
    retry_jitter: bool  # True: a random delay between 0 and the backoff


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
        max_retries: int | None = 3,
        default_retry_delay: float = 180.0,
        autoretry_for: tuple[type[Exception], ...] = (),
        retry_kwargs: dict[str, Any] | None = None,
        retry_backoff: bool | float = False,
        retry_backoff_max: float = 600.0,
        retry_jitter: bool = True,
    ) -> None:
        self.app = app
        self.max_retries = max_retries
        self.default_retry_delay = default_retry_delay
        self.autoretry_for = tuple(autoretry_for)
        self.retry_kwargs = dict(retry_kwargs or {})
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self.retry_jitter = retry_jitter
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
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
    ) -> Any:
        """Run one call with ``request`` current: coroutines on the loop, functions in a thread.

        ``time_limit`` and ``soft_time_limit`` are enforced as ``aioqueue.limits`` explains.
        """
        token = _current_request.set(request)
        try:
            if self.is_coroutine:
                if time_limit is None and soft_time_limit is None:
                    # No limit (the usual case): no limits frame, timer or cancel scope held
                    # for as long as the task runs.
                    return await self.run(*args, **kwargs)
                return await limits.run_coroutine(
                    self.run(*args, **kwargs), time_limit, soft_time_limit
                )
            # anyio copies the context into the thread, so self.request works there too.
            call = functools.partial(self.run, *args, **kwargs)
            return await limits.run_in_thread(call, time_limit, soft_time_limit, limiter)
        finally:
            _current_request.reset(token)

    def start(
        self, request: Request, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> Coroutine[Any, Any, Any]:
        """The worker's way to run an ``async def`` task without time limits: make
        ``request`` current and return the call's coroutine for the caller to await.

        Unlike ``execute()`` nothing is reset afterwards: the worker awaits it in a task of
        its own per message, whose context nobody else sees. Saves a coroutine frame held
        for as long as the task runs.
        """
        _current_request.set(request)
        coro: Coroutine[Any, Any, Any] = self.run(*args, **kwargs)
        return coro

    def retry(
        self,
        exc: BaseException | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> NoReturn:
        """Ask for this call to run again later, as Celery's ``self.retry()`` (bound tasks).

        Raises ``Retry`` (let it propagate: ``raise self.retry(...)`` reads well too); the
        worker sends the call again with ``retries`` + 1 after ``countdown`` seconds (default
        ``default_retry_delay``) or at ``eta``, and stores the RETRY state. Past
        ``max_retries`` it raises ``exc`` if given, else ``MaxRetriesExceededError``.
        """
        request = self.request
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} "
                f"kwargs:{request.kwargs}: {limit} retries already"
            )
        when: float | datetime = eta if eta is not None else (
            countdown if countdown is not None else self.default_retry_delay
        )
        raise Retry(exc=exc, when=when, options=options)

    def retry_for(self, exc: Exception, request: Request) -> BaseException:
        """What an exception the call raised becomes: a ``Retry`` under ``autoretry_for``
        (with ``retry_backoff``/``retry_jitter`` delays), else the exception itself."""
        if not self.autoretry_for or not isinstance(exc, self.autoretry_for):
            return exc
        options = dict(self.retry_kwargs)
        if "countdown" not in options and self.retry_backoff:
            factor = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
            countdown = min(self.retry_backoff_max, factor * 2**request.retries)
            if self.retry_jitter:
                countdown = random.uniform(0, countdown)
            options["countdown"] = countdown
        token = _current_request.set(request)  # retry() reads the call's retry count
        try:
            self.retry(exc=exc, **options)
        except (Retry, Exception) as outcome:
            return outcome
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
        while True:
            try:
                value = await self.execute(request, args, kwargs)
            except Exception as exc:
                outcome = exc if isinstance(exc, Retry) else self.retry_for(exc, request)
                if isinstance(outcome, Retry):  # eager retries run again at once
                    request.retries += 1
                    continue
                if self.app.conf.task_eager_propagates:
                    raise outcome from (None if outcome is exc else exc)
                return EagerResult(task_id, self.app, task_name=self.name, exception=outcome)
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
