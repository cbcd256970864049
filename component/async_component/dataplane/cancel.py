"""``DELETE <Location>``: cancel a request that has not run yet, or forget one that finished.

One script decides atomically against the replay's start script (which will
not start a request whose record is ``canceled``), so a request is either
canceled before its attempt starts or found running, never both:

- queued (its stream entry, no record yet) or retrying: its record becomes
  ``canceled``; the entry, or the retry when it comes due, is still delivered,
  and the replay settles it without replaying it. The canceled record has no
  expiry until then (however long the queue or the retry takes: a record gone
  before its entry is read would let the request be replayed), nor has the
  request's idempotency key; the replay gives both the result's lifetime when
  it settles the canceled entry (``replay.SETTLE_CANCELED``);
- running: nothing changes (the caller answers 409);
- finished (succeeded, failed or expired): the record is deleted (and the
  entry, if a source keeps delivered entries, and its idempotency key), so the
  request is unknown from then on and its key may be used again;
- canceled already: nothing changes.

A cancel sends no completion event (the Service's ``on-failure`` sink hears of
requests that failed or expired, not of those its client withdrew): the client
that canceled knows, and the record reads ``canceled`` for anyone else.
"""

from __future__ import annotations

import dataclasses

import redis.asyncio as aioredis

from .redisconn import register_script
from .records import CANCELED, EXPIRED, FAILED, QUEUED, RUNNING, SUCCEEDED, Record

# KEYS[1] the record, KEYS[2] the Service's stream (both under the Service's hash tag); ARGV[1] the entry id ('' when the status path named none), ARGV[2] the
# request id, ARGV[3] the target host, ARGV[4] now, ARGV[5] the channel on
# which final outcomes are announced. Returns {what was found, the record as it is now (or was, when deleted)}.
CANCEL_SCRIPT = """
local raw = redis.call('GET', KEYS[1])
local doc
if raw then
  doc = cjson.decode(raw)
  if doc['host'] ~= ARGV[3] then
    return {'missing', false}
  end
  local state = doc['state']
  if state == '%(succeeded)s' or state == '%(failed)s' or state == '%(expired)s' then
    redis.call('DEL', KEYS[1])
    if type(doc['idempotency_key']) == 'string' then  -- the key answers with this result: gone with it
      redis.call('DEL', doc['idempotency_key'])
    end
    if ARGV[1] ~= '' then
      redis.call('XDEL', KEYS[2], ARGV[1])
    end
    return {'deleted', raw}
  end
  if state == '%(running)s' or state == '%(canceled)s' then
    return {state, raw}
  end
else
  if ARGV[1] == '' then
    return {'missing', false}
  end
  local entries = redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1])
  if #entries == 0 then
    return {'missing', false}
  end
  local fields = entries[1][2]
  local envelope
  for i = 1, #fields, 2 do
    if fields[i] == 'data' then
      envelope = cjson.decode(fields[i + 1])
    end
  end
  local prefix = 'http://' .. ARGV[3] .. '/'
  if not envelope or envelope['id'] ~= ARGV[2] or string.sub(envelope['url'], 1, #prefix) ~= prefix then
    return {'missing', false}
  end
  doc = {host = ARGV[3], attempts = 0, accepted_at = envelope['accepted_at']}
end
local was = doc['state'] or '%(queued)s'
doc['state'] = '%(canceled)s'
doc['updated_at'] = tonumber(ARGV[4])
doc['next_attempt_at'] = nil
local canceled = cjson.encode(doc)
redis.call('SET', KEYS[1], canceled)  -- no expiry while its entry waits: the replay settles it and sets one
redis.call('PUBLISH', ARGV[5], KEYS[1])
return {was, canceled}
""" % {"succeeded": SUCCEEDED, "failed": FAILED, "expired": EXPIRED, "running": RUNNING, "canceled": CANCELED,
       "queued": QUEUED}

MISSING = "missing"
DELETED = "deleted"


@dataclasses.dataclass(frozen=True)
class Canceled:
    found: str
    """The state the request was in (``queued``, ``retrying``, ``running``, ``canceled``), or deleted, or missing."""
    record: Record | None


class Canceler:
    def __init__(self, redis: aioredis.Redis, *, channel: str) -> None:
        self.script = register_script(redis, CANCEL_SCRIPT)
        self.channel = channel

    async def cancel(self, key: str, stream: str, entry_id: str, request_id: str, host: str, now: float) -> Canceled:
        """``key``: the request's record; ``stream``: its Service's stream, where ``entry_id`` is."""
        found, raw = await self.script(keys=[key, stream], args=[entry_id, request_id, host, repr(now), self.channel])
        return Canceled(found.decode(), None if not raw else Record.from_json(raw))
