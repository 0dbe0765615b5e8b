"""Development PKI: a CA and leaf certificates for loopback deployments and tests.

An operator replaces these with certificates from the real PKI; the gateway, the CSMS and
the roaming endpoints only read PEM files, so nothing else changes. Keys are ECDSA P-256
(fast handshakes, small certificates).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=825)


@dataclass(frozen=True)
class Issued:
    """Paths of one issued identity (PEM)."""

    cert: Path
    key: Path
    ca: Path


def _name(cn: str, org: str = "evedge dev") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def write_private(path: Path, data: bytes) -> None:
    """Write a secret (a private key, a seed, a configuration holding one) readable by its
    owner only from the first byte: created 0600, never chmod'ed afterwards, and written
    under a temporary name then renamed, so that a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older tmp left by a crash keeps its mode otherwise
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def private_by_default() -> None:
    """Make every file this process creates from now on its owner's only (umask 077): the
    SQLite stores and their WAL and journal files (device keys, tokens, the CSMS's key pairs),
    keys, seeds, configurations. Each program that keeps secrets calls it first thing in its
    `main`; created private, never chmod'ed afterwards."""
    os.umask(0o077)


def private_dir(folder: Path) -> Path:
    """Make `folder` (and its parents) if absent; a folder made here is 0700."""
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    write_private(
        path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def ensure_ca(folder: Path, name: str = "ca", org: str = "evedge dev") -> tuple[Path, Path]:
    """Create `name.pem`/`name.key` in folder unless present; return their paths."""
    private_dir(folder)
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{org} CA", org))
        .issuer_name(_name(f"{org} CA", org))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .sign(key, hashes.SHA256())
    )
    _write_key(key, key_path)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def issue(
    folder: Path,
    cn: str,
    *,
    ca: tuple[Path, Path],
    server: bool = True,
    client: bool = True,
    subject: str | None = None,
) -> Issued:
    """Issue (once) a leaf certificate `folder/cn.pem` (key `cn.key`), valid for the name `cn`,
    localhost and the loopback addresses. `subject`: its common name when it is not `cn` (the
    CSMS knows a gateway by the common name: its site id)."""
    cert_path, key_path = folder / f"{cn}.pem", folder / f"{cn}.key"
    if cert_path.exists() and key_path.exists():
        return Issued(cert_path, key_path, ca[0])
    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{ca[1]}: the development CA key must be an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usages = [
        u for u, on in ((ExtendedKeyUsageOID.SERVER_AUTH, server), (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if on
    ]
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName(cn),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(subject or cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(key, key_path)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path, ca[0])
