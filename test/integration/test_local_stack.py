"""``async-component local`` and the LocalStack API: real processes on loopback."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from async_component import protocol
from async_component.local.gateway import Router
from async_component.local import StackError
from async_component.local.cluster import cluster_routes, find_app_dir, load_services
from async_component.local.stack import LocalStack
from async_component.local.ports import free_port

APP_DIR = Path(__file__).resolve().parents[1] / "app"
PLAIN, CONDITIONAL, ALWAYS = "helloworld-sleep-plain", "helloworld-sleep", "helloworld-sleep-always"
PRODUCER_HOST = "async-producer.knative-serving.svc.cluster.local"


def http(url: str, host: str, *, method: str = "GET", data: bytes | None = None, headers: dict | None = None, timeout=30):
    """(status, headers, body) of one request with the given Host; errors are answers too."""
    request = urllib.request.Request(url, data=data, method=method, headers={"Host": host, **(headers or {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()


def poll(check, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)


def accepted_then_finished(stack: LocalStack, service: str, path: str):
    """Send an async request (the Service is always async): 202, then poll its Location until it is final."""
    status, headers, _ = http(stack.gateway_url + path, stack.host(service))
    assert status == 202
    location = headers["Location"]

    def finished():
        answer = http(stack.gateway_url + location, stack.host(service))
        return answer if answer[0] != 202 else None

    return poll(finished)


# --- the route table the stack hands to its gateway (no processes)


@pytest.mark.parametrize(("service", "path", "headers", "goes_to"), [
    (PLAIN, "/", {}, "app"),
    (PLAIN, "/", {"Prefer": "respond-async"}, "app"),
    (CONDITIONAL, "/", {}, "app"),
    (CONDITIONAL, "/", {"Prefer": "respond-async"}, "producer"),
    (CONDITIONAL, "/.well-known/async-requests/abc", {}, "producer"),
    (ALWAYS, "/", {}, "producer"),
    (ALWAYS, "/", {"Prefer": "respond-sync"}, "app"),
    (ALWAYS, "/", {"Prefer": "respond-sync, return=minimal"}, "producer"),
    (ALWAYS, "/", {"Prefer": "respond-sync, return=minimal", "Async-Replay": "true"}, "app"),
    (CONDITIONAL, "/", {"Prefer": "respond-sync, return=minimal", "Async-Replay": "true"}, "app"),
    # the status path (GET reads, DELETE cancels) goes to the producer whatever else the request says
    (ALWAYS, "/.well-known/async-requests/abc", {"Prefer": "respond-sync"}, "producer"),
    (CONDITIONAL, "/.well-known/async-requests/abc", {"Prefer": "respond-async, wait=5"}, "producer"),
    # Prefer is matched exactly: a wait preference routes async only on an always-async Service
    (CONDITIONAL, "/", {"Prefer": "respond-async, wait=5"}, "app"),
    (ALWAYS, "/", {"Prefer": "respond-async, wait=5"}, "producer"),
])
def test_route_table_of_the_sample_services(service, path, headers, goes_to):
    routes = cluster_routes(load_services(APP_DIR), app_address="127.0.0.1:1", producer_address="127.0.0.1:2")
    router = Router(routes)
    for host in (f"{service}.default.example.com", f"{service}.default.svc.cluster.local"):
        target = router.match(host, path, headers)
        assert target.address == {"app": "127.0.0.1:1", "producer": "127.0.0.1:2"}[goes_to]
        if goes_to == "producer":
            assert target.host == PRODUCER_HOST
            assert dict(target.set_headers)[protocol.ORIGINAL_HOST_HEADER] == f"{service}.default.svc.cluster.local"


def test_the_policy_service_routes_its_annotations_to_the_producer():
    router = Router(cluster_routes(load_services(APP_DIR), app_address="127.0.0.1:1", producer_address="127.0.0.1:2"))
    target = router.match("helloworld-sleep-policy.default.example.com", "/", {"Prefer": "respond-async"})
    policy = protocol.DeliveryPolicy.decode(dict(target.set_headers)[protocol.POLICY_HEADER])
    assert (policy.retry, policy.backoff_policy, policy.timeout, policy.retry_on) == (5, "linear", 5.0, ("429", "5xx"))
    plain = router.match(f"{CONDITIONAL}.default.example.com", "/", {"Prefer": "respond-async"})
    assert dict(plain.set_headers)[protocol.POLICY_HEADER] == "v1", "a Service without policy annotations: defaults"


def test_an_invalid_policy_annotation_is_refused_in_one_line(tmp_path):
    (tmp_path / "bad.yml").write_text(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: bad\n  namespace: default\n"
        "  annotations:\n    networking.knative.dev/ingress.class: async.ingress.networking.knative.dev\n"
        "    async.knative.dev/max-age: 2s\nspec: {template: {spec: {containers: [{image: x}]}}}\n")
    with pytest.raises(StackError, match=r"Service default/bad: annotation async.knative.dev/max-age='2s' is invalid"):
        cluster_routes(load_services(tmp_path), app_address="127.0.0.1:1", producer_address="127.0.0.1:2")



@pytest.mark.parametrize(("metadata", "twice", "message"), [
    ("{namespace: default}", False, r"bad.yml: a Knative Service without metadata.name$"),
    ("{name: Bad_Name}", False, r"bad.yml: Service name 'Bad_Name' is not a DNS-1035 label \(at most 63"),
    ("{name: 1st}", False, r"Service name '1st' is not a DNS-1035 label"),
    ("{name: " + "a" * 64 + "}", False, r"is not a DNS-1035 label"),
    ("{name: ok, namespace: My_NS}", False, r"bad.yml: Service ok: namespace 'My_NS' is not a DNS-1123 label"),
    ("{name: ok}", True, r"bad2.yml: Service default/ok again \(first in .*bad.yml\): each Service once"),
    ("{name: ok, namespace: default}", True, r"Service default/ok again"),
])
def test_a_service_the_api_server_would_refuse_or_one_defined_twice_is_refused_in_one_line(tmp_path, metadata, twice,
                                                                                          message):
    manifest = f"apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {metadata}\nspec: {{}}\n"
    (tmp_path / "bad.yml").write_text(manifest)
    if twice:
        (tmp_path / "bad2.yml").write_text(manifest.replace("namespace: default", "namespace: ''"))
    with pytest.raises(StackError, match=message):
        load_services(tmp_path)


def test_a_service_without_a_name_stops_the_command_in_one_line(tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    shutil.copy(APP_DIR / "sleep_app.py", app_dir / "sleep_app.py")
    (app_dir / "svc.yml").write_text("apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {}\nspec: {}\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    process = run_local(tmp, "--port", str(free_port()), "--app-dir", str(app_dir))
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert err.strip().splitlines() == [
        f"async-component local: error: {app_dir / 'svc.yml'}: a Knative Service without metadata.name"], err

def test_route_table_follows_the_cluster_domain():
    routes = cluster_routes(load_services(APP_DIR), app_address="127.0.0.1:1", producer_address="127.0.0.1:2",
                            cluster_domain="corp.internal")
    router = Router(routes)
    assert router.match(f"{CONDITIONAL}.default.svc.cluster.local", "/", {}) is None
    target = router.match(f"{CONDITIONAL}.default.svc.corp.internal", "/", {"Prefer": "respond-async"})
    assert target.host == "async-producer.knative-serving.svc.corp.internal"
    assert dict(target.set_headers)[protocol.ORIGINAL_HOST_HEADER] == f"{CONDITIONAL}.default.svc.corp.internal"


def test_app_dir_is_found_from_the_repository_root_or_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(APP_DIR.parents[1])
    assert find_app_dir() == APP_DIR
    monkeypatch.chdir(tmp_path)  # elsewhere: the app of the repository the package runs from
    assert find_app_dir() == APP_DIR
    with pytest.raises(StackError, match=r"cannot find the sample app \(sleep_app.py\) in --app-dir .*: the app dir holds"
                                         " it beside the Service manifests"):
        find_app_dir(tmp_path)


def test_bad_settings_are_refused_before_anything_starts():
    with pytest.raises(StackError, match="max attempts 0 must be a positive integer; retry delay -1 must be"):
        LocalStack(port=free_port(), max_attempts=0, retry_delay=-1)


# --- the stack through its Python API


@pytest.fixture(scope="module")
def stack():
    with LocalStack(port=free_port(), sleep_seconds=0.2, retry_delay=0.1, app_dir=APP_DIR) as stack:
        yield stack


def test_sync_call_reaches_the_app_through_the_gateway(stack):
    status, _, body = http(stack.gateway_url + "/hello?sleep=0", stack.host(PLAIN), headers={"Prefer": "respond-async"})
    assert status == 200
    assert b'"path": "/hello"' in body
    assert b'["Knative-Serving-Revision", "helloworld-sleep-plain-00001"]' in body


def test_unknown_host_is_404(stack):
    status, _, body = http(stack.gateway_url + "/", "nobody.default.example.com")
    assert status == 404 and b"error" in body


def test_async_call_is_queued_and_completed(stack):
    status, headers, body = http(stack.gateway_url + "/work?sleep=0", stack.host(CONDITIONAL), method="POST",
                                 data=b"payload", headers={"Prefer": "respond-async"})
    assert status == 202, body
    location = headers["Location"]

    def finished():
        status, headers, body = http(stack.gateway_url + location, stack.host(CONDITIONAL))
        return (status, headers, body) if status != 202 else None

    status, headers, body = poll(finished)
    assert status == 200 and headers["Async-Request-State"] == "succeeded"
    assert b'"path": "/work"' in body and b'"body_length": 7' in body


@pytest.mark.slow
def test_a_stack_whose_source_posts_to_the_consumer_replays_through_the_consumer():
    """Also under another cluster domain: child rules, the producer's allowed hosts and the replays follow it."""
    with LocalStack(port=free_port(), sleep_seconds=0, app_dir=APP_DIR, replay_in_source=False,
                    cluster_domain="corp.internal") as stack:
        status, headers, _ = accepted_then_finished(stack, ALWAYS, "/via?sleep=0")
        assert status == 200 and headers["Async-Request-State"] == "succeeded"
        _, _, metrics = http(stack.consumer_url + "/metrics", "localhost")
        assert re.search(rb'async_consumer_replays_total\{outcome="succeeded"\} 1\.0', metrics), metrics[-2000:]


