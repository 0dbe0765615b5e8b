"""The link core's unit tests (csc/link.py, csc/sendq.py), shared by CPython and MicroPython.

The board's sans-I/O `Link` is driven in memory against a gateway end played by the
firmware's own codec (csc/frame.py, csc/crypto.py, csc/msgpack.py, the link's replay window), whose
byte-for-byte parity with the Rust core the golden vectors prove (tests/fw_vectors.py), so
the same tests run under both interpreters: tests/test_fw_linkcore.py runs every `test_*`
here as a pytest test and spawns `micropython tests/fw_linktests_runner.py`, on the source
and on the build. tests/test_fw_link.py keeps the cases played against the Rust core itself.

Only the public behaviour is used: Link.connect / receive / transmit (the sealed bytes are
`link.q.w.mv[link.at : link.at + n]`) / next_acked / handle_timer / get_timer / request /
event / respond / refuse / decrypt / close / next_event, its `state`, `bad` and `errors`, and SendQueue.put / len().
The module keeps to the subset both interpreters understand: no typing, no f-strings, no
pytest, no walrus, dicts compared item by item (MicroPython's decoded maps are OrderedDict).
"""

from csc import crypto, frame
from csc import link as _link
from csc import schema as _schema
from csc import sendq as _sendq
from csc.frame import FrameSplitter
from csc.msgpack import FrameError, Writer
from csc.sendq import SendQueue


class _Names:
    """A firmware module's names. On a build (tools/board/build.py) the public integer
    constants are inlined and dropped from the module; `fill` reads them from the source."""

    def __init__(self, mod):
        for n in dir(mod):
            if not n.startswith("__"):
                setattr(self, n, getattr(mod, n))

    def fill(self, path):
        with open(path) as f:
            for line in f:
                i = line.find(" = const(")
                if i <= 0 or line[0] == " " or line[0] == "_":
                    continue
                name = line[:i]
                if not hasattr(self, name):
                    text = line.split("#")[0]
                    setattr(self, name, int(text[i + 9 : text.rindex(")")]))


S = _Names(_schema)  # S.A_HELLO, S.F_NONCE, S.E_REPLAY, …
L = _Names(_link)  # L.Link, L.OPENED, L.FLOOD_MAX, …
Q = _Names(_sendq)  # Q.SLOTS, Q.CAP, Q.MAX_BODY


def use_source(firmware_dir):
    """Running a build: take the constants from the firmware's source."""
    S.fill(firmware_dir + "/csc/schema.py")
    L.fill(firmware_dir + "/csc/link.py")
    Q.fill(firmware_dir + "/csc/sendq.py")


# ---------------------------------------------------------------- the gateway's end

KEY = bytes(range(32))  # K_dev
TS = 5
_n = [0]


def _nonce():
    _n[0] += 1
    return bytes([_n[0] & 0xFF]) * 16


