"""Shared fixtures. Integration tests talk to the real RabbitMQ and Redis.

Every test uses its own queue names (uuid) and its own Redis key names, so tests never see
each other's messages and never flush shared state.
"""

from __future__ import annotations

import os
import uuid

import pytest

from aioqueue import config
from aioqueue.config import Settings

# AIOQUEUE_FAST_PATHS=0 runs the suite on the dependencies' public API only (CI runs the
# integration tests once more that way); worker subprocesses read the same variable.
FAST_PATHS = os.environ.get("AIOQUEUE_FAST_PATHS", "").strip().lower() not in {
    "0", "false", "no", "off"}
config.fast_paths_default = FAST_PATHS
#: For tests of a fast path itself (its internals held or observed), which has no
#: counterpart with the fast paths off.
fast_paths_only = pytest.mark.skipif(
    not FAST_PATHS, reason="tests a fast path; AIOQUEUE_FAST_PATHS=0 turns them off")

AMQP_URL = os.environ.get("AIOQUEUE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("AIOQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/12")


@pytest.fixture
def amqp_url() -> str:
    return AMQP_URL


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def settings() -> Settings:
    return Settings()


@pytest.fixture
def unique() -> str:
    """A fresh name for queues and keys used by one test."""
    return f"t-{uuid.uuid4().hex[:12]}"

pytest_plugins = ["pytester"]
