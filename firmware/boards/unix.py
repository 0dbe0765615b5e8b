"""The emulated board: the firmware on the MicroPython unix port.

    micropython -X heapsize=96k firmware/boards/unix.py --flash board.img --gw 127.0.0.1:7700 \
        --id evse-1 --factory-key <64 hex> [--blocks 256] [--meter meter.txt] [--evses 1] [--meter-keys F]

- Flash: `FileBlockDev` makes the image file a block device (4 KiB blocks) for
  `vfs.VfsLfs2`, mounted at /flash (formatted on first use). Every block write reaches
  the file before the call returns, so `kill -9` of the process is a power cut.
- HAL: boards.sim.SimHal with `--evses` EVSEs (default 1); the meters' registers live in the
  `--meter` file (a meter keeps its register across a power cut, as a real one does): import
  and export of EVSE 1, then of EVSE 2, ….  `--meter-keys`: a file with each EVSE's meter key
  (an Ed25519 seed in hex, a line per EVSE), what seals the meters' signed readings (boards/sim.py).
- Control channel: one JSON object per line on stdin (commands), one per line on stdout
  (what the board did: {"ev": "...", ...}); see tools/board/ and docs/firmware.md.
- Loader (`Slots`, M4): the firmware the process was started with (frozen in the board image,
  or the build the runner names) is the factory's; an update lives in slot /flash/s0 or
  /flash/s1, whose `csc` package shadows the factory's (put first on sys.path before anything
  imports csc). `otadata.json` is the loader's record, as an ESP32's otadata partition:
  the confirmed slot, the slot on trial and its boots. `--fw-signers name=hex,...`: the keys
  the board trusts to sign updates, fixed at the factory as the factory key is.
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

import gc
import json
import os
import sys

import vfs
from micropython import const

if "" not in sys.path:
    sys.path.append("")


_BLOCK = const(4096)  # the flash's erase block, as an ESP32's (a constant: no attribute for it)


class FileBlockDev:
    """A file standing for the board's flash: LittleFS2 block device, extended interface."""

    def __init__(self, path, blocks=256):
        self.n = blocks
        try:
            self.f = open(path, "r+b")  # noqa: SIM115 — open for the board's life
        except OSError:
            self.f = open(path, "w+b")  # noqa: SIM115
            z = bytes(_BLOCK)
            for _ in range(blocks):
                self.f.write(z)
            self.f.flush()

    def readblocks(self, block, buf, off=0):
        self.f.seek(block * _BLOCK + off)
        self.f.readinto(buf)

    def writeblocks(self, block, buf, off=None):
        self.f.seek(block * _BLOCK + (off or 0))
        self.f.write(buf)
        self.f.flush()

    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return _BLOCK
        if op == 6:  # erase: LittleFS never needs the bytes cleared on a file
            return 0
        return None


SLOT_TRIES = const(3)  # boots a slot on trial gets to confirm itself before the loader goes back
_MAGIC = b"CSCIMG1\n"  # the update archive (tools/board/build.py `pack`)


def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


def _rmtree(p):
    try:
        names = [e[0] for e in os.ilistdir(p)]
    except OSError:
        return
    for n in names:
        q = p + "/" + n
        try:
            os.remove(q)
        except OSError:
            _rmtree(q)
    os.rmdir(p)


