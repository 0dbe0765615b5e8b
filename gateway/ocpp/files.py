"""Files over OCPP 2.0.1: a signed firmware image fetched from the CSMS's `location` for a
board (L01, UpdateFirmware), a board's log uploaded to the CSMS's `remoteLocation` (N01, GetLog).

Rule: the boards never speak HTTP; the gateway does, bounded in size and time
(`ocpp.transfer_max_bytes`, `ocpp.transfer_timeout_s`), and hands the boards only what their
native paths carry. Firmware: the signing certificate must chain to the site's firmware trust
(`ocpp.firmware_ca`, OCPP's ManufacturerRootCertificate) before anything is fetched, the
signature (RSA PKCS#1 v1.5 or ECDSA, SHA-256, over the image as fetched) is checked before the
image enters the site's firmware cache as a verified image (gateway/localcsms/fwcache.py), and
only then is the board told UpdateFirmware (size, SHA-256): it downloads the chunks from the
cache and reports each step (FirmwareStatus → FirmwareStatusNotification). Log: the board's
LogChunk events are gathered in order and the file is PUT once the board says it sent the
last; LogStatusNotification Uploaded is the gateway's, after the server's 2xx.

The checks are pure (`check_signer`, `check_signature`, `location`); `fetch` and `upload`
run urllib on a thread, under a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import hashlib
import itertools
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from gateway.config import ConfigError


class Refused(ValueError):
    """A file operation the gateway will not do; `status` is OCPP's name for why."""

    def __init__(self, status: str, why: str) -> None:
        super().__init__(f"{status}: {why}")
        self.status = status
        self.why = why


def location(url: str) -> str:
    """An http(s):// URL, else `Refused` (a file://, ftp:// or bare path is never opened)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused("Rejected", f"only http:// and https:// locations are served, not {url[:64]!r}")
    return url


def load_roots(path: Path) -> list[x509.Certificate]:
    """The firmware signers' roots (a PEM bundle)."""
    return x509.load_pem_x509_certificates(path.read_bytes())


def check_signer(pem: str, roots: list[x509.Certificate], now: datetime.datetime) -> x509.Certificate:
    """The signing certificate (PEM; intermediates may follow it, leaf first), valid at `now`
    and issued, through the chain given, by one of `roots`; `Refused("InvalidCertificate")`
    otherwise. Returns the leaf."""
    try:
        chain = x509.load_pem_x509_certificates(pem.encode())
    except ValueError as e:
        raise Refused("InvalidCertificate", f"signing certificate not readable: {e}") from None
    for c in chain:
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise Refused("InvalidCertificate", f"{c.subject.rfc4514_string()} not valid now")
    for child, parent in itertools.pairwise(chain):
        _issued(child, parent)
    top = chain[-1]
    for root in roots:
        if root.subject == top.issuer:
            try:
                _issued(top, root)
            except Refused:
                continue
            return chain[0]
    raise Refused("InvalidCertificate", f"{top.issuer.rfc4514_string()} is not a firmware signer this site trusts")


def _issued(child: x509.Certificate, parent: x509.Certificate) -> None:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise Refused("InvalidCertificate", f"{child.subject.rfc4514_string()}: {e or 'bad signature'}") from None


def check_signature(image: bytes, signature_b64: str, signer: x509.Certificate) -> None:
    """OCPP 2.0.1's firmware signature: base64 of the signer's SHA-256 signature over the image
    (RSA PKCS#1 v1.5 or ECDSA); `Refused("InvalidSignature")` when it does not verify."""
    try:
        sig = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        raise Refused("InvalidSignature", "signature is not base64") from None
    key = signer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, image, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, image, ec.ECDSA(hashes.SHA256()))
        else:
            raise Refused("InvalidSignature", f"signer key type {type(key).__name__} not supported")
    except InvalidSignature:
        raise Refused("InvalidSignature", "the image's signature does not verify") from None


