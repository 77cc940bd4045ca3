"""Result writes pipelined: the stores of one loop iteration go out in one socket write.

One store used to be one redis-py ``execute_command``: a connection checked out of the pool,
``Retry.call_with_retry``, a ``send()`` and a ``read_response()`` for one short Lua call. At
thousands of results a second that was a fifth of a worker's CPU (docs/benchmarks.md,
"Profile"). Here ``ResultWriter.store()`` queues the record and returns a future; a flusher
task, created when the first record of a batch is queued, runs when the event loop gets to it
(right after the callbacks already scheduled in this iteration: no timer, so nothing waits
longer than before), sends every queued ``EVALSHA`` of the store script in one write on a
connection of its own, reads the replies in order and gives each caller its own outcome:
written (True), not written because the key holds SUCCESS (False), or ``ResultStoreError``
(an error reply for that record only, or the connection failing). Records queued while a
batch is in flight make the next batch, so a busy worker sends big batches and an idle one
sends each record at once: a record queued while nothing is in flight, on a connection
already open, is written by ``store()`` itself (the flusher then only reads its reply), which
saves the loop iteration before the flusher runs on a task's latency path.

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

Only the replies are parsed here (integers, errors, one bulk string for SCRIPT LOAD; RESP2
and RESP3 both); the connection and its handshake are redis-py's.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError

from ..exceptions import ResultStoreError
from .base import cancel_and_wait

__all__ = ("ResultWriter",)

logger = logging.getLogger("aioqueue.results.redis")

_Outcome = asyncio.Future[bool]
_Item = tuple[bytes, bytes, _Outcome]  # key, serialized record, the caller's future
# Bytes asked of the socket per read: replies are a few bytes each, a batch's fit in one.
_READ_SIZE = 64 * 1024


class _ErrorReply(str):
    """An error reply (``-ERR ...``), returned as a value so one record's error is its own."""


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


def _parse(data: bytes, pos: int) -> tuple[Any, int]:
    """One reply at ``pos``: (value, position after it). Raises ``_Incomplete``.

    Integers (``:``) are ints, errors (``-``, RESP3 ``!``) ``_ErrorReply``, simple and bulk
    strings bytes, nulls None, aggregates lists (only a RESP3 push could bring one here).
    """
    end = data.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = data[pos]
    line = data[pos + 1:end]
    pos = end + 2
    if kind == 58:  # ':'
        return int(line), pos
    if kind == 36 or kind == 33:  # '$' bulk string, '!' bulk error
        length = int(line)
        if length < 0:
            return None, pos
        stop = pos + length
        if len(data) < stop + 2:
            raise _Incomplete
        value = data[pos:stop]
        return (_ErrorReply(value.decode(errors="replace")) if kind == 33 else value), stop + 2
    if kind == 45:  # '-'
        return _ErrorReply(line.decode(errors="replace")), pos
    if kind == 43:  # '+'
        return line, pos
    if kind == 95:  # '_' RESP3 null
        return None, pos
    if kind in b"*>~%":  # aggregates; a map has two values per entry
        count = int(line) * (2 if kind == 37 else 1)
        items = []
        for _ in range(max(count, 0)):
            item, pos = _parse(data, pos)
            items.append(item)
        return items, pos
    raise ConnectionError(f"unexpected reply type {chr(kind)!r} from Redis")


def _fail(items: Sequence[_Item], error: BaseException) -> None:
    for _, _, outcome in items:
        if not outcome.done():
            outcome.set_exception(error)


def _error(detail: object) -> ResultStoreError:
    return ResultStoreError(f"redis result store: store failed: {detail}")


