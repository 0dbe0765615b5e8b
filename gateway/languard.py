"""What bounds the LAN server, sans I/O: connection caps, deadlines, closures by cause.

Rule: nobody on the network can exhaust what legitimate boards need. Connections are capped
in total (`lan.max_connections`, kept below the process's file-descriptor limit) and, while
they have not completed their Hello, per source address (`lan.max_per_address`); a
connection over a cap is closed at once and counted. A connection that has not completed its
Hello within `lan.hello_timeout_s`, a frame whose bytes do not all arrive within
`lan.frame_timeout_s` and a live link silent for `lan.idle_heartbeats` heartbeat intervals
are closed. Under the total cap, a new connection takes the place of the oldest one still
without Hello: an unauthenticated peer cannot hold a slot a board needs. Every closure is
counted by cause (/status, /metrics) and logged through one `RateLimit`.

`LanGuard` keeps the counts and decides; the asyncio glue (gateway/lan.py) accepts, closes
and reads the clock.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from gateway.config import LanConfig
from gateway.link import FloodMemory, FloodPolicy
from gateway.ratelog import RateLimit

log = logging.getLogger("gateway.lan")

FD_HEADROOM = 128
"""File descriptors kept below RLIMIT_NOFILE for everything but board connections: the SQLite
files (outbox, devices, local CSMS, rollouts: database, WAL and shared memory each), the
firmware cache's open images, the QUIC sockets, the metrics server and its clients, and the
connections being closed while others are accepted (one accept batch)."""

CAUSES = (
    "hello_timeout", "frame_timeout", "idle", "over_total_cap", "over_address_cap", "evicted", "flood",
    "bad_hello", "framing", "replaced", "deregistered", "peer_closed", "shutdown", "site",
)  # fmt: skip
"""Closure causes: the attacks' (no Hello in time, a frame dribbled, a live link silent, a
cap, the oldest connection without Hello making room, a bad-frame flood, a Hello refused, a
stream that cannot be resynchronised), then the ordinary ones (a board's new link replacing
its old one, a device deregistered, the peer closing, the gateway stopping, another site
reason)."""
LOGGED = frozenset(CAUSES[:9])
"""Causes a peer can trigger at will: logged through the rate limit."""


def connection_cap(configured: int, headroom: int = FD_HEADROOM) -> tuple[int, int]:
    """`(cap, soft limit)`: the connections the LAN server may hold, at most `configured` and
    `headroom` below RLIMIT_NOFILE. The soft limit is first raised toward the hard limit as far
    as `configured + headroom` needs (as Go's runtime and many servers do)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    want = configured + headroom
    if soft != inf and soft < want:
        new = want if hard == inf else min(want, hard)
        if new > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                soft = new
            except (ValueError, OSError):
                pass
    if soft == inf:
        return configured, soft
    return max(1, min(configured, max(soft // 2, soft - headroom))), soft


class Guarded(Protocol):
    """What the guard reads of one connection (gateway.lan.BoardConnection is one)."""

    host: str
    opened_pc: float
    """perf_counter() at accept."""
    active_pc: float
    """perf_counter() of the last read (or of the moment reading resumed)."""
    partial_since: float
    """perf_counter() of the first byte of a frame not complete yet; 0 when none."""
    pre_hello: bool
    """Admitted and its Hello not read yet."""

    @property
    def reading_held(self) -> bool:
        """The gateway stopped reading it (backpressure, throttling, its Hello's row being
        stored): no deadline runs meanwhile."""

    @property
    def live(self) -> bool:
        """The Hello completed (the link is open)."""

    def close(self, cause: str = "site", reason: str = "") -> None:
        """Closes it, counted under `cause` (it calls `release`)."""


class LanGuard:
    """Caps, deadlines and closure counts of the LAN server."""

    def __init__(self, lan: LanConfig, flood: FloodPolicy, limit: RateLimit | None = None) -> None:
        self.max_connections, self.nofile = connection_cap(lan.max_connections)
        if self.max_connections < lan.max_connections:
            log.warning(
                "lan.max_connections %d lowered to %d: RLIMIT_NOFILE is %d, %d kept for databases, QUIC, metrics",
                lan.max_connections, self.max_connections, self.nofile, FD_HEADROOM,
            )  # fmt: skip
        self.max_per_address = lan.max_per_address
        self.hello_timeout_s = lan.hello_timeout_s
        self.frame_timeout_s = lan.frame_timeout_s
        self.idle_s = lan.idle_heartbeats * lan.heartbeat_s
        self.tick_s = min(1.0, max(0.02, min(self.hello_timeout_s, self.frame_timeout_s, self.idle_s) / 4))
        """Period of the deadline sweep: a deadline is enforced within a quarter of itself (1 s at most)."""
        self.limit = limit or RateLimit(log)
        self.flood = FloodMemory(flood)
        """Bad frames per device, kept across its reconnects for the flood window."""
        self.total = 0
        """Connections admitted and not yet released (those being set up included)."""
        self.pre: dict[Guarded, None] = {}
        """Connections without Hello, oldest first."""
        self.pre_by_host: dict[str, int] = {}
        self.closed: dict[str, int] = dict.fromkeys(CAUSES, 0)
        self.accepted = 0
        self.accept_errors = 0

    # ------------------------------------------------------------ admission

    def admit(self, host: str) -> tuple[str, Guarded | None]:
        """A connection from `host` was accepted: `("", victim)` to take it — `victim`, when
        not None, is the oldest connection without Hello, to close first to make room
        ("evicted") — or `(cause, None)` to close it at once."""
        if self.pre_by_host.get(host, 0) >= self.max_per_address:
            return self.refused("over_address_cap", host, f"{self.max_per_address} connections without Hello"), None
        victim = None
        if self.total >= self.max_connections:
            if not self.pre:
                return self.refused("over_total_cap", host, f"{self.max_connections} connections"), None
            victim = next(iter(self.pre))
        self.total += 1
        self.accepted += 1
        self.pre_by_host[host] = self.pre_by_host.get(host, 0) + 1
        return "", victim

    def refused(self, cause: str, host: str, why: str) -> str:
        self.closed[cause] += 1
        self.limit.log(cause, logging.WARNING, "LAN: connection from %s refused: %s (%s)", host, cause, why)
        return cause

    def made(self, conn: Guarded) -> None:
        """The admitted connection's protocol exists (asyncio's connection_made)."""
        self.pre[conn] = None

    def aborted(self, host: str) -> None:
        """An admitted connection failed before it was made."""
        self.total -= 1
        self._host_done(host)

    def hello_read(self, conn: Guarded) -> None:
        """Its Hello arrived: it no longer counts as a connection without Hello."""
        if conn.pre_hello:
            conn.pre_hello = False
            self.pre.pop(conn, None)
            self._host_done(conn.host)

    def release(self, conn: Guarded, cause: str, reason: str = "") -> None:
        """The connection is closing (`cause`, one of CAUSES): its slot is free."""
        self.hello_read(conn)
        self.total -= 1
        self.closed[cause] = self.closed.get(cause, 0) + 1
        if cause in LOGGED:
            why = f" ({repr(reason)[1:-1]})" if reason else ""  # a peer's text, escaped: one line
            self.limit.log(cause, logging.INFO, "LAN: %s closed: %s%s", conn.host, cause, why)

    def _host_done(self, host: str) -> None:
        n = self.pre_by_host.get(host, 0) - 1
        if n > 0:
            self.pre_by_host[host] = n
        else:
            self.pre_by_host.pop(host, None)

    def accept_error(self, err: OSError) -> None:
        self.accept_errors += 1
        self.limit.log("accept_error", logging.WARNING, "LAN: accept() failed: %s; accepting again shortly", err)

    # ------------------------------------------------------------ deadlines

    def expired(self, conns: Iterable[Guarded], now: float) -> Iterator[tuple[Guarded, str, str]]:
        """`(conn, cause, reason)` of each connection past a deadline at `now` (perf_counter)."""
        hello_t, frame_t, idle_t = self.hello_timeout_s, self.frame_timeout_s, self.idle_s
        for c in conns:
            if c.reading_held:
                continue
            if c.partial_since and now - c.partial_since > frame_t:
                yield c, "frame_timeout", f"a frame incomplete after {frame_t:g} s"
            elif c.pre_hello:
                if now - c.opened_pc > hello_t:
                    yield c, "hello_timeout", f"no Hello within {hello_t:g} s"
            elif c.live and now - c.active_pc > idle_t:
                yield c, "idle", f"nothing received for {idle_t:g} s"

    def tick(self, wall: float) -> None:
        """Housekeeping of the sweep: forgets floods past their window (`wall`: time.time(),
        the clock of the links' bad frames), writes the log summaries due."""
        self.flood.prune(wall)
        self.limit.flush()

    # ------------------------------------------------------------ views

    def snapshot(self, connections: int) -> dict[str, Any]:
        pre = len(self.pre)
        return {
            "connections": {"pre_hello": pre, "live": max(0, connections - pre)},
            "max_connections": self.max_connections,
            "max_per_address": self.max_per_address,
            "accepted": self.accepted,
            "accept_errors": self.accept_errors,
            "closed": {k: v for k, v in self.closed.items() if v},
            "flood_held": self.flood.held(),
            "log_suppressed": dict(self.limit.suppressed),
        }


__all__ = ["CAUSES", "FD_HEADROOM", "Guarded", "LanGuard", "connection_cap"]
