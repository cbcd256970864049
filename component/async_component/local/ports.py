"""Free loopback ports for local processes and tests.

A port is picked now and bound later, by another process. One the kernel hands out for ``bind(0)`` comes
from its ephemeral range, which every outgoing connection (a Redis client, an HTTP client) takes its local
port from too: one of those could take the port in between, and the process would fail to start with
"address already in use". So ports are picked at random below that range, and checked free.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
EPHEMERAL_START = 32768
"""Linux's default start of the ephemeral range (``ip_local_port_range``); macOS and Windows start higher."""
CLUSTER_BUS_OFFSET = 10000


def ephemeral_start() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_START


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A free port below the ephemeral range (a kernel-chosen one if that range starts too low to leave room)."""
    top = ephemeral_start() - 1
    if top - LOWEST >= 1000:
        for _ in range(200):
            port = random.randint(LOWEST, top)
            if _bindable(host, port):
                return port
    return _kernel_port(host)


def free_cluster_port(host: str = "127.0.0.1") -> int:
    """A free port whose Redis Cluster bus port (the port + 10,000) is free too, both below the ephemeral range."""
    top = min(ephemeral_start() - 1, 65535) - CLUSTER_BUS_OFFSET
    for _ in range(200):
        port = random.randint(LOWEST, top) if top - LOWEST >= 1000 else _kernel_port(host)
        if port + CLUSTER_BUS_OFFSET <= 65535 and _bindable(host, port) and _bindable(host, port + CLUSTER_BUS_OFFSET):
            return port
    raise OSError("no free port pair for a Redis Cluster node")
