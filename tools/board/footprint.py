"""Footprint of the firmware: `python -m tools.board.footprint [--quick] [--profile] [--bytecode | --source]`.

Measures the board image by default (tools/board/image.py: the 32-bit unix port with the firmware
frozen in, as a microcontroller runs it); `--bytecode` the 64-bit unix port with the build's .mpy
loaded into the heap, `--source` the source compiled on that board. The first line says which.

- what goes to flash (the image): the frozen firmware (what firmware/manifest.py freezes: bytecode,
  qstrs, constants and raw-code structs, as mpy-tool counts them for a 32-bit target); for the
  64-bit build: the total .mpy size of firmware/csc as the build compiles it (tools/board/build.py:
  constants inlined across modules, mpy-cross);
- heap taken by each module's import: the modules imported at boot, then apart those loaded when a
  command needs them (the services built on their first command, and the rare commands' modules,
  dropped again after the command);
- heap after the imports (the modules imported at boot) and after boot (App built, buffers
  preallocated, state loaded);
- peak heap (sampled after gc every 250 ms, and at the reboot) during a full charging
  session while a firmware download (16 chunks, verified) and a log upload (8 KiB) run —
  both checked to have progressed during the session —, up to the install and the reboot
  that follow the session's end; the working set = peak − heap after imports (and after boot);
- with `--profile` (the image only): where the heap goes at the measuring point, by the heap
  profiler built into the image (tools/board/heapprof.py): function objects by module, classes,
  modules' globals, instances, coroutine frames, buffers, qstrs;
- the smallest `-X heapsize` with which that scenario passes (searched down to 16k, in 1 KiB steps
  on the image, 4 KiB on the 64-bit build; a board that ran out of heap on the way, MemoryError or a
  service's error, fails).
On the 64-bit build the bytecode of .mpy modules is loaded into the heap (a board runs it frozen in
flash), so the smallest heap includes the code; the working set does not.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import heapprof, image
from .build import FIRMWARE, build
from .runner import micropython

FW_VERIFIED, FW_INSTALLING = 5, 8  # FirmwareStatus
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "firmware")]


IMPORTS = """
import gc, sys
gc.collect()
m0 = gc.mem_alloc()
for name in %r:
    __import__(name)
    gc.collect()
    m1 = gc.mem_alloc()
    print(name, m1 - m0)
    m0 = m1
for name in %r:  # each alone, then dropped again (as services.on_demand does)
    __import__(name)
    gc.collect()
    m1 = gc.mem_alloc()
    del sys.modules[name]
    pkg, _, mod = name.rpartition(".")
    delattr(sys.modules[pkg], mod)
    gc.collect()
    m2 = gc.mem_alloc()
    print(name, m1 - m0, m2 - m0)  # while loaded; what stays (its new qstrs: the pools are never freed)
    m0 = m2
"""
ORDER = [
    "csc.schema", "csc.msgpack", "csc.crypto", "csc.frame", "csc.store",
    "csc.outbox", "csc.sendq", "csc.link", "csc.hal", "boards.sim", "csc.app", "csc.services",
    "csc.services.config", "csc.services.auth", "csc.services.smart_charging", "csc.services.transactions",
    "csc.services.admin", "csc.services.firmware_update", "csc.services.station",
]  # fmt: skip
# not imported at boot: the services built on their first command, which then stay (security; monitoring,
# also at boot when monitors are stored) ...
FIRST_USE = ["csc.services.security", "csc.services.monitoring"]
# ... and the rare commands' modules (services.on_demand: imported for the command, dropped again): every
# csc/services/*_cmds.py
ON_DEMAND = sorted("csc.services." + p.stem for p in (FIRMWARE / "csc" / "services").glob("*_cmds.py"))


def per_import(code: Path | None) -> list[tuple[str, int, int]]:
    """Heap taken by each module's import (after gc), in dependency order: (name, bytes, 0) for the
    resident modules, (name, bytes while loaded, bytes left after it was dropped) for the ones
    loaded on demand. `code` None: the board image's frozen modules."""
    exe = str(image.built()) if code is None else micropython()
    r = subprocess.run(
        [exe, "-X", "heapsize=1m", "-c", IMPORTS % (ORDER + FIRST_USE, ON_DEMAND)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "MICROPYPATH": ".frozen" if code is None else f"{code}:.frozen"},
        timeout=60,
    )
    return [(w[0], int(w[1]), int(w[2]) if len(w) > 2 else 0) for w in (line.split() for line in r.stdout.splitlines())]


