"""M4 at the site: the firmware image cache and the staged rollout's bookkeeping.

The cache keeps the chunks of an image the CSMS sent to a board (the answers to forwarded
`FirmwareChunk` requests) under `data_dir/fwcache/<image_id>/`, one file per offset. It only
takes chunks of an image whose manifest it holds: the `UpdateFirmware` command the gateway
verified (Ed25519 signature by a known signer) names its size and SHA-256. Once the chunks
cover the whole image, it is hashed: a match assembles `image.bin` and the image is
*verified*; a mismatch drops the chunks. Only a verified image is served to the boards, with
the chunk length the CSMS used, so later boards download it without an upstream round trip.

`watch`/`status` let the command path wait for a board's `FirmwareStatus` of an image
(the staged rollout waits for its first wave's Installed/Activated or a failure).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.schema import FirmwareStatus, Key

log = logging.getLogger("gateway.firmware")

SUCCESS = frozenset({FirmwareStatus.INSTALLED, FirmwareStatus.ACTIVATED})
FAILURE = frozenset(
    {
        FirmwareStatus.DOWNLOAD_FAILED,
        FirmwareStatus.VERIFICATION_FAILED,
        FirmwareStatus.SIGNATURE_INVALID,
        FirmwareStatus.INSTALL_FAILED,
        FirmwareStatus.ROLLED_BACK,
    }
)
"""FirmwareStatus values that end a board's update: success or failure (the rest are steps)."""


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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FirmwareCache:
    def __init__(self, folder: Path, enabled: bool = True) -> None:
        self.folder = folder
        self.enabled = enabled
        self.images: dict[int, Image] = {}
        self.watchers: dict[tuple[str, int], asyncio.Future[tuple[int, str]]] = {}
        self.hits = 0
        """Chunks served from the cache."""
        self.stored = 0
        """Chunks taken from the CSMS's answers."""
        self.rejected = 0
        """Complete images whose SHA-256 did not match their manifest (dropped)."""
        if enabled:
            self._load()

    # ---------------------------------------------------------- disk

    def _dir(self, image_id: int) -> Path:
        return self.folder / str(image_id)

    def _save_manifest(self, img: Image) -> None:
        d = self._dir(img.image_id)
        d.mkdir(parents=True, exist_ok=True)
        doc = {"size": img.size, "sha256": img.sha256.hex(), "version": img.version, "chunk": img.chunk,
               "verified": img.verified}  # fmt: skip
        _write_atomic(d / "manifest.json", json.dumps(doc).encode())

    def _load(self) -> None:
        if not self.folder.is_dir():
            return
        for d in self.folder.iterdir():
            try:
                doc = json.loads((d / "manifest.json").read_text())
                img = Image(int(d.name), int(doc["size"]), bytes.fromhex(doc["sha256"]), str(doc["version"]),
                            int(doc["chunk"]), bool(doc["verified"]))  # fmt: skip
            except (OSError, ValueError, KeyError):
                continue
            if img.verified and not (d / "image.bin").is_file():
                img.verified, img.chunk = False, 0
            if not img.verified:
                for p in d.glob("part-*"):
                    if not p.name.endswith(".tmp"):
                        img.parts[int(p.name[5:])] = p.stat().st_size
            self.images[img.image_id] = img

    # ---------------------------------------------------------- manifest and chunks

    def manifest(self, body: dict[int, Any]) -> None:
        """A verified UpdateFirmware: the image its chunks must add up to."""
        if not self.enabled:
            return
        image_id, size, sha = int(body[Key.IMAGE_ID]), int(body[Key.SIZE]), bytes(body[Key.SHA256])
        old = self.images.get(image_id)
        if old is not None and old.size == size and old.sha256 == sha:
            return
        if old is not None:  # the same id for another image: what was held is stale
            shutil.rmtree(self._dir(image_id), ignore_errors=True)
        img = Image(image_id, size, sha, str(body.get(Key.VERSION, "")))
        self.images[image_id] = img
        self._save_manifest(img)

    def put(self, body: dict[int, Any]) -> None:
        """A chunk the CSMS sent to a board (the FirmwareChunk response body)."""
        if not self.enabled:
            return
        img = self.images.get(int(body.get(Key.IMAGE_ID, -1)))
        data = body.get(Key.DATA)
        if img is None or img.verified or not isinstance(data, bytes) or not data:
            return
        offset = int(body[Key.OFFSET])
        if offset + len(data) > img.size or img.parts.get(offset) == len(data):
            return
        _write_atomic(self._dir(img.image_id) / f"part-{offset:010d}", data)
        img.parts[offset] = len(data)
        self.stored += 1
        if sum(img.parts.values()) >= img.size:
            self._complete(img)

    def _complete(self, img: Image) -> None:
        d = self._dir(img.image_id)
        h = hashlib.sha256()
        chunks: list[bytes] = []
        pos = 0
        for offset in sorted(img.parts):
            if offset != pos:
                return  # overlapping chunks of different lengths: wait for the rest
            data = (d / f"part-{offset:010d}").read_bytes()
            h.update(data)
            chunks.append(data)
            pos += len(data)
        if pos != img.size:
            return
        first = img.parts[0]
        for offset in img.parts:
            (d / f"part-{offset:010d}").unlink(missing_ok=True)
        img.parts.clear()
        if h.digest() != img.sha256:
            self.rejected += 1
            log.warning("firmware image %d: SHA-256 does not match its manifest; chunks dropped", img.image_id)
            return
        _write_atomic(d / "image.bin", b"".join(chunks))
        img.verified, img.chunk = True, first
        self._save_manifest(img)
        log.info("firmware image %d (%s, %d bytes) verified and cached", img.image_id, img.version, img.size)

    def has(self, image_id: int) -> bool:
        img = self.images.get(image_id)
        return self.enabled and img is not None and img.verified

    def chunk(self, image_id: int, offset: int) -> dict[int, Any] | None:
        """The FirmwareChunk response body from a verified image; None when not held."""
        img = self.images.get(image_id)
        if not self.enabled or img is None or not img.verified or offset >= img.size:
            return None
        with open(self._dir(image_id) / "image.bin", "rb") as f:
            f.seek(offset)
            data = f.read(img.chunk)
        self.hits += 1
        return {Key.IMAGE_ID: image_id, Key.OFFSET: offset, Key.DATA: data, Key.LAST: offset + len(data) >= img.size}

    # ---------------------------------------------------------- statuses

    def watch(self, device_id: str, image_id: int) -> asyncio.Future[tuple[int, str]]:
        """A future set by the board's first final FirmwareStatus of the image: (status, reason)."""
        fut: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self.watchers[device_id, image_id] = fut
        return fut

    def unwatch(self, device_id: str, image_id: int) -> None:
        self.watchers.pop((device_id, image_id), None)

    def status(self, device_id: str, body: dict[int, Any]) -> None:
        """A FirmwareStatus event of a board (called on dispatch, only while someone watches)."""
        st = int(body.get(Key.FW_STATUS, -1))
        if st not in SUCCESS and st not in FAILURE:
            return
        fut = self.watchers.pop((device_id, int(body.get(Key.IMAGE_ID, -1))), None)
        if fut is not None and not fut.done():
            fut.set_result((st, str(body.get(Key.REASON, ""))))

    def snapshot(self) -> dict[str, int]:
        return {
            "images": sum(1 for i in self.images.values() if i.verified),
            "chunks_stored": self.stored,
            "chunks_served": self.hits,
            "images_rejected": self.rejected,
        }
