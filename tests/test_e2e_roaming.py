"""Roaming through the real chain (IEC 63119 mixed mode): emulated boards (MicroPython) →
gateway → CSMS over QUIC, and the roaming endpoints (CSO backed by the CSMS, the home CSPs of
service providers A and B, clearing house) over HTTP/3. R3-1/R4-1 (a card the site and the
CSMS do not know, authorized online by the home CSP through the CSO endpoint, cached at the
site: S2), R3-9 (its SDR at the CSMS and at the home CSP, reconciled at the clearing house),
R3-2 (remote start from the home CSP down to the board), and a card of provider B routed to
B's home CSP only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.schema import AuthStatus
from tools.site.harness import Site, board_status, board_step, board_wait, until

pytestmark = pytest.mark.timeout(90)


def run(tmp: Path, fn: Callable[[Site], Awaitable[None]]) -> None:
    async def main() -> None:
        s = Site(tmp, 1, roaming=True)
        try:
            await s.start()
            await board_wait(s.boards[0], "registration")
            await fn(s)
        finally:
            await s.close()

    asyncio.run(main())


CARD = "DE*HCP*CROAM00001"


def test_e2e_r3_1_r4_1_roaming_card_authorized_by_home_csp_sdr_reaches_csp(tmp_path: Path) -> None:
    async def fn(s: Site) -> None:
        assert s.csms is not None and s.csp is not None and s.ch is not None and s.gw is not None
        assert s.site_roaming is not None and s.cso is not None
        # known to the home CSP only, in no token list (a listed card is in the site's own list,
        # R4-2): the CSO finds its home by the contract id printed on it
        s.csp.add_customer(CARD)
        b = s.boards[0]
        m = b.mark()
        b.cmd("card", token=CARD)
        auth = await board_wait(b, "auth", since=m)
        assert auth["status"] == AuthStatus.ACCEPTED, auth
        assert s.site_roaming.answered == 1
        d = s.gw.auth.authorize(CARD, 0)
        assert d.source == "cache" and d.status == AuthStatus.ACCEPTED  # S2: cached at the site
        sid = s.cso.open_session(s.evse(0), CARD)
        assert sid is not None and sid.startswith("DE*HCP*S")  # issued by the home CSP
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)
        await board_step(b, 600_000)
        b.cmd("unplug")
        end = await board_wait(b, "tx_ended", since=m)
        csms = s.csms
        sdr = (await until(csms.api.sdrs, 15, "SDR at the CSMS"))[0]
        assert sdr["id_token"] == CARD and sdr["energy_wh"] == end["wh"] > 0
        csp = s.csp
        row = await until(lambda: csp.store.one("SELECT * FROM sdrs WHERE session_id=?", sid), 15,
                          "SDR at the home CSP")  # fmt: skip
        assert json.loads(row["body"])["energy_wh"] == sdr["energy_wh"]
        ch = s.ch
        verdicts = await until(lambda: [r for r in ch.reconcile() if r.verdict == "matched"], 10, "reconciled")
        assert len(verdicts) == 1
        # a second presentation while online is asked again (S2: the cache answers only offline,
        # unless the operator trusts it for a while: `auth.online_trust_s`)
        m = b.mark()
        b.cmd("card", token=CARD)
        assert (await board_wait(b, "auth", since=m))["status"] == AuthStatus.ACCEPTED
        assert s.site_roaming.asked == 2

    run(tmp_path, fn)


def test_e2e_r3_1_unknown_everywhere_is_refused(tmp_path: Path) -> None:
    async def fn(s: Site) -> None:
        b = s.boards[0]
        m = b.mark()
        b.cmd("card", token="04NOBODY")
        auth = await board_wait(b, "auth", since=m)
        assert auth["status"] != AuthStatus.ACCEPTED, auth
        assert s.site_roaming is not None and s.site_roaming.answered == 1  # asked, then the CSMS

    run(tmp_path, fn)


def test_e2e_r3_2_remote_start_from_home_csp_reaches_the_board(tmp_path: Path) -> None:
    async def fn(s: Site) -> None:
        assert s.csms is not None and s.csp is not None and s.ch is not None
        b = s.boards[0]
        b.cmd("plug")
        await board_status(b, lambda st: st["svc"])  # a tick of the board has seen the EV
        m = b.mark()
        s.csp.add_customer("APP-USER-7")
        answer = await s.csp.start_remote(s.evse(0), "APP-USER-7")
        assert answer["result"] == "accepted", answer
        sid = answer["roaming_session_id"]
        tx = await board_wait(b, "tx_started", since=m)
        csms, site = s.csms, s.gw.cfg.site.id if s.gw else ""
        row = await until(lambda: csms.store.get("transactions", site_id=site, device_id="ev-0000",
                                                 tx_id=tx["tx_id"]), 10, "tx at the CSMS")  # fmt: skip
        assert row is not None and row["remote_start_id"] is not None
        await board_step(b, 300_000)
        stop = await s.csp.stop_remote(sid)  # R3-4 through the same path
        assert stop["result"] == "accepted", stop
        await board_wait(b, "tx_ended", since=m)
        b.cmd("unplug")  # the service session, and with it the SDR, ends when the EV leaves
        csp = s.csp
        got = await until(lambda: csp.store.one("SELECT * FROM sdrs WHERE session_id=?", sid), 20,
                          "SDR at the home CSP")  # fmt: skip
        body = json.loads(got["body"])
        assert body["energy_wh"] > 0 and body["token_uid"] == "APP-USER-7"

    run(tmp_path, fn)


def test_e2e_r3_1_r3_9_card_of_provider_b_goes_to_its_own_home_csp(tmp_path: Path) -> None:
    async def fn(s: Site) -> None:
        assert s.csms is not None and s.csp is not None and s.csp_b is not None and s.ch is not None
        assert s.cso is not None and s.csp.me != s.csp_b.me
        a, b_csp = s.csp, s.csp_b
        b_csp.add_customer("04PROV-B")  # provider B's customer; provider A does not know the card
        await b_csp.distribute_tokens()
        b = s.boards[0]
        m = b.mark()
        b.cmd("card", token="04PROV-B")
        assert (await board_wait(b, "auth", since=m))["status"] == AuthStatus.ACCEPTED
        sid = s.cso.open_session(s.evse(0), "04PROV-B")
        assert sid is not None and sid.startswith("DE*HCB*S") and s.cso.session(sid)["csp"] == b_csp.me
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)
        await board_step(b, 300_000)
        b.cmd("unplug")
        end = await board_wait(b, "tx_ended", since=m)
        row = await until(lambda: b_csp.store.one("SELECT * FROM sdrs WHERE session_id=?", sid), 15,
                          "SDR at provider B")  # fmt: skip
        assert json.loads(row["body"])["energy_wh"] == end["wh"] > 0
        assert a.store.all("SELECT * FROM sdrs") == [] and a.store.all("SELECT * FROM sessions") == []
        ch = s.ch
        matched = await until(lambda: [r for r in ch.reconcile() if r.verdict == "matched"], 10, "reconciled")
        assert len(matched) == 1
        assert [tuple(r) for r in ch.store.all("SELECT csp FROM sdrs")] == [(b_csp.me,)]

    run(tmp_path, fn)
