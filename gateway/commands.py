"""The command path, CSMS → site (docs/upstream.md, "Commands"): what the gateway does with
a request from the CSMS.

Rule: nothing reaches a board that the gateway has not checked, and every target gets a
result. A `Command`'s inner frame is decoded by the core; an Ed25519 signature by a signer
named in `upstream.signers` is required for the actions a third party must be able to
verify (`SIGNED_ACTIONS`) and checked whenever present (`BAD_SIGNATURE`); an expired
command is refused (`EXPIRED`). Then:

- a request inner frame is fanned out (B11): re-sealed for each target with its key and
  counter (`Boards.deliver`, plaintext `secret` fields encrypted for that board), each
  result carrying the board's response envelope under `frame`; a board offline waits until
  the expiry (B16); an `UpdateFirmware` to more targets than `firmware.first_wave` is a
  staged rollout (gateway/localcsms/rollout.py);
- a response or error inner frame answers a board request that went upstream
  (gateway/forward.py);
- empty targets address the site itself: TokenList (R4-2), SendLocalList, ClearCache,
  DsoLimit, AvailablePower, InstallCertificate of the local-CSMS certificate (M17); and
  SetTariff (S5), DemandResponse (E2), DeletePersonalData (M10), which the gateway hands on
  to every board and keeps for those that come online later
  (gateway/localcsms/sitewide.py).

A bare `AvailablePower` (E4) or `DsoLimit` (E5) request is answered with its own response.
Power commands go to the site's power control (gateway/localcsms/sharing.py), which shares
the site's power among the boards and sends each its share; a DSO limit is ACCEPTED only if
every affected board confirmed within its deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from gateway import _core
from gateway.boards import Boards, Result
from gateway.config import FirmwareConfig
from gateway.forward import Forwarder
from gateway.link import proto_ts
from gateway.localcsms.auth import Authorizer
from gateway.localcsms.clock import Clock
from gateway.localcsms.fwcache import FirmwareCache
from gateway.localcsms.sharing import PowerControl
from gateway.localcsms.sitewide import FANNED_OUT, SiteWide
from gateway.protocol.text import clip_reason
from gateway.schema import FIELDS, MAX_UP_OBJECTS, MESSAGES, Action, CertType, ErrorCode, Key, Kind, Status
from gateway.security import SiteSecurity

SIGNED_ACTIONS = frozenset(
    {Action.UPDATE_FIRMWARE, Action.INSTALL_CERTIFICATE, Action.CERTIFICATE_SIGNED, Action.SET_TARIFF}
)
"""Commands a third party must be able to verify: Ed25519-signed upstream, checked here."""

CERT_MAX = FIELDS[Key.CERT].max_len
"""The schema's bound of a certificate (DER) in `cert`."""

Answer = tuple[int, dict[int, Any]]
"""(kind RESPONSE or ERROR, body) of the answer to the CSMS."""


class CommandSite(Protocol):
    """What the command path needs of the site (gateway.service.Gateway is one)."""

    @property
    def clock(self) -> Clock: ...

    @property
    def boards(self) -> Boards[Any]: ...

    @property
    def auth(self) -> Authorizer: ...

    @property
    def power(self) -> PowerControl: ...

    @property
    def firmware(self) -> FirmwareCache: ...

    @property
    def sitewide(self) -> SiteWide: ...

    @property
    def local_csms_cert(self) -> bytes:
        """DER of the gateway's own certificate as local CSMS (M17), b"" when none."""

    def run_sync(self, fn: Callable[[], object]) -> asyncio.Future[object]:
        """Runs `fn` on the writer thread of the site's databases."""

    def count_name(self, name: str) -> None:
        """Counts a rejection by its name (/status, /metrics)."""

    async def left_site(self, action: int, results: list[Result]) -> None:
        """A Deregister (M11) or Migrate (M12) was delivered to its targets (`results`)."""

    @property
    def security(self) -> SiteSecurity:
        """M19: the revocation list, the boards' certificates (gateway/security.py)."""


