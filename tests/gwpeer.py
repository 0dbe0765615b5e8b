"""A small upstream peer for the gateway's tests, on aioquic, speaking docs/upstream.md.

It checks the gateway's certificate (mutual TLS), persists every relayed frame in SQLite
once per (site, device, message id), acks each Relay after its commit, and can send
Commands. The real CSMS lives in tools/peers/evedge_csms/; this one stays small on purpose.

Run alone (for kill -9 tests): `python tests/gwpeer.py [--port P] --db FILE --pki DIR`; it
prints `READY port=N` once it listens (port 0, the default: an ephemeral one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import re
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import HandshakeCompleted, QuicEvent, StreamDataReceived

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import _core
from gateway.link import proto_ts
from gateway.protocol import devpki
from gateway.protocol.mtls import peer_common_name, require_client_certificates
from gateway.protocol.upstream_wire import ALPN, K_UP, StreamReader, prefix
from gateway.schema import EPOCH_UNIX, Action, Key, Kind, Priority


class Store:
    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS frames (n INTEGER PRIMARY KEY, site TEXT, device TEXT, msg_id INTEGER,"
            " prio INTEGER, action INTEGER, frame BLOB, at REAL, UNIQUE (site, device, msg_id))"
        )
        self.duplicates = 0

    def put(self, rows: list[tuple[str, str, int, int, int, bytes, float]]) -> None:
        before = self.db.total_changes
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT OR IGNORE INTO frames(site, device, msg_id, prio, action, frame, at) VALUES (?,?,?,?,?,?,?)", rows
        )
        self.db.execute("COMMIT")
        self.duplicates += len(rows) - (self.db.total_changes - before)

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM frames").fetchone()[0])


class Peer:
    """State shared by the connections of one peer server."""

    def __init__(self, store: Store, threaded: bool = False) -> None:
        self.store = store
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="peer-store") if threaded else None
        """Standalone, the store commits on a thread of its own, so that the event loop keeps
        reading (and time-stamping) relays while a large one is written."""
        self.protocols: list[PeerProtocol] = []
        self.connected = asyncio.Event()
        self.received = 0
        self.arrivals: list[tuple[float, int, int]] = []  # (time, prio, n) of relays, for latency
        self.on_relay_frame: Any = None
        self.ack = True


class PeerProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, peer: Peer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cafile = self._quic.configuration.cafile
        assert cafile is not None, "the test peer's configuration names the site CA"
        require_client_certificates(self._quic, cafile)
        self.peer = peer
        self.readers: dict[int, StreamReader] = {}
        self.out_seq: dict[int, int] = {}
        self.site = ""
        self.pending: list[tuple[int, int, list[tuple[str, str, int, int, int, bytes, float]]]] = []
        self.flush_scheduled = False
        self.answers: dict[int, asyncio.Future[_core.Frame]] = {}
        self.next_cmd = int(time.time() * 1000)
        self.streams_seen: set[int] = set()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self.site = peer_common_name(self._quic) or ""
            self.peer.protocols.append(self)
            self.peer.connected.set()
        elif isinstance(event, StreamDataReceived):
            self.streams_seen.add(event.stream_id)
            reader = self.readers.setdefault(event.stream_id, StreamReader())
            for raw in reader.feed(event.data):
                self.frame(event.stream_id, raw)

    def send(self, sid: int, kind: int, msg_id: int, prio: int, action: int, body: dict[int, Any]) -> None:
        self.out_seq[sid] = self.out_seq.get(sid, 0) + 1
        frame = _core.encode(kind, self.out_seq[sid], msg_id, prio, proto_ts(time.time()), action, body, K_UP)
        self._quic.send_stream_data(sid, prefix(frame))

    def frame(self, sid: int, raw: bytes) -> None:
        try:  # the common case, read without a dict per relayed item
            (kind, _, relay_id, prio, _, action), site, items = _core.relay_rows(raw, K_UP)
        except ValueError:  # another action
            self.other(sid, _core.decode(raw, K_UP, max_frame=_core.MAX_UP_FRAME))
            return
        if kind != Kind.EVENT:
            return
        if site != self.site:
            body: dict[int, Any] = {Key.ERROR_CODE: 23, Key.REASON: "site id is not the certificate's"}
            self.send(sid, Kind.ERROR, relay_id, prio, action, body)
            return
        now = time.time()  # receipt: the Relay is parsed (its rows are stored later, `at` is this)
        site = self.site
        rows = [(site, d, m, p, a, inner, now) for d, m, p, a, inner, _ in items]
        self.peer.received += len(rows)
        self.peer.arrivals.append((time.perf_counter(), sid // 4, len(rows)))
        if self.peer.on_relay_frame is not None:
            self.peer.on_relay_frame(sid // 4, rows)
        self.pending.append((sid, relay_id, rows))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def other(self, sid: int, f: _core.Frame) -> None:
        if f.action == Action.SITE_HELLO and f.kind == Kind.REQUEST:
            self.send(sid, Kind.RESPONSE, f.msg_id, f.prio, f.action, {Key.VER: 1, Key.TIME: proto_ts(time.time())})
            self.transmit()
        elif f.kind in (Kind.RESPONSE, Kind.ERROR):
            fut = self.answers.pop(f.msg_id, None)
            if fut is not None and not fut.done():
                fut.set_result(f)

    def flush(self) -> None:
        """One transaction for every relay received in this loop turn, then their acks."""
        self.flush_scheduled = False
        pending, self.pending = self.pending, []
        rows = [r for _, _, rows in pending for r in rows]
        if self.peer.pool is None:
            self.peer.store.put(rows)
            self.ack(pending)
        else:
            fut = asyncio.get_running_loop().run_in_executor(self.peer.pool, self.peer.store.put, rows)
            fut.add_done_callback(lambda f: None if f.exception() else self.ack(pending))

    def ack(self, pending: list[tuple[int, int, list[tuple[str, str, int, int, int, bytes, float]]]]) -> None:
        if self.peer.ack:
            by_stream: dict[int, list[int]] = {}
            for sid, relay_id, _ in pending:
                by_stream.setdefault(sid, []).append(relay_id)
            for sid, ids in by_stream.items():  # one ack frame covers up to 1 + 64 relays
                for i in range(0, len(ids), 65):
                    chunk = ids[i : i + 65]
                    ack: dict[int, Any] = {Key.IDS: chunk[1:]} if len(chunk) > 1 else {}
                    self.send(sid, Kind.ACK, chunk[0], Priority.TELEMETRY, Action.RELAY, ack)
            self.transmit()

    async def command(self, targets: list[str], inner: bytes, *, prio: int = Priority.CONTROL, expiry: int | None = None,  # noqa: E501
                      signature: bytes | None = None, signer: str | None = None, timeout: float = 10) -> _core.Frame:  # fmt: skip  # noqa: E501
        self.next_cmd += 1
        body: dict[int, Any] = {Key.TARGETS: targets, Key.FRAME: inner}
        if expiry is not None:
            body[Key.EXPIRY] = expiry
        if signature is not None:
            body[Key.SIGNATURE] = signature
            body[Key.SIGNER] = signer
        return await self.request(Action.COMMAND, body, prio, timeout)

    async def request(
        self, action: int, body: dict[int, Any], prio: int = Priority.CONTROL, timeout: float = 10
    ) -> _core.Frame:
        self.next_cmd += 1
        # A client stream exists for the server once it carried data: wait for the gateway's
        # SiteHello on the control stream (the handshake alone does not open it).
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while 4 not in self.streams_seen:
            if loop.time() > end:
                raise TimeoutError("the gateway never opened its control stream")
            await asyncio.sleep(0.005)
        sid = prio * 4 if prio * 4 in self.streams_seen else 4
        fut: asyncio.Future[_core.Frame] = asyncio.get_running_loop().create_future()
        self.answers[self.next_cmd] = fut
        self.send(
            sid,
            Kind.REQUEST,
            self.next_cmd,
            max(prio, Priority.CONTROL) if action == Action.COMMAND else prio,
            action,
            body,
        )
        self.transmit()
        return await asyncio.wait_for(fut, timeout)


class FirmwareServer:
    """Answers the FirmwareChunk requests the gateway relays, as the CSMS does (a Command
    whose inner frame is the response to the board's request), and counts them."""

    def __init__(self, peer: Peer, images: dict[int, bytes], chunk: int = 512) -> None:
        self.peer = peer
        self.images = images
        self.chunk = chunk
        self.requests: list[tuple[str, int, int]] = []
        """(device, image id, offset) of every FirmwareChunk request that reached the peer."""
        self.tasks: set[asyncio.Task[Any]] = set()
        peer.on_relay_frame = self.on_rows

    def on_rows(self, _prio: int, rows: list[tuple[str, str, int, int, int, bytes, float]]) -> None:
        for _site, device, msg_id, _p, action, frame, _at in rows:
            if action != Action.FIRMWARE_CHUNK:
                continue
            body = _core.unpack(frame)[7]
            image_id, offset = int(body[Key.IMAGE_ID]), int(body[Key.OFFSET])
            self.requests.append((device, image_id, offset))
            image = self.images[image_id]
            data = image[offset : offset + self.chunk]
            answer = {Key.IMAGE_ID: image_id, Key.OFFSET: offset, Key.DATA: data,
                      Key.LAST: offset + len(data) >= len(image)}  # fmt: skip
            inner = _core.encode(Kind.RESPONSE, 1, msg_id, Priority.BULK, proto_ts(time.time()),
                                 Action.FIRMWARE_CHUNK, answer, K_UP)  # fmt: skip
            t = asyncio.get_running_loop().create_task(self.peer.protocols[-1].command([device], inner))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)


