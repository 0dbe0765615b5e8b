"""The Rust core of the gateway (crate `evcore`, bound by `evcore-py`).

Everything here follows docs/protocol.md. Frames are given without their u16 length
prefix unless a function says otherwise. Every rejection raises a subclass of
`CoreError` whose `name` is the wire error of the schema's error table ("BAD_TAG", ...),
checked in the protocol's precedence: size, msgpack structure, envelope shape, version,
tag, replay window, kind/action/priority, body.
"""

from collections.abc import Iterable
from typing import Any, final

__all__ = [
    "MAX_FRAME",
    "MAX_UP_FRAME",
    "PROTOCOL_VERSION",
    "SCHEMA_REV",
    "CoreError",
    "Frame",
    "FrameError",
    "PriorityQueue",
    "QueueFull",
    "Receiver",
    "Sender",
    "SignatureError",
    "__version__",
    "aes_ctr",
    "decode",
    "derive_keys",
    "ed25519_verify",
    "ed25519_verify_batch",
    "encode",
    "error_name",
    "hello_key",
    "pack",
    "relay_rows",
    "schema_rev",
    "split_frames",
    "unpack",
]

__version__: str
MAX_FRAME: int
"""Largest frame in bytes (4096)."""
MAX_UP_FRAME: int
"""Largest upstream envelope in bytes (1 MiB, docs/upstream.md)."""
PROTOCOL_VERSION: int
"""The envelope's `ver` (1)."""
SCHEMA_REV: int
"""Revision of tools/schema/messages.toml the core was generated from."""

# ---------------------------------------------------------------- errors

class CoreError(Exception):
    """Base of every error raised by the core.

    `code` is the wire error code (`name` its schema name), `reason` names the cause,
    `field` is the body key at fault when there is one.
    """

    code: int
    name: str
    reason: str
    field: int | None

class FrameError(CoreError):
    """A frame or stream was rejected (TRUNCATED, BAD_TAG, REPLAY, OUT_OF_RANGE, ...)."""

class SignatureError(CoreError):
    """An Ed25519 public key or signature has the wrong length (BAD_SIGNATURE)."""

class QueueFull(CoreError):
    """The frame's priority class is at its bound; nothing was queued (QUEUE_FULL)."""

# ---------------------------------------------------------------- keys

def hello_key(k_dev: bytes) -> bytes:
    """`K_hello = HMAC-SHA256(K_dev, "evlink/1 hello")` (32 bytes)."""

