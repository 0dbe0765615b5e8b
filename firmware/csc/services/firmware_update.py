"""M4 firmware update: announced by a signed manifest, downloaded in chunks, verified by
the board itself, installed into the inactive slot, run on trial after a reboot, confirmed by
its self-test or rolled back.

- Trust: UpdateFirmware carries the manifest (image id, version, size, SHA-256) and its Ed25519
  signature by a named signer. The board answers a signer its loader does not trust (the
  board's update trust store, `app.slots.signers`, provisioned at the factory like the factory
  key) and a version not newer than the one it runs (rollback) with a refusal naming it, each
  also a SecurityEvent; then, before a byte is downloaded, it verifies the signature itself
  (csc/ed25519.py, loaded for that and dropped after): a manifest the gateway let through but the
  board cannot verify ends in FirmwareStatus signature_invalid. The SHA-256 of the downloaded image
  against the signed one closes the chain.
- Download: FirmwareChunk requests (bulk class) one at a time at the current offset, written to
  `fwimg` on flash; the progress is saved, so a power cut resumes where it stopped. Download
  and verification run whenever the board is online, a charging session included.
- Install: when the station is idle (no transaction, its final TransactionEvent delivered), or at
  once with `when` = now (a running session ends first, stop reason reboot). The board's loader
  (`app.slots`: boards/unix.py on the emulated board, boards/esp32.py on OTA partitions) writes the
  image into the slot the board does not run, the service keeps a record of the trial (`fwboot`),
  the loader is told to boot that slot on trial, and the board reboots. A power cut before that
  point finds the verified image and installs it again; the running slot is never written.
- Trial: the new code reports its own version (csc.FW_VERSION of the code that runs). Its
  self-test: it must run the version its manifest named and get a BootNotification accepted within
  SELFTEST_MS; then it tells the loader to keep it (FirmwareStatus activated, with the version).
  A version mismatch ends the trial at once; no acceptance in time reboots, and the loader, after
  a number of boots without confirmation (a crash at import counts), goes back to the old slot:
  the old code then reports FirmwareStatus rolled_back with the loader's reason.
Every step is a durable FirmwareStatus.
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: a name imported at the top is a global of the module (heap
# on a board: its globals table holds 12 names in 96 bytes, 13 take 144). Never in what a tick runs: a
# `from … import` statement makes a tuple each time it runs.

from micropython import const

from .. import store
from ..link import ticks_diff
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
    F_SIGNATURE,
    F_SIGNER,
    F_SIZE,
    F_SLOT,
    F_VERSION,
    F_WHEN,
    FIRMWARE_STATUS_ACTIVATED,
    FIRMWARE_STATUS_DOWNLOAD_FAILED,
    FIRMWARE_STATUS_DOWNLOADED,
    FIRMWARE_STATUS_DOWNLOADING,
    FIRMWARE_STATUS_INSTALL_FAILED,
    FIRMWARE_STATUS_INSTALLED,
    FIRMWARE_STATUS_INSTALLING,
    FIRMWARE_STATUS_ROLLED_BACK,
    FIRMWARE_STATUS_SIGNATURE_INVALID,
    FIRMWARE_STATUS_VERIFICATION_FAILED,
    FIRMWARE_STATUS_VERIFIED,
    FIRMWARE_STATUS_VERIFYING,
    RESET_WHEN_NOW,
    STATUS_ACCEPTED,
)
from . import Service, refused, status

MAX_IMAGE = const(262144)  # a slot of the emulated board (its flash: 1 MiB)
SELFTEST_MS = const(120000)  # a new image that is not accepted by the CSMS in this time reboots (a trial lost)


def version_key(v):
    """Version "1.10.2" -> (1, 10, 2): versions compare by their numbers; None when `v` has none."""
    out = []
    n = None
    for c in v:
        if "0" <= c <= "9":
            n = (n or 0) * 10 + ord(c) - 48
        elif c == ".":
            if n is None:
                return None
            out.append(n)
            n = None
        else:
            return None
    if n is None:
        return None
    out.append(n)
    return tuple(out)


def _idle(app):
    """No session to interrupt: no transaction, and its final TransactionEvent delivered when
    online (stored on flash otherwise: it is sent after the reboot)."""
    if app.tx.active():
        return False
    if app.online:
        for r in app.outbox.index:
            if r[1] == A_TRANSACTION_EVENT:
                return False
    return True


def _signed(signers, st):
    """The manifest's Ed25519 signature by its signer's key in the trust store `signers`. The
    signed bytes: canonical msgpack of [image_id, version, size, sha256], as the CSMS signs them
    (evedge_csms.commands.manifest_bytes)."""
    import sys

    from ..msgpack import Writer

    w = Writer(size=128)
    w.value([st["img"], st["ver"], st["size"], st["sha"]])
    m = __import__("csc.ed25519", None, None, ("verify",))
    try:
        ok = m.verify(signers[st["by"]], bytes(w.mv[: w.pos]), st["sig"])
    except (ValueError, KeyError):  # BadKey: a trust store entry that verifies nothing
        ok = False
    finally:  # cold: its code and tables leave the heap (as services.on_demand does)
        m = None
        sys.modules.pop("csc.ed25519", None)
        pkg = sys.modules["csc"]
        if hasattr(pkg, "ed25519"):
            delattr(pkg, "ed25519")
    return ok


class FirmwareUpdate(Service):
    COMMANDS = (
        A_UPDATE_FIRMWARE, "update",
    )  # fmt: skip

    def __init__(self, app):
        Service.__init__(self, app)  # not super(): a closure and a cell of heap per class on a board
        self.st = store.load(store.path("fwdl"), None)  # the download in progress
        self.waiting = False
        self.trial = None  # the trial's record while the new image tests itself
        self._deadline = 0

    def _status(self, st, reason=None, image=None, version=None):
        b = Map()
        b[F_IMAGE_ID] = image if image is not None else (self.st["img"] if self.st else 0)
        b[F_FW_STATUS] = st
        if reason:
            b[F_REASON] = reason
        sl = self.app.slots
        if sl is not None and sl.running is not None:
            b[F_SLOT] = sl.running
        if version:
            b[F_VERSION] = version
        self.app.emit(A_FIRMWARE_STATUS, b, SECURITY)
        self.app.note("fw_status", {"status": st, "reason": reason})

    def boot(self):
        sl = self.app.slots
        if sl is None:
            return
        r = store.load(store.path("fwboot"), None)
        if sl.on_trial():
            # the install finished before the reboot that brought us here
            self.st = None
            store.remove(store.path("fwdl"))
            store.remove(store.path("fwimg"))
            self.trial = r or {"img": 0, "ver": None}
            want = self.trial["ver"]
            if want != self.app.version:
                self._abort("the image runs version %s, its manifest says %s" % (self.app.version, want))
                return
            self._deadline = self.app.now() + SELFTEST_MS
            self.app.note("fw_trial", {"version": want})
            return
        if self.st is not None or r is None:
            return  # nothing installed, or an install still to finish (it writes the record again)
        if sl.running != r["slot"]:  # the loader went back to the slot that ran before
            self._status(FIRMWARE_STATUS_ROLLED_BACK, sl.rolled_back() or "the new image did not boot",
                         r["img"], self.app.version)  # fmt: skip
            sl.forget()
        store.remove(store.path("fwboot"))  # else: confirmed, and activated reported, before a power cut

    def accepted(self):
        """A BootNotification accepted: the trial's self-test passed, the loader keeps the slot."""
        r = self.trial
        if r is None:
            return
        self.trial = None
        self._status(FIRMWARE_STATUS_ACTIVATED, None, r["img"], self.app.version)
        self.app.slots.confirm()
        store.remove(store.path("fwboot"))

    def _abort(self, reason):
        self.app.note("fw_selftest_failed", {"reason": reason})
        self.trial = None
        self.app.slots.abort(reason)
        self.app.admin.reboot_soon(100, True, "FirmwareUpdate")

    def update(self, body, seq):
        app = self.app
        sl = app.slots
        if sl is None:
            raise refused("this board has no slot to install an update into")
        size = body[F_SIZE]
        room = getattr(sl, "max_image", MAX_IMAGE)  # an OTA partition's size on an ESP32
        if size > room:
            raise refused("image of %d bytes does not fit the slot (%d)" % (size, room))
        if len(body[F_SHA256]) != 32:
            raise refused("sha256 must be 32 bytes")
        signer = body.get(F_SIGNER)
        if signer not in sl.signers:
            r = "firmware signer %s is not in the board's trust store" % signer
            app.security_event("UnknownFirmwareSigner", r)
            raise refused(r)
        ver = body[F_VERSION]
        new, cur = version_key(ver), version_key(app.version)
        if new is None:
            raise refused("version %s is not a dotted number" % ver)
        if cur is not None and new <= cur:
            r = "version %s is not newer than the running %s: rollback refused" % (ver, app.version)
            app.security_event("FirmwareRollbackRefused", r)
            raise refused(r)
        # accepted during a transaction: downloaded and verified while charging, installed when idle
        store.remove(store.path("fwimg"))
        self.st = {
            "img": body[F_IMAGE_ID],
            "ver": ver,
            "size": size,
            "sha": body[F_SHA256],
            "sig": body[F_SIGNATURE],
            "by": signer,
            "slot": sl.inactive(),
            "off": 0,
            "sv": 0,  # 1: the manifest's signature verified
            "ok": 0,  # 1: the image verified, waiting to be installed
            "now": 1 if body.get(F_WHEN) == RESET_WHEN_NOW else 0,  # install without waiting for idle
        }
        store.save(store.path("fwdl"), self.st)
        self._status(FIRMWARE_STATUS_DOWNLOADING)
        return status(STATUS_ACCEPTED)

    def tick(self, now):
        if self.trial is not None:
            if ticks_diff(now, self._deadline) > 0:
                self._abort("no BootNotification accepted within %d s" % (SELFTEST_MS // 1000))
            return
        st = self.st
        if st is None:
            return
        app = self.app
        if st.get("ok"):  # verified: installed here, once the station is idle (or at once: `now`)
            if not (st.get("now") or _idle(app)):
                return
            sl = app.slots
            app.tx.inoperative = True  # no session starts before the reboot
            self._status(FIRMWARE_STATUS_INSTALLING)
            try:
                sl.install(st["slot"], store.path("fwimg"), st["size"])
            except (ValueError, OSError) as e:
                app.tx.inoperative = False
                self._fail(FIRMWARE_STATUS_INSTALL_FAILED, str(e) or "flash full")
                return
            # the record first, then the loader's switch: a power cut between the two finds the
            # verified image (fwdl) still there and installs it again
            store.save(store.path("fwboot"), {"img": st["img"], "ver": st["ver"], "slot": st["slot"]})
            sl.set_trial(st["slot"])
            self._status(FIRMWARE_STATUS_INSTALLED)
            self.st = None
            store.remove(store.path("fwdl"))
            store.remove(store.path("fwimg"))
            # activate: boot the new slot (a session, with `now`, ends first)
            app.admin.reboot_soon(500, True, "FirmwareUpdate")
            return
        if not st.get("sv"):
            if _signed(app.slots.signers, st):
                st["sv"] = 1
                store.save(store.path("fwdl"), st)
            else:
                r = "the signature of %s does not verify" % st["by"]
                self.app.security_event("InvalidFirmwareSignature", r)
                self._fail(FIRMWARE_STATUS_SIGNATURE_INVALID, r)
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
        p = store.path("fwimg")
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
        import hashlib

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
        store.save(store.path("fwdl"), st)  # the next tick installs it
        if not (st.get("now") or _idle(self.app)):
            self.app.note("fw_waiting", {"img": st["img"]})  # installed when the session ends

    def _fail(self, code, reason):
        self._status(code, reason)
        store.remove(store.path("fwimg"))
        self.st = None
        store.remove(store.path("fwdl"))