class Slots:
    """The emulated board's loader: which firmware runs, and the firmware's hands on it
    (csc/services/firmware_update.py). The choice at power-up (`select`) is made before csc is
    imported, as a bootloader's; the rest is called by the update service."""

    def __init__(self, root="/flash", signers=None):
        self.root = root
        self.signers = signers or {}  # signer name -> Ed25519 public key (32 bytes)
        self.running = None  # the slot running now; None: the factory firmware
        try:
            with open(root + "/otadata.json") as f:
                self.d = json.loads(f.read())
        except (OSError, ValueError):  # none yet (a torn write cannot happen: see _save)
            self.d = {}

    def _save(self):
        t = self.root + "/otadata.t"
        with open(t, "w") as f:
            f.write(json.dumps(self.d))
        os.rename(t, self.root + "/otadata.json")  # LittleFS: atomic, old or new after a power cut

    def dir(self, slot):
        return "%s/s%d" % (self.root, slot)

    def _has_code(self, slot):
        return _exists(self.dir(slot) + "/csc/__init__.mpy")

    def select(self):
        """Power-up: the slot to run (the one on trial while it has boots left, else the
        confirmed one); its folder goes first on sys.path."""
        d = self.d
        t = d.get("trial")
        slot = d.get("boot")
        if t is not None:
            if d.get("tries", 0) >= SLOT_TRIES:
                d["trial"] = None
                d["rb"] = "the new image did not confirm itself in %d boots" % SLOT_TRIES
            elif not self._has_code(t):
                d["trial"] = None
                d["rb"] = "slot %d holds no firmware" % t
            else:
                d["tries"] = d.get("tries", 0) + 1  # counted before it runs: a crash uses it up
                slot = t
            self._save()
        if slot is not None and not self._has_code(slot):
            slot = None  # the factory firmware is always there
        self.running = slot
        if slot is not None:
            sys.path.insert(0, self.dir(slot))
        return slot

    def inactive(self):
        """The slot an update is written to: never the one running."""
        return 1 if self.running == 0 else 0

    def on_trial(self):
        return self.running is not None and self.running == self.d.get("trial")

    def set_trial(self, slot):
        self.d["trial"] = slot
        self.d["tries"] = 0
        self.d.pop("rb", None)
        self._save()

    def confirm(self):
        self.d["boot"] = self.running
        self.d["trial"] = None
        self.d["tries"] = 0
        self._save()

    def abort(self, reason):
        """The trial failed its self-test: the next boot runs the confirmed slot."""
        self.d["trial"] = None
        self.d["rb"] = reason
        self._save()

    def rolled_back(self):
        return self.d.get("rb")

    def forget(self):
        self.d.pop("rb", None)
        self._save()

    def install(self, slot, path, size):
        """Unpack the update archive at `path` into the slot's folder (emptied first): a
        magic, then per file a name (1-byte length, under csc/, .mpy), a 4-byte big-endian
        size and the bytes; a zero length ends it. ValueError names what is wrong."""
        d = self.dir(slot)
        _rmtree(d)
        os.mkdir(d)
        buf = bytearray(512)
        mv = memoryview(buf)
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError("not a firmware archive")
            while True:
                k = f.read(1)
                if not k:
                    raise ValueError("firmware archive truncated")
                if k[0] == 0:
                    break
                name = f.read(k[0]).decode()
                n = int.from_bytes(f.read(4), "big")
                if not name.startswith("csc/") or not name.endswith(".mpy") or ".." in name or n > size:
                    raise ValueError("firmware archive: bad entry %s" % name)
                parts = name.split("/")
                q = d
                for part in parts[:-1]:
                    q += "/" + part
                    if not _exists(q):
                        os.mkdir(q)
                with open(d + "/" + name, "wb") as o:
                    while n:
                        r = f.readinto(mv[: min(512, n)])
                        if not r:
                            raise ValueError("firmware archive truncated in %s" % name)
                        o.write(mv[:r])
                        n -= r
        if not self._has_code(slot):
            raise ValueError("firmware archive without the csc package")


def mount(path, blocks=256):
    # The stubs type the device as vfs.AbstractBlockDev, a class that exists only in the docs
    # (the port has no such name): the VFS takes any object with this interface.
    bd = FileBlockDev(path, blocks=blocks)
    try:
        vfs.mount(vfs.VfsLfs2(bd), "/flash")  # type: ignore[arg-type]
    except OSError:
        vfs.VfsLfs2.mkfs(bd)  # type: ignore[arg-type]
        vfs.mount(vfs.VfsLfs2(bd), "/flash")  # type: ignore[arg-type]
    return bd


def _args(argv):
    a = {}
    i = 1
    while i < len(argv):
        if argv[i].startswith("--") and i + 1 < len(argv):
            a[argv[i][2:]] = argv[i + 1]
            i += 2
        else:
            i += 1
    return a


def _jsonable(d):
    if isinstance(d, dict):
        return {str(k): _jsonable(d[k]) for k in d}
    if isinstance(d, (list, tuple)):
        return [_jsonable(x) for x in d]
    if isinstance(d, (bytes, bytearray)):
        return d.hex()
    return d


_TYPING = const(0)  # never true (the compiler drops the block): the name App, for mypy only
if _TYPING:
    from csc.app import App

# The control channel's state, set at boot: globals of this module (the emulated board's entry,
# imported before heap_start) rather than the attributes of an object built after it, which would
# take an instance and its attribute table (48 B) in the figures for the board's life.
_app: App = None  # the firmware; `_app.hal` is the simulated hardware (boards/sim.py)
_meter = None  # the file of the meters' registers (`--meter`), or None
_peak = 0  # the largest heap after gc seen (the footprint scenario): sampled every 250 ms and at the reboot