def inner_frame(action: int, body: dict[int, Any], prio: int | None = None, kind: int = Kind.REQUEST) -> bytes:
    """An envelope for a Command's `frame` (its tag is not checked: TLS protects the uplink)."""
    from gateway.schema import MESSAGES

    p = MESSAGES[action].priority if prio is None else prio
    return _core.encode(kind, 1, 1, p, proto_ts(time.time()), action, body, K_UP)


def server_config(pki: Path, cn: str = "csms", ca_name: str = "ca") -> QuicConfiguration:
    ca = devpki.ensure_ca(pki, ca_name)
    issued = devpki.issue(pki, cn, ca=ca, server=True, client=False)
    qc = QuicConfiguration(is_client=False, alpn_protocols=[ALPN], verify_mode=ssl.CERT_REQUIRED)
    qc.load_cert_chain(str(issued.cert), str(issued.key))
    qc.cafile = str(issued.ca)
    return qc


async def start(host: str, port: int, store: Store, qc: QuicConfiguration, threaded: bool = False) -> tuple[Peer, Any]:
    """The peer listening on `port`: 0 for an ephemeral one (`bound_port(server)` reads it back);
    a port read back from an earlier start when it is started again (the gateway's
    configuration names it). That is safe enough: the kernel hands out ephemeral ports at
    random across the local range, so another program takes the one just freed, in the short
    time it is free, only by rare chance; then the bind is retried for a few seconds."""
    peer = Peer(store, threaded)
    end = time.monotonic() + 3
    while True:
        try:
            server = await serve(host, port, configuration=qc,
                                 create_protocol=lambda *a, **k: PeerProtocol(*a, peer=peer, **k))  # fmt: skip
            return peer, server
        except OSError as e:
            if not port or e.errno != errno.EADDRINUSE or time.monotonic() > end:
                raise
        await asyncio.sleep(0.1)


