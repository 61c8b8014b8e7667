-- wrk script: requests FILL_PREFIX..n for every n in [FILL_FIRST, FILL_FIRST + FILL_COUNT), each
-- once and in order, then stops its thread and creates the file FILL_DONE. wrk's main thread
-- sleeps for the whole -d regardless, so bench/run.sh watches for that file and sends wrk SIGINT
-- (its own stop signal), which makes it report at once.
-- Used by bench/run.sh to fill caches; run with -t1 (one Lua state keeps the counter).
local prefix = os.getenv("FILL_PREFIX") or "/k16/"
local first = tonumber(os.getenv("FILL_FIRST") or "0")
local count = tonumber(os.getenv("FILL_COUNT") or "10000")
local done_file = os.getenv("FILL_DONE")
local issued, answered, finished = 0, 0, false

function request()
  local n = issued
  issued = issued + 1
  -- Past the end (only while the last requests are in flight): repeat the first key.
  if n >= count then n = 0 end
  return wrk.format(nil, prefix .. (first + n))
end

function response(status, headers, body)
  answered = answered + 1
  if answered >= count and not finished then
    finished = true
    wrk.thread:stop()
    if done_file then
      local f = io.open(done_file, "w")
      if f then f:close() end
    end
  end
end
