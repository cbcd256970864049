import base64
import json
import os
import re

import pytest
from cloudevents.v1.conversion import to_structured
from cloudevents.v1.http import from_http

from async_component.protocol import DEFAULT_POLICY
from async_component.dataplane.envelope import (
    EVENT_TYPE, Envelope, EnvelopeError, RequestIds, binary_event, entry_policy, envelope_json, event_attributes,
    event_data,
    event_envelope, event_source, header_value, new_request_id,
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


def test_header_bytes_that_are_not_utf8_survive_a_round_trip():
    value = header_value(b"a\xff\xfe\x80z")
    original = Envelope.new("GET", "http://s.n.svc.cluster.local/", [("X-Utf8", "caf\u00e9"), ("X-Binary", value)], b"")
    doc = json.loads(original.to_json())
    assert doc["headers"] == [["X-Utf8", "caf\u00e9"], ["X-Binary", base64.b64encode(b"a\xff\xfe\x80z").decode()]]
    assert doc["binary_headers"] == [1]
    decoded = Envelope.from_stream_fields(original.to_stream_fields())
    assert decoded == original
    assert decoded.headers[1][1].encode("utf-8", "surrogateescape") == b"a\xff\xfe\x80z"
    assert "binary_headers" not in json.loads(sample().to_json())  # UTF-8 headers: the document as before


def test_an_entry_queued_before_binary_headers_existed_still_decodes():
    old = ('{"v":1,"id":"r1","method":"GET","url":"http://s.n.svc.cluster.local/","headers":[["X-Latin","caf\u00e9"]],'
           '"body":"","body_encoding":"utf-8","accepted_at":1.0,"attempt":0}')
    assert Envelope.from_json(old).headers == (("X-Latin", "caf\u00e9"),)


@pytest.mark.parametrize("binary", [[5], ["0"], [True], 0, [0]])
def test_bad_binary_header_lists_are_refused(binary):
    doc = json.loads(sample().to_json())
    doc["binary_headers"] = binary  # [0]: the value "1" is not base64
    with pytest.raises(EnvelopeError):
        Envelope.from_json(json.dumps(doc))


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


def test_the_policy_in_force_at_acceptance_travels_with_the_request():
    original = Envelope.new("POST", "http://hello.demo.svc/x", [], b"", policy="v1;retry=5;age=2")
    document = json.loads(original.to_json())
    assert document["policy"] == "v1;retry=5;age=2"
    decoded = Envelope.from_json(original.next_attempt().to_json())
    assert decoded.policy == original.policy and decoded.delivery_policy.retry == 5
    assert "policy" not in json.loads(Envelope.new("GET", "http://h/", [], b"", policy="v1").to_json()), \
        "the defaults cost no bytes"


def test_an_entry_queued_before_policies_existed_gets_the_cluster_defaults():
    document = json.loads(Envelope.new("GET", "http://hello.demo.svc/", [], b"").to_json())
    assert "policy" not in document
    assert Envelope.from_json(json.dumps(document)).delivery_policy == DEFAULT_POLICY


@pytest.mark.parametrize("policy", ["v9", "v1;retry=x", 5])
def test_an_entry_with_a_policy_this_build_cannot_read_is_malformed(policy):
    document = json.loads(Envelope.new("GET", "http://hello.demo.svc/", [], b"").to_json())
    document["policy"] = policy
    with pytest.raises(EnvelopeError, match="policy"):
        Envelope.from_json(json.dumps(document))


@pytest.mark.parametrize("policy", ["", "v1;inflight=2;queued=5"])
def test_a_stream_entrys_policy_is_found_without_decoding_it(policy):
    decoy = '"policy":"v1;inflight=99"'
    envelope = Envelope.new("POST", "http://hello.demo.svc/", [["X-Decoy", decoy]], decoy.encode(), policy=policy)
    fields = envelope.to_stream_fields()
    assert entry_policy(fields) == entry_policy({k.encode(): v.encode() for k, v in fields.items()}) == \
        ("" if policy == "" else policy)
