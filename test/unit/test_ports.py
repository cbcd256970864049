"""Ports picked for the local stack's processes: free, and below the kernel's ephemeral range, where no outgoing
connection's local port can take one between the pick and the process binding it."""

from __future__ import annotations

import socket

from async_component.local import ports
from async_component.local.ports import CLUSTER_BUS_OFFSET, ephemeral_start, free_cluster_port, free_port


def test_ports_are_free_and_below_the_ephemeral_range():
    start = ephemeral_start()
    picked = [free_port() for _ in range(50)]
    assert all(ports.LOWEST <= port < start for port in picked), (start, picked)
    for port in picked[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_cluster_port_and_its_bus_port_are_both_free_and_below_the_ephemeral_range():
    start = ephemeral_start()
    for _ in range(20):
        port = free_cluster_port()
        assert port + CLUSTER_BUS_OFFSET < start
        with socket.socket() as node, socket.socket() as bus:
            node.bind(("127.0.0.1", port))
            bus.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))


def test_a_port_in_use_is_not_picked(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        held.listen()
        choices = iter([taken, taken, 4242 + ports.LOWEST])
        monkeypatch.setattr(ports.random, "randint", lambda low, high: next(choices))
        monkeypatch.setattr(ports, "ephemeral_start", lambda: max(taken + 1, ports.LOWEST + 5000))
        assert free_port() == 4242 + ports.LOWEST


def test_an_unreadable_range_falls_back_to_linuxs_default(monkeypatch, tmp_path):
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", tmp_path / "missing")
    assert ephemeral_start() == 32768
