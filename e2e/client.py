"""How the scenarios talk to a backend: a client of the gateway, by Service name."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDictProxy

from backend import Backend


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    elapsed: float

    def json(self):
        import json

        return json.loads(self.body)


class Client:
    def __init__(self, backend: Backend, session: aiohttp.ClientSession) -> None:
        self.backend = backend
        self.session = session

    async def request(self, service: str, method: str = "GET", path: str = "/", *,
                      headers: list[tuple[str, str]] | None = None, data: bytes | None = None,
                      prefer_async: bool = False, base_url: str | None = None, timeout: float = 60) -> Reply:
        sent = [("Host", self.backend.host(service)), *(headers or [])]
        if prefer_async:
            sent.append(("Prefer", "respond-async"))
        started = time.monotonic()
        async with self.session.request(
            method, (base_url or self.backend.gateway_url) + path, headers=sent, data=data,
            timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False,
        ) as response:
            body = await response.read()
            return Reply(response.status, response.headers, body, time.monotonic() - started)

    async def follow(self, service: str, accepted: Reply, *, timeout: float = 60) -> tuple[Reply, list[str]]:
        """Poll the Location of a 202 until the request finished; also return the states seen."""
        location = accepted.headers["Location"]
        states: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            reply = await self.request(service, "GET", location)
            if reply.status != 202:
                return reply, states
            states.append(reply.json()["state"])
            if time.monotonic() > deadline:
                raise AssertionError(f"request still {states[-1]} after {timeout}s: {reply.body!r}")
            await asyncio.sleep(0.05)
