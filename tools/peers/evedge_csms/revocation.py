"""M19 at the CSMS: the TLS certificates it meets, and the revocation list it publishes.

Rule: a revocation bites everywhere at once. Each revocation (`Csms.revoke`, `revoke_site`,
`revoke_server_certificate`, a deregistration) makes a new CRL, signed by the CSMS's CA and
numbered one higher than the last (`crls`): written beside the CA certificate, where the
CSMS's own TLS server reads it at each handshake, and sent to every site (a RevocationList
request now, and in every SiteHello answer), whose gateway checks the CSMS's certificate and
its boards' certificates against it. Only certificates this CA issued can be listed; the
others (a root installed at boards) are revoked at the boards only.
"""

from __future__ import annotations

import time
from typing import Any

from cryptography import x509

from evedge_csms.pki import Ca, Revoked, cert_hash, der, reason_flag
from evedge_csms.store import Store

SITE, CSMS = "site", "csms"
"""`tls_certificates.role`: a site gateway's client certificate, the CSMS's server certificate."""


def record_tls(store: Store, cert: x509.Certificate, role: str, site_id: str | None, now: float) -> str:
    """Keeps a TLS certificate met (a site's at its handshake, the CSMS's own at start); its hash."""
    raw = der(cert)
    h = cert_hash(raw).hex()
    if store.get("tls_certificates", cert_hash=h) is None:
        store.upsert(
            "tls_certificates",
            {
                "cert_hash": h,
                "serial": format(cert.serial_number, "x"),
                "subject": cert.subject.rfc4514_string(),
                "role": role,
                "site_id": site_id,
                "der": raw,
                "seen": int(now),
                "revoked": 0,
            },
        )
    return h


def mark(store: Store, table: str, cert_hash_hex: str, reason: str | None, now: float) -> bool:
    """Marks one certificate revoked (False if it is not in `table`)."""
    if store.get(table, cert_hash=cert_hash_hex) is None:
        return False
    store.update(table, {"revoked": int(now), "revoke_reason": reason}, {"cert_hash": cert_hash_hex})
    return True


def revoked_entries(store: Store, ca: Ca) -> list[Revoked]:
    """Every revoked certificate this CA issued, as CRL entries."""
    out: list[Revoked] = []
    for table in ("certificates", "tls_certificates"):
        for row in store.select(table):
            if not row["revoked"] or not row["der"]:
                continue
            serial = ca.issued(bytes(row["der"]))
            if serial is not None:
                out.append(Revoked(serial, float(row["revoked"]), reason_flag(row["revoke_reason"])))
    return out


def publish(store: Store, ca: Ca | None, now: float | None = None) -> bytes | None:
    """A new CRL of every revocation in force (in the caller's transaction); its DER, None
    without a CA."""
    if ca is None:
        return None
    t = time.time() if now is None else now
    number = store.next_id("crl")
    crl = ca.publish(revoked_entries(store, ca), number, t)
    store.upsert("crls", {"number": number, "der": crl, "issued": int(t)})
    return crl


def current(store: Store) -> bytes | None:
    """The DER of the newest CRL published (None before the first revocation)."""
    last = store.get("counters", name="crl")
    row: dict[str, Any] | None = store.get("crls", number=last["value"]) if last is not None else None
    return bytes(row["der"]) if row is not None else None
