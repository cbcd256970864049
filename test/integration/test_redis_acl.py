"""A Redis with an ACL user and no default user: credentials from REDIS_USERNAME / REDIS_PASSWORD.

The install reads them from the Secret's optional username and password keys,
so a password needs no URL-encoding; credentials in REDIS_URL still win.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from urllib.parse import quote

import pytest
import redis.exceptions

from async_component.dataplane.queues import Layout
from async_component.dataplane import producer
from async_component.dataplane.redisconn import make_redis
from async_component.local.ports import free_port
from async_component.settings import ProducerSettings, load

USER, PASSWORD = "async", "p@ss:w/rd%1"  # would need URL-encoding in REDIS_URL


@pytest.fixture
def acl_redis(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(tmp_path), "--save", "", "--appendonly", "no",
         "--user", "default", "off", "--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64):  # -NOAUTH: it answers
                    break
        except OSError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "redis-server with ACLs did not start"
        time.sleep(0.02)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)


async def test_the_acl_user_from_its_own_settings_is_used(acl_redis):
    anonymous = make_redis(load(ProducerSettings, {"REDIS_URL": acl_redis}))
    with pytest.raises(redis.exceptions.AuthenticationError):
        await anonymous.ping()
    await anonymous.aclose()

    client = make_redis(load(ProducerSettings, {"REDIS_URL": acl_redis, "REDIS_USERNAME": USER,
                                                "REDIS_PASSWORD": PASSWORD}))
    assert await client.ping() is True
    assert await client.acl_whoami() in (USER, USER.encode())
    await client.aclose()


async def test_credentials_in_the_url_win(acl_redis):
    url = acl_redis.replace("redis://", f"redis://{USER}:{quote(PASSWORD, safe='')}@")
    client = make_redis(load(ProducerSettings, {"REDIS_URL": url, "REDIS_USERNAME": "nobody", "REDIS_PASSWORD": "wrong"}))
    assert await client.acl_whoami() in (USER, USER.encode())
    await client.aclose()


def test_the_password_is_never_printed():
    settings = load(ProducerSettings, {"REDIS_PASSWORD": PASSWORD})
    assert settings.redis_password == PASSWORD
    assert PASSWORD not in repr(settings)


async def test_the_producer_queues_with_the_acl_user(acl_redis, http):
    settings = load(ProducerSettings, {"REDIS_URL": acl_redis, "REDIS_USERNAME": USER, "REDIS_PASSWORD": PASSWORD,
                                       "PORT": str(free_port()), "HOST": "127.0.0.1"})
    server = producer.make_server(settings)
    await server.start(settings.host, settings.port)
    try:
        async with http.post(f"http://127.0.0.1:{settings.port}/job", data=b"x",
                             headers={"Async-Original-Host": "sleep.default.svc.cluster.local"}) as resp:
            assert resp.status == 202, await resp.text()
    finally:
        await server.close()
    client = make_redis(settings)
    assert await client.xlen(Layout.of(settings).for_host("sleep.default.svc.cluster.local").stream) == 1
    await client.aclose()
