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
from gateway.devices import ACTIVE, Devices
from gateway.forward import Forwarder
from gateway.lan import BoardConnection, LanServer, serve
from gateway.languard import LanGuard
from gateway.link import FloodPolicy, Link
from gateway.localcsms import hellokey
from gateway.localcsms.answer import LocalCsms
from gateway.localcsms.auth import Authorizer
from gateway.localcsms.clock import Clock
from gateway.localcsms.fwcache import FirmwareCache
from gateway.localcsms.power import PowerManager
from gateway.localcsms.registration import BootAnswers
from gateway.localcsms.reports import SiteReports
from gateway.localcsms.roaming import SiteRoaming
from gateway.localcsms.sharing import PowerControl, PowerStore
from gateway.localcsms.sitewide import SiteWide, SiteWideStore
from gateway.metrics import UrgentTrace
from gateway.ocpp.bridge import OcppBridge
from gateway.outbox import Committer, Outbox, Row
from gateway.protocol.revocation import Revocations, read_cas
from gateway.schema import MESSAGES, Action, ErrorCode, Key, Kind, Priority, Status
from gateway.security import SiteSecurity
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
_TX_EVENT = int(Action.TRANSACTION_EVENT)
_REPORTED = frozenset({_TX_EVENT, int(Action.NOTIFY_EV_NEEDS), int(Action.STATUS_NOTIFICATION)})
"""Events the site's reports follow (E3 forecast, M1 inventory)."""
_DURABLE = {code: spec.durable for code, spec in MESSAGES.items()}
"""Events acked to their board once stored, by action."""


