"""Stock Celery side by side with aioqueue on the same RabbitMQ and result store.

A stock worker is a real ``celery -A stockapp worker`` process; a stock client is Celery's own
``Celery`` object used in a thread (its API blocks). Each test has its own queue.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from aioqueue import AioQueue

from ..integration.conftest import delete_queues

STOCK_APP = textwrap.dedent(
    """
    import os
    from celery import Celery

    app = Celery("stockapp", broker=os.environ["T_BROKER"], backend=os.environ["T_BACKEND"])
    app.conf.update(task_default_queue=os.environ["T_QUEUE"], result_expires=600)


    class CustomError(Exception):
        pass


    @app.task(name="interop.add")
    def add(x, y):
        return x + y


    @app.task(name="interop.mul")
    def mul(x, y):
        return x * y


    @app.task(name="interop.fail")
    def fail(code, text):
        raise CustomError(code, text)


    @app.task(name="interop.describe", bind=True)
    def describe(self, *args, **kwargs):
        return {
            "args": list(args), "kwargs": kwargs, "retries": self.request.retries,
            "priority": self.request.delivery_info.get("priority"),
            "timelimit": list(self.request.timelimit or [None, None]),
            "eta": str(self.request.eta) if self.request.eta else None,
        }
    """
)

CELERY_54 = Path(__file__).parent.parent.parent / ".venv" / "celery54"


@pytest.fixture(params=["redis", "rpc"])
def stock_backend(request: pytest.FixtureRequest, redis_url: str) -> str:
    return redis_url if request.param == "redis" else "rpc://"


@pytest.fixture
def stock_env(
    tmp_path: Path, amqp_url: str, stock_backend: str, unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, str]]:
    """The stock app's module on sys.path (so its exception types import) and its settings."""
    (tmp_path / "stockapp.py").write_text(STOCK_APP)
    env = {"T_BROKER": amqp_url, "T_BACKEND": stock_backend, "T_QUEUE": unique}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "stockapp", raising=False)
    yield {**os.environ, **env, "PYTHONPATH": str(tmp_path)}
    anyio.run(delete_queues, amqp_url, [unique])


def celery_54() -> Path:
    """A stock Celery 5.4 with py-amqp 5.3.1 (the old integer decoding), made on first use."""
    celery = CELERY_54 / "bin" / "celery"
    if not celery.exists():
        subprocess.run([sys.executable, "-m", "venv", str(CELERY_54)], check=True)
        subprocess.run(
            [str(CELERY_54 / "bin" / "pip"), "install", "-q", "celery[redis]==5.4.0",
             "kombu==5.4.2", "amqp==5.3.1"],
            check=True, timeout=600,
        )
    return celery


class StockWorker:
    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc = proc
        self.log = log

    def output(self) -> str:
        return self.log.read_text()


def start_stock_worker(
    tmp_path: Path, env: dict[str, str], celery: Path | None = None
) -> StockWorker:
    log = tmp_path / f"stock-{time.monotonic_ns()}.log"
    command = [str(celery)] if celery else [sys.executable, "-m", "celery"]
    with log.open("w") as handle:
        proc = subprocess.Popen(
            [*command, "-A", "stockapp", "worker", "-P", "solo", "-c", "1", "-l", "INFO",
             "-Q", env["T_QUEUE"], "-n", f"stock-{env['T_QUEUE']}@%h",
             "--without-heartbeat", "--without-gossip", "--without-mingle"],
            cwd=env["PYTHONPATH"], env=env, stdout=handle, stderr=subprocess.STDOUT, text=True,
        )
    worker = StockWorker(proc, log)
    deadline = time.monotonic() + 60
    while " ready." not in worker.output():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"stock worker did not start:\n{worker.output()}")
        time.sleep(0.05)
    return worker


def stop_stock_worker(worker: StockWorker) -> None:
    # Killed: our tests leave no task running there, and Celery's own shutdown (warm or
    # cold) lingers about ten seconds on this machine, which would dominate the suite.
    worker.proc.kill()
    worker.proc.wait(timeout=10)


@pytest.fixture
def stock_worker(tmp_path: Path, stock_env: dict[str, str]) -> Iterator[StockWorker]:
    worker = start_stock_worker(tmp_path, stock_env)
    yield worker
    stop_stock_worker(worker)


@pytest.fixture
async def client(stock_env: dict[str, str]) -> AsyncIterator[AioQueue]:
    app = AioQueue("client", broker=stock_env["T_BROKER"], backend=stock_env["T_BACKEND"],
                   task_default_queue=stock_env["T_QUEUE"])
    yield app
    await app.close()
