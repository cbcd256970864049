"""Per-Service queues as a user meets them on ``async-component local``: extra Services from an --app-dir.

Every Service of the app dir is served by the one sample app, which sleeps
``?sleep=`` seconds; a Service flooded with long sleeps stands for a slow
Service, one flooded with hour-long sleeps for a hung one.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiohttp
import pytest

from async_component.local.stack import LocalStack
from async_component.local.ports import free_port

APP_DIR = Path(__file__).resolve().parents[1] / "app"
SERVICES = ("flooded-slow", "flooded-hung", "prompt", "alpha", "beta", "gamma")

MANIFEST = """apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: {name}
  namespace: default
  annotations:
    networking.knative.dev/ingress.class: async.ingress.networking.knative.dev
spec:
  template:
    spec:
      containers:
        - image: dev.local/helloworld-sleep:0.1.0
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    app_dir = tmp_path_factory.mktemp("app")
    shutil.copy(APP_DIR / "sleep_app.py", app_dir / "sleep_app.py")
    for name in SERVICES:
        (app_dir / f"{name}.yml").write_text(MANIFEST.format(name=name))
    with LocalStack(port=free_port(), sleep_seconds=0, app_dir=app_dir, visibility_timeout=2) as running:
        yield running


class Client:
    def __init__(self, stack: LocalStack, session: aiohttp.ClientSession) -> None:
        self.stack, self.session = stack, session

    async def send(self, service: str, path: str) -> tuple[int, str]:
        """An async POST's status and Location (or, when it is not 202, its body)."""
        headers = {"Host": self.stack.host(service), "Prefer": "respond-async"}
        async with self.session.post(self.stack.gateway_url + path, headers=headers, data=b"x") as response:
            body = await response.text()
            return response.status, response.headers.get("Location", body)

    async def accept(self, service: str, path: str) -> str:
        headers = {"Host": self.stack.host(service), "Prefer": "respond-async"}
        async with self.session.post(self.stack.gateway_url + path, headers=headers) as response:
            assert response.status == 202, await response.text()
            return response.headers["Location"]

    async def status(self, service: str, location: str) -> tuple[int, str]:
        async with self.session.get(self.stack.gateway_url + location,
                                    headers={"Host": self.stack.host(service)}) as response:
            await response.read()
            return response.status, response.headers.get("Async-Request-State", "")

    async def finish(self, service: str, location: str, timeout: float = 60.0,
                     pending: tuple[int, ...] = (202,)) -> tuple[int, str]:
        """Poll until the status read answers other than ``pending`` (503 too while Redis may be away)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            status, state = await self.status(service, location)
            if status not in pending:
                return status, state
            assert asyncio.get_running_loop().time() < deadline, f"{service} {location} still {status} {state}"
            await asyncio.sleep(0.05)


@pytest.fixture
async def client(stack):
    async with aiohttp.ClientSession() as session:
        yield Client(stack, session)


async def test_kill_9_of_the_source_with_several_services_queued_loses_nothing(stack, client):
    locations = [(service, await client.accept(service, f"/survive/{n}?sleep=1.5"))
                 for n in range(16) for service in ("alpha", "beta", "gamma")]
    await asyncio.sleep(0.5)
    # killed with each Service's first 8 in flight and 8 more queued
    assert {await client.status(service, location) for service, location in locations[-3:]} == {(202, "queued")}
    stack.kill("source")
    stack.wait_ready("source", timeout=30)
    finals = await asyncio.gather(*(client.finish(service, location) for service, location in locations))
    assert finals == [(200, "succeeded")] * len(locations)


async def test_a_slow_and_a_hung_service_never_delay_a_third(stack, client):
    """Default settings: each flooded Service holds MAX_INFLIGHT_PER_SERVICE (8) of the source's 32 slots."""
    slow = [await client.accept("flooded-slow", f"/slow/{n}?sleep=30") for n in range(30)]
    hung = [await client.accept("flooded-hung", f"/hung/{n}?sleep=3600") for n in range(30)]
    prompt = [await client.accept("prompt", f"/prompt/{n}?sleep=0") for n in range(10)]
    finals = await asyncio.gather(*(client.finish("prompt", location, timeout=20) for location in prompt))
    assert finals == [(200, "succeeded")] * 10
    # the flooded Services hold only their own slots: their later requests still wait their turn
    assert await client.status("flooded-slow", slow[-1]) == (202, "queued")
    assert await client.status("flooded-hung", hung[-1]) == (202, "queued")
    assert await client.status("flooded-hung", hung[0]) == (202, "running")


async def test_a_full_queue_answers_503_while_another_service_still_gets_202(tmp_path):
    """MAX_QUEUED_PER_SERVICE counts what a Service has queued or in flight; nothing is queued past it."""
    shutil.copy(APP_DIR / "sleep_app.py", tmp_path / "sleep_app.py")
    for name in ("alpha", "beta"):
        (tmp_path / f"{name}.yml").write_text(MANIFEST.format(name=name))
    with LocalStack(port=free_port(), sleep_seconds=0, app_dir=tmp_path, max_queued_per_service=3) as small:
        async with aiohttp.ClientSession() as session:
            client = Client(small, session)
            for n in range(3):
                await client.accept("alpha", f"/held/{n}?sleep=3")  # held past the 503 below; the stack stops sooner
            headers = {"Host": small.host("alpha"), "Prefer": "respond-async"}
            async with session.post(small.gateway_url + "/one-more", headers=headers) as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "10"
                assert "queue of Service default/alpha is full" in (await response.json())["error"]
            location = await client.accept("beta", "/other?sleep=0")
            assert await client.finish("beta", location) == (200, "succeeded")
