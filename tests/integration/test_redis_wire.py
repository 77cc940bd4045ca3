"""Our own RESP connection (``results/redis_wire.py``) against the real Redis (db 12), and
which connections the store uses with ``fast_paths`` on and off.

The ACL user a test needs is made with a unique name and deleted afterwards; keys carry the
test's ``unique`` name and are deleted by the ``raw`` fixture. Nothing is flushed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import uuid
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis

from aioqueue import exceptions
from aioqueue.config import Settings
from aioqueue.meta import make_meta
from aioqueue.results.redis import RedisResultStore
from aioqueue.results.redis_wire import (
    OWN_WIRE,
    REDIS_PY,
    RedisWire,
    WireError,
    WireParams,
    open_wire,
    wire_params,
)
from aioqueue.results.resp import ReplyError, command, parse

from ..conftest import FAST_PATHS
from .test_redis_result_store import new_id, until_subscribed

pytestmark = pytest.mark.integration


def params(redis_url: str, **changes: object) -> WireParams:
    pool = aioredis.ConnectionPool.from_url(redis_url)
    found = wire_params(pool.connection_class, pool.connection_kwargs)
    assert found is not None
    return dataclasses.replace(found, **changes)  # type: ignore[arg-type]


async def client_info(raw: aioredis.Redis, name: str) -> dict[str, object]:
    [info] = [c for c in await raw.client_list() if c.get("name") == name]
    return info


@pytest.fixture
async def acl_user(raw: aioredis.Redis, unique: str) -> AsyncIterator[tuple[str, str]]:
    """A throwaway ACL user (unique name), deleted afterwards."""
    user, password = f"aioqueue-{unique}", uuid.uuid4().hex
    await raw.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    try:
        yield user, password
    finally:
        await raw.execute_command("ACL", "DELUSER", user)


async def open_named(p: WireParams, name: str) -> RedisWire:
    with anyio.fail_after(5):
        return await open_wire(p, name)


# -- the handshake ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [3, 2])
async def test_handshake_authenticates_selects_and_names(
    redis_url: str, raw: aioredis.Redis, unique: str, acl_user: tuple[str, str], protocol: int
) -> None:
    user, password = acl_user
    name = f"wire-{unique}"
    wire = await open_named(params(redis_url, username=user, password=password, db=12,
                                   protocol=protocol), name)
    try:
        assert wire.protocol == protocol
        info = await client_info(raw, name)
        assert (info["user"], int(str(info["db"]))) == (user, 12)
        assert info.get("resp", str(protocol)) == str(protocol)  # CLIENT LIST has it since 7.0
        key = f"{unique}-k".encode()
        assert await wire.call([[b"SET", key, b"v"], [b"GET", key]]) == [b"OK", b"v"]
        assert await raw.get(key) == b"v"  # db 12, as raw sees it
    finally:
        await wire.aclose()


async def test_a_refused_handshake_is_a_wire_error(
    redis_url: str, acl_user: tuple[str, str]
) -> None:
    user, _ = acl_user
    with anyio.fail_after(5), pytest.raises(WireError, match=r"refused HELLO.*WRONGPASS"):
        await open_wire(params(redis_url, username=user, password="wrong"), "x")
    with anyio.fail_after(5), pytest.raises(WireError, match=r"refused AUTH.*WRONGPASS"):
        await open_wire(params(redis_url, username=user, password="wrong", protocol=2), "x")
    with anyio.fail_after(5), pytest.raises(WireError, match="refused SELECT"):
        await open_wire(params(redis_url, db=100000), "x")
    with anyio.fail_after(5), pytest.raises(WireError, match="cannot connect"):
        await open_wire(params(redis_url, port=1), "x")


async def test_a_server_without_hello_is_spoken_to_in_resp2() -> None:
    """Redis before 6.0 (played by a loopback fake): no protocol asked for, HELLO refused,
    so a new connection speaks RESP2."""
    seen: list[list[bytes]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rest = b""
        while data := await reader.read(65536):
            commands, rest, _ = parse(rest + data)
            for args in commands:
                seen.append(args)
                if args[0] == b"HELLO":
                    writer.write(b"-ERR unknown command 'HELLO', with args beginning with: \r\n")
                else:
                    writer.write(b"+PONG\r\n" if args[0] == b"PING" else b"+OK\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        wire = await open_named(WireParams(host="127.0.0.1", port=port, password="pw", db=3),
                                "old")
        assert wire.protocol == 2
        assert await wire.call([[b"PING"]]) == [b"PONG"]
        await wire.aclose()
        assert seen == [[b"HELLO", b"3", b"AUTH", b"default", b"pw", b"SETNAME", b"old"],
                        [b"SELECT", b"3"], [b"AUTH", b"pw"], [b"CLIENT", b"SETNAME", b"old"],
                        [b"SELECT", b"3"], [b"PING"]]
    finally:
        server.close()
        await server.wait_closed()


async def test_the_store_speaks_to_redis_as_an_acl_user(
    redis_url: str, raw: aioredis.Redis, unique: str, acl_user: tuple[str, str]
) -> None:
    user, password = acl_user
    url = redis_url.replace("redis://", f"redis://{user}:{password}@")
    task_id = new_id(unique)
    async with RedisResultStore(url, Settings(fast_paths=True)) as store:
        waiting = asyncio.create_task(store.wait(task_id, timeout=5))
        await until_subscribed(raw, store.key_for(task_id))
        await store.store(task_id, make_meta(task_id, "SUCCESS", 9))
        assert (await waiting)["result"] == 9
        assert store.paths == {"listener": OWN_WIRE, "writer": OWN_WIRE}
        for name in (store.pubsub_client_name, store.writer_client_name):
            assert (await client_info(raw, name))["user"] == user
    bad = RedisResultStore(url.replace(password, "wrong"), Settings(fast_paths=True))
    with anyio.fail_after(5), pytest.raises(exceptions.ResultStoreError):
        await bad.wait(task_id, timeout=3)
    await bad.close()


# -- replies ---------------------------------------------------------------------------------


async def test_error_replies_are_values_and_the_connection_goes_on(
    redis_url: str, unique: str
) -> None:
    wire = await open_named(params(redis_url), f"wire-{unique}")
    try:
        bad, wrong, pong = await wire.call([[b"NO-SUCH-COMMAND"], [b"SET", b"only-a-key"],
                                            [b"PING"]])
        assert isinstance(bad, ReplyError) and str(bad).startswith("ERR unknown command")
        assert isinstance(wrong, ReplyError) and "wrong number of arguments" in str(wrong)
        assert pong == b"PONG"
    finally:
        await wire.aclose()


async def test_a_large_reply_arrives_in_many_reads(
    redis_url: str, raw: aioredis.Redis, unique: str
) -> None:
    values = [os.urandom(700_000) for _ in range(3)]
    keys = [f"{unique}-{n}".encode() for n in range(3)]
    await raw.mset(dict(zip(keys, values, strict=True)))
    wire = await open_named(params(redis_url), f"wire-{unique}")
    try:
        reads = 0
        original = wire.data_received

        def counted(data: bytes) -> None:
            nonlocal reads
            reads += 1
            original(data)

        wire.data_received = counted  # type: ignore[method-assign]  # our own object
        [reply] = await wire.call([[b"MGET", *keys]])
        assert reply == values
        assert reads > 3
    finally:
        await wire.aclose()


# -- the end of a connection -----------------------------------------------------------------


async def test_a_killed_connection_fails_what_waits_and_the_store_reconnects(
    redis_url: str, raw: aioredis.Redis, unique: str
) -> None:
    name = f"wire-{unique}"
    wire = await open_named(params(redis_url), name)
    [client_id] = await wire.call([[b"CLIENT", b"ID"]])
    blocked = wire.expect(1)
    wire.write([command(b"BLPOP", f"{unique}-never".encode(), b"10")])
    assert await raw.client_kill_filter(_id=client_id) == 1
    with anyio.fail_after(5), pytest.raises(WireError):
        await blocked
    assert not wire.is_open
    with pytest.raises(WireError):
        wire.write([command(b"PING")])
    await wire.aclose()
    # The store's own connections, killed by name, come back on their own.
    async with RedisResultStore(redis_url, Settings(fast_paths=True)) as store:
        first, second = new_id(unique), new_id(unique)
        await store.store(first, make_meta(first, "SUCCESS", 1))
        assert (await store.wait(first, timeout=5))["result"] == 1
        for client_name in (store.pubsub_client_name, store.writer_client_name):
            await raw.execute_command("CLIENT", "KILL", "ID",
                                      (await client_info(raw, client_name))["id"])
        waiting = asyncio.create_task(store.wait(second, timeout=10))
        await until_subscribed(raw, store.key_for(second))
        await store.store(second, make_meta(second, "SUCCESS", 2))
        assert (await waiting)["result"] == 2


# -- which path --------------------------------------------------------------------------------


@pytest.mark.parametrize("fast_paths", [True, False], ids=[OWN_WIRE, REDIS_PY])
async def test_fast_paths_picks_the_connections(
    redis_url: str, raw: aioredis.Redis, unique: str, fast_paths: bool
) -> None:
    task_id = new_id(unique)
    async with RedisResultStore(redis_url, Settings(fast_paths=fast_paths)) as store:
        assert store.paths == {"listener": None, "writer": None}
        await store.store(task_id, make_meta(task_id, "SUCCESS", 3))
        assert (await store.wait(task_id, timeout=5))["result"] == 3
        path = OWN_WIRE if fast_paths else REDIS_PY
        assert store.paths == {"listener": path, "writer": path}
        names = {c.get("name") for c in await raw.client_list()}
        assert store.pubsub_client_name in names
        assert (store.writer_client_name in names) is fast_paths


async def test_the_default_settings_use_our_own_connections(
    redis_url: str, unique: str
) -> None:
    """Loud if the fast path is off by default, or silently not taken for a plain URL."""
    fresh = await anyio.run_process(
        [sys.executable, "-c", "from aioqueue.config import Settings as S; print(S().fast_paths)"],
        env={k: v for k, v in os.environ.items() if k != "AIOQUEUE_FAST_PATHS"},
    )
    assert fresh.stdout.decode().strip() == "True"
    task_id = new_id(unique)
    async with RedisResultStore(redis_url, Settings()) as store:
        await store.store(task_id, make_meta(task_id, "SUCCESS", 4))
        assert (await store.wait(task_id, timeout=5))["result"] == 4
        path = OWN_WIRE if FAST_PATHS else REDIS_PY  # AIOQUEUE_FAST_PATHS=0: the suite's run
        assert store.paths == {"listener": path, "writer": path}
