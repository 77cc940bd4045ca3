"""``ReplyReader``: replies parsed in the read callback, however the bytes are split; errors
end the reading; redis-py's protocol still hears about the connection and the writer's flow."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from aioqueue.results.redis_replies import ReplyReader
from aioqueue.results.resp import Push

# RESP3: a subscribe confirmation, a message with a record, an MGET reply, a PONG.
STREAM = (
    b">3\r\n$9\r\nsubscribe\r\n$5\r\nchan1\r\n:1\r\n"
    b">3\r\n$7\r\nmessage\r\n$5\r\nchan1\r\n$16\r\n{\"status\": \"OK\"}\r\n"
    b"*2\r\n$3\r\nabc\r\n_\r\n"
    b"+PONG\r\n"
)
EXPECTED = [
    Push([b"subscribe", b"chan1", 1]),
    Push([b"message", b"chan1", b'{"status": "OK"}']),
    [b"abc", None],
    b"PONG",
]


class Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append(("lost", exc))

    def pause_writing(self) -> None:
        self.calls.append("pause")

    def resume_writing(self) -> None:
        self.calls.append("resume")


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False


def reader(got: list[Any], leftover: bytes = b"") -> tuple[ReplyReader, Inner, Transport]:
    inner, transport = Inner(), Transport()
    return ReplyReader(got.append, inner, transport, leftover), inner, transport


def normal(replies: list[Any]) -> list[Any]:
    return [(type(r).__name__, list(r)) if isinstance(r, list) else r for r in replies]


async def test_replies_are_handed_over_as_they_complete() -> None:
    for cut in range(1, len(STREAM)):
        got: list[Any] = []
        replies, _, _ = reader(got)
        replies.data_received(STREAM[:cut])
        complete = len(got)
        replies.data_received(STREAM[cut:])
        assert normal(got) == normal(EXPECTED), cut
        assert complete < len(EXPECTED)
    got = []
    replies, _, _ = reader(got)
    for byte in range(len(STREAM)):  # one byte at a time
        replies.data_received(STREAM[byte:byte + 1])
    assert normal(got) == normal(EXPECTED)
    assert not replies.failed.done()


async def test_bytes_left_in_the_stream_are_read_first() -> None:
    got: list[Any] = []
    replies, _, _ = reader(got, leftover=STREAM[:40])
    replies.data_received(STREAM[40:])
    assert normal(got) == normal(EXPECTED)


async def test_what_is_not_resp_ends_the_reading() -> None:
    got: list[Any] = []
    replies, _, transport = reader(got)
    replies.data_received(b"?what\r\n")
    with pytest.raises(RedisConnectionError, match="unreadable reply"):
        replies.failed.result()
    assert not transport.reading
    replies.data_received(STREAM)  # ignored from now on
    assert got == []


async def test_an_error_from_the_callback_ends_the_reading() -> None:
    seen: list[Any] = []

    def on_reply(reply: Any) -> None:
        seen.append(reply)
        raise ValueError("bad reply")

    replies = ReplyReader(on_reply, Inner(), Transport())
    replies.data_received(STREAM)
    assert len(seen) == 1  # nothing after the failing one
    with pytest.raises(ValueError, match="bad reply"):
        replies.failed.result()


async def test_the_connection_and_the_writer_s_flow_reach_redis_py() -> None:
    got: list[Any] = []
    replies, inner, _ = reader(got)
    replies.pause_writing()
    replies.resume_writing()
    error = ConnectionResetError("reset")
    replies.connection_lost(error)
    assert inner.calls == ["pause", "resume", ("lost", error)]
    with pytest.raises(RedisConnectionError, match="lost: reset"):
        replies.failed.result()
    closed, _, _ = reader(got)
    assert closed.eof_received() is False
    with pytest.raises(RedisConnectionError, match="closed by the server"):
        closed.failed.result()
