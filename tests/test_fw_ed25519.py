"""The board's Ed25519 verifier (firmware/csc/ed25519.py, M4): RFC 8032's test vectors and
random signatures made by `cryptography`, the same checks in CPython, on the 64-bit MicroPython
unix port and on the 32-bit board image (frozen there, as a board runs it), whose time per
verification is printed (a figure, not an assertion)."""
# mypy: disable-error-code="import-not-found,import-untyped,no-untyped-call"

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from csc import ed25519 as fw_ed25519

from tools import executables

ROOT = Path(__file__).resolve().parent.parent

# RFC 8032, 7.1: TEST 1, 2, 3 and TEST 1024's key (its 1023-byte message is made below), SHA(abc)
RFC8032 = [
    (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
    (
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
    ),
]


def vectors(n_random: int = 24, seed: int = 8032) -> list[tuple[str, str, str, bool]]:
    """(public, message, signature, valid) in hex: RFC 8032's, random ones signed by
    `cryptography`, and each random one spoiled (a bit of R, of S, of the message; S + L)."""
    out = [(k, m, s, True) for k, m, s in RFC8032]
    rng = random.Random(seed)
    for _ in range(n_random):
        key = ed25519.Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        msg = rng.randbytes(rng.choice((0, 1, 40, 111, 112, 127, 128, 129, 300)))
        sig = key.sign(msg)
        out.append((pub.hex(), msg.hex(), sig.hex(), True))
        bad = bytearray(sig)
        bad[rng.randrange(64)] ^= 1 << rng.randrange(8)
        out.append((pub.hex(), msg.hex(), bad.hex(), False))
        out.append((pub.hex(), (msg + b"!").hex(), sig.hex(), False))
        s = int.from_bytes(sig[32:], "little") + fw_ed25519._L  # non-canonical S: malleable, refused
        if s < 2**256:
            out.append((pub.hex(), msg.hex(), (sig[:32] + s.to_bytes(32, "little")).hex(), False))
    return out


def _cryptography_verdict(pub: str, msg: str, sig: str) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub)).verify(bytes.fromhex(sig), bytes.fromhex(msg))
    except Exception:
        return False
    return True


def test_rfc8032_and_random_vectors_agree_with_cryptography_in_cpython() -> None:
    for pub, msg, sig, valid in vectors():
        assert _cryptography_verdict(pub, msg, sig) is valid, (pub, msg, sig)
        assert fw_ed25519.verify(bytes.fromhex(pub), bytes.fromhex(msg), bytes.fromhex(sig)) is valid, (pub, msg)


def test_sha512_matches_hashlib_across_block_boundaries() -> None:
    rng = random.Random(512)
    for n in (0, 1, 55, 111, 112, 113, 127, 128, 129, 239, 240, 256, 1000):
        data = rng.randbytes(n)
        cut = rng.randrange(n + 1)
        assert fw_ed25519.sha512(data[:cut], data[cut:]) == hashlib.sha512(data).digest(), n


def test_a_key_that_is_no_curve_point_is_refused_by_name() -> None:
    with pytest.raises(fw_ed25519.BadKey, match="32 bytes"):
        fw_ed25519.verify(bytes(31), b"", bytes(64))
    not_a_point = (2).to_bytes(32, "little")  # y = 2: x^2 = 3 / (4d + 1) has no root mod p
    with pytest.raises(fw_ed25519.BadKey, match="not a point"):
        fw_ed25519.verify(not_a_point, b"", bytes(64))


_RUNNER = """
import json, sys, time
from csc import ed25519
cases = json.loads(sys.stdin.read())
bad = []
t = time.ticks_ms()
n = 0
for pub, msg, sig, valid in cases:
    got = ed25519.verify(bytes.fromhex(pub), bytes.fromhex(msg), bytes.fromhex(sig))
    n += 1
    if got != valid:
        bad.append(pub)
print(json.dumps({"bad": bad, "n": n, "ms": time.ticks_diff(time.ticks_ms(), t)}))
"""


def _run(exe: str, env: dict[str, str], cases: list[tuple[str, str, str, bool]], heap: str) -> dict[str, object]:
    r = subprocess.run([exe, "-X", f"heapsize={heap}", "-c", _RUNNER], input=json.dumps(cases), env=env,
                       capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def test_vectors_agree_on_the_64bit_micropython() -> None:
    cases = vectors(12)
    env = {**os.environ, "MICROPYPATH": str(ROOT / "firmware")}
    out = _run(executables.find("micropython"), env, cases, "512k")
    assert out["bad"] == [] and out["n"] == len(cases)
    print(f"64-bit unix port: {out['ms']} ms for {len(cases)} verifications")


def test_vectors_agree_on_the_board_image_and_its_time_is_measured() -> None:
    from tools.board import image

    try:
        exe = image.built(quiet=True)
    except image.ImageError as e:
        pytest.skip(str(e))
    cases = vectors(6)
    env = {**os.environ, "MICROPYPATH": ".frozen"}  # the frozen firmware only, as on the board
    out = _run(str(exe), env, cases, "64k")  # in the board's RAM
    assert out["bad"] == [] and out["n"] == len(cases)
    ms = int(out["ms"])  # type: ignore[call-overload]
    print(f"32-bit board image: {ms / len(cases):.0f} ms per verification ({len(cases)} in {ms} ms)")
