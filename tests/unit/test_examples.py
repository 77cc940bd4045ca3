"""The README's main job runs as a new user runs it: no server, the embedded default."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent.parent / "docs" / "examples"


def test_demo_runs_on_the_embedded_default(tmp_path: Path) -> None:
    for name in ("tasks.py", "client.py", "demo.py"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOQUEUE_")}
    proc = subprocess.run(
        [sys.executable, "demo.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "add(4, 4) = 8 | state: SUCCESS" in out
    assert "100 x fetch(0.5): 100 results" in out
    assert "resize('cat.png') = cat.png resized" in out
    assert "fail('boom') -> ValueError('boom')" in out
    assert "TimeoutError" in out
    assert "sqlite:///aioqueue.db" in out  # the banner names the embedded default
    assert (tmp_path / "aioqueue.db").exists()
