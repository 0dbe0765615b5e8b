"""The pure-Python baseline of `tools.bench.core` (`tools/bench/pypath.py`) makes the core's
checks: every golden vector (tests/vectors/frames.json, the cases `cargo test` checks the core
against) gets the same verdict and error name; its replay window behaves as the core's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway import _core
from gateway.schema import Action, ErrorCode, Key, Kind, Priority
from tools.bench import core as bench
from tools.bench import pypath

VECTORS = json.loads((Path(__file__).parent / "vectors" / "frames.json").read_text())
CASES: list[dict[str, Any]] = VECTORS["cases"]


def verdict(rx: pypath.PyReceiver, frame: bytes) -> str:
    try:
        rx.check(frame, window=False)  # as the vectors are checked: tag, no window
    except pypath.Rejected as e:
        return e.code.name
    return "ok"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_python_path_gives_each_golden_vector_the_cores_verdict(case: dict[str, Any]) -> None:
    rx = pypath.PyReceiver(bytes.fromhex(VECTORS["keys"][case["key"]]))
    want = "ok" if "ok" in case["expect"] else case["expect"]["error"]
    assert verdict(rx, bytes.fromhex(case["frame"])) == want


def test_the_python_path_window_and_ingest_as_the_core() -> None:
    key, frames = bench.make_frames(40)
    rx, q = pypath.PyReceiver(key), pypath.PyQueue()
    core_rx, core_q = _core.Receiver(key), _core.PriorityQueue(max_items=1024, max_bytes=1 << 20)
    # a frame rejected for its body does not take its counter: the good one with that seq gets in
    bad = _core.encode(Kind.EVENT, 45, 7, Priority.TELEMETRY, bench.TS, Action.METER_VALUES, {Key.EVSE: 999}, key)
    good = _core.encode(Kind.EVENT, 45, 8, Priority.TELEMETRY, bench.TS, Action.METER_VALUES, {Key.EVSE: 1}, key)
    batch = [*frames[:30], frames[5], frames[29], bad, good, good, *frames[30:]]
    ours = pypath.ingest(rx, q, batch)
    assert ours == core_rx.ingest(batch, core_q, 7)
    assert list(ours[30:35]) == [ErrorCode.REPLAY, ErrorCode.REPLAY, ErrorCode.OUT_OF_RANGE, 0, ErrorCode.REPLAY]
    assert len(q) == ours.count(0) == 41
