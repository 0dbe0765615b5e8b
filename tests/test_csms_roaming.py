"""The CSMS as the CSO's operator (tools/peers/evedge_roaming/csms_operator.py), against a real CSMS,
a test gateway and the three roaming endpoints: S7/R3-3 (a board's Get15118EVCertificate
relayed to the home CSP's contract PKI, its chain back to the board), R3-7/R3-10 (charge
plans as SetChargingProfile tx Commands, capped at the EVSE's power), R5-2/R5-3 (urgent
UnlockConnector Commands)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from csmsclient import CMD_CONTROL, CMD_URGENT, Board, running_csms, site, until

from evedge_roaming import testbed
from evedge_roaming.ch import ClearingHouse
from evedge_roaming.contract_pki import split_chain, verify_chain
from evedge_roaming.csms_operator import CsmsOperator, CsmsRoaming, remote_start_id
from evedge_roaming.cso import CsoEndpoint
from evedge_roaming.csp import CspEndpoint
from gateway.protocol.gid import evse_gid
from gateway.schema import Action, Key, Kind, Priority, ProfilePurpose, Status

pytestmark = [pytest.mark.timeout(60), pytest.mark.parametrize("mode", ["clearing_house", "mixed"])]
SITE = "DE*CSO*LSITE1"
BOOT = {Key.MODEL: "m", Key.VENDOR: "v", Key.SERIAL: "s", Key.FW_VERSION: "1.0"}
CONTRACT = "DE*CSP*C0000PNC1"


def csr(cn: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    k = ec.generate_private_key(ec.SECP256R1())
    req = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    return k, req.sign(k, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_csms_roaming_operator_s7_r3_7_r3_10_r5_2_r5_3(tmp_path: Path, mode: str) -> None:
    async def main() -> None:
        async with running_csms(tmp_path / "csms") as srv, site(srv, SITE) as gw:
            cfgs = testbed.network(tmp_path / "re", mode)
            op = CsmsOperator(lambda: srv, command_timeout_s=10, power_w={evse_gid(SITE, "b1", 1): 11000})
            csp, ch, cso = CspEndpoint(cfgs["csp"]), ClearingHouse(cfgs["ch"]), CsoEndpoint(cfgs["cso"], op)
            await testbed.start_endpoints({"csp": csp, "ch": ch, "cso": cso})  # ephemeral ports
            bridge = CsmsRoaming(cso, op, period_s=0.05).start()
            board = Board("b1")
            try:
                await gw.relay_acked([board.frame(Action.BOOT_NOTIFICATION, BOOT)])
                await gw.command()
                evse = evse_gid(SITE, "b1", 1)
                assert op.evses() == [evse]
                await until(lambda: srv.ctx.ev_cert_relay)
                await scenario(srv, gw, board, cso, csp, evse)
                assert bridge.certificates == 1
            finally:
                await bridge.stop()
                for ep in (cso, csp, ch):
                    await ep.stop()

    async def answered(gw: Any, task: asyncio.Task[Any], status: int = 0) -> tuple[int, Any, Any]:
        """The next Command, answered by the board with `status`; its stream id, envelope, inner frame."""
        sid, env, inner = await gw.command(timeout=8)
        gw.answer(sid, env, [{Key.DEVICE_ID: d, Key.STATUS: status} for d in env.body[Key.TARGETS]])
        return sid, env, inner

    async def scenario(srv: Any, gw: Any, board: Board, cso: CsoEndpoint, csp: CspEndpoint, evse: str) -> None:
        # S7 / R3-3: the board's Get15118EVCertificate → CSMS → CSO endpoint → home CSP → back
        csp.add_customer("04PNC", contract_id=CONTRACT)
        key, req = csr(CONTRACT)
        await gw.relay_acked([board.frame(Action.GET15118_EV_CERTIFICATE, {Key.EXI: req, Key.ACTION_15118: 0})])
        sid, env, ans = await gw.command(timeout=10)
        assert sid == CMD_CONTROL and ans is not None and ans.kind == Kind.RESPONSE
        assert ans.action == Action.GET15118_EV_CERTIFICATE and ans.body[Key.STATUS] == Status.ACCEPTED
        chain = split_chain(ans.body[Key.EXI])
        verify_chain(chain, csp.mo.root)
        assert chain[0].public_key() == key.public_key()
        row = srv.store.select("ev_cert_requests")[0]
        assert row["status"] == "accepted" and row["exi"] == req
        assert csp.store.get("SELECT contract_id FROM contract_certs")[0] == CONTRACT

        # R3-2 (to have a session), then R3-7: the home CSP's plan, capped at the EVSE's 11 kW
        start = asyncio.create_task(csp.start_remote(evse, "APP-USER-1"))
        await answered(gw, start)
        rsid = (await start)["roaming_session_id"]
        plan = [{"start_s": 0, "limit_w": 50000}, {"start_s": 600, "limit_w": 7000, "phases": 3}]
        t = asyncio.create_task(csp.send_plan(rsid, plan))
        sid, env, inner = await answered(gw, t)
        assert inner.action == Action.SET_CHARGING_PROFILE and env.body[Key.TARGETS] == ["b1"]
        assert inner.body == {
            Key.EVSE: 1,
            Key.PROFILE_ID: remote_start_id(rsid),
            Key.STACK_LEVEL: 1,
            Key.PURPOSE: ProfilePurpose.TX,
            Key.PERIODS: [{Key.START_S: 0, Key.LIMIT_W: 11000}, {Key.START_S: 600, Key.LIMIT_W: 7000, Key.PHASES: 3}],
        }
        answer = await t
        assert answer["status"] == "accepted" and [p["limit_w"] for p in answer["plan"]] == [11000, 7000]
        # R3-10: the CSO changes the plan: installed at the board, then told to the home CSP
        t = asyncio.create_task(cso.update_plan(rsid, [{"start_s": 0, "limit_w": 3700}]))
        _, _, inner = await answered(gw, t)
        assert inner.body[Key.PERIODS] == [{Key.START_S: 0, Key.LIMIT_W: 3700}]
        assert inner.body[Key.PURPOSE] == ProfilePurpose.TX
        assert (await t)["status"] == "accepted"
        assert '"limit_w": 3700' in csp.store.get("SELECT plan FROM plans WHERE session_id=?", rsid)[0]
        # a plan the board refuses is not applied
        t = asyncio.create_task(csp.send_plan(rsid, plan))
        await answered(gw, t, status=1)
        assert (await t)["status"] == "rejected"

        # R5-2 (session activated) and R5-3 (activation failed): urgent UnlockConnector
        for session in (rsid, None):
            t = asyncio.create_task(csp.unlock(evse, session, "cable stuck"))
            sid, env, inner = await answered(gw, t)
            assert sid == CMD_URGENT and inner.action == Action.UNLOCK_CONNECTOR and inner.body == {Key.EVSE: 1}
            assert inner.prio == Priority.URGENT and env.body[Key.TARGETS] == ["b1"]
            assert (await t)["result"] == "accepted"
        cmds_ = srv.store.select("commands", {"name": "UnlockConnector"})
        assert len(cmds_) == 2 and all(c["prio"] == Priority.URGENT for c in cmds_)

    asyncio.run(asyncio.wait_for(main(), 50))
