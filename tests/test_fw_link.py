"""The link state machine and the send queue, sans I/O: the board's `Link` against a
gateway played in memory by gateway._core (no sockets, no clock: `now_ms` is given).

The link core's own unit tests, against a gateway end played by the firmware's codec, run
under CPython and MicroPython in tests/fw_linktests.py (tests/test_fw_linkcore.py); these
cases cross-check the board against the independent Rust core."""

# mypy: disable-error-code="import-not-found,import-untyped,no-untyped-call"
from __future__ import annotations

import os
from typing import Any

from csc import link as L  # noqa: N812
from csc.frame import FrameSplitter
from csc.schema import (
    A_AUTHORIZE,
    A_DSO_LIMIT,
    A_HELLO,
    A_LOG_CHUNK,
    A_METER_VALUES,
    A_SET_TARIFF,
    A_TRANSACTION_EVENT,
    E_BAD_TAG,
    E_REPLAY,
    E_TIMEOUT,
    F_ERROR_CODE,
    F_ID_TOKEN,
    K_ACK,
    K_EVENT,
    K_REQUEST,
    K_RESPONSE,
)
from csc.sendq import SendQueue

from gateway import _core

KEY = bytes(range(32))


class Gw:
    """The gateway's end in memory."""

    def __init__(self) -> None:
        self.sender: Any = None
        self.receiver: Any = None
        self.e_up = b""

    def hello(self, frame: bytes, device_key: bytes | None = None) -> bytes:
        f = _core.decode(frame, key=_core.hello_key(KEY))
        nonce = os.urandom(16)
        k_up, k_dn, e_up, e_dn = _core.derive_keys(KEY, f.body[51], nonce)
        self.sender, self.receiver, self.e_up = _core.Sender(k_dn), _core.Receiver(k_up), e_up
        body: dict[int, Any] = {51: nonce, 59: 1, 20: 1000}
        if device_key:
            body[57] = _core.aes_ctr(e_dn, 1, 57, device_key)
        return bytes(self.sender.seal(K_RESPONSE, f.msg_id, 1, 0, A_HELLO, body))


def sealed(link: L.Link, n: int) -> memoryview:
    """The frame transmit() just sealed: n bytes, the length prefix first."""
    return link.q.w.mv[link.at : link.at + n]  # type: ignore[no-any-return]


def frames(link: L.Link) -> list[bytes]:
    out: list[bytes] = []
    while True:
        end = link.transmit(0, 5)
        if not end:
            return out
        out.append(bytes(sealed(link, end)[2:]))


ACKED = "acked"  # next_acked() ids, listed among the events as (ACKED, id)


def events(link: L.Link) -> list[tuple[Any, ...]]:
    ids = []
    while (mid := link.next_acked()) >= 0:
        ids.append(mid)
    out: list[tuple[Any, ...]] = [(ACKED, mid) for mid in sorted(ids)]  # any order from next_acked
    while (e := link.next_event()) is not None:
        out.append(e)
    return out


def opened() -> tuple[L.Link, Gw]:
    link = L.Link(SendQueue(), "evse-1", "1.0")
    link.connect(0, KEY, os.urandom(16), 1)
    gw = Gw()
    (hello,) = frames(link)
    link.receive(gw.hello(hello), 0)
    assert link.state == L.OPEN
    events(link)
    return link, gw


def test_fw_m13_hello_handshake_and_device_key_provisioning() -> None:
    link = L.Link(SendQueue(), "evse-1")
    link.connect(0, KEY, os.urandom(16), 7, factory=True)
    (hello,) = frames(link)
    gw = Gw()
    newkey = os.urandom(32)
    link.receive(gw.hello(hello, newkey), 0)
    ev = events(link)
    assert ev[0] == (L.KEY_PROVISIONED, newkey)
    assert ev[1][0] == L.OPENED
    # uplink seq 1 after Hello, tagged under K_up, verified by the Rust core
    link.event(9, A_METER_VALUES, {1: 1, 7: 5}, 0)
    (f,) = frames(link)
    assert gw.receiver.receive(f).seq == 1


def test_fw_b10_bad_frames_rejected_counted_and_change_nothing() -> None:
    link, gw = opened()
    good = bytes(gw.sender.seal(K_REQUEST, 50, 1, 0, A_SET_TARIFF, {123: 1, 124: 30, 127: "EUR"}))
    forged = bytearray(good)
    forged[-1] ^= 1
    link.receive(bytes(forged), 0)
    link.receive(b"\x93\x01\x02", 0)  # malformed
    assert sum(link.errors.values()) == 2 and link.errors[E_BAD_TAG] == 1
    (err1, err2) = frames(link)
    assert gw.receiver.receive(err1).body[F_ERROR_CODE] == E_BAD_TAG
    assert gw.receiver.receive(err2).kind == 2
    assert link.state == L.OPEN and not events(link)
    link.receive(good, 0)
    assert events(link)[0][:3] == (L.REQUEST_RECEIVED, 50, A_SET_TARIFF)
    link.receive(good, 0)  # replayed
    assert link.errors[E_REPLAY] == 1 and not events(link)


