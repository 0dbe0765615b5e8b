"""Authorization, reservation and privacy on the real chain (tests/scenarios/realsite.py):
S2 the driver's card at the board, online and offline (the gateway's local list and cache),
S1 reservations made and cancelled from the CSMS operator's API, M10 the deletion of a
user's data from the CSMS's API reaching the gateway and every board.

While the uplink is up the gateway asks the CSMS about every card (its cache is for
offline use) unless the operator set a trust window (`auth.online_trust_s`, docs/gateway.md);
offline, the site's local list comes first, then the cache, each with its expiry."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from realsite import Invariants, Site, scenario, site_id

from evedge_csms.errors import CsmsError
from gateway.link import proto_ts
from gateway.schema import Action, AuthStatus, ConnectorStatus, ReservationStatus, Status
from tools.board import Board
from tools.site.harness import board_status, board_step, board_wait, until

pytestmark = pytest.mark.timeout(120)


async def card(b: Board, token: str) -> dict[str, Any]:
    """The driver presents `token`: the board's decision (its `auth` note)."""
    m = b.mark()
    b.cmd("card", token=token)
    return await board_wait(b, "auth", since=m)


async def plug_and_charge(b: Board) -> int:
    m = b.mark()
    b.cmd("plug")
    tx = await board_wait(b, "tx_started", since=m)
    await board_status(b, lambda st: st["power_w"] > 0)
    return int(tx["tx_id"])


async def unplug(b: Board) -> None:
    m = b.mark()
    b.cmd("unplug")
    await board_wait(b, "tx_ended", since=m)


async def uplink_down(site: Site) -> Any:
    """The CSMS stops; the gateway has noticed (its uplink is no longer up). Returns the CSMS
    for `uplink_up` (site.csms is None meanwhile: the invariants read no decisions then)."""
    csms = site.csms
    await site.stop_csms()
    site.csms = None
    gw = site.gw
    assert gw is not None
    await until(lambda: gw.runner is not None and not gw.runner.ready, 15, "uplink down")
    return csms


async def uplink_up(site: Site, csms: Any, gateway_too: bool = False) -> None:
    """The CSMS back (and the gateway, stopped meanwhile, with `gateway_too`); the uplink up."""
    site.csms = csms
    await site.start_csms()
    if gateway_too:
        await site.start_gateway()
    gw = site.gw
    assert gw is not None
    await until(lambda: gw.runner is not None and gw.runner.ready, 20, "uplink up")


def site_result(row: dict[str, Any]) -> dict[str, Any]:
    assert row["state"] == "done", row
    return next(r for r in row["results"] if r["device_id"] == "")


# ---------------------------------------------------------------- S2 online


