"""The site gateway: LAN links → Rust queue → durable outbox → acks → uplink; commands back.

One asyncio loop. `wake()` schedules one dispatch round that pops the shared
PriorityQueue urgent-first: events go to the outbox (acked to their board once committed,
then relayed), requests to the local CSMS, responses to the command that waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import _core
from gateway.config import Config
from gateway.devices import Devices
from gateway.lan import BoardConnection, serve
from gateway.link import FloodPolicy, State, proto_ts
from gateway.localcsms.auth import Authorizer
from gateway.localcsms.firmware import FirmwareCache
from gateway.localcsms.power import SITE, PowerManager
from gateway.localcsms.roaming import SiteRoaming, roaming_settings
from gateway.metrics import UrgentTrace
from gateway.outbox import Committer, Outbox, Row
from gateway.schema import (
    EPOCH_UNIX,
    MESSAGES,
    Action,
    AuthStatus,
    ErrorCode,
    Key,
    Kind,
    Priority,
    Registration,
    Status,
)
from gateway.upstream import CommandPath, Uplink, UplinkRunner, UplinkSettings

log = logging.getLogger("gateway")

DISPATCH_CHUNK = 512
"""Rows popped from the queue at a time by a dispatch round."""
DISPATCH_BUDGET_S = 0.002
"""Time a dispatch round may use before the loop reads the links again (it yields to urgent
frames read meanwhile, which are dispatched in their read callback)."""
_EVENT = int(Kind.EVENT)
_URGENT = int(Priority.URGENT)
_FW_STATUS = int(Action.FIRMWARE_STATUS)
_DURABLE = {code: spec.durable for code, spec in MESSAGES.items()}
"""Events acked to their board once stored, by action."""


class Clock:
    """The site's time source (B13): the local clock, corrected by the CSMS time of
    SiteHello when they differ by more than a second."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def upstream_time(self, proto_seconds: int) -> None:
        skew = EPOCH_UNIX + proto_seconds - time.time()
        self.offset = skew if abs(skew) > 1.5 else 0.0


