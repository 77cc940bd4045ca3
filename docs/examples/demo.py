"""The main job: start a worker process, send tasks from a client, print results, stop cleanly."""

import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "aioqueue.worker", "-A", "tasks", "--loglevel=WARNING", "-c", "100"],
        cwd=HERE, env=env,
    )
    try:
        client = subprocess.run([sys.executable, "client.py"], cwd=HERE, env=env, timeout=60)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    print(f"worker exited with {worker.returncode}, client with {client.returncode}")
    return client.returncode or worker.returncode


if __name__ == "__main__":
    sys.exit(main())
