"""Managing the stations on the real chain (tests/scenarios/realsite.py): M1 discover the
configuration, M2 update it, M3 monitors, M4 a signed firmware campaign, M5 reset, M6 display
messages, M7 log criteria, M8 log upload, M9 fault codes. Each starts at the CSMS operator's
API (`site.csms.api`) or at the board (the driver, a power cut, the hardware's temperature),
and is checked on what the world sees: what the board draws and displays, whether it rebooted,
and what the CSMS stores."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from realsite import Invariants, Site, api, scenario, site_id

from evedge_csms import commands as cmds
from gateway.schema import (
    DisplayPriority,
    FirmwareStatus,
    Key,
    LogStatus,
    LogType,
    MonitorType,
    ResetType,
    ResetWhen,
    Status,
    StopReason,
)
from tools.board import Board, build
from tools.site.harness import board_status, board_step, board_wait, until

pytestmark = pytest.mark.timeout(120)

B0 = "ev-0000"
# the keys of a board's response as the CSMS records it (JSON: strings)
K_VARS, K_VARIABLE, K_VAL, K_STATUS = (str(int(k)) for k in (Key.VARS, Key.VARIABLE, Key.VAL, Key.STATUS))


def rows(site: Site, table: str, **where: Any) -> list[dict[str, Any]]:
    assert site.csms is not None
    return site.csms.store.select(table, where or None)


async def answered(site: Site, spec: cmds.CommandSpec) -> dict[str, Any]:
    """The operator sends `spec` to the site; the board's result once the CSMS has it."""
    row = await site.command_done(api(site).send(site_id(site), spec))
    assert row["state"] == "done", row
    return dict(row["results"][0])


async def charge(b: Board, token: str) -> int:
    """The driver presents `token` and plugs in; the transaction's id once the board draws."""
    m = b.mark()
    b.cmd("card", token=token)
    auth = await board_wait(b, "auth", since=m)
    assert auth["status"] == 0, auth
    b.cmd("plug")
    tx = await board_wait(b, "tx_started", since=m)
    await board_status(b, lambda st: st["power_w"] > 0)
    return int(tx["tx_id"])


async def power_cut(b: Board) -> None:
    """The board loses power and comes back: online and registered again."""
    b.kill()
    m = b.mark()
    b.start()
    await board_wait(b, "registration", since=m)


def boot_or_exit(b: Board, since: int) -> list[dict[str, Any]]:
    """The board's boot or death since `since` (a firmware that dies at import never boots)."""
    return [e for e in b.events[since:] if e["ev"] in ("boot", "exit")]


def station(site: Site, device: str = B0) -> dict[str, Any]:
    r = rows(site, "stations", device_id=device)
    return r[0] if r else {}


def variable(site: Site, component: str, name: str, device: str = B0) -> dict[str, Any] | None:
    r = rows(site, "variables", device_id=device, component=component, variable=name)
    return r[0] if r else None


# ---------------------------------------------------------------- M1, M2


