"""What the site tells the CSMS of itself, on the real site (real boards, gateway, CSMS over
QUIC): E3 (the site's forecast: what its sessions need over the coming hours, from the EVs'
needs, so that the CSMS can ask the resource manager for it) and M1 (the site's inventory: its
boards, their EVSEs, firmware and status). Each starts where its actor starts — the driver at
the board, the CSMS operator's API — and checks what the operator reads at the CSMS
(`api.forecast`, `api.boards`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from realsite import Invariants, Site, api, scenario

from gateway.localcsms.forecast import energy_wh
from tools.site.harness import board_wait, until

pytestmark = pytest.mark.timeout(120)

FAST = {"upstream": {"reports_interval_s": 0.3}}
"""Reports at most every 0.3 s (default 60 s), so that each change shows within the scenario."""
RATING_W = 11_000
"""The simulated board's rating (firmware/boards/sim.py)."""
HOUR = 3_600


def sid(site: Site) -> str:
    assert site.gw is not None
    return str(site.gw.cfg.site.id)


async def start_session(site: Site, i: int, token: str, known: bool = False, **plug: Any) -> None:
    """The driver at board i: card (accepted by the CSMS; `known`: already known to the site),
    plug (the EV tells its needs)."""
    b = site.boards[i]
    if not known:
        api(site).add_token(token)
    m = b.mark()
    b.cmd("card", token=token)
    assert (await board_wait(b, "auth", since=m))["status"] == 0
    b.cmd("plug", **plug)
    await board_wait(b, "tx_started", since=m)


async def end_session(site: Site, i: int) -> None:
    b = site.boards[i]
    m = b.mark()
    b.cmd("unplug")
    await board_wait(b, "tx_ended", since=m)


def periods(row: dict[str, Any] | None) -> list[tuple[int, int]]:
    return [] if row is None else [(p["start_s"], p["limit_w"]) for p in row["forecast"]]


async def forecast(site: Site, pred: Any, zone: int | None = None, what: str = "forecast") -> list[tuple[int, int]]:
    """The site's (zone's) forecast in force at the CSMS, once it satisfies `pred`."""
    try:
        got = await until(lambda: (p := periods(api(site).forecast(sid(site), zone))) and pred(p) and p, 15, what)
    except TimeoutError as e:
        raise AssertionError(f"{what}: the CSMS holds {periods(api(site).forecast(sid(site), zone))}") from e
    return list(got)


def near(a: float, b: float, rel: float = 0.02) -> bool:
    return abs(a - b) <= rel * b


