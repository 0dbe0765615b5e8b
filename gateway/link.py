"""The gateway side of one board link, sans I/O (docs/protocol.md, "Link behaviour").

`Link` never touches a socket or a clock: the LAN glue feeds it frames with `now` and
writes out the frames it returns. The hot path — tag, replay window, schema checks of many
frames at once — is `Link.rx.ingest`, called by the glue with the frames of one read;
this class handles what is rare: the Hello, error frames naming the cause, the flood
policy, and sealing acks and responses with the link's counter.
"""

from __future__ import annotations

import enum
import functools
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from gateway import _core
from gateway.devices import DeviceError, Devices
from gateway.protocol.text import clip_reason
from gateway.schema import (
    EPOCH_UNIX,
    FIELDS,
    MAX_FRAME,
    MESSAGES,
    PROTOCOL_VERSION,
    SCHEMA_REV,
    Action,
    ErrorCode,
    Key,
    Kind,
    Priority,
)

if TYPE_CHECKING:
    from gateway.localcsms.hellokey import HelloSigner

MAX_ACK_IDS = FIELDS[Key.IDS].max_len
"""The schema's bound of `ids` in one ack frame (besides the frame's own id)."""

FIRST_SCHEMA_REV = 1
"""The first revision of the schema (tools/schema/messages.toml, [meta]). Within protocol
version 1 the schema only grows, so every revision from this one up to the gateway's own
(`SCHEMA_REV`, generated) is a subset of what the gateway understands: a Hello with one of
them is accepted, any other `schema_rev` (0, or newer than the gateway) is refused with
BAD_VERSION naming the field (docs/protocol.md, "Versioning")."""


class FrameTooLarge(ValueError):
    """A request for the board would make a frame above the largest the board receives (the
    `rx_max` of its Hello): it was not sent. The text names the message, the sizes and the board."""


def proto_ts(now: float) -> int:
    """Seconds since the protocol epoch (2024-01-01Z) of a Unix time."""
    return max(0, int(now) - EPOCH_UNIX)


"""The schema's bound of a `reason`, in bytes of UTF-8."""


def error_body(code: int, reason: str, field: int | None = None) -> dict[int, Any]:
    """The body of an error frame: `error_code`, `reason` (`clip_reason`) and, when the
    error is about one body key, `field`."""
    body: dict[int, Any] = {Key.ERROR_CODE: int(code), Key.REASON: clip_reason(reason)}
    if field is not None:
        body[Key.FIELD] = field
    return body


class State(enum.Enum):
    AWAIT_HELLO = 0
    OPEN = 1
    CLOSED = 2
    REGISTERING = 3
    """The Hello verified; the device's row is being committed (off the event loop) before
    the answer is sent."""


class Verdict(enum.Enum):
    """What the flood policy asks of the glue after bad frames."""

    OK = 0
    THROTTLE = 1
    CLOSE = 2


@dataclass(frozen=True)
class FloodPolicy:
    """`max_bad` bad frames within `window_s`: the link is read at most once per `throttle_s`;
    twice that: closed, and the device's Hellos are refused until the count falls below it."""

    max_bad: int = 20
    window_s: float = 10.0
    throttle_s: float = 0.5

    @property
    def close_at(self) -> int:
        return 2 * self.max_bad


class FloodMemory:
    """The times of each device's bad frames within the flood window, kept across its links:
    a device that floods and reconnects stays throttled, then refused, for the window. Only a
    device whose Hello verified can add to its own count."""

    def __init__(self, policy: FloodPolicy) -> None:
        self.policy = policy
        self._bad: dict[str, deque[float]] = {}

    def note(self, device_id: str, now: float) -> None:
        bad = self._bad.get(device_id)
        if bad is None:
            bad = self._bad[device_id] = deque(maxlen=self.policy.close_at)
        bad.append(now)

    def count(self, device_id: str, now: float) -> int:
        """Bad frames of the device within the window ending at `now`."""
        bad = self._bad.get(device_id)
        if bad is None:
            return 0
        horizon = now - self.policy.window_s
        while bad and bad[0] < horizon:
            bad.popleft()
        return len(bad)

    def verdict(self, device_id: str, now: float) -> Verdict:
        n = self.count(device_id, now)
        if n >= self.policy.close_at:
            return Verdict.CLOSE
        return Verdict.THROTTLE if n >= self.policy.max_bad else Verdict.OK

    def budget(self, device_id: str, now: float) -> int:
        """Bad frames the device may still send before its link is closed (at least 1 while open)."""
        return max(1, self.policy.close_at - self.count(device_id, now))

    def prune(self, now: float) -> None:
        """Forgets the devices with no bad frame left in the window."""
        for did in [d for d in self._bad if not self.count(d, now)]:
            del self._bad[did]

    def held(self) -> int:
        """Devices at the closing count (their Hellos are refused until it falls)."""
        return sum(len(b) >= self.policy.close_at for b in self._bad.values())


