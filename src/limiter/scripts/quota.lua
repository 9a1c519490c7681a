-- Puts an org in quota cool-down for every replica (sluice: src/limiter/store.rs): the
-- upstream answered `insufficient_quota` or its kin, which retrying never clears.
-- KEYS[1]: the quota cool-downs (see heartbeat.lua). ARGV: 1 the org, 2 the cool-down in
-- ms, 3 the upstream's status, 4 its body. A longer cool-down already set stands.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local until_ = now + tonumber(ARGV[2]) / 1000
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local stored = tonumber(string.match(current, '^([^|]*)|') or '0') or 0
  if stored >= until_ then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.3f', until_) .. '|' .. ARGV[3] .. '|' .. ARGV[4])
local ttl = math.ceil(tonumber(ARGV[2]))
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
