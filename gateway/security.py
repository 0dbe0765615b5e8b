"""The site's part of the device security lifecycle (M13 onboarding and re-keying, M19
revocation), between the device table, the revocation list and the uplink.

Rule: what the site refuses for security, it reports. A Hello refused because the device is
not registered for onboarding, because it asks to re-key an active device without the
operator's approval, or because its certificate is revoked (once the Hello's tag proved the
key) is counted here (/status, /metrics), logged as a security event, and sent upstream as a
SecurityEvent of that device: a durable frame of the site's own, stored in the outbox and
relayed like a board's, so that it reaches the CSMS after an uplink outage too.

The revocation list (`gateway.protocol.revocation.Revocations`, `data_dir/crl.pem`) comes
from the CSMS (the SiteHello answer, a RevocationList request); it is checked by the uplink's
TLS handshake (the CSMS's certificate), at each board's Hello (`Devices`), and when it
changes, against the boards online: a board whose certificate it names is disconnected.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from cryptography import x509

from gateway import _core
from gateway.devices import Devices
from gateway.link import proto_ts
from gateway.outbox import Row
from gateway.protocol.revocation import RevocationError, Revocations
from gateway.protocol.text import clip_reason
from gateway.schema import FIELDS, MESSAGES, Action, Key, Kind, Status

log = logging.getLogger("gateway.security")

EVENT_NAME_MAX = FIELDS[Key.EVENT_NAME].max_len


class Owed(Protocol):
    """Where the site's own frames go (gateway.service.Gateway is one)."""

    def owe(self, rows: list[Row]) -> None:
        """Stores `rows` in the outbox (seqs given) and relays them once committed."""

    def alloc_seq(self, n: int) -> int:
        """Reserves `n` outbox seqs; the first."""


class Disconnect(Protocol):
    def __call__(self, device_id: str, cause: str, reason: str) -> None: ...


class SiteSecurity:
    def __init__(self, devices: Devices, revocations: Revocations, owed: Owed, disconnect: Disconnect,
                 run_sync: Callable[[Callable[[], object]], object]) -> None:  # fmt: skip
        self.devices = devices
        self.revocations = revocations
        self.owed = owed
        self.disconnect = disconnect
        self.run_sync = run_sync
        self.events: dict[str, int] = {}
        """SecurityEvents reported, by name (/status, /metrics)."""
        self._next_id = 0

    # ------------------------------------------------------------ events

    def event(self, device_id: str, name: str, reason: str) -> None:
        """A security event about `device_id`: counted, logged, and sent upstream (durable)."""
        self.events[name] = self.events.get(name, 0) + 1
        log.warning("security event %s: %s", name, reason)
        now = time.time()
        # ids of the site's own frames: above any board's (a board counts up from 1), unique
        # across restarts (milliseconds, as the link's own request ids)
        self._next_id = max(self._next_id + 1, int(now * 1000) << 4)
        spec = MESSAGES[Action.SECURITY_EVENT]
        body = {Key.EVENT_NAME: name[:EVENT_NAME_MAX], Key.TIME: proto_ts(now), Key.REASON: clip_reason(reason)}
        prio = int(spec.priority)
        frame = _core.encode(Kind.EVENT, 0, self._next_id, prio, proto_ts(now), Action.SECURITY_EVENT, body, bytes(32))
        self.owed.owe([Row(self.owed.alloc_seq(1), device_id, self._next_id, prio, frame)])

    # ------------------------------------------------------------ revocations (M19)

    def offer_crl(self, crl: bytes) -> tuple[int, str]:
        """The CSMS's revocation list (SiteHello answer, RevocationList request): kept if it
        verifies and is newer; then the boards online whose certificate it names are
        disconnected. (status, reason) for the CSMS."""
        try:
            fresh = self.revocations.offer(crl)
        except RevocationError as e:
            log.error("revocation list refused: %s", e)
            return Status.REJECTED, str(e)
        if not fresh:
            return Status.ACCEPTED, f"CRL {self.revocations.number} already in force"
        log.info("revocation list %d in force", self.revocations.number)
        for d in self.devices.with_certificates():
            assert d.cert is not None
            why = self.revocations.revoked(x509.load_der_x509_certificate(d.cert))
            if why is not None:
                reason = f"device {d.device_id}: its certificate is {why}"
                self.disconnect(d.device_id, "revoked", reason)
                self.event(d.device_id, "CertificateRevoked", reason)
        return Status.ACCEPTED, f"CRL {self.revocations.number} in force"

    def certificates_installed(self, body: dict[int, Any], results: list[dict[int, Any]]) -> None:
        """A CertificateSigned was delivered: the boards that accepted it hold that certificate."""
        cert = body.get(Key.CERT)
        if not isinstance(cert, bytes):
            return
        for r in results:
            if r.get(Key.STATUS) == Status.ACCEPTED:
                self.run_sync(functools.partial(self.devices.set_certificate, str(r[Key.DEVICE_ID]), cert))

    def snapshot(self) -> dict[str, Any]:
        return {"events": dict(self.events), "crl_number": self.revocations.number}
