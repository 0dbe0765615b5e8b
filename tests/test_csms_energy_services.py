"""CSMS side of the energy use cases E1–E8 and the e-mobility services S1–S7."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from csmsclient import CMD_CONTROL, CMD_URGENT, TELEMETRY, URGENT, Board, running_csms, site, until

from evedge_csms import commands as cmds
from gateway import _core
from gateway.protocol.upstream_wire import K_UP
from gateway.schema import (
    Action,
    AuthStatus,
    Key,
    Kind,
    Priority,
    ProfilePurpose,
    ReservationStatus,
    Status,
    TxEvent,
    TxTrigger,
)

pytestmark = pytest.mark.timeout(30)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 25))


# ---------------------------------------------------------------- energy
def test_csms_e1_charging_profile_clear_and_composite_schedule(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            periods = [cmds.period(0, 11000), cmds.period(3600, 7400, phases=3)]
            cmd = srv.api.send("site-1", cmds.set_charging_profile(["b1", "b2"], 1, 9, periods, zone=2))
            sid, env, inner = await gw.command()
            assert env.msg_id == cmd and env.body[Key.TARGETS] == ["b1", "b2"]  # multicast (B11)
            assert inner is not None and inner.body[Key.PERIODS][1] == {
                Key.START_S: 3600,
                Key.LIMIT_W: 7400,
                Key.PHASES: 3,
            }
            assert env.body[Key.EXPIRY] > 0
            gw.accept_all(sid, env)
            await until(lambda: srv.api.command(cmd)["state"] == "done")
            assert [r["status"] for r in srv.api.command(cmd)["results"]] == [0, 0]
            srv.api.send("site-1", cmds.clear_charging_profile(["b1"], profile_id=9))
            srv.api.send("site-1", cmds.get_composite_schedule(["b1"], 1, 3600))
            assert (await gw.command())[2].action == Action.CLEAR_CHARGING_PROFILE  # type: ignore[union-attr]
            assert (await gw.command())[2].body == {Key.EVSE: 1, Key.DURATION_S: 3600}  # type: ignore[union-attr]
            b = Board("b1")  # the CS reports actual power
            await gw.relay_acked([b.frame(Action.METER_VALUES, {Key.EVSE: 1, Key.POWER_W: 7350, Key.ENERGY_WH: 5})])
            assert srv.store.select("meter_values")[0]["power_w"] == 7350

    run(main())


def test_csms_e2_e3_demand_response_and_site_forecast(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            srv.api.send("site-1", cmds.demand_response(price=42, limit_w=20000, zone=1))
            _, env, inner = await gw.command()
            assert env.body[Key.TARGETS] == [] and inner is not None and inner.body[Key.LIMIT_W] == 20000
            needs = {Key.EVSE: 1, Key.ENERGY_NEEDED_WH: 20000, Key.DEPARTURE: 5000}
            await gw.relay_acked([Board("b1").frame(Action.NOTIFY_EV_NEEDS, needs)])
            assert srv.store.select("ev_needs")[0]["evse"] == 1
            fc = {Key.SITE_ID: "site-1", Key.FORECAST: [cmds.period(0, 30000), cmds.period(900, 25000)], Key.ZONE: 1}
            gw.send(TELEMETRY, Kind.EVENT, Action.SITE_FORECAST, fc)
            rows = await until(lambda: srv.store.select("forecasts"))
            assert rows[0]["forecast"][1]["24"] == 25000

    run(main())


def test_csms_e4_available_power_is_a_bare_request(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            cmd = srv.api.available_power("site-1", 45000, zone=3)
            sid, env, inner = await gw.command()
            assert inner is None and env.action == Action.AVAILABLE_POWER and env.msg_id == cmd
            assert env.body == {Key.AVAILABLE_W: 45000, Key.ZONE: 3}
            gw.send(sid, Kind.RESPONSE, Action.AVAILABLE_POWER, {Key.STATUS: Status.ACCEPTED}, env.msg_id)
            await until(lambda: srv.api.command(cmd)["state"] == "done")

    run(main())


def test_csms_e5_dso_limit_urgent_on_the_urgent_stream(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            gw.send(URGENT, Kind.EVENT, Action.BOARDS_REPORT, {Key.SITE_ID: "site-1", Key.EVSES: []})
            await until(lambda: srv.store.select("boards_reports"))
            cmd = srv.api.send_limit("site-1", 22000, zone=4, deadline_ms=2000)
            sid, env, inner = await gw.command()
            assert sid == CMD_URGENT and env.prio == Priority.URGENT
            assert inner is not None and inner.action == Action.DSO_LIMIT and inner.prio == Priority.URGENT
            assert inner.body == {Key.LIMIT_W: 22000, Key.DEADLINE_MS: 2000, Key.ZONE: 4}
            gw.accept_all(sid, env)
            await until(lambda: srv.api.command(cmd)["state"] == "done")

    run(main())


def test_csms_e6_v2g_profile_with_negative_limits(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            with pytest.raises(ValueError, match="negative"):
                cmds.v2g_profile(["b1"], 1, 3, [cmds.period(0, 5000)])
            srv.api.send("site-1", cmds.v2g_profile(["b1"], 1, 3, [cmds.period(0, -7000), cmds.period(1800, 3000)]))
            _, _, inner = await gw.command()
            assert inner is not None and inner.body[Key.PERIODS][0][Key.LIMIT_W] == -7000
            assert inner.body[Key.PURPOSE] == ProfilePurpose.TX
            srv.api.send("site-1", cmds.setpoint(["b1"], 1, -5000))
            _, _, inner = await gw.command()
            assert inner is not None and inner.kind == Kind.EVENT and inner.body[Key.SETPOINT_W] == -5000

    run(main())


def test_csms_e7_e8_setpoint_loop_droop_and_measurements(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            srv.api.send("site-1", cmds.start_setpoint_loop(["b1"], 1, 100, 60))
            srv.api.send("site-1", cmds.set_frequency_droop(["b1"], [(49800, 11000), (50200, 0)], 20, evse=1))
            assert (await gw.command())[2].body[Key.RATE_MS] == 100  # type: ignore[union-attr]
            droop = (await gw.command())[2].body[Key.DROOP]  # type: ignore[union-attr]
            assert droop == [{Key.FREQ_MHZ: 49800, Key.POWER_W: 11000}, {Key.FREQ_MHZ: 50200, Key.POWER_W: 0}]
            b = Board("b1")
            mv = [
                b.frame(Action.MEASURED_VALUES, {Key.EVSE: 1, Key.POWER_W: 4000 + i, Key.SETPOINT_W: 4000})
                for i in range(5)
            ]
            fr = b.frame(Action.FREQUENCY_RESPONSE, {Key.EVSE: 1, Key.FREQ_MHZ: 49900, Key.POWER_W: 5500, Key.TIME: 3})
            await gw.relay_acked([*mv, fr])
            rows = srv.store.select("measurements", order="msg_id")
            assert [r["kind"] for r in rows] == ["measured"] * 5 + ["frequency"] and rows[-1]["freq_mhz"] == 49900

    run(main())


# ---------------------------------------------------------------- services
def test_csms_s1_reservation_accept_and_use(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            srv.api.reserve("site-1", "b1", 77, 999999, "TOKEN-1", evse=1)
            sid, env, inner = await gw.command()
            assert inner is not None and inner.body[Key.ID_TOKEN] == b"TOKEN-1"
            gw.accept_all(sid, env)
            await until(lambda: srv.store.get("reservations", reservation_id=77)["status"] == "accepted")
            upd = {Key.RESERVATION_ID: 77, Key.RES_STATUS: ReservationStatus.USED}
            await gw.relay_acked([Board("b1").frame(Action.RESERVATION_UPDATE, upd)])
            assert srv.store.get("reservations", reservation_id=77)["status"] == "used"
            srv.api.reserve("site-1", "b1", 78, 999999, "TOKEN-1")
            await gw.command()
            srv.api.cancel_reservation(78)
            _, _, inner = await gw.command()
            assert inner is not None and inner.action == Action.CANCEL_RESERVATION

    run(main())


def test_csms_s2_authorize_and_local_list(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            srv.api.add_token("AA01", AuthStatus.ACCEPTED, tariff_id=2)
            srv.api.add_token("BB02", AuthStatus.BLOCKED)
            b = Board("b1")
            got = {}
            for tok in ("AA01", "BB02", "CC03"):
                await gw.relay_acked([b.frame(Action.AUTHORIZE, {Key.ID_TOKEN: tok, Key.TOKEN_TYPE: 0})])
                _, _, ans = await gw.command()
                assert ans is not None and ans.kind == Kind.RESPONSE and ans.action == Action.AUTHORIZE
                got[tok] = ans.body
            assert got["AA01"] == {Key.AUTH_STATUS: AuthStatus.ACCEPTED, Key.TARIFF_ID: 2}
            assert got["BB02"][Key.AUTH_STATUS] == AuthStatus.BLOCKED
            assert got["CC03"][Key.AUTH_STATUS] == AuthStatus.UNKNOWN
            srv.api.send_local_list("site-1", 3)
            _, env, inner = await gw.command()
            assert inner is not None and env.body[Key.TARGETS] == []
            entries = _core.unpack(inner.body[Key.ENTRIES])
            assert [(e[Key.ID_TOKEN], e[Key.AUTH_STATUS]) for e in entries] == [("AA01", 0), ("BB02", 1)]

    run(main())


def test_csms_s3_remote_start_and_stop(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            cmd = srv.api.send("site-1", cmds.request_start(["b1"], "APP-7", 555, evse=1))
            sid, env, inner = await gw.command()
            assert inner is not None and inner.body[Key.REMOTE_START_ID] == 555
            resp = _core.encode(
                1, 2, inner.msg_id, 1, 0, Action.REQUEST_START_TRANSACTION, {Key.STATUS: 0, Key.TX_ID: 31}, K_UP
            )
            gw.accept_all(sid, env, {"b1": resp})
            await until(lambda: srv.store.get("transactions", site_id="site-1", device_id="b1", tx_id=31))
            assert srv.api.command(cmd)["results"][0]["response"]["3"] == 31
            srv.api.send("site-1", cmds.request_stop(["b1"], 31))
            assert (await gw.command())[2].body == {Key.TX_ID: 31}  # type: ignore[union-attr]

    run(main())


def test_csms_s4_s5_s6_sdr_from_transaction_events(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            srv.api.set_tariff("site-1", 2, 40, "EUR", price_min=1, price_session=50, text="0.40/kWh")
            _, env, inner = await gw.command()  # S5: signed tariff
            assert inner is not None and inner.body[Key.PRICE_KWH] == 40
            assert _core.ed25519_verify(srv.ctx.signer.public, env.body[Key.FRAME], env.body[Key.SIGNATURE])
            srv.api.send("site-1", cmds.cost_update(["b1"], 7, 123, "EUR"))  # S4
            assert (await gw.command())[2].body[Key.COST] == 123  # type: ignore[union-attr]
            b = Board("b1")
            base = {Key.TX_ID: 7, Key.EVSE: 1, Key.TRIGGER: TxTrigger.METER_VALUE_PERIODIC}
            started = {**base, Key.EVENT: TxEvent.STARTED, Key.SEQ_NO: 0, Key.ENERGY_WH: 10_000, Key.TIME: 1000,
                       Key.ID_TOKEN: "AA01", Key.TARIFF_ID: 2, Key.SIGNED_METER: b"OCMF|start"}  # fmt: skip
            updated = {**base, Key.EVENT: TxEvent.UPDATED, Key.SEQ_NO: 1, Key.ENERGY_WH: 15_000, Key.TIME: 2000}
            ended = {**base, Key.EVENT: TxEvent.ENDED, Key.SEQ_NO: 2, Key.ENERGY_WH: 22_500, Key.TIME: 4630,
                     Key.SIGNED_METER: b"OCMF|stop", Key.STOP_REASON: 0}  # fmt: skip
            await gw.relay_acked(
                [b.frame(Action.TRANSACTION_EVENT, started), b.frame(Action.TRANSACTION_EVENT, updated)]
            )
            assert srv.api.sdrs() == []
            await gw.relay_acked([b.frame(Action.TRANSACTION_EVENT, ended)], relay_id=9)
            (sdr,) = srv.api.sdrs()
            assert sdr["energy_wh"] == 12_500 and sdr["meter_start_wh"] == 10_000 and sdr["meter_stop_wh"] == 22_500
            assert (sdr["started"], sdr["stopped"]) == (1000, 4630)
            # 12.5 kWh × 40 + 61 started minutes × 1 + 50 session fee
            assert sdr["cost"] == 500 + 61 + 50 and sdr["currency"] == "EUR" and sdr["tariff_id"] == 2
            assert sdr["id_token"] == "AA01" and sdr["signed_meter"] == [b"OCMF|start", b"OCMF|stop"]
            assert sdr["sdr_id"].startswith("DE*EVE*R")
            await gw.relay_acked([b.frame(Action.TRANSACTION_EVENT, ended, msg_id=3)], relay_id=9)  # redelivered
            assert len(srv.api.sdrs()) == 1 and srv.api.sessions()[0]["state"] == "ended"

    run(main())


def test_csms_s7_15118_certificate_relay(tmp_path: Path) -> None:
    """S7: without a contract-certificate relay the request is refused at once (no stand-in
    PKI); with one (CsmsRoaming sets `ev_cert_relay`) it waits `pending` for the home CSP's
    answer, which goes to the board as the response to its request."""

    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            b = Board("b1")
            exi = b"0\x82csr-der"
            await gw.relay_acked([b.frame(Action.GET15118_EV_CERTIFICATE, {Key.EXI: exi, Key.ACTION_15118: 0})])
            sid, _, ans = await gw.command()
            assert sid == CMD_CONTROL and ans is not None and ans.kind == Kind.RESPONSE
            assert ans.body == {Key.STATUS: Status.REJECTED}
            assert srv.store.select("ev_cert_requests")[0]["status"] == "rejected"
            srv.ctx.ev_cert_relay = True
            await gw.relay_acked([b.frame(Action.GET15118_EV_CERTIFICATE, {Key.EXI: exi, Key.ACTION_15118: 1})])
            (req,) = srv.api.pending_ev_certificates()
            assert req["exi"] == exi and req["action_15118"] == 1
            assert srv.api.answer_ev_certificate("site-1", "b1", req["msg_id"], "accepted", b"0\x82chain")
            assert not srv.api.answer_ev_certificate("site-1", "b1", req["msg_id"], "accepted", b"0\x82chain")
            _, _, ans = await gw.command()
            assert ans is not None and ans.msg_id == req["msg_id"] and ans.action == Action.GET15118_EV_CERTIFICATE
            assert ans.body == {Key.STATUS: Status.ACCEPTED, Key.EXI: b"0\x82chain"}
            assert srv.api.pending_ev_certificates() == []

    run(main())
