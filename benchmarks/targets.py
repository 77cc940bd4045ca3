"""The issue's targets for aioqueue, checked against a run (reported, never tuned for).

Each target compares aioqueue's median with a reference measured in the same run: Celery's
best pool, one named Celery pool, the best peer (aio-celery, Dramatiq, taskiq), the best peer
whose client waits for publisher confirms, the raw floor, or an absolute bound.

The latency target is like for like: aioqueue's ``delay()`` returns after RabbitMQ's
publisher confirm, so its round trip is compared with the best peer whose publish does the
same (aio-celery, taskiq, ``dramatiq-confirm``: Dramatiq with ``confirm_delivery=True``).
Dramatiq's default ``send()`` (the ``dramatiq`` rows) does not wait for the broker; the
comparison with the best peer of all, that one included, is printed too, as information, so
both Dramatiq rows stay in view. The throughput targets compare with every peer row, the
unconfirmed and two-process Dramatiq rows included.

Each target is checked on ``aioqueue`` itself (one process, plain asyncio, what a bare install
runs); when the run has them, also on the best other aioqueue configuration of that metric
(``--processes 2``, uvloop), named in the report, and on ``aioqueue-nofast`` (the same as
``aioqueue`` with its fast paths off), which never counts as the best configuration.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

from benchmarks.report import NO_CONFIRM, Summary
from benchmarks.systems.aioqueue import NOFAST

SUBJECT = "aioqueue"


@dataclass(frozen=True)
class Target:
    workload: str
    metric: str
    #: "celery", "peer", "peer-confirm" (peers whose publish waits for the confirm), "raw",
    #: "row:<row>" or "absolute"
    reference: str
    factor: float  # aioqueue >= factor * reference (higher is better), else <=
    text: str
    info: bool = False  # printed for information: "info", never PASS or FAIL


TARGETS = (
    Target("noop", "throughput", "celery", 4.0, "no-op with results >= 4x Celery's best pool"),
    Target("noop", "throughput", "peer", 1.3, "no-op with results >= 1.3x the best peer"),
    Target("noop", "throughput", "raw", 0.6, "no-op with results >= 60% of the raw floor"),
    Target("io", "throughput", "row:celery-prefork", 15.0, "I/O-bound >= 15x Celery prefork -c 2"),
    Target("io", "throughput", "celery", 4.0, "I/O-bound >= 4x Celery's best pool"),
    Target("io", "throughput", "peer", 1.3, "I/O-bound >= 1.3x the best peer"),
    Target("enqueue", "rate", "raw", 0.7, "enqueue >= 70% of the raw batched-confirm rate"),
    Target("latency", "p50", "peer-confirm", 1.0,
           "p50 latency <= the best peer's, like for like (peers waiting for confirms)"),
    Target("latency", "p50", "peer", 1.0,
           "p50 latency against the best peer of all, confirms or not", info=True),
    Target("rss", "peak_rss_mib", "row:celery-gevent", 0.5, "peak RSS <= half of Celery gevent's"),
    Target("rss", "cold_start_s", "absolute", 0.5, "cold start < 0.5 s"),
)


def _reference(group: list[Summary], target: Target) -> tuple[str, float] | None:
    if target.reference == "absolute":
        return "bound", 1.0
    if target.reference.startswith("row:"):
        found = [s for s in group if s.row == target.reference[4:]]
    elif target.reference == "peer-confirm":
        found = [s for s in group if s.family == "peer" and s.confirms]
    else:
        found = [s for s in group if s.family == target.reference]
    found = [s for s in found if s.median]
    if not found:
        return None
    higher = found[0].higher_is_better
    best = (max if higher else min)(found, key=lambda s: s.median or 0.0)
    assert best.median is not None
    return best.row if best.confirms else best.row + NO_CONFIRM, best.median


def _verdict(subject: Summary, ref: tuple[str, float], target: Target) -> dict[str, Any]:
    assert subject.median is not None
    ref_row, ref_value = ref
    ratio = subject.median / ref_value if target.reference != "absolute" else None
    value = subject.median if ratio is None else ratio
    ok = value >= target.factor if subject.higher_is_better else (
        value < target.factor if ratio is None else value <= target.factor)
    status = "info" if target.info else "PASS" if ok else "FAIL"
    return {"status": status, "row": subject.row, "reference": ref_row,
            "aioqueue": subject.median, "ratio": ratio, "unit": subject.unit}


def check(summaries: list[Summary]) -> list[dict[str, Any]]:
    results = []
    for target in TARGETS:
        group = [s for s in summaries
                 if s.workload == target.workload and s.metric == target.metric]
        ours = [s for s in group if s.family == SUBJECT and s.median is not None]
        subject = next((s for s in ours if s.row == SUBJECT), None)
        nofast = next((s for s in ours if s.row == NOFAST), None)
        ours = [s for s in ours if s is not nofast]
        ref = _reference(group, target)
        entry: dict[str, Any] = {"target": target.text, "status": "n/a", "info": target.info}
        if subject is not None and ref is not None:
            entry.update(_verdict(subject, ref, target))
        if ours and ref is not None:
            pick = max if ours[0].higher_is_better else min
            best = pick(ours, key=lambda s: s.median or 0.0)
            if best is not subject:
                entry["best"] = _verdict(best, ref, target)
        if nofast is not None and ref is not None:
            entry["nofast"] = _verdict(nofast, ref, target)
        results.append(entry)
    return results


NOTE = (f"({NO_CONFIRM}: a reference whose publish does not wait for RabbitMQ's confirm, e.g. "
        "dramatiq, Dramatiq's default; dramatiq-confirm is Dramatiq with confirm_delivery=True. "
        "The latency target is like for like: peers that wait for confirms, as aioqueue's "
        "delay() does; the info line compares with every peer.)")


def _got(r: dict[str, Any]) -> str:
    return (f"{r['ratio']:.2f}x {r['reference']}" if r["ratio"] is not None
            else f"{r['aioqueue']:.3f} {r['unit']}")


def describe(results: list[dict[str, Any]]) -> str:
    lines = ["", "Targets (aioqueue's median against the same run's references; then the best "
                 "aioqueue configuration, where another one was measured, and "
                 f"{NOFAST}, its fast paths off, where measured):"]
    for r in results:
        others = [r[key] for key in ("best", "nofast") if key in r]
        if r["status"] == "n/a" and not others:
            lines.append(f"  n/a   {r['target']} (not measured in this run)")
            continue
        line = f"  {r['status']:<5} {r['target']}: "
        line += _got(r) if r["status"] != "n/a" else "aioqueue not measured"
        for other in others:
            line += f"; {other['row']}: {other['status']} {_got(other)}"
        lines.append(line)
    if any(r.get("reference", "").endswith(NO_CONFIRM) for r in results):
        lines += textwrap.wrap(NOTE, 96, initial_indent="  ", subsequent_indent="   ")
    return "\n".join(lines)
