"""Our own transport under aiormq, for the connections aioqueue opens, and only those.

aiormq opens its socket through a ``TransportFactory``, a public parameter of its
``Connection`` that aio-pika passes on when a connection class lists it in ``PARAMETERS``
(``WireConnection``). ``FrameStreamFactory`` opens the socket with ``FrameStream`` as its
protocol: our own ``asyncio.Protocol``, whose ``data_received`` cuts the incoming bytes
into whole frames before aiormq sees any of them, and

* hands each whole delivery for a consumer registered with ``deliver_directly`` straight
  to that consumer's callback, as the ``DeliveredMessage`` aiormq would have built (the
  frames read by :mod:`aioqueue.brokers.amqp.decoding`). aiormq would queue the frames for
  the channel's reader task and start one more task per delivery to call the consumer:
  two loop passes and a task saved per message (~55 µs of a no-op round trip here);
* settles the publisher confirms (``basic.ack``) of a channel registered with
  ``confirm_directly``, in the callback that read them, instead of two task switches
  later (connection reader, channel reader);
* feeds everything else, whole frames in their order and unchanged, to the
  ``StreamReader`` aiormq reads from (through asyncio's public ``StreamReaderProtocol``,
  which also keeps the writer's flow control).

Order. A delivery handed over never overtakes an earlier delivery of its channel: a
registered consumer's delivery that must take aiormq's path (a frame our readers find
unusual: aiormq and pamqp decide what it is) makes every later delivery on that channel
take aiormq's path too, until the consumer registers again (after a reconnect). A nack, a
returned message or a channel close on a confirming channel ends its direct confirms the
same way, so no ack is settled ahead of them. A delivery whose frames are not all there yet
waits, with everything behind it, for the bytes still to come.

aiormq counts a connection that sent no frame for three heartbeat intervals as dead; while
deliveries and confirms flow past it, it is handed a heartbeat frame at least once a second.

Nothing here touches aiormq's or asyncio's internals: the factory and ``PARAMETERS`` are
their extension points, the protocol is ours. The confirms settled here are the futures of
our own publishing channel (:mod:`aioqueue.brokers.amqp.internals`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
from collections.abc import Callable
from typing import Any

import aio_pika
from aio_pika.abc import ConnectionParameter
from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.connection import TransportFactory
from aiormq.exceptions import AMQPConnectionError
from pamqp import commands as spec
from yarl import URL

from . import internals
from .constants import (
    ACK,
    BODY,
    CHANNEL_CLOSE,
    DELIVER,
    FRAME_END,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    HEADER,
    HEARTBEAT,
    HEARTBEAT_FRAME,
    METHOD,
    METHOD_ID,
    NACK,
    RETURN,
)
from .decoding import LAYOUT_MATCHES, read_content_header, read_deliver

__all__ = ("FrameStream", "FrameStreamFactory", "WireConnection")

logger = logging.getLogger("aioqueue.brokers.amqp")

Callback = Callable[[DeliveredMessage], object]

_FRAME_TYPES = frozenset((METHOD, HEADER, BODY, HEARTBEAT))
_SMALLEST_FRAME = FRAME_HEADER_SIZE + 1
_INCOMPLETE = -1  # a delivery whose frames are not all there yet
_ACK_FRAME_SIZE = FRAME_HEADER_SIZE + 4 + 9 + 1  # class, method, delivery tag, bits; end
_TAG_BITS = struct.Struct(">QB")
_BODY_SIZE = struct.Struct(">Q")  # in a content header, after class id and weight
_KEEPALIVE = 1.0  # seconds between heartbeats handed to aiormq while frames go past it


class FrameStream(asyncio.Protocol):
    """The protocol of one of our AMQP sockets (see the module docstring)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.inner = asyncio.StreamReaderProtocol(reader)  # what aiormq's reader is fed by
        #: Seconds, for the keepalive (the loop's clock; a test may give its own).
        self.clock: Callable[[], float] = asyncio.get_running_loop().time
        self._pending = bytearray()  # bytes of frames not whole yet (or a delivery's)
        self._raw = False  # not AMQP frames (a refused protocol header): all to aiormq
        self._consumers: dict[str, tuple[AbstractChannel, Callback]] = {}  # by consumer tag
        self._confirming: dict[int, AbstractChannel] = {}  # by channel number
        self._keepalive_at = 0.0
        self._action: Callable[[], object] | None = None  # found by _take, run by _hand_over
        #: Deliveries handed over and confirms settled here (for tests and curiosity).
        self.handled = 0

    # Registrations, by the consumers and publishers of this connection.

    def deliver_directly(self, consumer_tag: str, channel: AbstractChannel, callback: Callback
                         ) -> None:
        """Hand deliveries for ``consumer_tag`` on ``channel`` to ``callback`` from here;
        registered before the ``basic.consume``. The callback must not raise."""
        self._consumers[consumer_tag] = (channel, callback)

    def stop_delivering_directly(self, consumer_tag: str) -> None:
        self._consumers.pop(consumer_tag, None)

    def confirm_directly(self, channel: AbstractChannel) -> None:
        """Settle the confirms of ``channel`` (in confirm mode; its futures in
        ``channel.confirmations``) from here; registered before its first publish."""
        self._confirming[channel.number] = channel

    def stop_confirming_directly(self, channel: AbstractChannel) -> None:
        if self._confirming.get(channel.number) is channel:
            del self._confirming[channel.number]

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._flush_pending()
        self._consumers.clear()
        self._confirming.clear()
        self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        self._flush_pending()  # a frame cut short: aiormq says so, as it always did
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self._raw:
            self.inner.data_received(data)
            return
        buffer = self._pending
        buffer += data
        run_start = position = 0  # frames from run_start to position are aiormq's
        fed = handled = False
        size = len(buffer)
        watching = self._consumers or self._confirming
        while size - position >= _SMALLEST_FRAME:
            kind, number, length = FRAME_HEADER.unpack_from(buffer, position)
            end = position + FRAME_HEADER_SIZE + length + 1
            if kind not in _FRAME_TYPES or (end <= size and buffer[end - 1] != FRAME_END):
                self._raw = True  # not a frame: aiormq reads it and raises what it raises
                break
            if end > size:
                break
            if watching and kind == METHOD and length >= 4:
                taken = self._take(buffer, position, end, number)
                if taken == _INCOMPLETE:
                    break
                if taken:
                    if run_start < position:  # what came before it goes first
                        self.inner.data_received(bytes(buffer[run_start:position]))
                        fed = True
                    position = run_start = taken
                    self._hand_over()
                    handled = True
                    continue
            position = end
        if self._raw:
            position = size
        if run_start < position:
            self.inner.data_received(bytes(buffer[run_start:position]))
            fed = True
        del buffer[:position]
        if handled and not fed:
            now = self.clock()
            if now >= self._keepalive_at:
                self._keepalive_at = now + _KEEPALIVE
                self.inner.data_received(HEARTBEAT_FRAME)

    def _hand_over(self) -> None:
        """Run what ``_take`` found: a delivery to its consumer, or confirms settled."""
        action, self._action = self._action, None
        if action is None:
            return
        try:
            action()
        except Exception:  # a bug: the message stays unacknowledged until the channel closes
            logger.exception("could not hand over an AMQP delivery or confirm")

    def _flush_pending(self) -> None:
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            self.inner.data_received(data)

    # The frames handled here

    def _take(self, buffer: bytearray, start: int, end: int, number: int) -> int:
        """Handle the method frame at ``start`` (ending at ``end``) if it is ours: the end
        of what was handled, ``_INCOMPLETE``, or 0 (aiormq's)."""
        method = METHOD_ID.unpack_from(buffer, start + FRAME_HEADER_SIZE)
        if method == DELIVER:
            if self._consumers:
                return self._deliver(buffer, start, end, number)
            return 0
        channel = self._confirming.get(number)
        if channel is not None:
            if method == ACK:
                return self._confirm(buffer, start, end, channel)
            if method == NACK or method == RETURN or method == CHANNEL_CLOSE:
                del self._confirming[number]  # aiormq settles it, and all after it
        return 0

    def _deliver(self, buffer: bytearray, start: int, end: int, number: int) -> int:
        """Hand the delivery at ``start`` to its consumer once all its frames are here."""
        size = len(buffer)
        header_at = end
        if size < header_at + _SMALLEST_FRAME:
            return _INCOMPLETE
        kind, header_number, length = FRAME_HEADER.unpack_from(buffer, header_at)
        header_end = header_at + FRAME_HEADER_SIZE + length + 1
        if kind != HEADER or header_number != number or length < 14:
            return self._leave(buffer, start, end, number)  # aiormq decides what it is
        if size < header_end:
            return _INCOMPLETE
        body_size = _BODY_SIZE.unpack_from(buffer, header_at + FRAME_HEADER_SIZE + 4)[0]
        spans: list[tuple[int, int]] = []
        got = 0
        position: int = header_end
        while got < body_size:
            if size < position + _SMALLEST_FRAME:
                return _INCOMPLETE
            kind, body_number, length = FRAME_HEADER.unpack_from(buffer, position)
            payload = position + FRAME_HEADER_SIZE
            position = payload + length + 1
            if kind != BODY or body_number != number:
                return self._leave(buffer, start, end, number)
            if size < position:
                return _INCOMPLETE
            if buffer[position - 1] != FRAME_END:
                return self._leave(buffer, start, end, number)
            spans.append((payload, payload + length))
            got += length
        deliver = read_deliver(bytes(buffer[start + FRAME_HEADER_SIZE + 4:end - 1]))
        if deliver is None or got != body_size or buffer[header_end - 1] != FRAME_END:
            return self._leave(buffer, start, end, number)
        registered = self._consumers.get(deliver.consumer_tag or "")
        if registered is None:
            return 0  # not ours (a consumer that stopped): aiormq's consumer callback
        channel, callback = registered
        if channel.number != number or channel.is_closed:
            return 0
        header = read_content_header(bytes(buffer[header_at + FRAME_HEADER_SIZE:header_end - 1]))
        if header is None:
            return self._leave(buffer, start, end, number)
        body = b"".join([buffer[a:b] for a, b in spans]) if len(spans) != 1 else bytes(
            buffer[spans[0][0]:spans[0][1]])
        self.handled += 1
        message = DeliveredMessage(delivery=deliver, header=header, body=body, channel=channel)
        self._action = functools.partial(callback, message)
        return position

    def _leave(self, buffer: bytearray, start: int, end: int, number: int) -> int:
        """A delivery on channel ``number`` goes aiormq's way: so does every later one on
        that channel, which would otherwise overtake it."""
        dropped = [tag for tag, (channel, _) in self._consumers.items() if channel.number == number]
        for tag in dropped:
            del self._consumers[tag]
        if dropped:
            logger.info("an unusual delivery on AMQP channel %d takes aiormq's path, and so "
                        "does every later one on that channel", number)
        return 0

    def _confirm(self, buffer: bytearray, start: int, end: int, channel: Any) -> int:
        """Settle the confirms a ``basic.ack`` covers, as aiormq's channel would."""
        if end - start != _ACK_FRAME_SIZE or channel.is_closed:
            return 0
        tag: int
        tag, bits = _TAG_BITS.unpack_from(buffer, start + FRAME_HEADER_SIZE + 4)
        confirmations = internals.confirmations(channel)
        if tag not in confirmations:
            return 0  # aiormq says it is unexpected
        self.handled += 1
        self._action = functools.partial(_settle, confirmations, tag, (bits & 1) != 0)
        return end


