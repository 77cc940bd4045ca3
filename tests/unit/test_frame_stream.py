"""``FrameStream``, the protocol under aiormq's reader, without a broker:

1. frames nobody registered for, cut into random chunks, reach aiormq byte for byte, and its
   ``FrameReceiver`` reads them as from a plain ``StreamReader`` fed the same bytes;
2. a registered consumer's deliveries reach its callback whole, as aiormq would build them,
   in order and before anything behind them reaches aiormq; one not all there waits; others
   (consumer tag, channel, closed channel, stopped consumer) are aiormq's;
3. an unusual delivery, and every later one on its channel, is aiormq's;
4. acks of a confirming channel settle its futures; unknown tags, closed or stopped channels,
   and acks after a nack, a return or a channel close are aiormq's;
5. aiormq gets a heartbeat at most once per ``_KEEPALIVE`` while only direct frames come;
6. bytes that are not frames pass unchanged from there on; at the end, a frame cut short is
   passed on first: aiormq raises what it always raised;
7. ``FrameStreamFactory`` over a real local socket: reading, flow control, the writer;
8. nothing of aiormq, asyncio or pamqp is patched.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from typing import Any

import aiormq.connection
import pamqp.frame
import pytest
from aiormq.abc import DeliveredMessage
from aiormq.connection import FrameReceiver
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat
from yarl import URL

from aioqueue.brokers.amqp import stream as stream_module
from aioqueue.brokers.amqp.frames import encode_publish
from aioqueue.brokers.amqp.stream import FrameStream, FrameStreamFactory
from aioqueue.protocol import encode_task

HEARTBEAT = pamqp.frame.marshal(Heartbeat(), 0)
TAG = "aioqueue.c"


# --- Fakes and frame builders -----------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """What ``StreamReaderProtocol`` and ``StreamReader`` use of a transport."""

    reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class FakeChannel:
    """What the stream looks at on a channel."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.is_closed = False
        self.confirmations: dict[int, Any] = {}

    def publish(self, tags: range) -> list[asyncio.Future[Any]]:
        futures = [asyncio.get_running_loop().create_future() for _ in tags]
        self.confirmations.update(zip(tags, futures, strict=True))
        return futures


class Reader(asyncio.StreamReader):
    """aiormq's reader, noting what it is fed; the test's callbacks note deliveries here too."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Any] = []  # bytes fed, and DeliveredMessage handed over, in order

    def feed_data(self, data: Any) -> None:
        self.events.append(bytes(data))
        super().feed_data(data)

    def passed(self, keepalives: bool = True) -> bytes:
        return b"".join(e for e in self.events if isinstance(e, bytes)
                        and (keepalives or e != HEARTBEAT))

    def handed(self) -> list[DeliveredMessage]:
        return [e for e in self.events if isinstance(e, DeliveredMessage)]


def opened(consumer: int | None = None, confirm: int | None = None
           ) -> tuple[FrameStream, Reader, FakeChannel]:
    """A stream on a fake transport; its consumer's deliveries are noted in ``reader.events``."""
    reader = Reader()
    stream = FrameStream(reader)
    stream.connection_made(FakeTransport())
    channel = FakeChannel(consumer or confirm or 0)
    if consumer:
        stream.deliver_directly(TAG, channel, reader.events.append)  # type: ignore[arg-type]
    if confirm:
        stream.confirm_directly(channel)  # type: ignore[arg-type]
    return stream, reader, channel


def method(frame: Any, channel: int = 1) -> bytes:
    return pamqp.frame.marshal(frame, channel)


def ack(tag: int, multiple: bool = False, channel: int = 5) -> bytes:
    return method(spec.Basic.Ack(delivery_tag=tag, multiple=multiple), channel)


