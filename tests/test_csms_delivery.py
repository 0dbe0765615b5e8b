"""Exactly once (B16, B17): a Relay redelivered is acknowledged again and stored once; the
ack comes after the commit, so a crash right after it loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from csmsclient import Board, gateway, running_csms, site, site_identity

from evedge_csms.store import SqliteStore
from gateway.schema import Action, Key, TxEvent, TxTrigger

pytestmark = pytest.mark.timeout(30)
ROOT = Path(__file__).resolve().parents[1]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 25))


def tx(board: Board, event: int, seq_no: int, energy: int, t: int, **extra: Any) -> dict[Any, Any]:
    body: dict[Any, Any] = {
        Key.EVENT: event,
        Key.TX_ID: 7,
        Key.SEQ_NO: seq_no,
        Key.TRIGGER: TxTrigger.METER_VALUE_PERIODIC,
        Key.EVSE: 1,
        Key.ENERGY_WH: energy,
        Key.TIME: t,
        **extra,
    }
    return board.frame(Action.TRANSACTION_EVENT, body)


def test_csms_b17_redelivered_relay_is_acked_again_and_stored_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv:
            b = Board("b1")
            items = [tx(b, TxEvent.STARTED, 0, 1000, 100), tx(b, TxEvent.UPDATED, 1, 1500, 200)]
            async with site(srv) as gw:
                await gw.relay_acked(items, relay_id=42)
                await gw.relay_acked(items, relay_id=42)  # lost ack: same relay again
                await gw.relay_acked(items[1:], relay_id=43)  # regrouped by the gateway
            async with site(srv) as gw:  # after a gateway crash, on a new connection
                await gw.relay_acked(items, relay_id=42)
            assert len(srv.store.select("tx_events")) == 2
            assert len(srv.store.select("received")) == 2

    run(main())


def _start(data: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "evedge_csms", "--data", str(data), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, line
    return proc, int(line.split()[3].rsplit(":", 1)[1])


def test_csms_b16_restart_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data = tmp_path / "csms"
    proc, port = _start(data)
    try:

        class _Srv:
            class config:  # noqa: N801 - stands for CsmsServer.config
                data_dir = data
                ca = data / "pki/ca.pem"
                ca_key = data / "pki/ca.key"

        cert, key = site_identity(_Srv, "site-1")
        b = Board("b1")
        items = [
            tx(b, TxEvent.STARTED, 0, 1000, 100),
            tx(b, TxEvent.UPDATED, 1, 4000, 1000),
            tx(b, TxEvent.ENDED, 2, 9000, 1900),
        ]

        async def relay() -> None:
            async with gateway(port, "site-1", data / "pki/ca.pem", cert, key) as gw:
                await gw.relay_acked(items, relay_id=5)

        run(relay())
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean shutdown
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    proc, port = _start(data)
    try:

        async def redeliver() -> None:
            async with gateway(port, "site-1", data / "pki/ca.pem", cert, key) as gw:
                await gw.relay_acked(items, relay_id=5)

        run(redeliver())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    store = SqliteStore(data / "csms.sqlite")
    try:
        assert [e["seq_no"] for e in store.select("tx_events", order="seq_no")] == [0, 1, 2]
        (sdr,) = store.select("sdrs")
        assert sdr["energy_wh"] == 8000
    finally:
        store.close()
