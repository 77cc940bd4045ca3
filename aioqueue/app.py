"""``AioQueue``: the app. Owns the task registry, ``conf``, and the broker and result store."""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from types import TracebackType
from typing import (
    Any,
    Concatenate,
    Literal,
    ParamSpec,
    Protocol,
    Self,
    TypeVar,
    Unpack,
    overload,
)

from . import routing
from .brokers import delay as delays
from .brokers.base import Broker
from .config import Queue, Settings
from .control import Control
from .exceptions import ConfigurationError
from .protocol import Envelope, encode_task, new_task_id
from .registry import broker_class, result_store_class
from .result import AsyncResult
from .results.base import ResultStore
from .task import AsyncTask, SendOptions, SyncTask, Task, TaskOptions

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
        self._client_ready = False  # the store's prepare_client() done, or none needed
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
        self, *, bind: Literal[True], name: str | None = None, **options: Unpack[TaskOptions]
    ) -> BoundTaskDecorator: ...
    @overload
    def task(
        self,
        *,
        bind: Literal[False] = False,
        name: str | None = None,
        **options: Unpack[TaskOptions],
    ) -> TaskDecorator: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        bind: bool = False,
        name: str | None = None,
        **options: Unpack[TaskOptions],
    ) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., bind=True)``.

        The options (``TaskOptions``) are Celery's task attributes: ``queue``, ``priority``,
        ``ignore_result``, ``acks_late``, ``serializer``, ``time_limit``, ``soft_time_limit``,
        ``max_retries``, ``default_retry_delay``, ``autoretry_for``, ``retry_kwargs``,
        ``retry_backoff``, ``retry_backoff_max``, ``retry_jitter``.
        """
        unknown = set(options) - set(TaskOptions.__annotations__)
        if unknown:
            raise ConfigurationError(f"unknown task option(s): {', '.join(sorted(unknown))}")

        def register(function: Callable[..., Any]) -> Task[Any, Any]:
            cls = AsyncTask if _is_async(function) else SyncTask
            task: Task[Any, Any] = cls(
                self, function, name=name or self.gen_task_name(function), bind=bind, **options
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
                    "No broker_url set: using the embedded SQLite broker%s in %s; set "
                    "broker_url (e.g. amqp://...) for production",
                    " and result store" if self.result_backend_url == EMBEDDED_URL else "",
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

    def _ready_result_store(self) -> ResultStore | None:
        """The result store when connected on the running loop, without an await; else None
        (then ``get_result_store()`` says why). ``AsyncResult.get()`` asks it first."""
        if self._connected and self._loop is asyncio.get_running_loop():
            return self._store
        return None

    @property
    def reply_to(self) -> str:
        """The ``reply_to`` every message carries: the RPC store's queue, else this app's id."""
        if self._store is not None and self._store.reply_to:
            return self._store.reply_to
        return self._oid

    # -- routing -------------------------------------------------------------------------

    def queue_spec(self, name: str) -> Queue:
        """The declared form of a queue: from ``task_queues`` or as Celery creates one."""
        return routing.queue_spec(self.conf, name)

    # -- sending -------------------------------------------------------------------------

    async def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Unpack[SendOptions],
    ) -> AsyncResult[Any]:
        """Send a task by name, without importing it; returns once the broker confirmed it.

        Takes the options of ``apply_async``. Arguments that cannot be serialized raise
        ``SerializationError`` and nothing is sent.
        """
        return await self.dispatch(name, args, kwargs, options)

    async def dispatch(
        self,
        name: str,
        args: Sequence[Any] | None,
        kwargs: dict[str, Any] | None,
        options: SendOptions,
        task: Task[Any, Any] | None = None,
        *,
        embed: dict[str, Any] | None = None,
        group: str | None = None,
        group_index: int | None = None,
        reply_to: str | None = None,
    ) -> AsyncResult[Any]:
        """Encode and publish one task message (``send_task`` and ``apply_async`` use this).

        ``embed``, ``group``, ``group_index`` and ``reply_to`` carry a workflow on (callbacks,
        chain steps) when a worker sends the next step of one.

        Precedence: explicit options, then ``task_routes``, then the task's own options,
        then the app's settings. The steps are numbered as in docs/design.md ("The app").
        """
        conf = self.conf
        args = args if args is not None else ()  # kept as given: argsrepr shows a tuple or list
        kwargs = kwargs if kwargs is not None else {}
        found = self._route(name, args, kwargs, options)  # step 1
        queue_name: str = found.get("queue") or (task and task.queue) or conf.task_default_queue
        ignore_result = _first(options.get("ignore_result"), task and task.ignore_result)
        given_id = options.get("task_id")  # step 2: the caller's id, a spare one or a new one
        spare = None if ignore_result or given_id else self._spare_task_id()
        task_id = given_id or spare or new_task_id()
        held = self._store if spare is not None else None  # holds task_id's channel until sent
        try:
            eta, expires, now = _due(options)  # step 3
            # Connected first: reply_to names the rpc store's queue. Encoded before anything is
            # declared or sent, so a value that cannot be serialized fails with nothing sent.
            broker = await self.get_broker()
            envelope = self._encode(  # step 4
                name, task_id, args, kwargs, options, task, found, ignore_result, eta, expires,
                now, embed=embed, group=group, group_index=group_index, reply_to=reply_to,
            )
            if not self._client_ready or queue_name not in self._declared:
                await self._get_ready_to_send(broker, queue_name)  # step 5
            exchange, key = self._publish_target(queue_name, options, found)  # step 6
            wait = self._broker_delay(exchange, eta)  # step 7
            # The store may get ready for the result's wait while the message travels (Redis
            # subscribes to its channel); it lets go again if the publish fails.
            store = None if ignore_result else self._store
            proof = _expect(store, task_id, given_id)  # step 8
            held = store
            # Step 9: into the broker's delay queues if it can keep the task, else its queue.
            if wait is None or not await broker.publish_delayed(envelope, queue=key, delay=wait):
                await broker.publish(envelope, routing_key=key, exchange=exchange, proof=proof)
        except BaseException:
            if held is not None:
                held.unexpect(task_id)
            raise
        return AsyncResult(task_id, self, task_name=name, ignored=bool(ignore_result))

    def _route(
        self, name: str, args: Sequence[Any], kwargs: dict[str, Any], options: SendOptions
    ) -> dict[str, Any]:
        """Where the message goes: an explicit ``queue=``, else what ``task_routes`` says (the
        caller falls back on the task's queue, then ``task_default_queue``)."""
        queue = options.get("queue")
        return {"queue": queue} if queue else routing.route(self.conf, name, args, kwargs)

    def _spare_task_id(self) -> str | None:
        """A new id whose result channel the store subscribed ahead (its spare ids), so that
        nothing of the result's wait is left to do while the message travels; else None."""
        ready = self._ready_result_store()
        return ready.spare_task_id() if ready is not None else None

    def _encode(
        self,
        name: str,
        task_id: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        options: SendOptions,
        task: Task[Any, Any] | None,
        found: dict[str, Any],
        ignore_result: bool | None,
        eta: datetime | None,
        expires: datetime | None,
        now: datetime | None,
        *,
        embed: dict[str, Any] | None,
        group: str | None,
        group_index: int | None,
        reply_to: str | None,
    ) -> Envelope:
        """The message, with the defaults filled in: each of priority, time limits, serializer
        and compression from the options, else the task (or its route), else the settings."""
        conf = self.conf
        return encode_task(
            task=name,
            task_id=task_id,
            args=args if isinstance(args, tuple | list) else list(args),
            kwargs=kwargs,
            serializer=_first(
                options.get("serializer"), task and task.serializer, conf.task_serializer
            ),
            eta=eta,
            expires=expires,
            now=now,
            retries=options.get("retries", 0),
            timelimit=(
                _first(options.get("time_limit"), task and task.time_limit, conf.task_time_limit),
                _first(
                    options.get("soft_time_limit"), task and task.soft_time_limit,
                    conf.task_soft_time_limit,
                ),
            ),
            root_id=options.get("root_id"),
            parent_id=options.get("parent_id"),
            shadow=options.get("shadow"),
            ignore_result=ignore_result,
            reply_to=reply_to or self.reply_to,
            priority=_first(
                options.get("priority"), task and task.priority, found.get("priority"),
                conf.task_default_priority,
            ),
            group=group,
            group_index=group_index,
            embed=embed,
            headers=options.get("headers"),
            compression=options.get("compression") or conf.task_compression,
        )

    async def _get_ready_to_send(self, broker: Broker, queue_name: str) -> None:
        """Once per connection: the store's client side (``rpc://`` declares its reply queue)
        and the queue, its dead-letter queue first (``queue_spec(name).name`` is ``name``)."""
        if not self._client_ready:
            if self._store is not None:
                await self._store.prepare_client()
            self._client_ready = True
        if queue_name not in self._declared:
            for declaration in routing.declarations(self.conf, queue_name):
                await broker.declare(declaration)
            self._declared.add(queue_name)

    def _publish_target(
        self, queue_name: str, options: SendOptions, found: dict[str, Any]
    ) -> tuple[str, str]:
        # A function of its own so the Queue it builds is not kept alive by dispatch() while
        # the publish waits for its confirm (thousands wait at once: objects the GC scans).
        return routing.publish_target(
            self.queue_spec(queue_name),
            _first(options.get("exchange"), found.get("exchange")),
            _first(options.get("routing_key"), found.get("routing_key")),
        )

    def _broker_delay(self, exchange: str, eta: datetime | None) -> float | None:
        """Seconds for the broker to keep a far ETA (brokers/delay.py), so that it does not wait
        in a worker's memory; only through the default exchange, where the key is the queue."""
        if exchange == "" and eta is not None:
            return delays.broker_delay(self.conf, eta, datetime.now(UTC))
        return None

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:
        """A result handle for a task id (for example one sent by another process)."""
        return AsyncResult(task_id, self)

    @cached_property
    def control(self) -> Control:
        """Remote control of the workers, as Celery's ``app.control``: ``revoke()``."""
        return Control(self)


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn)


def _first(*values: Any) -> Any:
    """The first value that is not None (or None); ``False`` and ``0`` count as values."""
    for value in values:  # a plain loop: no generator per call on the send path
        if value is not None:
            return value
    return None


def _due(options: SendOptions) -> tuple[datetime | None, datetime | None, datetime | None]:
    """(eta, expires, now): a countdown and a relative ``expires`` made absolute against one
    reading of the clock, ``now``; most calls have neither and never read it."""
    eta = options.get("eta")
    countdown = options.get("countdown")
    expires = options.get("expires")
    now = None
    if countdown is not None or expires is not None:
        now = datetime.now(UTC)
        if countdown is not None:
            eta = now + timedelta(seconds=countdown)
        if isinstance(expires, int | float):
            expires = now + timedelta(seconds=expires)
    return eta, expires, now


def _expect(
    store: ResultStore | None, task_id: str, given_id: str | None
) -> asyncio.Future[None] | None:
    """Tell the store a result is coming (``ResultStore.expect``). Its arrival, when the store
    offers one, proves the broker had the message as its confirm would (``Broker.publish``);
    only for an id made here, which no earlier record can carry."""
    arrival = store.expect(task_id) if store is not None else None
    return arrival if given_id is None else None
