"""The wire format of a queued request: the only place it is built or parsed.

A queued request is one Redis stream entry with a single field ``data`` whose
value is a JSON document. Knative's RedisStreamSource forwards a stream entry as
a CloudEvent whose JSON data is the entry's flat field/value list, e.g.
``["data", "<json>"]``; our own source sends exactly the same event, so the
consumer cannot tell (and need not care) which source delivered it.

The body is kept as UTF-8 text when it is valid UTF-8 (compact in Redis) and as
base64 otherwise, so any bytes survive. Header values are bytes too: in memory
a value that is not UTF-8 is text with its stray bytes as surrogate escapes
(:func:`header_value`), and in the document such a value is base64, its index
listed in the optional field ``binary_headers``. Entries written before that
field existed decode as before.

The optional field ``policy`` holds the Service's delivery policy as the
producer received it (``protocol.DeliveryPolicy``'s header form), so a request
is replayed under the policy in force when it was accepted; an entry without it
(written before policies existed) is replayed under the cluster's defaults.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import os
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import orjson

from ..protocol import POLICY_VERSION, DeliveryPolicy, policy_of

VERSION = 1
STREAM_FIELD = "data"

EVENT_TYPE = "dev.knative.sources.redisstream"
EVENT_CONTENT_TYPE = "application/json"

_ENCODINGS = ("utf-8", "base64")
MAX_ATTEMPT = 2**31 - 1
"""Attempts already made, at most: no MAX_ATTEMPTS comes near it, and Redis and Lua count it exactly."""


class EnvelopeError(ValueError):
    """The document is not a queued request this version understands."""


def encode_body(body: bytes) -> tuple[str, str]:
    """Body as JSON-safe text and its encoding: UTF-8 text when it is valid UTF-8, else base64."""
    try:
        return body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), "base64"


def decode_body(text: Any, encoding: Any) -> bytes:
    if encoding not in _ENCODINGS or not isinstance(text, str):
        raise EnvelopeError(f"body_encoding must be one of {_ENCODINGS} with a string body")
    if encoding == "utf-8":
        return text.encode("utf-8")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError("body is not valid base64") from None


def new_request_id() -> str:
    """144 random bits, URL-safe: unguessable, so the id alone grants access to the status."""
    return secrets.token_urlsafe(18)


REQUEST_ID_BYTES = 18
"""144 bits: base64 turns each 18 bytes into exactly 24 characters, so slices never share a byte."""


class RequestIds:
    """Request ids like :func:`new_request_id`, cut from one ``os.urandom`` call per ``batch`` ids.

    One system call per request is a measurable share of the producer's CPU. Create one per
    process (after any fork): a forked copy would hand out the same ids as its parent.
    """

    def __init__(self, batch: int = 512) -> None:
        self._batch = batch
        self._text = ""
        self._next = 0

    def __call__(self) -> str:
        start = self._next
        if start >= len(self._text):
            self._text = base64.urlsafe_b64encode(os.urandom(REQUEST_ID_BYTES * self._batch)).decode("ascii")
            start = 0
        self._next = start + 24
        return self._text[start:start + 24]


def envelope_json(request_id: str, method: str, url: str, headers: Sequence[Sequence[str]], body: bytes,
                  accepted_at: float, attempt: int = 0, policy: str = "") -> bytes:
    """The stream entry's document (UTF-8), built straight from a request's parts (no :class:`Envelope`).

    orjson: escaping a 1 KiB body with the standard library took a tenth of the producer's CPU.
    It refuses surrogates, so only a request with non-UTF-8 header bytes takes the slower path.
    """
    text, encoding = encode_body(body)
    doc = {
        "v": VERSION, "id": request_id, "method": method, "url": url, "headers": headers,
        "body": text, "body_encoding": encoding, "accepted_at": accepted_at, "attempt": attempt,
    }
    if policy and policy != POLICY_VERSION:  # the defaults cost no bytes
        doc["policy"] = policy
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:
        doc["headers"], doc["binary_headers"] = _binary_safe(headers)
        return orjson.dumps(doc)


def _binary_safe(headers: Sequence[Sequence[str]]) -> tuple[list[list[str]], list[int]]:
    """Headers whose values hold surrogate escapes as base64, and the indices of those values."""
    pairs, binary = [], []
    for index, (name, value) in enumerate(headers):
        raw = value.encode("utf-8", "surrogateescape")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            value = base64.b64encode(raw).decode("ascii")
            binary.append(index)
        pairs.append([name, value])
    return pairs, binary


def _from_binary_safe(headers: list, binary: Any) -> list:
    if not isinstance(binary, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(headers) for i in binary
    ):
        raise EnvelopeError("binary_headers must list indices of headers")
    headers = [list(pair) for pair in headers]
    for index in binary:
        try:
            raw = base64.b64decode(headers[index][1], validate=True)
        except (binascii.Error, ValueError):
            raise EnvelopeError("a binary header value is not valid base64") from None
        headers[index][1] = header_value(raw)
    return headers


@dataclasses.dataclass(frozen=True)
class Envelope:
    id: str
    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    accepted_at: float
    attempt: int = 0
    """Attempts already made; the next replay is attempt ``attempt + 1``."""
    policy: str = ""
    """The Service's delivery policy when the request was accepted (header form; '': the cluster's defaults)."""

    @classmethod
    def new(
        cls,
        method: str,
        url: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        request_id: str | None = None,
        accepted_at: float | None = None,
        policy: str = "",
    ) -> Envelope:
        return cls(
            id=request_id or new_request_id(),
            method=method,
            url=url,
            headers=tuple((str(k), str(v)) for k, v in headers),
            body=bytes(body),
            accepted_at=time.time() if accepted_at is None else accepted_at,
            policy=policy,
        )

    @property
    def delivery_policy(self) -> DeliveryPolicy:
        return policy_of(self.policy)

    def next_attempt(self) -> Envelope:
        return dataclasses.replace(self, attempt=self.attempt + 1)

    # --- encoding

    def to_json(self) -> str:
        return envelope_json(self.id, self.method, self.url, self.headers, self.body, self.accepted_at,
                             self.attempt, self.policy).decode()

    def to_stream_fields(self) -> dict[str, str]:
        """The fields of the Redis stream entry (XADD)."""
        return {STREAM_FIELD: self.to_json()}

    # --- decoding

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        try:
            doc = orjson.loads(text)  # a quarter of the standard library's time (1.9 µs for 1.3 KiB), each delivery
        except (orjson.JSONDecodeError, TypeError):
            try:  # what orjson refuses (NaN, huge integers) reads as it always did
                doc = json.loads(text)
            except (ValueError, TypeError) as exc:
                raise EnvelopeError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise EnvelopeError("not a JSON object")
        if doc.get("v") != VERSION:
            raise EnvelopeError(f"unsupported envelope version {doc.get('v')!r} (this build reads {VERSION})")
        try:
            request_id, method, url = doc["id"], doc["method"], doc["url"]
            headers, body, encoding = doc["headers"], doc["body"], doc["body_encoding"]
            accepted_at, attempt = doc["accepted_at"], doc["attempt"]
        except KeyError as exc:
            raise EnvelopeError(f"missing field {exc.args[0]!r}") from None
        if not (isinstance(request_id, str) and isinstance(method, str) and isinstance(url, str)
                and request_id and method and url):
            raise EnvelopeError("id, method and url must be non-empty strings")
        if not isinstance(headers, list):
            raise EnvelopeError("headers must be a list of [name, value] string pairs")
        for pair in headers:  # a loop, not nested all(): it runs for every delivery
            if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], str) or not isinstance(pair[1], str):
                raise EnvelopeError("headers must be a list of [name, value] string pairs")
        if "binary_headers" in doc:
            headers = _from_binary_safe(headers, doc["binary_headers"])
        if not isinstance(accepted_at, (int, float)) or isinstance(accepted_at, bool) or not math.isfinite(accepted_at):
            raise EnvelopeError("accepted_at must be a finite number")
        if not isinstance(attempt, int) or isinstance(attempt, bool) or not 0 <= attempt <= MAX_ATTEMPT:
            raise EnvelopeError(f"attempt must be an integer from 0 to {MAX_ATTEMPT}")
        raw = decode_body(body, encoding)
        policy = doc.get("policy", "")
        if not isinstance(policy, str):
            raise EnvelopeError("policy must be a string")
        try:
            policy_of(policy)
        except ValueError as exc:
            raise EnvelopeError(f"policy: {exc}") from None
        return cls(
            id=request_id,
            method=method,
            url=url,
            headers=tuple(map(tuple, headers)),
            body=raw,
            accepted_at=float(accepted_at),
            attempt=attempt,
            policy=policy,
        )

    @classmethod
    def from_stream_fields(cls, fields: Mapping[Any, Any] | Sequence[Any]) -> Envelope:
        """Decode a stream entry, given as a mapping or as the flat list RedisStreamSource sends."""
        if type(fields) is dict:  # as redis-py reads an entry: one field, named in bytes (no ABC check)
            raw = fields.get(_STREAM_FIELD_BYTES)
            if raw is not None:
                return cls.from_json(raw)
        if isinstance(fields, Mapping):
            items = {as_text(k): v for k, v in fields.items()}
        elif isinstance(fields, Sequence) and not isinstance(fields, (str, bytes)):
            if len(fields) % 2:
                raise EnvelopeError("a stream entry's field/value list has an odd length")
            items = {as_text(fields[i]): fields[i + 1] for i in range(0, len(fields), 2)}
        else:
            raise EnvelopeError("a stream entry must be a field/value list or mapping")
        if STREAM_FIELD not in items:
            raise EnvelopeError(f"the stream entry has no field {STREAM_FIELD!r}")
        return cls.from_json(items[STREAM_FIELD])


_STREAM_FIELD_BYTES = STREAM_FIELD.encode()
_POLICY_KEY = b'"policy":"'


def entry_policy(fields: Mapping[Any, Any]) -> str:
    """The policy text of a stream entry's document, found without decoding the document ('' when none).

    JSON escapes every quote inside a string, so ``"policy":"`` unescaped is only ever the top-level key,
    and a policy's text holds no quote (``protocol.DeliveryPolicy``).
    """
    raw = fields.get(STREAM_FIELD.encode()) or fields.get(STREAM_FIELD) or b""
    if isinstance(raw, str):
        raw = raw.encode()
    start = raw.find(_POLICY_KEY)
    if start < 0:
        return ""
    start += len(_POLICY_KEY)
    end = raw.find(b'"', start)
    return raw[start:end].decode("ascii", "replace") if end > 0 else ""


def as_text(value: Any) -> str:
    """Redis replies come as bytes; field names and ids are text."""
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def header_value(raw: bytes) -> str:
    """A request header value as the envelope keeps it: UTF-8, any other byte as a surrogate escape.

    ``value.encode("utf-8", "surrogateescape")`` gives back the bytes the client sent.
    """
    return raw.decode("utf-8", "surrogateescape")


def header_text(raw: bytes) -> str:
    """A raw header value as envelope text: UTF-8 when valid, else latin-1, which maps every byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# --- the CloudEvent that carries a stream entry (RedisStreamSource's shape)
