"""Per-Service delivery policy on the local stack: Services in an app dir of their own carry the annotations.

Each Service runs the sample app; what the policy changes is seen from outside: the attempts the app saw
(its echo's ``Async-Attempt``), the request's final state and record, what reached the app at all.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
from cloudevents.v1.http import from_http

from async_component.dataplane.records import Record, record_key
from async_component.local.ports import free_port
from async_component.local.stack import LocalStack

from .test_local_stack import APP_DIR, http, poll

ASYNC_CLASS = "async.ingress.networking.knative.dev"
FAST_RETRIES = {"async.knative.dev/backoff-delay": "PT0.05S"}
SINK_PORT = free_port()
SINK = f"http://127.0.0.1:{SINK_PORT}"
SERVICES = {
    "defaults": {},
    "retry5": {"async.knative.dev/retry": "5", **FAST_RETRIES},
    "retry5xx": {"async.knative.dev/retry-on": "5xx", **FAST_RETRIES},
    "maxage": {"async.knative.dev/max-age": "PT2S"},
    "timeout": {"async.knative.dev/timeout": "PT1S", **FAST_RETRIES},
    "notified": {"async.knative.dev/on-success-sink": f"{SINK}/ok?from=notified",
                 "async.knative.dev/on-failure-sink": f"{SINK}/ko", **FAST_RETRIES},
    "badsink": {"async.knative.dev/on-success-sink": f"{SINK}/broken"},
    "narrow": {"async.knative.dev/max-inflight": "2"},
}


class Sink(ThreadingHTTPServer):
    """A CloudEvents sink (the SDK reads each event); the first post of every event is answered 503, and
    every post to /broken 500, so the notifier's retries show."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", SINK_PORT), SinkHandler)
        self.events: list[tuple[str, object]] = []
        self.posts: list[tuple[str, str]] = []
        self.lock = threading.Lock()


class SinkHandler(BaseHTTPRequestHandler):
    server: Sink

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        event = from_http(dict(self.headers.items()), body)
        with self.server.lock:
            first = all(event["id"] != seen for _, seen in self.server.posts)
            self.server.posts.append((self.path, event["id"]))
            status = 500 if self.path == "/broken" else 503 if first else 200
            if status == 200:
                self.server.events.append((self.path, event, dict(self.headers.items())))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def sink():
    server = Sink()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def manifest(name: str, annotations: dict[str, str]) -> str:
    lines = [f"    {key}: {json.dumps(value)}" for key, value in {
        "networking.knative.dev/ingress.class": ASYNC_CLASS, **annotations}.items()]
    return "\n".join([
        "apiVersion: serving.knative.dev/v1", "kind: Service",
        "metadata:", f"  name: {name}", "  namespace: default", "  annotations:", *lines,
        "spec: {template: {spec: {containers: [{image: dev.local/helloworld-sleep:0.1.0}]}}}", "",
    ])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, sink):
    app_dir = tmp_path_factory.mktemp("policy-app")
    shutil.copy(APP_DIR / "sleep_app.py", app_dir)
    for name, annotations in SERVICES.items():
        (app_dir / f"{name}.yml").write_text(manifest(name, annotations))
    # the cluster's defaults: 3 attempts, a quick first retry
    with LocalStack(port=free_port(), sleep_seconds=0, retry_delay=0.05, max_attempts=3, app_dir=app_dir) as stack:
        yield stack


@pytest.fixture(scope="module")
def store(stack: LocalStack):
    client = redis.Redis.from_url(stack.redis_url)
    yield client
    client.close()


def accept(stack: LocalStack, service: str, target: str, headers: dict | None = None) -> tuple[str, str]:
    """Queue one request; (request id, Location)."""
    status, reply, body = http(stack.gateway_url + target, stack.host(service),
                               headers={"Prefer": "respond-async", **(headers or {})})
    assert status == 202, body
    return reply["Async-Request-Id"], reply["Location"]


def finished(stack: LocalStack, store: redis.Redis, service: str, request_id: str, timeout: float = 30.0) -> Record:
    def record() -> Record | None:
        raw = store.get(record_key(stack.key_prefix, request_id, f"{service}.default.svc.cluster.local"))
        found = raw and Record.from_json(raw)
        return found if found and found.finished else None

    return poll(record, timeout)


def test_retry_5_succeeds_on_the_fifth_attempt_where_the_default_fails(stack, store):
    ours, location = accept(stack, "retry5", "/?fail_attempts=4")
    theirs, _ = accept(stack, "defaults", "/?fail_attempts=4")

    record = finished(stack, store, "retry5", ours)
    assert (record.state, record.attempts) == ("succeeded", 5)
    status, headers, body = http(stack.gateway_url + location, stack.host("retry5"))
    assert status == 200 and headers["Async-Request-State"] == "succeeded"
    assert ["Async-Attempt", "5"] in json.loads(body)["headers"]

    record = finished(stack, store, "defaults", theirs)
    assert (record.state, record.attempts, record.response.status) == ("failed", 3, 503)


def test_retry_on_5xx_retries_a_500(stack, store):
    ours, _ = accept(stack, "retry5xx", "/?status=500")
    theirs, _ = accept(stack, "defaults", "/?status=500")
    record = finished(stack, store, "retry5xx", ours)
    assert (record.state, record.attempts, record.response.status) == ("failed", 3, 500)
    record = finished(stack, store, "defaults", theirs)
    assert (record.state, record.attempts) == ("failed", 1), "by default a 500 is final"


