-- wrk script: each request asks for KEYS_PREFIX..n with n uniform in [0, KEYS_COUNT).
-- Used by bench/run.sh for hits spread over many keys (the cache is filled first).
local prefix = os.getenv("KEYS_PREFIX") or "/k1/"
local count = tonumber(os.getenv("KEYS_COUNT") or "10000")

function init(args)
  math.randomseed(os.time())
end

function request()
  return wrk.format(nil, prefix .. math.random(0, count - 1))
end
