"""The benchmark suite runs (timings live in the suite, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parent.parent.parent


def _bench(tmp_path: Path, systems: str, workloads: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--repeat", "1", "--systems", systems,
         "--workloads", workloads, "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data: dict[str, Any] = json.loads((tmp_path / "results.json").read_text())
    return data


def test_benchmark_suite_runs_on_a_tiny_n(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--systems", "aioqueue,raw",
         "--workloads", "enqueue,noop", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = list(tmp_path.rglob("*.json"))
    assert written, "no JSON results written"
    json.loads(written[0].read_text())


def test_aioqueue_nofast_runs_worker_and_client_with_fast_paths_off(tmp_path: Path) -> None:
    data = _bench(tmp_path, "aioqueue-nofast", "enqueue,latency")
    assert {(s["workload"], s["row"], s["ok"]) for s in data["samples"]} == {
        ("enqueue", "aioqueue-nofast", True), ("latency", "aioqueue-nofast", True)}
    logs = tmp_path / "logs"
    for name in ("enqueue-client", "latency-client", "latency-worker"):
        assert "fast_paths off" in (logs / f"aioqueue-nofast-{name}.log").read_text(), name


def test_dramatiq_with_and_without_confirms_in_the_latency_targets(tmp_path: Path) -> None:
    pytest.importorskip("dramatiq")
    pytest.importorskip("pika")
    data = _bench(tmp_path, "aioqueue,dramatiq,dramatiq-confirm", "latency")
    confirms = {s["row"]: s["confirms"] for s in data["summaries"] if s["metric"] == "p50"}
    assert confirms == {"aioqueue": True, "dramatiq": False, "dramatiq-confirm": True}
    latency = {t["target"]: t for t in data["targets"] if "p50" in t["target"]}
    like_for_like = next(t for text, t in latency.items() if "like for like" in text)
    assert like_for_like["reference"] == "dramatiq-confirm"
    assert like_for_like["status"] in ("PASS", "FAIL")
    info = next(t for t in latency.values() if t["info"])
    assert info["status"] == "info"
    assert info["reference"] in ("dramatiq\N{DAGGER}", "dramatiq-confirm")
