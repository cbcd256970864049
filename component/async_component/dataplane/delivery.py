"""How the source hands a stream entry over: to a sink over HTTP, or to the replay core in its own process.

Either way the source gets back an HTTP status and maps it with
:func:`.retries.sink_verdict`: 2xx acknowledges the entry, a 4xx (but 408/429)
dead-letters it, anything else leaves it pending to try again. In-process
delivery calls the replay core (:class:`.replay.Replayer`) with the entry's
fields, so its answer is the status the consumer's sink would have sent:
the same verdicts, without the extra hop and the CloudEvent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Mapping
from typing import Protocol

import aiohttp
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from .replay import Answered, Finish, Replayer, Settle, Started, replay_route
from .envelope import as_text, binary_event, event_source
from .redisconn import redis_address
from ..protocol import DELIVERY_TIMEOUT_HEADER
from ..settings import SourceSettings

ERROR_BODY_LIMIT = 1000


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    text: str
    """The answer's body (only kept when it is not 2xx): for the log and the dead-letter entry."""


class SinkAnswer(Protocol):
    """What a delivery comes to: a :class:`Reply`, or the replay core's :class:`~.replay.Answer` (in-process)."""

    status: int

    @property
    def text(self) -> str: ...


EntryRef = tuple[str, str]
"""``(stream, entry id)``: which entry of which queue's stream."""


class DeliveryFailed(Exception):
    """No answer at all (connection refused, timeout): try again later."""


class Delivery(Protocol):
    description: str
    """For the startup log line."""
    settles: bool
    """A 2xx reply means the entry is settled already (with the source's hook), not to be settled again."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def send(self, ref: EntryRef, fields: Mapping, started: Started = None) -> Awaitable[SinkAnswer]:
        """Deliver one entry; raises :class:`DeliveryFailed` when there is no answer. ``started``: what
        reading it found when it started the request (in-process delivery only)."""


class HttpDelivery:
    """Posts each entry as the CloudEvent Knative's RedisStreamSource would send, in binary mode."""

    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        self.url = settings.sink_url
        self.address = redis_address(settings)
        self.session: aiohttp.ClientSession | None = None
        self.description = f"to {self.url} as CloudEvents"
        self.deadline = f"{settings.delivery_timeout:g}"
        self.settles = False

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.delivery_timeout),
            connector=aiohttp.TCPConnector(limit=self.settings.concurrency),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def send(self, ref: EntryRef, fields: Mapping, started: Started = None) -> Reply:
        stream, entry_id = ref
        headers, body = binary_event(event_source(self.address, stream), entry_id, fields)
        headers[DELIVERY_TIMEOUT_HEADER] = self.deadline
        try:
            async with self.session.post(self.url, data=body, headers=headers) as resp:
                return Reply(resp.status, as_text((await resp.read())[:ERROR_BODY_LIMIT]))
        except TimeoutError:
            raise DeliveryFailed(f"no answer within {self.settings.delivery_timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from None


class InProcessDelivery:
    """Replays each entry with the replay core in this process and event loop."""

    def __init__(self, settings: SourceSettings, redis: aioredis.Redis, registry: CollectorRegistry,
                 settle: Settle, finish: Finish | None = None, answered: Answered | None = None) -> None:
        self.replayer = Replayer(settings, registry, redis=redis, settle=settle, finish=finish, answered=answered)
        self.description = f"in-process (replaying {replay_route(settings)})"
        self.settles = True

    async def start(self) -> None:
        await self.replayer.start()

    async def close(self) -> None:
        await self.replayer.stop()

    def send(self, ref: EntryRef, fields: Mapping, started: Started = None) -> Awaitable[SinkAnswer]:
        """The replay core's answer itself (a plain function returning its coroutine: no frame of its own to
        resume twice per delivery)."""
        return self.replayer.handle_entry(ref[1], fields, ref=ref, started=started)


def make_delivery(settings: SourceSettings, redis: aioredis.Redis, registry: CollectorRegistry,
                  settle: Settle, finish: Finish | None = None, answered: Answered | None = None) -> Delivery:
    """Over HTTP when ``SINK_URL`` (or ``K_SINK``) is set, else in-process (settling entries with ``settle``, and
    with ``finish`` with their final records; told through ``answered`` when a Service answered an entry)."""
    if settings.sink_url:
        return HttpDelivery(settings)
    return InProcessDelivery(settings, redis, registry, settle, finish, answered)
