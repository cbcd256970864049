"""A throwaway Redis Cluster of ``redis-server`` masters on loopback, for the local stack and the tests.

Each master is a :class:`RedisServer` with cluster mode on, so it runs the way
the project asks every Redis to run (AOF, ``noeviction``) and keeps its dir,
its data and its ``nodes.conf`` across :meth:`RedisCluster.kill` and
:meth:`RedisCluster.restart`. There are no replicas (``--cluster-replicas 0``
in ``redis-cli``'s words): the slots are split evenly over the masters with
``CLUSTER ADDSLOTSRANGE`` and the masters meet with ``CLUSTER MEET``.

``cluster-require-full-coverage no`` is set so that the masters still alive go
on serving their slots while one is down: that is what lets other Services'
requests complete during an outage of one master (docs/design.md, "Redis
Cluster"). ``cluster-node-timeout`` is short (2 s) so that the cluster notices a
dead or returning master quickly on one machine.
"""

from __future__ import annotations

import time

import redis

from .ports import free_cluster_port
from .redisserver import RedisServer, RedisServerError

SLOTS = 16384
NODE_TIMEOUT_MS = 2000
CLUSTER_ARGS = (
    "--cluster-enabled", "yes",
    "--cluster-config-file", "nodes.conf",
    "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
    "--cluster-require-full-coverage", "no",
)


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Inclusive slot ranges, one a master, as even as 16,384 slots allow."""
    return [(i * SLOTS // masters, (i + 1) * SLOTS // masters - 1) for i in range(masters)]


class RedisCluster:
    def __init__(self, masters: int = 3, *, executable: str = "redis-server") -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        self.nodes = [RedisServer(free_cluster_port(), executable=executable, extra_args=CLUSTER_ARGS) for _ in range(masters)]
        self._formed = False

    @property
    def url(self) -> str:
        """``REDIS_URL`` for the cluster: every master as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    @property
    def node_urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{node.port}" for node in self.nodes]

    def client(self, index: int) -> redis.Redis:
        """A plain client of one master (for ``CLUSTER`` commands and for looking at its keys)."""
        return redis.Redis(host="127.0.0.1", port=self.nodes[index].port, socket_timeout=5)

    def cluster_client(self, *, asynchronous: bool = True, **kwargs):
        """redis-py's cluster client of these masters (asyncio's, or with ``asynchronous=False`` the blocking one),
        for tests and benchmarks that look at the keys as the data plane sees them."""
        if asynchronous:
            from redis.asyncio.cluster import ClusterNode, RedisCluster as Client
        else:
            from redis.cluster import ClusterNode, RedisCluster as Client
        return Client(startup_nodes=[ClusterNode("127.0.0.1", node.port) for node in self.nodes], **kwargs)

    def start(self, timeout: float = 20.0) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            if not self._formed:
                self._form()
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self) -> None:
        first = self.client(0)
        try:
            for index, (low, high) in enumerate(slot_ranges(len(self.nodes))):
                with self.client(index) as node:
                    node.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
            for node in self.nodes[1:]:
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        finally:
            first.close()
        self._formed = True

    def wait_ok(self, timeout: float = 20.0, *, alive: list[int] | None = None) -> None:
        """Until every running master sees the cluster whole: all masters known, every slot served."""
        indexes = alive if alive is not None else [i for i, node in enumerate(self.nodes) if node.process is not None]
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            states = [self._state(i) for i in indexes]
            if all(state == "ok" for state in states):
                return
            last = ", ".join(f"{self.nodes[i].port}: {state}" for i, state in zip(indexes, states))
            time.sleep(0.05)
        raise RedisServerError(f"the Redis Cluster did not form within {timeout}s ({last})")

    def _state(self, index: int) -> str:
        try:
            with self.client(index) as node:
                info = node.cluster("INFO")
                nodes = node.cluster("NODES")
        except redis.RedisError as exc:
            return f"unreachable ({exc})"
        if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != SLOTS:
            return f"state {info.get('cluster_state')}, {info.get('cluster_slots_ok')} slots ok"
        connected = [name for name, node in nodes.items() if node.get("connected")]
        if int(info.get("cluster_known_nodes", 0)) != len(self.nodes) or len(connected) < len(self.nodes):
            return f"{len(connected)} of {len(self.nodes)} masters connected"
        return "ok"

    def index_of_slot(self, slot: int) -> int:
        """The master serving ``slot`` (by the even split :meth:`start` made; resharding changes it)."""
        for index, (low, high) in enumerate(slot_ranges(len(self.nodes))):
            if low <= slot <= high:
                return index
        raise ValueError(f"no slot {slot}")

    def kill(self, index: int) -> None:
        """``kill -9`` of one master; its dir stays, so :meth:`restart` brings it back with what AOF kept."""
        self.nodes[index].kill(hard=True)

    def restart(self, index: int, timeout: float = 20.0) -> None:
        self.nodes[index].start()
        self.wait_ok(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self._formed = False

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
