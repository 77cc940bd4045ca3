"""aioqueue: an asyncio-native task queue that speaks Celery's protocol.

::

    from aioqueue import AioQueue

    app = AioQueue("tasks", broker="amqp://guest:guest@localhost:5672//",
                   backend="redis://localhost:6379/0")

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    r = await add.delay(4, 4)
    await r.get(timeout=1)   # 8
"""

from importlib.metadata import PackageNotFoundError, version

from . import states
from .app import AioQueue
from .config import Queue, Settings
from .exceptions import (
    AioQueueError,
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    MaxRetriesExceededError,
    NotRegistered,
    Reject,
    ResultUnavailableError,
    Retry,
    SoftTimeLimitExceeded,
    TaskError,
    TaskRevokedError,
    TimeLimitExceeded,
    TimeoutError,
)
from .result import AsyncResult
from .task import AsyncTask, Request, SyncTask, Task

try:
    __version__ = version("aioqueue")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

#: Celery's name for the app, so ``from aioqueue import Celery`` eases a migration.
Celery = AioQueue

__all__ = (
    "AioQueue",
    "AioQueueError",
    "AsyncResult",
    "AsyncTask",
    "BrokerConnectionError",
    "BrokerError",
    "Celery",
    "ConfigurationError",
    "MaxRetriesExceededError",
    "NotRegistered",
    "Queue",
    "Reject",
    "Request",
    "ResultUnavailableError",
    "Retry",
    "Settings",
    "SoftTimeLimitExceeded",
    "SyncTask",
    "Task",
    "TaskError",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "TimeoutError",
    "__version__",
    "states",
)