#
# Our source and Knative's RedisStreamSource send the same event, so the consumer
# cannot tell (and need not care) which one delivered it. Both directions live here.

BINARY_ATTRIBUTES = ("ce-id", "ce-source", "ce-type")


def event_source(redis_address: str, stream: str) -> str:
    """The ``source`` attribute: the stream, as RedisStreamSource names it."""
    return f"{redis_address}/{stream}"


def event_attributes(redis_address: str, stream: str, entry_id: str) -> dict[str, str]:
    """CloudEvent attributes as RedisStreamSource sets them for one stream entry."""
    return {
        "type": EVENT_TYPE,
        "source": event_source(redis_address, stream),
        "id": entry_id,
        "datacontenttype": EVENT_CONTENT_TYPE,
    }


def event_data(fields: Mapping[Any, Any]) -> list[str]:
    """The event data: the entry's fields flattened to [field, value, field, value, ...]."""
    flat: list[str] = []
    for key, value in fields.items():
        flat.extend((as_text(key), as_text(value)))
    return flat


def binary_event(source: str, entry_id: str, fields: Mapping[Any, Any]) -> tuple[dict[str, str], bytes]:
    """Headers and body of the binary-mode event for one stream entry (``source``: :func:`event_source`).

    The headers the CloudEvents SDK would set, built directly: the format is fixed, and the SDK
    costs more per event than the rest of a delivery.
    """
    headers = {
        "content-type": EVENT_CONTENT_TYPE,
        "ce-specversion": "1.0",
        "ce-id": entry_id,
        "ce-source": source,
        "ce-type": EVENT_TYPE,
        "ce-time": datetime.now(timezone.utc).isoformat(),
    }
    return headers, json.dumps(event_data(fields)).encode()