class ScenarioError(Exception):
    """The scenario did not run what it measures."""


def scenario(
    code: Path | None, heap: str, strict: bool = True, profile: list[str] | None = None
) -> dict[str, int] | None:
    """The full session; its figures, or None when the board failed (out of memory). `code`: a
    build to run on the 64-bit port, FIRMWARE for the source, None for the board image. `strict`:
    a scenario that did not run what it measures raises ScenarioError; else (the heap search: a
    board short of heap drops log lines) it fails. `profile` (the image only): filled with the heap
    profiler's dump (tools/board/heapprof.py) taken at the measuring point, while the session, the
    download and the upload are all under way."""
    from fwpeer import FACTORY_KEY, Peer  # noqa: PLC0415 — on the path set above

    from gateway.schema import Action, Key  # noqa: PLC0415
    from tools.board import Board  # noqa: PLC0415

    peer = Peer({"evse-1": {"factory_key": FACTORY_KEY}})
    peer.tokens[b"card-1"] = 0
    from evedge_csms.commands import manifest_bytes  # noqa: PLC0415
    from tools.board import build  # noqa: PLC0415
    from tools.board.runner import dev_signer  # noqa: PLC0415

    kind = "image" if code is None else "source" if code == FIRMWARE else "bytecode"
    fw_image = build.update_image("1.1", "x86" if kind == "image" else "host")  # a real build, signed below
    signer, signing_key = dev_signer()
    peer.firmware[1] = fw_image
    with tempfile.TemporaryDirectory() as d:
        kind = "image" if code is None else "source" if code == FIRMWARE else "bytecode"
        b = Board(d, peer.port, heap=heap, code_dir=code if kind == "bytecode" else None, kind=kind)
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
                    Key.SIZE: len(fw_image),
                    Key.SHA256: hashlib.sha256(fw_image).digest(),
                    Key.SIGNATURE: signing_key.sign(
                        manifest_bytes(1, "1.1", len(fw_image), hashlib.sha256(fw_image).digest())
                    ),
                    Key.SIGNER: signer,
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
            fw = [lambda e, n=n: e["status"] == n for n in (FW_VERIFIED, FW_INSTALLING)]
            b.wait("fw_status", pred=fw[0], timeout=30)
            if any("MemoryError" in line for line in b.stderr) or b.all("error"):
                return None  # the board ran out of heap (a task died, or a service's tick failed)
            # both ran during the session, not before nor after it: the figure includes them
            chunks = [r for r in peer.requests if r[1] == Action.FIRMWARE_CHUNK]
            logs = peer.durable(Action.LOG_CHUNK)
            need = (len(fw_image) + 1023) // 1024
            if len(chunks) != need:
                raise ScenarioError(f"firmware download: {len(chunks)} of {need} chunks written")
            if sum(len(c[Key.DATA]) for c in logs) < 8 * 1024:
                raise ScenarioError(f"log upload: only {len(logs)} chunks acked")
            if b.all("tx_ended") or any(fw[1](e) for e in b.all("fw_status")):
                raise ScenarioError("the session ended or the image was installed before the measurement")
            time.sleep(0.6)
            if profile is not None:
                m = b.mark()
                b.cmd("heapprof")
                b.wait("text", pred=lambda e: e["text"] == "heapprof end", since=m, timeout=30)
                profile += [e["text"] for e in b.events[m:] if e["ev"] == "text"]
            m = b.mark()
            b.cmd("unplug")
            b.wait("tx_ended", since=m)
            b.wait("fw_status", pred=fw[1], since=m, timeout=10)  # installed once idle
            st = b.wait("reboot", since=m, timeout=10)  # the peak up to the reboot into the new image
            if any("MemoryError" in line for line in b.stderr) or b.all("error"):
                return None
            return {
                "heap_start": boot["heap_start"],
                "heap_imports": boot["heap_imports"] - boot["heap_start"],
                "heap_boot": boot["heap_boot"] - boot["heap_start"],
                "peak": st["peak"] - boot["heap_start"],
            }
        except ScenarioError as e:
            if strict:
                raise  # the scenario did not run what it measures: no figure
            print(f"  ({heap}: {e})")
            return None
        except (TimeoutError, OSError) as e:
            print(f"  ({heap}: {str(e).splitlines()[0]})")
            return None
        finally:
            b.stop()
            peer.close()


