"""The client process: ``python -m benchmarks.client WORKLOAD N [--quick]``.

Started by the runner once per repetition with the run's context in ``BENCH_CONTEXT``; it
connects, warms up (untimed), measures, and prints one line ``RESULT <json>`` that the parent
reads. Only this process imports the system's framework on the client side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any

from benchmarks.common import Context
from benchmarks.signals import SignalCounter
from benchmarks.systems import SYSTEMS
from benchmarks.workloads import WORKLOADS

RESULT_MARK = "RESULT "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.client")
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("n", type=int)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    ctx = Context.from_json(os.environ["BENCH_CONTEXT"])
    workload = WORKLOADS[args.workload]
    signals = SignalCounter(ctx.signal_path)
    driver: Any = SYSTEMS[ctx.system].driver()
    driver.signals = signals
    out: dict[str, Any]
    try:
        driver.start()
        workload.warmup(driver, signals, args.n, args.quick)
        out = {"ok": True, "metrics": workload.measure(driver, signals, args.n, args.quick)}
    except Exception as exc:
        traceback.print_exc()
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        try:
            driver.close()
        except Exception:
            traceback.print_exc()
        signals.close()
    print(RESULT_MARK + json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
