import base64
import json
import os
import re

import pytest
from cloudevents.v1.conversion import to_structured
from cloudevents.v1.http import from_http

from async_component.dataplane.envelope import (
    EVENT_TYPE, Envelope, EnvelopeError, RequestIds, binary_event, envelope_json, event_attributes, event_data,
    event_envelope, event_source, new_request_id,
)


def sample(body: bytes = b"hello") -> Envelope:
    return Envelope.new(
        "POST", "http://svc.ns.svc.cluster.local/p?a=1&a=2",
        [("X-Rep", "1"), ("X-Rep", "2"), ("Content-Type", "text/plain")], body,
    )


@pytest.mark.parametrize("body", [b"", b"plain text", "ünïcødé ✓".encode(), os.urandom(65536), b"\xff\xfe\x00\x01"])
def test_any_body_survives_a_round_trip(body):
    original = sample(body)
    decoded = Envelope.from_stream_fields(original.to_stream_fields())
    assert decoded == original
    assert decoded.body == body


def test_repeated_headers_keep_their_order():
    decoded = Envelope.from_json(sample().to_json())
    assert decoded.headers == (("X-Rep", "1"), ("X-Rep", "2"), ("Content-Type", "text/plain"))


def test_text_bodies_are_stored_as_text_and_binary_as_base64():
    assert json.loads(sample(b"abc").to_json())["body_encoding"] == "utf-8"
    assert json.loads(sample(b"\xff").to_json())["body_encoding"] == "base64"


def test_document_carries_version_and_attempt():
    doc = json.loads(sample().to_json())
    assert doc["v"] == 1 and doc["attempt"] == 0
    assert Envelope.from_json(sample().next_attempt().to_json()).attempt == 1


def test_request_ids_are_long_and_distinct():
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) >= 24 for i in ids)


def test_redis_stream_source_flat_list_is_accepted():
    env = sample()
    flat = event_data(env.to_stream_fields())
    assert flat[0] == "data"
    assert Envelope.from_stream_fields(flat) == env
    # redis-py hands back bytes keys and values
    assert Envelope.from_stream_fields({b"data": env.to_json().encode()}) == env


def test_event_attributes_match_redis_stream_source():
    attrs = event_attributes("redis://redis.redis.svc.cluster.local:6379", "mystream", "1-0")
    assert attrs == {"type": EVENT_TYPE, "source": "redis://redis.redis.svc.cluster.local:6379/mystream",
                     "id": "1-0", "datacontenttype": "application/json"}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(v=2), "version"),
    (lambda d: d.pop("url"), "missing field 'url'"),
    (lambda d: d.update(headers=[["a"]]), "headers"),
    (lambda d: d.update(body_encoding="rot13"), "body_encoding"),
    (lambda d: d.update(body_encoding="base64", body="!!!"), "base64"),
    (lambda d: d.update(attempt=-1), "attempt"),
    (lambda d: d.update(accepted_at="yesterday"), "accepted_at"),
    (lambda d: d.update(method=""), "non-empty"),
])
def test_malformed_documents_are_refused_with_a_reason(mutate, message):
    doc = json.loads(sample().to_json())
    mutate(doc)
    with pytest.raises(EnvelopeError, match=message):
        Envelope.from_json(json.dumps(doc))


@pytest.mark.parametrize("fields", [["data"], ["other", "x"], "data", {"x": "y"}, ["data", "not json"], ["data", "[1]"]])
def test_malformed_stream_entries_are_refused(fields):
    with pytest.raises(EnvelopeError):
        Envelope.from_stream_fields(fields)


def test_pooled_request_ids_are_url_safe_144_bit_and_distinct_across_refills():
    ids = RequestIds(batch=7)
    drawn = [ids() for _ in range(1000)]  # many refills of 7
    assert len(set(drawn)) == 1000
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{24}", i) for i in drawn)
    assert len(base64.urlsafe_b64decode(drawn[0])) == 18


def test_envelope_json_is_the_envelope_document():
    original = sample(b"\xff body")
    document = envelope_json(original.id, original.method, original.url, list(original.headers), original.body,
                             original.accepted_at)
    assert document.decode() == original.to_json()
    assert Envelope.from_json(document) == original


def test_binary_event_is_the_redis_stream_source_event_and_decodes_to_the_envelope():
    original = sample(b"\xff body")
    source = event_source("redis://redis.redis.svc.cluster.local:6379", "mystream")
    headers, body = binary_event(source, "1-0", original.to_stream_fields())
    event = from_http(headers, body)
    attributes = event_attributes("redis://redis.redis.svc.cluster.local:6379", "mystream", "1-0")
    assert {name: event[name] for name in attributes} == attributes
    assert event.data == event_data(original.to_stream_fields())
    assert event_envelope(headers, body) == original
    structured_headers, structured_body = to_structured(event)
    assert event_envelope(structured_headers, structured_body) == original


@pytest.mark.parametrize("headers, body, message", [
    ({"content-type": "application/json"}, b'["data", "{}"]', "not a CloudEvent"),
    ({"ce-specversion": "1.0", "ce-type": "t", "ce-source": "s", "ce-id": "1", "content-type": "application/json"},
     b"{not json", "not JSON"),
    ({"ce-specversion": "1.0", "ce-type": "t", "ce-source": "s", "ce-id": "1", "content-type": "application/json"},
     b'["other", "{}"]', "not a queued request"),
])
def test_an_event_without_a_queued_request_is_refused_with_a_reason(headers, body, message):
    with pytest.raises(EnvelopeError, match=message):
        event_envelope(headers, body)