class Gateway:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.devices = Devices(cfg.devices_path, cfg.factory_seed, cfg.dev_seed, cfg.dev_prefix)
        self.outbox = Outbox(cfg.outbox_path, cfg.synchronous)
        self.committer = Committer(self.outbox, cfg.commit_max_rows, cfg.commit_max_bytes)
        self.auth = Authorizer(cfg.data_dir / "localcsms.sqlite", cfg.unknown_token_offline)
        self.power = PowerManager(cfg.site_limit_w, cfg.zones, cfg.min_evse_w)
        self.firmware = FirmwareCache(cfg.data_dir / "fwcache", cfg.fw_cache, cfg.fw_cache_max_bytes)
        self.local_csms_cert = local_csms_cert_der(cfg.local_csms_cert)
        """DER of the gateway's own certificate as local CSMS (M17), b"" when none is configured."""
        self.clock = Clock()
        self.queue = _core.PriorityQueue(max_items=cfg.queue_high * 4, max_bytes=256 << 20)
        self.flood = FloodPolicy(cfg.max_bad_frames, cfg.bad_window_s, cfg.throttle_s)
        self.connections: set[BoardConnection] = set()
        self.online: dict[str, BoardConnection] = {}
        self.by_idx: dict[int, BoardConnection] = {}
        self.came_online: dict[str, asyncio.Event] = {}
        self.pending_cmds: dict[tuple[int, int], asyncio.Future[bytes]] = {}
        self.uplink = Uplink(cfg.site_id, cfg.relay_max_frames, cfg.fifo)
        self.trace = UrgentTrace()
        """Ingress → sent timings of the urgent frames (/urgent, /status, /metrics)."""
        self.uplink.trace = self.trace
        pending = self.outbox.pending()
        self.uplink.add(pending)
        self.pending_rows = len(pending)
        self.runner: UplinkRunner | None = None
        self.paused: set[BoardConnection] = set()
        self._scheduled = False
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.Server | None = None
        # counters for metrics
        self.frames_in = 0
        self.frames_stored = 0
        self.duplicates = 0
        self.early_relayed = 0
        """Urgent rows handed to the uplink before their commit."""
        self.early_duplicates = 0
        """Of those, duplicates of a row already held: relayed again, deduplicated upstream."""
        self.throttled = 0
        self.rejections: dict[str, int] = {}
        self.outbox_alarm = False
        self.started = time.time()
        self.command_path = CommandPath(self)
        self.roaming = SiteRoaming(self, roaming_settings(cfg)) if cfg.roaming_enabled else None

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        cfg = self.cfg
        self._server = await serve(self, cfg.lan_host, cfg.lan_port)
        if cfg.upstream_enabled:
            assert cfg.ca_file and cfg.cert_file and cfg.key_file
            settings = UplinkSettings(
                cfg.upstream_host, cfg.upstream_port, cfg.server_name, str(cfg.ca_file), str(cfg.cert_file),
                str(cfg.key_file), cfg.bulk_unsent_max, cfg.inflight_max_bytes, cfg.backoff_min_s, cfg.backoff_max_s,
                cfg.idle_timeout_s, relay_max_bytes=cfg.relay_max_bytes, connect_timeout_s=cfg.connect_timeout_s,
                max_datagram_size=cfg.max_datagram_size, bulk_queue_ms=cfg.bulk_queue_ms,
            )  # fmt: skip
            self.runner = UplinkRunner(self.uplink, settings, cfg.site_id, self.relayed_acked, self.upstream_request)
            self._tasks.append(asyncio.create_task(self.runner.run()))
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        self._tasks.append(asyncio.create_task(self._watch_devices()))
        self._tasks.extend(self.command_path.resume_rollouts())  # M4: staged rollouts a restart interrupted

    @property
    def lan_port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.committer.drain()
        self.committer.close()
        self.outbox.close()
        self.firmware.close()
        self.devices.close()
        self.auth.close()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(5)
            horizon = int((time.time() - self.cfg.dedup_horizon_s) * 1000)
            await self.committer.run_sync(functools.partial(self.outbox.prune, horizon))

    async def _watch_devices(self, period_s: float = 1.0) -> None:
        """`python -m gateway devices` writes the device table from another process: a new
        or re-keyed device is read at its next Hello; a device deregistered or handed over
        while its link is open loses the link here (a cheap `data_version` check per period,
        the table read only after a change)."""
        while True:
            await asyncio.sleep(period_s)
            if self.online and self.devices.changed_elsewhere():
                for did in self.devices.inactive(list(self.online)):
                    conn = self.online.get(did)
                    if conn is not None:
                        log.info("device %s is no longer active at this site: link closed", did)
                        conn.close()

    # ------------------------------------------------------------ links

    def link_opened(self, conn: BoardConnection) -> None:
        did = conn.link.device_id
        old = self.online.get(did)
        if old is not None and old is not conn:
            old.close()  # a board reconnecting replaces its stale link
        self.online[did] = conn
        self.by_idx[conn.link.idx] = conn
        ev = self.came_online.pop(did, None)
        if ev is not None:
            ev.set()

    def link_closed(self, conn: BoardConnection) -> None:
        did = conn.link.device_id
        if did and self.online.get(did) is conn:
            del self.online[did]
            self.by_idx.pop(conn.link.idx, None)
        self.paused.discard(conn)
        for key, fut in list(self.pending_cmds.items()):
            if key[0] == conn.link.idx and not fut.done():
                fut.set_exception(ConnectionError("link closed"))

    def count_rejections(self, conn_link: Any) -> None:
        for name, n in conn_link.rejected.items():
            self.rejections[name] = self.rejections.get(name, 0) + n
        conn_link.rejected.clear()

    def count_name(self, name: str) -> None:
        self.rejections[name] = self.rejections.get(name, 0) + 1

    def pause(self, conn: BoardConnection) -> None:
        conn.pause()
        self.paused.add(conn)

    # ------------------------------------------------------------ dispatch

    def wake(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def dispatch_now(self) -> None:
        """Dispatches the urgent frames at once (they were just read): only them, so that an
        urgent frame never waits for the dispatch of bulk frames read before it; the round
        scheduled by `wake` finds the rest."""
        n_urgent = self.queue.len_class(Priority.URGENT)
        if n_urgent:
            self._dispatch_batch(self.queue.pop_batch(n_urgent), self.clock.now())
        if len(self.queue):
            self.wake()

    def _dispatch(self) -> None:
        """One round: the urgent frames first, then the others in chunks of at most
        `DISPATCH_CHUNK` rows until the committer is full, the queue is empty or the round
        has used `DISPATCH_BUDGET_S`; then the loop reads the links again (an urgent frame
        read meanwhile is dispatched in its own read callback)."""
        self._scheduled = False
        cfg = self.cfg
        queue = self.queue
        committer = self.committer
        now = self.clock.now()
        n_urgent = queue.len_class(Priority.URGENT)
        if n_urgent:
            # Urgent frames do not wait for a full committer: they get a commit of their own, next.
            self._dispatch_batch(queue.pop_batch(n_urgent), now)
        if committer.full:
            return  # the commit in progress calls wake() when it is done
        deadline = time.perf_counter() + DISPATCH_BUDGET_S
        chunk = min(cfg.commit_max_rows, DISPATCH_CHUNK)
        while len(queue) and not committer.full:
            self._dispatch_batch(queue.pop_batch(chunk, cfg.commit_max_bytes), now)
            if time.perf_counter() > deadline:
                break
        if len(queue):
            if not committer.full:
                self.wake()
        elif self.paused and len(queue) < cfg.queue_high // 2:
            for c in list(self.paused):
                c.resume()
            self.paused.clear()
        self._check_alarm()

    def _dispatch_batch(self, batch: list[tuple[int, int, int, int, bytes]], now: float) -> None:
        """Events to the outbox (urgent ones also to the uplink at once), requests to the
        local CSMS, responses to the command waiting for them."""
        cfg = self.cfg
        committer = self.committer
        seq0 = seq = committer.next_seq
        by_idx = self.by_idx
        durable = _DURABLE
        fw_watch = self.firmware.watchers
        new_row = tuple.__new__
        # urgent rows first (the queue pops them first), then the others, each in acceptance order
        u_rows: list[Row] = []
        u_meta: list[tuple[BoardConnection | None, int, int, int]] = []
        rows: list[Row] = []
        meta: list[tuple[BoardConnection | None, int, int, int]] = []
        full: dict[BoardConnection, list[bytes]] = {}
        room = seq0 + cfg.outbox_max_rows - self.pending_rows - committer.waiting
        # Frames of one read arrive together: the link of the previous frame is usually this one's.
        last_idx, conn, device = -1, None, ""
        event, urgent = _EVENT, _URGENT
        nbytes = 0
        for prio, idx, msg_id, action, frame in batch:
            if idx != last_idx:
                last_idx = idx
                conn = by_idx.get(idx)
                device = conn.link.device_id if conn is not None else ""
            b = frame[2]
            kind = b if b < 0x80 else _core.decode(frame).kind
            if kind == event:
                if seq >= room:
                    if conn is not None:
                        reason = "outbox full: event not stored, resend later"
                        full.setdefault(conn, []).append(
                            conn.link.error(ErrorCode.QUEUE_FULL, reason, msg_id, prio, action, now)
                        )
                        self.count_name("QUEUE_FULL")
                    continue
                if conn is None:
                    device = self.devices.name_of(idx)
                if fw_watch and action == _FW_STATUS:  # a staged rollout waits for it
                    self.firmware.status(device, _core.decode(frame).body)
                m = (conn, prio, msg_id, action if durable[action] else -1)
                if prio == urgent:
                    u_rows.append(new_row(Row, (seq, device, msg_id, prio, frame)))
                    u_meta.append(m)
                else:
                    rows.append(new_row(Row, (seq, device, msg_id, prio, frame)))
                    meta.append(m)
                    nbytes += len(frame)
                seq += 1
            elif kind == Kind.REQUEST:
                if conn is not None:
                    self._board_request(conn, frame, now)
            elif kind in (Kind.RESPONSE, Kind.ERROR):
                fut = self.pending_cmds.pop((idx, msg_id), None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
        committer.next_seq = seq
        for c, frames in full.items():
            c.write(frames)
        if u_rows:
            t_disp = time.perf_counter()
            accepted = self.trace.accepted
            for r, m in zip(u_rows, u_meta, strict=True):
                uc = m[0]
                if uc is not None:
                    accepted(r[0], r[1], r[2], uc.read_wall, uc.read_pc, t_disp)
            self._accepted(u_rows)
            early = not cfg.fifo and self.runner is not None
            if early:
                # Relayed now, in parallel with their commit: the board is acked only after
                # the commit; if the gateway dies before it, the board resends and the
                # CSMS deduplicates by (site, device, msg id).
                self.pending_rows += len(u_rows)
                self.uplink.add(u_rows)
                self.early_relayed += len(u_rows)
                assert self.runner is not None
                self.runner.kick(now=True)
            committer.submit(
                u_rows, lambda res: self._committed(u_rows, u_meta, res, urgent=True, early=early), urgent=True
            )
        if rows:
            b_rows, b_meta = rows, meta
            self._accepted(b_rows)
            committer.submit(b_rows, lambda res: self._committed(b_rows, b_meta, res), nbytes=nbytes)

    def _accepted(self, rows: list[Row]) -> None:
        """The command path notes the plaintext id tokens of the frames that carry one
        (key 16 followed by a bin8: a cheap filter, the same as the command path's)."""
        cand = [(r[1], r[2], r[3], r[4]) for r in rows if b"\x10\xc4" in r[4]]
        if cand:
            self.command_path.accepted(cand)

    def _committed(self, rows: list[Row], meta: list[tuple[BoardConnection | None, int, int, int]],
                   res: list[int | None] | BaseException, urgent: bool = False,
                   early: bool = False) -> None:  # fmt: skip
        now = self.clock.now()
        if isinstance(res, BaseException):
            log.error("outbox commit failed: %s", res)
            for conn, prio, msg_id, action in meta:
                if conn is not None and action >= 0:
                    reason = f"outbox commit failed ({type(res).__name__}); resend"
                    conn.send_one(conn.link.error(ErrorCode.INTERNAL, reason, msg_id, prio, action, now))
            # Rows relayed early stay owed to the uplink: relaying them again is harmless (the
            # CSMS deduplicates); the board resends them under the same ids.
            self.wake()
            return
        acks: dict[BoardConnection, list[tuple[int, int, int]]] = {}
        for conn, prio, msg_id, action in meta:
            if action >= 0 and conn is not None and not conn.closed:
                acks.setdefault(conn, []).append((prio, msg_id, action))
        for conn, items in acks.items():
            conn.write(conn.link.acks(items, now))
        dups = res.count(None)
        self.duplicates += dups
        self.frames_stored += len(rows) - dups
        if early:
            # Already in the uplink since their dispatch; a duplicate among them was relayed
            # too (the CSMS deduplicates it) and is counted as such.
            self.early_duplicates += dups
        else:
            new = rows if not dups else [r for r, s in zip(rows, res, strict=True) if s is not None]
            self.pending_rows += len(new)
            self.uplink.add(new)
            if self.runner is not None:
                self.runner.kick(now=urgent)
        self.wake()

    def relayed_acked(self, seqs: list[int]) -> None:
        self.pending_rows -= len(seqs)
        self.committer.retire(seqs)

    def _check_alarm(self) -> None:
        alarm = self.pending_rows >= self.cfg.outbox_alarm_ratio * self.cfg.outbox_max_rows
        if alarm and not self.outbox_alarm:
            log.warning(
                "outbox alarm: %d of %d rows held (upstream away?)", self.pending_rows, self.cfg.outbox_max_rows
            )
        self.outbox_alarm = alarm

    # ------------------------------------------------------------ local CSMS, board side

    def _board_request(self, conn: BoardConnection, frame: bytes, now: float) -> None:
        """Roaming endpoint first for a token nobody here knows (when configured), then the
        CSMS for what must go upstream, else the local CSMS."""
        if self.roaming is not None:
            self.roaming.board_request(self._upstream_or_local, conn, frame, now)
        else:
            self._upstream_or_local(conn, frame, now)

    def _upstream_or_local(self, conn: BoardConnection, frame: bytes, now: float) -> None:
        if not self.command_path.board_request(conn, frame, now):  # forwarded: the CSMS answers it
            self.answer_locally(conn, frame, now)

    def answer_locally(self, conn: BoardConnection, frame: bytes, now: float) -> None:
        """The local CSMS's answer to a board request (also when the CSMS was too slow)."""
        f = _core.decode(frame)
        link = conn.link
        a = f.action
        body: dict[int, Any]
        if a == Action.HEARTBEAT:
            body = {Key.TIME: proto_ts(now)}
        elif a == Action.TIME_SYNC:
            body = {Key.TIME: proto_ts(now), Key.TIME_MS: int(now * 1000) % 1000}
        elif a == Action.BOOT_NOTIFICATION:
            body = {
                Key.REGISTRATION: Registration.ACCEPTED,
                Key.INTERVAL_S: self.cfg.heartbeat_s,
                Key.TIME: proto_ts(now),
            }
        elif a == Action.AUTHORIZE:
            token_ct = f.body[Key.ID_TOKEN]
            token = link.decrypt(f.seq, Key.ID_TOKEN, token_ct).decode("utf-8", "replace")
            d = self.auth.authorize(token, proto_ts(now))
            body = {Key.AUTH_STATUS: d.status}
            if d.expiry is not None:
                body[Key.EXPIRY] = d.expiry
            if d.status != AuthStatus.ACCEPTED:
                body[Key.REASON] = f"token {d.source} at this site"
        elif a == Action.FIRMWARE_CHUNK and (
            chunk := self.firmware.chunk(int(f.body[Key.IMAGE_ID]), int(f.body[Key.OFFSET]))
        ):
            body = chunk  # M4: a verified image in the site's cache
        else:
            name = MESSAGES[a].name
            conn.send_one(
                link.error(ErrorCode.NOT_SUPPORTED, f"{name} is not served by this gateway", f.msg_id, f.prio, a, now)
            )
            self.count_name("NOT_SUPPORTED")
            return
        conn.send_one(link.respond(f.msg_id, f.prio, a, body, now))

    # ------------------------------------------------------------ commands from upstream

    async def upstream_request(self, f: _core.Frame) -> tuple[int, dict[int, Any]]:
        """A request from the CSMS: the command path of docs/upstream.md answers it."""
        return await self.command_path.handle(f)

    async def send_request(self, conn: BoardConnection, action: int, body: dict[int, Any], timeout: float,
                           prio: int | None = None) -> _core.Frame:  # fmt: skip
        """Sends a request to a board and waits for its response or error frame."""
        if conn.link.state is not State.OPEN:
            raise ConnectionError("link not open")
        msg_id, frame = conn.link.request(action, body, self.clock.now(), prio)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending_cmds[conn.link.idx, msg_id] = fut
        conn.send_one(frame)
        try:
            raw = await asyncio.wait_for(fut, timeout)
        finally:
            self.pending_cmds.pop((conn.link.idx, msg_id), None)
        return _core.decode(raw)

    async def _site_command(self, inner: _core.Frame) -> tuple[int, str]:
        b = inner.body
        if inner.action == Action.TOKEN_LIST:
            entries = [(str(t[Key.TOKEN_UID]), int(t[Key.AUTH_STATUS]), t.get(Key.EXPIRY)) for t in b[Key.TOKENS]]
            await self.committer.run_sync(
                lambda: self.auth.update_list(int(b[Key.LIST_VERSION]), b[Key.UPDATE_TYPE] == 0, entries)
            )
            return Status.ACCEPTED, ""
        if inner.action == Action.CLEAR_CACHE:
            self.auth.clear_cache()
            return Status.ACCEPTED, ""
        if inner.action == Action.DSO_LIMIT:
            r = await self._dso(b)
            return int(r[Key.STATUS]), str(r.get(Key.REASON, ""))
        if inner.action == Action.AVAILABLE_POWER:
            self.power.available_w = int(b[Key.AVAILABLE_W])
            late = await self.apply_power(None, Action.SET_CHARGING_PROFILE, None)
            return (Status.REJECTED, "late: " + ",".join(late)[:110]) if late else (Status.ACCEPTED, "")
        return Status.NOT_SUPPORTED, f"{MESSAGES[inner.action].name} is not a site command"

    async def _dso(self, b: dict[int, Any]) -> dict[int, Any]:
        """E5: the new limit reaches every affected board, which confirms, within the deadline."""
        zone = b.get(Key.ZONE)
        self.power.dso[SITE if zone is None else int(zone)] = int(b[Key.LIMIT_W])
        deadline_s = int(b[Key.DEADLINE_MS]) / 1000
        late = await self.apply_power(zone, Action.DSO_LIMIT, deadline_s)
        if late:
            return {Key.STATUS: Status.REJECTED, Key.REASON: ("not confirmed in time: " + ",".join(late))[:120]}
        return {Key.STATUS: Status.ACCEPTED}

    async def apply_power(self, zone: int | None, action: int, deadline_s: float | None) -> list[str]:
        """Sends each affected board its share; returns the boards that did not confirm in time."""
        online = list(self.online)
        shares = self.power.allocate(online)
        affected = self.power.affected(zone, online) if action == Action.DSO_LIMIT else online
        timeout = deadline_s if deadline_s is not None else MESSAGES[action].timeout_ms / 1000

        async def one(did: str) -> str | None:
            conn = self.online.get(did)
            if conn is None:
                return did
            w = shares.get(did, 0)
            if action == Action.DSO_LIMIT:
                body: dict[int, Any] = {Key.LIMIT_W: w, Key.DEADLINE_MS: int(timeout * 1000), Key.EVSE: 0}
            else:
                body = {
                    Key.EVSE: 0,
                    Key.PROFILE_ID: 1,
                    Key.STACK_LEVEL: 0,
                    Key.PURPOSE: 4,
                    Key.PERIODS: [{Key.START_S: 0, Key.LIMIT_W: w}],
                }
            try:
                ans = await self.send_request(conn, action, body, timeout)
            except (TimeoutError, ConnectionError):
                return did
            ok = ans.kind == Kind.RESPONSE and ans.body.get(Key.STATUS, 0) == Status.ACCEPTED
            return None if ok else did

        res = await asyncio.gather(*(one(d) for d in affected))
        return [d for d in res if d is not None]

    # ------------------------------------------------------------ views

    def snapshot(self) -> dict[str, Any]:
        r = self.runner
        return {
            "site": self.cfg.site_id,
            "uptime_s": round(time.time() - self.started, 1),
            "links": len(self.online),
            "connections": len(self.connections),
            "frames_in": self.frames_in,
            "frames_stored": self.frames_stored,
            "duplicates": self.duplicates,
            "early_relayed": self.early_relayed,
            "early_duplicates": self.early_duplicates,
            "queue": [self.queue.len_class(p) for p in range(4)],
            "outbox_backlog": self.pending_rows,
            "outbox_alarm": self.outbox_alarm,
            "uplink_unsent": [self.uplink.depth(p) for p in range(4)],
            "uplink_inflight": sum(len(x.rows) for x in self.uplink.inflight.values()),
            "relayed": self.uplink.relayed,
            "relay_acked": self.uplink.acked_frames,
            "upstream": r.state if r else "disabled",
            "upstream_connects": r.connects if r else 0,
            "upstream_error": r.last_error if r else "",
            "uplink_path": r.protocol.path_state() if r and r.protocol and r.protocol.ready else {},
            "rejections": dict(self.rejections),
            "throttled": self.throttled,
            "commits": self.committer.commits,
            "firmware_cache": self.firmware.snapshot(),
            "urgent_ingress_to_sent": self.trace.summary(),
        }


def local_csms_cert_der(path: Path | None) -> bytes:
    """The DER form of a PEM (or DER) certificate file; b"" without one."""
    if path is None:
        return b""
    raw = path.read_bytes()
    if b"-----BEGIN" not in raw:
        return raw
    return x509.load_pem_x509_certificate(raw).public_bytes(serialization.Encoding.DER)


def iter_prios() -> Iterable[int]:
    return (Priority.URGENT, Priority.CONTROL, Priority.TELEMETRY, Priority.BULK)
