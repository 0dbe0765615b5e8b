"""The billing invariants of roaming (issue #14), checked at the end of every roaming scenario:
the check lives in tools/site/roaming_books.py, shared with the fault campaign
(`python -m tools.site.campaign --roaming`)."""

from tools.site.roaming_books import MODES, Book, books_faults, check_books, roaming_sdrs

__all__ = ["MODES", "Book", "books_faults", "check_books", "roaming_sdrs"]