@pytest.mark.slow
def test_the_single_stream_layout_queues_and_retries_in_the_one_stream_a_redis_stream_source_reads():
    """QUEUE_MODE=single-stream with the source posting CloudEvents to the consumer: RedisStreamSource's topology."""
    import redis

    with LocalStack(port=free_port(), sleep_seconds=0, app_dir=APP_DIR, replay_in_source=False,
                    queue_mode="single-stream", retry_delay=0.1) as stack:
        outcomes = [accepted_then_finished(stack, ALWAYS, path)
                    for path in ("/fine?sleep=0", "/failing?sleep=0&status=503")]
        assert [(status, headers["Async-Request-State"]) for status, headers, _ in outcomes] == [
            (200, "succeeded"), (503, "failed")]
        client = redis.Redis.from_url(stack.redis_url)
        # both requests and the failing one's two retries went through the one stream; no per-Service queue
        assert client.xinfo_stream(stack.stream)["entries-added"] == 4
        assert client.keys("async:*:q") == [] and client.keys("async:*:r") == []
        client.close()


def test_killed_component_is_restarted_and_the_restart_logged(stack):
    before = stack.pid("source"), stack.restarts("source")
    stack.kill("source")
    stack.wait_ready("source", timeout=30)
    assert stack.pid("source") != before[0]
    assert stack.restarts("source") == before[1] + 1
    assert any(re.search(rf"source \(pid {before[0]}\) exited: killed by SIGKILL; restarting .*restart {before[1] + 1}", line)
               for line in stack.logs("source"))


