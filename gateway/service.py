"""The site gateway: LAN links → Rust queue → durable outbox → acks → uplink; commands back.

Rule: a board's event is acked only once durable, urgent frames are dispatched and relayed
before anything else, and a board request always gets an answer.

One asyncio loop. `wake()` schedules one dispatch round that pops the shared PriorityQueue
urgent-first (`dispatch_now` does the urgent frames at once, in their read callback):
events go to the outbox (acked to their board once committed, then relayed; urgent ones
are relayed at once, in parallel with their commit), requests down the board-request chain
(roaming endpoint → CSMS over the uplink → local CSMS, gateway/boards.py), responses to the
request that waits for them (`Boards.answered`). Requests from the CSMS go to the command
path (gateway/commands.py). `Gateway` builds the parts and wires them; each part sees only
the small `Protocol` it declares of the gateway (`lan.LanSite`, `commands.CommandSite`,
`forward.ForwardSite`, `localcsms.roaming.RoamingSite`, `metrics.Observed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import _core
from gateway.boards import BoardRequest, Boards, board_request
from gateway.commands import CommandPath
from gateway.config import Config
from gateway.devices import Devices
from gateway.forward import Forwarder
from gateway.lan import BoardConnection, LanServer, serve
from gateway.languard import LanGuard
from gateway.link import FloodPolicy, Link
from gateway.localcsms.answer import LocalCsms
from gateway.localcsms.auth import Authorizer
from gateway.localcsms.clock import Clock
from gateway.localcsms.fwcache import FirmwareCache
from gateway.localcsms.power import PowerManager
from gateway.localcsms.roaming import SiteRoaming
from gateway.metrics import UrgentTrace
from gateway.outbox import Committer, Outbox, Row
from gateway.schema import MESSAGES, Action, ErrorCode, Key, Kind, Priority
from gateway.uplink.relay import Uplink
from gateway.uplink.runner import UplinkRunner

log = logging.getLogger("gateway")

DISPATCH_CHUNK = 512
"""Rows popped from the queue at a time by a dispatch round."""
DISPATCH_BUDGET_S = 0.002
"""Time a dispatch round may use before the loop reads the links again (it yields to urgent
frames read meanwhile, which are dispatched in their read callback)."""
TOKEN_MEMORY = 100_000
"""Plaintext id tokens of accepted frames kept for their Relay items (`Uplink.token_uids`)."""
_EVENT = int(Kind.EVENT)
_URGENT = int(Priority.URGENT)
_FW_STATUS = int(Action.FIRMWARE_STATUS)
_DURABLE = {code: spec.durable for code, spec in MESSAGES.items()}
"""Events acked to their board once stored, by action."""


class Gateway:
    """The site: builds the parts from the configuration, owns the dispatch and the counters."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        site, lan, ob, up, fw = cfg.site, cfg.lan, cfg.outbox, cfg.upstream, cfg.firmware
        self.site_id = site.id
        self.devices = Devices(site.devices_path, cfg.devices.factory_seed, cfg.devices.dev_seed,
                               cfg.devices.dev_prefix)  # fmt: skip
        self.outbox = Outbox(site.outbox_path, ob.synchronous)
        self.committer = Committer(self.outbox, ob.commit_max_rows, ob.commit_max_bytes)
        self.auth = Authorizer(site.data_dir / "localcsms.sqlite", cfg.auth.unknown_token_offline)
        self.power = PowerManager(cfg.power.site_limit_w, cfg.power.zones, cfg.power.min_evse_w)
        self.firmware = FirmwareCache(site.data_dir / "fwcache", fw.cache, fw.cache_max_bytes)
        self.local_csms_cert = local_csms_cert_der(site.local_csms_cert)
        """DER of the gateway's own certificate as local CSMS (M17), b"" when none is configured."""
        self.clock = Clock()
        # What the hot path reads, copied out of the configuration once.
        self.heartbeat_s = lan.heartbeat_s
        self.queue_high = lan.queue_high
        self.max_rows = ob.max_rows
        self.alarm_rows = ob.alarm_ratio * ob.max_rows
        self.chunk = min(ob.commit_max_rows, DISPATCH_CHUNK)
        self.chunk_bytes = ob.commit_max_bytes
        self.fifo = up.fifo
        self.queue = _core.PriorityQueue(max_items=lan.queue_high * 4, max_bytes=256 << 20)
        self.flood = FloodPolicy(lan.max_bad_frames, lan.bad_window_s, lan.throttle_s)
        self.guard = LanGuard(lan, self.flood)
        """Connection caps, deadlines, closures by cause, the flood memory (gateway/languard.py)."""
        self.connections: set[BoardConnection] = set()
        self.boards: Boards[BoardConnection] = Boards(self.clock.now)
        self.online = self.boards.online
        """device id → its open link (`Boards.online`)."""
        self.uplink = Uplink(site.id, up.relay_max_frames, up.fifo)
        self.trace = UrgentTrace()
        """Ingress → sent timings of the urgent frames (/urgent, /status, /metrics)."""
        self.uplink.trace = self.trace
        pending = self.outbox.pending()
        self.uplink.add(pending)
        self.pending_rows = len(pending)
        self.runner: UplinkRunner | None = None
        self.paused: set[BoardConnection] = set()
        self._scheduled = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._server: LanServer | None = None
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
        # The board-request chain, and the command path (CSMS → site).
        self.local = LocalCsms(self.auth, self.firmware, lan.heartbeat_s, self.count_name)
        self.forwarder = Forwarder(self, site.id, self.local.answer)
        self.command_path = CommandPath(self, up.signers, fw, self.forwarder)
        self.roaming = SiteRoaming(self, site.id, cfg.roaming) if cfg.roaming.enabled else None
        # M4: a rollout's records are written on the outbox's writer thread, so that a board's
        # FirmwareStatus is on disk before the commit that acks it.
        self.firmware.rollouts.bind(self.run_sync, self.boards.deliver)

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        cfg = self.cfg
        self._server = await serve(self, cfg.lan.host, cfg.lan.port)
        if cfg.upstream.enabled:
            self.runner = UplinkRunner(self.uplink, cfg.upstream, self.site_id, self.relayed_acked,
                                       self.command_path.handle)  # fmt: skip
            self._tasks.append(asyncio.create_task(self.runner.run()))
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        self._tasks.append(asyncio.create_task(self._watch_devices()))
        self._tasks.extend(self.firmware.rollouts.resume())  # M4: staged rollouts a restart interrupted

    @property
    def lan_port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.close("shutdown")
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

    def run_sync(self, fn: Callable[[], object]) -> asyncio.Future[object]:
        """Runs `fn` on the outbox's writer thread (the one that touches the site's databases)."""
        return self.committer.run_sync(fn)

    async def oldest_pending_ms(self) -> int | None:
        """Acceptance time (Unix ms) of the oldest row owed upstream (read on the writer thread)."""
        oldest = await self.run_sync(self.outbox.oldest_pending_ms)
        return oldest if isinstance(oldest, int) else None

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(5)
            horizon = int((time.time() - self.cfg.outbox.dedup_horizon_s) * 1000)
            await self.run_sync(functools.partial(self.outbox.prune, horizon))

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
                        conn.close("deregistered")

    # ------------------------------------------------------------ links

    def link_opened(self, conn: BoardConnection) -> None:
        self.boards.opened(conn)

    def link_closed(self, conn: BoardConnection) -> None:
        self.boards.closed(conn)
        self.paused.discard(conn)

    def count_rejections(self, link: Link) -> None:
        for name, n in link.rejected.items():
            self.rejections[name] = self.rejections.get(name, 0) + n
        link.rejected.clear()

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
        chunk, chunk_bytes = self.chunk, self.chunk_bytes
        while len(queue) and not committer.full:
            self._dispatch_batch(queue.pop_batch(chunk, chunk_bytes), now)
            if time.perf_counter() > deadline:
                break
        if len(queue):
            if not committer.full:
                self.wake()
        elif self.paused and len(queue) < self.queue_high // 2:
            for c in list(self.paused):
                c.resume()
            self.paused.clear()
        self._check_alarm()

    def _dispatch_batch(self, batch: list[tuple[int, int, int, int, bytes]], now: float) -> None:
        """Events to the outbox (urgent ones also to the uplink at once), requests to the
        local CSMS, responses to the command waiting for them."""
        committer = self.committer
        seq0 = seq = committer.next_seq
        by_idx = self.boards.by_idx
        durable = _DURABLE
        fw_watch = self.firmware.watchers
        new_row = tuple.__new__
        # urgent rows first (the queue pops them first), then the others, each in acceptance order
        u_rows: list[Row] = []
        u_meta: list[tuple[BoardConnection | None, int, int, int]] = []
        rows: list[Row] = []
        meta: list[tuple[BoardConnection | None, int, int, int]] = []
        full: dict[BoardConnection, list[bytes]] = {}
        room = seq0 + self.max_rows - self.pending_rows - committer.waiting
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
                self.boards.answered(idx, msg_id, frame)
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
            early = not self.fifo and self.runner is not None
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
        """Frames about to be stored: the plaintext of their id tokens (the link that accepted
        them holds E_up) goes with their Relay items as `token_uid` (docs/upstream.md). Key 16
        (id_token) followed by a bin8 is a cheap filter: most frames carry no token."""
        cand = [r for r in rows if b"\x10\xc4" in r[4]]
        if not cand:
            return
        tokens = self.uplink.token_uids
        online = self.online
        for r in cand:
            conn = online.get(r[1])
            if conn is None or not conn.link.e_up:
                continue
            f = _core.decode(r[4])
            ct = f.body.get(Key.ID_TOKEN)
            if isinstance(ct, bytes):
                tokens[r[1], r[2]] = conn.link.decrypt(f.seq, Key.ID_TOKEN, ct).decode("utf-8", "replace")
        while len(tokens) > TOKEN_MEMORY:
            del tokens[next(iter(tokens))]

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
        alarm = self.pending_rows >= self.alarm_rows
        if alarm and not self.outbox_alarm:
            log.warning("outbox alarm: %d of %d rows held (upstream away?)", self.pending_rows, self.max_rows)
        self.outbox_alarm = alarm

    # ------------------------------------------------------------ board requests

    def _board_request(self, conn: BoardConnection, frame: bytes, now: float) -> None:
        """Decoded once, then down the chain: the roaming endpoint for a token nobody here
        knows (when configured), the CSMS for what must go upstream, else the local CSMS."""
        req = board_request(conn, frame, self.auth, now)
        if self.roaming is not None:
            self.roaming.board_request(req, now, self._upstream_or_local)
        else:
            self._upstream_or_local(req, now)

    def _upstream_or_local(self, req: BoardRequest, now: float) -> None:
        if not self.forwarder.forward(req, now):  # forwarded: the CSMS answers it
            self.local.answer(req, now)

    # ------------------------------------------------------------ views

    def snapshot(self) -> dict[str, Any]:
        r = self.runner
        return {
            "site": self.site_id,
            "uptime_s": round(time.time() - self.started, 1),
            "links": len(self.online),
            "connections": len(self.connections),
            "lan": self.guard.snapshot(len(self.connections)),
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
            "uplink_path": r.path_state() if r else {},
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