class Gateway:
    """The site: builds the parts from the configuration, owns the dispatch and the counters."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        site, lan, ob, up, fw = cfg.site, cfg.lan, cfg.outbox, cfg.upstream, cfg.firmware
        self.site_id = site.id
        self.revocations = Revocations(site.data_dir / "crl.pem", read_cas(up.ca) if up.ca else [])
        """M19: the CSMS CA's revocation list in force (gateway/security.py)."""
        self.devices = Devices(site.devices_path, cfg.devices.factory_seed, cfg.devices.dev_seed,
                               cfg.devices.dev_prefix, cfg.devices.onboarding, self.revocations)  # fmt: skip
        self.outbox = Outbox(site.outbox_path, ob.synchronous)
        self.committer = Committer(self.outbox, ob.commit_max_rows, ob.commit_max_bytes)
        self.auth = Authorizer(site.data_dir / "localcsms.sqlite", cfg.auth.unknown_token_offline,
                               cfg.auth.online_trust_s)  # fmt: skip
        self.firmware = FirmwareCache(site.data_dir / "fwcache", fw.cache, fw.cache_max_bytes)
        self.local_csms_cert = local_csms_cert_der(site.local_csms_cert)
        """DER of the gateway's own certificate as local CSMS (M17), b"" when none is configured."""
        self.hello_signer = hellokey.load(site.local_csms_cert)
        """Signs the boards' Hello answers with that certificate's key when it is Ed25519 (M14/M17)."""
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
        pm = PowerManager(cfg.power.site_limit_w, cfg.power.zones, cfg.power.min_evse_w)
        self.power = PowerControl(pm, PowerStore(site.data_dir / "power.sqlite"), self.boards, self.clock.now,
                                  self.run_sync)  # fmt: skip
        """E1, E4, E5: the boards' shares of the site's power (gateway/localcsms/sharing.py)."""
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
        self.boot = BootAnswers(self.devices, cfg.devices.offline_registration, lan.heartbeat_s,
                                self._uplink_starting, self.clock.now)  # fmt: skip
        self.local = LocalCsms(self.auth, self.firmware, self.boot, self.count_name)
        self.boot.chain = self._upstream_or_local
        self.forwarder = Forwarder(self, site.id, self.local.answer)
        self.sitewide = SiteWide(SiteWideStore(site.data_dir / "sitewide.sqlite"), self.boards, self.auth,
                                 pm.zone_of, self._active_devices, self.clock.now, self.run_sync)  # fmt: skip
        """S5, E2, M10: site-wide commands handed on to the boards (gateway/localcsms/sitewide.py)."""
        self.security = SiteSecurity(self.devices, self.revocations, self, self._disconnect, self.run_sync)
        """M13, M19: security events reported upstream, the revocation list (gateway/security.py)."""
        self.command_path = CommandPath(self, up.signers, fw, self.forwarder)
        self.reports = SiteReports(site.id, cfg.power, up.reports_interval_s, self.boards, lambda: pm.shares,
                                   self._active_devices, self.clock.now)  # fmt: skip
        """E3, M1: the site's forecast and inventory, sent upstream (gateway/localcsms/reports.py)."""
        self.roaming = SiteRoaming(self, site.id, cfg.roaming) if cfg.roaming.enabled else None
        self.ocpp = OcppBridge(self, cfg.ocpp, site.data_dir, up.enabled, self.clock.now, self._upstream_or_local,
                               lan.heartbeat_s, up.cert, up.key) if cfg.ocpp.enabled else None  # fmt: skip
        """The OCPP 2.0.1 northbound (gateway/ocpp/, docs/ocpp.md), beside or instead of the uplink."""
        if self.ocpp is not None:
            self.ocpp.add(pending, recovered=True)
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
            self.runner.on_up, self.reports.send = self.reports.uplink_up, self.runner.send_event
            self.runner.revocations, self.runner.on_crl = self.revocations, self.security.offer_crl  # M19
            self._tasks.append(asyncio.create_task(self.runner.run()))
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        self._tasks.append(asyncio.create_task(self._watch_devices()))
        self._tasks.extend(self.firmware.rollouts.resume())  # M4: staged rollouts a restart interrupted
        if self.ocpp is not None:
            self.ocpp.start()

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
        await self.power.close()
        await self.sitewide.close()
        await self.reports.close()
        if self.ocpp is not None:
            await self.ocpp.close()
        await self.committer.drain()
        self.committer.close()
        self.outbox.close()
        self.firmware.close()
        self.devices.close()
        self.auth.close()

    def run_sync(self, fn: Callable[[], object]) -> asyncio.Future[object]:
        """Runs `fn` on the outbox's writer thread (the one that touches the site's databases)."""
        return self.committer.run_sync(fn)

    def id_floor(self, device_id: str) -> int:
        return self.outbox.high_water(device_id) + 1

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
                self.reports.devices_changed()
                for did in self.devices.inactive(list(self.online)):
                    conn = self.online.get(did)
                    if conn is not None:
                        log.info("device %s is no longer active at this site: link closed", did)
                        conn.close("deregistered")

    # ------------------------------------------------------------ links

    def _active_devices(self) -> list[str]:
        return [d.device_id for d in self.devices.all() if d.status == ACTIVE]

    def link_opened(self, conn: BoardConnection) -> None:
        self.boards.opened(conn)
        self.power.board_online(conn.link.device_id)  # its share first: it may have changed meanwhile
        self.sitewide.board_online(conn.link.device_id)  # the tariff and demand response in force, deletions owed
        self.reports.link(conn.link.device_id, True)

    def link_closed(self, conn: BoardConnection) -> None:
        self.boards.closed(conn)
        self.paused.discard(conn)
        did = conn.link.device_id
        if did and did not in self.online:  # gone, not replaced by a newer link
            self.reports.link(did, False)

    def count_rejections(self, link: Link) -> None:
        for name, n in link.rejected.items():
            self.rejections[name] = self.rejections.get(name, 0) + n
        link.rejected.clear()

    def count_name(self, name: str) -> None:
        self.rejections[name] = self.rejections.get(name, 0) + 1

    def security_event(self, device_id: str, event: str, reason: str) -> None:
        self.security.event(device_id, event, reason)

    def alloc_seq(self, n: int) -> int:
        return self.committer.alloc(n)

    def owe(self, rows: list[Row]) -> None:
        """Rows of the site's own (gateway/security.py): stored, then relayed as a board's."""
        meta: list[tuple[BoardConnection | None, int, int, int]] = [(None, r.prio, r.msg_id, -1) for r in rows]
        self.committer.submit(rows, lambda res: self._committed(rows, meta, res))

    def _disconnect(self, device_id: str, cause: str, reason: str) -> None:
        conn = self.online.get(device_id)
        if conn is not None:
            log.warning("%s: link closed", reason)
            conn.close(cause, reason)

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
                elif action == _TX_EVENT:  # a session starts or ends: the shares change (E4)
                    self.power.tx_event(device, frame)
                if action in _REPORTED:
                    self.reports.frame(device, action, frame)
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
        if self.ocpp is not None:  # the OCPP face takes rows once durable, urgent ones too
            self.ocpp.add(rows if not dups else [r for r, s in zip(rows, res, strict=True) if s is not None])
        self.wake()

    def relayed_acked(self, seqs: list[int]) -> None:
        self.pending_rows -= len(seqs)
        self.retire(seqs if self.ocpp is None else self.ocpp.native_delivered(seqs))

    def retire(self, seqs: list[int]) -> None:
        """Outbox rows every northbound delivered (the native uplink, the OCPP face)."""
        if seqs:
            self.committer.retire(seqs)

    def token_uid(self, device: str, msg_id: int) -> str | None:
        return self.uplink.token_uids.get((device, msg_id))

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
        if req.frame.action == Action.BOOT_NOTIFICATION:
            self.reports.booted(req.device, req.frame.body)
        if self.ocpp is not None and self.ocpp.board_request(req, now):
            return  # the OCPP CSMS answers (BootNotification, Authorize of a token unknown here)
        if self.roaming is not None:
            self.roaming.board_request(req, now, self._upstream_or_local)
        else:
            self._upstream_or_local(req, now)

    def _upstream_or_local(self, req: BoardRequest, now: float) -> None:
        if not self.forwarder.forward(req, now):  # forwarded: the CSMS answers it
            self.local.answer(req, now)

    # ------------------------------------------------------------ registration (M11, M12, M13)

    def _uplink_starting(self) -> bool:
        """The uplink is configured and has not been up yet since the gateway started."""
        r = self.runner
        return r is not None and r.connects == 0

    def registration_decided(self, device_id: str, registration: int) -> None:
        """The CSMS's registration decision for a device (its BootNotification answer, or one it
        sent on its own): kept for the answers the site gives alone (M13), and accepted
        re-admits a deregistered device (M11)."""
        self.run_sync(functools.partial(self.devices.decided, device_id, registration))
        self.reports.registration(device_id, registration)

    async def left_site(self, action: int, results: list[dict[int, Any]]) -> None:
        """The CSMS's Deregister (M11) or Migrate (M12) was delivered: a deregistered device is
        refused from now on whatever its board answered (the CSMS decided); a migrated one once
        its board accepted. Its open link is closed by `_watch_devices` (the write is another
        connection's)."""
        for r in results:
            did = str(r[Key.DEVICE_ID])
            if action == Action.DEREGISTER:
                await self.run_sync(functools.partial(self.devices.deregistered, did))
            elif r[Key.STATUS] == Status.ACCEPTED:
                await self.run_sync(functools.partial(self.devices.migrated, did))
            log.info("device %s %s by the CSMS", did, "deregistered" if action == Action.DEREGISTER else "migrated")
        self.reports.devices_changed()

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
            "ocpp": self.ocpp.snapshot() if self.ocpp is not None else {},
            "security": self.security.snapshot(),
        }


def local_csms_cert_der(path: Path | None) -> bytes:
    """The DER form of a PEM (or DER) certificate file; b"" without one."""
    if path is None:
        return b""
    raw = path.read_bytes()
    if b"-----BEGIN" not in raw:
        return raw
    return x509.load_pem_x509_certificate(raw).public_bytes(serialization.Encoding.DER)
