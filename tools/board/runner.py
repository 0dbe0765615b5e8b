"""Start, drive, power-cut and restart an emulated board.

`Board` spawns `micropython -X heapsize=… -m boards.unix` on the built firmware (tools/board/build.py:
constants inlined across modules, compiled by mpy-cross, bytecode loaded into the heap), or with
`source=True` (or EVEDGE_FW_SOURCE=1 in the environment) `micropython firmware/boards/unix.py` on the
source, for debugging. A LittleFS2 image file stands for the flash and a meter file for the
meter's own memory. The control channel is line-oriented JSON: commands on the process's stdin
(`{"cmd": "plug"}`, `{"cmd": "card", "token": "04a1"}`, `{"cmd": "freq", "mhz": 49800}`,
`{"cmd": "step", "ms": 60000}`, `{"cmd": "status"}`, …) and what the board did on its
stdout (`{"ev": "tx_started", "tx_id": 65}`). `kill()` is a power cut (SIGKILL);
`start()` powers up again on the same image.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools import executables

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"


def micropython() -> str:
    return executables.find("micropython")


class Board:
    def __init__(
        self,
        workdir: str | Path,
        gw_port: int,
        device_id: str = "evse-1",
        factory_key: bytes = bytes(range(32)),
        heap: str = "512k",
        blocks: int = 256,
        code_dir: str | Path | None = None,
        source: bool | None = None,
        gw_host: str = "127.0.0.1",
    ) -> None:
        """`code_dir`: a built firmware (tools.board.build) to run; by default the current
        sources are built (once, cached). `source`: run the source instead of a build."""
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.flash = self.dir / "flash.img"
        self.meter = self.dir / "meter.txt"
        self.gw_port = gw_port
        self.gw_host = gw_host
        self.device_id = device_id
        self.factory_key = factory_key
        self.heap = heap
        self.blocks = blocks
        if source is None:
            source = os.environ.get("EVEDGE_FW_SOURCE", "") not in ("", "0")
        self.source = source and code_dir is None
        if self.source:
            self.code_dir = FIRMWARE
        else:
            from .build import built  # noqa: PLC0415 — keeps `python -m tools.board.build` free of a runpy warning

            self.code_dir = Path(code_dir) if code_dir else built()
        self.proc: subprocess.Popen[str] | None = None
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._cv = threading.Condition()
        self.boots = 0

    # ---------------------------------------------------------------- power
    def start(self) -> Board:
        if self.proc is not None:  # the last process rebooted or died by itself
            self.proc.wait(10)
            self._close_pipes()
        env = {**os.environ, "MICROPYPATH": f"{self.code_dir}:.frozen"}
        args = [
            micropython(),
            "-X",
            f"heapsize={self.heap}",
            *([str(FIRMWARE / "boards" / "unix.py")] if self.source else ["-m", "boards.unix"]),
            "--flash",
            str(self.flash),
            "--meter",
            str(self.meter),
            "--gw",
            f"{self.gw_host}:{self.gw_port}",
            "--id",
            self.device_id,
            "--factory-key",
            self.factory_key.hex(),
            "--blocks",
            str(self.blocks),
        ]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1
        )
        self.boots += 1
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        threading.Thread(target=self._err, args=(self.proc,), daemon=True).start()
        return self

    def _read(self, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"ev": "text", "text": line.rstrip()}
            ev["_t"] = time.monotonic()
            ev["_boot"] = self.boots
            with self._cv:
                self.events.append(ev)
                self._cv.notify_all()
        p.stdout.close()
        with self._cv:
            self.events.append({"ev": "exit", "_t": time.monotonic(), "_boot": self.boots, "rc": p.wait()})
            self._cv.notify_all()

    def _err(self, p: subprocess.Popen[str]) -> None:
        assert p.stderr is not None
        for line in p.stderr:
            self.stderr.append(line.rstrip())
        p.stderr.close()

    def kill(self) -> None:
        """Power cut: SIGKILL, no chance to flush anything."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        p = self.proc
        if p is None:
            return
        if p.stdin is not None and not p.stdin.closed:
            with contextlib.suppress(OSError):
                p.stdin.close()
        end = time.monotonic() + 5
        while time.monotonic() < end and not (p.stdout is None or p.stdout.closed):
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_pipes()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---------------------------------------------------------------- control
    def cmd(self, cmd: str, **kw: Any) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()

    def wait(
        self, ev: str, pred: Callable[[dict[str, Any]], bool] | None = None, timeout: float = 15.0, since: int = 0
    ) -> dict[str, Any]:
        """The first event named `ev` (from index `since`) that satisfies `pred`."""
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                for e in self.events[since:]:
                    if e["ev"] == ev and (pred is None or pred(e)):
                        return e
                left = end - time.monotonic()
                if left <= 0:
                    tail = "\n".join(self.stderr[-20:])
                    raise TimeoutError(f"board event {ev!r} not seen; stderr:\n{tail}")
                self._cv.wait(min(left, 0.05))

    def mark(self) -> int:
        with self._cv:
            return len(self.events)

    def status(self) -> dict[str, Any]:
        m = self.mark()
        self.cmd("status")
        return self.wait("status", since=m)

    def all(self, ev: str) -> list[dict[str, Any]]:
        with self._cv:
            return [e for e in self.events if e["ev"] == ev]
