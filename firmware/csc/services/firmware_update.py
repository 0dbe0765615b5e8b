"""M4 firmware update: announced, downloaded in chunks, verified, installed into the
inactive A/B slot, activated after a reboot, rolled back when the new image fails to boot.

The Ed25519 signature of the manifest is verified by the gateway's Rust core before the
UpdateFirmware command reaches the board; the board checks what it can afford: the size
(refused up front when the slot cannot hold it) and the SHA-256 of the downloaded image.
Chunks (FirmwareChunk, bulk class, ≤ MAX_CHUNK) are requested one at a time at the
current offset, written to `fw<slot>` on flash; the progress is saved, so a power cut
resumes the download where it stopped. Boot state (`boot`): active slot, trial slot and
its boot attempts. On the emulated board an image "boots" when it starts with
BOOT_MAGIC; a trial image that does not is abandoned and the old slot stays active
(FirmwareStatus rolled_back). Every step is reported as a durable FirmwareStatus.
"""

import hashlib

from .. import store
from ..app import Refused, status
from ..msgpack import Map
from ..outbox import SECURITY
from ..schema import (
    A_FIRMWARE_CHUNK,
    A_FIRMWARE_STATUS,
    A_UPDATE_FIRMWARE,
    F_DATA,
    F_FW_STATUS,
    F_IMAGE_ID,
    F_LAST,
    F_OFFSET,
    F_REASON,
    F_SHA256,
    F_SIZE,
    F_SLOT,
    F_VERSION,
    FIRMWARE_STATUS_ACTIVATED,
    FIRMWARE_STATUS_DOWNLOAD_FAILED,
    FIRMWARE_STATUS_DOWNLOADED,
    FIRMWARE_STATUS_DOWNLOADING,
    FIRMWARE_STATUS_INSTALLED,
    FIRMWARE_STATUS_INSTALLING,
    FIRMWARE_STATUS_ROLLED_BACK,
    FIRMWARE_STATUS_VERIFICATION_FAILED,
    FIRMWARE_STATUS_VERIFIED,
    FIRMWARE_STATUS_VERIFYING,
    STATUS_ACCEPTED,
    STATUS_REJECTED,
)
from . import Service

BOOT_MAGIC = b"CSCFW1"
MAX_IMAGE = 262144


class FirmwareUpdate(Service):
    def __init__(self, app):
        super().__init__(app)
        self.st = store.load(store.path("fwdl"), None)  # the download in progress
        self.boot_st = store.load(store.path("boot"), None) or {"active": 0, "trial": None, "ver": None}
        self.waiting = False
        app.on(A_UPDATE_FIRMWARE, self.update)

    def _status(self, st, reason=None, image=None):
        b = Map()
        b[F_IMAGE_ID] = image if image is not None else (self.st["img"] if self.st else 0)
        b[F_FW_STATUS] = st
        if reason:
            b[F_REASON] = reason
        b[F_SLOT] = self.boot_st["active"]
        self.app.emit(A_FIRMWARE_STATUS, b, SECURITY)
        self.app.note("fw_status", {"status": st, "reason": reason})

    def boot(self):
        b = self.boot_st
        t = b["trial"]
        if t is None:
            return
        img = store.read(store.path("fw%d" % t)) or b""
        image = b.get("img", 0)
        b["trial"] = None
        if img[: len(BOOT_MAGIC)] == BOOT_MAGIC:
            b["active"] = t
            store.save(store.path("boot"), b)
            self._status(FIRMWARE_STATUS_ACTIVATED, None, image)
        else:
            store.save(store.path("boot"), b)
            self._status(FIRMWARE_STATUS_ROLLED_BACK, "new image failed to boot", image)

    def update(self, body, seq):
        size = body[F_SIZE]
        if size > MAX_IMAGE:
            raise Refused("image of %d bytes does not fit the slot (%d)" % (size, MAX_IMAGE))
        if len(body[F_SHA256]) != 32:
            raise Refused("sha256 must be 32 bytes")
        if self.app.tx.active():
            return status(STATUS_REJECTED, "transaction in progress")
        slot = 1 - self.boot_st["active"]
        store.remove(store.path("fw%d" % slot))
        self.st = {
            "img": body[F_IMAGE_ID],
            "ver": body[F_VERSION],
            "size": size,
            "sha": body[F_SHA256],
            "slot": slot,
            "off": 0,
        }
        store.save(store.path("fwdl"), self.st)
        self._status(FIRMWARE_STATUS_DOWNLOADING)
        return status(STATUS_ACCEPTED)

    def tick(self, now):
        st = self.st
        if st is None or self.waiting or not self.app.online:
            return
        b = Map()
        b[F_IMAGE_ID] = st["img"]
        b[F_OFFSET] = st["off"]
        self.waiting = True
        self.app.request(A_FIRMWARE_CHUNK, b, self._chunk)

    def _chunk(self, body, err):
        self.waiting = False
        st = self.st
        if st is None:
            return
        if body is None:
            if err not in (-1, 0):
                self._fail(FIRMWARE_STATUS_DOWNLOAD_FAILED, "chunk request failed (%d)" % err)
            return
        if body[F_OFFSET] != st["off"] or body[F_IMAGE_ID] != st["img"]:
            return
        data = body[F_DATA]
        p = store.path("fw%d" % st["slot"])
        try:
            with open(p, "ab") as f:
                f.write(data)
        except OSError:
            self._fail(FIRMWARE_STATUS_DOWNLOAD_FAILED, "flash full")
            return
        st["off"] += len(data)
        if st["off"] > st["size"]:
            self._fail(FIRMWARE_STATUS_DOWNLOAD_FAILED, "image larger than announced")
            return
        if not body[F_LAST]:
            store.save(store.path("fwdl"), st)
            return
        self._status(FIRMWARE_STATUS_DOWNLOADED)
        self._status(FIRMWARE_STATUS_VERIFYING)
        h = hashlib.sha256()
        n = 0
        with open(p, "rb") as f:
            buf = bytearray(512)
            while True:
                k = f.readinto(buf)
                if not k:
                    break
                h.update(memoryview(buf)[:k])
                n += k
        if n != st["size"] or h.digest() != st["sha"]:
            self._fail(FIRMWARE_STATUS_VERIFICATION_FAILED, "size or sha256 mismatch")
            return
        self._status(FIRMWARE_STATUS_VERIFIED)
        self._status(FIRMWARE_STATUS_INSTALLING)
        b = self.boot_st
        b["trial"] = st["slot"]
        b["img"] = st["img"]
        b["ver"] = st["ver"]
        store.save(store.path("boot"), b)
        self._status(FIRMWARE_STATUS_INSTALLED)
        self.st = None
        store.remove(store.path("fwdl"))
        self.app.admin._reboot_at = self.app.now() + 500  # activate: boot the new slot

    def _fail(self, code, reason):
        self._status(code, reason)
        store.remove(store.path("fw%d" % self.st["slot"]))
        self.st = None
        store.remove(store.path("fwdl"))
