"""The home CSP's contract-certificate PKI (S7, R3-3): an MO root CA and an MO sub-CA, made
at first start and kept as PEM files, that issue ISO 15118 contract certificates.

No EXI codec is part of this project, so the `exi` payloads of Get15118EVCertificate (83)
and ContractCertificate (216) follow this convention (docs/roaming.md):

- request (`install` / `update`): the DER PKCS#10 CSR of the EV's contract key pair,
  standing for the EXI CertificateInstallationReq / CertificateUpdateReq. The key must be EC
  P-256 (secp256r1, as ISO 15118-2 prescribes), the CSR's self-signature must verify; the
  subject CN is the contract id (eMAID, a `C` global id) when the request has no
  `contract_id` of its own.
- response: the DER certificate chain, leaf first — the contract certificate, then the MO
  sub-CA certificate — simply concatenated (each DER certificate delimits itself), standing
  for the EXI CertificateInstallationRes / CertificateUpdateRes. The MO root is the trust
  anchor the verifier holds (`ContractCa.root`), as in ISO 15118's ContractSignatureCertChain.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.protocol import devpki

ROOT_VALIDITY = dt.timedelta(days=40 * 365)
SUB_VALIDITY = dt.timedelta(days=4 * 365)
CONTRACT_VALIDITY = dt.timedelta(days=2 * 365)


class CsrError(ValueError):
    """A contract CSR that cannot be signed; the message is the `reason` sent back (≤ 120 bytes)."""


def _name(cn: str, org: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: an MO CA key must be an EC key")
    return key


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def split_chain(data: bytes) -> list[x509.Certificate]:
    """The certificates of a concatenated DER chain (the response `exi`), in order."""
    out: list[x509.Certificate] = []
    pos = 0
    while pos < len(data):
        if data[pos] != 0x30 or pos + 2 > len(data):
            raise ValueError(f"no DER SEQUENCE at byte {pos}")
        first = data[pos + 1]
        if first < 0x80:
            head, length = 2, first
        else:
            n = first & 0x7F
            head, length = 2 + n, int.from_bytes(data[pos + 2 : pos + 2 + n], "big")
        out.append(x509.load_der_x509_certificate(data[pos : pos + head + length]))
        pos += head + length
    return out


def csr_contract_id(csr_der: bytes) -> str | None:
    """The subject CN of a DER CSR (the contract id by convention), None if it has none or
    the bytes are no CSR."""
    try:
        csr = x509.load_der_x509_csr(csr_der)
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    return str(cns[0].value) if cns else None


def check_csr(csr_der: bytes) -> x509.CertificateSigningRequest:
    """Parse and check a contract CSR: DER PKCS#10, self-signature valid, EC P-256 key."""
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except ValueError:
        raise CsrError("exi is not a DER PKCS#10 CSR") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature):
        valid = False
    if not valid:
        raise CsrError("CSR signature does not verify")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise CsrError("CSR key must be EC P-256 (secp256r1), as ISO 15118-2 requires")
    return csr


def verify_chain(chain: list[x509.Certificate], root: x509.Certificate) -> None:
    """Check that each certificate is signed by the next and the last by `root`
    (signatures and issuer names); raises ValueError otherwise."""
    for cert, issuer in zip(chain, [*chain[1:], root], strict=True):
        if cert.issuer != issuer.subject:
            raise ValueError(f"{cert.subject.rfc4514_string()} is not issued by {issuer.subject.rfc4514_string()}")
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise ValueError(f"signature of {cert.subject.rfc4514_string()} does not verify: {exc}") from None


@dataclass(frozen=True)
class ContractCa:
    """MO root and sub-CA of one CSP (`party`), persisted in `folder`."""

    party: str
    root: x509.Certificate
    sub: x509.Certificate
    sub_key: ec.EllipticCurvePrivateKey

    @classmethod
    def load_or_create(cls, folder: Path, party: str) -> ContractCa:
        files = [folder / n for n in ("mo-root.pem", "mo-root.key", "mo-sub.pem", "mo-sub.key")]
        if all(f.exists() for f in files):
            root = x509.load_pem_x509_certificate(files[0].read_bytes())
            _load_key(files[1])
            sub = x509.load_pem_x509_certificate(files[2].read_bytes())
            return cls(party, root, sub, _load_key(files[3]))
        folder.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = _name(f"{party} MO Root CA", party)
        root = (
            x509.CertificateBuilder()
            .subject_name(root_name)
            .issuer_name(root_name)
            .public_key(root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256())
        )
        sub_key = ec.generate_private_key(ec.SECP256R1())
        sub = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{party} MO Sub-CA", party))
            .issuer_name(root_name)
            .public_key(sub_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + SUB_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(sub_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        for path, data in zip(
            files, (root.public_bytes(pem), _key_pem(root_key), sub.public_bytes(pem), _key_pem(sub_key)), strict=True
        ):
            if path.suffix == ".key":
                devpki.write_private(path, data)  # created 0600, renamed into place
            else:
                tmp = path.with_suffix(path.suffix + ".tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
        return cls(party, root, sub, sub_key)

    def issue(self, csr: x509.CertificateSigningRequest, contract_id: str, now: dt.datetime) -> list[bytes]:
        """The contract certificate for `contract_id` (subject CN = the contract id) over the
        CSR's key; returns the chain (leaf, sub-CA) as DER."""
        public = csr.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(contract_id, self.party))
            .issuer_name(self.sub.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + CONTRACT_VALIDITY, self.sub.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.sub_key.public_key()), critical=False
            )
            .sign(self.sub_key, hashes.SHA256())
        )
        return [der(leaf), der(self.sub)]


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(False, False, False, False, False, True, True, False, False)
