-- Starts a playback session unless the user is at the concurrent-stream limit.
-- Atomic: Redis runs the whole script before any other command on these keys.
-- KEYS[1] sessions (zset: session id -> last heartbeat ms)
-- KEYS[2] session info (hash: session id -> "device_id content_id")
-- KEYS[3] devices (hash: device id -> session id)
-- ARGV: now_ms, ttl_ms, max_streams, session_id, device_id, content_id
-- Returns {1} when started, else {0, id1, info1, id2, info2, ...} (the live sessions).
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local max = tonumber(ARGV[3])

-- Sessions without a heartbeat for ttl stop counting.
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
for _, id in ipairs(expired) do
  local info = redis.call('HGET', KEYS[2], id)
  local device = info and string.match(info, '^(%S+)')
  if device and redis.call('HGET', KEYS[3], device) == id then
    redis.call('HDEL', KEYS[3], device)
  end
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end

-- The same device starting again replaces its old session.
local previous = redis.call('HGET', KEYS[3], ARGV[5])
if previous then
  redis.call('ZREM', KEYS[1], previous)
  redis.call('HDEL', KEYS[2], previous)
end

if redis.call('ZCARD', KEYS[1]) >= max then
  -- Refused: name the sessions holding the slots (the slow path only).
  local live = redis.call('ZRANGE', KEYS[1], 0, -1)
  local result = {0}
  for _, id in ipairs(live) do
    table.insert(result, id)
    table.insert(result, redis.call('HGET', KEYS[2], id) or '')
  end
  return result
end

redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5] .. ' ' .. ARGV[6])
redis.call('HSET', KEYS[3], ARGV[5], ARGV[4])
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
end
return {1}
