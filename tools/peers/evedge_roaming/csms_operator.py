"""The CSO endpoint's `OperatorBackend` on top of the project's CSMS (tools/peers/evedge_csms).

- The operator's EVSEs are the boards the CSMS knows (`stations`), one location per site;
  EVSE ids follow `gateway.protocol.gid.evse_gid(site, device, evse)`, the rule the
  site gateway uses when it asks the CSO endpoint to authorize a token.
- `start` (R3-1/R3-2) queues a `RequestStartTransaction` Command for the board through its
  site gateway and waits for the board's answer; `stop` (R3-4) a `RequestStopTransaction`
  of the session's transaction; `reserve` (R3-8) a `ReserveNow`, `cancel_reservation` (an
  expired roaming reservation) a `CancelReservation`.
- `unlock` (R5-2 with a session, R5-3 without: activation failed) queues an urgent
  `UnlockConnector` for the EVSE's board; `apply_plan` (R3-7 from the home CSP, R3-10 when
  the CSO changes it: `CsoEndpoint.update_plan`) caps each period at the EVSE's power
  (`max_power_w`, `power_w` per EVSE) and installs it as a `SetChargingProfile` with purpose
  `tx` (stack level 1, profile id = `remote_start_id(session)`); the plan applied is the answer.
- `token_status`: the CSMS's own token table comes before any home CSP.
- `CsmsRoaming` also relays S7/R3-3: each pending Get15118EVCertificate of the CSMS goes to
  `CsoEndpoint.contract_certificate` (→ the home CSP's contract PKI) and the answer back to
  the board (`Csms.answer_ev_certificate`); while it runs, the CSMS keeps such requests
  pending for it (`Ctx.ev_cert_relay`).
- `CsmsRoaming.run()` follows the CSMS's SDRs (S6) and ends the matching roaming session
  at the CSO endpoint (`session_ended`: final SessionUpdate and PutSdr to the home CSP,
  through the CH in clearing-house and mixed modes: R3-5, R3-9). Which CSMS SDRs were
  handed over is kept in the CSO endpoint's store, so a restart neither loses nor repeats
  one (and the CSO reuses a session's SDR id on a retry).

The CSMS may be stopped and started (an outage): the adapter asks `csms()` each time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from evedge_csms import commands as cmds
from evedge_csms import locations
from evedge_csms.errors import CsmsError
from evedge_csms.server import CsmsServer
from evedge_csms.store import Row
from gateway.protocol import gid
from gateway.protocol.gid import evse_gid
from gateway.protocol.roaming.client import RoamingError
from gateway.protocol.roaming.http3 import H3Error
from gateway.protocol.text import clip_reason
from gateway.schema import EPOCH_UNIX, Action15118, AuthStatus, ProfilePurpose, Status, StopReason

from . import publish
from .cso import CsoEndpoint

log = logging.getLogger(__name__)

DDL = """CREATE TABLE IF NOT EXISTS csms_sdrs(sdr_id TEXT PRIMARY KEY, session_id TEXT, state TEXT NOT NULL,
    at INTEGER NOT NULL);
