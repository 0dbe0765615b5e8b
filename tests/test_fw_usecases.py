"""Use cases on the emulated board: the real firmware in `micropython` processes, a
gateway peer (tests/fwpeer.py, on gateway._core) on the other end of a real TCP link.
Each test is named after the use-case ID it proves."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fwpeer import Rig, barrier, charging, until_status

from evedge_csms.commands import manifest_bytes
from evedge_roaming import meter
from gateway.localcsms import hellokey
from gateway.protocol import devpki
from gateway.schema import Action, ChargingState, Key, Kind, ResetWhen, StopReason
from tools.board import build
from tools.board.runner import dev_signer

pytestmark = pytest.mark.timeout(60)


def tx_events(rig: Rig) -> list[dict[int, Any]]:
    return rig.peer.durable(Action.TRANSACTION_EVENT)


def metered(rig: Rig) -> None:
    """Waits until the board's meter has counted more energy than now (a charging session runs)."""
    wh = rig.board.status()["wh_in"]
    until_status(rig.board, lambda st: st["wh_in"] > wh)


# ---------------------------------------------------------------- M13 onboarding, B10


def test_fw_m13_onboarding_provisions_device_key_then_reconnects_with_it(rig: Rig) -> None:
    dev = rig.peer.devices["evse-1"]
    assert dev["device_key"] is not None and rig.peer.hellos == 2
    rig.power_cut()
    rig.up()
    assert rig.peer.hellos == 3  # no onboarding again: the key was on flash
    assert rig.board.status()["registered"]


def test_fw_b10_board_rejects_forged_frame_with_error_and_keeps_link(rig: Rig) -> None:
    c = rig.peer.conn()
    with c.lock:
        f = bytearray(c.sender.seal(Kind.REQUEST, 42, 1, 0, Action.CLEAR_CACHE, {}))
    f[-3] ^= 0x55
    c.send_raw(bytes(f))
    rig.peer.wait(lambda: any(e[Key.ERROR_CODE] == 6 for e in rig.peer.errors), 5)
    st = rig.board.status()
    assert st["bad"] == 1 and st["online"]
    k, b = rig.peer.request(Action.CLEAR_CACHE, {})
    assert k == Kind.RESPONSE and b[Key.STATUS] == 0


# ---------------------------------------------------------------- S2, S3, S6, S4


def test_fw_s2_local_list_authorizes_offline_and_unknown_is_refused(rig: Rig) -> None:
    entries = msgpack.packb([[b"card-9", 0, 0], [b"card-blocked", 1, 0]])
    k, b = rig.peer.request(
        Action.SEND_LOCAL_LIST,
        {Key.LIST_VERSION: 3, Key.UPDATE_TYPE: 0, Key.ENTRIES: b"", Key.LAST: True},
        secrets={Key.ENTRIES: entries},
    )
    assert (k, b[Key.STATUS]) == (Kind.RESPONSE, 0)
    rig.peer.pause()
    rig.board.wait("offline")
    m = rig.board.mark()
    rig.board.cmd("card", token="card-blocked")
    assert rig.board.wait("auth", since=m)["status"] == 1
    rig.board.cmd("card", token="nobody")
    assert rig.board.wait("auth", since=m, pred=lambda e: e["status"] == 8)
    rig.board.cmd("plug")
    rig.board.cmd("card", token="card-9")
    assert rig.board.wait("auth", since=m, pred=lambda e: e["status"] == 0)["source"] == "local"
    rig.board.wait("tx_started", since=m)
    rig.peer.resume()
    rig.peer.wait(lambda: tx_events(rig), 20)
    assert tx_events(rig)[0][Key.OFFLINE] is True


def test_fw_s2_a_local_list_above_the_receive_part_is_received_whole(rig: Rig) -> None:
    # ~2 KiB: more than the receiver's own part of the board's buffer (sendq.RX), so the frame
    # borrows the shared send region while the board keeps sending its telemetry
    tokens = [b"card-%03d-" % i + bytes(11) for i in range(80)]
    entries = msgpack.packb([[t, 0, 0] for t in tokens])
    assert 1800 < len(entries) <= 2048
    rig.board.cmd("emit", n=6)  # durable telemetry on its way meanwhile
    k, b = rig.peer.request(
        Action.SEND_LOCAL_LIST,
        {Key.LIST_VERSION: 4, Key.UPDATE_TYPE: 0, Key.ENTRIES: b"", Key.LAST: True},
        secrets={Key.ENTRIES: entries},
    )
    assert (k, b[Key.STATUS]) == (Kind.RESPONSE, 0)
    assert rig.board.status()["bad"] == 0
    rig.peer.wait(lambda: len(rig.peer.durable(Action.METER_VALUES)) >= 6, 10)  # the telemetry went out too
    rig.peer.pause()
    rig.board.wait("offline")
    m = rig.board.mark()
    rig.board.cmd("card", token=list(tokens[-1]))
    e = rig.board.wait("auth", since=m)
    assert (e["status"], e["source"]) == (0, "local")