def note(kind, data=None):
    """An event on stdout, as JSON; the firmware's `note` too, which reports the peak at its reboot."""
    global _peak
    if kind == "reboot" and _app is not None:  # the last peak, for the footprint scenario
        gc.collect()
        _peak = max(_peak, gc.mem_alloc())
        data = {"peak": _peak}
    d = {"ev": kind}
    if data:
        for k in data:
            d[k] = _jsonable(data[k])
    print(json.dumps(d))


def _meter_save():
    if _meter:
        # a real meter keeps its register through a power cut: written beside, then renamed
        # over, so that a kill in the middle leaves the last register, never an empty file
        tmp = _meter + ".tmp"
        with open(tmp, "w") as f:
            for e in _app.hal.e:
                f.write("%f %f " % (e.wh_in, e.wh_out))
        os.rename(tmp, _meter)


# The emulated board's two tasks: a coroutine's frame is heap for the board's life, 48 B with up to
# 5 slots of locals and stack, 64 B with up to 9.
async def run():
    """The control channel: line-oriented JSON commands on stdin, the test's hands on the board."""
    from csc.app import wait_io  # asyncio's I/O queue: no asyncio.stream module (heap)

    while True:
        await wait_io(sys.stdin, 0)
        if not take():
            return


def take():
    """One command: False at the end of stdin; one that fails is reported and the channel goes
    on. (Not in `run`: the line and a try block, which keeps room for its handler, would widen
    the coroutine's frame to 64 B for the board's life; this frame ends with the line.)"""
    line = sys.stdin.readline()  # a whole line (stdin blocks), as asyncio's StreamReader reads it
    if not line:
        return False
    try:
        do(json.loads(line))
    except Exception as e:
        note("control_error", {"what": repr(e)})
    return True


async def meter_task():
    global _peak
    import asyncio

    last = -1.0
    while True:
        await asyncio.sleep_ms(250)
        # the meters' work in the task itself, before the collection (64 B of frame, not 48):
        # measured with it in a function of its own, the footprint's peak came out 0.9 KiB
        # higher in a third of the runs, a firmware chunk the link had just handled kept by a
        # stale pointer in this task's frame on the C stack, which the GC scans as it finds it
        hal = _app.hal
        hal.meter(1)  # a reading integrates every meter up to now
        wh = sum(e.wh_in for e in hal.e)  # not a loop: its variables would widen this frame
        if wh != last:
            last = wh
            _meter_save()
        gc.collect()
        _peak = max(_peak, gc.mem_alloc())


