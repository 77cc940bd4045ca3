"""Acks and rejects of an AMQP consumer: written once per loop iteration, not one frame (and
one ``send()``) each: ``ack()``/``reject()`` queue the settle and wait until it is on the
connection's write queue (as aiormq's ``basic_ack(wait=False)`` did), and a flusher task,
created by the first settle of a batch, writes the whole batch as one ``ChannelFrame`` when
the loop gets to it (after the callbacks already scheduled: no timer, no added wait). A
settle of the only delivery handed out, with nothing pending, goes to the write queue at
once instead (no other settle could join its batch; see ``Settler.settle``). Within a batch,
rejects come first, then acks: one ``basic.ack multiple=True`` up to the highest acked tag
below the lowest delivery still unsettled on that channel, then single acks for the rest. A
multiple ack therefore never covers a delivery that is not settled, nor one being rejected
(its reject is already written). Delivery tags are per channel and come in ascending order,
and every tag delivered to the consumer is registered before anything else happens to it, so
"the lowest unsettled tag" is known exactly (see ``Tags``).

The frames go on the connection's write queue (of our own aiormq channels, through
:mod:`aioqueue.brokers.amqp.internals`). With the fast paths off, each settle
is aiormq's own ``basic_ack``/``basic_reject``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Sequence
from typing import Any

from aiormq.abc import AbstractChannel, ChannelFrame

from . import internals
from .constants import ACK, FRAME_END, METHOD, REJECT

__all__ = ("Settler", "Tags", "ack_frame", "reject_frame")

logger = logging.getLogger("aioqueue.brokers.amqp")


# basic.ack (class 60, method 80) and basic.reject (60, 90) method frames: frame type 1, the
# channel, payload size 13 (class, method, delivery tag, one flag octet), frame end 0xCE.
_SETTLE_FRAME = struct.Struct(">BHIHHQBB")


def ack_frame(channel: int, tag: int, multiple: bool) -> bytes:
    return _SETTLE_FRAME.pack(METHOD, channel, 13, *ACK, tag, multiple, FRAME_END)


def reject_frame(channel: int, tag: int, requeue: bool) -> bytes:
    return _SETTLE_FRAME.pack(METHOD, channel, 13, *REJECT, tag, requeue, FRAME_END)


class Tags:
    """The delivery tags of one aiormq channel that may still be unsettled at the broker.

    ``open`` holds every tag delivered to the consumer on this channel, in delivery (=
    ascending) order, until it is settled and everything before it is too; ``settled``
    holds the tags in ``open`` that are settled already. So ``open[0]``, once settled ones
    are popped off the front, is the lowest tag the broker still holds for us.
    """

    __slots__ = ("channel", "open", "settled")

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.open: deque[int] = deque()
        self.settled: set[int] = set()

    def frames(self, acks: list[int], rejects: list[tuple[int, bool]]) -> bytes:
        """The frames settling these tags (see the module docstring), marking them settled."""
        number = self.channel.number
        parts = [reject_frame(number, tag, requeue) for tag, requeue in rejects]
        settled, open_ = self.settled, self.open
        settled.update(tag for tag, _ in rejects)
        settled.update(acks)
        upto = 0
        while open_ and open_[0] in settled:
            tag = open_.popleft()
            settled.discard(tag)
            upto = tag
        # The highest tag acked now at or below ``upto`` (a tag the broker still holds):
        # every tag up to it is settled, so one multiple ack covers the acks up to it.
        covered = max((tag for tag in acks if tag <= upto), default=0)
        if covered:
            parts.append(ack_frame(number, covered, True))
        parts += [ack_frame(number, tag, False) for tag in acks if tag > covered]
        if len(settled) > 64 and len(settled) * 2 > len(open_):
            # One old delivery (an ETA held for hours) blocks the front: drop the settled
            # tags behind it, so memory stays proportional to what is unsettled.
            self.open = deque(tag for tag in open_ if tag not in settled)
            settled.clear()
        return b"".join(parts)


class Settler:
    """A consumer's pending acks and rejects, written once per loop iteration; with the fast
    paths off (``fast`` False), each sent by aiormq's own ``basic_ack``/``basic_reject``."""

    __slots__ = ("_flusher", "_pending", "_sending", "_waiters", "fast")

    def __init__(self, fast: bool) -> None:
        self.fast = fast
        self._pending: list[tuple[Tags, int, bool | None]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()  # aiormq's calls, when not fast

    def settle(
        self, tags: Tags, tag: int, requeue: bool | None, alone: bool = False
    ) -> asyncio.Future[None]:
        """Queue an ack (``requeue`` None) or reject; the future is done once it is written
        to the connection's queue (or known to be lost with its channel, logged).

        ``alone``: the caller holds the only delivery handed out, so no other settle can
        join this one's batch. With nothing pending either, the frame goes to the
        connection's write queue at once, without the flusher's loop iteration.
        """
        loop = asyncio.get_running_loop()
        if not self.fast:
            task = loop.create_task(_send(tags.channel, tag, requeue), name="aioqueue amqp ack")
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
            return task
        written: asyncio.Future[None] = loop.create_future()
        if alone and self._flusher is None and not self._pending:
            channel: Any = tags.channel
            queue = internals.write_queue(channel)
            if not channel.is_closed and not queue.full():
                acks, rejects = ([], [(tag, requeue)]) if requeue is not None else ([tag], [])
                queue.put_nowait(ChannelFrame(payload=tags.frames(acks, rejects),
                                              should_close=False))
                written.set_result(None)
                return written
        self._pending.append((tags, tag, requeue))
        self._waiters.append(written)
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush(), name="aioqueue amqp acks")
        return written

    async def written(self) -> None:
        """Until every settle queued so far is written (or known lost)."""
        if self._sending:
            await asyncio.wait(set(self._sending))
        if self._flusher is None and not self._pending:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    async def _flush(self) -> None:
        # Settles queued while a batch is written make the next batch; the loop ends only
        # when none came, with no await between that check and clearing _flusher.
        try:
            while self._pending or self._waiters:
                pending, self._pending = self._pending, []
                waiters, self._waiters = self._waiters, []
                try:
                    await self._write(pending)
                finally:
                    _wake(waiters)
        finally:
            if self._flusher is asyncio.current_task():
                self._flusher = None

    async def _write(self, pending: list[tuple[Tags, int, bool | None]]) -> None:
        batches: dict[Tags, tuple[list[int], list[tuple[int, bool]]]] = {}
        for tags, tag, requeue in pending:
            batch = batches.get(tags)
            if batch is None:
                batch = batches[tags] = ([], [])
            if requeue is None:
                batch[0].append(tag)
            else:
                batch[1].append((tag, requeue))
        unsent = list(batches.items())
        while unsent:
            tags, (acks, rejects) = unsent.pop(0)
            channel: Any = tags.channel
            if channel.is_closed:
                _lost_batch(tags, acks, rejects, "channel closed")
                continue
            frame = ChannelFrame(payload=tags.frames(acks, rejects), should_close=False)
            queue = internals.write_queue(channel)
            try:
                queue.put_nowait(frame)
                continue
            except asyncio.QueueFull:
                pass
            # Wait for room, but not on a connection that is gone (its queue is never
            # emptied again): the channel closes with it.
            put = asyncio.ensure_future(queue.put(frame))
            try:
                await asyncio.wait((put, channel.closing), return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:  # abandon(): the connection is closing
                for lost_tags, (lost_acks, lost_rejects) in [(tags, (acks, rejects)), *unsent]:
                    _lost_batch(lost_tags, lost_acks, lost_rejects, "the connection is closing")
                raise
            finally:
                sent = put.done()
                if not sent:
                    put.cancel()
            if not sent:
                _lost_batch(tags, acks, rejects, "channel closed")

    def abandon(self) -> None:
        """The connection is closing: stop, and say what could not be written."""
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()  # it logs its own batch and wakes its waiters
        for task in self._sending:
            task.cancel()  # each logs its own settle
        _lost(self._pending, "the connection is closing")
        self._pending = []
        _wake(self._waiters)
        self._waiters = []


async def _send(channel: AbstractChannel, tag: int, requeue: bool | None) -> None:
    """One settle through aiormq's public API (the fast paths off); never raises."""
    try:
        if requeue is None:
            await channel.basic_ack(tag)
        else:
            await channel.basic_reject(tag, requeue=requeue)
    except asyncio.CancelledError:
        _lost_one(tag, requeue, "the connection is closing")
    except Exception as exc:
        _lost_one(tag, requeue, str(exc) or type(exc).__name__)


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def _lost_batch(tags: Tags, acks: list[int], rejects: list[tuple[int, bool]], reason: str) -> None:
    _lost([(tags, tag, None) for tag in acks] + [(tags, tag, r) for tag, r in rejects], reason)


def _lost(settles: Sequence[tuple[Tags, int, bool | None]], reason: str) -> None:
    for _, tag, requeue in settles:
        _lost_one(tag, requeue, reason)


def _lost_one(tag: int, requeue: bool | None, reason: str) -> None:
    logger.warning(
        "could not %s delivery %d (%s); RabbitMQ will deliver it again",
        "ack" if requeue is None else "reject", tag, reason,
    )
