"""No server: several worker processes and several client processes on one SQLite file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

TASKS = textwrap.dedent(
    """
    import os
    from aioqueue import AioQueue

    app = AioQueue("proj", broker=os.environ["T_URL"], backend=os.environ["T_URL"])

    @app.task
    async def double(n: int) -> int:
        with open(os.environ["T_RUNS"], "a") as runs:  # one line per execution
            runs.write(f"{n}\\n")
        return 2 * n
    """
)

CLIENT = textwrap.dedent(
    """
    import sys
    import anyio
    from proj import app, double

    async def main(first: int, count: int) -> None:
        async with app:
            results = [await double.delay(n) for n in range(first, first + count)]
            for n, r in zip(range(first, first + count), results):
                assert await r.get(timeout=60) == 2 * n, n
        print("client done", first)

    anyio.run(main, int(sys.argv[1]), int(sys.argv[2]))
    """
)

WORKERS, CLIENTS, PER_CLIENT = 2, 3, 150


def test_workers_and_clients_in_separate_processes(tmp_path: Path) -> None:
    (tmp_path / "proj.py").write_text(TASKS)
    (tmp_path / "client.py").write_text(CLIENT)
    runs = tmp_path / "runs.txt"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "T_URL": f"sqlite:///{tmp_path}/q.db",
           "T_RUNS": str(runs)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "aioqueue.worker", "-A", "proj", "-c", "20", "-n", f"w{i}@%h"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for i in range(WORKERS)
    ]
    try:
        clients = [
            subprocess.Popen(
                [sys.executable, "client.py", str(i * PER_CLIENT), str(PER_CLIENT)],
                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for i in range(CLIENTS)
        ]
        deadline = time.monotonic() + 90
        for client in clients:
            out, err = client.communicate(timeout=max(1, deadline - time.monotonic()))
            assert client.returncode == 0, err
            assert "client done" in out
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            _, err = worker.communicate(timeout=30)
            assert worker.returncode == 0, err
    executed = [int(line) for line in runs.read_text().split()]
    assert sorted(executed) == list(range(CLIENTS * PER_CLIENT))  # each once: none lost, no dups
