"""A short soak and fault campaign (`python -m tools.site.campaign`): board power cuts, kill -9
of the gateway process, upstream cuts and clock steps while sessions run; no loss, no
duplicate, order per device, SDRs reconcile (B16, B17, S6); the same with the OCPP 2.0.1
northbound on (--ocpp, #17); the same with the IEC 63119 roaming endpoints on and roaming cards
of two home CSPs (--roaming, #14): every roaming session one SDR at the CSMS, the CSO, its home
CSP and the CH, priced right and matched (R3-5, R3-9). The long run: --minutes 30."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tools.site.campaign import FAULTS, fault_schedule

ROOT = Path(__file__).resolve().parents[1]


def test_a_seed_replays_the_same_fault_schedule() -> None:
    a = fault_schedule(20240601, 24, 3)
    assert a == fault_schedule(20240601, 24, 3)  # the same faults, boards, lengths and offsets
    assert a != fault_schedule(20240602, 24, 3)
    assert len(a) >= 6 and {f.kind for f in a} <= set(FAULTS)
    assert all(1.0 - 1e-3 <= b.at_s - f.at_s <= 3.0 + 1e-3 for f, b in itertools.pairwise(a))  # one every 1–3 s
    assert all(0 <= f.board < 3 for f in a)
    # the schedule is drawn from the seed alone: a longer run begins with the same faults
    assert fault_schedule(20240601, 60, 3)[: len(a)] == a


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("default_ports_taken")  # the campaign binds free ports only: two runs share a machine
def test_soak_campaign_short(tmp_path: Path) -> None:
    seed, seconds, boards = 20240601, 24, 3
    p = subprocess.run(
        [sys.executable, "-m", "tools.site.campaign", "--minutes", str(seconds / 60), "--seed", str(seed),
         "--boards", str(boards), "--data", str(tmp_path)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=230,
    )  # fmt: skip
    out = p.stdout + p.stderr[-3000:]
    assert "== campaign summary ==" in p.stdout, out[-5000:]
    schedule = fault_schedule(seed, seconds, boards)
    assert f"fault schedule (seed {seed}): " + "; ".join(map(str, schedule)) in p.stdout, out[-5000:]
    faults = p.stdout.split("faults injected: ")[1].splitlines()[0]
    injected = {x.rsplit(" ", 1)[0]: int(x.split()[-1]) for x in faults.split(", ")}
    assert injected == {k: Counter(f.kind for f in schedule)[k] for k in FAULTS}, faults  # every one of them
    assert sum(injected.values()) >= 4, faults
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


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("default_ports_taken")
def test_soak_campaign_short_in_ocpp_mode(tmp_path: Path) -> None:
    """The same faults with the OCPP 2.0.1 northbound on (#17): checked at the OCPP CSMS."""
    seed, seconds, boards = 20240601, 24, 3
    p = subprocess.run(
        [sys.executable, "-m", "tools.site.campaign", "--ocpp", "--minutes", str(seconds / 60), "--seed", str(seed),
         "--boards", str(boards), "--data", str(tmp_path)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=230,
    )  # fmt: skip
    out = p.stdout + p.stderr[-3000:]
    assert "checks read the OCPP CSMS" in p.stdout and "== campaign summary ==" in p.stdout, out[-5000:]
    faults = p.stdout.split("faults injected: ")[1].splitlines()[0]
    injected = {x.rsplit(" ", 1)[0]: int(x.split()[-1]) for x in faults.split(", ")}
    schedule = fault_schedule(seed, seconds, boards)
    assert injected == {k: Counter(f.kind for f in schedule)[k] for k in FAULTS}, faults
    for check in (
        "no accepted message lost",
        "none duplicated",
        "order per device kept",
        "every transaction's events continuous (seqNo 0, 1, …), its energy that of the board's meter",
    ):
        assert f"PASS {check}" in p.stdout, out[-5000:]
    assert p.returncode == 0, out[-5000:]


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("default_ports_taken")
def test_soak_campaign_short_with_roaming_keeps_the_roaming_books(tmp_path: Path) -> None:
    """#14: the faults with roaming on (mixed mode): roaming cards of both home CSPs charge
    through power cuts, gateway kills and CSMS outages, and the roaming books still hold."""
    seed, seconds, boards = 20240601, 18, 3
    p = subprocess.run(
        [sys.executable, "-m", "tools.site.campaign", "--roaming", "--minutes", str(seconds / 60), "--seed",
         str(seed), "--boards", str(boards), "--data", str(tmp_path)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=230,
    )  # fmt: skip
    out = p.stdout + p.stderr[-3000:]
    assert "roaming on, mixed" in p.stdout and "== campaign summary ==" in p.stdout, out[-5000:]
    faults = p.stdout.split("faults injected: ")[1].splitlines()[0]
    injected = {x.rsplit(" ", 1)[0]: int(x.split()[-1]) for x in faults.split(", ")}
    assert injected == {k: Counter(f.kind for f in fault_schedule(seed, seconds, boards))[k] for k in FAULTS}, faults
    roaming = p.stdout.split("roaming SDRs at the home CSPs ")[1].split(",")[0]
    assert int(roaming) > 0, out[-5000:]  # roaming sessions were billed, not only the operator's own
    for check in (
        "no accepted message lost",
        "every transaction billed exactly once",
        "every roaming session one SDR at the CSMS, the CSO, its home CSP and the CH, priced right, matched",
    ):
        assert f"PASS {check}" in p.stdout, out[-5000:]
    assert p.returncode == 0, out[-5000:]
