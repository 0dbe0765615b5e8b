"""Several EVSEs per board on the real site (real boards, gateway, CSMS over QUIC), IEC 63110-1
clause 6: "a board with several EVSEs runs a session on each at once". A twin-socket board
(`evses=2`) runs two independent service sessions and transactions at the same time — each its
own authorization, meter, contactor and limit —, the CSMS bills each separately under its own
EVSE global id, a power cut in the middle loses neither, and the site's limit holds over the sum
of both (E1; the gateway's share of the board is split among its EVSEs that draw). Also S3 (a
remote start without an EVSE takes the first free one; none free: rejected) and S1 (a
reservation for any EVSE holds a free one). Each starts where its actor starts — the drivers at
the board's two sockets, the CSMS operator's API — and checks what the world sees: each EVSE's
meter and contactor, what the CSMS stores and bills."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from realsite import Invariants, Site, api, scenario

from evedge_csms import commands as cmds
from gateway.schema import EPOCH_UNIX, Status, StopReason
from tools.site.harness import board_status, board_step, board_wait, until

pytestmark = pytest.mark.timeout(120)

TWIN = "ev-0000"
MIN_EVSE_W = 1_380
"""The gateway's default minimal share of an idle board ([power] min_evse_w)."""


def site_id(site: Site) -> str:
    assert site.gw is not None
    return str(site.gw.cfg.site.id)


async def done(site: Site, cmd_id: int) -> dict[str, Any]:
    row: dict[str, Any] = await site.command_done(cmd_id)
    assert row["state"] == "done", row
    return row


async def drive_in(site: Site, evse: int, token: str, **plug: Any) -> int:
    """A driver at the twin board's EVSE `evse`: card at its reader (accepted by the CSMS), EV
    plugged into its socket; the transaction's id."""
    b = site.boards[0]
    api(site).add_token(token)
    m = b.mark()
    b.cmd("card", token=token, evse=evse)
    auth = await board_wait(b, "auth", lambda e: e.get("evse") == evse, since=m)
    assert auth["status"] == 0, auth
    b.cmd("plug", evse=evse, **plug)
    return int((await board_wait(b, "tx_started", lambda e: e.get("evse") == evse, since=m))["tx_id"])


