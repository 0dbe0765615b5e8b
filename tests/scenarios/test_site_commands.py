"""Site-wide commands on the real chain (tests/scenarios/realsite.py): E2 demand response and
S5 tariff sent by the CSMS operator's API with its defaults (no targets: the whole site), as
an operator would; checked on what the boards draw and display and on what the CSMS bills.

A site-wide SetTariff or DemandResponse reaches every board online and stays in force at
the gateway (persisted): a board that comes online later gets it too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from realsite import Invariants, Site, scenario, site_id

from evedge_csms import commands as cmds
from gateway.schema import GridEvent, Status
from tools.board import Board
from tools.site.harness import board_status, board_step, board_wait, until

pytestmark = pytest.mark.timeout(120)


async def charge(b: Board, token: str) -> int:
    """The driver presents `token` and plugs in; the transaction's id once the board draws."""
    m = b.mark()
    b.cmd("card", token=token)
    auth = await board_wait(b, "auth", since=m)
    assert auth["status"] == 0, auth
    b.cmd("plug")
    tx = await board_wait(b, "tx_started", since=m)
    await board_status(b, lambda st: st["power_w"] > 0)
    return int(tx["tx_id"])


async def end(b: Board) -> None:
    m = b.mark()
    b.cmd("unplug")
    await board_wait(b, "tx_ended", since=m)


def site_result(row: dict[str, Any]) -> dict[str, Any]:
    """The result the gateway gave for the site itself (device "")."""
    assert row["state"] == "done", row
    return next(r for r in row["results"] if r["device_id"] == "")


async def restart(b: Board) -> None:
    """A power cut and the board back on: online and registered again."""
    b.stop()
    m = b.mark()
    b.start()
    await board_wait(b, "registration", since=m)


# ---------------------------------------------------------------- E2 demand response


def test_e2_site_wide_demand_response_limits_every_board_until_normal(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        api.add_token("DR-A")
        api.add_token("DR-B")
        b0, b1 = site.boards
        await charge(b0, "DR-A")
        await charge(b1, "DR-B")
        # the grid operator's emergency: the whole site at most 8 kW (the API's default: no targets)
        cmd = api.send(site_id(site), cmds.demand_response(GridEvent.EMERGENCY, limit_w=8000))
        lim = inv.limit(8000, what="demand response (emergency)")
        res = site_result(await site.command_done(cmd))
        assert res["status"] == Status.ACCEPTED, res
        sts = [await board_status(b, lambda st: 0 < st["power_w"] <= 4000) for b in site.boards]
        assert sum(st["power_w"] for st in sts) <= 8000
        # the board that powers up again while it is in force gets it from the gateway
        await restart(b1)
        await charge(b1, "DR-B")
        await board_status(b1, lambda st: 0 < st["power_w"] <= 4000)
        # `normal` ends it: each board is back at what the EV takes
        cmd = api.send(site_id(site), cmds.demand_response(GridEvent.NORMAL))
        assert site_result(await site.command_done(cmd))["status"] == Status.ACCEPTED
        inv.lift(lim)
        for b in site.boards:
            await board_status(b, lambda st: st["power_w"] > 4000)
        await end(b0)
        await end(b1)

    scenario(tmp_path, fn, boards=2)


def test_e2_demand_response_for_a_zone_leaves_the_other_boards_alone(tmp_path: Path) -> None:
    zones = {"power": {"zone": [{"zone": 1, "limit_w": 60000, "devices": ["ev-0000"]},
                                {"zone": 2, "limit_w": 60000, "devices": ["ev-0001"]}]}}  # fmt: skip

    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        api.add_token("DR-A")
        api.add_token("DR-B")
        b0, b1 = site.boards
        await charge(b0, "DR-A")
        await charge(b1, "DR-B")
        cmd = api.send(site_id(site), cmds.demand_response(GridEvent.EMERGENCY, limit_w=3000, zone=2))
        inv.limit(3000, ["ev-0001"], what="demand response, zone 2")
        assert site_result(await site.command_done(cmd))["status"] == Status.ACCEPTED
        await board_status(b1, lambda st: 0 < st["power_w"] <= 3000)
        assert (await board_status(b0))["power_w"] > 3000  # zone 1 is not concerned
        await end(b0)
        await end(b1)

    scenario(tmp_path, fn, boards=2, gateway_extra=zones)


# ---------------------------------------------------------------- S5 tariff before the session


def test_s5_site_wide_tariff_is_shown_before_the_session_and_billed(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        api.add_token("TARIFF-A")
        cmd = api.set_tariff(site_id(site), 7, 30, "EUR", price_session=50)  # no targets: the site
        row = await site.command_done(cmd)
        assert site_result(row)["status"] == Status.ACCEPTED, row
        # before any card: every board shows the price
        for b in site.boards:
            await board_status(b, lambda st: st["text"] == "EUR 0.30/kWh")
        b = site.boards[0]
        tx = await charge(b, "TARIFF-A")
        await board_step(b, 600_000)
        await end(b)
        csms = site.csms
        sdr = await until(lambda: [s for s in csms.api.sdrs() if s["tx_id"] == tx], 15, "SDR")
        assert sdr[0]["tariff_id"] == 7 and sdr[0]["currency"] == "EUR"
        assert sdr[0]["cost"] == 50 + sdr[0]["energy_wh"] * 30 // 1000

    scenario(tmp_path, fn, boards=2)


def test_s5_tariff_in_force_reaches_a_board_that_comes_online_later(tmp_path: Path) -> None:
    """The board is off while the tariff is set, and the gateway restarts before it comes
    back: the gateway kept the tariff in force (persisted) and gives it to the board."""

    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None and site.gw is not None
        api = site.csms.api
        late = site.boards[1]
        late.stop()
        gw = site.gw
        await until(lambda: "ev-0001" not in gw.online, 10, "ev-0001 offline")
        cmd = api.set_tariff(site_id(site), 9, 45, "EUR", text="0.45 EUR/kWh, no fee")
        assert site_result(await site.command_done(cmd))["status"] == Status.ACCEPTED
        await board_status(site.boards[0], lambda st: st["text"] == "0.45 EUR/kWh, no fee")
        await gw.stop()
        await site.start_gateway()
        await restart(late)
        await board_status(late, lambda st: st["text"] == "0.45 EUR/kWh, no fee")

    scenario(tmp_path, fn, boards=2)
