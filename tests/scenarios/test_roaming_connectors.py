"""What the operator records of each EVSE, on the real chain (real MicroPython boards, the real
gateway, the real CSMS over QUIC, the endpoints over HTTP/3, mixed mode):
- R1-2: a site that mixes connector kinds (an AC wallbox beside a DC charger). The operator
  records the site's connector (`Csms.set_site`) and, over it, one EVSE's (`Csms.set_connector`,
  `evedge-csms-admin set-connector`); the home CSP's copy of the location names each EVSE's kind.
- R3-9: the meter's seal. The installer records each EVSE's meter key (the harness, from the
  emulated meter's label); the location carries it; the home CSP checks the seal of the signed
  readings each SDR carries (its meter start's and stop's), and a reading whose seal is not the
  meter's is a mismatch, disputed; so is an SDR whose meter start was lowered (its sealed start
  reading says otherwise)."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
from realsite import Invariants, Site, api, charge, scenario, site_id
from roaming_books import books_faults, check_books

from evedge_csms.errors import CsmsError
from evedge_roaming import meter, publish
from tools.site.harness import until

pytestmark = pytest.mark.timeout(120)


def test_r1_2_a_site_mixing_ac_and_dc_publishes_each_evse_connector(tmp_path: Path) -> None:
    async def body(site: Site, inv: Invariants) -> None:
        assert site.csp is not None
        csp = site.csp
        ac, dc = site.evse(0), site.evse(1)

        def connectors() -> dict[str, dict[str, Any]]:
            row = csp.store.one("SELECT body FROM locations")
            return {c["evse_gid"]: c for c in json.loads(row["body"])["connectors"]} if row else {}

        await until(lambda: sorted(connectors()) == sorted([ac, dc]), 15, "the location with both EVSEs")
        api(site).set_site(site_id(site), connector_standard="IEC_62196_T2", power_type="AC_3_PHASE")
        rec = api(site).set_connector(site_id(site), site.devices[1], 1, connector_standard="IEC_62196_T2_COMBO",
                                      connector_format="CABLE", power_type="DC")  # fmt: skip
        assert rec["power_type"] == "DC"

        def kinds() -> dict[str, tuple[str, str, str]] | None:
            got = {g: (c["connector_standard"], c["connector_format"], c["power_type"])
                   for g, c in connectors().items()}  # fmt: skip
            return got if got.get(dc, ("",) * 3)[2] == "DC" else None

        got = await until(kinds, 10, "the DC charger's connector at the home CSP")
        assert got == {ac: ("IEC_62196_T2", "SOCKET", "AC_3_PHASE"), dc: ("IEC_62196_T2_COMBO", "CABLE", "DC")}
        # the site's record changes the EVSEs without their own record, never the one with it
        api(site).set_site(site_id(site), connector_standard="IEC_62196_T1", power_type="AC_1_PHASE")

        def moved() -> dict[str, tuple[str, str, str]] | None:
            k = kinds()
            return k if k and k[ac][0] == "IEC_62196_T1" else None

        got = await until(moved, 10, "the site's new connector at the home CSP")
        assert got == {ac: ("IEC_62196_T1", "SOCKET", "AC_1_PHASE"), dc: ("IEC_62196_T2_COMBO", "CABLE", "DC")}
        # bad input: named, nothing changed
        with pytest.raises(CsmsError, match="power_type 'DC_9'"):
            api(site).set_connector(site_id(site), site.devices[0], 1, power_type="DC_9")
        with pytest.raises(CsmsError, match="no station 'ev-9999'"):
            api(site).set_connector(site_id(site), "ev-9999", 1, power_type="DC")
        with pytest.raises(CsmsError, match="evse 0"):
            api(site).set_connector(site_id(site), site.devices[0], 0, power_type="DC")
        kept = api(site).connector_record(site_id(site), site.devices[0], 1)  # the meter key the installer recorded
        assert kept is not None and kept["power_type"] is None and kept["meter_key"] == site.boards[0].meter_key(1)

    scenario(tmp_path, body, boards=2, roaming=True)


def test_r3_9_the_home_csp_checks_the_meters_seal_of_each_sdr(tmp_path: Path) -> None:
    card = "DE*HCP*CCARD00001"

    async def body(site: Site, inv: Invariants) -> None:
        assert site.csp is not None and site.cso is not None and site.bridge is not None
        csp, cso, b = site.csp, site.cso, site.boards[0]
        evse = site.evse(0)
        # R1-2: the meter's key reaches the home CSP with the location
        await until(lambda: csp.meter_key(evse) == b.meter_key(1), 15, "the meter key at the home CSP")
        cmd = api(site).set_tariff(site_id(site), 3, 250, "EUR", targets=site.devices)
        assert (await site.command_done(cmd))["state"] == "done"
        await until(lambda: 3 in csp.tariffs(cso.me), 10, "the tariff at the home CSP")
        csp.add_customer(card)

        await charge(site, 0, card, 300_000)
        (book,) = await check_books(site, "mixed")  # matched: the seals are the meter's
        start, stop = meter.readings(book.csp_sdr["signed_meter"])  # the meter start's and stop's
        assert start.sealed_by(b.meter_key(1)) and stop.sealed_by(b.meter_key(1))
        assert (start.register_wh, stop.register_wh) == (book.csp_sdr["meter_start_wh"], book.csp_sdr["meter_stop_wh"])
        assert start.evse == stop.evse == 1 and start.time <= stop.time

        # a CSO that moves the meter's registers (the energy unchanged, the reading's register made
        # to match) cannot make the seal: a mismatch that names it, disputed
        await site.bridge.stop()
        await charge(site, 0, card, 120_000)
        (s2,) = await until(lambda: [s for s in api(site).sdrs() if s["id_token"] == card][1:], 20, "the 2nd SDR")
        sid2 = cso.open_session(evse, card) or cso.adopt_session(evse, card, publish.unix(s2["started"]))
        assert sid2 is not None
        shift = 1000
        forged = b"".join(r.body[:4] + (r.register_wh + shift).to_bytes(8, "big") + r.body[12:] + r.signature
                          for r in meter.readings(publish.signed_meter(s2)))  # fmt: skip
        assert len(forged) == 2 * meter.SIZE
        cso.store.exec("INSERT INTO csms_sdrs VALUES(?,?,?,?)", s2["sdr_id"], sid2, "sent", int(time.time()))
        answer = await cso.session_ended(sid2, int(s2["energy_wh"]), meter_start_wh=int(s2["meter_start_wh"]) + shift,
                                         signed_meter=base64.b64encode(forged).decode(),
                                         lines=publish.sdr_lines(s2))  # fmt: skip
        assert answer["status"] == "accepted"
        verdict = await until(lambda: csp.store.one("SELECT verdict FROM sdrs WHERE sdr_id=?", answer["sdr_id"]), 10,
                              "the verdict")  # fmt: skip
        assert verdict[0] == "mismatch: the signed meter reading's seal is not the EVSE meter's", verdict[0]
        assert (await csp.dispute(answer["sdr_id"]))["status"] == "accepted"

        # a CSO that lowers the meter start (the meter's own sealed readings, the energy and its
        # SessionUpdates made bigger to match): the sealed start reading is not the SDR's start
        await charge(site, 0, card, 120_000)
        (s3,) = await until(lambda: [s for s in api(site).sdrs() if s["id_token"] == card][2:], 20, "the 3rd SDR")
        sid3 = cso.open_session(evse, card) or cso.adopt_session(evse, card, publish.unix(s3["started"]))
        assert sid3 is not None
        cso.store.exec("INSERT INTO csms_sdrs VALUES(?,?,?,?)", s3["sdr_id"], sid3, "sent", int(time.time()))
        lower = int(s3["meter_start_wh"]) // 2  # the energy of the charges before, in part
        assert lower > 0
        lines = [dataclasses.replace(x, energy_wh=x.energy_wh + lower) for x in publish.sdr_lines(s3)]
        await cso.session_progress(sid3, int(s3["energy_wh"]) + lower, 0)
        answer = await cso.session_ended(sid3, int(s3["energy_wh"]) + lower,
                                         meter_start_wh=int(s3["meter_start_wh"]) - lower,
                                         signed_meter=publish.signed_meter(s3), lines=lines)  # fmt: skip
        assert answer["status"] == "accepted"
        verdict = await until(lambda: csp.store.one("SELECT verdict FROM sdrs WHERE sdr_id=?", answer["sdr_id"]), 10,
                              "the verdict")  # fmt: skip
        lowered = int(s3["meter_start_wh"]) - lower
        assert verdict[0] == f"mismatch: meter start {lowered} Wh, the signed meter reading {s3['meter_start_wh']} Wh"
        assert (await csp.dispute(answer["sdr_id"]))["status"] == "accepted"

        # the books see the first too: the CSO's SDR carries other readings than the CSMS's (the
        # meter's); the second carries the meter's own, its figures are what is wrong
        _, faults = await books_faults(site, "mixed", wrong={sid2, sid3})
        assert len(faults) == 1 and faults[0].startswith(f"{sid2}: signed meter data (CSO SDR, CSMS SDR)"), faults

    scenario(tmp_path, body, boards=1, roaming=True)
