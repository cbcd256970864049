"""The local gateway: KIngress matching as Kourier/Istio do it, and faithful proxying."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys

import pytest
import aiohttp
from aiohttp import web
from yarl import URL

from async_component.local import gateway, knative_serving as serving
from async_component.controller import resources
from async_component.local.gateway import Router, Routes, RoutesError
from async_component.local.ports import free_port

KOURIER = "kourier.ingress.networking.knative.dev"


def ingress(name, rules, namespace="default", cls=KOURIER):
    return {"apiVersion": "networking.internal.knative.dev/v1alpha1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": namespace,
                         "annotations": {"networking.knative.dev/ingress.class": cls}},
            "spec": {"rules": rules}}


def rule(hosts, *paths):
    return {"hosts": hosts, "visibility": "ExternalIP", "http": {"paths": list(paths)}}


def split(service, percent=100, namespace="default", **append):
    result = {"serviceName": service, "serviceNamespace": namespace, "servicePort": 80, "percent": percent}
    if append:
        result["appendHeaders"] = append
    return result


SERVICES = {("default", name): f"127.0.0.1:{port}" for name, port in
            [("a", 1001), ("b", 1002), ("c", 1003), ("status", 1004), ("sync", 1005)]}

TABLE = Routes(
    ingresses=(
        ingress("one", [rule(
            ["one.example.com", "One.Default"],
            {"path": "/.well-known/", "splits": [split("status")]},
            {"headers": {"Prefer": {"exact": "respond-async"}, "X-Team": {"exact": "blue"}}, "splits": [split("c")]},
            {"headers": {"Prefer": {"exact": "respond-async"}}, "splits": [split("b")]},
            {"path": "/api", "splits": [split("sync")]},
            {"splits": [split("a")]},
        )]),
        ingress("two", [rule(["two.example.com"], {"path": "/only", "splits": [split("a")]})]),
    ),
    services=SERVICES,
)


@pytest.mark.parametrize(("host", "path", "headers", "expected"), [
    ("one.example.com", "/", {}, "default/a"),
    ("ONE.example.com:8080", "/x", {}, "default/a"),                                  # case and port ignored
    ("one.default", "/", {}, "default/a"),                                            # any host of the rule
    ("one.example.com", "/.well-known/async-requests/x", {"Prefer": "respond-async"}, "default/status"),  # order wins
    ("one.example.com", "/", {"prefer": "respond-async"}, "default/b"),               # header name any case
    ("one.example.com", "/", {"Prefer": "respond-async", "X-Team": "blue"}, "default/c"),
    ("one.example.com", "/", {"Prefer": "respond-async", "X-Team": "red"}, "default/b"),
    ("one.example.com", "/", {"Prefer": "Respond-Async"}, "default/a"),               # value is exact
    ("one.example.com", "/", {"Prefer": "respond-async, wait=5"}, "default/a"),
    ("one.example.com", "/api/v1", {}, "default/sync"),                               # path is a prefix
    ("one.example.com", "/apiary", {}, "default/sync"),
    ("two.example.com", "/only/here", {}, "default/a"),
    ("two.example.com", "/elsewhere", {}, None),                                      # no path matches
    ("three.example.com", "/", {}, None),                                             # unknown host
    ("", "/", {}, None),
])
def test_matching(host, path, headers, expected):
    target = Router(TABLE).match(host, path, headers)
    assert (target.service if target else None) == expected


def test_repeated_headers_match_as_one_joined_value():
    from multidict import CIMultiDict

    headers = CIMultiDict([("Prefer", "respond-async"), ("Prefer", "wait=5")])
    assert Router(TABLE).match("one.example.com", "/", headers).service == "default/a"


@pytest.mark.parametrize(("percents", "expected"), [
    ((0, 100), {"default/b"}),
    ((100, 0), {"default/a"}),
    ((50, 50), {"default/a", "default/b"}),
])
def test_splits_are_chosen_by_percent(percents, expected):
    table = Routes((ingress("s", [rule(["s.example.com"], {"splits": [split("a", percents[0]), split("b", percents[1])]})]),),
                   SERVICES)
    router = Router(table, random.Random(7))
    seen = [router.match("s.example.com", "/", {}).service for _ in range(400)]
    assert set(seen) == expected
    if len(expected) == 2:
        assert 120 < seen.count("default/a") < 280


def test_append_headers_of_path_and_split_and_rewrite_host():
    path = {"rewriteHost": "backend.internal", "appendHeaders": {"X-Path": "p", "X-Both": "path"},
            "splits": [split("a", **{"X-Split": "s", "X-Both": "split"})]}
    target = Router(Routes((ingress("h", [rule(["h.example.com"], path)]),), SERVICES)).match("h.example.com", "/", {})
    assert target.host == "backend.internal"
    assert dict(target.set_headers) == {"X-Split": "s", "X-Both": "path", "X-Path": "p"}
    assert target.address == "127.0.0.1:1001"


def test_external_name_services_resolve_through_the_host_table():
    table = Routes((ingress("e", [rule(["e.example.com"], {"splits": [split("ext")]})]),),
                   services={("default", "ext"): "producer.system.svc.cluster.local"},
                   hosts={"producer.system.svc.cluster.local": "127.0.0.1:4242"})
    assert Router(table).match("e.example.com", "/", {}).address == "127.0.0.1:4242"
    unknown = Routes(table.ingresses, services={("default", "ext"): "db.example.org"})
    assert Router(unknown).match("e.example.com", "/", {}).address == "db.example.org:80"


def test_only_the_network_layers_class_is_routed():
    table = Routes((ingress("parent", [rule(["x.example.com"], {"splits": [split("a")]})], cls="async.ingress.networking.knative.dev"),
                    ingress("child", [rule(["x.example.com"], {"splits": [split("b")]})])),
                   SERVICES, ingress_class=KOURIER)
    assert Router(table).match("x.example.com", "/", {}).service == "default/b"


@pytest.mark.parametrize(("table", "message"), [
    (Routes((ingress("x", [rule(["x.example.com"], {"splits": [split("missing")]})]),), SERVICES), "default/missing"),
    (Routes((ingress("x", [rule(["x.example.com"], {"splits": [split("a")]})]),
             ingress("y", [rule(["X.example.com"], {"splits": [split("b")]})])), SERVICES), "claimed by Ingress default/x and by Ingress default/y"),
    (Routes((ingress("x", [rule(["x.example.com"], {"headers": {"A": {"prefix": "b"}}, "splits": [split("a")]})]),), SERVICES), "exact"),
    (Routes((ingress("x", [rule(["x.example.com"], {"splits": [split("a", 0)]})]),), SERVICES), "positive percent"),
])
def test_bad_tables_are_refused_with_a_clear_message(table, message):
    with pytest.raises(RoutesError, match=message):
        Router(table)


def test_route_table_survives_json():
    assert Routes.from_json(TABLE.to_json()) == TABLE
    with pytest.raises(RoutesError):
        Routes.from_json('{"ingresses": []}')


PRODUCER_HOST = "async-producer.knative-serving.svc.cluster.local"


def local_router(ksvc: dict) -> Router:
    """Serving's Ingress for ``ksvc`` and the controller's child of it; the app at :1, the producer at :2."""
    parent = serving.ingress_for_service(ksvc)
    child = resources.make_child_ingress(parent, ingress_class=KOURIER, producer_host=PRODUCER_HOST)
    services = {("default", "sleep-00001"): "127.0.0.1:1"}
    services.update(gateway.service_targets([resources.make_async_service(parent, producer_host=PRODUCER_HOST)]))
    return Router(Routes((parent, child), services, {PRODUCER_HOST: "127.0.0.1:2"}, ingress_class=KOURIER))


def test_the_controllers_child_ingress_sends_async_requests_to_the_producer():
    """The real table of the local stack: Serving's Ingress, then the controller's child of it."""
    ksvc = {"metadata": {"name": "sleep", "namespace": "default",
                         "annotations": {"networking.knative.dev/ingress.class": resources.ASYNC_INGRESS_CLASS}}}
    router = local_router(ksvc)

    queued = router.match("sleep.default.example.com", "/x", {"Prefer": "respond-async"})
    assert (queued.address, queued.host) == ("127.0.0.1:2", PRODUCER_HOST)
    assert dict(queued.set_headers)["Async-Original-Host"] == "sleep.default.svc.cluster.local"
    direct = router.match("sleep.default.svc.cluster.local", "/x", {})
    assert direct.address == "127.0.0.1:1" and direct.host is None
    assert dict(direct.set_headers) == {"Knative-Serving-Revision": "sleep-00001", "Knative-Serving-Namespace": "default"}


@pytest.mark.parametrize(
    ("mode", "prefer", "to_producer"),
    [
        (resources.MODE_CONDITIONAL, "respond-async", True),
        (resources.MODE_CONDITIONAL, "Respond-Async", True),
        (resources.MODE_CONDITIONAL, "RESPOND-ASYNC", True),
        (resources.MODE_CONDITIONAL, "rEsPoNd-AsYnC", False),  # exact matches only, as the child Ingress says
        (resources.MODE_CONDITIONAL, "respond-async, wait=5", False),
        (resources.MODE_ALWAYS, "respond-sync", False),
        (resources.MODE_ALWAYS, "Respond-Sync", False),
        (resources.MODE_ALWAYS, "RESPOND-SYNC", False),
        (resources.MODE_ALWAYS, "rEsPoNd-SyNc", True),
    ],
)
def test_prefer_case_variants_route_as_the_child_ingress_says(mode, prefer, to_producer):
    ksvc = {"metadata": {"name": "sleep", "namespace": "default",
                         "annotations": {"networking.knative.dev/ingress.class": resources.ASYNC_INGRESS_CLASS,
                                         resources.MODE_ANNOTATION: mode}}}
    router = local_router(ksvc)
    target = router.match("sleep.default.example.com", "/x", {"Prefer": prefer})
    assert target.address == ("127.0.0.1:2" if to_producer else "127.0.0.1:1")


# --- proxying through real servers


async def echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    response = web.Response(body=json.dumps({
        "method": request.method, "raw_path": request.raw_path,
        "headers": [[k, v] for k, v in request.headers.items()], "length": len(body),
    }).encode() + b"\n" + body, content_type="application/x-echo")
    response.headers.add("Set-Cookie", "a=1")
    response.headers.add("Set-Cookie", "b=2")
    response.set_status(int(request.query.get("status", "200")))
    return response


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.fixture
async def upstream_port():
    app = web.Application(client_max_size=16 * 1024 * 1024)

    async def refuse_before_the_body(request: web.Request) -> web.Response:  # as the producer does past its limit
        return web.json_response({"error": "too large"}, status=413)

    app.router.add_route("*", "/refuse", echo, expect_handler=refuse_before_the_body)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner, port = await serve(app)
    yield port
    await runner.cleanup()


@pytest.fixture
async def gateway_url(upstream_port):
    dead = free_port()
    table = Routes(
        (ingress("p", [rule(["p.example.com"],
                            {"path": "/dead", "splits": [split("dead")]},
                            {"rewriteHost": "inside.cluster.local", "splits": [split("up", **{"Async-Original-Host": "p.default.svc.cluster.local"})]})]),),
        services={("default", "up"): f"127.0.0.1:{upstream_port}", ("default", "dead"): f"127.0.0.1:{dead}"},
    )
    runner, port = await serve(gateway.make_app(table))
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()



def split_echo(raw: bytes):
    head, _, body = raw.partition(b"\n")
    return json.loads(head), body


async def test_proxy_keeps_method_query_repeated_headers_and_binary_body(http, gateway_url):
    body = os.urandom(3 * 1024 * 1024 + 7)
    headers = [("Host", "p.example.com"), ("X-Repeated", "one"), ("X-Repeated", "two"),
               ("Async-Original-Host", "evil.example.org"), ("Connection", "keep-alive, X-Hop"), ("X-Hop", "drop me")]
    async with http.put(gateway_url + "/a%2Fb/c?tag=1&tag=2&empty=", data=body, headers=headers) as response:
        assert response.status == 200
        assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert response.headers["Content-Type"] == "application/x-echo"
        seen, received = split_echo(await response.read())
    assert seen["method"] == "PUT"
    assert seen["raw_path"] == "/a%2Fb/c?tag=1&tag=2&empty="
    assert received == body and seen["length"] == len(body)
    got = seen["headers"]
    assert [v for k, v in got if k == "X-Repeated"] == ["one", "two"]
    assert [v for k, v in got if k.lower() == "host"] == ["inside.cluster.local"]
    assert [v for k, v in got if k.lower() == "async-original-host"] == ["p.default.svc.cluster.local"]
    assert not [k for k, _ in got if k.lower() in ("x-hop", "connection")]


async def test_proxy_adds_no_headers_the_client_did_not_send(http, gateway_url):
    async with http.get(gateway_url + "/plain", headers={"Host": "p.example.com"},
                        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding")) as response:
        seen, _ = split_echo(await response.read())
    assert sorted(k.lower() for k, _ in seen["headers"]) == ["async-original-host", "host"]


async def test_proxy_passes_error_statuses_through(http, gateway_url):
    async with http.post(gateway_url + "/?status=503", data=b"x", headers={"Host": "p.example.com"}) as response:
        assert response.status == 503
        seen, body = split_echo(await response.read())
    assert body == b"x"


async def test_expect_100_continue_waits_for_the_upstream_which_may_refuse_the_body(gateway_url, upstream_port):
    """A 7 MB body announced with Expect: 100-continue hears the producer's 413 first, never a 100 (as Envoy
    proxying the expectation); a body the upstream takes gets the upstream's 100, then arrives whole."""
    url = URL(gateway_url)

    async def send(path: bytes, length: int) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: p.example.com\r\nContent-Length: %d\r\n"
                     b"Expect: 100-continue\r\n\r\n" % length)
        return await asyncio.wait_for(reader.readline(), 5), reader, writer

    status_line, _, writer = await send(b"/refuse", 7_000_000)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 413 "), status_line

    status_line, reader, writer = await send(b"/taken", 5)
    assert status_line == b"HTTP/1.1 100 Continue\r\n"
    assert await reader.readline() == b"\r\n"
    writer.write(b"hello")
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200 ")
    writer.close()


