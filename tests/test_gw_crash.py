"""kill -9 of the gateway process at random instants under load: nothing lost, nothing
duplicated, order per device and class kept (B16, B17). Real processes: the gateway
(`python -m gateway --config …`) and the peer (`python tests/gwpeer.py`)."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import gwpeer
import pytest

from tools.loadclient import Board, dev_key

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent


SLOW_URGENT_COMMIT = """
import sys, time
from gateway import outbox
commit = outbox.Outbox.commit
def slow(self, rows, retire, now_ms):
    if any(r[3] == 0 for r in rows):  # a commit holding an urgent row: the gateway dies first
        time.sleep(60)
    return commit(self, rows, retire, now_ms)
outbox.Outbox.commit = slow
from gateway.__main__ import main
sys.exit(main(sys.argv[1:]))
"""
"""`python -m gateway` whose commits of urgent rows never complete (the test kills it first)."""


def start_gateway(cfg: Path, slow_urgent_commit: bool = False) -> subprocess.Popen[str]:
    """The gateway process, listening (on the ports of its first start: `gwpeer.ports(cfg)`)."""
    return gwpeer.start_gateway(cfg, ["-c", SLOW_URGENT_COMMIT] if slow_urgent_commit else ["-m", "gateway"])


def start_peer(tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    """tests/gwpeer.py as a process, on an ephemeral port (returned); it makes the site's dev CA
    in the gateway's PKI folder, which the gateway then uses."""
    peer = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gwpeer.py"), "--db", str(tmp_path / "peer.sqlite"),
                             "--pki", str(tmp_path / "gw" / "pki")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    assert peer.stdout is not None
    line = peer.stdout.readline()
    assert line.startswith("READY port="), line
    return peer, int(line.split("=")[1])


@pytest.mark.seed(20240601)
def test_kill_9_under_load_loses_nothing_and_duplicates_nothing(tmp_path: Path, seed: int) -> None:
    """`seed` (EVEDGE_SEED, printed) draws the kill instants and the mix of urgent and telemetry
    events; what is in flight at each kill still depends on the machine's timing."""
    peer, udp = start_peer(tmp_path)
    cfg = gwpeer.gateway_toml(tmp_path / "gateway.toml", udp)
    gw = start_gateway(cfg)
    lan = gwpeer.ports(cfg)["lan"]  # where the restarted gateways listen too
    rng = random.Random(seed)
    sent: dict[str, list[tuple[int, int]]] = {}

    async def load() -> list[Board]:
        boards = [Board(f"ev-{i:03d}", dev_key(gwpeer.SEED, f"ev-{i:03d}"), "127.0.0.1", lan) for i in range(10)]
        stop = asyncio.Event()
        keepers = [asyncio.create_task(b.keep_connected(stop)) for b in boards]

        async def produce() -> None:
            while not stop.is_set():
                for b in boards:
                    if b.connected.is_set() and len(b.unacked) < 500:
                        kind = "fault" if rng.random() < 0.1 else "meter"
                        prio = 0 if kind == "fault" else 2
                        sent.setdefault(b.device_id, []).extend((prio, i) for i in b.send(kind, 5))
                await asyncio.sleep(0.005)

        producer = asyncio.create_task(produce())
        nonlocal gw
        for _ in range(3):
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            gw.send_signal(signal.SIGKILL)
            gw.wait()
            assert gw.stdout is not None
            gw.stdout.close()
            gw = await asyncio.to_thread(start_gateway, cfg)
        await asyncio.sleep(0.5)
        stop.set()
        await producer
        stop2 = asyncio.Event()
        keepers2 = [asyncio.create_task(b.keep_connected(stop2)) for b in boards]
        end = time.monotonic() + 40
        while any(b.unacked for b in boards) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        stop2.set()
        for t in keepers + keepers2:
            await t
        return boards

    try:
        boards = asyncio.run(load())
        assert not any(b.unacked for b in boards), "every event was acked in the end"
        total = sum(len(v) for v in sent.values())
        assert total > 1000
        db = sqlite3.connect(tmp_path / "peer.sqlite")
        end = time.monotonic() + 40
        while db.execute("SELECT count(*) FROM frames").fetchone()[0] < total and time.monotonic() < end:
            time.sleep(0.1)
        rows = list(db.execute("SELECT device, prio, msg_id FROM frames ORDER BY n"))
        db.close()
        assert len(rows) == total, "nothing lost, nothing duplicated"
        assert {(d, m) for d, _, m in rows} == {(d, m) for d, v in sent.items() for _, m in v}
        last: dict[tuple[str, int], int] = {}
        for d, p, m in rows:
            assert m > last.get((d, p), 0), f"order of {d} class {p} broken at {m}"
            last[d, p] = m
    finally:
        for p in (gw, peer):
            p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()