def test_fw_s2_online_authorization_is_cached_for_offline_use(rig: Rig) -> None:
    rig.peer.tokens[b"card-7"] = 0
    m = rig.board.mark()
    rig.board.cmd("card", token="card-7")
    assert rig.board.wait("auth", since=m)["source"] == "online"
    rig.peer.pause()
    rig.board.wait("offline", since=m)
    rig.board.cmd("card", token="card-7")
    e = rig.board.wait("auth", since=m, pred=lambda e: e["source"] != "online")
    assert (e["status"], e["source"]) == (0, "cache")


def test_fw_s3_remote_start_and_stop(rig: Rig) -> None:
    rig.board.cmd("plug")
    k, b = rig.peer.request(
        Action.REQUEST_START_TRANSACTION,
        {Key.ID_TOKEN: b"", Key.REMOTE_START_ID: 77},
        secrets={Key.ID_TOKEN: b"app-user"},
    )
    assert k == Kind.RESPONSE and b[Key.STATUS] == 0
    tx = b[Key.TX_ID]
    k, b = rig.peer.request(
        Action.REQUEST_START_TRANSACTION, {Key.ID_TOKEN: b"", Key.REMOTE_START_ID: 78}, secrets={Key.ID_TOKEN: b"x"}
    )
    assert b[Key.STATUS] == 1 and "occupied" in b[Key.REASON]
    k, b = rig.peer.request(
        Action.REQUEST_START_TRANSACTION,
        {Key.ID_TOKEN: b"", Key.REMOTE_START_ID: 79, Key.EVSE: 9},
        secrets={Key.ID_TOKEN: b"x"},
    )
    assert k == Kind.ERROR and "unknown evse" in b[Key.REASON]
    k, b = rig.peer.request(Action.REQUEST_STOP_TRANSACTION, {Key.TX_ID: tx})
    assert b[Key.STATUS] == 0
    # the Ended event (an Updated one may come between: wait for the one that ends it)
    end = rig.peer.wait(lambda: [e for e in tx_events(rig) if Key.STOP_REASON in e])[0]
    start = tx_events(rig)[0]
    assert start[Key.REMOTE_START_ID] == 77 and start[Key.TRIGGER] == 6
    assert end[Key.STOP_REASON] == 1 and end[Key.TX_ID] == tx


def test_fw_s6_final_transaction_event_carries_the_sdr_data(rig: Rig) -> None:
    charging(rig)
    metered(rig)
    rig.board.cmd("unplug")
    rig.board.wait("tx_ended")
    rig.peer.wait(lambda: any(e[Key.EVENT] == 2 for e in tx_events(rig)))
    evs = tx_events(rig)
    start, end = evs[0], evs[-1]
    assert [e[Key.SEQ_NO] for e in evs] == list(range(len(evs)))
    assert start[Key.SESSION_ID] == end[Key.SESSION_ID] != 0
    assert start[Key.ID_TOKEN] != b"card-1"  # encrypted on the LAN
    s0, s1, x0, x1 = end[Key.SAMPLES]  # imported at start, at stop; exported (E6) at start, at stop
    assert end[161] == s0[Key.VALUE] == start[Key.ENERGY_WH]  # meter start
    assert end[162] == s1[Key.VALUE] == end[Key.ENERGY_WH] > end[161]  # meter stop
    assert end[Key.METER_START_OUT_WH] == x0[Key.VALUE] == start[Key.ENERGY_OUT_WH]
    assert end[Key.METER_STOP_OUT_WH] == x1[Key.VALUE] == end[Key.ENERGY_OUT_WH]
    assert end[Key.STOP_REASON] == 2
    # the meter's signed reading of the stop: its register, sealed by the meter's own key
    reading = meter.parse(base64.b64encode(end[Key.SIGNED_METER]).decode())
    assert reading is not None and reading.register_wh == end[162] and reading.evse == 1
    assert reading.sealed_by(rig.board.meter_key(1)) and not reading.sealed_by(bytes(32))


def test_fw_s4_tariff_change_splits_transaction_in_one_service_session(rig: Rig) -> None:
    _k, b = rig.peer.request(Action.SET_TARIFF, {Key.TARIFF_ID: 1, Key.PRICE_KWH: 30, Key.CURRENCY: "EUR"})
    assert b[Key.STATUS] == 0
    tx1 = charging(rig)
    metered(rig)
    m = rig.board.mark()
    rig.peer.request(
        Action.SET_TARIFF, {Key.TARIFF_ID: 2, Key.PRICE_KWH: 45, Key.CURRENCY: "EUR", Key.PRICE_SESSION: 100}
    )
    tx2 = rig.board.wait("tx_started", since=m)["tx_id"]
    assert tx2 != tx1
    # tx 1 ended (event 2), tx 2 started (event 0)
    rig.peer.wait(lambda: {(e[Key.TX_ID], e[Key.EVENT]) for e in tx_events(rig)} >= {(tx1, 2), (tx2, 0)})
    evs = tx_events(rig)
    ended = next(e for e in evs if e[Key.EVENT] == 2)
    started2 = next(e for e in evs if e[Key.TX_ID] == tx2)
    assert ended[Key.TRIGGER] == started2[Key.TRIGGER] == 10  # tariff_changed
    assert ended[Key.TARIFF_ID] == 1 and started2[Key.TARIFF_ID] == 2
    assert ended[Key.SESSION_ID] == started2[Key.SESSION_ID]
    assert started2[Key.COST] == 0  # the session fee goes with the service session's first transaction only