@dataclass
class Output:
    """Frames to write (without length prefix) and whether to close the link after them."""

    frames: list[bytes] = field(default_factory=list)
    close: bool = False
    verdict: Verdict = Verdict.OK
    onboarded: bool = False
    cause: str = ""
    """Why the link closes (gateway.languard.CAUSES): "bad_hello", "flood"."""
    store: Callable[[], bytes | None] | None = None
    """A write to the device table to run off the event loop before the Hello is answered
    (a development device's first row, an onboarding key): its result goes to `Link.hello_stored`."""
    event: tuple[str, str] | None = None
    """(device id, SecurityEvent name) of a Hello refused for security (M13 onboarding, re-key,
    M19 revoked certificate) whose tag verified: the site reports it upstream."""


def peek(frame: bytes) -> tuple[int, int, int, int]:
    """`(kind, msg_id, prio, action)` of a frame as far as it can be read, for error
    frames about frames the core rejected (zeros where unreadable)."""
    # Only the envelope's head is read (msgpack's own reader, past the array header the seven
    # scalars before the body): a frame refused for its body (a repeated key, too many values)
    # still gets an error naming its own id. Frames are at most MAX_FRAME bytes, so this is bounded.
    u = msgpack.Unpacker(raw=True, max_buffer_size=len(frame) + 1)
    u.feed(frame)
    try:
        if u.read_array_header() != 9:
            return 0, 0, Priority.CONTROL, Action.CLOSE
        head = [u.unpack() for _ in range(7)]
    except Exception:
        return 0, 0, Priority.CONTROL, Action.CLOSE
    vals = [v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0 for v in head[1:7]]
    kind, _seq, msg_id, prio, _ts, action = vals
    # An action the schema does not know cannot be echoed (the board could not decode the
    # error frame): such errors are about the link, and name Close.
    return kind, msg_id, min(prio, 3), action if action in MESSAGES else Action.CLOSE