def delivery(channel: int, tag: int, body: bytes = b"[[], {}, {}]", consumer: str = TAG,
             frame_body: int = 131_064) -> bytes:
    properties = spec.Basic.Properties(
        content_type="application/json", content_encoding="utf-8", delivery_mode=2,
        priority=3, correlation_id=f"c{tag}", reply_to="replies", expiration="60000",
        message_id=f"m{tag}", timestamp=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        message_type="task", user_id="guest", app_id="tests",
        headers={"id": str(tag), "retries": 2, "eta": None, "flag": True, "ratio": 0.5,
                 "nested": {"list": [1, "two"]}},
    )
    parts = [
        method(spec.Basic.Deliver(consumer_tag=consumer, delivery_tag=tag, redelivered=tag % 2 == 0,
                                  exchange="ex", routing_key="celery"), channel),
        method(ContentHeader(0, len(body), properties), channel),
    ]
    parts += [method(ContentBody(body[at:at + frame_body]), channel)
              for at in range(0, len(body), frame_body)]
    return b"".join(parts)


def task_delivery(channel: int, tag: int, size: int) -> bytes:
    """A task message as our publisher writes it, delivered (a Deliver for the Publish)."""
    envelope = encode_task(task="t.noop", task_id=f"id-{tag}", args=("x" * size,), kwargs={},
                           reply_to="replies", now=datetime(2024, 1, 2, tzinfo=UTC))
    published = encode_publish(channel, "", "celery", envelope, 131_064, message_id=f"m{tag}")
    deliver = spec.Basic.Deliver(consumer_tag=TAG, delivery_tag=tag, routing_key="celery")
    return method(deliver, channel) + published[8 + int.from_bytes(published[3:7]):]


def frame_starts(data: bytes) -> list[int]:
    starts, position = [], 0
    while position < len(data):
        starts.append(position)
        position += 8 + int.from_bytes(data[position + 3:position + 7])
    return starts


