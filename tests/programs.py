"""Parts started as programs of their own (`python -m …`), as an operator starts them: their
output kept and waited on; the `programs` fixture (conftest.py) stops them after a test."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Program:
    """A part started as its own process (`python -m …`); its output lines are kept."""

    def __init__(self, *args: str, stdin: bool = False) -> None:
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=ROOT, text=True, bufsize=1, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        rx = re.compile(pattern)
        with self._cv:
            ok = self._cv.wait_for(
                lambda: any(rx.search(x) for x in self.lines) or self.proc.poll() is not None, timeout
            )
            found = next((m for x in self.lines if (m := rx.search(x))), None)
        if found is None:
            tail = "\n".join(self.lines[-30:])
            why = "exited" if ok else f"not within {timeout} s"
            raise AssertionError(f"{pattern!r} {why}; last output:\n{tail}")
        return found

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # a board powers off at the end of its input
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