def test_fw_s1_reservation_holds_the_evse_for_its_token(rig: Rig) -> None:
    _k, b = rig.peer.request(
        Action.RESERVE_NOW,
        {Key.RESERVATION_ID: 5, Key.EXPIRY: 2**31, Key.ID_TOKEN: b""},
        secrets={Key.ID_TOKEN: b"card-r"},
    )
    assert b[Key.STATUS] == 0
    rig.peer.tokens[b"card-x"] = 0
    rig.peer.tokens[b"card-r"] = 0
    m = rig.board.mark()
    rig.board.cmd("plug")
    rig.board.cmd("card", token="card-x")
    assert rig.board.wait("auth", since=m)["status"] == "reserved"
    rig.board.cmd("card", token="card-r")
    rig.board.wait("tx_started", since=m)
    rig.peer.wait(lambda: rig.peer.durable(Action.RESERVATION_UPDATE))
    assert rig.peer.durable(Action.RESERVATION_UPDATE)[0][Key.RES_STATUS] == 2  # used
    rig.peer.wait(lambda: tx_events(rig))
    assert tx_events(rig)[0][Key.RESERVATION_ID] == 5


# ---------------------------------------------------------------- E1, E5, E6, E7, E8


def test_fw_e1_charging_profile_enforced_and_impossible_limits_refused(rig: Rig) -> None:
    charging(rig)
    period = {Key.START_S: 0, Key.LIMIT_W: 3680}
    k, b = rig.peer.request(
        Action.SET_CHARGING_PROFILE,
        {Key.EVSE: 1, Key.PROFILE_ID: 1, Key.STACK_LEVEL: 0, Key.PURPOSE: 2, Key.PERIODS: [period]},
    )
    assert b[Key.STATUS] == 0
    st = rig.board.status()
    assert st["limit_w"] == 3680 and st["power_w"] == 3680
    k, b = rig.peer.request(
        Action.SET_CHARGING_PROFILE,
        {
            Key.EVSE: 1,
            Key.PROFILE_ID: 2,
            Key.STACK_LEVEL: 0,
            Key.PURPOSE: 2,
            Key.PERIODS: [{Key.START_S: 0, Key.LIMIT_W: 50000}],
        },
    )
    assert k == Kind.ERROR and b[Key.ERROR_CODE] == 23 and "rating" in b[Key.REASON]
    k, b = rig.peer.request(
        Action.SET_CHARGING_PROFILE,
        {Key.EVSE: 4, Key.PROFILE_ID: 3, Key.STACK_LEVEL: 0, Key.PURPOSE: 2, Key.PERIODS: [period]},
    )
    assert k == Kind.ERROR and "unknown evse" in b[Key.REASON]
    k, b = rig.peer.request(Action.GET_COMPOSITE_SCHEDULE, {Key.EVSE: 1, Key.DURATION_S: 60})
    assert b[Key.PERIODS][0][Key.LIMIT_W] == 3680
    assert rig.board.status()["limit_w"] == 3680  # the refused ones changed nothing


def test_fw_e1_pilot_offers_current_only_with_a_transaction(rig: Rig) -> None:
    """IEC 61851: a ready EV closes S2 (B → C) only once the pilot offers current; the board
    offers it (its limit) when a transaction starts, and closes the contactor only in C."""
    rig.peer.tokens[b"card-1"] = 0
    rig.board.cmd("plug")  # ready to charge, not authorized yet
    st = until_status(rig.board, lambda st: st["svc"])  # a tick of the board has seen the EV
    assert (st["cp"], st["limit_w"], st["contactor"]) == (1, 0, False)  # B: nothing offered
    m = rig.board.mark()
    rig.board.cmd("card", token="card-1")
    tx = int(rig.board.wait("tx_started", since=m)["tx_id"])
    st = until_status(rig.board, lambda st: st["contactor"])
    assert (st["cp"], st["limit_w"], st["contactor"], st["power_w"]) == (2, 11000, True, 11000)
    period = {Key.START_S: 0, Key.LIMIT_W: 0}  # a pause: no current offered
    rig.peer.request(
        Action.SET_CHARGING_PROFILE,
        {Key.EVSE: 1, Key.PROFILE_ID: 1, Key.STACK_LEVEL: 0, Key.PURPOSE: 2, Key.PERIODS: [period]},
    )
    st = rig.board.status()  # applied before the answer left
    assert (st["cp"], st["limit_w"], st["contactor"]) == (1, 0, False)  # back to B, contactor open
    rig.peer.wait(
        lambda: any(
            e[Key.CHARGING_STATE] == ChargingState.SUSPENDED_EVSE for e in tx_events(rig) if Key.CHARGING_STATE in e
        ),
        5,
    )
    assert all(e[Key.TX_ID] == tx for e in tx_events(rig))