def chunks(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` cut at random places, many of them at or near frame boundaries."""
    cuts = {rng.randrange(1, len(data)) for _ in range(60)}
    cuts |= {start + rng.randrange(-8, 9) for start in frame_starts(data) if rng.random() < 0.6}
    ends = sorted(cut for cut in cuts if 0 < cut < len(data))
    return [data[a:b] for a, b in zip([0, *ends], [*ends, len(data)], strict=True)]


def comparable(received: Any) -> tuple[Any, ...]:
    size, channel, frame = received
    return size, channel, type(frame).__name__, pamqp.frame.marshal(frame, channel)


async def read_frames(reader: asyncio.StreamReader) -> list[tuple[Any, ...]]:
    """What aiormq's ``FrameReceiver`` reads from ``reader`` up to its end."""
    receiver, frames = FrameReceiver(reader), []
    while True:
        try:
            frames.append(comparable(await receiver.get_frame()))
        except StopAsyncIteration:
            return frames


def plain(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def as_aiormq_builds(data: bytes, channel: Any) -> list[DeliveredMessage]:
    """The messages aiormq's channel would build from these delivery frames."""
    messages: list[Any] = []
    receiver = FrameReceiver(plain(data))
    for _, _, frame in [await receiver.get_frame() for _ in frame_starts(data)]:
        if isinstance(frame, spec.Basic.Deliver):
            messages.append([frame, None, b""])
        elif isinstance(frame, ContentHeader):
            messages[-1][1] = frame
        elif isinstance(frame, ContentBody):
            messages[-1][2] += frame.value
    return [DeliveredMessage(delivery=d, header=h, body=b, channel=channel)
            for d, h, b in messages]


def described(message: DeliveredMessage) -> tuple[Any, ...]:
    """Every field of a message, with its type."""
    def fields(obj: Any) -> list[tuple[str, type, Any]]:
        return [(name, type(getattr(obj, name, None)), getattr(obj, name, None))
                for name in obj.__slots__]
    header = message.header
    return (fields(message.delivery), type(message.delivery), header.class_id, header.weight,
            header.body_size, fields(header.properties), message.body, message.channel)


# --- 1. Transparency --------------------------------------------------------------------


def frame_items(rng: random.Random) -> list[tuple[bytes, bool]]:
    """Frames a broker sends, each with whether it is a delivery for ``TAG`` on channel 3."""
    items = [(HEARTBEAT, False), (method(spec.Basic.ConsumeOk(TAG), 3), False)]
    big_at = rng.randrange(1, 31)
    for tag in range(1, 31):
        kind = rng.randrange(9)
        if tag == big_at:
            items.append((delivery(3, tag, bytes(range(256)) * 1200), True))  # 3 body frames
        elif kind < 3:
            body = rng.randbytes(rng.choice([0, 1, 200, 700]))
            items.append((delivery(3, tag, body, frame_body=rng.choice([7, 300, 131_064])), True))
        elif kind == 3:
            items.append((task_delivery(3, tag, rng.choice([0, 100, 10_000])), True))
        elif kind == 4:
            items.append((ack(tag, rng.random() < 0.5, channel=rng.choice([1, 5, 7])), False))
        elif kind == 5:
            items.append((delivery(rng.choice([3, 4]), tag, b"x", consumer="someone.else"), False))
        elif kind == 6:
            items.append((delivery(4, tag), False))  # the consumer's tag, another channel
        elif kind == 7:
            items.append((HEARTBEAT, False))
        else:
            items.append((method(spec.Basic.Nack(delivery_tag=tag), 7)
                          + method(spec.Channel.Close(200, "", 0, 0), 9), False))
    return items


@pytest.mark.parametrize("watching", [False, True], ids=["nothing registered", "others registered"])
@pytest.mark.parametrize("seed", range(20))
async def test_frames_reach_aiormq_unchanged(seed: int, watching: bool) -> None:
    rng = random.Random(seed)
    data = b"".join(frames for frames, _ in frame_items(rng))
    stream, reader, _ = opened()
    if watching:  # a consumer and a confirming channel the stream's frames are not for
        stream.deliver_directly("other.c", FakeChannel(3), reader.events.append)  # type: ignore[arg-type]
        stream.confirm_directly(FakeChannel(5))  # type: ignore[arg-type]
    for chunk in chunks(data, rng):
        stream.data_received(chunk)
    stream.eof_received()
    assert reader.passed() == data and not reader.handed() and stream.handled == 0
    assert await read_frames(reader) == await read_frames(plain(data))


# --- 2. Deliveries handed over ----------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
async def test_deliveries_reach_the_callback_whole_and_in_order(seed: int) -> None:
    rng = random.Random(seed)
    items = [item for item in frame_items(rng) if item[0] != HEARTBEAT]  # (see keepalives)
    stream, reader, consumer = opened(consumer=3)
    for chunk in chunks(b"".join(frames for frames, _ in items), rng):
        stream.data_received(chunk)
    others = b"".join(frames for frames, direct in items if not direct)
    assert reader.passed(keepalives=False) == others
    mine = b"".join(frames for frames, direct in items if direct)
    expected = await as_aiormq_builds(mine, consumer)
    assert [described(m) for m in reader.handed()] == [described(m) for m in expected]
    # Nothing behind a delivery reached aiormq before the delivery reached its consumer.
    behind, offsets = 0, []
    for frames, direct in items:
        if direct:
            offsets.append(behind)
        else:
            behind += len(frames)
    seen, fed_before = 0, []
    for event in reader.events:
        if isinstance(event, DeliveredMessage):
            fed_before.append(seen)
        elif event != HEARTBEAT:
            seen += len(event)
    assert all(fed <= offset for fed, offset in zip(fed_before, offsets, strict=True))
    assert stream.handled == len(offsets)


async def test_a_delivery_not_all_there_waits_for_the_rest() -> None:
    before, after = ack(9, channel=1), method(spec.Basic.QosOk(), 3)
    whole = delivery(3, 1, b"0123456789" * 3, frame_body=10)  # 3 body frames
    for cut in range(1, len(whole)):
        stream, reader, _ = opened(consumer=3)
        stream.data_received(before + whole[:cut])
        assert reader.passed(keepalives=False) == before and not reader.handed()
        stream.data_received(whole[cut:] + after)
        assert reader.passed(keepalives=False) == before + after
        assert [m.body for m in reader.handed()] == [b"0123456789" * 3]


@pytest.mark.parametrize("case", ["other consumer", "other channel", "closed channel", "stopped"])
async def test_deliveries_for_nobody_registered_are_aiormq_s(case: str) -> None:
    stream, reader, consumer = opened(consumer=3)
    data = delivery(3, 1) + delivery(3, 2, b"")
    if case == "other consumer":
        data = delivery(3, 1, consumer="someone.else")
    elif case == "other channel":
        data = delivery(4, 1)
    elif case == "closed channel":
        consumer.is_closed = True
    else:
        stream.stop_delivering_directly(TAG)
    stream.data_received(data)
    stream.eof_received()
    assert reader.passed() == data and not reader.handed()
    assert await read_frames(reader) == await read_frames(plain(data))


async def test_a_failing_callback_is_logged_and_the_stream_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream, reader, _ = opened()
    stream.deliver_directly(TAG, FakeChannel(3), lambda m: 1 / 0)  # type: ignore[arg-type]
    stream.data_received(delivery(3, 1) + ack(9, channel=1))
    assert reader.passed(keepalives=False) == ack(9, channel=1)
    assert "could not hand over an AMQP delivery" in caplog.text


# --- 3. Unusual deliveries --------------------------------------------------------------


def unusual(kind: str, channel: int, tag: int) -> bytes:
    data = bytearray(delivery(channel, tag))
    if kind == "malformed deliver":
        data[12] = 0xFF  # the consumer tag's first character: not utf-8
        return bytes(data)
    # A second (empty) flags word: pamqp reads it, our reader leaves it to pamqp.
    header_at = frame_starts(bytes(data))[1]
    flags_at = header_at + 7 + 12
    data[flags_at + 1] |= 1
    data[flags_at + 2:flags_at + 2] = b"\x00\x00"
    data[header_at + 3:header_at + 7] = (int.from_bytes(data[header_at + 3:header_at + 7]) + 2
                                         ).to_bytes(4)
    return bytes(data)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["second flags word", "malformed deliver"])
async def test_an_unusual_delivery_takes_aiormq_s_path_and_so_do_later_ones(
    kind: str, seed: int,
) -> None:
    stream, reader, _ = opened(consumer=3)
    stream.deliver_directly("c4", FakeChannel(4), reader.events.append)  # type: ignore[arg-type]
    odd, later = unusual(kind, 3, 1), delivery(3, 2) + delivery(3, 4, b"")
    data = odd + delivery(3, 2) + delivery(4, 3, consumer="c4") + delivery(3, 4, b"")
    for chunk in chunks(data, random.Random(seed)):
        stream.data_received(chunk)
    assert [m.delivery_tag for m in reader.handed()] == [3]  # channel 4's, still direct
    assert reader.passed(keepalives=False) == odd + later
    if kind == "second flags word":  # aiormq reads the usual message from it
        usual = await as_aiormq_builds(delivery(3, 1), None)
        assert [described(m) for m in await as_aiormq_builds(odd, None)] == [
            described(m) for m in usual]
    stream.deliver_directly(TAG, FakeChannel(3), reader.events.append)  # type: ignore[arg-type]
    stream.data_received(delivery(3, 5))  # registered again (after a reconnect): direct
    assert [m.delivery_tag for m in reader.handed()] == [3, 5]


# --- 4. Publisher confirms --------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
async def test_acks_settle_their_confirms_and_stay_away_from_aiormq(seed: int) -> None:
    stream, reader, channel = opened(confirm=5)
    futures = channel.publish(range(1, 7))
    others = ack(2, channel=1) + method(spec.Basic.QosOk(), 3)
    data = ack(2) + others[:21] + ack(5, multiple=True) + others[21:]
    for chunk in chunks(data, random.Random(seed)):
        stream.data_received(chunk)
    assert reader.passed(keepalives=False) == others
    results = [f.result() for f in futures[:5]]
    assert all(type(result) is spec.Basic.Ack for result in results)
    assert [(r.delivery_tag, r.multiple) for r in results] == [(5, True), (2, False)] + [
        (5, True)] * 3
    assert not futures[5].done() and list(channel.confirmations) == [6]
    assert stream.handled == 2


@pytest.mark.parametrize("case", ["unknown tag", "unknown multiple", "closed", "stopped"])
async def test_acks_the_stream_does_not_settle_are_aiormq_s(case: str) -> None:
    stream, reader, channel = opened(confirm=5)
    (future,) = channel.publish(range(1, 2))
    frame = ack(1)
    if case == "unknown tag":
        frame = ack(7)
    elif case == "unknown multiple":
        frame = ack(7, multiple=True)
    elif case == "closed":
        channel.is_closed = True
    else:
        stream.stop_confirming_directly(channel)  # type: ignore[arg-type]
    stream.data_received(frame)
    assert reader.passed(keepalives=False) == frame and not future.done()


@pytest.mark.parametrize("ender", ["nack", "return", "channel close"])
async def test_after_a_nack_return_or_close_acks_are_aiormq_s(ender: str) -> None:
    stream, reader, channel = opened(confirm=5)
    other = FakeChannel(6)
    stream.confirm_directly(other)  # type: ignore[arg-type]
    first, second = channel.publish(range(1, 3))
    (elsewhere,) = other.publish(range(1, 2))
    frames = {
        "nack": method(spec.Basic.Nack(delivery_tag=1), 5),
        "return": method(spec.Basic.Return(312, "NO_ROUTE", "", "celery"), 5)
        + delivery(5, 1)[frame_starts(delivery(5, 1))[1]:],
        "channel close": method(spec.Channel.Close(406, "PRECONDITION_FAILED", 60, 40), 5),
    }[ender]
    stream.data_received(frames + ack(2) + ack(1, channel=6))
    assert reader.passed(keepalives=False) == frames + ack(2)
    assert not first.done() and not second.done()
    assert elsewhere.done()  # another channel's confirms: still settled here


# --- 5. Keepalive -----------------------------------------------------------------------


async def test_aiormq_gets_a_heartbeat_at_most_once_per_keepalive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stream_module, "_KEEPALIVE", 10.0)
    stream, reader, _ = opened(consumer=3)
    channel = FakeChannel(5)
    stream.confirm_directly(channel)  # type: ignore[arg-type]
    channel.publish(range(1, 10))
    clock = [100.0]
    partial = delivery(3, 7)
    steps = [  # (time, bytes in)
        (100.0, delivery(3, 1)), (105.0, delivery(3, 2)), (109.9, ack(1)), (110.0, ack(2)),
        (115.0, delivery(3, 3) + ack(9, channel=1)), (125.0, partial[:30]),
        (125.0, partial[30:]), (125.5, delivery(3, 8)),
    ]
    stream.clock = lambda: clock[0]
    for clock[0], data in steps:
        stream.data_received(data)
    fed = [e for e in reader.events if isinstance(e, bytes)]
    assert fed == [HEARTBEAT, HEARTBEAT, ack(9, channel=1), HEARTBEAT]
    assert [m.delivery_tag for m in reader.handed()] == [1, 2, 3, 7, 8]


# --- 6. Bytes that are not frames, and the end of the stream ----------------------------


async def aiormq_error(reader: asyncio.StreamReader, started: bool = True) -> str:
    receiver = FrameReceiver(reader)
    receiver.started = started
    with pytest.raises((AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError)) as info:
        while True:
            await receiver.get_frame()
    return f"{type(info.value).__name__}: {info.value}"


@pytest.mark.parametrize("seed", range(4))
async def test_after_a_bad_frame_end_everything_passes_unchanged(seed: int) -> None:
    bad = bytearray(ack(1, channel=1))
    bad[-1] = 0
    data = ack(2, channel=1) + bytes(bad) + delivery(3, 3) + HEARTBEAT
    stream, reader, _ = opened(consumer=3)
    for chunk in chunks(data, random.Random(seed)):
        stream.data_received(chunk)
    assert reader.passed() == data and not reader.handed()
    plain_reader = asyncio.StreamReader()
    plain_reader.feed_data(data)
    assert await aiormq_error(reader) == await aiormq_error(plain_reader)


async def test_a_refused_protocol_header_at_the_end_is_aiormq_s() -> None:
    stream, reader, _ = opened(consumer=3)
    stream.data_received(b"AMQP\x00\x00\x09\x01")
    stream.eof_received()
    assert await aiormq_error(reader, started=False) == (
        "ProtocolSyntaxError: Unexpected AMQP protocol header")


async def test_a_refused_protocol_header_is_passed_on_at_once() -> None:
    stream, reader, _ = opened(consumer=3)
    stream.data_received(b"AMQP\x00\x00\x09\x01")  # the server may keep the socket open
    assert reader.passed() == b"AMQP\x00\x00\x09\x01"


@pytest.mark.parametrize("end", ["eof", "lost", "reset"])
@pytest.mark.parametrize("cut", ["ack", "delivery"])
async def test_a_frame_cut_short_by_the_end_is_passed_on_first(end: str, cut: str) -> None:
    data = ack(1, channel=1) + (ack(2, channel=1)[:5] if cut == "ack" else delivery(3, 3)[:-3])
    stream, reader, _ = opened(consumer=3)
    plain_reader = asyncio.StreamReader()
    plain_reader.feed_data(data)
    stream.data_received(data)
    if end == "eof":
        stream.eof_received()
        plain_reader.feed_eof()
    else:
        exc = ConnectionResetError("reset") if end == "reset" else None
        stream.connection_lost(exc)
        plain_reader.set_exception(exc) if exc else plain_reader.feed_eof()
    assert reader.passed() == data
    assert await aiormq_error(reader) == await aiormq_error(plain_reader)


async def test_reading_flow_control_passes_through() -> None:
    reader, transport = Reader(), FakeTransport()
    stream = FrameStream(reader)
    stream.connection_made(transport)
    frames = method(ContentBody(b"x" * 200_000), 3)  # over twice the reader's limit
    stream.data_received(frames)
    assert not transport.reading
    assert await reader.readexactly(len(frames)) == frames
    assert transport.reading


# --- 7. The factory over a real socket --------------------------------------------------


async def test_the_factory_s_reader_and_writer_over_tcp() -> None:
    for_aiormq = (method(spec.Basic.ConsumeOk(TAG), 3) + HEARTBEAT
                  + delivery(3, 2, b"y" * 1_000_000, consumer="someone.else"))  # flow control
    heard, served = bytearray(), asyncio.Event()

    async def serve(client_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.extend(await client_reader.readexactly(5))
        at = frame_starts(for_aiormq)[2]  # after the heartbeat
        writer.write(for_aiormq[:at] + delivery(3, 1) + for_aiormq[at:])
        await writer.drain()
        heard.extend(await client_reader.read())  # until the client closes
        writer.close()
        await writer.wait_closed()
        served.set()

    async with await asyncio.start_server(serve, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        factory = FrameStreamFactory()
        reader, writer = await factory.create(URL(f"amqp://127.0.0.1:{port}/"))
        assert factory.stream is not None
        got: list[DeliveredMessage] = []
        factory.stream.deliver_directly(TAG, FakeChannel(3), got.append)  # type: ignore[arg-type]
        writer.write(b"hello")
        await writer.drain()
        receiver = FrameReceiver(reader)
        frames = [comparable(await receiver.get_frame()) for _ in frame_starts(for_aiormq)]
        assert frames == await read_frames(plain(for_aiormq))
        assert [m.body for m in got] == [b"[[], {}, {}]"]
        factory.stream.pause_writing()  # what the transport calls when its buffer fills up
        draining = asyncio.create_task(writer.drain())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not draining.done()
        factory.stream.resume_writing()
        await draining
        writer.write(b" bye")
        writer.close()
        await writer.wait_closed()
        await served.wait()
    assert heard == b"hello bye"
    with pytest.raises(AMQPConnectionError):  # the server is gone: refused
        await FrameStreamFactory().create(URL(f"amqp://127.0.0.1:{port}/"))


# --- 8. Nothing global ------------------------------------------------------------------


async def test_the_libraries_are_their_own() -> None:
    stream, _reader, _ = opened(consumer=3)
    stream.data_received(delivery(3, 1) + HEARTBEAT)
    for function, module, name in [
        (aiormq.connection.FrameReceiver.get_frame, "aiormq.connection", "FrameReceiver.get_frame"),
        (asyncio.StreamReader.feed_data, "asyncio.streams", "StreamReader.feed_data"),
        (asyncio.StreamReaderProtocol.data_received, "asyncio.streams",
         "StreamReaderProtocol.data_received"),
        (pamqp.frame.unmarshal, "pamqp.frame", "unmarshal"),
    ]:
        assert (function.__module__, function.__qualname__) == (module, name)
