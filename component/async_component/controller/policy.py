"""A Service's delivery policy, read from its annotations (Knative copies them onto the Ingress).

The vocabulary is Knative Eventing's DeliverySpec (retry, backoffPolicy,
backoffDelay, timeout as ISO-8601 durations) plus what async delivery adds.
Pure: annotations in, a :class:`~async_component.protocol.DeliveryPolicy` out,
or :class:`InvalidAsyncPolicy` naming the annotation that is wrong.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from ..hostlists import host_allowed
from ..protocol import DeliveryPolicy, status_set
from ..settings import backoff_policy

PREFIX = "async.knative.dev/"
RETRY = PREFIX + "retry"
BACKOFF_POLICY = PREFIX + "backoff-policy"
BACKOFF_DELAY = PREFIX + "backoff-delay"
TIMEOUT = PREFIX + "timeout"
RETRY_ON = PREFIX + "retry-on"
MAX_AGE = PREFIX + "max-age"
RETENTION = PREFIX + "retention"
MAX_INFLIGHT = PREFIX + "max-inflight"
MAX_QUEUED = PREFIX + "max-queued"
ON_SUCCESS_SINK = PREFIX + "on-success-sink"
ON_FAILURE_SINK = PREFIX + "on-failure-sink"

MAX_RETRY = 1000
"""More retries than anyone means: a typo, more likely."""
MAX_COUNT = 1_000_000_000
MAX_URL = 2048

_DURATION = re.compile(
    r"P(?:(?P<weeks>\d+(?:\.\d+)?)W)?(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?"
)
_UNIT_SECONDS = {"weeks": 604800, "days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}


class InvalidAsyncPolicy(ValueError):
    """An annotation of the delivery policy holds a value this controller cannot use."""

    def __init__(self, annotation: str, value: str, why: str) -> None:
        super().__init__(f"annotation {annotation}={value!r} is invalid: {why}")
        self.annotation = annotation


def duration(text: str) -> float:
    """An ISO-8601 duration (``PT1S``, ``PT1.5S``, ``PT2M``, ``P1D``, ``P1DT12H``) in seconds.

    Years and months are refused: they have no fixed length.
    """
    match = _DURATION.fullmatch(text.strip().upper())
    if match is None or not any(match.groupdict().values()) or text.strip().upper().endswith("T"):
        raise ValueError("must be an ISO-8601 duration such as PT1S, PT2M30S or P1D (no years or months)")
    return sum(float(value) * _UNIT_SECONDS[unit] for unit, value in match.groupdict().items() if value)


def positive_duration(text: str) -> float:
    value = duration(text)
    if value <= 0:
        raise ValueError("must be a duration longer than zero")
    return value


def count(limit: int, minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        text = text.strip()
        if not (text.isascii() and text.isdigit()) or not minimum <= int(text) <= limit:
            raise ValueError(f"must be a whole number from {minimum} to {limit}")
        return int(text)

    return parse


def sink_url(text: str) -> str:
    text = text.strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or len(text) > MAX_URL \
            or not text.isascii() or any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError("must be an absolute http:// or https:// URL")
    return text


ANNOTATIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    RETRY: ("retry", count(MAX_RETRY, 0)),
    BACKOFF_POLICY: ("backoff_policy", backoff_policy),
    BACKOFF_DELAY: ("backoff_delay", duration),
    TIMEOUT: ("timeout", positive_duration),
    RETRY_ON: ("retry_on", status_set),
    MAX_AGE: ("max_age", positive_duration),
    RETENTION: ("retention", positive_duration),
    MAX_INFLIGHT: ("max_inflight", count(MAX_COUNT, 1)),
    MAX_QUEUED: ("max_queued", count(MAX_COUNT, 1)),
    ON_SUCCESS_SINK: ("on_success_sink", sink_url),
    ON_FAILURE_SINK: ("on_failure_sink", sink_url),
}
"""Each annotation: the policy field it sets, and its parser (ValueError says what a value must be)."""


@dataclasses.dataclass(frozen=True)
class ClusterLimits:
    """What the cluster's data plane allows a Service's policy: keys of its ConfigMap, which the controller reads
    too, so that a Service's owner reads a refusal in the Service's status rather than in the data plane's log."""

    sink_hosts: tuple[str, ...] | None = None
    """``NOTIFICATION_ALLOWED_HOSTS``: the hosts a sink may name (None: any); the data plane drops other events."""
    max_timeout: float | None = None
    """``REQUEST_TIMEOUT``: the longest attempt (None: no limit). A stopping process, the consumer's revision and
    the source posting to it give a replay that long, no longer: a longer one would be cut and replayed again."""


def delivery_policy(annotations: Mapping[str, str], limits: ClusterLimits | None = None) -> DeliveryPolicy:
    """The policy the annotations set (absent ones: the cluster's defaults); raises :class:`InvalidAsyncPolicy`,
    also for a value past the cluster's ``limits``."""
    fields: dict[str, Any] = {}
    for annotation, (field, parse) in ANNOTATIONS.items():
        if annotation not in annotations:
            continue
        value = annotations[annotation]
        try:
            fields[field] = parse(str(value))
        except ValueError as exc:
            raise InvalidAsyncPolicy(annotation, str(value), str(exc)) from None
    if limits is not None:
        _check_limits(annotations, fields, limits)
    return DeliveryPolicy(**fields)


def _check_limits(annotations: Mapping[str, str], fields: Mapping[str, Any], limits: ClusterLimits) -> None:
    timeout = fields.get("timeout")
    if limits.max_timeout is not None and timeout is not None and timeout > limits.max_timeout:
        raise InvalidAsyncPolicy(TIMEOUT, str(annotations[TIMEOUT]),
                                 f"longer than the cluster's REQUEST_TIMEOUT ({limits.max_timeout:g}s), the longest"
                                 " attempt the data plane waits for")
    if limits.sink_hosts is not None:
        for annotation in (ON_SUCCESS_SINK, ON_FAILURE_SINK):
            sink = fields.get(ANNOTATIONS[annotation][0])
            if sink is not None and not host_allowed(urlsplit(sink).hostname or "", limits.sink_hosts):
                raise InvalidAsyncPolicy(annotation, str(annotations[annotation]),
                                         "its host is not on the cluster's NOTIFICATION_ALLOWED_HOSTS"
                                         f" ({', '.join(limits.sink_hosts)}): no completion event would be sent")
