"""Small files on the board's flash: atomic replace, msgpack records.

LittleFS commits a file on close and `rename` replaces atomically, so writing a temporary
file and renaming it over the old one means a power cut leaves either the old or the new
content, never a mix. A full flash (ENOSPC) leaves the old file in place.
"""

import os

from .msgpack import FrameError, Reader, Writer, check

ROOT = "/flash"  # the mount point; the unix board and tests may point it elsewhere


def path(name):
    return ROOT + "/" + name


def exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


def remove(p):
    try:
        os.remove(p)
    except OSError:
        pass


def mkdir(p):
    try:
        os.mkdir(p)
    except OSError:
        pass


def write_atomic(p, data):
    """Replace file p by `data`; raise OSError (old content kept) when it cannot."""
    t = p + ".t"
    try:
        with open(t, "wb") as f:
            f.write(data)
        os.rename(t, p)
    except OSError:
        remove(t)
        raise


def read(p):
    """The bytes of file p, or None."""
    try:
        with open(p, "rb") as f:
            return f.read()
    except OSError:
        return None


def encode(value, head):
    """`head` then `value` in msgpack: a memoryview of a buffer sized for it. Most records
    fit 512 bytes; only a larger one takes a 4 KiB buffer (a 4 KiB block is the hardest to
    find in a fragmented heap), and the bytes are written from it without a copy."""
    n = 512
    while True:
        w = Writer(size=n)
        try:
            w.raw(head)
            w.value(value)
            return w.mv[: w.pos]
        except FrameError:
            if n > 512:
                raise
            n = 4096


def save(p, value):
    write_atomic(p, encode(value, b""))


def load(p, default):
    """The msgpack value in file p; `default` when it is missing or unreadable (no default
    for it: every caller says, and a function with defaults costs twice the heap on a board)."""
    b = read(p)
    if not b:
        return default
    mv = memoryview(b)
    try:
        # a record the board wrote itself: its size bounds it, not a frame's budget of values
        # (a local list of 256 tokens is 1 026 of them)
        if check(mv, 0, len(b), 0, None, len(b)) != len(b):
            return default
        return Reader(mv).value()
    except Exception:  # a damaged file reads as missing
        return default
