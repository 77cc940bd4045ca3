"""SQLite plumbing shared by the sqlite:// broker and result store: URL parsing, the
connection thread, in-process wake-ups and write transactions.

``database_path`` turns ``sqlite:///relative.db`` / ``sqlite:////absolute.db`` into an absolute
file path. ``SqliteThread`` owns one connection in one thread (sqlite3 connections are not
thread-safe and their calls block); every call runs there, in submission order, and busy errors
SQLite did not wait on are retried with backoff. ``watch`` / ``unwatch`` / ``notify`` let a
write in this process wake this process's waiters on the same file without waiting for a poll.
``immediate`` is a ``BEGIN IMMEDIATE`` write transaction.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from .exceptions import ConfigurationError
from .registry import mask_password

__all__ = (
    "MIN_POLL_INTERVAL",
    "SqliteThread",
    "database_path",
    "immediate",
    "notify",
    "unwatch",
    "watch",
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: First polling interval after activity, in seconds; doubles while nothing arrives.
MIN_POLL_INTERVAL = 0.005


def database_path(url: str) -> str:
    """The absolute file path of ``sqlite:///relative.db`` or ``sqlite:////absolute.db``.

    As SQLAlchemy and Celery write them: three slashes then a path relative to the current
    directory, four for an absolute path. Resolved once, so a later ``chdir`` changes nothing.
    """
    _, sep, rest = url.partition("://")
    path = rest.partition("?")[0]
    if not sep or not path.startswith("/") or path in ("/", "/:memory:"):
        raise ConfigurationError(
            f"{mask_password(repr(url))} is not a SQLite file URL; write "
            "sqlite:///relative/path.db or sqlite:////absolute/path.db (an in-memory database "
            "cannot be shared; use memory://)"
        )
    return os.path.abspath(path[1:])


class _Waker:
    """Sets an asyncio.Event from any thread of this process."""

    __slots__ = ("event", "loop")

    def __init__(self, event: asyncio.Event) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = event

    def __call__(self) -> None:
        try:
            same_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            same_loop = False
        if same_loop:
            self.event.set()
        else:
            with suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
                self.loop.call_soon_threadsafe(self.event.set)


# Waiters in this process per database file: a write here wakes them without waiting for a poll.
_WATCHERS: dict[str, set[Callable[[], None]]] = {}


def watch(path: str, event: asyncio.Event) -> Callable[[], None]:
    """Set ``event`` whenever this process writes to ``path``; returns the handle for unwatch."""
    waker = _Waker(event)
    _WATCHERS.setdefault(path, set()).add(waker)
    return waker


def unwatch(path: str, waker: Callable[[], None]) -> None:
    watchers = _WATCHERS.get(path)
    if watchers is not None:
        watchers.discard(waker)
        if not watchers:
            del _WATCHERS[path]


def notify(path: str) -> None:
    """Something was written to ``path``: wake this process's waiters on it."""
    for waker in list(_WATCHERS.get(path, ())):
        waker()


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return "database is locked" in str(exc)
    return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # any extended code


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A caller that was cancelled never reads the outcome; reading it here keeps asyncio from
    # logging "exception was never retrieved".
    if not future.cancelled():
        future.exception()


class SqliteThread:
    """One thread holding one connection; every call runs there, in submission order.

    ``error`` is what sqlite3 errors become. SQLite itself waits up to ``busy_timeout`` for
    another connection's write lock; the busy errors it returns without waiting (a snapshot
    that went stale, WAL recovery in another process) are retried with backoff, also for up
    to ``busy_timeout`` in all.
    """

    def __init__(
        self,
        path: str,
        *,
        name: str,
        busy_timeout: float,
        error: type[Exception],
        connect_error: type[Exception],
    ) -> None:
        self.path = path
        self._name = name
        self._busy_timeout = busy_timeout
        self._error = error
        self._connect_error = connect_error
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def start(self, schema: Sequence[str]) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        try:
            await asyncio.shield(
                asyncio.wrap_future(self._executor.submit(self._open, schema))
            )
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _open(self, schema: Sequence[str]) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None,
                cached_statements=256,
            )
        except (OSError, sqlite3.Error) as exc:
            raise self._connect_error(f"cannot open SQLite database {self.path}: {exc}") from exc
        self._conn = conn

        def setup(conn: sqlite3.Connection) -> None:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
            if mode != "wal":
                logger.warning("SQLite %s is in %s mode, not WAL", self.path, mode)
            conn.execute("PRAGMA synchronous=NORMAL")
            with immediate(conn):
                for statement in schema:
                    conn.execute(statement)

        try:
            self._call(setup)
        except Exception as exc:
            conn.close()
            self._conn = None
            if isinstance(exc, self._connect_error):
                raise
            raise self._connect_error(f"cannot set up SQLite database {self.path}: {exc}") from exc

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``fn(connection)``; the future completes even if nobody awaits it."""
        if self._executor is None:
            raise self._connect_error(f"SQLite database {self.path} is not open")
        future = asyncio.wrap_future(self._executor.submit(self._call, fn))
        future.add_done_callback(_retrieve)
        return future

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in the thread. Cancelling the caller does not stop it: a
        write that was asked for is done (else an ack could be queued, then dropped)."""
        return await asyncio.shield(self.submit(fn))

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        assert conn is not None
        deadline = time.monotonic() + self._busy_timeout
        delay = 0.001
        while True:
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.rollback()
                if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc) and (
                    time.monotonic() < deadline
                ):
                    # A busy error SQLite did not wait on, or its wait just ran out: retry.
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
                    continue
                raise self._error(f"SQLite {self.path}: {exc}") from exc

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def shut(conn: sqlite3.Connection) -> None:
            conn.close()

        try:
            await asyncio.shield(asyncio.wrap_future(executor.submit(self._call, shut)))
        except Exception:
            logger.exception("closing SQLite %s failed", self.path)
        finally:
            self._conn = None
            # The thread is idle now (its last job is done), so joining it is immediate.
            executor.shutdown(wait=True)


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the write lock at once (no deadlock on upgrade)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.rollback()
        raise
    conn.execute("COMMIT")


def polling_options(options: Mapping[str, Any]) -> tuple[float, float]:
    """``(polling_interval, busy_timeout)`` from transport options, with their defaults."""
    polling = max(float(options.get("polling_interval", 0.1)), MIN_POLL_INTERVAL)
    return polling, float(options.get("busy_timeout", 5.0))


async def open_database(
    path: str,
    schema: Sequence[str],
    *,
    name: str,
    busy_timeout: float,
    error: type[Exception],
    connect_error: type[Exception],
) -> SqliteThread:
    """A started ``SqliteThread`` on ``path`` with ``schema`` applied."""
    db = SqliteThread(
        path, name=name, busy_timeout=busy_timeout, error=error, connect_error=connect_error
    )
    await db.start(schema)
    return db
