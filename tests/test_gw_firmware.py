"""M4 at the site: the gateway's firmware image cache and staged rollout; M17: the boards
are told to trust the gateway's own certificate as their local CSMS. Real QUIC against the
test peer (tests/gwpeer.py), test boards from tools/loadclient."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import subprocess
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
from test_gw_crash import start_gateway
from test_gw_upstream import Site, run, wait_for

from gateway import config, metrics
from gateway.localcsms.fwcache import FirmwareCache
from gateway.localcsms.rollout import Rollout
from gateway.schema import Action, CertType, FirmwareStatus, Key, Kind, Priority, Status
from tools.loadclient import Board, dev_key

pytestmark = pytest.mark.timeout(60)

IMAGE_ID = 7
IMAGE = b"CSCFW1" + bytes(range(256)) * 12  # 3078 bytes: 7 chunks of 512
SIGNER = Ed25519PrivateKey.generate()
PUB = SIGNER.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
SIGNERS = {"upstream": {"signers": {"ops": PUB}}}


def manifest(image: bytes = IMAGE) -> dict[int, Any]:
    return {Key.IMAGE_ID: IMAGE_ID, Key.VERSION: "2.0", Key.SIZE: len(image),
            Key.SHA256: hashlib.sha256(image).digest(), Key.SIGNATURE: bytes(64)}  # fmt: skip


def report(b: Board, image_id: int, status: int) -> None:
    """A durable FirmwareStatus: kept until the gateway acks it, sent again after a reconnect."""
    body: dict[int, Any] = {Key.IMAGE_ID: image_id, Key.FW_STATUS: status}
    i = b._new_id()
    b.unacked[i] = (Action.FIRMWARE_STATUS, Priority.CONTROL, body, time.perf_counter())
    if b.connected.is_set():
        b._write([b._seal(i, Action.FIRMWARE_STATUS, Priority.CONTROL, body)])


def firmware_board(
    b: Board, outcome: int, got: dict[str, bytes], release: asyncio.Event | None = None
) -> set[asyncio.Task[None]]:
    """The board accepts an UpdateFirmware (reporting Downloading, as the firmware does),
    downloads the image chunk by chunk, checks its SHA-256 and reports `outcome` (or
    VerificationFailed) as its FirmwareStatus, once `release` is set when given."""
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
        if release is not None:
            await release.wait()
        report(b, m[Key.IMAGE_ID], outcome if ok else FirmwareStatus.VERIFICATION_FAILED)

    def answer(f: Any) -> dict[int, Any]:
        if f.action == Action.UPDATE_FIRMWARE:
            report(b, f.body[Key.IMAGE_ID], FirmwareStatus.DOWNLOADING)
            t = asyncio.get_running_loop().create_task(download(dict(f.body)))
            tasks.add(t)
        return {Key.STATUS: Status.ACCEPTED}

    b.answer = answer
    return tasks


def results_of(res: Any) -> dict[str, dict[int, Any]]:
    assert res.kind == Kind.RESPONSE, res.body
    return {r[Key.DEVICE_ID]: r for r in res.body[Key.RESULTS]}


async def campaign(
    s: Site, outcomes: Sequence[int]
) -> tuple[list[Board], dict[str, bytes], Any, gwpeer.FirmwareServer, bytes]:
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
    return boards, got, results_of(res), server, fw


def test_later_boards_are_served_from_the_cache(tmp_path: Path) -> None:
    async def body(s: Site) -> None:
        boards, got, results, server, _fw = await campaign(s, [FirmwareStatus.INSTALLED] * 3)
        assert all(results[b.device_id][Key.STATUS] == Status.ACCEPTED for b in boards), results
        await wait_for(lambda: len(got) == 3)
        assert all(got[b.device_id] == IMAGE for b in boards)
        chunks = -(-len(IMAGE) // server.chunk)
        # only the first wave's board went upstream, once per chunk; the others hit the cache
        assert len(server.requests) == chunks
        assert {d for d, _, _ in server.requests} == {boards[0].device_id}
        assert s.gw is not None
        assert s.gw.firmware.snapshot()["chunks_served"] == 2 * chunks
        assert (s.gw.cfg.site.data_dir / "fwcache" / str(IMAGE_ID) / "image.bin").read_bytes() == IMAGE

    run(body, tmp_path, **SIGNERS)


def test_a_failed_first_wave_stops_the_rollout(tmp_path: Path) -> None:
    async def body(s: Site) -> None:
        outcomes = [FirmwareStatus.INSTALL_FAILED, FirmwareStatus.INSTALLED, FirmwareStatus.INSTALLED]
        boards, _got, results, _server, _fw = await campaign(s, outcomes)
        first = results[boards[0].device_id]
        assert first[Key.STATUS] == Status.FAILED and "INSTALL_FAILED" in first[Key.REASON]
        for b in boards[1:]:
            r = results[b.device_id]
            assert r[Key.STATUS] == Status.REJECTED and r[Key.REASON].startswith("rollout stopped: ev-0000")
            assert not any(f.action == Action.UPDATE_FIRMWARE for f in b.requests_in)  # never told

    run(body, tmp_path, **SIGNERS)


def test_first_wave_zero_sends_to_all_at_once(tmp_path: Path) -> None:
    async def body(s: Site) -> None:
        boards, _got, results, _server, _fw = await campaign(s, [FirmwareStatus.INSTALL_FAILED] * 2)
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
        await cache.flush()  # written, assembled and hashed on the cache's worker thread
        assert cache.rejected == 1 and not cache.has(IMAGE_ID)  # the SHA-256 does not match: dropped
        for off in range(0, len(IMAGE), 1024):
            cache.put({Key.IMAGE_ID: IMAGE_ID, Key.OFFSET: off, Key.DATA: IMAGE[off : off + 1024]})
        await cache.flush()
        assert cache.has(IMAGE_ID)
        cache.close()
        again = FirmwareCache(tmp_path / "fw")
        c = again.chunk(IMAGE_ID, 3072)
        assert c is not None and c[Key.DATA] == IMAGE[3072:] and c[Key.LAST]
        c = again.chunk(IMAGE_ID, 1024)
        assert c is not None and c[Key.DATA] == IMAGE[1024:2048] and not c[Key.LAST]
        again.close()

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
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"localcsms.{gw.cfg.site.id}"
        # a command naming another certificate is refused, nothing is sent
        other = inner_frame(Action.INSTALL_CERTIFICATE, {Key.CERT_TYPE: CertType.LOCAL_CSMS, Key.CERT: b"x" * 40})
        res = await proto.command([], other, signature=SIGNER.sign(other), signer="ops")
        assert res.body[Key.RESULTS][0][Key.STATUS] == Status.REJECTED
        assert all(sum(f.action == Action.INSTALL_CERTIFICATE for f in b.requests_in) == 1 for b in boards)

    run(body, tmp_path, **SIGNERS)


# ---------------------------------------------------------------- the rollout state machine (sans I/O)


def rollout(targets: Sequence[str] = ("a", "b", "c"), first: int = 1) -> Rollout:
    inner = inner_frame(Action.UPDATE_FIRMWARE, manifest())
    return Rollout.new(inner, IMAGE_ID, list(targets), first, 30.0, 100.0, 30.0, now=1000.0)


def restarted(r: Rollout, now: float) -> Rollout:
    """What a restarted gateway makes of the record last written."""
    again = Rollout.from_doc(r.to_doc())
    again.resume(now)
    return again


def accepted(d: str) -> dict[int, Any]:
    return {Key.DEVICE_ID: d, Key.STATUS: Status.ACCEPTED, Key.FRAME: b"\x01\x02"}


def test_rollout_resumes_where_it_stopped_and_never_tells_a_board_twice() -> None:
    r = rollout()
    r.advance(1000.0)
    assert r.to_tell() == ["a"] and r.to_tell() == []  # persisted as told before it is sent
    # killed before a's answer was recorded: a is watched again, not told again
    r = restarted(r, 1001.0)
    r.advance(1001.0)
    assert r.to_tell() == [] and r.watched() == ["a"] and r.wave_deadline == 1101.0
    assert r.status("a", FirmwareStatus.DOWNLOADING, "") is False  # a step, not an outcome
    assert r.status("a", FirmwareStatus.INSTALLED, "")
    r.advance(1002.0)
    assert r.phase == "later" and sorted(r.to_tell()) == ["b", "c"]
    r.answered("b", accepted("b"))
    # killed again: b answered (done), c told but its answer lost
    r = restarted(r, 1003.0)
    r.advance(1003.0)
    assert r.to_tell() == [] and r.state["a"] == r.state["b"] == "final" and r.state["c"] == "recheck"
    assert r.status("c", FirmwareStatus.DOWNLOADING, "")  # it got the update: that is its answer
    r.advance(1004.0)
    assert r.done and not r.stop
    res = {x[Key.DEVICE_ID]: x for x in r.result_list()}
    assert all(x[Key.STATUS] == Status.ACCEPTED for x in res.values())
    assert res["b"][Key.FRAME] == b"\x01\x02"  # the board's own answer, kept across the restart
    assert restarted(r, 1005.0).result_list() == r.result_list()


def test_rollout_stop_survives_a_restart() -> None:
    r = rollout()
    r.advance(1000.0)
    r.to_tell()
    r.answered("a", accepted("a"))
    assert r.status("a", FirmwareStatus.INSTALL_FAILED, "bad flash")
    r.advance(1001.0)
    assert r.done and r.stop == "a reported INSTALL_FAILED"
    again = restarted(r, 1002.0)
    again.advance(1002.0)
    assert again.done and again.to_tell() == [] and again.result_list() == r.result_list()
    res = {x[Key.DEVICE_ID]: x for x in again.result_list()}
    assert res["a"][Key.STATUS] == Status.FAILED and "INSTALL_FAILED bad flash" in res["a"][Key.REASON]
    assert (
        res["c"][Key.STATUS] == Status.REJECTED and res["c"][Key.REASON] == "rollout stopped: a reported INSTALL_FAILED"
    )


def test_rollout_wave_timeout_and_lost_later_answers() -> None:
    r = rollout(first=2, targets=("a", "b", "c"))
    r.advance(1000.0)
    assert r.to_tell() == ["a", "b"]
    r.answered("a", accepted("a"))
    r.advance(1000.0)
    assert not r.wave_deadline  # b's answer is awaited first
    r.answered("b", accepted("b"))
    r.advance(1001.0)
    assert r.next_deadline() == 1101.0
    r.status("a", FirmwareStatus.ACTIVATED, "")
    r.expire(1101.0)
    r.advance(1101.0)
    res = {x[Key.DEVICE_ID]: x for x in r.result_list()}
    assert r.done and res["b"][Key.REASON] == "no final FirmwareStatus in time"
    assert res["c"][Key.REASON] == "rollout stopped: b reported no final status in time"
    # a later-wave board told before a restart that never shows a sign of it: failed, not told again
    r = rollout()
    r.advance(1000.0)
    r.to_tell()
    r.answered("a", accepted("a"))
    r.status("a", FirmwareStatus.INSTALLED, "")
    r.advance(1000.0)
    r.to_tell()
    r = restarted(r, 2000.0)
    r.expire(2030.0)
    r.advance(2030.0)
    assert r.done and r.to_tell() == []
    assert all(x[Key.STATUS] == Status.FAILED for x in r.result_list()[1:])


# ---------------------------------------------------------------- the cache: bound, worker, crash safety


def image(n: int, size: int = 3000) -> tuple[bytes, dict[int, Any]]:
    data = bytes([n]) * size
    return data, {Key.IMAGE_ID: n, Key.VERSION: f"{n}.0", Key.SIZE: size, Key.SHA256: hashlib.sha256(data).digest()}


async def fill(cache: FirmwareCache, n: int, size: int = 3000) -> None:
    data, m = image(n, size)
    cache.manifest(m)
    for off in range(0, size, 1000):
        cache.put({Key.IMAGE_ID: n, Key.OFFSET: off, Key.DATA: data[off : off + 1000]})
    await cache.flush()


def test_cache_evicts_least_recently_used_but_never_an_image_a_rollout_needs(tmp_path: Path) -> None:
    async def body() -> None:
        cache = FirmwareCache(tmp_path / "fw", max_bytes=7000)
        for n in (1, 2):
            await fill(cache, n)
            time.sleep(0.01)
        assert cache.has(1) and cache.has(2)
        # image 1 is needed by a rollout in progress; image 2 was used last
        r = rollout(("a", "b"))
        r.image_id = 1
        cache.rollouts.by_key[r.key] = r
        assert cache.chunk(2, 0) is not None
        await fill(cache, 3)
        assert cache.has(1) and not cache.has(2) and cache.has(3) and cache.evictions == 1
        assert not (tmp_path / "fw" / "2").exists()
        await fill(cache, 4, size=8000)  # larger than the whole cache: not kept, nothing evicted for it
        assert not cache.has(4) and cache.has(3) and cache.skipped > 0 and cache.evictions == 1
        r.phase = "done"  # the rollout ended: image 1 may go now (least recently used)
        await fill(cache, 5)
        assert not cache.has(1) and cache.has(3) and cache.has(5) and cache.evictions == 2
        snap = cache.snapshot()
        assert snap["bytes"] == 6000 <= snap["max_bytes"] == 7000 and snap["images"] == 2
        cache.close()
        again = FirmwareCache(tmp_path / "fw", max_bytes=3000)  # a smaller bound at start: down to it
        assert again.has(5) and not again.has(3) and again.used_bytes == 3000
        again.close()

    asyncio.run(body())


def test_cache_io_runs_on_its_worker_and_a_crash_leaves_no_half_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from gateway.localcsms import fwcache

    threads: set[str] = set()
    write = fwcache._write_atomic

    def spy(path: Path, data: bytes) -> None:
        threads.add(threading.current_thread().name)
        write(path, data)

    monkeypatch.setattr(fwcache, "_write_atomic", spy)

    async def body() -> None:
        cache = FirmwareCache(tmp_path / "fw")
        await fill(cache, 1)
        assert cache.has(1) and threads and all(t.startswith("fwcache") for t in threads)
        cache.close()

    asyncio.run(body())
    d = tmp_path / "fw" / "1"
    data, m = image(1)
    # a crash while assembling: a temporary image and the parts, the manifest not verified
    (d / "image.bin").unlink()
    (d / "manifest.json").write_text(
        json.dumps({"size": 3000, "sha256": m[Key.SHA256].hex(), "version": "1.0", "chunk": 0, "verified": False})
    )
    (d / "image.bin.tmp").write_bytes(data[:1500])
    for off in (0, 1000):
        (d / f"part-{off:010d}").write_bytes(data[off : off + 1000])
    c = FirmwareCache(tmp_path / "fw")
    assert not c.has(1) and c.chunk(1, 0) is None and c.images[1].parts == {0: 1000, 1000: 1000}
    assert not (d / "image.bin.tmp").exists()
    c.close()
    # a crash after image.bin was renamed in place, before its manifest: hashed again at start
    (d / "image.bin").write_bytes(data)
    c = FirmwareCache(tmp_path / "fw")
    assert c.has(1) and c.images[1].chunk == 1000 and not list(d.glob("part-*"))
    c.close()
    # an image.bin that does not match (never renamed in place by the cache): never served
    (d / "manifest.json").write_text(
        json.dumps({"size": 3000, "sha256": m[Key.SHA256].hex(), "version": "1.0", "chunk": 0, "verified": False})
    )
    (d / "image.bin").write_bytes(data[:2999] + b"x")
    (d / "part-0000000000").write_bytes(data[:1000])
    c = FirmwareCache(tmp_path / "fw")
    assert not c.has(1) and not (d / "image.bin").exists()
    c.close()


def test_firmware_config_errors_and_metrics() -> None:
    for bad in (-1, "1G", 1024, True, 2.5):
        with pytest.raises(config.ConfigError, match=r"firmware\.cache_max_bytes"):
            config.parse({"firmware": {"cache_max_bytes": bad}})
    assert config.parse({"firmware": {"cache_max_bytes": 1 << 20}}).firmware.cache_max_bytes == 1 << 20
    snap = {"queue": [0] * 4, "uplink_unsent": [0] * 4, "outbox_backlog": 0, "outbox_alarm": False, "frames_in": 0,
            "frames_stored": 0, "duplicates": 0, "relay_acked": 0, "links": 0, "upstream": "up",
            "upstream_connects": 1, "rejections": {}, "throttled": 0,
            "firmware_cache": {"images": 2, "bytes": 6000, "max_bytes": 7000, "evictions": 3, "chunks_served": 9,
                               "rollouts_active": 1}}  # fmt: skip
    text = metrics.prometheus(snap, 0.0, None)
    for line in ("evedge_fwcache_bytes 6000", "evedge_fwcache_evictions_total 3", "evedge_fw_rollouts_active 1"):
        assert line in text.splitlines()


# ---------------------------------------------------------------- restarts in the middle of a rollout


def test_a_stopped_rollout_stays_stopped_after_a_restart(tmp_path: Path) -> None:
    async def body(s: Site) -> None:
        outcomes = [FirmwareStatus.INSTALL_FAILED, FirmwareStatus.INSTALLED, FirmwareStatus.INSTALLED]
        boards, _got, results, _server, fw = await campaign(s, outcomes)
        assert results[boards[2].device_id][Key.REASON].startswith("rollout stopped")
        assert s.gw is not None and s.peer is not None
        await s.gw.stop()
        gw = await s.start_gw()
        for b in boards:
            b.close()
            b.port = gw.lan_port
            await b.connect()
        peer = s.peer
        await wait_for(lambda: len(gw.online) == 3 and len(peer.protocols) >= 2)
        # the CSMS sends the same Command again (its answer was lost): the same stop, nobody told
        res = await peer.protocols[-1].command([b.device_id for b in boards], fw, signature=SIGNER.sign(fw),
                                               signer="ops")  # fmt: skip
        assert results_of(res) == results
        assert all(not any(f.action == Action.UPDATE_FIRMWARE for f in b.requests_in) for b in boards[1:])
        assert sum(f.action == Action.UPDATE_FIRMWARE for f in boards[0].requests_in) == 1

    run(body, tmp_path, **SIGNERS)


@pytest.mark.timeout(120)
def test_kill_9_in_the_middle_of_a_rollout_resumes_it(tmp_path: Path) -> None:
    """The gateway process is killed while the first wave's board installs; the board reports
    Installed while the gateway is down. The restarted gateway resumes the rollout: the first
    board is not told again, the later boards are told and download from the cache, and the
    CSMS's Command, sent again after the reconnect, gets the results."""
    gw: subprocess.Popen[str] | None = None
    cache_dir = tmp_path / "gw" / "fwcache" / str(IMAGE_ID)

    def verified() -> bool:
        try:
            return bool(json.loads((cache_dir / "manifest.json").read_text())["verified"])
        except (OSError, ValueError):
            return False

    async def scenario() -> None:
        nonlocal gw
        # The peer first, on an ephemeral port (it makes the site's dev CA, the gateway's too),
        # then the gateway configured with that port.
        peer, server = await gwpeer.start("127.0.0.1", 0, gwpeer.Store(str(tmp_path / "peer.sqlite")),
                                          gwpeer.server_config(tmp_path / "gw" / "pki"))  # fmt: skip
        cfg = gwpeer.gateway_toml(tmp_path / "gateway.toml", gwpeer.bound_port(server),
                                  upstream=f'signers = {{ ops = "{PUB}" }}\n',
                                  tail="[firmware]\nfirst_wave = 1\nwave_timeout_s = 60.0\n")  # fmt: skip
        gw = await asyncio.to_thread(start_gateway, cfg)
        lan = gwpeer.ports(cfg)["lan"]  # the restarted gateway listens there too
        fw_server = gwpeer.FirmwareServer(peer, {IMAGE_ID: IMAGE})
        boards = [Board(f"ev-{i:04d}", dev_key(gwpeer.SEED, f"ev-{i:04d}"), "127.0.0.1", lan) for i in range(3)]
        got: dict[str, bytes] = {}
        release = asyncio.Event()
        for b in boards:
            firmware_board(b, FirmwareStatus.INSTALLED, got, release if b is boards[0] else None)
        stop = asyncio.Event()
        keepers = [asyncio.create_task(b.keep_connected(stop)) for b in boards]
        try:
            await wait_for(lambda: bool(peer.protocols) and all(b.connected.is_set() for b in boards), 20)
            fw = inner_frame(Action.UPDATE_FIRMWARE, manifest())
            targets = [b.device_id for b in boards]
            first = asyncio.create_task(
                peer.protocols[-1].command(targets, fw, signature=SIGNER.sign(fw), signer="ops", timeout=90)
            )
            await wait_for(lambda: boards[0].device_id in got and verified(), 20)
            # the later wave waits for the first (the site's own requests, e.g. power shares, still go)
            assert all(not any(f.action == Action.UPDATE_FIRMWARE for f in b.requests_in) for b in boards[1:])
            gw.send_signal(signal.SIGKILL)
            gw.wait()
            assert gw.stdout is not None
            gw.stdout.close()
            protocols = len(peer.protocols)
            release.set()  # Installed, while the gateway is down: kept on the board until acked
            await wait_for(
                lambda: any(a == Action.FIRMWARE_STATUS and body[Key.FW_STATUS] == FirmwareStatus.INSTALLED
                            for a, _, body, _ in boards[0].unacked.values())
            )  # fmt: skip
            gw = await asyncio.to_thread(start_gateway, cfg)
            await wait_for(lambda: len(got) == 3, 40)  # resumed: the later wave told and served
            assert all(got[d] == IMAGE for d in targets)
            assert {d for d, _, _ in fw_server.requests} == {boards[0].device_id}  # from the cache
            assert all(sum(f.action == Action.UPDATE_FIRMWARE for f in b.requests_in) == 1 for b in boards)
            await wait_for(lambda: len(peer.protocols) > protocols, 20)
            res = await peer.protocols[-1].command(targets, fw, signature=SIGNER.sign(fw), signer="ops", timeout=30)
            results = results_of(res)
            assert all(results[d][Key.STATUS] == Status.ACCEPTED for d in targets), results
            assert all(sum(f.action == Action.UPDATE_FIRMWARE for f in b.requests_in) == 1 for b in boards)
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await first
        finally:
            stop.set()
            for t in keepers:
                await t
            for b in boards:
                b.close()
            server.close()

    try:
        asyncio.run(scenario())
    finally:
        if gw is not None:
            gw.kill()
            gw.wait()
            if gw.stdout is not None:
                gw.stdout.close()


