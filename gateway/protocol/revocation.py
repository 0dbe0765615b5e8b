"""Certificate revocation (M19): the CSMS CA's revocation list (an X.509 CRL), as every TLS
handshake of the project and the gateway's board admission check it.

The CSMS signs a new CRL with its CA at each revocation and writes it beside the CA
certificate (`crl.pem`); its own TLS server reads that file, and every site gets it in the
SiteHello answer and in a RevocationList request, and keeps it in its data folder
(`crl.pem`). `Revocations` is one such file: read again whenever it changed on disk (a stat
per check), used only once its signature verified under one of the trusted CAs, and replaced
only by a newer list (a higher CRL number), so that nobody can roll revocations back by
offering an older list. An unusable file never silently lifts revocations in force: the last
good list stays.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.protocol import devpki

log = logging.getLogger("gateway.revocation")


class RevocationError(ValueError):
    """A revocation list that cannot be used; the message says why."""


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """A CRL from PEM or DER bytes (RevocationError if it is neither)."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as e:
        raise RevocationError(f"not an X.509 CRL: {e}") from None


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The list's CRL number (0 when it has none): a newer list has a higher one."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def read_cas(cafile: Path | str) -> list[x509.Certificate]:
    """The certificates of a PEM CA file (a bundle may hold several)."""
    return x509.load_pem_x509_certificates(Path(cafile).read_bytes())


def reason_of(entry: x509.RevokedCertificate) -> str:
    try:
        return str(entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value)
    except x509.ExtensionNotFound:
        return "unspecified"


class Revocations:
    """The revocation list in force, kept in the file `path`, trusted if signed by one of `cas`."""

    def __init__(self, path: Path | str, cas: Sequence[x509.Certificate]) -> None:
        self.path = Path(path)
        self.cas = list(cas)
        self._stamp: tuple[int, int] | None = None
        self._crl: x509.CertificateRevocationList | None = None

    @classmethod
    def for_cafile(cls, path: Path | str, cafile: Path | str) -> Revocations:
        return cls(path, read_cas(cafile))

    def verify(self, data: bytes) -> x509.CertificateRevocationList:
        """`data` as a CRL signed by one of the trusted CAs (RevocationError otherwise)."""
        crl = load_crl(data)
        for ca in self.cas:
            if ca.subject != crl.issuer:
                continue
            key = ca.public_key()
            if isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) and crl.is_signature_valid(key):
                return crl
        raise RevocationError(f"the CRL of {crl.issuer.rfc4514_string()} is not signed by a trusted CA")

    def current(self) -> x509.CertificateRevocationList | None:
        """The list in force (None: none yet), read again when the file changed."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return self._crl
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                crl = self.verify(self.path.read_bytes())
            except (OSError, RevocationError) as e:
                log.error("revocation list %s not used, the last good one stays: %s", self.path, e)
            else:
                if self._crl is None or crl_number(crl) >= crl_number(self._crl):
                    self._crl = crl
        return self._crl

    @property
    def number(self) -> int:
        crl = self.current()
        return -1 if crl is None else crl_number(crl)

    def der(self) -> bytes | None:
        crl = self.current()
        return None if crl is None else crl.public_bytes(serialization.Encoding.DER)

    def revoked(self, cert: x509.Certificate) -> str | None:
        """Why `cert` is revoked ("revoked: <reason>"), or None while it is not."""
        crl = self.current()
        if crl is None or crl.issuer != cert.issuer:
            return None
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        return None if entry is None else f"revoked ({reason_of(entry)})"

    def offer(self, data: bytes) -> bool:
        """Keeps `data` (a CRL from the CSMS) if it verifies and is newer than the list in
        force; True if it replaced it. RevocationError if it does not verify."""
        crl = self.verify(data)
        held = self.current()
        if held is not None and crl_number(crl) <= crl_number(held):
            return False
        devpki.private_dir(self.path.parent)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        tmp.replace(self.path)
        self._crl = crl
        st = self.path.stat()
        self._stamp = (st.st_mtime_ns, st.st_size)
        return True


def describe(cert: x509.Certificate) -> str:
    """How a certificate is named in refusals: its subject and serial."""
    return f"{cert.subject.rfc4514_string()} (serial {cert.serial_number:x})"
