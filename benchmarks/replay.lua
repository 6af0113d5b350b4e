-- wrk script: replay pre-built, individually signed requests (one per line:
-- path TAB authorization TAB body), each thread taking every n-th line, and
-- count answers by status and errcode. Prints one "RESULT {json}" line.

local threads = {}
local counter = 0

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   local nthreads = tonumber(args[2] or "1")
   requests = {}
   local index = 0
   local n = 0
   for line in io.lines(args[1]) do
      if (index % nthreads) == id then
         local path, auth, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
         n = n + 1
         requests[n] = wrk.format("PUT", path, {
            ["Authorization"] = auth,
            ["Content-Type"] = "application/json",
         }, body)
      end
      index = index + 1
   end
   total = n
   position = 0
   wrapped = 0
   counts = {}
end

function request()
   position = position + 1
   if position > total then
      position = 1
      wrapped = wrapped + 1
   end
   return requests[position]
end

function response(status, headers, body)
   local key = tostring(status)
   if status ~= 200 then
      local code = body:match('"errcode":"([A-Z_]+)"')
      key = key .. ":" .. (code or "-")
   end
   counts[key] = (counts[key] or 0) + 1
end

function done(summary, latency, requests)
   local merged = {}
   local wraps = 0
   for _, thread in ipairs(threads) do
      local c = thread:get("counts")
      for k, v in pairs(c) do
         merged[k] = (merged[k] or 0) + v
      end
      wraps = wraps + thread:get("wrapped")
   end
   local parts = {}
   for k, v in pairs(merged) do
      table.insert(parts, string.format('"%s": %d', k, v))
   end
   io.write(string.format(
      'RESULT {"requests": %d, "duration_us": %d, "socket_errors": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "wrapped": %d, "counts": {%s}}\n',
      summary.requests, summary.duration,
      summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      wraps, table.concat(parts, ", ")))
end
