"""The board image: `python -m tools.board.image [--force] [--path]`.

MicroPython's unix port built 32-bit (`gcc -m32`: 4-byte pointers, 16-byte GC blocks, as on a
microcontroller) with the firmware frozen in (bytecode, qstrs and constant tables in the executable,
as in a board's flash; only module dicts, class and function objects and the working set take heap).
What it freezes is tools/board/manifest_unix.py: firmware/manifest.py as a real board freezes it (the
output of `tools.board.build --py`: constants inlined; the port's own modules such as asyncio), plus
the emulated board's own boards/unix.py and boards/sim.py, which a real board's manifest leaves out.
The emulated board (tools/board/runner.py `Board`) runs on it by default.

Cached by the hash of its inputs — the MicroPython source (tarball hash or checkout identity), the
firmware (its sources and the build's rewrite), the manifests, the make flags and the compiler's
version — in `.venv/board-image/<hash>/` (`micropython`, `info.json` with the inputs and the frozen
sizes), rebuilt only when an input changes. A build runs under a lock (parallel users wait for it, then
take it), in a temporary folder renamed into place once complete: an interrupted build leaves no image
that could be taken for a good one (its leftovers are removed by the next build).

The source, in this order: `EVEDGE_MICROPY_SRC` (a tarball or a checkout), the vendored tarball
`<checkout>/../shared/vendor/micropython-1c3c201149.tar.xz` (or in `shared/vendor/` beside a folder
further up, or up from the virtualenv), else a download of the pinned commits
from GitHub (kept in the cache). Needs `make` and a C compiler that links 32-bit programs (Debian:
gcc-multilib; tools/setup.sh installs it where it can).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import build

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON_COMMIT = "1c3c201149f37fe8d81246191b3127bb198d6306"
AXTLS_COMMIT = "531cab9c278c947d268bd4c94ecab9153a961b43"  # lib/axtls, the submodule at that commit
TARBALL = "micropython-1c3c201149.tar.xz"
VENDORED = ROOT.parent / "shared" / "vendor" / TARBALL  # beside the checkout (see vendored())
DOWNLOADS = {  # what the download fetches: GitHub's archives of the pinned commits
    "micropython": f"https://codeload.github.com/micropython/micropython/tar.gz/{MICROPYTHON_COMMIT}",
    "lib/axtls": f"https://codeload.github.com/micropython/axtls/tar.gz/{AXTLS_COMMIT}",
}
MANIFEST = Path(__file__).with_name("manifest_unix.py")
# C modules built into the emulated board's image only: the heap profiler (tools/board/heapprof.py)
CMODULES = Path(__file__).with_name("cmodules")
FW_MANIFEST = build.FIRMWARE / "manifest.py"
CC = "gcc -m32"
MAKE_FLAGS = (
    "VARIANT=standard",
    f"CC={CC}",
    "MICROPY_PY_FFI=0",  # no libffi for 32-bit here, and the firmware needs none
    "MICROPY_PY_BTREE=0",  # berkeley-db is not vendored
    "MICROPY_SSL_AXTLS=1",  # cryptolib (AES) from axtls: mbedtls is not vendored
    "MICROPY_SSL_MBEDTLS=0",
    "MPY_CROSS_FLAGS=-march=x86",  # csc/sha256.py is viper: native code for the image's CPU
)
# What the build takes from a checkout (the vendored tarball holds the same subset).
SOURCE_DIRS = ("py", "extmod", "shared", "mpy-cross", "tools", "ports/unix")
SOURCE_LIBS = ("littlefs", "uzlib", "re1.5", "libm", "libm_dbl", "crypto-algorithms", "mbedtls_errors", "oofatfs")
SOURCE_LIBS_ALSO = ("axtls",)  # a submodule of its own (AXTLS_COMMIT)
RECIPE = "1"  # bump when this file changes how an image is built (its inputs are hashed, not this file)
KEEP = 3  # images kept in the cache
JOBS = "-j2"


class ImageError(Exception):
    """The image cannot be built here; the message says what is missing."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n(the emulated boards can run on the 64-bit build instead: EVEDGE_BOARD=bytecode)"


