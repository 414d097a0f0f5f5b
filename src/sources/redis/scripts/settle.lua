-- Settles one delivery round of one shard of the progress log (a bucket's,
-- or the `{progress}` log of the layout before buckets), atomically.
-- KEYS[1] progress log stream, KEYS[2] parked hash, KEYS[3] dead-letter
-- stream, all three of one hash tag
-- ARGV[1] consumer group, ARGV[2] dead-letter stream length (approximate cap),
-- then sections, each a count followed by that many records:
--   forget  (field, value): a parked field delivered, removed unless it
--           changed meanwhile (a newer position, another instance's attempt);
--   retry   (field, value, new value): a parked field that failed alone again,
--           its attempts counted, unless it changed meanwhile;
--   bury    (field, value, u, c, p, t, w, a, e): a parked field that failed
--           alone too often, moved to the dead letters unless it changed
--           meanwhile (then whoever changed it decides);
--   dead    (entry id or '', u, c, p, t, w, a, e): a log entry (or, with '',
--           a position held in memory) that failed alone too often, unless
--           another instance that took the entry over settled it first;
--   park    (entry id, field, value): entries not delivered, folded into the
--           parked hash, one field per (user, title), the newest winning;
--   done    (entry id): entries delivered, refused for good or unparseable.
-- Parked fields are handled first: a poison field buried here makes room for
-- an older position of the same pair parked in the same round, which must
-- not be lost with it.
-- A parked value is '<updated_at_ms> <json>'.
-- Returns {entries acknowledged, positions moved to the dead letters}: two
-- instances may settle the same parked field or entry, and only what this
-- call really moved counts as poison.
local i = 3
local function count()
  local n = tonumber(ARGV[i])
  i = i + 1
  return n
end

local acked = {}

local forget = count()
for _ = 1, forget do
  local field, value = ARGV[i], ARGV[i + 1]
  i = i + 2
  if redis.call('HGET', KEYS[2], field) == value then
    redis.call('HDEL', KEYS[2], field)
  end
end

local retry = count()
for _ = 1, retry do
  local field, value, new = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  if redis.call('HGET', KEYS[2], field) == value then
    redis.call('HSET', KEYS[2], field, new)
  end
end

local function dead_letter(at)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*',
    'u', ARGV[at], 'c', ARGV[at + 1], 'p', ARGV[at + 2], 't', ARGV[at + 3],
    'w', ARGV[at + 4], 'a', ARGV[at + 5], 'e', ARGV[at + 6])
end

local buried = 0

local bury = count()
for _ = 1, bury do
  local field, value = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', KEYS[2], field) == value then
    redis.call('HDEL', KEYS[2], field)
    dead_letter(i + 2)
    buried = buried + 1
  end
  i = i + 9
end

-- Whether another instance settled the entry first: it took the entry over
-- while this one's delivery hung, and judged it too. The log is never
-- trimmed, so an entry gone from it was settled, unless Redis lost its data
-- (the group is gone with it): then the position is kept here.
local function settled_elsewhere(id)
  if #redis.call('XRANGE', KEYS[1], id, id) > 0 then
    return false
  end
  local group = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 1)
  return type(group) == 'table' and not group.err
end

local dead = count()
for _ = 1, dead do
  local id = ARGV[i]
  if id == '' then
    dead_letter(i + 1)
    buried = buried + 1
  elseif not settled_elsewhere(id) then
    dead_letter(i + 1)
    buried = buried + 1
    table.insert(acked, id)
  end
  i = i + 8
end

local park = count()
for _ = 1, park do
  local id, field, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  local current = redis.call('HGET', KEYS[2], field)
  local newer = true
  if current then
    newer = tonumber(string.match(value, '^(%d+)')) >= tonumber(string.match(current, '^(%d+)'))
  end
  if newer then
    redis.call('HSET', KEYS[2], field, value)
  end
  table.insert(acked, id)
end

local done = count()
for _ = 1, done do
  table.insert(acked, ARGV[i])
  i = i + 1
end

if #acked > 0 then
  -- The group is gone when Redis lost its data meanwhile: nothing to
  -- acknowledge then, and the entries still leave the log.
  redis.pcall('XACK', KEYS[1], ARGV[1], unpack(acked))
  redis.call('XDEL', KEYS[1], unpack(acked))
end
return {#acked, buried}
