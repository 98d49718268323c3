"""The speed harness runs end to end in its quick mode (it measures; nothing here asserts a time)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow


def test_speed_harness_quick_mode(tmp_path):
    out = tmp_path / "results.json"
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "bench" / "speed.py"), "--quick", "--repeats", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    impls = {row["impl"] for row in data["rows"]}
    assert {"diffusers", "unfog"} <= impls and data["meta"]["torch"]
    assert all(row.get("ms_per_call", 1) > 0 for row in data["rows"])


@pytest.mark.parametrize("name", ["results-cpu.json", "results-cuda.json"])
def test_committed_results_render_as_tables(name):
    """The README's tables come from these files through bench/table.py."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "bench" / "table.py"), str(root / "bench" / name)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = json.loads((root / "bench" / name).read_text())["rows"]
    assert all(row["impl"] in r.stdout for row in rows) and "| --- |" in r.stdout