def test_fw_e5_dso_limit_applied_within_deadline(rig: Rig) -> None:
    charging(rig)
    assert rig.board.status()["power_w"] == 11000
    m = rig.board.mark()
    k, b, rtt = rig.peer.request_timed(Action.DSO_LIMIT, {Key.LIMIT_W: 2000, Key.DEADLINE_MS: 500})
    assert k == Kind.RESPONSE and b[Key.STATUS] == 0
    applied = rig.board.wait("dso_applied", since=m)
    answered = rig.board.wait("command", pred=lambda e: e["action"] == Action.DSO_LIMIT, since=m)
    assert applied["hw_limit_w"] == 2000
    assert rig.board.events.index(applied) < rig.board.events.index(answered)  # on the hardware before the answer
    print(f"DsoLimit round trip {rtt * 1000:.1f} ms")  # a figure, not a pass/fail bound
    chk = rig.board.wait("dso_checked", since=m, timeout=10)  # the board's own check at the deadline (its clock)
    assert chk["ok"] and chk["power_w"] <= 2000
    k, b = rig.peer.request(Action.DSO_LIMIT, {Key.LIMIT_W: -5, Key.DEADLINE_MS: 500})
    assert k == Kind.ERROR


def test_fw_e6_v2g_negative_setpoint_discharges_only_when_ev_allows(rig: Rig) -> None:
    charging(rig, v2g=True)
    rig.peer.request(Action.START_SETPOINT_LOOP, {Key.EVSE: 1, Key.RATE_MS: 200})
    rig.peer.send_event(Action.SETPOINT, {Key.EVSE: 1, Key.SETPOINT_W: -5000})
    rig.peer.sync()  # the setpoint was handled (applied at once)
    st = rig.board.status()
    assert st["power_w"] == -5000
    rig.peer.wait(lambda: any(e.get(Key.CHARGING_STATE) == 5 for e in tx_events(rig)), 10)
    rig.peer.send_event(Action.SETPOINT, {Key.EVSE: 1, Key.SETPOINT_W: -50000})
    rig.peer.sync()
    assert rig.board.status()["power_w"] == -7000  # bounded by the hardware's discharge rating


def test_fw_e6_no_discharge_for_an_ev_without_v2g(rig: Rig) -> None:
    charging(rig, v2g=False)
    rig.peer.send_event(Action.SETPOINT, {Key.EVSE: 1, Key.SETPOINT_W: -5000})
    rig.peer.sync()  # the setpoint was handled
    rig.board.cmd("tick")  # and a tick planned the power after it
    st = rig.board.status()
    assert st["power_w"] == 0


def test_fw_e7_setpoints_followed_and_measured_values_reported_at_rate(rig: Rig) -> None:
    charging(rig)
    _k, b = rig.peer.request(Action.START_SETPOINT_LOOP, {Key.EVSE: 1, Key.RATE_MS: 100, Key.DURATION_S: 30})
    assert b[Key.STATUS] == 0
    rig.peer.send_event(Action.SETPOINT, {Key.EVSE: 1, Key.SETPOINT_W: 4000})

    def followed() -> list[tuple[float, int, dict[int, Any]]]:  # MeasuredValues showing the setpoint met
        return [
            e
            for e in rig.peer.events
            if e[1] == Action.MEASURED_VALUES and e[2].get(Key.SETPOINT_W) == 4000 and e[2][Key.POWER_W] == 4000
        ]

    mv = rig.peer.wait(lambda: len(followed()) >= 6 and followed(), 20)  # the loop keeps reporting
    print(f"MeasuredValues every {(mv[-1][0] - mv[0][0]) / (len(mv) - 1) * 1000:.0f} ms (asked: 100 ms)")


def test_fw_e8_frequency_droop_from_measured_frequency(rig: Rig) -> None:
    charging(rig)
    _k, b = rig.peer.request(
        Action.SET_FREQUENCY_DROOP,
        {
            Key.DROOP: [{Key.FREQ_MHZ: 49000, Key.POWER_W: 0}, {Key.FREQ_MHZ: 49800, Key.POWER_W: 11000}],
            Key.DEADBAND_MHZ: 100,
        },
    )
    assert b[Key.STATUS] == 0
    rig.board.cmd("freq", mhz=49400)
    until_status(rig.board, lambda st: st["power_w"] == 5500)  # the droop's next check follows the curve
    rig.peer.wait(lambda: any(e[Key.FREQ_MHZ] == 49400 for e in rig.peer.durable(Action.FREQUENCY_RESPONSE)), 10)
    rig.board.cmd("freq", mhz=50020)  # inside the dead band: back to the plan
    until_status(rig.board, lambda st: st["power_w"] == 11000)


