# Run the golden vectors against the firmware codec under MicroPython:
#
#     MICROPYPATH=firmware:tests:~/.micropython/lib:/usr/lib/micropython \
#         micropython tests/fw_vectors_runner.py tests/vectors/frames.json
#
# Prints the failures and a summary line "N passed, M failed"; exits 1 on any failure.
import sys

_here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
for _p in (_here, _here + "/../firmware"):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import fw_vectors  # noqa: E402


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else _here + "/vectors/frames.json"
    print("implementation:", sys.implementation.name)
    passed, failures = fw_vectors.run(path)
    sys.exit(1 if failures or not passed else 0)


main()
