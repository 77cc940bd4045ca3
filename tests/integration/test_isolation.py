"""aioqueue changes nothing outside itself (issue 12; DESIGN.md, "Dependencies").

Each check runs ``isolation_probe.py`` in fresh interpreters, so that "before aioqueue" and
"without aioqueue" really are:

* the dependencies' modules and classes (aio-pika, aiormq, pamqp, redis, asyncio, yarl, anyio,
  orjson) are the same objects, with the same tables, after importing aioqueue and running a
  worker and a client through RabbitMQ with Redis and ``rpc://`` results as before;
* a user's own aio-pika and redis-py code, run beside an aioqueue worker and client in the
  same event loop, puts the same bytes on the wire and gets the same values, of the same
  types, as in a process that never imported aioqueue.
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import AMQP_URL, REDIS_URL

pytestmark = pytest.mark.integration

PROBE = Path(__file__).with_name("isolation_probe.py")


def probe(mode: str) -> str:
    """Run the probe in a fresh interpreter; its standard output."""
    env = {**os.environ, "AIOQUEUE_TEST_AMQP_URL": AMQP_URL, "AIOQUEUE_TEST_REDIS_URL": REDIS_URL}
    done = subprocess.run(
        [sys.executable, str(PROBE), mode], capture_output=True, text=True, timeout=45,
        env=env, cwd=PROBE.parent, check=False,
    )
    assert done.returncode == 0, (
        f"isolation_probe.py {mode} exited {done.returncode}:\n{done.stderr[-6000:]}"
    )
    return done.stdout


def test_dependencies_are_unchanged_by_aioqueue() -> None:
    differences = json.loads(probe("globals").splitlines()[-1])
    assert not differences, (
        f"aioqueue changed {len(differences)} attribute(s) of its dependencies' modules and "
        "classes (import, then a worker and a client on RabbitMQ with Redis and rpc:// "
        "results):\n  " + "\n  ".join(differences)
    )


def test_users_own_amqp_and_redis_code_sees_no_difference_beside_a_worker() -> None:
    alone = probe("user").splitlines()
    beside = probe("user-beside-aioqueue").splitlines()
    # The account covers what it should (a probe that observed nothing would compare equal).
    for expected in (
        "amqp consumer headers['zero'] = int:",
        "amqp basic.get headers['nested']['d'][4]['deep'] = bool:",
        "amqp wire header tags sent['zero'] = str:",
        "amqp wire content header frames received[1] = str:",
        "redis RESP3[1] = bytes:",
        "redis sync[1] = bytes:",
    ):
        assert any(line.startswith(expected) for line in alone), (
            f"the probe without aioqueue observed no '{expected}...'"
        )
    if beside != alone:
        diff = difflib.unified_diff(
            alone, beside, "without aioqueue", "beside an aioqueue worker and client",
            n=0, lineterm="",
        )
        pytest.fail(
            "a user's own aio-pika / redis-py code observed something different beside "
            "aioqueue (types included; 'wire' lines are the bytes on the wire):\n"
            + "\n".join(line[:300] for line in diff)
        )
