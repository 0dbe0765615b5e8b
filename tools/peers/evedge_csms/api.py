"""Operator operations of the CSMS: each writes its domain rows and queues its Commands in
one transaction (the running server sends them to the site's gateway; a site offline gets
them when it reconnects, unless they expired). Used by the admin CLI, the demo and tests."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from typing import Any

from evedge_csms import commands as cmds
from evedge_csms import locations, revocation
from evedge_csms.errors import CsmsError
from evedge_csms.inbound import Ctx, answer_ev_certificate, record_certificate
from evedge_csms.pki import der
from evedge_csms.store import Row
from evedge_csms.wire import proto_time
from gateway import schema
from gateway.schema import FIELDS, Action, CertType, Key, Registration, ResetWhen, UpdateType

TARGETS_MAX = FIELDS[Key.TARGETS].max_len
"""Boards one Command may address (the schema's bound)."""


RESERVATION_ENDED = frozenset({"used", "expired", "removed", "cancelled", "rejected"})
"""States of a reservation that the board no longer holds."""


_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def lan_address(address: str) -> tuple[str, int]:
    """M12: a site gateway's LAN address, `host:port` (a DNS name or IPv4 address, a port
    1–65535): what a board can connect to. A URL (`quic://…`, the CSMS's own address) is
    refused by name."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not _HOST.fullmatch(host):
        raise CsmsError(f"migrate: the address must be host:port of the new site's gateway, not {address!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise CsmsError(f"migrate: port {port!r} of {address!r} is not 1-65535")
    return host, int(port)


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
    def set_registration(self, site_id: str, device_id: str, registration: str, now: float | None = None) -> list[int]:
        """M13: the station's registration from now on. A station that has booted before is told
        at once: its site keeps the decision (the gateway answers with it while the uplink is
        down) and the board is asked to boot again (TriggerMessage), so that it obeys the new
        decision now. Accepted also registers a deregistered station again (M11): its site lets
        it onboard anew. Returns the ids of the Commands sent (none for a station never seen)."""
        if registration not in ("accepted", "pending", "rejected"):
            raise CsmsError(f"registration must be accepted, pending or rejected, not {registration!r}")
        t = self._now(now)
        with self.store.transaction():
            row = self.store.get("stations", site_id=site_id, device_id=device_id)
            values: dict[str, Any] = {"site_id": site_id, "device_id": device_id, "registration": registration}
            if registration == "accepted":
                values["deregistered"] = 0
            self.store.upsert("stations", values)
            if row is None or not row["first_seen"]:
                return []  # never booted: it learns the decision at its first BootNotification
            decision = {
                Key.REGISTRATION: int(Registration[registration.upper()]),
                Key.INTERVAL_S: self.ctx.settings.heartbeat_s,
                Key.TIME: proto_time(t),
            }
            sent = [self.send(site_id, cmds.answer(device_id, 0, Action.BOOT_NOTIFICATION, decision), t)]
            if not row["deregistered"]:  # a deregistered board has no link until it onboards again
                sent.append(self.send(site_id, cmds.trigger_message((device_id,), Action.BOOT_NOTIFICATION), t))
            return sent

    def register_device(self, site_id: str, device_id: str, now: float | None = None) -> list[int]:
        """M13: the operator registers a station before it is installed: accepted from now on,
        and the site is told at once (the decision, as a BootNotification answer the gateway
        keeps), so that its gateway lets the device onboard with its factory key
        (`[devices] onboarding = "registered"`, the default). Returns the Commands sent."""
        t = self._now(now)
        with self.store.transaction():
            row = self.store.get("stations", site_id=site_id, device_id=device_id)
            if row is not None and row["first_seen"]:
                return self.set_registration(site_id, device_id, "accepted", t)
            self.store.upsert(
                "stations",
                {"site_id": site_id, "device_id": device_id, "registration": "accepted", "deregistered": 0},
            )
            decision = {
                Key.REGISTRATION: int(Registration.ACCEPTED),
                Key.INTERVAL_S: self.ctx.settings.heartbeat_s,
                Key.TIME: proto_time(t),
            }
            return [self.send(site_id, cmds.answer(device_id, 0, Action.BOOT_NOTIFICATION, decision), t)]

    def deregister(self, site_id: str, device_id: str, reason: str | None = None, now: float | None = None) -> int:
        """M11: the station is removed: registration rejected, its certificates revoked, its
        data kept (law); the gateway is told to forget the board."""
        t = self._now(now)
        revoked = False
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
                    revoked = revoked or self._issued_here(cert["der"])
            sent = self.send(site_id, cmds.deregister((device_id,), reason), t)
            if revoked:
                self._publish_revocations(t)
            return sent

    def migrate(self, site_id: str, targets: Sequence[str], address: str, cert: bytes | None = None) -> int:
        """M12: move stations to another site of this CSMS: `address` is the LAN address
        (host:port) of that site's gateway, where the boards onboard anew with their factory
        keys; `cert` is that gateway's local-CSMS certificate (DER), the trust anchor the boards
        take along: they accept no other gateway there (M14/M17). Their data stays here, marked
        migrated."""
        lan_address(address)
        if not cert:
            raise CsmsError("unknown gateway: migrate needs its local CSMS certificate (the boards' trust anchor)")
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

    def set_site(
        self,
        site_id: str,
        *,
        name: str | None = None,
        address: str | None = None,
        city: str | None = None,
        postal_code: str | None = None,
        country: str | None = None,
        lat: float | None = None,
        lon: float | None = None,
        connector_standard: str | None = None,
        connector_format: str | None = None,
        power_type: str | None = None,
        capabilities: Sequence[str] | None = None,
    ) -> Row:
        """R1-2: the operator's record of a site, what the roaming partners see of it (its
        location): name, street address, city, postal code, country (ISO 3166-1 alpha-2),
        coordinates (WGS 84 degrees), its EVSEs' connector (standard, format, power type: one of
        `CONNECTOR_STANDARDS`, `CONNECTOR_FORMATS`, `POWER_TYPES`) and its `CAPABILITIES`.
        Fields not given keep their value; the record."""
        kind = locations.connector_kind(connector_standard, connector_format, power_type)
        place = {"name": name, "address": address, "city": city, "postal_code": postal_code, "country": country}
        row = locations.site_row(self.site_record(site_id), site_id, place, lat, lon, kind, capabilities)
        self.store.upsert("site_records", row)
        return row

    def site_record(self, site_id: str) -> Row | None:
        """R1-2: the operator's record of the site (`set_site`), None before one is set."""
        return self.store.get("site_records", site_id=site_id)

    def set_connector(
        self,
        site_id: str,
        device_id: str,
        evse: int = 1,
        *,
        connector_standard: str | None = None,
        connector_format: str | None = None,
        power_type: str | None = None,
        meter_key: bytes | None = None,
    ) -> Row:
        """R1-2: the kind of one EVSE's connector, over its site's (`set_site`): a site may mix
        AC wallboxes and a DC charger; R3-9: `meter_key`, the Ed25519 public key of its meter (32
        bytes, from the meter's label), with which the home CSP checks the seal of each signed
        reading; `meter_key=b""` clears it (a meter replaced by one that seals nothing: the
        location then states no key, the home CSP's books keep the change). Fields not given keep
        their value (or the site's); the record. A board the CSMS does not know, an EVSE number
        out of 1…255 or a key neither empty nor of 32 bytes: `CsmsError`, nothing recorded."""
        if self.store.get("stations", site_id=site_id, device_id=device_id) is None:
            raise CsmsError(f"set_connector: no station {device_id!r} at site {site_id!r}")
        if not 0 < evse < 256:
            raise CsmsError(f"set_connector: evse {evse}: not within 1 … 255")
        kind: dict[str, Any] = locations.connector_kind(connector_standard, connector_format, power_type)
        if meter_key is not None:
            kind["meter_key"] = locations.meter_key(meter_key) if meter_key else None
        row = dict(self.connector_record(site_id, device_id, evse) or
                   {"site_id": site_id, "device_id": device_id, "evse": evse})  # fmt: skip
        row.update(kind)
        self.store.upsert("evse_records", row)
        return row

    def connector_record(self, site_id: str, device_id: str, evse: int = 1) -> Row | None:
        """R1-2: the operator's record of an EVSE's connector (`set_connector`), None before one."""
        return self.store.get("evse_records", site_id=site_id, device_id=device_id, evse=evse)

    def send_local_list(self, site_id: str, list_version: int, targets: Sequence[str] = ()) -> int:
        tokens = self.store.select("tokens", order="id_token")
        return self.send(site_id, cmds.send_local_list(targets, list_version, tokens))

    def send_site_list(
        self, site_id: str, list_version: int, extra: Sequence[dict[str, Any]] = (), page: int = 256
    ) -> list[int]:
        """R4-2, S2: the site's own local list (the gateway's offline authorization) = the CSMS's
        tokens and `extra` ones (the roaming token lists its CSO endpoint holds: id_token,
        auth_status, expiry in protocol seconds), the CSMS's own entry winning for a token in
        both. Site-level SendLocalLists of at most `page` entries: the first full, the rest
        differential, one version. It replaces what `send_local_list` sent to the site."""
        own = self.store.select("tokens", order="id_token")
        mine = {str(t["id_token"]) for t in own}
        tokens = own + [t for t in extra if str(t["id_token"]) not in mine]
        chunks = [tokens[i : i + page] for i in range(0, len(tokens), page)] or [[]]
        kinds = [UpdateType.FULL] + [UpdateType.DIFFERENTIAL] * (len(chunks) - 1)
        last = len(chunks) - 1
        return [
            self.send(site_id, cmds.send_local_list((), list_version, chunk, kind, last=n == last))
            for n, (chunk, kind) in enumerate(zip(chunks, kinds, strict=True))
        ]

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
        """S1: the board is told to drop the reservation; refused here (nothing sent) when the
        board already ended it: used, expired, removed, cancelled or rejected."""
        row = self.store.get("reservations", reservation_id=reservation_id)
        if row is None:
            raise CsmsError(f"no reservation {reservation_id}")
        if row["status"] in RESERVATION_ENDED:
            raise CsmsError(f"reservation {reservation_id} is {row['status']}: nothing to cancel")
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

    def revoke(self, cert_hash_hex: str, reason: str | None = None, now: float | None = None) -> list[int]:
        """M19: a certificate is revoked: a board's (every board of every site is told, each
        station this CSMS knows there and has not deregistered; a board offline gets it when it
        comes back before the command expires) or a TLS certificate met by the CSMS (a site's,
        its own). Either way a new revocation list is published (`_publish_revocations`).
        `reason`: the operator's words (an RFC 5280 reason name, e.g. keyCompromise, is also
        the CRL's reason code). Returns the Commands sent."""
        t = self._now(now)
        with self.store.transaction():
            if revocation.mark(self.store, "tls_certificates", cert_hash_hex, reason, t):
                return self._publish_revocations(t)
            row = self.store.get("certificates", cert_hash=cert_hash_hex)
            if row is None:
                raise CsmsError(f"no certificate {cert_hash_hex}")
            revocation.mark(self.store, "certificates", cert_hash_hex, reason, t)
            sent = []
            for s in self.store.select("sites"):
                boards = [
                    r["device_id"]
                    for r in self.store.select("stations", {"site_id": s["site_id"]}, order="device_id")
                    if not r["deregistered"]
                ]
                for i in range(0, len(boards), TARGETS_MAX):
                    spec = cmds.revoke_certificate(bytes.fromhex(cert_hash_hex), reason, boards[i : i + TARGETS_MAX])
                    sent.append(self.send(s["site_id"], spec, t))
            return sent + (self._publish_revocations(t) if self._issued_here(row["der"]) else [])

    def _issued_here(self, cert_der: bytes | None) -> bool:
        """A certificate of this CSMS's CA (its CRL can name it; another CA's root cannot be)."""
        ca = self.ctx.ca
        return ca is not None and cert_der is not None and ca.issued(bytes(cert_der)) is not None

    def revoke_site(self, site_id: str, reason: str | None = None, now: float | None = None) -> list[int]:
        """M19: every TLS certificate the site's gateway presented is revoked: the CSMS refuses
        it at the handshake from now on (its open connection is closed), until the operator
        gives the site a new certificate."""
        t = self._now(now)
        with self.store.transaction():
            rows = self.store.select("tls_certificates", {"site_id": site_id, "role": revocation.SITE})
            if not rows:
                raise CsmsError(f"no TLS certificate of site {site_id!r} is known (it never connected)")
            for r in rows:
                revocation.mark(self.store, "tls_certificates", r["cert_hash"], reason, t)
            return self._publish_revocations(t)

    def revoke_server_certificate(self, reason: str | None = None, now: float | None = None) -> list[int]:
        """M19: the CSMS's own TLS certificate (the one it serves now, and any earlier one) is
        revoked: every site is told, and its gateway refuses a server presenting it (an
        impostor with a stolen key, or this CSMS until it gets a new certificate)."""
        t = self._now(now)
        with self.store.transaction():
            for r in self.store.select("tls_certificates", {"role": revocation.CSMS}):
                if not r["revoked"]:
                    revocation.mark(self.store, "tls_certificates", r["cert_hash"], reason, t)
            return self._publish_revocations(t)

    def _publish_revocations(self, t: float) -> list[int]:
        """A new CRL, written where the CSMS's TLS reads it and sent to every site (in the
        caller's transaction). Returns the RevocationList Commands."""
        crl = revocation.publish(self.store, self.ctx.ca, t)
        if crl is None:
            return []
        return [self.send(s["site_id"], cmds.revocation_list(crl), t) for s in self.store.select("sites")]

    def revocation_list(self) -> bytes | None:
        """The DER of the CRL in force (None before the first revocation)."""
        return revocation.current(self.store)

    def tls_certificates(self) -> list[Row]:
        """M19: the TLS certificates met: cert_hash, serial, subject, role (site/csms), site_id,
        seen, revoked (Unix s, 0: not revoked), revoke_reason."""
        return self.store.select("tls_certificates", order="seen")

    def security_events(self, site_id: str | None = None) -> list[Row]:
        """SecurityEvents received (the boards', and those the gateways report about their
        devices, e.g. a re-key attempt refused): site_id, device_id, event_name, time, reason."""
        return self.store.select("security_events", {"site_id": site_id} if site_id else None, order="time")

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

    def clear_display_message(self, site_id: str, targets: Sequence[str], display_id: int) -> int:
        """M6: the message goes from the site's list and from the boards' displays."""
        with self.store.transaction():
            self.store.delete("display_messages", {"site_id": site_id, "display_id": display_id})
            return self.send(site_id, cmds.clear_display_message(targets, display_id))

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

    def service_sessions(self) -> list[Row]:
        """Clause 6: the boards' service sessions (`state` active/ended, `stop_reason` why it
        ended, e.g. StopReason.TIMEOUT: no EV within the EV-connection timeout)."""
        return self.store.select("service_sessions", order="site_id, device_id, session_id")

    def sdrs(self) -> list[Row]:
        """One SDR per service session; `transactions` lists its transactions (the billing
        lines), `tx_id` is the first of them."""
        return self.store.select("sdrs", order="site_id, device_id, tx_id")

    def billed_transactions(self) -> list[Row]:
        """Every transaction line of every SDR: site_id, device_id, tx_id, sdr_id, tariff_id,
        cost, energy_wh … (a transaction billed once appears once)."""
        return [
            {**line, "site_id": s["site_id"], "device_id": s["device_id"], "sdr_id": s["sdr_id"]}
            for s in self.sdrs()
            for line in (s["transactions"] or [])
        ]

    def command(self, cmd_id: int) -> Row | None:
        return self.store.get("commands", cmd_id=cmd_id)

    # ---------------------------------------------------------------- E3, M1: what the sites report
    def forecasts(self, site_id: str | None = None, zone: int | None = None) -> list[Row]:
        """E3: the SiteForecasts received, oldest first: `site_id`, `zone` (None: the whole site),
        `at` (Unix s, when received), `forecast`: periods {start_s (s from `at`), limit_w (W the
        site will draw)}, the last one holding until the next forecast. A newer forecast of the
        same site and zone supersedes the older ones (`forecast`)."""
        where: dict[str, Any] = {} if site_id is None else {"site_id": site_id}
        rows = self.store.select("forecasts", where or None, order="forecast_id")
        return [{**r, "forecast": [named(p) for p in r["forecast"]]} for r in rows if r["zone"] == zone]

    def forecast(self, site_id: str, zone: int | None = None) -> Row | None:
        """E3: the site's (or zone's) forecast in force: the last one received, None before any."""
        rows = self.forecasts(site_id, zone)
        return rows[-1] if rows else None

    def boards(self, site_id: str) -> list[Row]:
        """M1: the site's last BoardsReport, one row per EVSE: evse_gid, evse_status
        (available/occupied/reserved/out_of_order/unknown), max_power_w (0: not known),
        device_id, evse, model, vendor, serial, fw_version, registration, and `at` (Unix s,
        when reported). [] before any report."""
        row = self.store.get("boards_reports", site_id=site_id)
        if row is None:
            return []
        return [{**named(e), "at": row["at"]} for e in row["evses"]]

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


def named(item: dict[str, Any]) -> dict[str, Any]:
    """A stored struct (keys are the schema's field numbers) by field names, enums by value names."""
    out: dict[str, Any] = {}
    for k, v in item.items():
        spec = FIELDS.get(int(k))
        if spec is None:
            continue
        enum = getattr(schema, spec.enum, None) if spec.enum else None
        out[spec.name] = enum(v).name.lower() if enum is not None and isinstance(v, int) else v
    return out
