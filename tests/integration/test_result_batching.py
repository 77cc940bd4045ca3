"""Result writes pipelined per loop iteration (``results/redis_writer.py``), on the real Redis.

Stores issued together go out as one pipeline of EVALSHAs; each caller still gets its own
outcome, on our own connection (``fast_paths``) and on redis-py's pipelines alike. Keys carry
the test's ``unique`` name and are deleted afterwards (db 12); nothing
is flushed. NOSCRIPT is provoked with a script of the test's own (a unique comment makes a
script Redis has never seen), never with SCRIPT FLUSH. The script is left in Redis's script
cache, which holds no data.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from aioqueue import exceptions, states
from aioqueue.config import Settings
from aioqueue.meta import make_meta
from aioqueue.results import redis as redis_results
from aioqueue.results.redis import RedisResultStore
from aioqueue.results.redis_wire import OWN_WIRE, REDIS_PY
from aioqueue.results.redis_writer import ResultWriter

pytestmark = pytest.mark.integration


def ids(unique: str, count: int) -> list[str]:
    return [f"{unique}-{uuid.uuid4()}" for _ in range(count)]


def success(task_id: str, value: Any = 1) -> dict[str, Any]:
    return make_meta(task_id, states.SUCCESS, value)


async def stored_status(raw: aioredis.Redis, store: RedisResultStore, task_id: str) -> Any:
    data = await raw.get(store.key_for(task_id))
    return None if data is None else json.loads(data)["status"]


async def writer_connections(raw: aioredis.Redis, name: str) -> list[dict[str, Any]]:
    clients: list[dict[str, Any]] = await raw.client_list()
    return [c for c in clients if c.get("name") == name]


async def test_one_bad_record_fails_alone(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    """A key of the wrong type makes the script fail for that record only; the others of
    the same pipeline are written, and a record that cannot be encoded fails at once."""
    good = ids(unique, 20)
    bad = f"{unique}-wrongtype"
    await raw.hset(store.key_for(bad), "not", "a string")  # GET on a hash: WRONGTYPE
    unencodable = f"{unique}-unencodable"
    calls = [store.store(task_id, success(task_id)) for task_id in good[:10]]
    calls.append(store.store(bad, success(bad)))
    calls.append(store.store(unencodable, success(unencodable, value=object())))
    calls += [store.store(task_id, success(task_id)) for task_id in good[10:]]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert outcomes[:10] == [None] * 10 and outcomes[12:] == [None] * 10
    assert isinstance(outcomes[10], exceptions.ResultStoreError)
    assert "WRONGTYPE" in str(outcomes[10])
    assert isinstance(outcomes[11], exceptions.SerializationError)
    for task_id in good:
        assert await stored_status(raw, store, task_id) == states.SUCCESS
    assert await raw.type(store.key_for(bad)) == b"hash"  # untouched
    assert await raw.exists(store.key_for(unencodable)) == 0


async def test_success_guard_holds_within_one_pipeline(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    """SUCCESS then FAILURE for one id in the same batch: the script runs them in order,
    so the FAILURE is not written (Celery never overwrites a SUCCESS)."""
    (task_id,) = ids(unique, 1)
    failure = make_meta(task_id, states.FAILURE, {"exc_type": "X", "exc_message": [],
                                                   "exc_module": "builtins"})
    await asyncio.gather(store.store(task_id, success(task_id)), store.store(task_id, failure))
    assert await stored_status(raw, store, task_id) == states.SUCCESS


@pytest.mark.parametrize("fast_paths", [True, False], ids=[OWN_WIRE, REDIS_PY])
async def test_unknown_script_is_loaded_and_the_records_sent_again(
    redis_url: str, raw: aioredis.Redis, unique: str, fast_paths: bool
) -> None:
    """NOSCRIPT (as after a Redis restart or a SCRIPT FLUSH): the writer loads the script
    and sends the records again behind it; every caller gets its outcome."""
    source = f"{redis_results._STORE_SCRIPT}\n-- {unique}\n"  # a script Redis never saw
    store = RedisResultStore(redis_url, Settings(fast_paths=fast_paths))
    await store.connect()
    if fast_paths:
        writer = ResultWriter(source, 60, 10.0, connect=store._open_writer)
    else:
        assert store._client is not None
        writer = ResultWriter(source, 60, 10.0, client=store._client)
    assert await raw.script_exists(writer.sha.decode()) == [False]
    try:
        keys = [store.key_for(task_id).encode() for task_id in ids(unique, 5)]
        values = [json.dumps(success(k.decode())).encode() for k in keys]
        written = await asyncio.gather(
            *(writer.store(k, v) for k, v in zip(keys, values, strict=True))
        )
        assert written == [True] * 5
        assert await raw.script_exists(writer.sha.decode()) == [True]
        for key, value in zip(keys, values, strict=True):
            assert await raw.get(key) == value
            assert 0 < await raw.ttl(key) <= 60
        # The same record again: the guard sees SUCCESS and skips it.
        assert await writer.store(keys[0], values[0]) is False
    finally:
        await writer.close()
        await store.close()


async def test_a_lost_connection_is_replaced_without_failing_the_store(
    redis_url: str, raw: aioredis.Redis, unique: str
) -> None:
    """The writer's own connection was killed while idle (as by a Redis restart): the next
    batch notices and goes out again on a new connection, without an error."""
    first, second = ids(unique, 2)
    async with RedisResultStore(redis_url, Settings(fast_paths=True)) as store:
        await store.store(first, success(first))
        (conn,) = await writer_connections(raw, store.writer_client_name)
        await raw.client_kill_filter(_id=conn["id"])
        await asyncio.gather(*(store.store(second, success(second)) for _ in range(3)))
        assert await stored_status(raw, store, second) == states.SUCCESS
        assert len(await writer_connections(raw, store.writer_client_name)) == 1


async def test_close_fails_stores_not_yet_written(
    redis_url: str, settings: Settings, raw: aioredis.Redis, unique: str
) -> None:
    s = RedisResultStore(redis_url, settings)
    await s.connect()
    (task_id,) = ids(unique, 1)
    await s.store(task_id, success(task_id))  # the writer exists and is connected
    pending = asyncio.ensure_future(s.store(task_id + "-late", success(task_id)))
    await asyncio.sleep(0)  # queued (written at once on the open connection), no reply read
    await s.close()
    with pytest.raises(exceptions.ResultStoreError, match="closed"):
        await pending
    assert await writer_connections(raw, s.writer_client_name) == []


async def test_a_lone_store_is_written_by_store_itself(
    redis_url: str, raw: aioredis.Redis, unique: str
) -> None:
    """Nothing in flight on an open connection: the record leaves before store() returns
    (no loop iteration for the flusher first); records queued meanwhile make a batch."""
    async with RedisResultStore(redis_url, Settings(fast_paths=True)) as s:
        first, lone, a, b = ids(unique, 4)
        await s.store(first, success(first))  # connects the writer
        writer = s._writer
        assert writer is not None
        outcome = writer.store(s.key_for(lone).encode(), s.encode(success(lone, 2)))
        assert writer._written is not None
        assert [item[0] for item in writer._written.items] == [s.key_for(lone).encode()]
        queued = [writer.store(s.key_for(i).encode(), s.encode(success(i, 3))) for i in (a, b)]
        assert len(writer._pending) == 2  # behind the one in flight
        assert await outcome is True
        assert await asyncio.gather(*queued) == [True, True]
        assert [(await s.get(i) or {}).get("result") for i in (lone, a, b)] == [2, 3, 3]


async def test_unreachable_redis_fails_each_store(settings: Settings, unique: str) -> None:
    s = RedisResultStore("redis://127.0.0.1:1/12", settings)
    try:
        with pytest.raises(exceptions.ResultStoreError):
            await s.store(unique, success(unique))
    finally:
        await s.close()

