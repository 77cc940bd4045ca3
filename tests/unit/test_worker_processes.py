"""--processes N: a parent supervising N worker processes (SQLite, so no server needed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

TASKS = textwrap.dedent(
    """
    import os
    from aioqueue import AioQueue

    app = AioQueue("proj", broker=os.environ["T_URL"], backend=os.environ["T_URL"])

    @app.task
    async def whoami(n: int) -> int:
        return os.getpid()
    """
)

CLIENT = textwrap.dedent(
    """
    import json
    import sys
    import anyio
    from proj import app, whoami

    async def main() -> None:
        async with app:
            results = [await whoami.delay(n) for n in range(int(sys.argv[1]))]
            print(json.dumps(sorted({await r.get(timeout=60) for r in results})))

    anyio.run(main)
    """
)


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return sorted(int(p) for p in out.stdout.split())


def wait_for(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_processes_share_the_work_and_are_replaced(tmp_path: Path) -> None:
    (tmp_path / "proj.py").write_text(TASKS)
    (tmp_path / "client.py").write_text(CLIENT)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "T_URL": f"sqlite:///{tmp_path}/q.db"}
    log = tmp_path / "worker.log"
    with log.open("w") as handle:
        parent = subprocess.Popen(
            [sys.executable, "-m", "aioqueue.worker", "-A", "proj", "--processes", "2",
             "-c", "20", "-n", "multi@%h", "--loglevel", "INFO"],
            cwd=tmp_path, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True,
        )
    try:
        wait_for(lambda: len(children_of(parent.pid)) == 2)
        first = children_of(parent.pid)
        banner = log.read_text()
        assert "concurrency:  20 (asyncio, 2 processes of 10)" in banner

        client = subprocess.run([sys.executable, "client.py", "200"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=90, check=True)
        assert set(json.loads(client.stdout)) <= set(first)

        os.kill(first[0], signal.SIGKILL)  # a child dies: the parent starts another
        wait_for(lambda: len(children_of(parent.pid)) == 2 and children_of(parent.pid) != first)
        assert "exited with -9; starting another" in log.read_text()
        client = subprocess.run([sys.executable, "client.py", "50"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=90, check=True)
        assert json.loads(client.stdout)

        parent.send_signal(signal.SIGTERM)  # reaches every child; all drain and exit
        assert parent.wait(timeout=30) == 0
        assert children_of(parent.pid) == []
        assert "passing it on to 2 worker process(es)" in log.read_text()
    finally:
        if parent.poll() is None:
            for child in children_of(parent.pid):
                os.kill(child, signal.SIGKILL)
            parent.kill()
            parent.wait(timeout=10)
