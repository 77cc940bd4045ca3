"""``amqp_framing``: frames cut whole from the buffer come out exactly as aiormq reads them,
and whole deliveries for a registered consumer go to it, as aiormq's channel would build them.

A stream of real frames (a publisher's deliver, header and body frames, confirms, a
heartbeat, a frame carrying a big body), fed in chunks split at random places, is read by
aiormq's own ``get_frame`` and by ours, and the results must be the same frames on the same
channels with the same sizes. Then the cases ours leaves to aiormq: the protocol header
still unchecked, a read in progress holding the lock, an error or the end of the stream,
and what both raise for a frame without its frame end; and flow control (a paused
transport is resumed once the buffer drains). Deliveries: handed over whole (bodies in one
frame, several, or none), in order with the frames around them; left to aiormq when not all
there, when the channel has frames waiting for aiormq's reader or an earlier delivery on
aiormq's path not yet at the consumer, for another consumer, channel or a closed channel, or
when a frame is malformed; and an idle reader waits for data itself. While it waits,
whole deliveries at the front go to their consumer from the callback the data came in,
anything else wakes it in its turn, it is woken now and then for aiormq's heartbeat watch,
and flow control still holds.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pamqp.frame
import pytest
from aiormq.connection import FrameReceiver
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from aioqueue.brokers import amqp_framing
from aioqueue.brokers.amqp_frames import encode_publish
from aioqueue.brokers.amqp_framing import (
    deliver_directly,
    delivered_through_aiormq,
    stop_delivering_directly,
    use_whole_frame_reading,
)
from aioqueue.protocol import encode_task, new_task_id

use_whole_frame_reading()
AIORMQ_GET_FRAME = amqp_framing._aiormq_get_frame[0]


def delivery(tag: int, body_size: int = 0) -> bytes:
    """The frames a worker receives for one task message (a Deliver in place of the Publish)."""
    envelope = encode_task(task="t.noop", task_id=new_task_id(), args=("x" * body_size,),
                           kwargs={}, reply_to=new_task_id())
    published = encode_publish(3, "", "celery", envelope, 131064)
    size = int.from_bytes(published[3:7])
    deliver = spec.Basic.Deliver(consumer_tag="aioqueue.c", delivery_tag=tag, routing_key="celery")
    return pamqp.frame.marshal(deliver, 3) + published[8 + size:]


def stream(rng: random.Random) -> bytes:
    parts = [pamqp.frame.marshal(Heartbeat(), 0)]
    for tag in range(1, 40):
        kind = rng.randrange(4)
        if kind == 0:
            parts.append(pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=tag, multiple=True), 1))
        else:
            parts.append(delivery(tag, rng.choice([0, 10, 300_000]) if kind == 1 else 0))
    return b"".join(parts)


def comparable(received: Any) -> tuple[Any, ...]:
    size, channel, frame = received
    return size, channel, type(frame), pamqp.frame.marshal(frame, channel)


async def read_all(data: bytes, rng: random.Random, get_frame: Any) -> list[tuple[Any, ...]]:
    """Feed ``data`` in random chunks, reading every frame as it becomes available."""
    reader = asyncio.StreamReader()
    receiver = FrameReceiver(reader)
    receiver.started = True
    out: list[tuple[Any, ...]] = []

    async def feed() -> None:
        position = 0
        while position < len(data):
            step = rng.choice([1, 7, 8, 100, 4096, 70_000])
            reader.feed_data(data[position:position + step])
            position += step
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    for _ in range(count_frames(data)):
        out.append(comparable(await get_frame(receiver)))
    await feeder
    with pytest.raises(StopAsyncIteration):  # at the end of the stream, as aiormq's
        await get_frame(receiver)
    return out


def count_frames(data: bytes) -> int:
    count = position = 0
    while position < len(data):
        position += 8 + int.from_bytes(data[position + 3:position + 7])
        count += 1
    return count


@pytest.mark.parametrize("seed", range(8))
async def test_the_same_frames_as_aiormq_reads(seed: int) -> None:
    data = stream(random.Random(seed))
    theirs = await read_all(data, random.Random(seed), AIORMQ_GET_FRAME)
    ours = await read_all(data, random.Random(seed + 100), FrameReceiver.get_frame)
    assert ours == theirs
    assert len(ours) > 40


async def test_the_protocol_header_is_left_to_aiormq() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"AMQP\x00\x00\x09\x01")  # the server refusing our protocol version
    with pytest.raises(ProtocolSyntaxError):
        await FrameReceiver(reader).get_frame()


async def test_a_read_in_progress_keeps_the_next_bytes() -> None:
    ack = pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=1), 1)
    second = pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=2), 1)
    reader = asyncio.StreamReader()
    receiver = FrameReceiver(reader)
    receiver.started = True
    reader.feed_data(ack[:5])
    first = asyncio.create_task(receiver.get_frame())  # holds the lock, waits for the rest
    await asyncio.sleep(0)
    reader.feed_data(ack[5:] + second)
    later = await receiver.get_frame()  # must not take the first frame's bytes
    assert (await first)[2].delivery_tag == 1
    assert later[2].delivery_tag == 2


async def test_an_error_or_the_end_of_the_stream_is_aiormq_s() -> None:
    ack = pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=1), 1)
    reader = asyncio.StreamReader()
    receiver = FrameReceiver(reader)
    receiver.started = True
    reader.feed_data(ack)
    reader.set_exception(ConnectionResetError("reset"))
    with pytest.raises(AMQPConnectionError, match="reset"):
        await receiver.get_frame()
    ended = FrameReceiver(asyncio.StreamReader())
    ended.started = True
    ended.reader.feed_eof()
    with pytest.raises(StopAsyncIteration):
        await ended.get_frame()


async def test_a_frame_without_its_end_is_an_invalid_frame_either_way() -> None:
    broken = bytearray(pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=1), 1))
    broken[-1] = 0
    errors = []
    for get_frame in (AIORMQ_GET_FRAME, FrameReceiver.get_frame):
        reader = asyncio.StreamReader()
        receiver = FrameReceiver(reader)
        receiver.started = True
        reader.feed_data(bytes(broken))
        with pytest.raises(InvalidFrameError) as info:
            await get_frame(receiver)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


class PausableTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


async def test_a_paused_transport_is_resumed_once_the_buffer_drains() -> None:
    reader = asyncio.StreamReader(limit=1024)
    transport = PausableTransport()
    reader.set_transport(transport)
    receiver = FrameReceiver(reader)
    receiver.started = True
    frames = [pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=tag), 1) for tag in range(200)]
    reader.feed_data(b"".join(frames))  # over twice the limit: the reader pauses it
    assert transport.paused
    tags = [(await receiver.get_frame())[2].delivery_tag for _ in frames]
    assert tags == list(range(200))
    assert not transport.paused


def test_installed_once() -> None:
    use_whole_frame_reading()
    assert amqp_framing._aiormq_get_frame == [AIORMQ_GET_FRAME]
    assert FrameReceiver.get_frame is amqp_framing._get_frame


# --------------------------------------------------------------------------------------------
# Whole deliveries
# --------------------------------------------------------------------------------------------


class FakeChannel:
    """What the frame reader looks at on an aiormq channel."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.is_closed = False
        self.frames: asyncio.Queue[Any] = asyncio.Queue()


