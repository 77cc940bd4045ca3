"""The subprocess half of test_isolation.py: run as a script, never imported by the tests.

``python isolation_probe.py globals``
    Imports aio-pika, aiormq, pamqp, redis, asyncio, yarl, anyio and orjson (not aioqueue),
    with every submodule of theirs that aioqueue's source imports (found with ast), snapshots
    every attribute of their loaded modules and of the classes defined there (and the contents
    of their dicts, lists and sets, such as pamqp.decode.METHODS and TABLE_MAPPING), then
    imports aioqueue and runs a full round trip (a worker and a client in this process, on
    RabbitMQ with Redis results, then with ``rpc://``), snapshots again and prints, as the last
    line of its output, a JSON list of the differences.

``python isolation_probe.py user`` / ``python isolation_probe.py user-beside-aioqueue``
    A user's own aio-pika and redis-py code: publishes a message with rich headers and reads
    it back (``basic.get`` and a consumer), through a TCP relay that records the bytes on the
    wire, and runs plain Redis commands, pub/sub and a pipeline. Prints a canonical account of
    everything observed, types included. The second form does the same with an aioqueue worker
    and client running in the same event loop (tasks sent and answered before, during and
    after); ``user`` never imports aioqueue. The test asserts both accounts are equal.

Queues and keys are named with a fresh uuid and deleted at the end; the account prints that
name as ``<unique>``.
"""

from __future__ import annotations

import ast
import asyncio
import datetime
import importlib
import importlib.util
import json
import os
import struct
import sys
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import anyio
import orjson
import pamqp
import redis
import redis.asyncio
import yarl

AMQP_URL = os.environ.get("AIOQUEUE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("AIOQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/12")
PREFIXES = ("aio_pika", "aiormq", "pamqp", "redis", "asyncio", "yarl", "anyio", "orjson")
UNIQUE = f"iso-{uuid.uuid4().hex}"
_LOADED = (aio_pika, aiormq, anyio, orjson, pamqp, redis, yarl)  # imported for the snapshot

# ---------------------------------------------------------------------------------------------
# globals: snapshots of the dependencies' modules and classes

Key = tuple[str, str]  # (module or class, attribute)

# State the libraries fill in themselves, whoever uses them: never a change aioqueue made.
LIBRARY_CACHES = {
    ("asyncio.coroutines", "_iscoroutine_typecache"),  # asyncio.iscoroutine's types seen
    ("redis.observability.providers", "_observability_instance"),  # made on first command
    ("redis.observability.recorder", "_collector_resolved"),
    ("redis.asyncio.observability.recorder", "_async_collector_resolved"),
}


# The names each module with a lazy ``__getattr__`` lists (its ``__dir__``), taken with the
# first snapshot.
LAZY_NAMES: dict[str, set[str]] = {}


def _library_cache(where: str, attr: str) -> bool:
    if (where, attr) in LIBRARY_CACHES or attr == "__slotnames__":  # copyreg's, on copy()
        return True
    # A module exporting names lazily (a module __getattr__, as anyio's do) keeps each one it
    # resolved: a name it listed before it held it.
    return attr in LAZY_NAMES.get(where, ())


def preimport() -> None:
    """Import every module of the watched packages that aioqueue's source names (read with
    ast, aioqueue not imported), so that the first snapshot covers them."""
    spec = importlib.util.find_spec("aioqueue")
    assert spec is not None and spec.submodule_search_locations
    names: set[str] = set()
    for location in spec.submodule_search_locations:
        for path in Path(location).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module)
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
    for name in sorted(names):
        if _watched(name):
            try:
                importlib.import_module(name)
            except ImportError:
                pass  # a name imported from a module, not a module itself


def _watched(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in PREFIXES)