def test_m1_base_report_and_get_variables_reach_the_csms_store(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        res = await answered(site, cmds.get_base_report([B0], 41))
        assert res["status"] == Status.ACCEPTED, res
        await until(lambda: rows(site, "reports", device_id=B0, request_id=41, last=1), 10, "the report's last part")
        assert variable(site, "ChargingStation", "Model")["val"] == "SIM-1"  # type: ignore[index]
        assert variable(site, "ChargingStation", "FirmwareVersion")["val"] == "1.0.0"  # type: ignore[index]
        assert variable(site, "EVSE", "MaxPowerW")["val"] == "11000"  # type: ignore[index]
        assert not rows(site, "variables", device_id="ev-0001")  # only the board asked
        # GetVariables: a known variable read, an unknown one answered unknown
        res = await answered(
            site, cmds.get_variables([B0], [cmds.var("TxCtrlr", "EVConnectionTimeOut"), cmds.var("Nope", "X")])
        )
        assert res["status"] == Status.ACCEPTED, res
        assert variable(site, "TxCtrlr", "EVConnectionTimeOut")["val"] == "60"  # type: ignore[index]
        assert variable(site, "Nope", "X")["status"] == Status.UNKNOWN  # type: ignore[index]

    scenario(tmp_path, fn)


def test_m2_set_variables_accepted_rejected_reboot_required_kept_across_a_power_cut(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        await answered(site, cmds.get_variables([B0], [cmds.var("EVSE", "MaxPowerW")]))
        res = await answered(
            site,
            cmds.set_variables(
                [B0],
                [
                    cmds.var("SampledDataCtrlr", "TxUpdatedInterval", "15"),
                    cmds.var("EVSE", "MaxPowerW", "99"),  # read-only
                    cmds.var("TxCtrlr", "EVConnectionTimeOut", "-3"),  # out of bounds
                    cmds.var("NetworkCtrlr", "HeartbeatInterval", "60"),  # applies after a reboot
                    cmds.var("Nope", "X", "1"),
                ],
            ),
        )
        assert res["status"] == Status.ACCEPTED, res
        got = {v[K_VARIABLE]: v[K_STATUS] for v in res["response"][K_VARS]}  # variable → status, the board's answer
        assert got == {
            "TxUpdatedInterval": Status.ACCEPTED,
            "MaxPowerW": Status.REJECTED,
            "EVConnectionTimeOut": Status.REJECTED,
            "HeartbeatInterval": Status.REBOOT_REQUIRED,
            "X": Status.UNKNOWN,
        }
        # the CSMS stores what the station now holds: the new value where accepted, the old one kept
        # where rejected
        v = variable(site, "SampledDataCtrlr", "TxUpdatedInterval")
        assert v is not None and v["val"] == "15" and v["status"] == Status.ACCEPTED
        v = variable(site, "EVSE", "MaxPowerW")
        assert v is not None and v["val"] == "11000" and v["status"] == Status.REJECTED
        v = variable(site, "NetworkCtrlr", "HeartbeatInterval")
        assert v is not None and v["val"] == "60" and v["status"] == Status.REBOOT_REQUIRED
        await power_cut(b)
        res = await answered(site, cmds.get_variables([B0], [cmds.var("SampledDataCtrlr", "TxUpdatedInterval")]))
        assert res["response"][K_VARS][0][K_VAL] == "15"  # kept on the board's flash

    scenario(tmp_path, fn, boards=1)


# ---------------------------------------------------------------- M3


def test_m3_monitors_fire_monitor_events_at_the_csms(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        api(site).add_token("MON-1")
        mons = [
            cmds.monitor(1, "EVSE", "Power", MonitorType.UPPER, 5000, severity=4),
            cmds.monitor(2, "ChargingStation", "Temperature", MonitorType.UPPER, 600, severity=2),
        ]
        row = await site.command_done(api(site).set_monitors(site_id(site), B0, mons))
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        assert {r["monitor_id"] for r in rows(site, "monitors", device_id=B0)} == {1, 2}
        await charge(b, "MON-1")  # the EV draws 11 kW: above the power monitor's 5 kW
        ev = await until(lambda: rows(site, "monitor_events", device_id=B0, monitor_id=1), 15, "power MonitorEvent")
        assert float(ev[0]["val"]) > 5000 and ev[0]["severity"] == 4 and ev[0]["evse"] == 1
        b.cmd("temp", dc=700)  # the cabinet heats up
        ev = await until(lambda: rows(site, "monitor_events", device_id=B0, monitor_id=2), 15, "temperature event")
        assert ev[0]["val"] == "700" and ev[0]["component"] == "ChargingStation"
        # a monitor on a variable the station cannot measure: refused, with the reason, nothing changed
        bad = [cmds.monitor(3, "EVSE", "Colour", MonitorType.UPPER, 1)]
        row = await site.command_done(api(site).set_monitors(site_id(site), B0, bad))
        assert row["results"][0]["status"] == Status.REJECTED and "Colour" in row["results"][0]["reason"], row
        b.cmd("unplug")

    scenario(tmp_path, fn, boards=1)


# ---------------------------------------------------------------- M4


def test_m4_signed_firmware_campaign_ends_with_the_new_version_at_the_csms(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        image = build.update_image("1.2.3", b.march)  # a real build whose FW_VERSION is 1.2.3
        m = b.mark()
        camp = api(site).firmware_campaign(site_id(site), image, "1.2.3", [B0])
        ex = await board_wait(b, "exit", since=m, timeout=40)  # downloaded, verified, installed: reboots
        assert ex["rc"] == 3
        m = b.mark()
        b.start()
        await board_wait(b, "registration", since=m)
        st = await until(
            lambda: [r for r in rows(site, "fw_status", device_id=B0) if r["fw_status"] == FirmwareStatus.ACTIVATED],
            20,
            "FirmwareStatus activated at the CSMS",
        )
        assert st[0]["image_id"] == rows(site, "fw_campaigns", campaign_id=camp)[0]["image_id"]
        assert st[0]["version"] == "1.2.3"
        await until(lambda: station(site).get("fw_version") == "1.2.3", 10, "the new version in the station's row")
        assert station(site)["boot_reason"] == "FirmwareUpdate"
        assert station(site, "ev-0001")["fw_version"] == "1.0.0"  # not a target

    scenario(tmp_path, fn)


def test_m4_an_image_that_fails_to_boot_is_rolled_back_and_the_old_version_stays(tmp_path: Path) -> None:
    def crash(src: Path) -> None:  # a build whose code dies at import
        p = src / "csc" / "app.py"
        p.write_text(p.read_text() + "\nraise RuntimeError('broken build')\n")

    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        m = b.mark()
        api(site).firmware_campaign(site_id(site), build.update_image("6.6.6", b.march, edit=crash), "6.6.6", [B0])
        await board_wait(b, "exit", since=m, timeout=40)
        while True:  # powered up again after each death (a watchdog would); the loader counts the tries
            m = b.mark()
            b.start()
            ev = await until(functools.partial(boot_or_exit, b, m), 20, "boot or exit")
            if ev[0]["ev"] == "boot":
                break
        await board_wait(b, "registration", since=m)
        st = await until(
            lambda: [r for r in rows(site, "fw_status", device_id=B0) if r["fw_status"] == FirmwareStatus.ROLLED_BACK],
            20,
            "FirmwareStatus rolled_back at the CSMS",
        )
        assert st[0]["reason"]
        await until(lambda: station(site).get("fw_version") == "1.0.0", 10, "the old version at the CSMS")

    scenario(tmp_path, fn, boards=1)


def test_m4_a_campaign_during_a_session_installs_only_after_it(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        api(site).add_token("FW-1")
        tx = await charge(b, "FW-1")
        m = b.mark()
        api(site).firmware_campaign(site_id(site), build.update_image("1.3.0", b.march), "1.3.0", [B0])

        def reported(code: int) -> bool:
            return any(h[1] == code for r in rows(site, "fw_status", device_id=B0) for h in r["history"] or [])

        await until(lambda: reported(FirmwareStatus.VERIFIED), 30, "verified, reported to the CSMS")
        st = await board_status(b)
        assert st["tx_id"] == tx and st["power_w"] > 0 and b.alive()  # the session goes on
        assert not reported(FirmwareStatus.INSTALLING)
        b.cmd("unplug")  # the driver leaves: now the board installs and reboots
        await board_wait(b, "tx_ended", since=m)
        await board_wait(b, "exit", since=m, timeout=30)
        m = b.mark()
        b.start()
        await board_wait(b, "registration", since=m)
        await until(lambda: station(site).get("fw_version") == "1.3.0", 20, "the new version at the CSMS")
        t = await until(lambda: rows(site, "transactions", device_id=B0, tx_id=tx, state="ended"), 15, "tx ended")
        assert t[0]["stop_reason"] == StopReason.EV_DISCONNECTED

    scenario(tmp_path, fn, boards=1)


# ---------------------------------------------------------------- M5


def test_m5_soft_reset_restarts_the_application_not_the_board(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        m = b.mark()
        res = await answered(site, cmds.reset([B0], ResetType.SOFT, ResetWhen.NOW))
        assert res["status"] == Status.ACCEPTED, res
        await board_wait(b, "registration", since=m)  # the application started again and booted
        await until(lambda: station(site).get("boot_reason") == "SoftReset", 10, "boot reason at the CSMS")
        assert b.alive() and not [e for e in b.events[m:] if e["ev"] == "exit"]  # the process kept running
        ev = await until(lambda: rows(site, "security_events", device_id=B0, event_name="ResetOrReboot"), 10, "event")
        assert "soft" in ev[0]["reason"]
        # still a working station: a session after the restart
        api(site).add_token("AFTER-SOFT")
        await charge(b, "AFTER-SOFT")
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)

    scenario(tmp_path, fn, boards=1)


def test_m5_hard_reset_reboots_the_board(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        m = b.mark()
        res = await answered(site, cmds.reset([B0], ResetType.HARD, ResetWhen.NOW))
        assert res["status"] == Status.ACCEPTED, res
        ex = await board_wait(b, "exit", since=m, timeout=20)
        assert ex["rc"] == 3  # the reboot code: the board resets
        m = b.mark()
        b.start()  # powering up again
        await board_wait(b, "registration", since=m)
        await until(lambda: station(site).get("boot_reason") == "HardReset", 10, "boot reason at the CSMS")
        ev = await until(lambda: rows(site, "security_events", device_id=B0, event_name="ResetOrReboot"), 10, "event")
        assert "hard" in ev[0]["reason"]

    scenario(tmp_path, fn, boards=1)


def test_m5_reset_when_idle_waits_for_the_session_to_end(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        api(site).add_token("IDLE-1")
        tx = await charge(b, "IDLE-1")
        m = b.mark()
        res = await answered(site, cmds.reset([B0], ResetType.HARD, ResetWhen.IDLE))
        assert res["status"] == Status.SCHEDULED, res
        await board_step(b, 120_000)  # two minutes of charging later: still the same session
        st = await board_status(b)
        assert st["tx_id"] == tx and st["power_w"] > 0 and b.alive()
        b.cmd("unplug")  # the driver leaves: now the board resets
        await board_wait(b, "tx_ended", since=m)
        await board_wait(b, "exit", since=m, timeout=20)
        m = b.mark()
        b.start()
        await board_wait(b, "registration", since=m)
        await until(lambda: station(site).get("boot_reason") == "HardReset", 10, "boot reason at the CSMS")
        t = await until(lambda: rows(site, "transactions", device_id=B0, tx_id=tx, state="ended"), 15, "tx ended")
        assert t[0]["stop_reason"] == StopReason.EV_DISCONNECTED  # ended by the driver, not by the reset

    scenario(tmp_path, fn, boards=1)


def test_m5_reset_now_ends_the_session_first_with_reason_reboot(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        api(site).add_token("NOW-1")
        tx = await charge(b, "NOW-1")
        m = b.mark()
        res = await answered(site, cmds.reset([B0], ResetType.SOFT, ResetWhen.NOW))
        assert res["status"] == Status.ACCEPTED, res
        await board_wait(b, "tx_ended", since=m)
        await board_wait(b, "registration", since=m)
        st = await board_status(b, lambda s: s["online"])
        assert st["power_w"] == 0 and st["tx_id"] is None
        t = await until(lambda: rows(site, "transactions", device_id=B0, tx_id=tx, state="ended"), 15, "tx ended")
        assert t[0]["stop_reason"] == StopReason.REBOOT
        b.cmd("unplug")

    scenario(tmp_path, fn, boards=1)


# ---------------------------------------------------------------- M6


def test_m6_display_messages_by_language_and_validity_kept_across_a_power_cut(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        sid = site_id(site)
        normal = DisplayPriority.NORMAL_CYCLE

        async def set_msg(display_id: int, text: str, prio: int, **opt: Any) -> None:
            row = await site.command_done(api(site).set_display_message(sid, [B0], display_id, text, prio, **opt))
            assert row["results"][0]["status"] == Status.ACCEPTED, row

        async def shows(text: str) -> None:
            await board_status(b, lambda st: st["text"] == text, timeout=10)

        await set_msg(1, "Welcome", normal, language="en")
        await set_msg(2, "Willkommen", normal, language="de")
        await shows("Welcome")  # the station's language is en
        # a message for later: not before its start, shown from its start, gone after its end
        t0 = int((await board_status(b))["time"])
        await set_msg(3, "Maintenance today 14:00", DisplayPriority.IN_FRONT, language="en",
                      valid_from=t0 + 30, valid_to=t0 + 200)  # fmt: skip
        await shows("Welcome")
        await board_step(b, 40_000)
        await shows("Maintenance today 14:00")
        await board_step(b, 200_000)
        await shows("Welcome")
        # the operator switches the station to German
        await answered(site, cmds.set_variables([B0], [cmds.var("DisplayCtrlr", "Language", "de")]))
        await shows("Willkommen")
        # power cut: the messages and the language come back from flash, before any command
        await power_cut(b)
        await shows("Willkommen")
        # a language no message has: the fallback is the first message of the best priority
        await answered(site, cmds.set_variables([B0], [cmds.var("DisplayCtrlr", "Language", "fr")]))
        await shows("Welcome")
        # cleared by the operator: gone from the board and from the CSMS's list of messages
        row = await site.command_done(api(site).clear_display_message(sid, [B0], 1))
        assert row["results"][0]["status"] == Status.ACCEPTED
        await shows("Willkommen")
        assert {r["display_id"] for r in rows(site, "display_messages")} == {2, 3}
        # an EVSE the station does not have: refused
        row = await site.command_done(api(site).set_display_message(sid, [B0], 9, "x", normal, evse=7))
        assert row["results"][0]["status"] != Status.ACCEPTED

    scenario(tmp_path, fn, boards=1)


# ---------------------------------------------------------------- M7, M8


def _lines(site: Site, request_id: int) -> list[list[str]]:
    """The log uploaded for `request_id`, reassembled at the CSMS: [time, level, component, text] per line."""
    data = rows(site, "logs", device_id=B0, request_id=request_id)[0]["data"] or b""
    return [ln.split(" ", 3) for ln in data.decode().splitlines() if ln]


async def _get_log(site: Site, request_id: int, log_type: int) -> list[list[str]]:
    res = await answered(site, cmds.get_log([B0], request_id, log_type))
    assert res["status"] == Status.ACCEPTED and res["response"][str(int(Key.LOG_STATUS))] == LogStatus.ACCEPTED, res
    await until(lambda: rows(site, "logs", device_id=B0, request_id=request_id, complete=1), 20, "log reassembled")
    await until(lambda: rows(site, "logs", device_id=B0, request_id=request_id, log_status=LogStatus.UPLOADED), 10,
                "LogStatus uploaded")  # fmt: skip
    return _lines(site, request_id)


def test_m7_m8_log_criteria_select_what_the_uploaded_log_holds(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        # errors and warnings (level ≤ 3) of the station and the sampled-data controller only
        res = await answered(
            site, cmds.set_log_criteria([B0], 3, LogType.DIAGNOSTICS, ["ChargingStation", "SampledDataCtrlr"])
        )
        assert res["status"] == Status.ACCEPTED, res
        # things happen in several components, at several levels
        await answered(site, cmds.set_variables([B0], [cmds.var("DisplayCtrlr", "Language", "de")]))
        await answered(site, cmds.set_variables([B0], [cmds.var("SampledDataCtrlr", "TxUpdatedInterval", "0")]))
        b.cmd("temp", dc=900)  # overheating: a fault (error)
        await until(lambda: rows(site, "fault_reports", device_id=B0, active=1), 10, "fault at the CSMS")
        b.cmd("temp", dc=250)  # cooled down: the fault clears (information)
        await until(lambda: rows(site, "fault_reports", device_id=B0, active=0), 10, "fault cleared at the CSMS")
        lines = await _get_log(site, 51, LogType.DIAGNOSTICS)
        mark = [i for i, ln in enumerate(lines) if ln[2] == "LogCtrlr"]
        assert mark, lines  # the criteria change itself is logged
        after = lines[mark[-1] + 1 :]
        assert after, lines
        assert {ln[2] for ln in after} <= {"ChargingStation", "SampledDataCtrlr"}, after
        assert all(int(ln[1]) <= 3 for ln in after), after
        assert any(ln[2] == "ChargingStation" and "2001" in ln[3] for ln in after)  # the fault
        assert any(ln[2] == "SampledDataCtrlr" for ln in after)  # the rejected write (a warning)
        assert not [ln for ln in lines if ln[2] == "SecurityCtrlr"]  # the security log is another log
        # the security log: on by default, off when its criteria say so
        m = b.mark()
        await answered(site, cmds.reset([B0], ResetType.SOFT, ResetWhen.NOW))
        await board_wait(b, "registration", since=m)
        sec = await _get_log(site, 52, LogType.SECURITY)
        assert [ln for ln in sec if ln[2] == "SecurityCtrlr" and "ResetOrReboot" in ln[3]], sec
        assert {ln[2] for ln in sec} <= {"SecurityCtrlr", "LogCtrlr"}, sec
        await answered(site, cmds.set_log_criteria([B0], 0, LogType.SECURITY))  # the security log off
        m = b.mark()
        await answered(site, cmds.reset([B0], ResetType.SOFT, ResetWhen.NOW))
        await board_wait(b, "registration", since=m)
        await until(lambda: len(rows(site, "security_events", device_id=B0, event_name="ResetOrReboot")) == 2, 10,
                    "both resets at the CSMS")  # fmt: skip
        sec2 = await _get_log(site, 53, LogType.SECURITY)
        assert len([ln for ln in sec2 if "ResetOrReboot" in ln[3]]) == 1, sec2  # the second one not logged

    scenario(tmp_path, fn, boards=1)


# ---------------------------------------------------------------- M9


def test_m9_provisioned_fault_table_gives_the_reported_fault_its_text(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        b = site.boards[0]
        sid = site_id(site)
        row = await site.command_done(api(site).set_fault_table(sid, [B0], [(2001, 2, "Overheat: let it cool")]))
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        assert rows(site, "fault_table", fault_code=2001)[0]["text"] == "Overheat: let it cool"
        await power_cut(b)  # the table is kept on the board's flash
        b.cmd("temp", dc=900)
        f = await until(lambda: rows(site, "fault_reports", device_id=B0, fault_code=2001, active=1), 10, "fault")
        assert f[0]["reason"].startswith("Overheat: let it cool"), f
        assert "90.0" in f[0]["reason"]  # and what the board measured
        b.cmd("temp", dc=250)
        await until(lambda: rows(site, "fault_reports", device_id=B0, fault_code=2001, active=0), 10, "fault cleared")

    scenario(tmp_path, fn, boards=1)
