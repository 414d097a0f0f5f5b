-- Ends a session and frees its stream slot; records the final position if
-- given. `completed` marks the title watched; without a position it keeps the
-- stored one.
-- KEYS[5] positions hash, KEYS[6] the progress log of the user's bucket.
-- ARGV: 1 ttl_ms, 2 session_id, 3 position_ms ('' when none), 4 user_id,
-- 5 content_id, 6 completed ('1' or '0'), 7 deadline (as in heartbeat.lua,
-- or ''), 8 '1' when Moneta issued the id to this caller (a session Redis has
-- no trace of still ends, and records its position).
-- Returns {outcome, now, position recorded or ''}: outcome 1 ended, 2 it had
-- been evicted, 3 Redis had no trace of it, 0 unknown or already ended, 4 too
-- late: the caller gave up waiting and kept the position itself, so the
-- session ends (the player did stop) but no position is written (it would
-- carry a newer time than positions acknowledged after it).
local late = ARGV[7] ~= '' and now > ARGV[7] + 0
local sid = ARGV[2]
local ending = endings()
local outcome
if redis.call('ZSCORE', KEYS[1], sid) then
  ending.forget(sid)
  outcome = 1
else
  local why = ending.ended_as(sid)
  if why == 'e' then
    redis.call('ZREM', KEYS[4], 'e:' .. sid)
    outcome = 2
  elseif why or ARGV[8] ~= '1' then
    return {0, now, ''}
  else
    outcome = 3
  end
end
ending.bury(sid, 's', ENDED_KEEP)
keep_keys()
if late then
  return {4, now, ''}
end
local position = ARGV[3]
if position == '' and ARGV[6] == '1' then
  local stored = redis.call('HGET', KEYS[5], ARGV[5])
  position = stored and string.match(stored, '^(%d+)') or '0'
end
if position ~= '' then
  record_position(ARGV[4], ARGV[5], position, ARGV[6])
  keep_positions()
end
return {outcome, now, position}
