"""IEC 63119 roaming endpoints: a CSO endpoint, a home-CSP endpoint and a clearing house, each
an HTTP/3 server (aioquic, TLS 1.3) with its own SQLite store. docs/roaming.md is the guide.
"""

from __future__ import annotations

from .ch import ClearingHouse
from .config import EndpointConfig, PartyConfig
from .cso import CsoEndpoint
from .csp import CspEndpoint
from .endpoint import Endpoint, Refused
from .operator import MemoryOperator, OperatorBackend

__all__ = [
    "ClearingHouse",
    "CsoEndpoint",
    "CspEndpoint",
    "Endpoint",
    "EndpointConfig",
    "MemoryOperator",
    "OperatorBackend",
    "PartyConfig",
    "Refused",
]