def test_a_board_status_is_queued_for_disk_before_its_ack(tmp_path: Path) -> None:
    """Rollouts.status runs on dispatch, before the dispatcher hands the frame's row to the
    outbox's writer thread: the rollout's record is submitted to that same thread first, so
    the commit that acks the FirmwareStatus to the board comes after it (FIFO)."""

    async def body() -> None:
        cache = FirmwareCache(tmp_path / "fw")
        submitted: list[str] = []

        def submit(fn: Any) -> asyncio.Future[object]:
            fn()
            submitted.append(Rollout.from_doc(fn.args[2]).state["a"])
            fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut

        async def deliver(d: str, *_: Any) -> dict[int, Any]:
            return accepted(d)

        cache.rollouts.bind(submit, deliver)
        inner = inner_frame(Action.UPDATE_FIRMWARE, manifest())
        task = asyncio.create_task(cache.rollouts.run(inner, ["a", "b"], 1, 10.0, 60.0, 10.0, deliver))
        await wait_for(lambda: ("a", IMAGE_ID) in cache.watchers and submitted[-1] == "watch")
        cache.status("a", {Key.IMAGE_ID: IMAGE_ID, Key.FW_STATUS: FirmwareStatus.INSTALLED})
        assert submitted[-1] == "final"  # queued at once, nothing awaited in between
        results = await asyncio.wait_for(task, 5)
        assert [r[Key.STATUS] for r in results] == [Status.ACCEPTED, Status.ACCEPTED]
        assert not cache.watchers
        cache.close()
        again = FirmwareCache(tmp_path / "fw")  # finished: kept, and not driven again
        assert again.rollouts.active == 0 and len(again.rollouts.by_key) == 1
        again.close()

    asyncio.run(body())