def deliver_frames(channel: int, tag: int, body: bytes, consumer: str = "aioqueue.c",
                   frame_body: int = 100_000) -> bytes:
    properties = spec.Basic.Properties(content_type="application/json", delivery_mode=2,
                                       headers={"id": str(tag), "task": "t.noop"})
    parts = [
        pamqp.frame.marshal(spec.Basic.Deliver(consumer_tag=consumer, delivery_tag=tag,
                                               routing_key="celery"), channel),
        pamqp.frame.marshal(ContentHeader(0, len(body), properties), channel),
    ]
    parts += [pamqp.frame.marshal(ContentBody(body[at:at + frame_body]), channel)
              for at in range(0, len(body), frame_body)]
    return b"".join(parts)


@pytest.fixture
def consumer() -> Any:
    channel = FakeChannel(3)
    got: list[Any] = []
    deliver_directly("aioqueue.c", channel, got.append)  # type: ignore[arg-type]
    yield channel, got
    stop_delivering_directly("aioqueue.c")


def started(data: bytes = b"") -> FrameReceiver:
    reader = asyncio.StreamReader()
    receiver = FrameReceiver(reader)
    receiver.started = True
    if data:
        reader.feed_data(data)
    return receiver


def summary(message: Any) -> tuple[Any, ...]:
    return (message.delivery_tag, message.body, message.header.body_size,
            message.header.properties.headers, message.delivery.routing_key)