def do(c):
    global _peak
    # constants, inlined by the build; imported here, not above: csc only after Slots.select()
    from csc.hal import FLAG_BUTTON, FLAG_CARD, FLAG_CP

    cmd = c.get("cmd")
    app = _app
    hal = app.hal
    n = c.get("evse", 1)  # the EVSE the EV (or the card, when given) is at
    if cmd in ("plug", "unplug", "ready") and not 1 <= n <= hal.evses:
        note("control_error", {"what": "no evse %s on this board" % n})
    elif cmd in ("plug", "unplug", "ready"):  # the EV at EVSE n: a control-pilot edge
        # straight on the simulated hardware (boards/sim.py), as an EV would change it
        hal.meter(n)  # a reading integrates the meters up to the change
        e = hal.e[n - 1]
        if cmd == "plug":
            e.plugged = True
            e.ready = c.get("ready", True)
            e.max_w = c.get("max_w", 11000)
            e.v2g = c.get("v2g", False)
            e.needs = c.get("needs")
        elif cmd == "unplug":
            e.plugged = False
        else:
            e.ready = c.get("on", True)
        hal.flags |= FLAG_CP
    elif cmd == "button":  # the emergency stop button
        hal.flags |= FLAG_BUTTON
    elif cmd == "ev_ocsp":  # the EV asks for the OCSP response of a certificate (M15)
        app.security().ocsp_to_ev(bytes.fromhex(c["hash"]))
    elif cmd == "ev_cert":  # the EV asks for a contract certificate (ISO 15118)
        app.security().ev_certificate(bytes.fromhex(c["exi"]), c.get("action", 0))
    elif cmd == "card":  # at the reader of EVSE `evse`; without it at the board's shared reader
        tok = c["token"]
        tok = tok.encode() if isinstance(tok, str) else bytes(tok)
        r = c.get("evse", 0)  # 0: the board's one card reader, shared by its EVSEs; n: EVSE n's
        hal.card = (tok, c.get("type", 0), r) if r else (tok, c.get("type", 0))
        hal.flags |= FLAG_CARD
    elif cmd == "freq":
        hal.freq = c["mhz"]
    elif cmd == "temp":
        hal.temp = c["dc"]
    elif cmd == "step":
        # the board's clock steps: its monotonic ticks, and with them its wall clock (App.time()
        # counts from the ticks since the last time sync), by `ms` once
        hal.skew_ms += c["ms"]
        hal.meter(1)  # a reading integrates the meters over the step
        _meter_save()  # the registers jumped: kept at once, as a real meter keeps each Wh
    elif cmd == "tick":
        app.tick()
    elif cmd == "emit":  # test helper: n durable telemetry events, numbered from `from`
        from csc.msgpack import Map
        from csc.outbox import BILLING
        from csc.schema import A_METER_VALUES, F_ENERGY_WH, F_EVSE, F_TIME

        for i in range(c.get("n", 1)):
            b = Map()
            b[F_EVSE] = 1
            b[F_ENERGY_WH] = c.get("from", 0) + i
            b[F_TIME] = app.time()
            app.emit(A_METER_VALUES, b, c.get("cls", BILLING))
    elif cmd == "fill":  # occupy flash with a junk file (full-flash tests)
        with open("/flash/junk", "ab") as f:
            z = bytes(1024)
            try:
                for _ in range(c.get("kb", 10000)):
                    f.write(z)
                    f.flush()
            except OSError:
                pass
        note("filled")
    elif cmd == "unfill":
        os.remove("/flash/junk")
    elif cmd == "log":
        app.log(c.get("text", "x") * c.get("n", 1))
    elif cmd == "status":
        # every EVSE's figures under `evses`: the simulated hardware's (boards/sim.py), then
        # the firmware's; EVSE 1's at the top level too (as for a board with one EVSE)
        d = {}
        evses: list = []
        for e in app.tx.e:
            h = hal.e[e.n - 1]
            e_in, e_out, p, _, _ = hal.meter(e.n)
            y = {"cp": hal.cp_state(e.n), "contactor": h.contactor, "limit_w": h.limit_w, "power_w": p,
                 "wh_in": e_in, "wh_out": e_out, "locked": h.locked}  # fmt: skip
            if not evses:
                d.update(y)
            y["tx_id"] = e.tx.id if e.tx else None
            y["svc"] = e.svc
            y["hw_limit"] = e.hw_limit
            y["charging_state"] = e.state
            y["status"] = e.status
            evses.append(y)
        e = app.tx.e[0]
        d["tx_id"] = e.tx.id if e.tx else None
        d["svc"] = e.svc
        d["charging_state"] = e.state
        d["evses"] = evses
        d["text"] = hal.text
        d["freq"] = hal.freq
        d["online"] = app.online
        d["registered"] = app.registered
        d["outbox"] = len(app.outbox)
        d["outbox_refused"] = app.outbox.refused
        d["bad"] = sum(app.link.errors.values())
        d["errors"] = app.link.errors
        d["urgent_max_ms"] = app.link.urgent_max_ms
        d["hw_limit"] = app.tx.hw_limit
        d["time"] = app.time()
        # what the rarer features handed the board: attributes once they did (boards/sim.py)
        for k, a in (("exi", "exi"), ("ev_ocsp", "ocsp"), ("se_key", "se_key")):
            v = getattr(hal, a, None)
            d[k] = v.hex() if v else None
        d["operative"] = app.station.operative
        d["estop"] = app.station.estop
        d["version"] = app.version
        d["slot"] = app.slots.running
        d["sec_loaded"] = "csc.services.security" in sys.modules  # the certificate service is built on first use
        d["modules"] = [m for m in sys.modules if m.startswith("csc.")]  # on-demand ones come and go
        gc.collect()
        d["mem_alloc"] = gc.mem_alloc()
        d["mem_free"] = gc.mem_free()
        d["peak"] = _peak
        note("status", d)
    elif cmd == "se":  # the host's simulated secure element (tools/board/runner.py): its CSR
        # kept where the chip keeps it, outside the board's heap (224 B there for the board's
        # life): a file beside the flash image, read when the firmware asks (SimHal.csr)
        p = _args(sys.argv).get("flash", "board.img") + ".se"
        with open(p, "wb") as f:
            f.write(bytes.fromhex(c["csr"]))
        hal.se = p
    elif cmd == "probe":  # the invariants' sampler (tools/site/invariants.py): small, no gc pass
        # the board's total power, a transaction when any EVSE has one, any contactor closed;
        # with several EVSEs each one's [power, transaction] under "e"
        tx = None
        on = False
        for e in app.tx.e:
            tx = tx or (e.tx.id if e.tx else None)
            on = on or hal.e[e.n - 1].contactor
        d = {"p": sum(h.power() for h in hal.e), "tx": tx, "c": on, "r": app.registered}
        if hal.evses > 1:
            d["e"] = [[hal.e[e.n - 1].power(), e.tx.id if e.tx else None] for e in app.tx.e]
        note("probe", d)
    elif cmd == "reset_peak":
        gc.collect()
        _peak = gc.mem_alloc()
    elif cmd == "heapprof":  # where the heap goes (tools/board/heapprof.py): the image's C module
        try:
            import heapprof  # type: ignore[import-not-found]  # a C module of the image (tools/board/cmodules)
        except ImportError:
            note("control_error", {"what": "no heapprof: the board image has it, not this build"})
        else:
            heapprof.dump(True)  # with the words: who holds what
    elif cmd == "quit":
        sys.exit(0)
    else:
        note("control_error", {"what": "unknown command %s" % cmd})


