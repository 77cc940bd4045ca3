"""``RedisWire`` without a server: replies parsed in the read callback however the bytes are
split, claimed replies and pushes routed apart, every way the connection can end; and
``wire_params`` reading a redis-py pool's public parameters."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest
from redis.asyncio import BlockingConnectionPool, ConnectionPool
from redis.asyncio.connection import Connection
from redis.credentials import UsernamePasswordCredentialProvider

from aioqueue.results.redis_wire import RedisWire, WireError, wire_params
from aioqueue.results.resp import Push, ReplyError, command

# RESP3: a push (a message), the reply to an MGET, another push, a PONG, a long bulk string.
BIG = b"x" * 5000
STREAM = (
    b">3\r\n$7\r\nmessage\r\n$5\r\nchan1\r\n$16\r\n{\"status\": \"OK\"}\r\n"
    b"*2\r\n$3\r\nabc\r\n_\r\n"
    b">3\r\n$9\r\nsubscribe\r\n$5\r\nchan2\r\n:1\r\n"
    b"+PONG\r\n"
    b"$5000\r\n" + BIG + b"\r\n"
)
CLAIMED = [[b"abc", None], b"PONG", BIG]
PUSHED = [[b"message", b"chan1", b'{"status": "OK"}'], [b"subscribe", b"chan2", 1]]


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def writelines(self, data: Any) -> None:
        self.written += list(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


def connected() -> tuple[RedisWire, Transport, list[Any]]:
    pushed: list[Any] = []
    wire = RedisWire(on_push=pushed.append)
    transport = Transport()
    wire.connection_made(transport)
    return wire, transport, pushed


async def test_replies_split_anywhere_are_handed_over_as_they_complete() -> None:
    for cut in [*range(1, 120), len(STREAM) - 3]:
        wire, _, pushed = connected()
        claimed: list[Any] = []
        done = wire.expect(3, claimed.append)
        wire.data_received(STREAM[:cut])
        wire.data_received(STREAM[cut:])
        assert (claimed, pushed) == (CLAIMED, PUSHED), cut
        assert all(isinstance(p, Push) for p in pushed)
        assert done.done() and done.result() is None
    wire, _, pushed = connected()
    claimed = []
    done = wire.expect(3, claimed.append)
    for byte in range(len(STREAM)):  # one byte per data_received
        assert not done.done()
        wire.data_received(STREAM[byte:byte + 1])
    assert (claimed, pushed) == (CLAIMED, PUSHED)
    assert await done is None
    assert not wire.closed.done()


async def test_claims_are_answered_in_order_and_write_goes_to_the_transport() -> None:
    wire, transport, _ = connected()
    first: list[Any] = []
    second: list[Any] = []
    one, two = wire.expect(1, first.append), wire.expect(2, second.append)
    wire.write([command(b"GET", b"k"), command(b"PING"), command(b"PING")])
    assert b"".join(transport.written) == (
        b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n")
    wire.data_received(b"$1\r\nv\r\n-ERR boom\r\n+PONG\r\n")
    assert await one is None and await two is None
    assert first == [b"v"]
    assert isinstance(second[0], ReplyError) and str(second[0]) == "ERR boom"
    assert second[1] == b"PONG"
    assert (await asyncio.gather(wire.expect(0)))[0] is None


async def test_what_is_not_resp_ends_the_connection() -> None:
    wire, transport, pushed = connected()
    claim = wire.expect(1)
    wire.data_received(b"?what\r\n")
    with pytest.raises(WireError, match="unreadable reply"):
        await claim
    with pytest.raises(WireError, match="unreadable reply"):
        wire.closed.result()
    assert transport.closing and not wire.is_open
    wire.data_received(STREAM)  # ignored from now on
    assert pushed == []
    with pytest.raises(WireError, match="unreadable reply"):
        wire.write([command(b"PING")])
    with pytest.raises(WireError):
        await wire.expect(1)


async def test_an_error_from_a_callback_ends_the_connection() -> None:
    def on_push(reply: Any) -> None:
        raise ValueError("bad push")

    wire = RedisWire(on_push=on_push)
    wire.connection_made(Transport())
    claim = wire.expect(5)
    wire.data_received(STREAM)
    with pytest.raises(ValueError, match="bad push"):
        await claim


async def test_a_reply_nobody_claimed_ends_a_connection_without_a_push_callback() -> None:
    wire = RedisWire()
    wire.connection_made(Transport())
    wire.data_received(b">2\r\n$1\r\na\r\n$1\r\nb\r\n")  # a push nobody asked for: aside
    assert not wire.closed.done()
    wire.data_received(b":1\r\n")
    with pytest.raises(WireError, match="nobody asked for"):
        wire.closed.result()


async def test_the_end_of_the_connection_fails_what_waits() -> None:
    wire, _, _ = connected()
    claim = wire.expect(1)
    wire.pause_writing()
    draining = asyncio.create_task(wire.drain())
    await asyncio.sleep(0)
    assert not draining.done()
    wire.connection_lost(ConnectionResetError("reset"))
    with pytest.raises(WireError, match="lost: reset"):
        await claim
    with pytest.raises(WireError, match="lost: reset"):
        await draining
    closed, _, _ = connected()
    assert closed.eof_received() is False
    with pytest.raises(WireError, match="closed the connection"):
        closed.closed.result()
    flowing, _, _ = connected()
    flowing.pause_writing()
    draining = asyncio.create_task(flowing.drain())
    await asyncio.sleep(0)
    flowing.resume_writing()
    await draining  # writable again


def params_of(url: str, **options: Any) -> Any:
    pool = BlockingConnectionPool.from_url(url, **options)
    return wire_params(pool.connection_class, pool.connection_kwargs)


def test_parameters_come_from_the_pool() -> None:
    plain = params_of("redis://u:p%40ss@127.0.0.1:6380/5?protocol=2", socket_timeout=3)
    assert (plain.host, plain.port, plain.db, plain.username, plain.password) == (
        "127.0.0.1", 6380, 5, "u", "p@ss")
    assert (plain.protocol, plain.tls, plain.path) == (2, None, None)
    assert params_of("redis://localhost").protocol is None  # RESP3 if the server has HELLO
    unix = params_of("unix:///tmp/redis.sock?db=3")
    assert (unix.path, unix.db) == ("/tmp/redis.sock", 3)
    tls = params_of("rediss://127.0.0.1:6379/0?ssl_cert_reqs=none")
    assert isinstance(tls.tls, ssl.SSLContext)
    assert tls.tls.verify_mode == ssl.CERT_NONE and not tls.tls.check_hostname
    strict = params_of("rediss://127.0.0.1:6379/0")
    assert strict.tls.verify_mode == ssl.CERT_REQUIRED and strict.tls.check_hostname
    kept = params_of("redis://127.0.0.1", socket_keepalive=True,
                     socket_keepalive_options={1: 2})
    assert kept.keepalive and kept.keepalive_options == ((1, 2),)


def test_what_the_wire_does_not_speak_is_left_to_redis_py() -> None:
    class Custom(Connection):
        pass

    pool = ConnectionPool(connection_class=Custom, host="127.0.0.1")
    assert wire_params(pool.connection_class, pool.connection_kwargs) is None
    provider = UsernamePasswordCredentialProvider("u", "p")
    assert params_of("redis://127.0.0.1", credential_provider=provider) is None
    assert params_of("redis://127.0.0.1", redis_connect_func=lambda c: None) is None
