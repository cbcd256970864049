"""Free loopback ports for local processes and tests."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_cluster_port(host: str = "127.0.0.1") -> int:
    """A free port whose Redis Cluster bus port (the port + 10,000) is free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
            if port + 10000 > 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
                try:
                    bus.bind((host, port + 10000))
                except OSError:
                    continue
            return port
    raise OSError("no free port pair for a Redis Cluster node")
