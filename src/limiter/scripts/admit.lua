-- One admission, all or nothing, on the server's clock (sluice: src/limiter/store.rs).
-- KEYS[1]: the bucket's hash. ARGV: 1 requests, 2 tokens, 3 keep (share of each burst left
-- to others, 0..1), 4 seconds of refill kept in hand, 5 mode (0 new request, 1 the request
-- that proves the burst, 2 a refused request sent again), 6 the hash's TTL in ms, 7 the
-- version of the learned limits the caller has (see learn.lua), then per limit eight values:
-- name, resource (0 requests, 1 tokens), capacity, window in seconds, burst, whether the
-- burst is unproven (1/0), the level the caller last knew (where a bucket the store lost,
-- restarted empty, starts again: a restart never resets a live window), and a debt charged
-- first, whatever the answer (what the caller spent from its own share while the store was
-- out of reach).
-- Returns {code, n, sent_requests, sent_tokens, version, rpm, tpm, rpd, tpd, level...}: code 1
-- taken (n unused, then the levels after it), or 0 wait n ms for the refill, 2 only as the
-- burst's proof, 3 paused after an upstream 429 for n ms. sent_*: what all replicas had
-- taken until now, this admission included (a header is corrected for what came after its
-- request: correct.lua). version and the four learned limits ('' for none) come when the
-- store's version is newer than the caller's, '-' otherwise.
local key = KEYS[1]
-- How long a proof in flight holds off other replicas' proofs, at most (seconds).
local PROOF_HOLD = 3
-- The send counters' checkpoints (see below; settle.lua reads them).
local CHECKPOINTS, CHECKPOINTS_PER_SECOND = 64, 20
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local learned = redis.call('HMGET', key, 'lv', 'll:rm', 'll:tm', 'll:rd', 'll:td')
local version = tonumber(learned[1] or '0') or 0
local function header(code, n)
  local reply = {code, n, redis.call('HGET', key, 's') or '0', redis.call('HGET', key, 'st') or '0',
    tostring(version)}
  for j = 2, 5 do
    if version > tonumber(ARGV[7]) then
      reply[#reply + 1] = learned[j] or ''
    else
      reply[#reply + 1] = '-'
    end
  end
  return reply
end
local pause = tonumber(redis.call('HGET', key, 'p') or '0')
if pause > now then
  return header(3, math.ceil((pause - now) * 1000))
end
local updated = tonumber(redis.call('HGET', key, 'u') or '') or now
local elapsed = math.max(0, now - updated)
local cost = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local keep = tonumber(ARGV[3])
local in_hand = tonumber(ARGV[4])
local mode = tonumber(ARGV[5])
local wait, unproven_wait = 0, 0
local meters = {}
local i = 8
while i + 7 <= #ARGV do
  local name = ARGV[i]
  local amount = cost[tonumber(ARGV[i + 1]) + 1]
  local capacity = tonumber(ARGV[i + 2])
  local rate = capacity / tonumber(ARGV[i + 3])
  local burst = tonumber(ARGV[i + 4])
  -- A burst another replica found smaller (a quantized limit) holds for this one too.
  local shrunk = tonumber(redis.call('HGET', key, 'bs:' .. name) or '')
  if shrunk ~= nil and shrunk < burst
    and (tonumber(redis.call('HGET', key, 'bsu:' .. name) or '') or 0) > now then
    burst = shrunk
  end
  -- A burst another replica proved needs no proof here.
  local unproven = ARGV[i + 5] == '1'
    and (tonumber(redis.call('HGET', key, 'pv:' .. name) or '') or 0) < burst
  local level = tonumber(redis.call('HGET', key, 'l:' .. name) or '')
  local old_capacity = tonumber(redis.call('HGET', key, 'c:' .. name) or '')
  if level == nil then
    level = math.min(burst, tonumber(ARGV[i + 6]))
  elseif old_capacity ~= nil and old_capacity ~= capacity then
    -- A changed limit keeps what was spent.
    level = math.max(-burst, math.min(burst, level + capacity - old_capacity))
  end
  level = math.max(-burst, math.min(burst, level + rate * elapsed) - tonumber(ARGV[i + 7]))
  local needed = math.min(amount, burst)
  local floor = math.min(burst * keep + rate * in_hand, burst - needed)
  local missing = needed + floor - level
  if missing > 0 then
    wait = math.max(wait, rate > 0 and missing / rate or 86400)
  end
  if mode == 0 and unproven then
    local quantum = math.max(rate, 1)
    if burst > quantum then
      local short = needed + (burst - quantum) - level
      if short > 0 then
        unproven_wait = math.max(unproven_wait, short / rate)
      end
    end
  end
  meters[#meters + 1] = {name, level, capacity, amount}
  i = i + 8
end
local function save(take)
  for _, m in ipairs(meters) do
    local level = m[2]
    if take then level = level - m[4] end
    m[2] = level
    redis.call('HSET', key, 'l:' .. m[1], tostring(level), 'c:' .. m[1], tostring(m[3]))
  end
  redis.call('HSET', key, 'u', tostring(now))
  -- Only ever lengthened: a pause (or another replica's longer window) keeps its TTL.
  if redis.call('PTTL', key) < tonumber(ARGV[6]) then
    redis.call('PEXPIRE', key, ARGV[6])
  end
end
if wait > 0 then
  save(false)
  return header(0, math.ceil(wait * 1000))
end
if unproven_wait > 0 then
  save(false)
  return header(2, math.ceil(unproven_wait * 1000))
end
if mode == 1 then
  -- One proof at a time across replicas: a second one would overshoot a quantized limit
  -- together with the first. Another replica's proof is waited for (its answer, prove.lua or
  -- shrink.lua, ends the claim; so does the hold, should it never come).
  local claimed = tonumber(redis.call('HGET', key, 'pc') or '0') or 0
  if claimed > now then
    save(false)
    return header(2, math.ceil(math.min(claimed - now, 0.25) * 1000))
  end
  redis.call('HSET', key, 'pc', tostring(now + PROOF_HOLD))
end
save(true)
-- A checkpoint of the send counters per 50 ms tick (a ring of 64: 3.2 s), as they were before
-- the tick's first admission: settle.lua reads what had been sent when a header arrived.
local tick = math.floor(now * CHECKPOINTS_PER_SECOND)
local slot = 'ck:' .. (tick % CHECKPOINTS)
local checkpoint = redis.call('HGET', key, slot)
if not checkpoint or tonumber(string.match(checkpoint, '^(%d+)|')) ~= tick then
  redis.call('HSET', key, slot, tick .. '|' .. (redis.call('HGET', key, 's') or '0') .. '|' ..
    (redis.call('HGET', key, 'st') or '0'))
end
redis.call('HINCRBY', key, 's', ARGV[1])
redis.call('HINCRBY', key, 'st', ARGV[2])
local reply = header(1, 0)
for _, m in ipairs(meters) do
  reply[#reply + 1] = tostring(m[2])
end
return reply
