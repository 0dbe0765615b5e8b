"""M4 at the site: the firmware image cache.

Rule: only a verified image is ever served. The chunks of an image the CSMS sent to a board
(the answers to forwarded `FirmwareChunk` requests) are kept under
`data_dir/fwcache/<image_id>/`, one file per offset, and only for an image whose manifest
is held: the `UpdateFirmware` command the gateway verified (Ed25519 signature by a known
signer) names its size and SHA-256. Once the chunks cover the whole image it is hashed: a
match writes `image.bin` and the image is *verified*; a mismatch drops the chunks. A verified
image is served to the boards with the chunk length the CSMS used, so later boards download
it without an upstream round trip.

Every write, hash and deletion runs on one worker thread (in submission order), never on the
event loop; every file is written atomically (temporary file, fsync, rename, fsync of the
folder), and `image.bin` exists only once its SHA-256 matched, so a crash never leaves a half
image that is served. A chunk is served with one `pread` of at most one chunk (bounded by the
LAN frame size) from an open file: that stays on the event loop. The cache is bounded
(`firmware.cache_max_bytes`): the least recently used images go first, never one that an
unfinished rollout still needs, which is why the cache holds the site's `Rollouts`
(gateway/localcsms/rollout.py) and routes the boards' FirmwareStatus events to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.localcsms.rollout import Rollouts
from gateway.schema import Key

log = logging.getLogger("gateway.firmware")

DEFAULT_CACHE_MAX_BYTES = 256 << 20
TOUCH_EVERY_S = 60.0
"""A served image's mtime (its last use across restarts) is refreshed at most this often."""


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _part(d: Path, offset: int) -> Path:
    return d / f"part-{offset:010d}"


def _assemble(d: Path, offsets: list[int], size: int, sha256: bytes, manifest: bytes) -> bool:
    """Worker: hashes the parts in order into `image.bin.tmp`, renamed to `image.bin` only when
    the SHA-256 matches, then the manifest saying so; the parts are removed last (a crash in
    between leaves either the parts, or a verified image.bin that `_load` checks again)."""
    h = hashlib.sha256()
    tmp = d / "image.bin.tmp"
    n = 0
    with open(tmp, "wb") as out:
        for offset in offsets:
            data = _part(d, offset).read_bytes()
            h.update(data)
            out.write(data)
            n += len(data)
        out.flush()
        os.fsync(out.fileno())
    ok = n == size and h.digest() == sha256
    if ok:
        os.replace(tmp, d / "image.bin")
        _fsync_dir(d)
        _write_atomic(d / "manifest.json", manifest)
    else:
        tmp.unlink(missing_ok=True)
    for offset in offsets:
        _part(d, offset).unlink(missing_ok=True)
    return ok


