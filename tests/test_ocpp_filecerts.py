"""gateway/ocpp/files.py and certs.py sans I/O: the firmware signer's chain and the image's
signature checked as OCPP 2.0.1 defines them, locations and versions, a log gathered in order,
OCPP's CertificateHashData, and the certificate calls' payloads against the 2.0.1 schema."""

from __future__ import annotations

import asyncio
import base64
import datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from ocpp.messages import Call, CallResult, validate_payload

from gateway.ocpp import certs, down, files
from gateway.schema import Action, CertType, Key, Status

NOW = datetime.datetime.now(datetime.UTC)


def cert(cn: str, key: Any, issuer: tuple[x509.Certificate, Any] | None, serial: int = 77,
         days: int = 30) -> x509.Certificate:  # fmt: skip
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key()).serial_number(serial)
        .not_valid_before(NOW - datetime.timedelta(days=1)).not_valid_after(NOW + datetime.timedelta(days=days))
        .sign(issuer[1] if issuer else key, hashes.SHA256())
    )  # fmt: skip


def pem(*cs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in cs)


def test_the_signer_must_chain_to_a_trusted_root_and_be_valid_now() -> None:
    rk, ik, lk = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = cert("root", rk, None)
    inter = cert("intermediate", ik, (root, rk))
    leaf = cert("signer", lk, (inter, ik))
    assert files.check_signer(pem(leaf, inter), [root], NOW) == leaf
    with pytest.raises(files.Refused, match="InvalidCertificate"):
        files.check_signer(pem(leaf), [root], NOW)  # the intermediate missing
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(files.Refused, match="not a firmware signer"):
        files.check_signer(pem(cert("signer", lk, (cert("root", other, None), other))), [root], NOW)  # same name
    with pytest.raises(files.Refused, match="not valid now"):
        files.check_signer(pem(leaf, inter), [root], NOW + datetime.timedelta(days=90))
    with pytest.raises(files.Refused, match="not readable"):
        files.check_signer("junk", [root], NOW)


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_the_image_signature_is_sha256_over_the_image(kind: str) -> None:
    key: Any = ec.generate_private_key(ec.SECP256R1()) if kind == "ecdsa" else rsa.generate_private_key(65537, 2048)
    c = cert("signer", key, None)
    image = b"firmware" * 100
    sig = key.sign(image, ec.ECDSA(hashes.SHA256())) if kind == "ecdsa" else key.sign(image, *_pkcs1())
    files.check_signature(image, base64.b64encode(sig).decode(), c)
    with pytest.raises(files.Refused, match="InvalidSignature"):
        files.check_signature(image + b"!", base64.b64encode(sig).decode(), c)
    with pytest.raises(files.Refused, match="not base64"):
        files.check_signature(image, "%%%", c)


def _pkcs1() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.PKCS1v15(), hashes.SHA256()


def test_locations_and_versions() -> None:
    assert files.location("https://x.example/fw/a.bin") == "https://x.example/fw/a.bin"
    for bad in ("file:///etc/passwd", "ftp://x/a", "/tmp/a", "http:///nohost"):
        with pytest.raises(files.Refused):
            files.location(bad)
    assert files.version_of("https://x/fw/evedge-1.4.2.bin?sig=3") == "1.4.2"
    assert files.version_of("http://x/2.0.10/image-2.1.0.bin") == "2.1.0"
    with pytest.raises(files.Refused, match="names no version"):
        files.version_of("http://x/fw/latest.bin")


def test_a_log_is_gathered_in_order_and_bounded() -> None:
    up = files.LogUpload("http://x/logs/", "ev-1-3.log")
    assert up.url == "http://x/logs/ev-1-3.log"
    up.chunk(0, b"ab", 10)
    up.chunk(2, b"cd", 10)
    assert bytes(up.data) == b"abcd" and not up.broken
    up.chunk(9, b"x", 10)
    assert "expected" in up.broken
    big = files.LogUpload("http://x/l.txt", "f")
    big.chunk(0, b"x" * 11, 10)
    assert "over" in big.broken and big.url == "http://x/l.txt"


def result_valid(action: str, payload: dict[str, Any]) -> None:
    r = CallResult("1", payload)
    r.action = action
    asyncio.run(validate_payload(r, "2.0.1"))


def test_certificate_calls_become_board_requests_and_answers_pass_the_schema() -> None:
    k = ec.generate_private_key(ec.SECP256R1())
    root = cert("op root", k, None, serial=0x00AB)
    der = root.public_bytes(serialization.Encoding.DER)
    cmd, got = certs.install({"certificateType": "V2GRootCertificate", "certificate": pem(root)})
    assert cmd.action == Action.INSTALL_CERTIFICATE and got == der
    assert cmd.body == {Key.CERT_TYPE: CertType.V2G_ROOT, Key.CERT: der}
    with pytest.raises(down.Unfit):
        certs.install({"certificateType": "V2GRootCertificate", "certificate": "junk"})
    hd = certs.hash_data(der)
    assert hd["serialNumber"] == "ab" and certs.matches(der, {**hd, "serialNumber": "00AB"})
    assert not certs.matches(der, {**hd, "issuerKeyHash": "00" * 32})
    import hashlib

    h = hashlib.sha256(der).digest()
    res: dict[int, Any] = {Key.STATUS: Status.ACCEPTED}
    answer = certs.installed_ids(res, {h: ("V2GRootCertificate", der)}, [])
    assert answer == {"status": "NotFound"}  # the board's answer carried no hashes
    assert certs.delete(h).answer({Key.STATUS: Status.UNKNOWN}) == {"status": "NotFound"}
    chain = [{"certificateType": "V2GRootCertificate", "certificateHashData": hd}]
    result_valid("GetInstalledCertificateIds", {"status": "Accepted", "certificateHashDataChain": chain})
    with pytest.raises(down.Unfit):
        certs.signed({"certificateChain": pem(root), "certificateType": "V2GCertificate"})
    assert certs.signed({"certificateChain": pem(root)}).body[Key.CERT_TYPE] == CertType.CHARGING_STATION
    csr = x509.CertificateSigningRequestBuilder().subject_name(root.subject).sign(k, hashes.SHA256())
    text = certs.pem_csr(csr.public_bytes(serialization.Encoding.DER))
    assert x509.load_pem_x509_csr(text.encode()).subject == root.subject
    asyncio.run(validate_payload(Call("1", "SignCertificate", {"csr": text, "certificateType":
                                                               "ChargingStationCertificate"}), "2.0.1"))  # fmt: skip
    req = certs.ev_certificate_request({Key.EXI: b"\x80\x01", Key.ACTION_15118: 1})
    asyncio.run(validate_payload(Call("1", "Get15118EVCertificate", req), "2.0.1"))
    assert req["action"] == "Update"
    ok = certs.ev_certificate_answer({"status": "Accepted", "exiResponse": base64.b64encode(b"\x01").decode()})
    assert ok == {Key.STATUS: Status.ACCEPTED, Key.EXI: b"\x01"}
    assert certs.ev_certificate_answer({"status": "Failed", "exiResponse": ""})[Key.STATUS] == Status.REJECTED
