"""M4 firmware update: announced, downloaded in chunks, verified, installed into the
inactive A/B slot, activated after a reboot, rolled back when the new image fails to boot.

The Ed25519 signature of the manifest is verified by the gateway's Rust core before the
UpdateFirmware command reaches the board; the board checks what it can afford: the size
(refused up front when the slot cannot hold it) and the SHA-256 of the downloaded image.
Chunks (FirmwareChunk, bulk class, ≤ MAX_CHUNK) are requested one at a time at the
current offset, written to `fw<slot>` on flash; the progress is saved, so a power cut
resumes the download where it stopped. The download and the verification run whenever
the board is online, a charging session included; the install (boot state written, then the
reboot that activates it) waits until the station is idle: no transaction, and the final
TransactionEvent delivered (or the board offline), so no session is interrupted (M5) —
unless UpdateFirmware says `when` = now: then the install follows the verification at once
and a running session ends first (stop reason reboot, as Reset now does). A
verified image waiting for the install is kept across a power cut (`ok` in `fwdl`). From
Installing to the reboot the EVSE is unavailable, so no session starts in between. Boot
state (`boot`): active slot, trial slot, the version of each (`ver` the active one's, None for
the firmware the board was built with; `tver` the trial's). The active slot's version is the
board's (Hello, BootNotification, the FirmwareVersion variable) and FirmwareStatus activated
carries it, so the CSMS stores the version the board now runs. On the emulated board an
image "boots" when it starts with BOOT_MAGIC; a trial image that does not is abandoned and the old slot stays active
(FirmwareStatus rolled_back). Every step is reported as a durable FirmwareStatus.
"""

import hashlib

from .. import store
from ..msgpack import Map
from ..outbox import SECURITY
from ..schema import (
    A_FIRMWARE_CHUNK,
    A_FIRMWARE_STATUS,
    A_TRANSACTION_EVENT,
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
    F_WHEN,
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
    RESET_WHEN_NOW,
    STATUS_ACCEPTED,
)
from . import Refused, Service, status

BOOT_MAGIC = b"CSCFW1"
MAX_IMAGE = 262144


class FirmwareUpdate(Service):
    COMMANDS = (
        A_UPDATE_FIRMWARE, "update",
    )  # fmt: skip

    def __init__(self, app):
        super().__init__(app)
        self.st = store.load(store.path("fwdl"), None)  # the download in progress
        self.boot_st = store.load(store.path("boot"), None) or {"active": 0, "trial": None, "ver": None}
        self.waiting = False
        self._version(self.boot_st.get("ver"))

    def _version(self, v):
        """The board's version is `v`, the active slot's (None: the one it was built with)."""
        app = self.app
        if v:
            app.version = v
            app.cfg.vals[3] = v  # ChargingStation.FirmwareVersion (config.VARS)
            app.link.ident = (app.link.ident[0], v)

    def _status(self, st, reason=None, image=None, version=None):
        b = Map()
        b[F_IMAGE_ID] = image if image is not None else (self.st["img"] if self.st else 0)
        b[F_FW_STATUS] = st
        if reason:
            b[F_REASON] = reason
        b[F_SLOT] = self.boot_st["active"]
        if version:
            b[F_VERSION] = version
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
        v = b.pop("tver", None)
        if img[: len(BOOT_MAGIC)] == BOOT_MAGIC:
            b["active"] = t
            b["ver"] = v
            store.save(store.path("boot"), b)
            self._version(v)
            self._status(FIRMWARE_STATUS_ACTIVATED, None, image, v)
        else:
            store.save(store.path("boot"), b)
            self._status(FIRMWARE_STATUS_ROLLED_BACK, "new image failed to boot", image)

    def update(self, body, seq):
        size = body[F_SIZE]
        if size > MAX_IMAGE:
            raise Refused("image of %d bytes does not fit the slot (%d)" % (size, MAX_IMAGE))
        if len(body[F_SHA256]) != 32:
            raise Refused("sha256 must be 32 bytes")
        # accepted during a transaction: downloaded and verified while charging, installed when idle
        slot = 1 - self.boot_st["active"]
        store.remove(store.path("fw%d" % slot))
        self.st = {
            "img": body[F_IMAGE_ID],
            "ver": body[F_VERSION],
            "size": size,
            "sha": body[F_SHA256],
            "slot": slot,
            "off": 0,
            "ok": 0,  # 1: verified, waiting to be installed
            "now": 1 if body.get(F_WHEN) == RESET_WHEN_NOW else 0,  # install without waiting for idle
        }
        store.save(store.path("fwdl"), self.st)
        self._status(FIRMWARE_STATUS_DOWNLOADING)
        return status(STATUS_ACCEPTED)

    def idle(self):
        """No session to interrupt: no transaction, and its final TransactionEvent
        delivered when online (stored on flash otherwise: it is sent after the reboot)."""
        app = self.app
        if app.tx.active():
            return False
        if app.online:
            for r in app.outbox.index:
                if r[1] == A_TRANSACTION_EVENT:
                    return False
        return True

    def tick(self, now):
        st = self.st
        if st is None:
            return
        if st.get("ok"):
            if st.get("now") or self.idle():
                self._install()
            return
        if self.waiting or not self.app.online:
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
            # At the saved offset, not appended: after a power cut between this write and the
            # progress save below, the same chunk comes again and must replace itself.
            with open(p, "r+b" if st["off"] else "wb") as f:
                f.seek(st["off"])
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
        st["ok"] = 1
        store.save(store.path("fwdl"), st)
        if st.get("now") or self.idle():
            self._install()
        else:
            self.app.note("fw_waiting", {"img": st["img"]})  # installed when the session ends

    def _install(self):
        st = self.st
        app = self.app
        app.tx.inoperative = True  # no session starts before the reboot
        self._status(FIRMWARE_STATUS_INSTALLING)
        b = self.boot_st
        b["trial"] = st["slot"]
        b["img"] = st["img"]
        b["tver"] = st["ver"]
        store.save(store.path("boot"), b)
        self._status(FIRMWARE_STATUS_INSTALLED)
        self.st = None
        store.remove(store.path("fwdl"))
        # activate: boot the new slot (a session, with `now`, ends first)
        app.admin.reboot_soon(500, True, "FirmwareUpdate")

    def _fail(self, code, reason):
        self._status(code, reason)
        store.remove(store.path("fw%d" % self.st["slot"]))
        self.st = None
        store.remove(store.path("fwdl"))
