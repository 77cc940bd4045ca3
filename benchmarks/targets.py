"""The issue's targets for aioqueue, checked against a run (reported, never tuned for).

Each target compares aioqueue's median with a reference measured in the same run: Celery's
best pool, one named Celery pool, the best peer (aio-celery, Dramatiq, taskiq), the raw floor,
or an absolute bound.

Each target is checked twice when the run has more than one aioqueue configuration: for
``aioqueue`` itself (one process, plain asyncio, what a bare install runs) and for the best
aioqueue configuration of that metric (``--processes 2``, uvloop), named in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.report import Summary

SUBJECT = "aioqueue"


@dataclass(frozen=True)
class Target:
    workload: str
    metric: str
    reference: str  # "celery", "peer", "raw", "row:<row>" or "absolute"
    factor: float  # aioqueue >= factor * reference (higher is better), else <=
    text: str


TARGETS = (
    Target("noop", "throughput", "celery", 4.0, "no-op with results >= 4x Celery's best pool"),
    Target("noop", "throughput", "peer", 1.3, "no-op with results >= 1.3x the best peer"),
    Target("noop", "throughput", "raw", 0.6, "no-op with results >= 60% of the raw floor"),
    Target("io", "throughput", "row:celery-prefork", 15.0, "I/O-bound >= 15x Celery prefork -c 2"),
    Target("io", "throughput", "celery", 4.0, "I/O-bound >= 4x Celery's best pool"),
    Target("io", "throughput", "peer", 1.3, "I/O-bound >= 1.3x the best peer"),
    Target("enqueue", "rate", "raw", 0.7, "enqueue >= 70% of the raw batched-confirm rate"),
    Target("latency", "p50", "peer", 1.0, "p50 latency <= the best peer's"),
    Target("rss", "peak_rss_mib", "row:celery-gevent", 0.5, "peak RSS <= half of Celery gevent's"),
    Target("rss", "cold_start_s", "absolute", 0.5, "cold start < 0.5 s"),
)


def _reference(group: list[Summary], target: Target) -> tuple[str, float] | None:
    if target.reference == "absolute":
        return "bound", 1.0
    if target.reference.startswith("row:"):
        found = [s for s in group if s.row == target.reference[4:]]
    else:
        found = [s for s in group if s.family == target.reference]
    found = [s for s in found if s.median]
    if not found:
        return None
    higher = found[0].higher_is_better
    best = (max if higher else min)(found, key=lambda s: s.median or 0.0)
    assert best.median is not None
    return best.row, best.median


def _verdict(subject: Summary, ref: tuple[str, float], target: Target) -> dict[str, Any]:
    assert subject.median is not None
    ref_row, ref_value = ref
    ratio = subject.median / ref_value if target.reference != "absolute" else None
    value = subject.median if ratio is None else ratio
    ok = value >= target.factor if subject.higher_is_better else (
        value < target.factor if ratio is None else value <= target.factor)
    return {"status": "PASS" if ok else "FAIL", "row": subject.row, "reference": ref_row,
            "aioqueue": subject.median, "ratio": ratio, "unit": subject.unit}


def check(summaries: list[Summary]) -> list[dict[str, Any]]:
    results = []
    for target in TARGETS:
        group = [s for s in summaries
                 if s.workload == target.workload and s.metric == target.metric]
        ours = [s for s in group if s.family == SUBJECT and s.median is not None]
        subject = next((s for s in ours if s.row == SUBJECT), None)
        ref = _reference(group, target)
        entry: dict[str, Any] = {"target": target.text, "status": "n/a"}
        if subject is not None and ref is not None:
            entry.update(_verdict(subject, ref, target))
        if ours and ref is not None:
            pick = max if ours[0].higher_is_better else min
            best = pick(ours, key=lambda s: s.median or 0.0)
            if best is not subject:
                entry["best"] = _verdict(best, ref, target)
        results.append(entry)
    return results


def _got(r: dict[str, Any]) -> str:
    return (f"{r['ratio']:.2f}x {r['reference']}" if r["ratio"] is not None
            else f"{r['aioqueue']:.3f} {r['unit']}")


def describe(results: list[dict[str, Any]]) -> str:
    lines = ["", "Targets (aioqueue's median against the same run's references; "
                 "then the best aioqueue configuration, where another one was measured):"]
    for r in results:
        best = r.get("best")
        if r["status"] == "n/a" and best is None:
            lines.append(f"  n/a   {r['target']} (not measured in this run)")
            continue
        line = f"  {r['status']:<5} {r['target']}: "
        line += _got(r) if r["status"] != "n/a" else "aioqueue not measured"
        if best is not None:
            line += f"; {best['row']}: {best['status']} {_got(best)}"
        lines.append(line)
    return "\n".join(lines)
