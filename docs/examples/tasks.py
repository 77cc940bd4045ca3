"""The getting-started tasks: ``python -m aioqueue.worker -A tasks --loglevel=INFO``."""

import os

import anyio

from aioqueue import AioQueue

# With no URLs at all, aioqueue uses its embedded default: one SQLite file, ./aioqueue.db,
# as broker and result store, so this runs with no server. For production, for example:
#   AIOQUEUE_BROKER=amqp://guest:guest@localhost:5672// AIOQUEUE_BACKEND=redis://localhost:6379/0
app = AioQueue(
    "tasks",
    broker=os.environ.get("AIOQUEUE_BROKER"),
    backend=os.environ.get("AIOQUEUE_BACKEND"),
)


@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task
async def fetch(delay: float) -> str:
    await anyio.sleep(delay)  # stands for network I/O: many run at once on one loop
    return f"slept {delay}s"


@app.task
def resize(path: str) -> str:
    # A plain function runs in a worker thread, never on the event loop.
    return f"{path} resized"


@app.task
async def fail(message: str) -> None:
    raise ValueError(message)
