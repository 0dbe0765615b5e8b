"""CSMS side of the manage-CS use cases M1–M19, through a test gateway over real QUIC."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from csmsclient import Board, running_csms, site, until

from evedge_csms import commands as cmds
from evedge_csms.errors import CsmsError
from evedge_csms.pki import cert_hash
from gateway import _core
from gateway.protocol.upstream_wire import K_UP
from gateway.schema import (
    Action,
    CertType,
    FirmwareStatus,
    Key,
    Kind,
    LogStatus,
    MonitorType,
    Registration,
    ResetType,
    ResetWhen,
    Status,
)

pytestmark = pytest.mark.timeout(30)
BOOT = {Key.MODEL: "m", Key.VENDOR: "v", Key.SERIAL: "s", Key.FW_VERSION: "1.0"}


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 25))


def test_csms_m13_registration_accepted_pending_rejected(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms", registration="pending") as srv, site(srv) as gw:
            srv.api.set_registration("site-1", "b-ok", "accepted")
            srv.api.set_registration("site-1", "b-no", "rejected")
            got = {}
            for dev in ("b-ok", "b-new", "b-no"):
                await gw.relay_acked([Board(dev).frame(Action.BOOT_NOTIFICATION, BOOT)])
                _, env, inner = await gw.command()
                assert inner is not None and inner.kind == Kind.RESPONSE and inner.action == Action.BOOT_NOTIFICATION
                assert env.body[Key.TARGETS] == [dev] and inner.msg_id == 1  # the board's request id
                got[dev] = inner.body[Key.REGISTRATION]
            assert got == {"b-ok": Registration.ACCEPTED, "b-new": Registration.PENDING, "b-no": Registration.REJECTED}
            rows = {r["device_id"]: r for r in srv.api.stations()}
            assert rows["b-new"]["registration"] == "pending" and rows["b-new"]["model"] == "m"

    run(main())


def test_csms_m1_m2_variables_report_and_set(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            b = Board("b1")
            srv.api.send("site-1", cmds.get_base_report(["b1"], 5))
            sid, env, inner = await gw.command()
            assert inner is not None and inner.action == Action.GET_BASE_REPORT and inner.body[Key.REQUEST_ID] == 5
            gw.accept_all(sid, env)
            v = [cmds.var("EVSE", "MaxPower", "11000", evse=1), cmds.var("Meter", "Model", "X1")]
            report = {Key.REQUEST_ID: 5, Key.SEQ_NO: 0, Key.VARS: v, Key.LAST: True}
            await gw.relay_acked([b.frame(Action.NOTIFY_REPORT, report)])
            assert len(srv.store.select("variables", {"device_id": "b1"})) == 2
            cmd = srv.api.send("site-1", cmds.set_variables(["b1"], [cmds.var("EVSE", "MaxPower", "7400", evse=1)]))
            sid, env, inner = await gw.command()
            answer = {Key.VARS: [{**cmds.var("EVSE", "MaxPower", "7400", evse=1), Key.STATUS: Status.ACCEPTED}]}
            response = b.frame(Action.SET_VARIABLES, answer, kind=Kind.RESPONSE, msg_id=inner.msg_id)[Key.FRAME]  # type: ignore[union-attr]
            gw.accept_all(sid, env, {"b1": response})
            await until(lambda: srv.api.command(cmd)["state"] == "done")
            row = srv.store.get(
                "variables",
                site_id="site-1",
                device_id="b1",
                component="EVSE",
                variable="MaxPower",
                instance="",
                evse=1,
                attr=0,
            )
            assert row is not None and row["val"] == "7400" and row["status"] == Status.ACCEPTED

    run(main())


def test_csms_m3_monitors_and_monitor_events(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            srv.api.set_monitors("site-1", "b1", [cmds.monitor(3, "Temp", "Body", MonitorType.UPPER, 70.0, 2)])
            _, _, inner = await gw.command()
            assert inner is not None and inner.body[Key.MONITORS][0][Key.THRESHOLD] == 70.0
            ev = {
                Key.MONITOR_ID: 3,
                Key.COMPONENT: "Temp",
                Key.VARIABLE: "Body",
                Key.VAL: "71.5",
                Key.SEVERITY: 2,
                Key.TIME: 9,
            }
            await gw.relay_acked([Board("b1").frame(Action.MONITOR_EVENT, ev)])
            (row,) = srv.store.select("monitor_events")
            assert row["val"] == "71.5" and row["monitor_id"] == 3

    run(main())


def test_csms_m4_firmware_campaign_signed_manifest_and_status(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            image = bytes(range(256)) * 10  # 2560 bytes: three chunks
            campaign = srv.api.firmware_campaign("site-1", image, "2.0.0", ["b1", "b2"])
            sid, env, inner = await gw.command()
            assert (
                inner is not None and inner.action == Action.UPDATE_FIRMWARE and env.body[Key.TARGETS] == ["b1", "b2"]
            )
            pub = srv.ctx.signer.public
            assert _core.ed25519_verify(pub, env.body[Key.FRAME], env.body[Key.SIGNATURE])
            assert env.body[Key.SIGNER] == srv.ctx.signer.name
            m = inner.body
            manifest = _core.pack([m[Key.IMAGE_ID], m[Key.VERSION], m[Key.SIZE], m[Key.SHA256]])
            assert _core.ed25519_verify(pub, manifest, m[Key.SIGNATURE])
            assert not _core.ed25519_verify(pub, manifest + b"x", m[Key.SIGNATURE])
            gw.accept_all(sid, env)
            b = Board("b1")
            got, offset = b"", 0
            while True:
                req = {Key.IMAGE_ID: m[Key.IMAGE_ID], Key.OFFSET: offset}
                await gw.relay_acked([b.frame(Action.FIRMWARE_CHUNK, req)])
                _, _, chunk = await gw.command()
                assert chunk is not None and chunk.kind == Kind.RESPONSE
                got += chunk.body[Key.DATA]
                offset += len(chunk.body[Key.DATA])
                if chunk.body[Key.LAST]:
                    break
            assert got == image
            for st in (
                FirmwareStatus.DOWNLOADED,
                FirmwareStatus.VERIFIED,
                FirmwareStatus.INSTALLED,
                FirmwareStatus.ACTIVATED,
            ):
                body = {Key.IMAGE_ID: m[Key.IMAGE_ID], Key.FW_STATUS: st, Key.VERSION: "2.0.0"}
                await gw.relay_acked([b.frame(Action.FIRMWARE_STATUS, body)])
            row = srv.store.get("fw_status", site_id="site-1", device_id="b1", image_id=m[Key.IMAGE_ID])
            assert row is not None and row["fw_status"] == FirmwareStatus.ACTIVATED
            assert [h[1] for h in row["history"]][-4:] == [2, 5, 9, 11]
            assert srv.store.get("fw_campaigns", campaign_id=campaign) is not None

    run(main())


def test_csms_m5_m6_m7_reset_display_log_criteria(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            srv.api.send("site-1", cmds.reset(["b1"], ResetType.HARD, ResetWhen.NOW))
            _, _, inner = await gw.command()
            assert inner is not None and inner.body == {Key.RESET_TYPE: 1, Key.WHEN: 1}
            srv.api.set_display_message("site-1", ["b1"], 4, "Hallo", 0, language="de")
            _, _, inner = await gw.command()
            assert inner is not None and inner.body[Key.TEXT] == "Hallo" and inner.body[Key.LANGUAGE] == "de"
            assert srv.store.get("display_messages", site_id="site-1", display_id=4) is not None
            srv.api.send("site-1", cmds.set_log_criteria(["b1"], 7, 1, ["Link"]))
            _, _, inner = await gw.command()
            assert inner is not None and inner.body[Key.COMPONENTS] == ["Link"]
            await gw.relay_acked(
                [Board("b1").frame(Action.SECURITY_EVENT, {Key.EVENT_NAME: "TamperOpen", Key.TIME: 3})]
            )
            assert srv.store.select("security_events")[0]["event_name"] == "TamperOpen"

    run(main())


def test_csms_m8_log_chunks_reassembled(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            srv.api.send("site-1", cmds.get_log(["b1"], 11))
            await gw.command()
            b = Board("b1")
            data = b"log line\n" * 300
            chunks = [data[i : i + 1024] for i in range(0, len(data), 1024)]
            frames = [
                b.frame(
                    Action.LOG_CHUNK,
                    {Key.REQUEST_ID: 11, Key.OFFSET: i * 1024, Key.DATA: c, Key.LAST: i == len(chunks) - 1},
                )
                for i, c in enumerate(chunks)
            ]
            await gw.relay_acked(frames[::-1][:1])  # the last one first
            row = srv.store.get("logs", site_id="site-1", device_id="b1", request_id=11)
            assert row is not None and not row["complete"]
            await gw.relay_acked(frames)
            await gw.relay_acked([b.frame(Action.LOG_STATUS, {Key.REQUEST_ID: 11, Key.LOG_STATUS: LogStatus.UPLOADED})])
            row = srv.store.get("logs", site_id="site-1", device_id="b1", request_id=11)
            assert row is not None and row["complete"] == 1 and row["data"] == data
            assert row["log_status"] == LogStatus.UPLOADED

    run(main())


def test_csms_m9_fault_table_and_fault_reports(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            srv.api.set_fault_table("site-1", ["b1"], [(101, 8, "RCD tripped")])
            _, _, inner = await gw.command()
            assert inner is not None and inner.body[Key.FAULT_TABLE][0][Key.TEXT] == "RCD tripped"
            fr = {Key.FAULT_CODE: 101, Key.ACTIVE: True, Key.TIME: 77, Key.EVSE: 1}
            await gw.relay_acked([Board("b1").frame(Action.FAULT_REPORT, fr)])
            (row,) = srv.store.select("fault_reports")
            assert row["fault_code"] == 101 and row["active"] == 1

    run(main())


def test_csms_m11_m12_deregister_and_migrate(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            b = Board("b1")
            await gw.relay_acked([b.frame(Action.BOOT_NOTIFICATION, BOOT)])
            await gw.command()
            srv.api.issue_with_key("site-1", "b1")
            await gw.command()
            srv.api.deregister("site-1", "b1", "removed")
            _, _, inner = await gw.command()
            assert inner is not None and inner.action == Action.DEREGISTER
            (cert,) = srv.store.select("certificates", {"device_id": "b1"})
            assert cert["revoked"] and cert["revoke_reason"] == "deregistered"
            _, env, _ = await gw.command()  # M19: its certificate is in the CA's new revocation list
            assert env.action == Action.REVOCATION_LIST and env.body[Key.CRL]
            await gw.relay_acked([b.frame(Action.BOOT_NOTIFICATION, BOOT)])
            _, _, inner = await gw.command()
            assert inner is not None and inner.body[Key.REGISTRATION] == Registration.REJECTED
            assert srv.store.select("stations")[0]["model"] == "m"  # data kept
            with pytest.raises(CsmsError, match="host:port"):  # a URL is no address a board can use
                srv.api.migrate("site-1", ["b2"], "quic://other-csms:4433")
            srv.api.migrate("site-1", ["b2"], "gw-2.site.example:7700", cert=b"\x30\x00")
            _, _, inner = await gw.command()
            assert inner is not None and inner.body[Key.ADDRESS] == "gw-2.site.example:7700"
            assert (
                srv.store.get("stations", site_id="site-1", device_id="b2")["migrated_to"] == "gw-2.site.example:7700"
            )

    run(main())


def _csr(cn: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def test_csms_m16_csr_signed_by_the_csms_ca(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            b = Board("b1")
            req = {Key.CSR: _csr("b1"), Key.CERT_TYPE: CertType.CHARGING_STATION}
            await gw.relay_acked([b.frame(Action.SIGN_CERTIFICATE, req)])
            _, _, ans = await gw.command()
            assert ans is not None and ans.kind == Kind.RESPONSE and ans.body[Key.STATUS] == Status.ACCEPTED
            _, env, signed = await gw.command()
            assert signed is not None and signed.action == Action.CERTIFICATE_SIGNED
            assert _core.ed25519_verify(srv.ctx.signer.public, env.body[Key.FRAME], env.body[Key.SIGNATURE])
            cert = x509.load_der_x509_certificate(signed.body[Key.CERT])
            ca = x509.load_pem_x509_certificate(srv.config.ca.read_bytes())
            cert.verify_directly_issued_by(ca)
            assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "b1"
            assert srv.store.get("certificates", cert_hash=cert_hash(signed.body[Key.CERT]).hex()) is not None
            # a CSR for another identity is refused
            await gw.relay_acked([b.frame(Action.SIGN_CERTIFICATE, {**req, Key.CSR: _csr("b9")})])
            _, _, ans = await gw.command()
            assert ans is not None and ans.body[Key.STATUS] == Status.REJECTED
            assert len(srv.store.select("certificates")) == 1

    run(main())


def test_csms_m14_m15_m17_m18_m19_certificates(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            ca_der = x509.load_pem_x509_certificate(srv.config.ca.read_bytes()).public_bytes(serialization.Encoding.DER)
            srv.api.install_root("site-1", ["b1"], ca_der, CertType.CSMS_ROOT)
            _, env, inner = await gw.command()
            assert inner is not None and inner.body[Key.CERT] == ca_der
            assert _core.ed25519_verify(srv.ctx.signer.public, env.body[Key.FRAME], env.body[Key.SIGNATURE])
            srv.api.install_root("site-1", [], ca_der, CertType.LOCAL_CSMS)  # M17: the site's local CSMS
            _, env, inner = await gw.command()
            assert (
                env.body[Key.TARGETS] == [] and inner is not None and inner.body[Key.CERT_TYPE] == CertType.LOCAL_CSMS
            )
            h = cert_hash(ca_der)
            srv.api.send("site-1", cmds.delete_certificate(["b1"], h))
            srv.api.send("site-1", cmds.get_installed_certificates(["b1"]))
            srv.api.send("site-1", cmds.ocsp_response(["b1"], h, b"\x30\x03ocsp"))
            actions = [(await gw.command())[2].action for _ in range(3)]  # type: ignore[union-attr]
            assert actions == [Action.DELETE_CERTIFICATE, Action.GET_INSTALLED_CERTIFICATES, Action.OCSP_RESPONSE]
            srv.api.issue_with_key("site-1", "b1")  # M18
            _, env, inner = await gw.command()
            assert inner is not None and len(inner.body[Key.PRIVATE_KEY]) > 100
            key = serialization.load_der_private_key(inner.body[Key.PRIVATE_KEY], None)
            cert = x509.load_der_x509_certificate(inner.body[Key.CERT])
            assert cert.public_key() == key.public_key()
            issued = cert_hash(inner.body[Key.CERT]).hex()
            await gw.relay_acked([Board("b1").frame(Action.BOOT_NOTIFICATION, BOOT)])  # a station of the site
            await gw.command()
            # M19: to every board of every site, and the CA's new revocation list to every site
            cmd, crl_cmd = srv.api.revoke(issued, "key compromise")
            assert srv.api.command(crl_cmd)["name"] == "RevocationList"
            _, env, inner = await gw.command()
            assert inner is not None and inner.body[Key.CERT_HASH].hex() == issued
            assert env.body[Key.TARGETS] == ["b1"]  # (a site-wide RevokeCertificate is no site command)
            assert srv.store.get("certificates", cert_hash=issued)["revoked"]
            gw.accept_all(_, env)
            await until(lambda: srv.api.command(cmd)["state"] == "done")

    run(main())


def test_csms_m10_delete_personal_data(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            srv.api.add_token("04AABBCC", 0)
            b = Board("b1")
            body = {Key.EVENT: 0, Key.TX_ID: 1, Key.SEQ_NO: 0, Key.TRIGGER: 0, Key.EVSE: 1, Key.ID_TOKEN: "04AABBCC"}
            await gw.relay_acked([b.frame(Action.TRANSACTION_EVENT, body)])
            assert srv.store.select("transactions")[0]["id_token"] == "04AABBCC"
            req = srv.api.delete_personal_data("04AABBCC")
            sid, env, inner = await gw.command()
            assert inner is not None and inner.action == Action.DELETE_PERSONAL_DATA
            assert inner.body[Key.ID_TOKEN] == b"04AABBCC"  # plaintext: the gateway encrypts per board
            assert srv.store.select("tokens") == [] and srv.store.select("transactions")[0]["id_token"] is None
            dump = b"".join(str(srv.store.select(t)).encode() for t in ("transactions", "tx_events", "tokens", "sdrs"))
            assert b"04AABBCC" not in dump
            count = _core.encode(
                1, 1, inner.msg_id, 1, 0, Action.DELETE_PERSONAL_DATA, {Key.STATUS: 0, Key.COUNT: 3}, K_UP
            )
            gw.accept_all(sid, env, {"": count})
            await until(lambda: srv.store.get("privacy_requests", request_id=req)["deleted"].get("site:site-1/"))

    run(main())
