"""The gateway's answer to a board's Hello (docs/protocol.md, "Link behaviour" 1 and
"Versioning"), and devices provisioned or deregistered with `python -m gateway devices`
while the gateway runs (docs/gateway.md, "Devices")."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from gwpeer import SEED
from test_gw_lan import board, start_gw, wait_for, with_gw

from gateway import _core
from gateway.__main__ import main as gateway_main
from gateway.link import FIRST_SCHEMA_REV
from gateway.schema import SCHEMA_REV, Action, Key, Kind, Priority
from gateway.service import Gateway
from tools.loadclient import Board, HelloRefused, dev_key

pytestmark = pytest.mark.timeout(60)

HELLO_ID = 4242


def hello_body(device_id: str, **over: Any) -> dict[int, Any]:
    body: dict[int, Any] = {
        Key.DEVICE_ID: device_id,
        Key.NONCE: os.urandom(16),
        Key.VER_MIN: 1,
        Key.VER_MAX: 1,
        Key.SCHEMA_REV: SCHEMA_REV,
    }
    for name, v in over.items():
        k = Key[name.upper()]
        if v is None:
            del body[k]
        else:
            body[k] = v
    return body


async def raw_hello(gw: Gateway, body: dict[int, Any], key: bytes) -> bytes:
    """Sends one Hello (id HELLO_ID, tagged under K_hello of `key`); returns the answer frame."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.lan_port)
    try:
        f = _core.encode(Kind.REQUEST, 0, HELLO_ID, Priority.CONTROL, 0, Action.HELLO, body, _core.hello_key(key))
        writer.write(len(f).to_bytes(2, "big") + f)
        n = int.from_bytes(await reader.readexactly(2), "big")
        return await reader.readexactly(n)
    finally:
        writer.close()


def error_of(raw: bytes, key: bytes | None = None) -> tuple[str, int | None, _core.Frame]:
    f = _core.decode(raw, _core.hello_key(key) if key is not None else None)
    assert f.kind == Kind.ERROR
    return _core.error_name(f.body[Key.ERROR_CODE]), f.body.get(Key.FIELD), f


@with_gw
async def test_hello_without_schema_rev_is_answered_with_its_own_id_and_field(gw: Gateway) -> None:
    key = dev_key(SEED, "ev-0001")
    raw = await raw_hello(gw, hello_body("ev-0001", schema_rev=None), key)
    name, field, f = error_of(raw)
    assert (name, field) == ("MISSING_FIELD", Key.SCHEMA_REV)
    assert (f.msg_id, f.seq, f.action, f.prio) == (HELLO_ID, 0, Action.HELLO, Priority.CONTROL)
    assert f.tag == bytes(16)  # the Hello was not read far enough to know the device's key
    assert gw.rejections["MISSING_FIELD"] == 1


@with_gw
async def test_hello_with_an_unknown_schema_rev_is_refused_as_bad_version(gw: Gateway) -> None:
    key = dev_key(SEED, "ev-0002")
    for rev in (99, SCHEMA_REV + 1, 0):
        raw = await raw_hello(gw, hello_body("ev-0002", schema_rev=rev), key)
        name, field, f = error_of(raw, key)  # tagged under K_hello: the device is known
        assert (name, field) == ("BAD_VERSION", Key.SCHEMA_REV), rev
        assert f.msg_id == HELLO_ID and f.seq == 0 and f.action == Action.HELLO
        assert f"{FIRST_SCHEMA_REV}..{SCHEMA_REV}" in f.body[Key.REASON]
    assert gw.rejections["BAD_VERSION"] == 3
    for rev in (FIRST_SCHEMA_REV, SCHEMA_REV):  # the first revision and the gateway's own
        reply = _core.decode(await raw_hello(gw, hello_body("ev-0002", schema_rev=rev), key))
        assert reply.kind == Kind.RESPONSE and reply.body[Key.SCHEMA_REV] == SCHEMA_REV


