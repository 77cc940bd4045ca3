"""The benchmark suite runs (timings live in the suite, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_benchmark_suite_runs_on_a_tiny_n(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--systems", "aioqueue,raw",
         "--workloads", "enqueue,noop", "--out", str(tmp_path)],
        cwd=Path(__file__).parent.parent.parent, capture_output=True, text=True, timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = list(tmp_path.rglob("*.json"))
    assert written, "no JSON results written"
    json.loads(written[0].read_text())
