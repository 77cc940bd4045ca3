"""The worker's connections to RabbitMQ or Redis are cut mid-run: it recovers, loses nothing.

The worker reaches the server through a ``TcpProxy`` (``proxy.py``) running on the test's
own loop; the test's client talks to the servers directly. While tasks flow, the proxy
resets every live connection and refuses new ones until the worker has tried (and failed)
to reconnect at least once, then lets it back in.

Run: ``scripts/test tests/faults -v -k "broker_connection or redis_connection"``.
"""

from __future__ import annotations

import signal
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest

from .conftest import (
    Project,
    WorkerProcess,
    assert_queue_settled,
    get_all,
    send_all,
    wait_until,
)
from .proxy import TcpProxy, tcp_proxy
from .test_process_faults import CONCURRENCY, TASKS, short_tasks

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def port_of(url: str, default: int) -> int:
    return urlsplit(url).port or default


def through(url: str, proxy: TcpProxy) -> str:
    """``url`` with its host and port replaced by the proxy's (credentials and path kept)."""
    parts = urlsplit(url)
    credentials, _, _ = parts.netloc.rpartition("@")
    netloc = f"{credentials}@" if credentials else ""
    return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{proxy.port}"))


async def outage(
    proxy: TcpProxy, worker: WorkerProcess, noticed: str | None = None, times: int = 1
) -> tuple[int, float]:
    """Reset every connection and refuse new ones until the worker has tried to reconnect
    at least once (and logged ``noticed`` ``times`` times, if given); then accept again.

    The outage ends on what the worker did, not after a fixed time. Returns (connections
    cut, seconds down)."""
    down = time.monotonic()
    proxy.pause()
    cut = await proxy.cut()
    assert cut >= 1, "the worker had no connection through the proxy"

    def felt() -> bool:
        return proxy.refused >= 1 and (noticed is None or worker.count(noticed) >= times)

    await wait_until(felt, 30, f"the worker to try to reconnect (and log {noticed!r})", worker)
    proxy.resume()
    return cut, time.monotonic() - down


def with_query(url: str, option: str) -> str:
    return url + ("&" if "?" in url else "?") + option


async def finish(
    project: Project, worker: WorkerProcess, results: list[Any], count: int = TASKS
) -> tuple[list[Any], bool, float]:
    """Every result arrives, the queue is settled, and the worker is still up and stops
    cleanly on SIGTERM. Returns the values, whether unacked messages were checked, and the
    monotonic time the last result arrived."""
    values = await get_all(results, timeout=45)
    arrived = time.monotonic()
    assert values == list(range(count))
    checked_unacked = await assert_queue_settled(project, worker)
    assert worker.alive, worker.tail()
    worker.send(signal.SIGTERM)
    assert await worker.exited(30) == 0
    return values, checked_unacked, arrived


async def test_broker_connection_cut_mid_run(
    project: Project, figures: dict[str, object]
) -> None:
    """Cut the worker's AMQP connection: aio-pika reconnects, the consumer subscribes again,
    acks of deliveries from the lost channel are dropped (RabbitMQ redelivers those), every
    task completes and nothing stays unacknowledged."""
    async with tcp_proxy(port_of(project.amqp_url, 5672)) as proxy:
        async with project.client() as app:
            results = await send_all(app, short_tasks(seed=3))
            worker = project.start_worker(
                "-c", CONCURRENCY, broker=through(project.amqp_url, proxy)
            )
            await project.wait_done(150, worker)
            cut, downtime = await outage(proxy, worker)
            # The worker has tried to reconnect, so it knows the channel is gone: nothing
            # starts from now on until it is back, and what ran before may run again.
            started_before = set(project.executions())
            back = time.monotonic()
            values, checked_unacked, arrived = await finish(project, worker, results)
            recovery = arrived - back
        assert proxy.accepted >= 2, "the worker never reconnected through the proxy"
    assert await project.ready() == 0

    log = worker.output()
    for wrong in ("PRECONDITION_FAILED", "unknown delivery tag", "could not consume again"):
        assert wrong not in log, wrong
    runs = project.executions()
    duplicates = {n for n, count in runs.items() if count > 1}
    assert set(runs) == set(range(TASKS))
    assert max(runs.values()) <= 2
    assert duplicates <= started_before, "a task ran twice that started after the reconnect"
    figures.update(
        sent=TASKS, completed=len(values), connections_cut=cut,
        connections_accepted=proxy.accepted, reconnects_refused=proxy.refused,
        started_before_cut=len(started_before),
        stale_acks_dropped=log.count("could not ack delivery"),
        duplicates=len(duplicates), lost=0, unacked_checked=checked_unacked,
        outage_s=downtime, completion_after_resume_s=recovery,
    )


