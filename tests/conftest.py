"""Fixtures shared by the tests: the firmware tests' board against tests/fwpeer.py, and the
operator's default ports made unavailable for the harness runs."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fwpeer import Rig
from programs import Program

DEFAULT_PORTS = ((socket.SOCK_DGRAM, 4433), (socket.SOCK_STREAM, 7700), (socket.SOCK_STREAM, 9700))
"""The defaults of the programs an operator runs: the CSMS's UDP port (the roaming endpoints'
too), the gateway's LAN and metrics TCP ports. No harness, test or benchmark may need them."""


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A board linked to its test gateway peer (Hello done); closed after the test."""
    r = Rig(tmp_path)
    try:
        yield r.up()
    finally:
        r.close()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The seed of a test's random choices: EVEDGE_SEED from the environment, else the test's
    `@pytest.mark.seed(N)`, else 1. Printed (pytest shows it with a failure's output), so that
    `EVEDGE_SEED=N python -m pytest <test id>` replays the same choices."""
    m = request.node.get_closest_marker("seed")
    default = int(m.args[0]) if m is not None else 1
    value = int(os.environ.get("EVEDGE_SEED", default))
    print(f"seed {value} (replay: EVEDGE_SEED={value} python -m pytest '{request.node.nodeid}')")
    return value


@pytest.fixture
def default_ports_taken() -> Iterator[list[int]]:
    """DEFAULT_PORTS unavailable while the test runs, as on a machine where a CSMS and a gateway
    (or another run) already listen: bound here, unless another program holds them already
    (as good). Yields the ports bound here."""
    held: list[socket.socket] = []
    for kind, port in DEFAULT_PORTS:
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("127.0.0.1", port))
            if kind == socket.SOCK_STREAM:
                s.listen()
        except OSError:  # taken by another program: unavailable all the same
            s.close()
            continue
        held.append(s)
    try:
        yield [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


@pytest.fixture
def programs() -> Iterator[list[Program]]:
    """Programs (tests/programs.py) a test starts as an operator would; stopped when it ends."""
    started: list[Program] = []
    yield started
    for p in reversed(started):
        p.stop()
