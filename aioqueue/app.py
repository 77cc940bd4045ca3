"""``AioQueue``: the app. Owns the task registry, ``conf``, and the broker and result store."""

from __future__ import annotations

import asyncio
import fnmatch
import inspect
import logging
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Concatenate, Literal, ParamSpec, Protocol, Self, TypeVar, overload

from .brokers.base import Broker
from .config import Queue, Settings
from .exceptions import ConfigurationError
from .protocol import encode_task
from .registry import broker_class, result_store_class
from .result import AsyncResult
from .results.base import ResultStore
from .task import AsyncTask, SyncTask, Task

__all__ = ("AioQueue",)

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

#: The embedded default: one SQLite file in the working directory, no server needed.
EMBEDDED_URL = "sqlite:///aioqueue.db"


class TaskDecorator(Protocol):
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> SyncTask[P, R]: ...


class BoundTaskDecorator(Protocol):
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...
    @overload
    def __call__(self, fn: Callable[Concatenate[Any, P], R], /) -> SyncTask[P, R]: ...


class AioQueue:
    """An aioqueue application, the counterpart of Celery's ``Celery`` object.

    ``AioQueue("tasks", broker="amqp://...", backend="redis://...", **settings)``. Connects
    lazily on first use; ``async with app:`` connects up front and closes on exit.
    """

    def __init__(
        self,
        main: str | None = None,
        *,
        broker: str | Broker | None = None,
        backend: str | ResultStore | None = None,
        include: Sequence[str] = (),
        **settings: Any,
    ) -> None:
        self.main = main
        self.conf = Settings()
        self.conf.update(settings)
        self.include = list(include)
        self.tasks: dict[str, Task[Any, Any]] = {}
        self._broker_instance = broker if isinstance(broker, Broker) else None
        self._store_instance = backend if isinstance(backend, ResultStore) else None
        if isinstance(broker, str):
            self.conf.broker_url = broker
        elif broker is not None:
            self.conf.broker_url = broker.url
        if isinstance(backend, str):
            self.conf.result_backend = backend
        elif backend is not None:
            self.conf.result_backend = backend.url
        self._broker: Broker | None = None
        self._store: ResultStore | None = None
        self._connected = False
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._declared: set[str] = set()
        self._client_ready = False
        self._oid = str(uuid.uuid4())

    def __repr__(self) -> str:
        return f"<AioQueue {self.main or '__main__'} at {id(self):#x}>"

    # -- configuration -------------------------------------------------------------------

    def config_from_object(self, obj: Any) -> None:
        """Load settings from a module, a module name such as ``"celeryconfig"``, or an object."""
        self.conf.from_object(obj)

    @property
    def broker_url(self) -> str:
        """``broker_url``, or the embedded SQLite file when none is set."""
        return self.conf.broker_url or EMBEDDED_URL

    @property
    def result_backend_url(self) -> str | None:
        """``result_backend``; the embedded SQLite file when neither URL is set; else None."""
        if self.conf.result_backend:
            return self.conf.result_backend
        if self.conf.broker_url is None and self._broker_instance is None:
            return EMBEDDED_URL
        return None

    @property
    def uses_embedded_default(self) -> bool:
        return self.conf.broker_url is None and self._broker_instance is None

    # -- tasks ---------------------------------------------------------------------------

    @overload
    def task(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R], /) -> SyncTask[P, R]: ...
    @overload
    def task(
        self,
        *,
        bind: Literal[True],
        name: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        ignore_result: bool | None = None,
        acks_late: bool | None = None,
        serializer: str | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
    ) -> BoundTaskDecorator: ...
    @overload
    def task(
        self,
        *,
        bind: Literal[False] = False,
        name: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        ignore_result: bool | None = None,
        acks_late: bool | None = None,
        serializer: str | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
    ) -> TaskDecorator: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        bind: bool = False,
        name: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        ignore_result: bool | None = None,
        acks_late: bool | None = None,
        serializer: str | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
    ) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., bind=True)``."""

        def register(function: Callable[..., Any]) -> Task[Any, Any]:
            cls = AsyncTask if _is_async(function) else SyncTask
            task: Task[Any, Any] = cls(
                self,
                function,
                name=name or self.gen_task_name(function),
                bind=bind,
                queue=queue,
                priority=priority,
                ignore_result=ignore_result,
                acks_late=acks_late,
                serializer=serializer,
                time_limit=time_limit,
                soft_time_limit=soft_time_limit,
            )
            self.tasks[task.name] = task
            return task

        return register(fn) if fn is not None else register

    def gen_task_name(self, fn: Callable[..., Any]) -> str:
        """``module.function``, as Celery names tasks (``main`` stands for ``__main__``)."""
        module = fn.__module__
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{fn.__name__}"

    # -- connections ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect the broker and the result store (if any)."""
        await self.get_broker()
        await self.get_result_store()

    async def close(self) -> None:
        """Close the result store and the broker; safe to call more than once."""
        store, broker = self._store, self._broker
        self._store = self._broker = None
        self._connected = False
        self._client_ready = False
        self._declared.clear()
        try:
            if store is not None:
                await store.close()
        finally:
            if broker is not None:
                await broker.close()

    async def use(
        self, *, broker: str | Broker | None, backend: str | ResultStore | None
    ) -> None:
        """Close current connections and point the app at another broker and result store.

        Used by ``aioqueue.testing`` to run a user's own app on ``memory://`` for a test.
        """
        await self.close()
        self._broker_instance = broker if isinstance(broker, Broker) else None
        self._store_instance = backend if isinstance(backend, ResultStore) else None
        self.conf.broker_url = broker.url if isinstance(broker, Broker) else broker
        self.conf.result_backend = (
            backend if isinstance(backend, str) or backend is None else backend.url
        )

    def _connection_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A new event loop (a new test, a new asyncio.run): connections of the old loop
            # cannot be used or closed from here, so start afresh.
            self._loop = loop
            self._lock = asyncio.Lock()
            self._broker = self._store = None
            self._connected = False
            self._client_ready = False
            self._declared.clear()
        assert self._lock is not None
        return self._lock

    async def _ensure_connected(self) -> None:
        async with self._connection_lock():
            if self._connected:
                return
            if self.uses_embedded_default:
                logger.warning(
                    "No broker_url set: using the embedded SQLite broker and result store in "
                    "%s; set broker_url (e.g. amqp://...) and result_backend for production",
                    EMBEDDED_URL.removeprefix("sqlite:///"),
                )
            broker = self._broker_instance or broker_class(self.broker_url)(
                self.broker_url, self.conf
            )
            await broker.connect()
            self._broker = broker
            backend = self.result_backend_url
            if self._store_instance is not None or backend:
                store = self._store_instance or result_store_class(backend or "")(
                    backend or "", self.conf, broker
                )
                try:
                    await store.connect()
                except BaseException:
                    await broker.close()
                    self._broker = None
                    raise
                self._store = store
            self._connected = True

    async def get_broker(self) -> Broker:
        """The connected broker, connecting on first use."""
        if not self._connected or self._loop is not asyncio.get_running_loop():
            await self._ensure_connected()
        assert self._broker is not None
        return self._broker

    async def get_result_store(self) -> ResultStore | None:
        """The connected result store, or None when no backend is configured."""
        if not self._connected or self._loop is not asyncio.get_running_loop():
            await self._ensure_connected()
        return self._store

    @property
    def reply_to(self) -> str:
        """The ``reply_to`` every message carries: the RPC store's queue, else this app's id."""
        if self._store is not None and self._store.reply_to:
            return self._store.reply_to
        return self._oid

    # -- routing -------------------------------------------------------------------------

    def queue_spec(self, name: str) -> Queue:
        """The declared form of a queue: from ``task_queues`` or as Celery creates one."""
        for queue in self.conf.task_queues or ():
            if queue.name == name:
                return queue
        if name == self.conf.task_default_queue:
            return Queue(name, exchange=self.conf.exchange, routing_key=self.conf.routing_key)
        return Queue(name)

    def route(
        self, name: str, args: Sequence[Any], kwargs: dict[str, Any], queue: str | None
    ) -> dict[str, Any]:
        """Routing options for a task from ``task_routes`` (explicit options win)."""
        if queue is not None:
            return {"queue": queue}
        routes = self.conf.task_routes
        if not routes:
            return {}
        for router in routes if isinstance(routes, list | tuple) else [routes]:
            found = _apply_router(router, name, args, kwargs)
            if found:
                return found
        return {}

    # -- sending -------------------------------------------------------------------------

    async def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        queue: str | None = None,
        routing_key: str | None = None,
        exchange: str | None = None,
        priority: int | None = None,
        task_id: str | None = None,
        headers: dict[str, Any] | None = None,
        serializer: str | None = None,
        ignore_result: bool | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        compression: str | None = None,
        shadow: str | None = None,
        retries: int = 0,
        parent_id: str | None = None,
        root_id: str | None = None,
        explicit_queue: bool = True,
    ) -> AsyncResult[Any]:
        """Send a task by name, without importing it; returns once the broker confirmed it.

        Arguments that cannot be serialized raise ``SerializationError`` and nothing is sent.
        """
        task_id = task_id or str(uuid.uuid4())
        args = args if args is not None else ()  # kept as given: argsrepr shows a tuple or list
        kwargs = kwargs if kwargs is not None else {}
        route = self.route(name, args, kwargs, queue if explicit_queue else None)
        if not route and queue is not None:
            route = {"queue": queue}
        queue_name: str = route.get("queue") or self.conf.task_default_queue
        if priority is None:
            priority = route.get("priority", self.conf.task_default_priority)
        now = datetime.now(UTC)
        if countdown is not None:
            eta = now + timedelta(seconds=countdown)
        if isinstance(expires, int | float):
            expires = now + timedelta(seconds=expires)
        if time_limit is None:
            time_limit = self.conf.task_time_limit
        if soft_time_limit is None:
            soft_time_limit = self.conf.task_soft_time_limit
        # Encode first: a value that cannot be serialized must fail before anything is sent.
        broker = await self.get_broker()
        envelope = encode_task(
            task=name,
            task_id=task_id,
            args=args if isinstance(args, tuple | list) else list(args),
            kwargs=kwargs,
            serializer=serializer or self.conf.task_serializer,
            eta=eta,
            expires=expires,
            now=now,
            retries=retries,
            timelimit=(time_limit, soft_time_limit),
            root_id=root_id,
            parent_id=parent_id,
            shadow=shadow,
            ignore_result=ignore_result,
            reply_to=self.reply_to,
            priority=priority,
            headers=headers,
            compression=compression or self.conf.task_compression,
        )
        if not self._client_ready and self._store is not None:
            await self._store.prepare_client()
            self._client_ready = True
        spec = self.queue_spec(queue_name)
        if spec.name not in self._declared:
            await broker.declare(spec)
            self._declared.add(spec.name)
        if exchange is None:
            exchange = route.get("exchange")
        if exchange is None and spec.exchange_type == "direct":
            target_exchange, key = "", spec.name
        else:
            target_exchange = spec.exchange_name if exchange is None else exchange
            key = routing_key or route.get("routing_key") or spec.binding_key
        await broker.publish(envelope, routing_key=key, exchange=target_exchange)
        return AsyncResult(task_id, self, task_name=name, ignored=bool(ignore_result))

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:
        """A result handle for a task id (for example one sent by another process)."""
        return AsyncResult(task_id, self)


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn)


def _apply_router(
    router: Any, name: str, args: Sequence[Any], kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    if callable(router):
        found = router(name, args, kwargs, {})
    elif isinstance(router, dict):
        found = router.get(name)
        if found is None:
            found = next(
                (v for pattern, v in router.items() if fnmatch.fnmatchcase(name, pattern)), None
            )
    else:
        raise ConfigurationError(f"task_routes entries must be dicts or callables, not {router!r}")
    if found is None:
        return None
    if isinstance(found, str):
        return {"queue": found}
    return dict(found)