def cache_dir() -> Path:
    return Path(os.environ.get("EVEDGE_BOARD_IMAGE_CACHE") or ROOT / ".venv" / "board-image")


# ---------------------------------------------------------------- inputs


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source() -> tuple[str, Path | None]:
    """(identity, path) of the MicroPython source: a tarball or a checkout; path None: a download."""
    given = os.environ.get("EVEDGE_MICROPY_SRC")
    if given:
        p = Path(given).expanduser().resolve()
        if p.is_dir():
            return f"checkout:{_checkout_identity(p)}", p
        if p.is_file():
            return f"tarball:{_sha256_file(p)}", p
        raise ImageError(f"EVEDGE_MICROPY_SRC={given}: no such tarball or checkout")
    tarball = vendored()
    if tarball is not None:
        return f"tarball:{_sha256_file(tarball)}", tarball
    return f"download:{MICROPYTHON_COMMIT}+axtls:{AXTLS_COMMIT}", None


def vendored() -> Path | None:
    """The vendored tarball: `shared/vendor/` beside the checkout, or beside a folder above it or above
    the virtualenv (a worktree elsewhere that uses the main checkout's .venv)."""
    for base in (ROOT, Path(sys.prefix).resolve()):
        for folder in base.parents:
            p = folder / "shared" / "vendor" / TARBALL
            if p.is_file():
                return p
    return None


