-- A replica says it is alive, and learns how many are (sluice: src/limiter/store.rs).
-- KEYS[1]: the replicas' sorted set. ARGV: 1 this replica's id, 2 how long a beat counts, in
-- seconds. Returns the replicas alive, this one included.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 2000))
return redis.call('ZCARD', KEYS[1])
