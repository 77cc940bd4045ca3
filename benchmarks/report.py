"""Summaries, ratios, the printed table and the JSON file.

For each workload and metric, every row gets the median, min and max over its successful
repetitions, and two ratios of its median, both measured in the same run: to stock Celery's
best pool for that metric, and to the raw aio-pika floor. A ratio is always ``value /
reference`` in the metric's own unit, so for throughput more is better and for latency,
memory and start-up less is better (the table header says which).

Rows whose client publishes without waiting for RabbitMQ's confirm (stock Celery's and
Dramatiq's defaults; aioqueue's ``delay()`` waits for it) are marked with a dagger, so
``dramatiq`` and ``dramatiq-confirm`` read apart. After the tables, two same-run comparisons:
each two-process row over its one-process row, and ``aioqueue`` over ``aioqueue-nofast`` (its
fast paths off) for every metric both were measured in.
"""

from __future__ import annotations

import json
import statistics
import textwrap
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.runner import Sample
from benchmarks.systems import SYSTEMS
from benchmarks.systems.aioqueue import NOFAST
from benchmarks.workloads import WORKLOADS, Metric, Workload

#: After a row's name: its client does not wait for publisher confirms.
NO_CONFIRM = "\u2020"
NO_CONFIRM_NOTE = (f"{NO_CONFIRM} the client's publish returns without waiting for RabbitMQ's "
                   "publisher confirm (the library's default); aioqueue's delay() waits for it. "
                   "dramatiq-confirm is Dramatiq with confirm_delivery=True.")


@dataclass
class Summary:
    workload: str
    metric: str
    unit: str
    higher_is_better: bool
    row: str
    system: str
    family: str
    samples: list[float]
    failures: list[str]
    median: float | None = None
    min: float | None = None
    max: float | None = None
    vs_celery_best: float | None = None
    vs_raw: float | None = None
    confirms: bool = True  # the row's client waits for RabbitMQ's publisher confirm


def row_confirms(system: str, row: str) -> bool:
    """Whether a row's client waits for publisher confirms: its ``confirm`` option if it has
    one (Celery's enqueue rows, dramatiq-confirm), else what its system declares."""
    spec = SYSTEMS.get(system)
    if spec is None:
        return True
    options = dict(spec.options) | dict(dict(spec.enqueue_rows).get(row, ()))
    if "confirm" in options:
        return options["confirm"] == "1"
    return spec.confirms


def shown(s: Summary) -> str:
    """The row's name as the tables show it: marked when its client skips confirms."""
    return s.row if s.confirms else s.row + NO_CONFIRM


def _best(summaries: list[Summary], metric: Metric, family: str) -> Summary | None:
    found = [s for s in summaries if s.family == family and s.median is not None]
    if not found:
        return None
    pick = max if metric.higher_is_better else min
    return pick(found, key=lambda s: s.median or 0.0)


def summarize(samples: list[Sample]) -> list[Summary]:
    out: list[Summary] = []
    for wname, workload in WORKLOADS.items():
        rows: dict[str, list[Sample]] = {}
        for sample in samples:
            if sample.workload == wname:
                rows.setdefault(sample.row, []).append(sample)
        for metric in workload.metrics:
            group: list[Summary] = []
            for row, row_samples in rows.items():
                values = [s.metrics[metric.key] for s in row_samples
                          if s.ok and metric.key in s.metrics]
                first = row_samples[0]
                summary = Summary(
                    wname, metric.key, metric.unit, metric.higher_is_better, row,
                    first.system, first.family, values,
                    [s.error or "failed" for s in row_samples if not s.ok],
                    confirms=row_confirms(first.system, row),
                )
                if values:
                    summary.median = statistics.median(values)
                    summary.min, summary.max = min(values), max(values)
                group.append(summary)
            celery, raw = _best(group, metric, "celery"), _best(group, metric, "raw")
            for summary in group:
                if summary.median is not None:
                    if celery and celery.median:
                        summary.vs_celery_best = summary.median / celery.median
                    if raw and raw.median:
                        summary.vs_raw = summary.median / raw.median
            out.extend(group)
    return out


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _groups(summaries: list[Summary]) -> Iterator[tuple[str, Workload, Metric, list[Summary]]]:
    """Each (workload, metric) of the run with its rows, in the suite's order."""
    for wname, workload in WORKLOADS.items():
        for metric in workload.metrics:
            group = [s for s in summaries if s.workload == wname and s.metric == metric.key]
            if group:
                yield wname, workload, metric, group


def table(summaries: list[Summary], counts: dict[str, int], repeat: int) -> str:
    lines: list[str] = []
    for wname, workload, metric, group in _groups(summaries):
        better = "higher" if metric.higher_is_better else "lower"
        celery = _best(group, metric, "celery")
        lines += [
            "",
            f"{workload.title}",
            f"  {metric.label} in {metric.unit}, {better} is better; n={counts[wname]:,}, "
            f"{repeat} repetitions; Celery best = {celery.row if celery else 'n/a'}",
            f"  {'system':<24}{'median':>12}{'min':>12}{'max':>12}"
            f"{'x Celery best':>15}{'x raw':>9}",
        ]
        for s in group:
            d = metric.digits
            note = f"  ({len(s.failures)} failed: {s.failures[0][:60]})" if s.failures else ""
            lines.append(
                f"  {shown(s):<24}{_num(s.median, d):>12}{_num(s.min, d):>12}"
                f"{_num(s.max, d):>12}{_ratio(s.vs_celery_best):>15}{_ratio(s.vs_raw):>9}"
                f"{note}"
            )
    if not all(s.confirms for s in summaries):
        lines += ["", *textwrap.wrap(NO_CONFIRM_NOTE, 96, subsequent_indent="  ")]
    return "\n".join(lines + _scaling_lines(summaries, markdown=False)
                     + _fast_path_lines(summaries, markdown=False))