def test_asking_for_an_unknown_component_is_a_clear_error(stack):
    with pytest.raises(StackError, match="no component 'worker'"):
        stack.kill("worker")


# --- the command


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Lines:
    """Collects a pipe's lines in a thread, so a test can wait for one."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 60.0) -> str:
        return poll(lambda: next((line for line in self.lines if re.search(pattern, line)), None), timeout)

    def text(self) -> str:
        return "".join(self.lines)


def run_local(tmp_path: Path, *args: str, path: str | None = None, terminal: bool = False) -> subprocess.Popen:
    """``terminal``: in a process group of its own, as a shell runs a foreground command (Ctrl-C goes to the group)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    if path is not None:
        env["PATH"] = path
    return subprocess.Popen([sys.executable, "-m", "async_component", "local", *args], cwd=APP_DIR.parents[1],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            process_group=0 if terminal else None)


@pytest.mark.slow
def test_command_serves_restarts_and_stops_cleanly_on_sigint(tmp_path):
    port = free_port()
    process = run_local(tmp_path, "--port", str(port), "--sleep-seconds", "0.1")
    out, err = Lines(process.stdout), Lines(process.stderr)
    try:
        ready = out.wait_for("ready")
        assert f"http://127.0.0.1:{port}" in ready
        assert "curl -H 'Host: helloworld-sleep.default.example.com' -H 'Prefer: respond-async'" in ready
        status, _, body = http(f"http://127.0.0.1:{port}/?sleep=0", "helloworld-sleep-plain.default.example.com")
        assert status == 200 and b'"slept": 0.0' in body
        assert re.search(r"app +\| .*GET /\?sleep=0", err.wait_for(r"GET /\?sleep=0")), "component logs are prefixed"

        children = descendants(process.pid)
        consumer = next(pid for pid in children if command_line(pid).endswith("async_component consumer "))
        os.kill(consumer, signal.SIGKILL)
        err.wait_for(rf"consumer \(pid {consumer}\) exited: killed by SIGKILL; restarting")
        err.wait_for(r"consumer restarted")
        children = descendants(process.pid)
        assert children, "the components run below the command"
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
    assert code == 0, err.text()
    assert out.text().count("ready") == 1
    poll(lambda: not any(alive(pid) for pid in children), timeout=10)
    assert list(tmp_path.iterdir()) == [], "temp dirs are removed"


