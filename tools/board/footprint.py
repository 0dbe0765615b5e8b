"""Footprint of the firmware: `python -m tools.board.footprint [--quick]`.

- total .mpy size: every module of firmware/csc compiled by mpy-cross (as frozen on a board);
- heap after the imports and after boot (App built, buffers preallocated, state loaded);
- peak heap (sampled after gc every 250 ms) during a full charging session while a
  firmware download and a log upload run, and the working set = peak − heap after boot;
- the smallest `-X heapsize` with which that scenario passes.
On the unix port the bytecode of .mpy modules is loaded into the heap (a board runs it
frozen in flash), so the smallest heap includes the code; the working set does not.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "firmware")]


def compile_mpy(out: Path) -> int:
    total = 0
    src = ROOT / "firmware"
    for py in sorted((src / "csc").rglob("*.py")):
        rel = py.relative_to(src).with_suffix(".mpy")
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mpy-cross", "-o", str(dst), "-s", str(rel.with_suffix(".py")), str(py)], check=True)
        total += dst.stat().st_size
    (out / "micropython.py").write_text("")  # not needed on the port; keeps the dir importable
    return total


def scenario(code: Path, heap: str) -> dict[str, int] | None:
    """The full session; its figures, or None when the board failed (out of memory)."""
    from fwpeer import FACTORY_KEY, Peer  # noqa: PLC0415 — on the path set above

    from gateway.schema import Action, Key  # noqa: PLC0415
    from tools.board import Board  # noqa: PLC0415

    peer = Peer({"evse-1": {"factory_key": FACTORY_KEY}})
    peer.tokens[b"card-1"] = 0
    image = b"CSCFW1" + bytes(range(256)) * 64  # 16 KiB image
    peer.firmware[1] = image
    with tempfile.TemporaryDirectory() as d:
        b = Board(d, peer.port, heap=heap, code_dir=code)
        try:
            b.start()
            boot = b.wait("boot", timeout=10)
            b.wait("registration", timeout=15)
            b.cmd("reset_peak")
            peer.request(Action.SET_LOG_CRITERIA, {Key.LOG_LEVEL: 9})
            for _ in range(8):
                b.cmd("log", text="0123456789abcdef", n=64)
            b.cmd("plug")
            b.cmd("card", token="card-1")
            b.wait("tx_started")
            peer.request(Action.GET_LOG, {Key.REQUEST_ID: 1, Key.LOG_TYPE: 0})
            peer.request(
                Action.UPDATE_FIRMWARE,
                {
                    Key.IMAGE_ID: 1,
                    Key.VERSION: "1.1",
                    Key.SIZE: len(image),
                    Key.SHA256: hashlib.sha256(image).digest(),
                    Key.SIGNATURE: bytes(64),
                },
                timeout=5,
            )
            peer.request(
                Action.SET_CHARGING_PROFILE,
                {
                    Key.EVSE: 1,
                    Key.PROFILE_ID: 1,
                    Key.STACK_LEVEL: 0,
                    Key.PURPOSE: 2,
                    Key.PERIODS: [{Key.START_S: 0, Key.LIMIT_W: 7000}],
                },
            )
            peer.request(Action.DSO_LIMIT, {Key.LIMIT_W: 4000, Key.DEADLINE_MS: 500})
            b.wait("log_uploaded", timeout=30)
            time.sleep(0.6)
            st = b.status()
            # the firmware is in place before the session ends (the update waits for no tx here)
            b.cmd("unplug")
            b.wait("tx_ended")
            time.sleep(0.6)
            st = b.status()
            if any("MemoryError" in line for line in b.stderr) or b.all("error"):
                return None
            return {
                "heap_imports": boot["heap_imports"] - boot["heap_start"],
                "heap_boot": boot["heap_boot"] - boot["heap_start"],
                "peak": st["peak"] - boot["heap_start"],
            }
        except (TimeoutError, OSError) as e:
            print(f"  ({heap}: {str(e).splitlines()[0]})")
            return None
        finally:
            b.stop()
            peer.close()


def main() -> None:
    quick = "--quick" in sys.argv
    out = Path(tempfile.mkdtemp(prefix="csc-mpy-"))
    try:
        total = compile_mpy(out)
        print(f"total .mpy size: {total} bytes ({total / 1024:.1f} KiB), {len(list(out.rglob('*.mpy')))} modules")
        r = scenario(out, "512k")
        if r is None:
            print("scenario failed with a 512 KiB heap")
            sys.exit(1)
        print(f"heap after imports: {r['heap_imports']} bytes")
        print(f"heap after boot:    {r['heap_boot']} bytes")
        print(f"peak heap in the full scenario: {r['peak']} bytes")
        print(f"working set (peak - heap after boot): {r['peak'] - r['heap_boot']} bytes")
        print(f"working set (peak - heap after imports): {r['peak'] - r['heap_imports']} bytes")
        if quick:
            return
        lo, hi = 64, 512  # KiB: lo fails, hi passes
        while hi - lo > 8:
            mid = (lo + hi) // 2
            ok = scenario(out, f"{mid}k") is not None
            print(f"  heapsize {mid}k: {'pass' if ok else 'fail'}")
            if ok:
                hi = mid
            else:
                lo = mid
        print(f"smallest -X heapsize that passes: {hi}k")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
