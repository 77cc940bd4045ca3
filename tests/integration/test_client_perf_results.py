"""Waiting for Redis results the cheap way, against the real Redis (db 12).

* waits behave the same on RESP2 and RESP3 connections (keys read on a pooled connection
  after the subscription is confirmed, or, on our own RESP3 connection, on the pub/sub
  connection behind the SUBSCRIBE);
* ``expect()`` (a task being sent) subscribes at once; a record that arrives before the
  wait is kept and handed to it, a record stored before the subscription is read; channels
  are let go when the record arrives, when the send fails, on ``forget()``, and past the
  bounds; after a reconnect they are subscribed and read again;
* timeouts and cancellations leave no waiter and no subscription behind;
* ``delay()`` subscribes while it publishes once the app's store listens;
* spare task ids come with their channels subscribed (and confirmed) ahead, many per
  command; ``delay()`` uses them, and lets one go when its send fails.

Records kept for a wait are told apart from reads by deleting the key before the wait.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from aioqueue import AioQueue, exceptions
from aioqueue.config import Settings
from aioqueue.meta import make_meta
from aioqueue.results import redis_listener
from aioqueue.results.redis import RedisResultStore

from .conftest import delete_queues, eventually
from .test_redis_result_store import new_id, pubsub_connection_id, until_numsub, until_subscribed

pytestmark = pytest.mark.integration


@pytest.fixture(params=[3, 2], ids=["resp3", "resp2"])
async def store(
    request: pytest.FixtureRequest, redis_url: str, raw: aioredis.Redis
) -> AsyncIterator[RedisResultStore]:
    s = RedisResultStore(f"{redis_url}?protocol={request.param}", Settings())
    await s.connect()
    yield s
    await s.close()


async def listening(store: RedisResultStore, unique: str) -> None:
    """Start the store's listener the way a client does: by waiting once."""
    task_id = new_id(unique)
    await store.store(task_id, make_meta(task_id, "SUCCESS", 0))
    await store.wait(task_id, timeout=5)


async def expected(store: RedisResultStore, raw: aioredis.Redis, unique: str) -> str:
    """A new id, expected by a listening store, once Redis counts its subscription."""
    await listening(store, unique)
    task_id = new_id(unique)
    store.expect(task_id)
    await until_subscribed(raw, store.key_for(task_id))
    return task_id


async def kept(store: RedisResultStore, raw: aioredis.Redis, task_id: str) -> None:
    """Wait until the record of ``task_id`` arrived and was kept (its channel let go), then
    delete the key: only the kept copy can answer a wait after this."""
    await until_numsub(raw, store.key_for(task_id), 0)
    await raw.delete(store.key_for(task_id))


