-- Records that the upstream took a request beyond a second's worth at once: the burst is
-- proven for every replica (sluice: src/limiter/store.rs). KEYS[1]: the bucket's hash.
-- ARGV: 1 the hash's TTL in ms, then per limit: name, the burst proven.
local key = KEYS[1]
local i = 2
while i + 1 <= #ARGV do
  redis.call('HSET', key, 'pv:' .. ARGV[i], ARGV[i + 1])
  i = i + 2
end
-- The proof in flight is answered: the next one may go.
redis.call('HDEL', key, 'pc')
if redis.call('PTTL', key) < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', key, ARGV[1])
end
return 1
