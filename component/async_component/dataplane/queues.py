"""Where queued requests live in Redis: one queue per target Service, and the active set that finds them.

A Service (``<name>.<namespace>.svc.<domain>``, from the target host) has its
own keys, all under one Redis Cluster hash tag ``{<namespace>/<name>}``:

- ``<prefix>:{ns/name}:q``   its stream of accepted requests (consumer group ``CONSUMER_GROUP``);
- ``<prefix>:{ns/name}:rq``  its stream of retries that came due, read before ``:q``, so a due
  retry goes before the Service's newer requests;
- ``<prefix>:{ns/name}:r``   its sorted set of retries waiting, scored by due time;
- ``<prefix>:{ns/name}:req:<id>`` a request's record (:mod:`.records`).

A host that is not a Service's cluster-local host (a DomainMapping's own domain)
is its own queue, tagged by the host.

Sources find work without looking at idle Services: ``<prefix>:active`` is a
sorted set of the queues that may hold work, scored 0 for "now" (the producer
wrote to it) or by the time to look again (its next retry comes due, or entries
another source holds may need reclaiming). The producer's batch script marks a
queue and, when it was not already marked "now", adds its name to the
``<prefix>:wake`` stream every source listens on. The source's :data:`TAKE`
script removes a queue from the active set, atomically, only when it holds
nothing at all.

On a Redis Cluster (``Layout.cluster``) a script or transaction may only touch
the keys of one slot, so the two global keys are kept per slot instead:
``<prefix>:{@<t>}:active`` is the active set of the queues whose tag hashes to
the slot that ``@<t>`` hashes to (:func:`slot_tag`), so :data:`ENQUEUE`,
:data:`TAKE` and a retry's scheduling still change a queue and its place in the
active set together; and the wake-up is a ``PUBLISH`` of the queue's name on
the channel ``<prefix>:{@<t>}:wake`` (pub/sub reaches every node of a cluster),
which sources follow with a pattern subscription. A source finds the slots
with work from its wake-ups and by reading every slot's active set now and
then (:meth:`Layout.all_active`); see docs/design.md.

The stream of the single-stream layout (``QUEUE_MODE=single-stream``, for
Knative's RedisStreamSource, which reads one stream) is the queue
:data:`SINGLE`: ``STREAM_NAME`` with the retry set ``<prefix>:retries``. In the
per-Service layout sources drain it too, so requests queued before an upgrade
are still delivered.
"""

from __future__ import annotations

import binascii
import dataclasses
import functools

PER_SERVICE = "per-service"
SINGLE_STREAM = "single-stream"
QUEUE_MODES = (PER_SERVICE, SINGLE_STREAM)

SINGLE = "*"
"""The active set's member for the single stream (no host is spelled so)."""

WAKE_MAXLEN = 1000
"""Wake signals kept; a source that falls further behind finds its queues in the next full scan."""


SLOTS = 16384


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    """For each cluster slot, a short hash tag ``@<hex>`` that hashes to it (found once, in about 0.1 s)."""
    tags: list[str | None] = [None] * SLOTS
    missing = SLOTS
    n = 0
    while missing:
        tag = f"@{n:x}"
        slot = binascii.crc_hqx(tag.encode(), 0) % SLOTS
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        n += 1
    return tuple(tags)  # type: ignore[arg-type]


def slot_of(tag: str) -> int:
    """The cluster slot of the keys under the hash tag ``{tag}``."""
    return binascii.crc_hqx(tag.encode(), 0) % SLOTS


def slot_tag(slot: int) -> str:
    return _slot_tags()[slot]


def service_of(host: str) -> tuple[str, str]:
    """``(namespace, name)`` of a Service's cluster-local host (any port), else ``("", host)``."""
    name = host.partition(":")[0]
    labels = name.split(".")
    if len(labels) >= 4 and labels[2] == "svc" and labels[0] and labels[1]:
        return labels[1], labels[0]
    return "", name


