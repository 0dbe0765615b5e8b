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

import array

import micropython

# The work area (one per firmware: the link is single-threaded and IRQ handlers never hash), in
# 32-bit words: 0..63 the message schedule, 64..71 the running state, 72..103 the padded last
# block(s) (bytes 288..415; after digest() its first 32 bytes hold the MAC), 104..167 the round
# constants (FIPS 180-4, 4.2.2), 168..175 the initial state (5.3.3).
_scratch = bytearray(416) + bytearray(array.array(
    "I",
    (
        0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1, 0x923F82A4, 0xAB1C5ED5,
        0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3, 0x72BE5D74, 0x80DEB1FE, 0x9BDC06A7, 0xC19BF174,
        0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F, 0x4A7484AA, 0x5CB0A9DC, 0x76F988DA,
        0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7, 0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967,
        0x27B70A85, 0x2E1B2138, 0x4D2C6DFC, 0x53380D13, 0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85,
        0xA2BFE8A1, 0xA81A664B, 0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070,
        0x19A4C116, 0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
        0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208, 0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7, 0xC67178F2,
        0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
    ),
))  # fmt: skip


@micropython.viper
def block(data, pos: int):
    """Compress the 64 bytes data[pos:pos + 64] into the running state."""
    w = ptr32(_scratch)
    d = ptr8(data)
    m = (uint(1) << 16 << 16) - 1
    i = 0
    while i < 16:
        j = pos + 4 * i
        w[i] = (d[j] << 24) | (d[j + 1] << 16) | (d[j + 2] << 8) | d[j + 3]
        i += 1
    while i < 64:
        x = uint(w[i - 15])
        y = uint(w[i - 2])
        s0 = ((x >> 7) | (x << 25)) ^ ((x >> 18) | (x << 14)) ^ (x >> 3)
        s1 = ((y >> 17) | (y << 15)) ^ ((y >> 19) | (y << 13)) ^ (y >> 10)
        w[i] = uint(w[i - 16]) + s0 + uint(w[i - 7]) + s1
        i += 1
    a = uint(w[64])
    b = uint(w[65])
    c = uint(w[66])
    dd = uint(w[67])
    e = uint(w[68])
    f = uint(w[69])
    g = uint(w[70])
    h = uint(w[71])
    i = 0
    while i < 64:
        t1 = (
            h
            + (((e >> 6) | (e << 26)) ^ ((e >> 11) | (e << 21)) ^ ((e >> 25) | (e << 7)))
            + (g ^ (e & (f ^ g)))
            + uint(w[104 + i])
            + uint(w[i])
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
    w[64] = uint(w[64]) + a
    w[65] = uint(w[65]) + b
    w[66] = uint(w[66]) + c
    w[67] = uint(w[67]) + dd
    w[68] = uint(w[68]) + e
    w[69] = uint(w[69]) + f
    w[70] = uint(w[70]) + g
    w[71] = uint(w[71]) + h


@micropython.viper
def digest(key, data, start: int, end: int):
    """HMAC-SHA256 of data[start:end] from the states of `init` (`key`); the 32-byte MAC
    is left at the work area's bytes 288..319, for `tag`. Allocates nothing."""
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
                w[64 + j] = s[j]
                j += 1
            while end - o >= 64:
                block(data, o)
                o += 64
            n = end - o
            j = 0
            while j < n:
                b[288 + j] = d[o + j]
                j += 1
            total = 64 + end - start
        else:  # the outer hash: the opad state, then the inner digest (already at 288)
            while j < 8:
                w[64 + j] = s[8 + j]
                j += 1
            n = 32
            total = 96
        b[288 + n] = 0x80
        last = 64 if n < 56 else 128  # one or two padded blocks
        j = n + 1
        while j < last - 4:
            b[288 + j] = 0
            j += 1
        bits = total << 3  # below 2**32: frames and keys are small
        b[288 + last - 4] = bits >> 24
        b[288 + last - 3] = bits >> 16
        b[288 + last - 2] = bits >> 8
        b[288 + last - 1] = bits
        block(_scratch, 288)
        if last == 128:
            block(_scratch, 352)
        j = 0
        while j < 8:  # the digest, big-endian, where the outer hash reads it
            x = uint(w[64 + j])
            b[288 + 4 * j] = x >> 24
            b[289 + 4 * j] = x >> 16
            b[290 + 4 * j] = x >> 8
            b[291 + 4 * j] = x
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
            r |= b[288 + i] ^ o[pos + i]
        else:
            o[pos + i] = b[288 + i]
        i += 1
    return 1 if r == 0 else 0


@micropython.viper
def init(key, n: int, out):
    """out[0:64] := the states after the ipad and opad blocks of the key key[0:n] (16 words:
    what `digest` starts from); n is at most 64 (a longer key is hashed first by the caller)."""
    w = ptr32(_scratch)
    b = ptr8(_scratch)
    k = ptr8(key)
    o = ptr32(out)
    half = 0
    while half < 2:
        x = 0x36
        if half:
            x = 0x5C
        j = 0
        while j < 64:
            if j < n:
                b[288 + j] = k[j] ^ x
            else:
                b[288 + j] = x
            j += 1
        j = 0
        while j < 8:
            w[64 + j] = w[168 + j]
            j += 1
        block(_scratch, 288)
        j = 0
        while j < 8:
            o[8 * half + j] = w[64 + j]
            j += 1
        half += 1
