"""B16/B17 on the board: the persistent outbox on the emulated board's LittleFS2 flash.

Every test runs the real firmware in `micropython` processes; a power cut is SIGKILL of
the process, and the next process boots on the same flash image.
"""

from __future__ import annotations

import random
import time

import pytest
from fwpeer import Rig, barrier, until_status

from gateway.schema import Action, Key

pytestmark = pytest.mark.timeout(60)


def _stored(rig: Rig) -> set[int]:
    return {e["id"] for e in rig.board.all("stored") if e["ok"]}


@pytest.mark.seed(1234)
def test_fw_b17_power_cut_during_outbox_writes_loses_nothing_duplicates_nothing(rig: Rig, seed: int) -> None:
    rnd = random.Random(seed)
    n = 0
    per_cut = []
    for _ in range(5):
        m = rig.board.mark()
        rig.board.cmd("emit", n=30, **{"from": n})
        n += 30
        rig.board.wait("stored", since=m)  # the writes are under way …
        time.sleep(rnd.uniform(0.0, 0.4))  # … the power goes somewhere among them (a fault's instant, not a wait)
        rig.power_cut()
        per_cut.append(len([e for e in rig.board.all("stored")[-30:] if e["_boot"] == rig.board.boots]))
        rig.up()
    rig.board.cmd("emit", n=5, **{"from": n})
    barrier(rig.board)  # the last five are stored
    stored = _stored(rig)
    print(f"stored before each power cut: {per_cut}; stored in all {len(stored)}")
    peer = rig.peer
    peer.wait(lambda: stored <= {i for (_, i, _, _) in peer.persisted}, 30)
    values = [b[Key.ENERGY_WH] for b in peer.durable(Action.METER_VALUES)]
    assert len(values) == len(set(values)), "a logical event was stored twice under two ids"
    ids = [i for (_, i, _, _) in peer.persisted]
    assert len(ids) == len(set(ids))
    assert len(stored) >= 5 + 5  # at least one write before each cut, and the last five
    st = rig.board.status()
    assert st["outbox_refused"] == 0


@pytest.mark.seed(7)
def test_fw_b17_power_cut_during_transaction_keeps_seq_no_contiguous(rig: Rig, seed: int) -> None:
    rig.peer.tokens[b"card-1"] = 0
    rnd = random.Random(seed)
    for _ in range(4):
        m = rig.board.mark()
        rig.board.cmd("plug")
        rig.board.cmd("card", token="card-1")
        rig.board.wait("tx_started", since=m)
        time.sleep(rnd.uniform(0.0, 0.3))  # the instant of the power cut (a fault, not a wait)
        rig.power_cut()
        rig.up()
    peer = rig.peer
    started = {int(e["tx_id"]) for e in rig.board.all("tx_started")}
    # every transaction was ended at the next boot (power loss): wait for those Ended events,
    # then for the board's outbox to be empty (the peer stores before it acknowledges)
    peer.wait(
        lambda: started <= {b[Key.TX_ID] for b in peer.durable(Action.TRANSACTION_EVENT) if b[Key.EVENT] == 2}, 30
    )
    until_status(rig.board, lambda st: st["outbox"] == 0)
    evs = peer.durable(Action.TRANSACTION_EVENT)
    by_tx: dict[int, list[int]] = {}
    for b in evs:
        by_tx.setdefault(b[Key.TX_ID], []).append(b[Key.SEQ_NO])
    assert set(by_tx) == started and len(started) == 4
    for tx, seqs in by_tx.items():
        assert sorted(seqs) == list(range(len(seqs))), (tx, seqs)
    ended = [b for b in evs if b[Key.EVENT] == 2]
    assert all(b[Key.STOP_REASON] == 3 for b in ended)  # power_loss, ended at the next boot


def test_fw_b16_full_outbox_sheds_telemetry_first_and_reports_it(rig: Rig) -> None:
    peer = rig.peer
    peer.auto_ack = False  # the gateway cannot make anything durable for a while
    rig.peer.tokens[b"card-1"] = 0
    rig.board.cmd("plug")
    rig.board.cmd("card", token="card-1")
    rig.board.wait("tx_started")
    rig.board.cmd("emit", n=70, cls=3)  # telemetry
    rig.board.cmd("emit", n=10, cls=2, **{"from": 1000})  # billing
    rig.board.cmd("unplug")
    rig.board.wait("tx_ended")
    st = rig.board.status()
    assert st["outbox"] <= 48 + 16
    assert st["outbox_refused"] == 0
    peer.auto_ack = True
    rig.power_cut()  # and even a power cut on top of it
    rig.up()
    peer.wait(lambda: any(b[Key.EVENT_NAME] == "OutboxShed" for b in peer.durable(Action.SECURITY_EVENT)), 20)
    peer.wait(lambda: any(b[Key.EVENT] == 2 for b in peer.durable(Action.TRANSACTION_EVENT)), 20)

    def billing() -> set[int]:
        return {b[Key.ENERGY_WH] for b in peer.durable(Action.METER_VALUES) if b[Key.ENERGY_WH] >= 1000}

    peer.wait(lambda: len(billing()) >= 10, 20)
    assert billing() == set(range(1000, 1010))  # every billing value, none shed
    tx = peer.durable(Action.TRANSACTION_EVENT)
    assert sorted(b[Key.SEQ_NO] for b in tx) == list(range(len(tx)))


@pytest.mark.timeout(300)  # filling the flash image takes ~30 s alone, more on a loaded machine
def test_fw_b17_full_flash_never_corrupts_outbox(rig: Rig) -> None:
    peer = rig.peer
    peer.auto_ack = False
    rig.board.cmd("emit", n=5, **{"from": 0})
    barrier(rig.board)  # the five are stored
    rig.board.cmd("fill")
    rig.board.wait("filled", timeout=180)  # a full LittleFS image, written 1 KiB at a time: slow under load
    rig.board.cmd("emit", n=5, **{"from": 100})
    st = rig.board.status()
    assert st["online"]
    rig.power_cut()
    peer.auto_ack = True
    rig.up()
    rig.board.cmd("unfill")
    ok = _stored(rig)
    peer.wait(lambda: ok <= {i for (_, i, _, _) in peer.persisted}, 60)
    vals = sorted(b[Key.ENERGY_WH] for b in peer.durable(Action.METER_VALUES))
    assert set(range(5)) <= set(vals)
    assert len(vals) == len(set(vals))
