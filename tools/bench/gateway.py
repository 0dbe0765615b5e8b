"""End-to-end benchmark of the gateway: boards → verified → durable → QUIC → upstream ack.

    python -m tools.bench.gateway [--boards 500] [--frames 200] [--seconds 4]

The gateway (`python -m gateway`, synchronous=FULL), the boards (tools.loadclient) and the
upstream peer (tests/gwpeer.py) each run in their own process. Prints:
(1) sustained frames/s end to end and the gateway's CPU seconds per 1000 frames;
(2) latency of urgent frames while bulk saturates the uplink, with the priority scheduler and
with plain FIFO, in the same run: board send → receipt at the peer, and ingress at the
gateway (its /urgent) → receipt (the issue's target), with the gateway's split;
(3) after an outage: time from the link's return to the first urgent frame relayed, and
the drain rate against the ingest rate, (a) for an operator's reading: boards keep sending
at a stated rate (500 boards, one MeterValues each per 1 s and per 0.1 s) through an outage
of `--outage` seconds and after it, and (b) at saturation: the backlog of run [1]'s load,
drained with no ingest, against that load's ingest rate;
(4) messages per CPU-second of an OCPP-J relay (tools/bench/ocppj.py) against this gateway's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import gwpeer  # noqa: E402

from tools.bench import ocppj, shaped  # noqa: E402
from tools.loadclient import Board, dev_key  # noqa: E402

LOAD_NICE = 10
"""Niceness of the load generator of the latency runs (the simulated bulk boards)."""


def udp_rcvbuf_errors() -> int:
    """The kernel's count of UDP datagrams dropped for a full receive buffer (all sockets)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Rig:
    """One gateway (`python -m gateway`), its upstream peer (tests/gwpeer.py) and load
    clients (tools.loadclient), each in its own process, so that none distorts another's
    measurement; this process only starts them and reads the peer's store."""

    def __init__(self, tmp: Path, fifo: bool = False, extra: str = "", peer_host: str = "127.0.0.1") -> None:
        """`peer_host`: another address than loopback puts the peer in the shaped link's
        namespace (tools/bench/shaped.py)."""
        self.tmp = tmp
        self.peer_host = peer_host
        self.fifo, self.extra = fifo, extra
        # Every port is ephemeral, read back from the first start of its process (the peer's
        # READY line, the gateway's); a restart binds the same one again (gwpeer.start_gateway).
        self.udp = self.lan = self.metrics = 0
        tmp.mkdir(parents=True, exist_ok=True)
        self.cfg = tmp / "gateway.toml"
        self.db = tmp / "peer.sqlite"
        self.procs: list[subprocess.Popen[str]] = []
        self.gateway: subprocess.Popen[str] | None = None
        self.peer: subprocess.Popen[str] | None = None
        self._store: gwpeer.Store | None = None

    def _spawn(self, args: list[str], nice: int = 0, prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
        cmd = [*prefix, sys.executable, *args] if not nice else ["nice", "-n", str(nice), sys.executable, *args]
        proc = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def start_gateway(self) -> None:
        """The gateway, configured with the peer's port: a peer not started yet (the upstream is
        away when the gateway starts) is started and stopped first, for the port it comes back on."""
        if not self.udp:
            self.start_peer()
            self.stop_peer()
        if not self.cfg.exists():  # LAN and metrics on port 0: start_gateway pins the bound ones here
            self.cfg.write_text(
                '[site]\ndata_dir = "gw"\n[lan]\nlisten = "127.0.0.1:0"\n[metrics]\nlisten = "127.0.0.1:0"\n'
                f'[upstream]\naddress = "{self.peer_host}:{self.udp}"\nidle_timeout_s = 3.0\nbackoff_min_s = 0.02\nbackoff_max_s = 0.1\nconnect_timeout_s = 0.5\n'  # noqa: E501
                f"fifo = {'true' if self.fifo else 'false'}\n{self.extra}"
                f'[devices]\ndev_seed = "{gwpeer.SEED.hex()}"\ndev_prefix = "ev-"\n'
            )
        self.gateway = gwpeer.start_gateway(self.cfg)
        self.procs.append(self.gateway)
        ports = gwpeer.ports(self.cfg)
        self.lan, self.metrics = ports["lan"], ports["metrics"]

    def start_peer(self) -> float:
        """Starts the peer (on an ephemeral port the first time, read back; then on that one
        again); returns the time (time.time()) it is listening. It makes the site's dev CA in the
        gateway's PKI folder (the gateway then uses it)."""
        prefix = () if self.peer_host == "127.0.0.1" else tuple(shaped.netns_exec())
        args = ["tests/gwpeer.py", "--host", self.peer_host, "--port", str(self.udp), "--db", str(self.db),
                "--pki", str(self.tmp / "gw" / "pki")]  # fmt: skip
        self.peer = self._spawn(args, prefix=prefix)
        assert self.peer.stdout is not None
        line = self.peer.stdout.readline()
        assert line.startswith("READY port="), line
        self.udp = int(line.split("=")[1])
        return time.time()

    @property
    def store(self) -> gwpeer.Store:
        if self._store is None:
            self._store = gwpeer.Store(str(self.db))
        return self._store

    def load(self, n: int, *, prefix: str = "ev-", frames: int = 0, kind: str = "meter", window: int = 128,
             batch: int = 64, seconds: float | None = None, rate: float | None = None,
             nice: int = 0) -> subprocess.Popen[str]:  # fmt: skip
        args = ["-m", "tools.loadclient", "--port", str(self.lan), "--boards", str(n), "--frames", str(frames),
                "--kind", kind, "--window", str(window), "--batch", str(batch), "--dev-seed", gwpeer.SEED.hex(),
                "--prefix", prefix]  # fmt: skip
        if seconds is not None:
            args += ["--seconds", str(seconds)]
        if rate is not None:
            args += ["--rate", str(rate)]
        return self._spawn(args, nice)

    def status(self) -> dict[str, Any]:
        """The gateway's /status."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/status", timeout=5) as r:
            out: dict[str, Any] = json.loads(r.read())
        return out

    def urgent(self) -> list[dict[str, Any]]:
        """The gateway's /urgent: timings of the last urgent frames."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/urgent", timeout=5) as r:
            out: list[dict[str, Any]] = json.loads(r.read())
        return out

    def stop_peer(self) -> None:
        assert self.peer is not None
        self.peer.kill()
        self.peer.wait()

    def board(self, device_id: str) -> Board:
        return Board(device_id, dev_key(gwpeer.SEED, device_id), "127.0.0.1", self.lan)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
        if self._store is not None:
            self._store.db.close()


async def load_result(
    proc: subprocess.Popen[str], timeout: float = 120, keep: bool = False
) -> tuple[float, int, int, float]:
    """(T0, sent, acked, seconds) of a load client, read from its output once it exits.
    `keep`: the process is not reaped (its CPU time stays readable; the caller waits)."""
    if keep:
        assert proc.stdout is not None
        try:
            out = await asyncio.wait_for(asyncio.to_thread(proc.stdout.read), timeout)
        except TimeoutError:
            proc.kill()
            raise
    else:
        try:
            out, _ = await asyncio.to_thread(proc.communicate, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = await asyncio.to_thread(proc.communicate)
    t0, res = 0.0, (0, 0, 0.0)
    for line in out.splitlines():
        if line.startswith("T0 "):
            t0 = float(line.split()[1])
        elif line.startswith("RESULT "):
            _, a, b, c = line.split()
            res = (int(a), int(b), float(c))
    return t0, *res


async def first_send(proc: subprocess.Popen[str]) -> float:
    """Reads a load client's output up to its T0 line (every board connected, first send
    next); returns T0."""
    assert proc.stdout is not None
    while True:
        line = await asyncio.to_thread(proc.stdout.readline)
        if not line:
            raise RuntimeError("the load client ended before its first send")
        if line.startswith("T0 "):
            return float(line.split()[1])


def wait_count(store: gwpeer.Store, n: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while store.count() < n:
        if time.monotonic() > end:
            raise TimeoutError(f"peer holds {store.count()} of {n}")
        time.sleep(0.02)


def last_arrival(store: gwpeer.Store) -> float:
    return float(store.db.execute("SELECT max(at) FROM frames").fetchone()[0])


async def throughput(tmp: Path, n_boards: int, per_board: int) -> dict[str, float]:
    rig = Rig(tmp)
    try:
        rig.start_peer()
        rig.start_gateway()
        await asyncio.sleep(0.5)
        assert rig.gateway is not None
        assert rig.peer is not None
        cpu_c = cpu_seconds(rig.gateway.pid)
        load = rig.load(n_boards, frames=per_board)
        t0 = await first_send(load)
        cpu0, peer0, load0 = (cpu_seconds(p.pid) for p in (rig.gateway, rig.peer, load))
        _, sent, acked, secs = await load_result(load, keep=True)
        load_cpu = cpu_seconds(load.pid) - load0
        load.wait()
        wait_count(rig.store, sent)
        t1 = last_arrival(rig.store)
        cpu = cpu_seconds(rig.gateway.pid) - cpu0
        peer_cpu = cpu_seconds(rig.peer.pid) - peer0
        r = {"sent": sent, "ingress": acked / secs, "e2e": sent / (t1 - t0), "e2e_s": t1 - t0, "cpu": cpu}
        print(f"[1] {n_boards} boards x {per_board} MeterValues: {sent} frames")
        print(f"    (the boards' connections and Hellos before the first send: {cpu0 - cpu_c:.2f} gateway CPU-s,"
              " not counted below)")  # fmt: skip
        print(f"    ingress acked (durable): {r['ingress']:,.0f} frames/s")
        print(f"    end to end (first send -> last frame at the peer): {r['e2e']:,.0f} frames/s over {t1 - t0:.2f} s")
        print(f"    gateway CPU: {cpu:.2f} s = {cpu / sent * 1e6:.1f} ms per 1000 frames;"
              f" {sent / cpu:,.0f} frames per CPU-second")  # fmt: skip
        print(f"    the 2 cores' other users meanwhile: load client {load_cpu:.2f} CPU-s, upstream peer"
              f" {peer_cpu:.2f} CPU-s (wall {t1 - t0:.2f} s)")  # fmt: skip
        return r
    finally:
        rig.close()


async def urgent_latency(tmp: Path, fifo: bool, seconds: float, extra: str = "", peer_host: str = "127.0.0.1",
                         label: str = "") -> dict[str, list[float]]:  # fmt: skip
    """Urgent FaultReports of one board, one per 20 ms, while 20 bulk boards saturate the
    uplink. Per frame, in seconds: `send` board send → receipt at the peer; `ingress`
    ingress at the gateway (the read of the board's socket, from the gateway's /urgent) →
    receipt (the peer parsed the Relay carrying it); and the gateway's split of ingress →
    `dispatch` → `relay` (handed to aioquic) → `sent` (transmit returned), then `wire`
    sent → receipt. Wall-clock differences are across processes of one machine."""
    rig = Rig(tmp, fifo=fifo, extra=extra, peer_host=peer_host)
    try:
        rig.start_peer()
        rig.start_gateway()
        await asyncio.sleep(0.5)
        # The bulk boards stand for 20 boards of their own: their simulation must not take
        # the gateway's CPU (nice 10 for the load generator only; docs/performance.md).
        bulk = rig.load(20, prefix="ev-b", kind="log", window=64, batch=8, seconds=seconds + 0.5, nice=LOAD_NICE)
        urgent = rig.board("ev-u0000")
        await urgent.connect()
        await asyncio.sleep(0.5)
        sent_at: dict[int, float] = {}
        drops0 = udp_rcvbuf_errors()
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            t = time.time()
            for i in urgent.send("fault", 1):
                sent_at[i] = t
            await asyncio.sleep(0.02)
        _, _, bulk_acked, bulk_s = await load_result(bulk, timeout=seconds + 10)
        mode = label or ("FIFO" if fifo else "priority")
        print(f"    ({mode}: bulk LogChunks acked durable: {bulk_acked / max(bulk_s, 1e-9):,.0f}/s;"
              f" UDP datagrams dropped for a full receive buffer: {udp_rcvbuf_errors() - drops0})")  # fmt: skip
        end = time.monotonic() + 30
        while urgent.unacked and time.monotonic() < end:
            await asyncio.sleep(0.01)
        # Urgent frames queued behind a backlog (FIFO over a slow link) may still be on their way.
        q_u = "SELECT count(*) FROM frames WHERE device = 'ev-u0000'"
        end = time.monotonic() + 20
        while rig.store.db.execute(q_u).fetchone()[0] < len(sent_at) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        urgent.close()
        n_b, b0, b1 = rig.store.db.execute(
            "SELECT count(*), min(at), max(at) FROM frames WHERE device LIKE 'ev-b%'"
        ).fetchone()
        print(f"    ({mode}: bulk LogChunks at the upstream: {n_b / max((b1 or 0) - (b0 or 0), 1e-9):,.0f}/s;"
              f" urgent frames arrived: {rig.store.db.execute(q_u).fetchone()[0]} of {len(sent_at)})")  # fmt: skip
        acks = urgent.latencies.get(0, [])
        if acks:
            print(f"    ({mode}: urgent acked durable to the board: p50"
                  f" {statistics.median(acks) * 1000:.1f} ms, p99 {pct(acks, 0.99):.1f} ms)")  # fmt: skip
        trace = {e["msg_id"]: e for e in await asyncio.to_thread(rig.urgent) if e["device"] == "ev-u0000"}
        rows = rig.store.db.execute("SELECT msg_id, at FROM frames WHERE device = 'ev-u0000'").fetchall()
        out: dict[str, list[float]] = {k: [] for k in ("send", "ingress", "dispatch", "relay", "sent", "wire")}
        for m, at in rows:
            if m not in sent_at or m not in trace:
                continue
            e = trace[m]
            out["send"].append(at - sent_at[m])
            out["ingress"].append(at - e["ingress"])
            if e["ingress_to_sent_ms"] is not None:
                out["dispatch"].append(e["dispatch_ms"] / 1000)
                out["relay"].append(e["relay_ms"] / 1000)
                out["sent"].append(e["send_ms"] / 1000)
                out["wire"].append(at - e["ingress"] - e["ingress_to_sent_ms"] / 1000)
        return out
    finally:
        rig.close()


async def outage(tmp: Path, n_boards: int, per_board: int) -> dict[str, float]:
    rig = Rig(tmp)
    try:
        rig.start_gateway()
        _, sent, acked, secs = await load_result(rig.load(n_boards, frames=per_board))
        ingest = acked / secs
        u = rig.board("ev-u0000")
        await u.connect()
        u.send("fault", 1)
        while u.unacked:
            await asyncio.sleep(0.005)
        u.close()
        t0 = rig.start_peer()
        wait_count(rig.store, sent + 1)
        first = rig.store.db.execute("SELECT at FROM frames WHERE device = 'ev-u0000'").fetchone()[0]
        t1 = last_arrival(rig.store)
        drain = (sent + 1) / (t1 - t0)
        print(f"[3b] outage at saturation: {sent + 1} frames held while upstream was away (run [1]'s load,"
              f" ingest {ingest:,.0f} frames/s), drained with no ingest")  # fmt: skip
        print(f"    first urgent frame relayed {(first - t0) * 1000:.0f} ms after the peer came up"
              " (includes the gateway's reconnect backoff and the QUIC handshake)")  # fmt: skip
        print(f"    drain at saturation: {drain:,.0f} frames/s = {drain / ingest:.1f}x the saturated ingest rate")
        return {"first_ms": (first - t0) * 1000, "drain": drain, "ingest": ingest}
    finally:
        rig.close()


async def outage_at_rate(tmp: Path, n_boards: int, rate: float, outage_s: float, warm_s: float = 2.0,
                         after_s: float = 3.0) -> dict[str, float]:  # fmt: skip
    """Boards keep sending at `rate` events/s each through an outage of `outage_s` and after
    it. Backlog B = rows the gateway stored before the link returned and the peer does not
    hold; they leave first (one class, acceptance order), so the backlog is gone when the
    peer stores its B-th new row. Drain rate = B / (that time - first new row's arrival)."""
    rig = Rig(tmp)
    try:
        rig.start_peer()
        rig.start_gateway()
        await asyncio.sleep(0.5)
        load = rig.load(n_boards, rate=rate, seconds=warm_s + outage_s + after_s, window=1 << 20)
        await asyncio.sleep(warm_s + 1.0)  # the boards connect (~1 s), then steady state
        rig.stop_peer()
        s0, c0 = await asyncio.to_thread(rig.status), time.time()
        await asyncio.sleep(outage_s)
        s1, c1 = await asyncio.to_thread(rig.status), time.time()
        held = rig.store.count()
        backlog = s1["frames_stored"] - held
        ingest = (s1["frames_in"] - s0["frames_in"]) / (c1 - c0)
        t_r = rig.start_peer()
        await asyncio.to_thread(wait_count, rig.store, held + backlog, 60)
        await load_result(load, timeout=warm_s + outage_s + after_s + 60)
        q = "SELECT at FROM frames ORDER BY n LIMIT 1 OFFSET ?"
        first = float(rig.store.db.execute(q, (held,)).fetchone()[0])
        done = float(rig.store.db.execute(q, (held + backlog - 1,)).fetchone()[0])
        drain = backlog / max(done - first, 1e-3)
        r = {"rate": n_boards * rate, "ingest": ingest, "backlog": backlog, "first_ms": (first - t_r) * 1000,
             "clear_s": done - t_r, "drain": drain, "ratio": drain / ingest}  # fmt: skip
        print(
            f"[3a] outage of {outage_s:.0f} s, {n_boards} boards x {rate:g} MeterValues/s ="
            f" {n_boards * rate:,.0f} frames/s stated, {ingest:,.0f} measured during the outage, going on after it"
        )
        print(
            f"    backlog {backlog} frames; first relay {r['first_ms']:.0f} ms after the link returned;"
            f" backlog gone {r['clear_s']:.2f} s after it"
        )
        print(f"    drain (backlog / first relay -> backlog gone, ingest continuing): {drain:,.0f} frames/s"
              f" = {r['ratio']:.0f}x the ingest rate")  # fmt: skip
        return r
    finally:
        rig.close()


LATENCY_CONFIGS = (
    ("priority", False, ""),
    ("priority, no flight bound", False, "bulk_queue_ms = 0.0\n"),
    ("plain FIFO", True, ""),
)
"""[2]'s runs: the gateway as configured by default; without the flight bound of the lower
classes (gateway/pacing.py), to show what it does; plain FIFO (one queue, no priority)."""


async def latency_runs(tmp: Path, seconds: float, peer_host: str = "127.0.0.1") -> None:
    """[2]: each of LATENCY_CONFIGS in turn, then their figures side by side."""
    res = {}
    for i, (name, fifo, extra) in enumerate(LATENCY_CONFIGS):
        res[name] = await urgent_latency(tmp / str(i), fifo, seconds, extra, peer_host, name)
    width = max(len(n) for n in res)
    for name, lat in res.items():
        label = name.ljust(width)
        if not lat["ingress"]:
            print(f"    {label}: no urgent frame arrived")
            continue
        for key, what in (("send", "board send -> receipt"), ("ingress", "ingress -> receipt (the target)")):
            print(f"    {label}: {what}: {summary(lat[key])}")
        split = ", ".join(f"{k} {summary(lat[k], short=True)}" for k in ("dispatch", "relay", "sent", "wire"))
        print(f"      split (p50/p99/max ms): ingress -> {split}")


def summary(xs: list[float], short: bool = False) -> str:
    if not xs:
        return "-"
    if short:
        return f"{statistics.median(xs) * 1000:.2f}/{pct(xs, 0.99):.2f}/{max(xs) * 1000:.2f}"
    return (f"n={len(xs)} p50 {statistics.median(xs) * 1000:.1f} ms  p99 {pct(xs, 0.99):.1f} ms"
            f"  max {max(xs) * 1000:.1f} ms")  # fmt: skip


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--boards", type=int, default=500)
    p.add_argument("--frames", type=int, default=200, help="MeterValues per board")
    p.add_argument("--seconds", type=float, default=4.0, help="bulk saturation time per latency run")
    p.add_argument("--outage", type=float, default=8.0, help="outage length of the paced drain runs [3a], s")
    p.add_argument("--rates", default="1,10", help="events/s per board of the paced drain runs [3a]")
    p.add_argument("--ocpp-boards", type=int, default=100)
    p.add_argument("--ocpp-frames", type=int, default=50, help="MeterValues per OCPP-J board")
    p.add_argument("--latency-only", action="store_true", help="run [2] only")
    p.add_argument(
        "--shaped",
        type=float,
        default=0.0,
        metavar="MBIT",
        help="also run [2] over a link shaped to MBIT Mbit/s (root: netns + tc)",
    )
    p.add_argument("--shaped-buffer-ms", type=float, default=50.0, help="the shaped link's buffer, ms")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not a.latency_only:
            await throughput(tmp / "t", a.boards, a.frames)
        print("[2] urgent FaultReport latency while 20 boards saturate with 1 KB LogChunks (receipt = the peer"
              " parsed the Relay carrying it), loopback uplink")  # fmt: skip
        await latency_runs(tmp / "l", a.seconds)
        if a.shaped:
            why = shaped.unavailable()
            if why:
                print(f"[2s] shaped uplink: not run ({why})")
            else:
                print(f"[2s] the same over a shaped uplink: {a.shaped:g} Mbit/s token bucket with a"
                      f" {a.shaped_buffer_ms:g} ms buffer (tools/bench/shaped.py), 1200-byte datagrams")  # fmt: skip
                with shaped.shaped_link(a.shaped, a.shaped_buffer_ms) as host:
                    await latency_runs(tmp / "s", a.seconds, host)
        if a.latency_only:
            return
        for i, rate in enumerate(float(x) for x in a.rates.split(",") if x):
            await outage_at_rate(tmp / f"r{i}", a.boards, rate, a.outage)
        await outage(tmp / "o", a.boards, a.frames)
        ours = await throughput(tmp / "t2", a.boards, a.frames)
        base = ocppj.run(a.ocpp_boards, a.ocpp_frames)
        print(f"[4] OCPP-J relay (ocpp {version('ocpp')} ChargePoint on websockets {version('websockets')}),"
              f" {base['messages']:,.0f} MeterValues: {base['per_cpu_s']:,.0f} messages per CPU-second of the relay"
              f" ({base['messages'] / base['seconds']:,.0f} messages/s)")  # fmt: skip
        per_cpu = ours["sent"] / ours["cpu"]
        print(f"    this gateway (run [1] again, side by side): {per_cpu:,.0f} frames per CPU-second"
              f" = {per_cpu / base['per_cpu_s']:.1f}x the OCPP-J relay")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
