"""Legitimate boards' ack latency while the LAN server is attacked (figures, not a test).

    python -m tools.bench.lan_attack [--boards 20] [--rate 10] [--seconds 5] [--idle 1500] [--flooders 4]

Runs the gateway (`python -m gateway`, RLIMIT_NOFILE 1024 like a default shell), then twice
for `--seconds`: boards (tools.loadclient, 127.0.0.1) each sending `--rate` events/s, first
alone, then while an attacker process (this module, `--attacker`) holds `--idle` idle
connections from 127.0.0.2–9 (each reopened when closed), dribbles frames byte by byte and
runs `--flooders` boards with valid keys sending bad frames and reconnecting. Prints the
boards' send → ack latency (p50, p99, max) of both runs, the events acked, and the gateway's
closures by cause (/status "lan").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from gateway import _core
from gateway.schema import Action, Key, Kind
from tools.loadclient import Board, HelloRefused, dev_key

ROOT = Path(__file__).resolve().parents[2]
SEED = bytes(range(32))


_LIMITED = (
    "import resource, runpy, sys; n = int(sys.argv.pop(1)); resource.setrlimit(resource.RLIMIT_NOFILE, (n, n));"
    " runpy.run_module('gateway', run_name='__main__', alter_sys=True)"
)


def gateway_cmd(cfg: Path, nofile: int) -> list[str]:
    """`python -m gateway --config cfg` with RLIMIT_NOFILE `nofile` (soft and hard)."""
    return [sys.executable, "-c", _LIMITED, str(nofile), "--config", str(cfg)]


def start_gateway(tmp: Path, nofile: int) -> tuple[subprocess.Popen[str], int, int]:
    cfg = tmp / "g.toml"
    cfg.write_text(
        '[site]\ndata_dir = "gw"\n[lan]\nlisten = "127.0.0.1:0"\n[metrics]\nlisten = "127.0.0.1:0"\n'
        f'[upstream]\nenabled = false\n[devices]\ndev_seed = "{SEED.hex()}"\ndev_prefix = "ev-"\n'
    )
    with (tmp / "gateway.log").open("w") as err:
        p = subprocess.Popen(gateway_cmd(cfg, nofile), stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("READY"):
        raise SystemExit(f"gateway did not start: {(tmp / 'gateway.log').read_text()}")
    lan, met = (int(x.split("=")[1]) for x in line.split()[1:])
    return p, lan, met


async def boards_run(port: int, n: int, rate: float, seconds: float, tag: str) -> tuple[list[float], int, int]:
    boards = [Board(f"ev-{tag}{i:04d}", dev_key(SEED, f"ev-{tag}{i:04d}"), "127.0.0.1", port) for i in range(n)]
    await asyncio.gather(*(b.connect() for b in boards))
    sent = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for b in boards:
            b.send("meter", 1)
            sent += 1
        await asyncio.sleep(1 / rate)
    stop = time.perf_counter() + 30
    while any(b.unacked for b in boards) and time.perf_counter() < stop:
        await asyncio.sleep(0.01)
    lat = [x for b in boards for xs in b.latencies.values() for x in xs]
    acked = sum(b.acked for b in boards)
    for b in boards:
        b.close()
    return lat, sent, acked


async def attacker(port: int, idle: int, flooders: int, seconds: float) -> None:
    end = time.perf_counter() + seconds

    async def hold(src: str) -> None:
        while time.perf_counter() < end:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
            except OSError:
                await asyncio.sleep(0.05)
                continue
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(r.read(), max(0.01, end - time.perf_counter()))
            w.close()
            await asyncio.sleep(0.05)

    async def dribble(src: str) -> None:
        while time.perf_counter() < end:
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
                w.write((4000).to_bytes(2, "big"))
                while time.perf_counter() < end and not w.is_closing():
                    w.write(b"\0")
                    await w.drain()
                    await asyncio.sleep(0.1)
                w.close()
            except OSError:
                await asyncio.sleep(0.05)

    junk = _core.encode(Kind.EVENT, 1, 1, 2, 0, Action.METER_VALUES, {Key.EVSE: 1}, bytes(32))
    junk = (len(junk).to_bytes(2, "big") + junk) * 500

    async def flood(i: int) -> None:
        did = f"ev-flood{i:03d}"
        while time.perf_counter() < end:
            b = Board(did, dev_key(SEED, did), "127.0.0.1", port)
            try:
                await b.connect()
                b.send_raw(junk)
                while b.connected.is_set() and time.perf_counter() < end:
                    await asyncio.sleep(0.02)
            except (OSError, HelloRefused, asyncio.IncompleteReadError):
                pass
            b.close()
            await asyncio.sleep(0.1)

    await asyncio.gather(
        *(hold(f"127.0.0.{2 + i % 8}") for i in range(idle)),
        *(dribble(f"127.0.0.{10 + i % 4}") for i in range(20)),
        *(flood(i) for i in range(flooders)),
    )


def pcts(xs: list[float]) -> str:
    if not xs:
        return "no acks"
    xs = sorted(xs)

    def p(q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

    mean = statistics.mean(xs) * 1000
    return f"p50 {p(0.5):.2f} ms  p99 {p(0.99):.2f} ms  max {xs[-1] * 1000:.2f} ms  (mean {mean:.2f})"


def status(met: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{met}/status", timeout=10) as r:
        return dict(json.loads(r.read()))


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--boards", type=int, default=20)
    a.add_argument("--rate", type=float, default=10.0, help="events/s per board")
    a.add_argument("--seconds", type=float, default=5.0)
    a.add_argument("--idle", type=int, default=1500, help="idle connections the attacker holds")
    a.add_argument("--flooders", type=int, default=4)
    a.add_argument("--nofile", type=int, default=1024, help="the gateway's RLIMIT_NOFILE")
    a.add_argument("--attacker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = a.parse_args()
    if args.attacker:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.idle + 512, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        asyncio.run(attacker(args.attacker, args.idle, args.flooders, args.seconds + 3))
        return
    with tempfile.TemporaryDirectory() as d:
        gw, lan, met = start_gateway(Path(d), args.nofile)
        try:
            lat, sent, acked = asyncio.run(boards_run(lan, args.boards, args.rate, args.seconds, "a"))
            print(f"no attack:     {acked}/{sent} acked; {pcts(lat)}")
            atk = subprocess.Popen([sys.executable, "-m", "tools.bench.lan_attack", "--attacker", str(lan),
                                    "--idle", str(args.idle), "--flooders", str(args.flooders),
                                    "--seconds", str(args.seconds)], cwd=ROOT)  # fmt: skip
            time.sleep(2)  # the attacker's connections are up
            lat, sent, acked = asyncio.run(boards_run(lan, args.boards, args.rate, args.seconds, "b"))
            print(f"under attack:  {acked}/{sent} acked; {pcts(lat)}")
            s = status(met)["lan"]
            print(f"gateway: max_connections {s['max_connections']}, now {s['connections']}, closed {s['closed']}")
            atk.wait(60)
            lines = len((Path(d) / "gateway.log").read_text().splitlines())
            print(f"gateway log: {lines} lines")
        finally:
            gw.terminate()
            gw.wait(10)


if __name__ == "__main__":
    main()
