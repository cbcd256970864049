"""The local stack's supervisor, with small Python children on free ports."""

from __future__ import annotations

import logging
import sys
import time

from async_component.local.ports import free_port
from async_component.local.supervisor import Process, Supervisor

CRASHING = """
import http.server, sys, threading, time
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("serving", flush=True)
time.sleep(float(sys.argv[2]))
print("boom: the reason it stops", flush=True)
sys.exit(1)
"""


def test_a_component_that_exits_is_logged_with_its_last_lines_when_its_output_is_shown_nowhere(caplog):
    """The bench's and the tests' stacks keep the components' output to themselves (``output=None``): the
    warning that one exited then carries its last lines, so a crash says why."""
    port = free_port()
    crashing = Process("crashing", [sys.executable, "-c", CRASHING, str(port), "0.5"], {}, f"http://127.0.0.1:{port}/",
                       any_status=True)
    supervisor = Supervisor([crashing])
    with caplog.at_level(logging.WARNING, logger="async_component.local.supervisor"):
        supervisor.start(timeout=10)
        try:
            deadline = time.monotonic() + 10
            while crashing.restarts == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            supervisor.stop([(["crashing"], 2.0)])
    warnings = [record.getMessage() for record in caplog.records if "exited: exit code 1" in record.getMessage()]
    assert warnings, "the exit was not logged"
    assert "crashing (pid" in warnings[0] and "last log lines:" in warnings[0]
    assert "boom: the reason it stops" in warnings[0]
