"""A shaped uplink for `tools.bench.gateway --shaped MBIT`: the upstream peer runs in a network
namespace of its own, reached through a veth pair whose gateway side sends through a token
bucket (`tc qdisc … tbf`) of MBIT Mbit/s with a buffer of `buffer_ms`, like the DSL or LTE
router of a site. Bulk then saturates a real bottleneck link with a real (bloated) buffer,
instead of the receiver's CPU on loopback. Needs root and iproute2 (`ip`, `tc`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

NS = "evedge-up"
GW_DEV, PEER_DEV = "evedge-gw0", "evedge-up0"
GW_IP, PEER_IP = "10.77.0.1", "10.77.0.2"


def unavailable() -> str | None:
    """Why a shaped link cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs iproute2's `{tool}`"
    return None


def _run(*cmd: str, check: bool = True) -> None:
    subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=10)


def netns_exec() -> list[str]:
    """The prefix that runs a command inside the peer's namespace."""
    return ["ip", "netns", "exec", NS]


@contextlib.contextmanager
def shaped_link(rate_mbit: float, buffer_ms: float = 50.0) -> Iterator[str]:
    """Makes the namespace and the link; yields the peer's address; removes both after."""
    down()
    try:
        _run("ip", "netns", "add", NS)
        _run("ip", "link", "add", GW_DEV, "type", "veth", "peer", "name", PEER_DEV)
        _run("ip", "link", "set", PEER_DEV, "netns", NS)
        _run("ip", "addr", "add", f"{GW_IP}/30", "dev", GW_DEV)
        _run("ip", "link", "set", GW_DEV, "up")
        _run("ip", "-n", NS, "addr", "add", f"{PEER_IP}/30", "dev", PEER_DEV)
        _run("ip", "-n", NS, "link", "set", PEER_DEV, "up")
        _run("ip", "-n", NS, "link", "set", "lo", "up")
        # burst: 1 ms of the rate, at least two full-size packets (a smaller bucket cannot
        # pass a 1500-byte packet at all).
        burst = max(3200, int(rate_mbit * 1e6 / 8 / 1000))
        _run("tc", "qdisc", "add", "dev", GW_DEV, "root", "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst),
             "latency", f"{buffer_ms}ms")  # fmt: skip
        yield PEER_IP
    finally:
        down()


def down() -> None:
    """Removes what `shaped_link` made (also what an interrupted run left)."""
    _run("ip", "link", "del", GW_DEV, check=False)  # deletes both ends of the pair
    _run("ip", "netns", "del", NS, check=False)