def service_tag(host: str) -> str:
    """``namespace/name`` of the host's Service (or the host itself): the queue's name and hash tag."""
    namespace, name = service_of(host)
    return f"{namespace}/{name}" if namespace else name


def labels_of(member: str) -> tuple[str, str]:
    """The ``namespace`` and ``service`` metric labels of an active-set member."""
    namespace, sep, name = member.partition("/")
    return (namespace, name) if sep else ("", member)


@dataclasses.dataclass(frozen=True)
class Queue:
    member: str
    """Its name in the active set: the Service's tag, or :data:`SINGLE`."""
    stream: str
    retry_stream: str
    """Due retries, read first (the single stream's retries go back to the stream itself)."""
    retries: str
    """Retries waiting, scored by due time."""

    @property
    def streams(self) -> tuple[str, ...]:
        return (self.stream,) if self.retry_stream == self.stream else (self.retry_stream, self.stream)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The key layout of one install: ``KEY_PREFIX``, ``STREAM_NAME`` and ``QUEUE_MODE``."""

    prefix: str
    single_stream: str
    mode: str = PER_SERVICE
    cluster: bool = False
    """On a Redis Cluster: the active set and the wake-ups per slot (see the module's docstring)."""

    @classmethod
    def of(cls, settings) -> Layout:
        return cls(settings.key_prefix, settings.stream, settings.queue_mode, settings.cluster)

    @property
    def active(self) -> str:
        return f"{self.prefix}:active"

    @property
    def wake(self) -> str:
        return f"{self.prefix}:wake"

    def active_for(self, queue: Queue) -> str:
        """The active set holding ``queue``: the one set, or on a cluster its slot's."""
        return f"{self.prefix}:{{{slot_tag(slot_of(queue.member))}}}:active" if self.cluster else self.active

    def wake_for(self, queue: Queue) -> str:
        """Where the producer names ``queue`` when it gets work: the wake stream, or on a cluster its slot's channel."""
        return f"{self.prefix}:{{{slot_tag(slot_of(queue.member))}}}:wake" if self.cluster else self.wake

    @property
    def wake_pattern(self) -> str:
        """The pattern of every slot's wake channel (a cluster's), for PSUBSCRIBE."""
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix)
        return f"{escaped}:{{@*}}:wake"

    def slot_active(self, slot: int) -> str:
        return f"{self.prefix}:{{{slot_tag(slot)}}}:active"

    @functools.cached_property
    def all_active(self) -> tuple[str, ...]:
        """A cluster's active set of every slot, by slot."""
        return tuple(self.slot_active(slot) for slot in range(SLOTS))

    @property
    def single(self) -> Queue:
        return Queue(SINGLE, self.single_stream, self.single_stream, f"{self.prefix}:retries")

    def member(self, member: str) -> Queue:
        if member == SINGLE:
            return self.single
        base = f"{self.prefix}:{{{member}}}"
        return Queue(member, f"{base}:q", f"{base}:rq", f"{base}:r")

    def for_host(self, host: str) -> Queue:
        """Where a request for ``host`` is queued, and its retries wait."""
        return self.single if self.mode == SINGLE_STREAM else self.member(service_tag(host))


