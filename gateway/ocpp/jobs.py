"""The CSMS calls that outlive their answer: UpdateFirmware (fetch, check, cache, then the
board's update) and GetLog (the board's chunks gathered, then uploaded), and the certificate
calls that need the ledger (gateway/ocpp/files.py and certs.py hold the pure parts).

Rule: a call is answered at once with what the gateway can decide without the network
(location, signer, the board's acceptance of a GetLog); the rest runs as a task of the bridge,
and its progress is told as the station's own notifications. The board's own statuses follow
from its rows (gateway/ocpp/up.py): the gateway adds Downloading when its fetch starts and the
failures of its own steps (DownloadFailed, InvalidSignature with a SecurityEventNotification),
and it holds the board's LogStatus Uploaded back until its upload is done (Uploaded or
UploadFailure).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from cryptography import x509

from gateway import _core
from gateway.config import OcppConfig
from gateway.link import proto_ts
from gateway.localcsms.fwcache import FirmwareCache
from gateway.ocpp import certs, down, files
from gateway.ocpp.files import LogUpload, Refused, TransferFailed
from gateway.ocpp.ledger import Ledger
from gateway.ocpp.up import Payload, iso
from gateway.schema import Action, Key, LogStatus, LogType, Status

log = logging.getLogger("gateway.ocpp")

CACHE_CHUNK = 1024
"""The chunk length a fetched image is served to the boards with (the schema's `data` bound)."""


class JobSite(Protocol):
    """What the jobs need of the OCPP face (gateway.ocpp.bridge.OcppBridge is one)."""

    cfg: OcppConfig
    ledger: Ledger
    uploads: dict[tuple[str, int], LogUpload]

    def now(self) -> float: ...

    @property
    def firmware(self) -> FirmwareCache: ...

    def run_sync(self, fn: Callable[[], object]) -> asyncio.Future[object]: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]: ...

    def tell(self, device: str, action: str, payload: Payload) -> None:
        """A notification of `device`'s station to the CSMS (sent after the rows before it)."""

    def ask(self, device: str, cmd: down.ToBoard) -> Awaitable[tuple[Payload, down.Result]]: ...


def _info(code: str, why: str) -> Payload:
    return {"reasonCode": code[:20], "additionalInfo": why[:512]}


