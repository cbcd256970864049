import dataclasses
import subprocess
import sys

import pytest

from async_component.settings import (
    ConsumerSettings, ControllerSettings, ProducerSettings, ReplaySettings, SettingsError, SourceSettings, load,
)


def test_defaults_are_sane():
    producer = load(ProducerSettings, {})
    assert producer.request_size_limit == 6_000_000
    assert producer.allowed_hosts == (".svc.cluster.local",)
    assert producer.status_retention == 86400
    consumer = load(ConsumerSettings, {})
    assert consumer.max_attempts == 3 and consumer.retry_base_delay <= 2
    assert load(ControllerSettings, {}).ingress_class == "kourier.ingress.networking.knative.dev"
    assert producer.queue_mode == "per-service" and producer.max_queued_per_service == 100_000
    source = load(SourceSettings, {})
    assert (source.concurrency, source.max_inflight_per_service) == (32, 8)  # four hung Services to fill a source


def test_environment_is_read_and_flags_win():
    settings = load(ProducerSettings, {"PORT": "9000", "ALLOWED_HOSTS": "a.example, .svc.local"}, {"PORT": "9001"})
    assert settings.port == 9001
    assert settings.allowed_hosts == ("a.example", ".svc.local")


def test_a_source_posting_to_the_consumer_must_wait_longer_than_a_replay_takes():
    """Raising REQUEST_TIMEOUT in the ConfigMap past DELIVERY_TIMEOUT made a source post again an event whose replay
    was still running: the Service was called twice. Without SINK_URL the source replays itself: no such limit."""
    sink = {"SINK_URL": "http://consumer.ns.svc.cluster.local"}
    assert load(SourceSettings, {**sink, "REQUEST_TIMEOUT": "300"}).delivery_timeout == 330
    assert load(SourceSettings, {"REQUEST_TIMEOUT": "600"}).request_timeout == 600
    with pytest.raises(SettingsError, match=r"DELIVERY_TIMEOUT \(330s\) must be longer than REQUEST_TIMEOUT \(600s\)"
                                            r" with SINK_URL"):
        load(SourceSettings, {**sink, "REQUEST_TIMEOUT": "600"})
    assert load(SourceSettings, {**sink, "REQUEST_TIMEOUT": "600", "DELIVERY_TIMEOUT": "630"}).delivery_timeout == 630


def test_k_sink_is_an_alias_for_the_sink_url():
    assert load(SourceSettings, {"K_SINK": "http://consumer.ns.svc.cluster.local/"}).sink_url == "http://consumer.ns.svc.cluster.local"
    assert load(SourceSettings, {"K_SINK": "http://a", "SINK_URL": "http://b"}).sink_url == "http://b"


def test_the_source_reads_the_replay_settings_for_in_process_delivery():
    source = load(SourceSettings, {"MAX_ATTEMPTS": "5", "REQUEST_TIMEOUT": "7", "TARGET_GATEWAY_URL": "http://gw:80/"})
    assert source.sink_url is None
    assert (source.max_attempts, source.request_timeout, source.target_gateway_url) == (5, 7.0, "http://gw:80")
    replay = {f.metadata["env"] for f in dataclasses.fields(ReplaySettings)}
    assert replay <= {f.metadata["env"] for f in dataclasses.fields(SourceSettings)}
    assert replay <= {f.metadata["env"] for f in dataclasses.fields(ConsumerSettings)}