@with_gw
async def test_other_hello_refusals_name_their_field(gw: Gateway) -> None:
    key = dev_key(SEED, "ev-0003")
    name, field, f = error_of(await raw_hello(gw, hello_body("ev-0003", ver_min=2, ver_max=3), key), key)
    assert (name, field, f.msg_id) == ("BAD_VERSION", Key.VER_MIN, HELLO_ID)
    name, field, f = error_of(await raw_hello(gw, hello_body("ev-0003", nonce=bytes(8)), key))
    assert (name, field, f.msg_id) == ("OUT_OF_RANGE", Key.NONCE, HELLO_ID)
    for rx_max in (1279, 4097):  # below a firmware chunk's frame, above the protocol's MAX_FRAME
        name, field, f = error_of(await raw_hello(gw, hello_body("ev-0003", rx_max=rx_max), key))
        assert (name, field, f.msg_id) == ("OUT_OF_RANGE", Key.RX_MAX, HELLO_ID), rx_max
    name, field, f = error_of(await raw_hello(gw, hello_body("stranger"), key))
    assert (name, field, f.msg_id) == ("UNKNOWN_DEVICE", Key.DEVICE_ID, HELLO_ID)
    name, field, f = error_of(await raw_hello(gw, hello_body("ev-0003"), bytes(32)), key)
    assert (name, field, f.msg_id) == ("BAD_TAG", None, HELLO_ID)


async def devices_cli(config_file: Path, *args: str) -> tuple[int, str]:
    """`python -m gateway --config FILE devices ARGS` as its own process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--config", str(config_file), "devices", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def test_devices_provisioned_and_deregistered_while_the_gateway_runs(tmp_path: Path) -> None:
    asyncio.run(provisioned_while_running(tmp_path))


async def provisioned_while_running(tmp_path: Path) -> None:
    gw = await start_gw(tmp_path)
    cfg_file = tmp_path / "gateway.toml"
    cfg_file.write_text(f'[site]\ndata_dir = "{tmp_path}"\n')
    try:
        first = board(gw, 0)  # a development device, numbered by the gateway before the command runs
        await first.connect()
        key = os.urandom(32)
        site = Board("DE-site-7", key, "127.0.0.1", gw.lan_port)
        with pytest.raises(HelloRefused) as e:
            await site.connect()
        assert e.value.name == "UNKNOWN_DEVICE"

        rc, out = await devices_cli(cfg_file, "provision", "DE-site-7", "--key", key.hex())
        assert rc == 0, out
        await site.connect()  # no restart: the Hello reads the table
        site.send("meter", 2)
        await wait_for(lambda: not site.unacked)
        later = board(gw, 1)  # numbered after the command's device, without a clash
        await later.connect()
        later.send("meter", 1)
        await wait_for(lambda: not later.unacked)
        idx = {c.link.device_id: c.link.idx for c in gw.online.values()}
        assert len(set(idx.values())) == 3, idx
        rc, out = await devices_cli(cfg_file, "list")
        assert rc == 0 and "DE-site-7 active" in out, out

        rc, out = await devices_cli(cfg_file, "deregister", "DE-site-7")  # M11, the link open
        assert rc == 0, out
        await wait_for(lambda: "DE-site-7" not in gw.online)  # the open link is cut too
        with pytest.raises(HelloRefused) as e:
            await Board("DE-site-7", key, "127.0.0.1", gw.lan_port).connect()
        assert e.value.name == "UNKNOWN_DEVICE"
        assert "ev-0000" in gw.online and "ev-0001" in gw.online  # the others are untouched
    finally:
        await gw.stop()


def test_devices_provision_refuses_a_malformed_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = tmp_path / "gateway.toml"
    cfg_file.write_text(f'[site]\ndata_dir = "{tmp_path}"\n')
    base = ["--config", str(cfg_file), "devices", "provision", "DE-site-8"]
    assert gateway_main(base) == 2
    assert "64 hex digits" in capsys.readouterr().err
    assert gateway_main([*base, "--key", "zz"]) == 1
    assert "not hex" in capsys.readouterr().err
    assert gateway_main([*base, "--key", "ab" * 16]) == 1
    assert "32 bytes" in capsys.readouterr().err
    assert gateway_main([*base, "--key", "ab" * 32]) == 0
