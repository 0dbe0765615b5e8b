"""S7 / R3-3: ISO 15118 contract certificates through the roaming endpoints, in each mode.
The CSO relays an EV's CSR (`exi`, DER PKCS#10) to the home CSP, whose MO sub-CA issues the
contract certificate; the answer `exi` is the DER chain, leaf first (contract_pki.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from evedge_roaming.contract_pki import split_chain, verify_chain
from evedge_roaming.testbed import CSO, CSP, EVSES, Net, running

MODES = ["peer_to_peer", "clearing_house", "mixed"]
CONTRACT = "DE*CSP*C00012345"
pytestmark = [pytest.mark.timeout(30), pytest.mark.parametrize("mode", MODES)]


def run(tmp_path: Path, mode: str, scenario: Callable[[Net], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running(tmp_path, mode) as net:
            await scenario(net)

    asyncio.run(main())


def csr(cn: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None) -> bytes:
    k = key or ec.generate_private_key(ec.SECP256R1())
    req = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    return req.sign(k, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def routed(net: Net, message: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in net.ch.store.all("SELECT origin, dest FROM routed WHERE message=?", message)]


def test_s7_r3_3_contract_certificate_issued_by_the_home_csp(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        net.csp.add_customer("04PNC001", contract_id=CONTRACT)
        key = ec.generate_private_key(ec.SECP256R1())
        answer = await net.cso.contract_certificate(EVSES[0], "install", csr(CONTRACT, key))
        assert answer["status"] == "accepted", answer
        chain = split_chain(answer["exi"])
        assert len(chain) == 2 and chain[1] == net.csp.mo.sub
        verify_chain(chain, net.csp.mo.root)  # leaf ← MO sub-CA ← MO root
        leaf = chain[0]
        assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CONTRACT
        assert leaf.public_key() == key.public_key()
        assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        row = net.csp.store.get("SELECT contract_id, cso, action FROM contract_certs")
        assert tuple(row) == (CONTRACT, CSO, "install")
        upd = await net.cso.contract_certificate(EVSES[0], "update", csr(CONTRACT), contract_id=CONTRACT)
        assert upd["status"] == "accepted"
        # routing: directly in peer-to-peer and mixed mode, through the CH in clearing-house mode
        via_ch = (CSO, CSP) in routed(net, "ContractCertificate")
        assert via_ch is (net.cfgs["cso"].mode == "clearing_house")
        # the MO PKI is kept: a restarted CSP has the same root
        root = net.csp.mo.root
        csp = await net.restart("csp")
        assert csp.mo.root == root  # type: ignore[attr-defined]

    run(tmp_path, mode, scenario)


def test_s7_r3_3_bad_csr_or_contract_is_refused_with_a_reason(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        net.csp.add_customer("04PNC001", contract_id=CONTRACT)
        net.csp.add_customer("04PNC002", contract_id="DE*CSP*C00099999", status="blocked")
        good = csr(CONTRACT)
        tampered = bytearray(good)
        tampered[-3] ^= 0x55  # in the signature
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        p256 = ec.generate_private_key(ec.SECP384R1())
        cases = [
            (bytes(tampered), CONTRACT, "signature"),
            (csr(CONTRACT, rsa_key), CONTRACT, "P-256"),
            (csr(CONTRACT, p256), CONTRACT, "P-256"),
            (b"\x80\x01not a CSR", CONTRACT, "PKCS#10"),
            (csr("DE*CSP*C00077777"), None, "unknown contract"),
            (csr("DE*CSP*C00099999"), None, "blocked"),
            (csr("DE*CSP*C00088888"), CONTRACT, "common name"),
        ]
        for exi, cid, why in cases:
            answer = await net.cso.contract_certificate(EVSES[0], "install", exi, contract_id=cid)
            assert answer["status"] == "rejected" and why in answer["reason"] and "exi" not in answer, (why, answer)
        # an update of a contract that never had a certificate
        answer = await net.cso.contract_certificate(EVSES[0], "update", good)
        assert answer["status"] == "rejected" and "install first" in answer["reason"]
        # a CSR whose CN is no contract id, or a contract of no known provider: the CSO refuses itself
        assert "not a contract id" in (await net.cso.contract_certificate(EVSES[0], "install", csr("EV-1")))["reason"]
        far = await net.cso.contract_certificate(EVSES[0], "install", csr("FR*XYZ*C1"))
        assert far["status"] == "rejected" and "FR*XYZ*O" in far["reason"]
        assert net.csp.store.get("SELECT COUNT(*) FROM contract_certs")[0] == 0

    run(tmp_path, mode, scenario)