def test_urgent_relayed_before_its_commit_then_kill_9_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """An urgent frame reaches the CSMS while its commit is still running (it is relayed in
    parallel with it); the gateway is killed before the commit completes, so the board never
    got its ack and resends it to the restarted gateway: the CSMS holds it exactly once."""
    peer, udp = start_peer(tmp_path)
    cfg = gwpeer.gateway_toml(tmp_path / "gateway.toml", udp)
    gw = start_gateway(cfg, slow_urgent_commit=True)
    lan = gwpeer.ports(cfg)["lan"]
    store = gwpeer.Store(str(tmp_path / "peer.sqlite"))
    outbox = sqlite3.connect(tmp_path / "gw" / "outbox.sqlite")

    def at_peer(device: str) -> list[int]:
        return [m for (m,) in store.db.execute("SELECT msg_id FROM frames WHERE device = ? ORDER BY n", (device,))]

    async def scenario() -> tuple[list[int], list[int]]:
        nonlocal gw
        board = Board("ev-u01", dev_key(gwpeer.SEED, "ev-u01"), "127.0.0.1", lan)
        meters = Board("ev-m01", dev_key(gwpeer.SEED, "ev-m01"), "127.0.0.1", lan)
        stop = asyncio.Event()
        keepers = [asyncio.create_task(b.keep_connected(stop)) for b in (board, meters)]
        await asyncio.wait_for(board.connected.wait(), 10)
        await asyncio.wait_for(meters.connected.wait(), 10)
        meter_ids = meters.send("meter", 20)
        end = time.monotonic() + 30
        while len(at_peer("ev-m01")) < 20 and time.monotonic() < end:  # the uplink is up
            await asyncio.sleep(0.02)
        urgent_ids = board.send("fault", 3)
        end = time.monotonic() + 30
        while len(at_peer("ev-u01")) < 3 and time.monotonic() < end:
            await asyncio.sleep(0.01)
        assert at_peer("ev-u01") == urgent_ids, "relayed while the commit is still running"
        assert list(board.unacked) == urgent_ids, "not acked to the board: the commit has not completed"
        assert outbox.execute("SELECT count(*) FROM outbox WHERE prio = 0").fetchone()[0] == 0
        gw.send_signal(signal.SIGKILL)
        gw.wait()
        assert gw.stdout is not None
        gw.stdout.close()
        gw = await asyncio.to_thread(start_gateway, cfg)  # the board resends to the new gateway
        end = time.monotonic() + 30
        while board.unacked and time.monotonic() < end:
            await asyncio.sleep(0.02)
        assert not board.unacked, "acked once durable in the restarted gateway"

        def retired() -> int:
            q = "SELECT count(*) FROM outbox WHERE device = 'ev-u01' AND acked = 1"
            return int(outbox.execute(q).fetchone()[0])

        end = time.monotonic() + 30
        while retired() < 3 and time.monotonic() < end:  # relayed again, acked: deduplicated
            await asyncio.sleep(0.02)
        assert retired() == 3
        stop.set()
        for t in keepers:
            await t
        return urgent_ids, meter_ids

    try:
        urgent_ids, meter_ids = asyncio.run(scenario())
        assert at_peer("ev-u01") == urgent_ids, "exactly once, in order"
        assert at_peer("ev-m01") == meter_ids
    finally:
        outbox.close()
        store.db.close()
        for p in (gw, peer):
            p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
