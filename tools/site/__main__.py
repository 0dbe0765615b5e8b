"""The whole site in one command: `python -m tools.site [--boards N] [--minutes M]`.

Starts the CSMS, the IEC 63119 roaming endpoints (the site's CSO backed by the CSMS, the
home CSPs of two service providers A and B, a clearing house; mixed mode), the gateway and N
emulated boards on loopback (generated keys and certificates), runs a scenario — RFID
sessions authorized through the CSMS, a DSO limit while sessions run, an upstream outage and
its drain, remote start/stop, a card of provider A and one of provider B each authorized by
its own home CSP (R3-1, R4-1), a remote start from provider B (R3-2), a QR start (S3), a
reservation (S1), a log upload (M8), a signed firmware campaign (M4) — with a live
one-line-per-EVSE view refreshed every second, then prints a summary and
exits non-zero when anything is off (docs/site.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from evedge_csms import commands as cmds
from evedge_roaming.csp import CspEndpoint
from gateway.link import proto_ts
from gateway.schema import AuthStatus, Status, TokenType
from tools.board import build
from tools.site.harness import Site, board_wait, until


async def view(s: Site, stop: asyncio.Event) -> None:
    last = (time.monotonic(), 0)
    while not stop.is_set():
        await asyncio.sleep(1)
        gw = s.gw
        if gw is None:
            continue
        snap = gw.snapshot()
        now = time.monotonic()
        fps = (snap["frames_in"] - last[1]) / max(1e-3, now - last[0])
        last = (now, snap["frames_in"])
        evse = " ".join(
            f"{b.device_id}:{'tx' if any(e['ev'] == 'tx_started' for e in b.events[-50:]) else 'idle'}"
            for b in s.boards
        )
        try:
            sdrs: int | str = len(s.csms.api.sdrs()) if s.csms is not None else 0
        except Exception:  # the CSMS is stopped during the outage
            sdrs = "-"
        print(f"[site] up={snap['upstream']:<10} links={snap['links']} backlog={snap['outbox_backlog']} "
              f"frames/s={fps:.0f} sdrs={sdrs} | {evse}", flush=True)  # fmt: skip


async def scenario(s: Site, minutes: int) -> list[str]:
    assert s.csms is not None and s.gw is not None
    problems: list[str] = []
    api, site = s.csms.api, s.gw.cfg.site.id
    n = len(s.boards)
    await asyncio.gather(*(board_wait(b, "registration") for b in s.boards))
    for i in range(n):
        api.add_token(f"CARD-{i}")
    # S2/S6: RFID sessions authorized online, a DSO limit (E5) while they run
    marks = [b.mark() for b in s.boards]
    for i, b in enumerate(s.boards):
        b.cmd("card", token=f"CARD-{i}")
        b.cmd("plug")
    await asyncio.gather(*(board_wait(b, "tx_started", since=m) for b, m in zip(s.boards, marks, strict=True)))
    t0 = time.monotonic()
    row = await s.command_done(api.send_limit(site, 22000, zone=1, deadline_ms=3000))
    urgent_ms = (time.monotonic() - t0) * 1000
    if row["results"][0]["status"] != Status.ACCEPTED:
        problems.append(f"DSO limit not confirmed: {row['results']}")
    for b in s.boards:
        b.cmd("step", ms=minutes * 60_000)
    await asyncio.sleep(1)
    # outage during sessions, then drain
    api.send_local_list(site, 1)
    await until(lambda: s.gw is not None and s.gw.auth.list_version == 1, 10, "local list")
    await s.stop_csms()
    for b in s.boards:
        b.cmd("unplug")
        b.cmd("emit", n=10, **{"from": 5000})
    await asyncio.sleep(2)
    await s.start_csms()
    await until(lambda: s.gw is not None and s.gw.pending_rows == 0, 30, "outbox drained")
    # S3: remote start/stop on board 0
    b = s.boards[0]
    m = b.mark()
    b.cmd("plug")
    r = await s.command_done(s.csms.api.send(site, cmds.request_start([b.device_id], "REMOTE-1", 1)))
    tx = await board_wait(b, "tx_started", since=m)
    b.cmd("step", ms=60_000)
    await asyncio.sleep(0.5)
    await s.command_done(s.csms.api.send(site, cmds.request_stop([b.device_id], int(tx["tx_id"]))))
    await board_wait(b, "tx_ended", since=m)
    b.cmd("unplug")
    if r["results"][0]["status"] != Status.ACCEPTED:
        problems.append("remote start refused")
    problems += await roaming_and_services(s, minutes)
    # M4: signed firmware campaign on the last board
    fb = s.boards[-1]
    m = fb.mark()
    s.csms.api.firmware_campaign(site, build.update_image("2.0.0", fb.march), "2.0.0", [fb.device_id])
    await board_wait(fb, "exit", timeout=40, since=m)
    fb.start()
    await until(lambda: s.csms is not None and any(r["fw_status"] in (9, 11) for r in s.csms.store.select("fw_status")),
                30, "firmware installed")  # fmt: skip
    # RFID sessions, remote start, provider A's card, provider B's card, remote start from B, QR start
    expect = n + 5
    sdrs = await until(lambda: s.csms is not None and len(s.csms.api.sdrs()) >= expect and s.csms.api.sdrs(), 20,
                       "SDRs")  # fmt: skip
    assert s.ch is not None and s.bridge is not None and s.csp is not None and s.csp_b is not None
    ch, homes = s.ch, {s.csp.me: 1, s.csp_b.me: 2}  # roaming SDRs expected per provider
    verdicts = await until(lambda: [v for v in ch.reconcile() if v.verdict == "matched"]
                           if len(ch.reconcile()) >= sum(homes.values()) else None, 20,
                           "roaming SDRs at the clearing house")  # fmt: skip
    all_verdicts = ch.reconcile()
    per_csp = {str(r[0]): int(r[1]) for r in ch.store.all("SELECT csp, count(*) FROM sdrs GROUP BY csp")}
    at_csp = {ep.me: len(ep.store.all("SELECT sdr_id FROM sdrs")) for ep in (s.csp, s.csp_b)}
    for party, want in homes.items():
        if per_csp.get(party, 0) != want or at_csp[party] != want:
            problems.append(f"roaming SDRs of {party}: {at_csp[party]} at the CSP, {per_csp.get(party, 0)} at the "
                            f"clearing house, {want} expected")  # fmt: skip
    snap = s.gw.snapshot()
    received = s.csms.store.select("received")
    keys = {(x["device_id"], x["msg_id"], x["grp"]) for x in received}
    if len(keys) != len(received):
        problems.append("duplicates at the CSMS")
    if len(verdicts) != len(all_verdicts):
        problems.append(f"roaming SDRs not reconciled: {[v for v in all_verdicts if v.verdict != 'matched']}")
    elapsed = time.monotonic() - s.t0
    print("\n== summary ==")
    print(f"boards {n}, sessions {len(sdrs)}, energy {sum(x['energy_wh'] for x in sdrs)} Wh, SDRs {len(sdrs)} "
          f"at the CSMS; roaming SDRs {s.bridge.forwarded} sent to the home CSPs ("
          f"{', '.join(f'{p} {at_csp[p]}' for p in homes)}), {len(verdicts)}/{len(all_verdicts)} reconciled at the "
          f"clearing house")  # fmt: skip
    print(f"frames in {snap['frames_in']} ({snap['frames_in'] / elapsed:.0f} frames/s over {elapsed:.0f} s), "
          f"stored {snap['frames_stored']}, relayed {snap['relayed']}, outbox backlog {snap['outbox_backlog']}, "
          f"upstream connects {snap['upstream_connects']}")  # fmt: skip
    print(f"urgent DSO limit confirmed by every board in {urgent_ms:.0f} ms (CSMS poll included)")
    print(f"rejections {snap['rejections']}")
    if snap["outbox_backlog"]:
        problems.append("outbox not drained")
    if any(not x["id_token"] for x in sdrs):
        problems.append("SDR without token")
    return problems


async def charge(s: Site, i: int, minutes: int, since: int) -> dict[str, object]:
    """The started session on board i: charge `minutes` of simulated time, unplug; tx_ended."""
    b = s.boards[i]
    await board_wait(b, "tx_started", since=since)
    b.cmd("step", ms=minutes * 60_000)
    await asyncio.sleep(0.5)
    b.cmd("unplug")
    return await board_wait(b, "tx_ended", since=since)


async def roaming_card(s: Site, i: int, uid: str, home: CspEndpoint, minutes: int) -> list[str]:
    """R3-1/R4-1: a card only `home` knows, presented at EVSE i, authorized online by that home
    CSP through the CSO endpoint; charged `minutes`, unplugged (its SDR goes to `home`)."""
    assert s.cso is not None
    problems: list[str] = []
    home.add_customer(uid)
    await home.distribute_tokens()  # R4-2: the CSO learns the card's home (card numbers go only there)
    b = s.boards[i]
    m = b.mark()
    b.cmd("card", token=uid)
    if (await board_wait(b, "auth", since=m))["status"] != AuthStatus.ACCEPTED:
        return [f"roaming card {uid} of {home.me} refused"]
    sid = s.cso.open_session(s.evse(i), uid)
    if sid is None or s.cso.session(sid)["csp"] != home.me:
        problems.append(f"roaming card {uid}: session {sid} not with its home CSP {home.me}")
    b.cmd("plug")
    await charge(s, i, minutes, m)
    return problems


async def roaming_and_services(s: Site, minutes: int) -> list[str]:
    """R3-1/R4-1 roaming cards of providers A and B, R3-2 remote start from provider B, S3 QR
    start, S1 reservation, M8 log upload."""
    assert s.csms is not None and s.csp is not None and s.csp_b is not None and s.gw is not None
    problems: list[str] = []
    api, site, n = s.csms.api, s.gw.cfg.site.id, len(s.boards)
    csp_b = s.csp_b
    # R3-1, R4-1: a card of provider A at EVSE 0 and one of provider B at EVSE 1, each known to
    # its own home CSP only (at the same time when there are two boards)
    cards = [(0, "04ROAM-A1", s.csp), (1 % n, "04ROAM-B1", csp_b)]
    if n > 1:
        for found in await asyncio.gather(*(roaming_card(s, i, uid, home, minutes) for i, uid, home in cards)):
            problems += found
    else:
        for i, uid, home in cards:
            problems += await roaming_card(s, i, uid, home, minutes)
    # R3-2: remote start from provider B's app, down to board 1 through CSO endpoint, CSMS, gateway
    i = 1 % n
    b = s.boards[i]
    m = b.mark()
    b.cmd("plug")
    await asyncio.sleep(0.3)
    csp_b.add_customer("APP-USER-B1")
    answer = await csp_b.start_remote(s.evse(i), "APP-USER-B1")
    if answer["result"] != "accepted":
        problems.append(f"remote start from provider B: {answer}")
    else:
        await board_wait(b, "tx_started", since=m)
        b.cmd("step", ms=minutes * 60_000)
        await asyncio.sleep(0.5)
        stop = await csp_b.stop_remote(answer["roaming_session_id"])
        if stop["result"] != "accepted":
            problems.append(f"remote stop from provider B: {stop}")
        await board_wait(b, "tx_ended", since=m)
        b.cmd("unplug")
    # S3: QR code scanned by the phone → the CSMS starts the session (token type qr)
    b = s.boards[0]
    m = b.mark()
    b.cmd("plug")
    await asyncio.sleep(0.3)
    r = await s.command_done(api.send(site, cmds.request_start([b.device_id], "QR-7F3A", 2, token_type=TokenType.QR)))
    if r["results"][0]["status"] != Status.ACCEPTED:
        problems.append(f"QR start refused: {r['results']}")
    else:
        tx = await board_wait(b, "tx_started", since=m)
        b.cmd("step", ms=minutes * 60_000)
        await asyncio.sleep(0.5)
        await s.command_done(api.send(site, cmds.request_stop([b.device_id], int(tx["tx_id"]))))
        await board_wait(b, "tx_ended", since=m)
        b.cmd("unplug")
    # S1: reserve EVSE 0 for a card, then cancel
    rid = 501
    r = await s.command_done(api.reserve(site, b.device_id, rid, proto_ts(time.time()) + 3600, "CARD-0", evse=1))
    if r["results"][0]["status"] != Status.ACCEPTED:
        problems.append(f"reservation refused: {r['results']}")
    await s.command_done(api.cancel_reservation(rid))
    # M8: log upload (bulk) from board 0
    b.cmd("log", text="site scenario log line ", n=40)
    await s.command_done(api.send(site, cmds.get_log([b.device_id], 77)))
    csms = s.csms
    try:
        await until(lambda: any(x["complete"] for x in csms.store.select("logs", {"request_id": 77})), 20,
                    "log uploaded")  # fmt: skip
    except TimeoutError as e:
        problems.append(str(e))
    return problems


async def amain(boards: int, minutes: int, root: Path) -> int:
    s = Site(root, boards, roaming=True)
    stop = asyncio.Event()
    try:
        await s.start()
        task = asyncio.create_task(view(s, stop))
        problems = await scenario(s, minutes)
        stop.set()
        await task
    except Exception as e:  # the summary names what failed
        problems = [f"{type(e).__name__}: {e}"]
    finally:
        stop.set()
        await s.close()
    for p in problems:
        print("PROBLEM:", p)
    print("OK" if not problems else "FAILED")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.site", description=__doc__)
    ap.add_argument("--boards", type=int, default=3)
    ap.add_argument("--minutes", type=int, default=10, help="simulated charging minutes per session")
    ap.add_argument("--data", type=Path, default=None)
    a = ap.parse_args(argv)
    root = a.data or Path(tempfile.mkdtemp(prefix="evedge-site-"))
    return asyncio.run(amain(a.boards, a.minutes, root))


if __name__ == "__main__":
    sys.exit(main())