def test_fw_b10_flood_of_bad_frames_closes_the_link() -> None:
    link, _ = opened()
    for _ in range(L.FLOOD_MAX + 1):
        link.receive(b"\xc1", 0)
    assert link.state == L.IDLE
    assert events(link)[-1][0] == L.CLOSED


def test_fw_b1_retransmit_with_backoff_then_timeout() -> None:
    link, gw = opened()
    link.request(77, A_AUTHORIZE, {16: b"tok", 17: 0}, 0)
    (f1,) = frames(link)
    a = gw.receiver.receive(f1)
    assert _core.aes_ctr(gw.e_up, a.seq, F_ID_TOKEN, a.body[F_ID_TOKEN]) == b"tok"  # encrypted per seq
    link.handle_timer(4999)
    assert frames(link) == []
    link.handle_timer(5000)
    (f2,) = frames(link)
    b = gw.receiver.receive(f2)
    assert (b.msg_id, b.seq) == (77, a.seq + 1)
    assert _core.aes_ctr(gw.e_up, b.seq, F_ID_TOKEN, b.body[F_ID_TOKEN]) == b"tok"
    link.handle_timer(5000 + 9999)
    assert frames(link) == []  # backed off ×2
    link.handle_timer(15000)
    assert len(frames(link)) == 1
    link.handle_timer(15000 + 20000)
    assert (L.FAILED, 77, E_TIMEOUT, "no answer") in events(link)


def test_fw_b17_durable_event_resent_until_acked_never_given_up() -> None:
    link, gw = opened()
    link.event(5, A_TRANSACTION_EVENT, {5: 0, 3: 1, 4: 0, 6: 0, 1: 1}, 0)
    assert len(frames(link)) == 1
    t = 0
    for _ in range(8):
        t += 120_000
        link.handle_timer(t)
        assert len(frames(link)) == 1
    ack = bytes(gw.sender.seal(K_ACK, 5, 1, 0, A_TRANSACTION_EVENT, {}))
    link.receive(ack, t)
    assert (ACKED, 5) in events(link)
    link.handle_timer(t + 10**6)
    assert frames(link) == []


def test_fw_b6_urgent_leaves_before_queued_bulk_and_bulk_not_starved() -> None:
    link, gw = opened()
    for i in range(3):
        link.event(100 + i, A_LOG_CHUNK, {47: 1, 44: i * 1024, 45: bytes(1024), 46: False}, 0)
    link.respond(200, A_DSO_LIMIT, 0, {26: 0})
    first = gw.receiver.receive(frames(link)[0])
    assert first.action == A_DSO_LIMIT and first.prio == 0
    q = SendQueue()
    for i in range(3):
        q.put(K_EVENT, 3, i, A_LOG_CHUNK, {45: bytes(1000)})
    for i in range(6):
        q.put(K_EVENT, 1, 10 + i, A_METER_VALUES, {1: 1})
    order = []
    while (c := q.next()) >= 0:
        order.append(c)
        q.pop(c)
    assert 3 in order[:7]  # bulk served before control is exhausted


def test_fw_b10_repeated_command_answered_once() -> None:
    link, gw = opened()
    req = bytes(gw.sender.seal(K_REQUEST, 60, 1, 0, A_SET_TARIFF, {123: 1, 124: 30, 127: "EUR"}))
    link.receive(req, 0)
    (_ev,) = events(link)
    link.respond(60, A_SET_TARIFF, 1, {26: 0})
    frames(link)
    again = bytes(gw.sender.seal(K_REQUEST, 60, 1, 0, A_SET_TARIFF, {123: 1, 124: 30, 127: "EUR"}))
    link.receive(again, 0)
    assert events(link) == []
    (resp,) = frames(link)
    assert gw.receiver.receive(resp).body == {26: 0}


def test_fw_b26_stream_splitting_feeds_the_link() -> None:
    link, gw = opened()
    s = FrameSplitter()
    data = b""
    for i in range(3):
        f = bytes(gw.sender.seal(K_REQUEST, 70 + i, 1, 0, A_SET_TARIFF, {123: i, 124: 30, 127: "EUR"}))
        data += len(f).to_bytes(2, "big") + f
    for f in s.feed(data):
        link.receive(f, 0)
    assert [e[1] for e in events(link)] == [70, 71, 72]