# ---------------------------------------------------------------- B6, M7, M8


def test_fw_b6_urgent_answered_during_bulk_log_upload(rig: Rig) -> None:
    """Urgent DsoLimit answers while a bulk log upload runs. The order on the link (an urgent
    frame queued behind bulk chunks leaves first) is asserted deterministically by
    tests/test_fw_link.py and tests/fw_linktests.py; here the figures are printed: the board's
    `urgent_max_ms` (an urgent frame's enqueue → sealed in the link, board ticks) and the round
    trips, which are timings on a shared machine, not pass/fail bounds."""
    rig.peer.request(Action.SET_LOG_CRITERIA, {Key.LOG_LEVEL: 9})
    for _ in range(12):
        rig.board.cmd("log", text="0123456789abcdef", n=64)  # 12 × 1 KiB lines
    barrier(rig.board)  # the lines are in the log
    _, b = rig.peer.request(Action.GET_LOG, {Key.REQUEST_ID: 9, Key.LOG_TYPE: 0})
    assert b[Key.LOG_STATUS] == 1
    rig.peer.wait(lambda: rig.peer.durable(Action.LOG_CHUNK), 5)
    rtts = []
    for _ in range(3):
        _k, b, rtt = rig.peer.request_timed(Action.DSO_LIMIT, {Key.LIMIT_W: 5000, Key.DEADLINE_MS: 1000})
        assert b[Key.STATUS] == 0
        rtts.append(rtt)
    rig.board.wait("log_uploaded", timeout=30)
    chunks = rig.peer.durable(Action.LOG_CHUNK)
    assert sum(len(c[Key.DATA]) for c in chunks) >= 12 * 1024 and all(len(c[Key.DATA]) <= 1024 for c in chunks)
    st = rig.board.status()
    assert isinstance(st["urgent_max_ms"], int) and st["urgent_max_ms"] >= 0
    rt = ", ".join(f"{r * 1000:.1f}" for r in rtts)
    print(f"urgent enqueue → sealed, max {st['urgent_max_ms']} ms; DsoLimit round trips {rt} ms")


# ---------------------------------------------------------------- M1, M2


def test_fw_m1_m2_read_and_write_the_component_variable_model(rig: Rig) -> None:
    _, b = rig.peer.request(
        Action.GET_VARIABLES,
        {Key.VARS: [{Key.COMPONENT: "EVSE", Key.VARIABLE: "MaxPowerW"}, {Key.COMPONENT: "X", Key.VARIABLE: "Y"}]},
    )
    assert b[Key.VARS][0][Key.VAL] == "11000" and b[Key.VARS][1][Key.STATUS] == 4
    _, b = rig.peer.request(
        Action.SET_VARIABLES,
        {
            Key.VARS: [
                {Key.COMPONENT: "SampledDataCtrlr", Key.VARIABLE: "TxUpdatedInterval", Key.VAL: "15"},
                {Key.COMPONENT: "EVSE", Key.VARIABLE: "MaxPowerW", Key.VAL: "99"},
                {Key.COMPONENT: "SampledDataCtrlr", Key.VARIABLE: "TxUpdatedInterval", Key.VAL: "-3"},
                {Key.COMPONENT: "NetworkCtrlr", Key.VARIABLE: "HeartbeatInterval", Key.VAL: "60"},
            ]
        },
    )
    assert [v[Key.STATUS] for v in b[Key.VARS]] == [0, 1, 1, 2]
    rig.power_cut()
    rig.up()
    _, b = rig.peer.request(
        Action.GET_VARIABLES, {Key.VARS: [{Key.COMPONENT: "SampledDataCtrlr", Key.VARIABLE: "TxUpdatedInterval"}]}
    )
    assert b[Key.VARS][0][Key.VAL] == "15"  # kept on flash
    _k, b = rig.peer.request(Action.GET_BASE_REPORT, {Key.REQUEST_ID: 4})
    rig.peer.wait(lambda: any(r[Key.LAST] for r in rig.peer.durable(Action.NOTIFY_REPORT)))
    names = {v[Key.VARIABLE] for r in rig.peer.durable(Action.NOTIFY_REPORT) for v in r[Key.VARS]}
    assert {"Model", "FirmwareVersion", "TxUpdatedInterval"} <= names


# ---------------------------------------------------------------- M4, M5


def _fw_statuses(rig: Rig) -> list[int]:
    return [b[Key.FW_STATUS] for b in rig.peer.durable(Action.FIRMWARE_STATUS)]