# ---------------------------------------------------------------- E3
def test_e3_ev_needs_make_the_site_forecast_at_the_csms_and_it_follows_the_sessions(tmp_path: Path) -> None:
    """Nothing charges: the site forecasts 0 W. An EV needs 5.5 kWh within the hour: the CSMS
    reads 5.5 kW for an hour, then nothing, for the site and for its zone. A second EV needs
    2 kWh within half an hour: 9.5 kW, then 5.5 kW, then nothing. The second leaves: back to
    5.5 kW for the hour; the first leaves: 0 W."""

    async def fn(site: Site, inv: Invariants) -> None:
        assert await forecast(site, lambda p: p == [(0, 0)], what="an empty forecast on connect")
        await start_session(site, 0, "E3-A", needs=[5_500, HOUR, 20])
        one = await forecast(site, lambda p: len(p) == 2, what="one session's needs")
        (t0, w0), (t1, w1) = one
        assert t0 == 0 and near(w0, 5_500) and near(t1, HOUR) and w1 == 0, one
        assert near(energy_wh(one, 2 * HOUR), 5_500), one
        zone = await forecast(site, lambda p: len(p) == 2, zone=1, what="the zone's forecast")
        assert near(energy_wh(zone, 2 * HOUR), 5_500), zone

        await start_session(site, 1, "E3-B", needs=[2_000, HOUR // 2, 50])
        two = await forecast(site, lambda p: len(p) == 3, what="two sessions' needs")
        assert two[0][0] == 0 and near(two[1][0], HOUR // 2) and near(two[2][0], HOUR), two
        assert near(two[0][1], 5_500 + 4_000) and near(two[1][1], 5_500) and two[2][1] == 0, two
        assert near(energy_wh(two, 2 * HOUR), 7_500), two

        await end_session(site, 1)
        back = await forecast(site, lambda p: len(p) == 2, what="the second session gone")
        assert near(back[0][1], 5_500) and near(energy_wh(back, 2 * HOUR), 5_500, 0.03), back
        await end_session(site, 0)
        assert await forecast(site, lambda p: p == [(0, 0)], what="nothing left to draw")
        assert await forecast(site, lambda p: p == [(0, 0)], zone=1, what="nothing left in the zone")

    scenario(tmp_path, fn, boards=2, gateway_extra=FAST)


def test_e3_session_without_needs_is_forecast_at_its_rate_and_a_forecast_missed_offline_is_not_replayed(
    tmp_path: Path,
) -> None:
    """An EV that tells no needs is forecast at what its board draws, for as long as anyone
    knows. The CSMS goes away; meanwhile that session ends and another EV needing 3 kWh in
    the hour arrives. Forecasts are not durable: when the CSMS is back, the first forecast it
    gets is the present (3 kW for the hour), never the ones it missed."""

    async def fn(site: Site, inv: Invariants) -> None:
        await start_session(site, 0, "E3-C")
        assert await forecast(site, lambda p: p == [(0, RATING_W)], what="an open-ended session at its rate")
        seen = len(api(site).forecasts(sid(site)))
        await site.stop_csms()
        await end_session(site, 0)
        await start_session(site, 1, "E3-C", known=True, needs=[3_000, HOUR, 30])  # the site's cache knows the card
        gw = site.gw
        assert gw is not None
        await until(lambda: gw.reports.forecast_due.dirty, 10, "a forecast owed while the CSMS is away")
        await site.start_csms()
        now = await forecast(site, lambda p: len(p) == 2, what="the present after the reconnect")
        assert near(now[0][1], 3_000) and near(now[1][0], HOUR), now
        after = api(site).forecasts(sid(site))[seen:]
        assert after and all(periods(r) != [(0, RATING_W)] and periods(r) != [(0, 0)] for r in after), after
        await end_session(site, 1)

    scenario(tmp_path, fn, boards=2, gateway_extra=FAST)


# ---------------------------------------------------------------- M1
def test_m1_boards_report_lists_every_board_with_its_firmware_and_follows_status_and_deregistration(
    tmp_path: Path,
) -> None:
    """The CSMS reads the site's inventory: both boards, each EVSE with its global id, rating,
    model, vendor, serial and the firmware the board booted with, available. A plug-in makes
    the EVSE occupied; the operator deregisters one board: it leaves the site's report."""

    async def fn(site: Site, inv: Invariants) -> None:
        a = api(site)
        stations = {r["device_id"]: r for r in a.stations()}

        def listed() -> list[dict[str, Any]]:
            return [r for r in a.boards(sid(site)) if r["max_power_w"]]

        rows = await until(lambda: len(listed()) == 2 and listed(), 15, "both boards discovered")
        for r, did in zip(rows, site.devices, strict=True):
            st = stations[did]
            assert r["device_id"] == did and r["evse"] == 1 and r["evse_gid"] == site.evse(site.devices.index(did))
            assert (r["model"], r["vendor"], r["serial"], r["fw_version"]) == (
                st["model"], st["vendor"], st["serial"], st["fw_version"]), (r, st)  # fmt: skip
            assert r["fw_version"] and r["max_power_w"] == RATING_W and r["registration"] == "accepted", r
        await until(lambda: [r["evse_status"] for r in a.boards(sid(site))] == ["available"] * 2, 15, "available")

        site.boards[0].cmd("plug")
        await until(lambda: a.boards(sid(site))[0]["evse_status"] == "occupied", 15, "the EVSE occupied")
        site.boards[0].cmd("unplug")
        await until(lambda: a.boards(sid(site))[0]["evse_status"] == "available", 15, "the EVSE available again")

        await site.command_done(a.deregister(sid(site), "ev-0001"))
        left = await until(lambda: (b := a.boards(sid(site))) and len(b) == 1 and b, 15, "ev-0001 gone")
        assert left[0]["device_id"] == "ev-0000", left

    scenario(tmp_path, fn, boards=2, gateway_extra=FAST)


def test_m1_a_board_that_loses_power_is_reported_unknown_then_back_with_what_it_booted(tmp_path: Path) -> None:
    """A board loses power: the CSMS reads its EVSE as unknown (the site does not know what it
    is doing), the other one unchanged. It boots again: available, discovered anew."""

    async def fn(site: Site, inv: Invariants) -> None:
        a = api(site)

        def status() -> list[str]:
            return [r["evse_status"] for r in a.boards(sid(site))]

        await until(lambda: status() == ["available"] * 2, 15, "both available")
        b = site.boards[1]
        b.kill()  # power cut
        await until(lambda: status() == ["available", "unknown"], 15, "the board without power unknown")
        b.start()
        await board_wait(b, "registration", since=0, pred=lambda e: e["_boot"] == b.boots)
        await until(lambda: status() == ["available"] * 2, 15, "back and available")
        assert a.boards(sid(site))[1]["max_power_w"] == RATING_W

    scenario(tmp_path, fn, boards=2, gateway_extra=FAST)
