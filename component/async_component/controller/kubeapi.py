"""A small async Kubernetes API client for the controller's own reads and writes.

kopf watches and posts events, but has no client for creating or patching
other objects; this one reuses the credentials kopf's login produced
(:class:`kopf.ConnectionInfo`), so there is one way to log in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import kopf

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


@dataclasses.dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        parts = [base, "namespaces", namespace, self.plural]
        parts += [name] if name else []
        parts += [subresource] if subresource else []
        return "/".join(parts)


INGRESSES = Resource("networking.internal.knative.dev", "v1alpha1", "ingresses")
SERVICES = Resource("", "v1", "services")


class ApiError(Exception):
    """The API server refused a request; ``status`` is its HTTP status."""

    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        super().__init__(f"{method} {path}: {status} {message}")
        self.status = status


class KubeApi:
    """Namespaced get/create/patch/delete.

    ``login`` is called before the first request and again after a 401 (a
    rotated service account token); :meth:`use` hands over fresh credentials.
    """

    def __init__(self, info: kopf.ConnectionInfo | None = None, *,
                 login: Callable[[], kopf.ConnectionInfo] | None = None, timeout: float = 30) -> None:
        self._info = info
        self._login = login
        self._session: aiohttp.ClientSession | None = None
        self._session_info: kopf.ConnectionInfo | None = None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def use(self, info: kopf.ConnectionInfo) -> None:
        self._info = info

    async def _client(self) -> aiohttp.ClientSession:
        if self._info is None and self._login is not None:
            self._info = await asyncio.to_thread(self._login)
        if self._info is None:
            raise RuntimeError("not logged in to the Kubernetes API")
        if self._session is None or self._session_info is not self._info:
            if self._session is not None:
                await self._session.close()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._info.as_ssl_context()),
                headers=self._info.as_http_headers(),
                proxy=self._info.proxy_url,
                trust_env=self._info.trust_env,
                timeout=self._timeout,
            )
            self._session_info = self._info
        return self._session

    async def _request(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                       content_type: str = "application/json") -> dict[str, Any] | None:
        """The response's JSON object, or None for 404."""
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        for attempt in (1, 2):
            session = await self._client()
            assert self._info is not None
            async with session.request(method, self._info.server.rstrip("/") + path, data=data, headers=headers) as resp:
                status, text = resp.status, await resp.text()
            if status == 401 and attempt == 1 and self._login is not None:
                log.info("the API server answered 401; logging in again")
                self._info = None
                continue
            break
        if status == 404:
            return None
        if status >= 400:
            try:
                message = json.loads(text).get("message", text)
            except (ValueError, AttributeError):
                message = text
            raise ApiError(status, method, path, str(message)[:300])
        return json.loads(text) if text else {}

    async def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._request("GET", resource.path(namespace, name))

    async def create(self, resource: Resource, body: Mapping[str, Any]) -> dict[str, Any]:
        result = await self._request("POST", resource.path(body["metadata"]["namespace"]), body)
        if result is None:
            raise ApiError(404, "POST", resource.path(body["metadata"]["namespace"]), "namespace or resource not found")
        return result

    async def patch(self, resource: Resource, namespace: str, name: str, patch: Mapping[str, Any],
                    subresource: str | None = None) -> dict[str, Any] | None:
        return await self._request("PATCH", resource.path(namespace, name, subresource), patch, MERGE_PATCH)

    async def delete(self, resource: Resource, namespace: str, name: str) -> bool:
        """True if it was there."""
        return await self._request("DELETE", resource.path(namespace, name)) is not None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
