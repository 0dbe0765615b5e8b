"""CSMS transport: mutual TLS, ALPN, framing and bad input answered with errors naming the
cause and changing nothing (docs/upstream.md, B4, B10, B15)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from csmsclient import CONTROL, Board, gateway, running_csms, site, until

from evedge_csms.wire import decode_up, encode_up
from gateway import _core
from gateway.protocol import devpki
from gateway.protocol.upstream_wire import K_UP
from gateway.schema import Action, ErrorCode, Key, Kind

pytestmark = pytest.mark.timeout(30)

BOOT = {Key.MODEL: "m", Key.VENDOR: "v", Key.SERIAL: "s", Key.FW_VERSION: "1"}


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 25))


def snapshot(server: Any) -> dict[str, int]:
    from evedge_csms.tables import TABLES

    return {t.name: len(server.store.select(t.name)) for t in TABLES if t.name not in ("sites",)}


def test_csms_b4_client_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv:
            other = devpki.ensure_ca(tmp_path / "other", "ca")
            rogue = devpki.issue(tmp_path / "other", "site-1", ca=other)
            with pytest.raises(ConnectionError):
                async with gateway(srv.port, "site-1", srv.config.ca, rogue.cert, rogue.key):
                    pass
            assert srv.store.select("sites") == []

    run(main())


def test_csms_b4_client_without_certificate_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv:
            with pytest.raises(ConnectionError):
                async with gateway(srv.port, "site-1", srv.config.ca, None, None):
                    pass
            assert srv.store.select("sites") == []

    run(main())


def test_csms_b15_wrong_alpn_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv:
            with pytest.raises(ConnectionError):
                async with site(srv, alpn="evedge-up/2"):
                    pass

    run(main())


def test_csms_b10_site_hello_must_match_certificate(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv, "site-1", hello=False) as gw:
            rid = gw.relay([Board("b1").frame(Action.BOOT_NOTIFICATION, BOOT)])
            err = await gw.error_for(rid)
            assert err.body[Key.ERROR_CODE] == ErrorCode.REJECTED
            assert "SiteHello" in err.body[Key.REASON]
            gw.site_id = "site-2"
            with pytest.raises(AssertionError):
                hello = await gw.hello()
                assert hello.kind == Kind.RESPONSE, hello.body
            assert "certificate CN" in gw.rx.errors[-1][1].body[Key.REASON]
            assert srv.store.select("sites") == [] and srv.store.select("stations") == []

    run(main())


def test_csms_b6_oversize_length_prefix_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            before = snapshot(srv)
            gw.send_raw(CONTROL, (2 << 20).to_bytes(4, "big") + b"\x00" * 16)
            await until(lambda: gw.rx.errors)
            env = gw.rx.errors[0][1]
            assert env.body[Key.ERROR_CODE] == ErrorCode.OVERSIZE
            assert "length prefix" in env.body[Key.REASON]
            await until(lambda: gw.rx.terminated is not None)
            assert gw.rx.terminated is not None and "OVERSIZE" in gw.rx.terminated.reason_phrase
            assert snapshot(srv) == before

    run(main())


@pytest.mark.parametrize(
    ("item_frame", "code", "words"),
    [
        (b"\x93\x01\x02", ErrorCode.TRUNCATED, "frames[1] (b2)"),
        (_core.encode(3, 1, 5, 2, 0, 999, {}, b"k" * 32), ErrorCode.UNKNOWN_ACTION, "999"),
        (_core.encode(0, 1, 5, 1, 0, Action.RESET, {96: 0, 97: 0}, b"k" * 32), ErrorCode.BAD_KIND, "Reset"),
        (_core.encode(3, 1, 5, 1, 0, Action.TRANSACTION_EVENT, {5: 9}, b"k" * 32), ErrorCode.OUT_OF_RANGE, "event"),
    ],
)
def test_csms_b17_bad_inner_frame_rejects_the_whole_relay(
    tmp_path: Path, item_frame: bytes, code: int, words: str
) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            before = snapshot(srv)
            good = Board("b1").frame(Action.BOOT_NOTIFICATION, BOOT)
            rid = gw.relay([good, {Key.DEVICE_ID: "b2", Key.FRAME: item_frame}])
            err = await gw.error_for(rid)
            assert err.body[Key.ERROR_CODE] == code, err.body
            assert words in err.body[Key.REASON]
            assert snapshot(srv) == before  # the good frame was not stored either
            # the connection still works: a later Relay is acked, and the refused one never was
            await gw.relay_acked([good])
            assert not gw.rx.acks[rid].is_set()
            assert len(srv.store.select("stations")) == 1

    run(main())


def test_csms_b15_unknown_top_level_action_and_bad_tag(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            before = snapshot(srv)
            gw.send_raw(CONTROL, len(f := _core.encode(3, 9, 77, 1, 0, 4242, {}, K_UP)).to_bytes(4, "big") + f)
            err = await gw.error_for(77)
            assert err.body[Key.ERROR_CODE] == ErrorCode.UNKNOWN_ACTION
            bad = bytearray(encode_up(3, 10, 78, 2, 0, Action.RELAY, {Key.SITE_ID: "site-1", Key.FRAMES: []}))
            bad[-1] ^= 1
            gw.send_raw(CONTROL, len(bad).to_bytes(4, "big") + bytes(bad))
            err = await gw.error_for(78)
            assert err.body[Key.ERROR_CODE] == ErrorCode.BAD_TAG
            assert snapshot(srv) == before

    run(main())


def test_csms_b26_large_relay_above_lan_frame_size(tmp_path: Path) -> None:
    """A Relay larger than MAX_FRAME (many board frames) is checked and stored."""

    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            b = Board("b1")
            items = [
                b.frame(Action.SECURITY_EVENT, {Key.EVENT_NAME: "x" * 30, Key.TIME: i, Key.REASON: "r" * 100})
                for i in range(60)
            ]
            frame = encode_up(3, 1, 1, 1, 0, Action.RELAY, {Key.SITE_ID: "site-1", Key.FRAMES: items})
            assert len(frame) > 4096
            assert decode_up(frame).action == Action.RELAY
            await gw.relay_acked(items)
            assert len(srv.store.select("security_events")) == 60

    run(main())