# KEYS: the queue's stream, retry stream, retry set, the active set, the wake stream (Layout.active_for, wake_for).
# ARGV: the stream field, the cap on queued requests, the queue's member, 1 when the call carries idempotency keys
#       (0: a call without keys), then per request its envelope, or (with keys) its envelope, its idempotency key's
#       Redis key, the request's fingerprint and its request id (the three '' without a key).
# Each envelope gets its entry id, or a QUEUEFULL error when the queue holds the cap already
# (nothing written for it). Marks the queue active "now" and wakes the sources if it was not.
# A request whose idempotency key is held gets {entry id, request id} of the request that took it
# when the fingerprints match (nothing written), else an IDEMPOTENCY error; a new key is taken, holding
# '<fingerprint> <entry id> <request id>' (the format every version so far reads and writes), without an expiry:
# it lives while its request is pending, and whatever ends the request gives it the result's lifetime (FINISH, the
# replay core, the cancel script), so a request queued or retrying longer than the retention keeps its key.
# The keys are read with one MGET a call, and a key taken earlier in the same call is remembered, so a
# repeat within one batch is answered as one in a later batch is.
# The keys are not in KEYS (as few arguments a request as possible, to keep a keyed request cheap): each is
# under its Service's hash tag, that of the queue in the per-Service layout, so it is in KEYS[1]'s slot.
ENQUEUE = """
local cap = tonumber(ARGV[2])
local stride = tonumber(ARGV[4]) > 0 and 4 or 1
local queued = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[3])
if KEYS[2] ~= KEYS[1] then queued = queued + redis.call('XLEN', KEYS[2]) end
local ids = {}
local added = 0
local n = 0
local held = {}
if stride == 4 then
  local names = {}
  for i = 6, #ARGV, 4 do
    if ARGV[i] ~= '' then names[#names + 1] = ARGV[i] end
  end
  if #names > 0 then
    local values = redis.call('MGET', unpack(names))
    for j = 1, #names do
      if values[j] then held[names[j]] = values[j] end
    end
  end
end
for i = 5, #ARGV, stride do
  n = n + 1
  local key = stride == 4 and ARGV[i + 1] ~= '' and ARGV[i + 1]
  local first = key and held[key]
  if first then
    local fingerprint, entry, first_request = string.match(first, '^(%%x+) (%%S+) (%%S+)$')
    if fingerprint == ARGV[i + 2] then
      ids[n] = {entry, first_request}
    else
      ids[n] = {err = 'IDEMPOTENCY the key was used for another request'}
    end
  elseif queued >= cap then
    ids[n] = {err = 'QUEUEFULL ' .. queued .. ' requests queued for this Service'}
  else
    ids[n] = redis.pcall('XADD', KEYS[1], '*', ARGV[1], ARGV[i])
    if type(ids[n]) == 'string' then
      added = added + 1
      queued = queued + 1
      if key then
        held[key] = ARGV[i + 2] .. ' ' .. ids[n] .. ' ' .. ARGV[i + 3]
        redis.call('SET', key, held[key])
      end
    end
  end
end
if added > 0 and redis.call('ZSCORE', KEYS[4], ARGV[3]) ~= '0' then
  redis.call('ZADD', KEYS[4], 0, ARGV[3])
  %(wake)s
end
return ids
"""
ENQUEUE, ENQUEUE_CLUSTER = (
    ENQUEUE % {"wake": wake} for wake in (
        f"redis.call('XADD', KEYS[5], 'MAXLEN', '~', {WAKE_MAXLEN}, '*', 'q', ARGV[3])",
        "redis.call('PUBLISH', KEYS[5], ARGV[3])  -- a cluster's: KEYS[5] names the slot's wake channel",
    ))

