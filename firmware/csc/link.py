"""The link protocol state machine, sans I/O (docs/protocol.md, "Link behaviour").

No socket and no clock inside: every entry point takes `now_ms` (ticks from the caller),
bytes come in through `receive()`, frames go out through `transmit()` (which seals the
next queued message in place in the send queue's buffer), timers through `handle_timer()` /
`get_timer()`, and what happened comes out of `next_event()` as small tuples whose first
item names the event in the past tense:

    (OPENED, hello_response_body)         handshake done, session keys in use
    (KEY_PROVISIONED, device_key)         onboarding: store it, close, reconnect with it
    (CLOSED, reason)                      the link must be closed (refused, flood, framing)
    (REQUEST_RECEIVED, mid, action, prio, body)   a command to answer with respond()/refuse()
    (EVENT_RECEIVED, mid, action, body)
    (RESPONSE_RECEIVED, mid, action, body)        answer to our request
    (FAILED, mid, code, reason)           our request failed (error frame or TIMEOUT)

and the ids of our durable events that are now durable at the gateway come out of
`next_acked()`: no tuple per ack, so that sending a frame and receiving its ack allocate
nothing (`micropython tests/fw_alloc_link.py` runs both with the heap locked).

Bad frames (malformed, replayed, wrongly tagged) are answered with an error frame,
counted in `bad`/`errors`, and change no state; more than FLOOD_MAX of them within
FLOOD_MS closes the link. Messages awaiting an answer are retransmitted after their
timeout (same id and body, new seq and tag) with back-off ×2 up to 60 s; durable events
are never given up, other requests fail with TIMEOUT after 3 tries.
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

from micropython import const

# the schema's tables through the module (`schema.ACT_INDEX`): a name imported from it would be
# an entry of this module's globals (heap on a board; its int constants cost nothing)
from . import crypto, frame, schema
from .msgpack import Map
from .schema import (
    A_CLOSE,
    A_HELLO,
    E_BAD_SIGNATURE,
    E_BAD_TAG,
    E_RATE_LIMITED,
    E_REJECTED,
    E_REPLAY,
    E_TIMEOUT,
    F_DEVICE_ID,
    F_DEVICE_KEY,
    F_ERROR_CODE,
    F_FACTORY,
    F_FW_VERSION,
    F_IDS,
    F_NONCE,
    F_REASON,
    F_RX_MAX,
    F_SCHEMA_REV,
    F_SIGNATURE,
    F_VER_MAX,
    F_VER_MIN,
    K_ACK,
    K_ERROR,
    K_EVENT,
    K_REQUEST,
    K_RESPONSE,
    P_CONTROL,
    PROTOCOL_VERSION,
    SCHEMA_REV,
    TAG_LEN,
)
from .sendq import RX_MAX

_e: dict = Map()  # empty: the body of the acks this board sends (encoded at once by the queue, never changed)

# states
IDLE = const(0)
HELLO_SENT = const(1)
OPEN = const(2)

# events
OPENED = const(1)
KEY_PROVISIONED = const(2)
CLOSED = const(3)
REQUEST_RECEIVED = const(4)
EVENT_RECEIVED = const(5)
RESPONSE_RECEIVED = const(6)
FAILED = const(8)

FLOOD_MAX = const(20)
FLOOD_MS = const(10000)
_MAX_TRIES = const(3)
_MAX_BACKOFF = const(60000)
_RECENT = const(32)
# acked ids waiting for next_acked(): above the app's window of durable records in flight; an
# ack that finds them full is not taken (the event stays in flight, is resent, and acked again)
_ACKS = const(10)
_BITS = const(64)  # the replay window's width (a constant: no entry in the module's globals)

# inflight entry fields
_ACT = const(0)
_PRIO = const(1)
_KIND = const(2)
_BODY = const(3)
_DEADLINE = const(4)
_TIMEOUT = const(5)
_TRIES = const(6)
_DURABLE = const(7)


def _known(action):
    return action < len(schema.ACT_INDEX) and schema.ACT_INDEX[action] != 255


def default_prio(action):
    return schema.ACT_PRIO[schema.ACT_INDEX[action]] if _known(action) else P_CONTROL


def _ilen(v):
    # bytes of the msgpack encoding of the int v (msgpack.Writer.integer)
    if -32 <= v < 0x80:
        return 1
    if -0x80 <= v < 0x100:
        return 2
    if -0x8000 <= v < 0x10000:
        return 3
    return 5 if -0x80000000 <= v < 0x100000000 else 9


# The link's small helpers are functions of the module rather than methods: a method takes an
# entry of Link's method table too (heap on a board).
def _count(link, code):
    # a bad frame received, counted under its error code (all of them: sum(link.errors.values()))
    link.errors[code] = link.errors.get(code, 0) + 1


def _acked(link, mid):
    a = link.acked
    n = a[0]
    if n < _ACKS and link.inflight.pop(mid, None) is not None:
        a[n + 1] = mid
        a[0] = n + 1


def _reject(link, e, now_ms):
    _count(link, e.code)
    if ticks_diff(now_ms, link._flood_t) > FLOOD_MS:
        link._flood_t = now_ms
        link._flood = 0
    link._flood += 1
    a = e.action if _known(e.action) else A_CLOSE
    link.q.put(K_ERROR, default_prio(a), e.id, a, frame.error_body(e))
    if link._flood > FLOOD_MAX:
        _count(link, E_RATE_LIMITED)
        link.close("flood of bad frames")


def _recent(link, mid):
    """Where command `mid` is remembered (link.recent), or -1."""
    m = None
    for i in range(_RECENT):
        a = link.recent[i]
        if isinstance(a, bytes):
            if m is None:
                m = mid.to_bytes(8, "big")
            if a.startswith(m):
                return i
        elif isinstance(a, tuple):
            if a[0] == mid:
                return i
        elif a == mid:
            return i
    return -1


def _remember(link, x):
    # the next entry of link.recent, the last commands received (the oldest one goes)
    i = link.recent_i
    link.recent[i] = x
    link.recent_i = (i + 1) % _RECENT


def ticks_diff(a, b):
    try:
        import time

        return time.ticks_diff(a, b)
    except AttributeError:  # CPython tooling: plain ints
        return a - b


class Link:
    def __init__(self, q, device_id, fw_version=""):
        self.q = q
        self.ident = (device_id, fw_version)  # for the Hello
        self.state = IDLE
        self.at = 0  # transmit() leaves its frame at q.w.buf[at : at + n]
        self._rx = frame.Frame()  # what receive() decodes into
        self.acked = [0] * (_ACKS + 1)  # acked ids, as a stack: [count, id, id, …]
        self.seq = 0
        self.events = []
        self.inflight = {}
        self.load = None  # fn(mid) -> body of a stored durable event (the outbox), or None
        # the last commands received (dedup): the id of one not answered yet (an int), or its
        # answer: the id (8 bytes) + bytes([kind, prio, action >> 8, action & 0xff]) + the encoded
        # body (one small object), or (id, kind, action, prio, body) when the body has a secret field
        self.recent: list = [None] * _RECENT
        self.recent_i = 0
        self.errors = {}  # error code -> count of the bad frames received (no total kept: one attribute fewer)
        self._flood = 0
        self._flood_t = 0
        self.urgent_max_ms = 0  # enqueue → sealed, of the urgent frames
        self._mac_up = None
        self._mac_dn = None
        # the replay window of the downlink counters (check, accept): the highest seq accepted and
        # a bitmap below it; a new one with each session's keys (_hello_response)
        self.highest = 0
        self.bits = bytearray(8)
        self.bits[0] = 1
        # the AES keys of secret fields, up (bytes 0-15) then down (16-31): one bytes object, not a
        # tuple of two (48 B of heap for the session, not 96)
        self._e = None
        # M14/M17: the Ed25519 public key of the local CSMS the board trusts (services.security
        # sets it from the local-CSMS certificate installed); None: trust on first use
        self.anchor = None

    # ---------------------------------------------------------------- handshake
    def connect(self, now_ms, k_dev, nonce, mid, factory=False):
        """Start a connection: queue the Hello (seq 0, tagged under K_hello)."""
        self.q.clear()
        self.state = HELLO_SENT
        self.seq = 0
        nonce = bytes(nonce)
        # until the Hello's answer: the session keys are made from it, and its deadline
        self._hs = (k_dev, nonce, mid, now_ms + schema.ACT_TIMEOUT[schema.ACT_INDEX[A_HELLO]])
        self._mac_up = crypto.Hmac(crypto.hello_key(k_dev))
        body = Map()
        body[F_DEVICE_ID] = self.ident[0]
        body[F_NONCE] = nonce
        body[F_VER_MIN] = PROTOCOL_VERSION
        body[F_VER_MAX] = PROTOCOL_VERSION
        body[F_SCHEMA_REV] = SCHEMA_REV
        body[F_RX_MAX] = RX_MAX  # the gateway sends no larger frame (sendq.py: the receive buffer)
        if self.ident[1]:
            body[F_FW_VERSION] = self.ident[1]
        if factory:
            body[F_FACTORY] = True
        self.q.put(K_REQUEST, P_CONTROL, mid, A_HELLO, body)

    def close(self, reason=None):
        """The link is down: the app closed it (its socket is gone), or with a `reason` the link
        itself did (refused, flood, framing), which a CLOSED event tells the app."""
        self.state = IDLE
        self.q.clear()
        if reason is not None:
            self.events.append((CLOSED, reason))

    def _hello_response(self, data, start, end):
        try:
            f = frame.decode(data, None, None, None, start, end)
        except frame.FrameError as e:
            self.close("bad hello response: " + e.reason)
            return
        if f.kind == K_ERROR:
            self.close("hello refused: %s" % f.body.get(F_REASON, ""))
            return
        k, nonce, mid, _ = self._hs
        if f.kind != K_RESPONSE or f.action != A_HELLO or f.seq != 1 or f.id != mid:
            self.close("unexpected frame before hello")
            return
        k_up, k_dn, e_up, e_dn = crypto.derive(k, nonce, f.body[F_NONCE])
        self._hs = None  # only the session keys from here
        mac_dn = crypto.Hmac(k_dn)
        if not mac_dn.verify(data, start, end - TAG_LEN - 2, data, end - TAG_LEN):
            _count(self, E_BAD_TAG)
            self.close("hello response tag")
            return
        if self.anchor is not None and not self._signed(nonce, f.body):
            # the HMAC key alone proves only a copy of the device table: a gateway that
            # cannot sign with the anchored key is not the local CSMS this board trusts
            _count(self, E_BAD_SIGNATURE)
            self.close("hello answer not signed by the local CSMS anchor")
            return
        self._mac_up = crypto.Hmac(k_up)
        self._mac_dn = mac_dn
        self._e = e_up + e_dn
        self.highest = 0  # the session's replay window: seq 0 seen, then the answer's seq 1
        b = self.bits
        for i in range(8):
            b[i] = 0
        b[0] = 1
        self.accept(1)
        self.state = OPEN
        key = f.body.get(F_DEVICE_KEY)
        if key is not None:
            self.events.append((KEY_PROVISIONED, crypto.ctr(e_dn, 1, F_DEVICE_KEY, key)))
        self.events.append((OPENED, f.body))
        # Resend what the last connection left unanswered, oldest first: MicroPython dicts
        # do not keep insertion order, and the receiver must see each device's messages in
        # the order they were made (ids grow with time).
        for mid in sorted(self.inflight):
            self._queue(mid, self.inflight[mid])

    def _signed(self, nonce, body):
        """The Hello answer's Ed25519 signature over both nonces and the device id, by the
        anchor (gateway/localcsms/hellokey.py signs the same bytes)."""
        sig = body.get(F_SIGNATURE)
        if sig is None or len(sig) != 64:
            return False
        import sys

        m = __import__("csc.ed25519", None, None, ("verify",))
        try:
            # the signature's domain first (hellokey.DOMAIN); a literal here: a global would cost heap
            signed = b"evedge hello answer\x00" + nonce + bytes(body[F_NONCE]) + self.ident[0].encode()
            return m.verify(self.anchor, signed, sig)
        except ValueError:  # BadKey: an anchor that verifies nothing
            return False
        finally:  # cold: once per connection; its code and tables leave the heap
            m = None
            sys.modules.pop("csc.ed25519", None)
            pkg = sys.modules.get("csc")
            if pkg is not None and hasattr(pkg, "ed25519"):
                delattr(pkg, "ed25519")

    # ---------------------------------------------------------------- receiving
    def decrypt(self, seq, key, value):
        """Plaintext of a secret field received in the frame with counter `seq`."""
        return crypto.ctr(self._e[16:], seq, key, value)

    def receive(self, data, now_ms, start=0, end=-1):
        """Process one received frame: data[start:end] (no length prefix; end -1: to the end)."""
        if end < 0:
            end = len(data)
        if self.state == HELLO_SENT:
            self._hello_response(data, start, end)
            return
        if self.state != OPEN:
            return
        try:
            f = frame.decode(data, self._mac_dn, self, self._rx, start, end)  # (the link is the window)
        except frame.FrameError as e:
            self.q.lend(False)
            _reject(self, e, now_ms)
            return
        # decoded (the values are copies): a frame that borrowed the queue's shared region
        # (sendq.lend) gives it back before the ack, answer or error frame below is queued there
        self.q.lend(False)
        body = f.body
        f.body = None  # the message is the events' from here: not kept alive until the next frame
        k = f.kind
        mid = f.id
        if k == K_RESPONSE or k == K_ERROR:  # noqa: PLR1714, SIM109 — two int compares on MicroPython
            if self.inflight.pop(mid, None) is None:
                return  # a late answer to something already settled
            if k == K_RESPONSE:
                self.events.append((RESPONSE_RECEIVED, mid, f.action, body))
            else:
                self.events.append((FAILED, mid, body.get(F_ERROR_CODE, 0), body.get(F_REASON, "")))
        elif k == K_ACK:
            _acked(self, mid)
            if body is not None:  # an ack the gateway does not send (other keys): decoded
                for i in body.get(F_IDS, ()):
                    _acked(self, i)
            elif f.ids >= 0:  # its id list, read in place
                r = frame.ack_ids(f, data)
                for _ in range(r.n):
                    r.head()
                    _acked(self, r.v)
        elif k == K_REQUEST:
            i = _recent(self, mid)
            if i >= 0:  # a repeat: the same answer (once there is one), not acted on twice
                a = self.recent[i]
                if isinstance(a, bytes):
                    self.q.put(a[8], a[9], mid, a[10] << 8 | a[11], a[12:])
                elif isinstance(a, tuple):
                    self.q.put(a[1], a[3], mid, a[2], a[4])
                return
            self.events.append((REQUEST_RECEIVED, mid, f.action, f.prio, body, f.seq))
            _remember(self, mid)
        else:
            if schema.ACT_DURABLE[schema.ACT_INDEX[f.action]]:
                self.q.put(K_ACK, f.prio, mid, f.action, _e)
            self.events.append((EVENT_RECEIVED, mid, f.action, body))

    # ---------------------------------------------------------------- replay window
    # docs/protocol.md, "Counters and the replay window": `highest`, the highest seq accepted, and
    # a 64-bit bitmap, `bits`: bit d set means `highest - d` was seen (bit 0 is `highest` itself).
    # A seq above `highest` slides the window; a seq 64 or more below it, or one whose bit is set,
    # is a replay. The link keeps it itself (no object of its own: a class and an instance of heap
    # on a board) and is the `window` frame.decode takes: decode calls check at its step (6),
    # after the tag, and accept only once the whole frame is valid, so neither a forged nor a
    # rejected frame moves the window.
    #
    # The bitmap is a bytearray of 8 bytes (byte 0 holds bits 0-7) rather than a 64-bit int: on a
    # 32-bit board a small int has 30 bits, so an int bitmap would allocate a long int on every
    # update, while the bytearray is shifted in place. `seq` itself is up to 2**32-1 and becomes a
    # long int above 2**30 on such a board; that is the protocol's range.
    def check(self, seq):
        """Raise FrameError(E_REPLAY) when `seq` is a replay; change nothing."""
        if seq > self.highest:
            return
        d = self.highest - seq
        if d >= _BITS or self.bits[d >> 3] & (1 << (d & 7)):
            raise frame.FrameError(E_REPLAY, "counter already seen or below the window")

    def accept(self, seq):
        """Record `seq` (which `check` passed)."""
        b = self.bits
        if seq > self.highest:
            s = seq - self.highest
            self.highest = seq
            if s >= _BITS:
                for i in range(8):
                    b[i] = 0
            else:
                q = s >> 3
                r = s & 7
                i = 7
                while i >= 0:
                    j = i - q
                    v = 0
                    if j >= 0:
                        v = (b[j] << r) & 0xFF
                        if r and j > 0:
                            v |= b[j - 1] >> (8 - r)
                    b[i] = v
                    i -= 1
            b[0] |= 1
        else:
            d = self.highest - seq
            b[d >> 3] |= 1 << (d & 7)

    def next_acked(self):
        """The id of a durable event of ours that the gateway acknowledged, or -1 (any order:
        each ack is handled alone)."""
        a = self.acked
        n = a[0]
        if not n:
            return -1
        a[0] = n - 1
        return a[n]

    # ---------------------------------------------------------------- sending
    def respond(self, mid, action, prio, body):
        """Answer command `mid` (its response body)."""
        self._answer(mid, K_RESPONSE, action, prio, body)

    def refuse(self, mid, action, prio, reason, code=E_REJECTED):
        """Answer command `mid` with an error frame (REJECTED and a reason by default)."""
        b = Map()
        b[F_ERROR_CODE] = code
        b[F_REASON] = reason[: schema.LIMITS[schema.FLEN[F_REASON]]]  # the schema's bound
        self._answer(mid, K_ERROR, action, prio, b)

    def _answer(self, mid, kind, action, prio, body):
        q = self.q
        a = (mid, kind, action, prio, body)
        if q.put(kind, prio, mid, action, body):
            b = q.encoded(q.last)
            if b is not None:  # kept encoded: a few bytes rather than the body's dict
                a = mid.to_bytes(8, "big") + bytes((kind, prio, action >> 8, action & 0xFF)) + b
        i = _recent(self, mid)
        if i < 0:
            _remember(self, a)
        else:
            self.recent[i] = a

    def request(self, mid, action, body, now_ms, prio=None, kind=K_REQUEST):
        """Send a request; its answer comes as RESPONSE_RECEIVED or FAILED. (event() sends a
        durable event through here too, `kind` K_EVENT: kept in flight until acked.)"""
        t = schema.ACT_TIMEOUT[schema.ACT_INDEX[action]]
        e = [action, default_prio(action) if prio is None else prio, kind, body, now_ms + t, t, 1, kind == K_EVENT]
        self.inflight[mid] = e
        if self.state == OPEN:
            self._queue(mid, e)

    def event(self, mid, action, body, now_ms, prio=None, stored=False):
        """Publish an event; a durable one is resent until ACKED. `stored`: its body can be
        read again, so it is not kept in RAM while awaiting the ack: True when it is on flash
        in the outbox (self.load reads it), or a function of `mid` that makes it again."""
        d = schema.ACT_DURABLE[schema.ACT_INDEX[action]]
        if not d:
            if self.state == OPEN:
                return self.q.put(K_EVENT, default_prio(action) if prio is None else prio, mid, action, body)
            return False
        self.request(mid, action, body, now_ms, prio, K_EVENT)
        if stored is True:
            stored = self.load
        if stored:
            self.inflight[mid][_BODY] = stored
        return True

    def _queue(self, mid, e):
        """Queue an in-flight message for sending; False when the send queue refused it
        (then the timer tries again in 50 ms without counting a try)."""
        body = e[_BODY]
        if callable(body):  # a stored event: read from flash (or made) again to be sent
            body = body(mid)
            if body is None:  # its record is gone (shed): nothing left to send
                del self.inflight[mid]
                self.events.append((FAILED, mid, 0, "record gone"))
                return True
        if self.q.put(e[_KIND], e[_PRIO], mid, e[_ACT], body):
            return True
        e[_TRIES] -= 1
        e[_DEADLINE] -= e[_TIMEOUT] - 50
        return False

    def transmit(self, now_ms, ts):
        """Seal the next queued message; return its length n (0: nothing to send). The bytes
        to write are q.w.buf[at : at + n] (length prefix included), valid until the next put():
        the frame is sealed in place in the send queue, around its body (sendq.HEAD/TAIL)."""
        q = self.q
        c = q.next()
        if c < 0:
            return 0
        s = q.slot(c)
        if self.state == IDLE or (self.state == HELLO_SENT and q.action[s] != A_HELLO):
            q.pop(c)
            return 0
        w = q.w
        seq = self.seq
        mid = q.mid[s]
        o = q.off[s]  # the body
        p = o + q.ln[s]  # the tag
        # the envelope ends where the body starts: its length first (msgpack ints)
        start = o - 6 - _ilen(seq) - _ilen(mid) - _ilen(ts) - _ilen(q.action[s])
        w.pos = start + 2
        w.end = p
        w.byte(0x99)
        w.integer(PROTOCOL_VERSION)
        w.integer(q.kind[s])
        w.integer(seq)
        w.integer(mid)
        w.integer(c)  # the class is the priority
        w.integer(ts)
        w.integer(q.action[s])
        q.secrets(s, self._e, seq)  # encrypted under this frame's seq: a resend re-encrypts
        b = w.buf
        b[p] = 0xC4
        b[p + 1] = TAG_LEN
        self._mac_up.tag_into(b, start + 2, p, b, p + 2)
        n = p + TAG_LEN - start
        b[start] = n >> 8
        b[start + 1] = n & 0xFF
        if c == 0 and q.ticks is not None:
            d = ticks_diff(q.ticks(), q.t[s])
            self.urgent_max_ms = max(self.urgent_max_ms, d)
        q.pop(c)
        self.seq = seq + 1
        self.at = start
        return n + 2

    # ---------------------------------------------------------------- timers
    def get_timer(self):
        """The earliest deadline (ticks) or None."""
        t = None
        for mid in self.inflight:
            d = self.inflight[mid][_DEADLINE]
            if t is None or ticks_diff(d, t) < 0:
                t = d
        if self.state == HELLO_SENT and (t is None or ticks_diff(self._hs[3], t) < 0):
            t = self._hs[3]
        return t

    def handle_timer(self, now_ms):
        if self.state == HELLO_SENT and ticks_diff(now_ms, self._hs[3]) >= 0:
            self.close("hello timeout")
            return
        if self.state != OPEN:
            return
        due = None
        for mid in self.inflight:
            if ticks_diff(now_ms, self.inflight[mid][_DEADLINE]) >= 0:
                if due is None:
                    due = []
                due.append(mid)
        if due is None:
            return
        due.sort()  # oldest first, as above: dict order is not insertion order on MicroPython
        for mid in due:
            e = self.inflight[mid]
            if not e[_DURABLE] and e[_TRIES] >= _MAX_TRIES:
                del self.inflight[mid]
                self.events.append((FAILED, mid, E_TIMEOUT, "no answer"))
                continue
            e[_TRIES] += 1
            old = e[_TIMEOUT]
            if e[_TRIES] > 1:  # a retransmission (not a first send after a refusal): back off
                t = old * 2
                e[_TIMEOUT] = t if t < _MAX_BACKOFF else _MAX_BACKOFF
            e[_DEADLINE] = now_ms + e[_TIMEOUT]
            if not self._queue(mid, e):
                e[_TIMEOUT] = old  # not sent: no back-off either

    def next_event(self):
        if self.events:
            return self.events.pop(0)
        return None
