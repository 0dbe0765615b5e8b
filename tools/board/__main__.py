"""Run one emulated board interactively: `python -m tools.board --gw-port 7700 --dir /tmp/b1`.

Type control commands as JSON lines (`{"cmd": "plug"}`); the board's events are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .runner import Board


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gw-port", type=int, default=7700)
    ap.add_argument("--dir", default="/tmp/evedge-board")
    ap.add_argument("--id", default="evse-1")
    ap.add_argument("--factory-key", default=bytes(range(32)).hex())
    ap.add_argument("--heap", default="96k")
    ap.add_argument("--source", action="store_true", help="run firmware/ as it is, not the build (debugging)")
    a = ap.parse_args()
    b = Board(a.dir, a.gw_port, a.id, bytes.fromhex(a.factory_key), a.heap, source=a.source).start()
    seen = 0
    try:
        for line in sys.stdin:
            if line.strip():
                c = json.loads(line)
                b.cmd(c.pop("cmd"), **c)
            time.sleep(0.2)
            for e in b.events[seen:]:
                print(json.dumps(e))
            seen = len(b.events)
    finally:
        b.stop()


if __name__ == "__main__":
    main()
