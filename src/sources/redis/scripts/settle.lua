-- Settles one delivery round of the progress log, atomically:
-- entries delivered (or refused for good) are acknowledged and deleted;
-- entries not delivered are parked, one field per (user, title), the newest
-- position winning, and then acknowledged; parked fields delivered are removed
-- unless a newer position was parked meanwhile.
-- KEYS[1] progress log stream, KEYS[2] parked hash
-- ARGV[1] consumer group, ARGV[2] number of done entry ids N, then N ids,
-- then the number of parked fields delivered M, then M (field, value) pairs,
-- then the number of entries to park P, then P (entry id, field, value) triples.
-- A parked value is '<updated_at_ms> <json>'.
local i = 2
local n = tonumber(ARGV[i])
local done = {}
for k = 1, n do
  done[k] = ARGV[i + k]
end
i = i + n + 1
local m = tonumber(ARGV[i])
for k = 0, m - 1 do
  local field, value = ARGV[i + 1 + 2 * k], ARGV[i + 2 + 2 * k]
  if redis.call('HGET', KEYS[2], field) == value then
    redis.call('HDEL', KEYS[2], field)
  end
end
i = i + 2 * m + 1
local p = tonumber(ARGV[i])
for k = 0, p - 1 do
  local id, field, value = ARGV[i + 1 + 3 * k], ARGV[i + 2 + 3 * k], ARGV[i + 3 + 3 * k]
  local current = redis.call('HGET', KEYS[2], field)
  local newer = true
  if current then
    newer = tonumber(string.match(value, '^(%d+)')) >= tonumber(string.match(current, '^(%d+)'))
  end
  if newer then
    redis.call('HSET', KEYS[2], field, value)
  end
  table.insert(done, id)
end
if #done > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(done))
  redis.call('XDEL', KEYS[1], unpack(done))
end
return #done
