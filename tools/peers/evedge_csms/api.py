"""Operator operations of the CSMS: each writes its domain rows and queues its Commands in
one transaction (the running server sends them to the site's gateway; a site offline gets
them when it reconnects, unless they expired). Used by the admin CLI, the demo and tests."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

from evedge_csms import commands as cmds
from evedge_csms.inbound import Ctx, answer_ev_certificate, record_certificate
from evedge_csms.pki import der
from evedge_csms.store import Row
from gateway.schema import CertType, Key, ResetWhen


class CsmsError(ValueError):
    """An operation was refused; the message says why (nothing was changed)."""


class Csms:
    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.store = ctx.store

    def _now(self, now: float | None) -> float:
        return time.time() if now is None else now

    def send(self, site_id: str, spec: cmds.CommandSpec, now: float | None = None) -> int:
        """Queue any Command built by `evedge_csms.commands`."""
        return cmds.enqueue(self.store, site_id, spec, self._now(now), self.ctx.signer)

    # ---------------------------------------------------------------- M13, M11, M12
    def set_registration(self, site_id: str, device_id: str, registration: str) -> None:
        if registration not in ("accepted", "pending", "rejected"):
            raise CsmsError(f"registration must be accepted, pending or rejected, not {registration!r}")
        self.store.upsert("stations", {"site_id": site_id, "device_id": device_id, "registration": registration})

    def deregister(self, site_id: str, device_id: str, reason: str | None = None, now: float | None = None) -> int:
        """M11: the station is removed: registration rejected, its certificates revoked, its
        data kept (law); the gateway is told to forget the board."""
        t = self._now(now)
        with self.store.transaction():
            self.store.upsert(
                "stations", {"site_id": site_id, "device_id": device_id, "registration": "rejected", "deregistered": 1}
            )
            for cert in self.store.select("certificates", {"site_id": site_id, "device_id": device_id}):
                if not cert["revoked"]:
                    self.store.update(
                        "certificates",
                        {"revoked": int(t), "revoke_reason": "deregistered"},
                        {"cert_hash": cert["cert_hash"]},
                    )
            return self.send(site_id, cmds.deregister((device_id,), reason), t)

    def migrate(self, site_id: str, targets: Sequence[str], address: str, cert: bytes | None = None) -> int:
        """M12: move stations to another CSMS; their data stays here, marked migrated."""
        with self.store.transaction():
            for d in targets:
                self.store.upsert("stations", {"site_id": site_id, "device_id": d, "migrated_to": address})
            return self.send(site_id, cmds.migrate(targets, address, cert))

    # ---------------------------------------------------------------- M4
    def firmware_campaign(
        self,
        site_id: str,
        image: bytes,
        version: str,
        targets: Sequence[str],
        now: float | None = None,
        when: int = ResetWhen.IDLE,
    ) -> int:
        """M4: store the image, sign its manifest, tell the targets; returns the campaign id.
        Boards fetch the image by FirmwareChunk; their FirmwareStatus is tracked per device.
        `when`: install when idle (default) or now (a running session ends)."""
        if not targets:
            raise CsmsError("a firmware campaign needs at least one target device")
        t = self._now(now)
        with self.store.transaction():
            campaign = self.store.next_id("fw_campaign")
            image_id = campaign
            rel = f"firmware/{image_id}.bin"
            path = self.ctx.settings.data_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image)
            spec = cmds.update_firmware(targets, image, image_id, version, self.ctx.signer, when=when)
            self.store.insert(
                "fw_campaigns",
                {
                    "campaign_id": campaign,
                    "image_id": image_id,
                    "version": version,
                    "size": len(image),
                    "sha256": spec.body[Key.SHA256],
                    "signature": spec.body[Key.SIGNATURE],
                    "signer": self.ctx.signer.name,
                    "path": rel,
                    "site_id": site_id,
                    "targets": list(targets),
                    "created": int(t),
                },
            )
            for d in targets:
                self.store.upsert(
                    "fw_status",
                    {"site_id": site_id, "device_id": d, "image_id": image_id, "history": [[int(t), "announced"]]},
                )
            self.send(site_id, cmds.CommandSpec(**{**spec.__dict__, "ref": str(campaign)}), t)
            return campaign

    # ---------------------------------------------------------------- E4, E5
    def send_limit(
        self, site_id: str, limit_w: int, zone: int | None = None, deadline_ms: int = 5000, now: float | None = None
    ) -> int:
        """E5: a DSO limit for the site (or one zone), urgent."""
        return self.send(site_id, cmds.dso_limit(limit_w, deadline_ms, zone=zone), now)

    def available_power(self, site_id: str, available_w: int, zone: int | None = None) -> int:
        return self.send(site_id, cmds.available_power(available_w, zone))

    # ---------------------------------------------------------------- S1, S2, S5
    def add_token(
        self,
        id_token: str,
        auth_status: int = 0,
        expiry: int | None = None,
        tariff_id: int | None = None,
        token_type: int | None = None,
    ) -> None:
        self.store.upsert(
            "tokens",
            {
                "id_token": id_token,
                "auth_status": auth_status,
                "expiry": expiry,
                "tariff_id": tariff_id,
                "token_type": token_type,
            },
        )

    def send_local_list(self, site_id: str, list_version: int, targets: Sequence[str] = ()) -> int:
        tokens = self.store.select("tokens", order="id_token")
        return self.send(site_id, cmds.send_local_list(targets, list_version, tokens))

    def set_tariff(
        self,
        site_id: str,
        tariff_id: int,
        price_kwh: int,
        currency: str,
        *,
        price_min: int | None = None,
        price_session: int | None = None,
        text: str | None = None,
        targets: Sequence[str] = (),
    ) -> int:
        """S5 (and S4's basis): the tariff kept for SDR costs and sent, signed, to the site."""
        with self.store.transaction():
            self.store.upsert(
                "tariffs",
                {
                    "tariff_id": tariff_id,
                    "price_kwh": price_kwh,
                    "price_min": price_min,
                    "price_session": price_session,
                    "currency": currency,
                    "text": text,
                },
            )
            spec = cmds.set_tariff(
                targets, tariff_id, price_kwh, currency, price_min=price_min, price_session=price_session, text=text
            )
            return self.send(site_id, spec)

    def reserve(
        self,
        site_id: str,
        device_id: str,
        reservation_id: int,
        expiry: int,
        id_token: str,
        evse: int | None = None,
    ) -> int:
        with self.store.transaction():
            self.store.upsert(
                "reservations",
                {
                    "reservation_id": reservation_id,
                    "site_id": site_id,
                    "device_id": device_id,
                    "evse": evse,
                    "id_token": id_token,
                    "expiry": expiry,
                    "status": "requested",
                },
            )
            spec = cmds.reserve_now((device_id,), reservation_id, expiry, id_token, evse)
            return self.send(site_id, cmds.CommandSpec(**{**spec.__dict__, "ref": str(reservation_id)}))

    def cancel_reservation(self, reservation_id: int) -> int:
        row = self.store.get("reservations", reservation_id=reservation_id)
        if row is None:
            raise CsmsError(f"no reservation {reservation_id}")
        with self.store.transaction():
            self.store.update("reservations", {"status": "cancelled"}, {"reservation_id": reservation_id})
            return self.send(row["site_id"], cmds.cancel_reservation((row["device_id"],), reservation_id))

    # ---------------------------------------------------------------- M10
    def delete_personal_data(self, id_token: str, now: float | None = None) -> int:
        """M10: remove the token's data from this store and command every known site to do
        the same. Returns the privacy request id; counts per table are kept (not the token)."""
        t = self._now(now)
        with self.store.transaction():
            counts = {
                "tokens": self.store.delete("tokens", {"id_token": id_token}),
                "transactions": self.store.update("transactions", {"id_token": None}, {"id_token": id_token}),
                "sdrs": self.store.update("sdrs", {"id_token": None}, {"id_token": id_token}),
                "reservations": self.store.update("reservations", {"id_token": None}, {"id_token": id_token}),
            }
            request = self.store.next_id("privacy")
            self.store.insert(
                "privacy_requests",
                {
                    "request_id": request,
                    "token_digest": hashlib.sha256(id_token.encode()).hexdigest(),
                    "at": int(t),
                    "deleted": counts,
                },
            )
            for site in self.store.select("sites"):
                spec = cmds.delete_personal_data(id_token)
                self.send(site["site_id"], cmds.CommandSpec(**{**spec.__dict__, "ref": str(request)}), t)
            return request

    # ---------------------------------------------------------------- M14–M19
    def install_root(self, site_id: str, targets: Sequence[str], cert_der: bytes, cert_type: int) -> int:
        with self.store.transaction():
            record_certificate(self.store, cert_der, None, None, cert_type, time.time())
            return self.send(site_id, cmds.install_certificate(targets, cert_type, cert_der))

    def issue_with_key(self, site_id: str, device_id: str) -> int:
        """M18: key pair made here, delivered with its certificate (private_key is a secret
        field: the gateway encrypts it for the board)."""
        if self.ctx.ca is None:
            raise CsmsError("no CA configured")
        cert, key_der = self.ctx.ca.issue_with_key(device_id)
        with self.store.transaction():
            record_certificate(self.store, der(cert), site_id, device_id, CertType.CHARGING_STATION, time.time())
            spec = cmds.certificate_signed((device_id,), der(cert), CertType.CHARGING_STATION, private_key=key_der)
            return self.send(site_id, spec)

    def revoke(self, cert_hash_hex: str, reason: str | None = None) -> list[int]:
        """M19: mark revoked here and tell every site, so that no board accepts it any more."""
        row = self.store.get("certificates", cert_hash=cert_hash_hex)
        if row is None:
            raise CsmsError(f"no certificate {cert_hash_hex}")
        with self.store.transaction():
            self.store.update(
                "certificates", {"revoked": int(time.time()), "revoke_reason": reason}, {"cert_hash": cert_hash_hex}
            )
            spec = cmds.revoke_certificate(bytes.fromhex(cert_hash_hex), reason)
            return [self.send(s["site_id"], spec) for s in self.store.select("sites")]

    # ---------------------------------------------------------------- M3, M6, M9
    def set_monitors(self, site_id: str, device_id: str, monitors: Sequence[dict[Any, Any]]) -> int:
        with self.store.transaction():
            for m in monitors:
                self.store.upsert(
                    "monitors",
                    {"site_id": site_id, "device_id": device_id, "monitor_id": m[Key.MONITOR_ID], "spec": m},
                )
            return self.send(site_id, cmds.set_monitors((device_id,), monitors))

    def set_display_message(
        self, site_id: str, targets: Sequence[str], display_id: int, text: str, priority: int, **opt: Any
    ) -> int:
        with self.store.transaction():
            self.store.upsert(
                "display_messages",
                {
                    "site_id": site_id,
                    "display_id": display_id,
                    "text": text,
                    "display_priority": priority,
                    "language": opt.get("language"),
                    "valid_from": opt.get("valid_from"),
                    "valid_to": opt.get("valid_to"),
                    "evse": opt.get("evse"),
                },
            )
            return self.send(site_id, cmds.set_display_message(targets, display_id, text, priority, **opt))

    def set_fault_table(self, site_id: str, targets: Sequence[str], table: Sequence[tuple[int, int, str]]) -> int:
        with self.store.transaction():
            for code, severity, text in table:
                self.store.upsert("fault_table", {"fault_code": code, "severity": severity, "text": text})
            return self.send(site_id, cmds.set_fault_table(targets, table))

    # ---------------------------------------------------------------- queries
    def stations(self) -> list[Row]:
        return self.store.select("stations", order="site_id, device_id")

    def sessions(self) -> list[Row]:
        return self.store.select("transactions", order="site_id, device_id, tx_id")

    def sdrs(self) -> list[Row]:
        return self.store.select("sdrs", order="site_id, device_id, tx_id")

    def command(self, cmd_id: int) -> Row | None:
        return self.store.get("commands", cmd_id=cmd_id)

    # ---------------------------------------------------------------- S7 (contract certificates)
    def pending_ev_certificates(self) -> list[Row]:
        """Get15118EVCertificate requests waiting for the contract PKI (the home CSP)."""
        return self.store.select("ev_cert_requests", {"status": "pending"}, order="at")

    def answer_ev_certificate(
        self,
        site_id: str,
        device_id: str,
        msg_id: int,
        status: str,
        exi: bytes | None = None,
        reason: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Send the contract PKI's answer (`status` accepted/rejected, `exi` the DER chain) to the
        board; False if that request is unknown or was answered already."""
        return answer_ev_certificate(self.ctx, site_id, device_id, msg_id, status, exi, reason, self._now(now))
