# ruff: noqa: F821
# `include`, `package` and `options` are builtins of MicroPython's manifest tool (tools/makemanifest.py).
# The emulated board's image (tools/board/image.py: the unix port built 32-bit): the firmware frozen exactly
# as firmware/manifest.py freezes it for a real board — that file is included, with asyncio in place of a
# board port's `boards/manifest.py` (asyncio is what the unix port's standard variant freezes of its own; the
# rest of its manifest, micropython-lib's mip, ssl and ffi wrappers, is not vendored and the firmware uses
# none of it) — plus what only the emulated board runs and a real board never freezes: boards/unix.py (its
# entry: flash image file, control channel) and boards/sim.py (the simulated hardware). EVEDGE_FW names the
# build to freeze (`python -m tools.board.build DIR --py`).
import os

include("../../firmware/manifest.py", port_manifest="$(MPY_DIR)/extmod/asyncio")  # type: ignore[name-defined]
package("boards", files=["unix.py", "sim.py"], base_path=os.getenv("EVEDGE_FW") or "../../firmware")  # type: ignore[name-defined]
