"""Registration on the real site (M13 onboarding and registration, M11 deregistration, M12
migration): the CSMS operator decides through `site.csms.api`, the installer powers boards,
the EV driver presents cards and plugs in; checked on what the boards draw and show, what the
gateway admits and what the CSMS stores."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from realsite import Invariants, Site, scenario

from evedge_csms import admin
from evedge_csms.errors import CsmsError
from gateway import config as gwconfig
from gateway.devices import MIGRATED, REVOKED
from gateway.protocol import devpki
from gateway.schema import Registration, Status
from gateway.service import Gateway
from tools.board import Board
from tools.site.harness import SITE_ID, board_status, board_step, board_wait, factory_key, rebind, until

pytestmark = pytest.mark.timeout(120)

ACCEPTED, PENDING, REJECTED = int(Registration.ACCEPTED), int(Registration.PENDING), int(Registration.REJECTED)


def station(site: Site, device: str, site_id: str = SITE_ID) -> dict[str, Any] | None:
    assert site.csms is not None
    return site.csms.store.get("stations", site_id=site_id, device_id=device)


async def registration(b: Board, status: int, since: int) -> dict[str, Any]:
    return await board_wait(b, "registration", lambda e: e["status"] == status, since=since)


async def drive(b: Board, token: str) -> dict[str, Any]:
    """The driver presents a card and plugs in: the board's answer to the card."""
    m = b.mark()
    b.cmd("card", token=token)
    auth = await board_wait(b, "auth", since=m)
    b.cmd("plug")
    return auth


async def charges(b: Board) -> dict[str, Any]:
    return await board_status(b, lambda st: st["tx_id"] is not None and st["power_w"] > 0)


async def draws_nothing(b: Board) -> dict[str, Any]:
    """The board's state once a tick has seen the EV plugged: no transaction, 0 W, contactor open."""
    st = await board_status(b, lambda st: st["cp"] != 0 and st["svc"])
    assert st["tx_id"] is None and st["power_w"] == 0 and not st["contactor"], st
    return st


def new_board(site: Site, device: str) -> Board:
    """The installer powers a board the site has never seen (its factory key from the site's seed)."""
    assert site.gw is not None
    b = Board(site.root / "boards" / device, site.gw.lan_port, device, factory_key(site.seed, device)).start()
    site.boards.append(b)  # sampled by the invariants, stopped with the site
    return b


# ---------------------------------------------------------------- M13