def _update(
    rig: Rig,
    image: bytes,
    sha: bytes | None = None,
    when: int | None = None,
    version: str = "1.1.0",
    signer: tuple[str, Ed25519PrivateKey] | None = None,
    image_id: int = 3,
) -> tuple[int, dict[int, Any]]:
    """UpdateFirmware of `image` with its manifest signed (by default by the development signer
    the emulated board trusts); `sha`: another SHA-256 in the manifest than the image's."""
    rig.peer.firmware[image_id] = image
    name, key = signer or dev_signer()
    digest = sha or hashlib.sha256(image).digest()
    body: dict[int, Any] = {
        Key.IMAGE_ID: image_id,
        Key.VERSION: version,
        Key.SIZE: len(image),
        Key.SHA256: digest,
        Key.SIGNATURE: key.sign(manifest_bytes(image_id, version, len(image), digest)),
        Key.SIGNER: name,
    }
    if when is not None:
        body[Key.WHEN] = when
    return rig.peer.request(Action.UPDATE_FIRMWARE, body)


def _image(rig: Rig, version: str = "1.1.0", edit: Callable[[Path], None] | None = None) -> bytes:
    """A real update: the firmware built with FW_VERSION = `version` for the board's CPU, packed."""
    return build.update_image(version, rig.board.march, edit=edit)


def test_fw_m4_firmware_update_downloaded_verified_installed_activated(rig: Rig) -> None:
    image = _image(rig)
    _k, b = _update(rig, image)
    assert b[Key.STATUS] == 0
    rig.board.wait("exit", timeout=30)  # reboots into the new slot
    rig.up()
    rig.peer.wait(lambda: 11 in _fw_statuses(rig), 20)
    assert _fw_statuses(rig) == [1, 2, 4, 5, 8, 9, 11]
    chunks = [r for r in rig.peer.requests if r[1] == Action.FIRMWARE_CHUNK]
    assert len(chunks) == (len(image) + 1023) // 1024
    st = rig.board.status()
    assert st["version"] == "1.1.0" and st["slot"] == 0  # the new code runs, from the slot
    activated = rig.peer.durable(Action.FIRMWARE_STATUS)[-1]
    assert activated[Key.VERSION] == "1.1.0" and activated[Key.SLOT] == 0
    m = rig.board.mark()
    rig.power_cut()  # confirmed: the loader boots the new slot from now on
    rig.up()
    assert rig.board.wait("boot", since=m)["version"] == "1.1.0"


def test_fw_m4_a_manifest_the_board_cannot_verify_is_refused_by_name(rig: Rig) -> None:
    image = _image(rig)
    rogue = ("csms-rogue", Ed25519PrivateKey.generate())
    k, b = _update(rig, image, signer=rogue)
    assert k == Kind.ERROR and "csms-rogue is not in the board's trust store" in b[Key.REASON]
    name, _ = dev_signer()
    k, b = _update(rig, image, signer=(name, Ed25519PrivateKey.generate()))  # the trusted name, another key
    assert b[Key.STATUS] == 0
    rig.peer.wait(lambda: 7 in _fw_statuses(rig), 20)  # signature_invalid, before any download
    assert not [r for r in rig.peer.requests if r[1] == Action.FIRMWARE_CHUNK]
    k, b = _update(rig, image, version="0.9.0")
    assert k == Kind.ERROR and "rollback refused" in b[Key.REASON]
    events = [e[Key.EVENT_NAME] for e in rig.peer.durable(Action.SECURITY_EVENT)]
    assert {"UnknownFirmwareSigner", "InvalidFirmwareSignature", "FirmwareRollbackRefused"} <= set(events)
    assert rig.board.status()["version"] == "1.0.0"


def test_fw_m4_bad_image_rejected_and_failed_boot_rolled_back(rig: Rig) -> None:
    k, b = _update(rig, b"CSCFW1" + bytes(3000), sha=bytes(32))
    rig.peer.wait(lambda: 6 in _fw_statuses(rig), 20)  # verification_failed
    body: dict[int, Any] = {
        Key.IMAGE_ID: 4,
        Key.VERSION: "9",
        Key.SIZE: 10**7,
        Key.SHA256: bytes(32),
        Key.SIGNATURE: bytes(64),
    }
    k, b = rig.peer.request(Action.UPDATE_FIRMWARE, body)
    assert k == Kind.ERROR and "does not fit" in b[Key.REASON]
    k, b = _update(rig, b"NOT-AN-ARCHIVE" * 100, version="1.0.1")
    rig.peer.wait(lambda: 10 in _fw_statuses(rig), 20)  # install_failed: the slot was never switched
    assert rig.board.alive() and rig.board.status()["version"] == "1.0.0"

    def crash(src: Path) -> None:  # a build whose code dies at import: it never boots
        p = src / "csc" / "app.py"
        p.write_text(p.read_text() + "\nraise RuntimeError('broken build')\n")

    m = rig.board.mark()
    _update(rig, _image(rig, "1.2.0", crash), version="1.2.0")
    rig.board.wait("exit", since=m, timeout=60)  # installed: the reboot into the trial
    for _ in range(3):  # each boot of the trial dies at import; the loader counts them
        m = rig.board.mark()
        rig.board.start()
        assert rig.board.wait("exit", since=m, timeout=30)["rc"] not in (0, 3)
    m = rig.board.mark()
    rig.up()  # the fourth boot: the loader went back to the factory firmware
    assert rig.board.wait("boot", since=m)["version"] == "1.0.0"
    rig.peer.wait(lambda: 12 in _fw_statuses(rig), 20)  # rolled_back, with the loader's reason
    rb = next(b for b in rig.peer.durable(Action.FIRMWARE_STATUS) if b[Key.FW_STATUS] == 12)
    assert "did not confirm itself in 3 boots" in rb[Key.REASON]


