"""``sqlite:///path.db``: results in one SQLite file, shared by processes on one machine.

One table, ``aioqueue_results`` (aioqueue's own layout, not Celery's ``db+`` backend's): the
record is ``encode(meta)`` with its content type, next to its status, ``date_done`` and
``expires_at`` (``result_expires`` from the time of writing). A SUCCESS is never overwritten;
an expired record counts as missing, is deleted when read, and every store purges expired
records at most once a minute. The broker may use the same file: its tables are separate, and
each side has its own connection (WAL lets readers and the one writer proceed together).

Waiting does not loop per call: one poller task per store reads the ready records of every
id being waited on in a single query, with the broker's adaptive interval (5 ms after activity,
doubling up to ``result_backend_transport_options["polling_interval"]``, default 0.1 s, while
idle). A write from this process wakes the poller at once; one from another process is seen
within the current interval. The poller starts with the first ``wait()``; ``close()`` stops it.
Like the broker, every SQLite call runs in the store's own thread.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import states
from ..exceptions import ResultStoreError, SerializationError
from ..sqlite_db import (
    MIN_POLL_INTERVAL,
    SqliteThread,
    database_path,
    immediate,
    notify,
    open_database,
    polling_options,
    unwatch,
    watch,
)
from .base import ResultStore, raise_timeout, resolve

if TYPE_CHECKING:
    from ..brokers.base import Broker
    from ..config import Settings

__all__ = ("SqliteResultStore",)

logger = logging.getLogger(__name__)

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS aioqueue_results (
        task_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        content_type TEXT NOT NULL,
        data BLOB NOT NULL,
        date_done TEXT,
        expires_at REAL
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS aioqueue_results_expiry
        ON aioqueue_results (expires_at) WHERE expires_at IS NOT NULL
    """,
)

_PURGE_EVERY = 60.0  # seconds between sweeps of expired records, per store
_IDS_PER_QUERY = 500  # well under SQLite's bound-parameter limit
_READY = tuple(sorted(states.READY_STATES))


def _store(
    row: tuple[str, str, str, bytes, str | None, float | None],
    purge: bool,
    conn: sqlite3.Connection,
) -> None:
    now = time.time()
    with immediate(conn):
        # An expired SUCCESS is as good as missing, so it may be replaced.
        conn.execute(
            "INSERT INTO aioqueue_results VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (task_id) "
            "DO UPDATE SET status = excluded.status, content_type = excluded.content_type, "
            "data = excluded.data, date_done = excluded.date_done, "
            "expires_at = excluded.expires_at "
            "WHERE aioqueue_results.status != ? OR aioqueue_results.expires_at <= ?",
            (*row, states.SUCCESS, now),
        )
        if purge:
            conn.execute("DELETE FROM aioqueue_results WHERE expires_at <= ?", (now,))


def _get(task_id: str, conn: sqlite3.Connection) -> tuple[str, bytes] | None:
    rows = conn.execute(
        "SELECT content_type, data, expires_at FROM aioqueue_results WHERE task_id = ?",
        (task_id,),
    ).fetchall()
    if not rows:
        return None
    content_type, data, expires_at = rows[0]
    now = time.time()
    if expires_at is not None and expires_at <= now:
        with immediate(conn):
            conn.execute(
                "DELETE FROM aioqueue_results WHERE task_id = ? AND expires_at <= ?",
                (task_id, now),
            )
        return None
    return content_type, data


def _ready(task_ids: Sequence[str], conn: sqlite3.Connection) -> list[tuple[str, str, bytes]]:
    now = time.time()
    found: list[tuple[str, str, bytes]] = []
    states_marks = ",".join("?" * len(_READY))
    for start in range(0, len(task_ids), _IDS_PER_QUERY):
        chunk = task_ids[start : start + _IDS_PER_QUERY]
        found += conn.execute(
            "SELECT task_id, content_type, data FROM aioqueue_results "
            f"WHERE task_id IN ({','.join('?' * len(chunk))}) AND status IN ({states_marks}) "
            "AND (expires_at IS NULL OR expires_at > ?)",
            (*chunk, *_READY, now),
        ).fetchall()
    return found


def _forget(task_id: str, conn: sqlite3.Connection) -> None:
    with immediate(conn):
        conn.execute("DELETE FROM aioqueue_results WHERE task_id = ?", (task_id,))


