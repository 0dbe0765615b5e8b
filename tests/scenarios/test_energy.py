"""Energy use cases on the real site (real boards, gateway, CSMS over QUIC): E1 (site, zone and
profile limits), E3 (the EV's needs and the composite schedule at the CSMS), E4 (the resource
manager's available power shared over the boards that draw), E5 (DSO limits across a power cut
and a gateway restart), E6 (a discharge setpoint), E7 (the setpoint loop) and E8 (frequency
droop). Each starts where its actor starts — the CSMS operator's API (also on behalf of the DSO
and the resource manager), the driver at the board, the grid's frequency at the board's input —
and checks what the world sees: the power each board's meter draws, and what the CSMS stores."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from realsite import Invariants, Site, api, scenario

from evedge_csms import commands as cmds
from gateway.schema import Key, Status
from tools.site.harness import board_status, board_step, board_wait, until

pytestmark = pytest.mark.timeout(120)

RATING_W = 11_000
"""The simulated board's rating (firmware/boards/sim.py), also its EV's default demand."""
MIN_EVSE_W = 1_380
"""The gateway's default minimal share of an idle board ([power] min_evse_w)."""


def site_id(site: Site) -> str:
    assert site.gw is not None
    return str(site.gw.cfg.site.id)


async def start_session(site: Site, i: int, token: str, **plug: Any) -> int:
    """The driver at board i: card (accepted by the CSMS), plug; the transaction's id."""
    b = site.boards[i]
    api(site).add_token(token)
    m = b.mark()
    b.cmd("card", token=token)
    auth = await board_wait(b, "auth", since=m)
    assert auth["status"] == 0, auth
    b.cmd("plug", **plug)
    tx = await board_wait(b, "tx_started", since=m)
    return int(tx["tx_id"])


async def end_session(site: Site, i: int) -> None:
    b = site.boards[i]
    m = b.mark()
    b.cmd("unplug")
    await board_wait(b, "tx_ended", since=m)


async def power(site: Site, i: int, pred: Callable[[int], bool], timeout: float = 10.0) -> int:
    """Board i's metered power once it satisfies `pred`."""
    st = await board_status(site.boards[i], lambda st: pred(int(st["power_w"])), timeout)
    return int(st["power_w"])


async def done(site: Site, cmd_id: int) -> dict[str, Any]:
    row: dict[str, Any] = await site.command_done(cmd_id)
    assert row["state"] == "done", row
    return row


def bare_status(row: dict[str, Any]) -> int:
    """The status of a bare request's answer (AvailablePower: its response body is the result)."""
    return int(row["results"][0][str(int(Key.STATUS))])


# ---------------------------------------------------------------- E1
def test_e1_site_limit_holds_without_any_command(tmp_path: Path) -> None:
    """10 kW for the site, two EVs that would take 11 kW each: they share 10 kW from the first
    watt, with no command from anyone; when one leaves, the other gets what is left."""

    async def fn(site: Site, inv: Invariants) -> None:
        await start_session(site, 0, "E1-A")
        a = await power(site, 0, lambda w: w > 0)
        assert a <= 10_000 - MIN_EVSE_W  # the idle board keeps its minimal share
        await start_session(site, 1, "E1-B")
        await power(site, 1, lambda w: w > 0)
        sts = [await board_status(b) for b in site.boards]
        assert sum(int(st["power_w"]) for st in sts) <= 10_000, sts
        await board_step(site.boards[0], 60_000)
        await end_session(site, 0)
        await power(site, 1, lambda w: w > 5_000)  # B takes over the share A left
        await board_step(site.boards[1], 60_000)
        await end_session(site, 1)

    scenario(tmp_path, fn, boards=2, gateway_extra={"power": {"site_limit_w": 10_000}})


def test_e1_zone_limit_holds_without_any_command(tmp_path: Path) -> None:
    """A zone of two boards limited to 6 kW, a third board outside it: the zone's boards share
    6 kW, the third charges at its full rating."""

    async def fn(site: Site, inv: Invariants) -> None:
        for i in range(3):
            await start_session(site, i, f"E1-Z{i}")
        await power(site, 2, lambda w: w == RATING_W)
        w0 = await power(site, 0, lambda w: w > 0)
        w1 = await power(site, 1, lambda w: w > 0)
        assert w0 + w1 <= 6_000
        for i in range(3):
            await end_session(site, i)

    zone = [{"zone": 1, "limit_w": 6_000, "devices": ["ev-0000", "ev-0001"]}]
    scenario(tmp_path, fn, boards=3, gateway_extra={"power": {"zone": zone}})