def _checkout_identity(src: Path) -> str:
    """A git checkout: its commit and the hash of its uncommitted changes (and of lib/axtls's); any
    other folder: the names, sizes and times of the files the build takes."""
    if not (src / "py" / "mpconfig.h").is_file() or not (src / "ports" / "unix").is_dir():
        raise ImageError(f"EVEDGE_MICROPY_SRC={src}: not a MicroPython source tree (no py/mpconfig.h, ports/unix)")

    def git(d: Path, *args: str) -> bytes:
        return subprocess.run(["git", "-C", str(d), *args], check=True, capture_output=True).stdout

    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        h = hashlib.sha256()
        for d in (src, src / "lib" / "axtls"):
            h.update(git(d, "rev-parse", "HEAD") + git(d, "status", "--porcelain") + git(d, "diff", "HEAD"))
        return "git:" + h.hexdigest()
    h = hashlib.sha256()
    for rel in (*SOURCE_DIRS, *(f"lib/{lib}" for lib in (*SOURCE_LIBS, *SOURCE_LIBS_ALSO))):
        for p in sorted((src / rel).rglob("*")):
            if p.is_file() and "/build" not in str(p.relative_to(src)):
                st = p.stat()
                h.update(f"{p.relative_to(src)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "tree:" + h.hexdigest()


def firmware_identity() -> str:
    """The firmware as frozen: the build's rewrite (tools/board/build.py) of the sources it reads."""
    h = hashlib.sha256(Path(build.__file__).read_bytes())
    for p in build.sources():
        h.update(str(p.relative_to(build.FIRMWARE)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def compiler() -> str:
    try:
        r = subprocess.run([*CC.split(), "--version"], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "missing"
    return r.stdout.splitlines()[0] if r.stdout else "unknown"


def inputs() -> dict[str, str]:
    return {
        "recipe": RECIPE,
        "micropython": source()[0],
        "firmware": firmware_identity(),
        "manifests": hashlib.sha256(MANIFEST.read_bytes() + b"\0" + FW_MANIFEST.read_bytes()).hexdigest(),
        "make": " ".join(MAKE_FLAGS),
        "cmodules": _tree_hash(CMODULES),
        "compiler": compiler(),
    }


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def image_hash(ins: dict[str, str] | None = None) -> str:
    return hashlib.sha256(json.dumps(ins or inputs(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the cache


def cached(h: str | None = None) -> Path | None:
    """The image's executable for the current inputs if it is built, else None."""
    exe = cache_dir() / (h or image_hash()) / "micropython"
    return exe if exe.is_file() else None


def info(exe: Path) -> dict[str, Any]:
    """What `info.json` beside an image's executable says (its inputs, the frozen sizes)."""
    data: dict[str, Any] = json.loads((exe.parent / "info.json").read_text())
    return data


@contextlib.contextmanager
def _lock(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("board image: waiting for another build of it", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def built(force: bool = False, quiet: bool = False) -> Path:
    """The image's executable for the current inputs: from the cache, or built once (under a lock:
    a parallel caller waits for the build and takes its result)."""
    ins = inputs()
    h = image_hash(ins)
    exe = cached(h)
    if exe is not None and not force:
        return exe
    cache = cache_dir()
    with _lock(cache):
        exe = cached(h)
        if exe is not None and not force:
            return exe
        for p in cache.glob(".build-*"):  # what an interrupted build left (nobody else builds: we hold the lock)
            shutil.rmtree(p, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".build-"))
        try:
            out = _build(tmp, ins, h, quiet)
            final = cache / h
            if final.exists():  # --force
                shutil.rmtree(final)
            out.chmod(0o755)  # a temporary folder is private: the image is for every user of the checkout
            os.rename(out, final)  # atomic: the image appears complete or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        images = [p for p in cache.iterdir() if re.fullmatch(r"[0-9a-f]{16}", p.name) and p.is_dir()]
        old = sorted(images, key=lambda p: p.stat().st_mtime)
        for p in old[:-KEEP]:
            if p.name != h:
                shutil.rmtree(p, ignore_errors=True)
    return cache / h / "micropython"


# ---------------------------------------------------------------- the build


def check_toolchain() -> None:
    """`make` and a compiler that links a 32-bit program, or ImageError naming what is missing."""
    if shutil.which("make") is None:
        raise ImageError("`make` is missing (Debian: apt-get install make)")
    with tempfile.TemporaryDirectory() as d:
        c = Path(d) / "t.c"
        c.write_text("int main(void) { return 0; }\n")
        try:
            r = subprocess.run(
                [*CC.split(), str(c), "-o", str(Path(d) / "t")], check=False, capture_output=True, text=True
            )
        except OSError:
            raise ImageError("`gcc` is missing (Debian: apt-get install gcc gcc-multilib)") from None
        if r.returncode != 0:
            raise ImageError(
                f"`{CC}` cannot link a 32-bit program (Debian: apt-get install gcc-multilib):\n{r.stderr.strip()}"
            )


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"board image: {msg}", file=sys.stderr, flush=True)


def _extract(tarball: Path, into: Path) -> Path:
    """Unpack a MicroPython tarball; its root (the folder holding py/)."""
    with tarfile.open(tarball) as t:
        t.extractall(into, filter="data")
    roots = [p.parent.parent for p in into.glob("*/py/mpconfig.h")]
    if len(roots) != 1:
        raise ImageError(f"{tarball}: not a MicroPython source tarball (no <root>/py/mpconfig.h)")
    return roots[0]


def _download(into: Path, quiet: bool) -> Path:
    """The pinned commits from GitHub (kept in the cache for the next build)."""
    keep = cache_dir() / "downloads"
    keep.mkdir(parents=True, exist_ok=True)
    got: dict[str, Path] = {}
    for name, url in DOWNLOADS.items():
        dst = keep / (url.rsplit("/", 1)[1] + ".tar.gz")
        if not dst.is_file():
            _say(quiet, f"downloading {url}")
            part = dst.with_suffix(".part")
            try:
                with urllib.request.urlopen(url, timeout=60) as r, part.open("wb") as f:
                    shutil.copyfileobj(r, f)
            except OSError as e:
                raise ImageError(
                    f"no MicroPython source: no EVEDGE_MICROPY_SRC, no shared/vendor/{TARBALL} beside the checkout "
                    f"({VENDORED}), and the download of {url} failed ({e})"
                ) from None
            os.replace(part, dst)
        got[name] = dst
    with tarfile.open(got["micropython"]) as t:
        t.extractall(into / "mp", filter="data")
    root = next((into / "mp").iterdir())
    axtls = root / "lib" / "axtls"
    shutil.rmtree(axtls, ignore_errors=True)
    with tarfile.open(got["lib/axtls"]) as t:
        t.extractall(into / "ax", filter="data")
    shutil.move(next((into / "ax").iterdir()), axtls)
    return root


def _copy_checkout(src: Path, into: Path) -> Path:
    root = into / "micropython"
    for rel in SOURCE_DIRS:
        shutil.copytree(src / rel, root / rel, ignore=shutil.ignore_patterns(".git", "build", "build-*"), symlinks=True)
    for lib in (*SOURCE_LIBS, *SOURCE_LIBS_ALSO):
        if (src / "lib" / lib).is_dir():
            shutil.copytree(src / "lib" / lib, root / "lib" / lib, ignore=shutil.ignore_patterns(".git"), symlinks=True)
    return root


def _prepare_source(tmp: Path, quiet: bool) -> Path:
    _, path = source()
    if path is None:
        return _download(tmp / "src", quiet)
    _say(quiet, f"source {path}")
    if path.is_dir():
        return _copy_checkout(path, tmp / "src")
    return _extract(path, tmp / "src")


def _make(args: list[str], quiet: bool, env: dict[str, str], log: Path) -> None:
    with log.open("a") as f:
        f.write(f"$ make {' '.join(args)}\n")
        f.flush()
        r = subprocess.run(["make", *args], stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if r.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise ImageError(f"make {args[1] if len(args) > 1 else ''} failed:\n{tail}")


def _frozen_sizes(mp: Path, fw: Path, env: dict[str, str]) -> dict[str, Any]:
    """What goes to flash: mpy-tool's byte sizes of the frozen content (qstrs, bytecode, constants,
    raw-code structs), for what firmware/manifest.py freezes alone (a real board's firmware, without
    the port's own modules) and for everything the image freezes."""
    bdir = mp / "ports" / "unix" / "build-standard"
    # the files firmware/manifest.py freezes, as MicroPython's manifest tool lists them (the port's own
    # manifest replaced by an empty one)
    probe = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(mp / 'tools')!r})\n"
        "import manifestfile as m\n"
        "f = m.ManifestFile(m.MODE_FREEZE, {'MPY_DIR': sys.argv[1]})\n"
        "f.execute('include(%r, port_manifest=%r)' % (sys.argv[2], sys.argv[3]))\n"
        "print(json.dumps([r.target_path for r in f.files()]))\n"
    )
    empty = fw.parent / "empty_manifest.py"
    empty.write_text("")
    r = subprocess.run(
        [sys.executable, "-c", probe, str(mp), str(FW_MANIFEST), str(empty)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    fw_files = [bdir / "frozen_mpy" / (t[:-3] + ".mpy") for t in json.loads(r.stdout)]
    all_files = sorted((bdir / "frozen_mpy").rglob("*.mpy"))

    def stats(files: list[Path]) -> dict[str, int]:
        out = subprocess.run(
            [sys.executable, str(mp / "tools" / "mpy-tool.py"), "-f", "-q",
             str(bdir / "genhdr" / "qstrdefs.preprocessed.h"), *map(str, files)],
            check=True, capture_output=True, text=True, env=env,
        ).stdout  # fmt: skip
        summary = out[out.rindex("byte sizes:") :]
        d: dict[str, int] = {"modules": len(files), "mpy_bytes": sum(p.stat().st_size for p in files)}
        for key, pat in (
            ("qstr_bytes", r"qstr content: \d+ unique, (\d+) bytes"),
            ("qstrs", r"qstr content: (\d+) unique"),
            ("bytecode_bytes", r"bc content: (\d+)"),
            ("total_bytes", r"total: (\d+)"),
        ):
            m = re.search(pat, summary)
            assert m is not None, summary
            d[key] = int(m.group(1))
        return d

    missing = [p for p in fw_files if not p.is_file()]
    if missing:
        raise ImageError(f"the build froze no {missing[0]}")
    return {"firmware": stats(fw_files), "image": stats(all_files)}


def _build(tmp: Path, ins: dict[str, str], h: str, quiet: bool) -> Path:
    check_toolchain()
    t0 = time.monotonic()
    mp = _prepare_source(tmp, quiet)
    (mp / "lib" / "micropython-lib").mkdir(parents=True, exist_ok=True)  # the manifest tool checks for it
    (mp / "lib" / "micropython-lib" / "README.md").touch()
    fw = tmp / "fw"
    build.build(fw, py=True)  # the firmware with its constants inlined, as a board freezes it
    env = {**os.environ, "EVEDGE_FW": str(fw)}
    env.pop("MAKEFLAGS", None)
    log = tmp / "build.log"
    _say(quiet, f"building {h} (32-bit unix port, firmware frozen; about a minute on 2 cores; log {log})")
    _make(["-C", str(mp / "mpy-cross"), JOBS, f"PYTHON={sys.executable}"], quiet, env, log)
    _make(
        ["-C", str(mp / "ports" / "unix"), JOBS, f"PYTHON={sys.executable}", *MAKE_FLAGS,
         f"FROZEN_MANIFEST={MANIFEST}", f"USER_C_MODULES={CMODULES}"],
        quiet, env, log,
    )  # fmt: skip
    exe = mp / "ports" / "unix" / "build-standard" / "micropython"
    r = subprocess.run(
        [str(exe), "-c", "import sys; print(sys.maxsize, sys.implementation._machine)"],
        capture_output=True,
        text=True,
        check=False,
        env={**env, "MICROPYPATH": ".frozen"},
    )
    if r.returncode != 0 or not r.stdout.startswith(str(2**31 - 1)):
        raise ImageError(f"the image built is not a 32-bit MicroPython: {r.stdout.strip()} {r.stderr.strip()}")
    out = tmp / "out"
    out.mkdir()
    shutil.copy2(exe, out / "micropython")
    data = {
        "hash": h,
        "inputs": ins,
        "machine": r.stdout.split(" ", 1)[1].strip(),
        "frozen": _frozen_sizes(mp, fw, env),
        "built_s": round(time.monotonic() - t0, 1),
    }
    (out / "info.json").write_text(json.dumps(data, indent=1) + "\n")
    _say(quiet, f"built {h} in {data['built_s']} s")
    return out


def describe(exe: Path) -> str:
    return f"32-bit frozen board image {exe.parent.name}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="build again even when the image is cached")
    ap.add_argument("--path", action="store_true", help="print only the executable's path")
    ap.add_argument("--check-toolchain", action="store_true", help="only check that make and `gcc -m32` work")
    a = ap.parse_args()
    if a.check_toolchain:
        try:
            check_toolchain()
        except ImageError as e:
            sys.exit(f"board image: {e.args[0]}")
        return
    try:
        exe = built(force=a.force)
    except (ImageError, build.BuildError) as e:
        sys.exit(f"board image: {e}")
    if a.path:
        print(exe)
        return
    fz = info(exe)["frozen"]["firmware"]
    print(f"{describe(exe)}: {exe}")
    print(
        f"frozen firmware (firmware/manifest.py): {fz['modules']} modules, {fz['total_bytes']} bytes to flash "
        f"({fz['bytecode_bytes']} of bytecode, {fz['qstrs']} qstrs in {fz['qstr_bytes']} bytes)"
    )


if __name__ == "__main__":
    main()
