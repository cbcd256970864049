"""The target-host policy: which Services a queued request may be sent to (``ALLOWED_HOSTS``, ``ALLOWED_PORTS``).

The producer applies it to ``Async-Original-Host`` before it queues a request;
the replay applies it again to the queued URL before it sends one, since a
stream entry or a CloudEvent can come from anyone who reaches Redis or the
consumer, not only from the producer. Same rules, one module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..hostlists import HOST, entry_error, host_allowed
from ..protocol import ORIGINAL_HOST_HEADER
from ..settings import SettingsError, TargetSettings


SERVICE_PORT = 80
"""The port of every Knative Service: a target host may name it without ``ALLOWED_PORTS``."""
_PORT = re.compile(r"[0-9]{1,5}")
"""ASCII digits only: int() also reads other scripts' digits."""


class BadTarget(ValueError):
    """Not a host name, with an optional port, that a request could be sent to."""


def target_host(value: str, what: str = ORIGINAL_HOST_HEADER) -> str:
    """``value`` as ``host`` or ``host:port``, lowercase; raises :class:`BadTarget` naming ``what``."""
    text = value.strip().lower()
    host, sep, port = text.rpartition(":") if ":" in text else (text, "", "")
    if sep and not (_PORT.fullmatch(port) and 0 < int(port) <= 65535):
        raise BadTarget(f"{what} has an invalid port: {value!r}")
    if len(host) > 253 or not HOST.fullmatch(host):
        raise BadTarget(f"{what} is not a valid host name: {value!r}")
    return f"{host}:{port}" if sep else host


def port_allowed(host: str, allowed_ports: Iterable[int]) -> bool:
    """No port, the Service's own, or one of ``allowed_ports``: never a Redis or metadata port by default."""
    _, sep, port = host.rpartition(":")
    return not sep or int(port) == SERVICE_PORT or int(port) in allowed_ports


def refusal(host: str, settings: TargetSettings) -> str | None:
    """Why the policy refuses the normalised ``host`` (from :func:`target_host`), or None when it allows it."""
    if not host_allowed(host, settings.allowed_hosts):
        return f"target host {host!r} is not allowed (ALLOWED_HOSTS)"
    if not port_allowed(host, settings.allowed_ports):
        return f"target port of {host!r} is not allowed (ALLOWED_PORTS)"
    return None


def validate(settings: TargetSettings) -> TargetSettings:
    """Raises :class:`SettingsError` for an ``ALLOWED_HOSTS`` (or ``NOTIFICATION_ALLOWED_HOSTS``) entry that is no
    host name or suffix."""
    for name, entries in (("ALLOWED_HOSTS", settings.allowed_hosts),
                          ("NOTIFICATION_ALLOWED_HOSTS", getattr(settings, "notification_allowed_hosts", None) or ())):
        for entry in entries:
            error = entry_error(name, entry)
            if error is not None:
                raise SettingsError(error)
    return settings
