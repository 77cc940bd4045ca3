"""The frames the AMQP consumer writes for a batch of settles (``amqp.acks.Tags``).

No server: the bytes are compared with pamqp's own marshalling and read back with pamqp, and
the choice of frames is checked on the bookkeeping alone. RabbitMQ's side of it (which
messages end up acked, requeued, dead-lettered) is in tests/integration/test_ack_batching.py.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pamqp.frame
import pamqp.header
import pytest
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec

from aioqueue.brokers.amqp.acks import Settler, Tags, ack_frame, reject_frame
from aioqueue.brokers.amqp.consumer import AmqpConsumer
from aioqueue.config import Settings


@dataclass
class FakeChannel:
    number: int


def tags_of(*delivered: int, number: int = 3) -> Tags:
    tags = Tags(FakeChannel(number))  # type: ignore[arg-type]  # only .number is used
    tags.open.extend(delivered)
    return tags


def read(payload: bytes) -> list[tuple[str, int, bool]]:
    """(kind, tag, flag) per frame: flag is ``multiple`` for acks, ``requeue`` for rejects."""
    frames: list[tuple[str, int, bool]] = []
    while payload:
        consumed, channel, frame = pamqp.frame.unmarshal(payload)
        assert channel == 3
        payload = payload[consumed:]
        if isinstance(frame, spec.Basic.Ack):
            frames.append(("ack", frame.delivery_tag, frame.multiple))
        else:
            assert isinstance(frame, spec.Basic.Reject)
            frames.append(("reject", frame.delivery_tag, frame.requeue))
    return frames


def test_frame_bytes_are_pamqps() -> None:
    cases: list[tuple[bytes, Any]] = [
        (ack_frame(7, 1, False), spec.Basic.Ack(delivery_tag=1, multiple=False)),
        (ack_frame(7, 2**40, True), spec.Basic.Ack(delivery_tag=2**40, multiple=True)),
        (reject_frame(7, 5, True), spec.Basic.Reject(delivery_tag=5, requeue=True)),
        (reject_frame(7, 6, False), spec.Basic.Reject(delivery_tag=6, requeue=False)),
    ]
    for ours, frame in cases:
        assert ours == pamqp.frame.marshal(frame, 7)


def test_a_settled_prefix_is_one_multiple_ack() -> None:
    tags = tags_of(1, 2, 3, 4, 5)
    assert read(tags.frames([3, 1, 2], [])) == [("ack", 3, True)]
    assert list(tags.open) == [4, 5]


def test_acks_above_an_unsettled_tag_go_one_by_one() -> None:
    tags = tags_of(1, 2, 3, 4, 5)
    assert read(tags.frames([2, 4], [])) == [("ack", 2, False), ("ack", 4, False)]
    # Filling the gap: one multiple ack up to the highest tag acked now; 2 and 4 were
    # acked already, 5 is still out.
    assert read(tags.frames([3, 1], [])) == [("ack", 3, True)]
    assert list(tags.open) == [5]
    assert not tags.settled


def test_rejects_come_first_and_are_never_covered_by_an_ack() -> None:
    tags = tags_of(1, 2, 3, 4, 5, 6)
    frames = read(tags.frames([1, 3, 5], [(2, True), (4, False)]))
    # The rejects are on the wire before the multiple ack reaches over their tags.
    assert frames == [("reject", 2, True), ("reject", 4, False), ("ack", 5, True)]
    assert list(tags.open) == [6]


def test_a_multiple_ack_names_a_tag_acked_now() -> None:
    """Never a tag settled earlier (RabbitMQ would answer 'unknown delivery tag')."""
    tags = tags_of(1, 2, 3)
    assert read(tags.frames([], [(3, True)])) == [("reject", 3, True)]
    assert read(tags.frames([2], [])) == [("ack", 2, False)]
    assert read(tags.frames([1], [])) == [("ack", 1, True)]  # covers 1 only: 2, 3 are done
    assert not tags.open


def test_only_rejects_settle_a_prefix_without_any_ack() -> None:
    tags = tags_of(1, 2, 3)
    assert read(tags.frames([], [(1, False), (2, True)])) == [
        ("reject", 1, False), ("reject", 2, True)
    ]
    assert list(tags.open) == [3]


def test_bookkeeping_stays_small_behind_one_old_unsettled_delivery() -> None:
    """A delivery held for hours (an ETA) must not make the tags after it pile up."""
    tags = tags_of(1)
    for tag in range(2, 5002):
        tags.open.append(tag)
        assert read(tags.frames([tag], [])) == [("ack", tag, False)]
        assert len(tags.open) + len(tags.settled) < 200
    tags.open.append(5002)
    assert read(tags.frames([1], [])) == [("ack", 1, True)]
    assert list(tags.open) == [5002]


class QueueChannel:
    """What the settler uses of an aiormq channel: its number, its state, the connection's
    (bounded) write queue and the future that is done when it closes."""

    def __init__(self, room: int) -> None:
        self.number = 3
        self.write_queue: asyncio.Queue[ChannelFrame] = asyncio.Queue(maxsize=room)
        self.closing: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def is_closed(self) -> bool:
        return self.closing.done()


def settler_on(channel: QueueChannel, *delivered: int) -> tuple[Settler, Tags]:
    tags = Tags(channel)  # type: ignore[arg-type]
    tags.open.extend(delivered)
    return Settler(fast=True), tags


async def test_settles_of_one_iteration_are_one_write() -> None:
    channel = QueueChannel(room=10)
    settler, tags = settler_on(channel, 1, 2, 3, 4)
    await asyncio.gather(*(settler.settle(tags, tag, None) for tag in (2, 1, 4)),
                         settler.settle(tags, 3, False))
    assert channel.write_queue.qsize() == 1
    frame = channel.write_queue.get_nowait()
    assert read(frame.payload) == [("reject", 3, False), ("ack", 4, True)]


async def test_a_full_write_queue_is_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    channel = QueueChannel(room=1)
    channel.write_queue.put_nowait(ChannelFrame(payload=b"", should_close=False))
    settler, tags = settler_on(channel, 1)
    acked = asyncio.ensure_future(settler.settle(tags, 1, None))
    await asyncio.sleep(0.01)
    assert not acked.done()  # no room yet
    channel.write_queue.get_nowait()  # the connection's writer takes one
    await asyncio.wait_for(acked, 1)
    assert read(channel.write_queue.get_nowait().payload) == [("ack", 1, True)]
    assert not caplog.records


async def test_a_channel_closing_while_waiting_for_room_loses_the_batch_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel = QueueChannel(room=1)
    channel.write_queue.put_nowait(ChannelFrame(payload=b"", should_close=False))
    settler, tags = settler_on(channel, 1, 2)
    with caplog.at_level(logging.WARNING, logger="aioqueue.brokers.amqp"):
        waiting = asyncio.gather(settler.settle(tags, 1, None), settler.settle(tags, 2, True))
        await asyncio.sleep(0.01)
        channel.closing.set_result(None)
        await asyncio.wait_for(waiting, 1)  # woken, not hanging on a dead connection
    assert channel.write_queue.qsize() == 1  # nothing more was put
    assert sorted(r.getMessage().split(" (")[0] for r in caplog.records) == [
        "could not ack delivery 1", "could not reject delivery 2"
    ]


async def test_abandon_wakes_every_waiter(caplog: pytest.LogCaptureFixture) -> None:
    channel = QueueChannel(room=1)
    channel.write_queue.put_nowait(ChannelFrame(payload=b"", should_close=False))
    settler, tags = settler_on(channel, 1, 2)
    first = asyncio.ensure_future(settler.settle(tags, 1, None))
    await asyncio.sleep(0.01)  # the flusher waits for room with the first batch
    second = settler.settle(tags, 2, None)  # the next batch, not taken yet
    with caplog.at_level(logging.WARNING, logger="aioqueue.brokers.amqp"):
        settler.abandon()
        await asyncio.wait_for(asyncio.gather(first, second), 1)
        await asyncio.sleep(0)  # the flusher's own cancellation runs
    assert len(caplog.records) == 2


async def test_a_lone_settle_is_queued_at_once() -> None:
    # The only delivery handed out, nothing pending: its frame is on the write queue when
    # settle() returns, and the future is done (no flusher, no loop iteration).
    channel = QueueChannel(room=10)
    settler, tags = settler_on(channel, 1, 2)
    written = settler.settle(tags, 1, None, alone=True)
    assert written.done()
    assert read(channel.write_queue.get_nowait().payload) == [("ack", 1, True)]
    rejected = settler.settle(tags, 2, True, alone=True)
    assert rejected.done()
    assert read(channel.write_queue.get_nowait().payload) == [("reject", 2, True)]
    assert not tags.open and not tags.settled
    await settler.written()


async def test_a_lone_settle_behind_a_batch_keeps_the_order() -> None:
    # A batch is pending (or the queue has no room): the lone settle joins the flusher's
    # path, so frames are never written out of order and a full queue is waited for.
    channel = QueueChannel(room=10)
    settler, tags = settler_on(channel, 1, 2, 3)
    first = settler.settle(tags, 2, None)
    second = settler.settle(tags, 1, None, alone=True)
    assert not second.done()
    await asyncio.gather(first, second)
    assert channel.write_queue.qsize() == 1
    assert read(channel.write_queue.get_nowait().payload) == [("ack", 2, True)]
    full = QueueChannel(room=1)
    full.write_queue.put_nowait(ChannelFrame(payload=b"", should_close=False))
    settler, tags = settler_on(full, 1)
    waiting = settler.settle(tags, 1, None, alone=True)
    await asyncio.sleep(0.01)
    assert not waiting.done()
    full.write_queue.get_nowait()
    await asyncio.wait_for(waiting, 1)
    assert read(full.write_queue.get_nowait().payload) == [("ack", 1, True)]


async def test_a_lone_settle_on_a_closed_channel_is_lost_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel = QueueChannel(room=10)
    channel.closing.set_result(None)
    settler, tags = settler_on(channel, 1)
    with caplog.at_level(logging.WARNING, logger="aioqueue.brokers.amqp"):
        await asyncio.wait_for(settler.settle(tags, 1, None, alone=True), 1)
    assert channel.write_queue.empty()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["could not ack delivery 1"]


async def test_a_delivery_is_buffered_before_aiormq_runs_the_callbacks_task() -> None:
    # aiormq calls the consumer callback in its channel reader and runs what it returns as
    # a task: the delivery is registered and buffered by the call itself.
    broker = SimpleNamespace(settings=Settings())
    consumer = AmqpConsumer(broker, ["q"], prefetch=1, no_ack=False)  # type: ignore[arg-type]
    channel = QueueChannel(room=10)
    message = DeliveredMessage(
        delivery=spec.Basic.Deliver(delivery_tag=7, routing_key="q"),
        header=pamqp.header.ContentHeader(), body=b"", channel=channel,  # type: ignore[arg-type]
    )
    pending = consumer._on_message(message)
    assert consumer._buffer.get_nowait() is message
    assert list(consumer._tags_of(channel).open) == [7]  # type: ignore[arg-type]
    await pending  # what aiormq runs: nothing left to do
