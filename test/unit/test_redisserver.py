import time

import redis

from async_component.local.redisserver import RedisServer


def test_server_starts_answers_restarts_and_cleans_up():
    server = RedisServer().start()
    temp_dir = server.dir
    client = redis.Redis.from_url(server.url)
    client.set("k", "v")
    assert client.get("k") == b"v"
    server.kill()
    assert not server.ping()
    server.start()
    assert server.ping()
    assert redis.Redis.from_url(server.url).get("k") == b"v"
    server.stop()
    assert not temp_dir.exists()


def test_what_redis_acknowledged_survives_a_kill_9():
    """The local stack's Redis runs with AOF: a crash loses nothing it acknowledged (it lost half without)."""
    server = RedisServer().start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        pipe = client.pipeline(transaction=False)
        for n in range(3000):
            pipe.xadd("async-requests", {"data": str(n)})
        pipe.execute()
        # everysec may hold writes back while a slow fsync runs (the documented loss on a crash):
        # kill once everything acknowledged has left Redis's AOF buffer for the file
        deadline = time.monotonic() + 10
        while client.info("persistence")["aof_buffer_length"] and time.monotonic() < deadline:
            time.sleep(0.05)
        client.close()
        server.process.kill()  # SIGKILL: no shutdown save
        server.process.wait()
        server.process = None
        server.start()
        assert redis.Redis.from_url(server.url).xlen("async-requests") == 3000
    finally:
        server.stop()
