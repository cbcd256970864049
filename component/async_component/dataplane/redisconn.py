"""One Redis client per process, built from the shared Redis settings: one server, or a Redis Cluster.

On a cluster (``REDIS_URL=redis+cluster://host:port[,host:port...]``, or
``REDIS_CLUSTER=true``) the client is redis-py's ``RedisCluster``, which routes
each command by its key's slot. What it does not do as one server does is
covered here, so that the callers write each command once:

- a transaction: redis-py's cluster ``MULTI`` takes a thread per queued
  command, and a ``PUBLISH`` cannot join one. :func:`transaction` gives the
  callers one object for both: a ``MULTI`` pipeline on one server, unchanged;
  on a cluster a recorder of the same commands that runs those of each slot
  as one script (:data:`ATOMIC`). Every key of one Service shares a slot
  (:mod:`.queues`), so what one Service's outcome writes is still written all
  together or not at all.
- a pipeline over several masters: redis-py fails all of it when one master
  does not answer; :func:`per_node` sends one pipeline per master instead.
- scripts in a pipeline: redis-py blocks ``evalsha`` in a cluster pipeline;
  :func:`queue_script` sends the same ``EVALSHA`` as a plain command, and
  :func:`reload_missing` runs again the calls a master answered ``NOSCRIPT``
  (it restarted and lost its scripts).
- a look at a key of every slot: :func:`sweep`, one script per master.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import BasicKeyCommands, PubSubCommands, SortedSetCommands, StreamCommands
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError, NoScriptError

from ..settings import RedisSettings
from .retries import wait_event

Item = TypeVar("Item")


def make_redis(settings: RedisSettings, *, socket_timeout: float | None = 5.0,
               max_connections: int | None = None) -> aioredis.Redis | RedisCluster:
    """A pooled client; short connect timeout so an outage answers 503 instead of hanging."""
    kwargs: dict = {
        "socket_connect_timeout": 2.0,
        "socket_timeout": socket_timeout,
        "health_check_interval": 30,
    }
    if settings.redis_ca_file:
        kwargs["ssl_ca_certs"] = settings.redis_ca_file
    # Credentials in the URL win (redis-py lets them override these); separate ones need no URL-encoding.
    if settings.redis_username:
        kwargs["username"] = settings.redis_username
    if settings.redis_password:
        kwargs["password"] = settings.redis_password
    if settings.cluster:
        return _make_cluster(settings, kwargs, max_connections)
    return aioredis.Redis.from_url(settings.redis_url, max_connections=max_connections, **kwargs)


def _make_cluster(settings: RedisSettings, kwargs: dict, max_connections: int | None) -> RedisCluster:
    parts = urlsplit(settings.redis_url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    if userinfo:
        user, _, password = userinfo.partition(":")
        if user:
            kwargs["username"] = unquote(user)
        if password:
            kwargs["password"] = unquote(password)
    nodes = []
    for address in hosts.split(","):
        node = urlsplit(f"//{address.strip()}")
        nodes.append(ClusterNode(node.hostname or "127.0.0.1", node.port or 6379))
    return RedisCluster(
        startup_nodes=nodes, ssl=parts.scheme.startswith("rediss"),
        # a master that is down leaves its slots unserved: the other masters' Services keep working
        require_full_coverage=False,
        max_connections=max_connections or 2**31, **kwargs)


def is_cluster(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


def master_of(redis: Any, key: str | bytes) -> str | None:
    """The name of the master serving ``key`` in redis-py's slot map; None on one server, or while the map is not
    known (the caller then treats the key as of no master in particular)."""
    if not is_cluster(redis):
        return None
    nodes = redis.nodes_manager.slots_cache.get(key_slot(key.encode() if isinstance(key, str) else key))
    return nodes[0].name if nodes else None


async def on_every_master(redis: RedisCluster, follow: Callable[[ClusterNode], Awaitable[None]],
                          stop: asyncio.Event, on_error: Callable[[Exception], None], interval: float = 5.0) -> None:
    """``follow(master)`` for each master of the cluster until ``stop``: started for a master that joins (every
    ``interval``), again if it returned, cancelled for one that is no longer a master.

    For subscriptions (a message published on any node reaches every node): one held on a master that hangs stays
    open and silent, so one on each keeps every message coming while any master answers.
    """
    following: dict[str, asyncio.Task] = {}
    try:
        while not stop.is_set():
            try:
                if redis._initialize:
                    await redis.initialize()
                masters = {node.name: node for node in redis.get_primaries()}
            except Exception as exc:  # no node answers: those following keep trying meanwhile
                on_error(exc)
                masters = {}
            for name in [name for name in following if masters and name not in masters]:
                following.pop(name).cancel()
            for name, node in masters.items():
                if name not in following or following[name].done():
                    following[name] = asyncio.create_task(follow(node), name=f"follow-{name}")
            await wait_event(stop, interval)
    finally:
        for task in following.values():
            task.cancel()
        if following:
            await asyncio.wait(following.values(), timeout=2.0)


async def ping(redis: Any) -> None:
    """Raise unless Redis answers; on a cluster, unless one of its masters does (a master that is down costs its
    own Services their 503s, not every Service its readiness)."""
    if not is_cluster(redis):
        await redis.ping()
        return
    if redis._initialize:
        await redis.initialize()
    error: Exception | None = None
    for node in redis.get_primaries():
        try:
            await redis.ping(target_nodes=node)
            return
        except Exception as exc:
            error = exc
    raise error or ConnectionError("no master of the Redis Cluster is known")


def redis_address(settings: RedisSettings) -> str:
    """``REDIS_URL`` as RedisStreamSource's ``ADDRESS`` names it in an event's source, never with credentials.

    Scheme, host, port and database path are kept as written (``redis://redis:6379/0``: the
    adapter's ``ce-source`` is ``<ADDRESS>/<stream>``); a user, a password and query
    parameters (which may hold one) are left out.
    """
    parts = urlsplit(settings.redis_url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


# --- pipelines

async def per_node(redis: Any, items: Sequence[Item], key_of: Callable[[Item], Any],
                   add: Callable[[Any, Item], Awaitable[None] | None]) -> list:
    """``add(pipe, item)`` for every item in one pipeline: each item's reply, or its error.

    On a cluster, one pipeline per node (by the slot of ``key_of(item)``), the nodes in
    parallel: redis-py fails a whole cluster pipeline when one node does not answer, and the
    items of the other nodes must not share that fate (a master down costs its own Services).
    """
    if not is_cluster(redis):
        async with redis.pipeline(transaction=False) as pipe:
            for item in items:
                done = add(pipe, item)
                if asyncio.iscoroutine(done):  # a script's call
                    await done
            return await pipe.execute(raise_on_error=False)
    if redis._initialize:
        await redis.initialize()
    groups: dict[str, list[int]] = {}
    for n, item in enumerate(items):
        groups.setdefault(redis.get_node_from_key(key_of(item)).name, []).append(n)

    retries = min(1, redis.retry.get_retries())  # the producer's client makes none: a write is never sent twice

    async def run(members: list[int]) -> list:
        for _ in range(retries + 1):
            async with redis.pipeline(transaction=False) as pipe:
                for n in members:
                    done = add(pipe, items[n])
                    if asyncio.iscoroutine(done):  # a script's call
                        await done
                replies = await pipe.execute(raise_on_error=False)
            # a connection the master closed (it restarted) fails every command at once: on a fresh one, again
            if not any(isinstance(reply, RedisConnectionError) for reply in replies):
                break
        return replies

    replies: list = [None] * len(items)
    for members, reply in zip(groups.values(), await asyncio.gather(*(run(m) for m in groups.values()),
                                                                    return_exceptions=True)):
        for i, n in enumerate(members):
            replies[n] = reply if isinstance(reply, BaseException) else reply[i]
    return replies


async def call_scripts(redis: Any, calls: Sequence[tuple[Any, Sequence, Sequence]]) -> list:
    """Each ``(script, keys, args)`` in one round trip (one per node on a cluster): its result, or its error."""
    replies = await per_node(redis, calls, lambda call: call[1][0],
                             lambda pipe, call: queue_script(pipe, *call))
    return await reload_missing(calls, replies)


# --- a look at every slot

SWEEP = """#!lua flags=allow-cross-slot-keys,no-writes
local found = {}
for i = 2, #ARGV do
  if ARGV[1] == 'ZRANGE' then
    local members = redis.call('ZRANGE', ARGV[i], 0, -1, 'WITHSCORES')
    if #members > 0 then found[#found + 1] = {i - 1, members} end
  else
    local length = redis.call('XLEN', ARGV[i])
    if length > 0 then found[#found + 1] = {i - 1, length} end
  end
end
return found
"""
"""Reads the keys in ARGV (all served by the node it runs on, of any slots): ``{position, reply}`` of the
non-empty ones; ARGV[1] says how (``ZRANGE``: the members and scores of a sorted set, else a stream's length)."""


async def sweep(redis: RedisCluster, keys: Sequence[str], how: str,
                owned: dict[str | None, list[int]] | None = None) -> tuple[dict[int, Any], set[int]]:
    """A cluster's per-slot keys (``keys[slot]``), read where they live, one script a master:
    ``({slot: reply}`` of those not empty, the slots of the masters that did not answer``)``. ``owned``: only
    these masters' slots (by name; None, every master's).

    A pipeline of 16,384 commands costs a client about half a second of CPU; this, a few ms.
    """
    if redis._initialize:
        await redis.initialize()
    if owned is None:
        owned = {}
        for slot, nodes in redis.nodes_manager.slots_cache.items():
            owned.setdefault(nodes[0].name, []).append(slot)

    async def read(name: str, slots: list[int]) -> list:
        return await redis.execute_command("EVAL", SWEEP, 0, how, *(keys[slot] for slot in slots),
                                           target_nodes=redis.get_node(node_name=name))

    found: dict[int, Any] = {}
    unread: set[int] = set()
    replies = await asyncio.gather(*(read(name, slots) for name, slots in owned.items()), return_exceptions=True)
    for slots, reply in zip(owned.values(), replies):
        if isinstance(reply, BaseException):  # a master down (or a slot that moved: the next look finds it)
            unread.update(slots)
            continue
        for position, value in reply:
            found[slots[position - 1]] = value
    return found, unread


# --- scripts

class ClusterScript:
    """A script on a cluster: ``EVALSHA`` on the master of its first key, ``EVAL`` there when that master answers
    ``NOSCRIPT`` (it restarted). redis-py's own loads it on every master first, so it waits for any that is slow,
    and fails while any is down."""

    def __init__(self, redis: RedisCluster, script: str) -> None:
        self.redis = redis
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()

    async def __call__(self, keys: Sequence = (), args: Sequence = (), client: Any = None) -> Any:
        try:
            return await self.redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.redis.eval(self.script, len(keys), *keys, *args)


def register_script(redis: Any, script: str) -> Any:
    """redis-py's registered script on one server; a :class:`ClusterScript` on a cluster."""
    return ClusterScript(redis, script) if is_cluster(redis) else redis.register_script(script)


# --- scripts in pipelines

def add_evalsha(pipe: Any, sha: str, keys: Sequence, args: Sequence) -> None:
    """``EVALSHA`` in ``pipe``; the caller runs again what was answered ``NOSCRIPT``."""
    if is_cluster(getattr(pipe, "cluster_client", None)):
        pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
    else:
        pipe.evalsha(sha, len(keys), *keys, *args)


async def queue_script(pipe: Any, script: Any, keys: Sequence, args: Sequence) -> None:
    """Add a registered script's call to ``pipe``: a bare ``EVALSHA`` (redis-py's own call in a pipeline asks
    ``SCRIPT EXISTS`` first, one more round trip per batch); :func:`reload_missing` runs again what was
    answered ``NOSCRIPT``."""
    add_evalsha(pipe, script.sha, keys, args)


def by_slot(keys: Iterable[str]) -> dict[int, list[int]]:
    """The positions of ``keys`` grouped by hash slot: the keys one script may touch together on a cluster."""
    groups: dict[int, list[int]] = {}
    for n, key in enumerate(keys):
        groups.setdefault(key_slot(key.encode()), []).append(n)
    return groups


async def reload_missing(calls: Sequence[tuple[Any, Sequence, Sequence]], replies: list) -> list:
    """``replies`` of the script ``calls`` (script, keys, args), the ``NOSCRIPT`` ones run again (loading it)."""
    for n, reply in enumerate(replies):
        if isinstance(reply, NoScriptError):
            script, keys, args = calls[n]
            try:
                replies[n] = await script(keys=keys, args=args)
            except Exception as exc:
                replies[n] = exc
    return replies


# --- transactions

ATOMIC = """#!lua
local i, n = 1, #ARGV
while i <= n do
  local argc = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + argc))
  i = i + argc + 1
end
return n
"""
"""Runs the commands in ARGV (each: its word count, then its words) as one, all in the slot of KEYS[1].

Declared with a shebang, so a Redis out of memory refuses it before any write (like ``EXEC``
after a refused command): all or nothing.
"""


class SlotTransaction(BasicKeyCommands, StreamCommands, SortedSetCommands, PubSubCommands):
    """redis-py's command methods, recorded, then run as one :data:`ATOMIC` script per slot.

    A ``PUBLISH`` goes with the slot of its message (ours are record keys: the announcement
    leaves with the record it announces). Replies are ``None`` per command, or its slot's error.
    """

    def __init__(self, redis: RedisCluster) -> None:
        self.redis = redis
        self.commands: list[tuple[int, Any, tuple]] = []
        """Each command's slot, the key it is routed by, its words."""

    def execute_command(self, *args: Any, **options: Any) -> SlotTransaction:
        route = args[2] if args[0] == "PUBLISH" else args[1]
        self.commands.append((key_slot(self.redis.encoder.encode(route)), route, args))
        return self

    def __len__(self) -> int:
        return len(self.commands)

    async def __aenter__(self) -> SlotTransaction:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.commands = []

    async def execute(self, raise_on_error: bool = True) -> list:
        if not self.commands:
            return []
        groups: dict[int, list[int]] = {}
        for n, (slot, _, _) in enumerate(self.commands):
            groups.setdefault(slot, []).append(n)
        script = _atomic(self.redis)
        calls = []
        for members in groups.values():
            words: list = []
            for n in members:
                args = self.commands[n][2]
                words += (len(args), *args)
            calls.append((script, [self.commands[members[0]][1]], words))
        replies = await call_scripts(self.redis, calls)
        results: list = [None] * len(self.commands)
        for members, reply in zip(groups.values(), replies):
            if isinstance(reply, Exception):
                if raise_on_error:
                    raise reply
                for n in members:
                    results[n] = reply
        self.commands = []
        return results


def _atomic(redis: RedisCluster) -> Any:
    script = getattr(redis, "_async_component_atomic", None)
    if script is None:
        script = redis._async_component_atomic = ClusterScript(redis, ATOMIC)
    return script


def transaction(redis: Any) -> Any:
    """``async with transaction(redis) as pipe``: a ``MULTI`` pipeline, or on a cluster its per-slot stand-in."""
    return SlotTransaction(redis) if is_cluster(redis) else redis.pipeline(transaction=True)
