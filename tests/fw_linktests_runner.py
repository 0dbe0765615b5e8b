# Run the link core's unit tests (tests/fw_linktests.py), or those of another module written for
# both interpreters (--module fw_esp32tests), under MicroPython:
#
#     MICROPYPATH=firmware:tests micropython tests/fw_linktests_runner.py [--module NAME] [FIRMWARE_SOURCE_DIR]
#
# The optional firmware source directory gives the constants when the firmware on the path is a
# build (tools/board/build.py inlines them; fw_linktests.use_source). Prints "PASS name" /
# "FAIL name: error" per test and a summary line "N passed, M failed"; exits 1 on any failure.
import sys

_here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
for _p in (_here, _here + "/../firmware"):
    if _p not in sys.path:
        sys.path.append(_p)  # after MICROPYPATH, which may name a built firmware


def main():
    args = sys.argv[1:]
    modname = "fw_linktests"
    if args and args[0] == "--module":
        modname = args[1]
        args = args[2:]
    mod = __import__(modname)
    if args:
        mod.use_source(args[0])
    print("implementation:", sys.implementation.name)
    names = sorted(n for n in dir(mod) if n.startswith("test_"))
    failed = 0
    for name in names:
        try:
            getattr(mod, name)()
        except Exception as e:
            failed += 1
            print(f"FAIL {name}: {e!r}")
            if hasattr(sys, "print_exception"):
                sys.print_exception(e)  # MicroPython: the traceback
            continue
        print("PASS", name)
    print(f"{len(names) - failed} passed, {failed} failed")
    sys.exit(1 if failed or not names else 0)


main()