def _settle(confirmations: dict[int, Any], tag: int, multiple: bool) -> None:
    """The confirms a ``basic.ack`` covers, settled as aiormq's channel would."""
    frame = spec.Basic.Ack(delivery_tag=tag, multiple=multiple)
    for covered in [t for t in confirmations if t <= tag] if multiple else [tag]:
        confirmation = confirmations.pop(covered, None)
        # Not a future: aiormq's placeholder for a returned message, done with it.
        if isinstance(confirmation, asyncio.Future) and not confirmation.done():
            confirmation.set_result(frame)


class FrameStreamFactory(TransportFactory):
    """Opens each socket of one of our connections with a ``FrameStream`` (reconnects
    included); ``stream`` is the newest one."""

    def __init__(self) -> None:
        self.stream: FrameStream | None = None

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ssl_context_provider = kwargs.pop("ssl_context_provider", None)
        ssl = None
        if url.scheme == "amqps" and ssl_context_provider is not None:
            ssl = await ssl_context_provider.get_context()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        stream = FrameStream(reader)
        try:
            transport, _ = await loop.create_connection(
                lambda: stream, host=url.host or "localhost", port=url.port or 5672, ssl=ssl,
                **kwargs,
            )
        except OSError as exc:
            raise AMQPConnectionError(*exc.args) from exc
        self.stream = stream
        return reader, asyncio.StreamWriter(transport, stream.inner, reader, loop)


def _same(value: Any) -> Any:
    return value


class WireConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection that hands ``transport_factory`` on to aiormq."""

    PARAMETERS = (
        *aio_pika.RobustConnection.PARAMETERS,
        ConnectionParameter(name="transport_factory", parser=_same, is_kwarg=True),
    )


def fast_stream_supported() -> bool:
    """Whether the pinned readers match the installed pamqp (a test checks it)."""
    return LAYOUT_MATCHES