async def test_whole_deliveries_go_to_their_consumer(consumer: Any) -> None:
    channel, got = consumer
    ack = pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=9), 1)
    big = bytes(range(256)) * 1000
    data = (deliver_frames(3, 1, b"[[], {}, {}]") + ack + deliver_frames(3, 2, b"")
            + deliver_frames(3, 3, big, frame_body=100_000))
    receiver = started(data)
    first = await receiver.get_frame()
    assert first[2].delivery_tag == 9  # the frame behind the first delivery, in its turn
    assert [m.delivery_tag for m in got] == [1]
    assert await receiver.get_frame() == amqp_framing._NOTHING_ELSE
    assert [summary(m) for m in got] == [
        (1, b"[[], {}, {}]", 12, {"id": "1", "task": "t.noop"}, "celery"),
        (2, b"", 0, {"id": "2", "task": "t.noop"}, "celery"),
        (3, big, len(big), {"id": "3", "task": "t.noop"}, "celery"),
    ]
    assert all(m.channel is channel for m in got)
    assert not receiver.reader._buffer  # type: ignore[attr-defined]


async def test_an_idle_reader_waits_and_hands_over(consumer: Any) -> None:
    _, got = consumer
    receiver = started()
    reading = asyncio.create_task(receiver.get_frame())
    await asyncio.sleep(0)
    data = deliver_frames(3, 5, b"body")
    receiver.reader.feed_data(data[:30])  # not all there yet: still waiting
    await asyncio.sleep(0)
    assert not reading.done()
    receiver.reader.feed_data(data[30:])
    assert [m.body for m in got] == [b"body"]  # handed over as it came (see _Feed below)
    reading.cancel()


async def test_the_end_or_an_error_while_waiting_is_aiormq_s(consumer: Any) -> None:
    receiver = started()
    reading = asyncio.create_task(receiver.get_frame())
    await asyncio.sleep(0)
    receiver.reader.feed_data(b"\x01\x00")
    receiver.reader.feed_eof()
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await reading
    receiver = started()
    reading = asyncio.create_task(receiver.get_frame())
    await asyncio.sleep(0)
    receiver.reader.set_exception(ConnectionResetError("reset"))
    with pytest.raises(AMQPConnectionError, match="reset"):
        await reading


async def frames_read(receiver: FrameReceiver, count: int) -> list[Any]:
    return [type((await receiver.get_frame())[2]) for _ in range(count)]


ON_AIORMQ_S_PATH = [spec.Basic.Deliver, ContentHeader, ContentBody]


async def test_a_delivery_not_all_there_is_aiormq_s(consumer: Any) -> None:
    _, got = consumer
    data = deliver_frames(3, 1, b"body")
    receiver = started(data[:-3])
    assert await frames_read(receiver, 2) == ON_AIORMQ_S_PATH[:2]
    receiver.reader.feed_data(data[-3:])
    assert await frames_read(receiver, 1) == ON_AIORMQ_S_PATH[2:]
    assert got == []


async def test_frames_waiting_for_aiormq_s_channel_reader_are_not_overtaken(
    consumer: Any,
) -> None:
    channel, got = consumer
    channel.frames.put_nowait((0, spec.Basic.ConsumeOk(consumer_tag="aioqueue.c")))
    receiver = started(deliver_frames(3, 1, b"body"))
    assert await frames_read(receiver, 3) == ON_AIORMQ_S_PATH
    assert got == []


@pytest.mark.parametrize("case", ["other consumer", "other channel", "closed", "stopped"])
async def test_deliveries_for_nobody_registered_are_aiormq_s(consumer: Any, case: str) -> None:
    channel, got = consumer
    data = deliver_frames(3, 1, b"body")
    if case == "other consumer":
        data = deliver_frames(3, 1, b"body", consumer="someone.else")
    elif case == "other channel":
        data = deliver_frames(4, 1, b"body")
    elif case == "closed":
        channel.is_closed = True
    else:
        stop_delivering_directly("aioqueue.c")
    assert await frames_read(started(data), 3) == ON_AIORMQ_S_PATH
    assert got == []


async def test_a_malformed_delivery_is_aiormq_s_to_refuse(consumer: Any) -> None:
    _, got = consumer
    data = bytearray(deliver_frames(3, 1, b"body"))
    data[-1] = 0  # the body frame's end
    receiver = started(bytes(data))
    assert await frames_read(receiver, 2) == ON_AIORMQ_S_PATH[:2]
    with pytest.raises(InvalidFrameError):
        await receiver.get_frame()
    assert got == []


async def test_a_failing_callback_is_logged_and_reading_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(message: Any) -> None:
        raise RuntimeError("a bug")

    deliver_directly("aioqueue.c", FakeChannel(3), broken)  # type: ignore[arg-type]
    try:
        ack = pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=9), 1)
        receiver = started(deliver_frames(3, 1, b"body") + ack)
        assert (await receiver.get_frame())[2].delivery_tag == 9
    finally:
        stop_delivering_directly("aioqueue.c")
    assert "could not hand over an AMQP delivery" in caplog.text


