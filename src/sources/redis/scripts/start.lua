-- Starts a playback session unless the user is at the concurrent-stream limit.
-- Atomic: Redis runs the whole script before any other command on these keys,
-- so simultaneous starts by one user never exceed the limit. Liveness is
-- judged by Redis' own clock, so instances with skewed clocks agree.
-- KEYS[1] sessions (zset: session id -> last heartbeat ms)
-- KEYS[2] session info (hash: session id -> "device_id content_id")
-- KEYS[3] devices (hash: device id -> session id)
-- KEYS[4] evicted (hash: session id -> 1)
-- ARGV: ttl_ms, max_streams, session_id, device_id, content_id, evict_oldest ('1' or '0')
-- Returns {1, now_ms, evicted_id or ''} when started, else
-- {0, now_ms, id1, info1, id2, info2, ...} (the live sessions); a refusal changes nothing
-- but forgetting sessions that were no longer live.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local id, device, content = ARGV[3], ARGV[4], ARGV[5]

local function forget(sid)
  local info = redis.call('HGET', KEYS[2], sid)
  local dev = info and string.match(info, '^(%S+)')
  if dev and redis.call('HGET', KEYS[3], dev) == sid then
    redis.call('HDEL', KEYS[3], dev)
  end
  redis.call('ZREM', KEYS[1], sid)
  redis.call('HDEL', KEYS[2], sid)
end

-- Sessions without a heartbeat for ttl stop counting.
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)) do
  forget(sid)
end

-- The same device starting again replaces its old session: it does not count.
local previous = redis.call('HGET', KEYS[3], device)
if previous and not redis.call('ZSCORE', KEYS[1], previous) then
  previous = nil
end
local live = redis.call('ZCARD', KEYS[1])
if previous then
  live = live - 1
end

local evicted = ''
if live >= max then
  if ARGV[6] ~= '1' or max < 1 then
    local result = {0, now}
    for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
      table.insert(result, sid)
      table.insert(result, redis.call('HGET', KEYS[2], sid) or '')
    end
    return result
  end
  -- evict_oldest: the live session with the oldest heartbeat makes room.
  for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if sid ~= previous then
      evicted = sid
      break
    end
  end
  forget(evicted)
  redis.call('HSET', KEYS[4], evicted, 1)
  redis.call('PEXPIRE', KEYS[4], ttl * 2)
end

if previous then
  forget(previous)
end
redis.call('ZADD', KEYS[1], now, id)
redis.call('HSET', KEYS[2], id, device .. ' ' .. content)
redis.call('HSET', KEYS[3], device, id)
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
end
return {1, now, evicted}