@pytest.mark.parametrize(("host", "path", "status"), [
    ("nowhere.example.com", "/", 404),
    ("p.example.com", "/dead/x", 502),
])
async def test_unknown_host_is_404_and_a_dead_backend_502_as_json(http, gateway_url, host, path, status):
    async with http.get(gateway_url + path, headers={"Host": host}) as response:
        assert response.status == status
        assert "error" in await response.json()


def test_gateway_command_refuses_a_bad_route_table(tmp_path):
    routes = tmp_path / "routes.json"
    routes.write_text(Routes((ingress("x", [rule(["x.example.com"], {"splits": [split("nope")]})]),), {}).to_json())
    result = subprocess.run([sys.executable, "-m", "async_component", "gateway", "--routes", str(routes), "--port", str(free_port())],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"async-component gateway: error: {routes}: Ingress default/x routes to Service default/nope, which the service table lacks"]


async def test_a_stopping_gateway_lets_quick_requests_finish_then_cuts_a_hung_one(http, monkeypatch):
    """What Ctrl-C of the local stack meets with a Service that hangs: one grace, then the hung request is cut and
    its upstream connection closed (the Service sees its caller hang up), instead of aiohttp's shutdown timeout
    waited twice."""
    monkeypatch.setattr(gateway, "STOP_GRACE", 1.0)
    arrived, hung_up = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        try:
            await asyncio.sleep(float(request.query["sleep"]))
        except asyncio.CancelledError:
            hung_up.set()
            raise
        return web.Response(text="done")

    upstream = web.Application()
    upstream.router.add_get("/{tail:.*}", slow)
    upstream_runner = web.AppRunner(upstream, handler_cancellation=True)
    await upstream_runner.setup()
    upstream_port = free_port()
    await web.TCPSite(upstream_runner, "127.0.0.1", upstream_port).start()
    table = Routes((ingress("s", [rule(["s.example.com"], {"splits": [split("up")]})]),),
                   services={("default", "up"): f"127.0.0.1:{upstream_port}"})
    runner, port = await serve(gateway.make_app(table))  # aiohttp's own shutdown timeout: 60 s, twice

    async def call(sleep: float):
        async with http.get(f"http://127.0.0.1:{port}/?sleep={sleep}", headers={"Host": "s.example.com"}) as answer:
            return answer.status, await answer.text()

    try:
        hung = asyncio.create_task(call(3600))
        await asyncio.wait_for(arrived.wait(), 5)
        arrived.clear()
        quick = asyncio.create_task(call(0.3))
        await asyncio.wait_for(arrived.wait(), 5)
        await asyncio.wait_for(runner.cleanup(), 10)
        assert await quick == (200, "done")
        with pytest.raises(aiohttp.ClientError):
            await hung
        await asyncio.wait_for(hung_up.wait(), 5)
    finally:
        await upstream_runner.cleanup()