@pytest.mark.parametrize("cls, env, fragment", [
    (ProducerSettings, {"REQUEST_SIZE_LIMIT": "abc"}, "REQUEST_SIZE_LIMIT='abc' is invalid: must be a positive integer"),
    (ProducerSettings, {"REQUEST_SIZE_LIMIT": "0"}, "positive"),
    (ProducerSettings, {"PORT": "70000"}, "TCP port"),
    (ProducerSettings, {"REDIS_URL": "http://redis"}, "redis://"),
    (ProducerSettings, {"ALLOWED_HOSTS": " , "}, "at least one host"),
    (ConsumerSettings, {"RETRY_BASE_DELAY": "-1"}, "non-negative"),
    (ConsumerSettings, {"REQUEST_TIMEOUT": "inf"}, "number of seconds"),
    (SourceSettings, {"SINK_URL": "consumer:8080"}, "http://"),
    (SourceSettings, {"MAX_ATTEMPTS": "0"}, "MAX_ATTEMPTS='0' is invalid"),
    (ControllerSettings, {"INGRESS_CLASS_NAME": "contour.ingress.networking.knative.dev"}, "must be one of"),
    (ControllerSettings, {"LOG_LEVEL": "loud"}, "DEBUG"),
    (ProducerSettings, {"QUEUE_MODE": "one"}, "QUEUE_MODE='one' is invalid: must be per-service or single-stream"),
    (ProducerSettings, {"MAX_QUEUED_PER_SERVICE": "0"}, "positive integer"),
    (SourceSettings, {"MAX_INFLIGHT_PER_SERVICE": "none"}, "positive integer"),
    (ProducerSettings, {"REDIS_URL": "redis+cluster://a:7000,,b:7001"}, "redis+cluster://host:6379"),
    (ProducerSettings, {"REDIS_URL": "redis+cluster://a:7000/2"}, "database 0 only"),
    (ProducerSettings, {"REDIS_CLUSTER": "maybe"}, "true or false"),
    (ProducerSettings, {"REDIS_URL": "redis+cluster://a:7000", "QUEUE_MODE": "single-stream"}, "one Redis server"),
    (ProducerSettings, {"REDIS_URL": "unix:///run/redis.sock", "REDIS_CLUSTER": "true"}, "unix socket"),
])
def test_bad_values_give_a_one_line_reason(cls, env, fragment):
    with pytest.raises(SettingsError) as info:
        load(cls, env)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_every_setting_names_its_environment_variable():
    for cls in (ProducerSettings, ConsumerSettings, SourceSettings, ControllerSettings):
        for field in dataclasses.fields(cls):
            assert field.metadata["env"].isupper()
            assert field.metadata["help"]


def test_cli_exits_2_with_one_line_on_a_bad_value():
    result = subprocess.run(
        [sys.executable, "-m", "async_component", "consumer"],
        env={"MAX_ATTEMPTS": "many", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "async-component consumer: error: MAX_ATTEMPTS='many' is invalid: must be a positive integer"


def test_a_tls_ca_needs_a_tls_redis_url():
    with pytest.raises(SettingsError, match="rediss://"):
        load(ProducerSettings, {"REDIS_URL": "redis://r:6379/0", "REDIS_CA_FILE": "/etc/ca.crt"})
    assert load(ProducerSettings, {"REDIS_URL": "rediss://r:6380/0", "REDIS_CA_FILE": "/etc/ca.crt"}).redis_ca_file == "/etc/ca.crt"


@pytest.mark.parametrize(
    ("env", "allowed", "producer_host"),
    [
        ({}, (".svc.cluster.local",), "async-producer.knative-serving.svc.cluster.local"),
        ({"CLUSTER_DOMAIN": "corp.internal"}, (".svc.corp.internal",), "async-producer.knative-serving.svc.corp.internal"),
        ({"CLUSTER_DOMAIN": "Corp.Internal."}, (".svc.corp.internal",), "async-producer.knative-serving.svc.corp.internal"),
        ({"CLUSTER_DOMAIN": "corp.internal", "ALLOWED_HOSTS": "a.example"}, ("a.example",),
         "async-producer.knative-serving.svc.corp.internal"),
    ],
)
def test_cluster_domain_sets_the_allowed_hosts_and_the_producer_host(env, allowed, producer_host):
    assert load(ProducerSettings, env).allowed_hosts == allowed
    assert load(ControllerSettings, env).producer_host == producer_host


@pytest.mark.parametrize("raw", ["", "bad domain", "-x.local", "a..b", "x" * 64 + ".local"])
def test_bad_cluster_domain_is_a_settings_error(raw):
    with pytest.raises(SettingsError, match="CLUSTER_DOMAIN=.*must be a DNS domain"):
        load(ControllerSettings, {"CLUSTER_DOMAIN": raw})


@pytest.mark.parametrize("env, cluster", [
    ({}, False),
    ({"REDIS_URL": "redis+cluster://10.0.0.1:7000,10.0.0.2:7000"}, True),
    ({"REDIS_URL": "rediss+cluster://user:pw@redis.example.com:6380", "REDIS_CA_FILE": "/etc/ca.crt"}, True),
    ({"REDIS_URL": "redis://redis-cluster:6379", "REDIS_CLUSTER": "true"}, True),
    ({"REDIS_URL": "redis://redis:6379/0", "REDIS_CLUSTER": "false"}, False),
])
def test_a_redis_cluster_is_named_by_its_url_or_redis_cluster(env, cluster):
    assert load(SourceSettings, env).cluster is cluster
