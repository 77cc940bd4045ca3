"""Every exception aioqueue raises, in one tree.

::

    AioQueueError
    ├── ConfigurationError            bad or unknown setting, unknown URL scheme
    ├── SerializationError            a value cannot be encoded or decoded
    │   └── ContentDisallowed         content type outside ``accept_content``
    ├── MessageError                  a message that does not follow the protocol
    ├── BrokerError
    │   └── BrokerConnectionError     the broker cannot be reached
    ├── ResultStoreError
    │   └── ResultUnavailableError    no result will ever be stored (ignore_result, no backend)
    ├── TaskError                     a task failed remotely and its type could not be imported
    │   ├── NotRegistered             no task of that name on the worker
    │   ├── TaskRevokedError          revoked, expired or terminated before it finished
    │   ├── TimeLimitExceeded         the task ran past its hard time limit
    │   └── MaxRetriesExceededError   retry() was called once too often
    ├── SoftTimeLimitExceeded         raised inside a task at its soft time limit, to clean up
    ├── TimeoutError                  also a builtin ``TimeoutError``
    ├── Retry                         control flow: the task asks to be retried
    └── Reject                        control flow: the task asks for its message to be rejected
"""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any

__all__ = (
    "AioQueueError",
    "BrokerConnectionError",
    "BrokerError",
    "ConfigurationError",
    "ContentDisallowed",
    "MaxRetriesExceededError",
    "MessageError",
    "NotRegistered",
    "Reject",
    "ResultStoreError",
    "ResultUnavailableError",
    "Retry",
    "SerializationError",
    "SoftTimeLimitExceeded",
    "TaskError",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "TimeoutError",
    "reason",
)


class AioQueueError(Exception):
    """Root of every aioqueue exception."""


class ConfigurationError(AioQueueError):
    """A setting is unknown, misspelt or has a value of the wrong kind."""


class SerializationError(AioQueueError):
    """A value could not be serialized or deserialized."""


class ContentDisallowed(SerializationError):
    """A message's content type is not in ``accept_content``."""


class MessageError(AioQueueError):
    """A message does not follow Celery's message protocol."""


class BrokerError(AioQueueError):
    """The broker refused or failed an operation."""


class BrokerConnectionError(BrokerError):
    """The broker could not be reached, or the connection dropped."""


class ResultStoreError(AioQueueError):
    """The result store failed an operation."""


class ResultUnavailableError(ResultStoreError):
    """No result will ever be stored for this task (``ignore_result``, or no backend)."""


class TaskError(AioQueueError):
    """A task failed on a worker with an exception type that cannot be imported here.

    ``exc_type`` and ``exc_module`` name the remote type; ``args`` are its arguments.
    """

    def __init__(self, *args: Any, exc_type: str = "", exc_module: str = "") -> None:
        super().__init__(*args)
        self.exc_type = exc_type
        self.exc_module = exc_module

    def __str__(self) -> str:
        message = ", ".join(str(a) for a in self.args)
        if self.exc_type:
            name = f"{self.exc_module}.{self.exc_type}" if self.exc_module else self.exc_type
            return f"{name}: {message}" if message else name
        return message


class NotRegistered(TaskError):
    """The worker has no task registered under this name."""


class TaskRevokedError(TaskError):
    """The task was revoked or expired before it could run, or terminated while running."""


class TimeLimitExceeded(TaskError):
    """The task ran past its hard time limit and was stopped."""


class MaxRetriesExceededError(TaskError):
    """The task asked to be retried more often than ``max_retries`` allows."""


class SoftTimeLimitExceeded(AioQueueError):
    """Raised inside a running task at its soft time limit, so it can clean up."""


class TimeoutError(AioQueueError, builtins.TimeoutError):
    """Waiting for a result took longer than the timeout given."""


class Retry(AioQueueError):
    """Raised by ``self.retry()`` inside a task: run it again ``when`` (seconds or a time).

    ``options`` are ``apply_async`` options for the new message (``queue``, ``priority``...).
    """

    def __init__(
        self,
        message: str | None = None,
        exc: BaseException | None = None,
        when: float | datetime | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message or (f"Retry in {when}: {exc!r}" if exc else f"Retry in {when}"))
        self.exc = exc
        self.when = when
        self.options = options or {}


class Reject(AioQueueError):
    """Raised inside a task to reject its message, requeued or not."""

    def __init__(self, reason: str | None = None, requeue: bool = False) -> None:
        super().__init__(reason or "rejected")
        self.reason = reason
        self.requeue = requeue


def reason(exc: BaseException) -> str:
    """What went wrong, for a message: the exception's text, or its type's name when it has
    none (a bare ``TimeoutError()`` would otherwise end a message in an empty string)."""
    text = str(exc).strip()
    return text or type(exc).__name__
