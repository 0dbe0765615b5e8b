"""The OCPP-J baseline of `tools.bench.gateway`: boards → an OCPP-J relay → an upstream receiver.

The relay is what a user of the `ocpp` PyPI package builds: one `ocpp.v201.ChargePoint` per
board connection on the `websockets` package, an `@on("MeterValues")` handler (the library
parses the CALL and validates the payload against the OCPP 2.0.1 JSON schema), which
forwards the message as an OCPP-J CALL over one WebSocket to the upstream receiver and
answers the board once the upstream has answered (the upstream holds it, as the CSMS
does for a Relay). The content is the benchmark's MeterValues: EVSE, energy, power.

Each part runs in its own process: `python -m tools.bench.ocppj up|relay|boards ...`;
`run()` starts all three and returns the relay's messages per CPU-second, counted from the
moment every board is connected (the same as for this gateway's boards).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import websockets
from ocpp.routing import on
from ocpp.v201 import ChargePoint, call_result

from tools.bench.mix import ISO_TS

ROOT = Path(__file__).resolve().parents[2]


def meter_payload(i: int) -> dict[str, Any]:
    """The content of tools.loadclient's MeterValues (EVSE, energy, power) as OCPP 2.0.1."""
    sampled = [
        {"value": 1_000_000 + i, "measurand": "Energy.Active.Import.Register", "unitOfMeasure": {"unit": "Wh"}},
        {"value": 11_000, "measurand": "Power.Active.Import", "unitOfMeasure": {"unit": "W"}},
    ]
    return {"evseId": 1, "meterValue": [{"timestamp": ISO_TS, "sampledValue": sampled}]}


# ---------------------------------------------------------------- upstream receiver


async def upstream(port: int) -> None:
    async def handler(ws: Any) -> None:
        async for text in ws:
            msg = json.loads(text)
            await ws.send(json.dumps([3, msg[1], {}]))

    async with websockets.serve(handler, "127.0.0.1", port, subprotocols=["ocpp2.0.1"]) as srv:  # type: ignore[list-item]
        print(f"READY port={bound_port(srv)}", flush=True)
        await asyncio.Event().wait()


def bound_port(server: Any) -> int:
    """The port a `websockets.serve` server listens on (asked for 0: an ephemeral one)."""
    return int(server.sockets[0].getsockname()[1])


# ---------------------------------------------------------------- relay


class Upstream:
    """One WebSocket to the upstream receiver, calls matched to results by id."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.waiting: dict[str, asyncio.Future[Any]] = {}
        self.ids = itertools.count()

    async def read(self) -> None:
        async for text in self.ws:
            msg = json.loads(text)
            fut = self.waiting.pop(msg[1], None)
            if fut is not None:
                fut.set_result(msg[2])

    async def call(self, action: str, payload: dict[str, Any]) -> Any:
        uid = str(next(self.ids))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[uid] = fut
        await self.ws.send(json.dumps([2, uid, action, payload]))
        return await fut


class RelayedChargePoint(ChargePoint):  # type: ignore[misc]
    up: Upstream
    count = 0

    @on("MeterValues")  # type: ignore[untyped-decorator]
    async def on_meter_values(self, evse_id: int, meter_value: list[dict[str, Any]], **_: Any) -> Any:
        await self.up.call("MeterValues", {"stationId": self.id, "evseId": evse_id, "meterValue": meter_value})
        RelayedChargePoint.count += 1
        return call_result.MeterValues()


async def relay(port: int, up_port: int) -> None:
    ws_up = await websockets.connect(f"ws://127.0.0.1:{up_port}", subprotocols=["ocpp2.0.1"])  # type: ignore[list-item]
    up = Upstream(ws_up)
    asyncio.get_running_loop().create_task(up.read())

    async def handler(ws: Any) -> None:
        cp = RelayedChargePoint(ws.request.path.strip("/"), ws)
        cp.up = up
        with contextlib.suppress(websockets.ConnectionClosed):
            await cp.start()

    async with websockets.serve(handler, "127.0.0.1", port, subprotocols=["ocpp2.0.1"]) as srv:  # type: ignore[list-item]
        print(f"READY port={bound_port(srv)}", flush=True)
        await asyncio.Event().wait()


# ---------------------------------------------------------------- boards


async def boards(port: int, n: int, per_board: int) -> None:
    """Connects every board first (`T0` printed then, as tools.loadclient does), then sends."""

    async def one(k: int, ws: Any) -> None:
        async with ws:
            for i in range(per_board):
                await ws.send(json.dumps([2, f"{k}-{i}", "MeterValues", meter_payload(i)]))
                reply = json.loads(await ws.recv())
                assert reply[0] == 3, reply

    conns = await asyncio.gather(
        *(websockets.connect(f"ws://127.0.0.1:{port}/CS{k:05d}", subprotocols=["ocpp2.0.1"]) for k in range(n))  # type: ignore[list-item]
    )
    print(f"T0 {time.time()}", flush=True)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(k, ws) for k, ws in enumerate(conns)))
    print(f"RESULT {n * per_board} {time.perf_counter() - t0}", flush=True)


# ---------------------------------------------------------------- driver


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(n_boards: int, per_board: int) -> dict[str, float]:
    """Runs the three processes (the servers on ephemeral ports, read from their READY lines);
    the relay's messages per CPU-second and per second."""
    procs: list[subprocess.Popen[str]] = []

    def spawn(*args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-m", "tools.bench.ocppj", *args], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
        procs.append(p)
        return p

    def ready(p: subprocess.Popen[str]) -> int:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.startswith("READY port="), line
        return int(line.split("=")[1])

    try:
        up_port = ready(spawn("up", "--port", "0"))
        rel = spawn("relay", "--port", "0", "--up", str(up_port))
        relay_port = ready(rel)
        b = spawn("boards", "--port", str(relay_port), "--boards", str(n_boards), "--frames", str(per_board))
        assert b.stdout is not None
        while not b.stdout.readline().startswith("T0 "):  # every board connected: count from here, as
            pass  # tools.bench.gateway does for its boards
        cpu0 = cpu_seconds(rel.pid)
        out, _ = b.communicate()
        cpu = cpu_seconds(rel.pid) - cpu0
        n, secs = next(line.split()[1:] for line in out.splitlines() if line.startswith("RESULT"))
        return {"messages": int(n), "seconds": float(secs), "cpu": cpu, "per_cpu_s": int(n) / cpu}
    finally:
        for p in procs:
            p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=["up", "relay", "boards"])
    p.add_argument("--port", type=int, required=True, help="0: an ephemeral one (up, relay: on their READY line)")
    p.add_argument("--up", type=int, default=0)
    p.add_argument("--boards", type=int, default=100)
    p.add_argument("--frames", type=int, default=50)
    a = p.parse_args()
    if a.role == "up":
        asyncio.run(upstream(a.port))
    elif a.role == "relay":
        asyncio.run(relay(a.port, a.up))
    else:
        asyncio.run(boards(a.port, a.boards, a.frames))


if __name__ == "__main__":
    main()
