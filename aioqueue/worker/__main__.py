"""``python -m aioqueue.worker -A tasks``: start a worker."""

import sys

from .cli import worker_main

if __name__ == "__main__":
    sys.exit(worker_main())
