"""The local backend: the whole stack on loopback, as `async-component local` runs it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from async_component.local.stack import LocalStack
from async_component.local.ports import free_port

from backend import NAMESPACE, Backend


class LocalBackend(Backend):
    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.name = "local-cluster" if stack.redis_cluster else "local"
        self.gateway_url = stack.gateway_url
        self.producer_url = stack.producer_url
        self.consumer_url = stack.consumer_url
        self.redis_url = stack.redis_url
        self.stream = stack.stream
        self.dead_letter_stream = stack.dead_letter_stream
        self.key_prefix = stack.key_prefix

    def host(self, service: str) -> str:
        return self.stack.host(service)

    def redis_client(self):
        if self.stack.redis_cluster is None:
            return super().redis_client()
        return self.stack.redis_cluster.cluster_client(require_full_coverage=False)

    def dead_letter_stream_of(self, service: str) -> str:
        if self.stack.redis_cluster is None:
            return self.dead_letter_stream
        return f"{self.dead_letter_stream}:{{{NAMESPACE}/{service}}}"

    def kill(self, component: str) -> None:
        self.stack.kill(component)

    def wait_ready(self, component: str, timeout: float = 60.0) -> None:
        self.stack.wait_ready(component, timeout=timeout)

    def stop_redis(self) -> None:
        self.stack.stop_redis()

    def start_redis(self) -> None:
        self.stack.start_redis()


@contextlib.contextmanager
def local_backend(*, redis_cluster: int = 0) -> Iterator[LocalBackend]:
    """The stack on one redis-server, or on a throwaway Redis Cluster of ``redis_cluster`` masters."""
    # Short delays so retries and reclaims happen within a test's patience.
    stack = LocalStack(port=free_port(), sleep_seconds=1, max_attempts=3, retry_delay=0.2, redis_cluster=redis_cluster)
    with stack:
        yield LocalBackend(stack)
