"""Ed25519 signature verification (RFC 8032, 5.1.7) in the MicroPython subset: the board
checks the signed manifest of a firmware update itself (M4), against the keys it trusts.

MicroPython ships no Ed25519 (nor SHA-512: `hashlib` has sha1/sha256), micropython-lib none
either (docs/design/hand-written.md): both are here, on the port's arbitrary-precision ints
(the unix port and the ESP32 build them with MPZ). Verification only: the board never signs.
It runs once per update, off the link's loop path, and takes about a second on a
microcontroller (docs/firmware.md "Firmware update"); a cold module: firmware_update imports
it for the check and drops it from sys.modules afterwards, so it costs no RAM otherwise.

Big-int arithmetic allocates at every operation: what is kept small is the peak (a few
integers of 256 bits live at a time; the one table is 4 points) and nothing is allocated
before the first call. [S]B - [h]A is computed in one double-and-add pass over both scalars
(Straus-Shamir), then encoded and compared with R's bytes, as RFC 8032 describes the check
(the group equation, cofactorless, as OpenSSL's and `cryptography`'s check is).
"""

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
_SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
_B = (_BX, _BY, 1, _BX * _BY % _P)
_ZERO = (0, 1, 1, 0)


class BadKey(ValueError):
    """The public key is not the encoding of a point on the curve."""


# ---------------------------------------------------------------- SHA-512 (FIPS 180-4)

_K512 = None  # the round constants, made on first use (80 ints: not held by an idle board)
_M64 = 0xFFFFFFFFFFFFFFFF


def _k512():
    global _K512
    if _K512 is None:
        # the first 64 bits of the fractional parts of the cube roots of the first 80 primes,
        # as FIPS 180-4 lists them (hex, 16 digits each)
        h = (
            "428a2f98d728ae227137449123ef65cdb5c0fbcfec4d3b2fe9b5dba58189dbbc3956c25bf348b538"
            "59f111f1b605d019923f82a4af194f9bab1c5ed5da6d8118d807aa98a303024212835b0145706fbe"
            "243185be4ee4b28c550c7dc3d5ffb4e272be5d74f27b896f80deb1fe3b1696b19bdc06a725c71235"
            "c19bf174cf692694e49b69c19ef14ad2efbe4786384f25e30fc19dc68b8cd5b5240ca1cc77ac9c65"
            "2de92c6f592b02754a7484aa6ea6e4835cb0a9dcbd41fbd476f988da831153b5983e5152ee66dfab"
            "a831c66d2db43210b00327c898fb213fbf597fc7beef0ee4c6e00bf33da88fc2d5a79147930aa725"
            "06ca6351e003826f142929670a0e6e7027b70a8546d22ffc2e1b21385c26c9264d2c6dfc5ac42aed"
            "53380d139d95b3df650a73548baf63de766a0abb3c77b2a881c2c92e47edaee692722c851482353b"
            "a2bfe8a14cf10364a81a664bbc423001c24b8b70d0f89791c76c51a30654be30d192e819d6ef5218"
            "d69906245565a910f40e35855771202a106aa07032bbd1b819a4c116b8d2d0c81e376c085141ab53"
            "2748774cdf8eeb9934b0bcb5e19b48a8391c0cb3c5c95a634ed8aa4ae3418acb5b9cca4f7763e373"
            "682e6ff3d6b2b8a3748f82ee5defb2fc78a5636f43172f6084c87814a1f0ab728cc702081a6439ec"
            "90befffa23631e28a4506cebde82bde9bef9a3f7b2c67915c67178f2e372532bca273eceea26619c"
            "d186b8c721c0c207eada7dd6cde0eb1ef57d4f7fee6ed17806f067aa72176fba0a637dc5a2c898a6"
            "113f9804bef90dae1b710b35131c471b28db77f523047d8432caab7b40c724933c9ebe0a15c9bebc"
            "431d67c49c100d4c4cc5d4becb3e42b6597f299cfc657e2a5fcb6fab3ad6faec6c44198c4a475817"
        )
        _K512 = [int(h[i : i + 16], 16) for i in range(0, 1280, 16)]
    return _K512


def _rotr(x, n):
    return ((x >> n) | (x << (64 - n))) & _M64


