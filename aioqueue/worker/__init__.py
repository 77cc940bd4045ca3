"""The worker: ``python -m aioqueue.worker -A tasks`` or ``aioqueue worker -A tasks``."""

from .worker import Worker, default_hostname

__all__ = ("Worker", "default_hostname")