class CommandPath:
    def __init__(self, site: CommandSite, signers: Mapping[str, bytes], fw: FirmwareConfig,
                 forwarder: Forwarder) -> None:  # fmt: skip
        self.site = site
        self.signers = signers
        self.first_wave = fw.first_wave
        self.wave_timeout_s = fw.wave_timeout_s
        self.forwarder = forwarder

    def _err(self, code: int, reason: str) -> Answer:
        self.site.count_name(_core.error_name(code))
        return Kind.ERROR, {Key.ERROR_CODE: code, Key.REASON: clip_reason(reason)}

    async def handle(self, f: _core.Frame) -> Answer:
        """A request from the CSMS: its answer."""
        try:
            if f.action == Action.COMMAND:
                return await self._command(f.body)
            if f.action in (Action.AVAILABLE_POWER, Action.DSO_LIMIT):  # bare requests: the response is the result
                status, reason = await self.site_command(f)
                body: dict[int, Any] = {Key.STATUS: status}
                if reason:
                    body[Key.REASON] = clip_reason(reason)
                return Kind.RESPONSE, body
            if f.action == Action.REVOCATION_LIST:  # M19: bare, like the power requests
                status, reason = self.site.security.offer_crl(bytes(f.body[Key.CRL]))
                return Kind.RESPONSE, {Key.STATUS: status, Key.REASON: clip_reason(reason)}
        except (KeyError, ValueError, TypeError) as e:
            return self._err(ErrorCode.REJECTED, f"malformed request: {e}")
        return self._err(ErrorCode.NOT_SUPPORTED, f"{MESSAGES[f.action].name} is not served by this gateway")

    async def _command(self, body: dict[int, Any]) -> Answer:
        site = self.site
        raw = body[Key.FRAME]
        try:
            inner = _core.decode(raw)
        except _core.CoreError as e:
            return self._err(e.code, f"inner frame: {e.reason}")
        now = site.clock.now()
        sig, signer = body.get(Key.SIGNATURE), body.get(Key.SIGNER)
        if sig is not None or inner.action in SIGNED_ACTIONS:
            pub = self.signers.get(str(signer)) if signer is not None else None
            if sig is None or pub is None:
                name = MESSAGES[inner.action].name
                return self._err(ErrorCode.BAD_SIGNATURE, f"{name} must be signed by a known signer")
            try:
                ok = _core.ed25519_verify(pub, raw, sig)
            except _core.SignatureError as e:
                return self._err(ErrorCode.BAD_SIGNATURE, e.reason)
            if not ok:
                return self._err(ErrorCode.BAD_SIGNATURE, f"signature of {signer} does not verify")
        expiry = body.get(Key.EXPIRY)
        if expiry is not None and proto_ts(now) > expiry:
            return self._err(ErrorCode.EXPIRED, f"command expired {proto_ts(now) - expiry} s ago")
        targets: list[str] = list(body[Key.TARGETS])
        if inner.action == Action.UPDATE_FIRMWARE and inner.kind == Kind.REQUEST:
            site.firmware.manifest(inner.body)  # signed: the chunks the cache takes must add up to it
        timeout = MESSAGES[inner.action].timeout_ms / 1000
        if expiry is not None:
            timeout = min(timeout, max(0.0, expiry + 1 - proto_ts(now)))
        if not targets and inner.action == Action.INSTALL_CERTIFICATE:
            return Kind.RESPONSE, {Key.RESULTS: await self._local_csms_cert(inner, timeout)}
        if not targets and inner.action == Action.SEND_LOCAL_LIST:
            status, reason = await self._local_list(inner.body)
            return Kind.RESPONSE, {Key.RESULTS: [{Key.DEVICE_ID: "", Key.STATUS: status, Key.REASON: reason}]}
        if not targets and inner.action in FANNED_OUT and inner.kind == Kind.REQUEST:
            return Kind.RESPONSE, {Key.RESULTS: await site.sitewide.command(inner, timeout)}
        if not targets:
            status, reason = await self.site_command(inner)
            res: Result = {Key.DEVICE_ID: "", Key.STATUS: status}
            if reason:
                res[Key.REASON] = clip_reason(reason)
            return Kind.RESPONSE, {Key.RESULTS: [res]}
        if inner.kind in (Kind.RESPONSE, Kind.ERROR):
            return Kind.RESPONSE, {Key.RESULTS: [self.forwarder.answered(t, inner, now) for t in targets]}
        deliver = site.boards.deliver
        first = self.first_wave
        if inner.action == Action.UPDATE_FIRMWARE and 0 < first < len(targets):
            # M4 staged rollout: the first `first` targets get the update, the others once each
            # of those reported Installed or Activated. Persisted, so a restart resumes it; the
            # same Command sent again joins it. The expiry bounds the first wave's delivery,
            # the message's own timeout each later board's.
            later = MESSAGES[inner.action].timeout_ms / 1000
            results = await site.firmware.rollouts.run(raw, targets, first, timeout, self.wave_timeout_s, later,
                                                       deliver)  # fmt: skip
            return Kind.RESPONSE, {Key.RESULTS: results}
        a, b, p = inner.action, inner.body, inner.prio
        results = list(await asyncio.gather(*(deliver(t, a, b, p, timeout) for t in targets)))
        if a in (Action.DEREGISTER, Action.MIGRATE):
            await site.left_site(a, results)  # M11, M12: the site stops admitting them
        elif a == Action.CERTIFICATE_SIGNED:
            site.security.certificates_installed(b, results)  # M19: checked at their Hellos
        return Kind.RESPONSE, {Key.RESULTS: results}

    # ---------------------------------------------------------- the site itself

    async def site_command(self, inner: _core.Frame) -> tuple[int, str]:
        """A command addressed to the site (empty targets, or a bare request): status, reason."""
        site = self.site
        b = inner.body
        if inner.action == Action.TOKEN_LIST:
            entries = [(str(t[Key.TOKEN_UID]), int(t[Key.AUTH_STATUS]), t.get(Key.EXPIRY)) for t in b[Key.TOKENS]]
            await site.run_sync(
                lambda: site.auth.update_list(int(b[Key.LIST_VERSION]), b[Key.UPDATE_TYPE] == 0, entries)
            )
            return Status.ACCEPTED, ""
        if inner.action == Action.CLEAR_CACHE:
            site.auth.clear_cache()
            return Status.ACCEPTED, ""
        if inner.action == Action.DSO_LIMIT:
            status, reason = await site.power.dso_limit(b)
            return status, clip_reason(reason)
        if inner.action == Action.AVAILABLE_POWER:
            status, reason = await site.power.available_power(b)
            return status, clip_reason(reason)
        return Status.NOT_SUPPORTED, f"{MESSAGES[inner.action].name} is not a site command"

    async def _local_csms_cert(self, inner: _core.Frame, timeout: float) -> list[Result]:
        """M17, a site command: every online board is told to trust the gateway's own
        certificate as its local CSMS (InstallCertificate, cert_type local_csms). The command
        names no certificate of its own (`cert` empty) or exactly the gateway's."""
        site = self.site
        own = site.local_csms_cert
        b = inner.body
        res: Result = {Key.DEVICE_ID: ""}
        if int(b[Key.CERT_TYPE]) != CertType.LOCAL_CSMS:
            res.update(
                {Key.STATUS: Status.NOT_SUPPORTED, Key.REASON: "site-level InstallCertificate is local_csms only"}
            )
            return [res]
        if not own or len(own) > CERT_MAX:
            res.update(
                {Key.STATUS: Status.REJECTED, Key.REASON: f"no local CSMS certificate (of at most {CERT_MAX} bytes)"}
            )
            return [res]
        if b.get(Key.CERT) and bytes(b[Key.CERT]) != own:
            res.update({Key.STATUS: Status.REJECTED, Key.REASON: "cert is not this gateway's certificate"})
            return [res]
        body: dict[int, Any] = {Key.CERT_TYPE: int(CertType.LOCAL_CSMS), Key.CERT: own}
        boards = sorted(site.boards.online)
        deliver = site.boards.deliver
        results = list(await asyncio.gather(*(deliver(t, inner.action, body, inner.prio, timeout) for t in boards)))
        failed = [r[Key.DEVICE_ID] for r in results if r[Key.STATUS] != Status.ACCEPTED]
        res[Key.STATUS] = Status.REJECTED if failed else Status.ACCEPTED
        res[Key.REASON] = clip_reason(f"not accepted by {','.join(failed)}" if failed else f"{len(boards)} boards")
        return [res, *results]

    async def _local_list(self, b: dict[int, Any]) -> tuple[int, str]:
        """S2: the CSMS's local list for the site itself (the gateway's offline authorization);
        `entries` is plaintext upstream: a msgpack list of {id_token, auth_status, expiry?}."""
        # the blob came inside an upstream Command, bounded by its frame: that frame's budget
        raw = _core.unpack(b[Key.ENTRIES], MAX_UP_OBJECTS)
        entries = [(str(e[Key.ID_TOKEN]), int(e[Key.AUTH_STATUS]), e.get(Key.EXPIRY)) for e in raw]
        full = int(b[Key.UPDATE_TYPE]) == 0
        auth = self.site.auth
        await self.site.run_sync(lambda: auth.update_list(int(b[Key.LIST_VERSION]), full, entries))
        return Status.ACCEPTED, f"{len(entries)} tokens in the site's local list"
