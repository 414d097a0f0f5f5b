-- Ends a session and frees its stream slot; records the final position if given.
-- KEYS[1] sessions zset, KEYS[2] session info hash, KEYS[3] positions hash,
-- KEYS[4] devices hash (device id -> session id)
-- ARGV: session_id, position_ms ('' when none), position_ttl_s
-- Returns the session's "device_id content_id", or false when unknown.
local info = redis.call('HGET', KEYS[2], ARGV[1])
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if removed == 0 or not info then
  return false
end
local device = string.match(info, '^(%S+)')
if device and redis.call('HGET', KEYS[4], device) == ARGV[1] then
  redis.call('HDEL', KEYS[4], device)
end
if ARGV[2] ~= '' then
  local content = string.match(info, '(%S+)$')
  redis.call('HSET', KEYS[3], content, ARGV[2])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))
end
return info
