"""One Redis client per process, built from the shared Redis settings."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis.asyncio as aioredis

from ..settings import RedisSettings


def make_redis(settings: RedisSettings, *, socket_timeout: float | None = 5.0, max_connections: int | None = None) -> aioredis.Redis:
    """A pooled client; short connect timeout so an outage answers 503 instead of hanging."""
    kwargs: dict = {
        "socket_connect_timeout": 2.0,
        "socket_timeout": socket_timeout,
        "health_check_interval": 30,
        "max_connections": max_connections,
    }
    if settings.redis_ca_file:
        kwargs["ssl_ca_certs"] = settings.redis_ca_file
    # Credentials in the URL win (redis-py lets them override these); separate ones need no URL-encoding.
    if settings.redis_username:
        kwargs["username"] = settings.redis_username
    if settings.redis_password:
        kwargs["password"] = settings.redis_password
    return aioredis.Redis.from_url(settings.redis_url, **kwargs)


def redis_address(settings: RedisSettings) -> str:
    """``REDIS_URL`` as RedisStreamSource's ``ADDRESS`` names it in an event's source, never with credentials.

    Scheme, host, port and database path are kept as written (``redis://redis:6379/0``: the
    adapter's ``ce-source`` is ``<ADDRESS>/<stream>``); a user, a password and query
    parameters (which may hold one) are left out.
    """
    parts = urlsplit(settings.redis_url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
