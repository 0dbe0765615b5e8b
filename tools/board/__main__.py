"""Run one emulated board: `python -m tools.board --gw 127.0.0.1:7700 --id ev-0001 --dir /tmp/b1`
with its factory key given as `--factory-key HEX` (what the board maker stored on it),
`--factory-seed HEX` (the key is derived as HMAC-SHA256(seed, device id as UTF-8)) or
`--gateway-config FILE` (the seed read from the gateway's TOML on this machine).

Type control commands as JSON lines on standard input (`{"cmd": "card", "token": "CARD-1"}`,
`{"cmd": "plug"}`, `{"cmd": "step", "ms": 600000}`, `{"cmd": "unplug"}`; docs/firmware.md);
the board's events are printed as JSON lines as they happen. End of input powers the board
off, unless `--keep` is given (then it runs until interrupted). The board runs on the board image
(tools/board/image.py: the 32-bit unix port with the firmware frozen in; built on first use), or with
`--bytecode` (or EVEDGE_BOARD=bytecode) on the 64-bit port with the build's bytecode in the heap.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from gateway import config as gwconfig

from .image import ImageError
from .runner import Board


def factory_key(seed: bytes, device_id: str) -> bytes:
    """The onboarding key of a board: HMAC-SHA256(factory seed, device id as UTF-8)."""
    return hmac.new(seed, device_id.encode(), hashlib.sha256).digest()


def _key(a: argparse.Namespace, ap: argparse.ArgumentParser) -> bytes:
    given = [x for x in (a.factory_key, a.factory_seed, a.gateway_config) if x is not None]
    if len(given) > 1:
        ap.error("give one of --factory-key, --factory-seed, --gateway-config")
    try:
        if a.factory_key is not None:
            return bytes.fromhex(a.factory_key)
        if a.factory_seed is not None:
            return factory_key(bytes.fromhex(a.factory_seed), a.id)
        if a.gateway_config is not None:
            seed = gwconfig.load(a.gateway_config).factory_seed
            if seed is None:
                ap.error(f"{a.gateway_config} has no [devices] factory_seed")
            return factory_key(seed, a.id)
    except (ValueError, gwconfig.ConfigError) as e:
        ap.error(str(e))
    return bytes(range(32))  # the test key of a board that was never given one


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.board", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--gw", default=None, help="the gateway's LAN address HOST:PORT (default 127.0.0.1:7700)")
    ap.add_argument("--gw-port", type=int, default=None, help="the gateway's LAN port on 127.0.0.1")
    ap.add_argument("--dir", help="the board's flash image and meter (default: <tmp>/evedge-board-<id>)")
    ap.add_argument("--id", default="evse-1", help="the device id")
    ap.add_argument("--factory-key", help="hex: the board's factory key")
    ap.add_argument("--factory-seed", help="hex: the site's factory seed (the key is derived from it)")
    ap.add_argument("--gateway-config", type=Path, help="the gateway's TOML: its factory seed")
    ap.add_argument("--heap", default=None, help="MicroPython heap (-X heapsize; default: runner.DEFAULT_HEAP)")
    ap.add_argument("--bytecode", action="store_true", help="the 64-bit build, bytecode in the heap (not the image)")
    ap.add_argument("--keep", action="store_true", help="keep running after the end of standard input")
    ap.add_argument("--source", action="store_true", help="run firmware/ as it is, not the build (debugging)")
    a = ap.parse_args(argv)
    if a.gw is not None and a.gw_port is not None:
        ap.error("give --gw or --gw-port, not both")
    host, port = "127.0.0.1", a.gw_port or 7700
    if a.gw is not None:
        host, _, p = a.gw.rpartition(":")
        if not host or not p.isdigit():
            ap.error(f"--gw: expected HOST:PORT, got {a.gw!r}")
        port = int(p)
    folder = a.dir or Path(tempfile.gettempdir()) / f"evedge-board-{a.id}"
    kind = "source" if a.source else "bytecode" if a.bytecode else None  # None: EVEDGE_BOARD, else the image
    try:
        b = Board(folder, port, a.id, _key(a, ap), a.heap, source=a.source, gw_host=host, kind=kind).start()
    except (ImageError, ValueError) as e:
        sys.exit(f"board: {e}")
    done = threading.Event()

    def show() -> None:
        seen = 0
        while not done.is_set():
            events = b.events[seen:]
            seen += len(events)
            for e in events:
                print(json.dumps(e), flush=True)
            time.sleep(0.1)

    printer = threading.Thread(target=show, daemon=True)
    printer.start()
    try:
        for line in sys.stdin:
            if line.strip():
                try:
                    c = json.loads(line)
                    b.cmd(c.pop("cmd"), **c)
                except (ValueError, KeyError, AttributeError, TypeError) as e:
                    print(f"board: not a command ({e}): {line.strip()}", file=sys.stderr, flush=True)
        if a.keep:
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        time.sleep(0.2)  # the last events reach the printer
        done.set()
        printer.join()
        b.stop()


if __name__ == "__main__":
    main()
