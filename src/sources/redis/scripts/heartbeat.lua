-- Records a heartbeat and the position it carries: the resume position, and
-- (single-node mode, KEYS[6] given) the entry in the progress log that carries
-- it to the internal API, in the same atomic step, before the player is told
-- the position is safe. Liveness is judged by Redis' own clock. A heartbeat
-- means the title is being watched again, so it clears a `completed` mark.
-- KEYS[1] sessions zset, KEYS[2] session info hash, KEYS[3] positions hash,
-- KEYS[4] devices hash, KEYS[5] evicted hash, KEYS[6] progress log stream (optional)
-- ARGV: ttl_ms, session_id, position_ms, position_ttl_s, user_id, content_id
-- Returns {1, now_ms} when recorded, {0, now_ms} when the session is unknown or
-- expired, {-1, now_ms} when it was evicted by a newer start.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local last = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not last or tonumber(last) <= now - ttl then
  if redis.call('HEXISTS', KEYS[5], ARGV[2]) == 1 then
    return {-1, now}
  end
  return {0, now}
end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('HSET', KEYS[3], ARGV[6], ARGV[3])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4]))
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
redis.call('PEXPIRE', KEYS[4], ttl * 2)
if KEYS[6] then
  redis.call('XADD', KEYS[6], '*', 'u', ARGV[5], 'c', ARGV[6], 'p', ARGV[3], 't', now)
end
return {1, now}