class Jobs:
    def __init__(self, site: JobSite) -> None:
        self.site = site
        cfg = site.cfg
        self.roots: list[x509.Certificate] = files.load_roots(cfg.firmware_ca) if cfg.firmware_ca else []
        self.signer = files.ManifestSigner(cfg.firmware_signer_key) if cfg.firmware_signer_key else None
        self.ctx = ssl.create_default_context(cafile=str(cfg.transfer_ca) if cfg.transfer_ca else None)
        self.updates: dict[str, tuple[int, asyncio.Task[None]]] = {}
        """device → the UpdateFirmware under way (request id, its task)."""

    # ------------------------------------------------------------ L01 UpdateFirmware

    async def update_firmware(self, device: str, p: Payload) -> Payload:
        site, rid, fw = self.site, int(p["requestId"]), p["firmware"]
        if not 0 <= rid <= 0xFFFFFFFF:
            return {"status": "Rejected", "statusInfo": _info("RequestId", "requestId out of 0…2^32-1")}
        try:
            url = files.location(str(fw["location"]))
            if not fw.get("signingCertificate") or not fw.get("signature"):
                raise Refused("Rejected", "this site installs signed firmware only")
            if not self.roots or self.signer is None:
                raise Refused("InvalidCertificate", "no firmware trust here (ocpp.firmware_ca, firmware_signer_key)")
            version = files.version_of(url)
            now = datetime.datetime.fromtimestamp(site.now(), datetime.UTC)
            signer = files.check_signer(str(fw["signingCertificate"]), self.roots, now)
        except Refused as e:
            if e.status == "InvalidCertificate":  # L01.FR.02
                self._security(device, "InvalidFirmwareSigningCertificate", e.why)
            return {"status": e.status, "statusInfo": _info(e.status, e.why)}
        status = "Accepted"
        old = self.updates.pop(device, None)
        if old is not None and not old[1].done():  # L01.FR.24: the new one replaces it
            old[1].cancel()
            status = "AcceptedCanceled"
        at = down.proto_time(str(fw["retrieveDateTime"]))
        task = site.spawn(self._update(device, rid, url, version, str(fw["signature"]), signer, at))
        self.updates[device] = (rid, task)
        return {"status": status}

    async def _update(self, device: str, rid: int, url: str, version: str, sig: str, signer: x509.Certificate,
                      at: int) -> None:  # fmt: skip
        site, cfg = self.site, self.site.cfg
        wait = at - proto_ts(site.now())
        if wait > 0:
            await asyncio.sleep(wait)
        self._fw(device, rid, "Downloading")
        try:
            image = await files.fetch(url, cfg.transfer_max_bytes, cfg.transfer_timeout_s, self.ctx)
            files.check_signature(image, sig, signer)
        except TransferFailed as e:
            log.warning("ocpp %s: firmware %d not fetched from %s: %s", device, rid, url, e)
            return self._fw(device, rid, "DownloadFailed")
        except Refused as e:  # L01.FR.03
            self._security(device, "InvalidFirmwareSignature", e.why)
            return self._fw(device, rid, "InvalidSignature")
        sha = hashlib.sha256(image).digest()
        cache = site.firmware
        cache.manifest({Key.IMAGE_ID: rid, Key.SIZE: len(image), Key.SHA256: sha, Key.VERSION: version})
        for off in range(0, len(image), CACHE_CHUNK):
            cache.put({Key.IMAGE_ID: rid, Key.OFFSET: off, Key.DATA: image[off : off + CACHE_CHUNK]})
        await cache.flush()
        if not cache.has(rid):
            log.warning("ocpp %s: firmware %d not cached (cache off or full): not offered", device, rid)
            return self._fw(device, rid, "DownloadFailed")
        # the boards' loaders trust Ed25519 signers only: the gateway, having checked OCPP's
        # X.509 signature over the image, signs its manifest; the board checks that signature
        # and the SHA-256 of what it downloads from the cache
        assert self.signer is not None
        manifest = _core.pack([rid, version, len(image), sha])
        body: dict[int, Any] = {Key.IMAGE_ID: rid, Key.VERSION: version, Key.SIZE: len(image), Key.SHA256: sha,
                                Key.SIGNATURE: self.signer.sign(manifest), Key.SIGNER: self.signer.name}  # fmt: skip
        cmd = down.ToBoard(Action.UPDATE_FIRMWARE, body, lambda r: down.reply(r, ("Accepted", "Rejected")))
        out, res = await site.ask(device, cmd)
        if out["status"] != "Accepted":
            log.warning("ocpp %s: firmware %d refused by the board: %s", device, rid, res.get(Key.REASON))
            self._fw(device, rid, "InstallationFailed")

    def _fw(self, device: str, rid: int, status: str) -> None:
        self.site.tell(device, "FirmwareStatusNotification", {"status": status, "requestId": rid})

    def _security(self, device: str, kind: str, why: str) -> None:
        self.site.tell(device, "SecurityEventNotification",
                       {"type": kind, "timestamp": iso(proto_ts(self.site.now())), "techInfo": why[:255]})  # fmt: skip

    # ------------------------------------------------------------ N01 GetLog

    async def get_log(self, device: str, p: Payload) -> Payload:
        site, rid = self.site, int(p["requestId"])
        try:
            url = files.location(str(p["log"]["remoteLocation"]))
        except Refused as e:
            return {"status": "Rejected", "statusInfo": _info("Location", e.why)}
        kind = LogType.SECURITY if p["logType"] == "SecurityLog" else LogType.DIAGNOSTICS
        body: dict[int, Any] = {Key.REQUEST_ID: rid & 0xFFFFFFFF, Key.LOG_TYPE: int(kind)}
        for src, k in (("oldestTimestamp", Key.VALID_FROM), ("latestTimestamp", Key.VALID_TO)):
            if p["log"].get(src):
                body[k] = down.proto_time(str(p["log"][src]))
        up = LogUpload(url, f"{device}-{rid}.log")
        key = (device, rid & 0xFFFFFFFF)
        site.uploads[key] = up  # before the board answers: its first chunk may come first
        await site.run_sync(lambda: site.ledger.save_upload(device, key[1], up.location, up.filename))
        cmd = down.ToBoard(Action.GET_LOG, body, lambda r: down.reply(r, ("Accepted", "Rejected")))
        out, res = await site.ask(device, cmd)
        if down.status_of(res) == Status.ACCEPTED and down.answer_body(res).get(Key.LOG_STATUS) != LogStatus.REJECTED:
            return {"status": "Accepted", "filename": up.filename}
        self._forget(key)
        return out if out["status"] != "Accepted" else {"status": "Rejected"}

    def rewrite(self, device: str, action: int, body: dict[int, Any],
                msg: tuple[str, Payload] | None) -> tuple[str, Payload] | None:  # fmt: skip
        """A board's row on its way to the CSMS: its LogChunks of an OCPP upload are gathered,
        its LogStatus Uploaded starts the upload (told when done); the rest as translated."""
        if action not in (Action.LOG_CHUNK, Action.LOG_STATUS):
            return msg
        key = (device, int(body.get(Key.REQUEST_ID, -1)))
        up = self.site.uploads.get(key)
        if up is None:
            return msg  # not the OCPP CSMS's upload
        if action == Action.LOG_CHUNK:
            up.chunk(int(body[Key.OFFSET]), bytes(body.get(Key.DATA, b"")), self.site.cfg.transfer_max_bytes)
            return msg
        st = body.get(Key.LOG_STATUS)
        if st == LogStatus.UPLOADED:
            self.site.spawn(self._upload(device, key, up))
            return None
        if st in (LogStatus.UPLOAD_FAILED, LogStatus.REJECTED):
            self._forget(key)
        return msg

    async def _upload(self, device: str, key: tuple[str, int], up: LogUpload) -> None:
        cfg = self.site.cfg
        try:
            if up.broken:
                raise TransferFailed(up.broken)
            await files.upload(up.url, bytes(up.data), cfg.transfer_timeout_s, self.ctx)
            status = "Uploaded"
        except TransferFailed as e:
            log.warning("ocpp %s: log %d not uploaded to %s: %s", device, key[1], up.url, e)
            status = "UploadFailure"
        self._forget(key)
        self.site.tell(device, "LogStatusNotification", {"status": status, "requestId": key[1]})

    def _forget(self, key: tuple[str, int]) -> None:
        site = self.site
        site.uploads.pop(key, None)
        site.run_sync(lambda: site.ledger.drop_upload(*key))

    # ------------------------------------------------------------ certificates (M01–M06)

    async def install_certificate(self, device: str, p: Payload) -> Payload:
        site = self.site
        cmd, der = certs.install(p)
        out, _ = await site.ask(device, cmd)
        if out["status"] == "Accepted":
            kind = str(p["certificateType"])
            await site.run_sync(lambda: site.ledger.save_cert(device, hashlib.sha256(der).digest(), kind, der))
        return out

    async def delete_certificate(self, device: str, p: Payload) -> Payload:
        site = self.site
        got = await site.run_sync(lambda: site.ledger.certs(device))
        known = got if isinstance(got, dict) else {}
        want = p["certificateHashData"]
        for h, (_, der) in known.items():
            if certs.matches(der, want):
                out, _ = await site.ask(device, certs.delete(h))
                if out["status"] in ("Accepted", "NotFound"):
                    await site.run_sync(functools.partial(site.ledger.drop_cert, device, h))
                return out
        return {"status": "NotFound"}

    async def installed_ids(self, device: str, p: Payload) -> Payload:
        site = self.site
        _, res = await site.ask(device, certs.installed())
        got = await site.run_sync(lambda: site.ledger.certs(device))
        return certs.installed_ids(res, got if isinstance(got, dict) else {}, list(p.get("certificateType") or ()))