def _hash_file(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            h.update(block)
    return h.digest()


@dataclass
class Image:
    image_id: int
    size: int
    sha256: bytes
    version: str
    chunk: int = 0
    """Length of the CSMS's chunks (that of the chunk at offset 0); 0 until verified."""
    verified: bool = False
    parts: dict[int, int] = field(default_factory=dict)
    """offset → length of the chunks held (not yet verified)."""
    assembling: bool = False
    used: float = 0.0
    """Last use (stored, verified or served), wall clock: the LRU order of eviction."""
    touched: float = 0.0

    @property
    def held(self) -> int:
        """Bytes on disk (manifests aside)."""
        return self.size if self.verified else sum(self.parts.values())


class FirmwareCache:
    def __init__(
        self, folder: Path, enabled: bool = True, max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
        rollout_db: Path | None = None,
    ) -> None:  # fmt: skip
        self.folder = folder
        self.enabled = enabled
        self.max_bytes = max_bytes
        self.images: dict[int, Image] = {}
        self.hits = 0
        """Chunks served from the cache."""
        self.stored = 0
        """Chunks taken from the CSMS's answers."""
        self.rejected = 0
        """Complete images whose SHA-256 did not match their manifest (dropped)."""
        self.evictions = 0
        """Images removed to keep the cache under `max_bytes`."""
        self.skipped = 0
        """Chunks not kept: the image does not fit, or every other image is needed."""
        self._io = ThreadPoolExecutor(1, thread_name_prefix="fwcache")
        self._pending: set[asyncio.Future[Any]] = set()
        self._fds: dict[int, int] = {}
        self.rollouts = Rollouts(rollout_db or folder.parent / "fwrollout.sqlite", self._run_io, self.flush)
        self.watchers = self.rollouts.watchers
        """Non-empty while a rollout waits for a board's FirmwareStatus (checked on dispatch)."""
        if enabled:
            self._load()
            self._make_room(0, None, at_start=True)

    # ---------------------------------------------------------- worker

    def _run_io(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        fut = asyncio.get_running_loop().run_in_executor(self._io, fn)
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        return fut

    def _io_soon(self, fn: Callable[[], Any]) -> None:
        self._run_io(fn).add_done_callback(_log_io_failure)

    async def flush(self) -> None:
        """Waits until the writes submitted so far are done (and their results applied)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
            await asyncio.sleep(0)

    def close(self) -> None:
        self.rollouts.cancel()
        self._io.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.rollouts.close()

    # ---------------------------------------------------------- disk

    def _dir(self, image_id: int) -> Path:
        return self.folder / str(image_id)

    def _manifest_io(self, img: Image) -> Callable[[], None]:
        d, doc = self._dir(img.image_id), _manifest_doc(img)

        def write() -> None:
            d.mkdir(parents=True, exist_ok=True)
            _write_atomic(d / "manifest.json", doc)

        return write

    def _load(self) -> None:
        """At start-up (blocking, once)."""
        if not self.folder.is_dir():
            return
        for d in self.folder.iterdir():
            try:
                doc = json.loads((d / "manifest.json").read_text())
                img = Image(int(d.name), int(doc["size"]), bytes.fromhex(doc["sha256"]), str(doc["version"]),
                            int(doc["chunk"]), bool(doc["verified"]))  # fmt: skip
            except (OSError, ValueError, KeyError):
                continue
            binf = d / "image.bin"
            (d / "image.bin.tmp").unlink(missing_ok=True)
            parts = {int(p.name[5:]): p.stat().st_size for p in d.glob("part-*") if not p.name.endswith(".tmp")}
            if not img.verified and binf.is_file() and parts.get(0) and _hash_file(binf) == img.sha256:
                img.verified, img.chunk = True, parts[0]  # assembled; stopped before its manifest was saved
                _write_atomic(d / "manifest.json", _manifest_doc(img))
            if img.verified and not binf.is_file():
                img.verified, img.chunk = False, 0
            if img.verified:
                for offset in parts:  # left over when stopped between the manifest and their removal
                    _part(d, offset).unlink(missing_ok=True)
            else:
                binf.unlink(missing_ok=True)
                img.parts = parts
            with contextlib.suppress(OSError):
                img.used = img.touched = (binf if img.verified else d / "manifest.json").stat().st_mtime
            self.images[img.image_id] = img

    # ---------------------------------------------------------- bound

    @property
    def used_bytes(self) -> int:
        return sum(i.held for i in self.images.values())

    def _make_room(self, need: int, keep: int | None, at_start: bool = False) -> bool:
        """Evicts least recently used images (never `keep` nor one an unfinished rollout needs)
        until `need` more bytes fit; False when they cannot."""
        used = self.used_bytes
        if used + need <= self.max_bytes:
            return True
        needed = self.rollouts.needed_images()
        victims = [
            i for i in self.images.values()
            if i.held and not i.assembling and i.image_id != keep and i.image_id not in needed
        ]  # fmt: skip
        if used - sum(i.held for i in victims) + need > self.max_bytes:
            return False  # evicting would not be enough: keep what is held
        for img in sorted(victims, key=lambda i: i.used):
            if used + need <= self.max_bytes:
                break
            used -= img.held
            self._drop(img.image_id, at_start)
            self.evictions += 1
            log.info("firmware image %d (%d bytes) evicted from the cache", img.image_id, img.size)
        return used + need <= self.max_bytes

    def _drop(self, image_id: int, now: bool = False) -> None:
        self.images.pop(image_id, None)
        fd = self._fds.pop(image_id, None)
        if fd is not None:
            os.close(fd)
        remove = functools.partial(shutil.rmtree, self._dir(image_id), True)
        if now:  # at start-up, before the event loop serves anything
            remove()
        else:
            self._io_soon(remove)

    # ---------------------------------------------------------- manifest and chunks

    def manifest(self, body: dict[int, Any]) -> None:
        """A verified UpdateFirmware: the image its chunks must add up to."""
        if not self.enabled:
            return
        image_id, size, sha = int(body[Key.IMAGE_ID]), int(body[Key.SIZE]), bytes(body[Key.SHA256])
        old = self.images.get(image_id)
        if old is not None and old.size == size and old.sha256 == sha:
            old.used = time.time()
            return
        if old is not None:  # the same id for another image: what was held is stale
            self._drop(image_id)
        img = Image(image_id, size, sha, str(body.get(Key.VERSION, "")), used=time.time())
        self.images[image_id] = img
        self._io_soon(self._manifest_io(img))

    def put(self, body: dict[int, Any]) -> None:
        """A chunk the CSMS sent to a board (the FirmwareChunk response body): written by the
        worker; the image is assembled and verified there once its chunks cover it."""
        if not self.enabled:
            return
        img = self.images.get(int(body.get(Key.IMAGE_ID, -1)))
        data = body.get(Key.DATA)
        if img is None or img.verified or img.assembling or not isinstance(data, bytes) or not data:
            return
        offset = int(body[Key.OFFSET])
        if offset + len(data) > img.size or img.parts.get(offset) == len(data):
            return
        if not self._make_room(img.size - img.held, img.image_id):
            self.skipped += 1
            return
        d = self._dir(img.image_id)
        self._io_soon(functools.partial(_write_atomic, _part(d, offset), bytes(data)))
        img.parts[offset] = len(data)
        img.used = time.time()
        self.stored += 1
        if sum(img.parts.values()) >= img.size:
            self._complete(img)

    def _complete(self, img: Image) -> None:
        pos = 0
        for offset in sorted(img.parts):
            if offset != pos:
                return  # overlapping chunks of different lengths: wait for the rest
            pos += img.parts[offset]
        if pos != img.size:
            return
        offsets, first = sorted(img.parts), img.parts[0]
        img.assembling = True
        d = self._dir(img.image_id)

        verified = Image(img.image_id, img.size, img.sha256, img.version, first, True)
        job = functools.partial(_assemble, d, offsets, img.size, img.sha256, _manifest_doc(verified))

        def done(fut: asyncio.Future[bool]) -> None:
            img.assembling = False
            img.parts.clear()
            if fut.cancelled() or fut.exception() is not None:
                exc = None if fut.cancelled() else fut.exception()
                log.error("firmware image %d not assembled, dropped: %r", img.image_id, exc)
                if self.images.get(img.image_id) is img:
                    self._drop(img.image_id)
                return
            if self.images.get(img.image_id) is not img:
                return  # replaced or evicted meanwhile
            if not fut.result():
                self.rejected += 1
                log.warning("firmware image %d: SHA-256 does not match its manifest; chunks dropped", img.image_id)
                return
            img.verified, img.chunk, img.used = True, first, time.time()
            log.info("firmware image %d (%s, %d bytes) verified and cached", img.image_id, img.version, img.size)

        self._run_io(job).add_done_callback(done)

    def has(self, image_id: int) -> bool:
        img = self.images.get(image_id)
        return self.enabled and img is not None and img.verified

    def chunk(self, image_id: int, offset: int) -> dict[int, Any] | None:
        """The FirmwareChunk response body from a verified image; None when not held. One
        pread of at most one chunk (bounded by the frame size) from an open file."""
        img = self.images.get(image_id)
        if not self.enabled or img is None or not img.verified or offset >= img.size:
            return None
        fd = self._fds.get(image_id)
        try:
            if fd is None:
                fd = self._fds[image_id] = os.open(self._dir(image_id) / "image.bin", os.O_RDONLY)
            data = os.pread(fd, img.chunk, offset)
        except OSError as e:
            log.error("firmware image %d unreadable, dropped: %s", image_id, e)
            self._drop(image_id)
            return None
        self.hits += 1
        now = time.time()
        img.used = now
        if now - img.touched > TOUCH_EVERY_S:  # the LRU order across restarts
            img.touched = now
            self._io_soon(functools.partial(_touch, self._dir(image_id) / "image.bin"))
        return {Key.IMAGE_ID: image_id, Key.OFFSET: offset, Key.DATA: data, Key.LAST: offset + len(data) >= img.size}

    # ---------------------------------------------------------- statuses

    def status(self, device_id: str, body: dict[int, Any]) -> None:
        """A FirmwareStatus event of a board (called on dispatch, only while someone watches)."""
        st = int(body.get(Key.FW_STATUS, -1))
        if st < 0:
            return
        self.rollouts.status(device_id, int(body.get(Key.IMAGE_ID, -1)), st, str(body.get(Key.REASON, "")))

    def snapshot(self) -> dict[str, int]:
        return {
            "images": sum(1 for i in self.images.values() if i.verified),
            "bytes": self.used_bytes,
            "max_bytes": self.max_bytes,
            "evictions": self.evictions,
            "chunks_stored": self.stored,
            "chunks_served": self.hits,
            "chunks_skipped": self.skipped,
            "images_rejected": self.rejected,
            "rollouts_active": self.rollouts.active,
        }


def _manifest_doc(img: Image) -> bytes:
    return json.dumps({"size": img.size, "sha256": img.sha256.hex(), "version": img.version, "chunk": img.chunk,
                       "verified": img.verified}).encode()  # fmt: skip


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def _log_io_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("firmware cache write failed: %r", fut.exception())
