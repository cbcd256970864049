"""What an e2e scenario may ask of the platform it runs on.

The same scenarios run against the local stack (everything on loopback) and
against kind clusters with Kourier or Istio; each platform implements this
interface once, and scenarios only use it.
"""

from __future__ import annotations

import abc

SERVICE_CONDITIONAL = "helloworld-sleep"
SERVICE_ALWAYS = "helloworld-sleep-always"
SERVICE_PLAIN = "helloworld-sleep-plain"
SERVICES = (SERVICE_CONDITIONAL, SERVICE_ALWAYS, SERVICE_PLAIN)
NAMESPACE = "default"


class Backend(abc.ABC):
    name: str
    gateway_url: str
    """Where clients send requests; the Host header picks the Service."""
    producer_url: str
    """The producer reached directly, bypassing the gateway (kind: a port-forward)."""
    consumer_url: str
    """The consumer reached directly, to hand it events as a source would (kind: a port-forward)."""
    redis_url: str
    """Redis as the test process reaches it (kind: a port-forward)."""
    stream: str
    dead_letter_stream: str
    key_prefix: str

    def host(self, service: str) -> str:
        """External host of a sample Service, e.g. helloworld-sleep.default.example.com."""
        return f"{service}.{NAMESPACE}.example.com"

    @staticmethod
    def cluster_host(service: str) -> str:
        return f"{service}.{NAMESPACE}.svc.cluster.local"

    def redis_client(self):
        """An asyncio client of Redis as the test process reaches it (a cluster client on a Redis Cluster)."""
        import redis.asyncio as aioredis

        return aioredis.Redis.from_url(self.redis_url)

    def dead_letter_stream_of(self, service: str) -> str:
        """Where a sample Service's dead letters go: the one stream, or on a Redis Cluster the Service's own."""
        return self.dead_letter_stream

    @abc.abstractmethod
    def kill(self, component: str) -> None:
        """SIGKILL the component ("producer", "source" or "consumer"); the platform restarts it."""

    @abc.abstractmethod
    def wait_ready(self, component: str, timeout: float = 60.0) -> None:
        """Return once the component serves again."""

    @abc.abstractmethod
    def stop_redis(self) -> None:
        """Make Redis unreachable for the component (the test still expects its data back)."""

    @abc.abstractmethod
    def start_redis(self) -> None:
        """Bring Redis back with its data, and wait until it answers."""
