# Run the golden vectors against the firmware codec under MicroPython:
#
#     MICROPYPATH=firmware:tests:~/.micropython/lib:/usr/lib/micropython \
#         micropython tests/fw_vectors_runner.py tests/vectors/frames.json [firmware/csc/schema.py]
#
# The optional schema source gives the error names when the codec is a build (tools/board/build.py).
# Prints the failures and a summary line "N passed, M failed"; exits 1 on any failure.
import sys

_here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
for _p in (_here, _here + "/../firmware"):
    if _p not in sys.path:
        sys.path.append(_p)  # after MICROPYPATH, which may name a built firmware

import fw_vectors  # noqa: E402


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else _here + "/vectors/frames.json"
    if len(sys.argv) > 2:
        fw_vectors.load_error_names(sys.argv[2])
    print("implementation:", sys.implementation.name)
    passed, failures = fw_vectors.run(path)
    sys.exit(1 if failures or not passed else 0)


main()
