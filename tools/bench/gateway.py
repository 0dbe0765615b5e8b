"""End-to-end benchmark of the gateway: boards → verified → durable → QUIC → upstream ack.

    python -m tools.bench.gateway [--boards 500] [--frames 200] [--seconds 4]

The gateway runs as its own process (`python -m gateway`, synchronous=FULL); the boards
(tools.loadclient) and the upstream peer (tests/gwpeer.py) run in this process. Prints:
(1) sustained frames/s end to end and the gateway's CPU seconds per 1000 frames;
(2) latency of urgent frames (board send → stored at the peer) while bulk saturates the
uplink, with the priority scheduler and with plain FIFO, in the same run;
(3) after an outage: time from the link's return to the first urgent frame relayed, and
the drain rate against the ingest rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import gwpeer  # noqa: E402

from tools.loadclient import Board, dev_key, run_load  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Rig:
    def __init__(self, tmp: Path, fifo: bool = False) -> None:
        self.tmp = tmp
        self.udp, self.lan, self.metrics = gwpeer.free_udp_port(), gwpeer.free_tcp_port(), gwpeer.free_tcp_port()
        tmp.mkdir(parents=True, exist_ok=True)
        self.cfg = tmp / "gateway.toml"
        self.cfg.write_text(
            f'[site]\ndata_dir = "gw"\n[lan]\nlisten = "127.0.0.1:{self.lan}"\n[metrics]\nlisten = "127.0.0.1:{self.metrics}"\n'  # noqa: E501
            f'[upstream]\naddress = "127.0.0.1:{self.udp}"\nidle_timeout_s = 3.0\nbackoff_min_s = 0.02\nbackoff_max_s = 0.1\n'  # noqa: E501
            f"fifo = {'true' if fifo else 'false'}\n"
            f'[devices]\ndev_seed = "{gwpeer.SEED.hex()}"\ndev_prefix = "ev-"\n'
        )
        self.proc: subprocess.Popen[str] | None = None
        self.store = gwpeer.Store(str(tmp / "peer.sqlite"))
        self.peer: gwpeer.Peer | None = None
        self.server: Any = None

    def start_gateway(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(self.cfg)], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().startswith("READY")

    async def start_peer(self) -> gwpeer.Peer:
        qc = gwpeer.server_config(self.tmp / "gw" / "pki")
        self.peer, self.server = await gwpeer.start("127.0.0.1", self.udp, self.store, qc)
        return self.peer

    def boards(self, n: int, prefix: str = "ev-") -> list[Board]:
        return [
            Board(f"{prefix}{i:05d}", dev_key(gwpeer.SEED, f"{prefix}{i:05d}"), "127.0.0.1", self.lan) for i in range(n)
        ]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            assert self.proc.stdout is not None
            self.proc.stdout.close()


async def wait_count(store: gwpeer.Store, n: int, timeout: float = 120) -> float:
    end = time.perf_counter() + timeout
    while store.count() < n:
        if time.perf_counter() > end:
            raise TimeoutError(f"peer holds {store.count()} of {n}")
        await asyncio.sleep(0.02)
    return time.perf_counter()


async def throughput(tmp: Path, n_boards: int, per_board: int) -> None:
    rig = Rig(tmp)
    rig.start_gateway()
    try:
        await rig.start_peer()
        await asyncio.sleep(0.5)
        assert rig.proc is not None
        boards = rig.boards(n_boards)
        cpu0 = cpu_seconds(rig.proc.pid)
        t0 = time.perf_counter()
        r = await run_load(boards, per_board, window=128, batch=64)
        t1 = await wait_count(rig.store, r.sent)
        cpu = cpu_seconds(rig.proc.pid) - cpu0
        print(f"[1] {n_boards} boards x {per_board} MeterValues: {r.sent} frames")
        print(f"    ingress acked (durable): {r.acked / r.seconds:,.0f} frames/s")
        print(f"    end to end (stored + acked upstream): {r.sent / (t1 - t0):,.0f} frames/s over {t1 - t0:.2f} s")
        print(f"    gateway CPU: {cpu:.2f} s = {cpu / r.sent * 1000 * 1000:.1f} ms per 1000 frames;"
              f" {r.sent / cpu:,.0f} frames per CPU-second")  # fmt: skip
    finally:
        rig.close()


async def urgent_latency(tmp: Path, fifo: bool, seconds: float) -> list[float]:
    rig = Rig(tmp, fifo=fifo)
    rig.start_gateway()
    lat: list[float] = []
    try:
        peer = await rig.start_peer()
        sent_at: dict[tuple[str, int], float] = {}

        def arrived(prio: int, rows: list[tuple[Any, ...]]) -> None:
            now = time.perf_counter()
            for r in rows:
                t = sent_at.pop((r[1], r[2]), None)
                if t is not None:
                    lat.append(now - t)

        peer.on_relay_frame = arrived
        await asyncio.sleep(0.5)
        bulk = rig.boards(20, "ev-b")
        urgent = rig.boards(1, "ev-u")[0]
        for b in [*bulk, urgent]:
            await b.connect()
        stop = time.perf_counter() + seconds

        async def saturate(b: Board) -> None:
            while time.perf_counter() < stop:
                if len(b.unacked) < 64:
                    b.send("log", 8)
                await asyncio.sleep(0.001)

        async def poke() -> None:
            await asyncio.sleep(0.5)
            while time.perf_counter() < stop:
                for i in urgent.send("fault", 1):
                    sent_at[urgent.device_id, i] = time.perf_counter()
                await asyncio.sleep(0.02)

        await asyncio.gather(poke(), *(saturate(b) for b in bulk))
        await asyncio.sleep(1.0)
        for b in [*bulk, urgent]:
            b.close()
    finally:
        rig.close()
    return lat


async def outage(tmp: Path, n_boards: int, per_board: int) -> None:
    rig = Rig(tmp)
    rig.start_gateway()
    try:
        boards = rig.boards(n_boards)
        r = await run_load(boards, per_board, window=128, batch=64)
        ingest = r.acked / r.seconds
        u = rig.boards(1, "ev-u")[0]
        await u.connect()
        u.send("fault", 1)
        while u.unacked:
            await asyncio.sleep(0.005)
        first: list[float] = []
        t0 = time.perf_counter()
        peer = await rig.start_peer()
        peer.on_relay_frame = lambda prio, rows: first.append(time.perf_counter()) if prio == 0 and not first else None
        t1 = await wait_count(rig.store, r.sent + 1)
        print(f"[3] outage: {r.sent + 1} frames held while upstream was away (ingest {ingest:,.0f} frames/s)")
        print(
            f"    first urgent frame relayed {((first[0] if first else t1) - t0) * 1000:.0f} ms after the peer came up"
            " (includes the gateway's reconnect backoff and the QUIC handshake)"
        )
        drain = (r.sent + 1) / (t1 - t0)
        print(f"    drain: {drain:,.0f} frames/s = {drain / ingest:.1f}x the ingest rate")
    finally:
        rig.close()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--boards", type=int, default=500)
    p.add_argument("--frames", type=int, default=200, help="MeterValues per board")
    p.add_argument("--seconds", type=float, default=4.0, help="bulk saturation time per latency run")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        await throughput(tmp / "t", a.boards, a.frames)
        res = {}
        for fifo in (False, True):
            res[fifo] = await urgent_latency(tmp / f"l{int(fifo)}", fifo, a.seconds)
        print(
            "[2] urgent FaultReport latency, board send -> stored at the peer, while 20 boards saturate with 1 KB LogChunks"  # noqa: E501
        )
        for fifo, lat in res.items():
            name = "plain FIFO" if fifo else "priority "
            if lat:
                print(f"    {name}: n={len(lat)} p50 {statistics.median(lat) * 1000:.1f} ms  p99 {pct(lat, 0.99):.1f} ms"  # noqa: E501
                      f"  max {max(lat) * 1000:.1f} ms")  # fmt: skip
            else:
                print(f"    {name}: no urgent frame arrived")
        await outage(tmp / "o", a.boards, a.frames)


if __name__ == "__main__":
    asyncio.run(main())
