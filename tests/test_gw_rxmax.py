"""B6 at the gateway: a board states the largest frame it receives (Hello `rx_max`, the size of
its receive buffer) and the gateway sends it nothing larger: a command that would make a larger
frame is refused to whoever sent it, naming the sizes, and never reaches the board; an answer to
the board's own request that would is replaced by an OVERSIZE error frame (docs/protocol.md,
"Frame size"). Real QUIC from the test peer (tests/gwpeer.py), test boards from tools/loadclient."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gwpeer import inner_frame
from test_gw_firmware import SIGNER, SIGNERS
from test_gw_upstream import Site, run, wait_for

from gateway import _core
from gateway.link import FrameTooLarge, Link
from gateway.schema import MAX_FRAME, Action, Key, Kind, Status

pytestmark = pytest.mark.timeout(60)

RX_MAX = 1280  # the smallest a board may state (the schema's bound: a firmware chunk always fits)


def tariff(ext: int = 0) -> dict[int, Any]:
    body: dict[int, Any] = {Key.TARIFF_ID: 1, Key.PRICE_KWH: 30, Key.CURRENCY: "EUR"}
    if ext:
        body[Key.EXT] = bytes(ext)  # vendor data: kept and passed on, counted in the frame
    return body


def test_a_command_above_the_boards_rx_max_is_refused_naming_the_sizes_and_never_sent(tmp_path: Path) -> None:
    async def body(s: Site) -> None:
        peer = await s.start_peer()
        gw = await s.start_gw()
        small, big = s.board(0), s.board(1)
        small.rx_max = RX_MAX
        for b in (small, big):
            b.answer = lambda f: {Key.STATUS: Status.ACCEPTED}
            await b.connect()
        await wait_for(lambda: bool(peer.protocols) and len(gw.online) == 2)
        assert gw.online[small.device_id].link.rx_max == RX_MAX
        assert gw.online[big.device_id].link.rx_max == MAX_FRAME  # states none: the protocol's bound
        proto = peer.protocols[0]

        async def command(targets: list[str], body: dict[int, Any]) -> _core.Frame:
            cmd = inner_frame(Action.SET_TARIFF, body)  # a tariff command is signed upstream
            res: _core.Frame = await proto.command(targets, cmd, signature=SIGNER.sign(cmd), signer="ops")
            return res

        # a tariff with 2 KiB of vendor data: a frame of ~2.1 KB, above what `small` receives
        res = await command([small.device_id, big.device_id], tariff(2000))
        assert res.kind == Kind.RESPONSE, res.body
        results = {r[Key.DEVICE_ID]: r for r in res.body[Key.RESULTS]}
        refused = results[small.device_id]
        assert refused[Key.STATUS] == Status.REJECTED
        reason = refused[Key.REASON]
        assert reason.startswith("OVERSIZE: SetTariff request of ") and f"at most {RX_MAX} B" in reason, reason
        assert int(reason.split(" of ")[1].split(" B")[0]) > RX_MAX
        assert results[big.device_id][Key.STATUS] == Status.ACCEPTED  # the other board takes it
        await wait_for(lambda: any(f.action == Action.SET_TARIFF for f in big.requests_in))
        assert not any(f.action == Action.SET_TARIFF for f in small.requests_in)  # never sent
        # the link goes on: a tariff that fits reaches the small board
        res = await command([small.device_id], tariff())
        assert res.body[Key.RESULTS][0][Key.STATUS] == Status.ACCEPTED
        (got,) = [f for f in small.requests_in if f.action == Action.SET_TARIFF]
        assert got.body[Key.TARIFF_ID] == 1 and Key.EXT not in got.body

    run(body, tmp_path, **SIGNERS)


class _Devices:
    """What Link.request and Link.respond need of the device table: nothing (the link is opened by hand)."""


def test_an_answer_above_the_boards_rx_max_becomes_an_oversize_error_frame() -> None:
    link = Link(_Devices(), None)  # type: ignore[arg-type]
    link.device_id, link.rx_max = "ev-0001", RX_MAX
    link.tx = _core.Sender(bytes(32))
    rx = _core.Receiver(bytes(32))
    answer: dict[int, Any] = {Key.STATUS: Status.ACCEPTED}
    ok = rx.receive(link.respond(7, 1, Action.SET_TARIFF, answer, 0.0))
    assert (ok.kind, ok.msg_id) == (Kind.RESPONSE, 7)
    err = rx.receive(link.respond(8, 1, Action.SET_TARIFF, {**answer, Key.EXT: bytes(2000)}, 0.0))
    assert (err.kind, err.msg_id, _core.error_name(err.body[Key.ERROR_CODE])) == (Kind.ERROR, 8, "OVERSIZE")
    assert f"at most {RX_MAX} B" in err.body[Key.REASON]
    with pytest.raises(FrameTooLarge, match=r"OVERSIZE: SetTariff request of \d+ B; ev-0001 receives at most 1280 B"):
        link.request(Action.SET_TARIFF, tariff(2000), 0.0)
    # the counter the refused request took leaves a gap, which the board's window accepts
    _, frame = link.request(Action.SET_TARIFF, tariff(), 0.0)
    assert rx.receive(frame).action == Action.SET_TARIFF
