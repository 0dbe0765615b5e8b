# ruff: noqa: F821
# `package` and `module` are the manifest's builtins.
# Freezes the firmware into a MicroPython build: `make BOARD=... FROZEN_MANIFEST=.../manifest.py`
# (the codec and services then live in flash as bytecode, not in the heap).
package("csc", base_path=".")
module("main.py")
module("esp32.py", base_path="boards")