class SqliteResultStore(ResultStore):
    """Results in a SQLite file; see the module docstring.

    ``result_backend_transport_options``: ``polling_interval`` (longest idle poll of
    ``wait()``, s, default 0.1), ``busy_timeout`` (s, default 5).
    """

    def __init__(self, url: str, settings: Settings, broker: Broker | None = None) -> None:
        super().__init__(url, settings, broker)
        self.path = database_path(url)
        self.polling_interval, self.busy_timeout = polling_options(
            settings.result_backend_transport_options
        )
        self._db: SqliteThread | None = None
        self._waiters: dict[str, set[asyncio.Future[dict[str, Any]]]] = {}
        self._kick = asyncio.Event()
        self._waker: Callable[[], None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._next_purge = 0.0

    def _thread(self) -> SqliteThread:
        if self._db is None:
            raise ResultStoreError(f"{self.url} is not connected")
        return self._db

    async def connect(self) -> None:
        if self._db is None:
            self._db = await open_database(
                self.path, _SCHEMA, name="aioqueue-sqlite-results",
                busy_timeout=self.busy_timeout, error=ResultStoreError,
                connect_error=ResultStoreError,
            )

    async def close(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with suppress(asyncio.CancelledError):
                await poller
        if self._waker is not None:
            unwatch(self.path, self._waker)
            self._waker = None
        self._fail_waiters(ResultStoreError(f"{self.url} was closed"))
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def store(
        self, task_id: str, meta: dict[str, Any], *, reply_to: str | None = None
    ) -> None:
        data = self.encode(meta)  # fails before anything is written
        now = time.time()
        expires_at = now + self.expires if self.expires else None
        purge = now >= self._next_purge
        if purge:
            self._next_purge = now + _PURGE_EVERY
        row = (task_id, str(meta["status"]), self.content_type, data, meta.get("date_done"),
               expires_at)
        db = self._thread()
        await db.run(partial(_store, row, purge))
        notify(db.path)

    async def get(self, task_id: str) -> dict[str, Any] | None:
        found = await self._thread().run(partial(_get, task_id))
        return None if found is None else self.decode(found[1], found[0])

    async def forget(self, task_id: str) -> None:
        await self._thread().run(partial(_forget, task_id))

    async def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        self._thread()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, set()).add(future)
        if self._poller is None or self._poller.done():
            # A fresh event: one made under an earlier event loop cannot be awaited here.
            self._kick = asyncio.Event()
            if self._waker is not None:
                unwatch(self.path, self._waker)
            self._waker = watch(self.path, self._kick)
            self._poller = asyncio.create_task(self._poll(), name=f"aioqueue poller {self.url}")
        self._kick.set()
        try:
            with raise_timeout(task_id, timeout):
                return await future
        finally:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                waiters.discard(future)
                if not waiters:
                    del self._waiters[task_id]

    def _fail_waiters(self, exc: Exception) -> None:
        for waiters in list(self._waiters.values()):  # each wait removes itself when woken
            resolve(waiters, None, exc)

    def _resolve(self, task_id: str, content_type: str, data: bytes) -> None:
        waiters = self._waiters.pop(task_id, set())
        try:
            meta = self.decode(data, content_type)
        except SerializationError as exc:  # get() would raise the same: do not wait forever
            resolve(waiters, None, exc)
        else:
            resolve(waiters, meta, None)

    async def _poll(self) -> None:
        interval = MIN_POLL_INTERVAL
        while True:
            self._kick.clear()
            task_ids = list(self._waiters)
            if not task_ids:
                await self._kick.wait()
                interval = MIN_POLL_INTERVAL
                continue
            try:
                found = await self._thread().run(partial(_ready, task_ids))
            except Exception as exc:
                # Waiters hear about a broken database instead of hanging on it.
                if not isinstance(exc, ResultStoreError):
                    logger.exception("polling %s for results failed", self.url)
                    exc = ResultStoreError(f"polling {self.url} failed: {exc}")
                self._fail_waiters(exc)
                found = []
            for row in found:
                self._resolve(*row)
            if found:
                interval = MIN_POLL_INTERVAL
                continue
            try:
                async with asyncio.timeout(interval):
                    await self._kick.wait()
                interval = MIN_POLL_INTERVAL
            except TimeoutError:
                interval = min(interval * 2, self.polling_interval)
