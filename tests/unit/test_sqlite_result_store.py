"""``sqlite://`` result store: the store contract, waits across stores and processes."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from aioqueue import states
from aioqueue.brokers.sqlite import SqliteBroker
from aioqueue.config import Queue, Settings
from aioqueue.exceptions import ResultStoreError, SerializationError, TimeoutError
from aioqueue.meta import make_meta
from aioqueue.protocol import Envelope
from aioqueue.results import sqlite as sqlite_results
from aioqueue.results.sqlite import SqliteResultStore
from aioqueue.sqlite_db import database_path

PROJECT = str(Path(__file__).resolve().parents[2])

MakeStore = Callable[..., Awaitable[SqliteResultStore]]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'results.db'}"


@pytest.fixture
async def make_store(url: str) -> AsyncIterator[MakeStore]:
    """Connected stores on the test's file (each like another process); closed at the end."""
    stores: list[SqliteResultStore] = []

    async def make(**settings: Any) -> SqliteResultStore:
        store = SqliteResultStore(url, Settings(**settings))
        await store.connect()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


def success(task_id: str, value: Any) -> dict[str, Any]:
    return make_meta(task_id, states.SUCCESS, value)


async def test_store_get_forget(make_store: MakeStore) -> None:
    store = await make_store()
    assert await store.get("t1") is None
    meta = success("t1", {"answer": [4, 2]})
    await store.store("t1", meta)
    assert await store.get("t1") == meta
    other = await make_store()  # another connection sees it
    assert await other.get("t1") == meta
    await other.forget("t1")
    assert await store.get("t1") is None


async def test_success_is_never_overwritten(make_store: MakeStore) -> None:
    store = await make_store()
    await store.store("t", make_meta("t", states.STARTED, {"pid": 1}))
    await store.store("t", success("t", 1))
    await store.store("t", make_meta("t", states.FAILURE, {"exc_type": "ValueError"}))
    record = await store.get("t")
    assert record is not None and record["status"] == states.SUCCESS and record["result"] == 1


async def test_expired_records_are_missing_and_purged(make_store: MakeStore, url: str) -> None:
    store = await make_store(result_expires=1e-6)
    await store.store("old", success("old", 1))
    assert await store.get("old") is None  # expired: as if never stored, and deleted
    await store.store("old", success("old", 2))  # an expired SUCCESS may be replaced
    await store.store("other", success("other", 3))  # ... and the next write purges
    await store.store("another", success("another", 4))
    lasting = await make_store(result_expires=None)
    await lasting.store("kept", success("kept", 5))
    with anyio.fail_after(5):
        await lasting.wait("kept")
    rows = await anyio.to_thread.run_sync(
        lambda: sqlite3.connect(database_path(url)).execute(
            "SELECT task_id FROM aioqueue_results").fetchall()
    )
    assert {r[0] for r in rows} <= {"another", "kept"}
    assert ("kept",) in rows


async def test_unserializable_result_writes_nothing(make_store: MakeStore) -> None:
    store = await make_store()
    with pytest.raises(SerializationError):
        await store.store("t", success("t", object()))
    assert await store.get("t") is None


async def test_wait_wakes_on_a_write_in_this_process(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Polls 30 s apart: only the in-process wake can make the wait end in time.
    monkeypatch.setattr(sqlite_results, "MIN_POLL_INTERVAL", 30.0)
    waiting, writing = await make_store(), await make_store()
    result: list[dict[str, Any]] = []
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:

            async def wait() -> None:
                result.append(await waiting.wait("t"))

            tg.start_soon(wait)
            await writing.store("t", make_meta("t", states.STARTED, {}))  # not ready yet
            await writing.store("t", success("t", 9))
    assert result[0]["result"] == 9


async def test_wait_times_out(make_store: MakeStore) -> None:
    store = await make_store()
    with pytest.raises(TimeoutError, match="t-missing"):
        await store.wait("t-missing", timeout=0.05)
    assert store._waiters == {}


async def test_many_waits_one_poller(make_store: MakeStore) -> None:
    store, writer = await make_store(), await make_store()
    ids = [f"t{n}" for n in range(300)]
    async with anyio.create_task_group() as tg:
        got: dict[str, Any] = {}

        async def wait(task_id: str) -> None:
            got[task_id] = (await store.wait(task_id, timeout=10))["result"]

        for task_id in ids:
            tg.start_soon(wait, task_id)
        for n, task_id in enumerate(ids):
            await writer.store(task_id, success(task_id, n))
    assert got == {task_id: n for n, task_id in enumerate(ids)}
    assert store._poller is not None and not store._poller.done()


WRITER = textwrap.dedent("""
    import asyncio, sys
    from aioqueue import states
    from aioqueue.config import Settings
    from aioqueue.meta import make_meta
    from aioqueue.results.sqlite import SqliteResultStore

    async def main(url):
        async with SqliteResultStore(url, Settings()) as store:
            input()  # the parent is waiting now
            await store.store("xp", make_meta("xp", states.SUCCESS, "from another process"))

    asyncio.run(main(sys.argv[1]))
""")


async def test_wait_sees_a_write_from_another_process(make_store: MakeStore, url: str) -> None:
    store = await make_store()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, url, cwd=PROJECT, stdin=asyncio.subprocess.PIPE,
    )
    try:
        async with anyio.create_task_group() as tg:
            result: list[dict[str, Any]] = []
            waiting = anyio.Event()

            async def wait() -> None:
                waiting.set()
                result.append(await store.wait("xp", timeout=10))

            tg.start_soon(wait)
            await waiting.wait()  # the write comes while the poller is polling
            assert process.stdin is not None
            process.stdin.write(b"go\n")
            await process.stdin.drain()
        assert result[0]["result"] == "from another process"
        assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_close_stops_the_poller_and_the_thread(make_store: MakeStore) -> None:
    store = await make_store()
    waiting = anyio.Event()
    async with anyio.create_task_group() as tg:
        async def wait() -> None:
            waiting.set()  # store.wait() starts the poller before it first yields
            with pytest.raises(ResultStoreError, match="closed"):
                await store.wait("never", timeout=5)

        tg.start_soon(wait)
        await waiting.wait()
        poller = store._poller
        assert poller is not None
        await store.close()
        assert poller.done()
    assert not any(t.name.startswith("aioqueue-sqlite") for t in threading.enumerate())
    with pytest.raises(ResultStoreError, match="not connected"):
        await store.get("t")


async def test_broker_and_store_share_one_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'both.db'}"
    settings = Settings()
    async with SqliteBroker(url, settings) as broker, SqliteResultStore(url, settings) as store:
        await broker.declare(Queue("q"))

        async def publish() -> None:
            for n in range(200):
                await broker.publish(Envelope(body=b"x", headers={"id": str(n)}),
                                     routing_key="q")

        async def write() -> None:
            for n in range(200):
                await store.store(f"t{n}", success(f"t{n}", n))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(publish)
                tg.start_soon(write)
            async with broker.consume(["q"], prefetch=50) as consumer:
                for _ in range(200):
                    await (await consumer.receive()).ack()
            assert (await store.wait("t199"))["result"] == 199
