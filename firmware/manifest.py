# ruff: noqa: F821
# `include`, `package`, `module` and `options` are builtins of MicroPython's manifest tool (tools/makemanifest.py),
# which exec()s this file; neither ruff nor mypy can know them.
# Freezes the firmware into a MicroPython build (the codec and services then live in flash as bytecode,
# not in the heap):
#
#     python -m tools.board.build /tmp/fw --py      # constants inlined across modules (docs/firmware.md)
#     EVEDGE_FW=/tmp/fw make -C ports/esp32 BOARD=ESP32_GENERIC FROZEN_MANIFEST=/path/to/firmware/manifest.py
#
# EVEDGE_FW (in the environment) names the build to freeze; without it the source is frozen as it is.
import os

_fw = os.getenv("EVEDGE_FW") or "."

# the port's own manifest (asyncio …): a board port's boards/manifest.py; the emulated board's image
# (tools/board/manifest_unix.py) includes this file with the unix port's instead
options.defaults(port_manifest="$(PORT_DIR)/boards/manifest.py")  # type: ignore[name-defined]
include(options.port_manifest)  # type: ignore[name-defined]
# the whole firmware: `csc` holds only what a board runs (the emulated board's simulated hardware
# is boards/sim.py, never frozen; tests/test_fw_layout.py checks what this file freezes)
package("csc", base_path=_fw)  # type: ignore[name-defined]
# `boards.esp32`, as main.py imports it (a top-level `esp32` would be hidden by the port's own
# module), and the drivers it wires
_board = [
    "esp32.py",
    "drivers/pilot.py",
    "drivers/modbus_meter.py",
    "drivers/pn532.py",
    "drivers/ntc.py",
    "drivers/zero_cross.py",
]
package("boards", files=_board, base_path=_fw)  # type: ignore[name-defined]
module("main.py", base_path=_fw)  # type: ignore[name-defined]
