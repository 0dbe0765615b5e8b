# ruff: noqa: F821
# `uint`, `ptr8` and `ptr32` are the viper emitter's own types, known to MicroPython's compiler only.
"""HMAC-SHA256 that allocates nothing, for the link's tags (MicroPython's viper emitter).

Why not `hashlib`: MicroPython's sha256 objects cannot be copied or reset, so every tag
made two new hash objects and two digests (512 heap bytes per frame, sent or received),
and had to hash the key's 64-byte ipad/opad blocks again each time. Here the two blocks
are hashed once per key (`init`), every frame is hashed from those states in one
preallocated work area, and the tag is written into (or compared against) the caller's
buffer in place: no object is made per frame, and a short frame costs three compressions
instead of five.

Viper arithmetic is on machine words (64 bits on the unix port, 32 on a board). Words are
loaded from and stored to 32-bit arrays (a store keeps the low 32 bits); the values that
are shifted right after an addition are masked to 32 bits first, with a mask made as
(1 << 32) - 1 in two shifts, which is 0xFFFFFFFF on both word sizes (the literal is not a
small int on 32 bits). The host (CPython) never imports this module: crypto.py uses
`hashlib` there (tooling and tests, where allocation does not matter).

Few names on purpose: each module-level name and argument name is a qstr, and on the
unix port one name too many makes MicroPython allocate its next qstr pool (docs/firmware.md).
"""

import micropython

# The work area (one per firmware: the link is single-threaded and IRQ handlers never hash), in
# 32-bit words: 0..15 the message schedule, 16..23 the running state, 24..55 the padded last
# block(s) (bytes 96..223; after digest() its first 32 bytes hold the MAC). The schedule is a
# window of 16 words, not FIPS 180-4's W[0..63]: round t reads only W[t], which depends on
# W[t-2], W[t-7], W[t-15] and W[t-16], so W[t] can take W[t-16]'s slot (t & 15). That keeps
# 192 B of heap free for the board's life, for one `& 15` per index in the rounds.
_scratch = bytearray(224)
# The round constants (FIPS 180-4, 4.2.2; words 0..63) and the initial state (5.3.3; 64..71), big-endian:
# a bytes literal stays in flash on a board (an array would copy its 288 bytes into the heap). Read a
# byte at a time, as the message is: viper's 32-bit loads need a 4-byte aligned address on Xtensa and
# RISC-V, which a frozen literal (a C string in flash) is not promised. tests/test_fw_codec.py checks
# the words against FIPS 180-4's.
_K = (
    b"\x42\x8a\x2f\x98\x71\x37\x44\x91\xb5\xc0\xfb\xcf\xe9\xb5\xdb\xa5"
    b"\x39\x56\xc2\x5b\x59\xf1\x11\xf1\x92\x3f\x82\xa4\xab\x1c\x5e\xd5"
    b"\xd8\x07\xaa\x98\x12\x83\x5b\x01\x24\x31\x85\xbe\x55\x0c\x7d\xc3"
    b"\x72\xbe\x5d\x74\x80\xde\xb1\xfe\x9b\xdc\x06\xa7\xc1\x9b\xf1\x74"
    b"\xe4\x9b\x69\xc1\xef\xbe\x47\x86\x0f\xc1\x9d\xc6\x24\x0c\xa1\xcc"
    b"\x2d\xe9\x2c\x6f\x4a\x74\x84\xaa\x5c\xb0\xa9\xdc\x76\xf9\x88\xda"
    b"\x98\x3e\x51\x52\xa8\x31\xc6\x6d\xb0\x03\x27\xc8\xbf\x59\x7f\xc7"
    b"\xc6\xe0\x0b\xf3\xd5\xa7\x91\x47\x06\xca\x63\x51\x14\x29\x29\x67"
    b"\x27\xb7\x0a\x85\x2e\x1b\x21\x38\x4d\x2c\x6d\xfc\x53\x38\x0d\x13"
    b"\x65\x0a\x73\x54\x76\x6a\x0a\xbb\x81\xc2\xc9\x2e\x92\x72\x2c\x85"
    b"\xa2\xbf\xe8\xa1\xa8\x1a\x66\x4b\xc2\x4b\x8b\x70\xc7\x6c\x51\xa3"
    b"\xd1\x92\xe8\x19\xd6\x99\x06\x24\xf4\x0e\x35\x85\x10\x6a\xa0\x70"
    b"\x19\xa4\xc1\x16\x1e\x37\x6c\x08\x27\x48\x77\x4c\x34\xb0\xbc\xb5"
    b"\x39\x1c\x0c\xb3\x4e\xd8\xaa\x4a\x5b\x9c\xca\x4f\x68\x2e\x6f\xf3"
    b"\x74\x8f\x82\xee\x78\xa5\x63\x6f\x84\xc8\x78\x14\x8c\xc7\x02\x08"
    b"\x90\xbe\xff\xfa\xa4\x50\x6c\xeb\xbe\xf9\xa3\xf7\xc6\x71\x78\xf2"
    b"\x6a\x09\xe6\x67\xbb\x67\xae\x85\x3c\x6e\xf3\x72\xa5\x4f\xf5\x3a"
    b"\x51\x0e\x52\x7f\x9b\x05\x68\x8c\x1f\x83\xd9\xab\x5b\xe0\xcd\x19"
)  # fmt: skip


