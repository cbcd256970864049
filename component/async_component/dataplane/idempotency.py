"""``Idempotency-Key`` (IETF httpapi draft): a request sent again with its key is not queued again.

The key is a Structured Field string (``"abc"``, as the draft says) or a bare
token (``abc``). It is scoped per Service: its Redis key is under the Service's
hash tag ``{<namespace>/<name>}`` (the tag of the Service's queue), and holds the
request's fingerprint (method, path and query, body), stream entry id and
request id. The check and the write happen in the producer's batched enqueue
script (:mod:`.enqueuer`), so a key costs no extra round trip. The key has no
expiry while its request is pending (queued or retrying, however long: a
repeat is never queued again), and whatever ends the request gives it the
result's lifetime (``STATUS_RETENTION_SECONDS`` or the Service's
``retention``): the replay with the final outcome (the header travels with the
queued request), a cancel, a dead letter. So the key lasts as long as the
result it answers with, and Redis sets its expiry once, not twice.
"""

from __future__ import annotations

import functools
import hashlib
import re

from .envelope import header_text
from .queues import service_tag

HEADER = "Idempotency-Key"
MAX_LENGTH = 255

_TOKEN_CHAR = r"[A-Za-z0-9!#$%&'*+.^_`|~:/-]"
"""A Structured Field token's characters, a digit first allowed too: a UUID or a number is a common bare key."""
_STRING_CHAR = r"[\x20\x21\x23-\x5b\x5d-\x7e]"
"""A Structured Field string's characters but the two escaped ones (a quote and a backslash)."""

_SF_STRING = re.compile(rf'"((?:{_STRING_CHAR}|\\["\\])*)"')
_TOKEN = re.compile(_TOKEN_CHAR + "+")
_RAW_TOKEN = re.compile(f"{_TOKEN_CHAR}{{1,{MAX_LENGTH}}}".encode())
_RAW_PLAIN_STRING = re.compile(f'"({_STRING_CHAR}{{1,{MAX_LENGTH}}})"'.encode())
"""The same grammar on the field's bytes, for :func:`key_name_of`: a token, or a quoted string without escapes."""


class BadKey(ValueError):
    """The header is not one key (400)."""


def parse_key(values: list[str]) -> str:
    """The key of the request's ``Idempotency-Key`` field(s); raises :class:`BadKey`."""
    if len(values) != 1:
        raise BadKey(f"{HEADER} must appear once")
    text = values[0].strip(" \t")
    string = _SF_STRING.fullmatch(text) if text[:1] == '"' else None
    if string:
        key = string.group(1)
        if "\\" in key:
            key = re.sub(r'\\(["\\])', r"\1", key)
    elif _TOKEN.fullmatch(text):
        key = text
    else:
        raise BadKey(f"{HEADER} must be a quoted string or a token: {text[:100]!r}")
    if not key or len(key) > MAX_LENGTH:
        raise BadKey(f"{HEADER} must hold 1 to {MAX_LENGTH} characters")
    return key


def fingerprint(method: str, target: str, body: bytes) -> str:
    """What makes a request the same request: method, path and query, body (hex: the claim is text)."""
    digest = hashlib.sha256(f"{method}\n{target}\n".encode("latin-1", "surrogateescape"))
    digest.update(body)  # not appended to the line above: no copy of the body
    return digest.hexdigest()


def key_name(prefix: str, host: str, key: str) -> str:
    """The Redis key of an idempotency key for the Service of ``host``."""
    return _key_base(prefix, host) + key


def key_name_of(prefix: str, host: str, raw: list[bytes]) -> str:
    """The Redis key of a request's ``Idempotency-Key`` field(s) as received; raises :class:`BadKey`.

    One bare token or quoted string without escapes (nearly every key) is matched on the bytes: on the
    producer's hot path, without the decoding, stripping and unquoting steps of :func:`parse_key`.
    """
    if len(raw) == 1:
        if _RAW_TOKEN.fullmatch(raw[0]):
            return _key_base(prefix, host) + raw[0].decode("ascii")
        string = _RAW_PLAIN_STRING.fullmatch(raw[0])
        if string:
            return _key_base(prefix, host) + string.group(1).decode("ascii")
    return key_name(prefix, host, parse_key([header_text(value) for value in raw]))


@functools.lru_cache(maxsize=1024)
def _key_base(prefix: str, host: str) -> str:
    """Remembered: a few Services send almost every request, and this is on the producer's hot path."""
    return f"{prefix}:{{{service_tag(host)}}}:idem:"


_HEADER_LOWER = HEADER.lower()


def queued_key_name(prefix: str, host: str, headers) -> str | None:
    """The Redis key of a queued request's ``Idempotency-Key`` header (its ``(name, value)`` pairs), if it had one."""
    values = [value for name, value in headers if name.lower() == _HEADER_LOWER]
    if not values:
        return None
    try:
        return key_name(prefix, host, parse_key(values))
    except BadKey:
        return None