async def test_no_delivery_overtakes_one_still_on_aiormq_s_path(consumer: Any) -> None:
    # aiormq hands a delivery to the consumer from a task, a loop iteration after its
    # channel reader took the frames: until the consumer has it, later ones wait their turn
    # on the same path (a consumer merging acks counts on the order).
    channel, got = consumer
    first, second = deliver_frames(3, 1, b"one"), deliver_frames(3, 2, b"two")
    receiver = started(first[:-2])  # not all there: aiormq's path
    assert await frames_read(receiver, 2) == ON_AIORMQ_S_PATH[:2]
    receiver.reader.feed_data(first[-2:] + second)
    assert await frames_read(receiver, 4) == [ContentBody, *ON_AIORMQ_S_PATH]
    assert got == []
    delivered_through_aiormq(channel)  # what the consumer's aiormq callback does, each
    receiver.reader.feed_data(deliver_frames(3, 3, b"three"))
    assert await frames_read(receiver, 3) == ON_AIORMQ_S_PATH  # the second is on the way
    delivered_through_aiormq(channel)
    delivered_through_aiormq(channel)  # the third: none left, directly from now on
    receiver.reader.feed_data(deliver_frames(3, 4, b"four"))
    assert await receiver.get_frame() == amqp_framing._NOTHING_ELSE
    assert [m.delivery_tag for m in got] == [4]


# --------------------------------------------------------------------------------------------
# Deliveries handed over as data comes in (``_Feed``), while the reader task waits
# --------------------------------------------------------------------------------------------


async def parked(receiver: FrameReceiver) -> asyncio.Task[Any]:
    """A reader task waiting in ``get_frame`` for data, as aiormq's is when idle."""
    reading = asyncio.create_task(receiver.get_frame())
    await asyncio.sleep(0)
    assert not reading.done()
    return reading


async def still_waiting(reading: asyncio.Task[Any]) -> bool:
    for _ in range(3):
        await asyncio.sleep(0)
    return not reading.done()


async def test_a_delivery_goes_to_its_consumer_in_the_callback_that_read_it(
    consumer: Any,
) -> None:
    _, got = consumer
    receiver = started()
    reading = await parked(receiver)
    receiver.reader.feed_data(deliver_frames(3, 1, b"one"))  # what data_received calls
    assert [m.body for m in got] == [b"one"]  # before any task ran
    assert await still_waiting(reading)  # nothing else came: the reader task sleeps on
    receiver.reader.feed_data(deliver_frames(3, 2, b"two") + deliver_frames(3, 3, b"three"))
    assert [m.delivery_tag for m in got] == [1, 2, 3]
    assert await still_waiting(reading)
    reading.cancel()


async def test_what_is_not_a_whole_delivery_wakes_the_reader_and_keeps_its_place(
    consumer: Any,
) -> None:
    _, got = consumer
    receiver = started()
    reading = await parked(receiver)
    ack = pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=9), 1)
    second = deliver_frames(3, 2, b"two")
    receiver.reader.feed_data(deliver_frames(3, 1, b"one") + ack + second[:20])
    assert [m.delivery_tag for m in got] == [1]  # the one in front of the ack
    assert (await reading)[2].delivery_tag == 9  # the ack, for aiormq, in its turn
    reading = await parked(receiver)  # the rest of the second is not there yet
    receiver.reader.feed_data(second[20:])
    assert [m.delivery_tag for m in got] == [1, 2]
    reading.cancel()


async def test_deliveries_for_nobody_registered_wake_the_reader(consumer: Any) -> None:
    _, got = consumer
    receiver = started()
    reading = await parked(receiver)
    receiver.reader.feed_data(deliver_frames(3, 1, b"body", consumer="someone.else"))
    assert got == []
    assert type((await reading)[2]) is spec.Basic.Deliver  # aiormq's path


