"""The hiredis packer sends the bytes redis-py would, and refuses what redis-py refuses."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from async_component.dataplane import hirespack

COMMANDS = [
    ("EVALSHA", "0123abcd", 2, "k1", "k2", b"x" * 7000, "", 0, 86400000),
    ("SET", "k", 0.1),
    ("SET", "k", 1e20),
    ("SET", "k", -5),
    ("SET", "k", 2**70),
    ("SET", "k", "é ü"),
    ("SET", "k", b"\x00\xff\r\n"),
    ("SET", "k", bytearray(b"cd")),
    ("SET", "k", memoryview(b"ab")),
    ("CONFIG GET", "maxmemory-policy"),
    (b"CONFIG GET", "maxmemory-policy"),
]


def command_id(command: tuple) -> str:
    """The first arguments, the same in every process (a memoryview's repr holds its address)."""
    return repr(tuple(f"memoryview({bytes(a)!r})" if isinstance(a, memoryview) else a for a in command[:3]))[:40]


@pytest.mark.parametrize("command", COMMANDS, ids=command_id)
def test_the_same_bytes_as_redis_py(command):
    packed = hirespack._packed(Connection)()
    assert b"".join(packed.pack_command(*command)) == b"".join(Connection().pack_command(*command))


@pytest.mark.parametrize("value", [None, True, object()])
def test_what_redis_py_refuses_is_refused_the_same_way(value):
    with pytest.raises(DataError):
        hirespack._packed(Connection)().pack_command("SET", "k", value)


@pytest.mark.parametrize("url, kind", [
    ("redis://127.0.0.1:6379/0", Connection),
    ("rediss://127.0.0.1:6379/0", SSLConnection),
    ("unix:///tmp/redis.sock", UnixDomainSocketConnection),
])
def test_a_client_keeps_its_kind_of_connection(url, kind):
    client = aioredis.Redis.from_url(url)
    hirespack.packing(client)
    hirespack.packing(client)  # twice: still one layer
    made = client.connection_pool.make_connection()
    assert isinstance(made, kind) and isinstance(made, hirespack._Packed)
    assert client.connection_pool.connection_class.__mro__.count(hirespack._Packed) == 1