def _compress(st, block, w):
    k = _k512()
    for i in range(16):
        w[i] = int.from_bytes(block[8 * i : 8 * i + 8], "big")
    for i in range(16, 80):
        a, b = w[i - 15], w[i - 2]
        s0 = _rotr(a, 1) ^ _rotr(a, 8) ^ (a >> 7)
        s1 = _rotr(b, 19) ^ _rotr(b, 61) ^ (b >> 6)
        w[i] = (w[i - 16] + s0 + w[i - 7] + s1) & _M64
    a, b, c, d, e, f, g, h = st
    for i in range(80):
        t1 = (h + (_rotr(e, 14) ^ _rotr(e, 18) ^ _rotr(e, 41)) + ((e & f) ^ (~e & g)) + k[i] + w[i]) & _M64
        t2 = ((_rotr(a, 28) ^ _rotr(a, 34) ^ _rotr(a, 39)) + ((a & b) ^ (a & c) ^ (b & c))) & _M64
        h, g, f, e, d, c, b, a = g, f, e, (d + t1) & _M64, c, b, a, (t1 + t2) & _M64
    for i, v in enumerate((a, b, c, d, e, f, g, h)):
        st[i] = (st[i] + v) & _M64


def sha512(*parts):
    """SHA-512 of the concatenation of `parts` (bytes-like), as 64 bytes."""
    st = [
        0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
        0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
    ]  # fmt: skip
    w = [0] * 80
    buf = bytearray(128)
    n = 0  # bytes in buf
    total = 0
    for p in parts:
        mv = memoryview(p)
        total += len(mv)
        i = 0
        while i < len(mv):
            k = min(128 - n, len(mv) - i)
            buf[n : n + k] = mv[i : i + k]
            n += k
            i += k
            if n == 128:
                _compress(st, buf, w)
                n = 0
    buf[n] = 0x80
    for i in range(n + 1, 128):
        buf[i] = 0
    if n >= 112:  # no room for the 128-bit length: one more block
        _compress(st, buf, w)
        for i in range(128):
            buf[i] = 0
    buf[112:128] = (total * 8).to_bytes(16, "big")
    _compress(st, buf, w)
    out = bytearray(64)
    for i in range(8):
        out[8 * i : 8 * i + 8] = st[i].to_bytes(8, "big")
    return bytes(out)


# ---------------------------------------------------------------- the curve


def _add(p, q):
    """Extended twisted Edwards coordinates (X, Y, Z, T), a = -1 (RFC 8032, 5.1.4)."""
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _double(p):
    a = p[0] * p[0] % _P
    b = p[1] * p[1] % _P
    c = 2 * p[2] * p[2] % _P
    h = a + b
    s = p[0] + p[1]
    e = h - s * s % _P
    g = a - b
    f = c + g
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _decode(s):
    """The point whose encoding is the 32 bytes `s`, or None."""
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= _P:
        return None
    yy = y * y % _P
    x2 = (yy - 1) * pow(_D * yy + 1, _P - 2, _P) % _P
    if x2 == 0:
        if sign:
            return None
        return (0, y, 1, 0)
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
        if (x * x - x2) % _P:
            return None
    if (x & 1) != sign:
        x = _P - x
    return (x, y, 1, x * y % _P)


def _encode(p):
    zi = pow(p[2], _P - 2, _P)
    x = p[0] * zi % _P
    y = p[1] * zi % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def verify(public, msg, sig):
    """True when `sig` (64 bytes) is `public`'s (32 bytes) Ed25519 signature of `msg`; raises
    BadKey when `public` is not a curve point (a trust store's key that can verify nothing)."""
    if len(public) != 32:
        raise BadKey("an Ed25519 public key is 32 bytes, not %d" % len(public))
    a = _decode(public)
    if a is None:
        raise BadKey("the public key is not a point of Ed25519")
    if len(sig) != 64:
        return False
    s = int.from_bytes(sig[32:], "little")
    if s >= _L:
        return False
    h = int.from_bytes(sha512(sig[:32], public, msg), "little") % _L
    na = (_P - a[0], a[1], 1, _P - a[3])  # -A
    table = (_ZERO, _B, na, _add(_B, na))  # indexed by (bit of S) | (bit of h) << 1
    q = _ZERO
    for i in range(252, -1, -1):  # s, h < L < 2**253 (MicroPython's int has no bit_length)
        q = _double(q)
        j = ((s >> i) & 1) | (((h >> i) & 1) << 1)
        if j:
            q = _add(q, table[j])
    return _encode(q) == bytes(sig[:32])
