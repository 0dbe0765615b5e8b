"""Foundation benchmark: the Rust core against the pure-Python path, and wire bytes against OCPP-J.

    python -m tools.bench.core [--frames 200000] [--rounds 5] [--batch 1024]

Prints (1) frames/s for decode + tag verify + schema check + enqueue through the Rust
core (`Receiver.ingest`, one core) and through the pure-Python path (msgpack + hmac +
heapq, `tools.bench.pypath`) on the same frames, rounds alternating, medians and their
ratio; (2) wire bytes per message of the typical mix against the same content as OCPP
2.0.1 JSON built and validated by the `ocpp` package.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence

from gateway import _core as core
from gateway.schema import Action, Key, Kind, Priority

from . import pypath
from .mix import MIX, ocpp_wire_bytes

K_DEV = bytes(range(32))
NB, NG = bytes(16), bytes(range(16))
TS = 30_000_000


def make_frames(n: int) -> tuple[bytes, list[bytes]]:
    """n MeterValues frames of about 100 bytes, sealed by the core's Sender, seq 1…n."""
    k_up = core.derive_keys(K_DEV, NB, NG)[0]
    tx = core.Sender(k_up)
    frames = []
    for i in range(n):
        body = {
            Key.EVSE: 1 + i % 4,
            Key.ENERGY_WH: 1_000_000 + i,
            Key.POWER_W: 11_000 + i % 500,
            Key.CURRENT_MA: 16_000,
            Key.VOLTAGE_DV: 2300,
            Key.SOC: 40 + i % 60,
            Key.TX_ID: 4242 + i % 8,
            Key.TIME: TS + i // 10,
            Key.SAMPLES: [{Key.MEASURAND: 2, Key.VALUE: 230.5, Key.PHASES: 1}, {Key.MEASURAND: 3, Key.VALUE: 0.1}],
        }
        frames.append(tx.seal(Kind.EVENT, 100_000 + i, Priority.TELEMETRY, TS + i // 10, Action.METER_VALUES, body))
    return k_up, frames


def run_rust(key: bytes, frames: Sequence[bytes], batch: int) -> float:
    rx = core.Receiver(key)
    q = core.PriorityQueue(max_items=batch * 2, max_bytes=64 << 20)
    spent = 0.0
    for i in range(0, len(frames), batch):
        chunk = list(frames[i : i + batch])
        t0 = time.perf_counter()
        status = rx.ingest(chunk, q, 7)
        spent += time.perf_counter() - t0
        if status.count(0) != len(chunk):
            raise SystemExit(f"rust path rejected frames: {set(status)}")
        q.pop_batch(len(chunk))
    return len(frames) / spent


def run_python(key: bytes, frames: Sequence[bytes], batch: int) -> float:
    rx = pypath.PyReceiver(key)
    q = pypath.PyQueue()
    spent = 0.0
    for i in range(0, len(frames), batch):
        chunk = list(frames[i : i + batch])
        t0 = time.perf_counter()
        status = pypath.ingest(rx, q, chunk)
        spent += time.perf_counter() - t0
        if status.count(0) != len(chunk):
            raise SystemExit(f"python path rejected frames: {set(status)}")
        q.pop_batch(len(chunk))
    return len(frames) / spent


def wire_table() -> list[tuple[str, int, int, int, float]]:
    """A board some hours into its life: counters in the hundreds, message ids above 65535."""
    k_up, _, e_up, _ = core.derive_keys(K_DEV, NB, NG)
    rows = []
    seq, msg_id = 300, 70_000

    def enc(field: int, data: bytes) -> bytes:
        return core.aes_ctr(e_up, seq, field, data)

    for m in MIX:
        frame = core.encode(m.kind, seq, msg_id, m.prio, TS, m.action, m.body(enc), k_up)
        ours = len(frame) + 2  # with the stream's length prefix
        text, on_wire = ocpp_wire_bytes(m.ocpp)
        rows.append((m.name, ours, text, on_wire, on_wire / ours))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.core", description=__doc__)
    ap.add_argument("--frames", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args(argv)

    key, frames = make_frames(args.frames)
    size = statistics.median(len(f) for f in frames)
    rust, py, ratios = [], [], []
    py_frames = frames[
        : max(args.batch, args.frames // 10)
    ]  # the slow path gets a tenth: same frames, same kind of work
    for _ in range(args.rounds):
        r = run_rust(key, frames, args.batch)
        p = run_python(key, py_frames, args.batch)
        rust.append(r)
        py.append(p)
        ratios.append(r / p)
    print(f"ingest: decode + tag verify + schema check + enqueue, {len(frames)} frames of median {size:.0f} bytes,")
    print(f"batches of {args.batch}, {args.rounds} rounds alternating, one core (cpus: {os.cpu_count()})")
    for label, rates in (("rust core  ", rust), ("pure python", py)):
        med, lo, hi = statistics.median(rates), min(rates), max(rates)
        print(f"  {label} median {med:>12,.0f} frames/s   (min {lo:,.0f}, max {hi:,.0f})")
    print(f"  ratio       median {statistics.median(ratios):>12.1f} x")
    print()
    print("wire bytes per message (ours: frame + 2-byte length prefix, 16-byte tag included;")
    print("OCPP-J: JSON text from the `ocpp` package, and with the WebSocket header of a masked client frame)")
    print(f"  {'message':<20}{'ours':>6}{'OCPP-J':>9}{'+ws':>7}{'ratio':>8}")
    for name, ours, text, on_wire, ratio in wire_table():
        print(f"  {name:<20}{ours:>6}{text:>9}{on_wire:>7}{ratio:>7.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
