"""A test-side gateway peer for emulated boards: accepts a board's TCP link, does the
Hello (onboarding included), "persists" durable events in a list before acking them
(deduplicating by message id, as the gateway does in SQLite), answers the board's
requests, and sends commands. Built on gateway._core (the Rust codec)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from gateway import _core
from gateway.localcsms.hellokey import HelloSigner
from gateway.schema import EPOCH_UNIX, MESSAGES, Action, Key, Kind

Body = dict[int, Any]


def now_ts() -> int:
    return int(time.time()) - EPOCH_UNIX


class Conn:
    def __init__(self, peer: Peer, sock: socket.socket) -> None:
        self.peer = peer
        self.sock = sock
        self.lock = threading.Lock()
        self.device_id = ""
        self.sender: Any = None
        self.receiver: Any = None
        self.e_up = b""
        self.e_dn = b""
        self.open = False
        self.closed = False

    def send_raw(self, frame: bytes) -> None:
        with self.lock:
            self.sock.sendall(struct.pack(">H", len(frame)) + frame)

    def seal(
        self, kind: int, mid: int, prio: int, action: int, body: Body, secrets: dict[int, bytes] | None = None
    ) -> None:
        with self.lock:
            seq = self.sender.seq
            for k, v in (secrets or {}).items():
                body[k] = _core.aes_ctr(self.e_dn, seq, k, v)
            f = self.sender.seal(kind, mid, prio, now_ts(), action, body)
            self.sock.sendall(struct.pack(">H", len(f)) + f)


class Peer:
    def __init__(self, devices: dict[str, dict[str, Any]], interval_s: int = 300) -> None:
        self.devices = devices  # device_id -> {"factory_key": bytes, "device_key": bytes | None}
        self.interval_s = interval_s
        self.signer: HelloSigner | None = None
        """Signs the Hello answers, as a gateway holding a local-CSMS key does (M17, M12)."""
        self.registration = 0
        self.tokens: dict[bytes, int] = {}  # online Authorize answers
        self.firmware: dict[int, bytes] = {}  # image_id -> image
        self.handlers: dict[int, Callable[[Conn, Any], Body]] = {}
        self.persisted: list[tuple[str, int, int, Body]] = []  # (device, id, action, body)
        self.ids: set[tuple[str, int]] = set()
        self.duplicates = 0
        self.events: list[tuple[float, int, Body]] = []  # non-durable events (t, action, body)
        self.requests: list[tuple[float, int, Body]] = []  # board requests (t, action, body)
        self.errors: list[Body] = []  # error frames from the board
        self.rejected: list[str] = []  # our rejections of board frames
        self.auto_ack = True
        self.conns: list[Conn] = []
        self.hellos = 0
        self._answers: dict[int, tuple[int, Body, float]] = {}
        self.answer_prio: dict[int, int] = {}  # msg id of our request -> the class the board answered in
        self.last_request = 0  # msg id of the last request sent
        self._mid = 1_000_000
        self._cv = threading.Condition()
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        self._stop = False
        self.paused = False
        threading.Thread(target=self._accept, daemon=True).start()

    # ---------------------------------------------------------------- plumbing
    def close(self) -> None:
        self._stop = True
        self.srv.close()
        for c in self.conns:
            c.sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                s, _ = self.srv.accept()
            except OSError:
                return
            if self.paused:
                s.close()
                continue
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Conn(self, s)
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def conn(self, timeout: float = 20.0) -> Conn:
        """The newest open connection (waits for one)."""
        self.wait(lambda: any(c.open and not c.closed for c in self.conns), timeout)
        return [c for c in self.conns if c.open and not c.closed][-1]

    def _serve(self, c: Conn) -> None:
        buf = bytearray()
        try:
            while True:
                d = c.sock.recv(65536)
                if not d:
                    break
                buf += d
                frames, used = _core.split_frames(bytes(buf))
                del buf[:used]
                for f in frames:
                    self._frame(c, f)
        except (OSError, _core.CoreError):
            pass
        c.closed = True
        with self._cv:
            self._cv.notify_all()

    def _frame(self, c: Conn, f: bytes) -> None:
        if not c.open:
            self._hello(c, f)
            return
        try:
            fr = c.receiver.receive(f)
        except _core.CoreError as e:
            self.rejected.append(e.name)
            return
        k, mid, a, body = fr.kind, fr.msg_id, fr.action, fr.body
        t = time.monotonic()
        with self._cv:
            if k == Kind.EVENT:
                if MESSAGES[a].durable:
                    if (c.device_id, mid) in self.ids:
                        self.duplicates += 1
                    else:
                        self.ids.add((c.device_id, mid))
                        self.persisted.append((c.device_id, mid, a, body))
                    if self.auto_ack:
                        c.seal(Kind.ACK, mid, fr.prio, a, {})
                else:
                    self.events.append((t, a, body))
            elif k in (Kind.RESPONSE, Kind.ERROR):
                self._answers[mid] = (k, body, t)
                self.answer_prio[mid] = fr.prio
                if k == Kind.ERROR:
                    self.errors.append(body)
            elif k == Kind.REQUEST:
                self.requests.append((t, a, body))
            self._cv.notify_all()
        if k == Kind.REQUEST:
            self._answer(c, fr)

    def _answer(self, c: Conn, fr: Any) -> None:
        a, body = fr.action, fr.body
        h = self.handlers.get(a)
        if h is not None:
            res = h(c, fr)
        elif a == Action.BOOT_NOTIFICATION:
            res = {Key.REGISTRATION: self.registration, Key.INTERVAL_S: self.interval_s, Key.TIME: now_ts()}
        elif a in (Action.HEARTBEAT, Action.TIME_SYNC):
            res = {Key.TIME: now_ts(), Key.TIME_MS: 0}
        elif a == Action.AUTHORIZE:
            tok = _core.aes_ctr(c.e_up, fr.seq, Key.ID_TOKEN, body[Key.ID_TOKEN])
            res = {Key.AUTH_STATUS: self.tokens.get(tok, 8)}
        elif a == Action.FIRMWARE_CHUNK:
            img = self.firmware[body[Key.IMAGE_ID]]
            off = body[Key.OFFSET]
            data = img[off : off + 1024]
            res = {
                Key.IMAGE_ID: body[Key.IMAGE_ID],
                Key.OFFSET: off,
                Key.DATA: data,
                Key.LAST: off + len(data) >= len(img),
            }
        else:
            c.seal(Kind.ERROR, fr.msg_id, fr.prio, a, {Key.ERROR_CODE: 22, Key.REASON: "peer does not handle it"})
            return
        c.seal(Kind.RESPONSE, fr.msg_id, fr.prio, a, res)

    def _hello(self, c: Conn, f: bytes) -> None:
        fr = _core.decode(f)
        body = fr.body
        dev = self.devices.get(body[Key.DEVICE_ID])
        if fr.action != Action.HELLO or dev is None:
            c.sock.close()
            return
        factory = bool(body.get(Key.FACTORY))
        k: bytes | None = dev["factory_key"] if factory else dev.get("device_key")
        if k is None:
            c.sock.close()
            return
        try:
            _core.decode(f, key=_core.hello_key(k))
        except (_core.CoreError, TypeError):
            self.rejected.append("BAD_TAG")
            c.sock.close()
            return
        nonce = os.urandom(16)
        k_up, k_dn, e_up, e_dn = _core.derive_keys(k, body[Key.NONCE], nonce)
        c.device_id = body[Key.DEVICE_ID]
        c.sender = _core.Sender(k_dn)
        c.receiver = _core.Receiver(k_up)
        c.e_up, c.e_dn = e_up, e_dn
        res: Body = {
            Key.NONCE: nonce,
            Key.VER: 1,
            Key.TIME: now_ts(),
            Key.TIME_MS: 0,
            Key.SCHEMA_REV: 1,
            Key.INTERVAL_S: self.interval_s,
        }
        if self.signer is not None:
            res[Key.SIGNATURE] = self.signer.sign(c.device_id, body[Key.NONCE], nonce)
        secrets: dict[int, bytes] = {}
        if factory:
            dev["device_key"] = os.urandom(32)
            secrets[Key.DEVICE_KEY] = dev["device_key"]
        c.seal(Kind.RESPONSE, fr.msg_id, fr.prio, Action.HELLO, res, secrets)
        c.open = True
        with self._cv:
            self.hellos += 1
            self._cv.notify_all()

    # ---------------------------------------------------------------- test API
    def pause(self) -> None:
        """The gateway goes away: links closed, new ones refused until resume()."""
        self.paused = True
        for c in self.conns:
            c.closed = True
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
            c.sock.close()

    def resume(self) -> None:
        self.paused = False

    def wait(self, pred: Callable[[], Any], timeout: float = 10.0) -> Any:
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                v = pred()
                if v:
                    return v
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError("condition not met in time")
                self._cv.wait(min(left, 0.05))

    def request(
        self,
        action: int,
        body: Body,
        prio: int | None = None,
        secrets: dict[int, bytes] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, Body]:
        """Send a command to the board; (kind, body) of its answer."""
        c = self.conn()
        self._mid += 1
        mid = self._mid
        p = MESSAGES[action].priority if prio is None else prio
        self.last_request = mid
        c.seal(Kind.REQUEST, mid, p, action, body, secrets)
        k, b, _ = self.wait(lambda: self._answers.get(mid), timeout)
        return k, b

    def request_timed(self, action: int, body: Body, prio: int | None = None) -> tuple[int, Body, float]:
        """Like request(), plus the round-trip time in seconds."""
        c = self.conn()
        self._mid += 1
        mid = self._mid
        p = MESSAGES[action].priority if prio is None else prio
        self.last_request = mid
        t0 = time.monotonic()
        c.seal(Kind.REQUEST, mid, p, action, body)
        k, b, t1 = self.wait(lambda: self._answers.get(mid), 10)
        return k, b, t1 - t0

    def sync(self, timeout: float = 10.0) -> None:
        """A request the board answers without side effects (GetVariables of one variable): the
        board handles what it receives in order, one frame after the other, so once this answer
        is here everything sent to it before was handled."""
        k, _ = self.request(
            Action.GET_VARIABLES, {Key.VARS: [{Key.COMPONENT: "EVSE", Key.VARIABLE: "MaxPowerW"}]}, timeout=timeout
        )
        assert k == Kind.RESPONSE

    def send_event(self, action: int, body: Body) -> None:
        c = self.conn()
        self._mid += 1
        c.seal(Kind.EVENT, self._mid, MESSAGES[action].priority, action, body)

    def durable(self, action: int) -> list[Body]:
        with self._cv:
            return [b for (_, _, a, b) in self.persisted if a == action]


FACTORY_KEY = bytes(range(32))


class Rig:
    """A gateway peer and one emulated board on it, onboarded and registered."""

    def __init__(self, workdir: Any, heap: str | None = None, **peer_kw: Any) -> None:
        """`heap`: the board's -X heapsize; by default the board's own (tools.board.runner.DEFAULT_HEAP)."""
        from tools.board import Board

        self.peer = Peer({"evse-1": {"factory_key": FACTORY_KEY}}, **peer_kw)
        self.board = Board(workdir, self.peer.port, "evse-1", FACTORY_KEY, heap=heap)

    def up(self, timeout: float = 20.0) -> Rig:
        """Power the board up and wait until it is registered on a keyed connection."""
        m = self.board.mark()
        if not self.board.alive():
            self.board.start()
        self.board.wait("registration", since=m, timeout=timeout)
        return self

    def power_cut(self) -> None:
        self.board.kill()

    def close(self) -> None:
        self.board.stop()
        self.peer.close()


def charging(rig: Rig, token: str = "card-1", **plug: object) -> int:
    """Plug in, present a card the peer accepts; the started transaction's id."""
    rig.peer.tokens[token.encode()] = 0
    m = rig.board.mark()
    rig.board.cmd("plug", **plug)
    rig.board.cmd("card", token=token)
    return int(rig.board.wait("tx_started", since=m)["tx_id"])


def barrier(board: Any) -> int:
    """The index in `board.events` just past a `status` answer: the board handles its control
    commands in order, so everything it did from that index on came after every command sent
    before this call had been carried out. Events of its own (ticks, the link) seen there
    happened after those commands too."""
    m = board.mark()
    board.cmd("status")
    e = board.wait("status", since=m)
    with board._cv:
        return next(i for i in range(m, len(board.events)) if board.events[i] is e) + 1


def until_status(board: Any, pred: Callable[[dict[str, Any]], Any], timeout: float = 20.0) -> dict[str, Any]:
    """The board's first `status` answer that satisfies `pred`, asked again (every 50 ms) until
    one does; TimeoutError naming the last answer after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        st: dict[str, Any] = board.status()
        if pred(st):
            return st
        if time.monotonic() > end:
            shown = {k: v for k, v in st.items() if k not in ("modules",)}
            raise TimeoutError(f"board status never satisfied the condition in {timeout} s; last: {shown}")
        time.sleep(0.05)  # the poll's pace, not a wait for something
