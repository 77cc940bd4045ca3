"""delay() and AsyncResult are typed from the task's own signature (checked with mypy)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SAMPLE = Path(__file__).parent.parent / "typing" / "delay_types.py"


def test_delay_is_typed_by_the_task_signature() -> None:
    expected: dict[int, tuple[str, str]] = {}
    for number, line in enumerate(SAMPLE.read_text().splitlines(), start=1):
        m = re.search(r"# (reveal|error): (.+)$", line)
        if m:
            expected[number] = (m.group(1), m.group(2).strip())
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--hide-error-context",
         "--show-error-codes", str(SAMPLE)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    found: dict[int, str] = {}
    for line in proc.stdout.splitlines():
        m = re.match(r".*delay_types\.py:(\d+): (error|note): (.*)", line)
        if m:
            found.setdefault(int(m.group(1)), "")
            found[int(m.group(1))] += m.group(3)
    assert set(found) == set(expected), proc.stdout
    for number, (kind, want) in expected.items():
        got = found[number]
        if kind == "error":
            assert f"[{want}]" in got, (number, got)
        else:
            revealed = got.replace("builtins.", "").replace("aioqueue.result.", "")
            assert f'Revealed type is "{want}"' in revealed, (number, got)
