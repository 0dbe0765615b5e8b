"""The CSMS's refusal of an operator operation (its own module so that the operation modules
and `api` can share it without importing each other)."""

from __future__ import annotations


class CsmsError(ValueError):
    """An operation was refused; the message says why (nothing was changed)."""
