"""The PNG chart: one panel per workload metric, median bars with min-max whiskers.

Uses matplotlib's Agg backend (no display). Colours mark the family: aioqueue, stock Celery,
the peers, and the raw floor, so the comparison the ratios make can be seen at a glance.
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.report import Summary
from benchmarks.workloads import WORKLOADS

COLOURS = {"aioqueue": "#1f77b4", "celery": "#2ca02c", "peer": "#ff7f0e", "raw": "#7f7f7f"}


def draw(summaries: list[Summary], path: Path, title: str) -> bool:
    """Write the chart to ``path``; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = []
    for wname, workload in WORKLOADS.items():
        for metric in workload.metrics:
            group = [s for s in summaries if s.workload == wname and s.metric == metric.key
                     and s.median is not None]
            if group:
                panels.append((workload, metric, group))
    if not panels:
        return False
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 0.9 + 3.1 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (workload, metric, group) in zip(axes.flat, panels, strict=False):
        labels = [s.row for s in group][::-1]
        medians = [s.median or 0.0 for s in group][::-1]
        low = [(s.median or 0.0) - (s.min or 0.0) for s in group][::-1]
        high = [(s.max or 0.0) - (s.median or 0.0) for s in group][::-1]
        colours = [COLOURS.get(s.family, "#9467bd") for s in group][::-1]
        ax.barh(range(len(group)), medians, xerr=[low, high], color=colours, capsize=3)
        ax.set_yticks(range(len(group)), labels, fontsize=8)
        better = "higher" if metric.higher_is_better else "lower"
        ax.set_title(f"{workload.name}: {metric.label}\n{metric.unit}, {better} is better",
                     fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
        top = max(m + h for m, h in zip(medians, high, strict=True)) or 1.0
        for y, value in enumerate(medians):
            ax.text(value + top * 0.01, y, f"{value:,.{metric.digits}f}", va="center",
                    fontsize=7)
        ax.set_xlim(0, top * 1.22)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
