"""A restarted roaming endpoint (same SQLite file, same port) has everything it acknowledged."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from evedge_roaming.testbed import CSO, CSP, EVSES, Raw, running
from evedge_roaming.testbed import LOCATION_BODY as LOCATION

pytestmark = pytest.mark.timeout(30)
TARIFF = {"tariff_id": 3, "operator_id": CSO, "price_kwh": 30, "currency": "EUR"}


@pytest.mark.parametrize("mode", ["peer_to_peer", "clearing_house"])
def test_each_peer_restarts_without_loss(tmp_path: Path, mode: str) -> None:
    async def main() -> None:
        async with running(tmp_path, mode) as net:
            await net.cso.publish_locations()
            await net.cso.publish_tariff(TARIFF)
            net.csp.add_customer("04RESTART")
            await net.csp.distribute_tokens()
            sid = (await net.cso.token_presented(EVSES[0], "04RESTART"))["roaming_session_id"]
            await net.cso.session_progress(sid, 800, 7000)
            done = await net.cso.session_ended(sid, 1500)
            sdr = json.loads(net.csp.store.get("SELECT body FROM sdrs")[0])

            cso = await net.restart("cso")  # the CSO still answers R2-2 and knows its session and list
            assert (await net.csp.pull_tariffs(CSO))["tariff_id"] == 3
            assert net.cso.session(sid)["sdr_id"] == done["sdr_id"]
            assert net.cso.store.get("SELECT version FROM token_lists")[0] == 1
            assert cso is net.cso

            await net.restart("csp")  # the CSP: its session record, SDR and the CSO's data
            assert net.csp.session(sid)["energy_wh"] == 1500
            assert net.csp.store.get("SELECT COUNT(*) FROM locations")[0] == 1
            assert await net.cso.client(CSP).put_sdr(sdr, to=CSP) == {"status": "accepted"}  # idempotent still
            assert net.csp.store.get("SELECT COUNT(*) FROM sdrs")[0] == 1

            await net.restart("ch")
            if mode == "clearing_house":
                assert [r.verdict for r in net.ch.reconcile()] == ["matched"]
                assert (await net.ch.settle())[0]["amount"] == done["cost"]
            # login tokens are durable too
            c = net.cso.client(CSP)
            await c.login()
            n = c.logins
            await net.restart("csp")
            assert (await c.call("PutLocation", (await net.operator.locations())[0], to=CSP))["status"] == "accepted"
            assert c.logins == n  # the token survived the restart

    asyncio.run(main())


def test_restart_keeps_refusing_replays(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, "peer_to_peer") as net:
            raw = Raw(net)
            r, _ = await raw.post("PutLocation", LOCATION, nonce="z" * 24)
            assert r.status == 200
            await raw.http.close()
            await net.restart("csp")
            raw = Raw(net)
            r, body = await raw.post("PutLocation", LOCATION, nonce="z" * 24)
            assert (r.status, body["error"]) == (409, "replay")
            await raw.http.close()

    asyncio.run(main())
