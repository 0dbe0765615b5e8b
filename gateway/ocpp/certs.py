"""The certificate messages of OCPP 2.0.1 (A02, A03, M01–M06) as the boards' native ones
(firmware/csc/services/security.py), sans I/O.

Rule: OCPP names a certificate by its CertificateHashData (the hashes of its issuer's name and
key, and its serial number) and carries it in PEM; a board names it by the SHA-256 of its DER
and takes DER. The gateway converts, and keeps the certificates it installed through OCPP
(ocpp.sqlite) so that a board's hashes can be told to the CSMS as CertificateHashData and a
DeleteCertificate found on the board. A certificate installed through the native CSMS is not
listed to the OCPP CSMS (the board holds only its hash). The CA types are roots, self-signed:
a root's issuer key is its own key.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.ocpp.down import Result, ToBoard, Unfit, answer_body, reply, status_of
from gateway.ocpp.up import Payload
from gateway.schema import Action, CertType, Key, Status

INSTALL_TYPE = {"CSMSRootCertificate": CertType.CSMS_ROOT, "ManufacturerRootCertificate": CertType.MANUFACTURER_ROOT,
                "V2GRootCertificate": CertType.V2G_ROOT, "MORootCertificate": CertType.MO_ROOT}  # fmt: skip
"""InstallCertificate's and GetInstalledCertificateIds' types the boards hold."""
HASHES: dict[str, Callable[[bytes], Any]] = {"SHA256": hashlib.sha256, "SHA384": hashlib.sha384,
                                             "SHA512": hashlib.sha512}  # fmt: skip
MAX_DER = 2048
"""The boards' bound of one certificate (the schema's `cert`)."""


def _rejected(code: str, why: str) -> Payload:
    return {"status": "Rejected", "statusInfo": {"reasonCode": code, "additionalInfo": why}}


def der_of(pem: str) -> bytes:
    """The first certificate of a PEM text as DER; `Unfit` (Rejected) when there is none or it
    is over the boards' bound."""
    try:
        cert = x509.load_pem_x509_certificates(pem.encode())[0]
    except (ValueError, IndexError):
        raise Unfit(_rejected("InvalidCertificate", "not a PEM certificate")) from None
    der = cert.public_bytes(serialization.Encoding.DER)
    if len(der) > MAX_DER:
        raise Unfit(_rejected("TooLarge", f"{len(der)} bytes over {MAX_DER}"))
    return der


def _key_bits(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING's content (what OCPP's issuerKeyHash hashes)."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def hash_data(der: bytes, algorithm: str = "SHA256") -> Payload:
    """OCPP's CertificateHashData of a (self-signed) CA certificate."""
    cert = x509.load_der_x509_certificate(der)
    h = HASHES[algorithm]
    return {"hashAlgorithm": algorithm, "issuerNameHash": h(cert.issuer.public_bytes()).hexdigest(),
            "issuerKeyHash": h(_key_bits(cert)).hexdigest(), "serialNumber": f"{cert.serial_number:x}"}  # fmt: skip


def matches(der: bytes, want: Payload) -> bool:
    """Whether `der` is the certificate a CertificateHashData names (serial compared as a number)."""
    algo = str(want["hashAlgorithm"])
    if algo not in HASHES:
        return False
    have = hash_data(der, algo)
    try:
        serial_ok = int(str(want["serialNumber"]), 16) == int(have["serialNumber"], 16)
    except ValueError:
        return False
    return serial_ok and all(str(want[k]).lower() == have[k] for k in ("issuerNameHash", "issuerKeyHash"))


def install(p: Payload) -> tuple[ToBoard, bytes]:
    """InstallCertificate: the board's request and the DER it installs."""
    der = der_of(str(p["certificate"]))
    body: dict[int, Any] = {Key.CERT_TYPE: int(INSTALL_TYPE[str(p["certificateType"])]), Key.CERT: der}
    return ToBoard(Action.INSTALL_CERTIFICATE, body, lambda r: reply(r, ("Accepted", "Rejected", "Failed"))), der


def delete(sha256: bytes) -> ToBoard:
    def answer(res: Result) -> Payload:
        st = status_of(res)
        return {"status": "Accepted" if st == Status.ACCEPTED else "NotFound" if st == Status.UNKNOWN else "Failed"}

    return ToBoard(Action.DELETE_CERTIFICATE, {Key.CERT_HASH: sha256}, answer)


def installed() -> ToBoard:
    """GetInstalledCertificates of every type (the answer is filtered with what the ledger knows)."""
    return ToBoard(Action.GET_INSTALLED_CERTIFICATES, {}, lambda r: {})


def installed_ids(res: Result, known: dict[bytes, tuple[str, bytes]], types: list[str]) -> Payload:
    """GetInstalledCertificateIds' answer: the board's hashes the ledger knows (`known`: SHA-256
    → (OCPP type, DER)), of the types asked (all when none)."""
    if status_of(res) != Status.ACCEPTED:
        return reply(res, ("Accepted", "NotFound"))
    chain = []
    for h in answer_body(res).get(Key.CERT_HASHES) or ():
        kt = known.get(bytes(h))
        if kt is not None and (not types or kt[0] in types):
            chain.append({"certificateType": kt[0], "certificateHashData": hash_data(kt[1])})
    if not chain:
        return {"status": "NotFound"}
    return {"status": "Accepted", "certificateHashDataChain": chain}


def signed(p: Payload) -> ToBoard:
    """CertificateSigned: the station's own certificate (the chain's first), the boards hold no
    V2G certificate."""
    if p.get("certificateType", "ChargingStationCertificate") != "ChargingStationCertificate":
        raise Unfit({"status": "Rejected", "statusInfo": {"reasonCode": "NoV2GCertificate"}})
    body: dict[int, Any] = {Key.CERT: der_of(str(p["certificateChain"])), Key.CERT_TYPE: int(CertType.CHARGING_STATION)}
    return ToBoard(Action.CERTIFICATE_SIGNED, body, lambda r: reply(r, ("Accepted", "Rejected")))


def pem_csr(der: bytes) -> str:
    """A board's PKCS#10 request (DER, from its secure element) as OCPP's PEM text."""
    b64 = base64.b64encode(der).decode()
    lines = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{lines}\n-----END CERTIFICATE REQUEST-----\n"


ACTION_15118 = ("Install", "Update")
ISO15118_SCHEMA = "urn:iso:15118:2:2013:MsgDef"


def ev_certificate_request(body: dict[int, Any]) -> Payload:
    """A board's Get15118EVCertificate (the EV's EXI) as OCPP's."""
    act = body.get(Key.ACTION_15118, 0)
    return {"iso15118SchemaVersion": ISO15118_SCHEMA, "action": ACTION_15118[act if act in (0, 1) else 0],
            "exiRequest": base64.b64encode(bytes(body.get(Key.EXI, b""))).decode()}  # fmt: skip


def ev_certificate_answer(res: Payload) -> dict[int, Any]:
    """The CSMS's Get15118EVCertificate result as the board's answer (Rejected when it failed or
    its EXI is over the boards' bound)."""
    exi = base64.b64decode(str(res.get("exiResponse", "")))
    if res.get("status") != "Accepted" or not exi or len(exi) > 2048:
        return {Key.STATUS: int(Status.REJECTED)}  # the response has no reason
    return {Key.STATUS: int(Status.ACCEPTED), Key.EXI: exi}