async def test_waits_on_either_protocol(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    before, during, joined = new_id(unique), new_id(unique), new_id(unique)
    await store.store(before, make_meta(before, "SUCCESS", 1))
    assert (await store.wait(before, timeout=5))["result"] == 1
    # Keys read in-line: on our own RESP3 connection only.
    assert store._waiting.inline == (store.fast_paths and store.url.endswith("protocol=3"))
    waiting = asyncio.create_task(store.wait(during, timeout=5))
    await until_subscribed(raw, store.key_for(during))
    await raw.publish(store.key_for(during), store.encode(make_meta(during, "SUCCESS", 2)))
    assert (await waiting)["result"] == 2
    # A wait joining a subscribed channel reads the key again (written without a message).
    first = asyncio.create_task(store.wait(joined, timeout=5))
    await until_subscribed(raw, store.key_for(joined))
    await raw.set(store.key_for(joined), store.encode(make_meta(joined, "SUCCESS", 3)))
    assert (await store.wait(joined, timeout=5))["result"] == (await first)["result"] == 3
    many = [new_id(unique) for _ in range(500)]
    waits = [asyncio.create_task(store.wait(i, timeout=10)) for i in many]
    await asyncio.gather(*(store.store(i, make_meta(i, "SUCCESS", n)) for n, i in enumerate(many)))
    assert [m["result"] for m in await asyncio.gather(*waits)] == list(range(500))


async def test_a_record_arriving_before_the_wait_is_kept_for_it(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    task_id = await expected(store, raw, unique)
    await store.store(task_id, make_meta(task_id, "STARTED", None))  # not ready: still held
    await store.store(task_id, make_meta(task_id, "SUCCESS", 7))
    await kept(store, raw, task_id)
    assert (await store.wait(task_id, timeout=5))["result"] == 7
    # Handed out once: a second wait finds nothing.
    with pytest.raises(exceptions.TimeoutError):
        await store.wait(task_id, timeout=0.2)


async def test_expect_returns_a_future_the_ready_record_completes(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    await listening(store, unique)
    task_id, dropped = new_id(unique), new_id(unique)
    arrival = store.expect(task_id)
    assert arrival is not None
    assert store.expect(task_id) is arrival  # held already: the same send's future
    await until_subscribed(raw, store.key_for(task_id))
    await store.store(task_id, make_meta(task_id, "STARTED", None))
    await asyncio.sleep(0.1)
    assert not arrival.done()  # not ready: no proof the task is over, nor needed
    await store.store(task_id, make_meta(task_id, "SUCCESS", 3))
    await asyncio.wait_for(arrival, 5)
    assert (await store.wait(task_id, timeout=5))["result"] == 3
    other = store.expect(dropped)
    assert other is not None
    store.unexpect(dropped)  # a failed send: let go, never completed
    assert not other.done() and not store._waiting._arrivals


async def test_a_record_stored_before_the_subscription_is_read(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    await listening(store, unique)
    task_id = new_id(unique)
    await store.store(task_id, make_meta(task_id, "FAILURE", {"exc_type": "KeyError"}))
    store.expect(task_id)  # subscribes; the read behind it finds the record
    await kept(store, raw, task_id)
    assert (await store.wait(task_id, timeout=5))["status"] == "FAILURE"


async def test_a_wait_takes_over_an_expected_channel(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    task_id = await expected(store, raw, unique)
    waiting = asyncio.create_task(store.wait(task_id, timeout=5))
    key = store.key_for(task_id).encode()
    await eventually(lambda: key in store._waiting.waiters)  # the wait took the channel over
    await store.store(task_id, make_meta(task_id, "SUCCESS", 8))
    assert (await waiting)["result"] == 8
    await until_numsub(raw, store.key_for(task_id), 0)


async def test_expect_does_nothing_until_the_store_has_waited(
    redis_url: str, raw: aioredis.Redis, unique: str
) -> None:
    async with RedisResultStore(redis_url, Settings()) as store:
        task_id = new_id(unique)
        assert store.expect(task_id) is None  # no proof of arrival to offer either
        # Nothing to wait for: no listener was started, and nothing was queued for one.
        assert store._listener is None
        assert not store._waiting._ops and not store._waiting._expected
        [(_, subscribers)] = await raw.pubsub_numsub(store.key_for(task_id))
        assert subscribers == 0


async def test_unexpect_and_forget_let_go(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    await listening(store, unique)
    failed, forgotten = new_id(unique), new_id(unique)
    store.expect(failed)
    await until_subscribed(raw, store.key_for(failed))
    store.unexpect(failed)
    await until_numsub(raw, store.key_for(failed), 0)
    store.expect(forgotten)
    await until_subscribed(raw, store.key_for(forgotten))
    await store.store(forgotten, make_meta(forgotten, "SUCCESS", 1))
    await until_numsub(raw, store.key_for(forgotten), 0)
    await store.forget(forgotten)
    with pytest.raises(exceptions.TimeoutError):
        await store.wait(forgotten, timeout=0.2)


async def test_kept_records_and_expected_channels_are_bounded(
    store: RedisResultStore, raw: aioredis.Redis, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_listener, "EXPECTED", 5)
    monkeypatch.setattr(redis_listener, "KEPT", 3)
    await listening(store, unique)
    ids = [new_id(unique) for _ in range(8)]
    for task_id in ids:
        store.expect(task_id)
    for task_id in ids[3:]:
        await until_subscribed(raw, store.key_for(task_id))
    for task_id in ids[:3]:  # the oldest were let go
        await until_numsub(raw, store.key_for(task_id), 0)
    for n, task_id in enumerate(ids[3:]):
        await store.store(task_id, make_meta(task_id, "SUCCESS", n))
        await until_numsub(raw, store.key_for(task_id), 0)
    # Three kept (the newest); the two older ones are read from Redis by their waits.
    assert list(store._waiting._kept) == [store.key_for(i).encode() for i in ids[5:]]
    assert [(await store.wait(i, timeout=5))["result"] for i in ids[3:]] == list(range(5))
    for task_id in ids[6:]:
        await raw.delete(store.key_for(task_id))
    with pytest.raises(exceptions.TimeoutError):
        await store.wait(ids[6], timeout=0.2)  # handed out already


async def test_expected_channels_are_subscribed_and_read_again_after_a_reconnect(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    await listening(store, unique)
    task_id = new_id(unique)
    key = store.key_for(task_id)
    store.expect(task_id)
    await until_subscribed(raw, key)
    # Lands without a message, then the connection dies: only a read after reconnecting
    # finds it.
    await raw.set(key, store.encode(make_meta(task_id, "SUCCESS", 5)))
    await raw.client_kill_filter(_id=await pubsub_connection_id(raw, store))
    await until_subscribed(raw, key)  # subscribed again
    await kept(store, raw, task_id)
    assert (await store.wait(task_id, timeout=5))["result"] == 5


async def test_timeouts_and_cancellations_leave_nothing_behind(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    await listening(store, unique)
    task_id = new_id(unique)
    with pytest.raises(exceptions.TimeoutError) as info:
        await store.wait(task_id, timeout=0.1)
    assert isinstance(info.value, builtins.TimeoutError)
    assert str(info.value) == f"no result for task {task_id} within 0.1 s"
    waiting = asyncio.create_task(store.wait(task_id, timeout=30))
    await until_subscribed(raw, store.key_for(task_id))
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert store._waiting.waiters == {}
    await until_numsub(raw, store.key_for(task_id), 0)
    # A record that comes now is nobody's: not kept.
    await store.store(task_id, make_meta(task_id, "SUCCESS", 1))
    assert store._waiting.take_kept(store.key_for(task_id).encode()) is None


async def test_expect_subscribes_in_the_next_loop_iteration(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    # The SUBSCRIBE waits one loop iteration, so the publish queued right after expect()
    # is written first; the expects of one iteration still share the write.
    await listening(store, unique)
    # The first wait's UNSUBSCRIBE (held up to UNSUBSCRIBE_DELAY for company) is out.
    await eventually(lambda: not store._waiting._ops and not store._waiting._ops_ready.is_set())
    ids = [new_id(unique) for _ in range(3)]
    for task_id in ids:
        store.expect(task_id)
    assert not store._waiting._ops_ready.is_set()
    await asyncio.sleep(0)
    assert store._waiting._ops_ready.is_set() or not store._waiting._ops
    for task_id in ids:
        await until_subscribed(raw, store.key_for(task_id))


@contextlib.asynccontextmanager
async def listening_app(
    amqp_url: str, redis_url: str, unique: str
) -> AsyncIterator[tuple[AioQueue, Any, RedisResultStore]]:
    """An app with a no-op task whose store listens (it has waited once)."""
    app = AioQueue("perf", broker=amqp_url, backend=redis_url, task_default_queue=unique)

    @app.task(name=f"{unique}.noop")
    async def noop() -> None:
        return None

    try:
        store = await app.get_result_store()
        assert isinstance(store, RedisResultStore)
        await listening(store, unique)
        yield app, noop, store
    finally:
        await app.close()
        await delete_queues(amqp_url, [unique])


async def test_delay_subscribes_while_it_publishes(
    amqp_url: str, redis_url: str, raw: aioredis.Redis, unique: str
) -> None:
    async with listening_app(amqp_url, redis_url, unique) as (app, noop, store):

        @app.task(name=f"{unique}.quiet", ignore_result=True)
        async def quiet() -> None:
            return None

        result = await noop.delay()
        await until_subscribed(raw, store.key_for(result.id))
        await store.store(result.id, make_meta(result.id, "SUCCESS", 42))  # as a worker would
        await kept(store, raw, result.id)
        assert await result.get(timeout=5) == 42
        ignored = await quiet.delay()
        failed = new_id(unique)
        with pytest.raises(exceptions.BrokerError):
            await noop.apply_async(task_id=failed, exchange=f"{unique}-missing")
        for task_id in (ignored.id, failed):  # an UNSUBSCRIBE may wait a moment for company
            await until_numsub(raw, store.key_for(task_id), 0)
        await eventually(lambda: not store._waiting._expected)


async def ready_spare(store: RedisResultStore) -> str:
    """A spare id, once the spares asked for by the first call are confirmed."""
    for _ in range(1000):
        spare = store.spare_task_id()
        if spare is not None:
            return spare
        await asyncio.sleep(0.005)
    raise AssertionError("no spare task id became ready")


def next_spare(store: RedisResultStore) -> str:
    """The id the next ``spare_task_id()`` hands out (oldest first)."""
    return next(iter(store._waiting._spares.values()))


async def next_ready_spare(store: RedisResultStore) -> str:
    """``next_spare``, once Redis confirmed its subscription (it is handed out then)."""
    spare = next_spare(store)
    key = store.key_for(spare).encode()
    await eventually(lambda: key in store._waiting._confirmed)
    return spare


async def test_spare_ids_come_subscribed_ahead(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    assert store.spare_task_id() is None  # no listener yet: nothing asked of Redis
    assert not store._waiting._spares
    await listening(store, unique)
    assert store.spare_task_id() is None  # none ready: asks for SPARES in one go
    assert len(store._waiting._spares) == redis_listener.SPARES
    spare = await ready_spare(store)
    await until_subscribed(raw, store.key_for(spare))  # before the task was even sent
    await eventually(lambda: not store._waiting._ops)
    arrival = store.expect(spare)
    assert arrival is not None
    assert not store._waiting._ops  # nothing left to subscribe
    await store.store(spare, make_meta(spare, "SUCCESS", 11))
    await asyncio.wait_for(arrival, 5)
    assert (await store.wait(spare, timeout=5))["result"] == 11
    await until_numsub(raw, store.key_for(spare), 0)
    # Handed out once each, oldest first; refilled when fewer than SPARES_LOW are left.
    taken = {spare}
    while True:
        left, expected = len(store._waiting._spares), next_spare(store)
        assert await ready_spare(store) == expected
        assert expected not in taken
        taken.add(expected)
        store.unexpect(expected)
        if len(store._waiting._spares) > left:  # refilled
            break
    assert len(taken) == redis_listener.SPARES - redis_listener.SPARES_LOW + 1
    assert len(store._waiting._spares) == redis_listener.SPARES
    await ready_spare(store)  # the refill is confirmed in turn
    for task_id in taken:
        await until_numsub(raw, store.key_for(task_id), 0)
    assert not taken & set(store._waiting._spares.values())


async def test_spares_are_dropped_with_their_connection(
    store: RedisResultStore, raw: aioredis.Redis, unique: str
) -> None:
    await listening(store, unique)
    store.unexpect(await ready_spare(store))
    old = set(store._waiting._spares.values())
    await raw.client_kill_filter(_id=await pubsub_connection_id(raw, store))
    await eventually(lambda: not old & set(store._waiting._spares.values()))
    spare = await ready_spare(store)  # new ones, on the new connection
    assert spare not in old
    await until_subscribed(raw, store.key_for(spare))


async def test_delay_sends_with_a_spare_id_and_lets_it_go_on_failure(
    amqp_url: str, redis_url: str, raw: aioredis.Redis, unique: str
) -> None:
    async with listening_app(amqp_url, redis_url, unique) as (_, noop, store):
        store.unexpect(await ready_spare(store))
        spare = await next_ready_spare(store)
        result = await noop.delay()
        assert result.id == spare
        await store.store(result.id, make_meta(result.id, "SUCCESS", 42))  # as a worker would
        assert await result.get(timeout=5) == 42
        spare = await next_ready_spare(store)
        with pytest.raises(exceptions.BrokerError):
            await noop.apply_async(exchange=f"{unique}-missing")
        await until_numsub(raw, store.key_for(spare), 0)
        assert spare not in store._waiting._spares.values()
        await eventually(lambda: not store._waiting._expected)
        given = new_id(unique)  # a given id never comes from the spares
        assert (await noop.apply_async(task_id=given)).id == given
