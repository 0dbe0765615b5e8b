"""`python -m gateway [--config FILE]` runs the site gateway; `python -m gateway status`
prints its status; `python -m gateway devices ...` manages device keys.

Console script: `evedge-gateway` (same arguments).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
import urllib.request
from pathlib import Path

from gateway import config as config_mod
from gateway import metrics
from gateway.protocol import devpki


class CannotListen(Exception):
    """A listening socket could not be bound (a port taken, an address not on this host)."""


async def _run(cfg: config_mod.Config) -> None:
    from gateway.service import Gateway  # noqa: PLC0415 (keeps `status` light)

    # The outbox writer thread gives the GIL back between SQLite steps; with the default
    # 5 ms switch interval each handover can cost the busy event loop (and an urgent frame
    # waiting for its commit) up to 5 ms.
    sys.setswitchinterval(0.0005)
    gw = Gateway(cfg)
    try:
        await gw.start()
    except OSError as e:
        await gw.stop()
        raise CannotListen(f"the LAN server on {cfg.lan.host}:{cfg.lan.port}: {e.strerror or e}") from None
    # The hot path makes a few short-lived tuples per frame, freed by reference counting; the
    # cyclic collector's young generation would still run every 700 of them and walk them.
    # Startup's objects go to the permanent generation and the young one is collected every
    # 50,000 allocations (docs/performance.md: gateway CPU per 1000 frames before and after).
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)
    try:
        msrv = await metrics.serve(gw, cfg.metrics.host, cfg.metrics.port)
    except OSError as e:
        await gw.stop()
        raise CannotListen(f"/metrics on {cfg.metrics.host}:{cfg.metrics.port}: {e.strerror or e}") from None
    metrics_port = int(msrv.sockets[0].getsockname()[1])
    logging.getLogger("gateway").info(
        "site %s: LAN %s:%d, upstream %s:%d, metrics http://%s:%d/metrics",
        cfg.site.id, cfg.lan.host, gw.lan_port, cfg.upstream.host, cfg.upstream.port, cfg.metrics.host, metrics_port,
    )  # fmt: skip
    # The ports bound (port 0 in the configuration: ephemeral ones), for whoever started this
    # process: `READY lan=7700 metrics=9700` on stdout, once both listen.
    print(f"READY lan={gw.lan_port} metrics={metrics_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    msrv.close()
    await gw.stop()


def main(argv: list[str] | None = None) -> int:
    devpki.private_by_default()
    p = argparse.ArgumentParser(prog="evedge-gateway", description="EV-charging site gateway")
    p.add_argument("--config", type=Path, help="TOML configuration file (defaults are embedded)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("run", help="run the gateway (the default)")
    sub.add_parser("status", help="print the running gateway's status")
    dv = sub.add_parser(
        "devices",
        help="device keys (M11, M12, M13); changes reach a running gateway without a restart",
        description="list: every device (number, id, status); provision ID --key HEX: install the 32-byte"
        " device key K_dev given as 64 hex digits (the device is accepted at its next Hello, also by a running"
        " gateway); deregister ID: destroy its key, the device is refused by name (M11); hand-over ID: print"
        " its key for the new site and stop accepting it here (M12); register ID: the device may onboard with"
        ' its factory key ([devices] onboarding = "registered", M13); rekey ID: approve one re-key of the'
        " active device (its next factory Hello gets a new key). See docs/gateway.md.",
    )
    dv.add_argument("action", choices=["list", "deregister", "hand-over", "provision", "register", "rekey"])
    dv.add_argument("device_id", nargs="?")
    dv.add_argument("--key", metavar="HEX", help="provision: the device key K_dev, 64 hex digits (32 bytes)")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    try:
        cfg = config_mod.prepare(config_mod.load(args.config))
    except config_mod.ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "status":
        url = f"http://{cfg.metrics.host}:{cfg.metrics.port}/status"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                print(json.dumps(json.loads(r.read()), indent=1))
        except OSError as e:
            print(f"gateway not reachable at {url}: {e}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "devices":
        return _devices(cfg, args)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run(cfg))
    except CannotListen as e:
        print(f"gateway: cannot listen: {e}", file=sys.stderr)
        return 2
    return 0


def _devices(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from gateway.devices import DeviceError, Devices  # noqa: PLC0415

    devs = Devices(cfg.site.devices_path, cfg.devices.factory_seed)
    try:
        if args.action == "list":
            for d in devs.all():
                print(f"{d.idx:6d} {d.device_id} {d.status}")
            return 0
        if not args.device_id:
            print("a device id is needed", file=sys.stderr)
            return 2
        if args.action == "deregister":
            devs.deregister(args.device_id)
        elif args.action == "register":
            devs.register(args.device_id)
        elif args.action == "rekey":
            devs.approve_rekey(args.device_id)
        elif args.action == "hand-over":
            print(devs.hand_over(args.device_id).hex())
        elif args.action == "provision":
            if not args.key:
                print("provision needs --key: the device key, 64 hex digits", file=sys.stderr)
                return 2
            try:
                key = bytes.fromhex(args.key)
            except ValueError:
                raise ValueError(f"--key is not hex: {args.key!r}") from None
            devs.provision(args.device_id, key)
        return 0
    except (DeviceError, ValueError) as e:
        print(f"{args.action}: {e}", file=sys.stderr)
        return 1
    finally:
        devs.close()


if __name__ == "__main__":
    sys.exit(main())
