"""System adapters: worker command line, app module and client driver for each system.

Importing this package imports no framework: drivers import their app module (and with it
the framework) in ``start()``, which only runs in a client process.
"""

from __future__ import annotations

from benchmarks.systems import aio_celery, aioqueue, celery, dramatiq, raw, taskiq
from benchmarks.systems.spec import System

SYSTEMS: dict[str, System] = {
    s.name: s
    for module in (aioqueue, celery, aio_celery, dramatiq, taskiq, raw)
    for s in module.SYSTEMS
}

#: Shorthands accepted by --systems.
GROUPS = {
    "all": list(SYSTEMS),
    "celery": [n for n, s in SYSTEMS.items() if s.family == "celery"],
    "peers": [n for n, s in SYSTEMS.items() if s.family == "peer"],
}

__all__ = ("GROUPS", "SYSTEMS", "System")
