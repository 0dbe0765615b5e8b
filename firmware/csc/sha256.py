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
# 32-bit words: 0..63 the message schedule, 64..71 the running state, 72..103 the padded last
# block(s) (bytes 288..415; after digest() its first 32 bytes hold the MAC).
_scratch = bytearray(416)
# The round constants (FIPS 180-4, 4.2.2; words 0..63) and the initial state (5.3.3; 64..71) as 32-bit
# little-endian words, read through ptr32: a bytes literal stays in flash on a board (an array would
# copy its 288 bytes into the heap). Every MicroPython target this firmware runs on (x86, Xtensa,
# RISC-V, ARM Cortex-M) is little-endian; tests/test_fw_codec.py checks the words against FIPS 180-4's.
_K = (
    b"\x98\x2f\x8a\x42\x91\x44\x37\x71\xcf\xfb\xc0\xb5\xa5\xdb\xb5\xe9"
    b"\x5b\xc2\x56\x39\xf1\x11\xf1\x59\xa4\x82\x3f\x92\xd5\x5e\x1c\xab"
    b"\x98\xaa\x07\xd8\x01\x5b\x83\x12\xbe\x85\x31\x24\xc3\x7d\x0c\x55"
    b"\x74\x5d\xbe\x72\xfe\xb1\xde\x80\xa7\x06\xdc\x9b\x74\xf1\x9b\xc1"
    b"\xc1\x69\x9b\xe4\x86\x47\xbe\xef\xc6\x9d\xc1\x0f\xcc\xa1\x0c\x24"
    b"\x6f\x2c\xe9\x2d\xaa\x84\x74\x4a\xdc\xa9\xb0\x5c\xda\x88\xf9\x76"
    b"\x52\x51\x3e\x98\x6d\xc6\x31\xa8\xc8\x27\x03\xb0\xc7\x7f\x59\xbf"
    b"\xf3\x0b\xe0\xc6\x47\x91\xa7\xd5\x51\x63\xca\x06\x67\x29\x29\x14"
    b"\x85\x0a\xb7\x27\x38\x21\x1b\x2e\xfc\x6d\x2c\x4d\x13\x0d\x38\x53"
    b"\x54\x73\x0a\x65\xbb\x0a\x6a\x76\x2e\xc9\xc2\x81\x85\x2c\x72\x92"
    b"\xa1\xe8\xbf\xa2\x4b\x66\x1a\xa8\x70\x8b\x4b\xc2\xa3\x51\x6c\xc7"
    b"\x19\xe8\x92\xd1\x24\x06\x99\xd6\x85\x35\x0e\xf4\x70\xa0\x6a\x10"
    b"\x16\xc1\xa4\x19\x08\x6c\x37\x1e\x4c\x77\x48\x27\xb5\xbc\xb0\x34"
    b"\xb3\x0c\x1c\x39\x4a\xaa\xd8\x4e\x4f\xca\x9c\x5b\xf3\x6f\x2e\x68"
    b"\xee\x82\x8f\x74\x6f\x63\xa5\x78\x14\x78\xc8\x84\x08\x02\xc7\x8c"
    b"\xfa\xff\xbe\x90\xeb\x6c\x50\xa4\xf7\xa3\xf9\xbe\xf2\x78\x71\xc6"
    b"\x67\xe6\x09\x6a\x85\xae\x67\xbb\x72\xf3\x6e\x3c\x3a\xf5\x4f\xa5"
    b"\x7f\x52\x0e\x51\x8c\x68\x05\x9b\xab\xd9\x83\x1f\x19\xcd\xe0\x5b"
)  # fmt: skip


@micropython.viper
def block(data, pos: int):
    """Compress the 64 bytes data[pos:pos + 64] into the running state."""
    w = ptr32(_scratch)
    k = ptr32(_K)
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
            + uint(k[i])
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
    iv = ptr32(_K)
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
            w[64 + j] = iv[64 + j]
            j += 1
        block(_scratch, 288)
        j = 0
        while j < 8:
            o[8 * half + j] = w[64 + j]
            j += 1
        half += 1
