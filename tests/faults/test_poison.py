"""Poison input: hundreds of malformed messages, published raw, mixed with good ones.

Every malformed message is rejected without requeue, so RabbitMQ dead-letters it to the
queue's dead-letter queue; each rejection is logged; every good task completes; well-formed
messages whose task raises (wrong arguments) end as FAILURE results and are acknowledged;
the worker process never stops. Messages past the ``worker_max_*`` limits (a gzip bomb, an
oversized header table) are rejected the same way, before they are inflated or decoded.

Run: ``scripts/test tests/faults -v -k poison``.
"""

from __future__ import annotations

import bz2
import gzip
import signal
import time
import zlib
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import pytest

from aioqueue import NotRegistered

from .conftest import Project, assert_queue_settled, get_all, send_all, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]

GOOD = 200
FAILING = 20  # well-formed, but the task raises TypeError: a FAILURE result, not poison
COPIES = 8  # each malformed shape below is sent this many times (the huge ones once)
HUGE = 5 * 1024 * 1024

BODY = orjson.dumps([[1, 0.01], {}, {"callbacks": None, "errbacks": None, "chain": None}])
JSON = "application/json"


def shape(
    category: str, body: bytes, headers: dict[str, Any] | None = None,
    content_type: str | None = JSON, **properties: Any,
) -> tuple[str, bytes, dict[str, Any] | None, str | None, dict[str, Any]]:
    return category, body, headers, content_type, properties


def headers(**overrides: Any) -> dict[str, Any]:
    """Protocol v2 headers of a valid ``proj.work`` call (the id is set per copy)."""
    base: dict[str, Any] = {"lang": "py", "task": "proj.work", "id": None, "retries": 0,
                            "timelimit": [None, None], "root_id": None, "parent_id": None}
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not ...}


