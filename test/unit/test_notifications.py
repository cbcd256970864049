"""The completion event a finished request sends: what it says, binary-safe and cut to the body limit."""

from __future__ import annotations

import base64
import json

from cloudevents.v1.http import from_http

from async_component.dataplane.notifications import event_request, notification, sink_for
from async_component.dataplane.records import RecordedResponse
from async_component.protocol import DeliveryPolicy


def doc(**changes) -> dict:
    args = dict(sink="http://sink.example/x", state="succeeded", request_id="r1", host="hello.demo.svc.cluster.local",
                attempts=2, response=RecordedResponse(201, (("Content-Type", "text/plain"),), b"hello"), error=None,
                request_headers=[["traceparent", "00-abc-def-01"], ["X-Other", "1"]], body_limit=1024,
                finished_at=1_900_000_000.0)
    args.update(changes)
    return json.loads(notification(**args)["data"])


def test_the_event_names_the_request_and_carries_its_outcome():
    headers, body = event_request(doc())
    event = from_http(headers, body)
    assert (event["type"], event["subject"], event["id"]) == ("dev.knative.async.request.succeeded", "r1", "r1.succeeded")
    assert event["traceparent"] == "00-abc-def-01" and headers["traceparent"] == "00-abc-def-01"
    assert "tracestate" not in headers, "none was sent"
    assert event["time"] == "2030-03-17T17:46:40Z"
    assert event.data == {"service": "hello.demo.svc.cluster.local", "state": "succeeded", "attempts": 2,
                          "location": "/.well-known/async-requests/r1", "status": 201, "body": "hello",
                          "body_encoding": "utf-8", "body_truncated": False, "content_type": "text/plain"}


def test_a_binary_body_is_base64_and_cut_to_the_limit():
    data = doc(response=RecordedResponse(200, (), b"\xff\x00" * 10), body_limit=5)["data"]
    assert data["body_encoding"] == "base64" and base64.b64decode(data["body"]) == b"\xff\x00\xff\x00\xff"
    assert data["body_truncated"] is True


def test_a_failure_without_a_response_says_why():
    data = doc(state="expired", response=None, error="not finished within its max-age of 2s")["data"]
    assert data["status"] is None and data["error"].startswith("not finished") and "body" not in data


def test_success_goes_to_the_success_sink_and_the_rest_to_the_failure_sink():
    policy = DeliveryPolicy(on_success_sink="http://ok", on_failure_sink="http://ko")
    assert [sink_for(policy, s) for s in ("succeeded", "failed", "expired")] == ["http://ok", "http://ko", "http://ko"]
    assert sink_for(DeliveryPolicy(), "failed") is None
