# ruff: noqa: F821
# `package` and `module` are builtins of MicroPython's manifest tool (tools/makemanifest.py), which
# exec()s this file; neither ruff nor mypy can know them.
# Freezes the firmware into a MicroPython build: `make BOARD=... FROZEN_MANIFEST=.../manifest.py`
# (the codec and services then live in flash as bytecode, not in the heap).
package("csc", base_path=".")  # type: ignore[name-defined]
module("main.py")  # type: ignore[name-defined]
module("esp32.py", base_path="boards")  # type: ignore[name-defined]
