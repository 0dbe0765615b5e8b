"""CPython stand-in for MicroPython's built-in `micropython` module (tooling and tests only).

On a board, and on the unix port, the built-in module wins over this file, so it is never
imported there. It exists because the generated `csc/schema.py` does
`from micropython import const` unconditionally.
"""


def const(x):
    return x
