"""``python -m benchmarks``: run the suite, print the table, write JSON and a PNG chart.

Examples::

    python -m benchmarks                                   # everything, 3 repetitions
    python -m benchmarks --systems aioqueue,celery --workloads noop,io --repeat 5
    python -m benchmarks --n 0.2                            # every count x 0.2
    python -m benchmarks --n noop=2000,latency=100          # some counts
    python -m benchmarks --quick --systems aioqueue,raw --workloads enqueue,noop  # smoke run
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from benchmarks.systems import GROUPS, SYSTEMS
from benchmarks.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTIONS = (
    "aioqueue", "celery", "kombu", "gevent", "aio-celery", "dramatiq", "pika", "taskiq",
    "taskiq-aio-pika", "taskiq-redis", "aio-pika", "aiormq", "redis", "anyio",
)


def _versions() -> dict[str, str]:
    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()
    found["git_commit"] = commit or "unknown"
    return found


def _names(text: str, known: list[str], groups: dict[str, list[str]], what: str) -> list[str]:
    names: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        found = groups.get(part, [part])
        for name in found:
            if name not in known:
                raise SystemExit(f"unknown {what} {name!r}; choose from {', '.join(known)}")
            if name not in names:
                names.append(name)
    return [n for n in known if n in names]  # in the suite's order


def _counts(text: str | None, quick: bool) -> dict[str, int]:
    counts = {n: (w.quick_n if quick else w.default_n) for n, w in WORKLOADS.items()}
    if not text:
        return counts
    if "=" not in text:
        factor = float(text)
        return {n: max(1, round(c * factor)) for n, c in counts.items()}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in counts:
            raise SystemExit(f"unknown workload {name!r} in --n")
        counts[name.strip()] = int(value)
    return counts


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark aioqueue against stock Celery, its peers and a raw aio-pika floor.",
    )
    parser.add_argument("--systems", default="all",
                        help=f"comma list of {', '.join(SYSTEMS)}, or all/celery/peers")
    parser.add_argument("--workloads", default="all",
                        help=f"comma list of {', '.join(WORKLOADS)}, or all")
    parser.add_argument("--n", help="scale factor for every count (0.1), or name=count,...")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--out", type=Path, help="results dir (default benchmarks/results/<time>)")
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    parser.add_argument("--list", action="store_true", help="list systems and workloads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.list:
        for name, system in SYSTEMS.items():
            print(f"system   {name:<20} {system.label}")
        for name, workload in WORKLOADS.items():
            print(f"workload {name:<20} n={workload.default_n:<7,} {workload.title}")
        return 0
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    systems = _names(args.systems, list(SYSTEMS), GROUPS, "system")
    workloads = _names(args.workloads, list(WORKLOADS), {"all": list(WORKLOADS)}, "workload")
    missing = sorted({m for s in systems for m in SYSTEMS[s].requires
                      if importlib.util.find_spec(m) is None})
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run scripts/bench, or "
                         "pip install --group bench")
    from benchmarks import chart, report, targets
    from benchmarks.runner import RunConfig, Runner

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.out or ROOT / "benchmarks" / "results" / stamp).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    config = RunConfig(systems, workloads, _counts(args.n, args.quick), args.repeat,
                       args.quick, out)
    load_before = os.getloadavg()
    runner = Runner(config)
    samples = runner.run()
    summaries = report.summarize(samples)
    checked = targets.check(summaries)
    text = report.table(summaries, config.counts, config.repeat) + "\n" + targets.describe(checked)
    print(text)
    meta = runner.meta() | {
        "started": stamp, "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "versions": _versions(),
    }
    report.write_json(out / "results.json", meta, samples, summaries, checked)
    (out / "table.txt").write_text(text + "\n")
    (out / "table.md").write_text(report.markdown(summaries, config.counts, config.repeat) + "\n")
    drawn = chart.draw(summaries, out / "results.png",
                       f"aioqueue benchmarks, {stamp} ({os.cpu_count()} CPUs)")
    print(f"\nwrote {out / 'results.json'}, {out / 'table.txt'}, {out / 'table.md'}"
          + (f", {out / 'results.png'}" if drawn else " (no chart: matplotlib not installed)"))
    print(f"total {time.strftime('%H:%M:%S', time.gmtime(meta['duration_s']))}")
    return 0 if all(s.ok for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
