"""Sessions and transactions on the real site (real boards, gateway, CSMS over QUIC), the
session model of IEC 63110-1 clause 6: S3 (remote start, the EV-connection timeout), S4 (a
tariff change during a session), S6 (the SDR), S7 (the EV's contract certificate), E6 (exported
energy metered and billed) and the ids of service sessions, charging sessions and transactions.
Each starts where its actor starts — the CSMS operator's API, the driver at the board, the EV —
and checks what the world sees: the power each board's meter draws, what the CSMS stores and
bills."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from realsite import Invariants, Site, api, scenario, site_id

from evedge_csms import commands as cmds
from evedge_roaming import meter
from gateway.schema import Key, Status, StopReason
from tools.site.harness import board_status, board_step, board_wait, until

pytestmark = pytest.mark.timeout(120)


async def done(site: Site, cmd_id: int) -> None:
    row = await site.command_done(cmd_id)
    assert row["state"] == "done" and all(r["status"] == Status.ACCEPTED for r in row["results"]), row


async def card(site: Site, i: int, token: str) -> None:
    b = site.boards[i]
    m = b.mark()
    b.cmd("card", token=token)
    assert (await board_wait(b, "auth", since=m))["status"] == 0


async def sdr_of(site: Site, device: str) -> list[dict[str, Any]]:
    """The SDRs of `device`, once there is one."""

    def rows() -> list[dict[str, Any]]:
        return [s for s in api(site).sdrs() if s["device_id"] == device]

    return list(await until(rows, 20, f"an SDR of {device}"))


# ---------------------------------------------------------------- S4
def test_s4_tariff_change_splits_the_transaction_the_ev_keeps_charging_and_the_fee_is_charged_once(
    tmp_path: Path,
) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        a, b = api(site), site.boards[0]
        a.add_token("04S4")
        await done(site, a.set_tariff(site_id(site), 1, 30, "EUR", price_session=100, targets=["ev-0000"]))
        m = b.mark()
        await card(site, 0, "04S4")
        b.cmd("plug")
        tx1 = (await board_wait(b, "tx_started", since=m))["tx_id"]
        await board_status(b, lambda st: st["power_w"] > 0)
        await board_step(b, 600_000)
        await done(site, a.set_tariff(site_id(site), 2, 40, "EUR", price_session=100, targets=["ev-0000"]))
        tx2 = (await board_wait(b, "tx_started", lambda e: e["tx_id"] != tx1, since=m))["tx_id"]
        # the EV keeps drawing under the new transaction
        st = await board_status(b, lambda st: st["tx_id"] == tx2 and st["power_w"] > 0, timeout=10)
        assert st["contactor"]
        wh_split = st["wh_in"]
        await board_step(b, 600_000)
        b.cmd("unplug")
        await board_wait(b, "tx_ended", lambda e: e["tx_id"] == tx2, since=m)
        (sdr,) = await sdr_of(site, "ev-0000")
        lines = sdr["transactions"]
        assert [t["tx_id"] for t in lines] == [tx1, tx2]
        assert [t["tariff_id"] for t in lines] == [1, 2]
        assert lines[0]["meter_stop_wh"] == lines[1]["meter_start_wh"] <= wh_split  # no gap
        e1, e2 = lines[0]["energy_wh"], lines[1]["energy_wh"]
        assert e1 > 0 and e2 > 0 and sdr["energy_wh"] == e1 + e2
        assert sdr["cost"] == 100 + e1 * 30 // 1000 + e2 * 40 // 1000  # the session fee once

    scenario(tmp_path, fn, boards=1)


# ---------------------------------------------------------------- S3
def test_s3_remote_start_without_an_ev_expires_and_a_later_plug_in_does_not_charge(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        a, b = api(site), site.boards[0]
        await done(site, a.send(site_id(site), cmds.request_start(["ev-0000"], "REMOTE-S3", 31)))
        await board_status(b, lambda st: st["svc"])  # the remote start opened a service session
        await board_step(b, 61_000)  # past the default EV-connection timeout (60 s)

        def ended_at_csms() -> list[dict[str, Any]]:
            return [s for s in a.service_sessions() if s["remote_start_id"] == 31 and s["state"] == "ended"]

        ended = await until(ended_at_csms, 15, "the service session ended at the CSMS")
        assert ended[0]["stop_reason"] == StopReason.TIMEOUT
        b.cmd("plug")
        st = await board_status(b, lambda st: st["cp"] != 0 and st["svc"])  # the board saw the EV
        assert st["tx_id"] is None and st["power_w"] == 0
        assert b.all("tx_started") == []
        assert not [t for t in a.sessions() if t["remote_start_id"] == 31]

    scenario(tmp_path, fn, boards=1)


def test_s3_the_csms_sets_the_ev_connection_timeout_and_a_plug_in_within_it_charges(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        a, b = api(site), site.boards[0]
        var = cmds.var("TxCtrlr", "EVConnectionTimeOut", "180")
        await done(site, a.send(site_id(site), cmds.set_variables(["ev-0000"], [var])))
        m = b.mark()
        await done(site, a.send(site_id(site), cmds.request_start(["ev-0000"], "REMOTE-S3B", 32)))
        await board_status(b, lambda st: st["svc"])
        await board_step(b, 120_000)  # beyond the default, within the operator's 180 s
        b.cmd("plug")
        tx = await board_wait(b, "tx_started", since=m)
        await board_status(b, lambda st: st["power_w"] > 0)
        row = await until(lambda: a.store.get("transactions", site_id=site_id(site), device_id="ev-0000",
                                              tx_id=tx["tx_id"]), 15, "transaction at the CSMS")  # fmt: skip
        assert row["remote_start_id"] == 32 and row["id_token"] == "REMOTE-S3B"
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)

    scenario(tmp_path, fn, boards=1)


def test_s3_a_card_authorization_without_an_ev_expires_too(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        a, b = api(site), site.boards[0]
        a.add_token("04S3CARD")
        await card(site, 0, "04S3CARD")
        await board_step(b, 61_000)
        await until(lambda: [s for s in a.service_sessions() if s["state"] == "ended"
                             and s["stop_reason"] == StopReason.TIMEOUT], 15, "the timeout at the CSMS")  # fmt: skip
        b.cmd("plug")
        st = await board_status(b, lambda st: st["cp"] != 0 and st["svc"])
        assert st["tx_id"] is None and st["power_w"] == 0 and b.all("tx_started") == []

    scenario(tmp_path, fn, boards=1)


# ---------------------------------------------------------------- E6
def test_e6_exported_energy_is_metered_in_transaction_events_and_the_sdr(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        a, b = api(site), site.boards[0]
        a.add_token("04V2G")
        m = b.mark()
        await card(site, 0, "04V2G")
        b.cmd("plug", v2g=True)
        await board_wait(b, "tx_started", since=m)
        st0 = await board_status(b, lambda st: st["power_w"] > 0)
        await board_step(b, 300_000)  # imports first
        prof = cmds.v2g_profile(["ev-0000"], 1, 61, [cmds.period(0, -5000)])
        await done(site, a.send(site_id(site), prof))
        await board_status(b, lambda st: st["power_w"] < 0)
        await board_step(b, 600_000)  # then exports 5 kW for 10 min
        b.cmd("unplug")
        end = await board_wait(b, "tx_ended", since=m)
        st1 = await board_status(b)
        (sdr,) = await sdr_of(site, "ev-0000")
        (line,) = sdr["transactions"]
        assert line["meter_start_out_wh"] == st0["wh_out"] and line["meter_stop_out_wh"] == st1["wh_out"]
        assert sdr["energy_out_wh"] == line["energy_out_wh"] == st1["wh_out"] - st0["wh_out"] >= 800
        assert sdr["energy_wh"] == end["wh"] > 0
        ev = a.store.select("tx_events", {"device_id": "ev-0000", "event": 2})[0]
        assert ev["body"][str(int(Key.METER_STOP_OUT_WH))] == st1["wh_out"]

    scenario(tmp_path, fn, boards=1)


# ---------------------------------------------------------------- clause 6, S6
def test_clause6_ids_are_unique_across_the_site_and_one_sdr_per_service_session_lists_its_transactions(
    tmp_path: Path,
) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        a = api(site)
        await done(site, a.set_tariff(site_id(site), 5, 25, "EUR", price_session=50, targets=site.devices))
        for tok in ("04C6A", "04C6B"):
            a.add_token(tok, tariff_id=5)
        b0, b1 = site.boards
        m0, m1 = b0.mark(), b1.mark()
        await card(site, 0, "04C6A")
        await card(site, 1, "04C6B")
        b0.cmd("plug")
        b1.cmd("plug")
        t0 = (await board_wait(b0, "tx_started", since=m0))["tx_id"]
        t1 = (await board_wait(b1, "tx_started", since=m1))["tx_id"]
        print(f"raw transaction ids: ev-0000 {t0}, ev-0001 {t1}")  # each board counts its own: they may collide
        await board_step(b0, 300_000)
        b0.cmd("card", token="04C6A")  # the driver stops, the EV stays plugged …
        await board_wait(b0, "tx_ended", since=m0)
        await card(site, 0, "04C6A")  # … and resumes: a second transaction of the same service session
        t0b = (await board_wait(b0, "tx_started", lambda e: e["tx_id"] != t0, since=m0))["tx_id"]
        await board_step(b0, 300_000)
        await board_step(b1, 300_000)
        b0.cmd("unplug")
        b1.cmd("unplug")
        await board_wait(b0, "tx_ended", lambda e: e["tx_id"] == t0b, since=m0)
        await board_wait(b1, "tx_ended", since=m1)
        s0 = (await sdr_of(site, "ev-0000"))[0]
        s1 = (await sdr_of(site, "ev-0001"))[0]
        txs = a.sessions()
        assert len(txs) == 3 and len({t["tx_gid"] for t in txs}) == 3
        assert all(t["tx_gid"].startswith("DE*EVE*S") for t in txs)
        assert s0["session_gid"] != s1["session_gid"] and s0["sdr_id"] != s1["sdr_id"]
        assert [t["tx_id"] for t in s0["transactions"]] == [t0, t0b] and len(s1["transactions"]) == 1
        # every TransactionEvent carried the three ids
        for ev in a.store.select("tx_events"):
            body = ev["body"]
            assert body[str(int(Key.SESSION_ID))] and body[str(int(Key.CHARGING_SESSION_ID))], body
        chg = {t["charging_session_id"] for t in txs if t["device_id"] == "ev-0000"}
        assert len(chg) == 1  # one plug-in: one charging session holding both transactions
        # S6: times, meter readings, tariff, signed meter data, the session fee once
        for s in (s0, s1):
            assert s["started"] <= s["stopped"] and s["currency"] == "EUR" and s["tariff_id"] == 5
            assert s["energy_wh"] == sum(t["energy_wh"] for t in s["transactions"]) > 0
            for t in s["transactions"]:
                assert t["energy_wh"] == t["meter_stop_wh"] - t["meter_start_wh"]
            assert s["signed_meter"] and all(x.startswith(meter.TAG) for x in s["signed_meter"])
            assert s["cost"] == 50 + sum(t["energy_wh"] * 25 // 1000 for t in s["transactions"])

    scenario(tmp_path, fn, boards=2)


# ---------------------------------------------------------------- S7
def test_s7_the_evs_contract_certificate_request_is_answered_through_the_csms(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        a, b = api(site), site.boards[0]
        b.cmd("plug")
        # without a contract PKI behind the CSMS the request is refused at once
        m = b.mark()
        b.cmd("ev_cert", exi=b"\x80\x01".hex())
        assert (await board_wait(b, "ev_certificate", since=m))["ok"] is False
        # the operator's contract PKI (the home CSP, through the roaming relay) answers
        site.csms.ctx.ev_cert_relay = True
        m = b.mark()
        b.cmd("ev_cert", exi=b"\x80\x02".hex(), action=1)
        (req,) = await until(a.pending_ev_certificates, 15, "the request pending at the CSMS")
        assert req["device_id"] == "ev-0000" and req["exi"] == b"\x80\x02" and req["action_15118"] == 1
        assert a.answer_ev_certificate(req["site_id"], req["device_id"], req["msg_id"], "accepted", b"\x30\x03CHAIN")
        assert (await board_wait(b, "ev_certificate", since=m))["ok"] is True
        await board_status(b, lambda st: st["exi"] == b"\x30\x03CHAIN".hex())  # handed to the EV
        assert not a.answer_ev_certificate(req["site_id"], req["device_id"], req["msg_id"], "accepted", b"x")

    scenario(tmp_path, fn, boards=1)
