"""The emulated board: the firmware on the MicroPython unix port.

    micropython -X heapsize=96k firmware/boards/unix.py --flash board.img --gw 127.0.0.1:7700 \
        --id evse-1 --factory-key <64 hex> [--blocks 256] [--meter meter.txt] [--evses 1]

- Flash: `FileBlockDev` makes the image file a block device (4 KiB blocks) for
  `vfs.VfsLfs2`, mounted at /flash (formatted on first use). Every block write reaches
  the file before the call returns, so `kill -9` of the process is a power cut.
- HAL: boards.sim.SimHal with `--evses` EVSEs (default 1); the meters' registers live in the
  `--meter` file (a meter keeps its register across a power cut, as a real one does): import
  and export of EVSE 1, then of EVSE 2, ….
- Control channel: one JSON object per line on stdin (commands), one per line on stdout
  (what the board did: {"ev": "...", ...}); see tools/board/ and docs/firmware.md.
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

import gc
import json
import os
import sys

import vfs

if "" not in sys.path:
    sys.path.append("")


class FileBlockDev:
    """A file standing for the board's flash: LittleFS2 block device, extended interface."""

    def __init__(self, path, block_size=4096, blocks=256):
        self.bs = block_size
        self.n = blocks
        try:
            self.f = open(path, "r+b")  # noqa: SIM115 — open for the board's life
        except OSError:
            self.f = open(path, "w+b")  # noqa: SIM115
            z = bytes(block_size)
            for _ in range(blocks):
                self.f.write(z)
            self.f.flush()

    def readblocks(self, block, buf, off=0):
        self.f.seek(block * self.bs + off)
        self.f.readinto(buf)

    def writeblocks(self, block, buf, off=None):
        self.f.seek(block * self.bs + (off or 0))
        self.f.write(buf)
        self.f.flush()

    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return self.bs
        if op == 6:  # erase: LittleFS never needs the bytes cleared on a file
            return 0
        return None


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


def note(kind, data=None):
    d = {"ev": kind}
    if data:
        for k in data:
            d[k] = _jsonable(data[k])
    print(json.dumps(d))


