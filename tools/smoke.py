"""Smoke run of the foundation: frames built, tagged, verified and queued by priority.

    python -m tools.smoke [--boards 50] [--frames-per-board 2000]

Every board gets its own key and connection nonces; its frames (the typical mix plus
bulk log chunks and an urgent emergency stop) are sealed, a share is tampered with or
replayed, and the gateway side ingests all of them through the Rust core's batch API
into one priority queue. It prints what was accepted, what was rejected and why, the
order classes leave the queue in, an Ed25519 firmware-manifest check, and the figures.
Exits non-zero when anything is off. A later issue turns this into the whole site.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway import _core as core
from gateway.schema import Action, ErrorCode, Key, Kind, Priority

from .bench.mix import MIX

TS = 30_000_000


def board_frames(board: int, n: int) -> tuple[bytes, list[bytes]]:
    k_dev = os.urandom(32)
    nb, ng = os.urandom(16), os.urandom(16)
    k_up, _, e_up, _ = core.derive_keys(k_dev, nb, ng)
    tx = core.Sender(k_up)
    frames = []
    for i in range(n):
        msg_id = board * 1_000_000 + i + 1
        if i % 50 == 49:
            body = {Key.REQUEST_ID: 1, Key.OFFSET: i * 1024, Key.DATA: os.urandom(1024), Key.LAST: False}
            frames.append(tx.seal(Kind.EVENT, msg_id, Priority.BULK, TS, Action.LOG_CHUNK, body))
        elif i == n // 2:
            body = {Key.REASON: "emergency stop pressed", Key.EVSE: 1}
            frames.append(tx.seal(Kind.REQUEST, msg_id, Priority.URGENT, TS, Action.EMERGENCY_STOP, body))
        else:
            m = MIX[i % len(MIX)]
            seq = i + 1

            def enc(field: int, data: bytes, seq: int = seq) -> bytes:
                return core.aes_ctr(e_up, seq, field, data)

            frames.append(tx.seal(m.kind, msg_id, m.prio, TS, m.action, m.body(enc)))
    return k_up, frames


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.smoke", description=__doc__)
    ap.add_argument("--boards", type=int, default=50)
    ap.add_argument("--frames-per-board", type=int, default=2000)
    args = ap.parse_args(argv)

    boards = [board_frames(b, args.frames_per_board) for b in range(args.boards)]
    q = core.PriorityQueue(max_items=args.boards * args.frames_per_board * 2, max_bytes=1 << 30)
    causes: collections.Counter[str] = collections.Counter()
    accepted = 0
    spent = 0.0
    wire = 0
    for device, (key, frames) in enumerate(boards):
        tampered = list(frames)
        tampered.append(frames[10][:-1] + bytes([frames[10][-1] ^ 1]))  # forged tag
        tampered.append(frames[20])  # replay
        tampered.append(frames[30][:25])  # truncated
        rx = core.Receiver(key)
        t0 = time.perf_counter()
        for i in range(0, len(tampered), 1024):
            status = rx.ingest(tampered[i : i + 1024], q, device)
            for code in status:
                if code:
                    causes[ErrorCode(code).name] += 1
                else:
                    accepted += 1
        spent += time.perf_counter() - t0
        wire += sum(len(f) + 2 for f in frames)

    order: list[int] = []
    while len(q):
        order.extend(item[0] for item in q.pop_batch(4096))
    first_urgent_run = order[: args.boards]

    sk = Ed25519PrivateKey.generate()
    pk = sk.public_key().public_bytes_raw()
    manifests = [f"image {i} sha256 {os.urandom(32).hex()}".encode() for i in range(64)]
    items = [(pk, m, sk.sign(m)) for m in manifests]
    items[5] = (pk, manifests[5], sk.sign(b"something else"))
    verdicts = core.ed25519_verify_batch(items)

    total = args.boards * args.frames_per_board
    print(f"boards {args.boards}, frames sealed {total}, bytes on the wire {wire:,} ({wire / total:.1f} per frame)")
    print(f"accepted {accepted}, rejected {sum(causes.values())}: {dict(sorted(causes.items()))}")
    print(f"ingest (decode + tag + schema + enqueue) {total / spent:,.0f} frames/s on one core")
    by_class = dict(sorted(collections.Counter(order).items()))
    print(f"queue drained {len(order)} frames, by class {by_class}")
    print(f"first {len(first_urgent_run)} out are all urgent: {set(first_urgent_run) == {0}}")
    print(f"firmware manifests: {sum(verdicts)} of {len(verdicts)} signatures verify (one forged)")
    ok = (
        accepted == total
        and causes == {"BAD_TAG": args.boards, "REPLAY": args.boards, "TRUNCATED": args.boards}
        and set(first_urgent_run) == {0}
        and verdicts.count(False) == 1
        and not verdicts[5]
    )
    print("smoke run:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
