"""A short soak and fault campaign (`python -m tools.site.campaign`): board power cuts, kill -9
of the gateway process, upstream cuts and clock steps while sessions run; no loss, no
duplicate, order per device, SDRs reconcile (B16, B17, S6). The long run: --minutes 30."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("default_ports_taken")  # the campaign binds free ports only: two runs share a machine
def test_soak_campaign_short(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "tools.site.campaign", "--minutes", "0.4", "--seed", "20240601", "--boards", "3",
         "--data", str(tmp_path)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=85,
    )  # fmt: skip
    out = p.stdout + p.stderr[-3000:]
    assert "== campaign summary ==" in p.stdout, out[-5000:]
    faults = p.stdout.split("faults injected: ")[1].splitlines()[0]
    assert sum(int(x.split()[-1]) for x in faults.split(", ")) >= 4, faults
    for check in (
        "no accepted message lost",
        "none duplicated",
        "order per device kept",
        "every SDR reconciles with its metered energy",
    ):
        assert f"PASS {check}" in p.stdout, out[-5000:]
    assert p.returncode == 0, out[-5000:]


def test_campaign_refuses_a_data_folder_with_an_earlier_run(tmp_path: Path) -> None:
    (tmp_path / "csms").mkdir()
    p = subprocess.run([sys.executable, "-m", "tools.site.campaign", "--data", str(tmp_path)],
                       check=False, cwd=ROOT, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert p.returncode == 2 and "is not empty" in p.stderr
