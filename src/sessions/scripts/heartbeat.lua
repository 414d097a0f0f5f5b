-- Records a heartbeat and the position it carries.
-- KEYS[1] sessions zset, KEYS[2] session info hash, KEYS[3] positions hash,
-- KEYS[4] devices hash (kept alive with the sessions)
-- ARGV: now_ms, ttl_ms, session_id, position_ms, position_ttl_s
-- Returns the session's "device_id content_id", or false when unknown or expired.
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local last = redis.call('ZSCORE', KEYS[1], ARGV[3])
if not last or tonumber(last) <= now - ttl then
  return false
end
local info = redis.call('HGET', KEYS[2], ARGV[3])
if not info then
  return false
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
local content = string.match(info, '(%S+)$')
redis.call('HSET', KEYS[3], content, ARGV[4])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[5]))
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
redis.call('PEXPIRE', KEYS[4], ttl * 2)
return info
