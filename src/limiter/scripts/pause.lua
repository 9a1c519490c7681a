-- Pauses a bucket for every replica after an upstream 429 (sluice: src/limiter/store.rs).
-- KEYS[1]: the bucket's hash. ARGV: 1 the pause in ms, 2 the hash's TTL in ms.
-- Returns the pause left, in ms, after this one (a longer one already set stands).
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local until_ = math.max(tonumber(redis.call('HGET', key, 'p') or '0'), now + tonumber(ARGV[1]) / 1000)
redis.call('HSET', key, 'p', tostring(until_))
local ttl = math.max(tonumber(ARGV[2]), math.ceil((until_ - now) * 1000))
if redis.call('PTTL', key) < ttl then
  redis.call('PEXPIRE', key, ttl)
end
return math.ceil((until_ - now) * 1000)
