"""Prometheus text and a status page, served by a tiny HTTP/1.0 server on the loopback.

`GET /metrics` — Prometheus exposition text; `GET /status` — the same figures as JSON
(what `python -m gateway status` prints); `GET /urgent` — the last urgent frames' timings
(`UrgentTrace`), as JSON. At most `MAX_CLIENTS` clients at once, each request line within
`READ_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any, Protocol

CLASSES = ("urgent", "control", "telemetry", "bulk")


class RateMeter:
    """Frames per second over the last scrape interval."""

    def __init__(self) -> None:
        self.t = time.monotonic()
        self.n = 0
        self.rate = 0.0

    def update(self, n: int) -> float:
        now = time.monotonic()
        if now - self.t >= 1.0:
            self.rate = (n - self.n) / (now - self.t)
            self.t, self.n = now, n
        return self.rate


URGENT_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0)
"""Upper bounds of the ingress → transmitted histogram of urgent frames, in seconds."""


class UrgentTrace:
    """Where the time of each urgent frame goes inside the gateway, from its ingress (the
    read of the board's socket that held its bytes) to the `sendto` of the QUIC packet that
    carries its Relay. Cheap: a few clock reads per urgent frame and per urgent Relay; the
    bulk path is untouched (in FIFO mode, the relays of the shared queue are scanned for
    traced rows while one is pending).

    An entry is [device, msg_id, ingress (time.time()), and perf_counter() of ingress,
    dispatch (popped from the queue, accepted with a seq), relayed (its Relay encoded and
    handed to aioquic's stream) and sent (aioquic's `transmit` after that returned)]; the
    last `size` entries are kept, the histogram counts every frame sent."""

    def __init__(self, size: int = 1024) -> None:
        self.ring: deque[list[Any]] = deque(maxlen=size)
        self.pending: dict[int, list[Any]] = {}
        """seq → entry of urgent rows not yet handed to aioquic (bounded by the ring's size)."""
        self.size = size
        self.buckets = [0] * (len(URGENT_BUCKETS_S) + 1)
        self.count = 0
        self.sum_s = 0.0

    def accepted(self, seq: int, device: str, msg_id: int, t_wall: float, t_in: float, t_disp: float) -> None:
        entry = [device, msg_id, t_wall, t_in, t_disp, 0.0, 0.0]
        self.ring.append(entry)
        pending = self.pending
        pending[seq] = entry
        if len(pending) > self.size:  # uplink away: forget the oldest
            del pending[next(iter(pending))]

    def relayed(self, seqs: list[int], t_relay: float) -> list[list[Any]]:
        """The rows of `seqs` were handed to aioquic at `t_relay`: their traced entries."""
        pending = self.pending
        out = []
        for s in seqs:
            e = pending.pop(s, None)
            if e is not None:
                e[5] = t_relay
                out.append(e)
        return out

    def sent(self, entries: list[list[Any]], t_sent: float) -> None:
        for e in entries:
            if e[6]:
                continue
            e[6] = t_sent
            d = t_sent - e[3]
            self.count += 1
            self.sum_s += d
            i = 0
            for b in URGENT_BUCKETS_S:
                if d <= b:
                    break
                i += 1
            self.buckets[i] += 1

    def recent(self) -> list[dict[str, Any]]:
        """The entries kept, oldest first; durations in ms, None for a stage not reached."""

        def ms(a: float, b: float) -> float | None:
            return round((b - a) * 1000, 3) if a and b else None

        return [
            {"device": d, "msg_id": m, "ingress": tw, "dispatch_ms": ms(ti, td), "relay_ms": ms(td, tr),
             "send_ms": ms(tr, ts), "ingress_to_sent_ms": ms(ti, ts)}
            for d, m, tw, ti, td, tr, ts in self.ring
        ]  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """ingress → sent over the entries kept: n, p50, p99, max in ms (for /status)."""
        xs = sorted(e[6] - e[3] for e in self.ring if e[6])
        if not xs:
            return {"n": 0}
        n = len(xs)
        p50, p99 = xs[n // 2], xs[min(n - 1, int(0.99 * n))]
        return {
            "n": n,
            "p50_ms": round(p50 * 1000, 3),
            "p99_ms": round(p99 * 1000, 3),
            "max_ms": round(xs[-1] * 1000, 3),
        }

    def prometheus(self) -> list[str]:
        name = "evedge_urgent_ingress_to_sent_seconds"
        lines = [
            f"# HELP {name} Urgent frames: read from the board's socket → their Relay's QUIC packet sent.",
            f"# TYPE {name} histogram",
        ]
        acc = 0
        for b, n in zip(URGENT_BUCKETS_S, self.buckets, strict=False):
            acc += n
            lines.append(f'{name}_bucket{{le="{b:g}"}} {acc}')
        lines += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum_s:.6f}",
            f"{name}_count {self.count}",
        ]
        return lines


def prometheus(s: dict[str, Any], fps: float, oldest_age_s: float | None, trace: UrgentTrace | None = None) -> str:
    lines = [
        "# HELP evedge_queue_depth Frames waiting in the gateway's priority queue, per class.",
        "# TYPE evedge_queue_depth gauge",
    ]
    lines += [f'evedge_queue_depth{{class="{c}"}} {n}' for c, n in zip(CLASSES, s["queue"], strict=True)]
    lines += ["# TYPE evedge_uplink_unsent gauge"]
    lines += [f'evedge_uplink_unsent{{class="{c}"}} {n}' for c, n in zip(CLASSES, s["uplink_unsent"], strict=True)]
    lines += [
        "# HELP evedge_outbox_backlog Rows stored and not yet acknowledged upstream.",
        "# TYPE evedge_outbox_backlog gauge",
        f"evedge_outbox_backlog {s['outbox_backlog']}",
        "# TYPE evedge_outbox_oldest_age_seconds gauge",
        f"evedge_outbox_oldest_age_seconds {oldest_age_s if oldest_age_s is not None else 0}",
        "# TYPE evedge_outbox_alarm gauge",
        f"evedge_outbox_alarm {int(s['outbox_alarm'])}",
        "# TYPE evedge_frames_received_total counter",
        f"evedge_frames_received_total {s['frames_in']}",
        "# TYPE evedge_frames_per_second gauge",
        f"evedge_frames_per_second {fps:.1f}",
        "# TYPE evedge_frames_stored_total counter",
        f"evedge_frames_stored_total {s['frames_stored']}",
        "# TYPE evedge_duplicates_total counter",
        f"evedge_duplicates_total {s['duplicates']}",
        "# TYPE evedge_relay_acked_total counter",
        f"evedge_relay_acked_total {s['relay_acked']}",
        "# TYPE evedge_links gauge",
        f"evedge_links {s['links']}",
        "# HELP evedge_upstream_up 1 when the QUIC link to the CSMS is up.",
        "# TYPE evedge_upstream_up gauge",
        f"evedge_upstream_up {int(s['upstream'] == 'up')}",
        "# TYPE evedge_upstream_connects_total counter",
        f"evedge_upstream_connects_total {s['upstream_connects']}",
        "# TYPE evedge_rejections_total counter",
    ]
    lines += [f'evedge_rejections_total{{cause="{k}"}} {v}' for k, v in sorted(s["rejections"].items())]
    sec = s.get("security") or {}
    lines += ["# HELP evedge_security_events_total Hellos refused for security (M13, M19), reported upstream.",
              "# TYPE evedge_security_events_total counter"]  # fmt: skip
    lines += [f'evedge_security_events_total{{event="{k}"}} {v}' for k, v in sorted(sec.get("events", {}).items())]
    lines += ["# HELP evedge_crl_number The CRL number of the revocation list in force (-1: none yet).",
              "# TYPE evedge_crl_number gauge", f"evedge_crl_number {sec.get('crl_number', -1)}"]  # fmt: skip
    path = s.get("uplink_path") or {}
    for key, help_ in (
        ("flight_bound_bytes", "Bytes the lower classes may have in flight (gateway/pacing.py)."),
        ("bytes_in_flight", "Bytes sent on the uplink and not yet acknowledged."),
        ("cwnd_bytes", "aioquic's congestion window."),
        ("delivery_rate_bps", "Best delivery rate of the last second, bytes/s."),
        ("rtt_min_s", "Minimum RTT of the uplink, seconds."),
    ):
        if key in path:
            lines += [f"# HELP evedge_uplink_{key} {help_}", f"# TYPE evedge_uplink_{key} gauge",
                      f"evedge_uplink_{key} {path[key]}"]  # fmt: skip
    lines += ["# TYPE evedge_throttled_total counter", f"evedge_throttled_total {s['throttled']}"]
    lines += lan_lines(s.get("lan"))
    fw = s.get("firmware_cache")
    if fw:
        lines += [
            "# HELP evedge_fwcache_bytes Bytes of firmware images (and parts) held in the site's cache.",
            "# TYPE evedge_fwcache_bytes gauge",
            f"evedge_fwcache_bytes {fw['bytes']}",
            "# TYPE evedge_fwcache_max_bytes gauge",
            f"evedge_fwcache_max_bytes {fw['max_bytes']}",
            "# TYPE evedge_fwcache_images gauge",
            f"evedge_fwcache_images {fw['images']}",
            "# TYPE evedge_fwcache_evictions_total counter",
            f"evedge_fwcache_evictions_total {fw['evictions']}",
            "# TYPE evedge_fwcache_chunks_served_total counter",
            f"evedge_fwcache_chunks_served_total {fw['chunks_served']}",
            "# TYPE evedge_fw_rollouts_active gauge",
            f"evedge_fw_rollouts_active {fw['rollouts_active']}",
        ]
    if trace is not None:
        lines += trace.prometheus()
    return "\n".join(lines) + "\n"


def lan_lines(lan: dict[str, Any] | None) -> list[str]:
    """The LAN server's bounds (gateway/languard.py): connections by state, closures by cause."""
    if not lan:
        return []
    lines = [
        "# HELP evedge_lan_connections Board connections by state: pre_hello (no Hello yet), live.",
        "# TYPE evedge_lan_connections gauge",
    ]
    lines += [f'evedge_lan_connections{{state="{k}"}} {v}' for k, v in lan["connections"].items()]
    lines += [
        "# TYPE evedge_lan_max_connections gauge",
        f"evedge_lan_max_connections {lan['max_connections']}",
        "# TYPE evedge_lan_accepted_total counter",
        f"evedge_lan_accepted_total {lan['accepted']}",
        "# HELP evedge_lan_accept_errors_total accept() failures (EMFILE, ENFILE, …): accepting paused briefly.",
        "# TYPE evedge_lan_accept_errors_total counter",
        f"evedge_lan_accept_errors_total {lan['accept_errors']}",
        "# HELP evedge_lan_closed_total Board connections closed or refused, by cause.",
        "# TYPE evedge_lan_closed_total counter",
    ]
    lines += [f'evedge_lan_closed_total{{cause="{k}"}} {v}' for k, v in sorted(lan["closed"].items())]
    lines += [
        "# HELP evedge_lan_flood_held Devices whose Hellos are refused for a bad-frame flood in the window.",
        "# TYPE evedge_lan_flood_held gauge",
        f"evedge_lan_flood_held {lan['flood_held']}",
        "# TYPE evedge_log_lines_suppressed_total counter",
    ]
    lines += [f'evedge_log_lines_suppressed_total{{cause="{k}"}} {v}' for k, v in sorted(lan["log_suppressed"].items())]
    return lines


class Observed(Protocol):
    """What the status server needs of the site (gateway.service.Gateway is one)."""

    @property
    def trace(self) -> UrgentTrace: ...

    def snapshot(self) -> dict[str, Any]:
        """The figures of /status (JSON) and /metrics."""

    async def oldest_pending_ms(self) -> int | None:
        """Acceptance time (Unix ms) of the oldest row owed upstream, None when none."""


MAX_CLIENTS = 16
"""Connections the status server serves at once; more are closed at once."""
READ_TIMEOUT_S = 5.0
"""A client's request line must arrive within this."""


async def serve(gw: Observed, host: str, port: int) -> asyncio.Server:
    meter = RateMeter()
    active = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if active[0] >= MAX_CLIENTS:
            writer.close()
            return
        active[0] += 1
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
            path = line.split()[1].decode() if len(line.split()) > 1 else "/"
            snap = gw.snapshot()
            fps = meter.update(snap["frames_in"])
            if path.startswith("/metrics"):
                oldest = await gw.oldest_pending_ms()
                age = None if oldest is None else max(0.0, time.time() - oldest / 1000)
                body, ctype, code = prometheus(snap, fps, age, gw.trace), "text/plain; version=0.0.4", "200 OK"
            elif path.startswith("/urgent"):
                body, ctype, code = json.dumps(gw.trace.recent()) + "\n", "application/json", "200 OK"
            elif path.startswith("/status"):
                body, ctype, code = json.dumps(snap, indent=1) + "\n", "application/json", "200 OK"
            else:
                body, ctype, code = "try /metrics, /status or /urgent\n", "text/plain", "404 Not Found"
            data = body.encode()
            writer.write(
                f"HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data
            )
            await writer.drain()
        except (OSError, TimeoutError, IndexError, ValueError):  # ValueError: a request line over 64 KiB
            pass
        finally:
            active[0] -= 1
            writer.close()

    return await asyncio.start_server(handle, host, port)
