"""The ESP32 board (firmware/boards/esp32.py) and its drivers (firmware/boards/drivers/) under both
interpreters.

Every `test_*` of tests/fw_esp32tests.py (the drivers' pure pieces against their standards, and the HAL
on a fake `machine`) runs here in CPython as its own test, then all of them on the MicroPython
unix port (tests/fw_linktests_runner.py --module fw_esp32tests), where `machine` has no PWM,
ADC, UART or I2C: the modules must import there and build their hardware only in Esp32Hal().
"""

# The firmware and fw_esp32tests are MicroPython code, untyped by design:
# mypy: disable-error-code="import-not-found,import-untyped,no-untyped-call"
from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import fw_esp32tests
import pytest

from tools.board.runner import FIRMWARE, micropython

ROOT = Path(__file__).resolve().parent.parent
NAMES = sorted(n for n in dir(fw_esp32tests) if n.startswith("test_"))


@pytest.mark.parametrize("name", NAMES)
def test_cpython(name: str) -> None:
    fn: Callable[[], None] = getattr(fw_esp32tests, name)
    fn()


def test_micropython() -> None:
    env = {**os.environ, "MICROPYPATH": f"{FIRMWARE}:{ROOT / 'tests'}"}
    runner = str(ROOT / "tests" / "fw_linktests_runner.py")
    r = subprocess.run(
        [micropython(), "-X", "heapsize=1m", runner, "--module", "fw_esp32tests"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    out = r.stdout + r.stderr
    assert "implementation: micropython" in r.stdout, out
    failed = re.findall(r"^FAIL (\w+)", r.stdout, re.MULTILINE)
    assert not failed, f"failed under MicroPython: {failed}\n{out}"
    assert sorted(re.findall(r"^PASS (\w+)$", r.stdout, re.MULTILINE)) == NAMES, out
    assert re.search(rf"^{len(NAMES)} passed, 0 failed$", r.stdout, re.MULTILINE) and r.returncode == 0, out
