"""The main job, shortened: `citynerve demo --quick` tells the whole story and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(1200)
def test_the_quick_demo_tells_the_story_and_cleans_up(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "citynerve.operators.cli", "demo", "--quick",
         "--state-dir", str(tmp_path / "federation")],
        cwd=tmp_path, capture_output=True, text=True, timeout=1100, check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-6000:]
    for expected in ("Joined, Reachable, Ready", "SensorTypes present in chengdu", "terminals online across",
                     "promotion Promoted",
                     "duty officer: Resolved", "Reachable=False",
                     "roll-up caught up", "INCIDENTS", "PROMOTIONS", "FEDERATION (hub view)"):
        assert expected in out, f"{expected!r} missing from the demo's output:\n{out[-4000:]}"
    report = tmp_path / "demo-output" / "report.html"
    assert report.is_file()
    page = report.read_text()
    assert page.count("data:image/png;base64,") >= 3  # timeline, pressure at the burst, flood level
    assert "local federation stopped" in out
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False)
    assert not leftovers.stdout.strip(), f"processes left behind: {leftovers.stdout}"