async def test_aiormq_hears_from_a_reader_handing_deliveries_over(
    consumer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiormq takes a connection without frames for three heartbeats for dead: while
    # deliveries bypass it, its reader task is still woken now and then.
    _, got = consumer
    monkeypatch.setattr(amqp_framing, "_KEEPALIVE", 0.0)
    receiver = started()
    reading = await parked(receiver)
    receiver.reader.feed_data(deliver_frames(3, 1, b"one"))
    assert await reading == amqp_framing._NOTHING_ELSE
    assert [m.delivery_tag for m in got] == [1]


async def test_a_reader_handing_deliveries_over_still_resumes_a_paused_transport(
    consumer: Any,
) -> None:
    _, got = consumer
    reader = asyncio.StreamReader(limit=1024)
    transport = PausableTransport()
    reader.set_transport(transport)
    receiver = FrameReceiver(reader)
    receiver.started = True
    reading = await parked(receiver)
    reader.feed_data(deliver_frames(3, 1, b"x" * 4000))  # over twice the limit: paused
    assert [len(m.body) for m in got] == [4000]
    assert not transport.paused and not reader._buffer  # type: ignore[attr-defined]
    reading.cancel()


# --------------------------------------------------------------------------------------------
# Publisher confirms settled by the reader (``confirm_directly``)
# --------------------------------------------------------------------------------------------


class FakeConnection:
    def __init__(self) -> None:
        self._reader_task: Any = None


class FakePublishChannel(FakeChannel):
    """What the reader looks at on an aiormq channel in confirm mode."""

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.connection = FakeConnection()
        self.confirmations: dict[int, Any] = {}

    def publish(self, tags: range) -> list[asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in tags]
        self.confirmations.update(zip(tags, futures, strict=True))
        return futures


def ack(tag: int, multiple: bool = False, channel: int = 5) -> bytes:
    return pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=tag, multiple=multiple), channel)


@pytest.fixture
async def publisher() -> Any:
    channel = FakePublishChannel(5)
    receiver = started()
    yield channel, receiver
    amqp_framing.stop_confirming_directly(channel)  # type: ignore[arg-type]


async def reading_for(channel: FakePublishChannel, receiver: FrameReceiver) -> asyncio.Task[Any]:
    """The connection's reader task, parked, with ``channel``'s confirms registered."""
    reading = asyncio.create_task(receiver.get_frame())
    channel.connection._reader_task = reading
    amqp_framing.confirm_directly(channel)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    return reading


async def test_acks_settle_their_confirms_as_they_come_in(publisher: Any) -> None:
    channel, receiver = publisher
    reading = await reading_for(channel, receiver)
    first, second, third = channel.publish(range(1, 4))
    receiver.reader.feed_data(ack(1))
    assert first.done() and first.result().delivery_tag == 1 and not second.done()
    receiver.reader.feed_data(ack(3, multiple=True))  # covers 2 and 3
    assert second.done() and third.done() and channel.confirmations == {}
    assert await still_waiting(reading)  # nothing for aiormq
    reading.cancel()


async def test_an_ack_read_by_the_reader_task_is_settled_on_the_way(publisher: Any) -> None:
    channel, receiver = publisher
    (confirmation,) = channel.publish(range(1, 2))
    heartbeat = pamqp.frame.marshal(Heartbeat(), 0)
    receiver.reader.feed_data(ack(1) + heartbeat)  # there before the reader reads
    reading = asyncio.create_task(receiver.get_frame())
    channel.connection._reader_task = reading
    amqp_framing.confirm_directly(channel)  # type: ignore[arg-type]
    assert type((await reading)[2]) is Heartbeat  # the frame behind the ack, for aiormq
    assert confirmation.done()


@pytest.mark.parametrize("case", ["nack", "unknown tag", "frames waiting", "closed", "stopped"])
async def test_other_confirm_frames_are_aiormq_s(publisher: Any, case: str) -> None:
    channel, receiver = publisher
    reading = await reading_for(channel, receiver)
    (confirmation,) = channel.publish(range(1, 2))
    frame = ack(1)
    if case == "nack":
        frame = pamqp.frame.marshal(spec.Basic.Nack(delivery_tag=1), 5)
    elif case == "unknown tag":
        frame = ack(7)
    elif case == "frames waiting":
        channel.frames.put_nowait((0, spec.Basic.Return()))
    elif case == "closed":
        channel.is_closed = True
    else:
        amqp_framing.stop_confirming_directly(channel)  # type: ignore[arg-type]
    receiver.reader.feed_data(frame)
    assert type((await reading)[2]) in (spec.Basic.Ack, spec.Basic.Nack)
    assert not confirmation.done()


async def test_confirms_are_settled_for_the_task_reading_after_the_handshake(
    publisher: Any,
) -> None:
    # aiormq reads the handshake's frames from the task connecting, then starts its reader
    # task: what comes in while the reader task waits is for that task's connection.
    channel, receiver = publisher
    handshake = asyncio.create_task(receiver.get_frame())
    await asyncio.sleep(0)  # waits for data first, from the task connecting
    receiver.reader.feed_data(pamqp.frame.marshal(Heartbeat(), 0))
    await handshake
    reading = await reading_for(channel, receiver)
    (confirmation,) = channel.publish(range(1, 2))
    receiver.reader.feed_data(ack(1))
    assert confirmation.done()
    reading.cancel()
