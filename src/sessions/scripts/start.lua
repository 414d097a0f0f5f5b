-- Starts a playback session unless the user is at the concurrent-stream limit.
-- Atomic: Redis runs the whole script before any other command on these keys.
-- KEYS[1] sessions (zset: session id -> last heartbeat ms)
-- KEYS[2] session info (hash: session id -> "device_id content_id")
-- ARGV: now_ms, ttl_ms, max_streams, session_id, device_id, content_id
-- Returns {1} when started, else {0, id1, info1, id2, info2, ...} (the live sessions).
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local max = tonumber(ARGV[3])

-- Sessions without a heartbeat for ttl stop counting.
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end

local live = redis.call('ZRANGE', KEYS[1], 0, -1)
local others = {}
for _, id in ipairs(live) do
  local info = redis.call('HGET', KEYS[2], id)
  local device = info and string.match(info, '^(%S+)')
  if device == ARGV[5] then
    -- The same device starting again replaces its old session.
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  else
    table.insert(others, id)
    table.insert(others, info or '')
  end
end

if #others / 2 >= max then
  local result = {0}
  for _, v in ipairs(others) do table.insert(result, v) end
  return result
end

redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5] .. ' ' .. ARGV[6])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return {1}