def _boot(a):
    """Power-up up to the firmware's imports: the flash mounted, the loader's choice made, csc
    imported, the simulated hardware built (`a`: the command line's arguments); returns (hal,
    slots). A function of its own, not main()'s body: main()'s frame lasts as long as the board
    runs (a frame of more than 11 slots is a heap block, and the GC keeps what its slots still
    point to: the strings split from the arguments, the meter file's words, the exception caught
    when there is none yet), where this one ends before the figures are taken."""
    global _meter
    mount(a.get("flash", "board.img"), int(a.get("blocks", "256")))
    signers = {}
    for kv in a.get("fw-signers", "").split(","):
        if "=" in kv:
            signers[kv.split("=")[0]] = bytes.fromhex(kv.split("=")[1])
    slots = Slots("/flash", signers)
    slots.select()  # before the first import of csc: the slot's package shadows the factory's
    import asyncio  # noqa: F401 — every module the board runs, imported before the figure after imports

    from boards.sim import SimHal
    from csc import store
    from csc.app import App  # noqa: F401
    from csc.services import (  # noqa: F401
        admin,
        auth,
        config,
        firmware_update,
        smart_charging,
        station,
        transactions,
    )

    store.ROOT = "/flash"
    hal = SimHal(int(a.get("evses", "1")))
    _meter = a.get("meter")
    if _meter:
        try:
            with open(_meter) as f:
                w = f.read().split()
            for i, e in enumerate(hal.e):
                e.wh_in = float(w[2 * i])
                e.wh_out = float(w[2 * i + 1])
        except (OSError, IndexError, ValueError):
            pass
    hal.meter_keys = a.get("meter-keys")  # the meters' chips: read when a meter seals a reading
    return hal, slots


def main():
    global _app, _peak
    a = _args(sys.argv)  # before heap_start, as the command line it is read from: not in the figures
    gc.threshold(4096)  # as main.py does on a board: see there
    gc.collect()
    m0 = gc.mem_alloc()
    hal, slots = _boot(a)
    import asyncio

    from csc.app import App

    host, port = a.get("gw", "127.0.0.1:7700").split(":")
    gateway = (host, int(port))
    port = None  # the one string here App does not keep: main()'s frame lasts as long as the board runs
    fk = bytes.fromhex(a.get("factory-key", "00" * 32))
    gc.collect()
    m1 = gc.mem_alloc()
    app = App(hal, a.get("id", "evse-1"), fk, gateway, note, slots)
    gc.collect()
    m2 = gc.mem_alloc()
    _app = app
    _peak = m2
    m = sys.maxsize  # 2**31 - 1 on the 32-bit board image, 2**63 - 1 on the 64-bit unix port
    note("boot", {"heap_start": m0, "heap_imports": m1, "heap_boot": m2, "heap_free": gc.mem_free(), "maxsize": m,
                  "slot": slots.running, "version": app.version})  # fmt: skip
    # two statements: the argument of the second call overwrites the slot of main()'s stack (its
    # frame lasts as long as the board runs) in which the first left the tuple of the two tasks
    coro = app.main((run(), meter_task()))
    asyncio.run(coro)


main()
