"""OCPP 2.0.1 northbound (issue #17), offline-first with real faults: the gateway a real process
killed with SIGKILL and a board's power cut, both during an outage of the OCPP CSMS (the `ocpp`
library's, validation on). Proves E04 / E07 / J01 and B16/B17 for the OCPP face: the queued
TransactionEvents and MeterValues are delivered afterwards in order, exactly once, with
offline=true and continuous seqNo."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from ocpp.v201 import call
from ocpp_site import ProcessSite

from tools.site.harness import board_status, board_step, board_wait, until

pytestmark = pytest.mark.timeout(180)
DEV = "ev-0000"
EMIT = 9_000_000
"""Numbered MeterValues the board emits (energy_wh = EMIT + k): each must arrive once, in order."""


def emitted(ps: ProcessSite) -> list[tuple[str, int]]:
    """(message id, value) of the numbered MeterValues at the CSMS, in the order received."""
    out = []
    for c in ps.csms.calls:
        if c.station == DEV and c.action == "MeterValues":
            for mv in c.payload["meterValue"]:
                for v in mv["sampledValue"]:
                    if v["measurand"] == "Energy.Active.Import.Register" and v["value"] >= EMIT:
                        out.append((c.uid, int(v["value"])))
    return out


def test_ocpp_offline_gateway_kill9_and_board_power_cut_during_an_outage_lose_and_duplicate_nothing(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        ps = await ProcessSite(tmp_path).start()
        broken: list[str] = []
        try:
            await scenario(ps)
        finally:
            broken = await ps.close()
        assert not broken, "invariants broken:\n" + "\n".join(broken)

    async def scenario(ps: ProcessSite) -> None:
        csms, b, gw = ps.csms, ps.boards[0], ps.gw
        assert gw is not None
        entry = {"id_token": {"id_token": "04KILL", "type": "ISO14443"}, "id_token_info": {"status": "Accepted"}}
        res = await csms.call(DEV, call.SendLocalList(version_number=1, update_type="Full",
                                                      local_authorization_list=[entry]))  # fmt: skip
        assert res.status == "Accepted"
        await csms.stop()  # the outage begins
        m = b.mark()
        b.cmd("card", token="04KILL")
        assert (await board_wait(b, "auth", since=m))["status"] == 0  # the site's local list
        b.cmd("plug")
        tx = str((await board_wait(b, "tx_started", since=m))["tx_id"])
        await board_status(b, lambda st: st["power_w"] > 0)
        await board_step(b, 120_000)
        b.cmd("emit", n=5, **{"from": EMIT})
        await board_status(b)  # answered after the emit: the values are on the board's flash
        gw.kill9()  # the gateway dies …
        b.kill()  # … and the board loses power, both while the CSMS is away
        m = b.mark()
        b.start()
        await asyncio.to_thread(gw.start)
        assert (await board_wait(b, "registration", since=m, timeout=30))["status"] == 0  # the CSMS's last word
        b.cmd("emit", n=5, **{"from": EMIT + 5})
        await board_status(b)
        b.cmd("unplug")
        await board_status(b, lambda st: st["tx_id"] is None)
        await csms.start()  # the CSMS is back, on the same port
        ended = [e for e in b.all("tx_ended") if str(e["tx_id"]) == tx]
        assert ended, "the board ended its transaction"

        def events() -> list[dict[str, Any]]:
            return [e for e in csms.of(DEV, "TransactionEvent") if e["transactionInfo"]["transactionId"] == tx]

        await until(lambda: any(e["eventType"] == "Ended" for e in events()), 30, "the Ended event at the CSMS")
        evs = events()
        assert [e["seqNo"] for e in evs] == list(range(len(evs))), [e["seqNo"] for e in evs]  # none lost, none twice
        assert evs[0]["eventType"] == "Started" and evs[-1]["eventType"] == "Ended"
        assert all(e.get("offline") is True for e in evs)
        assert evs[0]["idToken"]["idToken"] == "04KILL"  # kept across the kill
        values = await until(lambda: (v := emitted(ps)) and len({x for _, x in v}) == 10 and v, 30, "every value")
        assert [x for _, x in values] == list(range(EMIT, EMIT + 10)), values  # in order, each once
        uids = [c.uid for c in csms.calls if c.station == DEV]
        assert len(uids) == len(set(uids))  # no message sent twice

    asyncio.run(main())
