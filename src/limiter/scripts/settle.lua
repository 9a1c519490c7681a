-- Settles one reservation once, and lowers its bucket's levels to what the upstream's headers
-- said it had left, less what the replicas took after those headers came (sluice:
-- src/limiter/store.rs). Both ride one round trip: the correction comes with the request's
-- settlement.
--
-- "After the headers came" is read from the send counters' checkpoints admit.lua keeps (one
-- per 50 ms, 3.2 s of them): the counters before the first admission after the headers came
-- (or the request's own admission's, if later). Sends admitted before that are taken as seen
-- by the upstream, so a send another replica made is never subtracted twice, at the price of
-- those still on their way then (the 429 handling covers them). A header older than the
-- checkpoints (a long stream's) corrects nothing.
-- KEYS[1]: the bucket's hash; KEYS[2]: the reservation's settled marker. ARGV: 1 the
-- marker's TTL in ms, 2 the hash's TTL in ms, 3 the counters after the request's admission
-- (sent_requests; '' for no correction), 4 the same in tokens, 5 seconds since the headers
-- came, then per limit seven values: name, resource (0 requests, 1 tokens), capacity, window
-- in seconds, burst, delta (positive: charged beyond the estimate; negative: refunded; 0 for
-- none), remaining per the headers ('' for unknown).
-- Returns 1 when applied, 0 when this reservation was already settled.
local key = KEYS[1]
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local updated = tonumber(redis.call('HGET', key, 'u') or '') or now
local elapsed = math.max(0, now - updated)
local CHECKPOINTS, CHECKPOINTS_PER_SECOND = 64, 20
local age = tonumber(ARGV[5])
local correct = ARGV[3] ~= ''
local unseen = {0, 0}
if correct then
  local sent = {tonumber(redis.call('HGET', key, 's') or '0'),
    tonumber(redis.call('HGET', key, 'st') or '0')}
  local came = math.floor((now - age) * CHECKPOINTS_PER_SECOND)
  if math.floor(now * CHECKPOINTS_PER_SECOND) - came >= CHECKPOINTS - 1 then
    correct = false
  else
    -- What had been sent when the headers came: the counters before the first tick after it
    -- that admitted anything (none: nothing was admitted since).
    local basis = {sent[1], sent[2]}
    for tick = came + 1, math.floor(now * CHECKPOINTS_PER_SECOND) do
      local checkpoint = redis.call('HGET', key, 'ck:' .. (tick % CHECKPOINTS))
      if checkpoint then
        local stored, s, st = string.match(checkpoint, '^(%d+)|([^|]*)|(.*)$')
        if tonumber(stored) == tick then
          basis = {tonumber(s), tonumber(st)}
          break
        end
      end
    end
    -- Never before the request's own admission (a store restarted empty counts from zero).
    basis[1] = math.max(basis[1], math.min(tonumber(ARGV[3]), sent[1]))
    basis[2] = math.max(basis[2], math.min(tonumber(ARGV[4]), sent[2]))
    unseen = {math.max(0, sent[1] - basis[1]), math.max(0, sent[2] - basis[2])}
  end
end
local i = 6
while i + 6 <= #ARGV do
  local name = ARGV[i]
  local resource = tonumber(ARGV[i + 1]) + 1
  local capacity = tonumber(ARGV[i + 2])
  local rate = capacity / tonumber(ARGV[i + 3])
  local burst = tonumber(ARGV[i + 4])
  local delta = tonumber(ARGV[i + 5])
  local level = tonumber(redis.call('HGET', key, 'l:' .. name) or '')
  local old_capacity = tonumber(redis.call('HGET', key, 'c:' .. name) or '')
  if level == nil then
    -- A bucket the store lost (restarted empty): left to the next admission, which starts
    -- it from the level its caller knew (a settle creating it would start it full).
  elseif old_capacity ~= nil and old_capacity ~= capacity then
    -- A changed limit keeps what was spent (as in admit.lua).
    level = math.max(-burst, math.min(burst, level + capacity - old_capacity))
  end
  if level ~= nil then
    level = math.min(burst, level + rate * elapsed) - delta
    if delta < 0 then
      level = math.min(level, burst)
    end
    if correct and ARGV[i + 6] ~= '' then
      local implied = math.min(tonumber(ARGV[i + 6]) + rate * age, burst) - unseen[resource]
      if implied < level then
        level = math.max(implied, -burst)
      end
    end
    redis.call('HSET', key, 'l:' .. name, tostring(level), 'c:' .. name, tostring(capacity))
  end
  i = i + 7
end
redis.call('HSET', key, 'u', tostring(now))
-- Only ever lengthened: a pause (or another replica's longer window) keeps its TTL.
if redis.call('PTTL', key) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', key, ARGV[2])
end
return 1
