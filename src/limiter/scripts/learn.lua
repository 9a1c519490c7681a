-- Publishes the limits a replica learned from the upstream's headers, for every replica
-- (sluice: src/limiter/store.rs). KEYS[1]: the bucket's hash. ARGV: 1 the hash's TTL in ms,
-- then rpm, tpm, rpd, tpd ('' for a limit the headers did not announce).
-- Returns the version of the learned limits after this call: raised when they changed.
local key = KEYS[1]
local names = {'ll:rm', 'll:tm', 'll:rd', 'll:td'}
local stored = redis.call('HMGET', key, names[1], names[2], names[3], names[4])
local changed = false
for j = 1, 4 do
  if (stored[j] or '') ~= ARGV[j + 1] then
    changed = true
    redis.call('HSET', key, names[j], ARGV[j + 1])
  end
end
local version = tonumber(redis.call('HGET', key, 'lv') or '0') or 0
if changed or version == 0 then
  version = redis.call('HINCRBY', key, 'lv', 1)
end
if redis.call('PTTL', key) < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', key, ARGV[1])
end
return version
