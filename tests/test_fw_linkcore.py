"""The link core's unit tests (tests/fw_linktests.py) under both interpreters (issue #3 item 6).

Each `test_*` of fw_linktests runs here in CPython as its own test; then the same module runs
on the MicroPython unix port (tests/fw_linktests_runner.py), against the firmware's source and
against its build (tools/board/build.py: what the emulated board runs), and every test must
pass there too, the same ones, all of them.
"""

# The firmware and fw_linktests are MicroPython code, untyped by design:
# mypy: disable-error-code="import-not-found,import-untyped,no-untyped-call"
from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import fw_linktests
import pytest

from tools.board import build
from tools.board.runner import micropython

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "fw_linktests_runner.py"
NAMES = sorted(n for n in dir(fw_linktests) if n.startswith("test_"))


def test_the_module_has_the_link_core_tests() -> None:
    assert len(NAMES) >= 20, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_cpython(name: str) -> None:
    fn: Callable[[], None] = getattr(fw_linktests, name)
    fn()


def _run(code: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MICROPYPATH": f"{code}:{ROOT / 'tests'}"}
    return subprocess.run(
        [micropython(), "-X", "heapsize=1m", str(RUNNER), *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize("where", ["source", "build"])
def test_micropython(where: str) -> None:
    # on the build, the constants are inlined and dropped from the modules: read from the source
    r = _run(build.FIRMWARE) if where == "source" else _run(build.built(), str(build.FIRMWARE))
    out = r.stdout + r.stderr
    assert "implementation: micropython" in r.stdout, out
    passed = re.findall(r"^PASS (\w+)$", r.stdout, re.MULTILINE)
    failed = re.findall(r"^FAIL (\w+)", r.stdout, re.MULTILINE)
    assert not failed, f"failed under MicroPython ({where}): {failed}\n{out}"
    assert sorted(passed) == NAMES, out  # the same tests, each once
    m = re.search(r"^(\d+) passed, (\d+) failed$", r.stdout, re.MULTILINE)
    assert m and (int(m.group(1)), int(m.group(2))) == (len(NAMES), 0), out
    assert r.returncode == 0, out


@pytest.mark.parametrize("where", ["source", "build"])
def test_the_link_loops_allocate_nothing(where: str) -> None:
    # transmit, and receive of acks, run with the heap locked: one allocation is a MemoryError
    code, args = (build.FIRMWARE, ()) if where == "source" else (build.built(), (str(build.FIRMWARE),))
    env = {**os.environ, "MICROPYPATH": f"{code}:{ROOT / 'tests'}"}
    script = str(ROOT / "tests" / "fw_alloc_link.py")
    r = subprocess.run(
        [micropython(), script, *args], check=False, capture_output=True, text=True, env=env, timeout=120
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    rows = re.findall(r"^transmit=(\d+) receive_ack=(\d+) receive_ack_of_2=(\d+) \(heap locked\)$", r.stdout, re.M)
    assert len(rows) == 4, out
    assert all(v == "0" for row in rows for v in row), out
    assert "bad=0" in r.stdout, out