def test_timeout_pt1s_retries_an_app_taking_3s_then_fails(stack, store):
    started = time.monotonic()
    request_id, location = accept(stack, "timeout", "/?sleep=3")
    record = finished(stack, store, "timeout", request_id)
    assert (record.state, record.attempts) == ("failed", 3)
    assert record.error == "no answer within 1s"
    assert time.monotonic() - started < 8, "each attempt was cut after 1 s, not after 3"
    status, headers, body = http(stack.gateway_url + location, stack.host("timeout"))
    assert status == 502 and headers["Async-Request-State"] == "failed"


def test_max_age_pt2s_on_a_flooded_service_ends_some_requests_expired_never_replayed(stack, store):
    count = 100
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # the source replays 32 at a time, 1.5 s each
        accepted = list(pool.map(lambda i: accept(stack, "maxage", f"/flood/{i}?sleep=1.5"), range(count)))
    records = [finished(stack, store, "maxage", request_id, timeout=60) for request_id, _ in accepted]
    expired = [i for i, record in enumerate(records) if record.state == "expired"]
    succeeded = [i for i, record in enumerate(records) if record.state == "succeeded"]
    assert expired and succeeded and len(expired) + len(succeeded) == count, [r.state for r in records]
    assert all(records[i].attempts == 0 and "max-age of 2s" in records[i].error for i in expired)

    time.sleep(1)  # anything replayed late would have reached the app by now
    seen = "".join(stack.logs("app"))
    assert not [i for i in expired if f"/flood/{i}?" in seen], "an expired request reached the app"
    request_id, location = accepted[expired[0]]
    status, headers, body = http(stack.gateway_url + location, stack.host("maxage"))
    assert status == 502 and headers["Async-Request-State"] == "expired"
    assert "max-age" in json.loads(body)["error"]
    assert finished(stack, store, "maxage", request_id).state == "expired"


def test_trace_context_reaches_the_service_unchanged(stack, store):
    trace = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
             "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"}
    request_id, location = accept(stack, "defaults", "/traced", trace)
    finished(stack, store, "defaults", request_id)
    status, _, body = http(stack.gateway_url + location, stack.host("defaults"))
    assert status == 200
    received = {name.lower(): value for name, value in json.loads(body)["headers"]}
    assert {name: received.get(name) for name in trace} == trace


def test_a_client_cannot_choose_its_own_policy(stack, store):
    request_id, _ = accept(stack, "defaults", "/?fail_attempts=4", {"Async-Policy": "v1;retry=9"})
    record = finished(stack, store, "defaults", request_id)
    assert (record.state, record.attempts) == ("failed", 3), "the route's policy replaced the client's"


def received(sink: Sink, request_id: str, timeout: float = 30.0):
    return poll(lambda: next(((path, event, headers) for path, event, headers in list(sink.events)
                              if event["subject"] == request_id), None), timeout)


def test_sinks_receive_succeeded_and_failed_events_with_subject_and_data(stack, store, sink):
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "congo=t61rcWkgMzE"}
    ok_id, ok_location = accept(stack, "notified", "/done?sleep=0", trace)
    ko_id, ko_location = accept(stack, "notified", "/broken?status=404")

    path, event, headers = received(sink, ok_id)
    assert path == "/ok?from=notified"
    assert event["type"] == "dev.knative.async.request.succeeded" and event["subject"] == ok_id
    data = event.data
    assert (data["service"], data["status"], data["attempts"]) == ("notified.default.svc.cluster.local", 200, 1)
    assert data["location"] == f"/.well-known/async-requests/{ok_id}"
    status, _, body = http(stack.gateway_url + data["location"], stack.host("notified"))
    assert status == 200, "the event's Location reads the result"
    assert json.loads(data["body"])["path"] == "/done" and data["body_encoding"] == "utf-8"
    assert (event["traceparent"], event["tracestate"]) == (trace["traceparent"], trace["tracestate"])
    assert headers["traceparent"] == trace["traceparent"], "the POST continues the client's trace"

    path, event, _ = received(sink, ko_id)
    assert path == "/ko" and event["type"] == "dev.knative.async.request.failed" and event["subject"] == ko_id
    assert (event.data["status"], event.data["attempts"]) == (404, 1)
    assert [p for p, i in sink.posts if i == event["id"]] == ["/ko", "/ko"], "posted again after the sink's 503"
    assert http(stack.gateway_url + ko_location, stack.host("notified"))[0] == 404
    assert finished(stack, store, "notified", ok_id).state == "succeeded"


def test_a_failing_sink_never_changes_the_requests_state(stack, store, sink):
    request_id, location = accept(stack, "badsink", "/?sleep=0")
    assert finished(stack, store, "badsink", request_id).state == "succeeded"

    def gave_up() -> str | None:
        metrics = "".join(urllib.request.urlopen(stack.source_url + "/metrics").read().decode()) + "".join(
            urllib.request.urlopen(stack.consumer_url + "/metrics").read().decode())
        return metrics if 'async_notifications_total{result="failed"} 1.0' in metrics else None

    metrics = poll(gave_up, 60)
    assert 'async_notifications_total{result="sent"}' in metrics
    assert len([p for p, _ in sink.posts if p == "/broken"]) == 5, "NOTIFICATION_ATTEMPTS posts"
    status, headers, _ = http(stack.gateway_url + location, stack.host("badsink"))
    assert status == 200 and headers["Async-Request-State"] == "succeeded"


def test_max_inflight_2_replays_two_at_a_time(stack, store):
    warm, _ = accept(stack, "narrow", "/?sleep=0")  # the source learns the cap from the Service's requests
    finished(stack, store, "narrow", warm)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        accepted = list(pool.map(lambda i: accept(stack, "narrow", f"/narrow/{i}?sleep=1"), range(6)))
    records = [finished(stack, store, "narrow", request_id) for request_id, _ in accepted]
    assert all(record.state == "succeeded" for record in records)
    assert time.monotonic() - started >= 2.9, "six 1 s requests, two at a time, take three rounds"
