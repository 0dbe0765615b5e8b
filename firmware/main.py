"""Entry on a board: mount the flash, build the board's HAL, run the app.

A real board freezes this file with the firmware (manifest.py); boards/<name>.py holds
what differs between boards (pins, UART of the meter, the gateway address).
"""

try:
    from boards import esp32 as board
except ImportError:  # no board module frozen: nothing to run
    board = None

if board is not None:
    board.main()