@pytest.mark.parametrize("failures", [25, 300], ids=["blip", "outage"])
async def test_redis_connection_cut_mid_run(
    project: Project, figures: dict[str, object], failures: int
) -> None:
    """Cut the worker's Redis connections: a task whose result cannot be stored keeps its
    result in hand and its message unacknowledged, and stores it (with backoff) once Redis
    is back, without running again. The client (not behind the proxy) gets every result;
    nothing stays unacknowledged.

    Redis stays down until ``failures`` attempts to store a result failed: a blip or an
    outage of a few seconds. While it is down the worker takes no new messages: every
    permit is held by a task waiting to store its result."""
    async with tcp_proxy(port_of(project.redis_url, 6379)) as proxy:
        async with project.client() as app:
            results = await send_all(app, short_tasks(seed=4))
            worker = project.start_worker(
                "-c", CONCURRENCY, backend=through(project.redis_url, proxy)
            )
            await project.wait_done(150, worker)
            before = sum(project.executions().values())
            cut, downtime = await outage(proxy, worker, "Cannot store the result", failures)
            during = sum(project.executions().values()) - before
            back = time.monotonic()
            values, checked_unacked, arrived = await finish(project, worker, results)
            recovery = arrived - back
        assert proxy.accepted >= 2, "the worker never reconnected through the proxy"
    assert await project.ready() == 0

    runs = project.executions()
    duplicates = {n for n, count in runs.items() if count > 1}
    assert set(runs) == set(range(TASKS))
    figures.update(
        sent=TASKS, completed=len(values), connections_cut=cut,
        connections_accepted=proxy.accepted, reconnects_refused=proxy.refused,
        store_attempts_failed=worker.count("Cannot store the result"),
        executions_while_down=during, duplicates=len(duplicates),
        max_runs_of_one_task=max(runs.values()), lost=0,
        unacked_checked=checked_unacked, outage_s=downtime,
        completion_after_resume_s=recovery,
    )


async def test_broker_connection_flapping(project: Project, figures: dict[str, object]) -> None:
    """The connection drops again and again, also while the worker is re-subscribing.

    Four rounds of: cut, wait for the reconnect, cut again at once (or a few ms later), so
    some cuts land in the middle of the consumer's re-declare and ``basic.consume``. The
    worker's URL asks aio-pika to retry every 0.2 s (default 5 s), to keep the test short.
    """
    count = 1000
    async with tcp_proxy(port_of(project.amqp_url, 5672)) as proxy:
        async with project.client() as app:
            results = await send_all(app, short_tasks(seed=6, count=count))
            broker = with_query(through(project.amqp_url, proxy), "reconnect_interval=0.2")
            worker = project.start_worker("-c", CONCURRENCY, broker=broker)
            await project.wait_done(50, worker)
            started = time.monotonic()
            for pause in (0.0, 0.005, 0.02, 0.05):
                for _ in range(2):
                    seen = proxy.accepted
                    await proxy.cut()
                    await wait_until(lambda seen=seen: proxy.accepted > seen, 30, "a reconnect",
                                     worker)
                    await anyio.sleep(pause)  # where the next cut lands, not a wait
            values, checked_unacked, arrived = await finish(project, worker, results, count)
            elapsed = arrived - started
    assert await project.ready() == 0
    runs = project.executions()
    assert set(runs) == set(range(count))
    log = worker.output()
    assert "consumer lost" not in log
    figures.update(
        sent=count, completed=len(values), cuts=proxy.cut_count,
        connections_accepted=proxy.accepted,
        cuts_during_resubscribe=log.count("connection lost again while consuming"),
        duplicates=sum(1 for n in runs.values() if n > 1), lost=0,
        unacked_checked=checked_unacked, seconds_from_first_cut=elapsed,
    )