@pytest.mark.slow
def test_via_consumer_runs_the_topology_where_the_source_posts_cloudevents_to_the_consumer(tmp_path):
    """With a --request-timeout past the source's default DELIVERY_TIMEOUT (330 s): the stack gives the source
    longer, as source.yaml says to, or it would refuse to start."""
    port = free_port()
    process = run_local(tmp_path, "--port", str(port), "--via-consumer", "--request-timeout", "400")
    out, err = Lines(process.stdout), Lines(process.stderr)
    try:
        out.wait_for("ready")
        assert re.search(r"source +\| .*delivering .* to http://127\.0\.0\.1:\d+ as CloudEvents", err.text())
        status, headers, _ = http(f"http://127.0.0.1:{port}/?sleep=0", f"{ALWAYS}.default.example.com")
        assert status == 202
        request_id, location = headers["Async-Request-Id"], headers["Location"]
        status, headers, _ = poll(lambda: (answer := http(f"http://127.0.0.1:{port}{location}",
                                                          f"{ALWAYS}.default.example.com"))[0] != 202 and answer)
        assert status == 200 and headers["Async-Request-State"] == "succeeded"
        err.wait_for(rf"consumer +\| .*request {request_id} attempt 1: GET .* answered 200")  # replayed there
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
    assert code == 0, err.text()


class Deaths:
    """When each of some processes was last seen alive, watched from a thread."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.gone: dict[str, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.is_set() and len(self.gone) < len(self.pids):
            for name, pid in self.pids.items():
                if name not in self.gone and not alive(pid):
                    self.gone[name] = time.monotonic()
            time.sleep(0.005)

    def close(self) -> dict[str, float]:
        poll(lambda: len(self.gone) == len(self.pids), timeout=10)
        self._done.set()
        self._thread.join()
        return self.gone


@pytest.mark.slow
def test_ctrl_c_stops_in_dependency_order_quietly_and_redis_last(tmp_path):
    port = free_port()
    process = run_local(tmp_path, "--port", str(port), "--sleep-seconds", "0.1", terminal=True)
    out, err = Lines(process.stdout), Lines(process.stderr)
    try:
        out.wait_for("ready")
        status, headers, _ = http(f"http://127.0.0.1:{port}/?sleep=1.5", f"{ALWAYS}.default.example.com")
        assert status == 202
        location = headers["Location"]

        def running():
            return b'"running"' in http(f"http://127.0.0.1:{port}{location}", f"{ALWAYS}.default.example.com")[2]

        poll(running)  # in flight when Ctrl-C comes
        names = {"redis-server": "redis", "async_component gateway": "gateway", "async_component producer": "producer",
                 "async_component source": "source", "async_component consumer": "consumer", "sleep_app.py": "app"}
        pids = {name: pid for pid in descendants(process.pid) for marker, name in names.items()
                if marker in command_line(pid)}
        assert sorted(pids) == sorted(names.values())
        deaths = Deaths(pids)
        stopping = len(err.lines)
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    gone = deaths.close()
    assert code == 0, err.text()
    after = "".join(err.lines[stopping:])
    assert not re.search(r" (WARNING|ERROR|CRITICAL) |Traceback|killing it", after), after
    assert "answered 200" in after, "the replay in flight finished"
    assert max(gone["gateway"], gone["producer"]) <= min(gone["source"], gone["consumer"])
    assert max(gone["source"], gone["consumer"]) <= gone["app"] <= gone["redis"]
    assert gone["redis"] > max(t for name, t in gone.items() if name != "redis"), gone
    assert list(tmp_path.iterdir()) == [], "temp dirs are removed"


def test_command_refuses_a_port_in_use_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process = run_local(tmp_path, "--port", str(port))
        out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert err.strip().splitlines() == [f"async-component local: error: port {port} on 127.0.0.1 is already in use "
                                        f"(Address already in use): pass another --port"]
    assert list(tmp_path.iterdir()) == []


def test_a_timeout_annotation_past_request_timeout_is_refused_in_one_line(tmp_path):
    """As the controller refuses it in a cluster: the replays would be cut at --request-timeout (and, in a cluster,
    replayed again)."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    shutil.copy(APP_DIR / "sleep_app.py", app_dir / "sleep_app.py")
    (app_dir / "slow.yml").write_text(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: slow\n  namespace: default\n"
        "  annotations:\n    networking.knative.dev/ingress.class: async.ingress.networking.knative.dev\n"
        "    async.knative.dev/timeout: PT20S\nspec: {template: {spec: {containers: [{image: x}]}}}\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    process = run_local(tmp, "--port", str(free_port()), "--app-dir", str(app_dir), "--request-timeout", "10")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert err.strip().splitlines() == [
        "async-component local: error: Service default/slow: annotation async.knative.dev/timeout='PT20S' is invalid:"
        " longer than the cluster's REQUEST_TIMEOUT (10s), the longest attempt the data plane waits for"], err
    assert list(tmp.iterdir()) == []