-- R4-2: the local list each site was last sent (the CSMS's tokens and the roaming lists)
CREATE TABLE IF NOT EXISTS site_lists(site_id TEXT PRIMARY KEY, version INTEGER NOT NULL, digest TEXT NOT NULL)"""


DEFAULT_CONNECTOR = {"connector_standard": "IEC_62196_T2", "connector_format": "SOCKET", "power_type": "AC_3_PHASE"}
"""R1-2: each EVSE's connector until the operator records its sites' (`Csms.set_site`): the
boards' own, a type 2 socket on three-phase AC (its rating: the boards' report)."""
DEFAULT_CAPABILITIES = ("RFID_READER", "REMOTE_START_STOP", "RESERVABLE", "CHARGING_PROFILE", "UNLOCK")
"""R1-2: what every site of this chain offers (R4-1, R3-2/R3-4, R3-8, R3-7, R5-2)."""


def remote_start_id(session_id: str) -> int:
    """The integer RequestStartTransaction id of a roaming session (31 bits of its hash)."""
    return int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:4], "big") & 0x7FFFFFFF


class CsmsOperator:
    """`OperatorBackend` of tools/peers/evedge_roaming/operator.py over a running `CsmsServer`."""

    def __init__(
        self,
        csms: Callable[[], CsmsServer | None],
        command_timeout_s: float = 20.0,
        *,
        max_power_w: int = 22000,
        power_w: dict[str, int] | None = None,
    ) -> None:
        self.csms = csms
        self.command_timeout_s = command_timeout_s
        self.max_power_w = max_power_w
        self.power_w = dict(power_w or {})
        """evse_gid → its maximum power (W), where it is not `max_power_w`."""
        self.sessions: dict[str, tuple[str, str, int]] = {}
        """roaming session id → (site, device, remote start id) of the sessions started here."""
        self.session_evse: Callable[[str], str | None] = lambda _sid: None
        self.session_token: Callable[[str], str | None] = lambda _sid: None
        """The token of a roaming session (set by CsmsRoaming): a card-started one has no
        remote start id, its transaction is found by EVSE and token."""
        """roaming session id → its EVSE (set by `CsmsRoaming`: the CSO endpoint's sessions)."""

    def evse_power_w(self, evse: str) -> int:
        return self.power_w.get(evse, self.max_power_w)

    def _srv(self) -> CsmsServer:
        srv = self.csms()
        if srv is None:
            raise ConnectionError("the CSMS is not running")
        return srv

    def _evses(self) -> dict[str, tuple[str, str, int]]:
        """The EVSEs the CSMS has heard of (registered stations, status notifications)."""
        out: dict[str, tuple[str, str, int]] = {}
        store = self._srv().store
        known = [(r["site_id"], r["device_id"], 1) for r in store.select("stations")]
        known += [(r["site_id"], r["device_id"], r["evse"] or 1) for r in store.select("evses") if r["evse"] != 0]
        for site, dev, n in known:
            with contextlib.suppress(gid.GidError):
                out[evse_gid(str(site), str(dev), int(n))] = (str(site), str(dev), int(n))
        return out

    def evses(self) -> list[str]:
        return sorted(self._evses())

    async def locations(self) -> list[dict[str, Any]]:
        """One location per site; each EVSE with its rating and the board's model and vendor as
        the site last reported them (BoardsReport, M1), else the configured power."""
        sites: dict[str, list[dict[str, Any]]] = {}
        reports: dict[str, dict[str, dict[str, Any]]] = {}
        where = self._evses()
        for g, (site, _dev, _e) in where.items():
            rep = (reports[site] if site in reports else reports.setdefault(site, self.reported(site))).get(g, {})
            evse: dict[str, Any] = {
                "evse_gid": g,
                "evse_status": await self.evse_status(g) or "unknown",
                "max_power_w": int(rep.get("max_power_w") or self.evse_power_w(g)),
            }
            evse |= {k: str(rep[k]) for k in ("model", "vendor") if rep.get(k)}
            sites.setdefault(site, []).append(evse)
        out = []
        for site, evses in sites.items():
            op = gid.parse(site).operator
            # the operator's record of the site (`set_site`); before one, the site id and
            # placeholder coordinates (PutLocation requires them)
            rec = self._srv().api.site_record(site) or {}
            lat, lon = rec.get("latitude"), rec.get("longitude")
            loc = {"location_id": site, "operator_id": op, "name": rec.get("name") or site,
                   "latitude": 48.1 if lat is None else float(lat),
                   "longitude": 11.5 if lon is None else float(lon), "evses": evses}  # fmt: skip
            place = {"street": rec.get("address"), "city": rec.get("city"), "postal_code": rec.get("postal_code"),
                     "country": rec.get("country")}  # fmt: skip
            loc["connectors"] = [self._connector(e, where[e["evse_gid"]], rec) for e in evses]
            loc["capabilities"] = list(rec.get("capabilities") or DEFAULT_CAPABILITIES)
            out.append(loc | {k: str(v) for k, v in place.items() if v})
        return out

    def _connector(self, evse: dict[str, Any], where: tuple[str, str, int], site_record: Row) -> dict[str, Any]:
        """An EVSE's connector (PutLocation's `connector_info`): its kind from the operator's record
        of it (`Csms.set_connector`), else its site's (`Csms.set_site`), else `DEFAULT_CONNECTOR`;
        its meter's key when recorded (base64, as JSON carries `bin`); the EVSE's rating."""
        own = self._srv().api.connector_record(*where)
        out = {"evse_gid": evse["evse_gid"], "connector": 1, **locations.evse_connector(own, site_record,
               DEFAULT_CONNECTOR), "max_power_w": evse["max_power_w"]}  # fmt: skip
        if own is not None and own.get("meter_key"):
            out["meter_key"] = base64.b64encode(own["meter_key"]).decode("ascii")
        return out

    def reported(self, site: str) -> dict[str, dict[str, Any]]:
        """The site's last BoardsReport (M1) by EVSE id: status, rating, model, firmware."""
        return {str(e["evse_gid"]): e for e in self._srv().api.boards(site)}

    async def evse_status(self, evse: str) -> str | None:
        """occupied (a transaction runs), else what the site last reported: reserved,
        out_of_order — also a board the site no longer hears (`unknown`: a power cut, R5-1) —
        or available."""
        where = self._evses().get(evse)
        if where is None:
            return None
        site, dev, n = where
        active = [t for t in self._srv().store.select("transactions", {"site_id": site, "device_id": dev})
                  if t["state"] == "active" and (t["evse"] or 1) == n]  # fmt: skip
        if active:
            return "occupied"
        said = self.reported(site).get(evse, {}).get("evse_status")
        return {"reserved": "reserved", "out_of_order": "out_of_order", "unknown": "out_of_order"}.get(
            str(said), "available"
        )

    async def _run(self, site: str, spec: cmds.CommandSpec) -> str:
        srv = self._srv()
        cmd_id = srv.api.send(site, spec)
        end = time.monotonic() + self.command_timeout_s
        while time.monotonic() < end:
            row = self._srv().api.command(cmd_id)
            if row is not None and row["state"] in ("done", "failed", "expired"):
                res = (row.get("results") or [{}])[0]
                if row["state"] == "done" and res.get("status") == Status.ACCEPTED:
                    return "accepted"
                return "evse_offline" if "offline" in str(res.get("reason", "")) else "rejected"
            await asyncio.sleep(0.05)
        return "timeout"

    async def start(self, evse: str, token_uid: str, session_id: str) -> str:
        where = self._evses().get(evse)
        if where is None:
            return "rejected"
        site, dev, n = where
        rsid = remote_start_id(session_id)
        result = await self._run(site, cmds.request_start([dev], token_uid, rsid, evse=n))
        if result == "accepted":
            self.sessions[session_id] = (site, dev, rsid)
        return result

    async def stop(self, session_id: str) -> str:
        """R3-4: the session's active transaction — by its remote start id when it was started
        remotely, else (a card at the EVSE, R3-1) by EVSE and token — is stopped."""
        where = self.sessions.get(session_id)
        if where is not None:
            site, dev, rsid = where
            txs = [t for t in self._srv().store.select("transactions", {"site_id": site, "device_id": dev})
                   if t["remote_start_id"] == rsid and t["state"] == "active"]  # fmt: skip
        else:
            at, token = self._evses().get(self.session_evse(session_id) or ""), self.session_token(session_id)
            if at is None or token is None:
                return "unknown_session"
            site, dev, n = at
            txs = [t for t in self._srv().store.select("transactions", {"site_id": site, "device_id": dev})
                   if t["state"] == "active" and t["id_token"] == token and (t["evse"] or 1) == n]  # fmt: skip
        if not txs:
            return "unknown_session"
        return await self._run(site, cmds.request_stop([dev], int(txs[-1]["tx_id"])))

    async def unlock(self, evse: str, session_id: str | None) -> str:
        """R5-2 (a session was activated) / R5-3 (activation failed: no session): an urgent
        UnlockConnector to the EVSE's board (which ends a running transaction first)."""
        where = self._evses().get(evse)
        if where is None:
            return "rejected"
        site, dev, n = where
        return await self._run(site, cmds.unlock_connector([dev], n))

    async def reserve(self, evse: str, token_uid: str, expiry: int, reservation_id: int) -> str:
        where = self._evses().get(evse)
        if where is None:
            return "rejected"
        site, dev, n = where
        srv = self._srv()
        cmd_id = srv.api.reserve(site, dev, reservation_id, max(0, expiry - EPOCH_UNIX), token_uid, evse=n)
        end = time.monotonic() + self.command_timeout_s
        while time.monotonic() < end:
            row = srv.api.command(cmd_id)
            if row is not None and row["state"] in ("done", "failed", "expired"):
                ok = row["state"] == "done" and (row.get("results") or [{}])[0].get("status") == Status.ACCEPTED
                return "accepted" if ok else "rejected"
            await asyncio.sleep(0.05)
        return "timeout"

    async def cancel_reservation(self, evse: str, reservation_id: int) -> str:
        """R3-8: an expired roaming reservation: a CSMS CancelReservation command."""
        where = self._evses().get(evse)
        if where is None:
            return "rejected"
        srv = self._srv()
        try:
            cmd_id = srv.api.cancel_reservation(reservation_id)
        except CsmsError:  # the CSMS never had it
            return "rejected"
        end = time.monotonic() + self.command_timeout_s
        while time.monotonic() < end:
            row = srv.api.command(cmd_id)
            if row is not None and row["state"] in ("done", "failed", "expired"):
                ok = row["state"] == "done" and (row.get("results") or [{}])[0].get("status") == Status.ACCEPTED
                return "accepted" if ok else "rejected"
            await asyncio.sleep(0.05)
        return "timeout"

    def plan_profile(
        self, session_id: str, plan: list[dict[str, Any]]
    ) -> tuple[str, list[dict[str, Any]], cmds.CommandSpec] | None:
        """(site, the plan capped at the EVSE's power, its SetChargingProfile Command), None if
        the session's EVSE is not one of the CSMS's."""
        evse = self.session_evse(session_id)
        where = self._evses().get(evse) if evse is not None else None
        if where is None and session_id in self.sessions:
            site, dev, _ = self.sessions[session_id]
            where = next((w for w in self._evses().values() if w[:2] == (site, dev)), None)
            evse = next((g for g, w in self._evses().items() if w == where), None)
        if where is None or evse is None:
            return None
        site, dev, n = where
        cap = self.evse_power_w(evse)
        applied = []
        for p in plan:
            q = {**p, "limit_w": min(int(p["limit_w"]), cap)}
            if "setpoint_w" in p:
                q["setpoint_w"] = min(int(p["setpoint_w"]), cap)
            applied.append(q)
        periods = [cmds.period(int(p["start_s"]), int(p["limit_w"]), p.get("phases"), p.get("setpoint_w"))
                   for p in applied]  # fmt: skip
        spec = cmds.set_charging_profile([dev], n, remote_start_id(session_id), periods, stack_level=1,
                                         purpose=ProfilePurpose.TX)  # fmt: skip
        return site, applied, spec

    async def apply_plan(self, session_id: str, plan: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """R3-7 / R3-10: the plan capped at the EVSE's power, installed as a tx profile; the plan
        applied, or None when the EVSE is unknown or the board refused it."""
        made = self.plan_profile(session_id, plan)
        if made is None:
            return None
        site, applied, spec = made
        return applied if await self._run(site, spec) == "accepted" else None

    async def token_status(self, token_uid: str) -> str | None:
        row = self._srv().store.get("tokens", id_token=token_uid)
        if row is None:
            return None
        return AuthStatus(int(row["auth_status"])).name.lower()


class CsmsRoaming:
    """Runs beside the CSMS and the CSO endpoint: hands every SDR of a roaming session to the
    CSO endpoint (R3-5, R3-9)."""

    def __init__(self, cso: CsoEndpoint, operator: CsmsOperator, period_s: float = 0.2) -> None:
        self.cso, self.op, self.period_s = cso, operator, period_s
        cso.store.db.executescript(DDL)
        operator.session_evse = self._session_evse
        operator.session_token = self._session_token
        self.forwarded = 0
        self.certificates = 0
        """Get15118EVCertificate requests answered with the home CSP's answer (S7)."""
        self._task: asyncio.Task[None] | None = None
        self.publisher = publish.CsmsPublisher(cso)

    def start(self) -> CsmsRoaming:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the CSMS is away (outage) or the home CSP is: next round
                log.debug("roaming SDR hand-over: %s", e)
            await asyncio.sleep(self.period_s)

    def _session_token(self, sid: str) -> str | None:
        row = self.cso.store.one("SELECT token_uid FROM sessions WHERE session_id=?", sid)
        return None if row is None or row[0] is None else str(row[0])

    def _session_evse(self, sid: str) -> str | None:
        row = self.cso.store.one("SELECT evse_gid FROM sessions WHERE session_id=?", sid)
        return None if row is None else str(row[0])

    async def ev_certificates(self) -> int:
        """S7, R3-3: each pending Get15118EVCertificate of the CSMS to the home CSP (through the
        CSO endpoint), its answer to the board; the count answered."""
        srv = self.op.csms()
        if srv is None:
            return 0
        srv.ctx.ev_cert_relay = True
        n = 0
        for req in srv.api.pending_ev_certificates():
            site, dev = str(req["site_id"]), str(req["device_id"])
            evse = req["evse_gid"] or evse_gid(site, dev, 1)
            action = Action15118(int(req["action_15118"])).name.lower()
            try:
                answer = await self.cso.contract_certificate(evse, action, bytes(req["exi"]))
            except Exception as e:  # a refusal of the CSO endpoint itself (bad EVSE id …)
                answer = {"status": "rejected", "reason": clip_reason(str(e))}
            srv = self.op.csms()
            if srv is None:
                return n  # the CSMS went away meanwhile: the request stays pending
            if srv.api.answer_ev_certificate(site, dev, int(req["msg_id"]), str(answer["status"]),
                                             answer.get("exi"), answer.get("reason")):  # fmt: skip
                self.certificates += 1
                n += 1
        return n

    def site_lists(self, srv: CsmsServer) -> int:
        """R4-2: the roaming token lists the CSO endpoint holds, with the CSMS's own tokens, to
        the local list of every site (SendLocalList to the site itself), again whenever they
        change, so that a roaming card is authorized at a site whose uplink is down; the count
        of sites sent to."""
        extra = []
        for uid, status, expiry in self.cso.store.all(
            "SELECT token_uid, auth_status, expiry FROM token_cache ORDER BY token_uid"
        ):
            code = AuthStatus.__members__.get(str(status).upper(), AuthStatus.INVALID)
            extra.append({"id_token": uid, "auth_status": int(code),
                          "expiry": None if expiry is None else max(0, int(expiry) - EPOCH_UNIX)})  # fmt: skip
        own = [
            (str(t["id_token"]), t["auth_status"], t["expiry"]) for t in srv.store.select("tokens", order="id_token")
        ]
        digest = hashlib.sha256(repr((own, extra)).encode()).hexdigest()
        n = 0
        for site in sorted({str(r["site_id"]) for r in srv.store.select("stations")}):
            row = self.cso.store.one("SELECT version, digest FROM site_lists WHERE site_id=?", site)
            if (row is not None and row[1] == digest) or (row is None and not extra):
                continue  # unchanged; or no roaming list yet: the site's list is the operator's alone
            version = 1 if row is None else int(row[0]) + 1
            srv.api.send_site_list(site, version, extra)
            self.cso.store.exec("INSERT OR REPLACE INTO site_lists VALUES(?,?,?)", site, version, digest)
            n += 1
        return n

    async def failed_starts(self, srv: CsmsServer) -> int:
        """A remote start (R3-2) whose EV never came: the board ended the service session on its
        EV-connection timeout with no transaction; the session ends at the CSO and its home CSP
        (`CsoEndpoint.session_failed`), not left active. The count ended."""
        n = 0
        for (sid,) in self.cso.store.all("SELECT session_id FROM sessions WHERE state='active'"
                                               " AND how='remote'"):  # fmt: skip
            rsid = remote_start_id(str(sid))
            ended = [
                s for s in srv.store.select("service_sessions", {"remote_start_id": rsid}) if s["state"] == "ended"
            ]
            txs = srv.store.select("transactions", {"remote_start_id": rsid})
            if ended and not txs:
                code = ended[-1]["stop_reason"]
                why = StopReason(code).name.lower() if code in StopReason._value2member_map_ else "no EV"
                await self.cso.session_failed(str(sid), why)
                n += 1
        return n

    async def step(self) -> int:
        """One pass over the CSMS's SDRs; the count handed over to the CSO endpoint."""
        srv = self.op.csms()
        if srv is None:
            return 0
        await self.ev_certificates()
        self.site_lists(srv)
        await self.failed_starts(srv)
        try:
            states = {e: await self.op.evse_status(e) or "unknown" for e in self.op.evses()}
            await self.publisher.step(srv.store, states)
        except (RoamingError, ConnectionError, H3Error) as e:  # a CSP or the CH is away: next round
            log.warning("publishing to the home CSPs: %s", e)
        seen = {str(r[0]): (r[1], r[2]) for r in self.cso.store.all("SELECT sdr_id, session_id, state FROM csms_sdrs")}
        n = 0
        parts = (p for whole in srv.api.sdrs() for p in publish.sdr_parts(whole, publish.sdr_tokens(srv.store, whole)))
        for sdr in parts:  # each card's part of a service session's SDR: a roaming session of its own
            prev = seen.get(sdr["sdr_id"])
            if (prev is not None and prev[1] != "pending") or not sdr["id_token"]:
                continue
            evse = evse_gid(str(sdr["site_id"]), str(sdr["device_id"]), int(sdr["evse"] or 1))
            token = str(sdr["id_token"])
            sid = str(prev[0]) if prev is not None else None
            if sid is None:
                # a roaming card the site knew (no session opened at the CSO): one is adopted
                roaming_card = await self.op.token_status(token) is None
                adopt_at = publish.unix(sdr["started"]) or int(time.time()) if roaming_card else None
                key = (str(sdr["site_id"]), str(sdr["device_id"]), int(sdr["session_id"] or 0))
                sid = self.publisher.session_of(key, evse, token, adopt_at)
            if sid is None:
                self.cso.store.exec("INSERT OR REPLACE INTO csms_sdrs VALUES(?,?,?,?)", sdr["sdr_id"], None, "local",
                                    int(time.time()))  # fmt: skip
                continue
            self.cso.store.exec("INSERT OR REPLACE INTO csms_sdrs VALUES(?,?,?,?)", sdr["sdr_id"], sid, "pending",
                                int(time.time()))  # fmt: skip
            try:
                await self.cso.session_ended(
                    sid,
                    int(sdr["energy_wh"]),
                    meter_start_wh=int(sdr["meter_start_wh"]),
                    signed_meter=publish.signed_meter(sdr),
                    lines=publish.sdr_lines(sdr),
                )
            except (RoamingError, ConnectionError) as e:
                log.warning("SDR of %s not yet accepted by the home CSP: %s", sid, e)
                continue
            self.cso.store.exec("UPDATE csms_sdrs SET state='sent' WHERE sdr_id=?", sdr["sdr_id"])
            self.forwarded += 1
            n += 1
        return n
