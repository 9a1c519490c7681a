-- The learned limits every replica shares (sluice: src/limiter/store.rs; written by
-- learn.lua). KEYS[1]: the bucket's hash. Returns {version, rpm, tpm, rpd, tpd}, '' for a
-- limit not learned; version 0 when nothing was.
local stored = redis.call('HMGET', KEYS[1], 'lv', 'll:rm', 'll:tm', 'll:rd', 'll:td')
local reply = {stored[1] or '0'}
for j = 2, 5 do
  reply[j] = stored[j] or ''
end
return reply
