"""The OCPP face of the site: one station per board, and the hooks the gateway calls.

Rule: the gateway hands over every row it committed (`add`) and the board requests an OCPP
CSMS answers (`board_request`: BootNotification always, Authorize of a token the site does not
know); everything else stays on the gateway's own paths. A row is retired in the outbox once
every northbound delivered it (`gate`, gateway/ocpp/ledger.py). While a station is cut off,
the site goes on alone: the board's BootNotification is answered with the CSMS's last decision
(Pending if it never decided), an Authorize by the site's list, cache and offline policy.

The site's Local Authorization List and Authorization Cache are OCPP's (SendLocalList,
GetLocalListVersion, ClearCache act on gateway/localcsms/auth.py; one list for the site, so
the CSMS's last SendLocalList to any of its stations is the list).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import stat
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from ocpp import exceptions as oe

from gateway.boards import BoardRequest, Boards
from gateway.config import ConfigError, OcppConfig
from gateway.link import proto_ts
from gateway.localcsms.auth import Authorizer
from gateway.localcsms.fwcache import FirmwareCache
from gateway.ocpp import certs, down
from gateway.ocpp.files import LogUpload
from gateway.ocpp.jobs import Jobs
from gateway.ocpp.ledger import Ledger, RetireGate
from gateway.ocpp.link import CallFailed, Refused, Socket, basic_auth, connect, tls_context
from gateway.ocpp.station import Station
from gateway.ocpp.up import AUTH_STATUS, BoardInfo, Payload, board_info, id_token
from gateway.outbox import Row
from gateway.schema import MESSAGES, Action, AuthStatus, Key, Registration, Status

log = logging.getLogger("gateway.ocpp")

BOOT_WAIT_S = 5.0
"""How long a board's BootNotification waits for the CSMS before the site answers it (the
board waits 30 s)."""
AUTHORIZE_WAIT_S = 3.0
"""An Authorize waits this long for the CSMS, then the site decides (the board waits 5 s)."""
Chain = Callable[[BoardRequest, float], None]


class OcppSite(Protocol):
    """What the OCPP face needs of the gateway (gateway.service.Gateway is one)."""

    @property
    def boards(self) -> Boards[Any]: ...

    @property
    def auth(self) -> Authorizer: ...

    @property
    def firmware(self) -> FirmwareCache: ...

    def run_sync(self, fn: Callable[[], object]) -> asyncio.Future[object]: ...

    def token_uid(self, device: str, msg_id: int) -> str | None:
        """The id token in clear of a frame the gateway accepted (while it remembers it)."""

    def retire(self, seqs: list[int]) -> None:
        """Outbox rows every northbound delivered."""


def read_password(path: Path) -> str:
    """The basic-auth password: one line of a file nobody but its owner may read."""
    try:
        st = path.stat()
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"ocpp.password_file: cannot read {path} ({e.strerror})") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"ocpp.password_file: {path} is readable by others (chmod 600)")
    pw = text.strip()
    if not 16 <= len(pw) <= 40:  # OCPP 2.0.1 A00.FR.205: 16 to 40 characters
        raise ConfigError("ocpp.password_file: the password must have 16 to 40 characters")
    return pw


class OcppBridge:
    def __init__(self, site: OcppSite, cfg: OcppConfig, data_dir: Path, native: bool, now: Callable[[], float],
                 fallback: Chain, heartbeat_s: int, cert: Path | None = None,
                 key: Path | None = None) -> None:  # fmt: skip
        self.site = site
        self.cfg = cfg
        self.timeout_s = cfg.timeout_s
        self.max_frame = cfg.max_frame
        self.backoff_max_s = cfg.backoff_max_s
        self.now = now
        self.fallback = fallback
        """The rest of the board-request chain, when the CSMS cannot answer in time."""
        self.heartbeat_s = heartbeat_s
        self.password = read_password(cfg.password_file) if cfg.password_file is not None else ""
        self.ssl = None
        if cfg.security_profile > 1:
            ca = str(cfg.ca) if cfg.ca else None
            cert_, key_ = (cfg.cert or cert, cfg.key or key) if cfg.security_profile == 3 else (None, None)
            self.ssl = tls_context(ca, str(cert_) if cert_ else None, str(key_) if key_ else None)
        self.gate = RetireGate({"ocpp", "native"} if native else {"ocpp"})
        self.ledger = Ledger(data_dir / "ocpp.sqlite")
        self.stations: dict[str, Station] = {
            d: Station(self, d, info, reg) for d, (info, reg) in self.ledger.stations().items()
        }
        self.orphans: dict[str, list[Row]] = {}
        """Rows of boards not yet known as stations (no BootNotification seen): held for theirs."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.started = False
        self._dirty: dict[str, int] = {}
        """Cursors moved and not yet durable: device → seq."""
        self._unflushed: list[int] = []
        """The rows those cursors cover, retired once written."""
        self._flusher: asyncio.Task[None] | None = None
        self.flushes = 0
        """Cursor transactions written (fewer than the rows delivered under load)."""
        self.uploads: dict[tuple[str, int], LogUpload] = {
            (d, r): LogUpload(loc, name) for d, r, loc, name in self.ledger.uploads()
        }
        """The CSMS's GetLogs under way, by (device, request id)."""
        self.jobs = Jobs(self)

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        self.started = True
        for st in self.stations.values():
            st.start()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for st in self.stations.values():
            await st.stop()
        if self._flusher is not None:
            await self._flusher
        await self.site.run_sync(self._close_ledger)

    def _close_ledger(self) -> None:
        if self._dirty:  # a flush round that had not started yet
            self.ledger.delivered_many(self._dirty)
        self.ledger.close()

    async def open_socket(self, station_id: str) -> Socket:
        headers = {"Authorization": basic_auth(station_id, self.password)} if self.cfg.security_profile < 3 else {}
        ws: Socket = await connect(self.cfg.url, station_id, headers, self.ssl, self.timeout_s, self.max_frame)
        return ws

    # ------------------------------------------------------------ rows

    def add(self, rows: list[Row], recovered: bool = False) -> None:
        """Rows the outbox committed (or, `recovered`, still held at start-up), in seq order."""
        by_device: dict[str, list[Row]] = {}
        done: list[int] = []
        cursors = self.ledger.cursors
        for r in rows:
            if r.seq <= cursors.get(r.device, 0):
                done.append(r.seq)  # delivered before a restart; the native uplink may still owe it
            else:
                by_device.setdefault(r.device, []).append(r)
        if done:
            self._retire(done)
        if not recovered:
            self._keep_tokens(rows)
        for device, rs in by_device.items():
            st = self.stations.get(device)
            if st is None:
                self.orphans.setdefault(device, []).extend(rs)
            else:
                st.add(rs, offline=recovered)

    def _keep_tokens(self, rows: list[Row]) -> None:
        keep = []
        for r in rows:
            if b"\x10\xc4" in r.frame:  # key 16 (id_token) and a bin8: the frame carries a token
                tok = self.site.token_uid(r.device, r.msg_id)
                if tok is not None:
                    keep.append((r.seq, r.device, tok))
        if keep:
            self.site.run_sync(lambda: self.ledger.save_tokens(keep))

    def native_delivered(self, seqs: list[int]) -> list[int]:
        """The native uplink's CSMS acked these rows: those now owed to nobody."""
        return self.gate.delivered("native", seqs)

    def _retire(self, seqs: list[int]) -> None:
        out = self.gate.delivered("ocpp", seqs)
        if out:
            self.site.retire(out)

    # ------------------------------------------------------------ StationSite

    async def token_of(self, row: Row) -> str | None:
        tok = self.site.token_uid(row.device, row.msg_id)
        if tok is None and b"\x10\xc4" in row.frame:
            got = await self.site.run_sync(lambda: self.ledger.token(row.seq))
            tok = got if isinstance(got, str) else None
        return tok

    def delivered(self, device: str, seq: int) -> None:
        """The CSMS answered `device`'s row `seq`: the station goes on with its next row at once,
        the cursor is written with those of the other rows answered meanwhile (group commit,
        docs/ocpp.md "One durable queue"), and the rows retire once it is durable."""
        self.ledger.cursors[device] = seq
        self._dirty[device] = seq
        self._unflushed.append(seq)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_cursors())

    async def _flush_cursors(self) -> None:
        """One ledger transaction per round, for every cursor that moved since the last one:
        while a round's fsync runs, the stations go on and the next round takes what they add."""
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            seqs, self._unflushed = self._unflushed, []
            await self.site.run_sync(functools.partial(self.ledger.delivered_many, dirty))
            self.flushes += 1
            self._retire(seqs)

    async def registered(self, device: str, info: BoardInfo, registration: int | None) -> None:
        await self.site.run_sync(lambda: self.ledger.save_station(device, info, registration))

    async def handle(self, device: str, action: str, p: Payload) -> Payload:
        """A CALL of the CSMS to `device`'s station (payload valid per the schema)."""
        auth = self.site.auth
        if action == "ClearCache":
            auth.clear_cache()
            return {"status": "Accepted"}
        if action == "GetLocalListVersion":
            return {"versionNumber": auth.list_version}
        if action == "SendLocalList":
            return self._local_list(p)
        if action in SITE_CALLS:
            try:
                return await SITE_CALLS[action](self, device, p)
            except down.Unfit as e:
                return e.response
        fn = CARRIED.get(action)
        if fn is None:
            raise oe.NotSupportedError(f"{action} is not carried to the boards (docs/ocpp.md)")
        try:
            cmd = fn(p)
        except down.Unfit as e:
            return e.response
        out, _ = await self._ask(device, cmd)
        if action == "SetDisplayMessage" and out.get("status") == "Accepted":
            await self.site.run_sync(lambda: self.ledger.save_display(device, dict(p["message"])))
        elif action == "ClearDisplayMessage" and out.get("status") == "Accepted":
            await self.site.run_sync(lambda: self.ledger.drop_display(device, int(p["id"])))
        return out

    @property
    def firmware(self) -> FirmwareCache:
        return self.site.firmware

    def run_sync(self, fn: Callable[[], object]) -> asyncio.Future[object]:
        return self.site.run_sync(fn)

    def tell(self, device: str, action: str, payload: Payload) -> None:
        st = self.stations.get(device)
        if st is not None:
            st.notify(action, payload)

    def rewrite(self, device: str, action: int, body: dict[int, Any],
                msg: tuple[str, Payload] | None) -> tuple[str, Payload] | None:  # fmt: skip
        return self.jobs.rewrite(device, action, body, msg)

    async def ask(self, device: str, cmd: down.ToBoard) -> tuple[Payload, down.Result]:
        return await self._ask(device, cmd)

    async def _ask(self, device: str, cmd: down.ToBoard) -> tuple[Payload, down.Result]:
        spec = MESSAGES[cmd.action]
        timeout = min(spec.timeout_ms / 1000, self.timeout_s)
        res = await self.site.boards.deliver(device, cmd.action, cmd.body, int(spec.priority), timeout)
        return cmd.answer(res), res

    async def _set_monitoring(self, device: str, p: Payload) -> Payload:
        need = sum(1 for d in p["setMonitoringData"] if "id" not in d)
        got = await self.site.run_sync(lambda: self.ledger.monitor_ids(need)) if need else []
        ids = iter(got if isinstance(got, list) else [])
        cmd, results = down.monitors(p, lambda: int(next(ids)))
        if cmd is None:
            return {"setMonitoringResult": results}
        return (await self._ask(device, cmd))[0]

    async def _clear_monitoring(self, device: str, p: Payload) -> Payload:
        out = [(await self._ask(device, down.clear_monitor(int(i))))[0] for i in p["id"]]
        return {"clearMonitoringResult": out}

    async def _trigger(self, device: str, p: Payload) -> Payload:
        """F06: the status notifications are the station's to repeat (the boards report a status
        only when it changes): the one last sent while the update or upload is under way, else
        Idle. Every other message is the board's to send."""
        what = str(p["requestedMessage"])
        st = self.stations.get(device)
        if what not in down.BUSY or st is None:
            cmd = down.command("TriggerMessage", p)
            return (await self._ask(device, cmd))[0]
        last = st.last.get(what)
        st.notify(what, last if last is not None and last["status"] in down.BUSY[what] else {"status": "Idle"})
        return {"status": "Accepted"}

    async def _get_displays(self, device: str, p: Payload) -> Payload:
        """O03: the display messages the board accepted through OCPP and still valid, told in a
        NotifyDisplayMessages after the answer (Unknown: none matches)."""
        got = await self.site.run_sync(lambda: self.ledger.displays(device))
        infos = down.displays_matching(got if isinstance(got, list) else [], p, proto_ts(self.now()))
        st = self.stations.get(device)
        if not infos or st is None:
            return {"status": "Unknown"}
        st.notify("NotifyDisplayMessages", {"requestId": int(p["requestId"]), "messageInfo": infos})
        return {"status": "Accepted"}

    def _local_list(self, p: Payload) -> Payload:
        auth = self.site.auth
        version, full = int(p["versionNumber"]), p["updateType"] == "Full"
        if not full and version <= auth.list_version:
            return {"status": "VersionMismatch"}
        entries: list[tuple[str, int, int | None]] = []
        for e in p.get("localAuthorizationList") or ():
            token = str(e["idToken"]["idToken"])
            info = e.get("idTokenInfo")
            if info is None:  # a differential update without its info removes the entry
                auth.forget(token)
                continue
            expiry = down.proto_time(info["cacheExpiryDateTime"]) if info.get("cacheExpiryDateTime") else None
            entries.append((token, down.authorize_answer(str(info["status"])), expiry))
        auth.update_list(version, full, entries)
        return {"status": "Accepted"}

    # ------------------------------------------------------------ board requests

    def board_request(self, req: BoardRequest, now: float) -> bool:
        """True when the OCPP face answers the request (it then always does, in time)."""
        a = req.frame.action
        if a == Action.BOOT_NOTIFICATION:
            self._spawn(self._boot(req))
            return True
        st = self.stations.get(req.device)
        if st is None or not st.accepted or st.link is None:
            return False
        if a == Action.AUTHORIZE and req.token is not None and not req.known_here:
            self._spawn(self._authorize(st, req))
            return True
        if a in (Action.SIGN_CERTIFICATE, Action.GET15118_EV_CERTIFICATE):
            self._spawn(self._certificate(st, req))
            return True
        return False

    async def _certificate(self, st: Station, req: BoardRequest) -> None:
        """A board's SignCertificate (its CSR, A02/A03) or Get15118EVCertificate (M06) asked of
        the CSMS; the CSMS away: the rest of the chain answers."""
        assert st.link is not None
        body = req.frame.body if isinstance(req.frame.body, dict) else {}
        sign = req.frame.action == Action.SIGN_CERTIFICATE
        try:
            if sign:
                p = {"csr": certs.pem_csr(bytes(body[Key.CSR])), "certificateType": "ChargingStationCertificate"}
                res = await st.link.call("SignCertificate", p)
                out: dict[int, Any] = {
                    Key.STATUS: int(Status.ACCEPTED if res["status"] == "Accepted" else Status.REJECTED)
                }
            else:
                res = await st.link.call("Get15118EVCertificate", certs.ev_certificate_request(body))
                out = certs.ev_certificate_answer(res)
        except (TimeoutError, ConnectionError, CallFailed, Refused) as e:
            what = "SignCertificate" if sign else "Get15118EVCertificate"
            log.info("ocpp %s: %s not answered (%s): the site answers", req.device, what, type(e).__name__)
            self.fallback(req, self.now())
            return
        self._answer(req, out)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.spawn(coro)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task of the face (cancelled at close)."""
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _station(self, device: str, info: BoardInfo) -> Station:
        st = self.stations.get(device)
        if st is None:
            st = self.stations[device] = Station(self, device, info, None)
            held = self.orphans.pop(device, [])
            if held:
                st.add(held, offline=True)
        if self.started:
            st.start()
        return st

    async def _boot(self, req: BoardRequest) -> None:
        body = req.frame.body if isinstance(req.frame.body, dict) else {}
        info = board_info(body)
        st = self._station(req.device, info)
        await self.registered(req.device, info, st.registration)
        fut = st.boot(info)
        try:
            reg, _ = await asyncio.wait_for(asyncio.shield(fut), BOOT_WAIT_S)
        except TimeoutError:  # the CSMS is away: what it decided last, else Pending
            reg = st.registration if st.registration is not None else Registration.PENDING
        self._answer(req, {Key.REGISTRATION: int(reg), Key.INTERVAL_S: self.heartbeat_s})

    async def _authorize(self, st: Station, req: BoardRequest) -> None:
        assert req.token is not None and st.link is not None
        tt = req.frame.body.get(Key.TOKEN_TYPE) if isinstance(req.frame.body, dict) else None
        try:
            res = await asyncio.wait_for(st.link.call("Authorize", {"idToken": id_token(req.token, tt)}),
                                         AUTHORIZE_WAIT_S)  # fmt: skip
        except (TimeoutError, ConnectionError, CallFailed) as e:
            log.info("ocpp %s: Authorize not answered (%s): the site decides", req.device, type(e).__name__)
            self.fallback(req, self.now())
            return
        info = res["idTokenInfo"]
        status = down.authorize_answer(str(info["status"]))
        expiry = down.proto_time(info["cacheExpiryDateTime"]) if info.get("cacheExpiryDateTime") else None
        self.site.auth.remember(req.token, status, expiry)  # OCPP's Authorization Cache (C10)
        body: dict[int, Any] = {Key.AUTH_STATUS: status}
        if expiry is not None:
            body[Key.EXPIRY] = expiry
        if status != AuthStatus.ACCEPTED:
            body[Key.REASON] = f"{AUTH_STATUS[status]} at the CSMS"
        self._answer(req, body)

    def _answer(self, req: BoardRequest, body: dict[int, Any]) -> None:
        conn = req.conn
        if conn.closed:
            return
        f = req.frame
        now = self.now()
        if f.action == Action.BOOT_NOTIFICATION:
            body[Key.TIME] = proto_ts(now)
        with contextlib.suppress(Exception):
            conn.send_one(conn.link.respond(f.msg_id, f.prio, f.action, body, now))

    def snapshot(self) -> dict[str, Any]:
        return {
            "stations": {
                d: {"state": s.state, "queued": len(s.rows), "sent": s.sent, "dropped": s.dropped}
                for d, s in self.stations.items()
            },
            "orphan_rows": sum(len(v) for v in self.orphans.values()),
            "awaiting_other_northbound": self.gate.waiting,
        }


SiteCall = Callable[[OcppBridge, str, Payload], Awaitable[Payload]]
SITE_CALLS: dict[str, SiteCall] = {
    "TriggerMessage": OcppBridge._trigger,
    "SetVariableMonitoring": OcppBridge._set_monitoring,
    "ClearVariableMonitoring": OcppBridge._clear_monitoring,
    "GetDisplayMessages": OcppBridge._get_displays,
    "UpdateFirmware": lambda br, d, p: br.jobs.update_firmware(d, p),
    "GetLog": lambda br, d, p: br.jobs.get_log(d, p),
    "InstallCertificate": lambda br, d, p: br.jobs.install_certificate(d, p),
    "DeleteCertificate": lambda br, d, p: br.jobs.delete_certificate(d, p),
    "GetInstalledCertificateIds": lambda br, d, p: br.jobs.installed_ids(d, p),
}
"""CSMS calls the bridge answers itself, asking the board what it needs (none, one or several requests)."""
CARRIED: dict[str, Callable[[Payload], down.ToBoard]] = {**down.COMMANDS, "CertificateSigned": certs.signed}
"""The calls one board request answers."""