def _contents(value: Any) -> Any:
    """A copy of a mutable table's contents (holding its values, so that ids stay unique)."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    if isinstance(value, set):
        return set(value)
    return None


def _take(snap: dict[Key, tuple[Any, Any]], where: str, namespace: Any) -> None:
    for attr, value in list(namespace.items()):
        snap[(where, attr)] = (value, _contents(value))


def _take_class(snap: dict[Key, tuple[Any, Any]], where: str, cls: type) -> None:
    _take(snap, where, cls.__dict__)
    for attr, value in list(cls.__dict__.items()):
        # Nested classes too: pamqp's commands are Basic.Deliver, Basic.Ack, ...
        if isinstance(value, type) and value.__qualname__ == f"{cls.__qualname__}.{attr}":
            _take_class(snap, f"{where}.{attr}", value)


def snapshot() -> dict[Key, tuple[Any, Any]]:
    snap: dict[Key, tuple[Any, Any]] = {}
    for name, module in sorted(sys.modules.items()):
        if module is None or not _watched(name):
            continue
        namespace = vars(module)
        _take(snap, name, namespace)
        if "__getattr__" in namespace and name not in LAZY_NAMES:
            LAZY_NAMES[name] = set(dir(module)) - set(namespace)
        for value in list(namespace.values()):
            if isinstance(value, type) and value.__module__ == name:
                _take_class(snap, f"{name}.{value.__qualname__}", value)
    return snap


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a repr that fails is still a value
        text = f"<{type(value).__name__}, repr failed: {exc!r}>"
    if callable(value) and hasattr(value, "__module__") and hasattr(value, "__qualname__"):
        text = f"{value.__module__}.{value.__qualname__}"
    return text if len(text) <= 160 else text[:157] + "..."


def _table_changes(before: Any, after: Any) -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        changes = []
        for key in before.keys() | after.keys():
            if key not in after:
                changes.append(f"[{key!r}] removed (was {_show(before[key])})")
            elif key not in before:
                changes.append(f"[{key!r}] added: {_show(after[key])}")
            elif after[key] is not before[key]:
                changes.append(
                    f"[{key!r}] {_show(before[key])} replaced by {_show(after[key])}"
                )
        return sorted(changes)
    if isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after) or any(a is not b for a, b in zip(before, after, strict=True)):
            return [f"contents {_show(before)} -> {_show(after)}"]
        return []
    if before != after:
        return [f"contents {_show(before)} -> {_show(after)}"]
    return []


def differences(before: dict[Key, tuple[Any, Any]], after: dict[Key, tuple[Any, Any]]) -> list[str]:
    """What changed in modules and classes that existed before: attributes replaced, removed
    or added (other than newly imported submodules), and mutable tables whose contents
    changed."""
    found = []
    places = {where for where, _ in before}
    for (where, attr), (value, contents) in before.items():
        if _library_cache(where, attr):
            continue
        if (where, attr) not in after:
            found.append(f"{where}.{attr}: removed (was {_show(value)})")
            continue
        new_value, new_contents = after[(where, attr)]
        if new_value is not value and not _library_cache(where, attr):
            found.append(f"{where}.{attr}: {_show(value)} replaced by {_show(new_value)}")
        elif contents is not None:
            found += [f"{where}.{attr}{change}" for change in
                      _table_changes(contents, new_contents)]
    for (where, attr), (value, _) in after.items():
        if where in places and (where, attr) not in before:
            if type(value) is type(sys) and where in sys.modules:
                continue  # a submodule imported since: a new module, not a change
            if _library_cache(where, attr):
                continue
            found.append(f"{where}.{attr}: added: {_show(value)}")
    return sorted(found)


async def _round_trip(backend: str, queue: str, task_ids: list[str]) -> list[Any]:
    from aioqueue import AioQueue
    from aioqueue.worker import Worker

    app = AioQueue("isolation", broker=AMQP_URL, backend=backend, task_default_queue=queue)

    @app.task(name="isolation.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="isolation.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    worker = Worker(app, concurrency=4, shutdown_timeout=5)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(worker.run)
            with anyio.fail_after(10):
                await worker.started.wait()
            results = [await add.delay(i, 1) for i in range(3)] + [await mul.delay(6, 7)]
            results.append(await app.send_task("isolation.add", (2, 2)))
            task_ids += [result.id for result in results]
            with anyio.fail_after(10):
                values = [await result.get(timeout=10) for result in results]
            worker.stop()
    finally:
        await app.close()
    return values


async def globals_main() -> None:
    preimport()
    before = snapshot()
    import aioqueue  # noqa: F401  (the import itself must change nothing either)

    if os.environ.get("AIOQUEUE_FAST_PATHS", "").strip().lower() in {"0", "false", "no", "off"}:
        from aioqueue import config

        config.fast_paths_default = False
    queues = [f"{UNIQUE}-redis", f"{UNIQUE}-rpc"]
    task_ids: list[str] = []
    try:
        values = await _round_trip(REDIS_URL, queues[0], task_ids)
        values += await _round_trip("rpc://", queues[1], task_ids)
        assert values == [1, 2, 3, 42, 4] * 2, values
    finally:
        await _delete_queues(queues)
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        if task_ids:
            await client.delete(*(f"celery-task-meta-{task_id}" for task_id in task_ids))
        await client.aclose()
    after = snapshot()
    print(json.dumps(differences(before, after)))


async def _delete_queues(names: list[str]) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)
            await channel.exchange_delete(name)


# ---------------------------------------------------------------------------------------------
# user: a user's own aio-pika and redis-py code, and what it observes

HEADERS: dict[str, Any] = {
    "zero": 0, "one": 1, "minus_one": -1, "i127": 127, "i128": 128, "i300": 300,
    "i70000": 70000, "big": 2**40, "negative_big": -(2**40), "max64": 2**63 - 1,
    "half": 0.5, "pi": 3.141592653589793, "negative_float": -2.25,
    "true": True, "false": False, "none": None,
    "text": "héllo", "empty": "",
    "raw": bytearray(b"\x00\x01\xff"),  # pamqp encodes a bytearray (as 'x'), not bytes
    "decimal": Decimal("3.14"),
    "when": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
    "nested": {"a": 1, "b": -1, "c": 300, "d": [0, 1.5, "x", None, {"deep": True}]},
    "array": [0, 1, -1, 127, 300, 2**40, 0.25, True, False, None, "s", bytearray(b"b"), [1, [2]]],
}


def account(name: str, value: Any) -> list[str]:
    """``value`` as lines ``name = type:repr``, containers flattened one line per item, so
    that two accounts compare line by line, types included."""
    kind = type(value).__name__
    if isinstance(value, dict):
        lines = [f"{name} = {kind}(len={len(value)})"]
        for key, item in value.items():
            lines += account(f"{name}[{key!r}]", item)
        return lines
    if isinstance(value, list | tuple):
        lines = [f"{name} = {kind}(len={len(value)})"]
        for index, item in enumerate(value):
            lines += account(f"{name}[{index}]", item)
        return lines
    return [f"{name} = {kind}:{value!r}"]


class Relay:
    """A TCP relay to RabbitMQ that keeps every byte each way, for the user's connection."""

    def __init__(self) -> None:
        self.sent = bytearray()  # client -> server
        self.received = bytearray()  # server -> client
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        url = yarl.URL(AMQP_URL)
        up_reader, up_writer = await asyncio.open_connection(url.host, url.port or 5672)
        pipes = [
            asyncio.ensure_future(self._pipe(reader, up_writer, self.sent)),
            asyncio.ensure_future(self._pipe(up_reader, writer, self.received)),
        ]
        self._tasks.update(pipes)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for pipe in pipes:
            pipe.cancel()
        for stream in (writer, up_writer):
            stream.close()

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: bytearray
    ) -> None:
        while data := await reader.read(65536):
            log += data
            writer.write(data)
            await writer.drain()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def content_header_frames(stream: bytes | bytearray) -> list[bytes]:
    """The payloads of the content header frames (type 2) in an AMQP byte stream."""
    if stream.startswith(b"AMQP"):
        stream = stream[8:]
    frames, offset = [], 0
    while offset + 7 <= len(stream):
        kind, _channel, size = struct.unpack_from(">BHI", stream, offset)
        if kind == 2:
            frames.append(bytes(stream[offset + 7:offset + 7 + size]))
        offset += 8 + size
    return frames


