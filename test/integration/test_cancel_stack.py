"""DELETE <Location> of a request waiting for its retry, on the local stack with a slow retry delay."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from async_component.dataplane.queues import Layout
from async_component.local.ports import free_port
from async_component.local.stack import LocalStack

from .test_local_stack import CONDITIONAL, http, poll

APP_DIR = Path(__file__).resolve().parents[1] / "app"


@pytest.mark.slow
def test_delete_while_retrying_cancels_and_the_request_is_never_attempted_again():
    with LocalStack(port=free_port(), sleep_seconds=0, retry_delay=4, max_attempts=3, app_dir=APP_DIR) as stack:
        host = stack.host(CONDITIONAL)
        status, headers, body = http(stack.gateway_url + "/flaky?sleep=0&status=503", host,
                                     headers={"Prefer": "respond-async"})
        assert status == 202, body
        location = headers["Location"]
        poll(lambda: http(stack.gateway_url + location, host)[1].get("Async-Request-State") == "retrying")
        status, headers, body = http(stack.gateway_url + location, host, method="DELETE")
        assert status == 200, body
        doc = json.loads(body)
        assert headers["Async-Request-State"] == "canceled"
        assert (doc["state"], doc["attempts"]) == ("canceled", 1)

        client = redis.Redis.from_url(stack.redis_url)
        try:
            # the retry comes due (2 s to 4 s, jittered), is moved to the retry stream and settled without a replay
            queue = Layout(stack.key_prefix, stack.stream).for_host(f"{CONDITIONAL}.default.svc.cluster.local")
            assert client.zcard(queue.retries) == 1
            poll(lambda: client.zcard(queue.retries) == 0 and client.xlen(queue.retry_stream) == 0, timeout=15)
            time.sleep(1.0)
            status, headers, body = http(stack.gateway_url + location, host)
            assert status == 410 and headers["Async-Request-State"] == "canceled", body
            assert json.loads(body)["attempts"] == 1  # never attempted again
            assert client.xlen(stack.dead_letter_stream) == 0
        finally:
            client.close()