# KEYS: the queue's stream, retry stream, retry set, the active set.
# ARGV: group, consumer, most entries to read, now (epoch seconds), the stream field, the member,
#       seconds before a queue holding only entries in flight is looked at again (for reclaim: the
#       visibility timeout, before which no entry can be reclaimed), and the start of the queue's record
#       keys ('': start nothing).
# Moves due retries to the retry stream, then reads new entries: due retries first. Creates the
# consumer group (from id 0) the first time. Reading fewer than asked (nothing new is left), it
# settles the queue's place in the active set: removed when the queue holds nothing, else due when
# its next retry is, or when entries held by a source (this one's too) may need reclaiming.
# With record keys, it also starts each request read (the replay core's start_entry, see take_script): marks it
# running, or finds it finished, so the replay needs no round trip of its own before it calls the Service.
# Returns {retries read, entries read, 1 when nothing new is left else 0, what start_entry answered for each}.
TAKE = """
local now = tonumber(ARGV[4])
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 100)
for _, member in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', ARGV[5], member)
  redis.call('ZREM', KEYS[3], member)
end
local function read(stream, count)
  if count <= 0 then return {} end
  local reply = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', count, 'STREAMS', stream, '>')
  if type(reply) == 'table' and reply['err'] then
    if not string.find(reply['err'], 'NOGROUP') then return redis.error_reply(reply['err']) end
    redis.pcall('XGROUP', 'CREATE', stream, ARGV[1], '0', 'MKSTREAM')
    reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', count, 'STREAMS', stream, '>')
  end
  if not reply then return {} end
  return reply[1][2]
end
local count = tonumber(ARGV[3])
local retried = {}
if KEYS[2] ~= KEYS[1] and redis.call('EXISTS', KEYS[2]) == 1 then  -- no retry stream until a retry comes due
  retried = read(KEYS[2], count)
  if retried['err'] then return retried end
end
local entries = read(KEYS[1], count - #retried)
if entries['err'] then return entries end
local drained = 0
if #retried + #entries < count then
  drained = 1
  local held = redis.call('XLEN', KEYS[1])
  if KEYS[2] ~= KEYS[1] then held = held + redis.call('XLEN', KEYS[2]) end
  local next = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if held == 0 and #next == 0 then
    redis.call('ZREM', KEYS[4], ARGV[6])
  else
    local at = now + tonumber(ARGV[7])
    if #next > 0 and tonumber(next[2]) < at then at = tonumber(next[2]) end
    if held == 0 then at = tonumber(next[2]) end
    redis.call('ZADD', KEYS[4], 'XX', at, ARGV[6])
  end
end
local started = {}
if ARGV[8] and ARGV[8] ~= '' then
  for _, found in ipairs({retried, entries}) do
    for _, entry in ipairs(found) do
      local raw
      for i = 1, #entry[2] - 1, 2 do
        if entry[2][i] == ARGV[5] then raw = entry[2][i + 1] end
      end
      started[#started + 1] = start_entry(raw, ARGV[6], ARGV[8], ARGV[4])
    end
  end
end
return {retried, entries, drained, started}
"""


def take_script(start_entry: str) -> str:
    """TAKE, after the Lua that defines ``start_entry(envelope JSON, member, record key start, now)``: the replay
    core's (``replay.START_FUNCTION``), which owns how a request is started."""
    return start_entry + TAKE

# KEYS: the streams the entries are in (ARGV[3] of them: a queue's stream and retry stream, or on one redis-server
#       those of every queue in the batch), then the final records to write, then the idempotency keys to renew
#       (on a cluster, all under the queue's hash tag).
# ARGV: the consumer group, the channel final outcomes are announced on, the number of streams, then per record:
#       its JSON, its lifetime (ms), its entry's stream (1-based, in KEYS), its entry id, the position in KEYS
#       of the idempotency key it renews for as long as the record lives (0: none), and 1 to announce it (a client
#       may wait for it) else 0.
# A batch of outcomes in one command, where a MULTI took five per request: writes each record, acknowledges and
# deletes the entries, then announces the records asked for (a woken waiter reads it). The first write is refused when Redis
# is out of memory, so like the transaction it replaces it writes all or nothing. Returns the number of records.
FINISH = """
local streams = tonumber(ARGV[3])
local settled = {}
local records = (#ARGV - 3) / 6
for i = 1, records do
  local a = 4 + (i - 1) * 6
  local key = KEYS[streams + i]
  redis.call('SET', key, ARGV[a], 'PX', ARGV[a + 1])
  local stream = tonumber(ARGV[a + 2])
  settled[stream] = settled[stream] or {}
  table.insert(settled[stream], ARGV[a + 3])
  local renewed = tonumber(ARGV[a + 4])
  if renewed > 0 then
    redis.call('PEXPIRE', KEYS[renewed], ARGV[a + 1])
  end
end
for stream, ids in pairs(settled) do
  redis.call('XACK', KEYS[stream], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[stream], unpack(ids))
end
for i = 1, records do
  if ARGV[4 + (i - 1) * 6 + 5] == '1' then
    redis.call('PUBLISH', ARGV[2], KEYS[streams + i])
  end
end
return records
"""
