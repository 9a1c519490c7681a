-- A replica says it is alive, and learns how many are and which orgs are out of quota
-- (sluice: src/limiter/store.rs). KEYS[1]: the replicas' sorted set; KEYS[2]: the quota
-- cool-downs (a hash: org -> "until|status|body", written by quota.lua). ARGV: 1 this
-- replica's id, 2 how long a beat counts, in seconds.
-- Returns {replicas alive (this one included), then per org in cool-down: org, ms left,
-- status, body}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 2000))
local reply = {redis.call('ZCARD', KEYS[1])}
local quota = redis.call('HGETALL', KEYS[2])
for j = 1, #quota, 2 do
  local until_, status, body = string.match(quota[j + 1], '^([^|]*)|([^|]*)|(.*)$')
  local left = until_ and math.ceil((tonumber(until_) - now) * 1000) or 0
  if left > 0 then
    reply[#reply + 1] = quota[j]
    reply[#reply + 1] = left
    reply[#reply + 1] = tonumber(status)
    reply[#reply + 1] = body
  else
    redis.call('HDEL', KEYS[2], quota[j])
  end
end
return reply
