-- A 429 showed a quantized limit: the burst it allows at once is smaller than the limit, and
-- empty now. Holds for every replica for ARGV[2] seconds, after which each replica's own
-- burst (regrown by then) applies again (sluice: src/limiter/store.rs).
-- KEYS[1]: the bucket's hash. ARGV: 1 the hash's TTL in ms, 2 how long the shrink holds, in
-- seconds, then per shrunk limit: name, burst.
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local i = 3
while i + 1 <= #ARGV do
  local name = ARGV[i]
  local burst = tonumber(ARGV[i + 1])
  local shrunk = tonumber(redis.call('HGET', key, 'bs:' .. name) or '')
  local until_ = tonumber(redis.call('HGET', key, 'bsu:' .. name) or '') or 0
  if shrunk == nil or until_ <= now or burst < shrunk then
    shrunk = burst
  end
  local level = tonumber(redis.call('HGET', key, 'l:' .. name) or '') or 0
  redis.call('HSET', key, 'bs:' .. name, tostring(shrunk), 'bsu:' .. name,
    tostring(now + tonumber(ARGV[2])), 'l:' .. name, tostring(math.min(level, 0)))
  i = i + 2
end
-- The proof in flight is answered: the next one may go.
redis.call('HDEL', key, 'pc')
if redis.call('PTTL', key) < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', key, ARGV[1])
end
return 1