def test_m13_a_board_the_csms_rejects_charges_nothing_until_accepted(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        b = site.boards[1]
        api.add_token("CARD-M13")
        assert (station(site, "ev-0001") or {}).get("registration") == "accepted"  # the CSMS decided at boot
        m = b.mark()
        api.set_registration(SITE_ID, "ev-0001", "rejected")
        await registration(b, REJECTED, m)  # the board asked again and obeys the CSMS
        await drive(b, "CARD-M13")
        st = await draws_nothing(b)
        assert not st["registered"]
        m = b.mark()
        api.set_registration(SITE_ID, "ev-0001", "accepted")
        await registration(b, ACCEPTED, m)
        b.cmd("card", token="CARD-M13")
        await charges(b)

    scenario(tmp_path, fn)


def test_m13_a_board_pending_at_the_csms_waits_and_retries_at_the_interval_it_was_given(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        api.add_token("CARD-NEW")
        api.set_registration(SITE_ID, "ev-0002", "pending")  # announced, not yet commissioned
        b = new_board(site, "ev-0002")
        await registration(b, PENDING, 0)
        assert (station(site, "ev-0002") or {}).get("model")  # its BootNotification reached the CSMS
        await drive(b, "CARD-NEW")
        await draws_nothing(b)
        m = b.mark()
        api.set_registration(SITE_ID, "ev-0002", "accepted")  # commissioned: the board is asked to boot again
        await registration(b, ACCEPTED, m)
        b.cmd("card", token="CARD-NEW")
        await charges(b)

    scenario(tmp_path, fn, boards=2)


def test_m13_uplink_down_the_gateway_answers_from_the_csms_decision_and_holds_back_a_new_board(
    tmp_path: Path,
) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None and site.gw is not None
        api = site.csms.api
        api.add_token("CARD-OFF")
        api.set_registration(SITE_ID, "ev-0001", "rejected")
        b0, b1 = site.boards
        await registration(b1, REJECTED, 0)
        # the driver's card is known to board 0 (its cache) before the CSMS goes away
        await drive(b0, "CARD-OFF")
        await charges(b0)
        b0.cmd("unplug")
        await board_status(b0, lambda st: st["tx_id"] is None)
        csms = site.csms
        await site.stop_csms()
        site.csms = None  # (the invariants read the CSMS's decisions: none while it is away)
        gw = site.gw
        await until(lambda: gw.runner is not None and not gw.runner.ready, 10, "uplink down")
        marks = [b.mark() for b in (b0, b1)]
        for b in (b0, b1):  # power cut: both boot again and ask the gateway, which answers alone
            b.kill()
            b.start()
        assert (await board_wait(b0, "registration", since=marks[0]))["status"] == ACCEPTED
        assert (await board_wait(b1, "registration", since=marks[1]))["status"] == REJECTED  # kept by the site
        b3 = new_board(site, "ev-0003")  # never seen by the CSMS: the site's offline policy (pending)
        assert (await board_wait(b3, "registration"))["status"] == PENDING
        await drive(b0, "CARD-OFF")
        await charges(b0)  # offline, accepted from the cache
        await drive(b3, "CARD-OFF")
        await draws_nothing(b3)
        b0.cmd("unplug")
        site.csms = csms
        await site.start_csms()
        await until(lambda: gw.runner is not None and gw.runner.ready, 20, "uplink up")
        m = b3.mark()
        await board_step(b3, gw.cfg.lan.heartbeat_s * 1000 + 1000)
        await registration(b3, ACCEPTED, m)  # the CSMS's default policy, asked again
        b3.cmd("card", token="CARD-OFF")
        await charges(b3)

    scenario(tmp_path, fn, boards=2)


# ---------------------------------------------------------------- M11


def test_m11_a_deregistered_board_stops_and_cannot_onboard_again_until_registered(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None and site.gw is not None
        api, gw = site.csms.api, site.gw
        api.add_token("CARD-M11")
        b = site.boards[0]
        await drive(b, "CARD-M11")
        await charges(b)
        m = b.mark()
        cmd = api.deregister(SITE_ID, "ev-0000", "decommissioned")
        row = await site.command_done(cmd)
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        ended = await board_wait(b, "tx_ended", since=m)
        st = await board_status(b, lambda st: not st["online"] and st["tx_id"] is None)
        assert st["power_w"] == 0 and not st["registered"]
        d = await until(lambda: (x := gw.devices.get("ev-0000")) is not None and x.status == REVOKED and x, 10,
                        "deregistered at the gateway")  # fmt: skip
        assert d.key is None
        # the board comes back with its factory key and is refused by name, again and again
        refused = await board_wait(b, "link_closed", lambda e: "deregistered" in e["reason"], since=m)
        assert "hello refused" in refused["reason"]
        row2 = station(site, "ev-0000")
        assert row2 is not None and row2["deregistered"] == 1 and row2["registration"] == "rejected"
        csms = site.csms
        assert csms is not None
        tx = await until(lambda: csms.store.get("transactions", site_id=SITE_ID, device_id="ev-0000",
                                                tx_id=ended["tx_id"]), 10, "transaction kept (law)")  # fmt: skip
        assert tx["state"] == "ended"
        # registered again by the operator: the board onboards and charges
        m = b.mark()
        api.set_registration(SITE_ID, "ev-0000", "accepted")
        await registration(b, ACCEPTED, m)
        assert (gw.devices.get("ev-0000") or d).status == "active"
        b.cmd("unplug")
        await board_status(b, lambda st: st["cp"] == 0)
        await drive(b, "CARD-M11")
        await charges(b)

    scenario(tmp_path, fn)


# ---------------------------------------------------------------- M12


def test_m12_an_address_no_board_can_use_is_refused_by_name(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None and site.gw is not None
        api = site.csms.api
        with pytest.raises(CsmsError, match="host:port"):
            api.migrate(SITE_ID, ["ev-0000"], "quic://other-csms:4433")
        with pytest.raises(CsmsError, match="port"):
            api.migrate(SITE_ID, ["ev-0000"], "gw2.example:99999")
        # the same from the operator's command line: refused, nothing queued
        before = len(site.csms.store.select("commands"))
        argv = ["--data", str(site.root / "csms"), "migrate", "--site", SITE_ID, "--targets", "ev-0000"]
        assert admin.main([*argv, "--address", "quic://other-csms:4433"], io.StringIO()) == 2
        assert len(site.csms.store.select("commands")) == before
        anchor = site.gw.local_csms_cert  # an anchor the board can use (no gateway there to use it)
        cmd = api.migrate(SITE_ID, ["ev-0000"], "gw2.invalid:7700", anchor)  # well formed, but no such host
        row = await site.command_done(cmd)
        res = row["results"][0]
        assert res["status"] == Status.REJECTED and "resolve" in res["reason"], row
        b = site.boards[0]
        st = await board_status(b, lambda st: st["online"])
        assert st["registered"]  # still at its site, still charging
        api.add_token("CARD-M12")
        await drive(b, "CARD-M12")
        await charges(b)
        assert site.gw.devices.get("ev-0000") is not None
        assert site.gw.devices.get("ev-0000").status == "active"  # type: ignore[union-attr]

    scenario(tmp_path, fn)


def second_site(site: Site, site_id: str, port: int = 0) -> Gateway:
    """A second site of the same CSMS: its own gateway, data and client certificate, the same
    factory seed (the boards' manufacturer)."""
    assert site.csms is not None
    doc = site.gateway_doc()
    cfg = site.csms.config
    pki = site.root / "gw2-pki"
    pki.mkdir(parents=True, exist_ok=True)
    issued = devpki.issue(pki, site_id, ca=(cfg.ca, cfg.ca_key), server=False)
    doc["site"] = {"id": site_id, "data_dir": str(site.root / "gw2")}
    doc["lan"] = {"listen": f"127.0.0.1:{port}"}
    doc["upstream"] = {**doc["upstream"], "cert": str(issued.cert), "key": str(issued.key)}
    doc["power"] = {"site_limit_w": 100000}
    return Gateway(gwconfig.prepare(gwconfig.parse(doc)))


def test_m12_a_board_migrates_to_another_site_and_keeps_its_queued_data(tmp_path: Path) -> None:
    site2 = "DE*EVE*LSITE2"

    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None and site.gw is not None
        api = site.csms.api
        api.add_token("CARD-MIG")
        b = site.boards[0]
        await drive(b, "CARD-MIG")  # a session at the first site: the card is now in the board's cache
        await charges(b)
        b.cmd("unplug")
        await board_status(b, lambda st: st["tx_id"] is None)
        gw2 = second_site(site, site2)
        await gw2.start()
        port, anchor = gw2.lan_port, gw2.local_csms_cert
        await gw2.stop()  # the new site's gateway is not up yet when the board moves
        m = b.mark()
        cmd = api.migrate(SITE_ID, ["ev-0000"], f"127.0.0.1:{port}", anchor)
        row = await site.command_done(cmd)
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        await board_status(b, lambda st: not st["online"])
        assert site.gw.devices.get("ev-0000").status == MIGRATED  # type: ignore[union-attr]
        # between the two sites the driver charges: the transaction waits on the board's flash
        await drive(b, "CARD-MIG")
        await charges(b)
        await board_step(b, 600_000)
        b.cmd("unplug")
        ended = await board_wait(b, "tx_ended", since=m)
        st = await board_status(b)
        assert st["outbox"] > 0 and not st["online"]
        gw2 = second_site(site, site2, port)
        await rebind(gw2.start, "second gateway")
        try:
            await registration(b, ACCEPTED, m)
            csms = site.csms
            key = {"site_id": site2, "device_id": "ev-0000", "tx_id": ended["tx_id"]}
            tx = await until(lambda: [r for r in csms.store.select("transactions", key) if r["state"] == "ended"],
                             20, "the transaction ended at the CSMS, through the new site")  # fmt: skip
            await board_status(b, lambda st: st["outbox"] == 0)  # nothing left behind
            sdr = await until(lambda: [s for s in api.sdrs() if s["site_id"] == site2], 20, "billed")
            assert len(tx) == 1 and sdr[0]["energy_wh"] == ended["wh"] > 0
            assert (station(site, "ev-0000", site2) or {}).get("registration") == "accepted"
            assert (station(site, "ev-0000") or {}).get("migrated_to") == f"127.0.0.1:{port}"
        finally:
            await gw2.stop()

    scenario(tmp_path, fn, boards=1)
