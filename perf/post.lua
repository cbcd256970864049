-- wrk script for the producer benchmark: POST a body the way an async route delivers it,
-- and print a JSON summary line (latencies in microseconds) that perf/bench.py parses.
-- Environment: WRK_BODY_BYTES (default 1024), WRK_TARGET_HOST (the Async-Original-Host),
-- WRK_MAX_REQUESTS (stop each thread after this many responses; 0 or unset: run for -d),
-- WRK_KEYS ("on": a new Idempotency-Key on every request, "off": none, both building each request
-- in request() so the two cost wrk the same; unset: one request built once), WRK_KEY_PREFIX (of those keys),
-- WRK_TARGET_HOSTS (comma-separated: each request's Async-Original-Host in turn, built in request() too).

local body_bytes = tonumber(os.getenv("WRK_BODY_BYTES") or "1024")
local limit = tonumber(os.getenv("WRK_MAX_REQUESTS") or "0")

wrk.method = "POST"
wrk.body = string.rep("x", body_bytes)
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Prefer"] = "respond-async"
wrk.headers["Async-Original-Host"] = os.getenv("WRK_TARGET_HOST") or "helloworld-sleep.default.svc.cluster.local"

local hosts = {}
for host in string.gmatch(os.getenv("WRK_TARGET_HOSTS") or "", "[^,]+") do
  table.insert(hosts, host)
end

local keys = os.getenv("WRK_KEYS")
if keys or #hosts > 0 then
  local threads = 0
  function setup(thread)
    threads = threads + 1
    thread:set("prefix", (os.getenv("WRK_KEY_PREFIX") or "k") .. "-" .. threads .. "-")
  end
  local sent = 0
  function request()
    sent = sent + 1
    local headers = {}
    for name, value in pairs(wrk.headers) do
      headers[name] = value
    end
    if keys == "on" then
      headers["Idempotency-Key"] = prefix .. sent
    end
    if #hosts > 0 then
      headers["Async-Original-Host"] = hosts[sent % #hosts + 1]
    end
    return wrk.format(nil, nil, headers, nil)
  end
end

if limit > 0 then
  local seen = 0
  function response(status, headers, body)
    seen = seen + 1
    if seen >= limit then
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"mean_us":%.1f,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"p999_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
