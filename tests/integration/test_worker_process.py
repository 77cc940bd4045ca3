"""The worker as a user runs it: a real process, its banner, its logs, signals and crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from aioqueue import AioQueue

from .conftest import delete_queues, eventually

pytestmark = pytest.mark.integration

TASKS = textwrap.dedent(
    """
    import os, time
    import anyio
    from aioqueue import AioQueue

    app = AioQueue(
        "proj",
        broker=os.environ["T_BROKER"],
        backend=os.environ["T_BACKEND"],
        task_default_queue=os.environ["T_QUEUE"],
    )

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task
    async def nap(seconds: float, marker: str) -> str:
        open(marker, "w").close()  # tells the test the task is running
        await anyio.sleep(seconds)
        return "rested"

    @app.task
    def blocking(seconds: float) -> str:
        time.sleep(seconds)
        return "done"
    """
)


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc = proc
        self.log = log

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not seen; worker output:\n{self.output()}")
            time.sleep(0.02)


@pytest.fixture
def project(tmp_path: Path, amqp_url: str, redis_url: str, unique: str) -> Iterator[dict[str, str]]:
    (tmp_path / "proj.py").write_text(TASKS)
    env = {
        **os.environ, "T_BROKER": amqp_url.replace("guest:guest", "guest:guest"),
        "T_BACKEND": redis_url, "T_QUEUE": unique, "PYTHONPATH": str(tmp_path),
    }
    yield env
    anyio.run(delete_queues, amqp_url, [unique])


def start_worker(tmp_path: Path, env: dict[str, str], *args: str) -> WorkerProcess:
    log = tmp_path / f"worker-{time.monotonic_ns()}.log"
    with log.open("w") as handle:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "aioqueue.worker", "-A", "proj", "--loglevel=INFO", *args],
            cwd=tmp_path, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True,
        )
    worker = WorkerProcess(proc, log)
    worker.wait_for("[tasks]")
    return worker


def client(env: dict[str, str]) -> AioQueue:
    return AioQueue(
        "proj", broker=env["T_BROKER"], backend=env["T_BACKEND"],
        task_default_queue=env["T_QUEUE"],
    )


def stop(worker: WorkerProcess) -> int:
    if worker.proc.poll() is None:
        worker.proc.send_signal(signal.SIGTERM)
    return worker.proc.wait(timeout=30)


async def test_banner_logs_and_graceful_sigterm(
    tmp_path: Path, project: dict[str, str], unique: str
) -> None:
    worker = start_worker(tmp_path, project, "-c", "7", "-n", "w1@%h")
    try:
        banner = worker.output()
        for expected in (
            "aioqueue ", "w1@", "proj:0x", "transport:    amqp://guest:**@", "results:      redis://",
            "concurrency:  7 (asyncio)", f"{unique}", "proj.add", "proj.nap", "proj.blocking",
        ):
            assert expected in banner, (expected, banner)
        assert "guest:guest" not in banner
        async with client(project) as app:
            r = await app.send_task("proj.add", [2, 3])
            assert await r.get(timeout=10) == 5
            marker = tmp_path / "running"
            slow = await app.send_task("proj.nap", [1.0, str(marker)])
            await eventually(marker.exists, timeout=10)
            worker.proc.send_signal(signal.SIGTERM)  # the running task is allowed to finish
            assert await slow.get(timeout=15) == "rested"
        assert worker.proc.wait(timeout=20) == 0
        log = worker.output()
        assert f"Task proj.add[{r.id}] received" in log
        assert f"Task proj.add[{r.id}] succeeded in" in log
        assert "SIGTERM received" in log
    finally:
        stop(worker)


async def test_killed_worker_loses_nothing(
    tmp_path: Path, project: dict[str, str]
) -> None:
    """acks_late (the default): SIGKILL mid-task, and the next worker runs the task."""
    first = start_worker(tmp_path, project)
    async with client(project) as app:
        marker = tmp_path / "started"
        r = await app.send_task("proj.nap", [0.5, str(marker)])
        await eventually(marker.exists, timeout=10)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
        marker.unlink()
        second = start_worker(tmp_path, project)
        try:
            assert await r.get(timeout=20) == "rested"
            assert marker.exists()  # it really ran again
        finally:
            assert stop(second) == 0


async def test_second_signal_requeues_running_tasks(
    tmp_path: Path, project: dict[str, str]
) -> None:
    worker = start_worker(tmp_path, project, "--shutdown-timeout", "60")
    async with client(project) as app:
        marker = tmp_path / "started"
        r = await app.send_task("proj.nap", [30, str(marker)])
        await eventually(marker.exists, timeout=10)
        worker.proc.send_signal(signal.SIGTERM)
        worker.wait_for("stopping")
        worker.proc.send_signal(signal.SIGINT)
        assert worker.proc.wait(timeout=15) == 0
        assert "message requeued" in worker.output()
        assert await r.state() == "PENDING"
        # the message is back in the queue: a new worker picks it up
        marker.unlink()
        again = start_worker(tmp_path, project)
        try:
            await eventually(marker.exists, timeout=15)
        finally:
            again.proc.send_signal(signal.SIGTERM)
            again.proc.send_signal(signal.SIGINT)
            again.proc.wait(timeout=15)


def test_console_script_and_app_specs(tmp_path: Path, project: dict[str, str]) -> None:
    aioqueue_script = Path(sys.executable).parent / "aioqueue"
    for spec in ("proj", "proj:app", "proj.app"):
        log = tmp_path / "cs.log"
        with log.open("w") as handle:
            proc = subprocess.Popen(
                [str(aioqueue_script), "worker", "-A", spec, "-Q", "cs-" + project["T_QUEUE"]],
                cwd=tmp_path, env=project, stdout=handle, stderr=subprocess.STDOUT, text=True,
            )
        worker = WorkerProcess(proc, log)
        worker.wait_for("[tasks]")
        assert "cs-" + project["T_QUEUE"] in worker.output()
        assert stop(worker) == 0
    anyio.run(delete_queues, project["T_BROKER"], ["cs-" + project["T_QUEUE"]])


def test_bad_app_spec_is_a_clear_error(tmp_path: Path, project: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "aioqueue.worker", "-A", "proj:nothing"],
        cwd=tmp_path, env=project, capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 1
    assert "proj:nothing is not an AioQueue app" in proc.stderr