class Link:
    """One board connection: Hello, then counters in both directions."""

    def __init__(
        self,
        devices: Devices,
        policy: FloodPolicy,
        *,
        interval_s: int = 60,
        window: int = 64,
        memory: FloodMemory | None = None,
        id_floor: Callable[[str], int] | None = None,
        signer: HelloSigner | None = None,
    ) -> None:
        self.devices = devices
        self.signer = signer
        """Signs the Hello answer: the boards that hold its local-CSMS certificate check it (M14/M17)."""
        self.id_floor = id_floor
        """The first message id a newly keyed board may use (`LanSite.id_floor`, writer thread)."""
        self._floor = 0
        self.policy = policy
        self.memory = memory if memory is not None else FloodMemory(policy)
        self.interval_s = interval_s
        self.window = window
        self.state = State.AWAIT_HELLO
        self.device_id = ""
        self.idx = 0
        self.rx: _core.Receiver | None = None
        self.tx: _core.Sender | None = None
        self.e_up = b""
        self.e_dn = b""
        self.rx_max = MAX_FRAME
        """The largest frame the board receives: its Hello's `rx_max`, or the protocol's MAX_FRAME
        when it states none (boards of schema_rev < 7). Nothing larger is sent to it."""
        self.rejected: dict[str, int] = {}
        self.refusal = ""
        """The error name and reason of a Hello refused (for the log)."""
        self._next_id = 0
        self._hello: tuple[int, bytes, bytes, bool] | None = None
        """msg id, K_dev, board nonce and factory flag of a Hello waiting for its row (REGISTERING)."""

    # ------------------------------------------------------------ handshake

    def receive_hello(self, frame: bytes, now: float) -> Output:
        """The first frame of a link must be the board's Hello (request, seq 0)."""
        try:
            hello = _core.decode(frame)
        except _core.CoreError as e:
            # the id answered is the Hello's whenever its envelope could be read
            return self._refuse(e.name, e.reason, peek(frame)[1], None, now, e.field)
        if hello.action != Action.HELLO or hello.kind != Kind.REQUEST or hello.seq != 0:
            return self._refuse(
                "BAD_KIND", "the first frame of a link must be a Hello request with seq 0", hello.msg_id, None, now
            )
        body = hello.body
        device_id = body[Key.DEVICE_ID]  # the schema check above: present, a str
        nonce_b = body[Key.NONCE]  # present, bin of at most 16 bytes
        factory = body.get(Key.FACTORY) is True
        if len(nonce_b) != 16:
            reason = f"Hello nonce is {len(nonce_b)} bytes, want 16"
            return self._refuse("OUT_OF_RANGE", reason, hello.msg_id, None, now, Key.NONCE)
        try:
            k_dev, new_row = self.devices.hello_key(device_id, factory)
        except DeviceError as e:
            if e.key is None:
                return self._refuse(e.name, e.reason, hello.msg_id, None, now, Key.DEVICE_ID)
            return self._refuse_verified(e, frame, hello.msg_id, device_id, now)
        k_hello = _core.hello_key(k_dev)
        try:
            _core.decode(frame, k_hello)
        except _core.CoreError as e:
            why = "factory key" if factory else "device key"
            return self._refuse(
                e.name, f"Hello tag does not verify under the {why} of {device_id}", hello.msg_id, k_hello, now
            )
        ver_min, ver_max = body[Key.VER_MIN], body[Key.VER_MAX]
        if not ver_min <= PROTOCOL_VERSION <= ver_max:
            reason = f"gateway speaks version {PROTOCOL_VERSION} only, board {ver_min}..{ver_max}"
            at = Key.VER_MIN if ver_min > PROTOCOL_VERSION else Key.VER_MAX
            return self._refuse("BAD_VERSION", reason, hello.msg_id, k_hello, now, at)
        rev = body[Key.SCHEMA_REV]
        if not FIRST_SCHEMA_REV <= rev <= SCHEMA_REV:
            reason = f"schema_rev {rev} not supported: this gateway accepts {FIRST_SCHEMA_REV}..{SCHEMA_REV}"
            return self._refuse("BAD_VERSION", reason, hello.msg_id, k_hello, now, Key.SCHEMA_REV)
        if self.memory.verdict(device_id, now) is Verdict.CLOSE:
            p = self.policy
            reason = f"{device_id} sent {p.close_at} bad frames within {p.window_s:g} s: refused for up to that long"
            return self._refuse("RATE_LIMITED", reason, hello.msg_id, k_hello, now, cause="flood")
        self.device_id = device_id
        self.rx_max = body.get(Key.RX_MAX, MAX_FRAME)  # in range: the schema check above
        self._hello = (hello.msg_id, k_dev, nonce_b, factory)
        # The tag verified: only now may the Hello write the device table, and off the event
        # loop (`store`); M13: the new key is committed before the response that carries it.
        if factory:
            store: Callable[[], bytes | None] | None = functools.partial(self._onboard, device_id)
        elif new_row:
            store = functools.partial(self.devices.admit, device_id, k_dev)
        else:
            return self.hello_stored(None, now)
        self.state = State.REGISTERING
        return Output(store=store)

    def _onboard(self, device_id: str) -> bytes:
        """On the writer thread: the new key, and the id the board is to number its messages
        from. A board given a new key may be a replacement with a fresh flash, counting from 1
        again: the site and the CSMS would drop its messages as repeats of the old board's."""
        key = self.devices.onboard(device_id)
        self._floor = self.id_floor(device_id) if self.id_floor is not None else 0
        return key

    def hello_stored(self, new_key: bytes | None, now: float) -> Output:
        """The Hello's answer, once what it had to write is committed (`new_key`: the
        onboarding key made, M13)."""
        assert self._hello is not None
        msg_id, k_dev, nonce_b, _factory = self._hello
        self._hello = None
        nonce_g = os.urandom(16)
        k_up, k_dn, self.e_up, self.e_dn = _core.derive_keys(k_dev, nonce_b, nonce_g)
        self.rx = _core.Receiver(k_up, self.window)
        self.tx = _core.Sender(k_dn)
        self.idx = self.devices.idx_of(self.device_id)
        self.state = State.OPEN
        self._next_id = int(now * 1000) << 4  # unique per device across gateway restarts
        reply: dict[int, Any] = {
            Key.NONCE: nonce_g,
            Key.VER: PROTOCOL_VERSION,
            Key.TIME: proto_ts(now),
            Key.TIME_MS: int(now * 1000) % 1000,
            Key.SCHEMA_REV: SCHEMA_REV,
            Key.INTERVAL_S: self.interval_s,
        }
        if self.signer is not None:
            reply[Key.SIGNATURE] = self.signer.sign(self.device_id, nonce_b, nonce_g)
        out = Output()
        if new_key is not None:
            reply[Key.DEVICE_KEY] = _core.aes_ctr(self.e_dn, self.tx.seq, Key.DEVICE_KEY, new_key)
            if self._floor:
                reply[Key.ID_FLOOR] = self._floor
            out.onboarded = True
        out.frames.append(self.tx.seal(Kind.RESPONSE, msg_id, Priority.CONTROL, proto_ts(now), Action.HELLO, reply))
        return out

    def hello_failed(self, reason: str, now: float) -> Output:
        """What the Hello had to write could not be committed: refused (INTERNAL), link closed."""
        assert self._hello is not None
        msg_id, k_dev, _nonce, _factory = self._hello
        self._hello = None
        return self._refuse("INTERNAL", reason, msg_id, _core.hello_key(k_dev), now)

    def _refuse_verified(self, e: DeviceError, frame: bytes, msg_id: int, device_id: str, now: float) -> Output:
        """A refusal that stands only for a Hello tagged under `e.key` (a factory key's holder
        asking to onboard or re-key): reported as a SecurityEvent; any other Hello is refused
        for its tag."""
        assert e.key is not None
        k_hello = _core.hello_key(e.key)
        try:
            _core.decode(frame, k_hello)
        except _core.CoreError as ce:
            return self._refuse(ce.name, f"Hello tag does not verify under the key of {device_id}", msg_id, None, now)
        out = self._refuse(e.name, e.reason, msg_id, k_hello, now, Key.DEVICE_ID)
        if e.event:
            out.event = (device_id, e.event)
        return out

    def _refuse(
        self,
        name: str,
        reason: str,
        msg_id: int,
        key: bytes | None,
        now: float,
        field: int | None = None,
        cause: str = "bad_hello",
    ) -> Output:
        """Error frame before the session keys exist: `seq` 0, action Hello, class control,
        tagged under K_hello when the device's key is known (`key`), else with 16 zero
        bytes; the link is closed after it."""
        self.count(name)
        self.state = State.CLOSED
        self.refusal = f"{name}: {reason}"
        body = error_body(ErrorCode[name], reason, field)
        ts = proto_ts(now)
        frame = _core.encode(Kind.ERROR, 0, msg_id, Priority.CONTROL, ts, Action.HELLO, body, key or bytes(32))
        if key is None:
            frame = frame[:-16] + bytes(16)
        return Output([frame], close=True, cause=cause)

    # ------------------------------------------------------------ after Hello

    def count(self, name: str) -> None:
        self.rejected[name] = self.rejected.get(name, 0) + 1

    def rejected_frames(
        self, frames: list[bytes], errors: Iterable[tuple[int, int, str, int | None]], now: float
    ) -> Output:
        """Error frames for the frames `Receiver.ingest` refused (`Receiver.last_rejections`:
        index, code, reason, body key at fault), and the flood verdict."""
        out = Output()
        for index, code, reason, at in errors:
            name = _core.error_name(code)
            if code == ErrorCode.QUEUE_FULL:
                # Backpressure is not the board's fault: it retries, it is not counted as bad.
                self.count(name)
            else:
                self.note_bad(name, now)
            _kind, msg_id, prio, action = peek(frames[index])
            out.frames.append(self.error(code, reason, msg_id, prio, action, now, at))
        out.verdict = self.verdict(now)
        if out.verdict is Verdict.CLOSE:
            out.frames.append(
                self.error(ErrorCode.RATE_LIMITED, "too many bad frames: link closed", 0, 1, Action.CLOSE, now)
            )
            out.close = True
            out.cause = "flood"
        return out

    def note_bad(self, name: str, now: float) -> None:
        self.count(name)
        self.memory.note(self.device_id, now)

    def verdict(self, now: float) -> Verdict:
        return self.memory.verdict(self.device_id, now)

    def bad_budget(self, now: float) -> int:
        """Bad frames this link may still send before it is closed: the glue hands the core
        at most that many frames at a time, so that a flood is stopped at the frame that
        reaches the limit, not after a whole read."""
        return self.memory.budget(self.device_id, now)

    def error(
        self, code: int, reason: str, msg_id: int, prio: int, action: int, now: float, field: int | None = None
    ) -> bytes:
        """A sealed error frame answering `msg_id`; `field` is the body key at fault, if any."""
        assert self.tx is not None
        return self.tx.seal(Kind.ERROR, msg_id, prio, proto_ts(now), action, error_body(code, reason, field))

    def acks(self, items: Iterable[tuple[int, int, int]], now: float) -> list[bytes]:
        """Batched ack frames for `(prio, msg_id, action)` items: one frame per class and
        action, each covering up to 1 + `MAX_ACK_IDS` ids."""
        assert self.tx is not None
        groups: dict[tuple[int, int], list[int]] = {}
        for prio, msg_id, action in items:
            groups.setdefault((prio, action), []).append(msg_id)
        out = []
        ts = proto_ts(now)
        for (prio, action), ids in sorted(groups.items()):
            for i in range(0, len(ids), MAX_ACK_IDS + 1):
                chunk = ids[i : i + MAX_ACK_IDS + 1]
                body = {Key.IDS: chunk[1:]} if len(chunk) > 1 else {}
                out.append(self.tx.seal(Kind.ACK, chunk[0], prio, ts, action, body))
        return out

    def respond(self, msg_id: int, prio: int, action: int, body: dict[int, Any], now: float) -> bytes:
        """The sealed response; an OVERSIZE error frame instead when it would not fit the board's
        receive buffer (`rx_max`), so that the board's request still gets an answer naming why."""
        assert self.tx is not None
        frame = self.tx.seal(Kind.RESPONSE, msg_id, prio, proto_ts(now), action, body)
        if len(frame) > self.rx_max:
            why = self._too_large(action, len(frame), "response")
            return self.error(ErrorCode.OVERSIZE, why, msg_id, prio, action, now)
        return frame

    def request(self, action: int, body: dict[int, Any], now: float, prio: int | None = None) -> tuple[int, bytes]:
        """Seals a gateway request (a command for the board); returns its id and frame.
        `FrameTooLarge` when the frame is above the board's `rx_max` (nothing is sent: the
        counter it took leaves a gap, which the board's replay window accepts)."""
        assert self.tx is not None
        self._next_id += 1
        p = MESSAGES[action].priority if prio is None else prio
        frame = self.tx.seal(MESSAGES[action].kind, self._next_id, p, proto_ts(now), action, body)
        if len(frame) > self.rx_max:
            raise FrameTooLarge(self._too_large(action, len(frame), "request"))
        return self._next_id, frame

    def _too_large(self, action: int, size: int, what: str) -> str:
        name = MESSAGES[action].name if action in MESSAGES else str(action)
        return clip_reason(f"OVERSIZE: {name} {what} of {size} B; {self.device_id} receives at most {self.rx_max} B")

    def decrypt(self, seq: int, key: int, value: bytes) -> bytes:
        """A `secret` field of an uplink frame in clear."""
        return _core.aes_ctr(self.e_up, seq, key, value)