def test_e1_operator_charging_profile_caps_a_board_and_clearing_lifts_it(tmp_path: Path) -> None:
    """The operator's charging profile (3 kW, tx_default) on one board: obeyed during the
    session; a profile above the hardware's rating is refused with a reason; clearing the
    profile gives the EV its full power back. The gateway's own share survives the clear."""

    async def fn(site: Site, inv: Invariants) -> None:
        sid = site_id(site)
        await start_session(site, 0, "E1-P")
        await power(site, 0, lambda w: w == RATING_W)
        cap = cmds.set_charging_profile(["ev-0000"], 1, 7, [cmds.period(0, 3_000)])
        row = await done(site, api(site).send(sid, cap))
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        lim = inv.limit(3_000, ["ev-0000"], 0.0, "operator profile")
        assert await power(site, 0, lambda w: 0 < w <= 3_000) == 3_000
        too_much = cmds.set_charging_profile(["ev-0000"], 1, 8, [cmds.period(0, 50_000)])
        row = await done(site, api(site).send(sid, too_much))
        assert row["results"][0]["status"] != Status.ACCEPTED and "rating" in row["results"][0]["reason"], row
        await power(site, 0, lambda w: w == 3_000)  # the refused profile changed nothing
        inv.lift(lim)
        row = await done(site, api(site).send(sid, cmds.clear_charging_profile(["ev-0000"])))
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        await power(site, 0, lambda w: w == RATING_W)
        await end_session(site, 0)

    scenario(tmp_path, fn, boards=1)


# ---------------------------------------------------------------- E3
def test_e3_ev_needs_reach_the_csms_and_the_composite_schedule_shows_the_share(tmp_path: Path) -> None:
    """The EV announces its needs at plug-in: the CSMS stores them (what it plans with); the
    CSMS asks the board what it may draw (GetCompositeSchedule): the board's answer is its share
    of the site's 10 kW, reaching the CSMS's command record; an unknown EVSE is refused."""

    async def fn(site: Site, inv: Invariants) -> None:
        sid = site_id(site)
        csms = site.csms
        assert csms is not None
        await start_session(site, 0, "E3-A", needs=[20_000, 7_200, 40])
        rows = await until(lambda: csms.store.select("ev_needs"), 10, "EV needs at the CSMS")
        assert rows[0]["device_id"] == "ev-0000" and rows[0]["body"][str(int(Key.ENERGY_NEEDED_WH))] == 20_000
        w = await power(site, 0, lambda w: w > 0)
        row = await done(site, api(site).send(sid, cmds.get_composite_schedule(["ev-0000"], 1, 3_600)))
        res = row["results"][0]
        assert res["status"] == Status.ACCEPTED, row
        periods = res["response"][str(int(Key.PERIODS))]
        assert periods[0][str(int(Key.LIMIT_W))] == w <= 10_000 - MIN_EVSE_W
        row = await done(site, api(site).send(sid, cmds.get_composite_schedule(["ev-0000"], 9, 3_600)))
        assert row["results"][0]["status"] != Status.ACCEPTED, row
        await end_session(site, 0)

    scenario(tmp_path, fn, boards=2, gateway_extra={"power": {"site_limit_w": 10_000}})


# ---------------------------------------------------------------- E4
def test_e4_available_power_is_shared_over_the_boards_that_draw(tmp_path: Path) -> None:
    """The resource manager grants 8 kW: one board charging, one idle → the charging board gets
    all but the idle board's minimal share; a second session → they share; the first ends → the
    second gets it back; the grant raised → both at full power."""

    async def fn(site: Site, inv: Invariants) -> None:
        sid = site_id(site)
        await start_session(site, 0, "E4-A")
        await power(site, 0, lambda w: w == RATING_W)
        row = await done(site, api(site).available_power(sid, 8_000))
        assert bare_status(row) == Status.ACCEPTED, row
        lim = inv.limit(8_000, None, 3.0, "resource manager")
        assert await power(site, 0, lambda w: w == 8_000 - MIN_EVSE_W)
        await start_session(site, 1, "E4-B")
        await power(site, 1, lambda w: w == 4_000)
        await power(site, 0, lambda w: w == 4_000)
        await board_step(site.boards[0], 60_000)
        await end_session(site, 0)
        await power(site, 1, lambda w: w == 8_000 - MIN_EVSE_W)
        inv.lift(lim)
        row = await done(site, api(site).available_power(sid, 40_000))
        assert bare_status(row) == Status.ACCEPTED, row
        await power(site, 1, lambda w: w == RATING_W)
        await end_session(site, 1)

    scenario(tmp_path, fn, boards=2)