# Field-table value tags (AMQP 0-9-1 as RabbitMQ reads them) and their fixed sizes.
_FIXED = {b"t": 1, b"b": 1, b"B": 1, b"s": 2, b"u": 2, b"I": 4, b"i": 4, b"l": 8, b"L": 8,
          b"f": 4, b"d": 8, b"D": 5, b"T": 8, b"V": 0}


def header_tags(payload: bytes) -> dict[str, str]:
    """How each value of a content header's ``headers`` table was encoded on the wire: its
    type tag, nested tables as ``F{name:tag,...}`` and arrays as ``A[tag,...]``."""
    (flags,) = struct.unpack_from(">H", payload, 12)
    offset = 14
    for bit in (15, 14):  # content-type, content-encoding: short strings before the headers
        if flags & (1 << bit):
            offset += 1 + payload[offset]
    if not flags & (1 << 13):
        return {}
    return _table_tags(payload, offset)[1]


def _table_tags(data: bytes, offset: int) -> tuple[int, dict[str, str]]:
    (size,) = struct.unpack_from(">I", data, offset)
    offset, end, tags = offset + 4, offset + 4 + size, {}
    while offset < end:
        name = data[offset + 1:offset + 1 + data[offset]].decode()
        offset, tags[name] = _value_tag(data, offset + 1 + data[offset])
    return end, tags


