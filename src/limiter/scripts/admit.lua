-- One admission, all or nothing, on the server's clock (sluice: src/limiter/store.rs).
-- KEYS[1]: the bucket's hash. ARGV: 1 requests, 2 tokens, 3 keep (share of each burst left
-- to others, 0..1), 4 seconds of refill kept in hand, 5 mode (0 new request, 1 the request
-- that proves the burst, 2 a refused request sent again), 6 the hash's TTL in ms, then per
-- limit six values: name, resource (0 requests, 1 tokens), capacity, window in seconds,
-- burst, whether the burst is unproven (1/0).
-- Returns {1, seq, level...} when taken, or {code, wait_ms}: 0 wait for the refill, 2 only as
-- the burst's proof, 3 paused after an upstream 429.
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local pause = tonumber(redis.call('HGET', key, 'p') or '0')
if pause > now then
  return {3, math.ceil((pause - now) * 1000)}
end
local updated = tonumber(redis.call('HGET', key, 'u') or '') or now
local elapsed = math.max(0, now - updated)
local cost = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local keep = tonumber(ARGV[3])
local in_hand = tonumber(ARGV[4])
local mode = tonumber(ARGV[5])
local wait, unproven_wait = 0, 0
local meters = {}
local i = 7
while i + 5 <= #ARGV do
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
    level = burst
  elseif old_capacity ~= nil and old_capacity ~= capacity then
    -- A changed limit keeps what was spent.
    level = math.max(-burst, math.min(burst, level + capacity - old_capacity))
  end
  level = math.min(burst, level + rate * elapsed)
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
  i = i + 6
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
  return {0, math.ceil(wait * 1000)}
end
if unproven_wait > 0 then
  save(false)
  return {2, math.ceil(unproven_wait * 1000)}
end
save(true)
local reply = {1, redis.call('HINCRBY', key, 's', 1)}
for _, m in ipairs(meters) do
  reply[#reply + 1] = tostring(m[2])
end
return reply