async def evse_status(site: Site, pred: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The twin board's EVSEs (status `evses`) once they satisfy `pred`."""
    st = await board_status(site.boards[0], lambda st: pred(st["evses"]), timeout)
    return list(st["evses"])


def tx_is(tx_id: int) -> Callable[[dict[str, Any]], bool]:
    return lambda e: bool(e["tx_id"] == tx_id)


def sdrs(site: Site) -> list[dict[str, Any]]:
    return [s for s in api(site).sdrs() if s["device_id"] == TWIN]


# ---------------------------------------------------------------- clause 6
def test_clause6_two_sessions_at_once_on_one_board_each_billed_under_its_own_evse(tmp_path: Path) -> None:
    """Two cards, two EVs, one twin board: two transactions run at the same time, each EVSE
    metering its own EV (11 kW and 3.7 kW); the CSMS bills two SDRs, each with its EVSE's energy
    and token, under two different EVSE global ids."""

    async def fn(site: Site, inv: Invariants) -> None:
        tx1 = await drive_in(site, 1, "TWIN-A")
        tx2 = await drive_in(site, 2, "TWIN-B", max_w=3_700)
        assert tx1 != tx2
        es = await evse_status(site, lambda es: es[0]["power_w"] == 11_000 and es[1]["power_w"] == 3_700)
        assert [e["tx_id"] for e in es] == [tx1, tx2] and es[0]["svc"] != es[1]["svc"]
        assert es[0]["contactor"] and es[1]["contactor"]
        b = site.boards[0]
        await board_step(b, 600_000)  # 10 min: 1.83 kWh and 0.62 kWh
        m = b.mark()
        b.cmd("unplug", evse=1)
        end1 = await board_wait(b, "tx_ended", lambda e: e["tx_id"] == tx1, since=m)
        # EVSE 2 charges on, untouched by the end of EVSE 1's session
        es = await evse_status(site, lambda es: es[0]["tx_id"] is None and es[1]["power_w"] == 3_700)
        assert not es[0]["contactor"] and es[0]["power_w"] == 0
        b.cmd("unplug", evse=2)
        end2 = await board_wait(b, "tx_ended", lambda e: e["tx_id"] == tx2, since=m)
        got = await until(lambda: len(sdrs(site)) == 2 and sdrs(site), 20, "two SDRs")
        by_tx = {s["tx_id"]: s for s in got}
        s1, s2 = by_tx[tx1], by_tx[tx2]
        assert (s1["evse"], s2["evse"]) == (1, 2)
        assert (s1["id_token"], s2["id_token"]) == ("TWIN-A", "TWIN-B")
        assert s1["energy_wh"] == end1["wh"] > 0 and s2["energy_wh"] == end2["wh"] > 0
        assert s1["energy_wh"] > s2["energy_wh"]  # each its own meter: 10 min at 11 kW and at 3.7 kW
        assert s1["session_id"] != s2["session_id"]
        assert s1["evse_gid"] and s2["evse_gid"] and s1["evse_gid"] != s2["evse_gid"]
        assert {s1["evse_gid"], s2["evse_gid"]} == {site.evse(0, 1), site.evse(0, 2)}
        txs = {t["tx_id"]: t for t in api(site).sessions() if t["device_id"] == TWIN}
        assert txs[tx1]["evse_gid"] == s1["evse_gid"] and txs[tx2]["evse_gid"] == s2["evse_gid"]

    scenario(tmp_path, fn, boards=1, evses=2)


def test_clause6_power_cut_during_two_sessions_loses_neither(tmp_path: Path) -> None:
    """Both EVSEs charging, the board's power goes: after the reboot each transaction is ended
    (power_loss) with the energy its own meter counted, and each is billed once."""

    async def fn(site: Site, inv: Invariants) -> None:
        tx1 = await drive_in(site, 1, "CUT-A")
        tx2 = await drive_in(site, 2, "CUT-B", max_w=5_000)
        b = site.boards[0]
        await evse_status(site, lambda es: es[0]["power_w"] > 0 and es[1]["power_w"] > 0)
        await board_step(b, 600_000)
        es = await evse_status(site, lambda es: es[1]["wh_in"] > 0)
        seen = [e["wh_in"] for e in es]
        b.kill()  # power cut
        b.start()
        ended = [await board_wait(b, "tx_ended", tx_is(t), since=0) for t in (tx1, tx2)]
        assert all(e["reason"] == StopReason.POWER_LOSS and e["_boot"] == b.boots for e in ended)

        def billed() -> dict[int, dict[str, Any]]:
            got = {s["tx_id"]: s for s in sdrs(site)}
            return got if set(got) == {tx1, tx2} else {}

        by_tx = await until(billed, 20, "both transactions billed")
        for i, tx in enumerate((tx1, tx2)):
            s = by_tx[tx]
            assert s["evse"] == i + 1 and s["energy_wh"] == ended[i]["wh"] > 0
            assert s["meter_stop_wh"] >= seen[i] - 1  # the meter's register survived the cut (≤ 250 ms lost)
        assert by_tx[tx1]["energy_wh"] > by_tx[tx2]["energy_wh"]
        rows = {t["tx_id"]: t for t in api(site).sessions() if t["device_id"] == TWIN}
        assert rows[tx1]["stop_reason"] == rows[tx2]["stop_reason"] == StopReason.POWER_LOSS

    scenario(tmp_path, fn, boards=1, evses=2)


# ---------------------------------------------------------------- E1
def test_e1_site_limit_holds_over_both_evses_of_a_twin_board(tmp_path: Path) -> None:
    """12 kW for the site, a twin board and a single one, three EVs that would take 11 kW each:
    the gateway shares per board (6 kW each), the twin board splits its share among its two
    EVSEs that draw (3 kW each), and the sum of the three meters stays within 12 kW (the
    invariant, sampled throughout); when one socket's EV leaves, the other socket gets the
    board's whole share."""

    async def fn(site: Site, inv: Invariants) -> None:
        await drive_in(site, 1, "E1-T1")
        await drive_in(site, 2, "E1-T2")
        one = site.boards[1]
        api(site).add_token("E1-S")
        m = one.mark()
        one.cmd("card", token="E1-S")
        one.cmd("plug")
        await board_wait(one, "tx_started", since=m)
        # two boards draw: 6 kW each; the twin board's 6 kW split over its two EVSEs
        await board_status(one, lambda st: st["power_w"] == 6_000)
        es = await evse_status(site, lambda es: es[0]["power_w"] == es[1]["power_w"] == 3_000)
        assert es[0]["contactor"] and es[1]["contactor"] and es[0]["tx_id"] != es[1]["tx_id"]
        b = site.boards[0]
        await board_step(b, 60_000)
        m = b.mark()
        b.cmd("unplug", evse=2)
        await board_wait(b, "tx_ended", lambda e: e.get("evse") == 2, since=m)
        await evse_status(site, lambda es: es[0]["power_w"] == 6_000)  # EVSE 1 gets the board's whole share
        # the single board's EV leaves: the twin board, still drawing on EVSE 1, gets what the
        # site has left but the idle board's minimal share (it is not idle for one socket's end)
        m1 = one.mark()
        one.cmd("unplug")
        await board_wait(one, "tx_ended", since=m1)
        await evse_status(site, lambda es: es[0]["power_w"] == 12_000 - MIN_EVSE_W)
        b.cmd("unplug", evse=1)
        await board_wait(b, "tx_ended", lambda e: e.get("evse") == 1, since=m)

    scenario(tmp_path, fn, boards=2, evses=[2, 1], gateway_extra={"power": {"site_limit_w": 12_000}})


# ---------------------------------------------------------------- S3
def test_s3_remote_start_without_an_evse_takes_the_free_one_and_none_free_is_rejected(tmp_path: Path) -> None:
    """EVSE 1 busy with a driver's session: the operator's remote start with no EVSE goes to
    EVSE 2 (the EV plugged there charges on the remote user's token); a third one, with both
    busy, is rejected with a reason."""

    async def fn(site: Site, inv: Invariants) -> None:
        a, b = api(site), site.boards[0]
        await drive_in(site, 1, "S3-CARD")
        m = b.mark()
        await done(site, a.send(site_id(site), cmds.request_start([TWIN], "S3-APP", 41)))
        await evse_status(site, lambda es: es[1]["svc"])  # EVSE 2's service session opened
        b.cmd("plug", evse=2)
        tx = await board_wait(b, "tx_started", lambda e: e.get("evse") == 2, since=m)
        await evse_status(site, lambda es: es[1]["power_w"] > 0 and es[1]["tx_id"] == tx["tx_id"])
        row = await until(lambda: next((t for t in a.sessions() if t["tx_id"] == tx["tx_id"]), None), 20, "tx at CSMS")
        assert row["evse"] == 2 and row["remote_start_id"] == 41 and row["id_token"] == "S3-APP"
        busy = await site.command_done(a.send(site_id(site), cmds.request_start([TWIN], "S3-APP2", 42)))
        assert busy["results"][0]["status"] == Status.REJECTED, busy
        m = b.mark()
        b.cmd("unplug", evse=1)
        b.cmd("unplug", evse=2)
        await board_wait(b, "tx_ended", lambda e: e.get("evse") == 1, since=m)
        await board_wait(b, "tx_ended", lambda e: e.get("evse") == 2, since=m)

    scenario(tmp_path, fn, boards=1, evses=2)


# ---------------------------------------------------------------- S1
def test_s1_reservation_for_any_evse_holds_a_free_one_for_its_token(tmp_path: Path) -> None:
    """EVSE 1 busy: a reservation for any EVSE holds EVSE 2 (reserved, at the CSMS too);
    another driver's card at the board's reader is refused there; the holder's card at the
    same reader starts on EVSE 2, using the reservation."""

    async def fn(site: Site, inv: Invariants) -> None:
        a, b = api(site), site.boards[0]
        await drive_in(site, 1, "S1-BUSY")
        a.add_token("S1-OTHER")
        a.add_token("S1-HOLDER")
        expiry = int(time.time()) - EPOCH_UNIX + 3_600
        row = await done(site, a.reserve(site_id(site), TWIN, 51, expiry, "S1-HOLDER"))
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        await evse_status(site, lambda es: es[1]["status"] == 2)  # ConnectorStatus reserved
        m = b.mark()
        b.cmd("card", token="S1-OTHER")  # the board's one reader: EVSE 1 busy, EVSE 2 reserved
        await board_wait(b, "card_ignored", since=m)
        b.cmd("card", token="S1-HOLDER")
        auth = await board_wait(b, "auth", lambda e: e.get("evse") == 2, since=m)
        assert auth["status"] == 0
        b.cmd("plug", evse=2)
        tx = await board_wait(b, "tx_started", lambda e: e.get("evse") == 2, since=m)

        def used() -> Any:
            t = next((t for t in a.sessions() if t["tx_id"] == tx["tx_id"]), None)
            return t if t is not None and t["reservation_id"] == 51 else None

        await until(used, 20, "the reservation used at the CSMS")
        m = b.mark()
        b.cmd("unplug", evse=1)
        b.cmd("unplug", evse=2)
        await board_wait(b, "tx_ended", lambda e: e.get("evse") == 1, since=m)
        await board_wait(b, "tx_ended", lambda e: e.get("evse") == 2, since=m)

    scenario(tmp_path, fn, boards=1, evses=2)