class ResultWriter:
    """Runs the store script for queued records, one pipeline per batch (module docstring).

    ``connect`` opens a new connection (raising RedisError/OSError when it cannot);
    ``script`` is the Lua source, called with KEYS[1] = key, ARGV[1] = record, ARGV[2] =
    ``ttl``, returning 1 when written and 0 when skipped. ``timeout`` bounds one batch's
    round trip (None: no bound).
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[AbstractConnection]],
        script: str,
        ttl: int,
        timeout: float | None,
    ) -> None:
        self._connect = connect
        source = script.encode()
        sha = hashlib.sha1(source, usedforsecurity=False).hexdigest().encode()  # Redis's name
        self.sha = sha
        self._head = b"*6\r\n$7\r\nEVALSHA\r\n$40\r\n" + sha + b"\r\n$1\r\n1\r\n"
        ttl_text = str(ttl).encode()
        self._tail = b"$%d\r\n%s\r\n" % (len(ttl_text), ttl_text)
        self._load = b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n$%d\r\n%s\r\n" % (len(source), source)
        self._timeout = timeout
        self._pending: list[_Item] = []
        self._written: list[_Item] = []  # written by store(), for the flusher to read
        self._flusher: asyncio.Task[None] | None = None
        self._conn: AbstractConnection | None = None
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
            if self._write_now(self._pending):
                self._written, self._pending = self._pending, []
            self._flusher = loop.create_task(self._flush(), name="aioqueue redis result writer")
        return outcome

    def _write_now(self, items: list[_Item]) -> bool:
        """Write ``items`` on the open connection now, if nothing else is in flight on it
        (the caller checked: no flusher). False when not connected: the flusher sends."""
        conn = self._conn
        writer = getattr(conn, "_writer", None)
        if conn is None or not conn.is_connected or not isinstance(writer, asyncio.StreamWriter):
            return False
        if writer.is_closing():
            return False
        writer.writelines(self._command(items, load=False))
        return True

    async def close(self) -> None:
        """Stop the flusher, fail what was not answered, disconnect. Idempotent."""
        self._closed = True
        flusher, self._flusher = self._flusher, None
        try:
            if flusher is not None:
                await cancel_and_wait(flusher, "redis result store: result writer")
        finally:
            # A flusher cancelled before it started left both lists to this.
            _fail(self._written + self._pending, _error("the result store was closed"))
            self._written, self._pending = [], []
            await self._disconnect()

    async def _flush(self) -> None:
        # Records queued while a batch is in flight make the next one; the loop ends only
        # when none came, with no await between that check and clearing _flusher. A batch
        # store() wrote already (``_written``) has its replies read first.
        batch: list[_Item] = []
        try:
            if self._written:
                batch, self._written = self._written, []
                await self._send(batch, sent=True)
                batch = []
            while self._pending:
                batch, self._pending = self._pending, []
                await self._send(batch)
                batch = []
        except BaseException as exc:
            error = _error("the result store was closed" if isinstance(
                exc, asyncio.CancelledError) else exc)
            _fail(batch, error)
            _fail(self._written + self._pending, error)
            self._written, self._pending = [], []
            if isinstance(exc, asyncio.CancelledError):
                raise
            # A bug: its callers got the error; log it here, nobody awaits this task.
            logger.exception("redis result store: the result writer failed")
        finally:
            if self._flusher is asyncio.current_task():
                self._flusher = None

    async def _send(self, batch: list[_Item], sent: bool = False) -> None:
        if sent:  # written as queued: every record is on the wire, cancelled or not
            items = batch
        else:
            items = [item for item in batch if not item[2].done()]  # cancelled: never sent
        load = False
        retried = False
        while items:
            conn = self._conn
            reused = conn is not None and conn.is_connected
            try:
                if conn is None or not reused:
                    sent = False  # written on a connection that is gone: send it again
                    self._conn = None
                    conn = self._conn = await self._connect()
                async with asyncio.timeout(self._timeout):
                    noscript = await self._roundtrip(conn, items, load, sent)
                sent = False
            except (RedisError, OSError, ValueError) as exc:
                sent = False
                # OSError covers ConnectionError and TimeoutError (no reply in time);
                # ValueError a reply that does not parse. The connection is out of step.
                await self._disconnect()
                items = [item for item in items if not item[2].done()]
                if reused and not retried:
                    retried = True
                    logger.debug("redis result store: writer connection lost (%s); "
                                 "sending %d record(s) again", exc, len(items))
                    continue
                _fail(items, _error(str(exc) or type(exc).__name__))
                return
            if noscript and load:  # loaded, and still unknown: do not loop
                _fail(noscript, _error("NOSCRIPT after SCRIPT LOAD"))
                return
            items, load = noscript, True

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(RedisError, OSError):
                await conn.disconnect(nowait=True)

    def _command(self, items: list[_Item], load: bool) -> list[bytes]:
        """The bytes of one batch: an EVALSHA per record, behind SCRIPT LOAD if ``load``."""
        head, tail = self._head, self._tail
        parts = [self._load] if load else []
        for key, value, _ in items:
            parts += (head, b"$%d\r\n%s\r\n$%d\r\n" % (len(key), key, len(value)), value,
                      b"\r\n", tail)
        return parts

    async def _roundtrip(
        self, conn: AbstractConnection, items: list[_Item], load: bool, sent: bool = False
    ) -> list[_Item]:
        """Send the batch (behind SCRIPT LOAD if ``load``; unless ``sent`` already), settle
        each record from its reply; returns the records that got NOSCRIPT."""
        if not sent:
            await conn.send_packed_command(self._command(items, load), check_health=False)
        noscript: list[_Item] = []
        position = -1 if load else 0  # -1: the SCRIPT LOAD's reply comes first

        def settle(reply: Any) -> None:
            nonlocal position
            if position < 0:
                position = 0
                if isinstance(reply, _ErrorReply):
                    raise ResponseError(f"SCRIPT LOAD: {reply}")
                return
            item = items[position]
            position += 1
            if isinstance(reply, _ErrorReply):
                if reply.startswith("NOSCRIPT"):
                    noscript.append(item)
                elif not item[2].done():
                    item[2].set_exception(_error(reply))
            elif not item[2].done():
                item[2].set_result(reply == 1)

        await _read_replies(conn, len(items) + load, settle)
        return noscript


async def _read_replies(
    conn: AbstractConnection, count: int, settle: Callable[[Any], None]
) -> None:
    """Read the next ``count`` replies on ``conn``, handing each to ``settle`` on arrival
    (so a connection lost halfway leaves the records already answered settled)."""
    reader = getattr(conn, "_reader", None)
    if not isinstance(reader, asyncio.StreamReader):
        # Not the StreamReader redis-py has always used: one read_response() per reply.
        for _ in range(count):
            try:
                reply = await conn.read_response(disable_decoding=True)
            except ResponseError as exc:
                reply = _ErrorReply(str(exc))
            settle(reply)
        return
    data = b""
    pos = 0
    while count:
        chunk = await reader.read(_READ_SIZE)
        if not chunk:
            raise ConnectionError("Redis closed the connection")
        data = data[pos:] + chunk if pos < len(data) else chunk
        pos = 0
        while count:
            try:
                reply, after = _parse(data, pos)
            except _Incomplete:
                break
            pos = after
            if isinstance(reply, list):
                continue  # a RESP3 push, not a reply to us
            count -= 1
            settle(reply)
    if pos != len(data):
        raise ConnectionError("unexpected bytes after the replies from Redis")
