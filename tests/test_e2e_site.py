"""A short run of the whole site (`python -m tools.site`): boards, gateway, CSMS, scenario."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("default_ports_taken")  # the site binds free ports only: two runs share a machine
def test_e2e_site_short_run(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "tools.site", "--boards", "2", "--minutes", "5", "--data", str(tmp_path)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=85,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "== summary ==" in p.stdout and "[site]" in p.stdout
