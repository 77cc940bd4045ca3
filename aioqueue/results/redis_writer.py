"""Result writes pipelined: the stores of one loop iteration go out in one socket write.

One store used to be one redis-py ``execute_command``: a connection checked out of the pool,
``Retry.call_with_retry``, a ``send()`` and a ``read_response()`` for one short Lua call. At
thousands of results a second that was a fifth of a worker's CPU (docs/benchmarks.md,
"Profile"). Here ``ResultWriter.store()`` queues the record and returns a future; a flusher
task, created when the first record of a batch is queued, runs when the event loop gets to it
(right after the callbacks already scheduled in this iteration: no timer, so nothing waits
longer than before), sends every queued ``EVALSHA`` of the store script in one write on a
connection of its own, takes the replies in order and gives each caller its own outcome:
written (True), not written because the key holds SUCCESS (False), or ``ResultStoreError``
(an error reply for that record only, or the connection failing). Records queued while a
batch is in flight make the next batch, so a busy worker sends big batches and an idle one
sends each record at once: a record queued while nothing is in flight, on a connection
already open, is written by ``store()`` itself (the flusher then only waits for its reply),
which saves the loop iteration before the flusher runs on a task's latency path.

* NOSCRIPT (Redis restarted, or someone ran SCRIPT FLUSH): the script is loaded and the
  records that got NOSCRIPT are sent again right behind it, in the same write.
* The connection fails: it is dropped. If it had been used before (a stale socket after a
  Redis restart), the records without a reply are sent once more on a new connection;
  writing one twice is harmless (same value, the SUCCESS guard, one more PUBLISH). Otherwise,
  or if that fails too, their callers get ``ResultStoreError`` (the worker retries with
  backoff, keeping the message unacknowledged).
* A caller that stops waiting (cancelled) before its record is sent is left out.

The store owns the writer: ``close()`` cancels and awaits the flusher, fails every record
not answered yet with ``ResultStoreError`` and disconnects.

The connection is our own (:mod:`aioqueue.results.redis_wire`; each reply settles its record
in the read callback, as it arrives) when ``connect`` is given. With ``client`` instead
(``settings.fast_paths`` off, or a pool the wire does not speak), each batch is a redis-py
pipeline of ``evalsha`` calls (``execute(raise_on_error=False)``), its public API only, on
the store's pool; the batching, NOSCRIPT handling and outcomes are the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from ..exceptions import ResultStoreError
from .base import cancel_and_wait
from .redis_wire import OWN_WIRE, REDIS_PY, RedisWire, WireError
from .resp import ReplyError

__all__ = ("ResultWriter",)

logger = logging.getLogger("aioqueue.results.redis")

_Outcome = asyncio.Future[bool]
_Item = tuple[bytes, bytes, _Outcome]  # key, serialized record, the caller's future


def _fail(items: Sequence[_Item], error: BaseException) -> None:
    for _, _, outcome in items:
        if not outcome.done():
            outcome.set_exception(error)


def _error(detail: object) -> ResultStoreError:
    return ResultStoreError(f"redis result store: store failed: {detail}")


class _Batch:
    """The records of one write on our own connection, each settled as its reply arrives
    (so a connection lost halfway leaves the records already answered settled).

    ``done`` (the claim's future) completes with the last reply, just *before* its record is
    settled: the flusher waiting on it then runs before that record's caller, and is gone
    (nothing else queued) by the time the caller stores again, which ``store()`` can then
    write at once. The connection fails it if it ends first."""

    __slots__ = ("done", "items", "noscript", "position")

    def __init__(self, conn: RedisWire, items: list[_Item], load: bool) -> None:
        self.items = items
        self.noscript: list[_Item] = []  # the records that got NOSCRIPT
        self.position = -1 if load else 0  # -1: the SCRIPT LOAD's reply comes first
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        conn.expect(len(items) + load, self.on_reply, self.done)

    def on_reply(self, reply: Any) -> None:
        if self.position < 0:
            self.position = 0
            if isinstance(reply, ReplyError):
                raise WireError(f"SCRIPT LOAD failed: {reply}")
            return
        item = self.items[self.position]
        self.position += 1
        if self.position == len(self.items) and not self.done.done():  # (cancelled: closing)
            self.done.set_result(None)
        if isinstance(reply, ReplyError):
            if str(reply).startswith("NOSCRIPT"):
                self.noscript.append(item)
            elif not item[2].done():
                item[2].set_exception(_error(reply))
        elif not item[2].done():
            item[2].set_result(reply == 1)


class ResultWriter:
    """Runs the store script for queued records, one pipeline per batch (module docstring).

    ``script`` is the Lua source, called with KEYS[1] = key, ARGV[1] = record, ARGV[2] =
    ``ttl``, returning 1 when written and 0 when skipped. ``timeout`` bounds one batch's
    round trip (None: no bound). Either ``connect`` opens a new connection of our own
    (raising OSError/``WireError`` when it cannot), or ``client``'s pipelines are used.
    """

    def __init__(
        self,
        script: str,
        ttl: int,
        timeout: float | None,
        *,
        connect: Callable[[], Awaitable[RedisWire]] | None = None,
        client: Redis | None = None,
    ) -> None:
        if (connect is None) == (client is None):
            raise ValueError("give the writer either connect or client")
        self._connect = connect
        self._client = client
        #: Which connection the records go out on: "own-wire" or "redis-py".
        self.path = OWN_WIRE if connect is not None else REDIS_PY
        self._script = script
        source = script.encode()
        sha = hashlib.sha1(source, usedforsecurity=False).hexdigest().encode()  # Redis's name
        self.sha = sha
        self._ttl = ttl
        self._head = b"*6\r\n$7\r\nEVALSHA\r\n$40\r\n" + sha + b"\r\n$1\r\n1\r\n"
        ttl_text = str(ttl).encode()
        self._tail = b"$%d\r\n%s\r\n" % (len(ttl_text), ttl_text)
        self._load = b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n$%d\r\n%s\r\n" % (len(source), source)
        self._timeout = timeout
        self._pending: list[_Item] = []
        self._written: _Batch | None = None  # written by store(), for the flusher to await
        self._flusher: asyncio.Task[None] | None = None
        self._conn: RedisWire | None = None
        self._closed = False

    def store(self, key: bytes, value: bytes) -> _Outcome:
        """Queue one record; the future gets True (written), False (SUCCESS was there) or
        ``ResultStoreError``. A plain function, not a coroutine: one object less per store."""
        if self._closed:
            raise _error("the result store was closed")
        loop = asyncio.get_running_loop()
        outcome: _Outcome = loop.create_future()
        self._pending.append((key, value, outcome))
        if self._flusher is None:
            conn = self._conn
            if conn is not None and conn.is_open:  # nothing in flight (no flusher): write now
                self._written, self._pending = self._write(conn, self._pending, False), []
            self._flusher = loop.create_task(self._flush(), name="aioqueue redis result writer")
        return outcome

    async def close(self) -> None:
        """Stop the flusher, fail what was not answered, disconnect. Idempotent."""
        self._closed = True
        flusher, self._flusher = self._flusher, None
        try:
            if flusher is not None:
                await cancel_and_wait(flusher, "redis result store: result writer")
        finally:
            # A flusher cancelled before it started left both to this.
            written = self._written.items if self._written is not None else []
            _fail(written + self._pending, _error("the result store was closed"))
            self._written, self._pending = None, []
            await self._disconnect()

    async def _flush(self) -> None:
        # Records queued while a batch is in flight make the next one; the loop ends only
        # when none came, with no await between that check and clearing _flusher. A batch
        # store() wrote already (``_written``) is waited for first.
        batch: list[_Item] = []
        try:
            if self._written is not None:
                written, self._written = self._written, None
                batch = written.items
                await self._send(batch, written)
                batch = []
            while self._pending:
                batch, self._pending = self._pending, []
                await self._send(batch)
                batch = []
        except BaseException as exc:
            error = _error("the result store was closed" if isinstance(
                exc, asyncio.CancelledError) else exc)
            _fail(batch, error)
            _fail(self._pending, error)
            self._pending = []
            if isinstance(exc, asyncio.CancelledError):
                raise
            # A bug: its callers got the error; log it here, nobody awaits this task.
            logger.exception("redis result store: the result writer failed")
        finally:
            if self._flusher is asyncio.current_task():
                self._flusher = None

    async def _send(self, batch: list[_Item], written: _Batch | None = None) -> None:
        # Written as queued: every record is on the wire, cancelled or not.
        items = batch if written is not None else [item for item in batch if not item[2].done()]
        load = False
        retried = False
        while items:
            reused = written is not None or (self._conn is not None and self._conn.is_open)
            try:
                if self._client is None and not reused:
                    self._conn = None
                    assert self._connect is not None
                    self._conn = await self._connect()
                async with asyncio.timeout(self._timeout):
                    noscript = await self._roundtrip(items, load, written)
            except (RedisError, OSError) as exc:
                # OSError covers ConnectionError, WireError and TimeoutError (no reply in
                # time). The connection is out of step: dropped.
                written = None
                await self._disconnect()
                items = [item for item in items if not item[2].done()]
                if reused and not retried and self._client is None:
                    retried = True
                    logger.debug("redis result store: writer connection lost (%s); "
                                 "sending %d record(s) again", exc, len(items))
                    continue
                _fail(items, _error(str(exc) or type(exc).__name__))
                return
            written = None
            if noscript and load:  # loaded, and still unknown: do not loop
                _fail(noscript, _error("NOSCRIPT after SCRIPT LOAD"))
                return
            items, load = noscript, True

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()

    def _command(self, items: list[_Item], load: bool) -> list[bytes]:
        """The bytes of one batch: an EVALSHA per record, behind SCRIPT LOAD if ``load``."""
        head, tail = self._head, self._tail
        parts = [self._load] if load else []
        for key, value, _ in items:
            parts += (head, b"$%d\r\n%s\r\n$%d\r\n" % (len(key), key, len(value)), value,
                      b"\r\n", tail)
        return parts

    def _write(self, conn: RedisWire, items: list[_Item], load: bool) -> _Batch:
        """Write a batch on our own connection, its replies claimed for it."""
        batch = _Batch(conn, items, load)
        conn.write(self._command(items, load))
        return batch

    async def _roundtrip(
        self, items: list[_Item], load: bool, written: _Batch | None = None
    ) -> list[_Item]:
        """Send the batch (behind SCRIPT LOAD if ``load``; unless ``written`` already),
        settle each record from its reply; returns the records that got NOSCRIPT."""
        if self._client is not None:
            return await self._pipeline(self._client, items, load)
        batch = written
        if batch is None:
            assert self._conn is not None
            batch = self._write(self._conn, items, load)
            await self._conn.drain()
        await batch.done
        return batch.noscript

    async def _pipeline(self, client: Redis, items: list[_Item], load: bool) -> list[_Item]:
        """The batch as a redis-py pipeline (no transaction), errors returned per command."""
        sha = self.sha.decode()
        async with client.pipeline(transaction=False) as pipe:
            if load:
                pipe.script_load(self._script)
            for key, value, _ in items:
                pipe.evalsha(sha, 1, key, value, self._ttl)
            replies = await pipe.execute(raise_on_error=False)
        if load:
            loaded = replies.pop(0)
            if isinstance(loaded, Exception):
                raise loaded
        noscript: list[_Item] = []
        for item, reply in zip(items, replies, strict=True):
            if isinstance(reply, NoScriptError):
                noscript.append(item)
            elif item[2].done():
                continue
            elif isinstance(reply, Exception):
                item[2].set_exception(_error(reply))
            else:
                item[2].set_result(reply == 1)
        return noscript
