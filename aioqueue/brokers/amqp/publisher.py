"""Publishing with confirms, many messages per socket write.

aiormq's ``basic_publish`` holds the channel lock while the connection's writer task puts
that one message on the socket. Thousands of concurrent ``delay()`` calls then queue on
the lock (``asyncio.Lock`` looks through its waiters on every acquire: quadratic), and each
message costs two task switches, a ``send()`` and pamqp's generic encoder. Here:

* ``send`` encodes the message's frames at once (:mod:`aioqueue.brokers.amqp.frames`,
  the same bytes) and adds them to its channel's batch; the caller awaits the confirm;
* one flusher task per channel, started when a batch begins, takes the whole batch when
  the loop gets to it. Under aiormq's channel lock it numbers the messages (the delivery
  tags the broker counts), registers their confirmation futures in the channel's
  ``confirmations``, where our frame stream (or aiormq's channel) resolves them
  (``basic.ack``/``nack``, single or multiple), and puts them on the connection's write
  queue in chunks of ``_CHUNK`` bytes. It waits for the socket to drain before the next
  batch (backpressure; meanwhile the next batch grows), and keeps at most
  ``_MAX_UNCONFIRMED`` messages
  waiting for their confirm;
* a publish while nothing else is being written (no batch, an empty write queue: a lone
  ``delay()``) is numbered and queued at once, without the flusher's loop iteration.

A publish cancelled before its batch is written is left out of it, so the broker never sees
it; once written (or queued at once), it is sent and its confirm ignored, as with aiormq.
When the channel closes, every message not yet confirmed fails with the reason, as aiormq's
own futures do.

This relies on attributes of aiormq's ``Channel`` that aiormq does not document, read in
:mod:`aioqueue.brokers.amqp.internals` on our own channels only. ``supports()`` checks them;
without them the broker warns once and publishes with aiormq's ``basic_publish``, as it does
with the fast paths off.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiormq.abc import AbstractChannel, ChannelFrame
from aiormq.exceptions import ChannelInvalidStateError

from ...protocol import Envelope
from . import internals
from .frames import encode_publish
from .stream import FrameStream

__all__ = ("ChannelPublisher",)

logger = logging.getLogger("aioqueue.brokers.amqp")

# Bytes per write-queue item: big enough that a batch costs few writes, small enough that
# RabbitMQ starts on the first messages (and confirms them) while the rest are in transit.
_CHUNK = 256 * 1024
# Messages written but not yet confirmed, at most (about: a chunk may pass it). aiormq's
# reader walks every unconfirmed message for each multiple-ack RabbitMQ sends, so with no
# bound a burst of n publishes costs n² steps; this also bounds what waits in memory.
_MAX_UNCONFIRMED = 2048

_Confirmation = asyncio.Future[Any]


class ChannelPublisher:
    """Publishes on one aiormq channel with publisher confirms (see the module docstring)."""

    __slots__ = ("_batch", "_closed", "_flusher", "_loop", "_stream", "channel")

    def __init__(self, channel: AbstractChannel, stream: FrameStream | None) -> None:
        self.channel = channel
        self._stream = stream  # settles our confirms as they are read, when there is one
        self._loop = asyncio.get_running_loop()
        self._batch: list[tuple[bytes, _Confirmation]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed: BaseException | None = None
        channel.closing.add_done_callback(self._on_close)
        if stream is not None:
            stream.confirm_directly(channel)

    @staticmethod
    def supports(channel: AbstractChannel) -> bool:
        """Whether ``channel`` has the aiormq internals this publisher needs."""
        return internals.supports(channel)

    def send(self, envelope: Envelope, *, exchange: str, routing_key: str) -> _Confirmation:
        """Queue one message; the future gets the broker's ``basic.ack`` frame.

        Raises what encoding raises (``TypeError``, ``ValueError``: nothing queued). The
        future fails with ``DeliveryError`` on a nack, and with the channel's close reason if
        it closes first; cancelling it before the batch is written keeps the message out.
        A plain function returning the future, not a coroutine: one object less per
        message held while thousands wait (cyclic GC work grows with them).
        """
        if self._closed is not None:
            raise self._closed
        channel = self.channel
        payload = encode_publish(
            channel.number, exchange, routing_key, envelope, internals.max_body_size(channel)
        )
        confirmation: _Confirmation = self._loop.create_future()
        queue = internals.write_queue(channel)
        futures = internals.confirmations(channel)
        if (self._flusher is None and queue.empty() and not channel.is_closed
                and len(futures) < _MAX_UNCONFIRMED):
            # Nothing else is being written: no batch to wait for, so the message goes to
            # the connection's writer now (a lone publish saves a loop iteration). No await
            # from numbering to queueing, and no flusher holds numbers, so the order holds.
            _number(channel, futures, [(payload, confirmation)])
            queue.put_nowait(ChannelFrame(payload=payload, should_close=False))
            return confirmation
        self._batch.append((payload, confirmation))
        if self._flusher is None:
            self._flusher = self._loop.create_task(self._flush())
        return confirmation

    async def _flush(self) -> None:
        # Messages added while a batch is written make the next batch; the loop ends only
        # when none came, with no await between that check and clearing _flusher.
        batch: list[tuple[bytes, _Confirmation]] = []
        try:
            while self._batch:
                batch, self._batch = self._batch, []
                await self._write(batch)
        except BaseException as exc:
            error = self._closed or _reason(_close_reason(self.channel) or exc, self.channel)
            _fail(batch, error)
            _fail(self._batch, error)
            self._batch = []
            if not isinstance(exc, asyncio.CancelledError | ChannelInvalidStateError):
                logger.error("publishing on AMQP channel %s failed: %s", self.channel, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if self._flusher is asyncio.current_task():
                self._flusher = None

    async def _write(self, batch: list[tuple[bytes, _Confirmation]]) -> None:
        channel: Any = self.channel
        drained: asyncio.Future[Any] | None = None
        # The lock raises ChannelInvalidStateError once the channel closed.
        async with internals.channel_lock(channel):
            confirmations = internals.confirmations(channel)
            live = [item for item in batch if not item[1].done()]  # cancelled: never sent
            group: list[tuple[bytes, _Confirmation]] = []
            size = 0
            for index, item in enumerate(live):
                group.append(item)
                size += len(item[0])
                last = index + 1 == len(live)
                if size < _CHUNK and not last:
                    continue
                await _room(channel, confirmations)
                group = [item for item in group if not item[1].done()]  # cancelled meanwhile
                if group:
                    drained = channel.create_future() if last else None  # rejected on close
                    await _put(channel, confirmations, group, drained)
                group, size = [], 0
        if drained is not None:
            await drained

    def _on_close(self, closing: asyncio.Future[Any]) -> None:
        if self._stream is not None:
            self._stream.stop_confirming_directly(self.channel)
        self._closed = _reason(_close_reason(self.channel), self.channel)
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
        _fail(self._batch, self._closed)
        self._batch = []
        for future in list(internals.confirmations(self.channel).values()):
            if isinstance(future, asyncio.Future) and not future.done():
                future.set_exception(self._closed)


def _number(
    channel: Any, confirmations: dict[int, Any], group: list[tuple[bytes, _Confirmation]]
) -> int:
    """Give ``group`` the next delivery tags (RabbitMQ counts them); returns the first."""
    first_tag = internals.take_delivery_tags(channel, len(group))
    for tag, (_, future) in enumerate(group, first_tag):
        confirmations[tag] = future  # before the bytes leave: acks may follow fast
    return first_tag


async def _put(
    channel: Any, confirmations: dict[int, Any], group: list[tuple[bytes, _Confirmation]],
    drained: asyncio.Future[Any] | None,
) -> None:
    """Number ``group`` and queue it as one write."""
    first_tag = _number(channel, confirmations, group)
    frame = ChannelFrame(payload=b"".join([payload for payload, _ in group]),
                         should_close=False, drain_future=drained)
    try:
        await internals.write_queue(channel).put(frame)
    except BaseException:
        # Not sent: give the tags back, so the next ones match the broker's count.
        internals.give_back_delivery_tags(channel, first_tag)
        for tag in range(first_tag, first_tag + len(group)):
            confirmations.pop(tag, None)
        raise


async def _room(channel: Any, confirmations: dict[int, Any]) -> None:
    """Wait until fewer than ``_MAX_UNCONFIRMED`` messages await their confirm.

    Confirms come in order, so waiting for the oldest unconfirmed one is enough; one its
    publisher cancelled stays listed until RabbitMQ confirms it, hence the short sleep then.
    """
    while len(confirmations) >= _MAX_UNCONFIRMED:
        if channel.is_closed:
            raise ChannelInvalidStateError(f"AMQP channel {channel} closed")
        oldest = next((f for f in confirmations.values() if not f.done()), None)
        if oldest is None:
            await asyncio.sleep(0.001)
        else:
            await asyncio.wait([oldest])


def _close_reason(channel: Any) -> BaseException | None:
    """Why ``channel`` closed, if it did (None for a plain close)."""
    if not channel.is_closed:
        return None
    closing = channel.closing  # the closing future itself once it is done
    return None if closing.cancelled() else closing.exception()


def _reason(exc: BaseException | None, channel: AbstractChannel) -> BaseException:
    """What a waiting publish raises: the close reason, or that the channel is closed.

    aiormq fails its futures with a bare ``Exception`` when a channel closes for no
    reason; that says nothing, and callers know what to do with the closed channel error.
    """
    if isinstance(exc, Exception) and type(exc) is not Exception:
        return exc
    return ChannelInvalidStateError(f"AMQP channel {channel} closed")


def _fail(batch: list[tuple[bytes, _Confirmation]], error: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