def test_fw_m4_m5_update_downloaded_during_a_session_installed_only_after_it(rig: Rig) -> None:
    tx = charging(rig)
    image = _image(rig)
    m = rig.board.mark()
    _k, b = _update(rig, image)
    assert b[Key.STATUS] == 0  # accepted while charging
    rig.board.wait("fw_waiting", since=m, timeout=20)  # downloaded and verified, install held back
    rig.peer.wait(lambda: 5 in _fw_statuses(rig), 10)
    assert _fw_statuses(rig) == [1, 2, 4, 5]  # downloading, downloaded, verifying, verified
    chunks = [r for r in rig.peer.requests if r[1] == Action.FIRMWARE_CHUNK]
    assert len(chunks) == (len(image) + 1023) // 1024
    rig.board.cmd("tick")  # a tick after the download: the update service looked again, the session runs
    st = rig.board.status()
    assert st["tx_id"] == tx and st["power_w"] > 0  # still charging
    assert not [e for e in rig.board.all("fw_status") if e["status"] == 8]  # not installing
    assert not rig.board.all("tx_ended")
    rig.board.cmd("unplug")
    rig.board.wait("exit", timeout=20)  # installed once idle, then the reboot into the new slot
    order = [(a, b) for (_, _, a, b) in rig.peer.persisted if a in (Action.TRANSACTION_EVENT, Action.FIRMWARE_STATUS)]
    ends = [i for i, (a, b) in enumerate(order) if a == Action.TRANSACTION_EVENT and b[Key.EVENT] == 2]
    installing = [i for i, (a, b) in enumerate(order) if a == Action.FIRMWARE_STATUS and b[Key.FW_STATUS] == 8]
    assert len(ends) == 1 and len(installing) == 1 and ends[0] < installing[0]
    end = order[ends[0]][1]
    assert end[Key.TX_ID] == tx and end[Key.STOP_REASON] == 2  # ended by the EV, not by the update
    rig.up()
    rig.peer.wait(lambda: 11 in _fw_statuses(rig), 20)
    assert _fw_statuses(rig) == [1, 2, 4, 5, 8, 9, 11]


def test_fw_m4_m5_update_now_ends_the_session_and_installs_once_verified(rig: Rig) -> None:
    tx = charging(rig)
    image = _image(rig)
    _k, b = _update(rig, image, when=ResetWhen.NOW)
    assert b[Key.STATUS] == 0
    rig.board.wait("exit", timeout=30)  # verified, the session ended, installed, rebooted
    order = [(a, b) for (_, _, a, b) in rig.peer.persisted if a in (Action.TRANSACTION_EVENT, Action.FIRMWARE_STATUS)]
    verified = [i for i, (a, b) in enumerate(order) if a == Action.FIRMWARE_STATUS and b[Key.FW_STATUS] == 5]
    installing = [i for i, (a, b) in enumerate(order) if a == Action.FIRMWARE_STATUS and b[Key.FW_STATUS] == 8]
    # the session's end may still be in the board's outbox at the reboot: it leaves after it
    rig.up()
    rig.peer.wait(lambda: 11 in _fw_statuses(rig), 20)
    order = [(a, b) for (_, _, a, b) in rig.peer.persisted if a in (Action.TRANSACTION_EVENT, Action.FIRMWARE_STATUS)]
    ends = [b for a, b in order if a == Action.TRANSACTION_EVENT and b[Key.EVENT] == 2]
    assert len(ends) == 1 and ends[0][Key.TX_ID] == tx and ends[0][Key.STOP_REASON] == StopReason.REBOOT
    assert verified and installing and verified[0] < installing[0]
    assert _fw_statuses(rig) == [1, 2, 4, 5, 8, 9, 11]