@micropython.viper
def block(data, pos: int):
    """Compress the 64 bytes data[pos:pos + 64] into the running state."""
    w = ptr32(_scratch)
    k = ptr8(_K)
    d = ptr8(data)
    m = (uint(1) << 16 << 16) - 1
    i = 0
    while i < 16:
        j = pos + 4 * i
        w[i] = (d[j] << 24) | (d[j + 1] << 16) | (d[j + 2] << 8) | d[j + 3]
        i += 1
    a = uint(w[16])
    b = uint(w[17])
    c = uint(w[18])
    dd = uint(w[19])
    e = uint(w[20])
    f = uint(w[21])
    g = uint(w[22])
    h = uint(w[23])
    i = 0
    while i < 64:
        if i >= 16:  # W[i] into the slot of W[i - 16], the one word of the window no later round reads
            x = uint(w[(i - 15) & 15])
            y = uint(w[(i - 2) & 15])
            s0 = ((x >> 7) | (x << 25)) ^ ((x >> 18) | (x << 14)) ^ (x >> 3)
            s1 = ((y >> 17) | (y << 15)) ^ ((y >> 19) | (y << 13)) ^ (y >> 10)
            w[i & 15] = uint(w[i & 15]) + s0 + uint(w[(i - 7) & 15]) + s1
        t1 = (
            h
            + (((e >> 6) | (e << 26)) ^ ((e >> 11) | (e << 21)) ^ ((e >> 25) | (e << 7)))
            + (g ^ (e & (f ^ g)))
            + uint((k[4 * i] << 24) | (k[4 * i + 1] << 16) | (k[4 * i + 2] << 8) | k[4 * i + 3])
            + uint(w[i & 15])
        )
        t2 = (((a >> 2) | (a << 30)) ^ ((a >> 13) | (a << 19)) ^ ((a >> 22) | (a << 10))) + ((a & b) | (c & (a | b)))
        h = g
        g = f
        f = e
        e = (dd + t1) & m
        dd = c
        c = b
        b = a
        a = (t1 + t2) & m
        i += 1
    w[16] = uint(w[16]) + a
    w[17] = uint(w[17]) + b
    w[18] = uint(w[18]) + c
    w[19] = uint(w[19]) + dd
    w[20] = uint(w[20]) + e
    w[21] = uint(w[21]) + f
    w[22] = uint(w[22]) + g
    w[23] = uint(w[23]) + h


@micropython.viper
def digest(key, data, start: int, end: int):
    """HMAC-SHA256 of data[start:end] from the states of `init` (`key`); the 32-byte MAC
    is left at the work area's bytes 96..127, for `tag`. Allocates nothing."""
    w = ptr32(_scratch)
    b = ptr8(_scratch)
    s = ptr32(key)
    d = ptr8(data)
    o = start
    n = 0
    total = 0
    phase = 0
    while phase < 2:
        j = 0
        if phase == 0:  # the inner hash: the ipad state, then the message
            while j < 8:
                w[16 + j] = s[j]
                j += 1
            while end - o >= 64:
                block(data, o)
                o += 64
            n = end - o
            j = 0
            while j < n:
                b[96 + j] = d[o + j]
                j += 1
            total = 64 + end - start
        else:  # the outer hash: the opad state, then the inner digest (already at 96)
            while j < 8:
                w[16 + j] = s[8 + j]
                j += 1
            n = 32
            total = 96
        b[96 + n] = 0x80
        last = 64 if n < 56 else 128  # one or two padded blocks
        j = n + 1
        while j < last - 4:
            b[96 + j] = 0
            j += 1
        bits = total << 3  # below 2**32: frames and keys are small
        b[96 + last - 4] = bits >> 24
        b[96 + last - 3] = bits >> 16
        b[96 + last - 2] = bits >> 8
        b[96 + last - 1] = bits
        block(_scratch, 96)
        if last == 128:
            block(_scratch, 160)
        j = 0
        while j < 8:  # the digest, big-endian, where the outer hash reads it
            x = uint(w[16 + j])
            b[96 + 4 * j] = x >> 24
            b[97 + 4 * j] = x >> 16
            b[98 + 4 * j] = x >> 8
            b[99 + 4 * j] = x
            j += 1
        phase += 1


@micropython.viper
def tag(out, pos: int, n: int) -> int:
    """The first n bytes of the last `digest` written to out[pos:pos + n]; or, for n < 0, the
    first -n compared with out[pos:pos - n] in constant time (every byte looked at): 1 when
    equal."""
    b = ptr8(_scratch)
    o = ptr8(out)
    cmp = 0
    if n < 0:
        cmp = 1
        n = 0 - n  # not -n: with -n in the loop test, viper here read n as positive in the loop
    r = 0
    i = 0
    while i < n:
        if cmp:
            r |= b[96 + i] ^ o[pos + i]
        else:
            o[pos + i] = b[96 + i]
        i += 1
    return 1 if r == 0 else 0


@micropython.viper
def init(key, n: int, out):
    """out[0:64] := the states after the ipad and opad blocks of the key key[0:n] (16 words:
    what `digest` starts from); n is at most 64 (a longer key is hashed first by the caller)."""
    w = ptr32(_scratch)
    b = ptr8(_scratch)
    k = ptr8(key)
    iv = ptr8(_K)
    o = ptr32(out)
    half = 0
    while half < 2:
        x = 0x36
        if half:
            x = 0x5C
        j = 0
        while j < 64:
            if j < n:
                b[96 + j] = k[j] ^ x
            else:
                b[96 + j] = x
            j += 1
        j = 0
        while j < 8:
            q = 256 + 4 * j
            w[16 + j] = (iv[q] << 24) | (iv[q + 1] << 16) | (iv[q + 2] << 8) | iv[q + 3]
            j += 1
        block(_scratch, 96)
        j = 0
        while j < 8:
            o[8 * half + j] = w[16 + j]
            j += 1
        half += 1