def main() -> None:
    quick = "--quick" in sys.argv
    profiled = "--profile" in sys.argv
    kind = "source" if "--source" in sys.argv else "bytecode" if "--bytecode" in sys.argv else "image"
    out = Path(tempfile.mkdtemp(prefix="csc-mpy-"))
    try:
        code: Path | None
        if kind == "image":
            exe = image.built()
            print(f"measuring: {image.describe(exe)} ({exe})")
            fz = image.info(exe)["frozen"]["firmware"]
            print(
                f"frozen firmware (to flash, what firmware/manifest.py freezes): {fz['total_bytes']} bytes "
                f"({fz['total_bytes'] / 1024:.1f} KiB; {fz['modules']} modules: {fz['bytecode_bytes']} B of bytecode, "
                f"{fz['qstrs']} qstrs in {fz['qstr_bytes']} B; the .mpy files: {fz['mpy_bytes']} B)"
            )
            code = None
        else:
            print("measuring: 64-bit " + ("source compiled on the board" if kind == "source" else "bytecode in heap"))
            sizes = build(out)
            csc = {k: v for k, v in sizes.items() if k.startswith("csc/")}
            total = sum(csc.values())
            print(f"total .mpy size: {total} bytes ({total / 1024:.1f} KiB), {len(csc)} modules of csc/ (built)")
            code = FIRMWARE if kind == "source" else out
        print(f"heap per import ({kind}), the modules imported at boot:")
        for name, n, left in per_import(code):
            if name == FIRST_USE[0]:
                print("built on their first command (not in the heap after imports below):")
            if name == ON_DEMAND[0]:
                print("rare commands, imported for the command and dropped again (each alone; what stays: its qstrs):")
            print(f"  {name:32} {n:7}" + (f"  (stays {left})" if name in ON_DEMAND else ""))
        lines: list[str] | None = [] if profiled and kind == "image" else None
        r = scenario(code, "512k", profile=lines)
        if r is None:
            print("scenario failed with a 512 KiB heap")
            sys.exit(1)
        print(f"heap after imports: {r['heap_imports']} bytes")
        print(f"heap after boot:    {r['heap_boot']} bytes")
        print(f"peak heap in the full scenario: {r['peak']} bytes")
        print(f"working set (peak - heap after boot): {r['peak'] - r['heap_boot']} bytes")
        print(f"working set (peak - heap after imports): {r['peak'] - r['heap_imports']} bytes")
        if lines is not None:
            p = heapprof.parse(lines)
            print("\n".join(heapprof.report(p)))
            print(
                f"  (the whole heap at the measuring point, after gc: also what the emulated board allocated "
                f"before heap_start, its own module boards.unix, {r['heap_start']} B)"
            )
        if quick:
            return
        print(f"smallest -X heapsize that passes: {smallest_heap(code, 1 if kind == 'image' else 4)}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def smallest_heap(code: Path | None, step: int, lo: int = 16) -> str:
    """The smallest -X heapsize (KiB, to `step`) in which the scenario passes, searched down to `lo`."""
    hi = 32
    while scenario(code, f"{hi}k", strict=False) is None:  # the first heap that passes, doubling
        print(f"  heapsize {hi}k: fail")
        lo, hi = hi, hi * 2
        if hi > 512:
            return "none up to 512k"
    print(f"  heapsize {hi}k: pass")
    if lo == 16 and scenario(code, "16k", strict=False) is not None:
        return "16k or less (the search stops at 16k)"
    while hi - lo > step:  # lo fails, hi passes
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            mid = lo + step
        ok = scenario(code, f"{mid}k", strict=False) is not None
        print(f"  heapsize {mid}k: {'pass' if ok else 'fail'}")
        if ok:
            hi = mid
        else:
            lo = mid
    return f"{hi}k ({lo}k fails)"


if __name__ == "__main__":
    main()