def entry_envelope(fields: Any) -> Envelope:
    """The envelope of a delivered stream entry's fields (a mapping, or RedisStreamSource's flat list)."""
    try:
        return Envelope.from_stream_fields(fields)
    except EnvelopeError as exc:
        raise EnvelopeError(f"the event data is not a queued request: {exc}") from None


def event_envelope(headers: Mapping[str, str], body: bytes) -> Envelope:
    """The envelope an event carries; raises :class:`EnvelopeError` saying why there is none.

    A binary-mode JSON event (what both sources send) is read directly; any other form goes
    through the CloudEvents SDK.
    """
    if (headers.get("ce-specversion") == "1.0" and headers.get("content-type") == EVENT_CONTENT_TYPE
            and all(headers.get(name) for name in BINARY_ATTRIBUTES)):
        return _data_envelope(body)
    from cloudevents.v1.http import from_http  # only the consumer decodes events: the producer does not load the SDK
    try:
        data = from_http(headers, body).data
    except Exception as exc:  # the SDK's errors for a request that is not a CloudEvent
        raise EnvelopeError(f"not a CloudEvent: {exc}") from None
    return _data_envelope(data)


def _data_envelope(data: Any) -> Envelope:
    """The envelope in an event's data: the field list as parsed JSON, or its JSON text/bytes."""
    if isinstance(data, (bytes, bytearray, str)):
        try:
            data = json.loads(data)
        except ValueError:
            raise EnvelopeError("the event data is not JSON") from None
    return entry_envelope(data)
