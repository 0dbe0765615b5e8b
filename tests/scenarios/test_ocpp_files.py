"""OCPP 2.0.1 northbound (issue #17), files and certificates on the real site: real boards, the
real gateway, the `ocpp` library's CSMS with validation on, and an HTTP server of the test's as
the CSMS's file server. Proves, as OCPP use cases: L01 / M4 (UpdateFirmware of a signed image:
fetched by the gateway, its signer and signature checked against the site's firmware trust,
installed by the board; an untrusted signer, a tampered image and a missing file refused, each
as OCPP names it), N01 / M7 (GetLog: the board's log uploaded to `remoteLocation`,
LogStatusNotification Uploaded; a server that fails: UploadFailure; a file:// location:
Rejected), M01–M04 / M14 (InstallCertificate, GetInstalledCertificateIds, DeleteCertificate),
A02 / M16 (TriggerMessage SignChargingStationCertificate → the board's CSR in SignCertificate →
signed by the CSMS → CertificateSigned installed on the board)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ocpp.v201 import call
from ocpp_csms import OcppCsms
from ocpp_site import ocpp_scenario
from realsite import Invariants

from gateway.ocpp import certs
from tools.board.build import update_image
from tools.site.harness import Site, board_wait, until

pytestmark = pytest.mark.timeout(120)
DEV = "ev-0000"
IMAGE = b"not an image: never installed" * 64
"""The bytes of the refused updates (the board is never asked)."""


# ---------------------------------------------------------------- the CSMS's file server


class Files:
    """An HTTP server: GET serves `served`, PUT stores into `received` (status `put_status`)."""

    def __init__(self) -> None:
        self.served: dict[str, bytes] = {}
        self.received: dict[str, bytes] = {}
        self.put_status = 201
        files = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = files.served.get(self.path)
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if files.put_status < 300:
                    files.received[self.path] = body
                self.send_response(files.put_status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http() -> Iterator[Files]:
    f = Files()
    yield f
    f.close()


# ---------------------------------------------------------------- a PKI


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def make_cert(cn: str, key: ec.EllipticCurvePrivateKey, issuer: Issuer | None,
              public: ec.EllipticCurvePublicKey | None = None, serial: int = 0) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    subject = _name(cn)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(public or key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    return b.sign(issuer[1] if issuer else key, hashes.SHA256())


def pem(c: x509.Certificate) -> str:
    return c.public_bytes(serialization.Encoding.PEM).decode()


class Signer:
    """A firmware signing root and a signer it issued."""

    def __init__(self, name: str) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = make_cert(f"{name} root", self.root_key, None)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = make_cert(f"{name} firmware signer", self.key, (self.root, self.root_key))

    def sign(self, image: bytes) -> str:
        return base64.b64encode(self.key.sign(image, ec.ECDSA(hashes.SHA256()))).decode()


def trust(tmp: Path, s: Signer) -> dict[str, str]:
    """The site's firmware trust: the maker's root for OCPP's signature, and the operator's
    Ed25519 firmware key the boards trust from the factory (the site's: the native CSMS's signing
    key, made when the site starts, before the gateway) for the manifests the gateway signs."""
    p = tmp / "fw-roots.pem"
    p.write_text(pem(s.root))
    return {"firmware_ca": str(p), "firmware_signer_key": str(tmp / "csms" / "signing.key")}


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fw_statuses(csms: OcppCsms, rid: int) -> list[str]:
    return [str(p["status"]) for p in csms.of(DEV, "FirmwareStatusNotification") if p["requestId"] == rid]


def update(rid: int, url: str, s: Signer, image: bytes) -> call.UpdateFirmware:
    fw = {"location": url, "retrieve_date_time": now_iso(), "signing_certificate": pem(s.cert),
          "signature": s.sign(image)}  # fmt: skip
    return call.UpdateFirmware(request_id=rid, firmware=fw)


# ---------------------------------------------------------------- L01 / M4


def test_ocpp_m4_update_firmware_fetches_a_signed_image_and_the_board_runs_it(tmp_path: Path, http: Files) -> None:
    s = Signer("maker")

    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        image = await asyncio.to_thread(update_image, "9.1.0", b.march)  # the firmware, version 9.1.0
        http.served["/fw/evedge-9.1.0.bin"] = image
        m = b.mark()
        res = await csms.call(DEV, update(7, f"{http.url}/fw/evedge-9.1.0.bin", s, image))
        assert res.status == "Accepted", res
        await board_wait(b, "exit", since=m, timeout=60)  # downloaded from the gateway, verified, installed
        got = await until(lambda: "Installed" in fw_statuses(csms, 7) and fw_statuses(csms, 7), 15, "Installed")
        assert got[0] == "Downloading" and got.index("SignatureVerified") < got.index("Installing"), got
        boots = len(csms.of(DEV, "BootNotification"))
        b.start()
        await until(lambda: len(csms.of(DEV, "BootNotification")) > boots, 30, "the board boots again")
        boot = csms.of(DEV, "BootNotification")[-1]
        assert boot["chargingStation"]["firmwareVersion"] == "9.1.0", boot  # what it runs now
        assert boot["reason"] == "FirmwareUpdate", boot

    ocpp_scenario(tmp_path, fn, ocpp=trust(tmp_path, s))


def test_ocpp_m4_untrusted_signer_tampered_image_and_missing_file_are_refused(tmp_path: Path, http: Files) -> None:
    s, stranger = Signer("maker"), Signer("stranger")
    http.served["/fw/a-1.0.1.bin"] = IMAGE

    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        m = b.mark()
        # a signer the site does not trust: refused before anything is fetched (L01.FR.02)
        res = await csms.call(DEV, update(1, f"{http.url}/fw/a-1.0.1.bin", stranger, IMAGE))
        assert res.status == "InvalidCertificate", res
        ev = await until(lambda: csms.of(DEV, "SecurityEventNotification"), 10, "a security event")
        assert ev[-1]["type"] == "InvalidFirmwareSigningCertificate", ev
        # a trusted signer, but the image fetched is not the one signed (L01.FR.03)
        res = await csms.call(DEV, update(2, f"{http.url}/fw/a-1.0.1.bin", s, IMAGE + b"x"))
        assert res.status == "Accepted", res
        await until(lambda: "InvalidSignature" in fw_statuses(csms, 2), 15, "InvalidSignature")
        assert any(e["type"] == "InvalidFirmwareSignature" for e in csms.of(DEV, "SecurityEventNotification"))
        # nothing at the location
        res = await csms.call(DEV, update(3, f"{http.url}/fw/gone-1.0.1.bin", s, IMAGE))
        assert res.status == "Accepted", res
        await until(lambda: "DownloadFailed" in fw_statuses(csms, 3), 15, "DownloadFailed")
        # unsigned and non-HTTP locations: refused at once
        res = await csms.call(DEV, call.UpdateFirmware(request_id=4, firmware={
            "location": f"{http.url}/fw/a-1.0.1.bin", "retrieve_date_time": now_iso()}))  # fmt: skip
        assert res.status == "Rejected", res
        res = await csms.call(DEV, update(5, "file:///etc/passwd", s, IMAGE))
        assert res.status == "Rejected", res
        assert not [e for e in b.events[m:] if e["ev"] == "fw_status"] and b.alive()  # the board never asked
        assert not fw_statuses(csms, 1) and fw_statuses(csms, 2) == ["Downloading", "InvalidSignature"]

    ocpp_scenario(tmp_path, fn, ocpp=trust(tmp_path, s))


# ---------------------------------------------------------------- N01 / M7


def log_end(csms: OcppCsms, rid: int) -> list[str]:
    ends = ("Uploaded", "UploadFailure")
    return [p["status"] for p in csms.of(DEV, "LogStatusNotification") if p["requestId"] == rid and p["status"] in ends]


def test_ocpp_m7_get_log_uploads_the_boards_log_to_the_remote_location(tmp_path: Path, http: Files) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        b.cmd("card", token="LOG-ME")  # something in the board's log
        res = await csms.call(DEV, call.GetLog(log_type="DiagnosticsLog", request_id=31,
                                               log={"remote_location": f"{http.url}/logs/"}))  # fmt: skip
        assert res.status == "Accepted" and res.filename, res
        st = await until(lambda: log_end(csms, 31), 20, "the upload's end")
        assert st == ["Uploaded"], st
        assert csms.of(DEV, "LogStatusNotification")[0]["status"] == "Uploading"
        body = http.received[f"/logs/{res.filename}"]
        assert b"NetworkCtrlr online" in body, body[:200]  # the board's log lines
        # a server that refuses the file: UploadFailure, not Uploaded
        http.put_status = 500
        res = await csms.call(DEV, call.GetLog(log_type="SecurityLog", request_id=32,
                                               log={"remote_location": f"{http.url}/logs/x.log"}))  # fmt: skip
        assert res.status == "Accepted", res
        st = await until(lambda: log_end(csms, 32), 20, "the upload's end")
        assert st == ["UploadFailure"], st
        # a location that is not http(s): refused without the board
        res = await csms.call(DEV, call.GetLog(log_type="DiagnosticsLog", request_id=33,
                                               log={"remote_location": "file:///tmp/"}))  # fmt: skip
        assert res.status == "Rejected", res

    ocpp_scenario(tmp_path, fn)


# ---------------------------------------------------------------- M01–M04 / M14, A02 / M16


def test_ocpp_m14_install_list_and_delete_a_ca_certificate(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    root = make_cert("operator root", key, None, serial=0x1234ABCD)
    der = root.public_bytes(serialization.Encoding.DER)

    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        res = await csms.call(DEV, call.InstallCertificate(certificate_type="CSMSRootCertificate",
                                                           certificate=pem(root)))  # fmt: skip
        assert res.status == "Accepted", res
        res = await csms.call(DEV, call.GetInstalledCertificateIds(certificate_type=["CSMSRootCertificate"]))
        assert res.status == "Accepted", res
        (entry,) = res.certificate_hash_data_chain
        hd = entry["certificate_hash_data"]
        assert entry["certificate_type"] == "CSMSRootCertificate" and hd["serial_number"] == "1234abcd", entry
        assert hd == {k: v for k, v in zip(("hash_algorithm", "issuer_name_hash", "issuer_key_hash", "serial_number"),
                                           certs.hash_data(der).values(), strict=True)}  # fmt: skip
        res = await csms.call(DEV, call.GetInstalledCertificateIds(certificate_type=["V2GRootCertificate"]))
        assert res.status == "NotFound", res
        res = await csms.call(DEV, call.InstallCertificate(certificate_type="MORootCertificate", certificate="junk"))
        assert res.status == "Rejected", res
        res = await csms.call(DEV, call.DeleteCertificate(certificate_hash_data=hd))
        assert res.status == "Accepted", res
        res = await csms.call(DEV, call.GetInstalledCertificateIds())
        assert res.status == "NotFound", res  # gone from the board
        res = await csms.call(DEV, call.DeleteCertificate(certificate_hash_data=hd))
        assert res.status == "NotFound", res

    ocpp_scenario(tmp_path, fn)


def test_ocpp_m16_the_boards_csr_is_signed_by_the_csms_and_installed(tmp_path: Path) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = make_cert("csms ca", ca_key, None)

    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        m = b.mark()
        res = await csms.call(DEV, call.TriggerMessage(requested_message="SignChargingStationCertificate"))
        assert res.status == "Accepted", res
        (req,) = await until(lambda: csms.of(DEV, "SignCertificate"), 15, "SignCertificate at the CSMS")
        assert req["certificateType"] == "ChargingStationCertificate", req
        csr = x509.load_pem_x509_csr(req["csr"].encode())  # a real PKCS#10 from the secure element
        assert csr.is_signature_valid and csr.subject.rfc4514_string() == f"CN={DEV}"
        sent = await board_wait(b, "csr_sent", since=m)
        assert sent["ok"], sent
        cert = make_cert(DEV, ca_key, (ca, ca_key), public=csr.public_key())  # type: ignore[arg-type]
        res = await csms.call(DEV, call.CertificateSigned(certificate_chain=pem(cert) + pem(ca),
                                                          certificate_type="ChargingStationCertificate"))  # fmt: skip
        assert res.status == "Accepted", res
        got = await board_wait(b, "cs_cert_installed", since=m)
        assert not got["key_outside"], got  # the key stayed in the secure element
        # no CSR pending any more: another certificate is refused by the board
        res = await csms.call(DEV, call.CertificateSigned(certificate_chain=pem(cert)))
        assert res.status == "Rejected", res

    ocpp_scenario(tmp_path, fn)
