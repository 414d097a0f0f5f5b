-- Ends a session and frees its stream slot; records the final position if given
-- (the resume position, and the progress-log entry when KEYS[6] is given).
-- `completed` marks the title watched; without a position it keeps the stored one.
-- KEYS[1] sessions zset, KEYS[2] session info hash, KEYS[3] positions hash,
-- KEYS[4] devices hash, KEYS[5] evicted hash, KEYS[6] progress log stream (optional)
-- ARGV: session_id, position_ms ('' when none), position_ttl_s, user_id, content_id,
-- completed ('1' or '0')
-- Returns {outcome, now_ms, position recorded or ''}: outcome 1 when ended,
-- 2 when it had been evicted, 0 when unknown.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local outcome = 0
if redis.call('HDEL', KEYS[5], ARGV[1]) == 1 then
  outcome = 2
else
  local info = redis.call('HGET', KEYS[2], ARGV[1])
  local removed = redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  if removed == 0 or not info then
    return {0, now, ''}
  end
  local device = string.match(info, '^(%S+)')
  if device and redis.call('HGET', KEYS[4], device) == ARGV[1] then
    redis.call('HDEL', KEYS[4], device)
  end
  outcome = 1
end
local position = ARGV[2]
local completed = ARGV[6] == '1'
if position == '' and completed then
  local stored = redis.call('HGET', KEYS[3], ARGV[5])
  position = stored and string.match(stored, '^(%d+)') or '0'
end
if position ~= '' then
  local value = position
  if completed then
    value = position .. ':c'
  end
  redis.call('HSET', KEYS[3], ARGV[5], value)
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))
  if KEYS[6] then
    redis.call('XADD', KEYS[6], '*', 'u', ARGV[4], 'c', ARGV[5], 'p', position, 't', now, 'w', ARGV[6])
  end
end
return {outcome, now, position}
