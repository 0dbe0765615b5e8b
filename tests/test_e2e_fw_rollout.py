"""M4 staged rollout across a gateway restart, on the whole chain: real emulated boards
(MicroPython), the real gateway, the real CSMS over QUIC. The first-wave board is charging,
so it downloads and verifies the image but installs it only when the session ends; the
gateway is restarted meanwhile. The rollout goes on in the new gateway: the first board is
not told again, the others are told once it reported Installed and download from the site's
cache, and the CSMS's Command (sent again after the reconnect) is answered once for all."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.schema import Action, FirmwareStatus, Status
from tools.board import build
from tools.site.harness import Site, board_step, board_wait, until

pytestmark = pytest.mark.timeout(150)

OK = (FirmwareStatus.INSTALLED, FirmwareStatus.ACTIVATED)


@pytest.mark.usefixtures("default_ports_taken")
def test_e2e_staged_rollout_survives_a_gateway_restart(tmp_path: Path) -> None:
    async def main() -> None:
        s = Site(tmp_path, 3)  # the restarted gateway listens where the boards reconnect: its first port
        try:
            await s.start()
            await asyncio.gather(*(board_wait(b, "registration") for b in s.boards))
            await scenario(s)
        finally:
            await s.close()

    asyncio.run(main())


async def scenario(s: Site) -> None:
    assert s.csms is not None and s.gw is not None
    csms, api = s.csms, s.csms.api
    site = s.gw.cfg.site.id
    b0 = s.boards[0]
    api.add_token("04AABBCC")
    m = b0.mark()
    b0.cmd("card", token="04AABBCC")
    assert (await board_wait(b0, "auth", since=m))["status"] == 0
    b0.cmd("plug")
    await board_wait(b0, "tx_started", since=m)  # charging: the update waits for the session's end
    devices = [b.device_id for b in s.boards]
    api.firmware_campaign(site, build.update_image("2.0.0", b0.march), "2.0.0", devices)  # a real build
    await board_wait(b0, "fw_waiting", since=m, timeout=40)  # downloaded and verified
    gw = s.gw
    await until(lambda: gw.firmware.has(1), 10, "image verified in the site's cache")
    assert gw.firmware.rollouts.active == 1

    await gw.stop()  # the gateway goes away in the middle of the rollout
    gw = await s.start_gateway()
    assert gw.firmware.rollouts.active == 1 and gw.firmware.has(1)
    await until(lambda: len(gw.online) == 3, 30, "boards back online")
    for b in s.boards[1:]:
        assert not b.all("fw_status"), "the later wave waits for the first"

    await board_step(b0, 60_000)
    b0.cmd("unplug")  # the session ends: the board installs, reports Installed, reboots
    await board_wait(b0, "exit", timeout=40)
    b0.start()  # powers up on the new image
    for b in s.boards[1:]:
        await board_wait(b, "exit", timeout=60)  # told after the restart, installed, rebooting
        b.start()

    def statuses() -> dict[str, list[int]]:
        rows = csms.store.select("fw_status")
        return {r["device_id"]: [h[1] for h in r["history"]] for r in rows}

    await until(lambda: all(FirmwareStatus.ACTIVATED in statuses().get(d, []) for d in devices), 40, "activated")
    for d, hist in statuses().items():  # one UpdateFirmware per board: one Downloading each
        assert hist.count(FirmwareStatus.DOWNLOADING) == 1, (d, hist)
    chunks = [c for c in csms.store.select("commands") if c["action"] == Action.FIRMWARE_CHUNK]
    assert {t for c in chunks for t in c["targets"]} == {"ev-0000"}, "the later boards were served by the site"
    (cmd,) = [c for c in csms.store.select("commands") if c["action"] == Action.UPDATE_FIRMWARE]
    row = await s.command_done(cmd["cmd_id"], 30)
    assert row["state"] == "done", row
    assert [r["status"] for r in row["results"]] == [Status.ACCEPTED] * 3, row["results"]
    assert all(st in OK for st in (statuses()[d][-1] for d in devices))
