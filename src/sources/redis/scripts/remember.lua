-- Brings positions one instance held in memory while Redis was unreachable
-- back into Redis, for one user: each updates the user's resume position
-- unless Redis holds a newer one, and the entries not yet delivered join the
-- progress log of the user's bucket in the same atomic step.
-- KEYS[1] the user's positions hash, KEYS[2] the progress log of the user's
-- bucket (the same hash tag)
-- ARGV[1] position_ttl_s, ARGV[2] user id, ARGV[3] number of positions N, then
-- N (content id, value '<ms>[:c]@<at_ms>[/<checked_ms>]', at_ms) triples, then
-- the number of log entries L, then L (c, p, t, w, a) records.
-- A stored value without '@<at_ms>' predates stamping: older than any stamped one.
-- A value of the same time replaces the stored one: that is how a position
-- found newest after an outage gets its '/<checked_ms>' (outages.rs).
-- Returns the number of positions written.
local written = 0
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  local content, value, at = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  local current = redis.call('HGET', KEYS[1], content)
  local stored = -1
  if current then
    stored = tonumber(string.match(current, '@(%d+)') or '-1')
  end
  if at >= stored then
    redis.call('HSET', KEYS[1], content, value)
    written = written + 1
  end
end
if written > 0 then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
end
local logged = tonumber(ARGV[i])
i = i + 1
for _ = 1, logged do
  -- The entry's shape is the session scripts' (session_lib.lua), plus 'a'.
  redis.call('XADD', KEYS[2], '*',
    'i', ARGV[i + 1] .. ' ' .. ARGV[i + 2] .. ' ' .. ARGV[i + 3] .. ' ' .. ARGV[i] .. ' ' .. ARGV[2],
    'a', ARGV[i + 4])
  i = i + 5
end
return written
