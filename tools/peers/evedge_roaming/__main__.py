"""Run one roaming endpoint: evedge-roaming --role cso|csp|ch --config FILE
(console script of the evedge-peers distribution; `python -m evedge_roaming` is the same).

`--init DIR` writes a complete loopback network instead (dev CA, certificates, one TOML per
role, for the mode given by --mode) and exits; run the three endpoints from those files.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from gateway.protocol import devpki, gid

from . import config
from .ch import ClearingHouse
from .cso import CsoEndpoint
from .csp import CspEndpoint
from .endpoint import Endpoint
from .operator import MemoryOperator
from .testbed import write_network
from .visited import VisitedCspEndpoint


def build(role: str, cfg: config.EndpointConfig, demo_evses: int = 2) -> Endpoint:
    if role == "cso":
        country, party = cfg.party_id.split("*")[:2]
        evses = [gid.make(country, party, "E", f"1-{i}") for i in range(1, demo_evses + 1)]
        operator = MemoryOperator.one_site(cfg.party_id, gid.make(country, party, "L", "1"), evses)
        return CsoEndpoint(cfg, operator)
    if role == "csp":  # a CSP with partner CSPs roaming through it is their visited CSP
        return VisitedCspEndpoint(cfg) if cfg.partners() else CspEndpoint(cfg)
    return ClearingHouse(cfg)


async def run(role: str, cfg: config.EndpointConfig, demo_evses: int) -> None:
    ep = await build(role, cfg, demo_evses).start()
    logging.info("%s %s listening on %s:%d (mode %s)", role, cfg.party_id, cfg.host, ep.port, cfg.mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await ep.stop()


def main(argv: list[str] | None = None) -> None:
    devpki.private_by_default()
    ap = argparse.ArgumentParser(prog="evedge-roaming", description=__doc__)
    ap.add_argument("--role", choices=config.ROLES)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--demo-evses", type=int, default=2, help="EVSEs of the in-memory operator (cso)")
    ap.add_argument("--init", type=Path, help="write a loopback network (certs + TOML) into this folder")
    ap.add_argument("--mode", choices=config.MODES, default="peer_to_peer")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.init is not None:
        for key, cfg in write_network(a.init, a.mode).items():
            print(f"{key}: evedge-roaming --role {cfg.role} --config {a.init / f'{key}.toml'}")
        return
    if a.role is None or a.config is None:
        ap.error("--role and --config are required (or --init DIR)")
    cfg = config.load(a.config)
    if cfg.role != a.role:
        ap.error(f"{a.config} configures a {cfg.role}, not a {a.role}")
    asyncio.run(run(a.role, cfg, a.demo_evses))


if __name__ == "__main__":
    main()
