"""Bad input to a roaming endpoint: each answered with a JSON error naming the cause, and the
store unchanged. Also: a server certificate from another CA is refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from evedge_roaming.testbed import CSO, CSP, EVSES, Net, Raw, running
from evedge_roaming.testbed import LOCATION_BODY as LOCATION
from gateway.protocol import devpki
from gateway.protocol.roaming import auth
from gateway.protocol.roaming.client import PREFIX, RoamingClient, RoamingError
from gateway.protocol.roaming.http3 import H3Client, H3Error, Response, TlsFiles

pytestmark = pytest.mark.timeout(30)


def case(tmp_path: Path, check: Callable[[Net, Raw], Awaitable[None]], **kw: int) -> None:
    async def main() -> None:
        async with running(tmp_path, "peer_to_peer", **kw) as net:
            raw = Raw(net)
            await raw.login.login()
            before = {role: ep.store.snapshot() for role, ep in net.endpoints().items()}
            await check(net, raw)
            after = {role: ep.store.snapshot() for role, ep in net.endpoints().items()}
            assert after == before, "a refused request changed a store"
            await raw.http.close()

    asyncio.run(main())


def refused(status: int, cause: str, field: str | None = None) -> Callable[[tuple[Response, dict[str, Any]]], None]:
    def check(got: tuple[Response, dict[str, Any]]) -> None:
        r, body = got
        assert (r.status, body["error"]) == (status, cause), body
        assert body["detail"]
        if field is not None:
            assert body["field"] == field, body

    return check


def test_no_token(tmp_path: Path) -> None:
    async def check(net: Net, raw: Raw) -> None:
        refused(401, "missing_token")(await raw.post("PutLocation", LOCATION, token=None))
        refused(401, "unknown_token")(await raw.post("PutLocation", LOCATION, token="made-up"))

    case(tmp_path, check)


def test_expired_token(tmp_path: Path) -> None:
    async def check(net: Net, raw: Raw) -> None:
        token = await raw.login.login()
        net.clock.advance(3)
        refused(401, "token_expired")(await raw.post("PutLocation", LOCATION, token=token))

    case(tmp_path, check, token_lifetime_s=2)


def test_client_logs_in_again_when_the_server_says_expired(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, "peer_to_peer", token_lifetime_s=5) as net:
            lagging = RoamingClient(CSO, net.cso.client(CSP).peer, clock=lambda: net.clock() - 60)
            await lagging.login()
            net.clock.advance(10)  # expired for the CSP; the lagging client still believes in it
            answer = await lagging.call("PutLocation", LOCATION, to=CSP)
            assert answer == {"status": "accepted"} and lagging.logins == 2
            await lagging.close()

    asyncio.run(main())


def test_wrong_hmac_replayed_nonce_stale_timestamp(tmp_path: Path) -> None:
    async def check(net: Net, raw: Raw) -> None:
        refused(401, "bad_mac")(await raw.post("PutLocation", LOCATION, secret=b"wrong secret"))
        refused(401, "missing_signature")(await raw.post("PutLocation", LOCATION, drop=auth.H_MAC))
        refused(401, "stale_timestamp")(await raw.post("PutLocation", LOCATION, ts=net.clock() - 301))
        refused(401, "stale_timestamp")(await raw.post("PutLocation", LOCATION, ts=net.clock() + 301))
        bad = dict(LOCATION, latitude=200.0)  # refused after the nonce check: the nonce is then used
        nonce = "n" * 20
        refused(400, "out_of_range", "latitude")(await raw.post("PutLocation", bad, nonce=nonce))
        refused(409, "replay")(await raw.post("PutLocation", bad, nonce=nonce))

    case(tmp_path, check)


def test_unknown_party_and_wrong_role(tmp_path: Path) -> None:
    async def check(net: Net, raw: Raw) -> None:
        h = auth.sign(b"k", "POST", PREFIX + "PutLocation", auth.Route("FR*ZZZ*O"), b"{}", now=net.clock())
        r = await raw.http.request("POST", PREFIX + "PutLocation", h, b"{}")
        assert r.status == 403 and json.loads(r.body)["error"] == "unknown_party"
        body = {"evse_gid": EVSES[0], "token_uid": "X", "roaming_session_id": "DE*CSO*S1"}
        refused(404, "unknown_message")(await raw.post("RemoteStart", body))  # a CSP takes no RemoteStart
        refused(404, "unknown_message")(await raw.post("NoSuchThing", {}))
        foreign = dict(LOCATION, operator_id="DE*CSP*O")
        refused(403, "party_mismatch", "operator_id")(await raw.post("PutLocation", foreign))

    case(tmp_path, check)


def test_malformed_oversized_and_too_deep_bodies(tmp_path: Path) -> None:
    async def check(net: Net, raw: Raw) -> None:
        refused(400, "bad_json")(await raw.post("PutLocation", b'{"location_id": '))
        refused(400, "bad_json")(await raw.post("PutLocation", b"[1, 2]"))
        refused(400, "bad_json")(await raw.post("PutLocation", b'{"latitude": NaN}'))
        refused(400, "duplicate_key", "name")(await raw.post("PutLocation", b'{"name": "a", "name": "b"}'))
        refused(400, "bad_utf8")(await raw.post("PutLocation", b'{"name": "\xff"}'))
        refused(413, "too_large")(await raw.post("PutLocation", b'{"x": "' + b"a" * 300_000 + b'"}'))
        deep = b'{"ext": ' + b"[" * 17 + b"]" * 17 + b"}"
        refused(400, "too_deep")(await raw.post("PutLocation", deep))

    case(tmp_path, check)


def test_wrong_types_missing_fields_and_bad_gids(tmp_path: Path) -> None:
    async def check(net: Net, raw: Raw) -> None:
        refused(400, "missing_field", "name")(
            await raw.post("PutLocation", {k: v for k, v in LOCATION.items() if k != "name"})
        )
        refused(400, "bad_type", "latitude")(await raw.post("PutLocation", dict(LOCATION, latitude="48")))
        refused(400, "bad_type", "evses")(await raw.post("PutLocation", dict(LOCATION, evses={})))
        e = dict(LOCATION["evses"][0], max_power_w=True)
        refused(400, "bad_type", "evses[0].max_power_w")(await raw.post("PutLocation", dict(LOCATION, evses=[e])))
        e = dict(LOCATION["evses"][0], evse_status="busy")
        refused(400, "bad_enum", "evses[0].evse_status")(await raw.post("PutLocation", dict(LOCATION, evses=[e])))
        e = dict(LOCATION["evses"][0], evse_gid="DE*CSO*L1")
        refused(400, "bad_gid", "evses[0].evse_gid")(await raw.post("PutLocation", dict(LOCATION, evses=[e])))
        refused(400, "bad_gid", "location_id")(await raw.post("PutLocation", dict(LOCATION, location_id="site 1")))
        refused(400, "out_of_range", "name")(await raw.post("PutLocation", dict(LOCATION, name="x" * 129)))

    case(tmp_path, check)


def test_unknown_identifiers_and_conflicts(tmp_path: Path) -> None:
    async def setup_then_check(net: Net, raw: Raw) -> None:
        status = {"evse_gid": "DE*CSO*E9-9", "evse_status": "available", "time": int(net.clock())}
        refused(404, "unknown_evse", "evse_gid")(await raw.post("EvseStatusUpdate", status))
        upd = {"roaming_session_id": "DE*CSP*Snope", "evse_gid": EVSES[0], "energy_wh": 1, "power_w": 1, "time": 1}
        refused(404, "unknown_session", "roaming_session_id")(await raw.post("SessionUpdate", upd))
        sdr = {
            "sdr_id": "DE*CSO*R1",
            "roaming_session_id": "DE*CSP*Snope",
            "evse_gid": EVSES[0],
            "token_uid": "A",
            "started": 1,
            "stopped": 2,
            "meter_start_wh": 0,
            "meter_stop_wh": 5,
            "energy_wh": 5,
            "cost": 1,
            "currency": "EUR",
        }
        refused(404, "unknown_session", "roaming_session_id")(await raw.post("PutSdr", sdr))
        refused(400, "inconsistent", "energy_wh")(await raw.post("PutSdr", dict(sdr, energy_wh=4)))
        refused(403, "party_mismatch", "sdr_id")(await raw.post("PutSdr", dict(sdr, sdr_id="DE*CSP*R1")))
        # the CSO refuses unknown EVSEs and sessions from the CSP the same way
        with pytest.raises(RoamingError) as exc:
            await net.csp.start_remote("DE*CSO*E9-9", "APP")
        assert (exc.value.status, exc.value.cause, exc.value.field) == (404, "unknown_evse", "evse_gid")
        with pytest.raises(RoamingError) as exc:
            await net.csp.unlock(EVSES[0], "DE*CSP*Snope")
        assert (exc.value.status, exc.value.cause) == (404, "unknown_session")

    case(tmp_path, setup_then_check)


def test_same_sdr_id_with_other_values_is_a_conflict(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, "peer_to_peer") as net:
            sid = (await net.csp.start_remote(EVSES[0], "APP"))["roaming_session_id"]
            done = await net.cso.session_ended(sid, 1000)
            before = net.csp.store.snapshot()
            sdr = json.loads(net.csp.store.get("SELECT body FROM sdrs")[0])
            again = await net.cso.client(CSP).put_sdr(sdr, to=CSP)
            assert again == {"status": "accepted"}
            with pytest.raises(RoamingError) as exc:
                await net.cso.client(CSP).put_sdr(dict(sdr, cost=sdr["cost"] + 1, stopped=sdr["stopped"]), to=CSP)
            assert (exc.value.status, exc.value.cause) == (409, "conflict")
            assert net.csp.store.snapshot() == before and done["sdr_id"] == sdr["sdr_id"]

    asyncio.run(main())


def test_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, "peer_to_peer") as net:
            other = devpki.ensure_ca(tmp_path / "other", org="someone else")
            bad = devpki.issue(tmp_path / "other", "csp", ca=other)
            await net.csp.stop()
            from dataclasses import replace

            from evedge_roaming.csp import CspEndpoint

            impostor = await CspEndpoint(
                replace(net.cfgs["csp"], cert=bad.cert, key=bad.key, db=tmp_path / "i.db"), clock=net.clock
            ).start()
            try:
                with pytest.raises(H3Error):
                    await net.cso.client(CSP).login()
            finally:
                await impostor.stop()

    asyncio.run(main())


@pytest.mark.parametrize("client_cert", ["none", "other CA"])
def test_client_without_a_site_ca_certificate_is_refused(tmp_path: Path, client_cert: str) -> None:
    """Mutual TLS: an endpoint reads nothing from a client whose certificate does not chain to its CA."""

    async def main() -> None:
        async with running(tmp_path, "peer_to_peer") as net:
            cfg = net.cfgs["cso"]
            party = cfg.party(CSP)
            assert party is not None
            if client_cert == "none":
                tls = TlsFiles(cfg.ca)
            else:
                other = devpki.ensure_ca(tmp_path / "other", org="someone else")
                rogue = devpki.issue(tmp_path / "other", "cso", ca=other)
                tls = TlsFiles(cfg.ca, rogue.cert, rogue.key)
            http = H3Client("127.0.0.1", party.port, tls)
            before = net.csp.store.snapshot()
            try:
                with pytest.raises(H3Error, match="certificate"):
                    await http.request("POST", PREFIX + "PlatformLogin", {}, b"{}")
            finally:
                await http.close()
            assert net.csp.store.snapshot() == before

    asyncio.run(main())


def test_one_partys_certificate_cannot_carry_anothers_credentials(tmp_path: Path) -> None:
    """The clearing house's own (valid) certificate with the CSO's password and HMAC key: the
    CSP refuses it by name (the certificate names the CH, the request claims the CSO)."""

    async def main() -> None:
        async with running(tmp_path, "clearing_house") as net:
            raw = Raw(net)  # the CSO's credentials at the CSP
            ch = net.cfgs["ch"]
            await raw.http.close()
            raw.http = H3Client("127.0.0.1", raw.party.port, TlsFiles(ch.ca, ch.cert, ch.key))
            raw.login.http = raw.http
            before = net.csp.store.snapshot()
            login = {"party_id": CSO, "username": CSO, "password": raw.party.password}
            r, body = await raw.post("PlatformLogin", login, token=None)
            assert (r.status, body["error"]) == (403, "certificate_mismatch")
            assert net.csp.store.snapshot() == before
            await raw.http.close()

    asyncio.run(main())


def test_a_handler_failure_is_a_500_that_tells_the_peer_nothing_of_the_internals(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, "peer_to_peer") as net:
            raw = Raw(net)

            async def broken(_req: object) -> object:
                raise RuntimeError("db at /srv/secret/csp.sqlite is locked")

            net.csp._pipeline = broken  # type: ignore[method-assign,assignment]
            r, body = await raw.post("PlatformLogin", {}, token=None)
            assert r.status == 500 and body["error"] == "internal"
            assert "secret" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
            assert body["detail"].startswith("internal error, incident ")
            await raw.http.close()

    asyncio.run(main())
