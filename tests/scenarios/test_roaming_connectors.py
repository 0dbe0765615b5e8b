"""R1-2 on the real chain: a site that mixes connector kinds (an AC wallbox beside a DC
charger). The operator records the site's connector (`Csms.set_site`) and, over it, one EVSE's
(`Csms.set_connector`, `evedge-csms-admin set-connector`); the home CSP's copy of the location,
published by the CSMS through its CSO endpoint, names each EVSE's own kind. Real MicroPython
boards, the real gateway, the real CSMS over QUIC, the endpoints over HTTP/3 (mixed mode)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from realsite import Invariants, Site, api, scenario, site_id

from evedge_csms.errors import CsmsError
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
        assert api(site).connector_record(site_id(site), site.devices[0], 1) is None

    scenario(tmp_path, body, boards=2, roaming=True)
