-- Records a heartbeat and the position it carries, before the player is told
-- the position is safe. A heartbeat means the title is being watched again,
-- so it clears a `completed` mark.
-- KEYS[5] positions hash, KEYS[6] the progress log of the user's bucket.
-- ARGV: 1 ttl_ms, 2 session_id, 3 position_ms (or '': a licence request
-- recording a session Redis has no trace of, nothing to record), 4 user_id, 5 content_id,
-- 6 deadline (Redis ms after which the caller no longer waits, or ''),
-- 7 max_streams to record a session Redis has no trace of (or '' not to),
-- 8 device id for such a session (the one its id carries, or '' for ids
-- issued before ids carried it).
-- Returns {1, now} recorded; {0, now} unknown, stopped or expired; {-1, now}
-- evicted by a newer start; {2, now} no trace (and ARGV[7] was ''); {3, now,
-- id1, info1, ...} no trace and the limit is reached (nothing changed);
-- {4, now} too late: the caller gave up waiting and kept the position
-- itself, so nothing is written (a paused Redis runs queued scripts late,
-- and a late write would carry a newer time than positions acknowledged
-- after it).
if ARGV[6] ~= '' and now > ARGV[6] + 0 then
  return {4, now}
end
local sid = ARGV[2]
local last = redis.call('ZSCORE', KEYS[1], sid)
if last and last + 0 <= now - ttl then
  local ending = endings()
  ending.forget(sid)
  ending.bury(sid, 's', ENDED_KEEP)
  return {0, now}
end
if not last then
  local ending = endings()
  local why = ending.ended_as(sid)
  if why == 'e' then
    return {-1, now}
  elseif why then
    return {0, now}
  elseif ARGV[7] == '' then
    return {2, now}
  end
  -- Issued by Moneta, unknown to Redis (started while Redis was unreachable,
  -- or Redis lost its data): recorded again if the limit allows it, under the
  -- device its id carries, where the rule of a start holds: one session per
  -- device. Of two on one device, the later issued plays; the other was
  -- replaced.
  ending.bury_expired(ENDED_KEEP)
  local device = ARGV[8]
  local previous = device ~= '' and redis.call('HGET', KEYS[3], device)
  if previous and not redis.call('ZSCORE', KEYS[1], previous) then
    previous = nil
  end
  if previous then
    local mine, theirs = issued(sid), issued(previous)
    if mine and theirs and mine < theirs then
      ending.bury(sid, 's', ENDED_KEEP)
      return {0, now}
    end
  end
  local live = redis.call('ZCARD', KEYS[1])
  if previous then
    live = live - 1
  end
  if live >= ARGV[7] + 0 then
    return ending.refusal(3)
  end
  if previous then
    ending.forget(previous)
    ending.bury(previous, 's', ENDED_KEEP)
  end
  if device == '' then
    device = 'unknown'
  else
    redis.call('HSET', KEYS[3], device, sid)
  end
  redis.call('HSET', KEYS[2], sid, device .. ' ' .. ARGV[5])
  -- Keys Redis lost one by one (evicted under memory pressure) come back here.
  keep_keys()
end
redis.call('ZADD', KEYS[1], now_s, sid)
if ARGV[3] ~= '' then
  record_position(ARGV[4], ARGV[5], ARGV[3], '0')
end
keep_keys_if_low()
return {1, now}
