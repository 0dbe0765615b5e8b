"""Entry on a board: mount the flash, build the board's HAL, run the app.

A real board freezes this file with the firmware (manifest.py); boards/<name>.py holds
what differs between boards (pins, UART of the meter, the gateway address).
"""

import gc

# Collect every 4 KiB allocated rather than when the heap is full: the garbage of the imports is
# freed while it is small, so the modules' objects pack at the bottom of the heap and the large
# buffers the app allocates next (the 4.4 KiB send and receive buffer) find a free block at the top.
# Without it the live objects end up spread over the whole heap (measured on the unix port: the
# footprint scenario needed 169k of heap, with it and nothing else changed 148k).
gc.threshold(4096)

try:
    from boards import esp32 as board
except ImportError:  # no board module frozen: nothing to run
    board = None

if board is not None:
    board.main()