def derive_keys(k_dev: bytes, nonce_board: bytes, nonce_gateway: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """The per-connection keys `(K_up, K_dn, E_up, E_dn)` (32, 32, 16, 16 bytes)."""

def aes_ctr(key16: bytes, seq: int, field_key: int, data: bytes) -> bytes:
    """AES-128-CTR of a `secret` field value (encrypts and decrypts).

    The counter block is `seq (8 BE) || field_key (4 BE) || block counter (4 BE, from 0)`.
    Raises ValueError unless `key16` is 16 bytes.
    """

def ed25519_verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is a valid Ed25519 signature of `message` by `public`.

    Raises SignatureError when `public` is not 32 bytes or `signature` not 64.
    """

def ed25519_verify_batch(items: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
    """Verifies `(public, message, signature)` items with one batch equation (GIL
    released); on failure each item is checked alone. Malformed items are False."""

# ---------------------------------------------------------------- frames

@final
class Frame:
    """A decoded and validated frame. `body` maps int keys to values (bin → bytes,
    array → list, map → dict); keys the schema does not know are kept."""

    @property
    def ver(self) -> int: ...
    @property
    def kind(self) -> int: ...
    @property
    def seq(self) -> int: ...
    @property
    def msg_id(self) -> int: ...
    @property
    def prio(self) -> int: ...
    @property
    def ts(self) -> int: ...
    @property
    def action(self) -> int: ...
    @property
    def body(self) -> dict[Any, Any]: ...
    @property
    def tag(self) -> bytes: ...

def encode(
    kind: int,
    seq: int,
    msg_id: int,
    prio: int,
    ts: int,
    action: int,
    body: dict[Any, Any],
    key: bytes,
    *,
    ver: int = 1,
) -> bytes:
    """Encodes the canonical envelope (shortest forms, dict order kept) and appends the
    tag under `key`. Values: None, bool, int, float, str, bytes, list/tuple, dict.
    The body is not validated (so that tests can build bad frames)."""

def decode(frame: bytes, key: bytes | None = None, *, max_frame: int | None = None) -> Frame:
    """Parses and validates a frame against the schema; checks the tag when `key` is
    given. No replay window (see `Receiver`). `max_frame` (default MAX_FRAME) raises the
    size limit for upstream envelopes, up to MAX_UP_FRAME (ValueError beyond); above
    MAX_FRAME the budget of values is MAX_UP_OBJECTS instead of MAX_OBJECTS
    (`gateway.schema`). Raises FrameError."""

def relay_rows(
    frame: bytes, key: bytes | None = None, *, max_frame: int | None = None
) -> tuple[tuple[int, int, int, int, int, int], str, list[tuple[str, int, int, int, bytes, str | None]]]:
    """A Relay read for storing its rows, without a dict per item: the frame is checked as
    `decode` does (`max_frame` default MAX_UP_FRAME), then `((kind, seq, msg_id, prio, ts,
    action), site_id, rows)`, a row being `(device_id, msg_id, prio, action, frame,
    token_uid)` of a `relayed` item, its inner frame's header read structurally (its tag is
    not checked). Raises FrameError for a bad Relay or inner frame, ValueError for another
    action."""

def pack(value: Any) -> bytes:
    """One value in canonical msgpack."""

def unpack(data: bytes, max_objects: int | None = None) -> Any:
    """One bare msgpack value, with the decoder's limits (depth 8, 256 items per
    container, `gateway.schema.MAX_OBJECTS` values below the outermost container —
    MAX_UP_OBJECTS when `data` is longer than MAX_FRAME, `max_objects` when given —, no map
    repeating a key, UTF-8 strings, no ext types); trailing bytes are an error. Raises FrameError."""

def split_frames(buf: bytes | bytearray) -> tuple[list[bytes], int]:
    """Cuts the complete u16-big-endian-length-prefixed frames off `buf`; returns them
    and the number of bytes they took (keep the rest for the next read). Raises
    FrameError (OVERSIZE) for a prefix of 0 or above MAX_FRAME."""

def schema_rev() -> int:
    """The schema revision (same as SCHEMA_REV)."""

def error_name(code: int) -> str:
    """The schema name of an error code ("OK" for 0, as in `Receiver.ingest`'s
    statuses). Raises ValueError for an unknown code."""

# ---------------------------------------------------------------- hot path

@final
class PriorityQueue:
    """Four priority classes (0 urgent … 3 bulk). Urgent frames first; classes 1-3 by
    deficit round robin with byte quanta of 8, 4 and 1 times `quantum`, so none starves.
    `max_items` and `max_bytes` bound each class; a push beyond them raises QueueFull
    and an accepted frame is never dropped."""

    def __new__(cls, max_items: int = 65536, max_bytes: int = 67108864, quantum: int = 4096) -> PriorityQueue: ...
    def push(self, prio: int, device: int, msg_id: int, action: int, frame: bytes) -> None:
        """Queues a frame in class `prio` (ValueError above 3; QueueFull when full)."""

    def pop_batch(self, max_items: int, max_bytes: int | None = None) -> list[tuple[int, int, int, int, bytes]]:
        """Up to `max_items` `(prio, device, msg_id, action, frame)` in service order,
        at most `max_bytes` bytes of frames in all (the first one always comes)."""

    def __len__(self) -> int: ...
    def len_class(self, prio: int) -> int:
        """Frames held in class `prio`."""

    def bytes_class(self, prio: int) -> int:
        """Frame bytes held in class `prio`."""

@final
class Receiver:
    """One direction of a link, receiving side: the tag key (HMAC state precomputed
    once) and the replay window (`window` counters, 1‥64). A rejected frame never
    changes the window."""

    def __new__(cls, key: bytes, window: int = 64) -> Receiver: ...
    @property
    def highest(self) -> int:
        """The highest `seq` accepted so far (0 at the start)."""

    def verify(self, frame: bytes) -> tuple[int, int, int, int, int, int]:
        """Checks one frame (every step, window included) and marks its `seq` seen.
        Returns `(kind, seq, msg_id, prio, ts, action)`. Raises FrameError."""

    def receive(self, frame: bytes) -> Frame:
        """`verify`, returning the decoded frame."""

    def ingest(self, frames: Iterable[bytes], queue: PriorityQueue, device: int) -> bytes:
        """Checks a batch of frames from `device` and queues the good ones in their
        class, with the GIL released. Returns one status byte per frame: 0 when queued,
        else the error code (19 QUEUE_FULL when the class was full; that frame's `seq`
        stays unseen). `last_errors()` gives the reasons."""

    def last_errors(self) -> list[tuple[int, int, str]]:
        """`(index, code, reason)` of each frame the last `ingest` rejected."""

    def last_rejections(self) -> list[tuple[int, int, str, int | None]]:
        """`(index, code, reason, field)` of each frame the last `ingest` rejected;
        `field` is the body key at fault (as `CoreError.field`), None when there is none."""

@final
class Sender:
    """One direction of a link, sending side: numbers frames 1, 2, … and tags them."""

    def __new__(cls, key: bytes) -> Sender: ...
    @property
    def seq(self) -> int:
        """The `seq` the next sealed frame carries."""

    def seal(self, kind: int, msg_id: int, prio: int, ts: int, action: int, body: dict[Any, Any]) -> bytes:
        """Encodes and tags a frame with the next `seq` (body not validated)."""
