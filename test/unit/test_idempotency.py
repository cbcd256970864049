"""Idempotency-Key parsing and scoping: table-driven."""

from __future__ import annotations

import pytest

from async_component.dataplane import idempotency


@pytest.mark.parametrize(("values", "key"), [
    (['"abc"'], "abc"),
    ([' "a b\\"c\\\\" '], 'a b"c\\'),
    (["8e03978e-40d5-43e8-bc93-6894a57f9324"], "8e03978e-40d5-43e8-bc93-6894a57f9324"),
    (["token:x/y*"], "token:x/y*"),
    (["12345"], "12345"),
])
def test_a_quoted_string_or_a_bare_token_is_a_key(values, key):
    assert idempotency.parse_key(values) == key


@pytest.mark.parametrize("values", [
    [], ['"a"', '"b"'], ['""'], [""], ['"unterminated'], ["two words"], ['"tab\there"'], ["a,b"],
    ['"' + "x" * 256 + '"'], ['"é"'],
])
def test_anything_else_is_a_bad_key(values):
    with pytest.raises(idempotency.BadKey):
        idempotency.parse_key(values)


@pytest.mark.parametrize("values", [
    ['"abc"'], [' "a b\\"c\\\\" '], ["8e03978e-40d5-43e8-bc93-6894a57f9324"], ["token:x/y*"], ['"a b"'],
    ["x" * 255], ['"' + "y" * 255 + '"'], ['\t"padded" '], ["caf\u00e9"],
    [], ['"a"', '"b"'], ['""'], [""], ['"unterminated'], ["two words"], ['"tab\there"'], ["a,b"], ["x" * 256],
    ['"' + "x" * 256 + '"'], ['"\u00e9"'],
])
def test_the_key_read_from_the_raw_field_is_the_parsed_key(values):
    """The producer reads the field's bytes directly: the same key, or the same refusal, as parse_key."""
    raw = [value.encode("utf-8") for value in values]
    host = "hello.default.svc.cluster.local"
    try:
        expected = idempotency.key_name("async", host, idempotency.parse_key(values))
    except idempotency.BadKey:
        with pytest.raises(idempotency.BadKey):
            idempotency.key_name_of("async", host, raw)
    else:
        assert idempotency.key_name_of("async", host, raw) == expected


def test_keys_are_scoped_by_the_services_hash_tag():
    assert idempotency.key_name("async", "hello.default.svc.cluster.local", "k") == "async:{default/hello}:idem:k"
    assert idempotency.key_name("async", "hello.default.svc.cluster.local:80", "k") == "async:{default/hello}:idem:k"
    assert idempotency.key_name("async", "hello.example.com", "k") == "async:{hello.example.com}:idem:k"


def test_the_fingerprint_covers_method_target_and_body():
    base = idempotency.fingerprint("POST", "/a?x=1", b"body")
    assert base == idempotency.fingerprint("POST", "/a?x=1", b"body")
    for other in (("PUT", "/a?x=1", b"body"), ("POST", "/a?x=2", b"body"), ("POST", "/a?x=1", b"bodY")):
        assert idempotency.fingerprint(*other) != base