def test_command_without_redis_server_fails_in_one_line_and_leaves_nothing(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    process = run_local(tmp, "--port", str(free_port()), path=str(empty))
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("async-component local: error: redis-server not found on PATH"), err
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("flag", ["--retry-base-delay", "--retry-delay"])
def test_retry_base_delay_and_its_old_spelling_both_reach_the_stack(tmp_path, flag):
    process = run_local(tmp_path, "--port", str(free_port()), flag, "-1")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert err.strip().splitlines() == ["async-component local: error: retry delay -1.0 must be >= 0 seconds"]


@pytest.mark.parametrize("flag, message", [
    ("--concurrency", "concurrency 0 must be a positive integer"),
    ("--max-inflight-per-service", "max in flight per Service 0 must be a positive integer"),
    ("--max-queued-per-service", "max queued per Service 0 must be a positive integer"),
])
def test_delivery_slot_and_queue_flags_reach_the_stack(tmp_path, flag, message):
    process = run_local(tmp_path, "--port", str(free_port()), flag, "0")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert err.strip().splitlines() == [f"async-component local: error: {message}"]


@pytest.mark.slow
def test_concurrency_one_replays_one_request_at_a_time(tmp_path):
    """``--concurrency 1``: of two requests queued at once, the second reads queued while the first runs."""
    port = free_port()
    process = run_local(tmp_path, "--port", str(port), "--concurrency", "1", "--log-level", "WARNING")
    out, err = Lines(process.stdout), Lines(process.stderr)
    host = f"{ALWAYS}.default.example.com"

    def state(location: str) -> str:
        status, headers, _ = http(f"http://127.0.0.1:{port}{location}", host)
        return headers["Async-Request-State"]

    try:
        out.wait_for("ready")
        locations = []
        for n in range(2):
            status, headers, _ = http(f"http://127.0.0.1:{port}/n/{n}?sleep=2", host)
            assert status == 202
            locations.append(headers["Location"])
        poll(lambda: state(locations[0]) == "running")
        assert state(locations[1]) == "queued"
        poll(lambda: state(locations[0]) == "succeeded" and state(locations[1]) == "running", timeout=10)
        poll(lambda: state(locations[1]) == "succeeded", timeout=10)
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
    assert code == 0, err.text()


@pytest.mark.slow
def test_log_level_warning_quiets_the_sample_app_too(tmp_path):
    """``--log-level`` is every process's: at WARNING the app logs no line per request either."""
    port = free_port()
    process = run_local(tmp_path, "--port", str(port), "--sleep-seconds", "0", "--log-level", "WARNING")
    out, err = Lines(process.stdout), Lines(process.stderr)
    try:
        out.wait_for("ready")
        for _ in range(3):
            status, _, _ = http(f"http://127.0.0.1:{port}/quiet?sleep=0", "helloworld-sleep-plain.default.example.com")
            assert status == 200
        time.sleep(0.5)  # the app's line, if any, comes through its pipe
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    assert "/quiet" not in err.text(), err.text()