# (category, body, headers, content_type, other properties); "id": None is replaced by a
# unique id per copy; a value of ... removes the header.
SHAPES = [
    # bodies that are not JSON at all
    shape("bad-json", b"[[1, 0.01], {}, {", headers()),
    shape("bad-json", b"\xff\xfe\x00garbage", headers()),
    shape("bad-json", b"", headers()),
    shape("bad-json", b"[" * 100_000 + b"]" * 100_000, headers()),  # nested too deep
    # well-formed JSON of the wrong shape
    shape("wrong-shape", b'{"args": [1, 0.01]}', headers()),
    shape("wrong-shape", b"[[1, 0.01], {}]", headers()),
    shape("wrong-shape", b'"a string"', headers()),
    shape("wrong-shape", b"null", headers()),
    shape("wrong-shape", b"[5, {}, {}]", headers()),
    shape("wrong-shape", b"[[1, 0.01], [], {}]", headers()),
    shape("wrong-shape", b"[[1, 0.01], {}, 5]", headers()),
    shape("wrong-shape", b"[[1, 0.01], {}, {}, {}]", headers()),
    # headers of the wrong type
    shape("header-type", BODY, headers(task=5)),
    shape("header-type", BODY, headers(task="")),
    shape("header-type", BODY, headers(id=12345)),
    shape("header-type", BODY, headers(id=bytearray(b"bytes-id"))),
    shape("header-type", BODY, headers(eta="soon")),
    shape("header-type", BODY, headers(eta=datetime(2024, 1, 1, tzinfo=UTC))),  # AMQP timestamp
    shape("header-type", BODY, headers(expires=[1, 2])),
    shape("header-type", BODY, headers(retries="three")),
    shape("header-type", BODY, headers(timelimit="ten")),
    shape("header-type", BODY, headers(timelimit=[1, "x"])),
    shape("header-type", BODY, headers(ignore_result="yes")),
    shape("header-type", BODY, headers(root_id=5)),
    shape("header-type", BODY, headers(group_index="first")),
    # task or id missing
    shape("missing-header", BODY, headers(task=...)),
    shape("missing-header", BODY, headers(id=...)),
    shape("missing-header", BODY, None),
    shape("missing-header", b'{"args": [1, 0.01], "kwargs": {}}', None),  # v1 without task
    # content types the worker does not accept or does not know
    shape("content-type", BODY, headers(), "text/plain"),
    shape("content-type", b"\x80\x04K\x01.", headers(), "application/x-python-serialize",
          content_encoding="binary"),
    shape("content-type", b"\x93\x92\x01\xcb?\x84z\xe1G\xae\x14{\x80\x80",
          headers(), "application/x-msgpack", content_encoding="binary"),
    shape("content-type", BODY, headers(), "application/x-yaml"),
    shape("content-type", BODY, headers(), None),  # no content type at all
    # compression headers that lie
    shape("compression", BODY, headers(compression="application/x-zstd")),
    shape("compression", BODY, headers(compression=5)),
    shape("compression", BODY, headers(compression="application/x-gzip")),
    shape("compression", BODY, headers(compression="application/x-bz2")),
    shape("compression", gzip.compress(b"[[1, 0.01], {}, {"),
          headers(compression="application/x-gzip")),
    shape("compression", bz2.compress(b"not json"), headers(compression="application/x-bz2")),
    # tasks nobody registered (these also get a NotRegistered result)
    shape("unknown-task", BODY, headers(task="proj.nope")),
    shape("unknown-task", BODY, headers(task="os.system")),
    shape("unknown-task", BODY, headers(task="proj.work.extra")),
]
HUGE_SHAPES = [  # sent once each: 5 MB bodies
    shape("huge", b"x" * HUGE, headers()),
    shape("huge", b"[" + b"1," * (HUGE // 2) + b"1]", headers()),  # a 2.6M-item list
    shape("huge", orjson.dumps("y" * HUGE), headers()),
    shape("huge", gzip.compress(b"z" * HUGE), headers(compression="application/x-gzip")),
]



def gzip_bomb(inflated: int) -> bytes:
    """Zero bytes compressed a thousandfold, built a MiB at a time."""
    packer = zlib.compressobj(9)
    block = bytes(1 << 20)
    return b"".join([packer.compress(block) for _ in range(inflated >> 20)] + [packer.flush()])


def limit_shapes() -> list[tuple[str, bytes, dict[str, Any] | None, str | None, dict[str, Any]]]:
    """Sent once each: what crosses the worker_max_* limits (docs/configuration.md)."""
    return [
        # ~1 MB that inflates to 1 GiB: refused past worker_max_decompressed_size (64 MiB)
        shape("limits", gzip_bomb(1 << 30), headers(compression="application/x-gzip")),
        # 300 headers, past worker_max_header_count (256); still fits one AMQP frame
        shape("limits", BODY, headers(**{f"x-pad-{i}": i for i in range(300)})),
    ]


def malformed() -> list[tuple[str, str, aio_pika.Message]]:
    """(category, id, message) for every malformed message, in a fixed order."""
    messages = []
    copies = [(s, COPIES) for s in SHAPES] + [(s, 1) for s in HUGE_SHAPES + limit_shapes()]
    for index, ((category, body, hdrs, content_type, properties), count) in enumerate(copies):
        for copy in range(count):
            bad_id = f"bad-{index}-{copy}-{category}"
            table = None
            if hdrs is not None:
                table = {k: (bad_id if k == "id" and v is None else v) for k, v in hdrs.items()}
            messages.append((category, bad_id, aio_pika.Message(
                body, headers=table, content_type=content_type, message_id=bad_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties,
            )))
    return messages


async def drain(project: Project, name: str, count: int) -> list[str]:
    """Take ``count`` messages off ``name``; their message ids."""
    ids = []
    connection = await aio_pika.connect(project.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        for _ in range(count):
            message = await queue.get(no_ack=True, fail=True, timeout=10)
            ids.append(message.message_id or "")
    return ids


async def test_poison_messages_are_dead_lettered(
    dlq_project: Project, figures: dict[str, object]
) -> None:
    project = dlq_project
    assert project.dlq is not None
    bad = malformed()
    unknown = [bad_id for category, bad_id, _ in bad if category == "unknown-task"]
    async with project.client() as app:
        broker = await app.get_broker()
        for spec in project.queues():
            await broker.declare(spec)
        worker = project.start_worker("-c", "50", "-Q", project.queue)

        started = time.monotonic()
        connection = await aio_pika.connect(project.amqp_url)
        async with connection:
            channel = await connection.channel()  # publisher confirms
            step = len(bad) // GOOD + 1
            good = []
            for n in range(GOOD):
                good.append(await app.send_task("proj.work", [n, 0.01]))
                for _, _, message in bad[n * step:(n + 1) * step]:
                    await channel.default_exchange.publish(message, routing_key=project.queue)
            failing = await send_all(
                app, [("proj.work", [5000 + n, "soon"] if n % 2 else [5000 + n])
                      for n in range(FAILING)]
            )
        published = time.monotonic() - started

        assert await get_all(good, timeout=45) == list(range(GOOD))
        errors = await get_all(failing, timeout=30, propagate=False)
        assert all(isinstance(error, TypeError) for error in errors), errors
        not_registered = await get_all(
            [app.AsyncResult(bad_id) for bad_id in unknown], timeout=30, propagate=False
        )
        assert all(isinstance(error, NotRegistered) for error in not_registered)

        async def all_dead_lettered() -> bool:
            return await project.ready(project.dlq) >= len(bad)

        await wait_until(all_dead_lettered, 30, f"{len(bad)} dead letters", worker)
        checked_unacked = await assert_queue_settled(project, worker)
        elapsed = time.monotonic() - started
        assert worker.alive, worker.tail()
        rejections = worker.count("Rejecting message") + worker.count(
            "Received unregistered task"
        )
        worker.send(signal.SIGTERM)
        assert await worker.exited(30) == 0

    dead = await drain(project, project.dlq, len(bad))
    assert sorted(dead) == sorted(bad_id for _, bad_id, _ in bad)
    assert await project.ready(project.dlq) == 0
    assert await project.ready() == 0
    assert rejections == len(bad)
    log = worker.output()
    for _, bad_id, message in bad:
        if message.headers and isinstance(message.headers.get("id"), str):
            assert bad_id in log, f"rejection of {bad_id} not logged"
    for limit in ("worker_max_decompressed_size", "worker_max_header_count"):
        assert worker.count(limit) == 1, f"{limit}: not named in exactly one log line"
    runs = project.executions()
    assert all(runs[n] == 1 for n in range(GOOD))
    assert set(runs) == set(range(GOOD)) | {5000 + n for n in range(1, FAILING, 2)}
    categories = Counter(category for category, _, _ in bad)
    figures.update(
        good_sent=GOOD, good_completed=GOOD, failing_sent=FAILING, failing_stored=len(errors),
        malformed_sent=len(bad), dead_lettered=len(dead), rejections_logged=rejections,
        not_registered_results=len(not_registered), worker_exit=0,
        unacked_checked=checked_unacked, publish_s=published, total_s=elapsed,
        by_category=dict(sorted(categories.items())),
    )