def bound_port(server: Any) -> int:
    """The UDP port a server of `start` listens on."""
    return int(server._transport.get_extra_info("sockname")[1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 (the default): an ephemeral port")
    p.add_argument("--db", required=True)
    p.add_argument("--pki", required=True, type=Path)
    a = p.parse_args()

    async def run() -> None:
        _peer, server = await start(a.host, a.port, Store(a.db), server_config(a.pki), threaded=True)
        print(f"READY port={bound_port(server)}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


_ = EPOCH_UNIX
if __name__ == "__main__":
    main()


# ---------------------------------------------------------------- helpers for the gateway tests

SEED = bytes(range(32))


def gateway_doc(data: Path, upstream_port: int | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
    """A gateway configuration document for tests: loopback, ephemeral LAN port, dev keys."""
    doc: dict[str, Any] = {
        "site": {"data_dir": str(data)},
        "lan": {"listen": "127.0.0.1:0"},
        "metrics": {"listen": "127.0.0.1:0"},
        "devices": {"dev_seed": SEED.hex(), "dev_prefix": "ev-"},
        "upstream": {"enabled": False} if upstream_port is None else
                    {"address": f"127.0.0.1:{upstream_port}", "idle_timeout_s": 2.0, "backoff_max_s": 0.5},
    }  # fmt: skip
    for k, v in sections.items():
        doc.setdefault(k, {}).update(v)
    return doc


def gateway_toml(path: Path, udp: int, upstream: str = "", tail: str = "", host: str = "127.0.0.1") -> Path:
    """Writes the configuration of a gateway run as its own process (`python -m gateway`): the
    upstream peer at `host:udp`, LAN and metrics on ephemeral loopback ports (`start_gateway`
    reads them back and pins them here), the dev seed; `upstream` adds lines to [upstream],
    `tail` sections."""
    path.write_text(
        '[site]\ndata_dir = "gw"\n[lan]\nlisten = "127.0.0.1:0"\n[metrics]\nlisten = "127.0.0.1:0"\n'
        f'[upstream]\naddress = "{host}:{udp}"\nidle_timeout_s = 2.0\nbackoff_max_s = 0.3\n{upstream}'
        f'[devices]\ndev_seed = "{SEED.hex()}"\ndev_prefix = "ev-"\n{tail}'
    )
    return path


ROOT = Path(__file__).resolve().parent.parent


def start_gateway(cfg: Path, cmd: Sequence[str] = ("-m", "gateway")) -> subprocess.Popen[str]:
    """`python CMD --config cfg` (the gateway), once it listens (its READY line is read; its
    stderr goes to gateway.log beside cfg). The ports it bound (`ports(cfg)`) are read from that
    line and, on the first start (port 0 in cfg's [lan] and [metrics] `listen`), written into
    cfg: a restart after a kill -9 listens where the boards reconnect. Should another program
    have taken one of them meanwhile (rare: see `start`), the start is retried briefly."""
    end = time.monotonic() + 5
    log = cfg.parent / "gateway.log"
    while True:
        with log.open("a") as err:
            seen = err.tell()
            p = subprocess.Popen([sys.executable, *cmd, "--config", str(cfg)], cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=err)  # fmt: skip
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.startswith("READY"):
            break
        p.kill()
        p.wait()
        p.stdout.close()
        tail = log.read_bytes()[seen:].decode(errors="replace")[-3000:]
        if "Address already in use" not in tail or time.monotonic() > end:
            raise RuntimeError(f"the gateway did not start: {line!r}\n{tail}")
        time.sleep(0.2)
    bound = dict(kv.split("=") for kv in line.split()[1:])
    text = cfg.read_text()
    for name in ("lan", "metrics"):
        text = re.sub(rf'(\[{name}\]\nlisten = "[^"]*):0"', rf'\g<1>:{bound[name]}"', text)
    cfg.write_text(text)
    return p


def ports(cfg: Path) -> dict[str, int]:
    """The LAN and metrics ports of the gateway configured by cfg (after its first start)."""
    import tomllib

    doc = tomllib.loads(cfg.read_text())
    return {name: int(doc[name]["listen"].rsplit(":", 1)[1]) for name in ("lan", "metrics")}
