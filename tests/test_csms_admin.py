"""The operator CLI (`evedge-csms-admin`, or `python -m evedge_csms.admin`) against a running CSMS's data folder."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from csmsclient import Board, running_csms, site

from evedge_csms.admin import main
from evedge_csms.api import Csms
from evedge_csms.config import load
from evedge_csms.inbound import Ctx
from evedge_csms.pki import load_or_create_signer
from evedge_csms.store import Row, SqliteStore
from gateway import _core
from gateway.schema import Action, Key, Priority, TxEvent

pytestmark = pytest.mark.timeout(30)


def admin(data: Path, *args: str) -> str:
    out = io.StringIO()
    assert main(["--data", str(data), *args], out=out) == 0
    return out.getvalue()


def test_csms_admin_cli_limit_campaign_lists_and_sdr_export(tmp_path: Path) -> None:
    data = tmp_path / "csms"
    image = tmp_path / "fw.bin"
    image.write_bytes(b"\x7fFW" * 100)

    async def main_() -> None:
        async with running_csms(data) as srv, site(srv) as gw:
            b = Board("b1")
            boot = {Key.MODEL: "m", Key.VENDOR: "v", Key.SERIAL: "s", Key.FW_VERSION: "1"}
            await gw.relay_acked([b.frame(Action.BOOT_NOTIFICATION, boot)])
            await gw.command()
            assert "site-1\tb1\taccepted" in admin(data, "list-stations")
            assert "queued" in admin(data, "send-limit", "--site", "site-1", "--limit-w", "15000", "--zone", "2")
            _, env, inner = await gw.command()
            assert inner is not None and inner.action == Action.DSO_LIMIT and env.prio == Priority.URGENT
            admin(
                data,
                "firmware-campaign",
                "--site",
                "site-1",
                "--image",
                str(image),
                "--version",
                "3.1",
                "--targets",
                "b1",
            )
            _, env, inner = await gw.command()
            assert inner is not None and inner.body[Key.SIZE] == 300
            assert _core.ed25519_verify(srv.ctx.signer.public, env.body[Key.FRAME], env.body[Key.SIGNATURE])
            base = {Key.TX_ID: 4, Key.EVSE: 1, Key.TRIGGER: 0}
            await gw.relay_acked(
                [
                    b.frame(
                        Action.TRANSACTION_EVENT, {**base, Key.EVENT: TxEvent.STARTED, Key.SEQ_NO: 0, Key.ENERGY_WH: 5}
                    ),
                    b.frame(
                        Action.TRANSACTION_EVENT, {**base, Key.EVENT: TxEvent.ENDED, Key.SEQ_NO: 1, Key.ENERGY_WH: 905}
                    ),
                ]
            )
            assert "site-1\tb1\t4\t1\tended" in admin(data, "list-sessions")

    asyncio.run(asyncio.wait_for(main_(), 25))
    rows: list[dict[str, Any]] = json.loads(admin(data, "export-sdrs", "--format", "json"))
    assert [r["energy_wh"] for r in rows] == [900]
    (row,) = csv.DictReader(io.StringIO(admin(data, "export-sdrs", "--format", "csv")))
    assert row["energy_wh"] == "900" and row["sdr_id"] == rows[0]["sdr_id"]


def test_csms_admin_cli_r1_2_connector_of_one_evse_over_its_sites(tmp_path: Path) -> None:
    """`set-connector`: one EVSE's connector kind (a DC charger at an AC site); an unknown board
    or value is refused by name (exit 2) and nothing is recorded."""
    data = tmp_path / "csms"
    err = io.StringIO()
    kind = ("--connector-standard", "CHADEMO", "--connector-format", "CABLE", "--power-type", "DC")
    with contextlib.redirect_stderr(err):
        assert main(["--data", str(data), "set-connector", "--site", "s1", "--device", "b9", *kind]) == 2
    assert "no station 'b9' at site 's1'" in err.getvalue()
    admin(data, "register-device", "--site", "s1", "--device", "b1")
    with contextlib.redirect_stderr(err):
        bad = ("set-connector", "--site", "s1", "--device", "b1", "--power-type", "DC3")
        assert main(["--data", str(data), *bad]) == 2
    assert "power_type 'DC3': one of AC_1_PHASE, AC_3_PHASE, DC" in err.getvalue()
    with contextlib.redirect_stderr(err):  # R3-9: a meter key is an Ed25519 public key, 32 bytes
        assert main(["--data", str(data), "set-connector", "--site", "s1", "--device", "b1", "--meter-key", "ab"]) == 2
    assert "meter_key: an Ed25519 public key is 32 bytes, not 1" in err.getvalue()
    assert connector_record(data, "s1", "b1", 1) is None and connector_record(data, "s1", "b1", 2) is None
    key = "5a" * 32
    out = admin(data, "set-connector", "--site", "s1", "--device", "b1", "--evse", "2", *kind, "--meter-key", key)
    assert f"s1\tb1\t2\tCHADEMO\tCABLE\tDC\t{key}" in out
    with contextlib.redirect_stderr(err):  # refused over a record: the record unchanged
        assert main(["--data", str(data), "set-connector", "--site", "s1", "--device", "b1", "--evse", "2",
                     "--meter-key", "ab"]) == 2  # fmt: skip
    rec = connector_record(data, "s1", "b1", 2)
    assert rec is not None and rec["meter_key"] == bytes.fromhex(key)
    # R3-9: an empty key clears it (a meter that seals nothing); the connector's kind stays
    out = admin(data, "set-connector", "--site", "s1", "--device", "b1", "--evse", "2", "--meter-key", "")
    assert "s1\tb1\t2\tCHADEMO\tCABLE\tDC\t\n" in out
    rec = connector_record(data, "s1", "b1", 2)
    assert rec is not None and rec["meter_key"] is None and rec["power_type"] == "DC"


def connector_record(data: Path, site_id: str, device_id: str, evse: int) -> Row | None:
    """What the CSMS holds of an EVSE's connector (`Csms.connector_record`), read from its data folder."""
    cfg = load(None, data_dir=data)
    store = SqliteStore(cfg.db_path)
    try:
        return Csms(Ctx(store, load_or_create_signer(cfg.signing_key), None, cfg.settings)).connector_record(
            site_id, device_id, evse
        )
    finally:
        store.close()