def version_of(url: str) -> str:
    """The version the image is (the boards take only a dotted number newer than theirs and check
    that the new code runs it): OCPP's UpdateFirmware names none, so the last dotted number in
    the image's file name (`…/evedge-1.4.2.bin` → `1.4.2`); `Refused` when it has none."""
    name = PurePosixPath(urllib.parse.urlsplit(url).path).name
    found = re.findall(r"\d+(?:\.\d+)+", name)
    if not found:
        raise Refused("Rejected", f"the file name {name[:64]!r} names no version (e.g. evedge-1.4.2.bin)")
    return str(found[-1]).strip(".")[:32]


class ManifestSigner:
    """The gateway's Ed25519 key for the boards' loaders: it signs the manifest (canonical msgpack
    of [image id, version, size, SHA-256], firmware/csc/services/firmware_update.py) of an image
    whose OCPP signature it checked."""

    def __init__(self, path: Path) -> None:
        try:
            if path.stat().st_mode & 0o077:
                raise ConfigError(f"ocpp.firmware_signer_key: {path} is readable by others (chmod 600)")
            key = serialization.load_pem_private_key(path.read_bytes(), None)
        except (OSError, ValueError) as e:
            raise ConfigError(f"ocpp.firmware_signer_key: {path}: {e}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"ocpp.firmware_signer_key: {path} is not an Ed25519 private key")
        self.key = key
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.name = "csms-" + hashlib.sha256(pub).hexdigest()[:16]

    def sign(self, manifest: bytes) -> bytes:
        return self.key.sign(manifest)


# ---------------------------------------------------------------- HTTP, bounded


T = TypeVar("T")


class TransferFailed(Exception):
    """A download or upload that did not complete (reason in the message)."""


async def fetch(url: str, max_bytes: int, timeout_s: float, ctx: ssl.SSLContext | None) -> bytes:
    """GET `url`: its body, at most `max_bytes`, within `timeout_s`."""

    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=timeout_s, context=ctx) as r:  # the scheme checked by `location`
            data: bytes = r.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise TransferFailed(f"image over {max_bytes} bytes")
        return data

    return await _bounded(get, timeout_s)


async def upload(url: str, data: bytes, timeout_s: float, ctx: ssl.SSLContext | None) -> None:
    """PUT `data` at `url` (HTTP 2xx, within `timeout_s`)."""

    def put() -> None:
        req = urllib.request.Request(url, data=data, method="PUT",
                                     headers={"Content-Type": "text/plain; charset=utf-8"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=timeout_s, context=ctx) as r:  # the scheme checked by `location`
            r.read(4096)

    await _bounded(put, timeout_s)


async def _bounded(fn: Callable[[], T], timeout_s: float) -> T:
    try:
        async with asyncio.timeout(timeout_s):
            return await asyncio.to_thread(fn)
    except TimeoutError:
        raise TransferFailed(f"not done in {timeout_s:g} s") from None
    except urllib.error.HTTPError as e:
        raise TransferFailed(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise TransferFailed(f"{type(e).__name__}: {e}") from None


# ---------------------------------------------------------------- log uploads


@dataclass
class LogUpload:
    """One GetLog of the CSMS under way: the board's LogChunks gathered in order."""

    location: str
    filename: str
    data: bytearray = field(default_factory=bytearray)
    broken: str = ""
    """Why the file cannot be uploaded whole (a chunk missing, over the bound); empty: fine."""

    @property
    def url(self) -> str:
        """`remoteLocation` is the folder (OCPP: "the location … where the log should be stored"):
        the file name is appended to a location ending in "/"."""
        return self.location + self.filename if self.location.endswith("/") else self.location

    def chunk(self, offset: int, data: bytes, max_bytes: int) -> None:
        if self.broken:
            return
        if offset != len(self.data):
            self.broken = f"chunk at {offset}, {len(self.data)} expected (a gateway restart in the upload?)"
        elif len(self.data) + len(data) > max_bytes:
            self.broken = f"log over {max_bytes} bytes"
        else:
            self.data += data
