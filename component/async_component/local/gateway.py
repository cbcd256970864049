"""The local stack's stand-in for Kourier or Istio.

It routes by the networking Ingresses (KIngress) it is given, the way those
network layers do: the rule whose ``hosts`` holds the request's Host (port
dropped, any case); in that rule the first path whose ``path`` prefix and
``headers`` (``{exact: value}``) match; one of its splits by ``percent``;
``appendHeaders`` (path and split) replace whatever the client sent, and
``rewriteHost`` replaces the Host sent upstream. A split's Service resolves
through a table built by whoever starts the gateway: ``(namespace, name)`` to
``127.0.0.1:port``, or to the DNS name an ExternalName Service points at, which
the host table resolves as cluster DNS would.

Bodies stream both ways, so a large request never sits whole in memory here;
one pooled client session keeps upstream connections alive. Headers pass up to
Envoy's 60 KiB. A stopping gateway gives the requests in flight 2 s, then cuts
them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import random
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .. import logs
from ..dataplane import rawhttp
from ..dataplane.envelope import header_text
from ..protocol import HOP_BY_HOP
from ..controller.resources import INGRESS_CLASS_ANNOTATION

log = logging.getLogger(__name__)

SMALL_BODY = 64 * 1024
"""Responses up to this size are read whole and sent in one write; larger ones stream."""

NOT_FORWARDED = HOP_BY_HOP | {"expect", "proxy-connection"}
"""Request and response headers that belong to one hop (``expect`` is answered here)."""

HEADER_LIMITS = {"max_line_size": 60 * 1024, "max_field_size": 60 * 1024}
"""Envoy's (Kourier's and Istio's) default: 60 KiB of request or response headers; aiohttp's own would refuse
one header or a request line over 8190 bytes that a cluster passes on (a large token or cookie)."""


class RoutesError(ValueError):
    """The route table cannot be served: unknown Service, clashing hosts, bad field."""


@dataclasses.dataclass(frozen=True)
class Routes:
    """Everything the gateway routes by; saved as JSON for the ``gateway`` command."""

    ingresses: tuple[Mapping[str, Any], ...]
    services: Mapping[tuple[str, str], str]
    """(namespace, name) -> "host:port", or an ExternalName Service's target host."""
    hosts: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """DNS name -> "127.0.0.1:port": what cluster DNS would answer for it."""
    ingress_class: str | None = None
    """Route only Ingresses of this class, as a network layer does (None: all)."""

    def to_json(self) -> str:
        return json.dumps({
            "ingressClass": self.ingress_class,
            "ingresses": list(self.ingresses),
            "services": [{"namespace": ns, "name": name, "target": target}
                         for (ns, name), target in self.services.items()],
            "hosts": dict(self.hosts),
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Routes:
        try:
            doc = json.loads(text)
            return cls(
                ingresses=tuple(doc["ingresses"]),
                services={(s["namespace"], s["name"]): s["target"] for s in doc["services"]},
                hosts=dict(doc.get("hosts") or {}),
                ingress_class=doc.get("ingressClass"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RoutesError(f"not a route table: {type(exc).__name__}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one request goes and what the gateway changes in it."""

    address: str
    service: str
    """namespace/name of the backend Service, for messages."""
    host: str | None
    """Host header to send; None keeps the client's."""
    set_headers: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class _Split:
    weight: int
    target: Target


@dataclasses.dataclass(frozen=True)
class _Path:
    prefix: str
    headers: tuple[tuple[str, str], ...]
    splits: tuple[_Split, ...]
    total: int

    def matches(self, path: str, headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> bool:
        if not path.startswith(self.prefix):
            return False
        # Like Envoy, repeated headers are matched as one comma-joined value.
        return all(",".join(headers.getall(name, ())) == value for name, value in self.headers)

    def choose(self, rng: random.Random) -> Target:
        if len(self.splits) == 1:
            return self.splits[0].target
        point = rng.random() * self.total
        for split in self.splits:
            point -= split.weight
            if point < 0:
                return split.target
        return self.splits[-1].target


def bare_host(host: str) -> str:
    """Host header without the port, lower case (IPv6 literals keep their brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.split(":", 1)[0]


class Router:
    """The compiled route table: Host, path and headers in, a :class:`Target` out."""

    def __init__(self, routes: Routes, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self._routes = routes
        self._hosts: dict[str, tuple[_Path, ...]] = {}
        owners: dict[str, str] = {}
        for ingress in routes.ingresses:
            annotations = ingress.get("metadata", {}).get("annotations") or {}
            if routes.ingress_class is not None and annotations.get(INGRESS_CLASS_ANNOTATION) != routes.ingress_class:
                continue
            label = _name(ingress)
            for rule in (ingress.get("spec") or {}).get("rules") or []:
                paths = tuple(self._path(label, p) for p in ((rule.get("http") or {}).get("paths") or []))
                for host in rule.get("hosts") or []:
                    host = bare_host(host)
                    if host in owners:
                        raise RoutesError(f"host {host} is claimed by Ingress {owners[host]} and by Ingress {label}")
                    owners[host] = label
                    self._hosts[host] = paths

    def _path(self, ingress: str, path: Mapping[str, Any]) -> _Path:
        headers = []
        for name, match in (path.get("headers") or {}).items():
            if not isinstance(match, Mapping) or set(match) != {"exact"}:
                raise RoutesError(f"Ingress {ingress}: header {name} must be matched as {{exact: value}}, got {match!r}")
            headers.append((name, str(match["exact"])))
        path_headers = tuple((str(k), str(v)) for k, v in (path.get("appendHeaders") or {}).items())
        splits = []
        for split in path.get("splits") or []:
            weight = int(split.get("percent", 100 if len(path["splits"]) == 1 else 0))
            if weight <= 0:
                continue
            # The path's headers are applied after the split's, so they win on a clash (as in Envoy).
            set_headers = dict((str(k), str(v)) for k, v in (split.get("appendHeaders") or {}).items())
            set_headers.update(path_headers)
            splits.append(_Split(weight, Target(
                address=self._resolve(ingress, split),
                service=f"{split.get('serviceNamespace')}/{split.get('serviceName')}",
                host=path.get("rewriteHost") or None,
                set_headers=tuple(set_headers.items()),
            )))
        if not splits:
            raise RoutesError(f"Ingress {ingress}: a path has no split with a positive percent")
        return _Path(path.get("path") or "/", tuple(headers), tuple(splits), sum(s.weight for s in splits))

    def _resolve(self, ingress: str, split: Mapping[str, Any]) -> str:
        key = (split.get("serviceNamespace"), split.get("serviceName"))
        target = self._routes.services.get(key)
        if target is None:
            raise RoutesError(f"Ingress {ingress} routes to Service {key[0]}/{key[1]}, which the service table lacks")
        if target in self._routes.hosts:
            return self._routes.hosts[target]
        return target if ":" in target else f"{target}:{split.get('servicePort', 80)}"

    @property
    def hosts(self) -> list[str]:
        return sorted(self._hosts)

    def match(self, host: str, path: str, headers: Mapping[str, str] | CIMultiDictProxy[str]) -> Target | None:
        paths = self._hosts.get(bare_host(host))
        if paths is None:
            return None
        if not isinstance(headers, (CIMultiDict, CIMultiDictProxy)):
            headers = CIMultiDict(headers)
        for candidate in paths:
            if candidate.matches(path, headers):
                return candidate.choose(self.rng)
        return None


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '?')}"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def upstream_headers(request: web.Request, target: Target) -> CIMultiDict[str]:
    replaced = {name.lower() for name, _ in target.set_headers}
    connection = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lower = name.lower()
        if lower not in NOT_FORWARDED and lower not in replaced and lower not in connection:
            headers.add(name, value)
    headers["Host"] = target.host or request.headers.get("Host", "")
    length = request.headers.get("Content-Length")
    if length is not None and "Transfer-Encoding" not in request.headers:
        headers["Content-Length"] = length
    for name, value in target.set_headers:
        headers[name] = value
    return headers


APP_SESSION = web.AppKey("session", aiohttp.ClientSession)
APP_ROUTER = web.AppKey("router", Router)
APP_IN_FLIGHT = web.AppKey("in_flight", set)
"""The connection tasks of the requests being proxied."""
STOP_GRACE = 2.0
"""Seconds a stopping gateway gives the requests it is proxying, then cuts them (closing their upstream
connections), so a Service that hangs does not hold the stop."""


UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def _upstream_failed(request: web.Request, target: Target, exc: BaseException) -> web.Response:
    reason = f"{type(exc).__name__}: {exc}"
    log.warning("%s %s%s -> %s at %s failed: %s", request.method, request.host, request.raw_path,
                target.service, target.address, reason)
    return _error(502, f"upstream {target.service} ({target.address}) failed: {reason}")


async def _cut_in_flight(app: web.Application) -> None:
    """On stop, before aiohttp's own wait: one grace for the requests in flight, then each one's connection
    task is cancelled (aiohttp would wait its shutdown timeout twice, then cut them all the same)."""
    in_flight, loop = app[APP_IN_FLIGHT], asyncio.get_running_loop()
    deadline = loop.time() + STOP_GRACE
    while in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if in_flight:
        log.warning("stopping: cutting %d request(s) still in flight after %gs", len(in_flight), STOP_GRACE)
        for connection in list(in_flight):
            connection.cancel()


async def proxy(request: web.Request) -> web.StreamResponse:
    in_flight = request.app[APP_IN_FLIGHT]
    connection = request.task  # serves one request at a time
    in_flight.add(connection)
    try:
        host = request.headers.get("Host", "")
        path = request.raw_path.split("?", 1)[0]
        target = request.app[APP_ROUTER].match(host, path, request.headers)
        if target is None:
            return _error(404, f"no route for host {bare_host(host)!r} and path {path!r}")
        url = URL(f"http://{target.address}{request.raw_path}", encoded=True)
        headers = upstream_headers(request, target)
        if rawhttp.has_binary(headers.items()):
            return await _proxy_binary(request, target, str(url), headers)
        expect = continue_expected(request)
        body = (_after_continue(request) if expect else request.content) if request.body_exists else None
        try:
            upstream = await request.app[APP_SESSION].request(
                request.method, url, headers=headers, data=body, allow_redirects=False,
                expect100=expect,
            )
        except UPSTREAM_ERRORS as exc:
            return _upstream_failed(request, target, exc)
        try:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s%s -> %s %d", request.method, host, request.raw_path, target.service, upstream.status)
            headers = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in NOT_FORWARDED)
            length = upstream.content_length
            if length is not None and length <= SMALL_BODY and request.method != "HEAD":
                # One write for headers and body: the sync path's usual case, kept cheap.
                try:
                    body = await upstream.read()
                except UPSTREAM_ERRORS as exc:
                    return _upstream_failed(request, target, exc)
                return web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=body)

            response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
            if length is not None:
                response.content_length = length
            try:
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionError:
                pass  # the client went away; aiohttp closes its side
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                # The status is out already: cutting the connection tells the client the body is incomplete.
                log.warning("%s %s%s -> %s: response body broke off: %s: %s", request.method, host,
                            request.raw_path, target.service, type(exc).__name__, exc)
                if request.transport is not None:
                    request.transport.abort()
            return response
        finally:
            upstream.release()
    finally:
        in_flight.discard(connection)


async def _proxy_binary(request: web.Request, target: Target, url: str, headers: CIMultiDict[str]) -> web.Response:
    """A request whose header values hold non-UTF-8 bytes: passed on byte for byte (as Envoy does), whole."""
    try:
        answer = await rawhttp.exchange(request.method, url, headers.items(), await request.read(), timeout=300)
    except (*UPSTREAM_ERRORS, httptools.HttpParserError) as exc:
        return _upstream_failed(request, target, exc)
    kept = CIMultiDict((header_text(k), header_text(v)) for k, v in answer.headers
                       if header_text(k).lower() not in NOT_FORWARDED and k.lower() != b"content-length")
    return web.Response(status=answer.status, headers=kept, body=bytes(answer.body))


def continue_expected(request: web.Request) -> bool:
    return request.version == aiohttp.HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue"


async def _defer_continue(request: web.Request) -> None:
    """Answer ``Expect: 100-continue`` only once the upstream does (:func:`_after_continue`), as Envoy does when
    it proxies the expectation: a producer refusing the body (413) is heard before the client sends it."""


async def _after_continue(request: web.Request):
    """The client's body, asked for once the upstream said 100 Continue: pass the 100 on first."""
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0
    async for chunk in request.content.iter_any():
        yield chunk


def make_app(routes: Routes, *, rng: random.Random | None = None) -> web.Application:
    """Raises :class:`RoutesError` when the table cannot be served."""
    app = web.Application(handler_args=HEADER_LIMITS)
    app[APP_ROUTER] = Router(routes, rng)
    app[APP_IN_FLIGHT] = set()
    app.on_shutdown.append(_cut_in_flight)

    async def session(app: web.Application):
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), **HEADER_LIMITS,
        ) as client:
            app[APP_SESSION] = client
            yield

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", proxy, expect_handler=_defer_continue)
    return app


# --- the ``async-component gateway`` command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--routes", required=True, type=Path, help="route table (JSON) written by `async-component local`")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level (DEBUG logs every request)")


def run(args: argparse.Namespace) -> int:
    logs.configure("gateway", args.log_level)
    try:
        routes = Routes.from_json(args.routes.read_text())
        app = make_app(routes)
    except (OSError, RoutesError) as exc:
        print(f"async-component gateway: error: {args.routes}: {exc}", file=sys.stderr)
        return 2
    hosts = app[APP_ROUTER].hosts
    log.info("routing %d hosts on %s:%d: %s", len(hosts), args.host, args.port, ", ".join(hosts))
    try:
        web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, shutdown_timeout=2)
    except OSError as exc:
        print(f"async-component gateway: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def service_targets(services: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
    """Service table entries for ExternalName Services (v1 Service objects)."""
    return {
        (svc["metadata"]["namespace"], svc["metadata"]["name"]): svc["spec"]["externalName"]
        for svc in services if svc.get("spec", {}).get("type") == "ExternalName"
    }
