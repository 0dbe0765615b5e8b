"""R4-2: a CSP's token list arriving in pages, the one rule of the two receivers — the CSO (from
its CSPs: `token_lists`, `token_pages`) and a visited CSP (from its partners: `partner_lists`,
`partner_pages`). A version is installed once every page of it is here; a differential applies
to the version before it only; one list is in the making per sender, of its latest page (every
other version's pages go, a higher one's too: versions sent downwards would each be kept until
the retention purge), and a version has at most `max_pages` pages."""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Literal

from .endpoint import Refused

Tables = Literal["token", "partner"]
"""The receiver's tables: `<t>_lists` (party, version installed), `<t>_pages` (the pages staged)."""


def check_page(body: dict[str, Any], party: str, max_pages: int) -> None:
    """The page's own bounds, before anything is read: its number, its version's page count,
    every token the sender's."""
    page, pages = body.get("page", 0), body.get("pages", 1)
    if not 0 <= page < pages:
        raise Refused(400, "out_of_range", f"page {page} of {pages}", "page")
    if pages > max_pages:  # staged pages are held until the version is complete: bounded
        raise Refused(413, "too_large", f"{pages} pages, at most {max_pages}", "pages")
    for i, t in enumerate(body["tokens"]):
        if t.get("party_id", party) != party:
            raise Refused(403, "party_mismatch", "token of another party", f"tokens[{i}].party_id")


def stage(
    db: sqlite3.Connection, tables: Tables, party: str, body: dict[str, Any], now: int
) -> list[dict[str, Any]] | None:
    """Stage the page (in the caller's transaction); when it completes its version: the
    version's tokens in page order, the version recorded installed and its pages dropped (the
    caller installs the tokens in the same transaction); else None."""
    lists, staged_pages = f"{tables}_lists", f"{tables}_pages"
    version, page, pages = body["list_version"], body.get("page", 0), body.get("pages", 1)
    # the table names are ours (`Tables`), never the request's
    row = db.execute(f"SELECT version FROM {lists} WHERE party=?", (party,)).fetchone()
    if row is not None and row[0] >= version:
        raise Refused(409, "stale_version", f"list version {row[0]} is already installed", "list_version")
    if body["update_type"] == "differential" and (row is None or row[0] != version - 1):
        have = "none" if row is None else row[0]
        raise Refused(409, "version_gap", f"differential {version} needs {version - 1}, have {have}", "list_version")
    db.execute(f"DELETE FROM {staged_pages} WHERE party=? AND NOT (version = ? AND pages = ?)",
               (party, version, pages))  # fmt: skip
    db.execute(f"INSERT OR REPLACE INTO {staged_pages} VALUES(?,?,?,?,?,?,?)",
               (party, version, page, pages, body["update_type"], json.dumps(body["tokens"]), now))  # fmt: skip
    q = f"SELECT tokens FROM {staged_pages} WHERE party=? AND version=? AND pages=? ORDER BY page"
    staged = db.execute(q, (party, version, pages)).fetchall()
    if len(staged) < pages:
        return None
    db.execute(f"INSERT OR REPLACE INTO {lists} VALUES(?,?)", (party, version))
    db.execute(f"DELETE FROM {staged_pages} WHERE party=? AND version <= ?", (party, version))
    return [t for (chunk,) in staged for t in json.loads(chunk)]