def test_s2_token_blocked_at_the_csms_after_its_first_use_is_refused_online(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        api.add_token("STOLEN-1")
        b0, b1 = site.boards
        assert (await card(b0, "STOLEN-1"))["status"] == AuthStatus.ACCEPTED
        await plug_and_charge(b0)
        await unplug(b0)
        api.add_token("STOLEN-1", auth_status=AuthStatus.BLOCKED)  # the card was reported stolen
        assert (await card(b1, "STOLEN-1"))["status"] == AuthStatus.BLOCKED
        b1.cmd("plug")
        st = await board_status(b1, lambda st: st["cp"] != 0 and st["svc"])
        assert st["tx_id"] is None and st["power_w"] == 0 and not st["contactor"]

    scenario(tmp_path, fn, boards=2)


def test_s2_operator_trust_window_lets_the_cache_answer_while_online(tmp_path: Path) -> None:
    """The operator's choice (`auth.online_trust_s`): a cached answer younger than the window
    is given without asking the CSMS, so a block reaches the site only after the window."""

    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        api.add_token("TRUSTED-1")
        b0, b1 = site.boards
        assert (await card(b0, "TRUSTED-1"))["status"] == AuthStatus.ACCEPTED
        api.add_token("TRUSTED-1", auth_status=AuthStatus.BLOCKED)
        assert (await card(b1, "TRUSTED-1"))["status"] == AuthStatus.ACCEPTED

    scenario(tmp_path, fn, boards=2, gateway_extra={"auth": {"online_trust_s": 3600}})


# ---------------------------------------------------------------- S2 offline


def test_s2_offline_the_local_list_beats_the_cache_and_blocked_or_expired_cards_are_refused(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        b = site.boards[0]
        soon = proto_ts(time.time()) + 3
        for tok in ("CACHED", "FLIP"):
            api.add_token(tok)
        api.add_token("SOON", expiry=soon)
        for tok in ("CACHED", "FLIP", "SOON"):  # used online: the gateway's cache has them
            assert (await card(b, tok))["status"] == AuthStatus.ACCEPTED, tok
        # the operator's local list for the site: FLIP blocked since, LISTED never used here
        api.add_token("FLIP", auth_status=AuthStatus.BLOCKED)
        api.add_token("LISTED")
        row = await site.command_done(api.send_local_list(site_id(site), 3))
        assert site_result(row)["status"] == Status.ACCEPTED
        csms = await uplink_down(site)
        assert (await card(b, "CACHED"))["status"] == AuthStatus.ACCEPTED
        assert (await card(b, "LISTED"))["status"] == AuthStatus.ACCEPTED
        assert (await card(b, "FLIP"))["status"] == AuthStatus.BLOCKED  # the list beats the cache
        assert (await card(b, "STRANGER"))["status"] == AuthStatus.UNKNOWN
        await until(lambda: proto_ts(time.time()) > soon, 10, "SOON expired")
        assert (await card(b, "SOON"))["status"] == AuthStatus.EXPIRED
        b.cmd("plug")
        st = await board_status(b, lambda st: st["cp"] != 0)
        assert st["tx_id"] is None and st["power_w"] == 0
        await uplink_up(site, csms)

    scenario(tmp_path, fn, boards=1)


# ---------------------------------------------------------------- M10 privacy


def test_m10_deleted_card_is_refused_offline_at_the_gateway_and_at_every_board(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None and site.gw is not None
        csms = site.csms
        api = csms.api
        api.add_token("PRIV-1")
        b0, b1 = site.boards
        for b in (b0, b1):  # used online: the gateway's and each board's cache have it
            assert (await card(b, "PRIV-1"))["status"] == AuthStatus.ACCEPTED
        assert site_result(await site.command_done(api.send_local_list(site_id(site), 1)))["status"] == 0
        request = api.delete_personal_data("PRIV-1")  # the API's default: every site, whole
        cmd = next(c for c in csms.store.select("commands") if c["ref"] == str(request)
                   and c["action"] == Action.DELETE_PERSONAL_DATA)  # fmt: skip
        row = await site.command_done(cmd["cmd_id"])
        assert site_result(row)["status"] == Status.ACCEPTED, row
        boards = {r["device_id"]: r["status"] for r in row["results"] if r["device_id"]}
        assert boards == {"ev-0000": Status.ACCEPTED, "ev-0001": Status.ACCEPTED}, row["results"]
        assert csms.store.get("tokens", id_token="PRIV-1") is None
        # the site offline: the gateway's list and cache no longer know the card
        csms = await uplink_down(site)
        assert (await card(b0, "PRIV-1"))["status"] == AuthStatus.UNKNOWN
        # the gateway away too: the board's own cache no longer knows it either
        await site.gw.stop()
        await board_status(b1, lambda st: not st["online"])
        d = await card(b1, "PRIV-1")
        assert d["status"] == AuthStatus.UNKNOWN and d["source"] == "offline", d
        await uplink_up(site, csms, gateway_too=True)

    scenario(tmp_path, fn, boards=2)


def test_m10_a_board_offline_during_the_deletion_forgets_the_card_when_it_is_back(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None and site.gw is not None
        csms, gw = site.csms, site.gw
        api = csms.api
        api.add_token("PRIV-2")
        b1 = site.boards[1]
        assert (await card(b1, "PRIV-2"))["status"] == AuthStatus.ACCEPTED  # in the board's cache
        b1.stop()
        await until(lambda: "ev-0001" not in gw.online, 10, "ev-0001 offline")
        request = api.delete_personal_data("PRIV-2")
        cmd = next(c for c in csms.store.select("commands") if c["ref"] == str(request)
                   and c["action"] == Action.DELETE_PERSONAL_DATA)  # fmt: skip
        assert site_result(await site.command_done(cmd["cmd_id"]))["status"] == Status.ACCEPTED
        m = b1.mark()
        b1.start()
        await board_wait(b1, "registration", since=m)
        await until(lambda: not gw.sitewide.pending_deletions(), 15, "deletion delivered to ev-0001")
        # the site away: the board's own cache no longer knows the card
        csms = await uplink_down(site)
        await gw.stop()
        await board_status(b1, lambda st: not st["online"])
        d = await card(b1, "PRIV-2")
        assert d["status"] == AuthStatus.UNKNOWN and d["source"] == "offline", d
        await uplink_up(site, csms, gateway_too=True)

    scenario(tmp_path, fn, boards=2)


# ---------------------------------------------------------------- S1 reservations


def connector_state(site: Site, device_id: str) -> int | None:
    assert site.csms is not None
    rows = site.csms.store.select("evses", {"device_id": device_id})
    return int(rows[0]["state"]) if rows else None


def reservation(site: Site, rid: int) -> dict[str, Any]:
    assert site.csms is not None
    row = site.csms.store.get("reservations", reservation_id=rid)
    assert row is not None
    return dict(row)


def updates(site: Site, rid: int) -> list[int]:
    assert site.csms is not None
    return [int(r["res_status"]) for r in site.csms.store.select("reservation_updates", {"reservation_id": rid})]


async def reserve(
    site: Site, device: str, rid: int, token: str, in_s: int = 600, evse: int | None = 1
) -> dict[str, Any]:
    """The operator reserves; the board's result."""
    assert site.csms is not None
    cmd = site.csms.api.reserve(site_id(site), device, rid, proto_ts(time.time()) + in_s, token, evse)
    row = await site.command_done(cmd)
    assert row["state"] == "done", row
    return dict(row["results"][0])


def test_s1_reserved_evse_refuses_another_token_and_serves_its_own(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        for tok in ("RES-OWNER", "RES-OTHER"):
            api.add_token(tok)
        b = site.boards[0]
        assert (await reserve(site, "ev-0000", 11, "RES-OWNER"))["status"] == Status.ACCEPTED
        await until(lambda: connector_state(site, "ev-0000") == ConnectorStatus.RESERVED, 10, "reserved at the CSMS")
        assert (await card(b, "RES-OTHER"))["status"] == "reserved"
        b.cmd("plug")
        st = await board_status(b, lambda st: st["cp"] != 0)
        assert st["tx_id"] is None and st["power_w"] == 0
        assert (await card(b, "RES-OWNER"))["status"] == AuthStatus.ACCEPTED
        tx = await board_wait(b, "tx_started")
        await board_status(b, lambda st: st["power_w"] > 0)
        csms = site.csms
        row = await until(lambda: csms.store.get("transactions", device_id="ev-0000", tx_id=tx["tx_id"]), 10, "tx")
        assert row["reservation_id"] == 11 and row["id_token"] == "RES-OWNER"
        await until(lambda: updates(site, 11) == [ReservationStatus.USED], 10, "ReservationUpdate used")
        assert reservation(site, 11)["status"] == "used"
        await unplug(b)

    scenario(tmp_path, fn, boards=1)


def test_s1_reservation_of_any_evse_of_the_station(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        site.csms.api.add_token("RES-ANY")
        b = site.boards[1]
        assert (await reserve(site, "ev-0001", 12, "RES-ANY", evse=None))["status"] == Status.ACCEPTED
        await until(lambda: connector_state(site, "ev-0001") == ConnectorStatus.RESERVED, 10, "reserved at the CSMS")
        assert (await card(site.boards[1], "SOMEONE"))["status"] == "reserved"
        b.cmd("plug")
        assert (await card(b, "RES-ANY"))["status"] == AuthStatus.ACCEPTED
        await board_status(b, lambda st: st["power_w"] > 0)
        await until(lambda: updates(site, 12) == [ReservationStatus.USED], 10, "ReservationUpdate used")
        await unplug(b)

    scenario(tmp_path, fn, boards=2)


def test_s1_cancelled_reservation_frees_the_evse(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        api.add_token("RES-GONE")
        api.add_token("WALK-IN")
        b = site.boards[0]
        assert (await reserve(site, "ev-0000", 13, "RES-GONE"))["status"] == Status.ACCEPTED
        await until(lambda: connector_state(site, "ev-0000") == ConnectorStatus.RESERVED, 10, "reserved at the CSMS")
        row = await site.command_done(api.cancel_reservation(13))
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        await until(lambda: updates(site, 13) == [ReservationStatus.REMOVED], 10, "ReservationUpdate removed")
        await until(lambda: connector_state(site, "ev-0000") == ConnectorStatus.AVAILABLE, 10, "available again")
        # cancelling again: the CSMS knows the board no longer holds it
        with pytest.raises(CsmsError, match="reservation 13 is removed"):
            api.cancel_reservation(13)
        assert (await card(b, "WALK-IN"))["status"] == AuthStatus.ACCEPTED
        await plug_and_charge(b)
        await unplug(b)

    scenario(tmp_path, fn, boards=1)


def test_s1_reservation_expires_and_frees_the_evse(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        site.csms.api.add_token("WALK-IN")
        b = site.boards[0]
        assert (await reserve(site, "ev-0000", 14, "RES-LATE", in_s=60))["status"] == Status.ACCEPTED
        assert (await card(b, "WALK-IN"))["status"] == "reserved"
        await board_step(b, 120_000)  # the holder never came
        await until(lambda: updates(site, 14) == [ReservationStatus.EXPIRED], 10, "ReservationUpdate expired")
        assert reservation(site, 14)["status"] == "expired"
        await until(lambda: connector_state(site, "ev-0000") == ConnectorStatus.AVAILABLE, 10, "available again")
        assert (await card(b, "WALK-IN"))["status"] == AuthStatus.ACCEPTED

    scenario(tmp_path, fn, boards=1)


def test_s1_occupied_evse_cannot_be_reserved(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        site.csms.api.add_token("DRIVER")
        b = site.boards[0]
        assert (await card(b, "DRIVER"))["status"] == AuthStatus.ACCEPTED
        await plug_and_charge(b)
        res = await reserve(site, "ev-0000", 15, "RES-X")
        assert res["status"] == Status.REJECTED and "occupied" in res.get("reason", ""), res
        await unplug(b)

    scenario(tmp_path, fn, boards=1)


def test_s1_reservation_for_a_board_offline_reaches_it_when_it_is_back(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None and site.gw is not None
        gw = site.gw
        b = site.boards[0]
        b.stop()
        await until(lambda: "ev-0000" not in gw.online, 10, "ev-0000 offline")
        cmd = site.csms.api.reserve(site_id(site), "ev-0000", 16, proto_ts(time.time()) + 600, "RES-BACK", 1)
        m = b.mark()
        b.start()  # back before the command's expiry: the gateway delivers it then (B16)
        await board_wait(b, "registration", since=m)
        row = await site.command_done(cmd)
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        await until(lambda: connector_state(site, "ev-0000") == ConnectorStatus.RESERVED, 10, "reserved at the CSMS")
        assert (await card(b, "SOMEONE"))["status"] == "reserved"

    scenario(tmp_path, fn, boards=1)
