"""Prometheus text and a status page, served by a tiny HTTP/1.0 server on the loopback.

`GET /metrics` — Prometheus exposition text; `GET /status` — the same figures as JSON
(what `python -m gateway status` prints).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.service import Gateway

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


def prometheus(s: dict[str, Any], fps: float, oldest_age_s: float | None) -> str:
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
    lines += ["# TYPE evedge_throttled_total counter", f"evedge_throttled_total {s['throttled']}"]
    return "\n".join(lines) + "\n"


async def serve(gw: Gateway, host: str, port: int) -> asyncio.Server:
    meter = RateMeter()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            path = line.split()[1].decode() if len(line.split()) > 1 else "/"
            snap = gw.snapshot()
            fps = meter.update(snap["frames_in"])
            if path.startswith("/metrics"):
                oldest = await gw.committer.run_sync(gw.outbox.oldest_pending_ms)
                age = None if not isinstance(oldest, int) else max(0.0, time.time() - oldest / 1000)
                body, ctype, code = prometheus(snap, fps, age), "text/plain; version=0.0.4", "200 OK"
            elif path.startswith("/status"):
                body, ctype, code = json.dumps(snap, indent=1) + "\n", "application/json", "200 OK"
            else:
                body, ctype, code = "try /metrics or /status\n", "text/plain", "404 Not Found"
            data = body.encode()
            writer.write(
                f"HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data
            )
            await writer.drain()
        except (OSError, TimeoutError, IndexError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
