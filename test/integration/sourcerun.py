"""Running a source in a test (in this process or as one) and watching the stream it reads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time

from async_component.dataplane.source import Source
from async_component.settings import SourceSettings

STREAM = "async-requests"
GROUP = "async-source"
DEAD = "async-requests-dead"


@contextlib.asynccontextmanager
async def running(settings: SourceSettings, **options):
    """A source in this event loop, stopped (and waited for) on the way out."""
    source = Source(settings, retry_base=options.pop("retry_base", 0.02), retry_cap=0.2, **options)
    task = asyncio.create_task(source.run())
    try:
        yield source
    finally:
        source.stop()
        await asyncio.wait_for(task, 10)


def source_process(redis_url: str, env: dict) -> subprocess.Popen:
    """``async-component source`` as a process, with a 1 s visibility timeout and no health port by default."""
    environ = {k: v for k, v in os.environ.items() if k not in ("SINK_URL", "K_SINK")}
    environ.update({"REDIS_URL": redis_url, "VISIBILITY_TIMEOUT": "1", "HEALTH_PORT": "0", **env})
    return subprocess.Popen([sys.executable, "-m", "async_component", "source"], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def eventually(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def has(items: list, n: int = 1) -> bool:
    """For ``eventually(lambda: has(...))``: ``items`` holds ``n`` or more."""
    return len(items) >= n


async def pending(redis_client) -> int:
    return (await redis_client.xpending(STREAM, GROUP))["pending"]


def settled(redis_client):
    """A check for :func:`eventually`: everything acknowledged and deleted."""
    async def check() -> bool:
        return await redis_client.xlen(STREAM) == 0 and await pending(redis_client) == 0
    return check