def _value_tag(data: bytes, offset: int) -> tuple[int, str]:
    tag = data[offset:offset + 1]
    offset += 1
    if tag in _FIXED:
        return offset + _FIXED[tag], tag.decode()
    if tag == b"F":
        end, tags = _table_tags(data, offset)
        return end, "F{" + ",".join(f"{name}:{value}" for name, value in tags.items()) + "}"
    (size,) = struct.unpack_from(">I", data, offset)
    end = offset + 4 + size
    if tag == b"A":
        items, position = [], offset + 4
        while position < end:
            position, item = _value_tag(data, position)
            items.append(item)
        return end, "A[" + ",".join(items) + "]"
    return end, tag.decode()  # S, x: a long string or a byte array


async def user_amqp(out: dict[str, Any]) -> None:
    relay = Relay()
    await relay.start()
    url = yarl.URL(AMQP_URL).with_host("127.0.0.1").with_port(relay.port)
    queue_name = f"{UNIQUE}-user"
    try:
        connection = await aio_pika.connect(str(url))
        async with connection:
            channel = await connection.channel()
            # x-expires: RabbitMQ drops the queue a minute after its last use should the
            # probe die before deleting it.
            queue = await channel.declare_queue(queue_name, arguments={"x-expires": 60_000})
            for number in range(2):
                message = aio_pika.Message(
                    f"body {number}".encode(), headers=HEADERS, content_type="application/x",
                    correlation_id=f"c{number}", message_id=f"m{number}", priority=3,
                    delivery_mode=2,
                )
                await channel.default_exchange.publish(message, routing_key=queue_name)
            got = await queue.get(no_ack=True, timeout=5)
            assert got is not None
            out["amqp basic.get headers"] = got.headers
            out["amqp basic.get properties"] = _properties(got)
            async with queue.iterator() as messages:
                async for delivered in messages:
                    out["amqp consumer headers"] = delivered.headers
                    out["amqp consumer properties"] = _properties(delivered)
                    await delivered.ack()
                    break
            await queue.delete(if_unused=False, if_empty=False)
    finally:
        await relay.close()
    for direction, stream in (("sent", relay.sent), ("received", relay.received)):
        frames = content_header_frames(stream)
        assert len(frames) == 2, f"{len(frames)} content header frames {direction}"
        # Both messages carry the same headers: the tags of the first tell how they were encoded.
        out[f"amqp wire header tags {direction}"] = header_tags(frames[0])
        out[f"amqp wire content header frames {direction}"] = [frame.hex() for frame in frames]


def _properties(message: aio_pika.abc.AbstractIncomingMessage) -> dict[str, Any]:
    return {
        "body": message.body, "content_type": message.content_type,
        "correlation_id": message.correlation_id, "priority": message.priority,
        "delivery_mode": int(message.delivery_mode), "redelivered": message.redelivered,
        "routing_key": message.routing_key, "exchange": message.exchange,
    }


