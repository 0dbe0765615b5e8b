"""`evedge-csms --config FILE`: run the CSMS until interrupted.

Console script of the evedge-peers distribution; `python -m evedge_csms` is the same. The
operator's command line is its own script, `evedge-csms-admin` (evedge_csms/admin.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from evedge_csms.config import load
from evedge_csms.server import CsmsServer
from gateway.protocol import devpki


async def _run(server: CsmsServer) -> None:
    await server.start()
    print(f"csms listening on {server.config.listen}:{server.port} data={server.config.data_dir}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    devpki.private_by_default()
    ap = argparse.ArgumentParser(prog="evedge-csms", description="The CSMS peer (docs/csms.md)")
    ap.add_argument("--config", type=Path, help="TOML file (all keys optional)")
    ap.add_argument("--data", type=Path, help="data folder (overrides csms.data)")
    ap.add_argument("--port", type=int, help="UDP port (overrides csms.port; 0 = ephemeral)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    overrides = {"port": args.port} if args.port is not None else {}
    cfg = load(args.config, data_dir=args.data, **overrides)
    asyncio.run(_run(CsmsServer(cfg)))


if __name__ == "__main__":
    main()
