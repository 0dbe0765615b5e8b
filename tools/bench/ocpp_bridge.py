"""The OCPP 2.0.1 northbound's cost, side by side with the native uplink in the same run (#17).

    python -m tools.bench.ocpp_bridge [--boards 50] [--frames 200] [--rate 2] [--seconds 6] [--runs 3]

The gateway (`python -m gateway`, synchronous=FULL) runs as its own process; its northbound
peers run in this one: the native uplink's QUIC peer (tests/gwpeer.py) and an OCPP 2.0.1 CSMS
built on the `ocpp` library, validation on (tools/site/ocpp_csms.py); the boards are
tools.loadclient boards in this process too (each says BootNotification first: a station
exists at the OCPP CSMS once its board booted). Prints, per run and as medians:

(1) messages per CPU-second of the gateway: `--boards` × `--frames` MeterValues from the
    first send until the northbound holds every one, divided by the gateway process's CPU
    seconds meanwhile, once with the native uplink alone ([upstream] to the QUIC peer, no
    [ocpp]) and once with the OCPP face alone ([upstream] enabled = false, [ocpp] to the
    CSMS): the same load, the same gateway, in the same invocation;
(2) the latency of a RequestStopTransaction under telemetry load, with both northbounds on:
    the boards send `--rate` MeterValues per second each for `--seconds`, and meanwhile the
    OCPP CSMS's RequestStopTransaction CALL (to the CALLRESULT, through the gateway and the
    board) and the native peer's Command RequestStopTransaction (to its result) alternate
    every 0.1 s, both to the same board: medians and 95th percentiles in ms.
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
from ocpp.v201 import call  # noqa: E402

from gateway.protocol import devpki  # noqa: E402
from gateway.schema import Action, Key  # noqa: E402
from tools.loadclient import Board, dev_key, run_load  # noqa: E402
from tools.site.ocpp_csms import PASSWORD, OcppCsms  # noqa: E402

BOOT: dict[int, Any] = {Key.MODEL: "bench", Key.VENDOR: "evedge", Key.SERIAL: "0", Key.FW_VERSION: "bench"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Run:
    """One gateway process and its northbound peers in this process."""

    def __init__(self, tmp: Path, native: bool, ocpp: bool) -> None:
        self.tmp, self.native, self.ocpp = tmp, native, ocpp
        devpki.private_dir(tmp)
        self.csms = OcppCsms() if ocpp else None
        self.peer: gwpeer.Peer | None = None
        self.server: Any = None
        self.store = gwpeer.Store(str(tmp / "peer.sqlite"))
        self.gw: subprocess.Popen[str] | None = None
        self.lan = 0

    async def start(self) -> None:
        tmp = self.tmp
        up = "[upstream]\nenabled = false\n"
        if self.native:
            qc = gwpeer.server_config(tmp / "gw" / "pki")
            self.peer, self.server = await gwpeer.start("127.0.0.1", 0, self.store, qc)
            up = (f'[upstream]\naddress = "127.0.0.1:{gwpeer.bound_port(self.server)}"\n'
                  "idle_timeout_s = 3.0\nbackoff_max_s = 0.3\n")  # fmt: skip
        oc = ""
        if self.csms is not None:
            await self.csms.start()
            pw = tmp / "ocpp-password"
            devpki.write_private(pw, PASSWORD.encode())
            oc = f'[ocpp]\nurl = "{self.csms.url}"\npassword_file = "{pw}"\ntimeout_s = 10.0\n'
        cfg = tmp / "gateway.toml"
        cfg.write_text(
            f'[site]\ndata_dir = "{tmp / "gw"}"\n[lan]\nlisten = "127.0.0.1:0"\n[metrics]\nlisten = "127.0.0.1:0"\n'
            f'{up}[devices]\ndev_seed = "{gwpeer.SEED.hex()}"\ndev_prefix = "ev-"\n{oc}'
        )
        self.gw = await asyncio.to_thread(gwpeer.start_gateway, cfg)
        self.lan = gwpeer.ports(cfg)["lan"]

    def boards(self, n: int) -> list[Board]:
        return [Board(f"ev-{i:04d}", dev_key(gwpeer.SEED, f"ev-{i:04d}"), "127.0.0.1", self.lan) for i in range(n)]

    async def boot(self, boards: list[Board]) -> None:
        """Every board connected and, with the OCPP face on, booted (its station accepted at the
        OCPP CSMS; the native peer answers no BootNotification and needs none)."""
        for b in boards:
            await b.connect()
            if self.csms is not None:
                await b.request(Action.BOOT_NOTIFICATION, BOOT, timeout=10)

    def delivered(self) -> int:
        """Bench MeterValues the northbound under test holds."""
        if self.csms is not None and not self.native:
            return sum(1 for c in self.csms.calls if c.action == "MeterValues")
        return self.store.count()

    async def close(self) -> None:
        if self.gw is not None:
            self.gw.kill()
            self.gw.wait()
            assert self.gw.stdout is not None
            self.gw.stdout.close()
        if self.server is not None:
            self.server.close()
        if self.csms is not None:
            await self.csms.stop()
        self.store.db.close()


async def throughput(tmp: Path, native: bool, n: int, per_board: int) -> float:
    """Messages per CPU-second of the gateway, first send → the northbound holds them all."""
    r = Run(tmp, native=native, ocpp=not native)
    try:
        await r.start()
        assert r.gw is not None
        boards = r.boards(n)
        await r.boot(boards)
        for b in boards:
            b.close()
        base = r.delivered()
        cpu0 = cpu_seconds(r.gw.pid)
        await run_load(boards, per_board)
        end = time.monotonic() + 300
        while r.delivered() - base < n * per_board:
            if time.monotonic() > end:
                raise TimeoutError(f"only {r.delivered() - base} of {n * per_board} delivered")
            await asyncio.sleep(0.01)
        return n * per_board / (cpu_seconds(r.gw.pid) - cpu0)
    finally:
        await r.close()


async def stop_latency(tmp: Path, n: int, rate: float, seconds: float) -> tuple[list[float], list[float]]:
    """RequestStopTransaction round trips (ms) under telemetry load: (OCPP, native)."""
    r = Run(tmp, native=True, ocpp=True)
    ocpp_ms: list[float] = []
    native_ms: list[float] = []
    try:
        await r.start()
        boards = r.boards(n)
        await r.boot(boards)
        for b in boards:
            b.close()
        assert r.csms is not None and r.peer is not None
        load = asyncio.create_task(run_load(boards, 0, seconds=seconds, rate=rate))
        inner = gwpeer.inner_frame(Action.REQUEST_STOP_TRANSACTION, {Key.TX_ID: 4242})
        await asyncio.sleep(0.5)  # the load under way
        t_end = time.monotonic() + seconds - 1.0
        i = 0
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            if i % 2 == 0:
                res = await r.csms.call("ev-0000", call.RequestStopTransaction(transaction_id="4242"))
                assert res.status == "Accepted", res
                ocpp_ms.append((time.perf_counter() - t0) * 1000)
            else:
                res_n = await r.peer.protocols[-1].command(["ev-0000"], inner)
                assert res_n.body[Key.RESULTS][0][Key.STATUS] == 0, res_n.body  # the board's Accepted
                native_ms.append((time.perf_counter() - t0) * 1000)
            i += 1
            await asyncio.sleep(0.1)
        await load
        return ocpp_ms, native_ms
    finally:
        await r.close()


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.ocpp_bridge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--boards", type=int, default=50)
    ap.add_argument("--frames", type=int, default=200, help="MeterValues per board in (1)")
    ap.add_argument("--rate", type=float, default=2.0, help="MeterValues per second per board in (2)")
    ap.add_argument("--seconds", type=float, default=6.0, help="length of (2)")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    print("command: python -m tools.bench.ocpp_bridge " + " ".join(sys.argv[1:]), flush=True)
    nat: list[float] = []
    ocp: list[float] = []
    o_ms: list[float] = []
    n_ms: list[float] = []
    with tempfile.TemporaryDirectory(prefix="evedge-bench-ocpp-") as d:
        for k in range(a.runs):
            nat.append(await throughput(Path(d) / f"native-{k}", True, a.boards, a.frames))
            ocp.append(await throughput(Path(d) / f"ocpp-{k}", False, a.boards, a.frames))
            o, n = await stop_latency(Path(d) / f"stop-{k}", a.boards, a.rate, a.seconds)
            o_ms += o
            n_ms += n
            print(f"run {k + 1}: (1) native {nat[-1]:,.0f} msg/CPU-s, OCPP {ocp[-1]:,.0f} msg/CPU-s "
                  f"(ratio {nat[-1] / ocp[-1]:.1f}); (2) RequestStopTransaction median OCPP "
                  f"{statistics.median(o):.1f} ms, native {statistics.median(n):.1f} ms", flush=True)  # fmt: skip
    mn, mo = statistics.median(nat), statistics.median(ocp)
    print(f"(1) messages per CPU-second of the gateway, median of {a.runs}: native uplink {mn:,.0f}, "
          f"OCPP 2.0.1 face {mo:,.0f}; native ÷ OCPP {mn / mo:.1f}×")  # fmt: skip
    print(f"(2) RequestStopTransaction under {a.boards} boards × {a.rate:g} MeterValues/s: OCPP median "
          f"{statistics.median(o_ms):.1f} ms, p95 {pct(o_ms, 0.95):.1f} ms ({len(o_ms)}); native median "
          f"{statistics.median(n_ms):.1f} ms, p95 {pct(n_ms, 0.95):.1f} ms ({len(n_ms)})")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
