-- Shared by the session scripts (prepended to each). Every session script
-- takes the same first keys: KEYS[1] sessions (zset: session id -> last
-- heartbeat ms, live or expired and not yet buried), KEYS[2] session info
-- (hash: session id -> "device_id content_id"), KEYS[3] devices (hash:
-- device id -> its session id), KEYS[4] ended (zset: "e:<id>" evicted or
-- "s:<id>" stopped, replaced or expired -> when it ended).
-- Liveness is judged by Redis' own clock, so instances with skewed clocks agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Ended sessions remembered per user: this many, and a start keeps its limit
-- plus this many (a burst of evicting starts must leave every evicted player
-- able to learn why at its next heartbeat). An id forgotten here is one Redis
-- "has no trace of": its next heartbeat may record it again, but only within
-- the limit, so the bound costs no stream.
local ENDED_KEEP = 16

local function forget(sid)
  local info = redis.call('HGET', KEYS[2], sid)
  local dev = info and string.match(info, '^(%S+)')
  if dev and redis.call('HGET', KEYS[3], dev) == sid then
    redis.call('HDEL', KEYS[3], dev)
  end
  redis.call('ZREM', KEYS[1], sid)
  redis.call('HDEL', KEYS[2], sid)
end

-- How long the user's session keys outlive their last write, in ms. Each
-- script sets it from its arguments before it writes anything.
local key_lifetime

-- Remembers that a session ended ('e' evicted, 's' otherwise) so that its id
-- is never recorded again while remembered. Some paths bury and return
-- without keeping the keys (an expired session's heartbeat, a refusal), and
-- the first burial creates the key: it gets its lifetime here, or it would
-- outlive a user who never comes back.
local function bury(sid, why, keep)
  redis.call('ZADD', KEYS[4], now, why .. ':' .. sid)
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -(keep + 1))
  redis.call('PEXPIRE', KEYS[4], 2 * key_lifetime)
end

-- 'e', 's' or nil (Redis keeps no trace of it).
local function ended_as(sid)
  if redis.call('ZSCORE', KEYS[4], 'e:' .. sid) then
    return 'e'
  end
  if redis.call('ZSCORE', KEYS[4], 's:' .. sid) then
    return 's'
  end
  return nil
end

-- Sessions without a heartbeat for ttl stop counting, and stay ended.
local function bury_expired(ttl, keep)
  for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)) do
    forget(sid)
    bury(sid, 's', keep)
  end
end

-- {code, now, id1, info1, ...}: the user's sessions, for a refusal.
local function refusal(code)
  local result = {code, now}
  for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    table.insert(result, sid)
    table.insert(result, redis.call('HGET', KEYS[2], sid) or '')
  end
  return result
end

-- The session keys live while the user plays, and at least key_lifetime
-- after that, so that ended ids stay ended. They are given twice that, all
-- four at once, so a heartbeat need renew them only once less than
-- key_lifetime remains (keep_keys_if_low): one PTTL on nearly every heartbeat
-- instead of four PEXPIREs, which were ~12 % of the heartbeat's time in
-- Redis. The other keys never expire before the sessions key: they are
-- renewed with it, and a key created later gets its lifetime as it is created.
local function keep_keys()
  for i = 1, 4 do
    redis.call('PEXPIRE', KEYS[i], 2 * key_lifetime)
  end
end

local function keep_keys_if_low()
  if redis.call('PTTL', KEYS[1]) < key_lifetime then
    keep_keys()
  end
end

-- The resume position ('<ms>[:c]@<now>') and the progress-log entry that
-- carries it to the internal API (KEYS[6], the log of the user's bucket: the
-- same hash tag, so Redis Cluster runs this in one slot too), in the same
-- atomic step. The entry is one field, 'i' = '<position> <now> <completed>
-- <content> <user>' (the user last: it may hold spaces), because the courier
-- reads every entry back and each field costs it a reply value to parse.
local function record_position(user, content, position, completed, position_ttl)
  local value = position
  if completed == '1' then
    value = value .. ':c'
  end
  redis.call('HSET', KEYS[5], content, value .. '@' .. now)
  redis.call('EXPIRE', KEYS[5], position_ttl)
  redis.call('XADD', KEYS[6], '*', 'i', position .. ' ' .. now .. ' ' .. completed .. ' ' .. content .. ' ' .. user)
end