class Gw:
    """The gateway's end of one connection, in memory: answers the Hello, seals downlink
    frames under K_dn and checks uplink frames under K_up with its own replay window."""

    def __init__(self, key=KEY):
        self.key = key
        self.seq = 1  # the Hello response is downlink seq 1
        self.w = Writer()
        self.nonce = None

    def hello(self, data, device_key=None):
        """The Hello response to the board's Hello frame `data`."""
        f = frame.decode(data, crypto.Hmac(crypto.hello_key(self.key)))
        assert f.kind == S.K_REQUEST and f.action == S.A_HELLO and f.seq == 0
        self.hello_frame = f
        self.nonce = _nonce()
        k_up, k_dn, self.e_up, self.e_dn = crypto.derive(self.key, f.body[S.F_NONCE], self.nonce)
        self.mac_up = crypto.Hmac(k_up)
        self.mac_dn = crypto.Hmac(k_dn)
        self.win = _link.Link(None, "gw")  # its replay window: the firmware's is the link's (check/accept)
        body = {S.F_NONCE: self.nonce, S.F_VER: 1, S.F_TIME: 1000}
        if device_key is not None:
            body[S.F_DEVICE_KEY] = crypto.ctr(self.e_dn, 1, S.F_DEVICE_KEY, device_key)
        return self.seal(S.K_RESPONSE, f.id, S.P_CONTROL, S.A_HELLO, body, seq=1)

    def seal(self, kind, mid, prio, action, body, seq=None, mac=None):
        """One downlink frame (no length prefix); the next seq unless given."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        end = frame.encode(self.w, kind, seq, mid, prio, TS, action, body, mac or self.mac_dn)
        return bytes(self.w.mv[2:end])

    def receive(self, data):
        """Decode an uplink frame: tag under K_up, counter through the replay window."""
        return frame.decode(data, self.mac_up, self.win)

    def secret(self, f, key):
        """The plaintext of secret field `key` of the uplink frame `f`."""
        return crypto.ctr(self.e_up, f.seq, key, f.body[key])


def sealed(link, n):
    """The frame transmit() just sealed: n bytes, the length prefix first (a view)."""
    return link.q.w.mv[link.at : link.at + n]


def one(link, now=0):
    """The next frame the link sends (one transmit)."""
    end = link.transmit(now, TS)
    assert end
    return bytes(sealed(link, end)[2:])


def frames(link, now=0):
    """Every frame the link has to send now (without the length prefix)."""
    out = []
    while True:
        end = link.transmit(now, TS)
        if not end:
            return out
        mv = sealed(link, end)
        assert (mv[0] << 8 | mv[1]) == end - 2  # u16 BE length prefix
        out.append(bytes(mv[2:end]))


ACKED = "acked"  # next_acked() ids, listed first among the events as (ACKED, id), in id order


def events(link):
    ids = []
    while True:
        mid = link.next_acked()
        if mid < 0:
            break
        ids.append(mid)
    ids.sort()  # next_acked gives them in any order
    out = [(ACKED, mid) for mid in ids]
    while True:
        e = link.next_event()
        if e is None:
            return out
        out.append(e)


def opened(q=None, fw_version="1.0"):
    """A link through its handshake, with its gateway end."""
    link = L.Link(SendQueue() if q is None else q, "evse-1", fw_version)  # an empty queue is falsy
    link.connect(0, KEY, _nonce(), 1)
    gw = Gw()
    hello = frames(link)
    assert len(hello) == 1
    link.receive(gw.hello(hello[0]), 0)
    assert link.state == L.OPEN
    events(link)
    return link, gw


def _raises(code, fn, *args):
    try:
        fn(*args)
    except FrameError as e:
        assert e.code == code, (e.code, code)
        return
    raise AssertionError(f"no FrameError {code}")


def _tariff(gw, mid, seq=None, tariff_id=1):
    body = {S.F_TARIFF_ID: tariff_id, S.F_PRICE_KWH: 30, S.F_CURRENCY: "EUR"}
    return gw.seal(S.K_REQUEST, mid, S.P_CONTROL, S.A_SET_TARIFF, body, seq)


def _tx_event(n, pad=0):
    b = {S.F_EVENT: 0, S.F_TX_ID: 1, S.F_SEQ_NO: n, S.F_TRIGGER: 0, S.F_EVSE: 1}
    if pad:
        b[S.F_EXT] = bytes(pad)  # vendor data (ext): kept, not interpreted
    return b


def _meter(n, pad=0):
    b = {S.F_EVSE: 1, S.F_ENERGY_WH: n}
    if pad:
        b[S.F_EXT] = bytes(pad)
    return b


def _chunk(i, n=1024):
    return {S.F_REQUEST_ID: 1, S.F_OFFSET: i * 1024, S.F_DATA: bytes(n), S.F_LAST: False}


def _auth(token):
    return {S.F_ID_TOKEN: token, S.F_TOKEN_TYPE: 0}


# ---------------------------------------------------------------- handshake (B10, M13)


def test_hello_is_tagged_under_k_hello_and_opens_the_session_keys():
    link = L.Link(SendQueue(), "evse-1", "1.0")
    nonce = _nonce()
    link.connect(0, KEY, nonce, 7)
    assert link.state == L.HELLO_SENT
    link.event(9, S.A_METER_VALUES, _meter(1), 0)  # durable: waits for the handshake
    (hello,) = frames(link)
    _raises(S.E_BAD_TAG, frame.decode, hello, crypto.Hmac(KEY))  # K_hello, not K_dev
    gw = Gw()
    resp = gw.hello(hello)
    f = gw.hello_frame
    assert (f.id, f.prio) == (7, S.P_CONTROL)
    assert f.body[S.F_DEVICE_ID] == "evse-1" and f.body[S.F_NONCE] == nonce
    assert f.body[S.F_FW_VERSION] == "1.0" and S.F_FACTORY not in f.body
    assert f.body[S.F_VER_MIN] == f.body[S.F_VER_MAX] == S.PROTOCOL_VERSION
    # the largest frame the board receives: the send queue's buffer after the urgent region
    assert f.body[S.F_RX_MAX] == Q.RX_MAX == Q.RX + Q.SHARED - 2 < S.MAX_FRAME
    link.receive(resp, 0)
    ev = events(link)
    assert len(ev) == 1 and ev[0][0] == L.OPENED and ev[0][1][S.F_TIME] == 1000
    assert link.state == L.OPEN
    # uplink counts from 1, tagged under K_up (derived from both nonces), not K_dn
    (up,) = frames(link)
    _raises(S.E_BAD_TAG, frame.decode, up, gw.mac_dn)
    g = gw.receive(up)
    assert (g.seq, g.id, g.action, g.kind) == (1, 9, S.A_METER_VALUES, S.K_EVENT)


def test_factory_hello_receives_the_device_key_encrypted():
    link = L.Link(SendQueue(), "evse-1")
    link.connect(0, KEY, _nonce(), 7, factory=True)
    (hello,) = frames(link)
    gw = Gw()
    newkey = bytes(range(100, 132))
    resp = gw.hello(hello, newkey)
    assert gw.hello_frame.body[S.F_FACTORY] is True and S.F_FW_VERSION not in gw.hello_frame.body
    assert newkey not in resp  # not in clear on the LAN
    link.receive(resp, 0)
    ev = events(link)
    assert ev[0] == (L.KEY_PROVISIONED, newkey)
    assert ev[1][0] == L.OPENED


def test_hello_refused_badly_tagged_or_unanswered_closes_the_link():
    link = L.Link(SendQueue(), "evse-1")
    link.connect(0, KEY, _nonce(), 7)
    gw = Gw()
    gw.hello(frames(link)[0])
    err = {S.F_ERROR_CODE: S.E_UNKNOWN_DEVICE, S.F_REASON: "unknown device"}
    link.receive(gw.seal(S.K_ERROR, 7, S.P_CONTROL, S.A_HELLO, err, seq=1), 0)
    assert events(link) == [(L.CLOSED, "hello refused: unknown device")]
    assert link.state == L.IDLE
    assert link.event(8, S.A_STATUS_NOTIFICATION, {S.F_EVSE: 1, S.F_STATE: 0}, 0) is False
    assert frames(link) == []

    link.connect(0, KEY, _nonce(), 8)
    gw = Gw()
    resp = gw.hello(frames(link)[0])
    forged = bytearray(resp)
    forged[-1] ^= 1
    link.receive(bytes(forged), 0)
    assert events(link) == [(L.CLOSED, "hello response tag")]
    assert link.state == L.IDLE and link.errors[S.E_BAD_TAG] == 1

    link.connect(100, KEY, _nonce(), 9)
    frames(link)
    t = link.get_timer()
    assert t == 100 + 5000  # Hello's timeout
    link.handle_timer(t - 1)
    assert link.state == L.HELLO_SENT and events(link) == []
    link.handle_timer(t)
    assert events(link) == [(L.CLOSED, "hello timeout")]
    assert link.state == L.IDLE


def test_only_the_hello_leaves_before_the_handshake():
    link = L.Link(SendQueue(), "evse-1")
    link.connect(0, KEY, _nonce(), 1)
    link.request(2, S.A_AUTHORIZE, _auth(b"tok"), 0)  # waits in flight, not on the wire
    link.event(3, S.A_TRANSACTION_EVENT, _tx_event(1), 0)
    assert link.event(4, S.A_STATUS_NOTIFICATION, {S.F_EVSE: 1, S.F_STATE: 0}, 0) is False  # no session
    out = frames(link)
    assert len(out) == 1 and frame.decode(out[0]).action == S.A_HELLO
    gw = Gw()
    link.receive(gw.hello(out[0]), 0)
    out = [gw.receive(x) for x in frames(link)]
    assert [(f.id, f.action, f.seq) for f in out] == [(2, S.A_AUTHORIZE, 1), (3, S.A_TRANSACTION_EVENT, 2)]


# ---------------------------------------------------------------- tags, counters, bad frames


def test_bad_frames_answered_with_an_error_counted_and_change_nothing():
    link, gw = opened()
    good = _tariff(gw, 50)  # seq 2
    forged = bytearray(good)
    forged[-1] ^= 1
    link.receive(bytes(forged), 0)
    # reflection: a frame tagged under the uplink key
    link.receive(gw.seal(S.K_REQUEST, 51, S.P_CONTROL, S.A_SET_TARIFF, {S.F_TARIFF_ID: 1}, seq=3, mac=gw.mac_up), 0)
    link.receive(good[:-5], 0)  # truncated
    link.receive(b"\x93\x01\x02", 0)  # malformed
    # well tagged but below the action's priority class: rejected, counter not used up
    low = {S.F_LIMIT_W: 0, S.F_DEADLINE_MS: 0}
    link.receive(gw.seal(S.K_REQUEST, 52, S.P_CONTROL, S.A_DSO_LIMIT, low, seq=4), 0)
    assert events(link) == [] and link.state == L.OPEN
    assert sum(link.errors.values()) == 5
    assert link.errors[S.E_BAD_TAG] == 2 and link.errors[S.E_TRUNCATED] == 2
    assert link.errors[S.E_BAD_PRIORITY] == 1
    errs = [gw.receive(x) for x in frames(link)]
    assert [e.kind for e in errs] == [S.K_ERROR] * 5
    # in the class of the action answered (DsoLimit: urgent, first), else Close (control)
    assert [(e.body[S.F_ERROR_CODE], e.id, e.action, e.prio) for e in errs] == [
        (S.E_BAD_PRIORITY, 52, S.A_DSO_LIMIT, S.P_URGENT),
        (S.E_BAD_TAG, 50, S.A_SET_TARIFF, S.P_CONTROL),
        (S.E_BAD_TAG, 51, S.A_SET_TARIFF, S.P_CONTROL),
        (S.E_TRUNCATED, 0, S.A_CLOSE, S.P_CONTROL),  # id 0: the envelope could not be read
        (S.E_TRUNCATED, 0, S.A_CLOSE, S.P_CONTROL),
    ]
    # none of them moved the replay window: their counters are still good
    link.receive(good, 0)
    link.receive(_tariff(gw, 53, seq=3), 0)
    link.receive(gw.seal(S.K_REQUEST, 54, S.P_URGENT, S.A_DSO_LIMIT, low, seq=4), 0)
    got = events(link)
    assert [(e[0], e[1], e[2]) for e in got] == [
        (L.REQUEST_RECEIVED, 50, S.A_SET_TARIFF),
        (L.REQUEST_RECEIVED, 53, S.A_SET_TARIFF),
        (L.REQUEST_RECEIVED, 54, S.A_DSO_LIMIT),
    ]
    assert got[0][4][S.F_CURRENCY] == "EUR" and got[2][3] == S.P_URGENT
    assert sum(link.errors.values()) == 5


def test_replay_window_accepts_each_counter_once():
    link, gw = opened()
    accepted = []
    for mid, seq in ((1, 10), (2, 8), (3, 8), (4, 10), (5, 80), (6, 16), (7, 17), (8, 79)):
        link.receive(_tariff(gw, mid, seq=seq), 0)
        for e in events(link):
            assert e[0] == L.REQUEST_RECEIVED and e[5] == seq
            accepted.append(e[1])
    # 8 inside the window once; 8 and 10 again are replays; 16 is 64 below 80: outside
    assert accepted == [1, 2, 5, 7, 8]
    assert link.errors[S.E_REPLAY] == 3 and sum(link.errors.values()) == 3
    errs = [gw.receive(x) for x in frames(link)]
    assert [(e.id, e.body[S.F_ERROR_CODE]) for e in errs] == [(3, S.E_REPLAY), (4, S.E_REPLAY), (6, S.E_REPLAY)]
    # the board's own counter: one per frame sent, Hello 0
    assert [e.seq for e in errs] == [1, 2, 3]


def test_a_flood_of_bad_frames_closes_the_link():
    link, _ = opened()
    for _ in range(L.FLOOD_MAX):
        link.receive(b"\xc1", 0)
    assert link.state == L.OPEN
    # the count restarts after FLOOD_MS: as many again later keep the link
    for _ in range(L.FLOOD_MAX):
        link.receive(b"\xc1", L.FLOOD_MS + 1)
    assert link.state == L.OPEN and events(link) == []
    link.receive(b"\xc1", L.FLOOD_MS + 2)
    assert link.state == L.IDLE
    assert events(link) == [(L.CLOSED, "flood of bad frames")]
    assert link.errors[S.E_INVALID_MSGPACK] == 2 * L.FLOOD_MAX + 1
    assert link.errors[S.E_RATE_LIMITED] == 1
    assert frames(link) == []  # closed: nothing more leaves


def test_stream_splitting_feeds_the_link():
    link, gw = opened()
    data = b""
    for i in range(3):
        f = _tariff(gw, 70 + i, tariff_id=i)
        data += bytes([len(f) >> 8, len(f) & 0xFF]) + f
    s = FrameSplitter()
    for a, b in ((0, 1), (1, 7), (7, len(data) - 3), (len(data) - 3, len(data))):
        for f in s.feed(data[a:b]):
            link.receive(f, 0)
    got = events(link)
    assert [e[1] for e in got] == [70, 71, 72]
    assert [e[4][S.F_TARIFF_ID] for e in got] == [0, 1, 2]


# ---------------------------------------------------------------- answers and acks (B1, B17)


def test_response_or_error_retires_a_request():
    link, gw = opened()
    link.request(77, S.A_AUTHORIZE, _auth(b"tok"), 0)
    link.request(78, S.A_AUTHORIZE, _auth(b"tok"), 0)
    assert [gw.receive(x).id for x in frames(link)] == [77, 78]
    resp = gw.seal(S.K_RESPONSE, 77, S.P_CONTROL, S.A_AUTHORIZE, {S.F_AUTH_STATUS: 0})
    link.receive(resp, 10)
    ev = events(link)
    assert len(ev) == 1 and ev[0][:3] == (L.RESPONSE_RECEIVED, 77, S.A_AUTHORIZE) and ev[0][3][S.F_AUTH_STATUS] == 0
    err = {S.F_ERROR_CODE: S.E_REJECTED, S.F_REASON: "no"}
    link.receive(gw.seal(S.K_ERROR, 78, S.P_CONTROL, S.A_AUTHORIZE, err), 10)
    assert events(link) == [(L.FAILED, 78, S.E_REJECTED, "no")]
    # a late second answer is ignored; nothing is resent, nothing times out
    link.receive(gw.seal(S.K_RESPONSE, 77, S.P_CONTROL, S.A_AUTHORIZE, {S.F_AUTH_STATUS: 1}), 20)
    assert events(link) == []
    assert link.get_timer() is None
    link.handle_timer(10**6)
    assert frames(link, 10**6) == [] and events(link) == [] and sum(link.errors.values()) == 0


def test_acks_one_or_batched_retire_durable_events():
    link, gw = opened()
    for mid in (5, 6, 7):
        link.event(mid, S.A_TRANSACTION_EVENT, _tx_event(mid), 0)
    assert [gw.receive(x).id for x in frames(link)] == [5, 6, 7]
    link.receive(gw.seal(S.K_ACK, 5, S.P_CONTROL, S.A_TRANSACTION_EVENT, {S.F_IDS: [6, 99]}), 100)
    assert events(link) == [(ACKED, 5), (ACKED, 6)]
    link.receive(gw.seal(S.K_ACK, 5, S.P_CONTROL, S.A_TRANSACTION_EVENT, {}), 100)  # acked twice
    assert events(link) == []
    link.handle_timer(30000)
    resent = [gw.receive(x) for x in frames(link, 30000)]
    assert [(f.id, f.seq) for f in resent] == [(7, 4)]  # only the one still unacknowledged
    assert resent[0].body[S.F_SEQ_NO] == 7  # same body


def test_a_request_is_retransmitted_with_backoff_then_fails_with_timeout():
    link, gw = opened()
    link.request(77, S.A_AUTHORIZE, _auth(b"04a1b2c3"), 0)
    assert link.get_timer() == 5000  # Authorize's timeout
    sent = []
    for t in (0, 4999, 5000, 14999, 15000, 34999):
        link.handle_timer(t)
        for x in frames(link, t):
            sent.append((t, gw.receive(x)))
    assert [(t, f.id) for t, f in sent] == [(0, 77), (5000, 77), (15000, 77)]  # ×2 back-off
    assert [f.seq for _, f in sent] == [1, 2, 3]  # same id, new counter and tag
    assert [gw.secret(f, S.F_ID_TOKEN) for _, f in sent] == [b"04a1b2c3"] * 3  # re-encrypted per seq
    assert events(link) == []
    link.handle_timer(35000)
    assert events(link) == [(L.FAILED, 77, S.E_TIMEOUT, "no answer")]
    assert frames(link, 35000) == [] and link.get_timer() is None


def test_a_durable_event_is_resent_until_acked_and_never_given_up():
    link, gw = opened()
    link.event(5, S.A_TRANSACTION_EVENT, _tx_event(1), 0)
    assert len(frames(link)) == 1
    # 30 s, then ×2 capped at 60 s: 30 000, 90 000, 150 000, …
    sent = []
    t = 0
    while t <= 30000 + 60000 * 10:
        link.handle_timer(t)
        if frames(link, t):
            sent.append(t)
        t += 1000
    assert sent == [30000 + 60000 * i for i in range(11)]
    assert events(link) == []
    link.receive(gw.seal(S.K_ACK, 5, S.P_CONTROL, S.A_TRANSACTION_EVENT, {}), t)
    assert events(link) == [(ACKED, 5)]
    link.handle_timer(t + 10**6)
    assert frames(link, t + 10**6) == [] and link.get_timer() is None


def test_unanswered_messages_are_resent_oldest_first_after_a_reconnect():
    link, gw = opened()
    for mid in (12, 10, 11):
        link.event(mid, S.A_TRANSACTION_EVENT, _tx_event(mid), 0)
    link.request(13, S.A_AUTHORIZE, _auth(b"tok"), 0)
    link.receive(gw.seal(S.K_ACK, 11, S.P_CONTROL, S.A_TRANSACTION_EVENT, {}), 0)
    frames(link)
    link.close()
    assert link.state == L.IDLE and frames(link) == []
    link.connect(1000, KEY, _nonce(), 20)
    (hello,) = frames(link)
    gw2 = Gw()
    link.receive(gw2.hello(hello), 1000)
    out = [gw2.receive(x) for x in frames(link, 1000)]  # under the new connection's keys
    assert [(f.id, f.seq) for f in out] == [(10, 1), (12, 2), (13, 3)]
    assert gw2.secret(out[2], S.F_ID_TOKEN) == b"tok"


# ---------------------------------------------------------------- priorities (B6, B8)


def test_urgent_leaves_first_and_bulk_waits_for_one_chunk_at_most():
    link, gw = opened()
    for i in range(3):
        link.event(100 + i, S.A_LOG_CHUNK, _chunk(i), 0)
    link.event(200, S.A_METER_VALUES, _meter(1), 0)
    link.event(300, S.A_TRANSACTION_EVENT, _tx_event(1), 0)
    link.respond(400, S.A_DSO_LIMIT, S.P_URGENT, {S.F_STATUS: 0})
    first = gw.receive(one(link))  # everything else still queued
    assert (first.id, first.prio, first.kind) == (400, S.P_URGENT, S.K_RESPONSE)
    # with chunks on the way, an urgent frame queued now is the very next one
    order = []
    for i in range(4):
        x = one(link)
        assert len(x) <= 1024 + 64  # a chunk and its envelope, never more
        order.append(gw.receive(x).id)
        if i == 1:
            link.respond(401 + i, S.A_UNLOCK_CONNECTOR, S.P_URGENT, {S.F_STATUS: 0})
    assert order == [300, 200, 402, 100]
    assert frames(link) == []  # the bulk region holds one 1 KiB chunk: the others were refused …
    sent = []
    for t in (50, 100):  # … and queued again by the timer, one at a time
        link.handle_timer(t)
        sent += [gw.receive(x).id for x in frames(link, t)]
    assert sent == [101, 102]
    # a raised priority goes with its class
    link.event(500, S.A_METER_VALUES, _meter(2), 0, prio=S.P_URGENT)
    f = gw.receive(frames(link)[0])
    assert (f.id, f.prio) == (500, S.P_URGENT)


def test_drr_shares_the_link_among_control_telemetry_and_bulk():
    q = SendQueue()
    link, gw = opened(q)
    sent = {1: 0, 2: 0, 3: 0}  # bytes per class
    frames_n = {1: 0, 2: 0, 3: 0}
    mid = 1000
    for _ in range(400):
        # keep every class backlogged
        while q.put(S.K_EVENT, S.P_CONTROL, mid, S.A_TRANSACTION_EVENT, _tx_event(mid, 300)):
            mid += 1
        while q.put(S.K_EVENT, S.P_TELEMETRY, mid, S.A_METER_VALUES, _meter(mid, 300)):
            mid += 1
        while q.put(S.K_EVENT, S.P_BULK, mid, S.A_LOG_CHUNK, _chunk(0, 900)):
            mid += 1
        x = one(link)
        f = gw.receive(x)
        sent[f.prio] += len(x)
        frames_n[f.prio] += 1
    assert frames_n[3] >= 4  # bulk is not starved
    # bytes shared about 8 : 4 : 1 (the quanta)
    r_ct = sent[1] / sent[2]
    r_tb = sent[2] / sent[3]
    assert 1.3 < r_ct < 3, sent
    assert 2.5 < r_tb < 7, sent


# ---------------------------------------------------------------- backpressure


def test_a_full_class_refuses_and_nothing_accepted_is_lost():
    q = SendQueue()
    n = 0
    while q.put(S.K_EVENT, S.P_URGENT, n, S.A_DSO_LIMIT, {S.F_STATUS: 0}):
        n += 1
    assert n == Q.SLOTS[0] and len(q) == n
    assert not q.put(S.K_EVENT, S.P_URGENT, 99, S.A_DSO_LIMIT, {S.F_STATUS: 0})
    assert q.put(S.K_EVENT, S.P_CONTROL, 100, S.A_DSO_LIMIT, {S.F_STATUS: 0})  # other classes unaffected
    assert not q.put(S.K_EVENT, S.P_BULK, 101, S.A_LOG_CHUNK, {S.F_DATA: bytes(Q.MAX_BODY)})  # above a body
    opened(q)  # connect() starts from an empty queue
    assert len(q) == 0


def test_a_class_holds_at_most_its_cap_and_room_freed_is_used_again():
    q = SendQueue()
    link, gw = opened(q)
    size = Q.CAP[3] * 2 // 5  # two fit the bulk class's cap, a third only once the first left
    assert q.put(S.K_EVENT, S.P_BULK, 1, S.A_LOG_CHUNK, _chunk(1, size))
    assert q.put(S.K_EVENT, S.P_BULK, 2, S.A_LOG_CHUNK, _chunk(2, size))
    assert not q.put(S.K_EVENT, S.P_BULK, 3, S.A_LOG_CHUNK, _chunk(3, size))
    end = link.transmit(0, TS)
    assert gw.receive(bytes(sealed(link, end)[2:])).id == 1
    assert q.put(S.K_EVENT, S.P_BULK, 4, S.A_LOG_CHUNK, _chunk(4, size))  # in the room the first left
    out = [gw.receive(x) for x in frames(link)]
    assert [f.id for f in out] == [2, 4]
    assert [f.body[S.F_OFFSET] for f in out] == [2048, 4096] and [len(f.body[S.F_DATA]) for f in out] == [size, size]


def test_refused_requests_and_durable_events_are_queued_again_by_the_timer():
    q = SendQueue()
    link, gw = opened(q)
    for i in range(Q.SLOTS[1]):
        assert q.put(S.K_EVENT, S.P_CONTROL, 500 + i, S.A_TRANSACTION_EVENT, _tx_event(i))
    link.request(77, S.A_AUTHORIZE, _auth(b"tok"), 0)  # control class full: refused
    link.event(78, S.A_TRANSACTION_EVENT, _tx_event(78), 0)
    assert [gw.receive(x).id for x in frames(link)] == [500 + i for i in range(Q.SLOTS[1])]
    link.handle_timer(49)
    assert frames(link, 49) == []
    link.handle_timer(50)  # 50 ms later, without counting a try
    assert [gw.receive(x).id for x in frames(link, 50)] == [77, 78]
    link.receive(gw.seal(S.K_ACK, 78, S.P_CONTROL, S.A_TRANSACTION_EVENT, {}), 60)
    assert events(link) == [(ACKED, 78)]
    # the refusal used up neither a try nor a back-off step: the request goes out three times
    # in all, 5 s and 10 s apart as if first sent at 50 ms, and fails 20 s after the last
    sent = [50]
    t = 50
    while t < 300000 and link.get_timer() is not None:
        t += 50
        link.handle_timer(t)
        sent += [t for x in frames(link, t) if gw.receive(x).id == 77]
        if link.events:  # the failure, left for the assertion below
            break
    assert sent == [50, 5050, 15050]
    assert t == 35050
    assert events(link) == [(L.FAILED, 77, S.E_TIMEOUT, "no answer")]


def test_a_refused_answer_goes_out_when_the_command_is_repeated():
    q = SendQueue()
    link, gw = opened(q)
    limit = {S.F_LIMIT_W: 0, S.F_DEADLINE_MS: 100}
    cmd = gw.seal(S.K_REQUEST, 60, S.P_URGENT, S.A_DSO_LIMIT, limit)
    link.receive(cmd, 0)
    assert [e[1] for e in events(link)] == [60]
    for i in range(Q.SLOTS[0]):
        assert q.put(S.K_EVENT, S.P_URGENT, 900 + i, S.A_METER_VALUES, _meter(i))
    link.respond(60, S.A_DSO_LIMIT, S.P_URGENT, {S.F_STATUS: 3})  # urgent class full: refused
    assert [gw.receive(x).id for x in frames(link)] == [900 + i for i in range(Q.SLOTS[0])]
    link.receive(gw.seal(S.K_REQUEST, 60, S.P_URGENT, S.A_DSO_LIMIT, limit), 5)  # the gateway repeats it
    assert events(link) == []  # not acted on twice
    (r,) = [gw.receive(x) for x in frames(link)]
    assert (r.kind, r.id, r.prio, r.body[S.F_STATUS]) == (S.K_RESPONSE, 60, S.P_URGENT, 3)


def test_non_durable_events_are_refused_when_their_class_is_full():
    link, _ = opened()
    body = {S.F_EVSE: 1, S.F_STATE: 0}
    n = 0
    while link.event(n, S.A_STATUS_NOTIFICATION, body, 0):
        n += 1
    assert n == Q.SLOTS[2]
    assert len(frames(link)) == n
    assert link.event(n, S.A_STATUS_NOTIFICATION, body, 0)  # room again
    link.handle_timer(10**6)  # a non-durable event is not waited for
    assert len(frames(link)) == 1


def test_a_class_refused_for_room_in_the_shared_region_gets_in_at_its_next_try():
    q = SendQueue()
    link, gw = opened(q)
    mid = 1
    while q.put(S.K_EVENT, S.P_CONTROL, mid, S.A_TRANSACTION_EVENT, _tx_event(mid, 300)):
        mid += 1  # control up to its cap
    while q.put(S.K_EVENT, S.P_TELEMETRY, mid, S.A_METER_VALUES, _meter(mid, 300)):
        mid += 1  # telemetry up to its cap: the shared region has no room for a chunk left
    assert not q.put(S.K_EVENT, S.P_BULK, 900, S.A_LOG_CHUNK, _chunk(0, 900))
    assert q.waiting == S.P_BULK  # refused for the region's room (not its cap): bulk waits, first
    n = len(q)
    for _ in range(n):
        gw.receive(one(link))  # the sender drains the region …
        # … and the others may not take the room back meanwhile
        assert not q.put(S.K_EVENT, S.P_CONTROL, mid, S.A_TRANSACTION_EVENT, _tx_event(mid, 300)) or (
            q.n[1] == 1 and q.n[3] == 0
        )
        if q.put(S.K_EVENT, S.P_BULK, 900, S.A_LOG_CHUNK, _chunk(0, 900)):
            break
    else:
        raise AssertionError("the waiting class never got in")
    assert q.waiting == 0  # served: nobody waits any more
    assert q.put(S.K_RESPONSE, S.P_URGENT, 901, S.A_DSO_LIMIT, {S.F_STATUS: 0})  # urgent: its own region
    got = [gw.receive(x) for x in frames(link)]
    assert got[0].id == 901 and 900 in [f.id for f in got]


def test_a_frame_above_the_receive_part_borrows_the_drained_shared_region():
    q = SendQueue()
    link, gw = opened(q)
    mv = q.w.mv[Q.URGENT :]
    s = FrameSplitter(mv, Q.RX, q.lend)
    assert len(mv) == Q.RX_MAX + 2 and Q.RX < Q.RX_MAX  # one whole RX_MAX frame, its part above RX lent
    # a command just below the largest frame the board receives (vendor data makes it so) while a
    # control frame is queued
    body = {S.F_LIST_VERSION: 1, S.F_UPDATE_TYPE: 0, S.F_ENTRIES: bytes(16), S.F_LAST: True}
    body[S.F_EXT] = bytes(Q.RX_MAX - 136)
    big = gw.seal(S.K_REQUEST, 50, S.P_CONTROL, S.A_SEND_LOCAL_LIST, body)
    assert Q.RX_MAX - 100 < len(big) <= Q.RX_MAX
    data = bytes([len(big) >> 8, len(big) & 0xFF]) + big
    assert q.put(S.K_EVENT, S.P_CONTROL, 7, S.A_TRANSACTION_EVENT, _tx_event(7))
    at = 0
    room = s.space()
    k = len(room)
    room[0:k] = data[0:k]  # the receive part first
    s.wrote(k)
    at = k
    assert s.next() is None
    assert s.space() is None  # the rest waits until the shared region has drained …
    assert not q.put(S.K_EVENT, S.P_TELEMETRY, 8, S.A_METER_VALUES, _meter(8))  # … and nothing new goes in
    assert q.put(S.K_RESPONSE, S.P_URGENT, 9, S.A_DSO_LIMIT, {S.F_STATUS: 0})  # but urgent does
    assert [gw.receive(x).id for x in frames(link)] == [9, 7]
    room = s.space()  # drained: lent, up to this frame's end
    assert len(room) == len(data) - at
    room[0 : len(room)] = data[at:]
    s.wrote(len(room))
    f = s.next()
    link.receive(f, 0)
    (e,) = events(link)
    assert e[1] == 50 and e[4][S.F_EXT] == bytes(Q.RX_MAX - 136)
    # decoded, the region is the queue's again (for an ack, a repeated answer or an error frame):
    # the same frame once more is a replay, answered at once
    link.receive(f, 0)
    (err,) = [gw.receive(x) for x in frames(link)]
    assert (err.kind, err.id) == (S.K_ERROR, 50)
    s.release()  # and the splitter reads into its own part again
    assert q.put(S.K_EVENT, S.P_TELEMETRY, 10, S.A_METER_VALUES, _meter(10))
    assert [gw.receive(x).id for x in frames(link)] == [10]
    # small frames again in the receive part
    t = _tariff(gw, 51)
    room = s.space()
    room[0 : len(t) + 2] = bytes([len(t) >> 8, len(t) & 0xFF]) + t
    s.wrote(len(t) + 2)
    link.receive(s.next(), 0)
    s.release()
    assert [e[1] for e in events(link)] == [51]


def test_a_connection_lost_while_its_frame_borrowed_the_shared_region_lends_nothing_to_the_next():
    # the receiver had the shared region lent (a long frame half read) when the connection went:
    # the next connection's Hello (control class, in that region) still goes out
    q = SendQueue()
    link, _ = opened(q)
    assert q.lend(True)  # drained: lent
    link.close()
    link.connect(0, KEY, _nonce(), 2)
    (hello,) = frames(link)
    link.receive(Gw().hello(hello), 0)
    assert link.state == L.OPEN


def test_a_length_prefix_above_the_boards_rx_max_fails_the_stream():
    # the gateway sends no frame above the Hello's rx_max: a prefix above it is a broken stream
    q = SendQueue()
    s = FrameSplitter(q.w.mv[Q.URGENT :], Q.RX, q.lend)
    room = s.space()
    room[0:2] = bytes([(Q.RX_MAX + 1) >> 8, (Q.RX_MAX + 1) & 0xFF])
    s.wrote(2)
    _raises(S.E_OVERSIZE, s.next)
    _raises(S.E_OVERSIZE, s.next)  # and stays failed: the stream cannot be re-synchronised


# ---------------------------------------------------------------- secret fields (B3)


def test_secret_fields_never_cross_in_clear_and_are_encrypted_per_frame():
    link, gw = opened()
    token = b"04a1b2c3d4e5f6"
    link.request(77, S.A_AUTHORIZE, _auth(token), 0)
    (x1,) = frames(link)
    link.handle_timer(5000)
    (x2,) = frames(link, 5000)
    assert token not in x1 and token not in x2
    f1 = gw.receive(x1)
    f2 = gw.receive(x2)
    assert f1.body[S.F_ID_TOKEN] != f2.body[S.F_ID_TOKEN]  # a new seq, a new key stream
    assert gw.secret(f1, S.F_ID_TOKEN) == token and gw.secret(f2, S.F_ID_TOKEN) == token
    assert f1.body[S.F_TOKEN_TYPE] == 0  # other fields in clear
    # downlink: the board decrypts with the frame's seq
    key = bytes(range(48))
    seq = gw.seq + 1
    body = {S.F_PRIVATE_KEY: crypto.ctr(gw.e_dn, seq, S.F_PRIVATE_KEY, key)}
    body[S.F_CERT] = b"\x30\x00"
    body[S.F_CERT_TYPE] = 0
    link.receive(gw.seal(S.K_REQUEST, 90, S.P_CONTROL, S.A_CERTIFICATE_SIGNED, body), 0)
    (e,) = events(link)
    assert e[5] == seq and e[4][S.F_PRIVATE_KEY] != key
    assert link.decrypt(e[5], S.F_PRIVATE_KEY, e[4][S.F_PRIVATE_KEY]) == key
    # an answer holding a secret field, repeated: encrypted again under the new frame's seq
    link.respond(90, S.A_CERTIFICATE_SIGNED, S.P_CONTROL, {S.F_STATUS: 0, S.F_ID_TOKEN: token})
    link.receive(gw.seal(S.K_REQUEST, 90, S.P_CONTROL, S.A_CERTIFICATE_SIGNED, body, seq=seq), 0)  # replay
    link.receive(gw.seal(S.K_REQUEST, 90, S.P_CONTROL, S.A_CERTIFICATE_SIGNED, body), 0)  # a repeat
    out = [gw.receive(x) for x in frames(link)]
    assert [(f.kind, f.id) for f in out] == [(S.K_RESPONSE, 90), (S.K_ERROR, 90), (S.K_RESPONSE, 90)]
    assert out[1].body[S.F_ERROR_CODE] == S.E_REPLAY
    assert out[0].body[S.F_ID_TOKEN] != out[2].body[S.F_ID_TOKEN]
    assert [gw.secret(f, S.F_ID_TOKEN) for f in (out[0], out[2])] == [token, token]


# ---------------------------------------------------------------- repeated commands (dedup)


def test_a_repeated_command_is_answered_from_memory_without_acting_twice():
    link, gw = opened()
    link.receive(_tariff(gw, 60), 0)
    (ev,) = events(link)
    assert ev[:3] == (L.REQUEST_RECEIVED, 60, S.A_SET_TARIFF)
    link.receive(_tariff(gw, 60), 0)  # repeated before the answer: nothing yet
    assert events(link) == [] and frames(link) == []
    link.respond(60, S.A_SET_TARIFF, S.P_CONTROL, {S.F_STATUS: 0})
    link.receive(_tariff(gw, 61), 0)
    link.refuse(61, S.A_SET_TARIFF, S.P_CONTROL, "busy")
    first = [gw.receive(x) for x in frames(link)]
    link.receive(_tariff(gw, 60), 0)
    link.receive(_tariff(gw, 61), 0)
    assert [e[1] for e in events(link)] == [61]  # only 61's first arrival, above
    again = [gw.receive(x) for x in frames(link)]
    assert len(first) == len(again) == 2
    for i in range(2):
        a = first[i]
        b = again[i]
        assert (a.kind, a.id, a.action) == (b.kind, b.id, b.action) and a.seq < b.seq
    assert [(f.kind, f.id) for f in again] == [(S.K_RESPONSE, 60), (S.K_ERROR, 61)]
    assert again[0].body[S.F_STATUS] == 0
    assert (again[1].body[S.F_ERROR_CODE], again[1].body[S.F_REASON]) == (S.E_REJECTED, "busy")


def test_only_the_last_32_commands_are_remembered():
    link, gw = opened()
    for mid in range(100, 133):  # 33 commands
        link.receive(_tariff(gw, mid), 0)
        link.respond(mid, S.A_SET_TARIFF, S.P_CONTROL, {S.F_STATUS: 0})
        frames(link)
    events(link)
    link.receive(_tariff(gw, 101), 0)  # among the last 32: answered from memory
    assert events(link) == [] and len(frames(link)) == 1
    link.receive(_tariff(gw, 100), 0)  # forgotten: a new command again
    assert [e[1] for e in events(link)] == [100]


def test_events_from_the_gateway_are_delivered_and_durable_ones_acked():
    link, gw = opened()
    sp = {S.F_EVSE: 1, S.F_SETPOINT_W: 3000}
    link.receive(gw.seal(S.K_EVENT, 30, S.P_CONTROL, S.A_SETPOINT, sp), 0)
    (e,) = events(link)
    assert e[:3] == (L.EVENT_RECEIVED, 30, S.A_SETPOINT) and e[3][S.F_SETPOINT_W] == 3000
    assert frames(link) == []  # not durable: no answer
    link.receive(gw.seal(S.K_EVENT, 31, S.P_TELEMETRY, S.A_METER_VALUES, _meter(1)), 0)
    link.receive(gw.seal(S.K_EVENT, 31, S.P_TELEMETRY, S.A_METER_VALUES, _meter(1)), 0)  # resent
    acks = [gw.receive(x) for x in frames(link)]
    assert [(a.kind, a.id, a.action, a.prio) for a in acks] == [(S.K_ACK, 31, S.A_METER_VALUES, S.P_TELEMETRY)] * 2
