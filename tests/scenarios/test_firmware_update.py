"""M4 on the real chain (tests/scenarios/realsite.py): a firmware update that really installs.
The operator starts a campaign at the CSMS (`site.csms.api.firmware_campaign`) with a real build
of the firmware (tools/board/build.py `update_image`: the .mpy files, FW_VERSION changed, packed);
the board verifies the manifest's Ed25519 signature itself, writes the build into its inactive
slot, reboots into it, and the new code reports its own version. The attacks are refused by the
board by name even though the gateway let them through: a signer the board does not trust, a
version older than the one it runs. A build that fails its self-test is rolled back; power cuts at
random instants of the download, verification, install and first boot never brick the board."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from realsite import Invariants, Site, api, scenario, site_id

from gateway.schema import Action, FirmwareStatus, Status
from tools.board import Board, build
from tools.board.runner import signer_public
from tools.site.harness import board_status, board_wait, until

pytestmark = pytest.mark.timeout(180)

B0 = "ev-0000"
FACTORY = "1.0.0"


def rows(site: Site, table: str, **where: Any) -> list[dict[str, Any]]:
    assert site.csms is not None
    return site.csms.store.select(table, where or None)


def station(site: Site, device: str = B0) -> dict[str, Any]:
    r = rows(site, "stations", device_id=device)
    return r[0] if r else {}


def history(site: Site, image_id: int, device: str = B0) -> list[int]:
    """The FirmwareStatus codes the CSMS recorded for the device and image, in order."""
    return [h[1] for r in rows(site, "fw_status", device_id=device, image_id=image_id) for h in r["history"] or []
            if isinstance(h[1], int)]  # fmt: skip


def update_result(site: Site, campaign: int) -> dict[str, Any] | None:
    """The board's answer to the campaign's UpdateFirmware, once the CSMS has it."""
    for c in rows(site, "commands"):
        if c["action"] == Action.UPDATE_FIRMWARE and c["ref"] == str(campaign) and c["state"] in ("done", "failed"):
            return dict(c["results"][0]) if c["results"] else {"status": None, "state": c["state"]}
    return None


def security_events(site: Site, name: str) -> list[dict[str, Any]]:
    return [e for e in api(site).security_events() if e["event_name"] == name]


def csms_has(site: Site, version: str) -> bool:
    return station(site).get("fw_version") == version


def image_of(site: Site, campaign: int) -> int:
    return int(rows(site, "fw_campaigns", campaign_id=campaign)[0]["image_id"])


async def reboot_when_down(b: Board, m: int) -> None:
    """The board rebooted itself (after an install): power it up again, as its reset does."""
    await board_wait(b, "exit", since=m, timeout=60)
    b.start()


# ---------------------------------------------------------------- the update runs


def test_m4_a_signed_build_from_the_csms_installs_and_the_new_code_reports_its_version(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        image = build.update_image("1.1.0", b.march)
        m = b.mark()
        camp = api(site).firmware_campaign(site_id(site), image, "1.1.0", [B0])
        await reboot_when_down(b, m)  # downloaded, verified, installed into slot 0: the reboot
        boot = await board_wait(b, "boot", since=m)
        assert boot["version"] == "1.1.0" and boot["slot"] == 0  # the new build runs, from the slot
        img = image_of(site, camp)
        await until(lambda: FirmwareStatus.ACTIVATED in history(site, img), 20, "activated at the CSMS")
        assert history(site, img) == [FirmwareStatus.DOWNLOADING, FirmwareStatus.DOWNLOADED,
                                      FirmwareStatus.VERIFYING, FirmwareStatus.VERIFIED, FirmwareStatus.INSTALLING,
                                      FirmwareStatus.INSTALLED, FirmwareStatus.ACTIVATED]  # fmt: skip
        await until(lambda: station(site).get("fw_version") == "1.1.0", 10, "the new version in the station's row")
        assert station(site, "ev-0001")["fw_version"] == FACTORY  # not a target
        st = await board_status(b, lambda s: s["registered"])
        assert st["version"] == "1.1.0"
        m = b.mark()
        b.kill()  # confirmed: every boot from now on runs the new slot
        b.start()
        assert (await board_wait(b, "boot", since=m))["version"] == "1.1.0"

    scenario(tmp_path, fn)


# ---------------------------------------------------------------- the attacks


def test_m4_a_signer_the_board_does_not_trust_is_refused_by_the_board_by_name(tmp_path: Path) -> None:
    """The gateway trusts the CSMS's signer, this board's trust store holds another key: the
    board refuses the manifest itself, names the signer, and counts it as a security event."""

    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        b.kill()
        b.fw_signers = {"factory-signer": signer_public(Ed25519PrivateKey.generate())}
        m = b.mark()
        b.start()
        await board_wait(b, "registration", since=m)
        camp = api(site).firmware_campaign(site_id(site), build.update_image("1.1.0", b.march), "1.1.0", [B0])
        res = await until(lambda: update_result(site, camp), 20, "the board's answer")
        (signer,) = site.fw_signers()
        assert res["status"] != Status.ACCEPTED and f"{signer} is not in the board's trust store" in res["reason"]
        events = await until(lambda: security_events(site, "UnknownFirmwareSigner"), 10, "the event at the CSMS")
        assert signer in events[0]["reason"]
        st = await board_status(b)
        assert st["version"] == FACTORY and b.alive() and not b.all("fw_status")

    scenario(tmp_path, fn, boards=1)


def test_m4_an_older_version_is_refused_as_a_rollback(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        camp = api(site).firmware_campaign(site_id(site), build.update_image("0.9.0", b.march), "0.9.0", [B0])
        res = await until(lambda: update_result(site, camp), 20, "the board's answer")
        assert res["status"] != Status.ACCEPTED and "rollback refused" in res["reason"], res
        await until(lambda: security_events(site, "FirmwareRollbackRefused"), 10, "the event at the CSMS")
        assert (await board_status(b))["version"] == FACTORY and not b.all("fw_status")

    scenario(tmp_path, fn, boards=1)


# ---------------------------------------------------------------- rollback


def test_m4_a_build_that_fails_its_self_test_is_rolled_back_and_reported(tmp_path: Path) -> None:
    """The build runs 1.2.0 where its signed manifest says 1.2.1: its self-test fails on its
    first boot, the loader goes back to the factory firmware, which reports the rollback."""

    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        m = b.mark()
        camp = api(site).firmware_campaign(site_id(site), build.update_image("1.2.0", b.march), "1.2.1", [B0])
        await reboot_when_down(b, m)  # installed: the trial boot
        trial = await board_wait(b, "fw_selftest_failed", since=m)
        assert "1.2.1" in trial["reason"]
        m2 = b.mark()
        await reboot_when_down(b, m2)  # the trial gave up: the old slot
        assert (await board_wait(b, "boot", since=m2))["version"] == FACTORY
        img = image_of(site, camp)
        await until(lambda: FirmwareStatus.ROLLED_BACK in history(site, img), 20, "rolled back at the CSMS")
        rb = rows(site, "fw_status", device_id=B0, image_id=img)[0]
        assert "manifest says 1.2.1" in (rb["reason"] or "")
        await board_status(b, lambda s: s["registered"])
        await until(lambda: station(site).get("fw_version") == FACTORY, 10, "the old version at the CSMS")

    scenario(tmp_path, fn, boards=1)


def test_m4_a_build_that_cannot_boot_is_rolled_back_after_its_tries(tmp_path: Path) -> None:
    def crash(src: Path) -> None:  # its code dies at import: every boot of it ends at once
        p = src / "csc" / "app.py"
        p.write_text(p.read_text() + "\nraise RuntimeError('broken build')\n")

    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        m = b.mark()
        camp = api(site).firmware_campaign(site_id(site), build.update_image("1.3.0", b.march, edit=crash), "1.3.0",
                                           [B0])  # fmt: skip
        await board_wait(b, "exit", since=m, timeout=60)  # installed: the reboot into the trial
        died = 0
        while True:  # the watchdog powers it up again each time it dies
            m = b.mark()
            b.start()
            if await _booted_or_died(b, m):
                break
            died += 1
            assert died <= 3, "the loader kept booting a build that dies"
        assert died == 3  # its three tries, then the old slot
        assert (await board_wait(b, "boot", since=m))["version"] == FACTORY
        img = image_of(site, camp)
        await until(lambda: FirmwareStatus.ROLLED_BACK in history(site, img), 20, "rolled back at the CSMS")
        assert "did not confirm itself in 3 boots" in rows(site, "fw_status", device_id=B0, image_id=img)[0]["reason"]

    scenario(tmp_path, fn, boards=1)


async def _booted_or_died(b: Board, m: int) -> bool:
    """True once the board booted (since `m`); False once it died."""
    ev = await until(lambda: [e for e in b.events[m:] if e["ev"] in ("boot", "exit")], 20, "boot or exit")
    return bool(ev[0]["ev"] == "boot")


# ---------------------------------------------------------------- power cuts

_PHASE = {FirmwareStatus.DOWNLOADING: "download", FirmwareStatus.DOWNLOADED: "verification",
          FirmwareStatus.VERIFYING: "verification", FirmwareStatus.VERIFIED: "verified",
          FirmwareStatus.INSTALLING: "install", FirmwareStatus.INSTALLED: "install (rebooting)"}  # fmt: skip


TARGETS: list[tuple[str, Any] | None] = [
    None,
    None,
    ("fw_status", lambda e: e["status"] == FirmwareStatus.VERIFYING),
    ("fw_status", lambda e: e["status"] == FirmwareStatus.INSTALLING),
    ("fw_status", lambda e: e["status"] == FirmwareStatus.INSTALLED),
    ("fw_trial", None),
]


def phase(b: Board) -> str:
    """Where the update stood on the board at this instant (its last words since power-up)."""
    now = [e for e in b.events if e["_boot"] == b.boots]
    if any(e["ev"] == "fw_trial" for e in now):
        return "first boot"
    st = [e["status"] for e in now if e["ev"] == "fw_status"]
    if st:
        return _PHASE.get(st[-1], "after the update")
    return "boot" if not any(e["ev"] == "registration" for e in now) else "online (download resumed, or idle)"


def test_m4_power_cuts_at_random_instants_of_updates_never_brick_the_board(tmp_path: Path) -> None:
    """Three updates in a row, each cut by power losses at random instants (seeded: the seed is
    printed; EVEDGE_SEED=N replays it) through download, verification, install and first boot.
    After each, the board boots and runs either the old or the new version, and the CSMS records
    the version it runs."""
    seed = int(os.environ.get("EVEDGE_SEED") or random.SystemRandom().randrange(10**6))
    print(f"power-cut seed: {seed} (EVEDGE_SEED={seed} replays it)")
    rng = random.Random(seed)

    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        running = FACTORY
        phases: list[str] = []
        for version in ("1.1.0", "1.2.0", "1.3.0"):
            image = build.update_image(version, b.march)
            camp = api(site).firmware_campaign(site_id(site), image, version, [B0])
            for _ in range(rng.randrange(4, 8)):
                target = rng.choice(TARGETS)
                m = b.mark()
                if target is None:  # any instant
                    await asyncio.sleep(rng.uniform(0.0, 1.2))
                else:  # a random instant just after the step begins (a step lasts a few ms)
                    with contextlib.suppress(TimeoutError):
                        await board_wait(b, target[0], target[1], since=m, timeout=4)
                    await asyncio.sleep(rng.uniform(0.0, 0.02))
                if b.alive():
                    phases.append(phase(b))
                    b.kill()
                b.start()  # a board that rebooted itself meanwhile is powered up too
            img = image_of(site, camp)

            def settled(img: int = img, camp: int = camp) -> bool:
                if not b.alive():  # the board rebooted itself (an install, a trial given up): power it up
                    b.start()
                    return False
                h = history(site, img)
                res = update_result(site, camp)
                refused = res is not None and res.get("status") != Status.ACCEPTED
                done = {FirmwareStatus.ACTIVATED, FirmwareStatus.ROLLED_BACK} & set(h)
                return bool(done or refused)

            await until(settled, 90, f"update to {version} settled")
            st = await board_status(b, lambda s: s["registered"], timeout=30)
            assert st["version"] in (running, version), (st["version"], running, version, seed)
            if FirmwareStatus.ACTIVATED in history(site, img):
                assert st["version"] == version, seed
            running = st["version"]
            await until(functools.partial(csms_has, site, running), 15, "the CSMS has the version it runs")
            print(f"update to {version}: runs {running}; FirmwareStatus {history(site, img)}")
        print(f"{len(phases)} power cuts, in: {', '.join(phases)}; seed {seed}")

    scenario(tmp_path, fn, boards=1)
