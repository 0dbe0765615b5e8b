"""The sans-I/O protocol core of one gateway connection (docs/upstream.md, docs/csms.md).

`SiteConnection` never touches a socket or a clock: the glue feeds it the bytes of each
stream with `now` (`stream_data`), calls `poll(now)` periodically to send queued Commands,
and transmits the `SendData`/`CloseConnection` outputs it returns. The store is the only
collaborator; a Relay is acknowledged only after its rows are committed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final

from evedge_csms import outcomes, revocation
from evedge_csms.inbound import HANDLERS, Ctx, Relayed
from evedge_csms.wire import (
    Envelope,
    WireError,
    answerable_action,
    decode_up,
    encode_up,
    error_body,
    proto_time,
)
from gateway import _core
from gateway.protocol.upstream_wire import CLASS_ORDER, StreamReader, UpstreamFrameError, prefix
from gateway.schema import MESSAGES, Action, ErrorCode, Key, Kind, Priority

log = logging.getLogger("csms.core")

PROTOCOL_VERSION: Final = 1
BOARD_ORIGINS: Final = frozenset({"cs", "any"})


@dataclass(frozen=True)
class SendData:
    stream_id: int
    data: bytes


@dataclass(frozen=True)
class CloseConnection:
    error_code: int
    reason: str


Output = SendData | CloseConnection


def stream_class(stream_id: int) -> int:
    """Class of a client-initiated bidirectional stream: the first four are urgent, control,
    telemetry and bulk (the gateway opens them in that order); later ones are bulk transfers."""
    index = stream_id // 4
    return int(CLASS_ORDER[index]) if index < len(CLASS_ORDER) else int(Priority.BULK)


def command_stream(prio: int) -> int:
    """The server-initiated bidirectional stream that carries Commands of class `prio`."""
    return 1 + 4 * int(CLASS_ORDER.index(Priority(min(max(prio, 0), 3))))


class SiteConnection:
    def __init__(self, ctx: Ctx, peer_subject: str | None) -> None:
        self.ctx = ctx
        self.peer_subject = peer_subject
        self.site_id: str | None = None
        self._readers: dict[int, StreamReader] = {}
        self._broken: set[int] = set()
        self._seq: dict[int, int] = {}
        self._out: list[Output] = []
        self._sent_here: set[int] = set()
        self._cmd_streams = False
        self.closed = False
        self._lost = False

    # ------------------------------------------------------------------ inputs
    def stream_data(self, stream_id: int, data: bytes, now: float) -> list[Output]:
        if stream_id in self._broken or self.closed:
            return []
        reader = self._readers.setdefault(stream_id, StreamReader())
        try:
            frames = reader.feed(data)
        except UpstreamFrameError as e:
            # The stream cannot be re-synchronised: answer, then close (as on the LAN).
            self._broken.add(stream_id)
            self._error(stream_id, WireError(ErrorCode.OVERSIZE, str(e)), now)
            self._out.append(CloseConnection(int(ErrorCode.OVERSIZE), f"OVERSIZE: {e}"))
            self.closed = True
            return self._drain()
        for frame in frames:
            try:
                self._frame(stream_id, frame, now)
            except WireError as e:
                log.info("site %s stream %d: refused %s", self.site_id, stream_id, e)
                self._error(stream_id, e, now)
        return self._drain()

    def poll(self, now: float) -> list[Output]:
        """Send the site's queued Commands (and, after a reconnect, those never answered)."""
        if self.site_id is None or self.closed:
            return []
        store = self.ctx.store
        ts = proto_time(now)
        for cmd in store.select("commands", {"site_id": self.site_id}, order="cmd_id"):
            if cmd["state"] not in ("queued", "sent") or cmd["cmd_id"] in self._sent_here:
                continue
            if cmd["expiry"] is not None and ts > cmd["expiry"]:
                store.update("commands", {"state": "expired", "done": int(now)}, {"cmd_id": cmd["cmd_id"]})
                continue
            self._send_command(cmd, now)
            store.update("commands", {"state": "sent", "sent": int(now)}, {"cmd_id": cmd["cmd_id"]})
        return self._drain()

    def connection_lost(self, now: float) -> None:
        if self._lost:
            return
        self._lost = self.closed = True
        if self.site_id is not None:
            self.ctx.store.update("sites", {"connected": 0, "last_seen": int(now)}, {"site_id": self.site_id})

    # ------------------------------------------------------------------ frames
    def _frame(self, stream_id: int, frame: bytes, now: float) -> None:
        env = decode_up(frame)
        ids = {"msg_id": env.msg_id, "action": env.action, "prio": env.prio}
        if env.kind == Kind.REQUEST and env.action == Action.SITE_HELLO:
            self._site_hello(stream_id, env, now)
            return
        if self.site_id is None:
            raise WireError(ErrorCode.REJECTED, "SiteHello must be the first frame of a connection", **ids)
        if env.kind == Kind.EVENT and env.action == Action.RELAY:
            self._relay(stream_id, env, now)
        elif env.kind == Kind.EVENT and env.action == Action.BOARDS_REPORT:
            self._site_check(env)
            self._boards_report(env.body, now)
        elif env.kind == Kind.EVENT and env.action == Action.SITE_FORECAST:
            self._site_check(env)
            store = self.ctx.store
            store.insert(
                "forecasts",
                {
                    "forecast_id": store.next_id("forecast"),
                    "site_id": self.site_id,
                    "zone": env.body.get(Key.ZONE),
                    "at": int(now),
                    "forecast": env.body[Key.FORECAST],
                },
            )
        elif env.kind in (Kind.RESPONSE, Kind.ERROR):
            self._answer(env, now)
        elif env.kind == Kind.ACK:
            pass
        else:
            name = MESSAGES[env.action].name
            raise WireError(ErrorCode.NOT_SUPPORTED, f"{name} is not handled by the CSMS", **ids)

    def _boards_report(self, body: dict[int, Any], now: float) -> None:
        """M1: the site's inventory replaces the one held; a large site's comes in pages (page 0
        replaces, the next ones add, in order: they travel on one stream)."""
        store = self.ctx.store
        evses = list(body[Key.EVSES])
        with store.transaction():
            if body.get(Key.PAGE, 0):
                held = store.get("boards_reports", site_id=self.site_id)
                evses = list(held["evses"] if held else []) + evses
            store.upsert("boards_reports", {"site_id": self.site_id, "at": int(now), "evses": evses})

    def _site_check(self, env: Envelope) -> None:
        site = env.body.get(Key.SITE_ID)
        if site != self.site_id:
            raise WireError(
                ErrorCode.REJECTED,
                f"site_id {site!r} is not this connection's site {self.site_id!r}",
                msg_id=env.msg_id,
                action=env.action,
                prio=env.prio,
                field=int(Key.SITE_ID),
            )

    def _site_hello(self, stream_id: int, env: Envelope, now: float) -> None:
        ids = {"msg_id": env.msg_id, "action": env.action, "prio": env.prio}
        site = env.body[Key.SITE_ID]
        if self.peer_subject is not None and site != self.peer_subject:
            raise WireError(
                ErrorCode.REJECTED,
                f"site_id {site!r} does not match the certificate CN {self.peer_subject!r}",
                field=int(Key.SITE_ID),
                **ids,
            )
        if self.site_id is not None and site != self.site_id:
            raise WireError(ErrorCode.REJECTED, "a connection speaks for one site", **ids)
        if not env.body[Key.VER_MIN] <= PROTOCOL_VERSION <= env.body[Key.VER_MAX]:
            raise WireError(ErrorCode.BAD_VERSION, f"this CSMS speaks version {PROTOCOL_VERSION}", **ids)
        self.site_id = site
        store = self.ctx.store
        with store.transaction():
            known = store.get("sites", site_id=site)
            store.upsert(
                "sites",
                {
                    "site_id": site,
                    "first_seen": known["first_seen"] if known else int(now),
                    "last_seen": int(now),
                    "connected": 1,
                    "schema_rev": env.body[Key.SCHEMA_REV],
                    "cert_subject": self.peer_subject,
                },
            )
        body: dict[int, Any] = {Key.VER: PROTOCOL_VERSION, Key.TIME: proto_time(now), Key.SCHEMA_REV: _core.SCHEMA_REV}
        crl = revocation.current(store)
        if crl is not None:  # M19: the site checks certificates against the revocations in force
            body[Key.CRL] = crl
        self._send(stream_id, Kind.RESPONSE, env.msg_id, env.prio, Action.SITE_HELLO, body, now)

    def _relay(self, stream_id: int, env: Envelope, now: float) -> None:
        self._site_check(env)
        assert self.site_id is not None
        items: list[Relayed] = []
        for i, item in enumerate(env.body[Key.FRAMES]):
            items.append(self._inner(i, item, env))
        store = self.ctx.store
        try:
            with store.transaction():
                for it in items:
                    f = it.frame
                    grp = 0 if f.kind in (Kind.REQUEST, Kind.EVENT) else 1
                    fresh = store.insert(
                        "received",
                        {
                            "site_id": it.site_id,
                            "device_id": it.device_id,
                            "msg_id": f.msg_id,
                            "grp": grp,
                            "action": f.action,
                            "relay_id": env.msg_id,
                            "at": int(now),
                        },
                        ignore=True,
                    )
                    if not fresh:
                        counters = self.ctx.counters
                        counters["redelivered"] = counters.get("redelivered", 0) + 1
                        continue  # redelivered: stored once, acknowledged again
                    handler = HANDLERS.get(f.action) if grp == 0 else None
                    if handler is not None:
                        handler(self.ctx, it, now)
        except WireError:
            raise
        except Exception as e:
            log.exception("relay %d of site %s not stored", env.msg_id, self.site_id)
            raise WireError(
                ErrorCode.INTERNAL,
                f"relay not stored: {type(e).__name__}: {e}",
                msg_id=env.msg_id,
                action=env.action,
                prio=env.prio,
            ) from None
        # Committed: now (and only now) the gateway may retire its rows.
        self._send(stream_id, Kind.ACK, env.msg_id, env.prio, Action.RELAY, {}, now)

    def _inner(self, index: int, item: dict[Any, Any], env: Envelope) -> Relayed:
        device = item[Key.DEVICE_ID]
        where = f"frames[{index}] ({device})"
        ids = {"msg_id": env.msg_id, "action": env.action, "prio": env.prio, "field": int(Key.FRAMES)}
        try:
            f = _core.decode(item[Key.FRAME])
        except _core.CoreError as e:
            raise WireError(e.code, f"{where}: {e.name}: {e.reason}", **ids) from None
        spec = MESSAGES[f.action]
        if f.kind in (Kind.REQUEST, Kind.EVENT) and spec.origin not in BOARD_ORIGINS:
            raise WireError(ErrorCode.BAD_KIND, f"{where}: {spec.name} is not sent by a charging station", **ids)
        secrets: dict[int, bytes] = {}
        uid = item.get(Key.TOKEN_UID)
        if isinstance(uid, str) and Key.ID_TOKEN in f.body:
            secrets[int(Key.ID_TOKEN)] = uid.encode()  # the gateway's plaintext of the encrypted id_token
        gid = item.get(Key.EVSE_GID)
        assert self.site_id is not None
        return Relayed(self.site_id, device, f, gid if isinstance(gid, str) else None, secrets)

    def _answer(self, env: Envelope, now: float) -> None:
        store = self.ctx.store
        cmd = store.get("commands", cmd_id=env.msg_id)
        if cmd is None or cmd["site_id"] != self.site_id:
            log.info("site %s answered unknown command %d", self.site_id, env.msg_id)
            return
        with store.transaction():
            if env.kind == Kind.ERROR:
                reason = f"{ErrorCode(env.body[Key.ERROR_CODE]).name}: {env.body.get(Key.REASON, '')}"
                store.update(
                    "commands", {"state": "failed", "reason": reason, "done": int(now)}, {"cmd_id": env.msg_id}
                )
                return
            outcomes.record(self.ctx, cmd, env.action, env.body, now)

    # ------------------------------------------------------------------ outputs
    def _stream_for(self, prio: int) -> int:
        """The CSMS's own stream of a class: server-initiated bidirectional streams 1, 5, 9,
        13 (urgent, control, telemetry, bulk), opened by their first Command (docs/upstream.md)."""
        if not self._cmd_streams:
            # aioquic treats a local stream id below the highest one opened as finished:
            # open the four in order (an empty write only creates the stream).
            self._cmd_streams = True
            self._out.extend(SendData(command_stream(p), b"") for p in CLASS_ORDER)
        return command_stream(prio)

    def _send_command(self, cmd: dict[str, Any], now: float) -> None:
        prio = int(cmd["prio"])
        if cmd["wrap"]:
            body: dict[Any, Any] = {Key.TARGETS: list(cmd["targets"]), Key.FRAME: cmd["frame"]}
            if cmd["expiry"] is not None:
                body[Key.EXPIRY] = cmd["expiry"]
            if cmd["signature"] is not None:
                body[Key.SIGNATURE] = cmd["signature"]
                body[Key.SIGNER] = cmd["signer"]
            action, prio = int(Action.COMMAND), min(prio, int(MESSAGES[Action.COMMAND].priority))
        else:
            inner = _core.decode(cmd["frame"])
            action, body = inner.action, dict(inner.body)
        self._send(self._stream_for(prio), Kind.REQUEST, cmd["cmd_id"], prio, action, body, now)
        self._sent_here.add(cmd["cmd_id"])

    def _send(
        self, stream_id: int, kind: int, msg_id: int, prio: int, action: int, body: dict[Any, Any], now: float
    ) -> None:
        seq = self._seq.get(stream_id, 0) + 1
        self._seq[stream_id] = seq
        frame = encode_up(kind, seq, msg_id, prio, proto_time(now), action, body)
        self._out.append(SendData(stream_id, prefix(frame)))

    def _error(self, stream_id: int, e: WireError, now: float) -> None:
        body = error_body(e.code, e.reason, e.field)
        self._send(stream_id, Kind.ERROR, e.msg_id, e.prio, answerable_action(e.action), body, now)

    def _drain(self) -> list[Output]:
        out, self._out = self._out, []
        return out