async def user_redis(out: dict[str, Any]) -> None:
    key = f"{UNIQUE}-user"
    for protocol in (2, 3):
        client = redis.asyncio.Redis.from_url(REDIS_URL, protocol=protocol)
        text = redis.asyncio.Redis.from_url(REDIS_URL, protocol=protocol, decode_responses=True)
        try:
            seen: list[Any] = [
                await client.set(key, b"\x00value"),
                await client.get(key),
                await client.set(key, "x", nx=True),
                await client.hset(f"{key}-h", mapping={"a": 1, "b": "two", "c": "é"}),
                await client.hgetall(f"{key}-h"),
                await text.hgetall(f"{key}-h"),
                await client.incr(f"{key}-n"),
                await client.expire(key, 100),
                await client.exists(key, f"{key}-h", f"{key}-missing"),
                await client.get(f"{key}-missing"),
                await text.mget([key, f"{key}-missing"]),
            ]
            async with client.pipeline(transaction=True) as pipe:
                pipe.set(f"{key}-p", 1)
                pipe.incrby(f"{key}-p", 5)
                pipe.get(f"{key}-p")
                pipe.hgetall(f"{key}-h")
                seen.append(await pipe.execute())
            pubsub = client.pubsub()
            await pubsub.subscribe(f"{key}-chan")
            seen.append(await _next_message(pubsub.get_message))
            seen.append(await client.publish(f"{key}-chan", b"hello"))
            seen.append(await _next_message(pubsub.get_message))
            await pubsub.unsubscribe(f"{key}-chan")
            seen.append(await _next_message(pubsub.get_message))
            await pubsub.aclose()
            out[f"redis RESP{protocol}"] = seen
        finally:
            await client.delete(key, f"{key}-h", f"{key}-n", f"{key}-p")
            await client.aclose()
            await text.aclose()
    sync = redis.Redis.from_url(REDIS_URL)
    try:
        out["redis sync"] = [sync.set(key, 7), sync.get(key), sync.delete(key)]
    finally:
        sync.close()


async def _next_message(get: Callable[..., Awaitable[Any]]) -> Any:
    with anyio.fail_after(5):
        while True:
            message = await get(timeout=1.0)
            if message is not None:
                return message


async def user_main(beside_aioqueue: bool) -> None:
    out: dict[str, Any] = {}
    if not beside_aioqueue:
        assert "aioqueue" not in sys.modules
        await user_amqp(out)
        await user_redis(out)
    else:
        await _beside_aioqueue(out)
        assert "aioqueue" in sys.modules
    lines = [line for name, value in out.items() for line in account(name, value)]
    print("\n".join(lines).replace(UNIQUE, "<unique>"))


async def _beside_aioqueue(out: dict[str, Any]) -> None:
    from aioqueue import AioQueue
    from aioqueue.worker import Worker

    queue = f"{UNIQUE}-tasks"
    app = AioQueue("isolation", broker=AMQP_URL, backend=REDIS_URL, task_default_queue=queue)

    @app.task(name="isolation.add")
    async def add(x: int, y: int) -> int:
        return x + y

    worker = Worker(app, concurrency=4, shutdown_timeout=5)
    task_ids: list[str] = []

    async def round_trip(n: int) -> None:
        result = await add.delay(n, n)
        task_ids.append(result.id)
        assert await result.get(timeout=10) == 2 * n

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(worker.run)
            with anyio.fail_after(10):
                await worker.started.wait()
            await round_trip(1)  # everything aioqueue sets up is set up
            async with anyio.create_task_group() as during:
                for n in range(5):
                    during.start_soon(round_trip, n)  # tasks in flight beside the user's code
                await user_amqp(out)
                await user_redis(out)
            await round_trip(2)
            worker.stop()
    finally:
        await app.close()
        await _delete_queues([queue])
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        if task_ids:
            await client.delete(*(f"celery-task-meta-{task_id}" for task_id in task_ids))
        await client.aclose()


def main() -> None:
    mode = sys.argv[1]
    if mode == "globals":
        asyncio.run(globals_main())
    elif mode in {"user", "user-beside-aioqueue"}:
        asyncio.run(user_main(mode == "user-beside-aioqueue"))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
