"""Keys and certificates of the CSMS: the Ed25519 signing key of commands and manifests,
CSR signing by the CSMS's CA (M16), key pairs made outside the station (M18), and the CA's
certificate revocation list (M19, `Ca.crl`, written beside the CA certificate as `crl.pem`)."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.protocol import devpki

CERT_VALIDITY = dt.timedelta(days=365)
CRL_VALIDITY = dt.timedelta(days=7)
"""A CRL's nextUpdate: the CSMS publishes a new one at each revocation, and at least this often
is the operator's (a verifier here keeps the newest one it got, whatever its age)."""
CRL_FILE = "crl.pem"


class PkiError(ValueError):
    """A CSR or certificate could not be used; the message says why."""


@dataclass(frozen=True)
class Signer:
    """An Ed25519 key and the name (`signer`, ≤ 32 bytes) under which its signatures travel."""

    key: ed25519.Ed25519PrivateKey

    @property
    def public(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def name(self) -> str:
        return "csms-" + hashlib.sha256(self.public).hexdigest()[:16]

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


def load_or_create_signer(path: Path) -> Signer:
    """The PEM Ed25519 key at `path` (made on first use; the raw public key goes beside it
    as `<name>.pub`, hex, for the gateways' configuration)."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise PkiError(f"{path}: the signing key must be an Ed25519 key")
        return Signer(key)
    devpki.private_dir(path.parent)
    key = ed25519.Ed25519PrivateKey.generate()
    devpki.write_private(
        path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    signer = Signer(key)
    path.with_suffix(".pub").write_text(signer.public.hex() + "\n")
    return signer


def cert_hash(der: bytes) -> bytes:
    """The hash by which certificates are named on the wire (`cert_hash`): SHA-256 of the DER."""
    return hashlib.sha256(der).digest()


@dataclass(frozen=True)
class Revoked:
    """One entry of the CRL: the certificate's serial, when and why it was revoked."""

    serial: int
    at: float
    reason: x509.ReasonFlags = x509.ReasonFlags.unspecified


REASONS = {r.value: r for r in x509.ReasonFlags}
"""CRL reason codes by their RFC 5280 names (keyCompromise, cessationOfOperation, …)."""


def reason_flag(reason: str | None) -> x509.ReasonFlags:
    """The CRL reason code of an operator's reason: one of RFC 5280's names, else unspecified
    (the operator's own words stay in the CSMS's tables)."""
    return REASONS.get(reason or "", x509.ReasonFlags.unspecified)


@dataclass(frozen=True)
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    crl_path: Path | None = None
    """Where the CA's current CRL is published (beside the CA certificate)."""

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> Ca:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{key_path}: the CA key must be an EC key")
        return cls(cert, key, cert_path.with_name(CRL_FILE))

    def issued(self, cert_der: bytes) -> int | None:
        """The serial of `cert_der` if this CA issued it (a CRL names only those), else None."""
        cert = x509.load_der_x509_certificate(cert_der)
        try:  # the name and the signature: two CAs may bear the same name
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return None
        return cert.serial_number

    def crl(self, revoked: list[Revoked], number: int, now: float) -> x509.CertificateRevocationList:
        """The CA's revocation list: `revoked`, numbered `number` (higher: newer)."""
        t = dt.datetime.fromtimestamp(now, dt.UTC)
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(t - dt.timedelta(minutes=5))
            .next_update(t + CRL_VALIDITY)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        for r in revoked:
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(r.serial)
                .revocation_date(dt.datetime.fromtimestamp(r.at, dt.UTC))
                .add_extension(x509.CRLReason(r.reason), critical=False)
                .build()
            )
            b = b.add_revoked_certificate(entry)
        return b.sign(self.key, hashes.SHA256())

    def publish(self, revoked: list[Revoked], number: int, now: float) -> bytes:
        """Signs the CRL, writes it (PEM) where the CSMS's TLS reads it; returns its DER."""
        crl = self.crl(revoked, number, now)
        if self.crl_path is not None:
            tmp = self.crl_path.with_name(f".{self.crl_path.name}.tmp")
            tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
            tmp.replace(self.crl_path)
        return crl.public_bytes(serialization.Encoding.DER)

    def _issue(self, subject: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CERT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def sign_csr(self, csr_der: bytes, expect_cn: str | None = None) -> x509.Certificate:
        """Sign a DER CSR after checking its self-signature and (when given) its CN."""
        try:
            csr = x509.load_der_x509_csr(csr_der)
        except ValueError as e:
            raise PkiError(f"CSR is not DER PKCS#10: {e}") from None
        if not csr.is_signature_valid:
            raise PkiError("CSR signature does not verify")
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise PkiError("CSR key must be an EC key")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if expect_cn is not None and (not cns or cns[0].value != expect_cn):
            raise PkiError(f"CSR common name must be the device id {expect_cn!r}")
        return self._issue(csr.subject, public)

    def issue_with_key(self, cn: str) -> tuple[x509.Certificate, bytes]:
        """A key pair made here (M18) and its certificate; the key as DER PKCS#8."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return self._issue(subject, key.public_key()), der


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)
