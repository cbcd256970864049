"""The sample Service over real HTTP: what it echoes and how the query steers it."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from async_component.local.ports import free_port

from .aioserve import serve

APP_FILE = Path(__file__).resolve().parents[1] / "app" / "sleep_app.py"


def load_sleep_app():
    spec = importlib.util.spec_from_file_location("sleep_app", APP_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


sleep_app = load_sleep_app()


@pytest.fixture
async def base():
    port = free_port()
    runner = await serve(sleep_app.make_app(sleep_app.Settings(sleep_seconds=0.2, max_body_bytes=1024 * 1024)), port)
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent",)) as session:
        yield session


async def call(http, method, url, **kwargs):
    started = time.monotonic()
    async with http.request(method, url, **kwargs) as response:
        return response.status, await response.json(), time.monotonic() - started


async def test_echoes_method_path_query_headers_and_body(http, base):
    body = os.urandom(100_000)
    status, echo, _ = await call(
        http, "PATCH", base + "/some/path?sleep=0&tag=a&tag=b&empty=", data=body,
        headers=[("X-Repeated", "one"), ("X-Repeated", "two"), ("Content-Type", "application/octet-stream")],
    )
    assert status == 200
    assert echo["method"] == "PATCH"
    assert echo["path"] == "/some/path"
    assert echo["query_string"] == "sleep=0&tag=a&tag=b&empty="
    assert echo["query"] == {"sleep": ["0"], "tag": ["a", "b"], "empty": [""]}
    assert [v for k, v in echo["headers"] if k == "X-Repeated"] == ["one", "two"]
    assert ["Content-Type", "application/octet-stream"] in echo["headers"]
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echo["slept"] == 0


async def test_sleeps_the_default_or_the_requested_time(http, base):
    _, echo, elapsed = await call(http, "GET", base + "/")
    assert echo["slept"] == 0.2 and elapsed >= 0.2
    _, echo, elapsed = await call(http, "GET", base + "/?sleep=0.5")
    assert echo["slept"] == 0.5 and elapsed >= 0.5


async def test_status_parameter_sets_the_answer_and_keeps_the_echo(http, base):
    status, echo, _ = await call(http, "POST", base + "/x?sleep=0&status=418", data=b"abc")
    assert status == 418
    assert echo["path"] == "/x" and echo["body_length"] == 3


@pytest.mark.parametrize(("attempt", "expected"), [(None, 503), ("1", 503), ("2", 503), ("3", 200), ("not-a-number", 503)])
async def test_fail_attempts_answers_503_until_the_attempt_passes_it(http, base, attempt, expected):
    headers = {} if attempt is None else {"Async-Attempt": attempt}
    status, echo, _ = await call(http, "GET", base + "/flaky?sleep=0&fail_attempts=2", headers=headers)
    assert status == expected
    assert echo["path"] == "/flaky"


@pytest.mark.parametrize("query", [
    "sleep=abc", "sleep=-1", "sleep=3601", "sleep=nan", "sleep=inf",
    "status=99", "status=600", "status=ok", "status=100",
    "fail_attempts=-1", "fail_attempts=x",
])
async def test_bad_query_values_are_400_with_a_json_message(http, base, query):
    status, body, elapsed = await call(http, "GET", base + "/?" + query)
    assert status == 400
    assert query.split("=")[0] in body["error"]
    assert elapsed < 0.2, "a refused request does not sleep"


async def test_body_over_the_limit_is_413(http, base):
    async with http.post(base + "/?sleep=0", data=b"x" * (1024 * 1024 + 1)) as response:
        assert response.status == 413
        assert "error" in await response.json()


def serve_one_request(log_level: str) -> str:
    """Run the app as a script (PORT and LOG_LEVEL from the environment), GET /hello once, stop it: its stderr."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "SLEEP_SECONDS": "0", "LOG_LEVEL": log_level}
    process = subprocess.Popen([sys.executable, str(APP_FILE)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        import urllib.request

        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello?sleep=0", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the app did not answer"
                time.sleep(0.05)
    finally:
        process.terminate()
        _, err = process.communicate(timeout=10)
    return err


def test_runs_as_a_script_on_port_from_the_environment():
    assert "GET /hello?sleep=0" in serve_one_request("INFO"), "one log line per request"


def test_log_level_warning_leaves_out_the_line_per_request():
    err = serve_one_request("warning")
    assert "GET /hello" not in err and "listening" not in err, err


def test_bad_log_level_exits_with_one_line():
    env = {**os.environ, "LOG_LEVEL": "loud"}
    result = subprocess.run([sys.executable, str(APP_FILE)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "sleep_app: LOG_LEVEL='loud' must be one of DEBUG, INFO, WARNING, ERROR"]


def test_bad_sleep_setting_exits_with_one_line():
    env = {**os.environ, "SLEEP_SECONDS": "soon"}
    result = subprocess.run([sys.executable, str(APP_FILE)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["sleep_app: SLEEP_SECONDS='soon' must be 0-3600 seconds"]


def test_a_caller_that_hangs_up_stops_the_sleep_and_sigterm_stops_the_app_at_once():
    """What a gateway that gave up on a hung request (or a caller's timeout) leaves: nothing held in the app,
    so it stops when told to instead of outlasting its shutdown timeout."""
    import socket

    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "SLEEP_SECONDS": "0", "LOG_LEVEL": "INFO"}
    process = subprocess.Popen([sys.executable, str(APP_FILE)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                caller = socket.create_connection(("127.0.0.1", port), timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the app did not listen"
                time.sleep(0.05)
        caller.sendall(b"GET /hung?sleep=3600 HTTP/1.1\r\nHost: app\r\n\r\n")
        time.sleep(0.5)
        caller.close()
        time.sleep(0.5)
        process.terminate()
        started = time.monotonic()
        _, err = process.communicate(timeout=30)
        stopped_in = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
    assert "GET /hung?sleep=3600 host=app attempt=-: the caller hung up while it slept" in err, err
    assert stopped_in < 3, f"took {stopped_in:.1f}s to stop (its shutdown timeout is 5s)"
