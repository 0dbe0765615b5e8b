"""M4 at the site: the gateway's firmware image cache and staged rollout; M17: the boards
are told to trust the gateway's own certificate as their local CSMS. Real QUIC against the
test peer (tests/gwpeer.py), test boards from tools/loadclient."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gwpeer
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from gwpeer import inner_frame
from test_gw_upstream import Site, run, wait_for

from gateway.localcsms.firmware import FirmwareCache
from gateway.schema import Action, CertType, FirmwareStatus, Key, Kind, Priority, Status
from tools.loadclient import Board

pytestmark = pytest.mark.timeout(60)

IMAGE_ID = 7
IMAGE = b"CSCFW1" + bytes(range(256)) * 12  # 3078 bytes: 7 chunks of 512
SIGNER = Ed25519PrivateKey.generate()
PUB = SIGNER.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
SIGNERS = {"upstream": {"signers": {"ops": PUB}}}


def manifest(image: bytes = IMAGE) -> dict[int, Any]:
    return {Key.IMAGE_ID: IMAGE_ID, Key.VERSION: "2.0", Key.SIZE: len(image),
            Key.SHA256: hashlib.sha256(image).digest(), Key.SIGNATURE: bytes(64)}  # fmt: skip


def firmware_board(b: Board, outcome: int, got: dict[str, bytes]) -> set[asyncio.Task[None]]:
    """The board accepts an UpdateFirmware, downloads the image chunk by chunk, checks its
    SHA-256 and reports `outcome` (or VerificationFailed) as its FirmwareStatus."""
    tasks: set[asyncio.Task[None]] = set()

    async def download(m: dict[int, Any]) -> None:
        data = b""
        while True:
            r = await b.request(Action.FIRMWARE_CHUNK, {Key.IMAGE_ID: m[Key.IMAGE_ID], Key.OFFSET: len(data)},
                                Priority.BULK, timeout=10)  # fmt: skip
            assert r.kind == Kind.RESPONSE, r.body
            data += r.body[Key.DATA]
            if r.body[Key.LAST]:
                break
        got[b.device_id] = data
        ok = hashlib.sha256(data).digest() == m[Key.SHA256]
        body: dict[int, Any] = {
            Key.IMAGE_ID: m[Key.IMAGE_ID],
            Key.FW_STATUS: outcome if ok else FirmwareStatus.VERIFICATION_FAILED,
        }
        i = b._new_id()
        b.unacked[i] = (Action.FIRMWARE_STATUS, Priority.CONTROL, body, time.perf_counter())
        b._write([b._seal(i, Action.FIRMWARE_STATUS, Priority.CONTROL, body)])

    def answer(f: Any) -> dict[int, Any]:
        if f.action == Action.UPDATE_FIRMWARE:
            t = asyncio.get_running_loop().create_task(download(dict(f.body)))
            tasks.add(t)
        return {Key.STATUS: Status.ACCEPTED}

    b.answer = answer
    return tasks


async def campaign(
    s: Site, outcomes: Sequence[int]
) -> tuple[list[Board], dict[str, bytes], Any, gwpeer.FirmwareServer]:
    peer = await s.start_peer()
    gw = await s.start_gw()
    server = gwpeer.FirmwareServer(peer, {IMAGE_ID: IMAGE})
    got: dict[str, bytes] = {}
    boards = [s.board(i) for i in range(len(outcomes))]
    for b, outcome in zip(boards, outcomes, strict=True):
        firmware_board(b, outcome, got)
        await b.connect()
    await wait_for(lambda: bool(peer.protocols) and len(gw.online) == len(boards))
    await wait_for(lambda: gw.runner is not None and gw.runner.protocol is not None and gw.runner.protocol.ready)
    fw = inner_frame(Action.UPDATE_FIRMWARE, manifest())
    res = await peer.protocols[0].command([b.device_id for b in boards], fw, signature=SIGNER.sign(fw), signer="ops",
                                          timeout=40)  # fmt: skip
    assert res.kind == Kind.RESPONSE, res.body
    return boards, got, {r[Key.DEVICE_ID]: r for r in res.body[Key.RESULTS]}, server


def test_later_boards_are_served_from_the_cache(tmp_path: Path) -> None:
    async def body(s: Site) -> None:
        boards, got, results, server = await campaign(s, [FirmwareStatus.INSTALLED] * 3)
        assert all(results[b.device_id][Key.STATUS] == Status.ACCEPTED for b in boards), results
        await wait_for(lambda: len(got) == 3)
        assert all(got[b.device_id] == IMAGE for b in boards)
        chunks = -(-len(IMAGE) // server.chunk)
        # only the first wave's board went upstream, once per chunk; the others hit the cache
        assert len(server.requests) == chunks
        assert {d for d, _, _ in server.requests} == {boards[0].device_id}
        assert s.gw is not None
        assert s.gw.firmware.snapshot()["chunks_served"] == 2 * chunks
        assert (s.gw.cfg.data_dir / "fwcache" / str(IMAGE_ID) / "image.bin").read_bytes() == IMAGE

    run(body, tmp_path, **SIGNERS)


def test_a_failed_first_wave_stops_the_rollout(tmp_path: Path) -> None:
    async def body(s: Site) -> None:
        outcomes = [FirmwareStatus.INSTALL_FAILED, FirmwareStatus.INSTALLED, FirmwareStatus.INSTALLED]
        boards, _got, results, _server = await campaign(s, outcomes)
        first = results[boards[0].device_id]
        assert first[Key.STATUS] == Status.FAILED and "INSTALL_FAILED" in first[Key.REASON]
        for b in boards[1:]:
            r = results[b.device_id]
            assert r[Key.STATUS] == Status.REJECTED and r[Key.REASON].startswith("rollout stopped: ev-0000")
            assert not any(f.action == Action.UPDATE_FIRMWARE for f in b.requests_in)  # never told

    run(body, tmp_path, **SIGNERS)


def test_first_wave_zero_sends_to_all_at_once(tmp_path: Path) -> None:
    async def body(s: Site) -> None:
        boards, _got, results, _server = await campaign(s, [FirmwareStatus.INSTALL_FAILED] * 2)
        assert all(results[b.device_id][Key.STATUS] == Status.ACCEPTED for b in boards)  # the board's own answer
        assert all(any(f.action == Action.UPDATE_FIRMWARE for f in b.requests_in) for b in boards)

    run(body, tmp_path, firmware={"first_wave": 0}, **SIGNERS)


def test_cache_verifies_against_the_manifest_and_survives_a_restart(tmp_path: Path) -> None:
    async def body() -> None:
        cache = FirmwareCache(tmp_path / "fw")
        cache.put({Key.IMAGE_ID: IMAGE_ID, Key.OFFSET: 0, Key.DATA: IMAGE[:512]})  # no manifest: not taken
        assert cache.stored == 0
        cache.manifest(manifest())
        bad = bytearray(IMAGE)
        bad[100] ^= 1
        for off in range(0, len(IMAGE), 1024):
            cache.put({Key.IMAGE_ID: IMAGE_ID, Key.OFFSET: off, Key.DATA: bytes(bad[off : off + 1024])})
        assert cache.rejected == 1 and not cache.has(IMAGE_ID)  # the SHA-256 does not match: dropped
        for off in range(0, len(IMAGE), 1024):
            cache.put({Key.IMAGE_ID: IMAGE_ID, Key.OFFSET: off, Key.DATA: IMAGE[off : off + 1024]})
        assert cache.has(IMAGE_ID)
        again = FirmwareCache(tmp_path / "fw")
        c = again.chunk(IMAGE_ID, 3072)
        assert c is not None and c[Key.DATA] == IMAGE[3072:] and c[Key.LAST]
        c = again.chunk(IMAGE_ID, 1024)
        assert c is not None and c[Key.DATA] == IMAGE[1024:2048] and not c[Key.LAST]

    asyncio.run(body())


def test_boards_are_told_to_trust_the_gateway_as_local_csms(tmp_path: Path) -> None:
    async def body(s: Site) -> None:
        peer = await s.start_peer()
        gw = await s.start_gw()
        boards = [s.board(i) for i in range(3)]
        for b in boards:
            b.answer = lambda f: {Key.STATUS: Status.ACCEPTED}
            await b.connect()
        await wait_for(lambda: bool(peer.protocols) and len(gw.online) == 3)
        cmd = inner_frame(Action.INSTALL_CERTIFICATE, {Key.CERT_TYPE: CertType.LOCAL_CSMS, Key.CERT: b""})
        proto = peer.protocols[0]
        unsigned = await proto.command([], cmd)
        assert unsigned.kind == Kind.ERROR  # a certificate command must be signed upstream
        res = await proto.command([], cmd, signature=SIGNER.sign(cmd), signer="ops")
        results = {r[Key.DEVICE_ID]: r for r in res.body[Key.RESULTS]}
        assert results[""][Key.STATUS] == Status.ACCEPTED
        assert all(results[b.device_id][Key.STATUS] == Status.ACCEPTED for b in boards)
        for b in boards:
            (req,) = [f for f in b.requests_in if f.action == Action.INSTALL_CERTIFICATE]
            assert req.body[Key.CERT_TYPE] == CertType.LOCAL_CSMS and req.body[Key.CERT] == gw.local_csms_cert
        cert = x509.load_der_x509_certificate(gw.local_csms_cert)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"localcsms.{gw.cfg.site_id}"
        # a command naming another certificate is refused, nothing is sent
        other = inner_frame(Action.INSTALL_CERTIFICATE, {Key.CERT_TYPE: CertType.LOCAL_CSMS, Key.CERT: b"x" * 40})
        res = await proto.command([], other, signature=SIGNER.sign(other), signer="ops")
        assert res.body[Key.RESULTS][0][Key.STATUS] == Status.REJECTED
        assert all(len(b.requests_in) == 1 for b in boards)

    run(body, tmp_path, **SIGNERS)
