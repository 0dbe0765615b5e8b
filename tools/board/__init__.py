"""The emulated board runner: the real firmware on the MicroPython unix port."""

from .runner import Board

__all__ = ["Board"]
