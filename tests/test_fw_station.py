"""Use cases on the emulated board, second part: monitors (M3), logs across a power cut
(M7/M8), certificates (M14–M19, S7), demand response and the EV's needs (E2–E4), the
station's own operations (availability, unlock, emergency stop, TriggerMessage) and time
(B13). Real micropython processes against the gateway peer (tests/fwpeer.py); each test
is named after the use-case ID it proves."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from fwpeer import Conn, Rig, barrier, charging, now_ts

from gateway.schema import Action, Key, Kind, Priority

pytestmark = pytest.mark.timeout(60)

ACCEPTED, REJECTED, SCHEDULED, UNKNOWN, NOT_SUPPORTED = 0, 1, 7, 4, 3
CA_CERT = b"\x30\x82\x01\x00" + b"ca-root-certificate" * 4
LOCAL_CSMS_CERT = b"\x30\x82\x01\x00" + b"local-csms-certificate" * 4
CS_CERT = b"\x30\x82\x01\x00" + b"station-certificate" * 4


def ok(rig: Rig, action: int, body: dict[int, Any], **kw: Any) -> dict[int, Any]:
    k, b = rig.peer.request(action, body, **kw)
    assert k == Kind.RESPONSE, b
    return b


# ---------------------------------------------------------------- M3 monitors


def test_fw_m3_monitors_trigger_on_threshold_delta_and_period(rig: Rig) -> None:
    mon = [
        {Key.MONITOR_ID: 1, Key.COMPONENT: "ChargingStation", Key.VARIABLE: "Temperature", Key.MONITOR_TYPE: 0,
         Key.THRESHOLD: 600.0, Key.SEVERITY: 2},
        {Key.MONITOR_ID: 2, Key.COMPONENT: "ChargingStation", Key.VARIABLE: "Frequency", Key.MONITOR_TYPE: 2,
         Key.THRESHOLD: 100.0, Key.SEVERITY: 5},
        {Key.MONITOR_ID: 3, Key.COMPONENT: "EVSE", Key.VARIABLE: "Energy", Key.MONITOR_TYPE: 3,
         Key.THRESHOLD: 1.0, Key.SEVERITY: 8},
    ]  # fmt: skip
    bad = [{**mon[0], Key.MONITOR_ID: 9, Key.VARIABLE: "NoSuchThing"}]
    b = ok(rig, Action.SET_MONITORS, {Key.MONITORS: [*mon[:1], *bad]})
    assert b[Key.STATUS] == REJECTED and "NoSuchThing" in b[Key.REASON]
    assert ok(rig, Action.SET_MONITORS, {Key.MONITORS: mon})[Key.STATUS] == ACCEPTED

    def events(mid: int) -> list[dict[int, Any]]:  # MonitorEvents stored by the gateway
        return [e for e in rig.peer.durable(Action.MONITOR_EVENT) if e[Key.MONITOR_ID] == mid]

    def fired(mid: int, since: int = 0) -> list[dict[str, Any]]:  # the board's note of each one it emitted
        with rig.board._cv:
            return [e for e in rig.board.events[since:] if e["ev"] == "monitor" and e["id"] == mid]

    def checked(periodic: int) -> None:
        # the board checks all its monitors in one go: the periodic one firing after a barrier
        # means every monitor was checked after the commands sent before it
        rig.board.wait("monitor", pred=lambda e: e["id"] == periodic, since=barrier(rig.board), timeout=10)

    rig.peer.wait(lambda: len(events(3)) >= 2, 10)  # periodic, every second
    assert not fired(1)  # nothing crossed yet: the rejected SetMonitors installed nothing
    assert not fired(9)
    rig.board.cmd("temp", dc=650)
    e = rig.peer.wait(lambda: events(1), 10)[0]
    assert (e[Key.VAL], e[Key.SEVERITY], e[Key.VARIABLE]) == ("650", 2, "Temperature")
    rig.board.cmd("freq", mhz=50050)
    checked(3)
    assert not fired(2)  # a delta below the threshold
    rig.board.cmd("freq", mhz=50150)
    assert rig.peer.wait(lambda: events(2), 10)[0][Key.VAL] == "50150"
    checked(3)
    assert len(fired(1)) == 1  # upper fires once per crossing (the temperature stayed above)
    m = rig.board.mark()
    assert ok(rig, Action.CLEAR_MONITORS, {Key.IDS: [3]})[Key.STATUS] == ACCEPTED
    cleared = rig.board.wait("command", pred=lambda e: e["action"] == Action.CLEAR_MONITORS, since=m)
    with rig.board._cv:
        at = next(i for i in range(m, len(rig.board.events)) if rig.board.events[i] is cleared)
    # the checks go on (a periodic monitor 4 fires twice), monitor 3 no longer fires
    assert ok(rig, Action.SET_MONITORS, {Key.MONITORS: [{**mon[2], Key.MONITOR_ID: 4}]})[Key.STATUS] == ACCEPTED
    rig.board.wait("monitor", pred=lambda e: e["id"] == 4 and len(fired(4)) >= 2, since=at, timeout=10)
    assert not fired(3, since=at)
    assert ok(rig, Action.CLEAR_MONITORS, {Key.IDS: [77]})[Key.STATUS] == UNKNOWN


# ---------------------------------------------------------------- M7, M8


def test_fw_m7_m8_log_criteria_and_upload_resumes_after_power_cut(rig: Rig) -> None:
    assert ok(rig, Action.SET_LOG_CRITERIA, {Key.LOG_LEVEL: 9})[Key.STATUS] == ACCEPTED
    for _ in range(10):
        rig.board.cmd("log", text="0123456789abcdef", n=64)
    barrier(rig.board)  # the ten lines are in the log
    rig.peer.auto_ack = False  # the gateway takes chunks but acknowledges only the first two
    acked: list[int] = []

    b = ok(rig, Action.GET_LOG, {Key.REQUEST_ID: 5, Key.LOG_TYPE: 0})
    assert b[Key.LOG_STATUS] == 1
    c = rig.peer.conn()

    def ack_chunk(n: int) -> None:  # one chunk in flight: the next comes once this one is acknowledged
        rig.peer.wait(lambda: len(rig.peer.durable(Action.LOG_CHUNK)) >= n, 5)
        with rig.peer._cv:
            mid, a = [(mid, a) for (_, mid, a, _) in rig.peer.persisted if a == Action.LOG_CHUNK][n - 1]
        c.seal(Kind.ACK, mid, 3, a, {})
        acked.append(mid)

    ack_chunk(1)
    ack_chunk(2)
    # one chunk in flight: the board saves the position after an acknowledged chunk before it
    # sends the next one, so chunk 3 on its way means the position after chunk 2 is on flash
    rig.peer.wait(lambda: len(rig.peer.durable(Action.LOG_CHUNK)) >= 3, 10)
    rig.power_cut()
    rig.peer.auto_ack = True
    rig.up()
    rig.board.wait("log_uploaded", timeout=30)
    chunks = rig.peer.durable(Action.LOG_CHUNK)
    offsets = {ch[Key.OFFSET]: ch for ch in chunks if ch[Key.REQUEST_ID] == 5}
    total = max(o + len(ch[Key.DATA]) for o, ch in offsets.items())
    assert total >= 10 * 1024
    # every byte range arrived, the upload resumed after the acknowledged chunks (not from 0)
    data = bytearray(total)
    for o, ch in offsets.items():
        data[o : o + len(ch[Key.DATA])] = ch[Key.DATA]
    assert b"\x00" not in data
    after = [ch[Key.OFFSET] for ch in chunks[len(acked) :]]
    assert min(after) >= 2 * 1024
    rig.peer.wait(lambda: [s for s in rig.peer.durable(Action.LOG_STATUS) if s[Key.LOG_STATUS] == 3], 5)
    assert rig.peer.durable(Action.LOG_STATUS)[0][Key.LOG_STATUS] == 2  # uploading, then uploaded


# ---------------------------------------------------------------- M14, M15, M17, M19


def test_fw_m14_m15_m17_m19_ca_certificates_ocsp_and_revocation(rig: Rig) -> None:
    h_ca = hashlib.sha256(CA_CERT).digest()
    h_local = hashlib.sha256(LOCAL_CSMS_CERT).digest()
    k, b = rig.peer.request(Action.INSTALL_CERTIFICATE, {Key.CERT_TYPE: 0, Key.CERT: b"not a certificate"})
    assert k == Kind.ERROR and "DER" in b[Key.REASON]
    k, b = rig.peer.request(Action.INSTALL_CERTIFICATE, {Key.CERT_TYPE: 3, Key.CERT: CS_CERT})
    assert k == Kind.ERROR  # the station's own certificate only comes signed (M16)
    assert ok(rig, Action.INSTALL_CERTIFICATE, {Key.CERT_TYPE: 0, Key.CERT: CA_CERT})[Key.STATUS] == ACCEPTED
    assert ok(rig, Action.INSTALL_CERTIFICATE, {Key.CERT_TYPE: 2, Key.CERT: LOCAL_CSMS_CERT})[Key.STATUS] == ACCEPTED
    assert ok(rig, Action.GET_INSTALLED_CERTIFICATES, {})[Key.CERT_HASHES] == [h_ca, h_local]
    assert ok(rig, Action.GET_INSTALLED_CERTIFICATES, {Key.CERT_TYPE: 2})[Key.CERT_HASHES] == [h_local]  # M17
    # M15: an OCSP response is kept for an installed certificate only
    b = ok(rig, Action.OCSP_RESPONSE, {Key.CERT_HASH: bytes(32), Key.OCSP: b"\x30ocsp"})
    assert b[Key.STATUS] == REJECTED
    assert ok(rig, Action.OCSP_RESPONSE, {Key.CERT_HASH: h_ca, Key.OCSP: b"\x30ocsp"})[Key.STATUS] == ACCEPTED
    rig.board.wait("ocsp_stored")
    # the trust store survives a power cut
    rig.power_cut()
    rig.up()
    assert ok(rig, Action.GET_INSTALLED_CERTIFICATES, {})[Key.CERT_HASHES] == [h_ca, h_local]
    # M14 delete; M19 revocation removes it and refuses it afterwards
    assert ok(rig, Action.DELETE_CERTIFICATE, {Key.CERT_HASH: h_ca})[Key.STATUS] == ACCEPTED
    assert ok(rig, Action.DELETE_CERTIFICATE, {Key.CERT_HASH: h_ca})[Key.STATUS] == UNKNOWN
    b = ok(rig, Action.REVOKE_CERTIFICATE, {Key.CERT_HASH: h_local, Key.REASON: "key compromise"})
    assert b[Key.STATUS] == ACCEPTED
    assert ok(rig, Action.GET_INSTALLED_CERTIFICATES, {})[Key.CERT_HASHES] == []
    b = ok(rig, Action.INSTALL_CERTIFICATE, {Key.CERT_TYPE: 2, Key.CERT: LOCAL_CSMS_CERT})
    assert b[Key.STATUS] == REJECTED and "revoked" in b[Key.REASON]
    ev = rig.peer.wait(
        lambda: [e for e in rig.peer.durable(Action.SECURITY_EVENT) if e[Key.EVENT_NAME] == "CertificateRevoked"]
    )
    assert ev


# ---------------------------------------------------------------- M16, M18


def test_fw_m16_csr_from_the_secure_element_then_certificate_signed(rig: Rig) -> None:
    csrs: list[bytes] = []

    def sign(c: Conn, fr: Any) -> dict[int, Any]:
        csrs.append(fr.body[Key.CSR])
        return {Key.STATUS: ACCEPTED}

    rig.peer.handlers[Action.SIGN_CERTIFICATE] = sign
    b = ok(rig, Action.CERTIFICATE_SIGNED, {Key.CERT: CS_CERT, Key.CERT_TYPE: 3})
    assert b[Key.STATUS] == REJECTED and "CSR" in b[Key.REASON]  # nothing was asked for
    b = ok(rig, Action.TRIGGER_MESSAGE, {Key.REQUESTED_ACTION: Action.SIGN_CERTIFICATE})
    assert b[Key.STATUS] == ACCEPTED
    rig.peer.wait(lambda: csrs, 5)
    csr = x509.load_der_x509_csr(csrs[0])  # a real PKCS#10 request, signed by the secure element's key
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == rig.board.device_id
    se_key = serialization.load_pem_private_key((rig.board.dir / "se-key.pem").read_bytes(), None)
    assert csr.public_key() == se_key.public_key()  # the chip's key pair; its private half stays in the chip
    rig.board.wait("csr_sent")
    assert ok(rig, Action.CERTIFICATE_SIGNED, {Key.CERT: CS_CERT, Key.CERT_TYPE: 3})[Key.STATUS] == ACCEPTED
    e = rig.board.wait("cs_cert_installed")
    assert e["key_outside"] is False


def test_fw_m18_key_pair_delivered_encrypted_with_the_certificate(rig: Rig) -> None:
    key = bytes(range(100, 132))
    b = ok(
        rig,
        Action.CERTIFICATE_SIGNED,
        {Key.CERT: CS_CERT, Key.CERT_TYPE: 3, Key.PRIVATE_KEY: b""},
        secrets={Key.PRIVATE_KEY: key},
    )
    assert b[Key.STATUS] == ACCEPTED
    assert rig.board.wait("cs_cert_installed")["key_outside"] is True
    assert rig.board.status()["se_key"] == key.hex()  # decrypted into the secure element


# ---------------------------------------------------------------- S7


def test_fw_s7_ev_contract_certificate_relayed_to_and_from_the_ev(rig: Rig) -> None:
    seen: list[tuple[bytes, int]] = []

    def ev_cert(c: Conn, fr: Any) -> dict[int, Any]:
        seen.append((fr.body[Key.EXI], fr.body[Key.ACTION_15118]))
        return {Key.STATUS: ACCEPTED, Key.EXI: b"\x80exi-response"}

    rig.peer.handlers[Action.GET15118_EV_CERTIFICATE] = ev_cert
    rig.board.cmd("plug")
    rig.board.cmd("ev_cert", exi=b"\x80exi-request".hex(), action=0)
    assert rig.board.wait("ev_certificate")["ok"] is True
    assert seen == [(b"\x80exi-request", 0)]
    assert rig.board.status()["exi"] == b"\x80exi-response".hex()


# ---------------------------------------------------------------- E2, E3, E4


def test_fw_e3_ev_needs_notified_and_e2_demand_response_keeps_them(rig: Rig) -> None:
    tx = charging(rig, needs=[5000, 3600, 40])  # 5 kWh within the hour: at least 5000 W
    n = rig.peer.wait(lambda: rig.peer.durable(Action.NOTIFY_EV_NEEDS), 5)[0]
    assert n[Key.ENERGY_NEEDED_WH] == 5000 and n.get(Key.TX_ID, tx) == tx  # at plug-in: maybe before the tx
    assert abs(n[Key.DEPARTURE] - (now_ts() + 3600)) < 60
    assert ok(rig, Action.DEMAND_RESPONSE, {Key.GRID_EVENT: 2, Key.LIMIT_W: 2000})[Key.STATUS] == ACCEPTED
    assert rig.board.status()["hw_limit"] == 5000  # re-planned, but not below the EV's needs
    assert ok(rig, Action.DEMAND_RESPONSE, {Key.GRID_EVENT: 3, Key.LIMIT_W: 2000})[Key.STATUS] == ACCEPTED
    assert rig.board.status()["hw_limit"] == 2000  # an emergency goes below the needs
    b = ok(rig, Action.DEMAND_RESPONSE, {Key.GRID_EVENT: 1})
    assert b[Key.STATUS] == REJECTED and rig.board.status()["hw_limit"] == 2000  # bad input changes nothing
    assert ok(rig, Action.DEMAND_RESPONSE, {Key.GRID_EVENT: 0})[Key.STATUS] == ACCEPTED
    assert rig.board.status()["hw_limit"] == 11000


def test_fw_e4_resource_manager_limit_obeyed(rig: Rig) -> None:
    charging(rig)
    profile: dict[int, Any] = {Key.EVSE: 0, Key.PROFILE_ID: 4, Key.STACK_LEVEL: 0, Key.PURPOSE: 4,
               Key.PERIODS: [{Key.START_S: 0, Key.LIMIT_W: 3700}]}  # fmt: skip
    assert ok(rig, Action.SET_CHARGING_PROFILE, profile)[Key.STATUS] == ACCEPTED
    st = rig.board.status()  # the limit applied when the answer left
    assert st["hw_limit"] == 3700 and 0 < st["power_w"] <= 3700
    rig.board.cmd("tick")  # and still after the board's next tick (which plans the power again)
    st = rig.board.status()
    assert st["hw_limit"] == 3700 and 0 < st["power_w"] <= 3700


# ---------------------------------------------------------------- availability, unlock, emergency stop


def test_fw_change_availability_scheduled_during_tx_and_refuses_new_sessions(rig: Rig) -> None:
    charging(rig)
    b = ok(rig, Action.CHANGE_AVAILABILITY, {Key.OPERATIVE: False})
    assert b[Key.STATUS] == SCHEDULED
    m = rig.board.mark()
    rig.board.cmd("unplug")
    rig.board.wait("tx_ended", since=m)
    rig.peer.wait(lambda: [s for s in rig.peer.events if s[1] == Action.STATUS_NOTIFICATION and s[2][Key.STATE] == 3])
    rig.board.cmd("plug")
    rig.board.cmd("card", token="card-1")
    assert rig.board.wait("auth", since=m)["status"] == "unavailable"
    assert ok(rig, Action.CHANGE_AVAILABILITY, {Key.OPERATIVE: True})[Key.STATUS] == ACCEPTED
    rig.board.cmd("card", token="card-1")
    rig.board.wait("tx_started", since=m)


def test_fw_unlock_connector_is_urgent_and_ends_the_transaction(rig: Rig) -> None:
    tx = charging(rig)
    _, b, rtt = rig.peer.request_timed(Action.UNLOCK_CONNECTOR, {Key.EVSE: 1})
    assert b[Key.STATUS] == ACCEPTED
    assert rig.peer.answer_prio[rig.peer.last_request] == Priority.URGENT  # answered in the urgent class
    print(f"UnlockConnector round trip {rtt * 1000:.1f} ms")  # a figure, not a pass/fail bound
    assert rig.board.wait("tx_ended")["tx_id"] == tx
    k, b = rig.peer.request(Action.UNLOCK_CONNECTOR, {Key.EVSE: 7})
    assert k == Kind.ERROR and "evse" in b[Key.REASON]


def test_fw_emergency_stop_from_the_gateway_opens_the_contactor(rig: Rig) -> None:
    tx = charging(rig)
    _, b, rtt = rig.peer.request_timed(Action.EMERGENCY_STOP, {Key.REASON: "fire alarm"}, prio=0)
    assert b[Key.STATUS] == ACCEPTED
    assert rig.peer.answer_prio[rig.peer.last_request] == Priority.URGENT
    print(f"EmergencyStop round trip {rtt * 1000:.1f} ms")  # a figure, not a pass/fail bound
    st = rig.board.status()
    assert st["contactor"] is False and st["estop"] is True and st["tx_id"] is None
    ended = rig.peer.wait(lambda: [e for e in rig.peer.durable(Action.TRANSACTION_EVENT) if e[Key.EVENT] == 2])
    assert ended[0][Key.TX_ID] == tx and ended[0][Key.STOP_REASON] == 4


def test_fw_emergency_stop_from_the_board_button_tells_the_gateway(rig: Rig) -> None:
    charging(rig)
    rig.board.cmd("button")
    r = rig.peer.wait(lambda: [q for q in rig.peer.requests if q[1] == Action.EMERGENCY_STOP], 5)
    assert "button" in r[0][2][Key.REASON]
    st = rig.board.status()
    assert st["contactor"] is False and st["tx_id"] is None and st["estop"] is True


# ---------------------------------------------------------------- TriggerMessage, B13


def test_fw_trigger_message_sends_what_was_asked(rig: Rig) -> None:
    n = len(rig.peer.events)
    assert ok(rig, Action.TRIGGER_MESSAGE, {Key.REQUESTED_ACTION: Action.STATUS_NOTIFICATION})[Key.STATUS] == 0
    rig.peer.wait(lambda: [e for e in rig.peer.events[n:] if e[1] == Action.STATUS_NOTIFICATION], 5)
    b = ok(rig, Action.TRIGGER_MESSAGE, {Key.REQUESTED_ACTION: Action.RESET})
    assert b[Key.STATUS] == NOT_SUPPORTED


def test_fw_b13_time_sync_periodic_and_clock_step_keeps_event_order(rig: Rig) -> None:
    syncs = rig.peer.wait(lambda: [q for q in rig.peer.requests if q[1] == Action.TIME_SYNC], 5)
    assert syncs  # at connection
    tx = charging(rig)
    # the site clock steps back one hour: the board follows it, its events stay ordered
    rig.peer.handlers[Action.TIME_SYNC] = lambda c, fr: {Key.TIME: now_ts() - 3600, Key.TIME_MS: 0}
    ok(rig, Action.TRIGGER_MESSAGE, {Key.REQUESTED_ACTION: Action.TIME_SYNC})
    rig.board.wait("time_synced", pred=lambda e: e["time"] < now_ts() - 3000)
    assert abs(rig.board.status()["time"] - (now_ts() - 3600)) < 5
    rig.board.cmd("unplug")
    rig.board.wait("tx_ended")
    rig.peer.wait(lambda: [e for e in rig.peer.durable(Action.TRANSACTION_EVENT) if e[Key.EVENT] == 2], 5)
    with rig.peer._cv:
        evs = [(mid, b) for (_, mid, a, b) in rig.peer.persisted if a == Action.TRANSACTION_EVENT]
    evs = [(mid, b) for mid, b in evs if b[Key.TX_ID] == tx]
    assert evs[-1][1][Key.TIME] < evs[0][1][Key.TIME]  # the clock went back …
    assert [b[Key.SEQ_NO] for _, b in evs] == list(range(len(evs)))  # … the order did not
    ids = [mid for mid, _ in evs]
    assert ids == sorted(ids)


def test_fw_a_clock_step_moves_the_boards_wall_clock_by_the_step_once(rig: Rig) -> None:
    # the emulated board's `step` (the test's way to let time pass) moves its ticks and, with them, the
    # wall clock of App.time(): once, so a timeout of N seconds expires after a step of N seconds and
    # not half of it (it moved the wall clock twice: a 120 s step ran out a 180 s EV-connection timeout)
    b = rig.board
    t0 = b.status()["time"]
    b.cmd("step", ms=120_000)
    assert 120 <= b.status()["time"] - t0 <= 125
