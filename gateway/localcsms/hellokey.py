"""The gateway's proof to its boards that it is their local CSMS (M14, M17).

A board's per-device HMAC key proves only that the gateway holds a copy of the device table.
The gateway also signs each Hello answer — both nonces and the device id, so a signature is
good for one handshake only — with the Ed25519 key of its local-CSMS certificate. A board that
was given that certificate (M17, InstallCertificate local_csms) reads the key out of it and
refuses a Hello answer that key did not sign (firmware/csc/link.py). Ed25519 because the board
verifies it in MicroPython (firmware/csc/ed25519.py); the certificate itself is issued by the
site's CA like the other development certificates (`issue`).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.protocol import devpki

DOMAIN = b"evedge hello answer\x00"
"""What the signed bytes start with: a Hello signature is good for nothing else."""


def hello_message(device_id: str, board_nonce: bytes, gateway_nonce: bytes) -> bytes:
    """The bytes a Hello answer's signature covers (the board builds the same)."""
    return DOMAIN + board_nonce + gateway_nonce + device_id.encode()


class HelloSigner:
    """Signs Hello answers with the local-CSMS certificate's Ed25519 key."""

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key
        self.public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        """The raw 32-byte public key: the anchor the boards hold."""

    def sign(self, device_id: str, board_nonce: bytes, gateway_nonce: bytes) -> bytes:
        return self._key.sign(hello_message(device_id, board_nonce, gateway_nonce))


def load(cert: Path | None) -> HelloSigner | None:
    """The signer of the local-CSMS certificate `cert`, whose key is beside it (`<name>.key`,
    as `issue` and gateway.protocol.devpki write them); None when the certificate is not an
    Ed25519 one or its key is not there (its boards then fall back to trust on first use)."""
    if cert is None:
        return None
    key_path = cert.with_suffix(".key")
    if not key_path.exists():
        return None
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return HelloSigner(key) if isinstance(key, ed25519.Ed25519PrivateKey) else None


def issue(folder: Path, cn: str, *, ca: tuple[Path, Path], days: int = 825) -> Path:
    """Issue (once) the gateway's local-CSMS certificate `folder/cn.pem` for a new Ed25519 key
    (`cn.key`, private), signed by the CA `ca` (certificate, key); returns the certificate's path."""
    cert_path, key_path = folder / f"{cn}.pem", folder / f"{cn}.key"
    if cert_path.exists() and key_path.exists():
        return cert_path
    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{ca[1]}: the CA key must be an EC key")
    key = ed25519.Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    devpki.write_private(key_path, pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path
