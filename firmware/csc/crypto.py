"""Link cryptography (docs/protocol.md, "Tags, keys and the handshake", "Encrypted fields").

- `Hmac`: HMAC-SHA256 on a region of a buffer, the tag written or checked in place. On
  MicroPython it runs on sha256.py (viper, nothing allocated per frame: MicroPython has no
  `hmac` module and its sha256 objects can be neither copied nor reset); under CPython,
  or on a port without the viper emitter, on `hashlib` (two new hashes per tag).
- `hello_key` and `derive`: the per-device and per-connection keys.
- `ctr`: AES-128-CTR for `secret` fields, built on AES-ECB (`cryptolib.aes(key, 1)`);
  under CPython the `cryptography` package provides the ECB block (tooling and tests).

`hashlib` is imported where it is used (CPython, or a key above 64 bytes), so that on a board
it takes no entry in this module's globals (heap).
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

from .schema import TAG_LEN

try:
    from . import sha256
except (ImportError, AttributeError, NameError, SyntaxError, ValueError):
    # CPython (no viper emitter: `micropython` is the host stand-in there), or a port built
    # without native code: hashlib, which allocates per tag
    sha256 = None

try:
    from cryptolib import aes as _aes  # _aes(key, 1): AES-ECB
except ImportError:  # CPython: tooling and tests only
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    class _aes:  # type: ignore[no-redef]  # noqa: N801 — cryptolib.aes's stand-in, ECB (mode 1) only
        def __init__(self, key, mode):
            self._e = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()

        def encrypt(self, block, out):
            out[:] = self._e.update(bytes(block))


class Hmac:
    """HMAC-SHA256 under one key. `tag_into` and `verify` work on a region of a buffer in
    place; on MicroPython they allocate nothing (sha256.py), under CPython they use
    `hashlib` (tooling and tests)."""

    def __init__(self, key):
        if len(key) > 64:
            import hashlib

            key = hashlib.sha256(key).digest()
        if sha256 is not None:
            self._p = bytearray(64)  # the hash states after the key's pads
            sha256.init(key, len(key), self._p)
            return
        pad = bytearray(64)
        for i in range(64):
            pad[i] = (key[i] if i < len(key) else 0) ^ 0x36
        ipad = bytes(pad)
        for i in range(64):
            pad[i] ^= 0x36 ^ 0x5C
        self._p = (ipad, bytes(pad))  # type: ignore[assignment]  # the key's pads (hashlib)

    def digest(self, data, data2=None):
        """HMAC-SHA256(key, data || data2), 32 new bytes (key derivation, not per frame)."""
        if data2 is not None:
            data = bytes(data) + bytes(data2)
        out = bytearray(32)
        self.tag_into(data, 0, len(data), out, 0, 32)
        return bytes(out)

    def tag_into(self, data, start, end, out, pos, n=TAG_LEN):
        """Write the (first n bytes of the) MAC of data[start:end] into out[pos : pos + n];
        with n = 0, check the TAG_LEN bytes at out[pos:] against it instead (verify)."""
        if sha256 is not None:
            sha256.digest(self._p, data, start, end)
            return sha256.tag(out, pos, n or -TAG_LEN) == 1
        # MicroPython's sha256 objects cannot be copied: two new hashes from the pads
        import hashlib

        h = hashlib.sha256(self._p[0])
        h.update(memoryview(data)[start:end])
        o = hashlib.sha256(self._p[1])
        o.update(h.digest())
        d = o.digest()
        r = 0
        for i in range(n or TAG_LEN):
            if n:
                out[pos + i] = d[i]
            else:
                r |= d[i] ^ out[pos + i]
        return r == 0

    def verify(self, data, start, end, tag, pos):
        """Whether tag[pos : pos + TAG_LEN] is the tag of data[start:end] (constant time)."""
        return self.tag_into(data, start, end, tag, pos, 0)


def hello_key(k_dev):
    """K_hello = HMAC-SHA256(K_dev, "evlink/1 hello"): tags the board's Hello."""
    return Hmac(k_dev).digest(b"evlink/1 hello")


def derive(k_dev, nonce_board, nonce_gateway):
    """Per-connection keys from the device key and the two Hello nonces.

    Returns (k_up, k_dn, e_up, e_dn): 32-byte tag keys board → gateway and gateway →
    board, and 16-byte AES-128 keys for secret fields in each direction.
    """
    m = Hmac(k_dev)
    n = bytes(nonce_board) + bytes(nonce_gateway)
    return (
        m.digest(b"evlink/1 up", n),
        m.digest(b"evlink/1 dn", n),
        m.digest(b"evlink/1 eu", n)[:16],
        m.digest(b"evlink/1 ed", n)[:16],
    )


def ctr(key, seq, field, data):
    """AES-128-CTR of `data` (encrypts and decrypts alike) for the secret field `field`
    of the frame with counter `seq`. Counter block: seq (8 bytes BE) || field key
    (4 bytes BE) || block counter (4 bytes BE, from 0)."""
    ecb = _aes(key, 1)
    block = bytearray(16)
    for i in range(8):
        block[7 - i] = (seq >> (8 * i)) & 0xFF
    for i in range(4):
        block[11 - i] = (field >> (8 * i)) & 0xFF
    stream = bytearray(16)
    out = bytearray(data)
    n = len(out)
    ctr_n = 0
    p = 0
    while p < n:
        c = ctr_n
        block[12] = (c >> 24) & 0xFF
        block[13] = (c >> 16) & 0xFF
        block[14] = (c >> 8) & 0xFF
        block[15] = c & 0xFF
        ecb.encrypt(block, stream)
        e = p + 16 if p + 16 < n else n
        i = 0
        while p < e:
            out[p] ^= stream[i]
            p += 1
            i += 1
        ctr_n += 1
    return bytes(out)
