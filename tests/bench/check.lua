-- wrk script shared by natserve and Mosec runs: POSTs {"x": n, "y": 2n+1} with a fresh n
-- per request and checks every response: status 200 and a body whose x and y keep that
-- relation. Counts are per thread (globals read back with thread:get) and summed in
-- done(), which prints one line: BENCH_JSON {...}.

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  n = tid * 100000000
  bad_status = 0
  bad_body = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  n = n + 1
  return wrk.format(nil, nil, nil, string.format('{"x": %d, "y": %d}', n, 2 * n + 1))
end

function response(status, headers, body)
  if status ~= 200 then
    bad_status = bad_status + 1
    return
  end
  local x, y = string.match(body, '"x":%s*(%-?%d+)%s*,%s*"y":%s*(%-?%d+)')
  if x == nil or tonumber(y) ~= 2 * tonumber(x) + 1 then
    bad_body = bad_body + 1
  end
end

function done(summary, latency, requests)
  local status, body = 0, 0
  for _, t in ipairs(threads) do
    status = status + t:get("bad_status")
    body = body + t:get("bad_body")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "non_2xx": %d, "bad_body": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, status, body,
    e.connect + e.read + e.write + e.timeout))
end
