"""The LAN side of the gateway on 127.0.0.1: Hello, verification in batches, durable acks,
rejections naming their cause, replays, floods, onboarding (M13) and deregistration (M11)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from gwpeer import SEED, gateway_doc

from gateway import _core, config
from gateway.devices import derive
from gateway.schema import PROTOCOL_VERSION, Action, Key, Kind, Priority
from gateway.service import Gateway
from tools.loadclient import Board, HelloRefused, dev_key, run_load

pytestmark = pytest.mark.timeout(60)


async def start_gw(tmp: Path, **sections: dict[str, Any]) -> Gateway:
    cfg = config.prepare(config.parse(gateway_doc(tmp, None, **sections)))
    gw = Gateway(cfg)
    await gw.start()
    return gw


def board(gw: Gateway, n: int = 0, name: str | None = None) -> Board:
    did = name or f"ev-{n:04d}"
    return Board(did, dev_key(SEED, did), "127.0.0.1", gw.lan_port)


def with_gw(fn: Callable[[Gateway], Awaitable[None]]) -> Callable[[Path], None]:
    """Runs an async test body against a fresh gateway (no async plugin needed)."""

    @functools.wraps(fn)
    def test(tmp_path: Path) -> None:
        async def main() -> None:
            g = await start_gw(tmp_path)
            try:
                await fn(g)
            finally:
                await g.stop()

        asyncio.run(main())

    del test.__wrapped__  # pytest must see the (tmp_path) signature
    return test


async def wait_for(cond: object, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        if loop.time() > end:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)


def rows(gw: Gateway) -> list[tuple[str, int]]:
    db = sqlite3.connect(gw.cfg.site.outbox_path)
    try:
        return [(d, m) for d, m in db.execute("SELECT device, msg_id FROM outbox ORDER BY seq")]
    finally:
        db.close()


@with_gw
async def test_many_boards_every_event_committed_then_acked(gw: Gateway) -> None:
    boards = [board(gw, i) for i in range(40)]
    r = await run_load(boards, 100, window=64)
    assert r.acked == r.sent == 4000 and r.errors == {}
    stored = rows(gw)
    assert len(stored) == 4000
    for b in boards:  # per device, the acceptance order is the board's order
        ids = [m for d, m in stored if d == b.device_id]
        assert ids == sorted(ids)


@with_gw
async def test_ack_only_after_the_row_is_committed(gw: Gateway) -> None:
    b = board(gw)
    await b.connect()
    b.record_acks = True
    b.send("meter", 5)
    await wait_for(lambda: len(b.acked_ids) == 5)
    assert set(b.acked_ids) <= {m for _, m in rows(gw)}  # read from the file by another connection


@with_gw
async def test_resent_event_is_acked_again_and_stored_once(gw: Gateway) -> None:
    b = board(gw)
    await b.connect()
    ids = b.send("meter", 3)
    await wait_for(lambda: not b.unacked)
    b.close()
    for i in ids:  # as after a lost ack: same ids again on a new link
        b.unacked[i] = (Action.METER_VALUES, Priority.TELEMETRY, {Key.EVSE: 1}, 0.0)
    await b.connect()
    await wait_for(lambda: not b.unacked)
    assert [m for _, m in rows(gw)] == ids
    assert gw.duplicates == 3


@with_gw
async def test_bad_tag_is_answered_with_its_cause_and_the_link_survives(gw: Gateway) -> None:
    b = board(gw)
    await b.connect()
    forged = _core.encode(Kind.EVENT, 1, 99, 2, 0, Action.METER_VALUES, {Key.EVSE: 1}, bytes(32))
    b.send_raw(len(forged).to_bytes(2, "big") + forged)
    await wait_for(lambda: b.errors.get("BAD_TAG") == 1)
    assert b.responses[99].body[Key.REASON]
    b.send("meter", 1)  # the forged frame did not move the window: seq 1 is still good
    await wait_for(lambda: not b.unacked)
    assert gw.rejections["BAD_TAG"] == 1


@with_gw
async def test_replayed_frame_is_refused_as_replay(gw: Gateway) -> None:
    b = board(gw)
    await b.connect()
    assert b.sender is not None
    f = b.sender.seal(Kind.EVENT, 500, 2, 0, Action.METER_VALUES, {Key.EVSE: 1})
    b.send_raw(len(f).to_bytes(2, "big") + f)
    b.send_raw(len(f).to_bytes(2, "big") + f)
    await wait_for(lambda: b.errors.get("REPLAY") == 1)
    assert "REPLAY" in gw.rejections


@with_gw
async def test_schema_violation_names_the_field(gw: Gateway) -> None:
    b = board(gw)
    await b.connect()
    assert b.sender is not None
    f = b.sender.seal(Kind.EVENT, 77, 2, 0, Action.METER_VALUES, {Key.EVSE: 999})
    b.send_raw(len(f).to_bytes(2, "big") + f)
    await wait_for(lambda: 77 in b.responses)
    err = b.responses[77]
    assert _core.error_name(err.body[Key.ERROR_CODE]) == "OUT_OF_RANGE"
    assert err.body[Key.FIELD] == Key.EVSE


@with_gw
async def test_error_frames_carry_the_field_at_fault_when_there_is_one(gw: Gateway) -> None:
    """docs/protocol.md, Kinds: an error body holds `field`, the body key at fault, when
    there is one (a nested fault names the top-level key holding it); none otherwise."""
    b = board(gw)
    await b.connect()
    assert b.sender is not None
    cases: dict[int, tuple[dict[int, Any], str, int | None]] = {
        81: ({Key.EVSE: "one"}, "BAD_TYPE", Key.EVSE),
        82: ({Key.ENERGY_WH: 5}, "MISSING_FIELD", Key.EVSE),
        83: ({Key.EVSE: 1, Key.SAMPLES: [{Key.MEASURAND: 200, Key.VALUE: 1.0}]}, "OUT_OF_RANGE", Key.SAMPLES),
        84: ({Key.EVSE: 1, Key.SOC: 101}, "OUT_OF_RANGE", Key.SOC),
    }
    frames = [b.sender.seal(Kind.EVENT, i, 2, 0, Action.METER_VALUES, body) for i, (body, _, _) in cases.items()]
    forged = _core.encode(Kind.EVENT, 99, 85, 2, 0, Action.METER_VALUES, {Key.EVSE: 1}, bytes(32))
    b.send_raw(b"".join(len(f).to_bytes(2, "big") + f for f in [*frames, forged]))
    await wait_for(lambda: all(i in b.responses for i in [*cases, 85]))
    for i, (_, name, field) in cases.items():
        body = b.responses[i].body
        assert (_core.error_name(body[Key.ERROR_CODE]), body.get(Key.FIELD)) == (name, field), i
        assert b.responses[i].action == Action.METER_VALUES
    assert Key.FIELD not in b.responses[85].body  # BAD_TAG: not about a body key


@with_gw
async def test_a_frame_refused_for_a_repeated_key_is_answered_with_its_own_id(gw: Gateway) -> None:
    """A body repeating a key is refused by the decoder (DUPLICATE_KEY, docs/protocol.md), yet
    its envelope's head was readable: the error names the frame's own id and action."""
    b = board(gw)
    await b.connect()
    assert b.sender is not None
    head = [PROTOCOL_VERSION, Kind.EVENT, b.sender.seq + 10, 86, Priority.TELEMETRY, 0, Action.METER_VALUES]
    body = b"\x82" + b"".join(msgpack.packb(v) for v in (Key.EVSE, 1, Key.EVSE, 2))
    unsealed = b"\x99" + b"".join(msgpack.packb(v) for v in head) + body
    tag = hmac.new(b.k_up, unsealed, hashlib.sha256).digest()[:16]  # a good tag: only the body is wrong
    frame = unsealed + msgpack.packb(tag)
    b.send_raw(len(frame).to_bytes(2, "big") + frame)
    await wait_for(lambda: 86 in b.responses)
    err = b.responses[86]
    assert _core.error_name(err.body[Key.ERROR_CODE]) == "DUPLICATE_KEY"
    assert err.action == Action.METER_VALUES


def test_flood_is_throttled_then_disconnected(tmp_path: Path) -> None:
    asyncio.run(flood(tmp_path))


async def flood(tmp_path: Path) -> None:
    g = await start_gw(tmp_path, lan={"max_bad_frames": 5, "throttle_s": 0.05})
    try:
        b = board(g)
        await b.connect()
        junk = _core.encode(Kind.EVENT, 1, 1, 2, 0, Action.METER_VALUES, {Key.EVSE: 1}, bytes(32))
        for _ in range(12):
            b.send_raw(len(junk).to_bytes(2, "big") + junk)
            await asyncio.sleep(0.01)
        await wait_for(lambda: not b.connected.is_set())
        assert g.throttled >= 1
        assert b.errors.get("RATE_LIMITED") == 1
    finally:
        await g.stop()


@with_gw
async def test_oversize_prefix_closes_the_link(gw: Gateway) -> None:
    b = board(gw)
    await b.connect()
    b.send_raw(b"\xff\xff" + bytes(10))
    await wait_for(lambda: not b.connected.is_set())
    assert b.errors.get("OVERSIZE") == 1


@with_gw
async def test_unknown_device_and_wrong_key_are_refused_by_name(gw: Gateway) -> None:
    with pytest.raises(HelloRefused) as e:
        await Board("stranger", bytes(32), "127.0.0.1", gw.lan_port).connect()
    assert e.value.name == "UNKNOWN_DEVICE"
    with pytest.raises(HelloRefused) as e:
        await Board("ev-0001", bytes(32), "127.0.0.1", gw.lan_port).connect()
    assert e.value.name == "BAD_TAG"


@with_gw
async def test_onboarding_provisions_a_key_then_deregistration_revokes_it(gw: Gateway) -> None:
    assert gw.cfg.devices.factory_seed is not None
    gw.devices.register("fab-1")  # M13: the operator registered it (`devices register`)
    b = Board("fab-1", None, "127.0.0.1", gw.lan_port, factory_key=derive(gw.cfg.devices.factory_seed, "fab-1"))
    await b.connect()  # M13: factory Hello, key received, reconnect with it
    assert b.key is not None and gw.devices.get("fab-1") is not None
    b.send("meter", 1)
    await wait_for(lambda: not b.unacked)
    b.close()
    gw.devices.deregister("fab-1")  # M11
    with pytest.raises(HelloRefused) as e:
        await Board("fab-1", b.key, "127.0.0.1", gw.lan_port).connect()
    assert e.value.name == "UNKNOWN_DEVICE"


@with_gw
async def test_m13_onboarding_and_rekeying_are_the_operators_decisions(gw: Gateway) -> None:
    seed = gw.cfg.devices.factory_seed
    assert seed is not None

    def fab(did: str, factory: bytes | None = None) -> Board:
        return Board(did, None, "127.0.0.1", gw.lan_port, factory_key=factory or derive(seed, did))

    with pytest.raises(HelloRefused) as e:  # the default policy: registered devices only
        await fab("fab-2").connect()
    assert e.value.name == "UNKNOWN_DEVICE" and "not registered" in str(e.value)
    with pytest.raises(HelloRefused) as e:  # a forged factory tag is refused for its tag, not reported
        await fab("fab-2", bytes(32)).connect()
    assert e.value.name == "BAD_TAG"
    assert gw.security.events == {"OnboardingRefused": 1}
    gw.devices.register("fab-2")
    b = fab("fab-2")
    await b.connect()
    assert b.key is not None
    b.close()
    with pytest.raises(HelloRefused) as e:  # the key lost, the factory key again: a re-key
        await fab("fab-2").connect()
    assert e.value.name == "REJECTED" and "re-keying needs the operator's approval" in str(e.value)
    assert gw.security.events == {"OnboardingRefused": 1, "RekeyRefused": 1}
    gw.devices.approve_rekey("fab-2")
    again = fab("fab-2")
    await again.connect()
    assert again.key is not None and again.key != b.key
    with pytest.raises(HelloRefused) as e:  # the approval is used up; the old key is gone
        await Board("fab-2", b.key, "127.0.0.1", gw.lan_port).connect()
    assert e.value.name == "BAD_TAG"
    with pytest.raises(HelloRefused):
        await fab("fab-2").connect()
    again.close()
    await wait_for(lambda: gw.committer.rows_committed >= 3)  # each event stored in the outbox
    owed = [r for r in gw.outbox.pending() if r.device == "fab-2"]
    names = [_core.decode(r.frame).body[Key.EVENT_NAME] for r in owed]
    assert names == ["OnboardingRefused", "RekeyRefused", "RekeyRefused"]


@with_gw
async def test_m13_a_replacement_board_numbers_above_every_id_the_site_saw(gw: Gateway) -> None:
    """A board re-keyed with a fresh flash counts its message ids from 1 again: the site would
    drop its frames as repeats of the old board's (and so would the CSMS). The Hello that gives
    it its key tells it where to start (`id_floor`), above the ids kept past their rows."""
    seed = gw.cfg.devices.factory_seed
    assert seed is not None
    gw.devices.register("fab-9")
    old = Board("fab-9", None, "127.0.0.1", gw.lan_port, factory_key=derive(seed, "fab-9"))
    await old.connect()
    ids = old.send("meter", 5)
    await wait_for(lambda: old.acked >= 5)
    old.close()
    held = [r.seq for r in gw.outbox.pending() if r.device == "fab-9"]
    box = gw.outbox  # relayed and acknowledged upstream, then past their dedup horizon: rows gone
    await gw.run_sync(lambda: box.commit([], held, 0))
    assert await gw.run_sync(lambda: box.prune(10**15)) == len(held) >= 5
    gw.devices.approve_rekey("fab-9")
    new = Board("fab-9", None, "127.0.0.1", gw.lan_port, factory_key=derive(seed, "fab-9"))  # counts from 1
    await new.connect()
    assert new.next_id >= max(ids)
    fresh = new.send("meter", 3)
    await wait_for(lambda: new.acked >= 3)
    assert min(fresh) > max(ids)
    owed = {r.msg_id for r in gw.outbox.pending() if r.device == "fab-9"}
    assert set(fresh) <= owed  # stored and owed upstream, not dropped as repeats
    new.close()


@with_gw
async def test_heartbeat_timesync_and_unsupported_requests(gw: Gateway) -> None:
    b = board(gw)
    await b.connect()
    hb = await b.request(Action.HEARTBEAT, {}, Priority.TELEMETRY)
    assert hb.kind == Kind.RESPONSE and hb.body[Key.TIME] > 0
    ts = await b.request(Action.TIME_SYNC, {})
    assert 0 <= ts.body[Key.TIME_MS] < 1000
    r = await b.request(Action.SIGN_CERTIFICATE, {Key.CSR: b"x", Key.CERT_TYPE: 3})
    assert r.kind == Kind.ERROR and _core.error_name(r.body[Key.ERROR_CODE]) == "NOT_SUPPORTED"


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    cases: dict[str, dict[str, Any]] = {
        "lan.listen": {"lan": {"listen": "nope"}},
        "site.id": {"site": {"id": "not-a-gid"}},
        "outbox.max_rows": {"outbox": {"max_rows": -1}},
        "upstream.signers.x": {"upstream": {"signers": {"x": "zz"}}},
        "lan.bogus": {"lan": {"bogus": 1}},
        "power.zone[0].limit_w": {"power": {"zone": [{"zone": 1, "limit_w": "a"}]}},
        "roaming.party_id": {"roaming": {"party_id": "DE*EVE*E1"}},
        "roaming.secret": {"roaming": {"secret": "abcd"}},
        "roaming.address": {"roaming": {"party_id": "DE*EVE*O", "cso_party": "DE*CSO*O"}},
    }
    for key, doc in cases.items():
        with pytest.raises(config.ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            config.parse(doc)
    bad = tmp_path / "g.toml"
    bad.write_text("[lan\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(bad)
