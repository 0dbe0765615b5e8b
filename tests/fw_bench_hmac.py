# The time of one frame's tag on the board (HMAC-SHA256 in viper, csc/sha256.py), for the figures in
# docs/firmware.md; not run by the tests (a time on a shared machine is no assertion). On the image:
#
#     $(python -m tools.board.image --path) tests/fw_bench_hmac.py [FRAME_BYTES]
#
# Prints the best of 5 runs of 500 tags, in µs per tag: the best, since what a busy machine adds is
# noise, not the code's cost.
import sys
import time

from csc.crypto import Hmac

n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
mac = Hmac(b"k" * 32)
data = bytearray(bytes(range(256)) * (n // 256 + 1))
out = bytearray(16)
best = None
for _ in range(5):
    t = time.ticks_us()
    for _ in range(500):
        mac.tag_into(data, 0, n, out, 0)
    us = time.ticks_diff(time.ticks_us(), t) / 500
    best = us if best is None else min(best, us)
print(f"{n}-byte tag: {best:.1f} us (best of 5 x 500)")
