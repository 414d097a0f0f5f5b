-- Ends a session and frees its stream slot; records the final position if
-- given. `completed` marks the title watched; without a position it keeps the
-- stored one.
-- KEYS[5] positions hash, KEYS[6] the progress log of the user's bucket.
-- ARGV: 1 session_id, 2 position_ms ('' when none), 3 position_ttl_s,
-- 4 user_id, 5 content_id, 6 completed ('1' or '0'), 7 deadline (as in
-- heartbeat.lua, or ''), 8 '1' when Moneta issued the id to this caller (a
-- session Redis has no trace of still ends, and records its position),
-- 9 key lifetime ms.
-- Returns {outcome, now, position recorded or ''}: outcome 1 ended, 2 it had
-- been evicted, 3 Redis had no trace of it, 0 unknown or already ended, 4 too
-- late: the caller gave up waiting and kept the position itself, so the
-- session ends (the player did stop) but no position is written (it would
-- carry a newer time than positions acknowledged after it).
key_lifetime = tonumber(ARGV[9])
local late = ARGV[7] ~= '' and now > tonumber(ARGV[7])
local sid = ARGV[1]
local outcome
if redis.call('ZSCORE', KEYS[1], sid) then
  forget(sid)
  outcome = 1
else
  local why = ended_as(sid)
  if why == 'e' then
    redis.call('ZREM', KEYS[4], 'e:' .. sid)
    outcome = 2
  elseif why or ARGV[8] ~= '1' then
    return {0, now, ''}
  else
    outcome = 3
  end
end
bury(sid, 's', ENDED_KEEP)
keep_keys()
if late then
  return {4, now, ''}
end
local position = ARGV[2]
if position == '' and ARGV[6] == '1' then
  local stored = redis.call('HGET', KEYS[5], ARGV[5])
  position = stored and string.match(stored, '^(%d+)') or '0'
end
if position ~= '' then
  record_position(ARGV[4], ARGV[5], position, ARGV[6])
  keep_positions(tonumber(ARGV[3]))
end
return {outcome, now, position}
