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
