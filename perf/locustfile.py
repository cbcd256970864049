"""Locust scenarios: the sleep app called synchronously and asynchronously through the gateway.

Run one user class at a time (``perf/run.py`` does), e.g.::

    locust -f perf/locustfile.py SyncUser --headless -u 20 -r 20 -t 20s --host http://127.0.0.1:8080

Environment (all optional):

- ``PERF_SLEEP``: seconds the app sleeps per request (its ``?sleep=``), default 0
- ``PERF_POLL``: seconds between two polls of a ``Location``, default 0.02
- ``PERF_FOLLOW_TIMEOUT``: give up following a request after this many seconds, default 60
- ``PERF_DOMAIN``: domain of the sample Services' hosts, default ``default.example.com``
- ``PERF_HOST_CONDITIONAL`` / ``PERF_HOST_ALWAYS``: the Host headers of the
  conditional and always-async sample Services (default: ``helloworld-sleep[-always].<domain>``)
"""

from __future__ import annotations

import os
import time

import gevent
from locust import FastHttpUser, constant, stats, task

# Flush the CSVs every second (Locust's default is 10 s), so perf/run.py can show progress.
stats.CSV_STATS_FLUSH_INTERVAL_SEC = 1

SLEEP = os.environ.get("PERF_SLEEP", "0")
POLL = float(os.environ.get("PERF_POLL", "0.02"))
FOLLOW_TIMEOUT = float(os.environ.get("PERF_FOLLOW_TIMEOUT", "60"))
DOMAIN = os.environ.get("PERF_DOMAIN", "default.example.com")
CONDITIONAL_HOST = os.environ.get("PERF_HOST_CONDITIONAL", f"helloworld-sleep.{DOMAIN}")
ALWAYS_HOST = os.environ.get("PERF_HOST_ALWAYS", f"helloworld-sleep-always.{DOMAIN}")
PATH = f"/?sleep={SLEEP}"
PREFER_ASYNC = {"Prefer": "respond-async"}

# Entry names, shared with perf/report.py's ordering of the table.
SYNC = "sync"
CONDITIONAL_ACCEPTED = "async conditional: accepted"
ALWAYS_ACCEPTED = "async always: accepted"
FOLLOW_ACCEPTED = "async follow: accepted"
FOLLOW_POLL = "async follow: poll"
FOLLOW_COMPLETED = "async follow: completed"


class _GatewayUser(FastHttpUser):
    abstract = True
    wait_time = constant(0)

    def call(self, name: str, host: str, expected: int | None, extra: dict[str, str] | None = None,
             path: str = PATH):
        """One request; a status other than ``expected`` (when given) counts as a failure."""
        headers = {"Host": host, **(extra or {})}
        with self.client.get(path, headers=headers, name=name, catch_response=True) as response:
            if expected is not None and response.status_code != expected:
                response.failure(f"expected {expected}, got {response.status_code}: {response.text[:200]!r}")
            return response


class SyncUser(_GatewayUser):
    """Plain synchronous calls: the client waits for the app's answer."""

    @task
    def sync(self) -> None:
        self.call(SYNC, CONDITIONAL_HOST, 200)


class ConditionalAsyncUser(_GatewayUser):
    """``Prefer: respond-async`` on a conditional Service: only the 202 is timed."""

    @task
    def accepted(self) -> None:
        self.call(CONDITIONAL_ACCEPTED, CONDITIONAL_HOST, 202, PREFER_ASYNC)


class AlwaysAsyncUser(_GatewayUser):
    """An always-async Service: 202 without any header."""

    @task
    def accepted(self) -> None:
        self.call(ALWAYS_ACCEPTED, ALWAYS_HOST, 202)


class FollowAsyncUser(_GatewayUser):
    """Async call followed to its end: "accepted" is the 202, "completed" runs from the 202 to the final answer."""

    @task
    def follow(self) -> None:
        accepted = self.call(FOLLOW_ACCEPTED, CONDITIONAL_HOST, 202, PREFER_ASYNC)
        location = accepted.headers.get("Location") if accepted.status_code == 202 else None
        if not location:
            return
        started = time.perf_counter()
        deadline = started + FOLLOW_TIMEOUT
        error: Exception | None = None
        while True:
            gevent.sleep(POLL)
            reply = self.call(FOLLOW_POLL, CONDITIONAL_HOST, None, path=location)
            if reply.status_code != 202:
                state = reply.headers.get("Async-Request-State")
                if state != "succeeded":
                    error = RuntimeError(f"finished as {state!r} with status {reply.status_code}")
                break
            if time.perf_counter() > deadline:
                error = TimeoutError(f"still pending after {FOLLOW_TIMEOUT}s")
                break
        self.environment.events.request.fire(
            request_type="ASYNC", name=FOLLOW_COMPLETED,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=len(reply.content or b""), exception=error, context={},
        )
