"""Link cryptography (docs/protocol.md, "Tags, keys and the handshake", "Encrypted fields").

- `Hmac`: HMAC-SHA256 over `hashlib.sha256` (MicroPython has no `hmac` module and its
  sha256 objects cannot be copied, so the 64-byte ipad/opad blocks are computed once per
  key and each message starts two fresh hashes from them).
- `hello_key` and `derive`: the per-device and per-connection keys.
- `ctr`: AES-128-CTR for `secret` fields, built on AES-ECB (`cryptolib.aes(key, 1)`);
  under CPython the `cryptography` package provides the ECB block (tooling and tests).
"""

import hashlib

from .schema import TAG_LEN

try:
    from cryptolib import aes as _aes

    def _ecb(key):
        return _aes(key, 1)

except ImportError:  # CPython: tooling and tests only
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    class _Ecb:
        def __init__(self, key):
            self._e = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()

        def encrypt(self, block, out):
            out[:] = self._e.update(bytes(block))

    def _ecb(key):
        return _Ecb(key)


class Hmac:
    """HMAC-SHA256 under one key; `tag_into` writes the link's 16-byte frame tag."""

    def __init__(self, key):
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        ipad = bytearray(64)
        opad = bytearray(64)
        for i in range(64):
            k = key[i] if i < len(key) else 0
            ipad[i] = k ^ 0x36
            opad[i] = k ^ 0x5C
        self._ipad = bytes(ipad)
        self._opad = bytes(opad)

    def digest(self, data, data2=None):
        """HMAC-SHA256(key, data || data2), 32 bytes."""
        h = hashlib.sha256(self._ipad)
        h.update(data)
        if data2 is not None:
            h.update(data2)
        inner = h.digest()
        h = hashlib.sha256(self._opad)
        h.update(inner)
        return h.digest()

    def tag_into(self, data, out, pos):
        """Write the tag of `data` into out[pos : pos + TAG_LEN] (no slice allocated)."""
        d = self.digest(data)
        for i in range(TAG_LEN):
            out[pos + i] = d[i]

    def verify(self, data, tag):
        """Constant-time check of a received tag against the tag of `data`."""
        d = self.digest(data)
        if len(tag) != TAG_LEN:
            return False
        r = 0
        for i in range(TAG_LEN):
            r |= d[i] ^ tag[i]
        return r == 0


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
    ecb = _ecb(key)
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