def test_e4_available_power_for_one_zone_leaves_the_others_alone(tmp_path: Path) -> None:
    """The resource manager of zone 2 grants it 4 kW: its board is held to it, the board of
    zone 1 keeps its full power."""

    async def fn(site: Site, inv: Invariants) -> None:
        sid = site_id(site)
        for i in range(2):
            await start_session(site, i, f"E4-Z{i}")
        row = await done(site, api(site).available_power(sid, 4_000, zone=2))
        assert bare_status(row) == Status.ACCEPTED, row
        inv.limit(4_000, ["ev-0001"], 3.0, "resource manager, zone 2")
        await power(site, 1, lambda w: 0 < w <= 4_000)
        await power(site, 0, lambda w: w == RATING_W)
        for i in range(2):
            await end_session(site, i)

    zones = [
        {"zone": 1, "limit_w": 60_000, "devices": ["ev-0000"]},
        {"zone": 2, "limit_w": 60_000, "devices": ["ev-0001"]},
    ]
    scenario(tmp_path, fn, boards=2, gateway_extra={"power": {"zone": zones}})


# ---------------------------------------------------------------- E5
def test_e5_dso_limit_survives_a_power_cut_and_a_gateway_restart(tmp_path: Path) -> None:
    """The DSO limits the site to 3 kW: held within the deadline; a charging board loses power
    and comes back: it charges within the limit again; the gateway restarts: the limit still
    holds for a new session; the DSO lifts the limit: full power again."""

    async def fn(site: Site, inv: Invariants) -> None:
        sid = site_id(site)
        await start_session(site, 0, "E5-A")
        await power(site, 0, lambda w: w == RATING_W)
        row = await done(site, api(site).send_limit(sid, 3_000, deadline_ms=2_000))
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        lim = inv.limit(3_000, None, 2.0, "DSO")
        await power(site, 0, lambda w: 0 < w <= 3_000)
        b = site.boards[0]
        b.kill()  # power cut
        b.start()
        await board_wait(b, "registration", since=0, pred=lambda e: e["_boot"] == b.boots)
        await start_session(site, 0, "E5-A")
        await power(site, 0, lambda w: 0 < w <= 3_000)
        await board_step(b, 60_000)
        await end_session(site, 0)
        gw = site.gw
        assert gw is not None
        await gw.stop()
        await site.start_gateway()
        await until(lambda: site.gw is not None and len(site.gw.online) == 2, 20, "boards back online")
        await start_session(site, 1, "E5-B")
        await power(site, 1, lambda w: 0 < w <= 3_000)
        row = await done(site, api(site).send_limit(sid, 100_000, deadline_ms=2_000))
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        inv.lift(lim)
        await power(site, 1, lambda w: w == RATING_W)
        await end_session(site, 1)

    scenario(tmp_path, fn, boards=2)


def test_e5_dso_limit_holds_on_a_board_rebooted_while_the_gateway_is_away(tmp_path: Path) -> None:
    """The DSO limit (2 kW for the site) reached the board; the gateway goes away; the board
    loses power, reboots offline and a driver starts an offline session: the board still keeps
    to the DSO limit (on its flash)."""

    async def fn(site: Site, inv: Invariants) -> None:
        sid = site_id(site)
        row = await done(site, api(site).send_limit(sid, 2_000, deadline_ms=2_000))
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        inv.limit(2_000, None, 2.0, "DSO")
        await start_session(site, 0, "E5-OFF")  # the token is now in the site's cache
        await power(site, 0, lambda w: 0 < w <= 2_000)
        await board_step(site.boards[0], 60_000)
        await end_session(site, 0)
        gw = site.gw
        assert gw is not None
        await gw.stop()
        b = site.boards[0]
        b.kill()
        b.start()
        await board_wait(b, "boot", since=0, pred=lambda e: e["_boot"] == b.boots)
        m = b.mark()
        b.cmd("card", token="E5-OFF")
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)
        await power(site, 0, lambda w: 0 < w <= 2_000)
        await site.start_gateway()
        await until(lambda: site.gw is not None and len(site.gw.online) == 2, 20, "boards back online")
        await power(site, 0, lambda w: 0 < w <= 2_000)
        await end_session(site, 0)

    scenario(tmp_path, fn, boards=2)


