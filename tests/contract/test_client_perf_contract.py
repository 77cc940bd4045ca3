"""``spare_task_id()``/``expect()``/``unexpect()``, the hooks a client calls around each send,
on every store: they never fail, and waits behave as without them (whether a store uses them
or not)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from aioqueue import TimeoutError
from aioqueue.meta import make_meta
from aioqueue.results.base import ResultStore


async def test_expected_results_are_waited_for_as_any_other(store: ResultStore) -> None:
    before, during, failed = (str(uuid.uuid4()) for _ in range(3))
    # Twice: before the store's first wait, and after it (a store may listen only then).
    for _ in range(2):
        await store.store(before, make_meta(before, "SUCCESS", 1), reply_to=store.reply_to)
        store.expect(before)
        store.expect(before)  # sent again
        assert (await store.wait(before, timeout=5))["result"] == 1
        store.expect(during)
        await store.store(during, make_meta(during, "STARTED", None), reply_to=store.reply_to)
        await store.store(during, make_meta(during, "SUCCESS", 2), reply_to=store.reply_to)
        assert (await store.wait(during, timeout=5))["result"] == 2
        store.expect(failed)
        store.unexpect(failed)
        store.unexpect(failed)
        with pytest.raises(TimeoutError):
            await store.wait(failed, timeout=0.1)
        await store.forget(before)
        await store.forget(during)


async def test_a_forgotten_expected_result_is_gone(store: ResultStore) -> None:
    if store.reply_to is not None:
        pytest.skip("rpc:// results are messages to the client: nothing to forget")
    warm, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    await store.store(warm, make_meta(warm, "SUCCESS", 0))
    await store.wait(warm, timeout=5)  # a Redis store listens from now on
    store.expect(task_id)
    await store.store(task_id, make_meta(task_id, "SUCCESS", 3))
    assert (await store.get(task_id) or {}).get("result") == 3
    await store.forget(task_id)
    with pytest.raises(TimeoutError):
        await store.wait(task_id, timeout=0.3)
    await store.forget(warm)


async def test_spare_task_ids_are_new_uuid4s_waited_for_as_any_other(store: ResultStore) -> None:
    warm = str(uuid.uuid4())
    await store.store(warm, make_meta(warm, "SUCCESS", 0), reply_to=store.reply_to)
    await store.wait(warm, timeout=5)  # a Redis store listens (and subscribes spares) now
    spares: list[str] = []
    for _ in range(200):  # a store has none, or they become ready within a few round trips
        spare = store.spare_task_id()
        if spare is not None:
            spares.append(spare)
            if len(spares) == 3:
                break
        await asyncio.sleep(0.005)
    if type(store).spare_task_id is ResultStore.spare_task_id:  # offers none: the default
        assert not spares
        return
    assert len(spares) == 3, "the store offers spare ids but none became ready"
    assert len(set(spares)) == len(spares)  # each handed out once
    for spare in spares:
        assert uuid.UUID(spare).version == 4 and str(uuid.UUID(spare)) == spare
    sent, dropped, unused = spares
    store.expect(sent)
    await store.store(sent, make_meta(sent, "SUCCESS", 5), reply_to=store.reply_to)
    assert (await store.wait(sent, timeout=5))["result"] == 5
    store.unexpect(dropped)  # its send failed before expect()
    store.expect(unused)
    store.unexpect(unused)
    with pytest.raises(TimeoutError):
        await store.wait(dropped, timeout=0.1)
    await store.forget(sent)
    await store.forget(warm)