#: (one-process row, two-process row) pairs whose throughput ratio shows the second core.
SCALING_PAIRS = (("aioqueue", "aioqueue-p2"), ("aioqueue-uvloop", "aioqueue-uvloop-p2"),
                 ("dramatiq", "dramatiq-p2"))


def scaling(summaries: list[Summary]) -> list[tuple[str, str, str, float, float]]:
    """(workload, one-process row, two-process row, its median, their ratio) for throughputs."""
    found = []
    for wname, workload in WORKLOADS.items():
        for metric in workload.metrics:
            if not metric.higher_is_better:
                continue
            medians = {s.row: s.median for s in summaries
                       if s.workload == wname and s.metric == metric.key and s.median}
            for one, two in SCALING_PAIRS:
                if one in medians and two in medians:
                    found.append((wname, one, two, medians[two] or 0.0,
                                  (medians[two] or 0.0) / (medians[one] or 1.0)))
    return found


def _scaling_lines(summaries: list[Summary], *, markdown: bool) -> list[str]:
    rows = scaling(summaries)
    if not rows:
        return []
    title = "From 1 to 2 processes (same run): throughput of the 2-process row / the 1-process row"
    if markdown:
        lines = ["", f"**{title}**", "", "| workload | 1 process | 2 processes | median | gain |",
                 "|---|---|---|---:|---:|"]
        lines += [f"| {w} | {one} | {two} | {_num(v, 0)} | {r:.2f}x |"
                  for w, one, two, v, r in rows]
        return lines
    lines = ["", title, f"  {'workload':<16}{'1 process':<20}{'2 processes':<22}{'median':>10}"
             f"{'gain':>8}"]
    lines += [f"  {w:<16}{one:<20}{two:<22}{_num(v, 0):>10}{r:>7.2f}x"
              for w, one, two, v, r in rows]
    return lines


def fast_paths(summaries: list[Summary]) -> list[tuple[Workload, Metric, float, float, float]]:
    """(workload, metric, aioqueue's median, aioqueue-nofast's, their ratio) where both ran."""
    found = []
    for _, workload, metric, group in _groups(summaries):
        medians = {s.row: s.median for s in group if s.median}
        on, off = medians.get("aioqueue"), medians.get(NOFAST)
        if on and off:
            found.append((workload, metric, on, off, on / off))
    return found


def _fast_path_lines(summaries: list[Summary], *, markdown: bool) -> list[str]:
    rows = fast_paths(summaries)
    if not rows:
        return []
    title = f"Fast paths (same run): aioqueue / {NOFAST}"
    note = (f"{NOFAST} is aioqueue with fast_paths off (the public API of aio-pika, aiormq "
            "and redis-py only); a ratio above 1 is better for throughput, below 1 for "
            "latency, memory and start-up")
    if markdown:
        lines = ["", f"**{title}**: {note}.", "",
                 f"| workload | metric | aioqueue | {NOFAST} | aioqueue / {NOFAST} |",
                 "|---|---|---:|---:|---:|"]
        lines += [f"| {w.name} | {m.label} ({m.unit}) | {_num(on, m.digits)} | "
                  f"{_num(off, m.digits)} | {r:.2f}x |" for w, m, on, off, r in rows]
        return lines
    lines = ["", title, *textwrap.wrap(note, 96, initial_indent="  ", subsequent_indent="  ",
                                       break_on_hyphens=False),
             f"  {'workload':<16}{'metric':<24}{'aioqueue':>12}{NOFAST:>18}"
             f"{'ratio':>8}"]
    lines += [f"  {w.name:<16}{m.label + ' (' + m.unit + ')':<24}{_num(on, m.digits):>12}"
              f"{_num(off, m.digits):>18}{r:>7.2f}x" for w, m, on, off, r in rows]
    return lines


def markdown(summaries: list[Summary], counts: dict[str, int], repeat: int) -> str:
    """The same tables in Markdown, for docs/benchmarks.md."""
    lines: list[str] = []
    for wname, workload, metric, group in _groups(summaries):
        better = "higher" if metric.higher_is_better else "lower"
        d = metric.digits
        lines += [
            "",
            f"**{workload.title}**: {metric.label} in {metric.unit}, {better} is better "
            f"(n = {counts[wname]:,}, {repeat} repetitions)",
            "",
            "| system | median | min | max | x Celery best | x raw |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for s in group:
            name = f"**{s.row}**" if s.family == "aioqueue" else shown(s)
            failed = f" ({len(s.failures)} failed)" if s.failures else ""
            lines.append(
                f"| {name}{failed} | {_num(s.median, d)} | {_num(s.min, d)} | "
                f"{_num(s.max, d)} | {_ratio(s.vs_celery_best)} | {_ratio(s.vs_raw)} |"
            )
    if not all(s.confirms for s in summaries):
        lines += ["", NO_CONFIRM_NOTE]
    return "\n".join(lines + _scaling_lines(summaries, markdown=True)
                     + _fast_path_lines(summaries, markdown=True))


def write_json(path: Path, meta: dict[str, Any], samples: list[Sample],
               summaries: list[Summary], targets: list[dict[str, Any]]) -> None:
    data = {
        "meta": meta,
        "summaries": [asdict(s) for s in summaries],
        "targets": targets,
        "samples": [asdict(s) for s in samples],
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
