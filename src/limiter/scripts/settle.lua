-- Settles one reservation once (sluice: src/limiter/store.rs).
-- KEYS[1]: the bucket's hash; KEYS[2]: the reservation's settled marker. ARGV: 1 the marker's
-- TTL in ms, 2 the hash's TTL in ms, then per limit five values: name, capacity, window in
-- seconds, burst, delta (positive: charged beyond the estimate; negative: refunded).
-- Returns 1 when applied, 0 when this reservation was already settled.
local key = KEYS[1]
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local updated = tonumber(redis.call('HGET', key, 'u') or '') or now
local elapsed = math.max(0, now - updated)
local i = 3
while i + 4 <= #ARGV do
  local name = ARGV[i]
  local capacity = tonumber(ARGV[i + 1])
  local rate = capacity / tonumber(ARGV[i + 2])
  local burst = tonumber(ARGV[i + 3])
  local delta = tonumber(ARGV[i + 4])
  local level = tonumber(redis.call('HGET', key, 'l:' .. name) or '') or burst
  level = math.min(burst, level + rate * elapsed) - delta
  if delta < 0 then
    level = math.min(level, burst)
  end
  redis.call('HSET', key, 'l:' .. name, tostring(level), 'c:' .. name, tostring(capacity))
  i = i + 5
end
redis.call('HSET', key, 'u', tostring(now))
-- Only ever lengthened: a pause (or another replica's longer window) keeps its TTL.
if redis.call('PTTL', key) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', key, ARGV[2])
end
return 1