def test_fw_m5_reset_when_idle_waits_for_the_transaction(rig: Rig) -> None:
    charging(rig)
    _k, b = rig.peer.request(Action.RESET, {Key.RESET_TYPE: 1, Key.WHEN: 0})  # hard: the board resets (exits)
    assert b[Key.STATUS] == 7  # scheduled
    rig.board.cmd("tick")  # a tick after the answer: the reset still waits for the transaction
    assert rig.board.status()["tx_id"] is not None and rig.board.alive()
    assert not rig.board.all("reboot")
    rig.board.cmd("unplug")
    rig.board.wait("exit", timeout=10)
    assert any(e[Key.EVENT] == 2 for e in tx_events(rig))


# ---------------------------------------------------------------- M6, M9, M10, M11, M12


def test_fw_m6_display_message_shown_by_priority(rig: Rig) -> None:
    rig.peer.request(Action.SET_DISPLAY_MESSAGE, {Key.DISPLAY_ID: 1, Key.TEXT: "Welcome", Key.DISPLAY_PRIORITY: 2})
    rig.peer.request(
        Action.SET_DISPLAY_MESSAGE, {Key.DISPLAY_ID: 2, Key.TEXT: "Out of order soon", Key.DISPLAY_PRIORITY: 0}
    )
    assert rig.board.status()["text"] == "Out of order soon"
    rig.peer.request(Action.CLEAR_DISPLAY_MESSAGE, {Key.DISPLAY_ID: 2})
    assert rig.board.status()["text"] == "Welcome"


def test_fw_m9_fault_reported_with_provisioned_text(rig: Rig) -> None:
    rig.peer.request(
        Action.SET_FAULT_TABLE, {Key.FAULT_TABLE: [{Key.FAULT_CODE: 2001, Key.SEVERITY: 2, Key.TEXT: "Overheat"}]}
    )
    rig.board.cmd("temp", dc=900)
    rig.peer.wait(lambda: rig.peer.durable(Action.FAULT_REPORT), 5)
    f = rig.peer.durable(Action.FAULT_REPORT)[0]
    assert f[Key.FAULT_CODE] == 2001 and f[Key.ACTIVE] is True


def test_fw_m10_personal_data_deleted(rig: Rig) -> None:
    rig.peer.tokens[b"card-p"] = 0
    rig.board.cmd("card", token="card-p")
    rig.board.wait("auth")
    _k, b = rig.peer.request(Action.DELETE_PERSONAL_DATA, {Key.ID_TOKEN: b""}, secrets={Key.ID_TOKEN: b"card-p"})
    assert b[Key.STATUS] == 0 and b[Key.COUNT] >= 1
    rig.peer.pause()
    m = rig.board.mark()
    rig.board.wait("offline")
    rig.board.cmd("card", token="card-p")
    assert rig.board.wait("auth", since=m)["status"] == 8  # no longer known offline


def test_fw_m11_deregistration_revokes_the_key(rig: Rig) -> None:
    _k, b = rig.peer.request(Action.DEREGISTER, {})
    assert b[Key.STATUS] == 0
    rig.peer.wait(lambda: any(e[Key.EVENT_NAME] == "Deregistered" for e in rig.peer.durable(Action.SECURITY_EVENT)), 10)
    rig.peer.wait(lambda: rig.peer.hellos >= 4, 10)  # back to factory onboarding


def test_fw_m12_migration_to_another_gateway_keeps_the_outbox(rig: Rig, tmp_path: Path) -> None:
    from fwpeer import FACTORY_KEY, Peer

    old_key = rig.peer.devices["evse-1"]["device_key"]
    other = Peer({"evse-1": {"factory_key": FACTORY_KEY, "device_key": old_key}})
    # the new gateway's local-CSMS certificate (its Ed25519 key), handed over with the Migrate:
    # the board trusts only that gateway at the new address
    pki = tmp_path / "other-pki"
    cert = hellokey.issue(pki, "localcsms.other", ca=devpki.ensure_ca(pki))
    other.signer = hellokey.load(cert)
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    try:
        rig.peer.auto_ack = False
        rig.board.cmd("emit", n=3, **{"from": 500})
        rig.peer.wait(lambda: len(rig.peer.durable(Action.METER_VALUES)) == 3, 10)  # sent, never acknowledged
        _k, b = rig.peer.request(Action.MIGRATE, {Key.ADDRESS: f"127.0.0.1:{other.port}", Key.CERT: der})
        assert b[Key.STATUS] == 0
        other.wait(lambda: len(other.durable(Action.METER_VALUES)) == 3, 20)
        rig.power_cut()
        rig.up_other = other  # type: ignore[attr-defined]
        m = rig.board.mark()
        rig.board.start()
        rig.board.wait("registration", since=m)
        # onboarded there with its factory key (no key handed over: the new gateway provisioned its
        # own), then keyed again after the cut (a reconnect with the new key before the cut or not)
        assert other.devices["evse-1"]["device_key"] != old_key and other.hellos >= 2
    finally:
        other.close()