class Control:
    """Line-oriented JSON commands on stdin: the test's hands on the simulated board."""

    def __init__(self, app, hal, meter_path):
        self.app = app
        self.hal = hal
        self.meter_path = meter_path
        self.peak = 0

    def _meter_save(self):
        if self.meter_path:
            with open(self.meter_path, "w") as f:
                for e in self.hal.e:
                    f.write("%f %f " % (e.wh_in, e.wh_out))

    async def run(self):
        from csc.app import wait_io  # asyncio's I/O queue: no asyncio.stream module (heap)

        i = sys.stdin
        while True:
            await wait_io(i, 0)
            line = i.readline()  # a whole line (stdin blocks), as asyncio's StreamReader reads it
            if not line:
                return
            try:
                c = json.loads(line)
                self.do(c)
            except Exception as e:
                note("control_error", {"what": repr(e)})

    async def meter_task(self):
        import asyncio

        last = -1.0
        while True:
            await asyncio.sleep_ms(250)
            self.hal.update()
            wh = 0.0
            for e in self.hal.e:
                wh += e.wh_in
            if wh != last:
                last = wh
                self._meter_save()
            gc.collect()
            m = gc.mem_alloc()
            self.peak = max(self.peak, m)

    def do(self, c):
        cmd = c.get("cmd")
        hal = self.hal
        app = self.app
        n = c.get("evse", 1)  # the EVSE the EV (or the card, when given) is at
        if cmd in ("plug", "unplug", "ready") and not 1 <= n <= hal.evses:
            note("control_error", {"what": "no evse %s on this board" % n})
        elif cmd == "plug":
            hal.plug(c.get("ready", True), c.get("max_w", 11000), c.get("v2g", False), c.get("needs"), n)
        elif cmd == "ready":
            hal.ready(c.get("on", True), n)
        elif cmd == "button":  # the emergency stop button
            from csc.hal import FLAG_BUTTON

            hal.flags |= FLAG_BUTTON
        elif cmd == "ev_cert":  # the EV asks for a contract certificate (ISO 15118)
            app.security().ev_certificate(bytes.fromhex(c["exi"]), c.get("action", 0))
        elif cmd == "unplug":
            hal.unplug(n)
        elif cmd == "card":  # at the reader of EVSE `evse`; without it at the board's shared reader
            tok = c["token"]
            hal.present(tok.encode() if isinstance(tok, str) else bytes(tok), c.get("type", 0), c.get("evse", 0))
        elif cmd == "freq":
            hal.freq = c["mhz"]
        elif cmd == "temp":
            hal.temp = c["dc"]
        elif cmd == "step":
            hal.step(c["ms"])
            app._t_s += c["ms"] // 1000
            self._meter_save()  # the registers jumped: kept at once, as a real meter keeps each Wh
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
            d = hal.status()
            for i, e in enumerate(app.tx.e):  # EVSE 1's at the top level too (hal.status())
                x = d["evses"][i]
                x["tx_id"] = e.tx.id if e.tx else None
                x["svc"] = e.svc
                x["hw_limit"] = e.hw_limit
                x["charging_state"] = e.state
                x["status"] = e.status
            e = app.tx.e[0]
            d["tx_id"] = e.tx.id if e.tx else None
            d["svc"] = e.svc
            d["online"] = app.online
            d["registered"] = app.registered
            d["outbox"] = len(app.outbox)
            d["outbox_refused"] = app.outbox.refused
            d["bad"] = app.link.bad
            d["errors"] = app.link.errors
            d["urgent_max_ms"] = app.link.urgent_max_ms
            d["hw_limit"] = app.tx.hw_limit
            d["time"] = app.time()
            d["exi"] = hal.exi.hex() if hal.exi else None
            d["se_key"] = hal.se_key.hex() if hal.se_key else None
            d["operative"] = app.station.operative
            d["estop"] = app.station.estop
            d["charging_state"] = e.state
            d["sec_loaded"] = app.sec is not None  # the certificate service is built on first use
            d["modules"] = [m for m in sys.modules if m.startswith("csc.")]  # on-demand ones come and go
            gc.collect()
            d["mem_alloc"] = gc.mem_alloc()
            d["mem_free"] = gc.mem_free()
            d["peak"] = self.peak
            note("status", d)
        elif cmd == "se":  # the host's simulated secure element (tools/board/runner.py): its CSR
            hal.se_csr = bytes.fromhex(c["csr"])
        elif cmd == "probe":  # the invariants' sampler (tools/site/invariants.py): small, no gc pass
            # the board's total power, a transaction when any EVSE has one, any contactor closed;
            # with several EVSEs each one's [power, transaction] under "e"
            tx = None
            on = False
            for e in app.tx.e:
                tx = tx or (e.tx.id if e.tx else None)
                on = on or hal.e[e.n - 1].contactor
            d = {"p": hal.power(), "tx": tx, "c": on, "r": app.registered}
            if hal.evses > 1:
                d["e"] = [[hal.power(e.n), e.tx.id if e.tx else None] for e in app.tx.e]
            note("probe", d)
        elif cmd == "reset_peak":
            gc.collect()
            self.peak = gc.mem_alloc()
        elif cmd == "quit":
            sys.exit(0)
        else:
            note("control_error", {"what": "unknown command %s" % cmd})


def main():
    a = _args(sys.argv)
    gc.threshold(4096)  # as main.py does on a board: see there
    gc.collect()
    m0 = gc.mem_alloc()
    mount(a.get("flash", "board.img"), int(a.get("blocks", "256")))
    import asyncio

    from boards.sim import SimHal
    from csc import store
    from csc.app import App
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
    mp = a.get("meter")
    if mp:
        try:
            with open(mp) as f:
                w = f.read().split()
            for i, e in enumerate(hal.e):
                e.wh_in = float(w[2 * i])
                e.wh_out = float(w[2 * i + 1])
        except (OSError, IndexError, ValueError):
            pass
    host, port = a.get("gw", "127.0.0.1:7700").split(":")
    fk = bytes.fromhex(a.get("factory-key", "00" * 32))
    gc.collect()
    m1 = gc.mem_alloc()
    ctl = None

    def board_note(kind, data=None):
        if kind == "reboot" and ctl is not None:  # the last peak, for the footprint scenario
            gc.collect()
            ctl.peak = max(ctl.peak, gc.mem_alloc())
            data = {"peak": ctl.peak}
        note(kind, data)

    app = App(hal, a.get("id", "evse-1"), fk, (host, int(port)), board_note)
    gc.collect()
    m2 = gc.mem_alloc()
    ctl = Control(app, hal, mp)
    ctl.peak = m2
    m = sys.maxsize  # 2**31 - 1 on the 32-bit board image, 2**63 - 1 on the 64-bit unix port
    note("boot", {"heap_start": m0, "heap_imports": m1, "heap_boot": m2, "heap_free": gc.mem_free(), "maxsize": m})
    asyncio.run(app.main((ctl.run(), ctl.meter_task())))


main()