# ---------------------------------------------------------------- E6, E7
def test_e7_setpoints_are_followed_and_recorded_as_answered(tmp_path: Path) -> None:
    """The operator starts the fast loop and sends setpoints: the board follows them, the CSMS
    records each Setpoint as delivered (not as a timeout) and stores the measured values the
    board reports, its setpoint with them."""

    async def fn(site: Site, inv: Invariants) -> None:
        sid = site_id(site)
        csms = site.csms
        assert csms is not None
        await start_session(site, 0, "E7-A")
        await power(site, 0, lambda w: w == RATING_W)
        row = await done(site, api(site).send(sid, cmds.start_setpoint_loop(["ev-0000"], 1, 200)))
        assert row["results"][0]["status"] == Status.ACCEPTED, row

        async def follow(sp: int) -> None:
            row = await done(site, api(site).send(sid, cmds.setpoint(["ev-0000"], 1, sp)))
            assert row["results"][0]["status"] == Status.ACCEPTED, row
            await power(site, 0, lambda w: w == sp)
            await until(lambda: [r for r in csms.store.select("measurements")
                                 if r["setpoint_w"] == sp and r["power_w"] == sp], 10,
                        f"measured values with setpoint {sp} at the CSMS")  # fmt: skip

        await follow(5_000)
        await follow(2_500)
        row = await done(site, api(site).send(sid, cmds.setpoint(["ev-0000"], 1, 50_000)))
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        await power(site, 0, lambda w: w == RATING_W)  # clipped to what the board can do
        await end_session(site, 0)

    scenario(tmp_path, fn, boards=1)


def test_e6_discharge_setpoint_discharges_only_a_v2g_ev(tmp_path: Path) -> None:
    """A negative setpoint: a V2G EV feeds 4 kW to the grid, the command recorded as
    delivered and the CSMS sees the negative power; an EV without V2G is not discharged."""

    async def fn(site: Site, inv: Invariants) -> None:
        sid = site_id(site)
        csms = site.csms
        assert csms is not None
        await start_session(site, 0, "E6-V2G", v2g=True)
        await start_session(site, 1, "E6-PLAIN")
        row = await done(site, api(site).send(sid, cmds.setpoint(["ev-0000", "ev-0001"], 1, -4_000)))
        assert [r["status"] for r in row["results"]] == [Status.ACCEPTED] * 2, row
        await power(site, 0, lambda w: w == -4_000)
        await power(site, 1, lambda w: w == 0)
        await until(lambda: [r for r in csms.store.select("measurements")
                             if r["device_id"] == "ev-0000" and r["power_w"] == -4_000], 10,
                    "the discharge measured at the CSMS")  # fmt: skip
        await board_step(site.boards[0], 60_000)
        for i in range(2):
            await end_session(site, i)

    scenario(tmp_path, fn, boards=2)


# ---------------------------------------------------------------- E8
def test_e8_frequency_droop_lowers_power_and_reports_what_it_did(tmp_path: Path) -> None:
    """The operator sets a droop curve; the grid's frequency falls to 49.8 Hz: the board lowers
    its power along the curve and the CSMS stores its FrequencyResponse; the frequency comes
    back into the dead band: full power again. A curve of one point is refused."""

    async def fn(site: Site, inv: Invariants) -> None:
        sid = site_id(site)
        csms = site.csms
        assert csms is not None
        curve = [(49_700, 0), (49_900, RATING_W)]
        row = await done(site, api(site).send(sid, cmds.set_frequency_droop(["ev-0000"], curve, 50)))
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        bad = cmds.set_frequency_droop(["ev-0000"], [(49_700, 0)], 50)
        row = await done(site, api(site).send(sid, bad))
        assert row["results"][0]["status"] != Status.ACCEPTED, row
        await start_session(site, 0, "E8-A")
        await power(site, 0, lambda w: w == RATING_W)
        b = site.boards[0]
        b.cmd("freq", mhz=49_800)
        await power(site, 0, lambda w: w == RATING_W // 2)
        await until(lambda: [r for r in csms.store.select("measurements")
                             if r["kind"] == "frequency" and r["freq_mhz"] == 49_800], 10,
                    "the frequency response at the CSMS")  # fmt: skip
        b.cmd("freq", mhz=50_010)
        await power(site, 0, lambda w: w == RATING_W)
        await end_session(site, 0)

    scenario(tmp_path, fn, boards=1)
